//! Prometheus metrics: one exporter per process, serving `/metrics` on its own address.

use crate::error::NodeError;

/// Starts the Prometheus exporter on `addr` (e.g. `127.0.0.1:9100`).
pub fn install(addr: &str) -> Result<(), NodeError> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
        NodeError::Other(format!(
            "`metrics_listen` = `{addr}` is not a socket address (host:port)"
        ))
    })?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(sock)
        .install()
        .map_err(|e| NodeError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}
