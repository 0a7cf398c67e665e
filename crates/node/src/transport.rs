//! Which wire carries a job message. A miner address (and an offer's `reply_to`) is either
//! a gRPC URL or `p2p:<peer id>`; the daemons send offers, assignments, commitments and
//! reveals, and fetch blobs, through [`Transport`], and the engines never learn which wire
//! a message took. The libp2p side answers inbound job requests with the daemon's own
//! gRPC backend (`serve`), so both transports run the very same checks.

use crate::error::NodeError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tunenet_p2p::{Event, JobRequest, JobResponse, MinerAdvert, P2pError, PeerId};
use tunenet_proto::v1;
use tunenet_rpc::{Code, MinerBackend, MinerClient, RpcError, Status, ValidatorClient};
use tunenet_store::BlobStore;
use tunenet_types::{
    ArtifactRecord, Assignment, BlobId, Commitment, DecisionReply, Offer, Receipt, UploadHeader,
};

/// Calls `f` until it succeeds, the peer refuses for a reason a retry cannot change, or
/// `retry_for` has passed; waits 250 ms after the first failure, doubling up to 4 s.
pub(crate) async fn retrying<T, F, Fut>(
    what: &str,
    job_id: &tunenet_types::JobId,
    retry_for: Duration,
    mut f: F,
) -> Result<T, SendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SendError>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(250);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if !e.is_transient() || start.elapsed() + wait > retry_for {
                    return Err(e);
                }
                tracing::warn!(%job_id, error = %e, "{what} failed; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(4));
            }
        }
    }
}

/// Prefix of a miner or validator reached over libp2p: `p2p:<base58 peer id>`.
pub const P2P_PREFIX: &str = "p2p:";

/// Job requests answered at once over libp2p; more are refused as busy.
const MAX_INBOUND: usize = 64;

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A gRPC endpoint (`http://…` or `https://…`).
    Grpc(String),
    /// A libp2p peer.
    P2p(PeerId),
}

/// Reads a miner address or `reply_to`.
pub fn route(addr: &str) -> Result<Route, String> {
    match addr.strip_prefix(P2P_PREFIX) {
        Some(peer) => peer
            .parse::<PeerId>()
            .map(Route::P2p)
            .map_err(|e| format!("`{addr}` does not name a libp2p peer id: {e}")),
        None => Ok(Route::Grpc(addr.to_string())),
    }
}

/// The address of a libp2p peer, as miner lists and `reply_to` carry it.
pub fn p2p_addr(peer: &PeerId) -> String {
    format!("{P2P_PREFIX}{peer}")
}

/// Why a message was not delivered or not taken.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SendError {
    /// The peer could not be reached or was not ready; trying again later may work.
    #[error("{0}")]
    Transient(String),
    /// The peer answered no, or the request cannot work; trying again will not help.
    #[error("{0}")]
    Refused(String),
}

impl SendError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SendError::Transient(_))
    }
}

impl From<RpcError> for SendError {
    fn from(e: RpcError) -> Self {
        let transient = match &e {
            RpcError::Connect { .. } => true,
            RpcError::Refused { code, .. } => matches!(code, Code::Unavailable | Code::Unknown),
            _ => false,
        };
        if transient {
            SendError::Transient(e.to_string())
        } else {
            SendError::Refused(e.to_string())
        }
    }
}

impl From<P2pError> for SendError {
    fn from(e: P2pError) -> Self {
        match e {
            P2pError::Refused { .. } => SendError::Refused(e.to_string()),
            P2pError::BadAddress { .. } | P2pError::Setup(_) => SendError::Refused(e.to_string()),
            _ => SendError::Transient(e.to_string()),
        }
    }
}

/// Sends job messages and fetches blobs over gRPC or libp2p, by address.
#[derive(Clone, Default)]
pub struct Transport {
    p2p: Option<tunenet_p2p::Client>,
    /// Open gRPC connections to miners, by URL: calls to a miner share one HTTP/2
    /// connection instead of a new TCP connection (and handshake) each.
    miners: Arc<Mutex<HashMap<String, (u64, MinerClient)>>>,
}

/// Connections to miners kept open at most; past it the least recently opened is closed.
const MAX_MINER_CONNECTIONS: usize = 1024;

fn unexpected(what: &str, got: &JobResponse) -> SendError {
    SendError::Refused(format!(
        "the peer answered a {what} with {}",
        match got {
            JobResponse::Decision(_) => "a decision",
            JobResponse::AssignmentAck(_) => "an assignment ack",
            JobResponse::Receipt(_) => "a receipt",
            JobResponse::UploadResult(_) => "an upload result",
            JobResponse::BenchmarkCommitment(_) => "a benchmark commitment",
            JobResponse::BenchmarkOpening(_) => "a benchmark opening",
            JobResponse::Refused(_) => "a refusal",
        }
    ))
}

impl Transport {
    /// A transport over gRPC, and over libp2p when `p2p` is given.
    pub fn new(p2p: Option<tunenet_p2p::Client>) -> Self {
        Transport {
            p2p,
            miners: Default::default(),
        }
    }

    /// A client for the miner at `url`: the open connection when there is one.
    async fn miner(&self, url: &str) -> Result<MinerClient, RpcError> {
        if let Some(c) = self.lock_miners().get(url) {
            return Ok(c.1.clone());
        }
        let c = MinerClient::connect(url).await?;
        let mut open = self.lock_miners();
        if open.len() >= MAX_MINER_CONNECTIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        let n = open.values().map(|(n, _)| *n).max().unwrap_or(0) + 1;
        open.insert(url.to_string(), (n, c.clone()));
        Ok(c)
    }

    /// Forgets the connection to `url` after a call on it failed to get through, so the
    /// next call connects afresh.
    fn drop_miner<T>(&self, url: &str, r: Result<T, RpcError>) -> Result<T, RpcError> {
        if let Err(RpcError::Connect { .. })
        | Err(RpcError::Refused {
            code: Code::Unavailable | Code::Unknown,
            ..
        }) = &r
        {
            self.lock_miners().remove(url);
        }
        r
    }

    fn lock_miners(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, MinerClient)>> {
        self.miners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The libp2p client, when this node joined the network.
    pub fn p2p(&self) -> Option<&tunenet_p2p::Client> {
        self.p2p.as_ref()
    }

    fn route(&self, addr: &str) -> Result<(Route, Option<&tunenet_p2p::Client>), SendError> {
        match route(addr).map_err(SendError::Refused)? {
            Route::P2p(peer) => match &self.p2p {
                Some(c) => Ok((Route::P2p(peer), Some(c))),
                None => Err(SendError::Refused(format!(
                    "`{addr}` is a libp2p peer, but this node has no [p2p] section in its config"
                ))),
            },
            r => Ok((r, None)),
        }
    }

    /// Offers a job to the miner at `addr` and returns its decision. Over libp2p the
    /// offer's `reply_to` must name this node's peer id (the validator signs the offer
    /// with it), and the answer must come from the miner it names.
    pub async fn offer(&self, addr: &str, offer: Offer) -> Result<DecisionReply, SendError> {
        match self.route(addr)? {
            (Route::Grpc(url), _) => {
                let r = self.miner(&url).await?.offer(offer).await;
                Ok(self.drop_miner(&url, r)?)
            }
            (Route::P2p(peer), Some(c)) => {
                if offer.reply_to != p2p_addr(&c.local_peer_id()) {
                    return Err(SendError::Refused(format!(
                        "an offer to a libp2p miner must name this node ({}) as reply_to, not `{}`",
                        p2p_addr(&c.local_peer_id()),
                        offer.reply_to
                    )));
                }
                match c.request(peer, JobRequest::Offer(offer.into())).await? {
                    JobResponse::Decision(d) => {
                        if d.miner != peer.to_base58() {
                            return Err(SendError::Refused(format!(
                                "{peer} answered for another miner ({})",
                                d.miner
                            )));
                        }
                        DecisionReply::try_from(d).map_err(|e| {
                            SendError::Refused(format!("{peer} sent a bad decision: {e}"))
                        })
                    }
                    other => Err(unexpected("job offer", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Hands an assignment to the miner at `addr`.
    pub async fn assign(&self, addr: &str, a: Assignment) -> Result<(), SendError> {
        match self.route(addr)? {
            (Route::Grpc(url), _) => {
                let r = self.miner(&url).await?.assign(a).await;
                Ok(self.drop_miner(&url, r)?)
            }
            (Route::P2p(peer), Some(c)) => {
                match c.request(peer, JobRequest::Assignment(a.into())).await? {
                    JobResponse::AssignmentAck(_) => Ok(()),
                    other => Err(unexpected("job assignment", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Times one round trip to the miner at `addr` (a status call over gRPC, answered or
    /// refused: either way the network's time), or `None` where there is no such call.
    pub async fn ping(&self, addr: &str) -> Option<std::time::Duration> {
        match self.route(addr).ok()? {
            (Route::Grpc(url), _) => {
                let t = std::time::Instant::now();
                let mut c = MinerClient::connect(&url).await.ok()?;
                let _ = c.status().await;
                Some(t.elapsed())
            }
            _ => None,
        }
    }

    /// The inventory the miner at `addr` declares now (self-declared, unverified): its
    /// status over gRPC, its latest signed advert over libp2p; `None` when there is none.
    pub async fn declared_inventory(&self, addr: &str) -> Option<v1::HardwareInventory> {
        match self.route(addr).ok()? {
            (Route::Grpc(url), _) => {
                MinerClient::connect(&url)
                    .await
                    .ok()?
                    .status()
                    .await
                    .ok()?
                    .hardware
            }
            (Route::P2p(peer), Some(client)) => {
                client
                    .peers()
                    .await
                    .ok()?
                    .into_iter()
                    .find(|p| p.peer_id == peer)?
                    .advert?
                    .inventory
            }
            (Route::P2p(_), None) => None,
        }
    }

    /// Sends a benchmark challenge to the miner at `addr`; returns its commitment.
    pub async fn benchmark(
        &self,
        addr: &str,
        c: v1::BenchmarkChallenge,
    ) -> Result<v1::BenchmarkCommitment, SendError> {
        match self.route(addr)? {
            (Route::Grpc(url), _) => Ok(MinerClient::connect(&url).await?.benchmark(c).await?),
            (Route::P2p(peer), Some(client)) => {
                match client.request(peer, JobRequest::Benchmark(c)).await? {
                    JobResponse::BenchmarkCommitment(m) if m.miner == peer.to_base58() => Ok(m),
                    JobResponse::BenchmarkCommitment(m) => Err(SendError::Refused(format!(
                        "{peer} answered for another miner ({})",
                        m.miner
                    ))),
                    other => Err(unexpected("benchmark challenge", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Sends a benchmark reveal to the miner at `addr`; returns its opening.
    pub async fn benchmark_open(
        &self,
        addr: &str,
        r: v1::BenchmarkReveal,
    ) -> Result<v1::BenchmarkOpening, SendError> {
        match self.route(addr)? {
            (Route::Grpc(url), _) => {
                Ok(MinerClient::connect(&url).await?.benchmark_open(r).await?)
            }
            (Route::P2p(peer), Some(client)) => {
                match client.request(peer, JobRequest::BenchmarkReveal(r)).await? {
                    JobResponse::BenchmarkOpening(m) => Ok(m),
                    other => Err(unexpected("benchmark reveal", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Sends a commitment to the validator at `reply_to` and returns its receipt.
    pub async fn commit(&self, reply_to: &str, c: Commitment) -> Result<Receipt, SendError> {
        match self.route(reply_to)? {
            (Route::Grpc(url), _) => Ok(ValidatorClient::connect(&url).await?.commit(c).await?),
            (Route::P2p(peer), Some(client)) => {
                match client
                    .request(peer, JobRequest::Commitment(c.into()))
                    .await?
                {
                    JobResponse::Receipt(r) => Receipt::try_from(r)
                        .map_err(|e| SendError::Refused(format!("{peer} sent a bad receipt: {e}"))),
                    other => Err(unexpected("commitment", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Reveals an artifact to the validator at `reply_to`: over gRPC the bytes are
    /// uploaded; over libp2p this node serves the blob and the validator fetches it.
    pub async fn reveal(
        &self,
        reply_to: &str,
        header: UploadHeader,
        blobs: &BlobStore,
    ) -> Result<(), SendError> {
        match self.route(reply_to)? {
            (Route::Grpc(url), _) => {
                let path = blobs.path(&header.artifact);
                ValidatorClient::connect(&url)
                    .await?
                    .upload(header, &path)
                    .await?;
                Ok(())
            }
            (Route::P2p(peer), Some(c)) => {
                // The validator fetches from this miner by name: no need to wait for
                // the DHT announcement (a dark peer holds that for the query's timeout).
                c.serve(header.artifact).await?;
                match c.request(peer, JobRequest::Reveal(header.into())).await? {
                    JobResponse::UploadResult(_) => Ok(()),
                    other => Err(unexpected("reveal", &other)),
                }
            }
            (Route::P2p(_), None) => Err(SendError::Refused("no p2p client".into())),
        }
    }

    /// Makes sure blob `id` is stored, fetching it from `from` (a validator's `reply_to`)
    /// when it is not. Over libp2p any peer that provides the blob may serve it, and this
    /// node then provides it in turn, so miners fetch models and shards from each other.
    pub async fn fetch_blob(
        &self,
        blobs: &BlobStore,
        from: &str,
        id: BlobId,
        max_size: u64,
    ) -> Result<u64, NodeError> {
        let fail = |e: SendError| NodeError::Other(format!("fetching blob {id}: {e}"));
        match self.route(from).map_err(fail)? {
            (Route::Grpc(url), _) => crate::fetch::fetch_blob(blobs, &url, id, max_size).await,
            (Route::P2p(peer), Some(c)) => {
                let size = c
                    .fetch_blob_from(id, max_size, &[peer])
                    .await
                    .map_err(|e| NodeError::Other(format!("fetching blob {id} over p2p: {e}")))?;
                // Announced without waiting for the announcement to be done: that waits on
                // every peer the record goes to, one whose link is dark for the DHT query's
                // whole timeout (every miner's model fetch took 29 s while one was cut off).
                if let Err(e) = c.serve(id).await {
                    tracing::debug!(blob = %id, error = %e, "could not provide a fetched blob");
                }
                Ok(size)
            }
            (Route::P2p(_), None) => Err(fail(SendError::Refused("no p2p client".into()))),
        }
    }
}

/// What a daemon does with messages that arrive over libp2p.
#[tonic::async_trait]
pub trait P2pHandler: Send + Sync + 'static {
    /// Answers a job request from `peer`.
    async fn job(&self, peer: PeerId, request: JobRequest) -> JobResponse;
    /// A miner's signed advert arrived (already validated by the p2p layer).
    fn advert(&self, _peer: PeerId, _advert: &MinerAdvert) {}
    /// Another validator's artifact record arrived (signatures checked by the p2p layer).
    fn artifact_record(&self, _peer: PeerId, _record: ArtifactRecord) {}
    /// Another validator's score attestation arrived (its signature checked by the p2p
    /// layer).
    fn attestation(&self, _peer: PeerId, _attestation: tunenet_types::ScoreAttestation) {}
}

/// Pumps the p2p event stream until it ends: job requests are answered by `handler`, each
/// on its own task (a reveal fetches a whole artifact), at most [`MAX_INBOUND`] at once.
pub fn serve(
    client: tunenet_p2p::Client,
    mut events: mpsc::Receiver<Event>,
    handler: Arc<dyn P2pHandler>,
) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND));
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            match e {
                Event::JobRequest {
                    peer,
                    request,
                    channel,
                } => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        let busy = JobResponse::Refused(format!(
                            "busy: {MAX_INBOUND} job requests in progress; try again shortly"
                        ));
                        let _ = client.respond(channel, busy).await;
                        continue;
                    };
                    let (client, handler) = (client.clone(), handler.clone());
                    tokio::spawn(async move {
                        let answer = handler.job(peer, request).await;
                        if let Err(err) = client.respond(channel, answer).await {
                            tracing::debug!(%peer, error = %err, "could not answer a p2p job request");
                        }
                        drop(slot);
                    });
                }
                Event::MinerAdvert { peer, advert } => handler.advert(peer, &advert),
                Event::ArtifactRecord { peer, record } => handler.artifact_record(peer, record),
                Event::Attestation { peer, attestation } => handler.attestation(peer, attestation),
                Event::GossipRejected {
                    peer,
                    topic,
                    reason,
                } => tracing::warn!(%peer, %topic, %reason, "rejected gossip"),
                Event::BlobProviderDropped { peer, id, reason } => {
                    tracing::warn!(%peer, blob = %id, %reason, "dropped a blob provider")
                }
                other => tracing::debug!(event = ?other, "p2p"),
            }
        }
    });
}

/// The refusal a job request gets, from a gRPC status.
pub fn refusal(s: Status) -> JobResponse {
    JobResponse::Refused(s.message().to_string())
}

/// A miner's answers to job requests over libp2p: the same backend as its gRPC service.
pub struct MinerP2p(pub Arc<dyn MinerBackend>);

#[tonic::async_trait]
impl P2pHandler for MinerP2p {
    async fn job(&self, peer: PeerId, request: JobRequest) -> JobResponse {
        match request {
            JobRequest::Offer(o) => {
                let mut offer = match Offer::try_from(o) {
                    Ok(o) => o,
                    Err(e) => return JobResponse::Refused(format!("bad offer: {e}")),
                };
                if offer.validator.0 != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the offer names validator {} but came from {peer}",
                        offer.validator
                    ));
                }
                // Answers go back over the wire the offer came on.
                offer.reply_to = p2p_addr(&peer);
                match self.0.offer(offer).await {
                    Ok(d) => JobResponse::Decision(v1::Decision::from(d)),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::Assignment(a) => {
                let a = match Assignment::try_from(a) {
                    Ok(a) => a,
                    Err(e) => return JobResponse::Refused(format!("bad assignment: {e}")),
                };
                if a.validator.0 != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the assignment names validator {} but came from {peer}",
                        a.validator
                    ));
                }
                let job_id = a.job_id.to_string();
                match self.0.assign(a).await {
                    Ok(()) => JobResponse::AssignmentAck(v1::AssignmentAck { job_id }),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::Benchmark(c) => {
                if c.validator != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the challenge names validator {} but came from {peer}",
                        c.validator
                    ));
                }
                match self.0.benchmark(c).await {
                    Ok(m) => JobResponse::BenchmarkCommitment(m),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::BenchmarkReveal(r) => {
                if r.validator != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the reveal names validator {} but came from {peer}",
                        r.validator
                    ));
                }
                match self.0.benchmark_open(r).await {
                    Ok(m) => JobResponse::BenchmarkOpening(m),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::Commitment(_) | JobRequest::Reveal(_) => JobResponse::Refused(
                "this node is a miner: it takes offers and assignments, not commitments or reveals"
                    .into(),
            ),
        }
    }
}

/// The checks and hand-over of a revealed artifact, as the validator's loop does them.
#[tonic::async_trait]
pub trait RevealSink: Send + Sync + 'static {
    /// Takes a commitment; returns the signed receipt.
    async fn commit(&self, c: Commitment) -> Result<Receipt, Status>;
    /// Checks a reveal before the artifact is fetched; returns the size limit.
    async fn check_reveal(&self, h: &UploadHeader) -> Result<u64, Status>;
    /// The artifact is stored; score it.
    async fn revealed(&self, h: UploadHeader) -> Result<(), Status>;
}

/// What a validator does with a valid miner advert.
pub type OnAdvert = Box<dyn Fn(PeerId, &MinerAdvert) + Send + Sync>;

/// What a validator does with another validator's valid artifact record.
pub type OnRecord = Box<dyn Fn(PeerId, ArtifactRecord) + Send + Sync>;

/// What a validator does with another validator's valid score attestation.
pub type OnAttestation = Box<dyn Fn(PeerId, tunenet_types::ScoreAttestation) + Send + Sync>;

/// A validator's answers to job requests over libp2p.
pub struct ValidatorP2p<S: RevealSink> {
    /// The validator loop's entry points.
    pub sink: Arc<S>,
    /// Fetches revealed artifacts.
    pub client: tunenet_p2p::Client,
    /// Called with each valid miner advert.
    pub on_advert: OnAdvert,
    /// Called with each valid artifact record from another validator.
    pub on_record: OnRecord,
    /// Called with each valid score attestation from another validator.
    pub on_attestation: OnAttestation,
}

#[tonic::async_trait]
impl<S: RevealSink> P2pHandler for ValidatorP2p<S> {
    async fn job(&self, peer: PeerId, request: JobRequest) -> JobResponse {
        match request {
            JobRequest::Commitment(c) => {
                let c = match Commitment::try_from(c) {
                    Ok(c) => c,
                    Err(e) => return JobResponse::Refused(format!("bad commitment: {e}")),
                };
                if c.miner.0 != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the commitment names miner {} but came from {peer}",
                        c.miner
                    ));
                }
                match self.sink.commit(c).await {
                    Ok(r) => JobResponse::Receipt(r.into()),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::Reveal(h) => {
                let h = match UploadHeader::try_from(h) {
                    Ok(h) => h,
                    Err(e) => return JobResponse::Refused(format!("bad reveal: {e}")),
                };
                if h.miner.0 != peer.to_base58() {
                    return JobResponse::Refused(format!(
                        "the reveal names miner {} but came from {peer}",
                        h.miner
                    ));
                }
                let limit = match self.sink.check_reveal(&h).await {
                    Ok(l) => l,
                    Err(s) => return refusal(s),
                };
                let size = match self
                    .client
                    .fetch_blob_from(h.artifact, limit, &[peer])
                    .await
                {
                    Ok(size) => size,
                    Err(e) => {
                        return JobResponse::Refused(format!(
                            "could not fetch artifact {} from {peer}: {e}",
                            h.artifact
                        ));
                    }
                };
                metrics::counter!("tunenet_bytes_received_total", "what" => "artifact")
                    .increment(size);
                let (job_id, artifact) = (h.job_id.to_string(), h.artifact);
                match self.sink.revealed(h).await {
                    Ok(()) => JobResponse::UploadResult(v1::UploadResult {
                        job_id,
                        artifact: artifact.0.to_vec(),
                        bytes_received: size,
                    }),
                    Err(s) => refusal(s),
                }
            }
            JobRequest::Offer(_)
            | JobRequest::Assignment(_)
            | JobRequest::Benchmark(_)
            | JobRequest::BenchmarkReveal(_) => JobResponse::Refused(
                "this node is a validator: it takes commitments and reveals, not offers or benchmarks"
                    .into(),
            ),
        }
    }

    fn advert(&self, peer: PeerId, advert: &MinerAdvert) {
        (self.on_advert)(peer, advert)
    }

    fn artifact_record(&self, peer: PeerId, record: ArtifactRecord) {
        (self.on_record)(peer, record)
    }

    fn attestation(&self, peer: PeerId, attestation: tunenet_types::ScoreAttestation) {
        (self.on_attestation)(peer, attestation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_tell_grpc_from_p2p() {
        let peer = PeerId::random();
        assert_eq!(route(&p2p_addr(&peer)).unwrap(), Route::P2p(peer));
        assert_eq!(
            route("http://127.0.0.1:7100").unwrap(),
            Route::Grpc("http://127.0.0.1:7100".into())
        );
        let e = route("p2p:not-a-peer").unwrap_err();
        assert!(e.contains("peer id"), "{e}");
    }

    #[tokio::test]
    async fn a_p2p_address_without_p2p_is_refused_with_the_reason() {
        let t = Transport::new(None);
        let e = t
            .assign(&p2p_addr(&PeerId::random()), sample_assignment())
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("[p2p]"), "{e}");
    }

    fn sample_assignment() -> Assignment {
        Assignment {
            job_id: tunenet_types::JobId::new("j").unwrap(),
            competition_id: tunenet_types::CompetitionId::new("c").unwrap(),
            miner: tunenet_types::PeerIdStr("m".into()),
            validator: tunenet_types::PeerIdStr("v".into()),
            validator_key: vec![],
            nonce: [0; 32],
            base_model: BlobId::of(b"m"),
            train_shard: BlobId::of(b"s"),
            hparams: Default::default(),
            deadline_ms: 0,
            max_artifact_bytes: 0,
            signature: vec![],
        }
    }
}
