//! Serving `/tunenet/blob/1`: only blobs this node has chosen to provide, manifests
//! computed once (and checked against the id) then cached, chunk reads on blocking threads
//! with a bound on how many run at once. Over the bound, requests are answered "busy".

use crate::chunks::{Manifest, chunk_count, read_chunk};
use crate::messages::pb::{self, blob_request::Want, blob_response::Body};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use tokio::sync::{Semaphore, mpsc};
use tunenet_store::BlobStore;
use tunenet_types::BlobId;

/// Manifests kept in memory (each at most 2 MiB, usually a few KiB).
const MANIFEST_CACHE: usize = 64;
/// Blobs one node will provide at once.
pub(crate) const MAX_PROVIDED: usize = 1 << 16;

/// A blob request answered off the event loop, on its way back to be sent.
pub(crate) struct Served {
    pub peer: PeerId,
    pub id: BlobId,
    pub chunk: Option<u64>,
    pub channel: ResponseChannel<pb::BlobResponse>,
    pub response: pb::BlobResponse,
    pub manifest: Option<Arc<Manifest>>,
}

/// What the event loop should do with an inbound blob request.
pub(crate) enum Answer {
    /// Send this now.
    Now(ResponseChannel<pb::BlobResponse>, pb::BlobResponse),
    /// A blocking task will send a [`Served`] back.
    Later,
}

pub(crate) struct BlobServer {
    store: BlobStore,
    /// Shared with the `/tunenet/blob-stream/1` server tasks.
    provided: Arc<RwLock<HashSet<BlobId>>>,
    manifests: HashMap<BlobId, Arc<Manifest>>,
    permits: Arc<Semaphore>,
    done: mpsc::Sender<Served>,
}

fn refused(reason: impl Into<String>) -> pb::BlobResponse {
    pb::BlobResponse {
        body: Some(Body::Refused(reason.into())),
    }
}

impl BlobServer {
    pub fn new(store: BlobStore, concurrency: usize, done: mpsc::Sender<Served>) -> Self {
        BlobServer {
            store,
            provided: Arc::new(RwLock::new(HashSet::new())),
            manifests: HashMap::new(),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            done,
        }
    }

    /// Serves `id` from now on; false when too many blobs are provided already.
    pub fn provide(&mut self, id: BlobId) -> bool {
        let mut provided = self.provided.write().unwrap_or_else(|p| p.into_inner());
        if provided.len() >= MAX_PROVIDED && !provided.contains(&id) {
            return false;
        }
        provided.insert(id);
        true
    }

    fn provides(&self, id: &BlobId) -> bool {
        let provided = self.provided.read().unwrap_or_else(|p| p.into_inner());
        provided.contains(id)
    }

    /// The state the stream server shares with this one: the store, the provided set and
    /// the bound on blob reads at once.
    pub fn shared(&self) -> (BlobStore, Arc<RwLock<HashSet<BlobId>>>, Arc<Semaphore>) {
        (
            self.store.clone(),
            self.provided.clone(),
            self.permits.clone(),
        )
    }

    pub fn cache(&mut self, m: Arc<Manifest>) {
        if self.manifests.len() >= MANIFEST_CACHE
            && let Some(k) = self.manifests.keys().next().copied()
        {
            self.manifests.remove(&k);
        }
        self.manifests.insert(m.id, m);
    }

    pub fn handle(
        &mut self,
        peer: PeerId,
        request: pb::BlobRequest,
        channel: ResponseChannel<pb::BlobResponse>,
    ) -> Answer {
        let Ok(id) = BlobId::from_slice(&request.id) else {
            return Answer::Now(channel, refused("blob id must be 32 bytes"));
        };
        if !self.provides(&id) || !self.store.contains(&id) {
            return Answer::Now(channel, refused(format!("blob {id} is not provided here")));
        }
        let want = match request.want {
            Some(w) => w,
            None => {
                return Answer::Now(channel, refused("request names neither manifest nor chunk"));
            }
        };
        let cached = self.manifests.get(&id).cloned();
        if let (Want::Manifest(_), Some(m)) = (&want, &cached) {
            let body = Body::Manifest(m.to_pb());
            return Answer::Now(channel, pb::BlobResponse { body: Some(body) });
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Answer::Now(channel, refused("busy: too many blob reads at once, retry"));
        };
        let path = self.store.path(&id);
        let done = self.done.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let (response, manifest, chunk) = match want {
                Want::Manifest(_) => match Manifest::of_file(&path, id) {
                    Ok(m) => {
                        let m = Arc::new(m);
                        let body = Body::Manifest(m.to_pb());
                        (pb::BlobResponse { body: Some(body) }, Some(m), None)
                    }
                    Err(e) => {
                        tracing::error!(blob = %id, error = %e, "not serving a damaged blob");
                        (refused(format!("blob {id} is unreadable here")), None, None)
                    }
                },
                Want::Chunk(index) => {
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if index >= chunk_count(size) {
                        (
                            refused(format!("chunk {index} is out of range")),
                            None,
                            None,
                        )
                    } else {
                        match read_chunk(&path, size, index) {
                            Ok(data) => {
                                let body = Body::Chunk(pb::BlobChunk {
                                    index,
                                    data: data.into(),
                                });
                                (pb::BlobResponse { body: Some(body) }, None, Some(index))
                            }
                            Err(e) => (refused(format!("chunk read failed: {e}")), None, None),
                        }
                    }
                }
            };
            let served = Served {
                peer,
                id,
                chunk,
                channel,
                response,
                manifest,
            };
            // The capacity equals the permits, so this waits only if the loop is gone.
            let _ = done.blocking_send(served);
        });
        Answer::Later
    }
}
