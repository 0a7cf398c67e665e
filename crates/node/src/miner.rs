//! The miner daemon: serves `MinerService`, decides on offers by its policy, fetches the
//! assigned model and shard by blake3, trains on a worker thread within the deadline,
//! commits, and reveals after the deadline. Status stays answerable while it trains.

use crate::config::{MinerConfig, TrainingConfig};
use crate::error::NodeError;
use crate::models;
use crate::transport::{MinerP2p, Transport, retrying};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tunenet_engine::{MinerEffect, MinerEngine, MinerInput, MinerJob};
use tunenet_proto::v1;
use tunenet_rpc::{MinerBackend, Status};
use tunenet_store::{BlobStore, Store, StoreExt, trees};
use tunenet_types::{
    Assignment, BlobId, DecisionReply, HparamBounds, Offer, PeerIdStr, UnixMillis, time::now_ms,
};

/// Largest model manifest accepted.
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest single model file accepted.
const MAX_MODEL_FILE: u64 = 200 << 30;
/// Largest training shard accepted.
const MAX_SHARD: u64 = 8 << 30;

enum Cmd {
    Offer(Offer, oneshot::Sender<Result<DecisionReply, Status>>),
    Assign(Assignment, oneshot::Sender<Result<(), Status>>),
    Status(oneshot::Sender<Result<v1::MinerStatus, Status>>),
    Input(MinerInput),
}

struct Shared {
    tx: mpsc::Sender<Cmd>,
    bench: Arc<crate::hardware::MinerBench>,
    /// The engine's refusals, decided here without a trip through the main loop (which
    /// renews it after every change): a flood of offers the miner cannot take costs the
    /// loop nothing.
    gate: std::sync::RwLock<tunenet_engine::OfferGate>,
    /// Offers refused since the last summary line.
    rejected: std::sync::Mutex<RejectedOffers>,
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
            .map_err(|_| Status::unavailable("miner is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("miner is shutting down"))?
    }
}

#[tonic::async_trait]
impl MinerBackend for Shared {
    async fn offer(&self, offer: Offer) -> Result<DecisionReply, Status> {
        // The offer's hardware requirement, against what this box has.
        let fits = crate::hardware::HardwareRequirement::from_offer(&offer.hardware)
            .and_then(|req| req.check_inventory(&self.bench.inventory()));
        if let Err(detail) = fits {
            return Ok(DecisionReply::unsigned(
                offer.job_id,
                self.bench.peer_id(),
                tunenet_types::Decision::Reject(tunenet_types::RejectReason {
                    code: tunenet_types::RejectCode::Hardware,
                    detail,
                }),
            ));
        }
        let refusal = self.gate.read().ok().and_then(|g| g.refusal(&offer));
        if let Some(tunenet_types::Decision::Reject(r)) = refusal {
            metrics::counter!("tunenet_offers_rejected_total", "reason" => format!("{:?}", r.code))
                .increment(1);
            tracing::debug!(job_id = %offer.job_id, reason = %r, "offer rejected");
            if let Ok(mut counted) = self.rejected.lock() {
                counted.count(r.code);
            }
            return Ok(DecisionReply::unsigned(
                offer.job_id,
                self.bench.peer_id(),
                tunenet_types::Decision::Reject(r),
            ));
        }
        self.ask(|tx| Cmd::Offer(offer, tx)).await
    }
    async fn assign(&self, a: Assignment) -> Result<(), Status> {
        self.ask(|tx| Cmd::Assign(a, tx)).await
    }
    async fn status(&self) -> Result<v1::MinerStatus, Status> {
        let mut s = self.ask(Cmd::Status).await?;
        s.hardware = Some(crate::hardware::inventory_pb(&self.bench.inventory()));
        s.price_per_gpu_hour = self.bench.price_per_gpu_hour();
        Ok(s)
    }
    async fn benchmark(
        &self,
        c: v1::BenchmarkChallenge,
    ) -> Result<v1::BenchmarkCommitment, Status> {
        self.bench.challenge(c).await
    }
    async fn benchmark_open(&self, r: v1::BenchmarkReveal) -> Result<v1::BenchmarkOpening, Status> {
        self.bench.open(r).await
    }
}

/// Offers turned down since the last summary line, by reason.
#[derive(Default)]
struct RejectedOffers {
    by_code: BTreeMap<String, u64>,
    since: Option<Instant>,
}

impl RejectedOffers {
    /// How often the summary is written, at most.
    const EVERY: Duration = Duration::from_secs(60);

    fn count(&mut self, code: tunenet_types::RejectCode) {
        *self.by_code.entry(format!("{code:?}")).or_default() += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// Logs one line for the offers refused over the last minute, if any.
    fn maybe_log(&mut self) {
        let Some(since) = self.since else { return };
        if since.elapsed() < Self::EVERY {
            return;
        }
        let total: u64 = self.by_code.values().sum();
        let by: Vec<String> = self
            .by_code
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        tracing::info!(
            "rejected {total} offers in the last {} s ({})",
            since.elapsed().as_secs(),
            by.join(", ")
        );
        self.by_code.clear();
        self.since = None;
    }
}

/// The training settings for one job: the operator's, clamped to the job's bounds.
pub fn train_config(t: &TrainingConfig, b: &HparamBounds) -> tunenet_ml::TrainConfig {
    let method = if t.method == "full" && b.allow_full {
        tunenet_ml::Method::Full
    } else {
        tunenet_ml::Method::Lora {
            rank: t.lora_rank.clamp(1, (b.max_lora_rank as usize).max(1)),
            alpha: t.lora_alpha,
        }
    };
    tunenet_ml::TrainConfig {
        method,
        learning_rate: t.learning_rate.clamp(
            b.min_learning_rate,
            b.max_learning_rate.max(b.min_learning_rate),
        ),
        max_steps: t.max_steps.max(1),
        batch_size: t.batch_size.max(1),
        max_seq_len: t.max_seq_len.clamp(8, (b.max_seq_len as usize).max(8)),
        seed: t.seed,
        weight_decay: 0.0,
        ..Default::default()
    }
}

struct Ctx {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    transport: Transport,
    inference: crate::inference::InferenceConfig,
    tx: mpsc::Sender<Cmd>,
    training: TrainingConfig,
    devices: Arc<crate::devices::DevicePool>,
    /// Most slots a job takes (data-parallel beyond 1).
    devices_per_job: usize,
    /// `devices_per_job = "auto"`: a training job takes what its budget needs.
    auto_devices: bool,
    /// Per base model: what its last training run showed.
    throughput:
        Arc<std::sync::Mutex<std::collections::HashMap<BlobId, crate::devices::Throughput>>>,
    work: PathBuf,
    models: PathBuf,
}

impl Ctx {
    fn execute(&self, fx: Vec<MinerEffect>) {
        for e in fx {
            match e {
                MinerEffect::Train {
                    assignment,
                    deadline_ms,
                    reply_to,
                    inference: None,
                } => self.spawn_training(assignment, deadline_ms, reply_to),
                MinerEffect::Train {
                    assignment,
                    deadline_ms,
                    reply_to,
                    inference: Some(terms),
                } => self.spawn_inference(assignment, deadline_ms, reply_to, terms),
                MinerEffect::SendCommit {
                    reply_to,
                    commitment,
                } => {
                    let (tx, transport) = (self.tx.clone(), self.transport.clone());
                    tokio::spawn(async move {
                        let job_id = commitment.job_id.clone();
                        let result = retrying("commit", &job_id, RETRY_FOR, || {
                            let (reply_to, commitment) = (reply_to.clone(), commitment.clone());
                            let transport = transport.clone();
                            async move { transport.commit(&reply_to, commitment).await }
                        })
                        .await
                        .map_err(|e| e.to_string());
                        let _ = tx
                            .send(Cmd::Input(MinerInput::CommitAnswered { job_id, result }))
                            .await;
                    });
                }
                MinerEffect::Upload { reply_to, header } => {
                    let (tx, transport) = (self.tx.clone(), self.transport.clone());
                    let blobs = self.blobs.clone();
                    tokio::spawn(async move {
                        let job_id = header.job_id.clone();
                        let result = retrying("upload", &job_id, RETRY_FOR, || {
                            let (reply_to, header) = (reply_to.clone(), header.clone());
                            let (transport, blobs) = (transport.clone(), blobs.clone());
                            async move { transport.reveal(&reply_to, header, &blobs).await }
                        })
                        .await
                        .map_err(|e| e.to_string());
                        let _ = tx
                            .send(Cmd::Input(MinerInput::UploadAnswered { job_id, result }))
                            .await;
                    });
                }
                MinerEffect::Persist(job) => {
                    // Durable before any answer leaves: an acceptance or an assignment the
                    // miner forgot in a crash would cost it the job.
                    if let Err(e) = self
                        .store
                        .put_json(trees::MINER_JOBS, job.offer.job_id.as_str(), &job)
                        .and_then(|()| self.store.flush())
                    {
                        tracing::error!(job_id = %job.offer.job_id, error = %e, "could not store job");
                    }
                }
                MinerEffect::Event(s) => tracing::info!("{s}"),
            }
        }
    }

    /// Fetches the assignment's model (by manifest) into the blob store and a model dir.
    async fn fetch_model(
        transport: &Transport,
        blobs: &BlobStore,
        reply_to: &str,
        model: BlobId,
        models_root: &std::path::Path,
    ) -> Result<(PathBuf, u64), NodeError> {
        let manifest_size = transport
            .fetch_blob(blobs, reply_to, model, MAX_MANIFEST)
            .await?;
        let manifest = tunenet_types::ModelManifest::parse(&blobs.get(&model)?)
            .map_err(|e| NodeError::Other(e.to_string()))?;
        for f in &manifest.files {
            transport
                .fetch_blob(blobs, reply_to, f.blob, f.size.min(MAX_MODEL_FILE))
                .await?;
        }
        let dir = models::materialise(blobs, &model, &manifest, models_root)?;
        Ok((dir, manifest.total_size() + manifest_size))
    }

    /// Runs an inference job: scores the assigned shard with the job's model (quantised
    /// where the terms allow and the config asks) and stores the results as the artifact.
    /// `deadline_ms` is the job's deadline on this miner's clock (the assignment's is on
    /// the validator's).
    fn spawn_inference(
        &self,
        a: Assignment,
        deadline_ms: UnixMillis,
        reply_to: String,
        terms: tunenet_types::InferenceTerms,
    ) {
        let started = Instant::now();
        let (tx, blobs, transport) = (self.tx.clone(), self.blobs.clone(), self.transport.clone());
        let (cfg, pool) = (self.inference.clone(), self.devices.clone());
        let (work, models_root) = (self.work.join(a.job_id.as_str()), self.models.clone());
        let per_job = self.devices_per_job;
        let margin_ms = (self.training.commit_margin_secs.max(0.0) * 1000.0) as u64;
        tokio::spawn(async move {
            let job_id = a.job_id.clone();
            let result = async {
                // A group of devices splits the dense model over them (tensor parallelism).
                let group = pool.place_group(&job_id, None, per_job).map_err(NodeError::Other)?;
                let slots: Vec<String> = group.iter().map(|g| g.0.clone()).collect();
                let devices: Vec<tunenet_ml::Device> = group.into_iter().map(|g| g.1).collect();
                tracing::info!(job_id = %job_id, device = %slots.join("+"), "inference job placed");
                let (model_dir, bytes) =
                    Self::fetch_model(&transport, &blobs, &reply_to, a.base_model, &models_root).await?;
                transport.fetch_blob(&blobs, &reply_to, a.train_shard, MAX_SHARD).await?;
                let items = crate::inference::parse_items(&blobs.get(&a.train_shard)?)?;
                tracing::info!(job_id = %a.job_id, model_bytes = bytes, items = items.len(), "fetched model and inference shard");
                let (progress_tx, job) = (tx.clone(), a.job_id.clone());
                let submission = if !cfg.command.is_empty() {
                    // The miner's own inference program.
                    let output = work.join("output");
                    let _ = std::fs::remove_dir_all(&output);
                    std::fs::create_dir_all(&output)
                        .map_err(|e| NodeError::Other(format!("cannot create {}: {e}", output.display())))?;
                    let items_path = work.join("items.jsonl");
                    std::fs::write(&items_path, blobs.get(&a.train_shard)?)
                        .map_err(|e| NodeError::Other(format!("cannot write {}: {e}", items_path.display())))?;
                    let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                    let file = crate::inference::InferenceJobFile {
                        version: 1,
                        kind: "inference",
                        job_id: a.job_id.to_string(),
                        model: abs(&model_dir),
                        items: abs(&items_path),
                        item_count: items.len(),
                        output_dir: abs(&output),
                        deadline_unix_ms: deadline_ms,
                        stop_by_unix_ms: deadline_ms.saturating_sub(margin_ms),
                        devices: slots.clone(),
                        allow_quantized: terms.allow_quantized,
                    };
                    crate::inference::run_external(&cfg.command, &file, &a.job_id, &work, &items, started).await?
                } else {
                tokio::task::spawn_blocking(move || {
                    let scorer = crate::inference::scoring_model(&model_dir, terms.allow_quantized, &cfg, &work, &devices)?;
                    let mut last = Instant::now();
                    crate::inference::run(scorer.as_ref(), &items, cfg.batch_tokens, started, &mut |done, total| {
                        if last.elapsed() >= Duration::from_millis(500) || done == total {
                            last = Instant::now();
                            let _ = progress_tx.try_send(Cmd::Input(MinerInput::Progress {
                                job_id: job.clone(),
                                step: done as u64,
                                loss: 0.0,
                            }));
                        }
                    })
                })
                .await
                .map_err(|e| NodeError::Other(format!("inference thread: {e}")))??
                };
                let bytes = serde_json::to_vec(&submission)
                    .map_err(|e| NodeError::Other(format!("cannot encode results: {e}")))?;
                let id = blobs.put(&bytes)?;
                tracing::info!(job_id = %a.job_id, items = submission.scores.len(), acc_norm = submission.acc_norm, secs = submission.reported_secs, weights = %submission.weights, artifact = %id, "inference done");
                Ok::<(BlobId, u64), NodeError>((id, bytes.len() as u64))
            }
            .await
            .map_err(|e| e.to_string());
            pool.release(&job_id);
            let _ = tx
                .send(Cmd::Input(MinerInput::Trained { job_id, result }))
                .await;
        });
    }

    /// `deadline_ms` is the job's deadline on this miner's clock (the assignment's is on
    /// the validator's).
    fn spawn_training(&self, a: Assignment, deadline_ms: UnixMillis, reply_to: String) {
        let tx = self.tx.clone();
        let blobs = self.blobs.clone();
        let transport = self.transport.clone();
        let cfg = train_config(&self.training, &a.hparams);
        let margin = Duration::from_secs_f64(self.training.commit_margin_secs.max(0.0));
        let pool = self.devices.clone();
        let out = self.work.join(a.job_id.as_str());
        let models_root = self.models.clone();
        let training = self.training.clone();
        let (most, auto) = (self.devices_per_job, self.auto_devices);
        let throughput = self.throughput.clone();
        tokio::spawn(async move {
            let job_id = a.job_id.clone();
            let result = async {
                let (model_dir, model_bytes) =
                    Self::fetch_model(&transport, &blobs, &reply_to, a.base_model, &models_root).await?;
                transport.fetch_blob(&blobs, &reply_to, a.train_shard, MAX_SHARD).await?;
                tracing::info!(job_id = %a.job_id, model_bytes, "fetched model and shard");
                let shard = tunenet_ml::parse_jsonl(&blobs.get(&a.train_shard)?)?;
                // Train on this miner's own subset of the shard, in its own order, as the
                // assignment's nonce dictates (the validator can recompute it).
                let records: Vec<tunenet_ml::Record> =
                    tunenet_integrity::training_subset(&a.nonce, &a.job_id, &a.miner, shard.len())
                        .into_iter()
                        .filter_map(|i| shard.get(i).cloned())
                        .collect();
                // The free devices with the most memory the job's estimate fits: one, or a
                // data-parallel group of up to `devices_per_job` (with "auto", what the
                // budget needs at the throughput seen on this base model).
                let need = model_dir_need(&model_dir, &cfg, &pool);
                let want = if auto {
                    let seen = throughput.lock().ok().and_then(|t| t.get(&a.base_model).copied());
                    let secs = deadline_ms.saturating_sub(now_ms()) as f64 / 1000.0 - margin.as_secs_f64();
                    crate::devices::devices_for_budget(cfg.max_steps, seen, secs, most)
                } else {
                    most
                };
                let group = pool.place_group(&job_id, need, want).map_err(NodeError::Other)?;
                let slots: Vec<String> = group.iter().map(|g| g.0.clone()).collect();
                let devices: Vec<tunenet_ml::Device> = group.into_iter().map(|g| g.1).collect();
                tracing::info!(job_id = %job_id, device = %slots.join("+"), "training placed");
                if !training.command.is_empty() {
                    return external_training(&training, &a, deadline_ms, &records, &model_dir, &out, &slots, &blobs).await;
                }
                // The deadline is wall-clock; the trainer plans on a monotonic clock.
                let left = deadline_ms.saturating_sub(now_ms());
                let deadline = Instant::now() + Duration::from_millis(left);
                let progress_tx = tx.clone();
                let job = a.job_id.clone();
                let report = tokio::task::spawn_blocking(move || {
                    let cancel = AtomicBool::new(false);
                    let model = tunenet_ml::ModelDir::open(&model_dir)?;
                    let mut last = Instant::now();
                    let mut progress = |p: &tunenet_ml::Progress| {
                        if last.elapsed() >= Duration::from_millis(500) || p.step == p.max_steps {
                            last = Instant::now();
                            tracing::info!(job_id = %job, step = p.step, max_steps = p.max_steps, loss = p.loss, tokens_per_sec = p.tokens_per_sec as u64, "training");
                            let _ = progress_tx.try_send(Cmd::Input(MinerInput::Progress {
                                job_id: job.clone(),
                                step: p.step as u64,
                                loss: p.loss,
                            }));
                        }
                    };
                    let targets: Vec<String> =
                        tunenet_ml::DEFAULT_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
                    tunenet_ml::train_data_parallel(&model, &records, &cfg, &targets, Some(deadline), margin, &devices, None, &cancel, &mut progress, &out)
                        .map_err(NodeError::from)
                })
                .await
                .map_err(|e| NodeError::Other(format!("training thread: {e}")))??;
                if report.steps > 0 && report.seconds > 0.0 && report.tokens > 0 {
                    let seen = crate::devices::Throughput {
                        tokens_per_step: report.tokens as f64 / report.steps as f64,
                        tokens_per_sec_per_device: report.tokens as f64 / report.seconds / slots.len().max(1) as f64,
                    };
                    if let Ok(mut t) = throughput.lock() {
                        t.insert(a.base_model, seen);
                    }
                }
                metrics::counter!("tunenet_training_steps_total").increment(report.steps as u64);
                metrics::counter!("tunenet_training_tokens_total").increment(report.tokens);
                let id = blobs.put_file(&report.artifact)?;
                let size = blobs.size(&id)?;
                tracing::info!(job_id = %a.job_id, steps = report.steps, final_loss = report.final_loss, artifact = %id, size, "trained");
                Ok::<(BlobId, u64), NodeError>((id, size))
            }
            .await
            .map_err(|e| e.to_string());
            pool.release(&job_id);
            let _ = tx
                .send(Cmd::Input(MinerInput::Trained { job_id, result }))
                .await;
        });
    }
}

/// Trains `a` with the configured external program (see [`crate::external`]) and stores
/// the artifact it produced.
#[allow(clippy::too_many_arguments)]
async fn external_training(
    training: &TrainingConfig,
    a: &Assignment,
    deadline_ms: UnixMillis,
    records: &[tunenet_ml::Record],
    model_dir: &std::path::Path,
    work: &std::path::Path,
    slots: &[String],
    blobs: &BlobStore,
) -> Result<(BlobId, u64), NodeError> {
    let output = work.join("output");
    if output.exists() {
        std::fs::remove_dir_all(&output)
            .map_err(|e| NodeError::Other(format!("cannot clear {}: {e}", output.display())))?;
    }
    std::fs::create_dir_all(&output)
        .map_err(|e| NodeError::Other(format!("cannot create {}: {e}", output.display())))?;
    let data = work.join("train.jsonl");
    std::fs::write(&data, tunenet_ml::to_jsonl(records))
        .map_err(|e| NodeError::Other(format!("cannot write {}: {e}", data.display())))?;
    let margin_ms = (training.commit_margin_secs.max(0.0) * 1000.0) as u64;
    let job = crate::external::JobFile {
        version: 1,
        job_id: a.job_id.to_string(),
        base_model: std::fs::canonicalize(model_dir).unwrap_or_else(|_| model_dir.to_path_buf()),
        train_data: std::fs::canonicalize(&data).unwrap_or(data),
        train_records: records.len(),
        output_dir: std::fs::canonicalize(&output).unwrap_or(output),
        deadline_unix_ms: deadline_ms,
        stop_by_unix_ms: deadline_ms.saturating_sub(margin_ms),
        devices: slots.to_vec(),
        hparams: a.hparams.clone(),
        suggested: training.clone(),
    };
    let model = tunenet_ml::ModelDir::open(model_dir)?;
    let done = crate::external::run(&training.command, &job, &a.job_id, work, &model).await?;
    let id = blobs.put_file(&done.artifact)?;
    let size = blobs.size(&id)?;
    tracing::info!(job_id = %a.job_id, from = %done.how, artifact = %id, size, "trained by the external trainer");
    Ok((id, size))
}

/// The memory training the model in `dir` takes with `cfg`, when the pool has memory
/// figures to place it by (GPUs); None otherwise.
fn model_dir_need(
    dir: &std::path::Path,
    cfg: &tunenet_ml::TrainConfig,
    pool: &crate::devices::DevicePool,
) -> Option<u64> {
    if !pool.exclusive() {
        return None;
    }
    let model = tunenet_ml::ModelDir::open(dir).ok()?;
    let config = model.config().ok()?;
    let dtype = cfg.dtype.resolve(&pool.first_device());
    Some(tunenet_ml::estimate_memory(&config, cfg, dtype).total)
}

/// The memory training `offer`'s model would take with this miner's settings, when the
/// offer carries the model's config.
fn memory_needed(
    offer: &tunenet_types::Offer,
    training: &TrainingConfig,
    device: &tunenet_ml::Device,
) -> Option<u64> {
    let cfg: tunenet_ml::LlamaConfig = serde_json::from_str(&offer.model_config).ok()?;
    let tc = train_config(training, &HparamBounds::default());
    let dtype = tc.dtype.resolve(device);
    Some(tunenet_ml::estimate_memory(&cfg, &tc, dtype).total)
}

/// How long a commit or upload keeps retrying while the validator cannot be reached
/// (a restarting validator comes back within this).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// How often a running miner reads its inventory again.
const INVENTORY_REFRESH: Duration = Duration::from_secs(60);

/// Runs a miner until it is stopped.
pub async fn run(cfg: MinerConfig) -> Result<(), NodeError> {
    let crate::base::NodeBase {
        identity,
        store,
        blobs,
        device: _,
        listener,
    } = crate::base::open(
        &cfg.data_dir,
        cfg.key_file.as_ref(),
        &cfg.device,
        &cfg.listen,
        cfg.metrics_listen.as_ref(),
    )
    .await?;
    let stored: Vec<MinerJob> = store
        .scan_json::<MinerJob>(trees::MINER_JOBS, "")?
        .into_iter()
        .map(|(_, j)| j)
        .collect();
    let me: PeerIdStr = identity.peer_id();
    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    let price = cfg.price_per_gpu_hour;
    if !price.is_finite() || price < 0.0 {
        return Err(NodeError::Other(format!(
            "`price_per_gpu_hour` = {price}: a price per device-hour must be a finite number of at least 0 (0: not priced)"
        )));
    }
    let inventory = tunenet_hw::Inventory::collect();
    tracing::info!(hardware = %inventory.summary(), "inventory");
    let pool = Arc::new(
        crate::devices::DevicePool::new(&cfg.devices, &cfg.device, &inventory)
            .map_err(NodeError::Other)?,
    );
    let mut policy = cfg.policy.clone();
    let per_job = if pool.exclusive() {
        cfg.devices_per_job
            .resolve(pool.len(), policy.max_concurrent_jobs as usize)
    } else {
        1
    };
    let most = (pool.len() / per_job).max(1);
    if pool.exclusive() && policy.max_concurrent_jobs as usize > most {
        tracing::info!(
            slots = pool.len(),
            devices_per_job = per_job,
            "max_concurrent_jobs capped at the device slots divided by the devices per job"
        );
        policy.max_concurrent_jobs = most as u32;
    }
    tracing::info!(slots = ?pool.slots().iter().map(|s| s.0.clone()).collect::<Vec<_>>(), "device slots");
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        bench: crate::hardware::MinerBench::new(
            identity.clone(),
            inventory.clone(),
            cfg.benchmark_max_n,
            price,
        ),
        gate: Default::default(),
        rejected: Default::default(),
    });
    let gate_shared = shared.clone();
    let advert = |inv: &tunenet_hw::Inventory| {
        crate::presence::miner_advert(&identity, &cfg.device, &cfg.policy, inv, price)
    };
    let p2p = match &cfg.p2p {
        Some(p) => Some(
            crate::presence::join(
                &identity,
                p.clone(),
                blobs.clone(),
                Some(advert(&inventory)),
                |_| Arc::new(MinerP2p(shared.clone())),
            )
            .await?,
        ),
        None => None,
    };
    // The inventory is read again every minute: a GPU that leaves the bus, a new card or
    // a driver upgrade goes into the status and a fresh advert at once, and validators
    // that see the change benchmark this miner again.
    {
        let shared = shared.clone();
        let client = p2p.clone();
        let (identity, device, policy) = (identity.clone(), cfg.device.clone(), cfg.policy.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INVENTORY_REFRESH).await;
                let Ok(now) = tokio::task::spawn_blocking(tunenet_hw::Inventory::collect).await
                else {
                    continue;
                };
                if !shared.bench.refresh(now.clone()) {
                    continue;
                }
                tracing::warn!(hardware = %now.summary(), "the hardware changed");
                if let Some(c) = &client {
                    let a = crate::presence::miner_advert(&identity, &device, &policy, &now, price);
                    if let Err(e) = c.publish_advert(a).await {
                        tracing::debug!(error = %e, "changed advert not delivered yet; the heartbeat retries");
                    }
                }
            }
        });
    }
    let mut engine = MinerEngine::new(identity, policy, stored);
    let ctx = Ctx {
        store: store.clone(),
        blobs,
        transport: Transport::new(p2p),
        inference: cfg.inference.clone(),
        tx: tx.clone(),
        training: cfg.training.clone(),
        devices: pool.clone(),
        devices_per_job: per_job,
        auto_devices: cfg.devices_per_job == crate::config::DevicesPerJob::Auto,
        throughput: Default::default(),
        work: cfg.data_dir.join("work"),
        models: cfg.data_dir.join("models"),
    };
    let mut rng = rand::rngs::StdRng::from_os_rng();
    // Training cut short by a restart picks up from its checkpoint in work/<job>.
    let fx = engine.resume(now_ms());
    ctx.execute(fx);
    if let Ok(mut g) = gate_shared.gate.write() {
        *g = engine.offer_gate();
    }

    let buckets = crate::limits::request_buckets(&cfg.limits);
    let mut builder = crate::limits::with_tls(
        cfg.limits.builder(),
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
    )?;
    let server = crate::base::Server::spawn(
        builder.add_service(crate::limits::rate_limited(
            tunenet_rpc::miner_server(shared),
            &buckets,
        )),
        listener,
        &cfg.limits,
    );
    tracing::info!(peer = %me, listen = %cfg.listen, "miner started");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let shutdown = crate::base::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = tick.tick() => {
                let fx = engine.handle(MinerInput::Tick, now_ms(), &mut rng);
                ctx.execute(fx);
                if let Ok(mut r) = gate_shared.rejected.lock() {
                    r.maybe_log();
                }
            }
            Some(cmd) = rx.recv() => {
                let now = now_ms();
                match cmd {
                    Cmd::Offer(offer, reply) => {
                        let (job_id, validator) = (offer.job_id.clone(), offer.validator.clone());
                        let need = memory_needed(&offer, &cfg.training, &pool.first_device());
                        let (decision, fx) = engine.offer(offer, now, need);
                        match &decision {
                            tunenet_types::Decision::Accept => metrics::counter!("tunenet_offers_accepted_total").increment(1),
                            tunenet_types::Decision::Reject(r) => {
                                metrics::counter!("tunenet_offers_rejected_total", "reason" => format!("{:?}", r.code)).increment(1)
                            }
                        }
                        if let tunenet_types::Decision::Reject(r) = &decision {
                            // A refused offer changes nothing here: one debug line, and a
                            // summary a minute (an offer flood must not fill the disk).
                            tracing::debug!(%job_id, reason = %r, "offer rejected");
                            if let Ok(mut counted) = gate_shared.rejected.lock() {
                                counted.count(r.code);
                            }
                            ctx.execute(fx.into_iter().filter(|f| !matches!(f, MinerEffect::Event(_))).collect());
                        } else {
                            ctx.execute(fx);
                        }
                        // Only an acceptance is signed: a refusal gives no one a job, and
                        // an offer flood should not cost a signature each.
                        let answer = if decision == tunenet_types::Decision::Accept {
                            engine.reply(job_id, &validator, decision)
                        } else {
                            DecisionReply::unsigned(job_id, me.clone(), decision)
                        };
                        let _ = reply.send(Ok(answer));
                    }
                    Cmd::Assign(a, reply) => {
                        let r = engine.assign(a, now).map(|fx| ctx.execute(fx)).map_err(|e| match e {
                            tunenet_engine::MinerError::BadSignature(_) => Status::unauthenticated(e.to_string()),
                            tunenet_engine::MinerError::UnknownJob(_) => Status::not_found(e.to_string()),
                            _ => Status::failed_precondition(e.to_string()),
                        });
                        let _ = reply.send(r);
                    }
                    Cmd::Status(reply) => {
                        let jobs = engine
                            .status()
                            .into_iter()
                            .map(|j| {
                                let device = pool.slot_of(&j.job_id).unwrap_or_default();
                                v1::JobStatus { device, ..j.into() }
                            })
                            .collect();
                        let _ = reply.send(Ok(v1::MinerStatus {
                            miner: me.0.clone(),
                            paused: engine.policy().paused,
                            running: engine.running(),
                            max_concurrent: engine.policy().max_concurrent_jobs,
                            jobs,
                            hardware: None,
                            price_per_gpu_hour: 0.0,
                        }));
                    }
                    Cmd::Input(input) => {
                        let fx = engine.handle(input, now, &mut rng);
                        ctx.execute(fx);
                    }
                }
            }
        }
        // The request handlers refuse by what the engine holds now.
        let gate = engine.offer_gate();
        if let Ok(mut g) = gate_shared.gate.write() {
            *g = gate;
        }
    }
    store.flush()?;
    server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_estimate_comes_from_the_offered_config() {
        let cfg = tunenet_ml::tiny_config();
        let mut offer = tunenet_types::Offer {
            job_id: tunenet_types::JobId::new("j").unwrap(),
            competition_id: tunenet_types::CompetitionId::new("c").unwrap(),
            kind: tunenet_types::JobKind::FineTune,
            validator: tunenet_types::PeerIdStr("v".into()),
            base_model: BlobId::of(b"m"),
            base_params: cfg.param_count(),
            dataset_records: 1,
            time_budget_ms: 60_000,
            reward_hint: 0.0,
            hardware: "cpu".into(),
            reply_to: "http://v".into(),
            model_config: String::new(),
            inference: None,
            validator_key: vec![],
            signature: vec![],
        };
        let training = TrainingConfig::default();
        assert_eq!(
            memory_needed(&offer, &training, &tunenet_ml::Device::Cpu),
            None
        );
        offer.model_config = serde_json::to_string(&cfg).unwrap();
        let lora = memory_needed(&offer, &training, &tunenet_ml::Device::Cpu).unwrap();
        let full = memory_needed(
            &offer,
            &TrainingConfig {
                method: "full".into(),
                ..training
            },
            &tunenet_ml::Device::Cpu,
        )
        .unwrap();
        assert!(lora > 0 && full > lora, "lora {lora}, full {full}");
    }
}
