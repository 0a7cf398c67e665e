//! `/tunenet/blob-stream/1`: one stream carries a range of chunks back to back, so a
//! download opens a handful of streams instead of one request-response per MiB and the
//! chunk bytes never pass through the event loop. The serving side reads the file on a
//! blocking thread while the previous chunk is being sent; the fetching side hashes and
//! writes each chunk at its offset (`ChunkedBlobWriter`, one blake3 pass) while the next
//! one arrives. Manifests and referee checks stay on `/tunenet/blob/1`.

use crate::chunks::{CHUNK_SIZE, Manifest, chunk_count, chunk_len};
use crate::codec::{read_frame, write_frame};
use crate::error::P2pError;
use crate::event_loop::Event;
use crate::messages::pb;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tunenet_store::{BlobStore, ChunkedBlobWriter};
use tunenet_types::BlobId;

/// The blob streaming protocol's name.
pub const BLOB_STREAM_PROTOCOL: &str = "/tunenet/blob-stream/1";
/// Chunks one range request may ask for.
pub(crate) const MAX_RANGE: u64 = 1024;
/// The largest range request frame (an id and two integers).
const MAX_RANGE_REQUEST: usize = 256;
/// The longest refusal reason sent or accepted.
const MAX_REASON: usize = 1024;
/// How long a peer has to send its range request once the stream is open.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// Bytes a receiving stream reads at a time.
const READ_SLICE: usize = 64 << 10;
/// Chunks read ahead of the one being sent.
const READ_AHEAD: usize = 2;

const KIND_CHUNK: u8 = 0;
const KIND_REFUSED: u8 = 1;
const HEADER: usize = 13;

pub(crate) fn protocol() -> StreamProtocol {
    StreamProtocol::new(BLOB_STREAM_PROTOCOL)
}

fn header(kind: u8, index: u64, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1..9].copy_from_slice(&index.to_be_bytes());
    h[9..13].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// What the serving side needs, shared with the request-response server.
#[derive(Clone)]
pub(crate) struct StreamServer {
    pub store: BlobStore,
    pub provided: Arc<RwLock<HashSet<BlobId>>>,
    pub permits: Arc<Semaphore>,
    pub events: mpsc::Sender<Event>,
    /// How long one chunk may take to be sent before the stream is given up.
    pub send_timeout: Duration,
}

impl StreamServer {
    fn provides(&self, id: &BlobId) -> bool {
        let provided = self.provided.read().unwrap_or_else(|p| p.into_inner());
        provided.contains(id) && self.store.contains(id)
    }

    /// Answers one inbound stream: a range request, then its chunks (or a refusal).
    pub async fn serve(self, peer: PeerId, mut stream: Stream) {
        if let Err(e) = self.answer(peer, &mut stream).await {
            tracing::debug!(%peer, error = %e, "blob stream ended early");
        }
        let _ = stream.close().await;
    }

    async fn refuse(&self, stream: &mut Stream, reason: String) -> std::io::Result<()> {
        let mut reason = reason.into_bytes();
        reason.truncate(MAX_REASON);
        let mut frame = header(KIND_REFUSED, 0, reason.len()).to_vec();
        frame.extend_from_slice(&reason);
        tokio::time::timeout(self.send_timeout, stream.write_all(&frame))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    async fn answer(&self, peer: PeerId, stream: &mut Stream) -> std::io::Result<()> {
        let request: pb::BlobRangeRequest =
            tokio::time::timeout(REQUEST_WAIT, read_frame(stream, MAX_RANGE_REQUEST))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Ok(id) = BlobId::from_slice(&request.id) else {
            return self.refuse(stream, "blob id must be 32 bytes".into()).await;
        };
        if !self.provides(&id) {
            return self
                .refuse(stream, format!("blob {id} is not provided here"))
                .await;
        }
        let path = self.store.path(&id);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let (first, count) = (request.first, request.count);
        let end = first.saturating_add(count);
        if count == 0 || count > MAX_RANGE || end > chunk_count(size) {
            return self
                .refuse(stream, format!("chunks {first}+{count} are out of range"))
                .await;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return self
                .refuse(stream, "busy: too many blob reads at once, retry".into())
                .await;
        };
        // The file is read on a blocking thread, a few chunks ahead of the network.
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let read = |f: &mut File, index: u64| -> std::io::Result<Vec<u8>> {
                let len = chunk_len(size, index) as usize;
                let mut frame = vec![0u8; HEADER + len];
                frame[..HEADER].copy_from_slice(&header(KIND_CHUNK, index, len));
                f.read_exact(&mut frame[HEADER..])?;
                Ok(frame)
            };
            let mut file = match File::open(&path) {
                Ok(mut f) => match f.seek(SeekFrom::Start(first * CHUNK_SIZE)) {
                    Ok(_) => f,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(format!("chunk read failed: {e}")));
                        return;
                    }
                },
                Err(e) => {
                    let _ = tx.blocking_send(Err(format!("chunk read failed: {e}")));
                    return;
                }
            };
            for index in first..end {
                let r = read(&mut file, index).map_err(|e| format!("chunk read failed: {e}"));
                let failed = r.is_err();
                if tx.blocking_send(r).is_err() || failed {
                    return; // the stream is gone, or the reason is on its way
                }
            }
        });
        let mut index = first;
        while let Some(frame) = rx.recv().await {
            let frame = match frame {
                Ok(f) => f,
                Err(reason) => return self.refuse(stream, reason).await,
            };
            tokio::time::timeout(self.send_timeout, stream.write_all(&frame))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let event = Event::BlobServed { peer, id, index };
            if let Err(e) = self.events.try_send(event) {
                tracing::warn!(event = ?e.into_inner(), "p2p event dropped: the node is not reading events fast enough");
            }
            index += 1;
        }
        Ok(())
    }
}

/// How a range request ended.
#[derive(Debug)]
pub(crate) enum RangeEnd {
    /// Every chunk arrived, checked out and was written.
    Done,
    /// The provider refused (the reason; "busy…" means retry later).
    Refused(String),
    /// The provider sent this chunk wrong (bad bytes, length or order).
    Bad(u64),
    /// The stream failed (network, timeout); what arrived before is kept.
    Failed(String),
    /// A local failure (disk, size limit, shutdown): the download cannot go on.
    Local(P2pError),
}

/// One range request: who, which chunks, how it ended. Chunks that arrived whole and
/// checked out before the end are in the writer whatever the outcome.
pub(crate) struct RangeResult {
    pub peer: PeerId,
    pub first: u64,
    pub count: u64,
    pub end: RangeEnd,
}

type WriteJob = tokio::task::JoinHandle<Result<bool, tunenet_store::BlobError>>;

/// Waits for a chunk's hash-and-write: `None` when it was written.
async fn settle(job: WriteJob, index: u64) -> Option<RangeEnd> {
    match job.await {
        Ok(Ok(true)) => None,
        Ok(Ok(false)) => Some(RangeEnd::Bad(index)),
        Ok(Err(e)) => Some(RangeEnd::Local(P2pError::Store(e))),
        Err(e) => Some(RangeEnd::Local(P2pError::Task(e.to_string()))),
    }
}

/// Asks `peer` for chunks `first..first + count` of the manifest's blob over one stream
/// and writes each one that checks out.
pub(crate) async fn fetch_range(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    manifest: Arc<Manifest>,
    writer: Arc<ChunkedBlobWriter>,
    (first, count): (u64, u64),
    timeout: Duration,
    received: Arc<AtomicU64>,
) -> RangeResult {
    let end = fetch_chunks(
        &mut control,
        peer,
        &manifest,
        &writer,
        (first, count),
        timeout,
        &received,
    )
    .await;
    RangeResult {
        peer,
        first,
        count,
        end,
    }
}

async fn fetch_chunks(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    manifest: &Manifest,
    writer: &Arc<ChunkedBlobWriter>,
    (first, count): (u64, u64),
    timeout: Duration,
    received: &AtomicU64,
) -> RangeEnd {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| RangeEnd::Failed(format!("{peer}: {what}: {e}"));
    let mut stream =
        match tokio::time::timeout(timeout, control.open_stream(peer, protocol())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed("blob stream not opened", &e),
            Err(_) => return failed("blob stream not opened", &"timed out"),
        };
    let request = pb::BlobRangeRequest {
        id: manifest.id.0.to_vec(),
        first,
        count,
    };
    if let Err(e) = write_frame(&mut stream, &request, MAX_RANGE_REQUEST).await {
        return failed("range request not sent", &e);
    }
    let size_hint = manifest.chunks();
    let mut pending: Option<(u64, WriteJob)> = None;
    let mut outcome = RangeEnd::Done;
    for index in first..first + count {
        let mut head = [0u8; HEADER];
        match tokio::time::timeout(timeout, stream.read_exact(&mut head)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                outcome = failed("blob stream broke", &e);
                break;
            }
            Err(_) => {
                outcome = failed("blob stream stalled", &"timed out");
                break;
            }
        }
        let kind = head[0];
        let at = u64::from_be_bytes(head[1..9].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[9..13].try_into().unwrap_or_default()) as usize;
        if kind == KIND_REFUSED && len <= MAX_REASON {
            let mut reason = vec![0u8; len];
            let got = tokio::time::timeout(timeout, stream.read_exact(&mut reason)).await;
            outcome = match got {
                Ok(Ok(())) => RangeEnd::Refused(String::from_utf8_lossy(&reason).into_owned()),
                _ => failed("refusal cut short", &"stream ended"),
            };
            break;
        }
        let last = index + 1 == size_hint;
        let len_ok = len > 0 && len as u64 <= CHUNK_SIZE && (last || len as u64 == CHUNK_SIZE);
        if kind != KIND_CHUNK || at != index || !len_ok {
            outcome = RangeEnd::Bad(index);
            break;
        }
        // Read in slices, counting bytes as they come (the download's stall detector
        // watches them); each slice has the timeout.
        let mut data = vec![0u8; len];
        let mut at = 0;
        let mut broke = None;
        while at < len {
            let end = (at + READ_SLICE).min(len);
            match tokio::time::timeout(timeout, stream.read_exact(&mut data[at..end])).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    broke = Some(failed("blob stream broke", &e));
                    break;
                }
                Err(_) => {
                    broke = Some(failed("blob stream stalled", &"timed out"));
                    break;
                }
            }
            received.fetch_add((end - at) as u64, std::sync::atomic::Ordering::Relaxed);
            at = end;
        }
        if let Some(e) = broke {
            outcome = e;
            break;
        }
        // Hash and write this chunk while the next one arrives.
        if let Some((i, job)) = pending.take()
            && let Some(bad) = settle(job, i).await
        {
            outcome = bad;
            break;
        }
        // Another stream (a hedged copy of this range) got it first.
        if writer.has(index) {
            continue;
        }
        let Some(expected) = manifest.expected_cv(index) else {
            outcome = RangeEnd::Bad(index);
            break;
        };
        let w = writer.clone();
        let job = tokio::task::spawn_blocking(move || w.write_chunk_at(index, &data, &expected));
        pending = Some((index, job));
    }
    // A chunk still being written counts before whatever ended the stream.
    if let Some((i, job)) = pending.take()
        && let Some(bad) = settle(job, i).await
    {
        return bad;
    }
    outcome
}
