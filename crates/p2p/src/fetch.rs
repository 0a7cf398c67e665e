//! Downloading a blob from whoever provides it: find providers in the DHT, take the first
//! manifest that rebuilds the blob id, then keep `blob_parallel` streams in flight, each
//! asking one provider for a range of chunks (`crate::stream`), checking each chunk as it
//! is written at its offset. A provider that sends bad bytes is dropped; one that fails is
//! left out for the round; each new round looks providers up again and asks only for the
//! chunks still missing.
//!
//! A manifest proves less than it seems (see [`Manifest::verify`]), so a chunk that fails
//! from another provider is asked again from the manifest's sender: if that one checks
//! out, the other provider lied; if not, the manifest's sender is dropped and the download
//! starts over with a manifest from someone else.

use crate::chunks::{CHUNK_SIZE, MAX_BLOB_SIZE, Manifest};
use crate::client::Client;
use crate::error::P2pError;
use crate::messages::pb::{self, blob_request::Want, blob_response::Body};
use crate::stream::{MAX_RANGE, RangeEnd, RangeResult, fetch_range};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tunenet_store::{BlobStore, ChunkedBlobWriter};
use tunenet_types::BlobId;

/// Failed requests after which a provider is left out for the rest of a round.
const MAX_FAILURES: u32 = 2;
/// The most chunks one stream is asked for: long enough that opening streams costs
/// nothing, short enough that a slow provider holds up little.
const MAX_RANGE_CHUNKS: u64 = 32;

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
    /// Holds every chunk that checked out so far (created with the manifest); a new
    /// round resumes with the chunks it lacks.
    writer: Option<Arc<ChunkedBlobWriter>>,
    /// Providers that sent bad data: never asked again.
    dropped: HashSet<PeerId>,
    /// The same set, watched by the ranges in flight: a range from a provider that was
    /// just dropped ends at once instead of waiting out its timeout.
    dropped_tx: tokio::sync::watch::Sender<HashSet<PeerId>>,
    last_problem: String,
}

/// Resolves once `peer` is in the watched set of dropped providers (never, if the sender
/// goes away first).
async fn until_dropped(mut gone: tokio::sync::watch::Receiver<HashSet<PeerId>>, peer: PeerId) {
    loop {
        if gone.borrow_and_update().contains(&peer) {
            return;
        }
        if gone.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
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
        writer: None,
        dropped: HashSet::new(),
        dropped_tx: tokio::sync::watch::channel(HashSet::new()).0,
        last_problem: "no provider found".into(),
    };
    let rounds = client.config.blob_fetch_rounds.max(1);
    for round in 0..rounds {
        if round > 0 {
            let wait = Duration::from_millis(200 << round.min(5));
            let have = d.writer.as_ref().map_or(0, |w| w.written_chunks());
            tracing::info!(blob = %id, chunks_held = have, round, problem = %d.last_problem, "blob download resumes");
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
        self.dropped_tx.send_replace(self.dropped.clone());
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

    /// The writer for `manifest`'s blob, created on first use.
    fn writer(&mut self, manifest: &Manifest) -> Result<Arc<ChunkedBlobWriter>, P2pError> {
        if let Some(w) = &self.writer {
            return Ok(w.clone());
        }
        let w = self.store.chunked_writer(
            self.id,
            manifest.chunks(),
            CHUNK_SIZE,
            Some(self.max_size),
        )?;
        let w = Arc::new(w);
        self.writer = Some(w.clone());
        Ok(w)
    }

    /// Downloads from `active` until done (`Some(size)`) or until no provider is left.
    async fn download(
        &mut self,
        client: &Client,
        manifest: &Manifest,
        mut active: Vec<PeerId>,
    ) -> Result<Option<u64>, P2pError> {
        let chunks = manifest.chunks();
        let writer = self.writer(manifest)?;
        let shared = Arc::new(manifest.clone());
        let timeout = client.config.request_timeout();
        let mut failures: HashMap<PeerId, u32> = HashMap::new();
        let mut inflight = FuturesUnordered::new();
        // Chunks some stream in flight is asked for.
        let mut claimed: BTreeSet<u64> = BTreeSet::new();
        let mut turn = 0usize;
        loop {
            if inflight.is_empty() && writer.written_chunks() >= chunks {
                drop(writer);
                return self.finish().await.map(Some);
            }
            while inflight.len() < self.parallel && !active.is_empty() {
                let Some(range) = next_range(&writer, &claimed, chunks, self.parallel) else {
                    break;
                };
                claimed.extend(range.0..range.0 + range.1);
                let peer = active[turn % active.len()];
                turn = turn.wrapping_add(1);
                let fetch = fetch_range(
                    client.streams.clone(),
                    peer,
                    shared.clone(),
                    writer.clone(),
                    range,
                    timeout,
                );
                let gone = self.dropped_tx.subscribe();
                inflight.push(async move {
                    tokio::select! {
                        r = fetch => r,
                        () = until_dropped(gone, peer) => RangeResult {
                            peer,
                            first: range.0,
                            count: range.1,
                            end: RangeEnd::Failed(format!("{peer}: dropped for sending bad data")),
                        },
                    }
                });
            }
            let Some(r) = inflight.next().await else {
                return Ok(None); // no provider left this round
            };
            for i in r.first..r.first + r.count {
                claimed.remove(&i);
            }
            let peer = r.peer;
            match r.end {
                RangeEnd::Done => {
                    failures.remove(&peer);
                }
                RangeEnd::Refused(reason) => {
                    self.last_problem = format!("{peer} refused: {reason}");
                    if reason.starts_with("busy") {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else {
                        active.retain(|p| *p != peer);
                    }
                }
                RangeEnd::Bad(index) => {
                    active.retain(|p| *p != peer);
                    if !self
                        .judge_bad_chunk(client, manifest, &writer, peer, index)
                        .await?
                    {
                        return Ok(None); // manifest discarded: start over next round
                    }
                }
                RangeEnd::Failed(e) => {
                    self.last_problem = e;
                    let n = failures.entry(peer).or_default();
                    *n += 1;
                    if *n >= MAX_FAILURES {
                        active.retain(|p| *p != peer);
                    }
                }
                RangeEnd::Local(e) => return Err(e),
            }
        }
    }

    /// `peer` sent a chunk that does not check out. Asks the manifest's sender for the same
    /// chunk: if it checks out, `peer` lied and is dropped (true: carry on); otherwise the
    /// manifest cannot be trusted, its sender is dropped and everything is reset (false).
    async fn judge_bad_chunk(
        &mut self,
        client: &Client,
        manifest: &Manifest,
        writer: &Arc<ChunkedBlobWriter>,
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
            }) if c.index == index
                && write_checked(writer, manifest, index, c.data.clone()).await? =>
            {
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
        self.writer = None;
        Ok(())
    }

    async fn finish(&mut self) -> Result<u64, P2pError> {
        let Some(writer) = self.writer.take() else {
            return Err(P2pError::Task("blob writer already finished".into()));
        };
        let writer = Arc::try_unwrap(writer)
            .map_err(|_| P2pError::Task("blob writer still in use at the end".into()))?;
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(task_err)?
            .map_err(P2pError::from)
    }
}

/// The next range of chunks to ask for: the first run of chunks neither held nor asked
/// for, as long as an equal share of what is left (so every stream gets work), at most
/// `MAX_RANGE_CHUNKS`.
fn next_range(
    writer: &ChunkedBlobWriter,
    claimed: &BTreeSet<u64>,
    chunks: u64,
    parallel: usize,
) -> Option<(u64, u64)> {
    let open = |i: u64| !claimed.contains(&i) && !writer.has(i);
    let first = (0..chunks).find(|&i| open(i))?;
    // Claimed chunks may be written already (their stream is still going): saturate.
    let left = chunks
        .saturating_sub(writer.written_chunks())
        .saturating_sub(claimed.len() as u64);
    let want = left
        .div_ceil(parallel.max(1) as u64)
        .clamp(1, MAX_RANGE_CHUNKS.min(MAX_RANGE));
    let mut count = 1;
    while count < want && first + count < chunks && open(first + count) {
        count += 1;
    }
    Some((first, count))
}

/// Writes a chunk received whole (from a referee) if it checks out; false if it does not.
async fn write_checked(
    writer: &Arc<ChunkedBlobWriter>,
    manifest: &Manifest,
    index: u64,
    data: prost::bytes::Bytes,
) -> Result<bool, P2pError> {
    let Some(expected) = manifest.expected_cv(index) else {
        return Ok(false);
    };
    let w = writer.clone();
    tokio::task::spawn_blocking(move || w.write_chunk_at(index, &data, &expected))
        .await
        .map_err(task_err)?
        .map_err(P2pError::from)
}
