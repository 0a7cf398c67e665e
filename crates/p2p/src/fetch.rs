//! Downloading a blob from whoever provides it: find providers in the DHT, take the first
//! manifest that rebuilds the blob id, then keep `blob_parallel` chunk requests in flight,
//! spread over the providers, checking each chunk before it is kept and writing them in
//! order. A provider that sends bad bytes is dropped; one that fails is left out for the
//! round; each new round looks providers up again and resumes at the first missing chunk.
//!
//! A manifest proves less than it seems (see [`Manifest::verify`]), so a chunk that fails
//! from another provider is asked again from the manifest's sender: if that one checks
//! out, the other provider lied; if not, the manifest's sender is dropped and the download
//! starts over with a manifest from someone else.

use crate::chunks::{MAX_BLOB_SIZE, Manifest};
use crate::client::Client;
use crate::error::P2pError;
use crate::messages::pb::{self, blob_request::Want, blob_response::Body};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tunenet_store::{BlobStore, BlobWriter};
use tunenet_types::BlobId;

/// Failed requests after which a provider is left out for the rest of a round.
const MAX_FAILURES: u32 = 2;

fn request(id: BlobId, want: Want) -> pb::BlobRequest {
    pb::BlobRequest {
        id: id.0.to_vec(),
        want: Some(want),
    }
}

fn task_err(e: tokio::task::JoinError) -> P2pError {
    P2pError::Task(e.to_string())
}

struct Download {
    id: BlobId,
    max_size: u64,
    parallel: usize,
    manifest: Option<Manifest>,
    /// Who sent the manifest: the referee when a chunk fails.
    manifest_from: Option<PeerId>,
    /// A manifest said the blob is over the caller's limit.
    too_large: Option<u64>,
    store: BlobStore,
    writer: Option<BlobWriter>,
    /// The first chunk not yet written.
    next_write: u64,
    /// The first chunk never requested.
    next_new: u64,
    /// Chunks to ask for again.
    retry: BTreeSet<u64>,
    /// Checked chunks waiting for their turn to be written.
    ready: BTreeMap<u64, prost::bytes::Bytes>,
    /// Providers that sent bad data: never asked again.
    dropped: HashSet<PeerId>,
    last_problem: String,
}

pub(crate) async fn fetch_blob(
    client: &Client,
    id: BlobId,
    max_size: u64,
    hints: &[PeerId],
) -> Result<u64, P2pError> {
    let store = client.store.clone();
    if store.contains(&id) {
        let s = store.clone();
        let intact = tokio::task::spawn_blocking(move || s.verify(&id).is_ok())
            .await
            .unwrap_or(false);
        if intact {
            return Ok(store.size(&id)?);
        }
    }
    let mut d = Download {
        id,
        max_size,
        parallel: client.config.blob_parallel.clamp(1, 64),
        manifest: None,
        manifest_from: None,
        too_large: None,
        store: store.clone(),
        writer: Some(store.writer(Some(max_size))?),
        next_write: 0,
        next_new: 0,
        retry: BTreeSet::new(),
        ready: BTreeMap::new(),
        dropped: HashSet::new(),
        last_problem: "no provider found".into(),
    };
    let rounds = client.config.blob_fetch_rounds.max(1);
    for round in 0..rounds {
        if round > 0 {
            let wait = Duration::from_millis(200 << round.min(5));
            tracing::info!(blob = %id, offset = d.next_write * crate::chunks::CHUNK_SIZE, round, problem = %d.last_problem, "blob download resumes");
            tokio::time::sleep(wait).await;
        }
        let providers: Vec<PeerId> = match client.providers(id).await {
            Ok(p) => {
                let mut all: Vec<PeerId> = hints.to_vec();
                all.extend(p.into_iter().filter(|p| !hints.contains(p)));
                all.retain(|p| !d.dropped.contains(p) && *p != client.local);
                all
            }
            Err(P2pError::Stopped) => return Err(P2pError::Stopped),
            Err(e) => {
                d.last_problem = e.to_string();
                continue;
            }
        };
        if providers.is_empty() {
            d.last_problem = "no provider found".into();
            continue;
        }
        if d.manifest.is_none() {
            d.get_manifest(client, &providers).await?;
        }
        let Some(manifest) = d.manifest.clone() else {
            if let Some(size) = d.too_large {
                return Err(P2pError::BlobTooLarge {
                    id,
                    size,
                    limit: max_size,
                });
            }
            continue;
        };
        if let Some(size) = d.download(client, &manifest, providers).await? {
            return Ok(size);
        }
    }
    Err(P2pError::NoProviders {
        id,
        detail: format!("{rounds} rounds; last: {}", d.last_problem),
    })
}

impl Download {
    async fn drop_provider(&mut self, client: &Client, peer: PeerId, reason: String) {
        self.dropped.insert(peer);
        self.last_problem = format!("{peer}: {reason}");
        client.drop_peer(peer, self.id, reason).await;
    }

    async fn get_manifest(
        &mut self,
        client: &Client,
        providers: &[PeerId],
    ) -> Result<(), P2pError> {
        for &peer in providers {
            let answer = client
                .blob_request(peer, request(self.id, Want::Manifest(true)))
                .await;
            match answer {
                Ok(pb::BlobResponse {
                    body: Some(Body::Manifest(m)),
                }) => match Manifest::verify(&m, self.id, MAX_BLOB_SIZE) {
                    // Kept as a verdict only if no provider offers a usable manifest: a
                    // peer can inflate the chunk count of a blob it holds.
                    Ok(m) if m.size > self.max_size => self.too_large = Some(m.size),
                    Ok(m) => {
                        self.manifest = Some(m);
                        self.manifest_from = Some(peer);
                        return Ok(());
                    }
                    Err(reason) => {
                        self.drop_provider(client, peer, format!("bad manifest: {reason}"))
                            .await
                    }
                },
                Ok(pb::BlobResponse {
                    body: Some(Body::Refused(r)),
                }) => self.last_problem = format!("{peer} refused: {r}"),
                Ok(_) => {
                    self.drop_provider(
                        client,
                        peer,
                        "answered a manifest request with something else".into(),
                    )
                    .await
                }
                Err(P2pError::Stopped) => return Err(P2pError::Stopped),
                Err(e) => self.last_problem = e.to_string(),
            }
        }
        Ok(())
    }

    fn next_index(&mut self, chunks: u64) -> Option<u64> {
        if let Some(i) = self.retry.pop_first() {
            return Some(i);
        }
        // Bound the reorder buffer: never run more than 2 windows ahead of the writer.
        let horizon = self.next_write + 2 * self.parallel as u64;
        if self.next_new < chunks && self.next_new < horizon {
            self.next_new += 1;
            return Some(self.next_new - 1);
        }
        None
    }

    /// Downloads from `active` until done (`Some(size)`) or until no provider is left.
    async fn download(
        &mut self,
        client: &Client,
        manifest: &Manifest,
        mut active: Vec<PeerId>,
    ) -> Result<Option<u64>, P2pError> {
        let chunks = manifest.chunks();
        let mut failures: HashMap<PeerId, u32> = HashMap::new();
        let mut inflight = FuturesUnordered::new();
        let mut turn = 0usize;
        loop {
            if self.next_write >= chunks {
                return self.finish().await.map(Some);
            }
            while inflight.len() < self.parallel && !active.is_empty() {
                let Some(index) = self.next_index(chunks) else {
                    break;
                };
                let peer = active[turn % active.len()];
                turn = turn.wrapping_add(1);
                let c = client.clone();
                let req = request(self.id, Want::Chunk(index));
                inflight.push(async move { (peer, index, c.blob_request(peer, req).await) });
            }
            let Some((peer, index, answer)) = inflight.next().await else {
                return Ok(None); // no provider left this round
            };
            match answer {
                Ok(pb::BlobResponse {
                    body: Some(Body::Chunk(c)),
                }) if c.index == index && manifest.check_chunk(index, &c.data) => {
                    self.ready.insert(index, c.data);
                    failures.remove(&peer);
                }
                Ok(pb::BlobResponse {
                    body: Some(Body::Refused(r)),
                }) => {
                    self.retry.insert(index);
                    self.last_problem = format!("{peer} refused: {r}");
                    if r.starts_with("busy") {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else {
                        active.retain(|p| *p != peer);
                    }
                }
                Ok(_) => {
                    active.retain(|p| *p != peer);
                    if !self.judge_bad_chunk(client, manifest, peer, index).await? {
                        return Ok(None); // manifest discarded: start over next round
                    }
                }
                Err(P2pError::Stopped) => return Err(P2pError::Stopped),
                Err(e) => {
                    self.retry.insert(index);
                    self.last_problem = e.to_string();
                    let n = failures.entry(peer).or_default();
                    *n += 1;
                    if *n >= MAX_FAILURES {
                        active.retain(|p| *p != peer);
                    }
                }
            }
            self.flush().await?;
        }
    }

    /// `peer` sent a chunk that does not check out. Asks the manifest's sender for the same
    /// chunk: if it checks out, `peer` lied and is dropped (true: carry on); otherwise the
    /// manifest cannot be trusted, its sender is dropped and everything is reset (false).
    async fn judge_bad_chunk(
        &mut self,
        client: &Client,
        manifest: &Manifest,
        peer: PeerId,
        index: u64,
    ) -> Result<bool, P2pError> {
        let reason = format!("chunk {index} does not hash to its place in the blob");
        let referee = self.manifest_from.filter(|m| *m != peer);
        let Some(referee) = referee else {
            self.drop_provider(client, peer, reason).await;
            self.reset()?;
            return Ok(false);
        };
        let answer = client
            .blob_request(referee, request(self.id, Want::Chunk(index)))
            .await;
        match answer {
            Ok(pb::BlobResponse {
                body: Some(Body::Chunk(c)),
            }) if c.index == index && manifest.check_chunk(index, &c.data) => {
                self.ready.insert(index, c.data);
                if !self.dropped.contains(&peer) {
                    self.drop_provider(client, peer, reason).await;
                }
                Ok(true)
            }
            Err(P2pError::Stopped) => Err(P2pError::Stopped),
            Err(e) => {
                // The referee is gone: nobody can be blamed; start over without it.
                self.last_problem = e.to_string();
                self.reset()?;
                Ok(false)
            }
            Ok(_) => {
                let why = format!("its manifest and its chunk {index} disagree");
                self.drop_provider(client, referee, why).await;
                self.reset()?;
                Ok(false)
            }
        }
    }

    /// Forgets the manifest and everything received under it.
    fn reset(&mut self) -> Result<(), P2pError> {
        self.manifest = None;
        self.manifest_from = None;
        self.next_write = 0;
        self.next_new = 0;
        self.retry.clear();
        self.ready.clear();
        self.writer = Some(self.store.writer(Some(self.max_size))?);
        Ok(())
    }

    /// Writes the checked chunks that are next in order.
    async fn flush(&mut self) -> Result<(), P2pError> {
        let mut batch = Vec::new();
        while let Some(data) = self.ready.remove(&self.next_write) {
            batch.push(data);
            self.next_write += 1;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = self.writer.take() else {
            return Err(P2pError::Task("blob writer already finished".into()));
        };
        let (writer, result) = tokio::task::spawn_blocking(move || {
            let r = batch.iter().try_for_each(|d| writer.write_chunk(d));
            (writer, r)
        })
        .await
        .map_err(task_err)?;
        self.writer = Some(writer);
        result.map_err(P2pError::from)
    }

    async fn finish(&mut self) -> Result<u64, P2pError> {
        let Some(writer) = self.writer.take() else {
            return Err(P2pError::Task("blob writer already finished".into()));
        };
        let id = self.id;
        let size = writer.written();
        tokio::task::spawn_blocking(move || writer.finish(Some(id)))
            .await
            .map_err(task_err)??;
        Ok(size)
    }
}
