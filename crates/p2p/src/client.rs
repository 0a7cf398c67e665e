//! The cloneable handle a node uses to drive the p2p layer: each call sends a command to
//! the event loop and waits for its reply. Blob downloads run here, on the caller's task,
//! built from provider look-ups, a manifest request and streamed ranges of chunks.

use crate::chunks::Manifest;
use crate::config::P2pConfig;
use crate::error::P2pError;
use crate::event_loop::{Command, JobChannel, PeerInfo};
use crate::messages::pb::{CompetitionAnnouncement, MinerAdvert};
use crate::messages::{JobRequest, JobResponse, pb};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tunenet_store::BlobStore;
use tunenet_types::{ArtifactRecord, BlobId, ScoreAttestation};

/// A handle on the p2p layer; cheap to clone. Dropping every clone stops the event loop.
#[derive(Clone)]
pub struct Client {
    /// Opens `/tunenet/blob-stream/1` streams without going through the event loop.
    pub(crate) streams: libp2p_stream::Control,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) local: PeerId,
    pub(crate) store: BlobStore,
    pub(crate) config: P2pConfig,
    /// Blobs being downloaded, each with the lock its downloads take one after another.
    pub(crate) fetching: Arc<std::sync::Mutex<HashMap<BlobId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Client {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, P2pError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| P2pError::Stopped)?;
        rx.await.map_err(|_| P2pError::Stopped)
    }

    /// This node's peer id (= its node id).
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// The addresses this node listens on (waits for the first one to be bound).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, P2pError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Connects to `addr` and returns the peer found there.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, P2pError> {
        self.ask(|r| Command::Dial(addr, r)).await?
    }

    /// Looks `peer` up in the DHT (when not connected) and returns its addresses; later
    /// requests to it dial them.
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, P2pError> {
        self.ask(|r| Command::FindPeer(peer, r)).await?
    }

    /// Every peer known: connected ones and recently seen ones, with their adverts.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, P2pError> {
        self.ask(Command::Peers).await
    }

    /// Publishes this node's miner advert (stamped and signed with the node key) and keeps
    /// re-publishing it, freshly signed, every `advert_interval_secs`. Fails when no peer
    /// is subscribed yet; the heartbeat retries regardless.
    pub async fn publish_advert(&self, advert: MinerAdvert) -> Result<(), P2pError> {
        self.ask(|r| Command::PublishAdvert(advert, r)).await?
    }

    /// Announces a competition (stamped and signed with the node key) once.
    pub async fn announce_competition(
        &self,
        announcement: CompetitionAnnouncement,
    ) -> Result<(), P2pError> {
        self.ask(|r| Command::Announce(announcement, r)).await?
    }

    /// Publishes an artifact record this node signed (as the validator that gave its
    /// receipt) on the artifact-record topic. Peers take a record only from its signer, so
    /// one signed by another validator is refused here. Fails when no peer is subscribed.
    pub async fn publish_artifact_record(&self, record: ArtifactRecord) -> Result<(), P2pError> {
        if record.receipt.validator.0 != self.local.to_base58() {
            return Err(P2pError::Invalid(format!(
                "an artifact record signed by {} cannot be published by {}: peers take one only from its signer",
                record.receipt.validator, self.local
            )));
        }
        self.ask(|r| Command::PublishRecord(record, r)).await?
    }

    /// Publishes a score attestation this node signed on the score-attestation topic
    /// (peers take one only from its signer). Fails when no peer is subscribed.
    pub async fn publish_attestation(&self, a: ScoreAttestation) -> Result<(), P2pError> {
        if a.validator.0 != self.local.to_base58() {
            return Err(P2pError::Invalid(format!(
                "a score attestation signed by {} cannot be published by {}: peers take one only from its signer",
                a.validator, self.local
            )));
        }
        self.ask(|r| Command::PublishAttestation(a, r)).await?
    }

    /// Publishes `data` on `topic` as it is, without signing or checking it: for tools and
    /// tests. Peers reject invalid payloads, and that costs this node gossip score.
    pub async fn publish_raw(&self, topic: &str, data: Vec<u8>) -> Result<(), P2pError> {
        let topic = topic.to_string();
        self.ask(|r| Command::PublishRaw(topic, data, r)).await?
    }

    /// Sends a job request to `peer` over `/tunenet/job/1` and waits for the answer. A
    /// [`JobResponse::Refused`] answer comes back as [`P2pError::Refused`]. When no
    /// connection to the peer can be opened (known only by id, e.g. from a gossiped
    /// advert), it is looked up in the DHT and the request is sent once more.
    pub async fn request(
        &self,
        peer: PeerId,
        request: JobRequest,
    ) -> Result<JobResponse, P2pError> {
        let retry = request.clone();
        match self.ask(|r| Command::Job(peer, request, r)).await? {
            // Known only by id (e.g. from a gossiped advert): look it up in the DHT, once.
            Err(P2pError::Unreachable { .. }) => {
                self.find_peer(peer).await?;
                self.ask(|r| Command::Job(peer, retry, r)).await?
            }
            other => other,
        }
    }
    /// Answers an inbound job request (from [`crate::Event::JobRequest`]).
    pub async fn respond(
        &self,
        channel: JobChannel,
        response: JobResponse,
    ) -> Result<(), P2pError> {
        self.ask(|r| Command::Respond(channel, response, r)).await?
    }

    /// Serves blob `id` (which must be in the blob store) and announces it in the DHT.
    /// The blob is hashed chunk by chunk first (its manifest, kept for serving), so a
    /// damaged copy is never announced. Returns once the provider record has been offered
    /// to the closest peers known.
    pub async fn provide(&self, id: BlobId) -> Result<(), P2pError> {
        self.provide_with(id, true).await
    }

    /// [`Client::provide`], returning once this node serves the blob and its announcement
    /// has started, not when the announcement is done: that waits on every peer the record
    /// goes to, a peer whose link is dark for the DHT query's whole timeout. For blobs a
    /// peer will ask this node for directly (a revealed artifact, a fetched model).
    pub async fn serve(&self, id: BlobId) -> Result<(), P2pError> {
        self.provide_with(id, false).await
    }

    async fn provide_with(&self, id: BlobId, wait: bool) -> Result<(), P2pError> {
        if !self.store.contains(&id) {
            return Err(P2pError::Store(tunenet_store::BlobError::NotFound(id)));
        }
        let path = self.store.path(&id);
        let shown = path.display().to_string();
        let manifest = tokio::task::spawn_blocking(move || Manifest::of_file(&path, id))
            .await
            .map_err(|e| P2pError::Task(e.to_string()))?
            .map_err(|e| {
                P2pError::Store(tunenet_store::BlobError::Io {
                    path: shown,
                    source: e,
                })
            })?;
        let manifest = Arc::new(manifest);
        self.ask(|r| Command::Provide(id, manifest, r, wait))
            .await?
    }

    /// Peers that announced blob `id` (a DHT look-up; this node excluded).
    pub async fn providers(&self, id: BlobId) -> Result<Vec<PeerId>, P2pError> {
        self.ask(|r| Command::GetProviders(id, r)).await?
    }

    /// Makes sure blob `id` is in the blob store, fetching it from whichever peers provide
    /// it: chunk by chunk, each chunk checked against the blob id on arrival, resumed from
    /// the last good chunk when a provider fails, and a provider that sends bad data is
    /// dropped. Refuses blobs over `max_size` bytes. Returns the blob's size.
    pub async fn fetch_blob(&self, id: BlobId, max_size: u64) -> Result<u64, P2pError> {
        self.fetch_once(id, max_size, &[]).await
    }

    /// [`Client::fetch_blob`], asking `peers` first (e.g. the miner that just revealed an
    /// artifact) besides whoever the DHT names: no wait for provider records to spread.
    pub async fn fetch_blob_from(
        &self,
        id: BlobId,
        max_size: u64,
        peers: &[PeerId],
    ) -> Result<u64, P2pError> {
        self.fetch_once(id, max_size, peers).await
    }

    /// One download of a blob at a time: a second caller (two jobs on the same base model)
    /// waits for the first and then finds the blob stored, instead of fetching it again
    /// beside it and halving a slow link's speed for both.
    async fn fetch_once(
        &self,
        id: BlobId,
        max_size: u64,
        peers: &[PeerId],
    ) -> Result<u64, P2pError> {
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            fetching.entry(id).or_default().clone()
        };
        let result = {
            let _turn = lock.lock().await;
            crate::fetch::fetch_blob(self, id, max_size, peers).await
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        // Forgotten once no caller holds or waits for it (the map's own reference and ours).
        if Arc::strong_count(&lock) <= 2 {
            fetching.remove(&id);
        }
        result
    }

    pub(crate) async fn blob_request(
        &self,
        peer: PeerId,
        request: pb::BlobRequest,
    ) -> Result<pb::BlobResponse, P2pError> {
        self.ask(|r| Command::Blob(peer, request, r)).await?
    }

    pub(crate) async fn drop_peer(&self, peer: PeerId, id: BlobId, reason: String) {
        let _ = self
            .commands
            .send(Command::DropPeer(peer, id, reason))
            .await;
    }
}
