//! Resumable training state: an AdamW whose moments can be saved, and checkpoints that
//! hold the trainable weights, the moments and the run's counters.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::{Record, to_jsonl};
use crate::error::{CandleContext, MlError};
use crate::train::TrainConfig;

/// File name of the training checkpoint in the output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const STATE_KEY: &str = "tunenet_train_state";
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One trainable tensor and its AdamW moments.
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW with decoupled weight decay (as in candle and PyTorch), betas (0.9, 0.999),
/// eps 1e-8; its moments are ours so they can be checkpointed.
pub(crate) struct AdamW {
    pub(crate) vars: Vec<Param>,
    weight_decay: f64,
    t: u64,
}

impl AdamW {
    pub(crate) fn new(named: Vec<(String, Var)>, weight_decay: f64) -> AdamW {
        let vars = named
            .into_iter()
            .filter_map(|(name, var)| {
                let m = var.as_tensor().zeros_like().ok()?;
                let v = m.clone();
                Some(Param { name, var, m, v })
            })
            .collect();
        AdamW {
            vars,
            weight_decay,
            t: 0,
        }
    }

    /// Takes `other`'s weights, moments and step count (same variables, same order), on
    /// `device`: a data-parallel replica starting where the leader is.
    pub(crate) fn copy_state_from(
        &mut self,
        other: &AdamW,
        device: &Device,
    ) -> candle_core::Result<()> {
        if self.vars.len() != other.vars.len() {
            candle_core::bail!(
                "replica has {} trainable tensors, the leader {}",
                self.vars.len(),
                other.vars.len()
            );
        }
        for (p, q) in self.vars.iter_mut().zip(&other.vars) {
            p.var.set(&q.var.as_tensor().to_device(device)?)?;
            p.m = q.m.to_device(device)?;
            p.v = q.v.to_device(device)?;
        }
        self.t = other.t;
        Ok(())
    }

    /// Applies one update with `grads` (in the order of `vars`) at learning rate `lr`.
    pub(crate) fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2 = 1.0 - BETA2.powi(self.t as i32);
        for (p, g) in self.vars.iter_mut().zip(grads) {
            let theta = p.var.as_tensor();
            let m = ((&p.m * BETA1)? + (g * (1.0 - BETA1))?)?;
            let v = ((&p.v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let decayed = (theta * (1.0 - lr * self.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + EPS)?)?;
            p.var.set(&(decayed - (update * lr)?)?)?;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }
}

/// Counters of a run, saved with its checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct RunState {
    pub(crate) steps: usize,
    pub(crate) tokens: u64,
    pub(crate) first_loss: f32,
    pub(crate) final_loss: f32,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    fingerprint: String,
    adam_t: u64,
    run: RunState,
}

/// blake3 of what makes a run: its config (checkpoint cadence aside), targets, base model
/// and data. A checkpoint only resumes the run with the same fingerprint.
pub(crate) fn run_fingerprint(
    cfg: &TrainConfig,
    targets: &[String],
    base_hash: &str,
    records: &[Record],
) -> Result<String, MlError> {
    let mut c = cfg.clone();
    c.checkpoint_every_secs = 0.0;
    c.checkpoint_every_steps = 0;
    let json = serde_json::to_vec(&(c, targets, base_hash))
        .map_err(|e| MlError::Invalid(format!("cannot serialise the training config: {e}")))?;
    let mut h = blake3::Hasher::new();
    h.update(&json);
    h.update(&to_jsonl(records));
    Ok(h.finalize().to_hex().to_string())
}

/// Writes the checkpoint atomically (temporary file, then rename).
pub(crate) fn save_checkpoint(
    out_dir: &Path,
    path: &Path,
    fingerprint: &str,
    run: &RunState,
    opt: &AdamW,
) -> Result<(), MlError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| MlError::io("cannot create output dir", out_dir, e))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(opt.vars.len() * 3);
    for p in &opt.vars {
        tensors.push((format!("w.{}", p.name), p.var.as_tensor().clone()));
        tensors.push((format!("m.{}", p.name), p.m.clone()));
        tensors.push((format!("v.{}", p.name), p.v.clone()));
    }
    let state = serde_json::to_string(&SavedState {
        fingerprint: fingerprint.to_string(),
        adam_t: opt.t,
        run: run.clone(),
    })
    .map_err(|e| MlError::Invalid(format!("cannot serialise the training state: {e}")))?;
    let meta = HashMap::from([(STATE_KEY.to_string(), state)]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(tensors, Some(meta), &tmp).map_err(|e| MlError::Artifact {
        path: tmp.clone(),
        problem: format!("cannot write checkpoint: {e}"),
    })?;
    std::fs::rename(&tmp, path)
        .map_err(|e| MlError::io("cannot move checkpoint into place", path, e))
}

/// Restores weights and moments into `opt` from a checkpoint of the run `fingerprint`;
/// `Ok(None)` when the checkpoint belongs to another run.
pub(crate) fn load_checkpoint(
    path: &Path,
    fingerprint: &str,
    opt: &mut AdamW,
    device: &Device,
) -> Result<Option<RunState>, MlError> {
    let bad = |problem: String| MlError::Artifact {
        path: path.to_path_buf(),
        problem: format!("{problem}; delete the checkpoint to start the run afresh"),
    };
    let bytes = std::fs::read(path).map_err(|e| MlError::io("cannot read checkpoint", path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("is not a readable checkpoint: {e}")))?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad("has no training state".into()))?;
    let state: SavedState =
        serde_json::from_str(state).map_err(|e| bad(format!("has a malformed state: {e}")))?;
    if state.fingerprint != fingerprint {
        return Ok(None);
    }
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).ctx("loading checkpoint")?;
    for p in opt.vars.iter_mut() {
        let get = |prefix: &str| -> Result<Tensor, MlError> {
            let name = format!("{prefix}.{}", p.name);
            let t = tensors
                .get(&name)
                .ok_or_else(|| bad(format!("lacks tensor {name}")))?;
            if t.dims() != p.var.as_tensor().dims() {
                return Err(bad(format!("tensor {name} has shape {:?}", t.dims())));
            }
            t.to_dtype(DType::F32).ctx("loading checkpoint")
        };
        let (w, m, v) = (get("w")?, get("m")?, get("v")?);
        p.var.set(&w).ctx("restoring a weight")?;
        p.m = m;
        p.v = v;
    }
    opt.t = state.adam_t;
    Ok(Some(state.run))
}
