//! What every daemon opens first: data dir, identity, stores, device and listening socket;
//! and the shutdown signal they all stop on.

use crate::error::NodeError;
use crate::keys;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tunenet_store::{BlobStore, SledStore, Store};
use tunenet_types::Identity;

/// A daemon's opened resources.
pub struct NodeBase {
    /// The node's key.
    pub identity: Identity,
    /// Metadata (sled).
    pub store: Arc<dyn Store>,
    /// Content-addressed blobs.
    pub blobs: BlobStore,
    /// Compute device.
    pub device: tunenet_ml::Device,
    /// The bound gRPC socket.
    pub listener: tokio::net::TcpListener,
}

/// Creates a node's data dir owner-only (0700: it holds hidden test splits, canaries,
/// nonces and keys); an existing one that others may read is kept, with a warning.
pub fn create_private_dir(dir: &Path) -> Result<(), NodeError> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Other(format!("cannot create data dir {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if !existed {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                NodeError::Other(format!("cannot make {} owner-only: {e}", dir.display()))
            })?;
        } else if let Ok(m) = std::fs::metadata(dir)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "data dir {} may be read by others (mode {:04o}); it holds hidden test splits, canaries and nonces: `chmod 700 {}`",
                dir.display(),
                m.permissions().mode() & 0o777,
                dir.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = existed;
    Ok(())
}

/// Opens everything a daemon needs (and serves its Prometheus metrics when asked),
/// failing early with the cause (port in use, locked database, unreadable key).
pub async fn open(
    data_dir: &Path,
    key_file: Option<&PathBuf>,
    device: &str,
    listen: &str,
    metrics_listen: Option<&String>,
) -> Result<NodeBase, NodeError> {
    if let Some(addr) = metrics_listen {
        crate::metrics::install(addr)?;
    }
    create_private_dir(data_dir)?;
    let identity = keys::load_or_create(
        &key_file
            .cloned()
            .unwrap_or_else(|| data_dir.join("identity.key")),
    )?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&data_dir.join("db"))?);
    let blobs = BlobStore::open(&data_dir.join("blobs"))?;
    let device = tunenet_ml::parse_device(device)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| NodeError::Listen {
            addr: listen.to_string(),
            reason: e.to_string(),
        })?;
    Ok(NodeBase {
        identity,
        store,
        blobs,
        device,
        listener,
    })
}

/// A running gRPC server; [`Server::stop`] lets in-flight calls finish (up to 5 s).
pub struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    /// Serves `router` on `listener` until stopped, holding remote addresses to the
    /// connection limits of `limits` (see [`crate::limits::incoming`]).
    pub fn spawn(
        router: tonic::transport::server::Router,
        listener: tokio::net::TcpListener,
        limits: &crate::limits::Limits,
    ) -> Server {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = crate::limits::incoming(listener, limits);
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        // The daemons spawn their server last, once the store is open and every listener
        // bound: from here `/readyz` says ready.
        crate::metrics::health().set_ready(true);
        Server { stop, task }
    }

    /// Stops accepting calls and waits briefly for those in flight.
    pub async fn stop(self) {
        crate::metrics::health().set_ready(false);
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

/// Resolves on Ctrl-C or SIGTERM. The daemons' main loops select on this future on every
/// pass, so each poll counts as a turn of the loop for `/healthz`
/// ([`crate::metrics::Health::turn`]): a loop stuck in a handler stops polling it and is
/// reported dead.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let mut signal = Box::pin(wait_for_signal());
    std::future::poll_fn(move |cx| {
        crate::metrics::health().turn();
        signal.as_mut().poll(cx)
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_data_dir_is_owner_only_and_an_existing_one_is_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/data");
        create_private_dir(&fresh).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o755, "an operator's choice is not changed");
    }
}
