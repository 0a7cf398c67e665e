//! LoRA adapters in PEFT layout (`adapter_config.json` + `adapter_model.safetensors`), so
//! other tools can load what tunenet trains.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::MlError;

/// File name of the PEFT adapter configuration.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT adapter weights.
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Writes `adapter_config.json` and `adapter_model.safetensors` to `out_dir`. `tensors`
/// already carry PEFT names (`base_model.model.….lora_A.weight`).
pub(crate) fn write_peft_adapter(
    out_dir: &Path,
    tensors: &[(String, Tensor)],
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: &[String],
) -> Result<(), MlError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| MlError::io("cannot create output dir", out_dir, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "base_model_name_or_path": null,
    });
    let cpath = out_dir.join(PEFT_CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| MlError::Invalid(format!("cannot serialise adapter_config.json: {e}")))?;
    std::fs::write(&cpath, json).map_err(|e| MlError::io("cannot write", &cpath, e))?;
    let wpath = out_dir.join(PEFT_WEIGHTS_FILE);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.to_vec(), Some(meta), &wpath).map_err(|e| {
        MlError::Artifact {
            path: wpath.clone(),
            problem: format!("cannot write the PEFT adapter: {e}"),
        }
    })
}
