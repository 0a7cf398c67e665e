//! Loading a model directory's weights: the dtype choice, checks that name a corrupt or
//! truncated weight file, and the tokenizer/config vocabulary check.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::lora::LoraWeights;
use crate::model::Llama;
use crate::model_dir::ModelDir;
use crate::tokenizer::TextTokenizer;

/// Precision of the frozen base weights. `auto` is f32 on CPU and bf16 on a GPU.
/// Trainable tensors (LoRA adapters, full fine-tuning weights) are always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// f32 on CPU, bf16 on CUDA.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16 (GPUs of compute capability 8.0 and newer).
    Bf16,
    /// IEEE half precision (V100s and other GPUs without bf16).
    F16,
}

impl WeightDtype {
    /// The candle dtype this choice means on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            WeightDtype::Auto if device.is_cpu() => DType::F32,
            WeightDtype::Auto => DType::BF16,
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

impl FromStr for WeightDtype {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self, MlError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(WeightDtype::Auto),
            "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            other => Err(MlError::Invalid(format!(
                "unknown dtype {other:?}; use auto, f32, bf16 or f16"
            ))),
        }
    }
}

/// Checks that every weight file is a complete safetensors file, naming the one that is not.
pub(crate) fn check_weight_files(model: &Path, files: &[PathBuf]) -> Result<(), MlError> {
    for f in files {
        // SAFETY: the file is memory-mapped read-only and not modified while it is read.
        if let Err(e) = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) } {
            return Err(MlError::ModelDir {
                path: model.to_path_buf(),
                problem: format!(
                    "has a corrupt or truncated weights file {}: {e}; download or convert the checkpoint again",
                    f.display()
                ),
            });
        }
    }
    Ok(())
}

/// Memory-maps the base weights (frozen) in `dtype`.
pub(crate) fn mmap_weights(
    model: &Path,
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, MlError> {
    check_weight_files(model, files)?;
    // SAFETY: the weight files are memory-mapped read-only and are not modified while the
    // model is in use.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .ctx("memory-mapping the base weights")
}

/// Builds the base model of `model` (frozen, mmapped) in `dtype`, with `lora` adapters.
pub(crate) fn load_base(
    model: &ModelDir,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
    lora: Option<&LoraWeights>,
) -> Result<Llama, MlError> {
    let files = model.weight_files()?;
    let vb = mmap_weights(&model.path, &files, dtype, device)?;
    Llama::new(cfg, &vb, lora).map_err(|e| MlError::ModelDir {
        path: model.path.clone(),
        problem: format!("weights do not fit config.json: {e}"),
    })
}

/// Loads `tokenizer.json` and checks it against the config: a tokenizer with more ids than
/// the model's vocabulary is refused (its extra ids would index past the embedding table);
/// fewer is fine, as checkpoints pad their vocabulary.
pub(crate) fn load_tokenizer(
    model: &ModelDir,
    cfg: &LlamaConfig,
) -> Result<TextTokenizer, MlError> {
    let path = model.tokenizer_path();
    let tok = TextTokenizer::from_file(&path)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let (bos, eos) = (name(cfg.bos_token_id), name(cfg.eos_token_id));
    let chat = ChatTemplate::from_model_dir(&model.path, &bos, &eos)?
        .unwrap_or_else(|| ChatTemplate::plain(&bos, &eos));
    let tok = tok.with_chat(chat);
    if tok.vocab_size() > cfg.vocab_size {
        return Err(MlError::Tokenizer {
            path,
            problem: format!(
                "has {} ids but config.json's vocab_size is {}: the tokenizer does not belong to this model; use the checkpoint's own tokenizer.json",
                tok.vocab_size(),
                cfg.vocab_size
            ),
        });
    }
    Ok(tok)
}
