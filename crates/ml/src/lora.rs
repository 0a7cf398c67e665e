//! LoRA adapters: which linear layers they attach to, their PEFT-style tensor names,
//! their seeded initialisation, and loading them back from an artifact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};

/// The linear layers LoRA adapts unless told otherwise.
pub const DEFAULT_LORA_TARGETS: &[&str] = &["q_proj", "v_proj"];

/// Every linear layer name a LoRA adapter may target.
pub const ALL_LORA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Prefix PEFT puts in front of the base model's tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The HF module path of a target in a layer, e.g. `model.layers.0.self_attn.q_proj`.
pub(crate) fn module_path(layer: usize, target: &str) -> Result<String, MlError> {
    let block = match target {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        other => {
            return Err(MlError::Invalid(format!(
                "unknown LoRA target module {other:?}; use some of {ALL_LORA_TARGETS:?}"
            )));
        }
    };
    Ok(format!("model.layers.{layer}.{block}.{target}"))
}

/// `(in, out)` features of a target linear layer.
pub(crate) fn module_dims(cfg: &LlamaConfig, target: &str) -> (usize, usize) {
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    match target {
        "q_proj" => (h, cfg.num_attention_heads * hd),
        "k_proj" | "v_proj" => (h, cfg.kv_heads() * hd),
        "o_proj" => (cfg.num_attention_heads * hd, h),
        "gate_proj" | "up_proj" => (h, cfg.intermediate_size),
        _ => (cfg.intermediate_size, h),
    }
}

/// PEFT names of the A and B matrices of the adapter on a module.
pub(crate) fn adapter_names(module: &str) -> (String, String) {
    (
        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
    )
}

/// Checks target names, removes duplicates and puts them in a canonical order.
pub(crate) fn normalize_targets(targets: &[String]) -> Result<Vec<String>, MlError> {
    if targets.is_empty() {
        return Err(MlError::Invalid(format!(
            "LoRA needs at least one target module; use some of {ALL_LORA_TARGETS:?}"
        )));
    }
    for t in targets {
        module_path(0, t)?;
    }
    Ok(ALL_LORA_TARGETS
        .iter()
        .filter(|t| targets.iter().any(|x| x == *t))
        .map(|t| t.to_string())
        .collect())
}

/// Seeded dropout on adapter inputs. The training loop reseeds it before every
/// micro-batch from (seed, step), so runs, and resumed runs, draw the same masks.
#[derive(Clone, Debug)]
pub(crate) struct Dropout {
    p: f64,
    rng: Arc<Mutex<StdRng>>,
}

impl Dropout {
    pub(crate) fn new(p: f64, seed: u64) -> Dropout {
        Dropout {
            p,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// Restarts the mask sequence from `seed`.
    pub(crate) fn reseed(&self, seed: u64) {
        if let Ok(mut rng) = self.rng.lock() {
            *rng = StdRng::seed_from_u64(seed);
        }
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let n = x.elem_count();
        let mask: Vec<f32> = match self.rng.lock() {
            Ok(mut rng) => (0..n)
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect(),
            Err(_) => candle_core::bail!("LoRA dropout generator lock poisoned"),
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// LoRA adapters ready to be applied: module path -> (A `[r, in]`, B `[out, r]`), the
/// scaling `alpha / rank`, and dropout on their inputs while training.
#[derive(Clone, Debug)]
pub(crate) struct LoraWeights {
    pub(crate) map: HashMap<String, (Tensor, Tensor)>,
    pub(crate) scale: f64,
    pub(crate) dropout: Option<Dropout>,
}

/// Creates trainable adapters for `targets` in every layer, in their own [`VarMap`]:
/// A is kaiming-uniform (bound `1/sqrt(in)`, as PEFT), B is zero, so training starts
/// from the base model exactly. Deterministic from `seed`.
pub(crate) fn init_lora(
    cfg: &LlamaConfig,
    targets: &[String],
    rank: usize,
    alpha: f64,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, LoraWeights), MlError> {
    if rank == 0 {
        return Err(MlError::Invalid("LoRA rank must be at least 1".into()));
    }
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(MlError::Invalid(format!(
            "LoRA alpha must be a positive number, got {alpha}"
        )));
    }
    let varmap = VarMap::new();
    let mut map = HashMap::new();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4c6f_5241_0000_0001);
    for layer in 0..cfg.num_hidden_layers {
        for target in targets {
            let module = module_path(layer, target)?;
            let (fan_in, fan_out) = module_dims(cfg, target);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a: Vec<f32> = (0..rank * fan_in)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (rank, fan_in), device).ctx("creating LoRA A")?;
            let b = Tensor::zeros((fan_out, rank), DType::F32, device).ctx("creating LoRA B")?;
            let a = Var::from_tensor(&a).ctx("creating LoRA A")?;
            let b = Var::from_tensor(&b).ctx("creating LoRA B")?;
            let (an, bn) = adapter_names(&module);
            map.insert(module, (a.as_tensor().clone(), b.as_tensor().clone()));
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| MlError::Invalid("LoRA variable map lock poisoned".into()))?;
            data.insert(an, a);
            data.insert(bn, b);
        }
    }
    Ok((
        varmap,
        LoraWeights {
            map,
            scale: alpha / rank as f64,
            dropout: None,
        },
    ))
}

/// Rebuilds adapters from artifact tensors, checking names and shapes against the model.
/// Errors are plain problem descriptions; the caller adds the artifact path.
pub(crate) fn load_lora(
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    targets: &[String],
    rank: usize,
    alpha: f64,
) -> Result<LoraWeights, String> {
    if rank == 0 || !alpha.is_finite() {
        return Err(format!(
            "manifest has an invalid LoRA rank {rank} / alpha {alpha}"
        ));
    }
    let mut map = HashMap::new();
    let mut used = 0;
    for layer in 0..cfg.num_hidden_layers {
        for target in targets {
            let module = module_path(layer, target).map_err(|e| e.to_string())?;
            let (fan_in, fan_out) = module_dims(cfg, target);
            let (an, bn) = adapter_names(&module);
            let get = |name: &str, want: (usize, usize)| -> Result<Tensor, String> {
                let t = tensors
                    .get(name)
                    .ok_or_else(|| format!("missing adapter tensor {name}"))?;
                if t.dims() != [want.0, want.1] {
                    return Err(format!(
                        "adapter tensor {name} has shape {:?}, the base model needs [{}, {}]",
                        t.dims(),
                        want.0,
                        want.1
                    ));
                }
                t.to_dtype(DType::F32).map_err(|e| e.to_string())
            };
            let a = get(&an, (rank, fan_in))?;
            let b = get(&bn, (fan_out, rank))?;
            used += 2;
            map.insert(module, (a, b));
        }
    }
    if used != tensors.len() {
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| {
                !map.keys()
                    .any(|m| adapter_names(m).0 == **k || adapter_names(m).1 == **k)
            })
            .collect();
        extra.sort();
        return Err(format!(
            "holds tensors that fit no adapted module of this model: {:?}",
            extra.iter().take(5).collect::<Vec<_>>()
        ));
    }
    Ok(LoraWeights {
        map,
        scale: alpha / rank as f64,
        dropout: None,
    })
}
