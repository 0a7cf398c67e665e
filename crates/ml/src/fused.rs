//! Fused CPU kernels with their backward passes, for training and evaluation.
//!
//! Cross-entropy over the vocabulary: candle's `log_softmax` then `gather` holds several
//! `[rows, vocab]` tensors in the forward pass (shifted logits, their exponentials, the
//! log-probabilities) and as many again in the backward pass (a scattered one-hot
//! gradient, the softmax's), each freshly allocated, for SmolLM2's 49,152 words 50 MB per
//! 256 tokens. The fused forward pass reads the logits twice per row and keeps one number
//! per row; its backward pass writes the one `[rows, vocab]` gradient, `softmax - one-hot`,
//! in a single pass after two reading ones. Off the CPU (or for other dtypes) the same
//! function takes candle's composition, so CUDA keeps one code path.
//!
//! A linear layer with a frozen weight: candle's matmul backward computes the gradient of
//! both factors, so LoRA's frozen base paid a full fine-tuning's weight gradients (a
//! matmul the size of the forward one per layer, and a zeroed weight-sized buffer to add
//! it into, held to the end of the backward pass). [`linear`] records the product as an
//! op whose backward gives the input its gradient and nothing else; its forward is
//! candle's own matmul on the same storages (CPU and CUDA), so the same bits.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};

/// Rows per rayon task: enough work per task that splitting costs nothing.
const ROWS_PER_TASK: usize = 4;

/// Each row's negative log-likelihood of its target: `logits` `[n, v]`, `targets` `[n]`
/// (u32) give `[n]`, `logsumexp(logits[i]) - logits[i, targets[i]]`. Differentiable in
/// `logits`.
pub(crate) fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let logits = logits.contiguous()?;
        let targets = targets.to_dtype(DType::U32)?.contiguous()?;
        logits.apply_op2(&targets, CrossEntropy)
    } else {
        nll_rows_composed(logits, targets)
    }
}

/// `x wᵀ` for `x: [n, in]` and `w: [out, in]`. Where `w` is frozen (neither a variable
/// nor computed from one) and `x` carries a gradient, the backward pass computes `x`'s
/// gradient only. Where `w` trains, the backward pass writes `w`'s gradient in `w`'s own
/// layout, `gᵀ x`: candle's matmul of `x` by the view `wᵀ` computes it as `xᵀ g` for the
/// view, then sums it into a zeroed buffer for the view and again, transposed (a strided
/// pass), into one for `w`. Otherwise (and off the CPU and CUDA) it is candle's matmul.
///
/// Where `w` trains and `kept` is given, the backward pass hands `w`'s gradient to
/// `kept` instead of candle's gradient store, which would sum it into a freshly zeroed
/// buffer (a weight-sized memset and a pass, for every weight, every step); see
/// [`KeptGrads`].
pub(crate) fn linear(x: &Tensor, w: &Tensor, kept: Option<&Arc<KeptGrads>>) -> Result<Tensor> {
    let shapes = x.rank() == 2 && w.rank() == 2 && (x.device().is_cpu() || x.device().is_cuda());
    if shapes && !w.track_op() && x.track_op() {
        x.apply_op1(FrozenLinear { w: w.clone() })
    } else if shapes && w.track_op() {
        x.apply_op2(
            w,
            TrainedLinear {
                kept: kept.cloned(),
            },
        )
    } else {
        x.matmul(&w.t()?)
    }
}

/// Weight gradients that trained linears' backward passes handed over (see
/// [`linear`]), by weight, each summed if the weight served several. The
/// trainer moves them into candle's gradient store after the backward pass
/// ([`KeptGrads::drain_into`]): a gradient arrives there as computed, where candle would
/// add it to zeros, the same values.
#[derive(Debug, Default)]
pub(crate) struct KeptGrads(Mutex<Vec<(Tensor, Tensor)>>);

impl KeptGrads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, w: &Tensor, grad: Tensor) -> Result<()> {
        let mut kept = self.lock();
        match kept.iter_mut().find(|(k, _)| k.id() == w.id()) {
            Some((_, sum)) => *sum = sum.add(&grad)?,
            None => kept.push((w.clone(), grad)),
        }
        Ok(())
    }

    /// Adds row `i` of `grad` into row `ids[i]` of `w`'s kept gradient, in place and in
    /// the order of `ids` (from zeros if there is none yet).
    fn index_add(&self, w: &Tensor, ids: &Tensor, grad: &Tensor) -> Result<()> {
        let mut kept = self.lock();
        let at = match kept.iter().position(|(k, _)| k.id() == w.id()) {
            Some(at) => at,
            None => {
                kept.push((w.clone(), w.zeros_like()?));
                kept.len() - 1
            }
        };
        kept[at].1.inplace_op3(ids, grad, &RowsAdd)
    }

    /// Drops whatever an earlier backward pass left here (one whose step failed before its
    /// gradients were taken), so that it cannot be summed into the next step's.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Moves every kept gradient into `store`, summed with the store's own for the same
    /// weight (a tied embedding's lookup), leaving nothing kept.
    pub(crate) fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        for (w, grad) in std::mem::take(&mut *self.lock()) {
            let grad = match store.remove(&w) {
                Some(other) => grad.add(&other)?,
                None => grad,
            };
            store.insert(&w, grad);
        }
        Ok(())
    }
}

/// `x wᵀ` on a device's storages: candle's own matmul, `x` `[m, k]` by the view `wᵀ` of
/// `w` `[n, k]`, the shapes checked.
fn linear_product<B: BackendStorage>(x: &B, l: &Layout, w: &B, wl: &Layout) -> Result<(B, Shape)> {
    let (m, k) = l.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: an input of {k} features for a weight of {k2}");
    }
    let product = x.matmul(w, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
    Ok((product, Shape::from((m, n))))
}

/// Rows `ids` (`[n]`) of `w` (`[v, h]`): an embedding lookup. Where `w` trains, on the
/// CPU in f32, and `kept` is given, the backward pass adds each row's gradient into `w`'s
/// kept gradient in place, in the order of `ids`: candle's lookup backward adds them the
/// same way into the sum so far (a tied head's gradient, or zeros), but into a copy of a
/// zeroed buffer. Otherwise candle's `index_select`.
pub(crate) fn embedding(w: &Tensor, ids: &Tensor, kept: Option<&Arc<KeptGrads>>) -> Result<Tensor> {
    match kept {
        Some(kept)
            if w.track_op()
                && w.device().is_cpu()
                && w.dtype() == DType::F32
                && w.rank() == 2
                && ids.rank() == 1 =>
        {
            let ids = ids.to_dtype(DType::U32)?.contiguous()?;
            w.apply_op2(&ids, Embedding { kept: kept.clone() })
        }
        _ => w.index_select(ids, 0),
    }
}

/// See [`embedding`].
struct Embedding {
    kept: Arc<KeptGrads>,
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (v, h) = l1.shape().dims2()?;
        let table = contiguous::<f32>(s1, l1, "embedding: the table")?;
        let ids = contiguous::<u32>(s2, l2, "embedding: the ids")?;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= v) {
            candle_core::bail!("embedding: id {id} is outside the table of {v} rows");
        }
        let mut out = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            out.extend_from_slice(&table[id as usize * h..][..h]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), h))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.kept.index_add(w, ids, &grad.contiguous()?)?;
        Ok((None, None))
    }
}

/// `sum[ids[i]] += grad[i]`, row by row in the order of `ids`, in place in `sum`.
struct RowsAdd;

impl candle_core::InplaceOp3 for RowsAdd {
    fn name(&self) -> &'static str {
        "rows-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (_, h) = l1.shape().dims2()?;
        let grad = contiguous::<f32>(s3, l3, "embedding: the gradient")?;
        let ids = contiguous::<u32>(s2, l2, "embedding: the ids")?;
        let (start, end) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("embedding: the sum is strided".into()))?;
        let CpuStorage::F32(sum) = s1 else {
            candle_core::bail!("embedding: the sum is not f32");
        };
        let sum = &mut sum[start..end];
        if grad.len() != ids.len() * h || ids.iter().any(|&id| (id as usize + 1) * h > sum.len()) {
            candle_core::bail!(
                "embedding: a gradient of {} for {} ids",
                grad.len(),
                ids.len()
            );
        }
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut sum[id as usize * h..][..h];
            for (d, &g) in row.iter_mut().zip(&grad[i * h..][..h]) {
                *d += g;
            }
        }
        Ok(())
    }
}

/// `x wᵀ` with `w` held outside the graph: see [`linear`].
struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("linear: the input is on the CPU, the weight is not");
        };
        linear_product(s, l, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("linear: the input is on a GPU, the weight is not");
        };
        linear_product(s, l, w, wl)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x wᵀ` with `w` training: see [`linear`]; `kept`: see [`linear`].
struct TrainedLinear {
    kept: Option<Arc<KeptGrads>>,
}

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_product(s, l, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        linear_product(s, l, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(grad.matmul(w)?)
        } else {
            None
        };
        let dw = grad.t()?.matmul(x)?;
        match &self.kept {
            Some(kept) => {
                kept.add(w, dw)?;
                Ok((dx, None))
            }
            None => Ok((dx, Some(dw))),
        }
    }
}

/// [`nll_rows`] as candle's ops compose it (every device and dtype).
pub(crate) fn nll_rows_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&targets.reshape((n, 1))?, 1)?.reshape(n)?.neg()
}

/// The contiguous slice a CPU tensor's storage and layout describe; `what` names the
/// op and the tensor in the error for a strided one.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} is strided")))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// The logits `[n, v]` and the targets `[n]`, checked.
fn inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize)> {
    let (n, v) = l1.shape().dims2()?;
    let logits = contiguous::<f32>(s1, l1, "cross-entropy: the logits")?;
    let targets = contiguous::<u32>(s2, l2, "cross-entropy: the targets")?;
    if targets.len() != n || v == 0 {
        candle_core::bail!(
            "cross-entropy: {} targets for {n} rows of {v} logits",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {v}");
    }
    Ok((logits, targets, v))
}

/// A row's maximum and `ln(sum(exp(x - max)))`, in f32 as candle's `log_softmax` does.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = crate::simd::max(row);
    (max, crate::simd::exp_shifted_total(row, max).ln())
}

struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (logits, targets, v) = inputs(s1, l1, s2, l2)?;
        let mut out = vec![0f32; targets.len()];
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, o) in chunk.iter_mut().enumerate() {
                    let i = c * ROWS_PER_TASK + k;
                    let row = &logits[i * v..(i + 1) * v];
                    let (max, lse) = log_sum_exp(row);
                    *o = -((row[targets[i] as usize] - max) - lse);
                }
            });
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let g = logits.apply_op3_no_bwd(targets, &grad, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// The gradient of [`CrossEntropy`] in its logits: `grad[i] * (softmax(logits[i]) -
/// one_hot(targets[i]))`, `[n, v]`.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (logits, targets, v) = inputs(s1, l1, s2, l2)?;
        let grad = contiguous::<f32>(s3, l3, "cross-entropy: the gradient")?;
        if grad.len() != targets.len() {
            candle_core::bail!(
                "cross-entropy: a gradient of {} for {} rows",
                grad.len(),
                targets.len()
            );
        }
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(v * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, o) in chunk.chunks_exact_mut(v).enumerate() {
                    let i = c * ROWS_PER_TASK + k;
                    let g = grad[i];
                    if g == 0.0 {
                        continue; // a masked row: its gradient stays zero
                    }
                    let row = &logits[i * v..(i + 1) * v];
                    let (max, lse) = log_sum_exp(row);
                    crate::simd::exp_shifted_sum(row, max + lse, o);
                    o.iter_mut().for_each(|o| *o *= g);
                    o[targets[i] as usize] -= g;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::tests::max_abs_diff;
    use candle_core::{Device, Var};

    fn random(n: usize, v: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let logits: Vec<f32> = (0..n * v)
            .map(|_| (next() % 20_000) as f32 / 1000.0 - 10.0)
            .collect();
        let targets: Vec<u32> = (0..n).map(|_| (next() % v as u64) as u32).collect();
        // Some rows masked out, as padding is.
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
        let d = Device::Cpu;
        (
            Tensor::from_vec(logits, (n, v), &d).unwrap(),
            Tensor::from_vec(targets, n, &d).unwrap(),
            Tensor::from_vec(mask, n, &d).unwrap(),
        )
    }

    /// Forward values and gradients of the fused cross-entropy equal candle's
    /// composition's, on odd shapes, with masked rows.
    #[test]
    fn fused_cross_entropy_matches_the_composition_forward_and_backward() {
        for (n, v, seed) in [(1, 2, 1), (7, 1001, 2), (33, 5, 3), (13, 4099, 4)] {
            let (logits, targets, mask) = random(n, v, seed);
            let run = |fused: bool| {
                let x = Var::from_tensor(&logits).unwrap();
                let nll = if fused {
                    nll_rows(x.as_tensor(), &targets).unwrap()
                } else {
                    nll_rows_composed(x.as_tensor(), &targets).unwrap()
                };
                let loss = (&nll * &mask).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                let g = grads.get(x.as_tensor()).unwrap().clone();
                (nll, g)
            };
            let (nll_f, g_f) = run(true);
            let (nll_c, g_c) = run(false);
            assert!(max_abs_diff(&nll_f, &nll_c) < 1e-5, "{n}x{v} forward");
            assert!(max_abs_diff(&g_f, &g_c) < 1e-6, "{n}x{v} gradient");
        }
    }

    /// `[n, k]` of values in [-1, 1).
    fn uniform(n: usize, k: usize, seed: u64) -> Tensor {
        (random(n, k, seed).0 * 0.1).unwrap()
    }

    /// With a frozen weight, [`linear`] gives the same forward bits and the same input
    /// gradient as candle's matmul, on odd shapes, and forms no gradient for the weight
    /// (candle's matmul backward forms one for every factor).
    /// `(rows, in, out, seed)` of the linear tests: odd sizes, one output, and a SmolLM2
    /// MLP projection.
    const LINEAR_SHAPES: [(usize, usize, usize, u64); 5] = [
        (1, 1, 1, 1),
        (7, 13, 5, 2),
        (33, 64, 129, 3),
        (5, 576, 1, 4),
        (64, 576, 1536, 5),
    ];

    /// The input `[n, k]`, the weight `[out, k]` and the output's gradient `[n, out]`.
    fn linear_inputs(n: usize, k: usize, out: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        (
            uniform(n, k, seed),
            uniform(out, k, seed + 10),
            uniform(n, out, seed + 20),
        )
    }

    #[test]
    fn frozen_linear_matches_the_matmul_and_forms_no_weight_gradient() {
        for (n, k, out, seed) in LINEAR_SHAPES {
            let (x0, w, head) = linear_inputs(n, k, out, seed);
            let run = |fused: bool| {
                let x = Var::from_tensor(&x0).unwrap();
                // A tracked input, as a layer's input is after the first adapter.
                let xin = (x.as_tensor() * 1.0).unwrap();
                let y = if fused {
                    linear(&xin, &w, None).unwrap()
                } else {
                    xin.matmul(&w.t().unwrap()).unwrap()
                };
                let grads = (&y * &head).unwrap().sum_all().unwrap().backward().unwrap();
                let g = grads.get(x.as_tensor()).unwrap().clone();
                (y, g, grads.get_ids().count())
            };
            let (y_f, g_f, n_f) = run(true);
            let (y_c, g_c, n_c) = run(false);
            assert_eq!(max_abs_diff(&y_f, &y_c), 0.0, "{n}x{k}x{out} forward");
            assert!(max_abs_diff(&g_f, &g_c) < 1e-6, "{n}x{k}x{out} gradient");
            assert_eq!(
                n_f + 1,
                n_c,
                "{n}x{k}x{out}: the weight's gradient was formed"
            );
        }
    }

    #[test]
    fn trained_linear_matches_the_matmul_forward_and_backward() {
        for (n, k, out, seed) in LINEAR_SHAPES {
            let (x0, w0, head) = linear_inputs(n, k, out, seed);
            let run = |fused: bool, x_trains: bool| {
                let x = Var::from_tensor(&x0).unwrap();
                let w = Var::from_tensor(&w0).unwrap();
                let xin = if x_trains {
                    (x.as_tensor() * 1.0).unwrap()
                } else {
                    x0.clone()
                };
                let y = if fused {
                    linear(&xin, w.as_tensor(), None).unwrap()
                } else {
                    xin.matmul(&w.as_tensor().t().unwrap()).unwrap()
                };
                let grads = (&y * &head).unwrap().sum_all().unwrap().backward().unwrap();
                let gw = grads.get(w.as_tensor()).unwrap().clone();
                let gx = grads.get(x.as_tensor()).cloned();
                (y, gw, gx, grads.get_ids().count())
            };
            for x_trains in [true, false] {
                let what = format!("{n}x{k}x{out}, input trains: {x_trains}");
                let (y_f, gw_f, gx_f, n_f) = run(true, x_trains);
                let (y_c, gw_c, gx_c, n_c) = run(false, x_trains);
                // The same products on the same storages: the same bits.
                assert_eq!(max_abs_diff(&y_f, &y_c), 0.0, "{what}: forward");
                assert_eq!(max_abs_diff(&gw_f, &gw_c), 0.0, "{what}: weight gradient");
                assert!(gw_f.layout().is_contiguous(), "{what}");
                match (gx_f, gx_c) {
                    (Some(a), Some(b)) => {
                        assert_eq!(max_abs_diff(&a, &b), 0.0, "{what}: input gradient")
                    }
                    (None, None) => assert!(!x_trains),
                    _ => panic!("{what}: an input gradient on one side only"),
                }
                // A constant input gets no gradient (candle's matmul forms one).
                assert_eq!(n_f + usize::from(!x_trains), n_c, "{what}: gradients kept");
            }
        }
    }

    #[test]
    fn kept_weight_gradients_are_candles_bits() {
        // A weight that serves two linears, and one that serves a lookup and a linear
        // (a tied embedding): what the kept store hands back is what candle's store holds.
        let (vocab, h, n) = (11, 6, 5);
        let e0 = uniform(vocab, h, 1);
        let w0 = uniform(h, h, 2);
        let ids = Tensor::new(&[3u32, 0, 7, 3, 10], &Device::Cpu).unwrap();
        let head = uniform(n, vocab, 3);
        let run = |kept: Option<&Arc<KeptGrads>>| {
            let e = Var::from_tensor(&e0).unwrap();
            let w = Var::from_tensor(&w0).unwrap();
            let x = embedding(e.as_tensor(), &ids, kept).unwrap();
            let x = linear(&x, w.as_tensor(), kept).unwrap();
            let x2 = linear(&x, w.as_tensor(), kept).unwrap();
            let y = linear(&x2, e.as_tensor(), kept).unwrap();
            let mut grads = (&y * &head).unwrap().sum_all().unwrap().backward().unwrap();
            if let Some(k) = kept {
                assert!(grads.get(w.as_tensor()).is_none() && grads.get(e.as_tensor()).is_none());
                k.drain_into(&mut grads).unwrap();
            }
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (x, g(&e), g(&w))
        };
        let kept = Arc::new(KeptGrads::default());
        let (x_k, ge_k, gw_k) = run(Some(&kept));
        let (x_c, ge_c, gw_c) = run(None);
        assert_eq!(max_abs_diff(&x_k, &x_c), 0.0, "forward");
        assert_eq!(max_abs_diff(&ge_k, &ge_c), 0.0, "the tied weight");
        assert_eq!(max_abs_diff(&gw_k, &gw_c), 0.0, "the weight used twice");
        assert!(kept.lock().is_empty(), "drained");

        // An embedding alone (an untied one) is summed from zeros, as candle's is; an id
        // outside the table is an error that says so.
        let e = Var::from_tensor(&e0).unwrap();
        let y = embedding(e.as_tensor(), &ids, Some(&kept)).unwrap();
        let head = uniform(n, h, 4);
        let mut grads = (&y * &head).unwrap().sum_all().unwrap().backward().unwrap();
        kept.drain_into(&mut grads).unwrap();
        let mine = grads.get(e.as_tensor()).unwrap().clone();
        let e2 = Var::from_tensor(&e0).unwrap();
        let y2 = e2.as_tensor().index_select(&ids, 0).unwrap();
        let theirs = (&y2 * &head)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_abs_diff(&y, &y2), 0.0);
        assert_eq!(
            max_abs_diff(&mine, theirs.get(e2.as_tensor()).unwrap()),
            0.0
        );
        let bad = Tensor::new(&[3u32, 11], &Device::Cpu).unwrap();
        let err = embedding(e.as_tensor(), &bad, Some(&kept))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("id 11 is outside the table of 11 rows"),
            "{err}"
        );
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let d = Device::Cpu;
        let logits = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let targets = Tensor::new(&[0u32, 3], &d).unwrap();
        let e = nll_rows(&logits, &targets).unwrap_err().to_string();
        assert!(e.contains("target 3 is outside the vocabulary of 3"), "{e}");
    }
}
