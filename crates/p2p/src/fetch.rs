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
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tunenet_store::{BlobStore, ChunkedBlobWriter};
use tunenet_types::BlobId;

/// Failed requests after which a provider is left out for the rest of a round.
const MAX_FAILURES: u32 = 2;
/// The most chunks one stream is asked for: long enough that opening streams costs
/// nothing, short enough that a slow provider holds up little.
const MAX_RANGE_CHUNKS: u64 = 32;

/// How long a manifest request goes unanswered before the next provider is asked too.
const MANIFEST_STAGGER: Duration = Duration::from_secs(2);
/// How long a download with named providers waits for the DHT's before starting.
const HINTED_LOOKUP_WAIT: Duration = Duration::from_secs(1);
/// How often a download looks for ranges that stalled.
const TICK: Duration = Duration::from_millis(250);
/// A range is called stalled after this long without a chunk at the least.
const MIN_STALL: Duration = Duration::from_secs(2);
/// ... and before any range has finished (no pace known yet).
const FIRST_STALL: Duration = Duration::from_secs(5);

/// One range request in flight.
struct Flight {
    peer: PeerId,
    first: u64,
    count: u64,
    since: Instant,
    /// Chunks of the range held at the last look, and when that last grew.
    held: u64,
    progress: Instant,
    /// Bytes its stream has read so far (shared with the stream), and at the last look:
    /// a range on a slow link that is still moving is not stalled, even when a whole
    /// chunk takes longer than the stall time (1 MiB is 8 s at 1 Mbit/s).
    received: Arc<AtomicU64>,
    seen: u64,
}

impl Flight {
    fn new(peer: PeerId, (first, count): (u64, u64), now: Instant) -> Flight {
        Flight {
            peer,
            first,
            count,
            since: now,
            held: 0,
            progress: now,
            received: Arc::default(),
            seen: 0,
        }
    }

    fn observe(&mut self, writer: &ChunkedBlobWriter, now: Instant) {
        let held = (self.first..self.first + self.count)
            .filter(|&i| writer.has(i))
            .count() as u64;
        let received = self.received.load(Ordering::Relaxed);
        if held > self.held || received > self.seen {
            self.held = held;
            self.seen = received;
            self.progress = now;
        }
    }

    fn stalled(&self, now: Instant, after: Duration) -> bool {
        now.duration_since(self.progress) > after
    }
}

/// The slowest time per chunk of the ranges that finished: a range is stalled when it
/// has gone four times that long without a chunk.
#[derive(Default)]
struct Pace {
    per_chunk: Option<Duration>,
}

impl Pace {
    fn done(&mut self, took: Duration, chunks: u64) {
        let each = took / chunks.clamp(1, u32::MAX as u64) as u32;
        self.per_chunk = Some(self.per_chunk.map_or(each, |p| p.max(each)));
    }

    fn stall_after(&self, timeout: Duration) -> Duration {
        let after = self
            .per_chunk
            .map_or(FIRST_STALL, |p| (p * 4).max(MIN_STALL));
        after.min(timeout)
    }
}

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
        // With a provider named by the caller, the DHT look-up gets a short while and the
        // download starts from the named one without it: a look-up that asks a peer whose
        // link is dark waits for that peer (the other miners' shard fetches took 10-20 s
        // while one miner was cut off, over links with 50 ms of delay).
        let lookup = client.providers(id);
        let found = if hints.is_empty() {
            lookup.await
        } else {
            match tokio::time::timeout(HINTED_LOOKUP_WAIT, lookup).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(blob = %id, "provider look-up still going: starting from the named providers");
                    Ok(Vec::new())
                }
            }
        };
        let (found, lookup_failed) = match found {
            Ok(p) => (p, None),
            Err(P2pError::Stopped) => return Err(P2pError::Stopped),
            // The named providers are still worth asking.
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let mut providers: Vec<PeerId> = hints.to_vec();
        providers.extend(found.into_iter().filter(|p| !hints.contains(p)));
        providers.retain(|p| !d.dropped.contains(p) && *p != client.local);
        if providers.is_empty() {
            d.last_problem = lookup_failed.unwrap_or_else(|| "no provider found".into());
            continue;
        }
        if d.manifest.is_none() {
            d.get_manifest(client, &mut providers).await?;
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

    /// Asks the providers for the blob's manifest, one after another, but without waiting
    /// on a quiet one: every `MANIFEST_STAGGER` without an answer the next provider is
    /// asked too, and the first usable manifest wins.
    async fn get_manifest(
        &mut self,
        client: &Client,
        providers: &mut Vec<PeerId>,
    ) -> Result<(), P2pError> {
        let id = self.id;
        let ask = |peer: PeerId| async move {
            let answer = client
                .blob_request(peer, request(id, Want::Manifest(true)))
                .await;
            (peer, answer)
        };
        let mut waiting = FuturesUnordered::new();
        let mut next: std::collections::VecDeque<PeerId> = providers.iter().copied().collect();
        let mut asked: HashSet<PeerId> = HashSet::new();
        loop {
            if waiting.is_empty() {
                match next.pop_front() {
                    Some(peer) => {
                        asked.insert(peer);
                        waiting.push(ask(peer));
                    }
                    None => return Ok(()),
                }
            }
            let (peer, answer) = match tokio::time::timeout(MANIFEST_STAGGER, waiting.next()).await
            {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(_) => {
                    // Every provider known is asked and none has answered: the lookup that
                    // found them may have returned before it found the rest (it answers
                    // with the first found), so look again rather than wait out a provider
                    // gone silent.
                    if next.is_empty()
                        && let Ok(Ok(more)) =
                            tokio::time::timeout(MANIFEST_STAGGER, client.providers(id)).await
                    {
                        for p in more {
                            if !asked.contains(&p)
                                && !next.contains(&p)
                                && !self.dropped.contains(&p)
                                && p != client.local
                            {
                                next.push_back(p);
                                // The round's download asks them too.
                                if !providers.contains(&p) {
                                    providers.push(p);
                                }
                            }
                        }
                    }
                    if let Some(peer) = next.pop_front() {
                        asked.insert(peer);
                        waiting.push(ask(peer));
                    }
                    continue;
                }
            };
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
    ///
    /// A range whose provider has sent nothing for a while (a link gone dark keeps its
    /// connection open until the request timeout) stops counting against `parallel`, its
    /// provider gets no new ranges, and once nothing is left unclaimed its missing chunks
    /// are asked again from another provider (BitTorrent's endgame): the first copy to
    /// arrive is kept, and the download ends as soon as every chunk is held.
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
        // When each provider's last counted failure was seen: ranges already asked for by
        // then (several streams on one broken connection) make one failure, not several.
        let mut failed_at: HashMap<PeerId, Instant> = HashMap::new();
        let mut inflight = FuturesUnordered::new();
        let mut flights: HashMap<u64, Flight> = HashMap::new();
        let mut next_flight = 0u64;
        // How many streams in flight ask for each chunk (more than one once hedged).
        let mut claimed: BTreeMap<u64, u32> = BTreeMap::new();
        let mut pace = Pace::default();
        let mut turn = 0usize;
        loop {
            if writer.written_chunks() >= chunks {
                // Streams still in flight (a hedged range's slow twin) end here.
                drop(inflight);
                drop(writer);
                return self.finish().await.map(Some);
            }
            // Launches ranges and hedges; in a block of its own so that nothing it
            // borrows is held across the waits below.
            {
                let now = Instant::now();
                let stall_after = pace.stall_after(timeout);
                for f in flights.values_mut() {
                    f.observe(&writer, now);
                }
                let stalled: HashSet<PeerId> = flights
                    .values()
                    .filter(|f| f.stalled(now, stall_after))
                    .map(|f| f.peer)
                    .collect();
                let busy = |flights: &HashMap<u64, Flight>| {
                    flights
                        .values()
                        .filter(|f| !f.stalled(now, stall_after))
                        .count()
                };
                let mut launch =
                    |peer: PeerId,
                     range: (u64, u64),
                     claimed: &mut BTreeMap<u64, u32>,
                     flights: &mut HashMap<u64, Flight>| {
                        for i in range.0..range.0 + range.1 {
                            *claimed.entry(i).or_default() += 1;
                        }
                        let id = next_flight;
                        next_flight += 1;
                        let flight = Flight::new(peer, range, now);
                        let fetch = fetch_range(
                            client.streams.clone(),
                            peer,
                            shared.clone(),
                            writer.clone(),
                            range,
                            timeout,
                            flight.received.clone(),
                        );
                        flights.insert(id, flight);
                        let gone = self.dropped_tx.subscribe();
                        inflight.push(async move {
                        let r = tokio::select! {
                            r = fetch => r,
                            () = until_dropped(gone, peer) => RangeResult {
                                peer,
                                first: range.0,
                                count: range.1,
                                end: RangeEnd::Failed(format!("{peer}: dropped for sending bad data")),
                            },
                        };
                        (id, r)
                    });
                    };
                let mut endgame = false;
                while busy(&flights) < self.parallel && !active.is_empty() {
                    let Some(range) = next_range(&writer, &claimed, chunks, self.parallel) else {
                        endgame = true;
                        break;
                    };
                    // Round robin over the providers, passing over those that went quiet;
                    // when all went quiet, wait for them.
                    let Some(pick) = (0..active.len())
                        .map(|k| active[(turn + k) % active.len()])
                        .find(|p| !stalled.contains(p))
                    else {
                        break;
                    };
                    turn = turn.wrapping_add(1);
                    tracing::trace!(blob = %self.id, peer = %pick, first = range.0, count = range.1, "asking for a range");
                    launch(pick, range, &mut claimed, &mut flights);
                }
                if endgame {
                    // Chunks some stream that is still moving will bring. A stalled range's
                    // other chunks are asked again, as often as it takes: a copy that fails
                    // (its provider's connection closed, say) leaves them uncovered, and
                    // the next look asks again instead of waiting out the stalled stream.
                    let live: HashSet<u64> = flights
                        .values()
                        .filter(|f| !f.stalled(now, stall_after))
                        .flat_map(|f| f.first..f.first + f.count)
                        .collect();
                    // Each uncovered chunk, with the quiet providers that were asked for it,
                    // in runs of consecutive chunks.
                    let mut gaps: BTreeMap<u64, HashSet<PeerId>> = BTreeMap::new();
                    for f in flights.values().filter(|f| f.stalled(now, stall_after)) {
                        for i in f.first..f.first + f.count {
                            if !writer.has(i) && !live.contains(&i) {
                                gaps.entry(i).or_default().insert(f.peer);
                            }
                        }
                    }
                    let mut runs: Vec<((u64, u64), HashSet<PeerId>)> = Vec::new();
                    for (i, quiet) in gaps {
                        match runs.last_mut() {
                            Some(((first, count), from))
                                if *first + *count == i && *count < MAX_RANGE_CHUNKS =>
                            {
                                *count += 1;
                                from.extend(quiet);
                            }
                            _ => runs.push(((i, 1), quiet)),
                        }
                    }
                    for (range, from) in runs {
                        let Some(to) = active
                            .iter()
                            .copied()
                            .filter(|p| !from.contains(p) && !stalled.contains(p))
                            .min_by_key(|p| flights.values().filter(|g| g.peer == *p).count())
                        else {
                            continue;
                        };
                        tracing::debug!(blob = %self.id, from = ?from, %to, first = range.0, count = range.1, "asking another provider for a stalled range");
                        launch(to, range, &mut claimed, &mut flights);
                    }
                }
            }
            if inflight.is_empty() {
                return Ok(None); // no provider left this round
            }
            // Wakes at least every TICK to look for stalled ranges.
            let Ok(Some((id, r))) = tokio::time::timeout(TICK, inflight.next()).await else {
                continue;
            };
            for i in r.first..r.first + r.count {
                if let Some(n) = claimed.get_mut(&i) {
                    *n -= 1;
                    if *n == 0 {
                        claimed.remove(&i);
                    }
                }
            }
            let flight = flights.remove(&id);
            let peer = r.peer;
            tracing::debug!(blob = %self.id, %peer, first = r.first, count = r.count, end = ?r.end, took_ms = flight.as_ref().map(|f| f.since.elapsed().as_millis()), held = writer.written_chunks(), "range ended");
            match r.end {
                RangeEnd::Done => {
                    failures.remove(&peer);
                    // A provider left out after failures that serves a range after all
                    // (one opened before it was left out) is back in.
                    if !active.contains(&peer) && !self.dropped.contains(&peer) {
                        active.push(peer);
                    }
                    if let Some(f) = flight {
                        pace.done(f.since.elapsed(), r.count);
                    }
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
                    // Only a range asked for after the provider's last counted failure
                    // counts again.
                    let fresh =
                        flight.is_none_or(|f| failed_at.get(&peer).is_none_or(|t| f.since > *t));
                    if fresh {
                        failed_at.insert(peer, Instant::now());
                        let n = failures.entry(peer).or_default();
                        *n += 1;
                        if *n >= MAX_FAILURES {
                            active.retain(|p| *p != peer);
                        }
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
        // A hedged range's twin may still be hashing a chunk it read: wait for it.
        let waited = Instant::now();
        while Arc::strong_count(&writer) > 1 && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::debug!(blob = %self.id, waited_ms = waited.elapsed().as_millis(), "blob download complete");
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
    claimed: &BTreeMap<u64, u32>,
    chunks: u64,
    parallel: usize,
) -> Option<(u64, u64)> {
    let open = |i: u64| !claimed.contains_key(&i) && !writer.has(i);
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
