//! Fine-tuning: LoRA (frozen base, adapters in their own `VarMap`) or full (every weight
//! trainable), with AdamW, a deadline-aware step loop, and artifact output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::artifact::{ARTIFACT_FORMAT, ArtifactManifest, hash_files, write_artifact};
use crate::checkpoint::{
    AdamW, CHECKPOINT_FILE, RunState, load_checkpoint, run_fingerprint, save_checkpoint,
};
use crate::data::{Example, Record, make_batch, tokenize};
use crate::error::{CandleContext, MlError};
use crate::loader::{WeightDtype, check_weight_files, load_base, load_tokenizer};
use crate::lora::{DEFAULT_LORA_TARGETS, Dropout, init_lora, normalize_targets};
use crate::model::{Llama, Mode, masked_nll_sum};
use crate::model_dir::{CONFIG_FILE, ModelDir};
use crate::peft::write_peft_adapter;

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

/// How the learning rate moves over the run (after warm-up).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The peak rate throughout.
    #[default]
    Constant,
    /// Cosine decay from the peak to [`COSINE_FLOOR`] × peak at `max_steps`.
    Cosine,
}

/// Fraction of the peak learning rate the cosine schedule ends at.
pub const COSINE_FLOOR: f64 = 0.1;

/// Hyper-parameters of a training run. `method` is flattened into the object:
/// `{"method": "lora", "rank": 8, "alpha": 16.0, "learning_rate": 0.001, ...}`.
/// Fields after `weight_decay` are optional in JSON; use `..Default::default()` in code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Full or LoRA fine-tuning.
    #[serde(flatten)]
    pub method: Method,
    /// Peak AdamW learning rate.
    pub learning_rate: f64,
    /// Optimiser steps to take unless the deadline stops training first.
    pub max_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Longest sequence in tokens (bos and eos included); longer ones are truncated.
    pub max_seq_len: usize,
    /// Seed of batch order, adapter initialisation and dropout.
    pub seed: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Micro-batches whose gradients are summed into one optimiser step (1 = none).
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    /// Steps of linear warm-up from 0 to the peak learning rate.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Learning-rate schedule after warm-up.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Clip gradients to this global L2 norm (`None`: no clipping).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Dropout on LoRA adapter inputs while training (0 = none).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Batch sequences of similar length together (less padding; batches are shuffled).
    #[serde(default)]
    pub length_bucketing: bool,
    /// Precision of the frozen base weights (LoRA); trainable weights are always f32.
    #[serde(default)]
    pub dtype: WeightDtype,
    /// Write a resumable checkpoint every this many steps (0: never by step count).
    #[serde(default)]
    pub checkpoint_every_steps: usize,
    /// Write a resumable checkpoint when this many seconds passed since the last (0: never).
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_every_secs: f64,
}

fn one() -> usize {
    1
}

fn default_checkpoint_secs() -> f64 {
    120.0
}

impl Default for TrainConfig {
    /// LoRA rank 8 alpha 16, learning rate 1e-3 constant, 100 steps, batch 8, 128 tokens,
    /// seed 0, no weight decay, no accumulation, warm-up, clipping or dropout, a checkpoint
    /// every 120 s.
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
            grad_accum_steps: 1,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            max_grad_norm: None,
            lora_dropout: 0.0,
            length_bucketing: false,
            dtype: WeightDtype::Auto,
            checkpoint_every_steps: 0,
            checkpoint_every_secs: default_checkpoint_secs(),
        }
    }
}

impl TrainConfig {
    /// Learning rate of optimiser step `step` (0-based): linear warm-up, then the schedule.
    pub fn lr_at(&self, step: usize) -> f64 {
        let peak = self.learning_rate;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant => peak,
            LrSchedule::Cosine => {
                let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let done = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * done).cos());
                peak * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * cos)
            }
        }
    }

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
        if self.grad_accum_steps == 0 {
            return bad("grad_accum_steps must be at least 1".into());
        }
        if self.max_seq_len < 2 {
            return bad(format!(
                "max_seq_len must be at least 2, got {}",
                self.max_seq_len
            ));
        }
        if let Some(n) = self.max_grad_norm
            && (!n.is_finite() || n <= 0.0)
        {
            return bad(format!("max_grad_norm must be a positive number, got {n}"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if !self.checkpoint_every_secs.is_finite() || self.checkpoint_every_secs < 0.0 {
            return bad(format!(
                "checkpoint_every_secs must be zero or positive, got {}",
                self.checkpoint_every_secs
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
    /// Steps completed (1-based; counts steps of a resumed run's earlier sessions).
    pub step: usize,
    /// The configured maximum.
    pub max_steps: usize,
    /// Loss of this step (mean over its target tokens).
    pub loss: f32,
    /// Non-padding tokens per second since the step loop began.
    pub tokens_per_sec: f64,
    /// Time since `train` was called.
    pub elapsed: Duration,
    /// Non-padding tokens trained on so far.
    pub tokens: u64,
    /// Learning rate used by this step.
    pub learning_rate: f64,
    /// Global L2 norm of this step's gradient, before clipping.
    pub grad_norm: f64,
    /// Estimated time until training ends (by `max_steps` or by the deadline, whichever
    /// comes first).
    pub time_left: Duration,
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
    /// Step this run resumed from (0: a fresh start).
    #[serde(default)]
    pub resumed_from: usize,
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

/// Trains on `records` starting from the model in `model`; `lora_targets` names the
/// linear layers adapted by LoRA (ignored for full fine-tuning).
///
/// Each optimiser step sums the gradients of `grad_accum_steps` micro-batches, clips
/// them to `max_grad_norm`, and applies AdamW at the scheduled learning rate.
/// Stops after `cfg.max_steps` steps, or earlier when a step might not finish before
/// `deadline` with `margin` to spare (it stops when now + 1.5 × mean step time + margin
/// would pass the deadline), and fails with [`MlError::Cancelled`] when `cancel` is set.
/// Calls `progress` after every step.
///
/// Writes `out_dir/checkpoint.safetensors` (trainable weights and AdamW moments) as the
/// config asks; a later call with the same model, data and config resumes from it, so a
/// killed miner loses at most one checkpoint interval. At the end writes
/// `out_dir/artifact.safetensors` (adapter tensors under PEFT names for LoRA, every weight
/// under its HF name for full) with the manifest in its metadata under `tunenet_manifest`,
/// `out_dir/manifest.json`, and for LoRA also a PEFT adapter (`adapter_config.json`,
/// `adapter_model.safetensors`); the checkpoint is then removed.
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
    let devices = [device.clone()];
    train_data_parallel(
        model,
        records,
        cfg,
        lora_targets,
        deadline,
        margin,
        &devices,
        None,
        cancel,
        progress,
        out_dir,
    )
}

/// [`train_with_targets`] over several devices at once (data parallelism): one replica of
/// the model per device, each micro-batch split into one contiguous slice per device, each
/// slice's gradient taken against the whole micro-batch's token count, and the gradients
/// summed across devices through `collective` (made for the devices by
/// [`crate::collective_for`] when `None`: NCCL between GPUs with the `nccl` feature,
/// threads otherwise) before every replica clips and applies the same AdamW update. So the
/// replicas stay identical, and the run computes what one device accumulating the same
/// micro-batches computes, up to the order of floating-point additions. (With LoRA dropout
/// the masks are drawn per slice, so the runs then differ by their random draws.) The
/// first device leads: it decides when to stop (deadline, cancellation) for all, reports
/// progress, writes checkpoints and the artifact. A failure on any device fails the run.
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel(
    model: &ModelDir,
    records: &[Record],
    cfg: &TrainConfig,
    lora_targets: &[String],
    deadline: Option<Instant>,
    margin: Duration,
    devices: &[Device],
    collective: Option<std::sync::Arc<dyn crate::parallel::Collective>>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
    out_dir: &Path,
) -> Result<TrainReport, MlError> {
    // Dropped last: the run's free memory goes back to the kernel when it ends.
    let _give_back = crate::alloc::GiveBackWhenDone;
    let start = Instant::now();
    cfg.validate()?;
    let Some(lead_device) = devices.first() else {
        return Err(MlError::Invalid(
            "training needs at least one device".into(),
        ));
    };
    let collective = match collective {
        Some(c) if c.world() == devices.len() => c,
        Some(c) => {
            return Err(MlError::Invalid(format!(
                "a collective of {} ranks cannot serve {} devices",
                c.world(),
                devices.len()
            )));
        }
        None => crate::parallel::collective_for(devices)?,
    };
    let base_cfg = model.config()?;
    let tok = load_tokenizer(model, &base_cfg)?;
    let examples = tokenize(&tok, &base_cfg, records, cfg.max_seq_len)?;
    if examples.is_empty() {
        return Err(MlError::Invalid(format!(
            "no usable training records among {}: every record is empty or its response was truncated away; check the dataset and max_seq_len",
            records.len()
        )));
    }
    let weight_files = model.weight_files()?;
    check_weight_files(&model.path, &weight_files)?;
    let mut hashed = vec![model.path.join(CONFIG_FILE)];
    hashed.extend(weight_files.iter().cloned());
    let base_model_hash = hash_files(&hashed)?;

    let lead = build_replica(
        model,
        &base_cfg,
        cfg,
        lora_targets,
        &weight_files,
        lead_device,
    )?;
    let targets = lead.targets.clone();
    let mut opt = AdamW::new(lead.named, cfg.weight_decay);
    let mut order = BatchOrder::new(&examples, cfg.batch_size, cfg.seed, cfg.length_bucketing);
    let ckpt_path = out_dir.join(CHECKPOINT_FILE);
    let fingerprint = run_fingerprint(cfg, &targets, &base_model_hash, records)?;
    let mut state = RunState::default();
    if ckpt_path.is_file() {
        match load_checkpoint(&ckpt_path, &fingerprint, &mut opt, lead_device)? {
            Some(s) => {
                for _ in 0..s.steps * cfg.grad_accum_steps {
                    order.next();
                }
                tracing::info!(step = s.steps, "resuming training from checkpoint");
                state = s;
            }
            None => tracing::warn!(
                path = %ckpt_path.display(),
                "ignoring a checkpoint from a different run"
            ),
        }
    }
    // The other replicas start from the leader's weights and moments (LoRA's random
    // initialisation included), so every replica applies the same updates to the same
    // values.
    let mut others = Vec::with_capacity(devices.len() - 1);
    for d in &devices[1..] {
        let r = build_replica(model, &base_cfg, cfg, lora_targets, &weight_files, d)?;
        let mut o = AdamW::new(r.named, cfg.weight_decay);
        o.copy_state_from(&opt, d)
            .ctx("copying the leader's weights to a replica")?;
        others.push((r.llama, o, r.dropout, d.clone()));
    }
    let resumed_from = state.steps;
    let shared = RankShared {
        examples: &examples,
        cfg,
        world: devices.len(),
    };
    let lead_extra = Leader {
        deadline,
        margin,
        cancel,
        progress,
        out_dir,
        ckpt_path: &ckpt_path,
        fingerprint: &fingerprint,
        start,
    };
    let (state, stopped_by_deadline, opt, frozen) = std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .into_iter()
            .enumerate()
            .map(|(k, (llama, mut o, dropout, d))| {
                let (collective, shared, order) = (collective.clone(), &shared, order.clone());
                let state = state.clone();
                scope.spawn(move || -> Result<(), MlError> {
                    let mut comm = collective.join(k + 1, &d)?;
                    run_rank(
                        shared,
                        comm.as_mut(),
                        &llama,
                        &mut o,
                        dropout.as_ref(),
                        order,
                        state,
                        &d,
                        None,
                    )
                    .map(|_| ())
                })
            })
            .collect();
        let lead_result = collective.join(0, lead_device).and_then(|mut comm| {
            run_rank(
                &shared,
                comm.as_mut(),
                &lead.llama,
                &mut opt,
                lead.dropout.as_ref(),
                order,
                state,
                lead_device,
                Some(lead_extra),
            )
        });
        let mut first_err = lead_result.as_ref().err().map(|e| e.to_string());
        for (k, h) in handles.into_iter().enumerate() {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(MlError::Invalid("a training replica panicked".into())));
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(format!("replica on device {}: {e}", k + 1));
            }
        }
        match (lead_result, first_err) {
            (Ok((state, stopped)), None) => Ok((state, stopped, opt, lead.frozen)),
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(MlError::Invalid(format!(
                "data-parallel training failed: {e}"
            ))),
        }
    })?;
    tracing::debug!(
        steps = state.steps,
        tokens = state.tokens,
        final_loss = state.final_loss,
        devices = devices.len(),
        "training finished"
    );

    let mut tensors: Vec<(String, Tensor)> = opt
        .vars
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    tensors.extend(frozen);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest = ArtifactManifest {
        format: ARTIFACT_FORMAT.to_string(),
        method: cfg.method.clone(),
        target_modules: targets.clone(),
        base_config: base_cfg,
        base_model_hash,
        steps: state.steps,
        tokens: state.tokens,
        final_train_loss: state.final_loss,
        train_config: cfg.clone(),
    };
    if let Method::Lora { rank, alpha } = cfg.method {
        write_peft_adapter(out_dir, &tensors, rank, alpha, cfg.lora_dropout, &targets)?;
    }
    let artifact = write_artifact(out_dir, tensors, &manifest)?;
    if ckpt_path.is_file() {
        std::fs::remove_file(&ckpt_path)
            .map_err(|e| MlError::io("cannot remove finished checkpoint", &ckpt_path, e))?;
    }
    Ok(TrainReport {
        steps: state.steps,
        first_loss: state.first_loss,
        final_loss: state.final_loss,
        tokens: state.tokens,
        seconds: start.elapsed().as_secs_f64(),
        stopped_by_deadline,
        artifact,
        manifest,
        resumed_from,
    })
}

/// One device's copy of the model being trained.
struct Replica {
    llama: Llama,
    named: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
    targets: Vec<String>,
    dropout: Option<Dropout>,
}

fn build_replica(
    model: &ModelDir,
    base_cfg: &crate::config::LlamaConfig,
    cfg: &TrainConfig,
    lora_targets: &[String],
    weight_files: &[PathBuf],
    device: &Device,
) -> Result<Replica, MlError> {
    Ok(match &cfg.method {
        Method::Lora { rank, alpha } => {
            let targets = normalize_targets(lora_targets)?;
            let (varmap, mut weights) =
                init_lora(base_cfg, &targets, *rank, *alpha, cfg.seed, device)?;
            let dropout = (cfg.lora_dropout > 0.0).then(|| Dropout::new(cfg.lora_dropout, 0));
            weights.dropout = dropout.clone();
            let mut llama = load_base(
                model,
                base_cfg,
                cfg.dtype.resolve(device),
                device,
                Some(&weights),
            )?;
            // The base is frozen: on a CPU its weights run tunenet's packed product, forward
            // and backward (f32 only; elsewhere nothing changes).
            llama
                .pack_frozen_for_cpu()
                .ctx("packing the frozen base weights")?;
            let mut named: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .map_err(|_| MlError::Invalid("LoRA variable map lock poisoned".into()))?
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            Replica {
                llama,
                named,
                frozen: Vec::new(),
                targets,
                dropout,
            }
        }
        Method::Full => {
            let mut vars = Vec::new();
            let mut frozen = Vec::new();
            let mut map = HashMap::new();
            for f in weight_files {
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
            let llama = Llama::new(base_cfg, &vb, None).map_err(|e| MlError::ModelDir {
                path: model.path.clone(),
                problem: format!("weights do not fit config.json: {e}"),
            })?;
            Replica {
                llama,
                named: vars,
                frozen,
                targets: Vec::new(),
                dropout: None,
            }
        }
    })
}

/// What every rank reads.
struct RankShared<'a> {
    examples: &'a [Example],
    cfg: &'a TrainConfig,
    world: usize,
}

/// What only the leading rank does: decide when to stop, report, checkpoint.
struct Leader<'a> {
    deadline: Option<Instant>,
    margin: Duration,
    cancel: &'a AtomicBool,
    progress: &'a mut dyn FnMut(&Progress),
    out_dir: &'a Path,
    ckpt_path: &'a Path,
    fingerprint: &'a str,
    start: Instant,
}

/// Step-loop verdicts the leader sends every rank before each step.
const GO: f32 = 0.0;
const STOP_DEADLINE: f32 = 1.0;
const CANCELLED: f32 = 2.0;
const NO_TIME: f32 = 3.0;

/// One rank's step loop; every rank runs the same steps on its slice of each micro-batch.
/// Returns the run's counters and whether the deadline stopped it. A rank that fails on
/// its own (not by the leader's verdict, which every rank follows together) aborts the
/// collective, so the other ranks fail too instead of waiting for it.
#[allow(clippy::too_many_arguments)]
fn run_rank(
    sh: &RankShared<'_>,
    comm: &mut dyn crate::parallel::RankComm,
    llama: &Llama,
    opt: &mut AdamW,
    dropout: Option<&Dropout>,
    order: BatchOrder,
    state: RunState,
    device: &Device,
    lead: Option<Leader<'_>>,
) -> Result<(RunState, bool), MlError> {
    let r = rank_steps(sh, comm, llama, opt, dropout, order, state, device, lead);
    if let Err(e) = &r
        && !matches!(
            e,
            MlError::Cancelled { .. } | MlError::NoTimeToTrain { .. } | MlError::Diverged { .. }
        )
    {
        comm.abort();
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn rank_steps(
    sh: &RankShared<'_>,
    comm: &mut dyn crate::parallel::RankComm,
    llama: &Llama,
    opt: &mut AdamW,
    dropout: Option<&Dropout>,
    mut order: BatchOrder,
    mut state: RunState,
    device: &Device,
    mut lead: Option<Leader<'_>>,
) -> Result<(RunState, bool), MlError> {
    let cfg = sh.cfg;
    let (rank, world) = (comm.rank(), sh.world);
    let loop_start = Instant::now();
    let mut last_ckpt = Instant::now();
    let (mut session_steps, mut session_tokens) = (0usize, 0u64);
    while state.steps < cfg.max_steps {
        // The leader's verdict, the same on every rank.
        let mut verdict = GO;
        if let Some(l) = &lead {
            if l.cancel.load(Ordering::Relaxed) {
                verdict = CANCELLED;
            } else if let Some(deadline) = l.deadline {
                let mean_step =
                    (session_steps > 0).then(|| loop_start.elapsed().div_f64(session_steps as f64));
                let need = match mean_step {
                    None => l.margin,
                    Some(m) => m.mul_f64(1.5) + l.margin,
                };
                let fits = Instant::now()
                    .checked_add(need)
                    .is_some_and(|end| end <= deadline);
                if !fits {
                    verdict = if session_steps == 0 && state.steps == 0 {
                        NO_TIME
                    } else {
                        STOP_DEADLINE
                    };
                }
            }
        }
        if world > 1 {
            let v = Tensor::new(&[verdict], device).ctx("sharing the step verdict")?;
            verdict = comm.all_reduce_sum(&[v])?[0]
                .to_vec1::<f32>()
                .ctx("reading the step verdict")?[0];
        }
        if verdict == CANCELLED {
            return Err(MlError::Cancelled { steps: state.steps });
        }
        if verdict == NO_TIME {
            let margin = lead.as_ref().map(|l| l.margin).unwrap_or_default();
            return Err(MlError::NoTimeToTrain { margin });
        }
        if verdict == STOP_DEADLINE {
            return Ok((state, true));
        }
        let lr = cfg.lr_at(state.steps);
        let mut local_loss = 0f32;
        let mut step_tokens = 0usize;
        let mut grads: Option<Vec<Tensor>> = None;
        for micro in 0..cfg.grad_accum_steps {
            if let Some(d) = dropout {
                d.reseed(
                    cfg.seed
                        ^ ((state.steps as u64) << 16)
                        ^ (micro as u64)
                        ^ ((rank as u64) << 40)
                        ^ 0x6472_6f70_0000_0000,
                );
            }
            let picked: Vec<&Example> = order.next().into_iter().map(|i| &sh.examples[i]).collect();
            // Every slice's loss is over the whole micro-batch's predicted tokens, so the
            // slices' gradients add up to the micro-batch's.
            let predicted: usize = picked.iter().map(|e| e.targets()).sum();
            let per = picked.len().div_ceil(world);
            let mine: Vec<&Example> = picked.iter().skip(rank * per).take(per).copied().collect();
            let (loss, n_tokens, g) = if mine.is_empty() {
                let zeros = opt
                    .vars
                    .iter()
                    .map(|p| p.var.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()
                    .ctx("a replica with no examples this step")?;
                (0.0, 0, zeros)
            } else {
                micro_step(
                    llama,
                    opt,
                    &mine,
                    predicted.max(1),
                    cfg.grad_accum_steps,
                    device,
                )
                .ctx("running a training step")?
            };
            local_loss += loss;
            step_tokens += n_tokens;
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(g.iter())
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()
                    .ctx("accumulating gradients")?,
            });
        }
        let mut grads = grads.unwrap_or_default();
        let mut loss = local_loss / cfg.grad_accum_steps as f32;
        if world > 1 {
            let counters =
                Tensor::new(&[loss, step_tokens as f32], device).ctx("sharing the step's loss")?;
            grads.push(counters);
            let mut summed = comm.all_reduce_sum(&grads)?;
            let counters = summed
                .pop()
                .map(|t| t.to_vec1::<f32>())
                .transpose()
                .ctx("reading the step's loss")?
                .unwrap_or_default();
            loss = counters.first().copied().unwrap_or(f32::NAN);
            step_tokens = counters.get(1).map(|t| t.round() as usize).unwrap_or(0);
            grads = summed;
        }
        state.steps += 1;
        session_steps += 1;
        if !loss.is_finite() {
            return Err(MlError::Diverged {
                step: state.steps,
                loss,
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm.unwrap_or(f64::INFINITY))
            .ctx("clipping gradients")?;
        opt.step(&grads, lr).ctx("applying the optimiser")?;
        state.tokens += step_tokens as u64;
        session_tokens += step_tokens as u64;
        if state.steps == 1 {
            state.first_loss = loss;
        }
        state.final_loss = loss;
        let Some(l) = lead.as_mut() else { continue };
        let secs = loop_start.elapsed().as_secs_f64();
        let per_step = loop_start.elapsed().div_f64(session_steps as f64);
        let mut time_left = per_step.mul_f64((cfg.max_steps - state.steps) as f64);
        if let Some(deadline) = l.deadline {
            time_left = time_left.min(
                deadline
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(l.margin),
            );
        }
        (l.progress)(&Progress {
            step: state.steps,
            max_steps: cfg.max_steps,
            loss,
            tokens_per_sec: if secs > 0.0 {
                session_tokens as f64 / secs
            } else {
                0.0
            },
            elapsed: l.start.elapsed(),
            tokens: state.tokens,
            learning_rate: lr,
            grad_norm,
            time_left,
        });
        let by_steps = cfg.checkpoint_every_steps > 0
            && state.steps.is_multiple_of(cfg.checkpoint_every_steps);
        let by_time = cfg.checkpoint_every_secs > 0.0
            && last_ckpt.elapsed().as_secs_f64() >= cfg.checkpoint_every_secs;
        if (by_steps || by_time) && state.steps < cfg.max_steps {
            save_checkpoint(l.out_dir, l.ckpt_path, l.fingerprint, &state, opt)?;
            last_ckpt = Instant::now();
        }
    }
    Ok((state, false))
}

/// One micro-batch (or one device's slice of it) forward/backward: its summed loss over
/// `predicted` (the whole micro-batch's predicted tokens), its non-padding tokens, and the
/// gradients (of that loss / `accum`) of every trainable variable, in optimiser order.
fn micro_step(
    llama: &Llama,
    opt: &AdamW,
    picked: &[&Example],
    predicted: usize,
    accum: usize,
    device: &Device,
) -> candle_core::Result<(f32, usize, Vec<Tensor>)> {
    let batch = make_batch(picked, device)?;
    // The trained weights' gradients come back through the model's kept store.
    llama.kept_grads().clear();
    let logits = llama.forward(&batch.inputs, &batch.key_mask, Mode::Train)?;
    let sum = masked_nll_sum(&logits, &batch.targets, &batch.loss_mask)?;
    let loss = (sum / predicted as f64)?;
    let scaled = (&loss / accum as f64)?;
    let mut store = scaled.backward()?;
    llama.kept_grads().drain_into(&mut store)?;
    let grads = opt
        .vars
        .iter()
        .map(|p| match store.get(p.var.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => p.var.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((loss.to_scalar::<f32>()?, batch.tokens, grads))
}

/// Scales `grads` so that their global L2 norm is at most `max`; returns the norm before.
fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if norm > max {
        let f = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

/// Seeded order over example indices, cycling forever: epoch-wise shuffles of single
/// examples, or (length bucketing) of batches of similar-length examples.
#[derive(Clone)]
struct BatchOrder {
    rng: StdRng,
    batches: Vec<Vec<usize>>,
    singles: Option<Vec<usize>>,
    batch_size: usize,
    pos: usize,
}

impl BatchOrder {
    fn new(examples: &[Example], batch_size: usize, seed: u64, bucketing: bool) -> BatchOrder {
        let n = examples.len();
        if bucketing {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by_key(|&i| (examples[i].ids.len(), i));
            let batches: Vec<Vec<usize>> = idx.chunks(batch_size).map(|c| c.to_vec()).collect();
            let pos = batches.len();
            BatchOrder {
                rng: StdRng::seed_from_u64(seed),
                batches,
                singles: None,
                batch_size,
                pos,
            }
        } else {
            BatchOrder {
                rng: StdRng::seed_from_u64(seed),
                batches: Vec::new(),
                singles: Some((0..n).collect()),
                batch_size,
                pos: n,
            }
        }
    }

    fn next(&mut self) -> Vec<usize> {
        match &mut self.singles {
            Some(perm) => (0..self.batch_size)
                .map(|_| {
                    if self.pos >= perm.len() {
                        perm.shuffle(&mut self.rng);
                        self.pos = 0;
                    }
                    self.pos += 1;
                    perm[self.pos - 1]
                })
                .collect(),
            None => {
                if self.pos >= self.batches.len() {
                    self.batches.shuffle(&mut self.rng);
                    self.pos = 0;
                }
                self.pos += 1;
                self.batches[self.pos - 1].clone()
            }
        }
    }
}
