//! Evaluation: mean next-token loss of a base model, optionally with a training artifact
//! (LoRA adapter or full weights) applied, over a whole set or record by record (the
//! integrity checks compare per-record losses between sets).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::artifact::{load_artifact_tensors, read_artifact_manifest, tensor_shapes};
use crate::config::LlamaConfig;
use crate::data::{Example, Record, make_batch, tokenize};
use crate::error::{CandleContext, MlError};
use crate::loader::{load_base, load_tokenizer, mmap_weights};
use crate::lora::{load_lora, normalize_targets};
use crate::model::{Llama, Mode, masked_nll_sum};
use crate::model_dir::ModelDir;
use crate::train::Method;

/// Outcome of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    /// Mean negative log-likelihood per target token (nats).
    pub mean_loss: f64,
    /// Target tokens scored.
    pub tokens: u64,
    /// Records given.
    pub records: usize,
    /// Wall time of the evaluation, loading included.
    pub seconds: f64,
}

/// Refuses batch sizes and sequence lengths no evaluation can run with.
fn check_eval_args(batch_size: usize, max_seq_len: usize) -> Result<(), MlError> {
    if batch_size == 0 {
        return Err(MlError::Invalid(
            "evaluation batch_size must be at least 1".into(),
        ));
    }
    if max_seq_len < 2 {
        return Err(MlError::Invalid(format!(
            "evaluation max_seq_len must be at least 2, got {max_seq_len}"
        )));
    }
    Ok(())
}

/// Mean token loss of the base model (`artifact` None) or of base + artifact (a LoRA
/// adapter applied to the base, or full weights that must have exactly the base's tensor
/// names and shapes). Batched, padding masked, prompt tokens of instruction records
/// masked, sequences truncated to `max_seq_len` tokens. Weights are f32 on every device.
pub fn evaluate(
    model: &ModelDir,
    artifact: Option<&Path>,
    records: &[Record],
    max_seq_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport, MlError> {
    evaluate_on(
        model,
        artifact,
        records,
        max_seq_len,
        batch_size,
        std::slice::from_ref(device),
    )
}

/// [`evaluate`] on one device, or split over several (tensor parallelism, for a model
/// larger than one device: see [`crate::TensorParallelLm`]); the same losses either way,
/// up to float rounding.
pub fn evaluate_on(
    model: &ModelDir,
    artifact: Option<&Path>,
    records: &[Record],
    max_seq_len: usize,
    batch_size: usize,
    devices: &[Device],
) -> Result<EvalReport, MlError> {
    let start = Instant::now();
    check_eval_args(batch_size, max_seq_len)?;
    let cfg = model.config()?;
    let tok = load_tokenizer(model, &cfg)?;
    let mut examples = tokenize(&tok, &cfg, records, max_seq_len)?;
    if examples.is_empty() {
        return Err(MlError::Invalid(format!(
            "no scorable tokens among {} evaluation records: every record is empty or its response was truncated away",
            records.len()
        )));
    }
    // Always f32, so validators on different devices score artifacts alike.
    let runner = Runner::load(model, &cfg, artifact, devices)?;
    // Batching similar lengths together wastes less work on padding.
    examples.sort_by_key(|e| e.ids.len());
    let mut total = 0f64;
    let mut tokens = 0u64;
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (sum, n) = eval_batch(&runner, &refs)?;
        total += sum;
        tokens += n as u64;
    }
    Ok(EvalReport {
        mean_loss: total / tokens.max(1) as f64,
        tokens,
        records: records.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Per-record losses from one model load: `losses[i]` is record `i`'s mean negative
/// log-likelihood per target token (nats), or None when the record has no scorable token
/// (empty, or its response truncated away); `tokens[i]` is how many target tokens it has.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RecordLosses {
    /// Each record's mean token loss.
    pub losses: Vec<Option<f64>>,
    /// Each record's target token count (0 when its loss is None).
    pub tokens: Vec<u64>,
    /// Wall time, loading included.
    pub seconds: f64,
}

impl RecordLosses {
    /// Token-weighted mean loss over the records in `range` (what [`evaluate`] would give
    /// for those records alone); None when none of them has a scorable token.
    pub fn mean_over(&self, range: std::ops::Range<usize>) -> Option<f64> {
        let (mut sum, mut n) = (0f64, 0u64);
        for i in range {
            if let (Some(Some(l)), Some(t)) = (self.losses.get(i), self.tokens.get(i)) {
                sum += l * *t as f64;
                n += t;
            }
        }
        (n > 0).then(|| sum / n as f64)
    }
}

/// Each record's mean token loss under the base model (`artifact` None) or base + artifact,
/// with one model load: batched like [`evaluate`] (same masking, truncation and f32
/// weights), so the token-weighted mean of a set's per-record losses equals its
/// [`evaluate`] loss. Records with nothing to score get None rather than an error.
pub fn record_losses(
    model: &ModelDir,
    artifact: Option<&Path>,
    records: &[Record],
    max_seq_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<RecordLosses, MlError> {
    record_losses_on(
        model,
        artifact,
        records,
        max_seq_len,
        batch_size,
        std::slice::from_ref(device),
    )
}

/// [`record_losses`] on one device, or split over several (tensor parallelism).
pub fn record_losses_on(
    model: &ModelDir,
    artifact: Option<&Path>,
    records: &[Record],
    max_seq_len: usize,
    batch_size: usize,
    devices: &[Device],
) -> Result<RecordLosses, MlError> {
    let start = Instant::now();
    check_eval_args(batch_size, max_seq_len)?;
    let cfg = model.config()?;
    let tok = load_tokenizer(model, &cfg)?;
    // Tokenized one by one so each example keeps its record's index (tokenize drops
    // records with no target).
    let mut examples: Vec<(usize, Example)> = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if let Some(e) = tokenize(&tok, &cfg, std::slice::from_ref(r), max_seq_len)?.pop() {
            examples.push((i, e));
        }
    }
    let mut out = RecordLosses {
        losses: vec![None; records.len()],
        tokens: vec![0; records.len()],
        seconds: 0.0,
    };
    if !examples.is_empty() {
        let runner = Runner::load(model, &cfg, artifact, devices)?;
        examples.sort_by_key(|(_, e)| e.ids.len());
        for chunk in examples.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().map(|(_, e)| e).collect();
            let sums = row_nll_sums(&runner, &refs)?;
            for ((i, e), sum) in chunk.iter().zip(sums) {
                let n = e.targets() as u64;
                out.losses[*i] = Some(sum / n.max(1) as f64);
                out.tokens[*i] = n;
            }
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

/// The model scoring a batch: whole on one device, or split over several.
enum Runner {
    One(Box<Llama>, Device),
    Split(Box<crate::tp::TensorParallelLm>),
}

impl Runner {
    fn load(
        model: &ModelDir,
        cfg: &LlamaConfig,
        artifact: Option<&Path>,
        devices: &[Device],
    ) -> Result<Runner, MlError> {
        match devices {
            [] => Err(MlError::Invalid("evaluation needs a device".into())),
            [one] => {
                let mut llama = load_model(model, cfg, artifact, DType::F32, one)?;
                llama
                    .pack_frozen_for_cpu()
                    .ctx("packing the weights for inference")?;
                Ok(Runner::One(Box::new(llama), one.clone()))
            }
            many => Ok(Runner::Split(Box::new(crate::tp::TensorParallelLm::load(
                model,
                artifact,
                crate::loader::WeightDtype::F32,
                many,
                None,
            )?))),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Runner::One(_, d) => d,
            Runner::Split(tp) => tp.lead_device(),
        }
    }

    /// The batch (made on the lead device) and its logits.
    fn run(&self, refs: &[&Example]) -> Result<(crate::data::Batch, Tensor), MlError> {
        let batch = make_batch(refs, self.device()).ctx("making a batch")?;
        let logits = match self {
            Runner::One(llama, _) => llama
                .forward(&batch.inputs, &batch.key_mask, Mode::Infer)
                .ctx("evaluating a batch")?,
            Runner::Split(tp) => tp.forward(&batch.inputs, &batch.key_mask)?,
        };
        Ok((batch, logits))
    }
}

/// Summed target-token NLL of each row of a batch.
fn row_nll_sums(runner: &Runner, refs: &[&Example]) -> Result<Vec<f64>, MlError> {
    let (batch, logits) = runner.run(refs)?;
    (|| {
        let (b, t, v) = logits.dims3()?;
        let nll =
            crate::fused::nll_rows(&logits.reshape((b * t, v))?, &batch.targets.reshape(b * t)?)?
                .reshape((b, t))?;
        let nll = (nll * &batch.loss_mask)?.sum(1)?;
        nll.to_dtype(DType::F64)?.to_vec1::<f64>()
    })()
    .ctx("evaluating a batch")
}

fn eval_batch(runner: &Runner, refs: &[&Example]) -> Result<(f64, usize), MlError> {
    let (batch, logits) = runner.run(refs)?;
    let sum = masked_nll_sum(&logits, &batch.targets, &batch.loss_mask)
        .and_then(|s| s.to_dtype(DType::F64)?.to_scalar::<f64>())
        .ctx("evaluating a batch")?;
    Ok((sum, batch.predicted))
}

/// Architecture-defining part of a config (names and HF bookkeeping left out).
pub(crate) fn arch(cfg: &LlamaConfig) -> LlamaConfig {
    LlamaConfig {
        model_type: None,
        architectures: None,
        ..cfg.clone()
    }
}

pub(crate) fn load_model(
    model: &ModelDir,
    cfg: &LlamaConfig,
    artifact: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Llama, MlError> {
    let weight_files = model.weight_files()?;
    let Some(path) = artifact else {
        return load_base(model, cfg, dtype, device, None);
    };
    let bad = |problem: String| MlError::Artifact {
        path: path.to_path_buf(),
        problem,
    };
    let manifest = read_artifact_manifest(path)?;
    if arch(&manifest.base_config) != arch(cfg) {
        return Err(bad(format!(
            "was trained on a different base model (its config {:?} differs from {}'s {:?}); evaluate it against the model it was trained from",
            manifest.base_config,
            model.path.display(),
            cfg
        )));
    }
    match manifest.method {
        Method::Lora { rank, alpha } => {
            let targets =
                normalize_targets(&manifest.target_modules).map_err(|e| bad(e.to_string()))?;
            let tensors = load_artifact_tensors(path, device)?;
            let weights = load_lora(cfg, &tensors, &targets, rank, alpha).map_err(bad)?;
            load_base(model, cfg, dtype, device, Some(&weights))
        }
        Method::Full => {
            let base = tensor_shapes(&weight_files)?;
            let art = tensor_shapes(&[path.to_path_buf()])?;
            let mut problems: Vec<String> = Vec::new();
            let mut names: Vec<&String> = base.keys().collect();
            names.sort();
            for name in names {
                match art.get(name) {
                    None => problems.push(format!("lacks tensor {name}")),
                    Some(s) if s != &base[name] => problems.push(format!(
                        "tensor {name} has shape {s:?}, the base model has {:?}",
                        base[name]
                    )),
                    Some(_) => {}
                }
            }
            let mut extra: Vec<&String> = art.keys().filter(|k| !base.contains_key(*k)).collect();
            extra.sort();
            problems.extend(
                extra
                    .into_iter()
                    .map(|n| format!("has tensor {n} the base model lacks")),
            );
            if !problems.is_empty() {
                let more = problems.len().saturating_sub(5);
                problems.truncate(5);
                let tail = if more > 0 {
                    format!(" (and {more} more)")
                } else {
                    String::new()
                };
                return Err(bad(format!(
                    "full weights do not match the base model: {}{tail}",
                    problems.join("; ")
                )));
            }
            let vb = mmap_weights(path, &[path.to_path_buf()], dtype, device)?;
            Llama::new(cfg, &vb, None).ctx("building the fine-tuned model")
        }
    }
}
