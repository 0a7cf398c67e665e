//! Fine-tuning: LoRA (frozen base, adapters in their own `VarMap`) or full (every weight
//! trainable), with AdamW, a deadline-aware step loop, and artifact output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::artifact::{ARTIFACT_FORMAT, ArtifactManifest, hash_files, write_artifact};
use crate::data::{Example, Record, make_batch, tokenize};
use crate::error::{CandleContext, MlError};
use crate::lora::{DEFAULT_LORA_TARGETS, init_lora, normalize_targets};
use crate::model::{Llama, Mode, masked_nll_sum};
use crate::model_dir::{CONFIG_FILE, ModelDir};
use crate::tokenizer::TextTokenizer;

/// How to fine-tune. Serialised with a `"method"` tag: `{"method": "full"}` or
/// `{"method": "lora", "rank": 8, "alpha": 16.0}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Train every weight.
    Full,
    /// Train a low-rank adapter on a frozen base; the update is scaled by `alpha / rank`.
    Lora {
        /// Rank of the adapter matrices.
        rank: usize,
        /// Scaling numerator.
        alpha: f64,
    },
}

/// Hyper-parameters of a training run. `method` is flattened into the object:
/// `{"method": "lora", "rank": 8, "alpha": 16.0, "learning_rate": 0.001, ...}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Full or LoRA fine-tuning.
    #[serde(flatten)]
    pub method: Method,
    /// AdamW learning rate (constant).
    pub learning_rate: f64,
    /// Optimiser steps to take unless the deadline stops training first.
    pub max_steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Longest sequence in tokens (bos and eos included); longer ones are truncated.
    pub max_seq_len: usize,
    /// Seed of batch order and adapter initialisation.
    pub seed: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for TrainConfig {
    /// LoRA rank 8 alpha 16, learning rate 1e-3, 100 steps, batch 8, 128 tokens, seed 0, no weight decay.
    fn default() -> Self {
        TrainConfig {
            method: Method::Lora {
                rank: 8,
                alpha: 16.0,
            },
            learning_rate: 1e-3,
            max_steps: 100,
            batch_size: 8,
            max_seq_len: 128,
            seed: 0,
            weight_decay: 0.0,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<(), MlError> {
        let bad = |m: String| Err(MlError::Invalid(format!("bad training config: {m}")));
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return bad(format!(
                "learning_rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return bad(format!(
                "weight_decay must be zero or positive, got {}",
                self.weight_decay
            ));
        }
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.max_seq_len < 2 {
            return bad(format!(
                "max_seq_len must be at least 2, got {}",
                self.max_seq_len
            ));
        }
        if let Method::Lora { rank, alpha } = self.method
            && (rank == 0 || !alpha.is_finite() || alpha <= 0.0)
        {
            return bad(format!(
                "LoRA needs rank >= 1 and a positive alpha, got rank {rank} alpha {alpha}"
            ));
        }
        Ok(())
    }
}

/// Reported after every training step.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Steps completed (1-based).
    pub step: usize,
    /// The configured maximum.
    pub max_steps: usize,
    /// Loss of this step (mean over its target tokens).
    pub loss: f32,
    /// Non-padding tokens per second since the step loop began.
    pub tokens_per_sec: f64,
    /// Time since `train` was called.
    pub elapsed: Duration,
}

/// Outcome of a training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    /// Steps taken.
    pub steps: usize,
    /// Loss of the first step.
    pub first_loss: f32,
    /// Loss of the last step.
    pub final_loss: f32,
    /// Non-padding tokens trained on.
    pub tokens: u64,
    /// Wall time of the whole call, artifact writing included.
    pub seconds: f64,
    /// Whether the deadline (rather than `max_steps`) ended training.
    pub stopped_by_deadline: bool,
    /// Path of the written `artifact.safetensors`.
    pub artifact: PathBuf,
    /// The manifest written with the artifact.
    pub manifest: ArtifactManifest,
}

/// Trains on `records` from the model in `model`, LoRA on the default targets (q_proj,
/// v_proj). See [`train_with_targets`].
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &ModelDir,
    records: &[Record],
    cfg: &TrainConfig,
    deadline: Option<Instant>,
    margin: Duration,
    device: &Device,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
    out_dir: &Path,
) -> Result<TrainReport, MlError> {
    let targets: Vec<String> = DEFAULT_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
    train_with_targets(
        model, records, cfg, &targets, deadline, margin, device, cancel, progress, out_dir,
    )
}

/// What is being trained.
enum Trainable {
    Lora {
        weights: crate::lora::LoraWeights,
        targets: Vec<String>,
    },
    Full {
        vars: Vec<(String, Var)>,
        frozen: Vec<(String, Tensor)>,
    },
}

/// Trains on `records` starting from the model in `model`; `lora_targets` names the
/// linear layers adapted by LoRA (ignored for full fine-tuning).
///
/// Stops after `cfg.max_steps` steps, or earlier when a step might not finish before
/// `deadline` with `margin` to spare (it stops when now + 1.5 × mean step time + margin
/// would pass the deadline), and fails with [`MlError::Cancelled`] when `cancel` is set.
/// Calls `progress` after every step. Writes `out_dir/artifact.safetensors` (adapter
/// tensors under PEFT names for LoRA, every weight under its HF name for full) with the
/// manifest in its metadata under `tunenet_manifest`, and `out_dir/manifest.json`.
#[allow(clippy::too_many_arguments)]
pub fn train_with_targets(
    model: &ModelDir,
    records: &[Record],
    cfg: &TrainConfig,
    lora_targets: &[String],
    deadline: Option<Instant>,
    margin: Duration,
    device: &Device,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
    out_dir: &Path,
) -> Result<TrainReport, MlError> {
    let start = Instant::now();
    cfg.validate()?;
    let base_cfg = model.config()?;
    let tok = TextTokenizer::from_file(&model.tokenizer_path())?;
    let examples = tokenize(&tok, &base_cfg, records, cfg.max_seq_len)?;
    if examples.is_empty() {
        return Err(MlError::Invalid(format!(
            "no usable training records among {}: every record is empty or its response was truncated away; check the dataset and max_seq_len",
            records.len()
        )));
    }
    let weight_files = model.weight_files()?;
    let mut hashed = vec![model.path.join(CONFIG_FILE)];
    hashed.extend(weight_files.iter().cloned());
    let base_model_hash = hash_files(&hashed)?;

    let (llama, vars, trainable) = match &cfg.method {
        Method::Lora { rank, alpha } => {
            let targets = normalize_targets(lora_targets)?;
            // SAFETY: the weight files are memory-mapped read-only and are not modified
            // while the model is in use.
            let vb =
                unsafe { VarBuilder::from_mmaped_safetensors(&weight_files, DType::F32, device) }
                    .ctx("memory-mapping the base weights")?;
            let (varmap, weights) =
                init_lora(&base_cfg, &targets, *rank, *alpha, cfg.seed, device)?;
            let llama = Llama::new(&base_cfg, &vb, Some(&weights)).ctx("building the model")?;
            (
                llama,
                varmap.all_vars(),
                Trainable::Lora { weights, targets },
            )
        }
        Method::Full => {
            let mut vars = Vec::new();
            let mut frozen = Vec::new();
            let mut map = HashMap::new();
            for f in &weight_files {
                let ts = candle_core::safetensors::load(f, device)
                    .ctx(&format!("loading base weights {}", f.display()))?;
                for (name, t) in ts {
                    if t.dtype().is_float() {
                        let var =
                            Var::from_tensor(&t.to_dtype(DType::F32).ctx("converting weights")?)
                                .ctx("creating a variable")?;
                        map.insert(name.clone(), var.as_tensor().clone());
                        vars.push((name, var));
                    } else {
                        frozen.push((name, t));
                    }
                }
            }
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let vb = VarBuilder::from_tensors(map, DType::F32, device);
            let llama = Llama::new(&base_cfg, &vb, None).ctx("building the model")?;
            let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            (llama, all, Trainable::Full { vars, frozen })
        }
    };

    let params = ParamsAdamW {
        lr: cfg.learning_rate,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params).ctx("creating the optimiser")?;
    let mut order = BatchOrder::new(examples.len(), cfg.seed);
    let loop_start = Instant::now();
    let (mut steps, mut tokens) = (0usize, 0u64);
    let (mut first_loss, mut final_loss) = (f32::NAN, f32::NAN);
    let mut stopped_by_deadline = false;
    while steps < cfg.max_steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(MlError::Cancelled { steps });
        }
        if let Some(deadline) = deadline {
            let need = if steps == 0 {
                margin
            } else {
                loop_start.elapsed().mul_f64(1.5 / steps as f64) + margin
            };
            let fits = Instant::now()
                .checked_add(need)
                .is_some_and(|end| end <= deadline);
            if !fits {
                if steps == 0 {
                    return Err(MlError::NoTimeToTrain { margin });
                }
                stopped_by_deadline = true;
                break;
            }
        }
        let picked: Vec<&Example> = order
            .next(cfg.batch_size)
            .into_iter()
            .map(|i| &examples[i])
            .collect();
        let (loss, n_tokens) =
            train_step(&llama, &mut opt, &picked, device).ctx("running a training step")?;
        steps += 1;
        tokens += n_tokens as u64;
        if !loss.is_finite() {
            return Err(MlError::Diverged { step: steps, loss });
        }
        if steps == 1 {
            first_loss = loss;
        }
        final_loss = loss;
        let secs = loop_start.elapsed().as_secs_f64();
        progress(&Progress {
            step: steps,
            max_steps: cfg.max_steps,
            loss,
            tokens_per_sec: if secs > 0.0 {
                tokens as f64 / secs
            } else {
                0.0
            },
            elapsed: start.elapsed(),
        });
    }
    tracing::debug!(steps, tokens, final_loss, "training finished");

    let (tensors, method_targets) = match trainable {
        Trainable::Lora { weights, targets } => (weights.named_tensors(), targets),
        Trainable::Full { vars, frozen } => {
            let mut ts: Vec<(String, Tensor)> = vars
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            ts.extend(frozen);
            ts.sort_by(|a, b| a.0.cmp(&b.0));
            (ts, Vec::new())
        }
    };
    let manifest = ArtifactManifest {
        format: ARTIFACT_FORMAT.to_string(),
        method: cfg.method.clone(),
        target_modules: method_targets,
        base_config: base_cfg,
        base_model_hash,
        steps,
        tokens,
        final_train_loss: final_loss,
        train_config: cfg.clone(),
    };
    let artifact = write_artifact(out_dir, tensors, &manifest)?;
    Ok(TrainReport {
        steps,
        first_loss,
        final_loss,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        stopped_by_deadline,
        artifact,
        manifest,
    })
}

/// One forward/backward/update; returns the step's mean loss and its non-padding tokens.
fn train_step(
    llama: &Llama,
    opt: &mut AdamW,
    picked: &[&Example],
    device: &Device,
) -> candle_core::Result<(f32, usize)> {
    let batch = make_batch(picked, device)?;
    let logits = llama.forward(&batch.inputs, &batch.key_mask, Mode::Train)?;
    let sum = masked_nll_sum(&logits, &batch.targets, &batch.loss_mask)?;
    let loss = (sum / batch.predicted.max(1) as f64)?;
    opt.backward_step(&loss)?;
    Ok((loss.to_scalar::<f32>()?, batch.tokens))
}

/// Seeded, epoch-wise shuffled order over example indices, cycling forever.
struct BatchOrder {
    rng: StdRng,
    perm: Vec<usize>,
    pos: usize,
}

impl BatchOrder {
    fn new(n: usize, seed: u64) -> BatchOrder {
        BatchOrder {
            rng: StdRng::seed_from_u64(seed),
            perm: (0..n).collect(),
            pos: n,
        }
    }

    fn next(&mut self, batch_size: usize) -> Vec<usize> {
        (0..batch_size)
            .map(|_| {
                if self.pos >= self.perm.len() {
                    self.perm.shuffle(&mut self.rng);
                    self.pos = 0;
                }
                self.pos += 1;
                self.perm[self.pos - 1]
            })
            .collect()
    }
}
