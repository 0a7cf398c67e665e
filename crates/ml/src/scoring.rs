//! Fast batched log-likelihood scoring for inference jobs (HellaSwag and the like): a
//! [`ScoringModel`] runs many [`PackedGroup`]s (a shared prefix with several continuations)
//! in one forward pass, the prefix computed once and each continuation attending to it.
//! Weights are either dense (from a [`CausalLm`], f32/bf16) or GGUF quantised (Q8_0, Q4_x,
//! K-quants). Quantised weights stay quantised in memory; on the CPU a batched call
//! expands them to f32 one tile at a time into a dense GEMM, and a call with a few rows
//! uses candle's quantised kernels. Nothing here trains or samples.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::lm::CausalLm;
use crate::model::{MASK_VALUE, Weight, rope_tables};
use crate::tokenizer::TextTokenizer;

/// A shared prefix and the continuations that follow it. Continuation `i` is the token
/// sequence `prefix ++ branches[i].tokens`; its score is the summed log-probability of the
/// tokens of that sequence from index `branches[i].score_from` on, each given all tokens
/// before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedGroup {
    /// Tokens every branch starts with (at least one).
    pub prefix: Vec<u32>,
    /// The continuations.
    pub branches: Vec<Branch>,
}

/// One continuation of a [`PackedGroup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    /// Tokens after the prefix.
    pub tokens: Vec<u32>,
    /// Index (in `prefix ++ tokens`) of the first scored token; at least 1.
    pub score_from: usize,
}

impl PackedGroup {
    /// Tokens the model runs for this group: the prefix once, then each branch without its
    /// last token (which is only ever a target).
    pub fn run_len(&self) -> usize {
        self.prefix.len()
            + self
                .branches
                .iter()
                .map(|b| b.tokens.len().saturating_sub(1))
                .sum::<usize>()
    }

    /// Longest `prefix ++ tokens` of any branch.
    pub fn max_seq_len(&self) -> usize {
        self.prefix.len()
            + self
                .branches
                .iter()
                .map(|b| b.tokens.len())
                .max()
                .unwrap_or(0)
    }
}

/// Text in, token ids out; and groups of continuations in, summed log-probabilities out.
/// Implemented by [`ScoringModel`] (dense or GGUF-quantised weights) and by [`CausalLm`].
pub trait HellaSwagScorer {
    /// Token ids of `text`, no special tokens added.
    fn encode(&self, text: &str) -> Result<Vec<u32>, MlError>;
    /// Longest token sequence the model accepts.
    fn max_positions(&self) -> usize;
    /// For each group, the score of each branch (see [`PackedGroup`]).
    fn score_groups(&self, groups: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError>;
    /// A short description of the weights ("dense f32", "gguf q4_1", ...), for reports.
    fn describe(&self) -> String;
}

/// How [`ScoringModel::load_gguf`] holds a GGUF's matmul weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufWeights {
    /// Quantised blocks, the only copy of the weights (least memory). On the CPU a batched
    /// matmul expands ~1 MiB tiles of them to f32 one at a time and runs the dense GEMM;
    /// a call with few rows runs candle's quantised kernels.
    Quantized,
    /// Expanded to f32 at load: the quantised model's exact weights, run by the dense
    /// matmul (nothing to expand per call, four to eight times the memory).
    Dequantized,
}

/// Output rows per tile of a quantised weight on the CPU: about 1 MiB once expanded to
/// f32, so a tile is still in cache when the matmul reads it.
const TILE_ELEMS: usize = 1 << 18;

/// Calls with at least this many input rows expand each tile to f32 and run the dense
/// matmul; fewer rows use candle's quantised kernels. Expanding costs the same whatever
/// the rows, while the quantised kernels (per-row dot products) cost more with each row:
/// past a handful of rows the expansion and a tiled GEMM win, by far for batched scoring.
const EXPAND_MIN_ROWS: usize = 16;

/// A projection's weights.
#[derive(Debug)]
enum Weights {
    /// One matmul: dense weights, or quantised ones off the CPU (where candle's kernels
    /// batch by themselves).
    Whole(QMatMul),
    /// Quantised weights on the CPU, split along the output dimension into tiles of
    /// about [`TILE_ELEMS`]. The quantised bytes stay the only copy: a call with many
    /// rows expands one tile at a time (see [`EXPAND_MIN_ROWS`]).
    Tiles(Vec<std::sync::Arc<QTensor>>),
    /// Dense f32 weights packed for tunenet's CPU product (a [`CausalLm`]'s, shared).
    Packed(std::sync::Arc<crate::pgemm::PackedWeight>),
}

impl Weights {
    /// Quantised CPU weights split into tiles; anything else as one matmul.
    fn new(q: QTensor) -> candle_core::Result<Weights> {
        let dense = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let (n, k) = q.shape().dims2()?;
        if dense || !q.device().is_cpu() || n == 0 || k == 0 {
            return Ok(Weights::Whole(QMatMul::from_arc(std::sync::Arc::new(q))?));
        }
        let dtype = q.dtype();
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let bytes = q.data()?;
        if bytes.len() != n * row_bytes {
            candle_core::bail!(
                "quantised weight of {n} x {k} holds {} bytes, not {}",
                bytes.len(),
                n * row_bytes
            );
        }
        let per_tile = (TILE_ELEMS / k).clamp(1, n);
        let mut tiles = Vec::with_capacity(n.div_ceil(per_tile));
        for start in (0..n).step_by(per_tile) {
            let rows = per_tile.min(n - start);
            let raw = &bytes[start * row_bytes..(start + rows) * row_bytes];
            let tile = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                raw,
                vec![rows, k],
                &Device::Cpu,
            )?;
            tiles.push(std::sync::Arc::new(tile));
        }
        Ok(Weights::Tiles(tiles))
    }

    /// The product with `x` (two dimensions) handed out as column pieces of about
    /// [`TILE_ELEMS`] weights each, with the output column each starts at: for consumers
    /// that need not hold all of a wide output at once (the vocabulary projection).
    fn for_each_piece(
        &self,
        x: &Tensor,
        each: &mut dyn FnMut(usize, Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let rows = x.dim(0)?;
        match self {
            Weights::Whole(QMatMul::Tensor(w)) if w.device().is_cpu() => {
                let (n, k) = w.dims2()?;
                let per = (TILE_ELEMS / k.max(1)).clamp(1, n.max(1));
                for start in (0..n).step_by(per) {
                    let piece = w.narrow(0, start, per.min(n - start))?;
                    each(start, x.matmul(&piece.t()?)?)?;
                }
                Ok(())
            }
            Weights::Whole(mm) => each(0, mm.forward(x)?),
            Weights::Packed(w) => {
                let per = (TILE_ELEMS / w.k().max(1)).clamp(1, w.n().max(1));
                crate::pgemm::linear_pieces(x, w, per, each)
            }
            Weights::Tiles(tiles) => {
                let mut start = 0;
                for tile in tiles {
                    let y = Self::tile_forward(tile, x, rows)?;
                    let width = y.dim(1)?;
                    each(start, y)?;
                    start += width;
                }
                Ok(())
            }
        }
    }

    /// One tile's product with `x` (`rows` x k): expanded to f32 for many rows, candle's
    /// quantised kernels for a few.
    fn tile_forward(
        tile: &std::sync::Arc<QTensor>,
        x: &Tensor,
        rows: usize,
    ) -> candle_core::Result<Tensor> {
        if rows >= EXPAND_MIN_ROWS {
            let w = tile.dequantize(&Device::Cpu)?;
            x.matmul(&w.t()?)
        } else {
            QMatMul::QTensor(tile.clone()).forward(x)
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tiles = match self {
            Weights::Whole(mm) => return mm.forward(x),
            Weights::Packed(w) => {
                let k = x.dim(D::Minus1)?;
                let mut out_dims = x.dims().to_vec();
                let y = crate::pgemm::linear(&x.reshape((x.elem_count() / k.max(1), k))?, w)?;
                if let Some(last) = out_dims.last_mut() {
                    *last = w.n();
                }
                return y.reshape(out_dims);
            }
            Weights::Tiles(tiles) => tiles,
        };
        let k = x.dim(D::Minus1)?;
        let rows = x.elem_count() / k.max(1);
        let mut out_dims = x.dims().to_vec();
        let x2 = x.reshape((rows, k))?;
        // Tiles in parallel: each expansion runs on one thread, so a second thread would
        // otherwise wait for every expansion.
        use rayon::prelude::*;
        let mut parts = tiles
            .par_iter()
            .map(|tile| Self::tile_forward(tile, &x2, rows))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = match parts.len() {
            1 => parts.swap_remove(0),
            _ => Tensor::cat(&parts, 1)?,
        };
        if let Some(last) = out_dims.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(out_dims)
    }
}

/// A linear layer for inference: dense or quantised, possibly several layers fused along
/// the output dimension (their outputs are the column ranges given by `widths`).
#[derive(Debug)]
struct Proj {
    mm: Weights,
    widths: Vec<usize>,
}

impl Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.mm.forward(x)
    }

    /// The output split into the fused layers' parts.
    fn forward_split(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.split(self.mm.forward(x)?)
    }

    /// `y` (this projection's output, possibly rearranged along other axes) split into the
    /// fused layers' parts.
    fn split(&self, y: Tensor) -> candle_core::Result<Vec<Tensor>> {
        if self.widths.len() == 1 {
            return Ok(vec![y]);
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(self.widths.len());
        for &w in &self.widths {
            out.push(y.narrow(D::Minus1, start, w)?);
            start += w;
        }
        Ok(out)
    }
}

/// The token embedding table: dense, or (kept quantised on the CPU) quantised rows that
/// are expanded as they are looked up, so a large vocabulary costs its quantised size.
#[derive(Debug)]
enum Embedding {
    Dense(Tensor),
    /// A [`CausalLm`]'s packed table (shared with its output head).
    Packed(std::sync::Arc<crate::pgemm::PackedWeight>),
    Quantized {
        dtype: GgmlDType,
        rows: usize,
        dim: usize,
        row_bytes: usize,
        bytes: Vec<u8>,
    },
}

impl Embedding {
    fn new(q: QTensor, device: &Device, weights: GgufWeights) -> Result<Embedding, MlError> {
        let dense = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if dense || weights == GgufWeights::Dequantized || !device.is_cpu() {
            let t = q
                .dequantize(device)
                .ctx("dequantising the embedding table")?;
            return Ok(Embedding::Dense(t));
        }
        let dtype = q.dtype();
        let (rows, dim) = q
            .shape()
            .dims2()
            .ctx("reading the embedding table's shape")?;
        let row_bytes = dim / dtype.block_size() * dtype.type_size();
        let bytes = q.data().ctx("reading the embedding table")?.into_owned();
        if bytes.len() != rows * row_bytes {
            return Err(MlError::Invalid(format!(
                "embedding table of {rows} x {dim} holds {} bytes, not {}",
                bytes.len(),
                rows * row_bytes
            )));
        }
        Ok(Embedding::Quantized {
            dtype,
            rows,
            dim,
            row_bytes,
            bytes,
        })
    }

    /// Rows `ids` (the same ids as a tensor and as a slice).
    fn lookup(&self, ids: &Tensor, id_list: &[u32]) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(ids, 0),
            Embedding::Packed(w) => crate::pgemm::rows(w, ids),
            Embedding::Quantized {
                dtype,
                rows,
                dim,
                row_bytes,
                bytes,
            } => {
                let mut picked = Vec::with_capacity(id_list.len() * row_bytes);
                for &id in id_list {
                    let id = id as usize;
                    if id >= *rows {
                        candle_core::bail!("token id {id} is outside the vocabulary of {rows}");
                    }
                    picked.extend_from_slice(&bytes[id * row_bytes..(id + 1) * row_bytes]);
                }
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    *dtype,
                    &picked,
                    vec![id_list.len(), *dim],
                    &Device::Cpu,
                )?
                .dequantize(&Device::Cpu)
            }
        }
    }
}

/// Projections of one block; q/k/v and gate/up are fused where their weights allow.
#[derive(Debug)]
struct ScoreBlock {
    attn_norm: Tensor,
    qkv: Vec<Proj>,
    o: Proj,
    mlp_norm: Tensor,
    gate_up: Vec<Proj>,
    down: Proj,
}

/// Tokenizer of a scoring model: a model directory's file, or one rebuilt from GGUF metadata.
enum ScoreTokenizer {
    File(TextTokenizer),
    Gguf(tokenizers::Tokenizer),
}

/// A Llama-family model prepared for batched scoring: see [`HellaSwagScorer`].
pub struct ScoringModel {
    cfg: LlamaConfig,
    tok: ScoreTokenizer,
    embed: Embedding,
    layers: Vec<ScoreBlock>,
    norm: Tensor,
    lm_head: Proj,
    cos: Tensor,
    sin: Tensor,
    /// Activation dtype (f32 for quantised weights).
    dtype: DType,
    device: Device,
    what: String,
}

impl std::fmt::Debug for ScoringModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoringModel")
            .field("what", &self.what)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn dense(w: Weight) -> Proj {
    match w {
        Weight::Dense(w) => {
            let n = w.dims().first().copied().unwrap_or(0);
            Proj {
                mm: Weights::Whole(QMatMul::Tensor(w)),
                widths: vec![n],
            }
        }
        Weight::Packed(w) => Proj {
            widths: vec![w.n()],
            mm: Weights::Packed(w),
        },
    }
}

impl ScoringModel {
    /// The weights of `lm` (LoRA adapters merged in) arranged for scoring. Dense weights are
    /// shared with `lm`, not copied, except where an adapter had to be merged.
    pub fn from_causal_lm(lm: &CausalLm) -> Result<ScoringModel, MlError> {
        let parts = lm
            .llama()
            .dense_parts()
            .ctx("merging adapters for scoring")?;
        let tok = ScoreTokenizer::File(lm.tokenizer().clone());
        let dtype = parts.norm.dtype();
        let device = parts.norm.device().clone();
        let layers = parts
            .layers
            .into_iter()
            .map(|b| ScoreBlock {
                attn_norm: b.attn_norm,
                qkv: vec![dense(b.q), dense(b.k), dense(b.v)],
                o: dense(b.o),
                mlp_norm: b.mlp_norm,
                gate_up: vec![dense(b.gate), dense(b.up)],
                down: dense(b.down),
            })
            .collect();
        Ok(ScoringModel {
            cfg: lm.config().clone(),
            tok,
            embed: match parts.embed {
                Weight::Dense(t) => Embedding::Dense(t),
                Weight::Packed(w) => Embedding::Packed(w),
            },
            layers,
            norm: parts.norm,
            lm_head: dense(parts.lm_head),
            cos: parts.cos,
            sin: parts.sin,
            dtype,
            device,
            what: format!("dense {dtype:?}").to_lowercase(),
        })
    }

    /// Loads a llama-architecture GGUF for scoring. With [`GgufWeights::Quantized`] the
    /// weights stay quantised blocks (expanded a tile at a time for batched matmuls on the
    /// CPU); with [`GgufWeights::Dequantized`] they are expanded to f32 at load (the same
    /// numbers, so the same model; four to eight times the memory, and no expansion per
    /// call). Norms
    /// are always dequantised, and the token embedding table too unless it stays
    /// quantised on the CPU (its rows are then expanded as they are looked up). q/k rows are put back into
    /// rotate-half order, so the forward pass is the same as for dense weights.
    pub fn load_gguf(
        path: &Path,
        device: &Device,
        weights: GgufWeights,
    ) -> Result<ScoringModel, MlError> {
        let bad = |problem: String| MlError::Config {
            path: path.to_path_buf(),
            problem,
        };
        let file =
            std::fs::File::open(path).map_err(|e| MlError::io("cannot open GGUF", path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        crate::gguf::check_tensor_infos(&content, &mut reader).map_err(bad)?;
        let cfg = crate::gguf::gguf_config(&content, path)?;
        let tok = crate::gguf::gguf_tokenizer(&content.metadata)
            .map_err(|p| bad(format!("tokenizer: {p}")))?;
        let hd = cfg.head_dim();
        let mut read = |name: &str| -> Result<QTensor, MlError> {
            content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| bad(format!("tensor {name} is missing or unreadable: {e}")))
        };
        let to_dev = |q: QTensor| -> Result<QTensor, MlError> {
            if device.is_cpu() {
                return Ok(q);
            }
            let bytes = q.data().ctx("reading quantised data")?;
            candle_core::quantized::ggml_file::qtensor_from_ggml(
                q.dtype(),
                &bytes,
                q.shape().dims().to_vec(),
                device,
            )
            .ctx("moving quantised weights")
        };
        let to_dev = |q: QTensor| -> Result<QTensor, MlError> {
            let q = to_dev(q)?;
            if weights == GgufWeights::Quantized || q.dtype() == GgmlDType::F32 {
                return Ok(q);
            }
            let t = q.dequantize(device).ctx("dequantising a weight")?;
            QTensor::quantize(&t, GgmlDType::F32).ctx("keeping a dequantised weight")
        };
        let deq = |q: QTensor| -> Result<Tensor, MlError> {
            q.dequantize(device).ctx("dequantising a norm")
        };
        let mut dtypes = std::collections::BTreeSet::new();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            let q = unpermute_rows(read(&name("attn_q.weight"))?, cfg.num_attention_heads, hd)?;
            let k = unpermute_rows(read(&name("attn_k.weight"))?, cfg.kv_heads(), hd)?;
            let v = read(&name("attn_v.weight"))?;
            let o = read(&name("attn_output.weight"))?;
            let gate = read(&name("ffn_gate.weight"))?;
            let up = read(&name("ffn_up.weight"))?;
            let down = read(&name("ffn_down.weight"))?;
            for t in [&q, &k, &v, &o, &gate, &up, &down] {
                dtypes.insert(format!("{:?}", t.dtype()).to_lowercase());
            }
            layers.push(ScoreBlock {
                attn_norm: deq(read(&name("attn_norm.weight"))?)?,
                qkv: fuse(vec![q, k, v], &to_dev)?,
                o: quant(o, &to_dev)?,
                mlp_norm: deq(read(&name("ffn_norm.weight"))?)?,
                gate_up: fuse(vec![gate, up], &to_dev)?,
                down: quant(down, &to_dev)?,
            });
        }
        let embed = Embedding::new(read("token_embd.weight")?, device, weights)?;
        let head_q = if cfg.tie_word_embeddings {
            read("token_embd.weight")?
        } else {
            read("output.weight")?
        };
        dtypes.insert(format!("{:?}", head_q.dtype()).to_lowercase());
        let lm_head = quant(head_q, &to_dev)?;
        let norm = deq(read("output_norm.weight")?)?;
        let (cos, sin) = rope_tables(&cfg, device).ctx("building rotary tables")?;
        let what = format!(
            "gguf {}{}",
            dtypes.into_iter().collect::<Vec<_>>().join("+"),
            match weights {
                GgufWeights::Quantized => " quantised matmuls",
                GgufWeights::Dequantized => " dequantised to f32",
            }
        );
        Ok(ScoringModel {
            cfg,
            tok: ScoreTokenizer::Gguf(tok),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dtype: DType::F32,
            device: device.clone(),
            what,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Runs a batch of groups through the model; see [`HellaSwagScorer::score_groups`].
    fn forward_groups(&self, groups: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError> {
        let plan = Plan::new(groups, &self.cfg)?;
        let scores = self.run(&plan).ctx("scoring a packed batch")?;
        let mut out: Vec<Vec<f64>> = groups.iter().map(|g| vec![0.0; g.branches.len()]).collect();
        for ((g, b), s) in plan.row_owner.iter().zip(scores) {
            out[*g][*b] += s as f64;
        }
        Ok(out)
    }

    fn run(&self, plan: &Plan) -> candle_core::Result<Vec<f32>> {
        let dev = &self.device;
        let (g, l) = (plan.groups, plan.max_len);
        let n = plan.ids.len();
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
        );
        let rep = nh / nkv;
        let eps = self.cfg.rms_norm_eps as f32;
        let ids = Tensor::from_slice(&plan.ids, n, dev)?;
        let pad = Tensor::from_slice(&plan.pad_index, g * l, dev)?;
        let unpad = Tensor::from_slice(&plan.unpad_index, n, dev)?;
        let pos = Tensor::from_slice(&plan.padded_pos, g * l, dev)?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((g, l, hd / 2))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((g, l, hd / 2))?;
        let mask = Tensor::from_slice(&plan.mask, (g, 1, 1, l, l), dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed.lookup(&ids, &plan.ids)?.to_dtype(self.dtype)?;
        for layer in &self.layers {
            let hn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            // Into the padded layout first (one gather per matmul output), then split.
            let mut qkv = Vec::with_capacity(3);
            for p in &layer.qkv {
                let y = p.forward(&hn)?.index_select(&pad, 0)?;
                qkv.extend(p.split(y)?);
            }
            let [q, k, v] = <[Tensor; 3]>::try_from(qkv)
                .map_err(|_| candle_core::Error::Msg("q/k/v projections are not three".into()))?;
            let padded = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
                t.reshape((g, l, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = candle_nn::rotary_emb::rope(&padded(q, nh)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&padded(k, nkv)?, &cos, &sin)?;
            let v = padded(v, nkv)?;
            // Grouped-query attention without copying k/v: the `rep` query heads of a
            // key/value head are stacked along the sequence axis.
            let q = q.reshape((g, nkv, rep * l, hd))?;
            let scores = (q.matmul(&k.t()?)? * scale)?
                .to_dtype(DType::F32)?
                .reshape((g, nkv, rep, l, l))?
                .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?
                .reshape((g, nkv, rep * l, l))?
                .to_dtype(v.dtype())?;
            let y = probs
                .matmul(&v)?
                .reshape((g, nh, l, hd))?
                .transpose(1, 2)?
                .reshape((g * l, nh * hd))?
                .index_select(&unpad, 0)?;
            x = (x + layer.o.forward(&y)?)?;
            let hn = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            let mut gu = Vec::with_capacity(2);
            for p in &layer.gate_up {
                gu.extend(p.forward_split(&hn)?);
            }
            let [gate, up] = <[Tensor; 2]>::try_from(gu)
                .map_err(|_| candle_core::Error::Msg("gate/up projections are not two".into()))?;
            let h = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&h)?)?;
        }
        // Logits only where a target is predicted: the vocabulary projection is the
        // largest matmul of a small model.
        let rows = Tensor::from_slice(&plan.rows, plan.rows.len(), dev)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        if !dev.is_cpu() {
            let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = Tensor::from_slice(&plan.targets, (plan.targets.len(), 1), dev)?;
            return logp.gather(&targets, 1)?.flatten_all()?.to_vec1::<f32>();
        }
        let mut soft = StreamingLogSoftmax::new(&plan.targets);
        self.lm_head
            .mm
            .for_each_piece(&x, &mut |offset, logits| soft.add(offset, logits))?;
        soft.finish()
    }
}

/// The log-softmax of each row at its target, taken over the vocabulary a piece at a time:
/// a running maximum and sum of exponentials per row, and the target's logit once its
/// piece comes by. The [rows, vocabulary] logits never exist at once (for a small model's
/// batch they would be hundreds of MB, twice over with their log-softmax).
struct StreamingLogSoftmax<'a> {
    targets: &'a [u32],
    max: Vec<f32>,
    sum: Vec<f32>,
    picked: Vec<Option<f32>>,
}

impl<'a> StreamingLogSoftmax<'a> {
    fn new(targets: &'a [u32]) -> Self {
        let n = targets.len();
        StreamingLogSoftmax {
            targets,
            max: vec![f32::NEG_INFINITY; n],
            sum: vec![0.0; n],
            picked: vec![None; n],
        }
    }

    /// Logits of every row for the vocabulary ids `offset..offset + width`.
    fn add(&mut self, offset: usize, logits: Tensor) -> candle_core::Result<()> {
        let (rows, width) = logits.dims2()?;
        if rows != self.targets.len() {
            candle_core::bail!("{rows} rows of logits for {} targets", self.targets.len());
        }
        let v = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Rows in parallel, each with the vectorised exp.
        use rayon::prelude::*;
        let targets = &self.targets;
        self.max
            .par_iter_mut()
            .zip(self.sum.par_iter_mut())
            .zip(self.picked.par_iter_mut())
            .zip(v.par_chunks_exact(width.max(1)))
            .enumerate()
            .for_each(|(r, (((row_max, row_sum), picked), row))| {
                let max = row_max.max(crate::simd::max(row));
                let carried = if *row_sum > 0.0 {
                    *row_sum * (*row_max - max).exp()
                } else {
                    0.0
                };
                *row_sum = carried + crate::simd::exp_shifted_total(row, max);
                *row_max = max;
                if let Some(local) = (targets[r] as usize).checked_sub(offset)
                    && local < width
                {
                    *picked = Some(row[local]);
                }
            });
        Ok(())
    }

    fn finish(self) -> candle_core::Result<Vec<f32>> {
        self.picked
            .iter()
            .zip(self.targets)
            .zip(self.max.iter().zip(&self.sum))
            .map(|((p, t), (m, s))| match p {
                Some(l) => Ok(l - m - s.ln()),
                None => Err(candle_core::Error::Msg(format!(
                    "target token {t} is outside the vocabulary"
                ))),
            })
            .collect()
    }
}

impl HellaSwagScorer for ScoringModel {
    fn encode(&self, text: &str) -> Result<Vec<u32>, MlError> {
        match &self.tok {
            ScoreTokenizer::File(t) => t.encode(text),
            ScoreTokenizer::Gguf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| MlError::Invalid(format!("cannot encode text: {e}"))),
        }
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn score_groups(&self, groups: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError> {
        self.forward_groups(groups)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Where every token of a batch of groups goes: the flat (unpadded) token order, the
/// padded `[groups, max_len]` layout attention runs in, the attention mask, and the rows
/// whose logits are needed with their targets.
struct Plan {
    groups: usize,
    max_len: usize,
    /// Token ids, flat.
    ids: Vec<u32>,
    /// For each padded slot, the flat row it copies (padding copies row 0).
    pad_index: Vec<u32>,
    /// For each flat row, its padded slot.
    unpad_index: Vec<u32>,
    /// Position (for the rotary embedding) of each padded slot.
    padded_pos: Vec<u32>,
    /// Additive mask `[groups, max_len, max_len]`.
    mask: Vec<f32>,
    /// Flat rows whose next-token distribution is scored, and the target token of each.
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// (group, branch) each scored row belongs to.
    row_owner: Vec<(usize, usize)>,
}

impl Plan {
    fn new(groups: &[PackedGroup], cfg: &LlamaConfig) -> Result<Plan, MlError> {
        let vocab = cfg.vocab_size;
        for grp in groups {
            if grp.prefix.is_empty() {
                return Err(MlError::Invalid(
                    "a packed group has an empty prefix".into(),
                ));
            }
            if grp.max_seq_len() > cfg.max_position_embeddings + 1 {
                return Err(MlError::Invalid(format!(
                    "{} tokens exceed the model's context of {}",
                    grp.max_seq_len() - 1,
                    cfg.max_position_embeddings
                )));
            }
            for b in &grp.branches {
                let len = grp.prefix.len() + b.tokens.len();
                if b.score_from == 0 || b.score_from >= len {
                    return Err(MlError::Invalid(format!(
                        "branch scores from token {} of a {len}-token sequence",
                        b.score_from
                    )));
                }
            }
            if let Some(bad) = grp
                .prefix
                .iter()
                .chain(grp.branches.iter().flat_map(|b| &b.tokens))
                .find(|&&t| t as usize >= vocab)
            {
                return Err(MlError::Invalid(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
        }
        let max_len = groups.iter().map(PackedGroup::run_len).max().unwrap_or(1);
        let window = cfg.sliding_window.unwrap_or(usize::MAX).max(1);
        let n_groups = groups.len();
        let mut plan = Plan {
            groups: n_groups,
            max_len,
            ids: Vec::new(),
            pad_index: vec![0; n_groups * max_len],
            unpad_index: Vec::new(),
            padded_pos: vec![0; n_groups * max_len],
            mask: vec![MASK_VALUE as f32; n_groups * max_len * max_len],
            rows: Vec::new(),
            targets: Vec::new(),
            row_owner: Vec::new(),
        };
        for (gi, grp) in groups.iter().enumerate() {
            let p = grp.prefix.len();
            let base = plan.ids.len();
            // Segment 0 is the prefix, segment i + 1 branch i; (segment, position) per slot.
            let mut slots: Vec<(usize, usize)> = (0..p).map(|i| (0, i)).collect();
            plan.ids.extend(&grp.prefix);
            let mut branch_start = Vec::with_capacity(grp.branches.len());
            for (bi, b) in grp.branches.iter().enumerate() {
                branch_start.push(slots.len());
                let run = b.tokens.len().saturating_sub(1);
                plan.ids.extend(&b.tokens[..run]);
                slots.extend((0..run).map(|j| (bi + 1, p + j)));
            }
            for (local, &(seg, pos)) in slots.iter().enumerate() {
                let slot = gi * max_len + local;
                plan.pad_index[slot] = (base + local) as u32;
                plan.unpad_index.push(slot as u32);
                plan.padded_pos[slot] = pos as u32;
                let mrow = &mut plan.mask[slot * max_len..(slot + 1) * max_len];
                for (key, &(kseg, kpos)) in slots.iter().enumerate() {
                    if (kseg == 0 || kseg == seg) && kpos <= pos && pos - kpos < window {
                        mrow[key] = 0.0;
                    }
                }
            }
            // Padding queries attend their own group's first token, so no row is all masked.
            for local in slots.len()..max_len {
                plan.mask[(gi * max_len + local) * max_len] = 0.0;
            }
            for (bi, b) in grp.branches.iter().enumerate() {
                let seq_len = p + b.tokens.len();
                for j in b.score_from..seq_len {
                    // Target j is predicted at position j - 1.
                    let at = j - 1;
                    let local = if at < p {
                        at
                    } else {
                        branch_start[bi] + (at - p)
                    };
                    let target = if j < p {
                        grp.prefix[j]
                    } else {
                        b.tokens[j - p]
                    };
                    plan.rows.push((base + local) as u32);
                    plan.targets.push(target);
                    plan.row_owner.push((gi, bi));
                }
            }
        }
        if plan.ids.is_empty() {
            return Err(MlError::Invalid("no tokens to score".into()));
        }
        Ok(plan)
    }
}

fn quant(
    q: QTensor,
    to_dev: &dyn Fn(QTensor) -> Result<QTensor, MlError>,
) -> Result<Proj, MlError> {
    let n = q.shape().dims().first().copied().unwrap_or(0);
    let q = to_dev(q)?;
    Ok(Proj {
        mm: Weights::new(q).ctx("preparing a quantised matmul")?,
        widths: vec![n],
    })
}

/// One matmul for projections of the same input when their quantisation types agree (rows
/// of quantised blocks concatenate byte for byte); separate ones otherwise.
fn fuse(
    parts: Vec<QTensor>,
    to_dev: &dyn Fn(QTensor) -> Result<QTensor, MlError>,
) -> Result<Vec<Proj>, MlError> {
    let same = parts.windows(2).all(|w| {
        w[0].dtype() == w[1].dtype() && w[0].shape().dims().get(1) == w[1].shape().dims().get(1)
    });
    if !same || parts.is_empty() {
        return parts.into_iter().map(|q| quant(q, to_dev)).collect();
    }
    let dtype = parts[0].dtype();
    let k = parts[0].shape().dims().get(1).copied().unwrap_or(0);
    let mut bytes = Vec::new();
    let mut widths = Vec::with_capacity(parts.len());
    for q in &parts {
        bytes.extend_from_slice(&q.data().ctx("reading quantised data")?);
        widths.push(q.shape().dims().first().copied().unwrap_or(0));
    }
    let rows = widths.iter().sum();
    let fused = candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        vec![rows, k],
        &Device::Cpu,
    )
    .ctx("fusing projections")?;
    let mut p = quant(fused, to_dev)?;
    p.widths = widths;
    Ok(vec![p])
}

/// Puts the rows of a GGUF q/k weight (llama.cpp's interleaved rotary order) back into
/// Hugging Face's rotate-half order, moving whole quantised rows.
fn unpermute_rows(q: QTensor, heads: usize, hd: usize) -> Result<QTensor, MlError> {
    let dims = q.shape().dims().to_vec();
    let (rows, k) = match dims[..] {
        [r, k] => (r, k),
        _ => return Err(MlError::Invalid(format!("q/k weight of shape {dims:?}"))),
    };
    if rows != heads * hd || !hd.is_multiple_of(2) {
        return Err(MlError::Invalid(format!(
            "q/k weight has {rows} rows, not {heads} heads of {hd}"
        )));
    }
    let dtype: GgmlDType = q.dtype();
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = q.data().ctx("reading quantised data")?;
    if data.len() != rows * row_bytes {
        return Err(MlError::Invalid(
            "q/k weight rows are not whole blocks".into(),
        ));
    }
    let mut out = vec![0u8; data.len()];
    let half = hd / 2;
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * hd + s * half + i;
                let gg = h * hd + i * 2 + s;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[gg * row_bytes..(gg + 1) * row_bytes]);
            }
        }
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &out, dims, &Device::Cpu)
        .ctx("reordering q/k rows")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d: Vec<f32> = (a - b)
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_vec1())
            .unwrap();
        d.into_iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    /// Tiled quantised weights give the dense product of the expanded weights for batched
    /// calls, and candle's quantised kernels' exact result for a few rows, at SmolLM2's
    /// inner dimension (576), with a row count that leaves the last tile short, and inputs
    /// of two and three dimensions.
    #[test]
    fn tiled_quantised_matmuls_match_the_expanded_weights_and_candles_kernels() {
        let dev = Device::Cpu;
        let (n, k) = (1001, 576);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let expanded = q.dequantize(&dev).unwrap();
            let whole =
                QMatMul::from_arc(std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap()))
                    .unwrap();
            let tiled = Weights::new(q).unwrap();
            let Weights::Tiles(tiles) = &tiled else {
                panic!("{dtype:?} on the CPU is not tiled");
            };
            assert_eq!(tiles.len(), n.div_ceil(TILE_ELEMS / k), "{dtype:?}");
            for shape in [vec![3, k], vec![40, k], vec![2, 19, k]] {
                let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
                let y = tiled.forward(&x).unwrap();
                let mut want_dims = shape.clone();
                *want_dims.last_mut().unwrap() = n;
                assert_eq!(y.dims(), want_dims.as_slice(), "{dtype:?}");
                let rows = shape[..shape.len() - 1].iter().product::<usize>();
                let want = if rows >= EXPAND_MIN_ROWS {
                    x.broadcast_matmul(&expanded.t().unwrap()).unwrap()
                } else {
                    whole.forward(&x).unwrap()
                };
                let d = max_abs_diff(&y, &want);
                assert!(d < 1e-4, "{dtype:?} {shape:?}: differs by {d}");
            }
        }
        // Dense weights stay one matmul.
        let dense = Weights::new(QTensor::quantize(&w, GgmlDType::F32).unwrap()).unwrap();
        assert!(matches!(dense, Weights::Whole(_)));
    }

    /// The streaming log-softmax over column pieces gives what the whole logits' log-softmax
    /// gives at each target, for dense weights cut into pieces and for quantised tiles, and
    /// a target outside the vocabulary is an error, not a number.
    #[test]
    fn target_logprobs_taken_piece_by_piece_match_the_whole_log_softmax() {
        let dev = Device::Cpu;
        let (n, k, rows) = (1001, 576, 37);
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 97 + 13) % n as u32).collect();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let expanded = q.dequantize(&dev).unwrap();
        for (weights, w) in [
            (Weights::Whole(QMatMul::Tensor(w.clone())), &w),
            (Weights::new(q).unwrap(), &expanded),
        ] {
            let mut pieces = 0;
            let mut soft = StreamingLogSoftmax::new(&targets);
            weights
                .for_each_piece(&x, &mut |offset, logits| {
                    pieces += 1;
                    soft.add(offset, logits)
                })
                .unwrap();
            assert_eq!(pieces, n.div_ceil(TILE_ELEMS / k));
            let got = soft.finish().unwrap();
            let logits = x.matmul(&w.t().unwrap()).unwrap();
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let idx = Tensor::from_slice(&targets, (rows, 1), &dev).unwrap();
            let want: Vec<f32> = logp
                .gather(&idx, 1)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
        let outside = [n as u32; 37];
        let mut soft = StreamingLogSoftmax::new(&outside);
        Weights::Whole(QMatMul::Tensor(w.clone()))
            .for_each_piece(&x, &mut |offset, logits| soft.add(offset, logits))
            .unwrap();
        let err = soft.finish().unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }

    /// A quantised embedding table expands exactly the rows looked up, as the whole table
    /// expanded would give them, and refuses an id past its end.
    #[test]
    fn quantised_embedding_rows_expand_as_the_whole_table_does() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 576), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let expanded = q.dequantize(&dev).unwrap();
        let table = Embedding::new(q, &dev, GgufWeights::Quantized).unwrap();
        assert!(matches!(table, Embedding::Quantized { .. }));
        let ids = [0u32, 299, 7, 7, 150];
        let t = Tensor::from_slice(&ids, ids.len(), &dev).unwrap();
        let got = table.lookup(&t, &ids).unwrap();
        let want = expanded.index_select(&t, 0).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0);
        let bad = [300u32];
        let t = Tensor::from_slice(&bad, 1, &dev).unwrap();
        let err = table.lookup(&t, &bad).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
}
