//! Resumable training state: an AdamW whose moments can be saved, and checkpoints that
//! hold the trainable weights, the moments and the run's counters.

use std::collections::BTreeMap;
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
                // Two allocations: the CPU step updates each moment in place.
                let m = var.as_tensor().zeros_like().ok()?;
                let v = var.as_tensor().zeros_like().ok()?;
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
            // Copies of their own: on the leader's device `to_device` would share its
            // storage, and the CPU step updates moments in place.
            p.m = q.m.to_device(device)?.copy()?;
            p.v = q.v.to_device(device)?.copy()?;
        }
        self.t = other.t;
        Ok(())
    }

    /// Applies one update with `grads` (in the order of `vars`) at learning rate `lr`.
    pub(crate) fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.step_with(grads, lr, true)
    }

    /// [`AdamW::step`], with the fused CPU step allowed or not.
    fn step_with(&mut self, grads: &[Tensor], lr: f64, fuse: bool) -> candle_core::Result<()> {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2 = 1.0 - BETA2.powi(self.t as i32);
        for (p, g) in self.vars.iter_mut().zip(grads) {
            if fuse && fused_step_applies(p, g) {
                p.m.inplace_op2(g, &Moment::first())?;
                p.v.inplace_op2(g, &Moment::second())?;
                let update = Update::new(lr, self.weight_decay, bc1, bc2);
                p.var.as_tensor().inplace_op3(&p.m, &p.v, &update)?;
                continue;
            }
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

/// Whether `p` takes the fused step: f32 on the CPU, every tensor contiguous and of one
/// size, the moments distinct tensors (this optimizer never makes views of them, so
/// distinct tensors are distinct storage; candle refuses an in-place op whose source
/// shares the weight's storage). The fused step makes three passes over
/// memory, in place; the tensor-op step (for the rest: GPUs, other layouts) makes a dozen,
/// each allocating its result. Both give the same bits.
fn fused_step_applies(p: &Param, g: &Tensor) -> bool {
    let theta = p.var.as_tensor();
    let all = [theta, &p.m, &p.v, g];
    all.iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == DType::F32
            && t.is_contiguous()
            && t.elem_count() == theta.elem_count()
    }) && p.m.id() != p.v.id()
        && p.m.id() != theta.id()
        && p.v.id() != theta.id()
}

/// The contiguous f32 slice a tensor's storage and layout describe.
fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    crate::fused::contiguous(s, l, "adamw: a tensor")
}

/// The contiguous f32 slice of a tensor updated in place (`what` names it in errors).
fn f32_slice_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: a strided {what}")))?;
    let candle_core::CpuStorage::F32(data) = s else {
        candle_core::bail!("adamw: the {what} is not f32");
    };
    Ok(&mut data[start..end])
}

/// An AdamW moment updated in place from the gradient: `m <- beta m + (1 - beta) g`, or
/// with `g * g` for the second moment. The arithmetic is the tensor-op step's, in the same
/// order and precision.
struct Moment {
    beta: f32,
    one_minus_beta: f32,
    square: bool,
}

impl Moment {
    fn first() -> Moment {
        Moment {
            beta: BETA1 as f32,
            one_minus_beta: (1.0 - BETA1) as f32,
            square: false,
        }
    }

    fn second() -> Moment {
        Moment {
            beta: BETA2 as f32,
            one_minus_beta: (1.0 - BETA2) as f32,
            square: true,
        }
    }
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let g = f32_slice(s2, l2)?;
        let m = f32_slice_mut(s1, l1, "moment")?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: {} moments for {} gradients", m.len(), g.len());
        }
        for (m, &g) in m.iter_mut().zip(g) {
            let x = if self.square { g * g } else { g };
            *m = (*m * self.beta + 0.0) + (x * self.one_minus_beta + 0.0);
        }
        Ok(())
    }
}

/// The weight's update in place from both moments:
/// `theta <- theta (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)`, as the tensor-op
/// step computes it.
struct Update {
    decay: f32,
    lr: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
}

impl Update {
    fn new(lr: f64, weight_decay: f64, bc1: f64, bc2: f64) -> Update {
        Update {
            decay: (1.0 - lr * weight_decay) as f32,
            lr: lr as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: EPS as f32,
        }
    }
}

impl candle_core::InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let theta = f32_slice_mut(s1, l1, "weight")?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw: weight, moments and gradient differ in size");
        }
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            let m_hat = m * self.inv_bc1 + 0.0;
            let v_hat = v * self.inv_bc2 + 0.0;
            let update = m_hat / (v_hat.sqrt() * 1.0 + self.eps);
            *t = (*t * self.decay + 0.0) - (update * self.lr + 0.0);
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
    let meta = BTreeMap::from([(STATE_KEY.to_string(), state)]);
    let tmp = path.with_extension("safetensors.tmp");
    crate::st_write::write(&tmp, tensors, &meta).map_err(|e| MlError::Artifact {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused in-place CPU step gives the tensor-op step's bits, over several steps
    /// with weight decay, and leaves no moment shared between parameters or replicas.
    #[test]
    fn the_fused_adamw_step_gives_the_tensor_op_steps_bits() {
        let dev = Device::Cpu;
        let make = || {
            let w = Tensor::randn(0f32, 1.0, (37, 29), &dev).unwrap();
            let named = vec![
                ("a".to_string(), Var::from_tensor(&w).unwrap()),
                (
                    "b".to_string(),
                    Var::from_tensor(&(&w * 0.5).unwrap()).unwrap(),
                ),
            ];
            AdamW::new(named, 0.01)
        };
        let mut fused = make();
        let mut plain = make();
        for (p, q) in fused.vars.iter().zip(&plain.vars) {
            q.var.set(p.var.as_tensor()).unwrap();
        }
        for step in 0..4 {
            let grads: Vec<Tensor> = (0..2)
                .map(|i| Tensor::randn(0f32, 1.0 + (step + i) as f32, (37, 29), &dev).unwrap())
                .collect();
            assert!(fused_step_applies(&fused.vars[0], &grads[0]));
            fused.step_with(&grads, 1e-3, true).unwrap();
            plain.step_with(&grads, 1e-3, false).unwrap();
            for (p, q) in fused.vars.iter().zip(&plain.vars) {
                for (a, b) in [
                    (p.var.as_tensor(), q.var.as_tensor()),
                    (&p.m, &q.m),
                    (&p.v, &q.v),
                ] {
                    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "step {step}: {} differs", p.name);
                }
            }
        }
        // A replica's moments are its own: stepping it leaves the leader's alone.
        let mut replica = make();
        replica.copy_state_from(&fused, &dev).unwrap();
        let before: Vec<f32> = fused.vars[0].m.flatten_all().unwrap().to_vec1().unwrap();
        let grads: Vec<Tensor> = (0..2)
            .map(|_| Tensor::ones((37, 29), DType::F32, &dev).unwrap())
            .collect();
        replica.step(&grads, 1e-3).unwrap();
        let after: Vec<f32> = fused.vars[0].m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(before, after);
    }
}
