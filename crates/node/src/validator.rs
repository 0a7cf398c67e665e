//! The validator daemon: prepares each competition (base model and shards as blobs, the
//! hidden test split kept private), runs its engine, serves `ValidatorService`, evaluates
//! revealed artifacts on a worker thread and stores every change in sled.

use crate::config::{CompetitionConfig, ValidatorConfig};
use crate::error::NodeError;
use crate::models;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tunenet_engine::{
    CompetitionPlan, JobPlan, JobState, ValidatorEffect, ValidatorEngine, ValidatorError,
    ValidatorInput,
};
use tunenet_proto::v1;
use tunenet_rpc::{MinerClient, Status, UploadSink, ValidatorBackend};
use tunenet_store::{BlobStore, BlobWriter, Store, StoreExt, trees};
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
}

/// Options that the demo and tests set.
#[derive(Clone, Debug, Default)]
pub struct ValidatorOptions {
    /// Stop once every competition is finished (after printing the leaderboards).
    pub exit_when_done: bool,
}

enum Cmd {
    Commit(Commitment, oneshot::Sender<Result<Receipt, Status>>),
    CheckUpload(UploadHeader, oneshot::Sender<Result<u64, Status>>),
    Uploaded(UploadHeader, oneshot::Sender<Result<(), Status>>),
    Leaderboard(String, oneshot::Sender<Result<Leaderboard, Status>>),
    Input(usize, ValidatorInput),
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
    let per = train.len() / cfg.jobs as usize;
    let shards = (0..cfg.jobs as usize)
        .map(|j| {
            train[j * per..(j + 1) * per]
                .iter()
                .map(|&i| records[i].clone())
                .collect()
        })
        .collect();
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
            time_budget_ms: cfg.time_budget_secs * 1000,
            reward_hint: cfg.reward_hint,
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
    };
    let rec = CompetitionRecord {
        config: cfg.clone(),
        plan,
        base_model,
        test_blob,
        public_blobs,
    };
    store.put_json(trees::COMPETITIONS, &cfg.id, &rec)?;
    store.flush()?;
    Ok(rec)
}

struct Shared {
    tx: mpsc::Sender<Cmd>,
    blobs: BlobStore,
    public: RwLock<HashSet<BlobId>>,
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

    async fn end_upload(&self, _result: v1::UploadResult, h: UploadHeader) -> Result<(), Status> {
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
        Ok((size, file))
    }

    async fn leaderboard(&self, competition: String) -> Result<Leaderboard, Status> {
        self.ask(|tx| Cmd::Leaderboard(competition, tx)).await
    }
}

struct EvalRequest {
    comp: usize,
    job_id: JobId,
    miner: PeerIdStr,
    artifact: BlobId,
}

struct Comp {
    engine: ValidatorEngine,
    record: CompetitionRecord,
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
    if cfg.miners.is_empty() {
        tracing::warn!("no miners configured: add their gRPC endpoints to `miners` in the config");
    }
    let reply_to = cfg.reply_to();

    let mut comps = Vec::new();
    let mut public = HashSet::new();
    for cc in &cfg.competitions {
        let record = prepare(store.as_ref(), &blobs, cc, &reply_to)?;
        public.extend(record.public_blobs.iter().copied());
        let stored: Vec<JobState> = store
            .scan_json::<JobState>(trees::JOBS, &format!("{}/", cc.id))?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        let mut plan = record.plan.clone();
        plan.reply_to = reply_to.clone();
        let engine = ValidatorEngine::new(identity.clone(), plan, cfg.miners.clone(), stored);
        comps.push(Comp { engine, record });
    }

    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        blobs: blobs.clone(),
        public: RwLock::new(public),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tunenet_rpc::validator_server(shared.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    tracing::info!(peer = %identity.peer_id(), listen = %cfg.listen, competitions = comps.len(), "validator started");

    let evals = spawn_evaluator(&cfg, &comps, &blobs, device, tx.clone())?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let ctx = Ctx {
        store: store.clone(),
        tx: tx.clone(),
        evals,
        identity,
    };
    for (i, c) in comps.iter_mut().enumerate() {
        let fx = c.engine.resume();
        ctx.execute(i, &c.engine, fx);
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
            _ = tick.tick() => {
                let now = now_ms();
                for (i, c) in comps.iter_mut().enumerate() {
                    let fx = c.engine.handle(ValidatorInput::Tick, now, &mut rng);
                    ctx.execute(i, &c.engine, fx);
                }
            }
            Some(cmd) = rx.recv() => {
                let now = now_ms();
                match cmd {
                    Cmd::Input(i, input) => {
                        if let Some(c) = comps.get_mut(i) {
                            let fx = c.engine.handle(input, now, &mut rng);
                            ctx.execute(i, &c.engine, fx);
                        }
                    }
                    Cmd::Commit(commitment, reply) => {
                        let r = match find(&mut comps, &commitment.job_id) {
                            Some((i, c)) => c.engine.commit(commitment, now).map(|(receipt, fx)| {
                                ctx.execute(i, &c.engine, fx);
                                receipt
                            }).map_err(status_of),
                            None => Err(status_of(ValidatorError::UnknownJob(commitment.job_id))),
                        };
                        let _ = reply.send(r);
                    }
                    Cmd::CheckUpload(h, reply) => {
                        let r = match find(&mut comps, &h.job_id) {
                            Some((_, c)) => c.engine.check_upload(&h, now).map(|_| h.size).map_err(status_of),
                            None => Err(status_of(ValidatorError::UnknownJob(h.job_id.clone()))),
                        };
                        let _ = reply.send(r);
                    }
                    Cmd::Uploaded(h, reply) => {
                        let r = match find(&mut comps, &h.job_id) {
                            Some((i, c)) => c.engine.uploaded(&h, now).map(|fx| ctx.execute(i, &c.engine, fx)).map_err(status_of),
                            None => Err(status_of(ValidatorError::UnknownJob(h.job_id.clone()))),
                        };
                        let _ = reply.send(r);
                    }
                    Cmd::Leaderboard(id, reply) => {
                        let c = if id.is_empty() { comps.first() } else { comps.iter().find(|c| c.record.config.id == id) };
                        let _ = reply.send(c.map(|c| leaderboard_of(&c.engine)).ok_or_else(|| {
                            Status::not_found(format!("no competition `{id}` on this validator"))
                        }));
                    }
                }
            }
        }
        if !announced && !comps.is_empty() && comps.iter().all(|c| c.engine.is_finished()) {
            announced = true;
            for c in &comps {
                println!("{}", format_leaderboard(&leaderboard_of(&c.engine)));
            }
            if opts.exit_when_done {
                break;
            }
        }
    }
    store.flush()?;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

fn find<'a>(comps: &'a mut [Comp], job: &JobId) -> Option<(usize, &'a mut Comp)> {
    comps
        .iter_mut()
        .enumerate()
        .find(|(_, c)| c.engine.job(job).is_some())
}

struct Ctx {
    store: Arc<dyn Store>,
    tx: mpsc::Sender<Cmd>,
    evals: std::sync::mpsc::Sender<EvalRequest>,
    #[allow(dead_code)]
    identity: Identity,
}

impl Ctx {
    fn execute(&self, comp: usize, engine: &ValidatorEngine, fx: Vec<ValidatorEffect>) {
        let cid = engine.plan().id.clone();
        for e in fx {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let job_id = offer.job_id.clone();
                        let reply = async { MinerClient::connect(&addr).await?.offer(offer).await }
                            .await
                            .map_err(|e| e.to_string());
                        let _ = tx
                            .send(Cmd::Input(
                                comp,
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
                                comp,
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
                    let _ = self.evals.send(EvalRequest {
                        comp,
                        job_id,
                        miner,
                        artifact,
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
                        tracing::info!(%job_id, miner = %s.miner, loss = ?s.loss, quality = s.quality, penalty = ?s.penalty_reason, "scored");
                    }
                }
                ValidatorEffect::CompetitionFinished(id) => {
                    tracing::info!(competition = %id, "competition finished");
                }
                ValidatorEffect::Event(s) => tracing::info!(competition = %cid, "{s}"),
            }
        }
    }
}

/// Starts the evaluation worker: one thread, one evaluation at a time, off the runtime.
fn spawn_evaluator(
    cfg: &ValidatorConfig,
    comps: &[Comp],
    blobs: &BlobStore,
    device: tunenet_ml::Device,
    tx: mpsc::Sender<Cmd>,
) -> Result<std::sync::mpsc::Sender<EvalRequest>, NodeError> {
    struct EvalComp {
        model: PathBuf,
        test: Vec<tunenet_ml::Record>,
        max_seq_len: usize,
    }
    let mut ecs = Vec::new();
    let models_root = cfg.data_dir.join("models");
    for c in comps {
        // Evaluate against the validator's own copy of the base, rebuilt from its blobs.
        let manifest = tunenet_types::ModelManifest::parse(&blobs.get(&c.record.base_model)?)
            .map_err(|e| NodeError::Other(e.to_string()))?;
        let model = models::materialise(blobs, &c.record.base_model, &manifest, &models_root)?;
        let test = tunenet_ml::parse_jsonl(&blobs.get(&c.record.test_blob)?)?;
        ecs.push(EvalComp {
            model,
            test,
            max_seq_len: c.record.config.eval_max_seq_len,
        });
    }
    let blobs = blobs.clone();
    let (etx, erx) = std::sync::mpsc::channel::<EvalRequest>();
    std::thread::Builder::new()
        .name("tunenet-eval".into())
        .spawn(move || {
            let mut cache: BTreeMap<usize, tunenet_ml::ModelDir> = BTreeMap::new();
            while let Ok(req) = erx.recv() {
                let result = (|| -> Result<f64, String> {
                    let ec = ecs.get(req.comp).ok_or("unknown competition")?;
                    let model = match cache.get(&req.comp) {
                        Some(m) => m.clone(),
                        None => {
                            let m = tunenet_ml::ModelDir::open(&ec.model).map_err(|e| e.to_string())?;
                            cache.insert(req.comp, m.clone());
                            m
                        }
                    };
                    blobs.verify(&req.artifact).map_err(|e| e.to_string())?;
                    let path = blobs.path(&req.artifact);
                    let t0 = std::time::Instant::now();
                    let r = tunenet_ml::evaluate(&model, Some(&path), &ec.test, ec.max_seq_len, 8, &device)
                        .map_err(|e| e.to_string())?;
                    tracing::info!(job_id = %req.job_id, miner = %req.miner, loss = r.mean_loss, secs = t0.elapsed().as_secs_f64(), "evaluated");
                    Ok(r.mean_loss)
                })();
                let input = ValidatorInput::Evaluated { job_id: req.job_id, miner: req.miner, result };
                if tx.blocking_send(Cmd::Input(req.comp, input)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| NodeError::Other(format!("cannot start the evaluation thread: {e}")))?;
    Ok(etx)
}
