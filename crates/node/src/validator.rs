//! The validator daemon: prepares each competition (base model and shards as blobs, the
//! hidden test split kept private), runs its engine, serves `ValidatorService`, evaluates
//! revealed artifacts on a worker thread and stores every change in sled.

use crate::config::{CompetitionConfig, ValidatorConfig};
use crate::error::NodeError;
use crate::{models, registry};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tunenet_engine::{
    CompetitionPlan, Evaluation, JobPlan, JobState, ValidatorEffect, ValidatorEngine,
    ValidatorError, ValidatorInput,
};
use tunenet_proto::v1;
use tunenet_rpc::{MinerClient, Status, UploadSink, ValidatorBackend};
use tunenet_store::{BlobStore, BlobWriter, SledStore, Store, StoreExt, trees};
use tunenet_types::{
    BlobId, Commitment, CompetitionId, Identity, JobId, JobScore, Leaderboard, PeerIdStr, Receipt,
    UploadHeader, leaderboard, time::now_ms,
};

/// A prepared competition, stored so a restarted validator runs the very same jobs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompetitionRecord {
    /// The spec it was prepared from.
    pub config: CompetitionConfig,
    /// The jobs and rules.
    pub plan: CompetitionPlan,
    /// The base model's manifest blob.
    pub base_model: BlobId,
    /// The hidden test split (never served).
    pub test_blob: BlobId,
    /// Blobs miners may download.
    pub public_blobs: Vec<BlobId>,
    /// Where the competition stands.
    #[serde(default)]
    pub state: CompState,
}

/// A competition's state as the admin steers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompState {
    /// Created from the console; not started.
    Created,
    /// Offering and running jobs.
    #[default]
    Running,
    /// No new jobs start; jobs in flight go on.
    Paused,
    /// Stopped early; jobs in flight finish.
    Stopped,
    /// Hidden from the default list.
    Archived,
}

impl std::fmt::Display for CompState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CompState::Created => "created",
            CompState::Running => "running",
            CompState::Paused => "paused",
            CompState::Stopped => "stopped",
            CompState::Archived => "archived",
        })
    }
}

/// Options that the demo and tests set.
#[derive(Clone, Debug, Default)]
pub struct ValidatorOptions {
    /// Stop once every competition is finished (after printing the leaderboards).
    pub exit_when_done: bool,
}

/// A closure run inside the validator loop with the whole state at hand.
pub(crate) type Job = Box<dyn FnOnce(&mut Validator) + Send>;

pub(crate) enum Cmd {
    Run(Job),
    Commit(Commitment, oneshot::Sender<Result<Receipt, Status>>),
    CheckUpload(UploadHeader, oneshot::Sender<Result<u64, Status>>),
    Uploaded(UploadHeader, oneshot::Sender<Result<(), Status>>),
    Leaderboard(String, oneshot::Sender<Result<Leaderboard, Status>>),
    Input(String, ValidatorInput),
}

fn status_of(e: ValidatorError) -> Status {
    let msg = e.to_string();
    match e {
        ValidatorError::UnknownJob(_) => Status::not_found(msg),
        ValidatorError::NotAssigned { .. } => Status::permission_denied(msg),
        ValidatorError::BadSignature(_) => Status::unauthenticated(msg),
        ValidatorError::TooLarge { .. } => Status::resource_exhausted(msg),
        ValidatorError::CommitMismatch(_) => Status::invalid_argument(msg),
        ValidatorError::TooLate { .. }
        | ValidatorError::TooEarly { .. }
        | ValidatorError::NoCommitment { .. }
        | ValidatorError::Closed(_)
        | ValidatorError::AlreadyUploaded { .. } => Status::failed_precondition(msg),
    }
}

/// Splits a dataset into the hidden test split and one training shard per job.
fn split(
    cfg: &CompetitionConfig,
    records: Vec<tunenet_ml::Record>,
) -> Result<(Vec<tunenet_ml::Record>, Vec<Vec<tunenet_ml::Record>>), NodeError> {
    let fail = |reason: String| NodeError::Competition {
        competition: cfg.id.clone(),
        reason,
    };
    if records.is_empty() {
        return Err(fail(format!(
            "`dataset` {} has no records",
            cfg.dataset.display()
        )));
    }
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed));
    let n_test = ((records.len() as f64 * cfg.test_fraction).round() as usize).max(1);
    if records.len() < n_test + cfg.jobs as usize {
        return Err(fail(format!(
            "`dataset` has {} records: too few for a test split of {n_test} and {} job shards",
            records.len(),
            cfg.jobs
        )));
    }
    let test = idx[..n_test].iter().map(|&i| records[i].clone()).collect();
    let train: Vec<usize> = idx[n_test..].to_vec();
    // Shard sizes follow the schedule: each job's shard is `shard_growth` times the last.
    let growth = cfg.shard_growth;
    let weights: Vec<f64> = (0..cfg.jobs).map(|j| growth.powi(j as i32)).collect();
    let total: f64 = weights.iter().sum();
    let mut shards = Vec::with_capacity(cfg.jobs as usize);
    let mut start = 0usize;
    for (j, w) in weights.iter().enumerate() {
        let len = if j + 1 == weights.len() {
            train.len() - start
        } else {
            ((train.len() as f64 * w / total).floor() as usize).max(1)
        };
        let end = (start + len).min(train.len());
        if end <= start {
            return Err(fail(format!(
                "`shard_growth` {growth} leaves job {j} with no training records"
            )));
        }
        shards.push(
            train[start..end]
                .iter()
                .map(|&i| records[i].clone())
                .collect::<Vec<_>>(),
        );
        start = end;
    }
    Ok((test, shards))
}

/// Prepares a competition, or loads the one prepared before under the same id.
pub fn prepare(
    store: &dyn Store,
    blobs: &BlobStore,
    cfg: &CompetitionConfig,
    reply_to: &str,
) -> Result<CompetitionRecord, NodeError> {
    cfg.validate()?;
    if let Some(rec) = store.get_json::<CompetitionRecord>(trees::COMPETITIONS, &cfg.id)? {
        if rec.config != *cfg {
            tracing::warn!(competition = %cfg.id, "config changed since the competition was prepared; keeping the stored one");
        }
        return Ok(rec);
    }
    let fail = |reason: String| NodeError::Competition {
        competition: cfg.id.clone(),
        reason,
    };
    let model = tunenet_ml::ModelDir::open(&cfg.base_model)
        .map_err(|e| fail(format!("`base_model`: {e}")))?;
    let params = model
        .config()
        .map_err(|e| fail(format!("`base_model`: {e}")))?
        .param_count();
    let records =
        tunenet_ml::load_jsonl(&cfg.dataset).map_err(|e| fail(format!("`dataset`: {e}")))?;
    let (test, shards) = split(cfg, records)?;
    let (base_model, manifest) = models::import_model_dir(blobs, &cfg.base_model)?;
    let model_config =
        std::fs::read_to_string(cfg.base_model.join("config.json")).unwrap_or_default();
    let test_blob = blobs.put(&tunenet_ml::to_jsonl(&test))?;
    let mut public_blobs = vec![base_model];
    public_blobs.extend(manifest.files.iter().map(|f| f.blob));
    let comp = CompetitionId::new(cfg.id.clone()).map_err(|e| fail(e.to_string()))?;
    let mut jobs = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let shard_blob = blobs.put(&tunenet_ml::to_jsonl(shard))?;
        public_blobs.push(shard_blob);
        jobs.push(JobPlan {
            job_id: JobId::new(format!("{}-{i}", cfg.id)).map_err(|e| fail(e.to_string()))?,
            base_model,
            base_params: params,
            train_shard: shard_blob,
            shard_records: shard.len() as u64,
            time_budget_ms: (cfg.time_budget_secs + cfg.budget_step_secs * i as u64) * 1000,
            reward_hint: cfg.reward_hint,
            model_config: model_config.clone(),
        });
    }
    let plan = CompetitionPlan {
        id: comp,
        jobs,
        miners_per_job: cfg.miners_per_job,
        concurrent_jobs: cfg.concurrent_jobs,
        hparams: cfg.hparams.clone(),
        scoring: cfg.scoring.clone(),
        reveal_window_ms: cfg.reveal_window_secs * 1000,
        offer_timeout_ms: cfg.offer_timeout_secs * 1000,
        max_artifact_bytes: cfg.max_artifact_mb * 1024 * 1024,
        reply_to: reply_to.to_string(),
        hardware: "cpu".into(),
        integrity: cfg.integrity.clone(),
    };
    let rec = CompetitionRecord {
        config: cfg.clone(),
        plan,
        base_model,
        test_blob,
        public_blobs,
        state: CompState::Running,
    };
    store.put_json(trees::COMPETITIONS, &cfg.id, &rec)?;
    store.flush()?;
    Ok(rec)
}

/// What the gRPC services share with the validator loop.
pub(crate) struct Shared {
    pub(crate) tx: mpsc::Sender<Cmd>,
    pub(crate) blobs: BlobStore,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) public: RwLock<HashSet<BlobId>>,
    pub(crate) events: tokio::sync::broadcast::Sender<Event>,
    pub(crate) reply_to: String,
}

/// One line of the live feed.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) at_ms: u64,
    pub(crate) competition: String,
    pub(crate) job: String,
    pub(crate) message: String,
}

impl Shared {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Cmd,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("validator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("validator is shutting down"))?
    }

    /// Runs `f` inside the validator loop and returns its answer.
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Validator) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.ask(move |reply| {
            Cmd::Run(Box::new(move |v: &mut Validator| {
                let _ = reply.send(f(v));
            }))
        })
        .await
    }
}

struct Sink {
    writer: BlobWriter,
    header: UploadHeader,
}

impl UploadSink for Sink {
    fn write(&mut self, data: &[u8]) -> Result<(), Status> {
        self.writer.write_chunk(data).map_err(|e| match e {
            tunenet_store::BlobError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
            _ => Status::internal(e.to_string()),
        })
    }

    fn finish(self: Box<Self>) -> Result<v1::UploadResult, Status> {
        let received = self.writer.written();
        let expected = self.header.artifact;
        match self.writer.finish(Some(expected)) {
            Ok(id) => Ok(v1::UploadResult {
                job_id: self.header.job_id.to_string(),
                artifact: id.0.to_vec(),
                bytes_received: received,
            }),
            Err(tunenet_store::BlobError::HashMismatch { actual, .. }) => {
                Err(Status::invalid_argument(format!(
                    "uploaded bytes hash to {actual}, but the header and commitment name {expected}; nothing was stored"
                )))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

#[tonic::async_trait]
impl ValidatorBackend for Shared {
    async fn commit(&self, c: Commitment) -> Result<Receipt, Status> {
        self.ask(|tx| Cmd::Commit(c, tx)).await
    }

    async fn begin_upload(&self, h: UploadHeader) -> Result<Box<dyn UploadSink>, Status> {
        let limit = self.ask(|tx| Cmd::CheckUpload(h.clone(), tx)).await?;
        let writer = self
            .blobs
            .writer(Some(limit))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Box::new(Sink { writer, header: h }))
    }

    async fn end_upload(&self, result: v1::UploadResult, h: UploadHeader) -> Result<(), Status> {
        metrics::counter!("tunenet_bytes_received_total", "what" => "artifact")
            .increment(result.bytes_received);
        self.ask(|tx| Cmd::Uploaded(h, tx)).await
    }

    async fn open_blob(&self, id: BlobId) -> Result<(u64, std::fs::File), Status> {
        let public = self.public.read().map(|p| p.contains(&id)).unwrap_or(false);
        if !public {
            return Err(Status::not_found(format!(
                "blob {id} is not served by this validator"
            )));
        }
        let path = self.blobs.path(&id);
        let file = std::fs::File::open(&path)
            .map_err(|_| Status::not_found(format!("blob {id} is not stored")))?;
        let size = file
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        metrics::counter!("tunenet_bytes_sent_total", "what" => "blob").increment(size);
        Ok((size, file))
    }

    async fn leaderboard(&self, competition: String) -> Result<Leaderboard, Status> {
        self.ask(|tx| Cmd::Leaderboard(competition, tx)).await
    }
}

struct EvalRequest {
    bounds: tunenet_types::HparamBounds,
    integrity: tunenet_types::IntegritySettings,
    comp: String,
    job_id: JobId,
    miner: PeerIdStr,
    artifact: BlobId,
    model: BlobId,
    test: BlobId,
    max_seq_len: usize,
}

/// One competition in the running validator.
pub(crate) struct Comp {
    pub(crate) engine: ValidatorEngine,
    pub(crate) record: CompetitionRecord,
}

impl Comp {
    /// The competition's id.
    pub(crate) fn id(&self) -> &str {
        &self.record.config.id
    }
}

/// Scores of every finished job of a competition, as a leaderboard.
pub fn leaderboard_of(engine: &ValidatorEngine) -> Leaderboard {
    let jobs: Vec<&JobState> = engine.jobs().collect();
    let done = jobs
        .iter()
        .filter(|j| matches!(j.phase, tunenet_engine::JobPhase::Done { .. }))
        .count();
    let scores: Vec<JobScore> = jobs.iter().flat_map(|j| j.scores.clone()).collect();
    leaderboard(&engine.plan().id, &scores, done as u32, jobs.len() as u32)
}

/// Prints a leaderboard as a table.
pub fn format_leaderboard(lb: &Leaderboard) -> String {
    let mut s = format!(
        "leaderboard `{}` ({} of {} jobs scored)\n{:>4}  {:<54} {:>4} {:>10} {:>9} {:>9}\n",
        lb.competition_id,
        lb.jobs_done,
        lb.jobs_total,
        "rank",
        "miner",
        "jobs",
        "test loss",
        "quality",
        "standing"
    );
    for r in &lb.rows {
        s.push_str(&format!(
            "{:>4}  {:<54} {:>4} {:>10} {:>9.4} {:>9.4}\n",
            r.rank,
            r.miner,
            r.jobs,
            r.mean_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            r.mean_quality,
            r.standing
        ));
    }
    s
}

/// The validator loop's state: every competition, the stores, and the ways out.
pub(crate) struct Validator {
    pub(crate) comps: Vec<Comp>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) shared: Arc<Shared>,
    identity: Identity,
    config_miners: Vec<String>,
    tx: mpsc::Sender<Cmd>,
    evals: std::sync::mpsc::Sender<EvalRequest>,
    rng: rand::rngs::StdRng,
}

impl Validator {
    /// The competition with this id.
    pub(crate) fn comp(&mut self, id: &str) -> Result<&mut Comp, Status> {
        self.comps
            .iter_mut()
            .find(|c| c.id() == id)
            .ok_or_else(|| Status::not_found(format!("no competition `{id}` on this validator")))
    }

    /// Adds a prepared competition and starts its engine.
    pub(crate) fn add(&mut self, record: CompetitionRecord) {
        if let Ok(mut p) = self.shared.public.write() {
            p.extend(record.public_blobs.iter().copied());
        }
        let stored: Vec<JobState> = self
            .store
            .scan_json::<JobState>(trees::JOBS, &format!("{}/", record.config.id))
            .unwrap_or_default()
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        let mut plan = record.plan.clone();
        plan.reply_to = self.shared.reply_to.clone();
        let mut engine = ValidatorEngine::new(self.identity.clone(), plan, self.miners(), stored);
        engine.set_banned(registry::banned(self.store.as_ref()));
        engine.set_paused(!matches!(record.state, CompState::Running));
        let fx = engine.resume();
        self.comps.push(Comp { engine, record });
        let i = self.comps.len() - 1;
        self.execute(i, fx);
    }

    /// Config miners plus registered, unbanned miners with an endpoint.
    fn miners(&self) -> Vec<String> {
        let mut m = self.config_miners.clone();
        for r in registry::list(self.store.as_ref()).unwrap_or_default() {
            if !r.banned && !r.endpoint.is_empty() && !m.contains(&r.endpoint) {
                m.push(r.endpoint);
            }
        }
        m
    }

    /// Pushes the miner list and bans to every engine (after a registry change).
    pub(crate) fn refresh_miners(&mut self) {
        let miners = self.miners();
        let banned = registry::banned(self.store.as_ref());
        for c in &mut self.comps {
            c.engine.set_miners(miners.clone());
            c.engine.set_banned(banned.clone());
        }
    }

    /// Changes a competition's state; returns the new state.
    pub(crate) fn change(&mut self, id: &str, action: &str) -> Result<CompState, Status> {
        let store = self.store.clone();
        let i = self
            .comps
            .iter()
            .position(|c| c.id() == id)
            .ok_or_else(|| Status::not_found(format!("no competition `{id}` on this validator")))?;
        let c = &mut self.comps[i];
        let finished = c.engine.is_finished();
        let next = match (action, c.record.state) {
            ("start" | "resume", CompState::Created | CompState::Paused) => CompState::Running,
            ("pause", CompState::Running) => CompState::Paused,
            ("stop", CompState::Created | CompState::Running | CompState::Paused) => {
                CompState::Stopped
            }
            ("archive", s) if finished || s == CompState::Stopped => CompState::Archived,
            ("archive", _) => {
                return Err(Status::failed_precondition(format!(
                    "competition `{id}` is still running: stop it or let it finish before archiving"
                )));
            }
            ("start" | "resume" | "pause" | "stop", s) => {
                return Err(Status::failed_precondition(format!(
                    "cannot {action} competition `{id}`: it is {s}"
                )));
            }
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "unknown action `{other}`: use start, pause, resume, stop or archive"
                )));
            }
        };
        c.record.state = next;
        c.engine.set_paused(next != CompState::Running);
        let fx = if next == CompState::Stopped {
            c.engine.stop()
        } else {
            vec![]
        };
        store
            .put_json(trees::COMPETITIONS, id, &c.record)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.execute(i, fx);
        Ok(next)
    }

    fn tick(&mut self) {
        let now = now_ms();
        for i in 0..self.comps.len() {
            let fx = self.comps[i]
                .engine
                .handle(ValidatorInput::Tick, now, &mut self.rng);
            self.execute(i, fx);
        }
    }

    fn index_of_job(&self, job: &JobId) -> Option<usize> {
        self.comps.iter().position(|c| c.engine.job(job).is_some())
    }

    fn execute(&self, comp: usize, fx: Vec<ValidatorEffect>) {
        let Some(c) = self.comps.get(comp) else {
            return;
        };
        let cid = c.engine.plan().id.clone();
        for e in fx {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    metrics::counter!("tunenet_jobs_offered_total").increment(1);
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let job_id = offer.job_id.clone();
                        let reply = async { MinerClient::connect(&addr).await?.offer(offer).await }
                            .await
                            .map_err(|e| e.to_string());
                        match &reply {
                            Ok(r) => match &r.decision {
                                tunenet_types::Decision::Accept => {
                                    metrics::counter!("tunenet_offers_accepted_total").increment(1)
                                }
                                tunenet_types::Decision::Reject(reason) => metrics::counter!(
                                    "tunenet_offers_rejected_total",
                                    "reason" => format!("{:?}", reason.code)
                                )
                                .increment(1),
                            },
                            Err(_) => metrics::counter!("tunenet_offers_failed_total").increment(1),
                        }
                        let _ = tx
                            .send(Cmd::Input(
                                cid_key(&job_id),
                                ValidatorInput::Decision {
                                    job_id,
                                    addr,
                                    reply,
                                },
                            ))
                            .await;
                    });
                }
                ValidatorEffect::SendAssignment { addr, assignment } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let job_id = assignment.job_id.clone();
                        let miner = assignment.miner.clone();
                        let result =
                            async { MinerClient::connect(&addr).await?.assign(assignment).await }
                                .await
                                .map_err(|e| e.to_string());
                        let _ = tx
                            .send(Cmd::Input(
                                cid_key(&job_id),
                                ValidatorInput::Assigned {
                                    job_id,
                                    miner,
                                    result,
                                },
                            ))
                            .await;
                    });
                }
                ValidatorEffect::Evaluate {
                    job_id,
                    miner,
                    artifact,
                } => {
                    metrics::counter!("tunenet_submissions_total").increment(1);
                    let _ = self.evals.send(EvalRequest {
                        bounds: c.engine.plan().hparams.clone(),
                        integrity: c.engine.plan().integrity.clone(),
                        comp: cid.to_string(),
                        job_id,
                        miner,
                        artifact,
                        model: c.record.base_model,
                        test: c.record.test_blob,
                        max_seq_len: c.record.config.eval_max_seq_len,
                    });
                }
                ValidatorEffect::Persist(job) => {
                    let key = format!("{}/{}", cid, job.plan.job_id);
                    if let Err(e) = self.store.put_json(trees::JOBS, &key, &job) {
                        tracing::error!(job_id = %job.plan.job_id, error = %e, "could not store job state");
                    }
                }
                ValidatorEffect::JobFinished { job_id, scores } => {
                    let key = format!("{cid}/{job_id}");
                    if let Err(e) = self.store.put_json(trees::SCORES, &key, &scores) {
                        tracing::error!(%job_id, error = %e, "could not store scores");
                    }
                    let _ = self.store.flush();
                    for s in &scores {
                        let verdict = if s.penalty_reason.is_some() {
                            "penalty"
                        } else {
                            "scored"
                        };
                        metrics::counter!("tunenet_verdicts_total", "verdict" => verdict)
                            .increment(1);
                        tracing::info!(%job_id, miner = %s.miner, loss = ?s.loss, quality = s.quality, penalty = ?s.penalty_reason, "scored");
                        self.emit(
                            &cid,
                            job_id.as_str(),
                            format!(
                                "{} scored: loss {}, quality {:.4}{}",
                                s.miner,
                                s.loss
                                    .map(|l| format!("{l:.4}"))
                                    .unwrap_or_else(|| "-".into()),
                                s.quality,
                                s.penalty_reason
                                    .as_ref()
                                    .map(|r| format!(" (penalty: {r})"))
                                    .unwrap_or_default()
                            ),
                        );
                    }
                }
                ValidatorEffect::CompetitionFinished(id) => {
                    tracing::info!(competition = %id, "competition finished");
                    self.emit(&cid, "", "competition finished".into());
                }
                ValidatorEffect::Event(s) => {
                    tracing::info!(competition = %cid, "{s}");
                    let job = s
                        .strip_prefix("job ")
                        .and_then(|r| r.split(':').next())
                        .unwrap_or("")
                        .to_string();
                    let _ = self.shared.events.send(Event {
                        at_ms: now_ms(),
                        competition: cid.to_string(),
                        job,
                        message: s,
                    });
                }
            }
        }
    }

    fn emit(&self, cid: &CompetitionId, job: &str, message: String) {
        let _ = self.shared.events.send(Event {
            at_ms: now_ms(),
            competition: cid.to_string(),
            job: job.to_string(),
            message,
        });
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = now_ms();
        match cmd {
            Cmd::Run(f) => f(self),
            Cmd::Input(job_key, input) => {
                if let Some(i) = JobId::new(job_key).ok().and_then(|j| self.index_of_job(&j)) {
                    let fx = self.comps[i].engine.handle(input, now, &mut self.rng);
                    self.execute(i, fx);
                }
            }
            Cmd::Commit(commitment, reply) => {
                let r = match self.index_of_job(&commitment.job_id) {
                    Some(i) => match self.comps[i].engine.commit(commitment, now) {
                        Ok((receipt, fx)) => {
                            self.execute(i, fx);
                            Ok(receipt)
                        }
                        Err(e) => Err(status_of(e)),
                    },
                    None => Err(status_of(ValidatorError::UnknownJob(commitment.job_id))),
                };
                let _ = reply.send(r);
            }
            Cmd::CheckUpload(h, reply) => {
                let r = match self.index_of_job(&h.job_id) {
                    Some(i) => self.comps[i]
                        .engine
                        .check_upload(&h, now)
                        .map(|_| h.size)
                        .map_err(status_of),
                    None => Err(status_of(ValidatorError::UnknownJob(h.job_id.clone()))),
                };
                let _ = reply.send(r);
            }
            Cmd::Uploaded(h, reply) => {
                let r = match self.index_of_job(&h.job_id) {
                    Some(i) => match self.comps[i].engine.uploaded(&h, now) {
                        Ok(fx) => {
                            self.execute(i, fx);
                            Ok(())
                        }
                        Err(e) => Err(status_of(e)),
                    },
                    None => Err(status_of(ValidatorError::UnknownJob(h.job_id.clone()))),
                };
                let _ = reply.send(r);
            }
            Cmd::Leaderboard(id, reply) => {
                let c = if id.is_empty() {
                    self.comps.first()
                } else {
                    self.comps.iter().find(|c| c.id() == id)
                };
                let _ = reply.send(c.map(|c| leaderboard_of(&c.engine)).ok_or_else(|| {
                    Status::not_found(format!("no competition `{id}` on this validator"))
                }));
            }
        }
    }
}

/// Inputs are routed by job id, which names its competition uniquely.
fn cid_key(job: &JobId) -> String {
    job.to_string()
}

/// Creates the data dir's first admin token if there is none; returns it (shown once).
pub fn init(cfg: &ValidatorConfig) -> Result<Option<String>, NodeError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        NodeError::Other(format!(
            "cannot create data dir {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    crate::keys::load_or_create(
        &cfg.key_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("identity.key")),
    )?;
    let store = SledStore::open(&cfg.data_dir.join("db"))?;
    let has_admin = crate::auth::list(&store)?
        .iter()
        .any(|t| t.role == crate::auth::Role::Admin && !t.revoked);
    if has_admin {
        return Ok(None);
    }
    let (token, _) = crate::auth::issue(&store, crate::auth::Role::Admin, "first admin", 0, None)?;
    Ok(Some(token))
}

/// Runs a validator until it is stopped (or, with `exit_when_done`, until its
/// competitions finish).
pub async fn run(cfg: ValidatorConfig, opts: ValidatorOptions) -> Result<(), NodeError> {
    let crate::base::NodeBase {
        identity,
        store,
        blobs,
        device,
        listener,
    } = crate::base::open(
        &cfg.data_dir,
        cfg.key_file.as_ref(),
        &cfg.device,
        &cfg.listen,
    )
    .await?;
    if let Some(addr) = &cfg.metrics_listen {
        crate::metrics::install(addr)?;
    }
    let reply_to = cfg.reply_to();
    // Config competitions are prepared first so a bad spec stops the daemon before it serves.
    let mut records = Vec::new();
    for cc in &cfg.competitions {
        records.push(prepare(store.as_ref(), &blobs, cc, &reply_to)?);
    }
    // Competitions created from the console live only in the store.
    for (id, rec) in store.scan_json::<CompetitionRecord>(trees::COMPETITIONS, "")? {
        if !cfg.competitions.iter().any(|c| c.id == id) {
            records.push(rec);
        }
    }
    if cfg.miners.is_empty() && registry::list(store.as_ref())?.is_empty() {
        tracing::warn!(
            "no miners configured: add their gRPC endpoints to `miners` or register them from the console"
        );
    }

    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        blobs: blobs.clone(),
        store: store.clone(),
        public: RwLock::new(HashSet::new()),
        events,
        reply_to: reply_to.clone(),
    });
    let mut builder = tonic::transport::Server::builder();
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| {
                    NodeError::Other(format!("cannot read TLS file {}: {e}", p.display()))
                })
            };
            let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| {
                    NodeError::Other(format!(
                        "`tls_cert`/`tls_key` are not a usable PEM pair: {e}"
                    ))
                })?;
        }
        (None, None) => {}
        _ => {
            return Err(NodeError::Other(
                "set both `tls_cert` and `tls_key`, or neither".into(),
            ));
        }
    }
    let server = crate::base::Server::spawn(
        builder
            .add_service(tunenet_rpc::validator_server(shared.clone()))
            .add_service(crate::console::server(shared.clone())),
        listener,
    );
    tracing::info!(peer = %identity.peer_id(), listen = %cfg.listen, competitions = records.len(), "validator started");

    let evals = spawn_evaluator(&cfg, &blobs, device, tx.clone())?;
    let mut v = Validator {
        comps: Vec::new(),
        store: store.clone(),
        shared: shared.clone(),
        identity,
        config_miners: cfg.miners.clone(),
        tx: tx.clone(),
        evals,
        rng: rand::rngs::StdRng::from_os_rng(),
    };
    for r in records {
        v.add(r);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut announced = false;
    let shutdown = crate::base::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = tick.tick() => v.tick(),
            Some(cmd) = rx.recv() => v.handle(cmd),
        }
        let all_done = !v.comps.is_empty() && v.comps.iter().all(|c| c.engine.is_finished());
        if !announced && all_done {
            announced = true;
            for c in &v.comps {
                println!("{}", format_leaderboard(&leaderboard_of(&c.engine)));
            }
            if opts.exit_when_done {
                break;
            }
        }
        if !all_done {
            announced = false;
        }
    }
    store.flush()?;
    server.stop().await;
    Ok(())
}

/// Checks an artifact's integrity and, if it passes, its mean loss on the hidden test
/// split. Returns the evaluation and the seconds the checks took.
pub fn evaluate_submission(
    model: &tunenet_ml::ModelDir,
    artifact: &std::path::Path,
    test: &[tunenet_ml::Record],
    bounds: &tunenet_types::HparamBounds,
    integrity: &tunenet_types::IntegritySettings,
    max_seq_len: usize,
    device: &tunenet_ml::Device,
) -> Result<(Evaluation, f64), String> {
    let t0 = std::time::Instant::now();
    let (verdicts, sketch) = if integrity.enabled {
        let report = tunenet_integrity::check_artifact(model, artifact, bounds, integrity)
            .map_err(|e| e.to_string())?;
        if report.failed() {
            let secs = t0.elapsed().as_secs_f64();
            return Ok((
                Evaluation {
                    test_loss: None,
                    verdicts: report.verdicts,
                    sketch: vec![],
                },
                secs,
            ));
        }
        (report.verdicts, report.sketch)
    } else {
        (vec![], vec![])
    };
    let checks = t0.elapsed().as_secs_f64();
    let r = tunenet_ml::evaluate(model, Some(artifact), test, max_seq_len, 8, device)
        .map_err(|e| e.to_string())?;
    Ok((
        Evaluation {
            test_loss: Some(r.mean_loss),
            verdicts,
            sketch,
        },
        checks,
    ))
}

/// Starts the evaluation worker: one thread, one evaluation at a time, off the runtime.
/// Each request names its base model and test split by blob; both are loaded once.
fn spawn_evaluator(
    cfg: &ValidatorConfig,
    blobs: &BlobStore,
    device: tunenet_ml::Device,
    tx: mpsc::Sender<Cmd>,
) -> Result<std::sync::mpsc::Sender<EvalRequest>, NodeError> {
    let models_root = cfg.data_dir.join("models");
    let blobs = blobs.clone();
    let (etx, erx) = std::sync::mpsc::channel::<EvalRequest>();
    std::thread::Builder::new()
        .name("tunenet-eval".into())
        .spawn(move || {
            let mut models: BTreeMap<BlobId, tunenet_ml::ModelDir> = BTreeMap::new();
            let mut tests: BTreeMap<BlobId, Vec<tunenet_ml::Record>> = BTreeMap::new();
            while let Ok(req) = erx.recv() {
                let result = (|| -> Result<Evaluation, String> {
                    let model = match models.get(&req.model) {
                        Some(m) => m.clone(),
                        None => {
                            // The validator's own copy of the base, rebuilt from its blobs.
                            let bytes = blobs.get(&req.model).map_err(|e| e.to_string())?;
                            let manifest = tunenet_types::ModelManifest::parse(&bytes).map_err(|e| e.to_string())?;
                            let dir = models::materialise(&blobs, &req.model, &manifest, &models_root)
                                .map_err(|e| e.to_string())?;
                            let m = tunenet_ml::ModelDir::open(&dir).map_err(|e| e.to_string())?;
                            models.insert(req.model, m.clone());
                            m
                        }
                    };
                    if let std::collections::btree_map::Entry::Vacant(slot) = tests.entry(req.test) {
                        let bytes = blobs.get(&req.test).map_err(|e| e.to_string())?;
                        slot.insert(tunenet_ml::parse_jsonl(&bytes).map_err(|e| e.to_string())?);
                    }
                    let test = tests.get(&req.test).ok_or("test split missing")?;
                    blobs.verify(&req.artifact).map_err(|e| e.to_string())?;
                    let path = blobs.path(&req.artifact);
                    let t0 = std::time::Instant::now();
                    let (ev, checks) = evaluate_submission(&model, &path, test, &req.bounds, &req.integrity, req.max_seq_len, &device)?;
                    metrics::histogram!("tunenet_evaluation_seconds").record(t0.elapsed().as_secs_f64());
                    metrics::histogram!("tunenet_integrity_seconds").record(checks);
                    tracing::info!(competition = %req.comp, job_id = %req.job_id, miner = %req.miner, loss = ?ev.test_loss, secs = t0.elapsed().as_secs_f64(), check_secs = checks, "evaluated");
                    Ok(ev)
                })();
                let job = req.job_id.to_string();
                let input = ValidatorInput::Evaluated { job_id: req.job_id, miner: req.miner, result };
                if tx.blocking_send(Cmd::Input(job, input)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| NodeError::Other(format!("cannot start the evaluation thread: {e}")))?;
    Ok(etx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(jobs: u32, growth: f64) -> CompetitionConfig {
        let mut c: CompetitionConfig =
            toml::from_str("id = \"c\"\nbase_model = \"m\"\ndataset = \"d\"\n").unwrap();
        c.jobs = jobs;
        c.shard_growth = growth;
        c.test_fraction = 0.2;
        c
    }

    fn recs(n: usize) -> Vec<tunenet_ml::Record> {
        (0..n)
            .map(|i| tunenet_ml::Record::Text {
                text: format!("r{i}"),
            })
            .collect()
    }

    #[test]
    fn split_keeps_test_apart_and_shards_grow_by_schedule() {
        let (test, shards) = split(&cfg(3, 2.0), recs(100)).unwrap();
        assert_eq!(test.len(), 20);
        let sizes: Vec<usize> = shards.iter().map(|s| s.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 80);
        assert!(sizes[0] < sizes[1] && sizes[1] < sizes[2], "{sizes:?}");
        let test_texts: HashSet<String> = test.iter().map(|r| format!("{r:?}")).collect();
        assert!(
            shards
                .iter()
                .flatten()
                .all(|r| !test_texts.contains(&format!("{r:?}")))
        );
        let (_, equal) = split(&cfg(4, 1.0), recs(100)).unwrap();
        assert!(equal.iter().all(|s| s.len() == 20));
        assert!(
            split(&cfg(2, 1.0), vec![])
                .unwrap_err()
                .to_string()
                .contains("dataset")
        );
    }
}
