//! Inference jobs on both sides: a miner scores a HellaSwag-layout shard with the job's
//! model (dense, or quantised to GGUF where the job allows it) and returns per-item
//! log-likelihoods; a validator scores the same shard with its reference model once,
//! before any result arrives, and checks each submission against it
//! (`tunenet_integrity::inference`). A dense-only job (`allow_quantized = false`) runs the
//! dense weights whatever the miner's `quantize` says: its results must match the dense
//! reference to within f32 noise.

use crate::config::CompetitionConfig;
use crate::error::NodeError;
use crate::validator::{CompState, CompetitionRecord};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use tunenet_engine::Evaluation;
use tunenet_integrity::inference::{
    INFERENCE_FORMAT, InferenceSubmission, InferenceTolerance, check_inference, sample_items,
};
use tunenet_ml::{HellaSwagItem, HellaSwagScorer, ItemScore, ScoreOptions, ScoringModel};
use tunenet_store::{BlobStore, Store, StoreExt, trees};
use tunenet_types::{BlobId, CompetitionId, JobId, PeerIdStr};

/// Most items an inference shard may hold.
pub const MAX_ITEMS: usize = 1_000_000;

/// A miner's `[inference]` settings: how it runs inference jobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Quantise the model to this GGUF type when the job allows it (`q8_0`, `q4_0`,
    /// `q4_1`, `q5_0`, `q5_1`, `f16`); `none` runs the dense weights.
    pub quantize: String,
    /// Tokens packed into one forward pass.
    pub batch_tokens: usize,
    /// Expand the quantised weights to f32 at load: the quantised model's exact weights,
    /// with no expansion per batch (a few per cent faster on a CPU, where weights kept
    /// quantised are expanded a tile at a time), at four to eight times the memory.
    pub dequantize: bool,
    /// Score with an external program instead (e.g. `["python3", "score.py"]`): it gets
    /// the job file's path as its last argument and writes each item's ending
    /// log-likelihoods to `logliks.jsonl` in the output directory (docs/TRAINERS.md).
    /// Empty: tunenet's own scorer.
    pub command: Vec<String>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            quantize: "q8_0".into(),
            batch_tokens: tunenet_ml::DEFAULT_BATCH_TOKENS,
            dequantize: false,
            command: Vec::new(),
        }
    }
}

/// File an external inference program writes in its output directory: one JSON object
/// per line, `{"index": i, "logliks": [...]}` (other fields are ignored).
pub const LOGLIKS_FILE: &str = "logliks.jsonl";

/// The job file an external inference program reads.
#[derive(Debug, Serialize)]
pub struct InferenceJobFile {
    /// Always 1 for this layout.
    pub version: u32,
    /// Always "inference".
    pub kind: &'static str,
    pub job_id: String,
    /// The model directory, in Hugging Face layout.
    pub model: std::path::PathBuf,
    /// The items to score: HellaSwag-layout JSONL (activity_label, ctx_a, ctx_b, endings,
    /// label), one per line; item `i` is line `i`.
    pub items: std::path::PathBuf,
    pub item_count: usize,
    /// Where it writes `logliks.jsonl` (empty when it starts).
    pub output_dir: std::path::PathBuf,
    /// The validator's deadline for the commitment (Unix ms).
    pub deadline_unix_ms: u64,
    /// When it is sent SIGTERM if still running (Unix ms).
    pub stop_by_unix_ms: u64,
    /// Its devices (`CUDA_VISIBLE_DEVICES` is set to match).
    pub devices: Vec<String>,
    /// Whether the job accepts results from quantised weights; when false, the results
    /// must match the dense model to within f32 noise.
    pub allow_quantized: bool,
}

/// One line of `logliks.jsonl`.
#[derive(Deserialize)]
struct LoglikLine {
    index: usize,
    logliks: Vec<f64>,
}

/// Runs the configured external inference program on `items` and turns what it wrote
/// into a submission: ending token and byte counts and the predictions are derived with
/// the model's own tokenizer, as tunenet's scorer derives them.
pub async fn run_external(
    command: &[String],
    job: &InferenceJobFile,
    job_id: &JobId,
    work: &Path,
    items: &[HellaSwagItem],
    started: Instant,
) -> Result<InferenceSubmission, NodeError> {
    let t0 = Instant::now();
    let spec = crate::external::Program {
        key: "inference.command",
        role: "inference program",
        log_file: "inference.log",
        stop_by_unix_ms: job.stop_by_unix_ms,
        deadline_unix_ms: job.deadline_unix_ms,
        devices: &job.devices,
    };
    crate::external::run_program(command, job, job_id, work, &spec).await?;
    let fail = |s: String| NodeError::Other(format!("the inference program's {LOGLIKS_FILE}: {s}"));
    let path = job.output_dir.join(LOGLIKS_FILE);
    let size = std::fs::metadata(&path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
        .len();
    // Each line is an index and a few numbers: 1 KiB an item is generous.
    let most = 1024 * items.len() as u64 + 4096;
    if size > most {
        return Err(fail(format!(
            "{size} bytes for {} items (at most {most})",
            items.len()
        )));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let mut logliks = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: LoglikLine =
            serde_json::from_str(line).map_err(|e| fail(format!("line {}: {e}", n + 1)))?;
        if logliks.insert(l.index, l.logliks).is_some() {
            return Err(fail(format!(
                "line {}: item {} appears twice",
                n + 1,
                l.index
            )));
        }
    }
    let model = tunenet_ml::ModelDir::open(&job.model)?;
    let scores = tunenet_ml::item_scores_from_logliks(&model, items, &logliks)
        .map_err(|e| fail(e.to_string()))?;
    let weights = format!(
        "external: {}",
        command.first().map(String::as_str).unwrap_or_default()
    );
    submission(items, scores, t0, started, weights)
}

/// The submission for `scores`, scored from `t0` (its throughput), reported from `started`.
fn submission(
    items: &[HellaSwagItem],
    scores: Vec<ItemScore>,
    t0: Instant,
    started: Instant,
    weights: String,
) -> Result<InferenceSubmission, NodeError> {
    let summary = tunenet_ml::hellaswag_summary(items, &scores, t0.elapsed().as_secs_f64())?;
    Ok(InferenceSubmission {
        format: INFERENCE_FORMAT.into(),
        scores,
        acc: summary.acc,
        acc_norm: summary.acc_norm,
        reported_secs: started.elapsed().as_secs_f64(),
        weights,
    })
}

/// Reads an inference shard (HellaSwag-layout JSONL), bounded.
pub fn parse_items(bytes: &[u8]) -> Result<Vec<HellaSwagItem>, NodeError> {
    // Counted before anything is parsed: the shard comes from another node.
    let lines = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .count();
    if lines > MAX_ITEMS {
        return Err(NodeError::Other(format!(
            "the inference shard has {lines} items, more than {MAX_ITEMS}"
        )));
    }
    let items = tunenet_ml::parse_hellaswag(bytes, "inference shard")?;
    if items.is_empty() {
        return Err(NodeError::Other("the inference shard has no items".into()));
    }
    Ok(items)
}

/// The scoring model a miner runs: the dense model (split over `devices` when there are
/// several: tensor parallelism, for a model larger than one device), or (when
/// `allow_quantized` and the config asks for it) the same weights quantised to GGUF in
/// `work`, on the first device.
pub fn scoring_model(
    model_dir: &Path,
    allow_quantized: bool,
    cfg: &InferenceConfig,
    work: &Path,
    devices: &[tunenet_ml::Device],
) -> Result<Box<dyn HellaSwagScorer + Send + Sync>, NodeError> {
    let Some(device) = devices.first() else {
        return Err(NodeError::Other("an inference job needs a device".into()));
    };
    let model = tunenet_ml::ModelDir::open(model_dir)?;
    if allow_quantized && cfg.quantize != "none" && !cfg.quantize.is_empty() {
        std::fs::create_dir_all(work)
            .map_err(|e| NodeError::Other(format!("cannot create {}: {e}", work.display())))?;
        let gguf = work.join(format!("model-{}.gguf", cfg.quantize));
        if !gguf.exists() {
            tunenet_ml::export_gguf_quantized(&model, &gguf, "llama", &cfg.quantize)?;
        }
        return Ok(Box::new(ScoringModel::load_gguf(
            &gguf,
            device,
            if cfg.dequantize {
                tunenet_ml::GgufWeights::Dequantized
            } else {
                tunenet_ml::GgufWeights::Quantized
            },
        )?));
    }
    if devices.len() > 1 {
        return Ok(Box::new(tunenet_ml::TensorParallelLm::load(
            &model,
            None,
            tunenet_ml::WeightDtype::F32,
            devices,
            None,
        )?));
    }
    let lm = tunenet_ml::CausalLm::load(&model, None, tunenet_ml::WeightDtype::F32, device)?;
    Ok(Box::new(ScoringModel::from_causal_lm(&lm)?))
}

/// Scores every item; returns the submission (its `reported_secs` counts from `started`).
pub fn run(
    scorer: &dyn HellaSwagScorer,
    items: &[HellaSwagItem],
    batch_tokens: usize,
    started: Instant,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<InferenceSubmission, NodeError> {
    let opts = ScoreOptions {
        batch_tokens: batch_tokens.max(64),
        indices: None,
    };
    let t0 = Instant::now();
    let scores = tunenet_ml::score_items(scorer, items, &opts, &mut |p| progress(p.done, p.total))?;
    submission(items, scores, t0, started, scorer.describe())
}

/// The validator's reference: every item scored with the dense model, whole on one
/// device or split over several (tensor parallelism, for a model larger than one).
pub fn reference(
    model_dir: &Path,
    items: &[HellaSwagItem],
    devices: &[tunenet_ml::Device],
) -> Result<Vec<ItemScore>, NodeError> {
    let model = tunenet_ml::ModelDir::open(model_dir)?;
    let scorer: Box<dyn HellaSwagScorer> = match devices {
        [] => return Err(NodeError::Other("the reference needs a device".into())),
        [one] => {
            let lm = tunenet_ml::CausalLm::load(&model, None, tunenet_ml::WeightDtype::F32, one)?;
            Box::new(ScoringModel::from_causal_lm(&lm)?)
        }
        many => Box::new(tunenet_ml::TensorParallelLm::load(
            &model,
            None,
            tunenet_ml::WeightDtype::F32,
            many,
            None,
        )?),
    };
    Ok(tunenet_ml::score_items(
        scorer.as_ref(),
        items,
        &ScoreOptions::default(),
        &mut |_| {},
    )?)
}

/// What the validator learnt from one submission.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceOutcome {
    /// The checks' verdicts.
    pub verdicts: Vec<tunenet_types::Verdict>,
    /// Whether a check failed.
    pub failed: bool,
    /// `acc_norm` from the submission's log-likelihoods.
    pub acc_norm: f64,
    /// Items per second by the validator's clock.
    pub items_per_sec: f64,
}

/// Checks a submission (raw bytes) against the reference, with the sample drawn from
/// `sample_seed` (drawn after the results arrived) and the validator's `measured_secs`.
pub fn evaluate(
    items: &[HellaSwagItem],
    reference: &[ItemScore],
    submission: &[u8],
    sample_seed: u64,
    measured_secs: f64,
    tol: &InferenceTolerance,
) -> InferenceOutcome {
    let fail = |reason: String| InferenceOutcome {
        verdicts: vec![tunenet_types::Verdict {
            check: "format".into(),
            outcome: tunenet_types::Outcome::Fail,
            value: None,
            threshold: None,
            reason,
        }],
        failed: true,
        acc_norm: 0.0,
        items_per_sec: 0.0,
    };
    let sub = match InferenceSubmission::parse(submission) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let sample = sample_items(sample_seed, items.len(), tol);
    let report = check_inference(items, reference, &sub, &sample, measured_secs, tol);
    InferenceOutcome {
        failed: report.failed(),
        acc_norm: report.acc_norm,
        items_per_sec: report.items as f64 / measured_secs.max(1e-3),
        verdicts: report.verdicts,
    }
}

/// The validator's reference scores of every shard of an inference competition (kept
/// private, like a fine-tuning competition's test split).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reference {
    /// Per shard blob, the dense model's score of each of its items.
    pub shards: Vec<(BlobId, Vec<ItemScore>)>,
}

/// Prepares an inference competition: splits the HellaSwag-layout dataset into one shard
/// per job, scores every shard with the dense base model (the reference), and stores it.
pub fn prepare(
    store: &dyn Store,
    blobs: &BlobStore,
    cfg: &CompetitionConfig,
    reply_to: &str,
    devices: &[tunenet_ml::Device],
) -> Result<CompetitionRecord, NodeError> {
    let fail = |reason: String| NodeError::Competition {
        competition: cfg.id.clone(),
        reason,
    };
    let tol = &cfg.inference;
    if !(0.0..=1.0).contains(&tol.acc_norm_drop) {
        return Err(fail(
            "`inference.acc_norm_drop` must be between 0 and 1".into(),
        ));
    }
    if !(tol.sample_fraction > 0.0 && tol.sample_fraction <= 1.0) {
        return Err(fail(
            "`inference.sample_fraction` must be above 0 and at most 1".into(),
        ));
    }
    if !(tol.fabricated_fraction > 0.0 && tol.fabricated_fraction <= 1.0) {
        return Err(fail(
            "`inference.fabricated_fraction` must be above 0 and at most 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&tol.detection_confidence) {
        return Err(fail(
            "`inference.detection_confidence` must be at least 0 and below 1".into(),
        ));
    }
    for (key, v) in [
        ("loglik_per_token", tol.loglik_per_token),
        ("loglik_per_token_max", tol.loglik_per_token_max),
        ("dense_loglik_per_token", tol.dense_loglik_per_token),
        ("dense_loglik_per_token_max", tol.dense_loglik_per_token_max),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(fail(format!(
                "`inference.{key}` must be a finite number of nats, at least 0"
            )));
        }
    }
    let model = tunenet_ml::ModelDir::open(&cfg.base_model)
        .map_err(|e| fail(format!("`base_model`: {e}")))?;
    let params = model
        .config()
        .map_err(|e| fail(format!("`base_model`: {e}")))?
        .param_count();
    let bytes = std::fs::read(&cfg.dataset)
        .map_err(|e| fail(format!("`dataset` {}: {e}", cfg.dataset.display())))?;
    let items = parse_items(&bytes).map_err(|e| fail(format!("`dataset`: {e}")))?;
    if items.len() < cfg.jobs as usize {
        return Err(fail(format!(
            "`dataset` has {} items: too few for {} jobs",
            items.len(),
            cfg.jobs
        )));
    }
    let (base_model, manifest) = crate::models::import_model_dir(blobs, &cfg.base_model)?;
    let model_config =
        std::fs::read_to_string(cfg.base_model.join("config.json")).unwrap_or_default();
    let comp = CompetitionId::new(cfg.id.clone()).map_err(|e| fail(e.to_string()))?;
    let mut public_blobs = vec![base_model];
    public_blobs.extend(manifest.files.iter().map(|f| f.blob));
    let per = items.len().div_ceil(cfg.jobs as usize);
    let mut jobs = Vec::new();
    let mut reference = Reference::default();
    let t0 = Instant::now();
    for (i, chunk) in items.chunks(per).enumerate() {
        let mut shard = Vec::new();
        for it in chunk {
            shard.extend(serde_json::to_vec(it).map_err(|e| fail(e.to_string()))?);
            shard.push(b'\n');
        }
        let shard_blob = blobs.put(&shard)?;
        public_blobs.push(shard_blob);
        let scores = self::reference(&cfg.base_model, chunk, devices)
            .map_err(|e| fail(format!("reference scoring: {e}")))?;
        reference.shards.push((shard_blob, scores));
        jobs.push(crate::validator::job_plan(
            cfg,
            i,
            (base_model, params, &model_config),
            shard_blob,
            chunk.len(),
        )?);
    }
    tracing::info!(competition = %cfg.id, items = items.len(), secs = t0.elapsed().as_secs_f64(), "reference scores computed");
    let ref_bytes = serde_json::to_vec(&reference).map_err(|e| fail(e.to_string()))?;
    let test_blob = blobs.put(&ref_bytes)?;
    let plan = crate::validator::competition_plan(
        cfg,
        comp,
        jobs,
        reply_to,
        tunenet_integrity::inference::MAX_SUBMISSION_BYTES,
        tunenet_types::IntegritySettings {
            enabled: false,
            ..Default::default()
        },
    );
    let rec = CompetitionRecord {
        config: cfg.clone(),
        plan,
        base_model,
        test_blob,
        control_blob: None,
        public_blobs,
        state: CompState::Running,
        canaries: Default::default(),
        pins: Vec::new(),
    };
    store.put_json(trees::COMPETITIONS, &cfg.id, &rec)?;
    store.flush()?;
    Ok(rec)
}

/// One inference submission to check.
pub struct EvalRequest {
    /// The competition (for logs).
    pub comp: String,
    /// The job.
    pub job_id: JobId,
    /// The miner.
    pub miner: PeerIdStr,
    /// The results blob.
    pub artifact: BlobId,
    /// The job's shard.
    pub shard: BlobId,
    /// The competition's reference blob.
    pub reference: BlobId,
    /// The validator's time from dispatch to the commitment, seconds.
    pub measured_secs: f64,
    /// Seed of the recomputed sample, drawn after the results arrived.
    pub sample_seed: u64,
    /// The thresholds.
    pub tolerance: InferenceTolerance,
}

/// The scored loss of a valid inference result: `ln(seconds per item)`, so the engine's
/// quality `exp(-loss)` is the validator-timed items per second.
pub fn speed_loss(measured_secs: f64, items: usize) -> f64 {
    (measured_secs.max(1e-3) / items.max(1) as f64).ln()
}

/// Starts the inference checker: one thread, one submission at a time; `done` hears each
/// result (and returns false once nobody listens).
pub fn spawn_evaluator(
    blobs: BlobStore,
    done: impl Fn(JobId, PeerIdStr, Result<Evaluation, String>) -> bool + Send + 'static,
) -> Result<std::sync::mpsc::Sender<EvalRequest>, NodeError> {
    let (tx, rx) = std::sync::mpsc::channel::<EvalRequest>();
    std::thread::Builder::new()
        .name("tunenet-inference-eval".into())
        .spawn(move || {
            let mut references: std::collections::BTreeMap<BlobId, Reference> = Default::default();
            while let Ok(req) = rx.recv() {
                let result = (|| -> Result<Evaluation, String> {
                    if let std::collections::btree_map::Entry::Vacant(slot) = references.entry(req.reference) {
                        let bytes = blobs.get(&req.reference).map_err(|e| e.to_string())?;
                        slot.insert(serde_json::from_slice(&bytes).map_err(|e| format!("reference: {e}"))?);
                    }
                    let reference = references
                        .get(&req.reference)
                        .and_then(|r| r.shards.iter().find(|(b, _)| *b == req.shard))
                        .map(|(_, s)| s.clone())
                        .ok_or("no reference for this shard")?;
                    let items = parse_items(&blobs.get(&req.shard).map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?;
                    blobs.verify(&req.artifact).map_err(|e| e.to_string())?;
                    let sub = blobs.get(&req.artifact).map_err(|e| e.to_string())?;
                    let t0 = Instant::now();
                    let out = evaluate(&items, &reference, &sub, req.sample_seed, req.measured_secs, &req.tolerance);
                    tracing::info!(competition = %req.comp, job_id = %req.job_id, miner = %req.miner, failed = out.failed, acc_norm = out.acc_norm, items_per_sec = out.items_per_sec, measured_secs = req.measured_secs, check_secs = t0.elapsed().as_secs_f64(), "inference results checked");
                    Ok(Evaluation {
                        test_loss: (!out.failed).then(|| speed_loss(req.measured_secs, items.len())),
                        verdicts: out.verdicts,
                        ..Default::default()
                    })
                })();
                if !done(req.job_id, req.miner, result) {
                    break;
                }
            }
        })
        .map_err(|e| NodeError::Other(format!("cannot start the inference checker: {e}")))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_detection_settings_are_refused_with_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let store = tunenet_store::MemStore::default();
        let mut cfg: CompetitionConfig = toml::from_str(
            "id = \"inf\"\nkind = \"inference\"\nbase_model = \"m\"\ndataset = \"d\"\n",
        )
        .unwrap();
        for (set, key) in [
            (
                (|t: &mut InferenceTolerance| t.fabricated_fraction = 0.0)
                    as fn(&mut InferenceTolerance),
                "fabricated_fraction",
            ),
            (|t| t.detection_confidence = 1.0, "detection_confidence"),
            (
                |t| t.dense_loglik_per_token = f64::NAN,
                "dense_loglik_per_token",
            ),
        ] {
            cfg.inference = InferenceTolerance::default();
            set(&mut cfg.inference);
            let e = prepare(&store, &blobs, &cfg, "http://v", &[tunenet_ml::Device::Cpu])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn bad_shards_are_refused_with_the_line_and_the_reason() {
        let good = serde_json::to_vec(&tunenet_ml::hellaswag_demo_items(1, 0)[0]).unwrap();
        let mut two = good.clone();
        two.extend(b"\n\n");
        two.extend(&good);
        assert_eq!(parse_items(&two).unwrap().len(), 2);
        let e = parse_items(b"").unwrap_err().to_string();
        assert!(e.contains("no items"), "{e}");
        let mut bad = good.clone();
        bad.extend(b"\n{\"activity_label\": 3}\n");
        let e = parse_items(&bad).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let mut item = tunenet_ml::hellaswag_demo_items(1, 0).remove(0);
        item.label = 9;
        let e = parse_items(&serde_json::to_vec(&item).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 9"), "{e}");
    }
}
