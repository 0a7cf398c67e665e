//! Tensor parallelism for models larger than one device (inference and scoring), as in
//! Megatron-LM and candle's multi-process Llama example: each device holds a slice of
//! every block, the attention heads (query heads split evenly; key/value heads split with
//! them, or shared by the devices whose query heads use them) and the MLP's intermediate
//! columns; the embedding, the final norm and the output head are on every device. Each
//! block's attention output and MLP output are partial sums over the devices, added up
//! through the same [`Collective`] data-parallel training uses. The devices run one
//! thread each, in lock step.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::eval::load_model;
use crate::loader::{WeightDtype, load_tokenizer};
use crate::model::{DenseParts, Mode, attention_mask, repeat_kv, rms_norm};
use crate::model_dir::ModelDir;
use crate::parallel::{Collective, RankComm, collective_for};
use crate::scoring::{HellaSwagScorer, PackedGroup};
use crate::tokenizer::TextTokenizer;

/// One device's slice of a block.
struct ShardBlock {
    attn_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    mlp_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// One device's slice of the model.
struct Shard {
    device: Device,
    embed: Tensor,
    layers: Vec<ShardBlock>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// Query heads and key/value heads on this device.
    heads: usize,
    kv_heads: usize,
}

/// One forward pass for a rank: the batch, and where its answer goes (the lead's logits;
/// `None` from the others).
struct Work {
    ids: Tensor,
    key_mask: Tensor,
    reply: std::sync::mpsc::Sender<Result<Option<Tensor>, MlError>>,
}

/// A model split over several devices: one worker thread per device, each holding its
/// slice and its handle on the collective for the model's lifetime (an NCCL communicator
/// is made once, not per batch).
pub struct TensorParallelLm {
    cfg: LlamaConfig,
    tok: TextTokenizer,
    devices: Vec<Device>,
    kind: &'static str,
    /// One queue per rank; forward passes go to every rank in the same order.
    workers: std::sync::Mutex<Vec<std::sync::mpsc::Sender<Work>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TensorParallelLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallelLm")
            .field("devices", &self.devices.len())
            .field("collective", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Drop for TensorParallelLm {
    fn drop(&mut self) {
        // Closing the queues ends the workers.
        if let Ok(mut w) = self.workers.lock() {
            w.clear();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// How `n` heads' worth of rows (each `hd` wide) split: device `r` of `world` gets rows
/// `[start, start + len)`.
fn rows(r: usize, per: usize, hd: usize) -> (usize, usize) {
    (r * per * hd, per * hd)
}

impl TensorParallelLm {
    /// Loads `model` (with `artifact` applied when given) in `dtype` and splits it over
    /// `devices` (the first one leads: inputs and logits live there), summing partial
    /// results through `collective` (None: [`collective_for`] the devices). The whole model
    /// is read into host memory once, then each device gets its slice. Fails, saying why,
    /// when the heads or the MLP width do not split evenly over the devices.
    pub fn load(
        model: &ModelDir,
        artifact: Option<&Path>,
        dtype: WeightDtype,
        devices: &[Device],
        collective: Option<Arc<dyn Collective>>,
    ) -> Result<TensorParallelLm, MlError> {
        let cfg = model.config()?;
        let Some(lead) = devices.first() else {
            return Err(MlError::Invalid(
                "tensor parallelism needs at least one device".into(),
            ));
        };
        let dtype = dtype.resolve(lead);
        let tok = load_tokenizer(model, &cfg)?;
        let llama = load_model(model, &cfg, artifact, dtype, &Device::Cpu)?;
        let parts = llama.dense_parts().ctx("merging the adapter")?;
        Self::from_parts(&cfg, tok, &parts, devices, collective)
    }

    fn from_parts(
        cfg: &LlamaConfig,
        tok: TextTokenizer,
        parts: &DenseParts,
        devices: &[Device],
        collective: Option<Arc<dyn Collective>>,
    ) -> Result<TensorParallelLm, MlError> {
        let world = devices.len();
        let collective = match collective {
            Some(c) if c.world() == world => c,
            Some(c) => {
                return Err(MlError::Invalid(format!(
                    "a collective of {} ranks cannot serve {world} devices",
                    c.world()
                )));
            }
            None => collective_for(devices)?,
        };
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let inter = cfg.intermediate_size;
        let split_err = |what: String| {
            MlError::Invalid(format!(
                "this model cannot be split over {world} devices: {what}"
            ))
        };
        if world == 0 || !nh.is_multiple_of(world) {
            return Err(split_err(format!(
                "its {nh} attention heads do not divide evenly"
            )));
        }
        if !inter.is_multiple_of(world) {
            return Err(split_err(format!(
                "its MLP width {inter} does not divide evenly"
            )));
        }
        let qpr = nh / world;
        let group = nh / nkv;
        if !qpr.is_multiple_of(group) && !group.is_multiple_of(qpr) {
            return Err(split_err(format!(
                "{qpr} query heads per device do not line up with groups of {group} query heads per key/value head"
            )));
        }
        let ipr = inter / world;
        let mut shards = Vec::with_capacity(world);
        for (r, device) in devices.iter().enumerate() {
            let put = |t: &Tensor| t.to_device(device);
            // This device's query heads, and the key/value heads they read.
            let kv_start = r * qpr / group;
            let kv_end = ((r + 1) * qpr - 1) / group + 1;
            let kv_heads = kv_end - kv_start;
            let (qs, ql) = rows(r, qpr, hd);
            let (ks, kl) = (kv_start * hd, kv_heads * hd);
            let layers = parts
                .layers
                .iter()
                .map(|b| {
                    Ok(ShardBlock {
                        attn_norm: put(&b.attn_norm)?,
                        q: put(&b.q.dense()?.narrow(0, qs, ql)?.contiguous()?)?,
                        k: put(&b.k.dense()?.narrow(0, ks, kl)?.contiguous()?)?,
                        v: put(&b.v.dense()?.narrow(0, ks, kl)?.contiguous()?)?,
                        o: put(&b.o.dense()?.narrow(1, qs, ql)?.contiguous()?)?,
                        mlp_norm: put(&b.mlp_norm)?,
                        gate: put(&b.gate.dense()?.narrow(0, r * ipr, ipr)?.contiguous()?)?,
                        up: put(&b.up.dense()?.narrow(0, r * ipr, ipr)?.contiguous()?)?,
                        down: put(&b.down.dense()?.narrow(1, r * ipr, ipr)?.contiguous()?)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .ctx("placing a model slice on its device")?;
            shards.push(Shard {
                device: device.clone(),
                embed: parts
                    .embed
                    .dense()
                    .and_then(|e| put(&e))
                    .ctx("placing the embedding")?,
                layers,
                norm: put(&parts.norm).ctx("placing the final norm")?,
                lm_head: parts
                    .lm_head
                    .dense()
                    .and_then(|h| put(&h))
                    .ctx("placing the output head")?,
                cos: put(&parts.cos).ctx("placing the rotary table")?,
                sin: put(&parts.sin).ctx("placing the rotary table")?,
                heads: qpr,
                kv_heads,
            });
        }
        let mut workers = Vec::with_capacity(world);
        let mut handles = Vec::with_capacity(world);
        for (r, shard) in shards.into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel::<Work>();
            let (collective, cfg) = (collective.clone(), cfg.clone());
            let h = std::thread::Builder::new()
                .name(format!("tunenet-tp{r}"))
                .spawn(move || {
                    let mut comm = collective.join(r, &shard.device);
                    while let Ok(w) = rx.recv() {
                        let out = match comm.as_mut() {
                            Ok(c) => {
                                let out =
                                    rank_forward(&cfg, &shard, c.as_mut(), &w.ids, &w.key_mask);
                                if out.is_err() {
                                    c.abort();
                                }
                                out
                            }
                            Err(e) => Err(MlError::Invalid(format!("joining the group: {e}"))),
                        };
                        // Only the lead's logits are kept.
                        let _ = w.reply.send(out.map(|l| (r == 0).then_some(l)));
                    }
                })
                .map_err(|e| {
                    MlError::Invalid(format!("cannot start a tensor-parallel worker: {e}"))
                })?;
            workers.push(tx);
            handles.push(h);
        }
        Ok(TensorParallelLm {
            cfg: cfg.clone(),
            tok,
            devices: devices.to_vec(),
            kind: collective.kind(),
            workers: std::sync::Mutex::new(workers),
            handles,
        })
    }

    /// Devices the model is split over.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// The first device: inputs and logits live there.
    pub fn lead_device(&self) -> &Device {
        &self.devices[0]
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Next-token logits after every position of `ids` (like `CausalLm::logits`).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, MlError> {
        if ids.is_empty() {
            return Err(MlError::Invalid("no token ids to run".into()));
        }
        let t = ids.len();
        let dev = self.lead_device();
        let input = Tensor::from_vec(ids.to_vec(), (1, t), dev).ctx("making input")?;
        let mask = Tensor::ones((1, t), DType::F32, dev).ctx("making mask")?;
        self.forward(&input, &mask)?
            .squeeze(0)
            .and_then(|l| l.to_vec2::<f32>())
            .ctx("reading logits")
    }

    /// Logits `[b, t, vocab]` (f32, on the lead device) for ids `[b, t]` with key mask
    /// `[b, t]` (1 real, 0 padding), as `Llama::forward` computes them on one device.
    pub(crate) fn forward(&self, ids: &Tensor, key_mask: &Tensor) -> Result<Tensor, MlError> {
        let (_, t) = ids.dims2().ctx("reading the input's shape")?;
        if t > self.cfg.max_position_embeddings {
            return Err(MlError::Invalid(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let workers = self
            .workers
            .lock()
            .map_err(|_| MlError::Invalid("tensor-parallel workers poisoned".into()))?;
        let mut replies = Vec::with_capacity(workers.len());
        for (r, w) in workers.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            w.send(Work {
                ids: ids.clone(),
                key_mask: key_mask.clone(),
                reply: tx,
            })
            .map_err(|_| MlError::Invalid(format!("tensor-parallel worker {r} has stopped")))?;
            replies.push(rx);
        }
        let mut lead = None;
        let mut first_err = None;
        for (r, rx) in replies.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok(Some(l))) => lead = Some(l),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert_with(|| format!("device {r}: {e}"));
                }
                Err(_) => {
                    first_err.get_or_insert_with(|| format!("device {r}: its worker stopped"));
                }
            }
        }
        drop(workers);
        if let Some(e) = first_err {
            return Err(MlError::Invalid(format!("tensor-parallel forward on {e}")));
        }
        lead.ok_or_else(|| MlError::Invalid("the lead device returned no logits".into()))
    }
}

/// One rank's share of a forward pass: logits `[b, t, vocab]` (every rank computes them;
/// only the lead's are kept).
fn rank_forward(
    cfg: &LlamaConfig,
    s: &Shard,
    comm: &mut dyn RankComm,
    ids: &Tensor,
    key_mask: &Tensor,
) -> Result<Tensor, MlError> {
    {
        let (b, t) = ids.dims2().ctx("reading the input's shape")?;
        let hd = cfg.head_dim();
        let eps = cfg.rms_norm_eps;
        let run = |what: &str, r: candle_core::Result<Tensor>| r.ctx(what);
        let ids = run("moving the input", ids.to_device(&s.device))?;
        let key_mask = run("moving the mask", key_mask.to_device(&s.device))?;
        let mask = run(
            "building the mask",
            attention_mask(&key_mask, t, cfg.sliding_window),
        )?;
        let cos = run("rotary table", s.cos.narrow(0, 0, t))?;
        let sin = run("rotary table", s.sin.narrow(0, 0, t))?;
        let mut x = run(
            "embedding",
            ids.flatten_all().and_then(|i| s.embed.index_select(&i, 0)),
        )?;
        for layer in &s.layers {
            // Attention over this device's heads, then its share of the output projection.
            let part = run(
                "attention",
                (|| {
                    let hn = rms_norm(&x, &layer.attn_norm, eps, Mode::Infer)?;
                    let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
                        y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
                    };
                    let q = split(hn.matmul(&layer.q.t()?)?, s.heads)?;
                    let k = split(hn.matmul(&layer.k.t()?)?, s.kv_heads)?;
                    let v = split(hn.matmul(&layer.v.t()?)?, s.kv_heads)?;
                    let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
                    let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
                    let k = repeat_kv(k, s.heads / s.kv_heads)?;
                    let v = repeat_kv(v, s.heads / s.kv_heads)?;
                    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
                    let scores = scores.to_dtype(DType::F32)?.broadcast_add(&mask)?;
                    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
                    let y = probs
                        .matmul(&v)?
                        .transpose(1, 2)?
                        .reshape((b * t, s.heads * hd))?;
                    y.matmul(&layer.o.t()?)
                })(),
            )?;
            let att = comm.all_reduce_sum(&[part])?.remove(0);
            x = run("residual", x + att)?;
            // The MLP over this device's columns, then its share of the down projection.
            let part = run(
                "MLP",
                (|| {
                    let hn = rms_norm(&x, &layer.mlp_norm, eps, Mode::Infer)?;
                    let g = hn.matmul(&layer.gate.t()?)?.silu()?;
                    let u = hn.matmul(&layer.up.t()?)?;
                    (g * u)?.matmul(&layer.down.t()?)
                })(),
            )?;
            let mlp = comm.all_reduce_sum(&[part])?.remove(0);
            x = run("residual", x + mlp)?;
        }
        run(
            "output head",
            (|| {
                let x = rms_norm(&x, &s.norm, eps, Mode::Infer)?;
                x.matmul(&s.lm_head.t()?)?
                    .to_dtype(DType::F32)?
                    .reshape((b, t, cfg.vocab_size))
            })(),
        )
    }
}

impl HellaSwagScorer for TensorParallelLm {
    fn encode(&self, text: &str) -> Result<Vec<u32>, MlError> {
        self.tok.encode(text)
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Each branch runs as its own row (prefix and branch), right-padded; the scored
    /// tokens' log-probabilities are gathered on the lead device.
    fn score_groups(&self, groups: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError> {
        let vocab = self.cfg.vocab_size;
        let mut rows: Vec<(usize, usize, Vec<u32>, usize)> = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            if g.prefix.is_empty() {
                return Err(MlError::Invalid(
                    "a packed group has an empty prefix".into(),
                ));
            }
            for (bi, b) in g.branches.iter().enumerate() {
                let seq: Vec<u32> = g.prefix.iter().chain(&b.tokens).copied().collect();
                if b.score_from == 0 || b.score_from >= seq.len() {
                    return Err(MlError::Invalid(format!(
                        "branch scores from token {} of a {}-token sequence",
                        b.score_from,
                        seq.len()
                    )));
                }
                if seq.len() - 1 > self.cfg.max_position_embeddings {
                    return Err(MlError::Invalid(format!(
                        "{} tokens exceed the model's context of {}",
                        seq.len() - 1,
                        self.cfg.max_position_embeddings
                    )));
                }
                if let Some(bad) = seq.iter().find(|&&t| t as usize >= vocab) {
                    return Err(MlError::Invalid(format!(
                        "token id {bad} is outside the vocabulary of {vocab}"
                    )));
                }
                rows.push((gi, bi, seq, b.score_from));
            }
        }
        let mut out: Vec<Vec<f64>> = groups.iter().map(|g| vec![0.0; g.branches.len()]).collect();
        if rows.is_empty() {
            return Ok(out);
        }
        let n = rows.len();
        let t = rows.iter().map(|r| r.2.len() - 1).max().unwrap_or(1);
        let (mut input, mut key, mut targets, mut scored) = (
            vec![0u32; n * t],
            vec![0f32; n * t],
            vec![0u32; n * t],
            vec![0f32; n * t],
        );
        for (row, (_, _, seq, from)) in rows.iter().enumerate() {
            for j in 0..seq.len() - 1 {
                input[row * t + j] = seq[j];
                key[row * t + j] = 1.0;
                targets[row * t + j] = seq[j + 1];
                // Position j predicts token j + 1.
                if j + 1 >= *from {
                    scored[row * t + j] = 1.0;
                }
            }
        }
        let dev = self.lead_device();
        let make = || -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
            Ok((
                Tensor::from_vec(input, (n, t), dev)?,
                Tensor::from_vec(key, (n, t), dev)?,
                Tensor::from_vec(targets, (n, t, 1), dev)?,
                Tensor::from_vec(scored, (n, t), dev)?,
            ))
        };
        let (input, key, targets, scored) = make().ctx("making a scoring batch")?;
        let logits = self.forward(&input, &key)?;
        let sums = (|| {
            let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
            let picked = logp.gather(&targets, 2)?.squeeze(2)?;
            (picked * scored)?
                .sum(1)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()
        })()
        .ctx("scoring a batch")?;
        for ((g, b, _, _), s) in rows.iter().zip(sums) {
            out[*g][*b] = s;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "dense, split over {} devices ({})",
            self.devices.len(),
            self.kind
        )
    }
}
