//! Rough memory needs of a training run, for a miner's accept/reject policy.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::lora::{DEFAULT_LORA_TARGETS, module_dims};
use crate::train::{Method, TrainConfig};

/// Estimated bytes a training run holds on its device. Activations are an upper-range
/// estimate (everything kept for the backward pass, no recomputation); real use varies
/// with the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Model weights: the frozen base in its dtype plus trainable tensors in f32.
    pub params: u64,
    /// Gradients of the trainable tensors (f32).
    pub grads: u64,
    /// AdamW moments (two f32 per trainable value).
    pub optimizer: u64,
    /// Activations of one micro-batch kept for the backward pass.
    pub activations: u64,
    /// The sum.
    pub total: u64,
}

/// [`estimate_memory_with_targets`] with LoRA on the default targets (q_proj, v_proj).
pub fn estimate_memory(cfg: &LlamaConfig, train: &TrainConfig, dtype: DType) -> MemoryEstimate {
    let targets: Vec<String> = DEFAULT_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
    estimate_memory_with_targets(cfg, train, &targets, dtype)
}

/// Estimates the memory of training `cfg` as `train` says, LoRA adapting `lora_targets`,
/// with frozen base weights in `dtype` (full fine-tuning always trains f32 weights).
pub fn estimate_memory_with_targets(
    cfg: &LlamaConfig,
    train: &TrainConfig,
    lora_targets: &[String],
    dtype: DType,
) -> MemoryEstimate {
    let n = cfg.param_count();
    let (base_bytes, trainable, act_bytes) = match train.method {
        Method::Full => (0, n, 4u64),
        Method::Lora { rank, .. } => {
            let per_layer: u64 = lora_targets
                .iter()
                .map(|t| {
                    let (i, o) = module_dims(cfg, t);
                    (rank * (i + o)) as u64
                })
                .sum();
            (
                n * dtype.size_in_bytes() as u64,
                per_layer * cfg.num_hidden_layers as u64,
                dtype.size_in_bytes() as u64,
            )
        }
    };
    let tokens = (train.batch_size * train.max_seq_len) as u64;
    let h = cfg.hidden_size as u64;
    let inter = cfg.intermediate_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let t = train.max_seq_len as u64;
    // Per token and layer: residual, norms, q/k/v/o and MLP intermediates in the compute
    // dtype, attention scores and probabilities in f32.
    let per_token_layer = (12 * h + 4 * inter) * act_bytes + 2 * heads * t * 4;
    // Logits, log-softmax and their gradient, f32.
    let head = 3 * cfg.vocab_size as u64 * 4;
    let activations = tokens * (per_token_layer * cfg.num_hidden_layers as u64 + head);
    let params = base_bytes + trainable * 4;
    let grads = trainable * 4;
    let optimizer = trainable * 8;
    MemoryEstimate {
        params,
        grads,
        optimizer,
        activations,
        total: params + grads + optimizer + activations,
    }
}

/// The process's peak resident set (`VmHWM` in /proc/self/status) in bytes, where the
/// kernel reports it: for benchmarks that put memory beside speed.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
