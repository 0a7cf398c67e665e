//! Prometheus metrics and health checks on one HTTP listener per process (`metrics_listen`):
//! `/metrics`, `/healthz` (liveness: the daemon's main loop still turns) and `/readyz`
//! (readiness: store open, gRPC listener bound and serving). Kubernetes probes and
//! Prometheus scrapes in `deploy/` point here; nothing here decides anything for a job.

use crate::error::NodeError;
use axum::http::{StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";
/// Liveness: 200 while the main loop turns, 503 once it has stalled for [`STALL_AFTER`].
pub const LIVENESS_PATH: &str = "/healthz";
/// Readiness: 200 once the store is open and the gRPC server is serving, 503 before and
/// while it stops.
pub const READINESS_PATH: &str = "/readyz";
/// A main loop that has not turned for this long is reported dead (it turns at least
/// every 200 ms; a job's heavy work runs on other threads).
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// What the health endpoints report: set by the daemon's wiring ([`crate::base`]).
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    /// Milliseconds after [`epoch`] of the main loop's last turn, plus one; 0: not yet.
    last_turn: AtomicU64,
}

/// The process's clock origin for [`Health`] (monotonic: a wall-clock step is no stall).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus one (0 means "never").
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl Health {
    /// Nothing ready, no turn yet.
    pub const fn new() -> Self {
        Health {
            ready: AtomicBool::new(false),
            last_turn: AtomicU64::new(0),
        }
    }

    /// Marks the daemon ready (store open, gRPC serving) or not (stopping).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Records a turn of the main loop.
    pub fn turn(&self) {
        self.last_turn.store(now_ms(), Ordering::Relaxed);
    }

    /// `/healthz`: alive until the main loop has started and then stalled.
    fn liveness(&self) -> (StatusCode, String) {
        self.liveness_at(now_ms())
    }

    fn liveness_at(&self, now: u64) -> (StatusCode, String) {
        let last = self.last_turn.load(Ordering::Relaxed);
        if last == 0 {
            return (StatusCode::OK, "starting\n".into());
        }
        let since = Duration::from_millis(now.saturating_sub(last));
        if since > STALL_AFTER {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "main loop stalled: no turn for {} s (limit {} s)\n",
                    since.as_secs(),
                    STALL_AFTER.as_secs()
                ),
            )
        } else {
            (StatusCode::OK, "ok\n".into())
        }
    }

    /// `/readyz`.
    fn readiness(&self) -> (StatusCode, String) {
        if self.ready.load(Ordering::Relaxed) {
            (StatusCode::OK, "ready\n".into())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: store or gRPC listener not up yet (or stopping)\n".into(),
            )
        }
    }
}

/// The process's health, reported on `metrics_listen`.
pub fn health() -> &'static Health {
    static HEALTH: Health = Health::new();
    &HEALTH
}

/// The HTTP routes served on `metrics_listen`.
pub fn router(metrics: PrometheusHandle, health: &'static Health) -> axum::Router {
    axum::Router::new()
        .route(
            METRICS_PATH,
            axum::routing::get(move || {
                let body = metrics.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
        .route(
            LIVENESS_PATH,
            axum::routing::get(move || async move { health.liveness() }),
        )
        .route(
            READINESS_PATH,
            axum::routing::get(move || async move { health.readiness() }),
        )
}

/// Installs the process's Prometheus recorder and serves [`router`] on `addr` (e.g.
/// `127.0.0.1:9100`). Must run inside the tokio runtime.
pub fn install(addr: &str) -> Result<(), NodeError> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
        NodeError::Other(format!(
            "`metrics_listen` = `{addr}` is not a socket address (host:port)"
        ))
    })?;
    let listen_err = |reason: String| NodeError::Listen {
        addr: addr.to_string(),
        reason,
    };
    // Bound here, before anything else opens, so a port in use fails the start at once.
    let std_listener = std::net::TcpListener::bind(sock).map_err(|e| listen_err(e.to_string()))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| listen_err(e.to_string()))?;
    let listener =
        tokio::net::TcpListener::from_std(std_listener).map_err(|e| listen_err(e.to_string()))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| listen_err(e.to_string()))?;
    // Histograms are drained into their summaries by upkeep (the exporter's own listener
    // did this; ours must).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = router(handle, health());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics and health listener stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn probes_follow_readiness_and_a_stalled_main_loop() {
        let health: &'static Health = Box::leak(Box::new(Health::new()));
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("tunenet_probe_test_total").increment(3)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(handle, health)).await });

        let (code, body) = get(addr, READINESS_PATH).await;
        assert_eq!(
            code, 503,
            "not ready before the store and listener are up: {body}"
        );
        let (code, body) = get(addr, LIVENESS_PATH).await;
        assert_eq!(code, 200, "a starting daemon is alive: {body}");

        health.set_ready(true);
        health.turn();
        assert_eq!(get(addr, READINESS_PATH).await.0, 200);
        let (code, body) = get(addr, LIVENESS_PATH).await;
        assert_eq!((code, body.ends_with("ok\n")), (200, true), "{body}");
        let (code, body) = get(addr, METRICS_PATH).await;
        assert_eq!(code, 200);
        assert!(body.contains("tunenet_probe_test_total 3"), "{body}");

        // A main loop whose last turn is older than the limit is reported dead.
        let last = health.last_turn.load(Ordering::Relaxed);
        let limit = STALL_AFTER.as_millis() as u64;
        assert_eq!(health.liveness_at(last + limit).0, StatusCode::OK);
        let (code, body) = health.liveness_at(last + limit + 1000);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("stalled"), "{body}");
        health.turn();
        assert_eq!(health.liveness().0, StatusCode::OK, "a new turn revives it");

        health.set_ready(false);
        assert_eq!(
            get(addr, READINESS_PATH).await.0,
            503,
            "stopping: not ready"
        );
        assert_eq!(get(addr, "/nothing").await.0, 404);
    }
}
