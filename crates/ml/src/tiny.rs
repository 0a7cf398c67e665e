//! A random tiny Llama in Hugging Face layout, for tests and demos.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::model_dir::{CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::tokenizer::{BYTE_VOCAB_SIZE, write_byte_tokenizer};

/// Configuration of the tiny model: hidden 64, 2 layers, 4 heads (2 key/value heads),
/// MLP 172, byte-level vocabulary (259), context 256, bos 256, eos 257.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: BYTE_VOCAB_SIZE,
        hidden_size: 64,
        intermediate_size: 172,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: Some(256),
        eos_token_id: Some(257),
        model_type: Some("llama".into()),
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        rope_scaling: None,
        head_dim: None,
        sliding_window: None,
    }
}

/// Writes a random tiny Llama ([`tiny_config`]; embeddings standard normal, projections
/// normal with std `1/sqrt(fan_in)`, norms one)
/// and a byte-level BPE tokenizer to `out` in Hugging Face layout (config.json,
/// tokenizer.json, model.safetensors). Deterministic from `seed`.
pub fn init_tiny(out: &Path, seed: u64) -> Result<LlamaConfig, MlError> {
    std::fs::create_dir_all(out).map_err(|e| MlError::io("cannot create model dir", out, e))?;
    let cfg = tiny_config();
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let q_out = cfg.num_attention_heads * hd;
    let kv_out = cfg.kv_heads() * hd;
    let inter = cfg.intermediate_size;
    let mut shapes: Vec<(String, Vec<usize>, bool)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        false,
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![q_out, h]),
            ("self_attn.k_proj", vec![kv_out, h]),
            ("self_attn.v_proj", vec![kv_out, h]),
            ("self_attn.o_proj", vec![h, q_out]),
            ("mlp.gate_proj", vec![inter, h]),
            ("mlp.up_proj", vec![inter, h]),
            ("mlp.down_proj", vec![h, inter]),
        ] {
            shapes.push((format!("{p}.{name}.weight"), shape, false));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h], true));
        shapes.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        ));
    }
    shapes.push(("model.norm.weight".into(), vec![h], true));
    shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h], false));

    let mut tensors = Vec::with_capacity(shapes.len());
    for (name, shape, is_norm) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if is_norm {
            vec![1.0; n]
        } else {
            // LeCun-normal projections keep activations at unit scale in so small a
            // model, so frozen random weights still pass a useful signal to LoRA adapters.
            let fan_in = shape.last().copied().unwrap_or(1) as f32;
            let std = if name == "model.embed_tokens.weight" {
                1.0
            } else {
                1.0 / fan_in.sqrt()
            };
            (0..n).map(|_| std * standard_normal(&mut rng)).collect()
        };
        let t = Tensor::from_vec(data, shape, &dev).ctx("creating tiny weights")?;
        tensors.push((name, t));
    }
    let weights = out.join(WEIGHTS_FILE);
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::st_write::write(&weights, tensors, &metadata).map_err(|e| MlError::ModelDir {
        path: out.to_path_buf(),
        problem: format!("cannot write {WEIGHTS_FILE}: {e}"),
    })?;
    let config_path = out.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&cfg)
        .map_err(|e| MlError::Invalid(format!("cannot serialise config: {e}")))?;
    std::fs::write(&config_path, json).map_err(|e| MlError::io("cannot write", &config_path, e))?;
    write_byte_tokenizer(&out.join(TOKENIZER_FILE))?;
    Ok(cfg)
}

/// A standard normal sample (Box-Muller).
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()) as f32
}
