//! A Llama-family causal language model in candle: RMSNorm, rotary embeddings,
//! grouped-query attention with causal and key-padding masks, SiLU-gated MLP, optional
//! tied embeddings, and linear layers that can carry a LoRA adapter.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use crate::config::{LlamaConfig, RopeScaling};
use crate::fused::KeptGrads;
use crate::lora::{Dropout, LoraWeights};
use crate::pgemm::PackedWeight;

/// A large negative number used to mask attention scores (finite, so no NaNs appear).
pub(crate) const MASK_VALUE: f64 = -1e9;

/// A LoRA adapter on a linear layer: `y += scale * (dropout(x) A^T) B^T`.
#[derive(Clone, Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: Option<Dropout>,
}

/// A weight `[out, in]` (or an embedding table `[vocab, hidden]`): as loaded, or, where it
/// does not train (inference, or a LoRA base) on an x86-64 CPU, packed for tunenet's own
/// matrix product (`pgemm`, which is faster than candle's on SmolLM2's shapes). A packed
/// weight is the only copy: [`Llama::pack_frozen_for_cpu`] drops the tensor it came from.
/// It is frozen: gradients pass through it to its input, never to it.
#[derive(Clone, Debug)]
pub(crate) enum Weight {
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

impl Weight {
    /// The weight as a tensor: itself, or unpacked (a copy).
    pub(crate) fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Packed(p) => crate::pgemm::unpack_tensor(p),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Packed(_) => DType::F32,
        }
    }

    /// `x wᵀ` for `x` `[n, in]`; trained dense weights hand their gradients to `kept`.
    fn product(&self, x: &Tensor, kept: Option<&Arc<KeptGrads>>) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => crate::fused::linear(x, w, kept),
            Weight::Packed(p) => crate::pgemm::linear(x, p),
        }
    }

    /// Rows `ids` (u32, any shape) of an embedding table: `[ids, hidden]`.
    fn rows(&self, ids: &Tensor, kept: Option<&Arc<KeptGrads>>) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => crate::fused::embedding(w, &ids.flatten_all()?, kept),
            Weight::Packed(p) => crate::pgemm::rows(p, ids),
        }
    }

    /// Packed, where that is possible: a dense f32 CPU weight that does not train (not a
    /// variable), on a CPU with the kernel.
    fn packed(self) -> Result<Weight> {
        match self {
            Weight::Dense(t)
                if t.device().is_cpu()
                    && t.dtype() == DType::F32
                    && !t.is_variable()
                    && crate::pgemm::available() =>
            {
                Ok(Weight::Packed(Arc::new(crate::pgemm::pack_tensor(&t)?)))
            }
            other => Ok(other),
        }
    }
}

/// A bias-free linear layer (`weight: [out, in]`) with an optional LoRA adapter.
#[derive(Clone, Debug)]
struct Linear {
    weight: Weight,
    adapter: Option<Adapter>,
}

impl Linear {
    fn load(
        vb: &VarBuilder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        lora: Option<&LoraWeights>,
    ) -> Result<Linear> {
        let vb = vb.pp(name);
        let weight = Weight::Dense(vb.get((out_dim, in_dim), "weight")?);
        let adapter = lora.and_then(|l| {
            l.map.get(vb.prefix().as_str()).map(|(a, b)| Adapter {
                a: a.clone(),
                b: b.clone(),
                scale: l.scale,
                dropout: l.dropout.clone(),
            })
        });
        Ok(Linear { weight, adapter })
    }

    /// The weight with the adapter (if any) merged in: `W + scale * B A` (packed again
    /// where the weight was packed).
    fn merged(&self) -> Result<Weight> {
        match &self.adapter {
            None => Ok(self.weight.clone()),
            Some(ad) => {
                let d = (ad.b.matmul(&ad.a)? * ad.scale)?.to_dtype(self.weight.dtype())?;
                let merged = Weight::Dense((self.weight.dense()? + d)?);
                match self.weight {
                    Weight::Packed(_) => merged.packed(),
                    Weight::Dense(_) => Ok(merged),
                }
            }
        }
    }

    /// `x: [n, in]` -> `[n, out]`; adapter dropout applies in training mode only. Trained
    /// weights hand their gradients to `kept` where given (see `fused::linear`).
    fn forward(&self, x: &Tensor, mode: Mode, kept: Option<&Arc<KeptGrads>>) -> Result<Tensor> {
        let y = self.weight.product(x, kept)?;
        match &self.adapter {
            None => Ok(y),
            Some(ad) => {
                // Adapters stay in f32 even on a bf16/f16 base, so their updates are not lost
                // to rounding.
                let mut xa = x.to_dtype(ad.a.dtype())?;
                if mode == Mode::Train
                    && let Some(d) = &ad.dropout
                {
                    xa = d.apply(&xa)?;
                }
                let h = crate::fused::linear(&xa, &ad.a, kept)?;
                let d = (crate::fused::linear(&h, &ad.b, kept)? * ad.scale)?;
                let d = d.to_dtype(y.dtype())?;
                y + d
            }
        }
    }
}

/// Whether to use candle's fused kernels (inference only: they have no backward pass)
/// or differentiable ops (training): tunenet's fused kernels with backward passes on the
/// CPU (`fused_block`), candle's compositions of basic ops elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Train,
    Infer,
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => candle_nn::ops::rms_norm(x, w, eps as f32),
        Mode::Train => crate::fused_block::rms_norm(x, w, eps),
    }
}

#[derive(Clone, Debug)]
struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The causal LM.
#[derive(Clone, Debug)]
pub(crate) struct Llama {
    cfg: LlamaConfig,
    embed: Weight,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Weight,
    cos: Tensor,
    sin: Tensor,
    kept: Kept,
}

/// Where a training forward pass's trained weights hand their gradients (see
/// [`Llama::kept_grads`]). A clone of the model gets a store of its own, so that two
/// copies trained at once never take each other's gradients.
#[derive(Debug, Default)]
struct Kept(Arc<KeptGrads>);

impl Clone for Kept {
    fn clone(&self) -> Kept {
        Kept::default()
    }
}

impl Llama {
    /// Builds the model from weights with Hugging Face names, attaching `lora` adapters
    /// (keyed by module path) where given.
    pub(crate) fn new(
        cfg: &LlamaConfig,
        vb: &VarBuilder,
        lora: Option<&LoraWeights>,
    ) -> Result<Llama> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let q_out = cfg.num_attention_heads * hd;
        let kv_out = cfg.kv_heads() * hd;
        let inter = cfg.intermediate_size;
        let embed = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lb = vb.pp(format!("model.layers.{i}"));
            let attn = lb.pp("self_attn");
            let mlp = lb.pp("mlp");
            layers.push(Block {
                attn_norm: lb.get(h, "input_layernorm.weight")?,
                q: Linear::load(&attn, "q_proj", h, q_out, lora)?,
                k: Linear::load(&attn, "k_proj", h, kv_out, lora)?,
                v: Linear::load(&attn, "v_proj", h, kv_out, lora)?,
                o: Linear::load(&attn, "o_proj", q_out, h, lora)?,
                mlp_norm: lb.get(h, "post_attention_layernorm.weight")?,
                gate: Linear::load(&mlp, "gate_proj", h, inter, lora)?,
                up: Linear::load(&mlp, "up_proj", h, inter, lora)?,
                down: Linear::load(&mlp, "down_proj", inter, h, lora)?,
            });
        }
        let norm = vb.get(h, "model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get((cfg.vocab_size, h), "lm_head.weight")?
        };
        let (cos, sin) = rope_tables(cfg, vb.device())?;
        let (cos, sin) = (cos.to_dtype(embed.dtype())?, sin.to_dtype(embed.dtype())?);
        Ok(Llama {
            cfg: cfg.clone(),
            embed: Weight::Dense(embed),
            layers,
            norm,
            lm_head: Weight::Dense(lm_head),
            cos,
            sin,
            kept: Kept::default(),
        })
    }

    /// The gradients of trained weights that the last `Mode::Train` forward pass's
    /// backward pass formed: they are not in candle's gradient store until moved there
    /// (`KeptGrads::drain_into`).
    pub(crate) fn kept_grads(&self) -> &KeptGrads {
        &self.kept.0
    }

    /// Packs every frozen linear layer's weight, and the output head (with the embedding
    /// table when they are tied), for tunenet's CPU matrix product, dropping the tensors
    /// they came from: for a model that runs inference, or trains LoRA adapters on a
    /// frozen base, on a CPU that has the kernel (f32 weights; otherwise nothing changes).
    /// Weights that train (variables) and LoRA adapters stay as they are; gradients pass
    /// through packed weights to their inputs as through the plain ones.
    pub(crate) fn pack_frozen_for_cpu(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for l in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.o,
                &mut layer.gate,
                &mut layer.up,
                &mut layer.down,
            ] {
                l.weight = l.weight.clone().packed()?;
            }
        }
        let tied = match (&self.embed, &self.lm_head) {
            (Weight::Dense(e), Weight::Dense(h)) => e.id() == h.id(),
            _ => false,
        };
        self.lm_head = self.lm_head.clone().packed()?;
        if tied {
            self.embed = self.lm_head.clone();
        }
        Ok(())
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]` (u32); `key_mask` `[b, t]` (f32) is 1
    /// for real tokens and 0 for padding, which no position may attend to.
    ///
    /// Inference on the CPU with several threads and sequences runs the sequences in as
    /// many groups as there are threads, side by side, each group's pass through the
    /// layers on one thread: a whole pass per thread has no per-operation hand-offs
    /// between threads, and every operation of it (not only the matrix products) uses
    /// every core. The output head then runs once over all rows (split across the threads
    /// by its columns), so the logits are made once, in place. Each row's logits are the
    /// same bits as in one pass over the whole batch (no operation mixes rows).
    pub(crate) fn forward(&self, ids: &Tensor, key_mask: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let threads = rayon::current_num_threads();
        let kept = (mode == Mode::Train).then_some(&self.kept.0);
        let x = if mode == Mode::Infer
            && ids.device().is_cpu()
            && threads > 1
            && b > 1
            && !crate::pgemm::in_serial()
        {
            use rayon::prelude::*;
            let per = b.div_ceil(threads.min(b));
            let groups: Vec<usize> = (0..b).step_by(per).collect();
            let hidden = groups
                .par_iter()
                .map(|&start| {
                    let n = per.min(b - start);
                    let (ids, key_mask) = (ids.narrow(0, start, n)?, key_mask.narrow(0, start, n)?);
                    crate::pgemm::serially(|| self.hidden(&ids, &key_mask, mode))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&hidden, 0)?
        } else {
            self.hidden(ids, key_mask, mode)?
        };
        let logits = self.lm_head.product(&x, kept)?.to_dtype(DType::F32)?;
        logits.reshape((b, t, self.cfg.vocab_size))
    }

    /// The final normed hidden states `[b * t, hidden]` of one pass over the batch.
    fn hidden(&self, ids: &Tensor, key_mask: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let mask = attention_mask(key_mask, t, self.cfg.sliding_window)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let kept = (mode == Mode::Train).then_some(&self.kept.0);
        let mut x = self.embed.rows(ids, kept)?; // [b*t, h]
        for layer in &self.layers {
            let hn = rms_norm(&x, &layer.attn_norm, self.cfg.rms_norm_eps, mode)?;
            let att = self.attention(layer, &hn, (b, t), &mask, (&cos, &sin), mode)?;
            x = (x + att)?;
            let hn = rms_norm(&x, &layer.mlp_norm, self.cfg.rms_norm_eps, mode)?;
            let g = layer.gate.forward(&hn, mode, kept)?;
            let u = layer.up.forward(&hn, mode, kept)?;
            let gu = crate::fused_block::silu_mul(&g, &u)?;
            x = (x + layer.down.forward(&gu, mode, kept)?)?;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps, mode)
    }

    fn attention(
        &self,
        layer: &Block,
        x: &Tensor,
        (b, t): (usize, usize),
        mask: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mode: Mode,
    ) -> Result<Tensor> {
        let kept = (mode == Mode::Train).then_some(&self.kept.0);
        let nh = self.cfg.num_attention_heads;
        let nkv = self.cfg.kv_heads();
        let hd = self.cfg.head_dim();
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(layer.q.forward(x, mode, kept)?, nh)?;
        let k = split(layer.k.forward(x, mode, kept)?, nkv)?;
        let v = split(layer.v.forward(x, mode, kept)?, nkv)?;
        let (q, k) = match mode {
            Mode::Infer => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            Mode::Train => (
                crate::fused_block::rope(&q, cos, sin)?,
                crate::fused_block::rope(&k, cos, sin)?,
            ),
        };
        let k = repeat_kv(k, nh / nkv)?;
        let v = repeat_kv(v, nh / nkv)?;
        let scores = q.matmul(&k.t()?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let probs = match mode {
            // Off the CPU, for inference, candle's softmax kernel. Masking and softmax in
            // f32: a half-precision mask value would overflow.
            Mode::Infer if !scores.device().is_cpu() => {
                let scores = (scores * scale)?
                    .to_dtype(DType::F32)?
                    .broadcast_add(mask)?;
                candle_nn::ops::softmax_last_dim(&scores)?
            }
            // Otherwise scaled, masked and normalised in one fused pass (on the CPU).
            _ => crate::fused_block::scaled_masked_softmax(&scores, mask, scale)?,
        }
        .to_dtype(v.dtype())?;
        let y = probs.matmul(&v)?; // [b, nh, t, hd]
        let y = y.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        layer.o.forward(&y, mode, kept)
    }
}

/// The weights of one block for inference-only code (adapters merged).
pub(crate) struct DenseBlock {
    pub(crate) attn_norm: Tensor,
    pub(crate) q: Weight,
    pub(crate) k: Weight,
    pub(crate) v: Weight,
    pub(crate) o: Weight,
    pub(crate) mlp_norm: Tensor,
    pub(crate) gate: Weight,
    pub(crate) up: Weight,
    pub(crate) down: Weight,
}

/// All weights of the model for inference-only code (adapters merged), with the rotary
/// tables in the weights' dtype. Unadapted weights are shared, not copied (packed ones
/// stay packed: [`Weight::dense`] unpacks a copy where a tensor is needed).
pub(crate) struct DenseParts {
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<DenseBlock>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Weight,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Llama {
    /// The model's weights with LoRA adapters merged in (see [`DenseParts`]).
    pub(crate) fn dense_parts(&self) -> Result<DenseParts> {
        let layers = self
            .layers
            .iter()
            .map(|b| {
                Ok(DenseBlock {
                    attn_norm: b.attn_norm.clone(),
                    q: b.q.merged()?,
                    k: b.k.merged()?,
                    v: b.v.merged()?,
                    o: b.o.merged()?,
                    mlp_norm: b.mlp_norm.clone(),
                    gate: b.gate.merged()?,
                    up: b.up.merged()?,
                    down: b.down.merged()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DenseParts {
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        })
    }
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding of one
/// sequence.
#[derive(Clone, Debug, Default)]
pub(crate) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pos: usize,
}

impl KvCache {
    /// Tokens already in the cache.
    pub(crate) fn len(&self) -> usize {
        self.pos
    }
}

impl Llama {
    /// Runs `ids` (one sequence) after the tokens in `cache`, appending their keys and
    /// values; returns the logits `[t, vocab]` (f32) of the new positions.
    pub(crate) fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let t = ids.len();
        let pos = cache.pos;
        if pos + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                pos + t,
                self.cfg.max_position_embeddings
            );
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let device = self.cos.device();
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX).max(1);
        let total = pos + t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                let q = pos + i;
                (0..total).map(move |j| {
                    if j <= q && q - j < window {
                        0.0
                    } else {
                        MASK_VALUE as f32
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, total), device)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let input = Tensor::from_slice(ids, t, device)?;
        let mut x = self.embed.rows(&input, None)?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
        );
        let eps = self.cfg.rms_norm_eps;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let hn = rms_norm(&x, &layer.attn_norm, eps, Mode::Infer)?;
            let split = |y: Tensor, heads: usize| -> Result<Tensor> {
                y.reshape((1, t, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split(layer.q.forward(&hn, Mode::Infer, None)?, nh)?;
            let k = split(layer.k.forward(&hn, Mode::Infer, None)?, nkv)?;
            let v = split(layer.v.forward(&hn, Mode::Infer, None)?, nkv)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let (k, v) = match slot.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            *slot = Some((k.clone(), v.clone()));
            let y = match flash_attention(&q, &k, &v, hd, self.cfg.sliding_window)? {
                Some(y) => y.reshape((t, nh * hd))?,
                None => {
                    let k = repeat_kv(k, nh / nkv)?;
                    let v = repeat_kv(v, nh / nkv)?;
                    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
                    let scores = scores.to_dtype(DType::F32)?.broadcast_add(&mask)?;
                    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
                    probs.matmul(&v)?.transpose(1, 2)?.reshape((t, nh * hd))?
                }
            };
            x = (x + layer.o.forward(&y, Mode::Infer, None)?)?;
            let hn = rms_norm(&x, &layer.mlp_norm, eps, Mode::Infer)?;
            let g = layer.gate.forward(&hn, Mode::Infer, None)?.silu()?;
            let u = layer.up.forward(&hn, Mode::Infer, None)?;
            x = (x + layer.down.forward(&(g * u)?, Mode::Infer, None)?)?;
        }
        cache.pos = total;
        let x = rms_norm(&x, &self.norm, eps, Mode::Infer)?;
        self.lm_head.product(&x, None)?.to_dtype(DType::F32)
    }
}

/// Causal attention with the flash-attention kernels, for `q: [1, nh, t, hd]` after
/// `k, v: [1, nkv, T, hd]` (T >= t, the new queries being the last t positions): `Some`
/// output `[1, t, nh, hd]` on CUDA in f16/bf16 with the `flash-attn` feature, `None`
/// (use the plain path) otherwise.
#[cfg(feature = "flash-attn")]
fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    hd: usize,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    if !q.device().is_cuda() || !matches!(q.dtype(), DType::F16 | DType::BF16) {
        return Ok(None);
    }
    let (q, k, v) = (
        q.transpose(1, 2)?.contiguous()?,
        k.transpose(1, 2)?.contiguous()?,
        v.transpose(1, 2)?.contiguous()?,
    );
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    // Flash-attention aligns the causal mask bottom-right, as a KV cache needs.
    let y = match window {
        None => candle_flash_attn::flash_attn(&q, &k, &v, scale, true)?,
        Some(w) => candle_flash_attn::flash_attn_windowed(
            &q,
            &k,
            &v,
            scale,
            Some(w.saturating_sub(1)),
            Some(0),
        )?,
    };
    Ok(Some(y))
}

#[cfg(not(feature = "flash-attn"))]
fn flash_attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _hd: usize,
    _window: Option<usize>,
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Repeats each key/value head `n` times: `[b, kv, t, d]` -> `[b, kv*n, t, d]`.
pub(crate) fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

/// Additive mask `[b, 1, t, t]`: 0 where query i may attend key j (j <= i, within the
/// sliding window if any, and j is not padding), a large negative number elsewhere.
pub(crate) fn attention_mask(key_mask: &Tensor, t: usize, window: Option<usize>) -> Result<Tensor> {
    let device = key_mask.device();
    let window = window.unwrap_or(usize::MAX).max(1);
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j <= i && i - j < window {
                    0.0
                } else {
                    MASK_VALUE as f32
                }
            })
        })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
    let b = key_mask.dim(0)?;
    let pad = ((key_mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * MASK_VALUE)?)
        .reshape((b, 1, 1, t))?;
    causal.broadcast_add(&pad)
}

/// Inverse rotary frequencies, rescaled as `rope_scaling` says.
pub(crate) fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let hd = cfg.head_dim();
    let base: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64))
        .collect();
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Default) => base,
        // HF's dynamic NTK scaling changes nothing up to max_position_embeddings, and
        // longer sequences are refused.
        Some(RopeScaling::Dynamic { .. }) => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cosine and sine tables `[max_pos, head_dim / 2]` of the rotary embedding (f32).
pub(crate) fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = rope_inv_freq(cfg).into_iter().map(|f| f as f32).collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
    let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_position_embeddings, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Summed next-token negative log-likelihood over positions where `loss_mask` is 1, and the
/// number of such positions. `logits: [b, t, v]`, `targets: [b, t]` u32, `loss_mask: [b, t]` f32.
pub(crate) fn masked_nll_sum(
    logits: &Tensor,
    targets: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let nll = crate::fused::nll_rows(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)?;
    (nll * loss_mask.reshape(b * t)?)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A random tiny model (hidden 64, MLP 172, vocabulary 259: widths that are not whole
    /// panels), its head tied to the embedding or not.
    fn random_model(tied: bool) -> Llama {
        let (cfg, map) = random_weights(tied);
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        Llama::new(&cfg, &vb, None).unwrap()
    }

    /// The config and weights of [`random_model`].
    fn random_weights(tied: bool) -> (LlamaConfig, HashMap<String, Tensor>) {
        let mut cfg = crate::tiny::tiny_config();
        cfg.tie_word_embeddings = tied;
        let dev = Device::Cpu;
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let kv = cfg.kv_heads() * cfg.head_dim();
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let mut put = |name: String, shape: &[usize]| {
            let t = Tensor::randn(0f32, 0.2, shape, &dev).unwrap();
            map.insert(name, t);
        };
        put("model.embed_tokens.weight".into(), &[v, h]);
        put("model.norm.weight".into(), &[h]);
        if !tied {
            put("lm_head.weight".into(), &[v, h]);
        }
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            put(format!("{p}.input_layernorm.weight"), &[h]);
            put(format!("{p}.post_attention_layernorm.weight"), &[h]);
            put(format!("{p}.self_attn.q_proj.weight"), &[h, h]);
            put(format!("{p}.self_attn.k_proj.weight"), &[kv, h]);
            put(format!("{p}.self_attn.v_proj.weight"), &[kv, h]);
            put(format!("{p}.self_attn.o_proj.weight"), &[h, h]);
            put(format!("{p}.mlp.gate_proj.weight"), &[inter, h]);
            put(format!("{p}.mlp.up_proj.weight"), &[inter, h]);
            put(format!("{p}.mlp.down_proj.weight"), &[h, inter]);
        }
        (cfg, map)
    }

    /// Three sequences, the last two padded at the end.
    fn batch() -> (Tensor, Tensor) {
        let (b, t) = (3usize, 21usize);
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 5) % 259) as u32).collect();
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i % t < t - 4 * (i / t) { 1.0 } else { 0.0 })
            .collect();
        let dev = Device::Cpu;
        (
            Tensor::from_vec(ids, (b, t), &dev).unwrap(),
            Tensor::from_vec(mask, (b, t), &dev).unwrap(),
        )
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn packed_inference_matches_the_plain_model_and_splitting_the_batch_changes_no_bit() {
        if !crate::pgemm::available() {
            return;
        }
        for tied in [false, true] {
            let plain = random_model(tied);
            let mut packed = plain.clone();
            packed.pack_frozen_for_cpu().unwrap();
            assert!(matches!(packed.lm_head, Weight::Packed(_)), "head packed");
            assert!(
                matches!(packed.layers[0].k.weight, Weight::Packed(_)),
                "k packed"
            );
            assert_eq!(
                matches!(packed.embed, Weight::Packed(_)),
                tied,
                "the embedding is packed exactly when it is the head"
            );
            let (ids, mask) = batch();
            let run = |m: &Llama, threads: usize| {
                pool(threads)
                    .install(|| m.forward(&ids, &mask, Mode::Infer))
                    .unwrap()
            };
            let (want, one, split, halves) = (
                run(&plain, 1),
                run(&packed, 1),
                run(&packed, 3),
                run(&packed, 2),
            );
            let diff = (&one - &want).unwrap().abs().unwrap().max_all().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "tied {tied}: packed differs by {diff} (scale {scale})"
            );
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(
                bits(&one),
                bits(&split),
                "tied {tied}: one group per sequence"
            );
            assert_eq!(
                bits(&one),
                bits(&halves),
                "tied {tied}: groups of two and one"
            );
            // The plain model split across threads gives its one-thread bits too.
            let plain_split = run(&plain, 3);
            assert_eq!(
                bits(&want),
                bits(&plain_split),
                "tied {tied}: plain model split"
            );

            // Decoding with the cache reads the packed embedding and head.
            let mut cache = KvCache::default();
            let step = packed.forward_cached(&[3, 9, 27], &mut cache).unwrap();
            let mut cache = KvCache::default();
            let plain_step = plain.forward_cached(&[3, 9, 27], &mut cache).unwrap();
            let d = (&step - &plain_step)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() <= 1e-5 * scale.max(1.0),
                "tied {tied}: decoding"
            );

            // The weights come back unchanged for code that needs them as tensors.
            let (a, b) = (plain.dense_parts().unwrap(), packed.dense_parts().unwrap());
            for (x, y) in [
                (&a.embed, &b.embed),
                (&a.lm_head, &b.lm_head),
                (&a.layers[1].down, &b.layers[1].down),
            ] {
                assert_eq!(
                    bits(&x.dense().unwrap()),
                    bits(&y.dense().unwrap()),
                    "tied {tied}: unpacked weight"
                );
            }
        }
    }

    #[test]
    fn packing_leaves_weights_that_train_as_they_are() {
        // Full fine-tuning: every weight a variable, the head tied or not.
        for tied in [true, false] {
            let (cfg, map) = random_weights(tied);
            let vars: HashMap<String, Tensor> = map
                .into_iter()
                .map(|(n, t)| {
                    (
                        n,
                        candle_core::Var::from_tensor(&t)
                            .unwrap()
                            .as_tensor()
                            .clone(),
                    )
                })
                .collect();
            let vb = VarBuilder::from_tensors(vars, DType::F32, &Device::Cpu);
            let mut m = Llama::new(&cfg, &vb, None).unwrap();
            m.pack_frozen_for_cpu().unwrap();
            let dense = |w: &Weight| matches!(w, Weight::Dense(t) if t.is_variable());
            assert!(dense(&m.embed) && dense(&m.lm_head), "tied {tied}");
            for l in &m.layers {
                for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                    assert!(dense(&lin.weight), "tied {tied}");
                }
            }
        }
    }

    #[test]
    fn lora_on_a_packed_base_trains_as_on_the_plain_one() {
        if !crate::pgemm::available() {
            return;
        }
        let dev = Device::Cpu;
        for tied in [true, false] {
            let (cfg, map) = random_weights(tied);
            let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"]
                .iter()
                .map(|t| t.to_string())
                .collect();
            let (varmap, lora) = crate::lora::init_lora(&cfg, &targets, 4, 8.0, 7, &dev).unwrap();
            // B starts at zero, which would leave A without a gradient: random B instead.
            let vars: Vec<(String, candle_core::Var)> = {
                let data = varmap.data().lock().unwrap();
                data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
            };
            for (_, v) in &vars {
                v.set(&Tensor::randn(0f32, 0.3, v.shape(), &dev).unwrap())
                    .unwrap();
            }
            let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
            let plain = Llama::new(&cfg, &vb, Some(&lora)).unwrap();
            let mut packed = plain.clone();
            packed.pack_frozen_for_cpu().unwrap();
            assert!(matches!(packed.lm_head, Weight::Packed(_)), "head packed");
            assert!(
                matches!(packed.layers[0].q.weight, Weight::Packed(_)),
                "base packed"
            );
            let (ids, mask) = batch();
            let (b, t) = ids.dims2().unwrap();
            let next: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 6) % 259) as u32).collect();
            let targets_ids = Tensor::from_vec(next, (b, t), &dev).unwrap();
            let step = |m: &Llama| {
                let logits = m.forward(&ids, &mask, Mode::Train).unwrap();
                let loss = (masked_nll_sum(&logits, &targets_ids, &mask).unwrap() / (b * t) as f64)
                    .unwrap();
                let mut grads = loss.backward().unwrap();
                m.kept_grads().drain_into(&mut grads).unwrap();
                let loss = loss.to_scalar::<f32>().unwrap();
                let grads: Vec<Tensor> = vars
                    .iter()
                    .map(|(n, v)| {
                        grads
                            .get(v.as_tensor())
                            .unwrap_or_else(|| panic!("no gradient for {n}"))
                            .clone()
                    })
                    .collect();
                (loss, grads)
            };
            let (l1, g1) = step(&plain);
            let (l2, g2) = step(&packed);
            assert!(
                (l1 - l2).abs() <= 1e-5 * l1.abs(),
                "tied {tied}: loss {l1} vs {l2}"
            );
            for ((n, _), (a, b)) in vars.iter().zip(g1.iter().zip(&g2)) {
                let scale = a
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(scale > 0.0, "tied {tied}: {n} has a zero gradient");
                assert!(
                    d <= 1e-4 * scale,
                    "tied {tied}: {n} off by {d} (of {scale})"
                );
            }
        }
    }
}
