//! Merging a LoRA artifact into full weights: `W += (alpha / rank) · B A` for every
//! adapted module, written as a new model directory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::artifact::{load_artifact_tensors, read_artifact_manifest};
use crate::error::{CandleContext, MlError};
use crate::lora::{load_lora, normalize_targets};
use crate::model_dir::{CONFIG_FILE, ModelDir, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::train::Method;

/// Writes to `out` a model directory whose weights are `base` with the LoRA `adapter`
/// artifact merged in (f32, one `model.safetensors`), plus copies of the base's config
/// and tokenizer. Full-weight artifacts need no merging and are refused.
pub fn merge_adapter(base: &ModelDir, adapter: &Path, out: &Path) -> Result<(), MlError> {
    let cfg = base.config()?;
    let manifest = read_artifact_manifest(adapter)?;
    let bad = |problem: String| MlError::Artifact {
        path: adapter.to_path_buf(),
        problem,
    };
    let Method::Lora { rank, alpha } = manifest.method else {
        return Err(bad(
            "holds full weights, not a LoRA adapter: use it as a model's weights directly".into(),
        ));
    };
    let arch = |c: &crate::config::LlamaConfig| crate::config::LlamaConfig {
        model_type: None,
        architectures: None,
        ..c.clone()
    };
    if arch(&manifest.base_config) != arch(&cfg) {
        return Err(bad(format!(
            "was trained on a different base model than {}",
            base.path.display()
        )));
    }
    let targets = normalize_targets(&manifest.target_modules).map_err(|e| bad(e.to_string()))?;
    let tensors = load_artifact_tensors(adapter, &Device::Cpu)?;
    let lora = load_lora(&cfg, &tensors, &targets, rank, alpha).map_err(bad)?;
    let files = base.weight_files()?;
    crate::loader::check_weight_files(&base.path, &files)?;
    let mut merged: Vec<(String, Tensor)> = Vec::new();
    for f in &files {
        let ts = candle_core::safetensors::load(f, &Device::Cpu)
            .ctx(&format!("loading base weights {}", f.display()))?;
        for (name, t) in ts {
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            let t = match lora.map.get(module) {
                Some((a, b)) => {
                    let w = t.to_dtype(DType::F32).ctx("converting a weight")?;
                    let delta = (b.matmul(a).ctx("merging an adapter")? * lora.scale)
                        .ctx("merging an adapter")?;
                    (w + delta).ctx("merging an adapter")?
                }
                None if t.dtype().is_float() => t.to_dtype(DType::F32).ctx("converting")?,
                None => t,
            };
            merged.push((name, t));
        }
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(out).map_err(|e| MlError::io("cannot create model dir", out, e))?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::st_write::write(&out.join(WEIGHTS_FILE), merged, &meta).map_err(|e| {
        MlError::ModelDir {
            path: out.to_path_buf(),
            problem: format!("cannot write {WEIGHTS_FILE}: {e}"),
        }
    })?;
    for file in [CONFIG_FILE, TOKENIZER_FILE] {
        let from = base.path.join(file);
        std::fs::copy(&from, out.join(file)).map_err(|e| MlError::io("cannot copy", &from, e))?;
    }
    Ok(())
}
