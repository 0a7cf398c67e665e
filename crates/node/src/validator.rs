//! The validator daemon: prepares each competition (base model and shards as blobs, the
//! hidden test split kept private), runs its engine, serves `ValidatorService`, evaluates
//! revealed artifacts on a worker thread and stores every change in sled.

use crate::config::{CompetitionConfig, ValidatorConfig};
use crate::error::NodeError;
use crate::transport::{Transport, ValidatorP2p, p2p_addr};
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
use tunenet_rpc::{Status, UploadSink, ValidatorBackend};
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
    /// The held-out control records (never served; None: the competition keeps none).
    #[serde(default)]
    pub control_blob: Option<BlobId>,
    /// Blobs miners may download.
    pub public_blobs: Vec<BlobId>,
    /// Where the competition stands.
    #[serde(default)]
    pub state: CompState,
    /// Each job's secret canaries by job id: where they sit in its released shard, and
    /// the never-released siblings. Empty for competitions prepared before canaries.
    #[serde(default)]
    pub canaries: BTreeMap<String, tunenet_integrity::JobCanaries>,
    /// The commit and file hashes of a base model or dataset named by hub id.
    #[serde(default)]
    pub pins: Vec<tunenet_hub::Pinned>,
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
        ValidatorError::TooLarge { .. } | ValidatorError::TooManyCommitments { .. } => {
            Status::resource_exhausted(msg)
        }
        ValidatorError::CommitMismatch(_) => Status::invalid_argument(msg),
        ValidatorError::TooLate { .. }
        | ValidatorError::TooEarly { .. }
        | ValidatorError::NoCommitment { .. }
        | ValidatorError::Closed(_)
        | ValidatorError::AlreadyUploaded { .. } => Status::failed_precondition(msg),
    }
}

/// A dataset split for a competition: the hidden records first, from `seed` alone, so
/// that what is hidden does not depend on anything drawn later (canaries).
#[derive(Debug)]
pub(crate) struct Split {
    /// The hidden test split.
    pub test: Vec<tunenet_ml::Record>,
    /// Held-out control records, drawn as the test split is and never released.
    pub control: Vec<tunenet_ml::Record>,
    /// The rest, to be shared out among the jobs (see [`shard`]).
    pub train: Vec<tunenet_ml::Record>,
}

/// Splits a dataset into the hidden test split, the held-out control records and the
/// training records.
pub(crate) fn split(
    cfg: &CompetitionConfig,
    records: Vec<tunenet_ml::Record>,
) -> Result<Split, NodeError> {
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
    let n_control = cfg.control_count(n_test);
    if records.len() < n_test + n_control + cfg.jobs as usize {
        return Err(fail(format!(
            "`dataset` has {} records: too few for a test split of {n_test}, {n_control} held-out control records (`control_records`) and {} job shards",
            records.len(),
            cfg.jobs
        )));
    }
    let take = |range: std::ops::Range<usize>| -> Vec<tunenet_ml::Record> {
        idx[range].iter().map(|&i| records[i].clone()).collect()
    };
    Ok(Split {
        test: take(0..n_test),
        control: take(n_test..n_test + n_control),
        train: take(n_test + n_control..idx.len()),
    })
}

/// Shares the training records out into one shard per job; each job's shard is
/// `shard_growth` times the last.
pub(crate) fn shard(
    cfg: &CompetitionConfig,
    train: &[tunenet_ml::Record],
) -> Result<Vec<Vec<tunenet_ml::Record>>, NodeError> {
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
            return Err(NodeError::Competition {
                competition: cfg.id.clone(),
                reason: format!(
                    "`shard_growth` {growth} leaves job {j} with no training records (the dataset has {} after the test split, control records and canaries)",
                    train.len()
                ),
            });
        }
        shards.push(train[start..end].to_vec());
        start = end;
    }
    Ok(shards)
}

/// Job `i` of a competition: its shard, and its budget by the competition's schedule.
pub(crate) fn job_plan(
    cfg: &CompetitionConfig,
    i: usize,
    (base_model, base_params, model_config): (BlobId, u64, &str),
    shard: BlobId,
    records: usize,
) -> Result<JobPlan, NodeError> {
    Ok(JobPlan {
        job_id: JobId::new(format!("{}-{i}", cfg.id)).map_err(|e| NodeError::Competition {
            competition: cfg.id.clone(),
            reason: e.to_string(),
        })?,
        base_model,
        base_params,
        train_shard: shard,
        shard_records: records as u64,
        time_budget_ms: (cfg.time_budget_secs + cfg.budget_step_secs * i as u64) * 1000,
        reward_hint: cfg.reward_hint,
        model_config: model_config.to_string(),
    })
}

/// A competition's rules from its spec.
pub(crate) fn competition_plan(
    cfg: &CompetitionConfig,
    id: CompetitionId,
    jobs: Vec<JobPlan>,
    reply_to: &str,
    max_artifact_bytes: u64,
    integrity: tunenet_types::IntegritySettings,
) -> CompetitionPlan {
    CompetitionPlan {
        id,
        jobs,
        miners_per_job: cfg.miners_per_job,
        concurrent_jobs: cfg.concurrent_jobs,
        hparams: cfg.hparams.clone(),
        scoring: cfg.scoring.clone(),
        reveal_window_ms: cfg.reveal_window_secs * 1000,
        offer_timeout_ms: cfg.offer_timeout_secs * 1000,
        max_artifact_bytes,
        reply_to: reply_to.to_string(),
        hardware: cfg.hardware.to_offer(),
        integrity,
        requires_synthetic: cfg.synthetic().is_some()
            && cfg.kind == tunenet_types::JobKind::FineTune,
    }
}

/// Prepares a competition, or loads the one prepared before under the same id.
pub fn prepare(
    store: &dyn Store,
    blobs: &BlobStore,
    cfg: &CompetitionConfig,
    reply_to: &str,
    devices: &[tunenet_ml::Device],
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
    // Hub ids are fetched and pinned here; the rest of preparation reads local files, and
    // the record keeps the spec as written plus the pins.
    let spec = cfg;
    let base = crate::sources::model(&spec.base_model, Some(store))
        .map_err(|e| fail(format!("`base_model`: {e}")))?;
    let data = crate::sources::dataset(&spec.dataset, spec.dataset_split.as_deref(), Some(store))
        .map_err(|e| fail(format!("`dataset`: {e}")))?;
    let pins: Vec<tunenet_hub::Pinned> = base.pin.iter().chain(&data.pin).cloned().collect();
    let mut local = spec.clone();
    local.base_model = base.paths[0].clone();
    if let [one] = data.paths.as_slice() {
        local.dataset = one.clone();
    }
    let cfg = &local;
    if cfg.kind == tunenet_types::JobKind::Inference {
        if data.paths.len() != 1 {
            return Err(fail(format!(
                "an inference competition reads one HellaSwag-layout file; the hub dataset has {} data files: name a split (`dataset_split`)",
                data.paths.len()
            )));
        }
        let mut rec = crate::inference::prepare(store, blobs, cfg, reply_to, devices)?;
        rec.config = spec.clone();
        rec.pins = pins;
        store.put_json(trees::COMPETITIONS, &spec.id, &rec)?;
        return Ok(rec);
    }
    let model = tunenet_ml::ModelDir::open(&cfg.base_model)
        .map_err(|e| fail(format!("`base_model`: {e}")))?;
    let params = model
        .config()
        .map_err(|e| fail(format!("`base_model`: {e}")))?
        .param_count();
    let records =
        load_dataset_logged(cfg, &data.paths).map_err(|e| fail(format!("`dataset`: {e}")))?;
    // The hidden records first: they depend on the dataset and the spec's seed alone.
    let Split {
        test,
        control,
        train: mut records,
    } = split(cfg, records)?;
    // Canary candidates, from a secret seed (not the config's, which others may read):
    // fresh records from the dataset's generator when one is named, otherwise real records
    // held out of the training records (at most 5 % of the dataset) — either way in the
    // dataset's own style.
    let secret: u64 = rand::random();
    let per_job = cfg.canaries_per_job + cfg.sibling_canaries;
    let wanted = per_job * cfg.jobs as usize;
    // A generator that can draw canaries with alternatives gets the exposure test.
    let variants = match cfg.synthetic() {
        Some("demo") if cfg.canary_alternatives > 0 => Some(tunenet_ml::demo_canaries(
            cfg.canaries_per_job * cfg.jobs as usize,
            cfg.canary_alternatives,
            secret,
        )),
        _ => None,
    };
    let candidates = match cfg.synthetic() {
        _ if variants.is_some() => Vec::new(),
        Some("demo") => tunenet_integrity::pick_candidates(
            &tunenet_ml::demo_dataset(wanted * 4 + 64, secret),
            &records,
            wanted,
            secret,
        ),
        _ => {
            let cap = (records.len() + test.len() + control.len()) / 20;
            tunenet_integrity::hold_out(&mut records, wanted.min(cap), secret)
        }
    };
    let mut shards = shard(cfg, &records)?;
    let mut canaries = BTreeMap::new();
    let share = candidates.len() / shards.len().max(1);
    let planted = (cfg.canaries_per_job * share)
        .checked_div(per_job)
        .unwrap_or(0);
    if let Some(variants) = &variants {
        for (i, (shard, vs)) in shards
            .iter_mut()
            .zip(variants.chunks(cfg.canaries_per_job.max(1)))
            .enumerate()
        {
            let seed = secret.wrapping_add(1 + i as u64);
            let (planted_shard, c) = tunenet_integrity::plant_with_alternatives(
                std::mem::take(shard),
                vs.to_vec(),
                cfg.canary_copies,
                cfg.repeated_decoys,
                seed,
            );
            *shard = planted_shard;
            canaries.insert(format!("{}-{i}", cfg.id), c);
        }
    }
    for (i, (shard, cands)) in shards
        .iter_mut()
        .zip(candidates.chunks(share.max(1)))
        .enumerate()
    {
        let seed = secret.wrapping_add(1 + i as u64);
        let (planted_shard, c) = tunenet_integrity::plant_repeated(
            std::mem::take(shard),
            cands.to_vec(),
            planted,
            cfg.canary_copies,
            cfg.repeated_decoys,
            seed,
        );
        *shard = planted_shard;
        canaries.insert(format!("{}-{i}", cfg.id), c);
    }
    let (base_model, manifest) = models::import_model_dir(blobs, &cfg.base_model)?;
    let model_config =
        std::fs::read_to_string(cfg.base_model.join("config.json")).unwrap_or_default();
    let test_blob = blobs.put(&tunenet_ml::to_jsonl(&test))?;
    let control_blob = if control.is_empty() {
        None
    } else {
        Some(blobs.put(&tunenet_ml::to_jsonl(&control))?)
    };
    let mut public_blobs = vec![base_model];
    public_blobs.extend(manifest.files.iter().map(|f| f.blob));
    let comp = CompetitionId::new(cfg.id.clone()).map_err(|e| fail(e.to_string()))?;
    let mut jobs = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let shard_blob = blobs.put(&tunenet_ml::to_jsonl(shard))?;
        public_blobs.push(shard_blob);
        jobs.push(job_plan(
            cfg,
            i,
            (base_model, params, &model_config),
            shard_blob,
            shard.len(),
        )?);
    }
    let plan = competition_plan(
        cfg,
        comp,
        jobs,
        reply_to,
        cfg.max_artifact_mb * 1024 * 1024,
        tunenet_types::IntegritySettings {
            // Only a generator of the dataset's own process draws records as the test
            // split was; a rewritten set needs the cohort calibration.
            synthetic_alike: !matches!(cfg.synthetic(), Some("rewrite" | "neighbours")),
            synthetic_paired: cfg.synthetic() == Some("neighbours"),
            ..cfg.integrity.clone()
        },
    );
    let rec = CompetitionRecord {
        config: spec.clone(),
        plan,
        base_model,
        test_blob,
        control_blob,
        public_blobs,
        state: CompState::Running,
        canaries,
        pins,
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
    /// Where evaluations and inference references run (one device, or a split).
    pub(crate) eval_devices: Vec<tunenet_ml::Device>,
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

/// The sink an upload's bytes go into: `writer`, kept only if they hash to the header's
/// artifact id.
pub(crate) fn upload_sink(writer: BlobWriter, header: UploadHeader) -> Box<dyn UploadSink> {
    Box::new(Sink { writer, header })
}

/// A blob store error as a gRPC status: a full disk is the validator's passing trouble
/// (the miner retries), not the upload's fault.
fn blob_status(e: tunenet_store::BlobError) -> Status {
    match &e {
        tunenet_store::BlobError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        tunenet_store::BlobError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull =>
        {
            Status::unavailable(format!(
                "the validator's disk is full, nothing of this upload was kept ({e}); retry"
            ))
        }
        _ => Status::internal(e.to_string()),
    }
}

impl UploadSink for Sink {
    fn write(&mut self, data: &[u8]) -> Result<(), Status> {
        self.writer.write_chunk(data).map_err(blob_status)
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
            Err(e) => Err(blob_status(e)),
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
        let writer = self.blobs.writer(Some(limit)).map_err(blob_status)?;
        Ok(upload_sink(writer, h))
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

#[tonic::async_trait]
impl crate::transport::RevealSink for Shared {
    async fn commit(&self, c: Commitment) -> Result<Receipt, Status> {
        self.ask(|tx| Cmd::Commit(c, tx)).await
    }

    async fn check_reveal(&self, h: &UploadHeader) -> Result<u64, Status> {
        let h = h.clone();
        self.ask(|tx| Cmd::CheckUpload(h, tx)).await
    }

    async fn revealed(&self, h: UploadHeader) -> Result<(), Status> {
        self.ask(|tx| Cmd::Uploaded(h, tx)).await
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
    /// The held-out control records.
    control: Option<BlobId>,
    max_seq_len: usize,
    /// The job's released shard (canaries planted).
    shard: Option<BlobId>,
    /// The job's canaries.
    canaries: tunenet_integrity::JobCanaries,
    /// The miner's assignment nonce (None if the engine has no slot for it).
    nonce: Option<[u8; 32]>,
    /// The synthetic set to make.
    synthetic: Option<Synthetic>,
}

/// How to make a job's synthetic set.
#[derive(Clone, Debug)]
pub struct Synthetic {
    /// `rewrite`, `neighbours` or `demo` (see `CompetitionConfig::synthetic_generator`).
    pub generator: String,
    /// Drawn at the job's deadline.
    pub seed: u64,
    /// How many records (0: as many as the test split).
    pub records: usize,
    /// The model that rewrites (None: the base model).
    pub model: Option<PathBuf>,
    /// Share of each answer's scored words a neighbour replaces.
    pub neighbour_rate: f64,
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
    let mut lb = leaderboard(&engine.plan().id, &scores, done as u32, jobs.len() as u32);
    if engine.inference().is_some() {
        lb.kind = tunenet_types::JobKind::Inference;
    }
    lb
}

/// A figure to four decimals, or `-` where there is none.
fn num(x: Option<f64>) -> String {
    x.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into())
}

/// Prints a leaderboard as a table.
pub fn format_leaderboard(lb: &Leaderboard) -> String {
    let inference = lb.kind == tunenet_types::JobKind::Inference;
    let mut s = format!(
        "leaderboard `{}` ({} of {} jobs scored)\n{:>4}  {:<54} {:>4} {:>10} {:>9} {:>9}{}  verdicts\n",
        lb.competition_id,
        lb.jobs_done,
        lb.jobs_total,
        "rank",
        "miner",
        "jobs",
        if inference { "items/s" } else { "loss" },
        "quality",
        "standing",
        if inference {
            format!(" {:>9} {:>9}", "seconds", "acc_norm")
        } else {
            String::new()
        }
    );
    for r in &lb.rows {
        // An inference job's scored loss is ln(seconds per item): its exp(-loss) is speed.
        let figure = if inference {
            r.mean_loss.map(|l| (-l).exp())
        } else {
            r.mean_loss
        };
        s.push_str(&format!(
            "{:>4}  {:<54} {:>4} {:>10} {:>9.4} {:>9.4}{}  {}\n",
            r.rank,
            r.miner,
            r.jobs,
            num(figure),
            r.mean_quality,
            r.standing,
            if inference {
                format!(" {:>9} {:>9}", num(r.seconds), num(r.acc_norm))
            } else {
                String::new()
            },
            if r.verdicts.is_empty() {
                "all passed".to_string()
            } else {
                r.verdicts.join(", ")
            }
        ));
        // With other validators' attestations: how many agree, and who does not.
        if let Some(q) = r.quorum.as_ref().filter(|q| q.validators > 1) {
            s.push_str(&format!(
                "      validators: {} of {} agree; median standing {:.4}\n",
                q.agreeing, q.validators, q.median_standing
            ));
            for o in &q.outliers {
                s.push_str(&format!(
                    "      outlier: validator {} gives standing {:.4}, loss {} over {} jobs\n",
                    o.validator,
                    o.standing,
                    num(o.mean_loss),
                    o.jobs
                ));
            }
        }
    }
    s
}

/// Two leaderboards of the same competition side by side, row by miner in the proposed
/// order: the rank now and under the proposed formula, how far it moved, and the standing
/// and mean scored loss under each.
pub fn format_replay(now: &Leaderboard, proposed: &Leaderboard) -> String {
    let mut s = format!(
        "{:<54} {:>8} {:>8} {:>6} {:>12} {:>12} {:>10} {:>10}\n",
        "miner",
        "rank now",
        "proposed",
        "moved",
        "standing now",
        "proposed",
        "loss now",
        "proposed"
    );
    let mut moved = 0;
    for p in &proposed.rows {
        let n = now.rows.iter().find(|r| r.miner == p.miner);
        let shift = match n {
            Some(n) if n.rank > p.rank => format!("+{}", n.rank - p.rank),
            Some(n) if n.rank < p.rank => format!("-{}", p.rank - n.rank),
            Some(_) => "=".into(),
            None => "new".into(),
        };
        if shift != "=" {
            moved += 1;
        }
        s.push_str(&format!(
            "{:<54} {:>8} {:>8} {:>6} {:>12.4} {:>12.4} {:>10} {:>10}\n",
            p.miner,
            n.map(|n| n.rank.to_string()).unwrap_or_else(|| "-".into()),
            p.rank,
            shift,
            n.map_or(0.0, |n| n.standing),
            p.standing,
            num(n.and_then(|n| n.mean_loss)),
            num(p.mean_loss),
        ));
    }
    s.push_str(&format!(
        "{moved} of {} miners would change rank\n",
        proposed.rows.len()
    ));
    s
}

/// The validator loop's state: every competition, the stores, and the ways out.
pub(crate) struct Validator {
    pub(crate) comps: Vec<Comp>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) identity: Identity,
    config_miners: Vec<String>,
    /// Miners found by their p2p adverts (`p2p:<peer id>`).
    discovered: std::collections::BTreeSet<String>,
    pub(crate) transport: Transport,
    tx: mpsc::Sender<Cmd>,
    evals: std::sync::mpsc::Sender<EvalRequest>,
    inference_evals: std::sync::mpsc::Sender<crate::inference::EvalRequest>,
    rng: rand::rngs::StdRng,
    /// Other validators' artifact records, and how long scoring waits for them.
    pub(crate) artifact_gossip: crate::artifact_gossip::ArtifactGossip,
    /// The miner list the hardware checker benchmarks.
    hardware_miners: Option<tokio::sync::watch::Sender<Vec<String>>>,
    /// How far from the median of all validators' standings a validator's may be and agree.
    pub(crate) quorum_tolerance: f64,
    /// Jobs (competition index, id) to store at the next tick.
    unsaved: std::sync::Mutex<std::collections::BTreeSet<(usize, JobId)>>,
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
        let miners = self.miners_meeting(&record.config.hardware);
        let mut engine = ValidatorEngine::new(self.identity.clone(), plan, miners, stored);
        engine.set_banned(registry::banned(self.store.as_ref()));
        engine.set_paused(!matches!(record.state, CompState::Running));
        engine.set_min_miners(record.config.min_miners as usize);
        engine.set_settle_grace(self.artifact_gossip.grace_ms());
        crate::artifact_gossip::attach_all(self.store.as_ref(), &mut engine);
        if record.config.kind == tunenet_types::JobKind::Inference {
            engine.set_inference(Some(tunenet_types::InferenceTerms {
                accuracy_tolerance: record.config.inference.acc_norm_drop,
                allow_quantized: record.config.inference.allow_quantized,
            }));
        }
        let fx = engine.resume(now_ms());
        if !engine.is_finished()
            && let Ok(mut p) = self.shared.public.write()
        {
            // Hidden records another, finished competition published stay unserved while
            // this one runs (the console refuses to create such a competition; a config
            // file may still name one).
            for b in [Some(record.test_blob), record.control_blob]
                .into_iter()
                .flatten()
            {
                if p.remove(&b) {
                    tracing::warn!(competition = %record.config.id, blob = %b, "this competition's hidden records were published when an earlier competition finished: miners may hold them; give it another seed");
                }
            }
        }
        self.publish(&record);
        self.comps.push(Comp { engine, record });
        let i = self.comps.len() - 1;
        // A record that could not be stored stays queued for the next save.
        let _ = self.execute(i, fx);
    }

    /// Config miners, registered unbanned miners with an endpoint, and miners found by
    /// their p2p adverts (bans by miner id are the engine's to apply).
    fn miners(&self) -> Vec<String> {
        let mut m = self.config_miners.clone();
        for r in registry::list(self.store.as_ref()).unwrap_or_default() {
            if !r.banned && !r.endpoint.is_empty() && !m.contains(&r.endpoint) {
                m.push(r.endpoint);
            }
        }
        for d in &self.discovered {
            if !m.contains(d) {
                m.push(d.clone());
            }
        }
        m
    }

    /// The known miners whose verified hardware meets `req` (all of them when it is empty).
    fn miners_meeting(&self, req: &crate::hardware::HardwareRequirement) -> Vec<String> {
        let all = self.miners();
        if req.is_empty() {
            return all;
        }
        let records = crate::hardware::records(self.store.as_ref());
        crate::hardware::eligibility(req, &all, &records)
            .into_iter()
            .filter(|e| e.offered)
            .map(|e| e.addr)
            .collect()
    }

    /// Why each known miner is or is not offered competition `i`'s jobs.
    pub(crate) fn eligibility(&self, i: usize) -> Vec<crate::hardware::Eligibility> {
        let records = crate::hardware::records(self.store.as_ref());
        crate::hardware::eligibility(
            &self.comps[i].record.config.hardware,
            &self.miners(),
            &records,
        )
    }

    /// A miner's advert arrived over p2p: new jobs are offered to it too.
    fn discover(&mut self, addr: String) {
        if self.discovered.insert(addr.clone()) {
            tracing::info!(miner = %addr, "found a miner by its advert");
            self.refresh_miners();
        }
    }

    /// Serves the competition's public blobs over p2p and announces it.
    fn publish(&self, record: &CompetitionRecord) {
        let Some(client) = self.transport.p2p().cloned() else {
            return;
        };
        let blobs = record.public_blobs.clone();
        // Each blob is served at once and its announcement started, not awaited: one
        // announcement waits on every peer the record goes to, a miner whose link is dark
        // for the DHT query's whole timeout, and the blobs behind it (the training shards)
        // were refused as "not provided here" meanwhile (every miner's shard fetch waited
        // 10-20 s while one miner was cut off). Miners ask this validator by name.
        tokio::spawn(async move {
            for id in blobs {
                if let Err(e) = client.serve(id).await {
                    tracing::warn!(blob = %id, error = %e, "could not provide a competition blob over p2p");
                }
            }
        });
        self.announce(record);
    }

    /// Gossips a signed announcement of the competition (peers that join later hear the
    /// next one: `announce_all` runs on the advert heartbeat).
    fn announce(&self, record: &CompetitionRecord) {
        let Some(client) = self.transport.p2p().cloned() else {
            return;
        };
        let announcement = tunenet_p2p::CompetitionAnnouncement {
            competition_id: record.config.id.clone(),
            kind: tunenet_proto::v1::JobKind::FineTune as i32,
            base_model: record.base_model.0.to_vec(),
            base_params: record.plan.jobs.first().map(|j| j.base_params).unwrap_or(0),
            jobs: record.plan.jobs.len() as u64,
            time_budget_ms: record
                .plan
                .jobs
                .first()
                .map(|j| j.time_budget_ms)
                .unwrap_or(0),
            reward_hint: record.config.reward_hint,
            description: format!(
                "fine-tuning competition `{}` ({})",
                record.config.id, record.state
            ),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = client.announce_competition(announcement).await {
                tracing::debug!(error = %e, "competition announcement not delivered (no peers yet)");
            }
        });
    }

    /// Re-announces every competition still taking part.
    fn announce_all(&self) {
        for (i, c) in self.comps.iter().enumerate() {
            if !c.engine.is_finished() && c.record.state != CompState::Archived {
                self.announce(&c.record);
            }
            // Standings again, for validators that joined since the last scored job.
            if c.record.state != CompState::Archived {
                crate::quorum::publish(self, i);
            }
        }
    }

    /// Pushes the miner list and bans to every engine (after a registry change).
    pub(crate) fn refresh_miners(&mut self) {
        let miners = self.miners();
        if let Some(tx) = &self.hardware_miners {
            tx.send_replace(miners.clone());
        }
        let banned = registry::banned(self.store.as_ref());
        let lists: Vec<Vec<String>> = self
            .comps
            .iter()
            .map(|c| self.miners_meeting(&c.record.config.hardware))
            .collect();
        for (c, m) in self.comps.iter_mut().zip(lists) {
            c.engine.set_miners(m);
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
        // A record that could not be stored stays queued for the next save.
        let _ = self.execute(i, fx);
        Ok(next)
    }

    fn tick(&mut self) {
        let now = now_ms();
        for i in 0..self.comps.len() {
            let fx = self.comps[i]
                .engine
                .handle(ValidatorInput::Tick, now, &mut self.rng);
            // A record that could not be stored stays queued for the next save.
            let _ = self.execute(i, fx);
        }
        self.save_unsaved();
    }

    fn lock_unsaved(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(usize, JobId)>> {
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the jobs whose state changed since the last tick in ways a restart can redo
    /// (see [`ValidatorEffect::PersistSoon`]): each once, however many offers it answered.
    pub(crate) fn save_unsaved(&self) {
        let due = std::mem::take(&mut *self.lock_unsaved());
        for (i, job_id) in due {
            let Some(c) = self.comps.get(i) else { continue };
            let Some(job) = c.engine.job(&job_id) else {
                continue;
            };
            let key = format!("{}/{}", c.engine.plan().id, job_id);
            if let Err(e) = self.store.put_json(trees::JOBS, &key, job) {
                tracing::error!(%job_id, error = %e, "could not store job state");
            }
        }
    }

    fn index_of_job(&self, job: &JobId) -> Option<usize> {
        self.comps.iter().position(|c| c.engine.job(job).is_some())
    }

    /// Carries out the engine's effects. Err: a job record could not be made durable (a
    /// full disk): the job stays queued for the next save, and a caller answering a miner
    /// must not promise anything on it.
    fn execute(&self, comp: usize, fx: Vec<ValidatorEffect>) -> Result<(), String> {
        let Some(c) = self.comps.get(comp) else {
            return Ok(());
        };
        let cid = c.engine.plan().id.clone();
        let mut persisted = false;
        let mut unstored = None;
        for e in fx {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    metrics::counter!("tunenet_jobs_offered_total").increment(1);
                    let (tx, transport) = (self.tx.clone(), self.transport.clone());
                    tokio::spawn(async move {
                        let job_id = offer.job_id.clone();
                        let reply = transport
                            .offer(&addr, offer)
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
                    let (tx, transport) = (self.tx.clone(), self.transport.clone());
                    tokio::spawn(async move {
                        let job_id = assignment.job_id.clone();
                        let miner = assignment.miner.clone();
                        // A miner whose link drops for a while still gets its assignment:
                        // tries again until the deadline (a miner takes the same
                        // assignment twice as once).
                        let left = assignment
                            .deadline_ms
                            .saturating_sub(tunenet_types::time::now_ms());
                        let result = crate::transport::retrying(
                            "assignment",
                            &job_id,
                            std::time::Duration::from_millis(left),
                            || {
                                let (addr, assignment) = (addr.clone(), assignment.clone());
                                let transport = transport.clone();
                                async move { transport.assign(&addr, assignment).await }
                            },
                        )
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
                } if c.engine.inference().is_some() => {
                    metrics::counter!("tunenet_submissions_total").increment(1);
                    self.check_inference(c, job_id, miner, artifact);
                }
                ValidatorEffect::Evaluate {
                    job_id,
                    miner,
                    artifact,
                } => {
                    metrics::counter!("tunenet_submissions_total").increment(1);
                    let job = c.engine.job(&job_id);
                    if c.engine.plan().requires_synthetic
                        && job.is_none_or(|j| j.synthetic_seed.is_none())
                    {
                        // Fail closed: never evaluate a job's submissions without the
                        // synthetic set (the engine draws its seed before any reveal).
                        let input = ValidatorInput::Evaluated {
                            job_id: job_id.clone(),
                            miner,
                            result: Err("the job's synthetic set was not drawn before evaluation; not scored without it".into()),
                        };
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(Cmd::Input(cid_key(&job_id), input)).await;
                        });
                        continue;
                    }
                    let nonce = job
                        .and_then(|j| j.slots.get(&miner))
                        .map(|s| s.assignment.nonce);
                    let synthetic = c
                        .record
                        .config
                        .synthetic()
                        .zip(job.and_then(|j| j.synthetic_seed))
                        .map(|(g, seed)| Synthetic {
                            generator: g.to_string(),
                            seed,
                            records: c.record.config.synthetic_records,
                            model: c.record.config.synthetic_model.clone(),
                            neighbour_rate: c.record.config.neighbour_rate,
                        });
                    let _ = self.evals.send(EvalRequest {
                        bounds: c.engine.plan().hparams.clone(),
                        integrity: c.engine.plan().integrity.clone(),
                        comp: cid.to_string(),
                        canaries: c
                            .record
                            .canaries
                            .get(job_id.as_str())
                            .cloned()
                            .unwrap_or_default(),
                        shard: job.map(|j| j.plan.train_shard),
                        job_id,
                        miner,
                        artifact,
                        model: c.record.base_model,
                        test: c.record.test_blob,
                        control: c.record.control_blob,
                        max_seq_len: c.record.config.eval_max_seq_len,
                        nonce,
                        synthetic,
                    });
                }
                ValidatorEffect::Persist(job) => {
                    let key = format!("{}/{}", cid, job.plan.job_id);
                    if let Err(e) = self.store.put_json(trees::JOBS, &key, &job) {
                        tracing::error!(job_id = %job.plan.job_id, error = %e, "could not store job state");
                        self.lock_unsaved().insert((comp, job.plan.job_id.clone()));
                        unstored = Some(e.to_string());
                    } else {
                        self.lock_unsaved().remove(&(comp, job.plan.job_id.clone()));
                    }
                    persisted = true;
                }
                ValidatorEffect::PersistSoon(job_id) => {
                    self.lock_unsaved().insert((comp, job_id));
                }
                ValidatorEffect::JobFinished { job_id, scores } => {
                    let key = format!("{cid}/{job_id}");
                    if let Err(e) = self.store.put_json(trees::SCORES, &key, &scores) {
                        tracing::error!(%job_id, error = %e, "could not store scores");
                    }
                    // A signed receipt per revealed submission: what it was scored on and
                    // how, for its miner to check once the hidden sets are published.
                    let c = &self.comps[comp];
                    if let Some(job) = c.engine.job(&job_id) {
                        let signed =
                            crate::receipts::sign_job(&self.identity, &c.record, job, now_ms());
                        if let Err(e) = crate::receipts::store(self.store.as_ref(), &signed) {
                            tracing::error!(%job_id, error = %e, "could not store evaluation receipts");
                        }
                    }
                    crate::quorum::publish(self, comp);
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
                    if let Err(e) =
                        crate::receipts::mark_finished(self.store.as_ref(), cid.as_str(), now_ms())
                    {
                        tracing::error!(competition = %cid, error = %e, "could not store when the competition finished");
                    }
                    let n = self.publish_hidden_sets(comp);
                    if n > 0 {
                        self.emit(
                            &cid,
                            "",
                            format!("{n} hidden sets published (test split, synthetic sets): miners can check their receipts with `tunenet verify-receipt`"),
                        );
                    }
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
        // A receipt, an accepted upload or an assignment is a promise to a miner: make the
        // record behind it durable before the answer leaves (sled otherwise writes every
        // 200 ms, and a crash in between forgets a commitment the miner holds a receipt for).
        if persisted && let Err(e) = self.store.flush() {
            tracing::error!(competition = %cid, error = %e, "could not flush job state");
            unstored.get_or_insert(e.to_string());
        }
        unstored.map_or(Ok(()), Err)
    }

    /// Once competition `comp` is finished, its test split and its jobs' synthetic sets
    /// are served to anyone, so that miners can recompute their receipts; a blob another
    /// competition still running holds hidden (the same split) stays private. Returns how
    /// many blobs were published.
    fn publish_hidden_sets(&self, comp: usize) -> usize {
        let c = &self.comps[comp];
        if !c.engine.is_finished() {
            return 0;
        }
        let still_hidden: HashSet<BlobId> = self
            .comps
            .iter()
            .filter(|o| !o.engine.is_finished())
            .flat_map(|o| {
                [Some(o.record.test_blob), o.record.control_blob]
                    .into_iter()
                    .flatten()
                    .chain(o.engine.jobs().filter_map(|j| j.synthetic_set))
            })
            .collect();
        let sets: Vec<BlobId> = std::iter::once(c.record.test_blob)
            .chain(c.engine.jobs().filter_map(|j| j.synthetic_set))
            .filter(|b| !still_hidden.contains(b))
            .collect();
        let published: Vec<BlobId> = match self.shared.public.write() {
            Ok(mut p) => sets.into_iter().filter(|b| p.insert(*b)).collect(),
            Err(_) => vec![],
        };
        // Over libp2p too, for miners that reach this validator only there.
        if let Some(client) = self.transport.p2p().cloned() {
            let ids = published.clone();
            tokio::spawn(async move {
                for id in ids {
                    if let Err(e) = client.serve(id).await {
                        tracing::warn!(blob = %id, error = %e, "could not serve a published set over p2p");
                    }
                }
            });
        }
        published.len()
    }

    /// Makes `job`'s record durable now if an earlier save of it failed (see
    /// [`Validator::execute`]), before a miner is answered about it again.
    fn durable(&self, comp: usize, job: &JobId) -> Result<(), String> {
        if !self.lock_unsaved().contains(&(comp, job.clone())) {
            return Ok(());
        }
        let c = &self.comps[comp];
        let Some(state) = c.engine.job(job) else {
            return Ok(());
        };
        let key = format!("{}/{}", c.engine.plan().id, job);
        self.store
            .put_json(trees::JOBS, &key, state)
            .and_then(|()| self.store.flush())
            .map_err(|e| e.to_string())?;
        self.lock_unsaved().remove(&(comp, job.clone()));
        Ok(())
    }

    /// Queues an inference submission's checks, timed by this validator's own clock: from
    /// the assignment's dispatch to the receipt of the commitment to the results.
    fn check_inference(&self, c: &Comp, job_id: JobId, miner: PeerIdStr, artifact: BlobId) {
        let Some(job) = c.engine.job(&job_id) else {
            return;
        };
        let Some(slot) = job.slots.get(&miner) else {
            return;
        };
        let dispatched = slot
            .assignment
            .deadline_ms
            .saturating_sub(job.plan.time_budget_ms);
        let committed = slot
            .receipt
            .as_ref()
            .map(|r| r.received_at_ms)
            .unwrap_or(slot.assignment.deadline_ms);
        let _ = self.inference_evals.send(crate::inference::EvalRequest {
            comp: c.id().to_string(),
            measured_secs: committed.saturating_sub(dispatched) as f64 / 1000.0,
            shard: job.plan.train_shard,
            reference: c.record.test_blob,
            // Drawn now, after the results arrived: no miner can know which items are checked.
            sample_seed: rand::random(),
            tolerance: c.record.config.inference.clone(),
            job_id,
            miner,
            artifact,
        });
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
                    let evaluated = match &input {
                        ValidatorInput::Evaluated { job_id, miner, .. } => {
                            Some((job_id.clone(), miner.clone()))
                        }
                        _ => None,
                    };
                    let fx = self.comps[i].engine.handle(input, now, &mut self.rng);
                    if let Some((job_id, miner)) = evaluated {
                        // Other validators learn of the artifact before this job is scored.
                        crate::artifact_gossip::publish(
                            self.transport.p2p(),
                            &self.comps[i].engine,
                            &job_id,
                            &miner,
                        );
                    }
                    // A record that could not be stored stays queued for the next save.
                    let _ = self.execute(i, fx);
                }
            }
            Cmd::Commit(commitment, reply) => {
                let job = commitment.job_id.clone();
                let r = match self.index_of_job(&commitment.job_id) {
                    Some(i) => match self.comps[i].engine.commit(commitment, now) {
                        Ok((receipt, fx)) => self
                            .execute(i, fx)
                            .and_then(|()| self.durable(i, &job))
                            .map(|()| receipt)
                            .map_err(|e| not_stored("commitment", &e)),
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
                    Some(i) => match self.comps[i].engine.uploaded(&h, now, &mut self.rng) {
                        Ok(fx) => {
                            crate::artifact_gossip::attach(
                                self.store.as_ref(),
                                &mut self.comps[i].engine,
                                &h.artifact,
                            );
                            self.execute(i, fx)
                                .and_then(|()| self.durable(i, &h.job_id))
                                .map_err(|e| not_stored("upload", &e))
                        }
                        Err(e) => Err(status_of(e)),
                    },
                    None => Err(status_of(ValidatorError::UnknownJob(h.job_id.clone()))),
                };
                let _ = reply.send(r);
            }
            Cmd::Leaderboard(id, reply) => {
                let i = if id.is_empty() {
                    (!self.comps.is_empty()).then_some(0)
                } else {
                    self.comps.iter().position(|c| c.id() == id)
                };
                let _ = reply.send(
                    i.map(|i| crate::quorum::leaderboard(self, i, false))
                        .ok_or_else(|| {
                            Status::not_found(format!("no competition `{id}` on this validator"))
                        }),
                );
            }
        }
    }
}

/// The answer to a miner when the record behind it could not be stored: retry later (the
/// validator keeps the state in memory and stores it as soon as it can).
fn not_stored(what: &str, why: &str) -> Status {
    Status::unavailable(format!(
        "the validator took the {what} but could not store it durably ({why}); retry"
    ))
}

/// Inputs are routed by job id, which names its competition uniquely.
fn cid_key(job: &JobId) -> String {
    job.to_string()
}

/// Creates the data dir's first admin token if there is none; returns it (shown once).
pub fn init(cfg: &ValidatorConfig) -> Result<Option<String>, NodeError> {
    crate::base::create_private_dir(&cfg.data_dir)?;
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

/// The competition's dataset through its field mapping; records that fit nothing are
/// counted and the first of them logged with their line or row.
fn load_dataset_logged(
    cfg: &CompetitionConfig,
    paths: &[PathBuf],
) -> Result<Vec<tunenet_ml::Record>, NodeError> {
    let d = crate::sources::load_records(paths, &cfg.fields)?;
    if d.bad_count > 0 {
        tracing::warn!(
            competition = %cfg.id,
            format = d.format,
            skipped = d.bad_count,
            kept = d.records.len(),
            first = ?d.bad.iter().take(5).map(|b| format!("{} {}: {}", d.unit(), b.at, b.problem)).collect::<Vec<_>>(),
            "dataset records that fit no field were skipped"
        );
    }
    Ok(d.records)
}

/// Runs a validator until it is stopped (or, with `exit_when_done`, until its
/// competitions finish).
pub async fn run(cfg: ValidatorConfig, opts: ValidatorOptions) -> Result<(), NodeError> {
    if !(cfg.quorum_tolerance.is_finite() && cfg.quorum_tolerance > 0.0) {
        return Err(NodeError::Other(format!(
            "`quorum_tolerance` must be a number above 0 (a share of the median standing, e.g. 0.1), got {}",
            cfg.quorum_tolerance
        )));
    }
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
        cfg.metrics_listen.as_ref(),
    )
    .await?;
    let reply_to = cfg.reply_to();
    // Evaluations (and inference references) run whole on `device`, or split over
    // `eval_devices`.
    let eval_devices = match cfg.eval_devices.as_slice() {
        [] => vec![device],
        names => {
            crate::devices::parse_device_list(names, "eval_devices").map_err(NodeError::Other)?
        }
    };
    if eval_devices.len() > 1 {
        tracing::info!(devices = ?cfg.eval_devices, "evaluations are split over several devices");
    }
    // Config competitions are prepared first so a bad spec stops the daemon before it serves.
    let mut records = Vec::new();
    for cc in &cfg.competitions {
        records.push(prepare(
            store.as_ref(),
            &blobs,
            cc,
            &reply_to,
            &eval_devices,
        )?);
    }
    // Competitions created from the console live only in the store.
    for (id, rec) in store.scan_json::<CompetitionRecord>(trees::COMPETITIONS, "")? {
        if !cfg.competitions.iter().any(|c| c.id == id) {
            records.push(rec);
        }
    }
    if cfg.miners.is_empty()
        && registry::list(store.as_ref())?.is_empty()
        && !(cfg.p2p.is_some() && cfg.discover_miners)
    {
        tracing::warn!(
            "no miners configured: add their endpoints to `miners`, register them from the console, or add a [p2p] section to find them by their adverts"
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
        eval_devices: eval_devices.clone(),
    });
    if let Some(web) = &cfg.web {
        crate::web::serve(web, shared.clone())?;
    }
    let mut builder = crate::limits::with_tls(
        cfg.limits.builder(),
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
    )?;
    // One request budget per address across both services.
    let buckets = crate::limits::request_buckets(&cfg.limits);
    let server = crate::base::Server::spawn(
        builder
            .add_service(crate::limits::rate_limited(
                tunenet_rpc::validator_server(shared.clone()),
                &buckets,
            ))
            .add_service(crate::limits::rate_limited(
                crate::console::server(shared.clone(), &cfg.limits),
                &buckets,
            )),
        listener,
        &cfg.limits,
    );
    tracing::info!(peer = %identity.peer_id(), listen = %cfg.listen, competitions = records.len(), "validator started");

    let p2p = match &cfg.p2p {
        Some(p) => {
            let (adverts, discover) = (tx.clone(), cfg.discover_miners);
            let on_advert = Box::new(
                move |peer: tunenet_p2p::PeerId, ad: &tunenet_p2p::MinerAdvert| {
                    let fine_tunes = ad
                        .job_kinds
                        .contains(&(tunenet_proto::v1::JobKind::FineTune as i32));
                    if !discover || !fine_tunes {
                        return;
                    }
                    let addr = p2p_addr(&peer);
                    let _ = adverts.try_send(Cmd::Run(Box::new(move |v: &mut Validator| {
                        v.discover(addr)
                    })));
                },
            );
            let on_record = crate::artifact_gossip::on_record(tx.clone());
            let on_attestation = crate::quorum::on_attestation(tx.clone());
            let sink = shared.clone();
            let client =
                crate::presence::join(&identity, p.clone(), blobs.clone(), None, move |client| {
                    Arc::new(ValidatorP2p {
                        sink,
                        client,
                        on_advert,
                        on_record,
                        on_attestation,
                    })
                })
                .await?;
            Some(client)
        }
        None => None,
    };
    cfg.hardware
        .validate()
        .map_err(|e| NodeError::Other(e.to_string()))?;
    let evals = spawn_evaluator(&cfg, &blobs, eval_devices.clone(), tx.clone())?;
    let done = tx.clone();
    let inference_evals =
        crate::inference::spawn_evaluator(blobs.clone(), move |job_id, miner, result| {
            let job = job_id.to_string();
            let input = ValidatorInput::Evaluated {
                job_id,
                miner,
                result,
            };
            done.blocking_send(Cmd::Input(job, input)).is_ok()
        })?;
    let mut v = Validator {
        comps: Vec::new(),
        store: store.clone(),
        shared: shared.clone(),
        identity,
        config_miners: cfg.miners.clone(),
        discovered: Default::default(),
        transport: Transport::new(p2p),
        tx: tx.clone(),
        evals,
        inference_evals,
        rng: rand::rngs::StdRng::from_os_rng(),
        artifact_gossip: crate::artifact_gossip::ArtifactGossip::load(
            store.as_ref(),
            cfg.artifact_record_grace_ms(),
        )
        .trust(&cfg.trusted_validators),
        hardware_miners: None,
        quorum_tolerance: cfg.quorum_tolerance,
        unsaved: Default::default(),
    };
    for r in records {
        v.add(r);
    }
    let (hw_tx, hw_rx) = tokio::sync::watch::channel(v.miners());
    let refresh = tx.clone();
    crate::hardware::spawn_checker(
        v.transport.clone(),
        v.identity.clone(),
        store.clone(),
        cfg.hardware.clone(),
        hw_rx,
        move || {
            // A new verified record can make a miner eligible for (or drop it from) a
            // competition with a hardware requirement.
            let _ = refresh.try_send(Cmd::Run(Box::new(|v: &mut Validator| v.refresh_miners())));
        },
    );
    v.hardware_miners = Some(hw_tx);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let heartbeat_secs = cfg
        .p2p
        .as_ref()
        .map(|p| p.advert_interval_secs.max(1))
        .unwrap_or(3600);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(heartbeat_secs));
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
            _ = heartbeat.tick() => v.announce_all(),
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
    v.save_unsaved();
    store.flush()?;
    server.stop().await;
    Ok(())
}

/// What one job's submissions are evaluated on, kept across its cohort.
#[derive(Clone, Debug, Default)]
pub struct JobSets {
    /// The hidden test split.
    pub test: Vec<tunenet_ml::Record>,
    /// The synthetic set generated after the deadline, when the competition has a generator.
    pub synthetic: Option<Vec<tunenet_ml::Record>>,
    /// The held-out control records (empty: none).
    pub control: Vec<tunenet_ml::Record>,
    /// The released shard, canaries planted (empty: no "trained on this job's data" tests).
    pub shard: Vec<tunenet_ml::Record>,
    /// Where the canaries sit in the shard, and their never-released siblings.
    pub canaries: tunenet_integrity::JobCanaries,
    /// The base model's per-record losses, computed once per record and job: key `k` is
    /// shard record `k`, or sibling `k − shard.len()`.
    pub base_losses: std::collections::HashMap<usize, Option<f64>>,
    /// The base model's per-record losses on the scored sets (test, synthetic, control),
    /// computed once per job for the leakage test's screen of its references.
    pub base_scored: Option<tunenet_engine::BaseRecords>,
}

impl JobSets {
    /// A probe record by key: shard record `k`, then the siblings, then every canary's
    /// alternatives in group order.
    fn probe_record(&self, key: usize) -> Option<&tunenet_ml::Record> {
        let Some(k) = key.checked_sub(self.shard.len()) else {
            return self.shard.get(key);
        };
        let Some(mut k) = k.checked_sub(self.canaries.siblings.len()) else {
            return self.canaries.siblings.get(k);
        };
        for alts in &self.canaries.alternatives {
            if k < alts.len() {
                return alts.get(k);
            }
            k -= alts.len();
        }
        None
    }

    /// Keys of canary group `g`'s alternatives.
    fn alternative_keys(&self, g: usize) -> std::ops::Range<usize> {
        let start = self.shard.len()
            + self.canaries.siblings.len()
            + self.canaries.alternatives[..g]
                .iter()
                .map(Vec::len)
                .sum::<usize>();
        start..start + self.canaries.alternatives[g].len()
    }
}

/// Longest rewritten response, in tokens.
const REWRITE_MAX_TOKENS: usize = 96;

/// The synthetic set of a job: `records` (0: as many as the test split) drawn from the
/// demo generator, or rewritten from the test split by `base` (or the configured
/// stronger model) with the seed drawn at the deadline, on `device`; or the test split's
/// neighbours, one per test record in its order.
pub fn synthetic_set(
    s: &Synthetic,
    test: &[tunenet_ml::Record],
    base: &tunenet_ml::ModelDir,
    device: &tunenet_ml::Device,
    max_seq_len: usize,
) -> Result<Vec<tunenet_ml::Record>, String> {
    let n = if s.records == 0 {
        test.len()
    } else {
        s.records
    }
    .max(1);
    match s.generator.as_str() {
        "demo" => Ok(tunenet_ml::demo_dataset(n, s.seed)),
        "rewrite" | "neighbours" => {
            let dir = match &s.model {
                Some(p) => {
                    tunenet_ml::ModelDir::open(p).map_err(|e| format!("`synthetic_model`: {e}"))?
                }
                None => base.clone(),
            };
            let lm = tunenet_ml::CausalLm::load(&dir, None, tunenet_ml::WeightDtype::Auto, device)
                .map_err(|e| format!("loading the model that rewrites the synthetic set: {e}"))?;
            if s.generator == "neighbours" {
                return tunenet_ml::neighbour_set(&lm, test, s.seed, s.neighbour_rate, max_seq_len)
                    .map_err(|e| format!("making the test records' neighbours: {e}"));
            }
            let sampling = tunenet_ml::SamplingConfig {
                max_tokens: REWRITE_MAX_TOKENS.min(max_seq_len.max(8) / 2),
                ..Default::default()
            };
            let set = tunenet_ml::rewrite_set(&lm, test, s.seed, &sampling, n)
                .map_err(|e| format!("rewriting the synthetic set: {e}"))?;
            if set.is_empty() {
                return Err("the rewritten synthetic set came out empty (every generation was empty or looped)".into());
            }
            Ok(set)
        }
        other => Err(format!(
            "the synthetic generator `{other}` is unknown: the job cannot be scored without its synthetic set"
        )),
    }
}

/// Whose submission it is: what ties it to its assignment.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    /// The assignment's secret nonce.
    pub nonce: &'a [u8; 32],
    /// The job.
    pub job: &'a JobId,
    /// The miner.
    pub miner: &'a PeerIdStr,
}

/// Checks an artifact's integrity and, if it passes, scores it: per-record losses (one
/// load of base + artifact) on the hidden test split, the job's synthetic set, and the
/// records the "trained on this job's data" tests need (this miner's assigned canaries,
/// the siblings, samples of its assigned and unassigned records; base-model losses for
/// those are computed once per job and kept in `sets`). Returns the evaluation and the
/// seconds the checks took: the artifact checks, base losses computed now, and the share of
/// the scoring pass spent on check records (by their share of the tokens).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_submission(
    model: &tunenet_ml::ModelDir,
    artifact: &std::path::Path,
    sets: &mut JobSets,
    binding: Option<Binding<'_>>,
    bounds: &tunenet_types::HparamBounds,
    integrity: &tunenet_types::IntegritySettings,
    max_seq_len: usize,
    devices: &[tunenet_ml::Device],
) -> Result<(Evaluation, f64), String> {
    let t0 = std::time::Instant::now();
    let (mut verdicts, sketch) = if integrity.enabled {
        let report = tunenet_integrity::check_artifact(model, artifact, bounds, integrity)
            .map_err(|e| e.to_string())?;
        if report.failed() {
            let secs = t0.elapsed().as_secs_f64();
            return Ok((
                Evaluation {
                    verdicts: report.verdicts,
                    ..Default::default()
                },
                secs,
            ));
        }
        (report.verdicts, report.sketch)
    } else {
        (vec![], vec![])
    };
    let mut checks = t0.elapsed().as_secs_f64();
    // The probe: shard/sibling/alternative keys in four groups. With alternatives, the
    // first group is each assigned canary followed by its alternatives (see `exposure`).
    let exposure = !sets.canaries.alternatives.is_empty();
    let probe = match binding {
        Some(b) if integrity.enabled && !sets.shard.is_empty() => {
            let p = tunenet_integrity::miner_probe(
                b.nonce,
                b.job,
                b.miner,
                sets.shard.len(),
                &sets.canaries,
                integrity.subset_sample,
            );
            let n = sets.shard.len();
            let (canaries, siblings) = if exposure {
                let groups = sets.canaries.canary_groups();
                let mut keys = Vec::new();
                for pos in p.assigned_canaries {
                    if let Some(g) = groups.iter().position(|g| g.contains(&pos))
                        && g < sets.canaries.alternatives.len()
                    {
                        keys.push(pos);
                        keys.extend(sets.alternative_keys(g));
                    }
                }
                (keys, Vec::new())
            } else {
                (
                    p.assigned_canaries,
                    (n..n + sets.canaries.siblings.len()).collect(),
                )
            };
            Some([canaries, siblings, p.assigned, p.unassigned])
        }
        _ => None,
    };
    let keys: Vec<usize> = probe.iter().flatten().flatten().copied().collect();
    let missing: Vec<usize> = keys
        .iter()
        .copied()
        .filter(|k| !sets.base_losses.contains_key(k))
        .collect();
    if !missing.is_empty() {
        let tb = std::time::Instant::now();
        let recs: Vec<tunenet_ml::Record> = missing
            .iter()
            .filter_map(|k| sets.probe_record(*k).cloned())
            .collect();
        let base = tunenet_ml::record_losses_on(model, None, &recs, max_seq_len, 8, devices)
            .map_err(|e| e.to_string())?;
        for (k, l) in missing.iter().zip(base.losses) {
            sets.base_losses.insert(*k, l);
        }
        checks += tb.elapsed().as_secs_f64();
    }
    let mut records: Vec<tunenet_ml::Record> = sets.test.clone();
    let n_test = records.len();
    if let Some(syn) = &sets.synthetic {
        records.extend(syn.iter().cloned());
    }
    let n_synthetic = records.len();
    records.extend(sets.control.iter().cloned());
    let n_scored = records.len();
    records.extend(keys.iter().filter_map(|k| sets.probe_record(*k).cloned()));
    let r = tunenet_ml::record_losses_on(model, Some(artifact), &records, max_seq_len, 8, devices)
        .map_err(|e| e.to_string())?;
    // The base model on the test records and the sets they are compared with, once per
    // job (again if a set changed): the leakage test screens its references against it,
    // the one model sure never to have seen the test split. Only a set drawn as the test
    // split was makes that comparison fair: a synthetic set drawn alike, and control
    // records always; the base is not scored on neighbours or rewrites.
    let alike = integrity.synthetic_alike && n_synthetic > n_test;
    let n_control = n_scored - n_synthetic;
    let measured = |b: &tunenet_engine::BaseRecords| {
        b.test.len() == n_test
            && b.synthetic.len() == if alike { n_synthetic - n_test } else { 0 }
            && b.control.len() == n_control
    };
    if integrity.enabled
        && (alike || n_control > 0)
        && !sets.base_scored.as_ref().is_some_and(measured)
    {
        let tb = std::time::Instant::now();
        let scored: Vec<tunenet_ml::Record> = records[..n_test]
            .iter()
            .chain(if alike {
                &records[n_test..n_synthetic]
            } else {
                &[]
            })
            .chain(&records[n_synthetic..n_scored])
            .cloned()
            .collect();
        let base = tunenet_ml::record_losses_on(model, None, &scored, max_seq_len, 8, devices)
            .map_err(|e| e.to_string())?;
        let part = |range: std::ops::Range<usize>| {
            base.losses
                .get(range)
                .map(<[_]>::to_vec)
                .unwrap_or_default()
        };
        let n_alike = if alike { n_synthetic - n_test } else { 0 };
        sets.base_scored = Some(tunenet_engine::BaseRecords {
            test: part(0..n_test),
            synthetic: part(n_test..n_test + n_alike),
            control: part(n_test + n_alike..scored.len()),
        });
        checks += tb.elapsed().as_secs_f64();
    }
    let test_loss = r.mean_over(0..n_test).ok_or_else(|| {
        format!("no scorable tokens among the {n_test} test records: every record is empty or its response was truncated away")
    })?;
    let synthetic_loss = r.mean_over(n_test..n_synthetic);
    // The control records and the probe records are there for the checks: their share of
    // the scoring pass, by tokens, is the checks' time.
    let all: u64 = r.tokens.iter().sum();
    let check_tokens: u64 = r.tokens[n_synthetic..].iter().sum();
    checks += r.seconds * check_tokens as f64 / all.max(1) as f64;
    if let Some(groups) = probe {
        // Gain (base − tuned) per record: mean per token, or summed over the record's
        // tokens (the exposure test compares records that differ only in their secret).
        let gain = |k: &usize, i: usize, summed: bool| -> Option<f64> {
            match (sets.base_losses.get(k), r.losses.get(i)) {
                (Some(Some(b)), Some(Some(m))) => {
                    let t = if summed { r.tokens[i] as f64 } else { 1.0 };
                    Some((b - m) * t)
                }
                _ => None,
            }
        };
        let mut at = n_scored;
        let mut improvements: Vec<Vec<f64>> = Vec::with_capacity(4);
        let mut exposure_groups: Vec<Vec<f64>> = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            if gi == 0 && exposure {
                // A shard key starts a canary's group; alternatives' keys follow it.
                let mut cur: Vec<f64> = Vec::new();
                for (k, i) in g.iter().zip(at..) {
                    if *k < sets.shard.len() && !cur.is_empty() {
                        exposure_groups.push(std::mem::take(&mut cur));
                    }
                    cur.push(gain(k, i, true).unwrap_or(f64::NAN));
                }
                if !cur.is_empty() {
                    exposure_groups.push(cur);
                }
                improvements.push(Vec::new());
            } else {
                let v = g
                    .iter()
                    .zip(at..)
                    .filter_map(|(k, i)| gain(k, i, false))
                    .collect();
                improvements.push(v);
            }
            at += g.len();
        }
        if exposure {
            verdicts.push(tunenet_integrity::exposure_verdict(
                &exposure_groups,
                integrity,
            ));
            verdicts.push(tunenet_integrity::subset_verdict(
                &improvements[2],
                &improvements[3],
                integrity,
            ));
        } else {
            verdicts.extend(tunenet_integrity::trained_verdicts(
                &improvements[0],
                &improvements[1],
                &improvements[2],
                &improvements[3],
                integrity,
            ));
        }
    }
    Ok((
        Evaluation {
            test_loss: Some(test_loss),
            synthetic_loss,
            verdicts,
            sketch,
            test_records: r
                .losses
                .get(..n_test)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            synthetic_records: r
                .losses
                .get(n_test..n_synthetic)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            control_records: r
                .losses
                .get(n_synthetic..n_scored)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            base_records: sets.base_scored.clone(),
            synthetic_set: None,
        },
        checks,
    ))
}

/// Starts the evaluation worker: one thread, one evaluation at a time, off the runtime.
/// Each request names its base model and test split by blob; both are loaded once.
fn spawn_evaluator(
    cfg: &ValidatorConfig,
    blobs: &BlobStore,
    devices: Vec<tunenet_ml::Device>,
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
            // Per job: its sets and the base losses found so far (at most 8 jobs kept).
            let mut jobs: BTreeMap<JobId, (Option<u64>, JobSets)> = BTreeMap::new();
            // Per job: its synthetic set's blob, stored once made (receipts name it).
            let mut synthetic_blobs: BTreeMap<JobId, BlobId> = BTreeMap::new();
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
                    if let Some(b) = req.control
                        && let std::collections::btree_map::Entry::Vacant(slot) = tests.entry(b)
                    {
                        let bytes = blobs.get(&b).map_err(|e| e.to_string())?;
                        slot.insert(tunenet_ml::parse_jsonl(&bytes).map_err(|e| e.to_string())?);
                    }
                    let test = tests.get(&req.test).ok_or("test split missing")?;
                    let control = match req.control {
                        Some(b) => tests.get(&b).ok_or("control records missing")?.clone(),
                        None => Vec::new(),
                    };
                    // The synthetic set is generated after the deadline, from the seed the
                    // engine drew when the deadline passed; a job's sets are kept for its
                    // cohort only while they were made from that same seed.
                    let seed = req.synthetic.as_ref().map(|s| s.seed);
                    if jobs.get(&req.job_id).is_some_and(|(s, _)| *s != seed) {
                        jobs.remove(&req.job_id);
                    }
                    if !jobs.contains_key(&req.job_id) {
                        synthetic_blobs.remove(&req.job_id);
                        let synthetic = match &req.synthetic {
                            Some(s) => {
                                let t0 = std::time::Instant::now();
                                let set = synthetic_set(s, test, &model, &devices[0], req.max_seq_len)?;
                                // Stored, so that a receipt can name it and it can be
                                // published when the competition ends.
                                match blobs.put(&tunenet_ml::to_jsonl(&set)) {
                                    Ok(id) => {
                                        synthetic_blobs.insert(req.job_id.clone(), id);
                                    }
                                    Err(e) => tracing::warn!(job_id = %req.job_id, error = %e, "could not store the synthetic set"),
                                }
                                tracing::info!(competition = %req.comp, job_id = %req.job_id, generator = %s.generator, records = set.len(), secs = t0.elapsed().as_secs_f64(), "synthetic set made");
                                Some(set)
                            }
                            None => None,
                        };
                        let shard = match req.shard {
                            Some(b) => tunenet_ml::parse_jsonl(&blobs.get(&b).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
                            None => vec![],
                        };
                        while let Some((old, _)) = (jobs.len() >= 8).then(|| jobs.pop_first()).flatten() {
                            if old != req.job_id {
                                synthetic_blobs.remove(&old);
                            }
                        }
                        jobs.insert(req.job_id.clone(), (seed, JobSets {
                            test: test.clone(),
                            synthetic,
                            control,
                            shard,
                            canaries: req.canaries.clone(),
                            base_losses: Default::default(),
                            base_scored: None,
                        }));
                    }
                    let sets = &mut jobs.get_mut(&req.job_id).ok_or("job sets missing")?.1;
                    blobs.verify(&req.artifact).map_err(|e| e.to_string())?;
                    let path = blobs.path(&req.artifact);
                    let t0 = std::time::Instant::now();
                    let binding = req.nonce.as_ref().map(|nonce| Binding { nonce, job: &req.job_id, miner: &req.miner });
                    let (mut ev, checks) = evaluate_submission(&model, &path, sets, binding, &req.bounds, &req.integrity, req.max_seq_len, &devices)?;
                    if sets.synthetic.is_some() {
                        ev.synthetic_set = synthetic_blobs.get(&req.job_id).copied();
                    }
                    metrics::histogram!("tunenet_evaluation_seconds").record(t0.elapsed().as_secs_f64());
                    metrics::histogram!("tunenet_integrity_seconds").record(checks);
                    tracing::info!(competition = %req.comp, job_id = %req.job_id, miner = %req.miner, loss = ?ev.test_loss, synthetic_loss = ?ev.synthetic_loss, secs = t0.elapsed().as_secs_f64(), check_secs = checks, "evaluated");
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
        let c = cfg(3, 2.0);
        let Split {
            test,
            control,
            train,
        } = split(&c, recs(100)).unwrap();
        let shards = shard(&c, &train).unwrap();
        assert_eq!(test.len(), 20);
        assert_eq!(control.len(), 20, "as many as the test split by default");
        let sizes: Vec<usize> = shards.iter().map(|s| s.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 60);
        assert!(sizes[0] < sizes[1] && sizes[1] < sizes[2], "{sizes:?}");
        let hidden: HashSet<String> = test
            .iter()
            .chain(&control)
            .map(|r| format!("{r:?}"))
            .collect();
        assert_eq!(hidden.len(), 40, "test and control records are distinct");
        assert!(
            shards
                .iter()
                .flatten()
                .all(|r| !hidden.contains(&format!("{r:?}")))
        );
        let mut no_control = cfg(4, 1.0);
        no_control.control_records = Some(0);
        let equal = split(&no_control, recs(100)).unwrap();
        assert!(equal.control.is_empty());
        let shards = shard(&no_control, &equal.train).unwrap();
        assert!(shards.iter().all(|s| s.len() == 20));
        // The hidden records follow the seed alone.
        assert_eq!(split(&no_control, recs(100)).unwrap().test, equal.test);
        let mut greedy = cfg(2, 1.0);
        greedy.control_records = Some(90);
        let err = split(&greedy, recs(100)).unwrap_err().to_string();
        assert!(err.contains("control_records"), "{err}");
        assert!(
            split(&cfg(2, 1.0), vec![])
                .unwrap_err()
                .to_string()
                .contains("dataset")
        );
    }
}
