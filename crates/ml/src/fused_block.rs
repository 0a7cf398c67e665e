//! Fused CPU kernels for the element-wise parts of a Llama block, each with its backward
//! pass: RMSNorm, rotary embedding, SiLU·mul, softmax over the last dimension and
//! attention's scaled, masked softmax.
//!
//! candle's differentiable compositions of these (`rms_norm_slow`, `rope_slow`, `silu`
//! then a product, `softmax`) are five to eight ops each. Every op allocates its output,
//! and in the backward pass every op's input gets a zeroed gradient buffer plus a sum;
//! profiled on SmolLM2 training, those element-wise passes and the kernel's zeroing of
//! their fresh pages took about as long as the matrix products (`docs/BENCHMARKS.md`).
//! Each fused op here is one pass forward and one backward, with one output each way.
//!
//! Off the CPU, or for a dtype other than f32, every function takes candle's composition,
//! so CUDA keeps one code path. Each is checked against its composition, forward and
//! gradients, on odd shapes (the tests below).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::fused::contiguous;

/// Whether every tensor is an f32 tensor on the CPU (the fused kernels' domain).
fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Rows per rayon task for rows of `width` values: about 16 Ki values per task.
fn rows_per_task(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// The last dimension of `l`, and the number of rows before it.
fn rows_of(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let width = *l.shape().dims().last().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: a scalar has no last dimension"))
    })?;
    let n = l.shape().elem_count();
    Ok((n.checked_div(width).unwrap_or(0), width))
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension; `w` has that dimension's size.
/// Differentiable in `x`, and in `w` when `w` carries a gradient.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, w]) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        candle_nn::ops::rms_norm_slow(x, w, eps as f32)
    }
}

struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// The input `[.., h]` and the weight `[h]`, checked.
fn norm_inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [f32], usize)> {
    let (_, h) = rows_of(l1, "rms-norm")?;
    let x = contiguous::<f32>(s1, l1, "rms-norm: the input")?;
    let w = contiguous::<f32>(s2, l2, "rms-norm: the weight")?;
    if w.len() != h || h == 0 {
        candle_core::bail!("rms-norm: a weight of {} for rows of {h}", w.len());
    }
    Ok((x, w, h))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, h) = norm_inputs(s1, l1, s2, l2)?;
        let chunk = h * rows_per_task(h);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                    let r = inv_rms(x, self.eps);
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps })?;
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &RmsNormWeightGrad { eps: self.eps })?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// The input's gradient: with `gw = g ⊙ w` and `r` the row's inverse RMS,
/// `dx = r gw - x r³ (gw · x) / h`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
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
        let (x, w, h) = norm_inputs(s1, l1, s2, l2)?;
        let g = contiguous::<f32>(s3, l3, "rms-norm: the gradient")?;
        if g.len() != x.len() {
            candle_core::bail!("rms-norm: a gradient of {} for {} values", g.len(), x.len());
        }
        let chunk = h * rows_per_task(h);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(o, (x, g))| {
                for ((o, x), g) in o
                    .chunks_exact_mut(h)
                    .zip(x.chunks_exact(h))
                    .zip(g.chunks_exact(h))
                {
                    let r = inv_rms(x, self.eps);
                    let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
                    let c = r * r * r * dot / h as f32;
                    for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                        *o = r * g * w - x * c;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The weight's gradient: `dw = Σ_rows g ⊙ x r`.
struct RmsNormWeightGrad {
    eps: f32,
}

impl CustomOp2 for RmsNormWeightGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, h) = rows_of(l1, "rms-norm")?;
        let x = contiguous::<f32>(s1, l1, "rms-norm: the input")?;
        let g = contiguous::<f32>(s2, l2, "rms-norm: the gradient")?;
        if g.len() != x.len() || h == 0 {
            candle_core::bail!("rms-norm: a gradient of {} for {} values", g.len(), x.len());
        }
        let chunk = h * rows_per_task(h);
        let dw = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .fold(
                || vec![0f32; h],
                |mut acc, (x, g)| {
                    for (x, g) in x.chunks_exact(h).zip(g.chunks_exact(h)) {
                        let r = inv_rms(x, self.eps);
                        for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                            *a += g * x * r;
                        }
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; h],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(dw), Shape::from(h)))
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding

/// Rotary embedding over the last dimension of `x` `[.., t, d]` in the halves layout
/// (Llama's): `cos` and `sin` are `[t, d/2]`. Differentiable in `x` only.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fusable(&[x, cos, sin]) && x.rank() >= 2 {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { sign: 1.0 })
    } else {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    }
}

/// Rotates each half-pair by the table's angle; `sign` -1 rotates back (the backward
/// pass of a rotation is the opposite rotation).
struct Rope {
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let dims = l1.shape().dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = d / 2;
        let x = contiguous::<f32>(s1, l1, "rope: the input")?;
        let cos = contiguous::<f32>(s2, l2, "rope: cos")?;
        let sin = contiguous::<f32>(s3, l3, "rope: sin")?;
        if d % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!(
                "rope: tables of {} and {} for {t} positions of {d} (even) values",
                cos.len(),
                sin.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        if d == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        // One task per (batch, head) slab of t rows.
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .for_each(|(o, x)| {
                for (p, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                    let (c, s) = (
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                    let (x1, x2) = x.split_at(half);
                    let (o1, o2) = o.split_at_mut(half);
                    for i in 0..half {
                        let s = self.sign * s[i];
                        o1[i] = x1[i] * c[i] - x2[i] * s;
                        o2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope { sign: -self.sign };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------
// SiLU·mul

/// `silu(a) ⊙ b` (the gated MLP's product), `a` and `b` of one shape. Differentiable in
/// both.
pub(crate) fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fusable(&[a, b]) && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, SiluMul)
    } else {
        a.silu()? * b
    }
}

struct SiluMul;

/// The two inputs, checked to be of one length.
fn pair<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [f32])> {
    let a = contiguous::<f32>(s1, l1, "silu-mul: the gate")?;
    let b = contiguous::<f32>(s2, l2, "silu-mul: the product's other factor")?;
    if a.len() != b.len() {
        candle_core::bail!("silu-mul: {} gate values for {} others", a.len(), b.len());
    }
    Ok((a, b))
}

/// Values per rayon task for element-wise kernels.
const ELEMS_PER_TASK: usize = 16 * 1024;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = pair(s1, l1, s2, l2)?;
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                a.par_chunks(ELEMS_PER_TASK)
                    .zip(b.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(o, (a, b))| {
                // e^-a first, in place, with the vectorised exp.
                o.iter_mut().zip(a).for_each(|(o, &a)| *o = -a);
                crate::simd::exp_in_place(o);
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a / (1.0 + *o) * b;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes both gradients, `[2, n]`; each is a view of its half.
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &SiluMulGrad)?;
        let da = both.get(0)?.reshape(a.shape())?;
        let db = both.get(1)?.reshape(b.shape())?;
        Ok((Some(da), Some(db)))
    }
}

/// With `s = σ(a)`: `da = g b s (1 + a (1 - s))`, `db = g a s`, stacked as `[2, n]`.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "fused-silu-mul-grad"
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
        let (a, b) = pair(s1, l1, s2, l2)?;
        let g = contiguous::<f32>(s3, l3, "silu-mul: the gradient")?;
        let n = a.len();
        if g.len() != n {
            candle_core::bail!("silu-mul: a gradient of {} for {n} values", g.len());
        }
        let mut out = vec![0f32; 2 * n];
        let (da, db) = out.split_at_mut(n);
        da.par_chunks_mut(ELEMS_PER_TASK)
            .zip(db.par_chunks_mut(ELEMS_PER_TASK))
            .zip(a.par_chunks(ELEMS_PER_TASK))
            .zip(
                b.par_chunks(ELEMS_PER_TASK)
                    .zip(g.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(((da, db), a), (b, g))| {
                // e^-a first, in place, with the vectorised exp.
                da.iter_mut().zip(a).for_each(|(d, &a)| *d = -a);
                crate::simd::exp_in_place(da);
                for i in 0..a.len() {
                    let s = 1.0 / (1.0 + da[i]);
                    da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                    db[i] = g[i] * a[i] * s;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

// ---------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension. Differentiable.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) && x.rank() >= 1 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct Softmax;

/// One row's softmax, `x` into `o`, with the vectorised exp.
fn softmax_row(x: &[f32], o: &mut [f32]) {
    let max = crate::simd::max(x);
    let sum = crate::simd::exp_shifted_sum(x, max, o);
    o.iter_mut().for_each(|o| *o /= sum);
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, w) = rows_of(l, "softmax")?;
        let x = contiguous::<f32>(s, l, "softmax: the input")?;
        let mut out = vec![0f32; x.len()];
        if w == 0 {
            return Ok((CpuStorage::F32(out), l.shape().clone()));
        }
        let chunk = w * rows_per_task(w);
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(w).zip(x.chunks_exact(w)) {
                    softmax_row(x, o);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: 1.0 },
        )?))
    }
}

/// `dx = y ⊙ (g - (g · y)) · scale` per row, from the softmax's output `y` (`scale`: that
/// of the scores the softmax was taken of, 1 for a plain softmax).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, w) = rows_of(l1, "softmax")?;
        let y = contiguous::<f32>(s1, l1, "softmax: the output")?;
        let g = contiguous::<f32>(s2, l2, "softmax: the gradient")?;
        if g.len() != y.len() {
            candle_core::bail!("softmax: a gradient of {} for {} values", g.len(), y.len());
        }
        let mut out = vec![0f32; y.len()];
        if w == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let chunk = w * rows_per_task(w);
        out.par_chunks_mut(chunk)
            .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(o, (y, g))| {
                for ((o, y), g) in o
                    .chunks_exact_mut(w)
                    .zip(y.chunks_exact(w))
                    .zip(g.chunks_exact(w))
                {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                        *o = y * (g - dot) * self.scale;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Attention's scaled, masked softmax

/// Attention's `softmax(scores · scale + mask)` over the last dimension in one pass, for
/// `scores` `[b, h, t, s]` and an additive `mask` `[b or 1, 1, t, s]` that every head
/// shares (a constant: it gets no gradient). Differentiable in `scores`. The same
/// arithmetic, in the same order, as the composition it replaces (scale, add, softmax;
/// backward softmax's then the scale's), which it falls back to off the CPU, for a dtype
/// other than f32, or for another mask shape: there the scaling is in the scores' dtype
/// and the masking and softmax in f32, where a half-precision mask value would overflow.
pub(crate) fn scaled_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let shared_by_heads = match (scores.dims(), mask.dims()) {
        (&[b, _, t, s], &[mb, 1, mt, ms]) => (mb == b || mb == 1) && mt == t && ms == s,
        _ => false,
    };
    if fusable(&[scores, mask]) && shared_by_heads {
        let op = ScaledMaskedSoftmax {
            scale: scale as f32,
        };
        return scores.contiguous()?.apply_op2(&mask.contiguous()?, op);
    }
    softmax_last_dim(
        &(scores * scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?,
    )
}

struct ScaledMaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, w) = l1.shape().dims4()?;
        let mb = l2.shape().dims4()?.0;
        let x = contiguous::<f32>(s1, l1, "masked softmax: the scores")?;
        let mask = contiguous::<f32>(s2, l2, "masked softmax: the mask")?;
        if mask.len() != mb * t * w || (mb != b && mb != 1) {
            candle_core::bail!(
                "masked softmax: a mask of {:?} for scores of {:?}",
                l2.shape().dims(),
                l1.shape().dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        if w == 0 || t == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        // The mask's row for scores row `r` (ordered batch, head, query).
        let mask_row = |r: usize| {
            let batch = if mb == 1 { 0 } else { r / (h * t) };
            let at = (batch * t + r % t) * w;
            &mask[at..at + w]
        };
        let rows = rows_per_task(w);
        out.par_chunks_mut(w * rows)
            .zip(x.par_chunks(w * rows))
            .enumerate()
            .for_each(|(task, (o, x))| {
                let mut z = vec![0f32; w];
                for (i, (o, x)) in o.chunks_exact_mut(w).zip(x.chunks_exact(w)).enumerate() {
                    for ((z, &x), &m) in z.iter_mut().zip(x).zip(mask_row(task * rows + i)) {
                        *z = x * self.scale + m;
                    }
                    softmax_row(&z, o);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = SoftmaxGrad { scale: self.scale };
        Ok((Some(res.apply_op2_no_bwd(&grad.contiguous()?, &op)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::tests::max_abs_diff;
    use candle_core::{Device, Var};

    /// Values in [-2, 2) from a xorshift stream.
    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 40_000) as f32 / 10_000.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Runs `f` on variables made of `inputs`, backpropagates `sum(f(..) ⊙ head)` and
    /// returns the output and each input's gradient.
    fn run(
        inputs: &[&Tensor],
        head_seed: u64,
        f: &dyn Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let head = random(y.dims(), head_seed);
        let grads = (&y * &head).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        (y, gs)
    }

    fn assert_close(
        fused: &(Tensor, Vec<Tensor>),
        composed: &(Tensor, Vec<Tensor>),
        tol: f32,
        what: &str,
    ) {
        let d = max_abs_diff(&fused.0, &composed.0);
        assert!(d < tol, "{what}: forward differs by {d}");
        for (i, (a, b)) in fused.1.iter().zip(&composed.1).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(d < tol, "{what}: gradient {i} differs by {d}");
        }
    }

    #[test]
    fn fused_rms_norm_matches_the_composition_forward_and_backward() {
        for (rows, h, seed) in [(1, 1, 1), (3, 7, 2), (17, 64, 3), (5, 577, 4)] {
            let x = random(&[rows, h], seed);
            let w = random(&[h], seed + 100);
            let what = format!("{rows}x{h}");
            let fused = run(&[&x, &w], seed + 200, &|t| {
                rms_norm(&t[0], &t[1], 1e-5).unwrap()
            });
            let composed = run(&[&x, &w], seed + 200, &|t| {
                candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap()
            });
            assert_close(&fused, &composed, 2e-4, &what);
        }
        // A frozen weight gets no gradient and the input's is the same.
        let (x, w) = (random(&[4, 9], 7), random(&[9], 8));
        let xv = Var::from_tensor(&x).unwrap();
        let g = rms_norm(xv.as_tensor(), &w, 1e-6)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(xv.as_tensor()).is_some() && g.get(&w).is_none());
    }

    #[test]
    fn fused_rope_matches_the_composition_forward_and_backward() {
        for (b, heads, t, d, seed) in [(1, 1, 1, 2, 1), (2, 3, 5, 6, 2), (1, 9, 33, 64, 3)] {
            let x = random(&[b, heads, t, d], seed);
            // Angles as a model's tables hold them: cos and sin of one angle.
            let angle = random(&[t, d / 2], seed + 100);
            let (cos, sin) = (angle.cos().unwrap(), angle.sin().unwrap());
            let what = format!("{b}x{heads}x{t}x{d}");
            let fused = run(&[&x], seed + 200, &|v| rope(&v[0], &cos, &sin).unwrap());
            let composed = run(&[&x], seed + 200, &|v| {
                candle_nn::rotary_emb::rope_slow(&v[0], &cos, &sin).unwrap()
            });
            assert_close(&fused, &composed, 1e-5, &what);
        }
    }

    #[test]
    fn fused_silu_mul_matches_the_composition_forward_and_backward() {
        for (shape, seed) in [
            (vec![1], 1),
            (vec![3, 5], 2),
            (vec![7, 1537], 3),
            (vec![2, 3, 17_000], 4),
        ] {
            let a = (random(&shape, seed) * 4.0).unwrap(); // reaches silu's tails
            let b = random(&shape, seed + 100);
            let what = format!("{shape:?}");
            let fused = run(&[&a, &b], seed + 200, &|t| silu_mul(&t[0], &t[1]).unwrap());
            let composed = run(&[&a, &b], seed + 200, &|t| {
                (t[0].silu().unwrap() * &t[1]).unwrap()
            });
            assert_close(&fused, &composed, 1e-5, &what);
        }
    }

    #[test]
    fn fused_softmax_matches_the_composition_forward_and_backward() {
        for (shape, seed) in [
            (vec![1, 1], 1),
            (vec![2, 3, 7], 2),
            (vec![1, 4, 33, 33], 3),
            (vec![5, 1001], 4),
        ] {
            // Scaled up, with a masked entry as attention's mask writes it.
            let mut x = (random(&shape, seed) * 5.0).unwrap();
            if shape.iter().product::<usize>() > 1 {
                let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut flat = flat;
                flat[1] = -1e9;
                x = Tensor::from_vec(flat, shape.as_slice(), &Device::Cpu).unwrap();
            }
            let what = format!("{shape:?}");
            let fused = run(&[&x], seed + 200, &|t| softmax_last_dim(&t[0]).unwrap());
            let composed = run(&[&x], seed + 200, &|t| {
                candle_nn::ops::softmax(&t[0], D::Minus1).unwrap()
            });
            assert_close(&fused, &composed, 1e-6, &what);
        }
    }

    #[test]
    fn fused_scaled_masked_softmax_matches_the_composition_forward_and_backward() {
        // (batch, heads, queries, keys, one mask per batch row or one for all), as
        // attention's masks come: causal, with padded keys in some rows.
        for (b, h, t, s, per_batch, seed) in [
            (1, 1, 1, 1, false, 1),
            (2, 3, 5, 5, true, 2),
            (3, 9, 33, 33, true, 3),
            (2, 2, 4, 1001, false, 4),
        ] {
            let scores = (random(&[b, h, t, s], seed) * 5.0).unwrap();
            let mb = if per_batch { b } else { 1 };
            let mask: Vec<f32> = (0..mb * t * s)
                .map(|i| {
                    let (batch, q, k) = (i / (t * s), i / s % t, i % s);
                    let padded = batch % 2 == 1 && k == s - 1 && k > 0;
                    if k > q + (s - t) || padded { -1e9 } else { 0.0 }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (mb, 1, t, s), &Device::Cpu).unwrap();
            let scale = 1.0 / (s as f64).sqrt();
            let what = format!("{b}x{h}x{t}x{s} mask of {mb}");
            let fused = run(&[&scores], seed + 200, &|v| {
                scaled_masked_softmax(&v[0], &mask, scale).unwrap()
            });
            let composed = run(&[&scores], seed + 200, &|v| {
                let z = (&v[0] * scale).unwrap().broadcast_add(&mask).unwrap();
                candle_nn::ops::softmax(&z, D::Minus1).unwrap()
            });
            assert_close(&fused, &composed, 1e-6, &what);
            // Against the composition it replaced in the model (scale, add, the fused
            // softmax): the same arithmetic in the same order, so the same bits.
            let replaced = run(&[&scores], seed + 200, &|v| {
                let z = (&v[0] * scale).unwrap().broadcast_add(&mask).unwrap();
                softmax_last_dim(&z).unwrap()
            });
            assert_close(&fused, &replaced, f32::MIN_POSITIVE, &what);
        }
        // A mask that is not shared by the heads takes the composition, with the same
        // result.
        let scores = random(&[1, 2, 3, 3], 9);
        let mask = random(&[1, 2, 3, 3], 10);
        let fused = scaled_masked_softmax(&scores, &mask, 0.5).unwrap();
        let z = (&scores * 0.5).unwrap().broadcast_add(&mask).unwrap();
        let composed = candle_nn::ops::softmax(&z, D::Minus1).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
    }

    #[test]
    fn bad_shapes_are_errors_that_say_what_was_wrong() {
        let x = random(&[2, 4], 1);
        let e = rms_norm(&x, &random(&[3], 2), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a weight of 3 for rows of 4"), "{e}");
        let x = random(&[1, 1, 2, 4], 3);
        let c = random(&[2, 3], 4);
        let e = rope(&x, &c, &c).unwrap_err().to_string();
        assert!(e.contains("tables of 6 and 6 for 2 positions of 4"), "{e}");
    }
}
