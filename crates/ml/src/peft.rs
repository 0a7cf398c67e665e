//! LoRA adapters in PEFT layout (`adapter_config.json` + `adapter_model.safetensors`), so
//! other tools can load what tunenet trains.

use std::collections::{BTreeMap, HashMap};
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
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::st_write::write(&wpath, tensors.to_vec(), &meta).map_err(|e| MlError::Artifact {
        path: wpath.clone(),
        problem: format!("cannot write the PEFT adapter: {e}"),
    })
}

/// Turns a LoRA adapter in PEFT's layout (`dir` holding `adapter_config.json` and
/// `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes it) for the base
/// model `base` into a tunenet artifact in `out_dir`; returns its path. The adapter must be
/// plain LoRA (no DoRA, rsLoRA, biases, `fan_in_fan_out` or `modules_to_save`) on
/// tunenet's target modules, with an A and a B matrix of the right shapes for every layer
/// of every target it names and no other tensor. Errors say what does not fit.
pub fn import_peft_adapter(
    base: &crate::ModelDir,
    dir: &Path,
    out_dir: &Path,
) -> Result<std::path::PathBuf, MlError> {
    use crate::artifact::write_artifact;
    use crate::lora::{adapter_names, module_dims, module_path, normalize_targets};
    let bad = |problem: String| MlError::Artifact {
        path: dir.to_path_buf(),
        problem,
    };
    let cpath = dir.join(PEFT_CONFIG_FILE);
    let text =
        std::fs::read_to_string(&cpath).map_err(|e| MlError::io("cannot read", &cpath, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{PEFT_CONFIG_FILE} is not JSON: {e}")))?;
    let get = |k: &str| config.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type").and_then(|v| v.as_str())
        && t != "LORA"
    {
        return Err(bad(format!(
            "peft_type {t:?}: only LORA adapters are accepted"
        )));
    }
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out"] {
        if get(flag).and_then(|v| v.as_bool()).unwrap_or(false) {
            return Err(bad(format!("{flag} is set: only plain LoRA is accepted")));
        }
    }
    if let Some(b) = get("bias").and_then(|v| v.as_str())
        && b != "none"
    {
        return Err(bad(format!("bias {b:?}: only bias \"none\" is accepted")));
    }
    if get("modules_to_save").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(bad(
            "modules_to_save is set: an adapter may change only its LoRA matrices".into(),
        ));
    }
    let rank = get("r")
        .and_then(|v| v.as_u64())
        .filter(|r| *r >= 1)
        .ok_or_else(|| bad(format!("{PEFT_CONFIG_FILE} has no rank `r` of at least 1")))?
        as usize;
    let alpha = get("lora_alpha")
        .and_then(|v| v.as_f64())
        .filter(|a| a.is_finite() && *a > 0.0)
        .ok_or_else(|| bad(format!("{PEFT_CONFIG_FILE} has no positive `lora_alpha`")))?;
    let targets: Vec<String> = match get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("target_modules must be names".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(serde_json::Value::String(s)) => {
            return Err(bad(format!(
                "target_modules is a pattern ({s:?}); list the modules by name"
            )));
        }
        _ => return Err(bad(format!("{PEFT_CONFIG_FILE} lists no target_modules"))),
    };
    let targets = normalize_targets(&targets).map_err(|e| bad(e.to_string()))?;
    let cfg = base.config()?;
    let wpath = dir.join(PEFT_WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&wpath, &candle_core::Device::Cpu)
        .map_err(|e| bad(format!("cannot read {PEFT_WEIGHTS_FILE}: {e}")))?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for t in &targets {
            let module = module_path(layer, t)?;
            let (a_name, b_name) = adapter_names(&module);
            let (fan_in, fan_out) = module_dims(&cfg, t);
            for (name, shape) in [(a_name, [rank, fan_in]), (b_name, [fan_out, rank])] {
                let x = tensors
                    .remove(&name)
                    .ok_or_else(|| bad(format!("{PEFT_WEIGHTS_FILE} has no {name}")))?;
                if x.dims() != shape {
                    return Err(bad(format!(
                        "{name} has shape {:?}; rank {rank} on this base needs {shape:?}",
                        x.dims()
                    )));
                }
                let x = x
                    .to_dtype(candle_core::DType::F32)
                    .map_err(|e| bad(format!("{name}: {e}")))?;
                out.push((name, x));
            }
        }
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(bad(format!(
            "{PEFT_WEIGHTS_FILE} holds {extra}, which is not a LoRA matrix of the listed targets ({} more unexpected)",
            tensors.len() - 1
        )));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest = imported_manifest(base, cfg, crate::Method::Lora { rank, alpha }, targets)?;
    write_artifact(out_dir, out, &manifest)
}

/// The manifest of an artifact imported from another tool: the base's config and hash,
/// the method, no training counters (tunenet did not train it).
fn imported_manifest(
    base: &crate::ModelDir,
    cfg: crate::LlamaConfig,
    method: crate::Method,
    targets: Vec<String>,
) -> Result<crate::artifact::ArtifactManifest, MlError> {
    let mut hashed = vec![base.path.join(crate::CONFIG_FILE)];
    hashed.extend(base.weight_files()?);
    Ok(crate::artifact::ArtifactManifest {
        format: crate::artifact::ARTIFACT_FORMAT.to_string(),
        method: method.clone(),
        target_modules: targets,
        base_config: cfg,
        base_model_hash: crate::artifact::hash_files(&hashed)?,
        steps: 0,
        tokens: 0,
        final_train_loss: 0.0,
        train_config: crate::TrainConfig {
            method,
            ..Default::default()
        },
    })
}

/// Imports the full weights an external trainer saved in Hugging Face layout in `dir`
/// (`model.safetensors`, or shards listed in `model.safetensors.index.json`; a
/// `config.json` there, if any, must describe the base's architecture): every tensor of
/// `base` must be present with the base's shape (a tied base's `lm_head.weight` may be
/// left out or included) and nothing else; weights are stored in f32. Writes a full
/// fine-tuning artifact (with its manifest) to `out_dir` and returns its path.
pub fn import_full_weights(
    base: &crate::ModelDir,
    dir: &Path,
    out_dir: &Path,
) -> Result<std::path::PathBuf, MlError> {
    use crate::artifact::{tensor_shapes, write_artifact};
    let bad = |problem: String| MlError::Artifact {
        path: dir.to_path_buf(),
        problem,
    };
    let cfg = base.config()?;
    let cpath = dir.join(crate::CONFIG_FILE);
    if cpath.is_file() {
        let theirs = crate::ModelDir {
            path: dir.to_path_buf(),
        }
        .config()
        .map_err(|e| bad(format!("its {}: {e}", crate::CONFIG_FILE)))?;
        if crate::eval::arch(&theirs) != crate::eval::arch(&cfg) {
            return Err(bad(format!(
                "its {} describes another architecture than the base's ({:?} against {:?})",
                crate::CONFIG_FILE,
                theirs,
                cfg
            )));
        }
    }
    let files = crate::ModelDir {
        path: dir.to_path_buf(),
    }
    .weight_files()?;
    let base_files = base.weight_files()?;
    let want = tensor_shapes(&base_files)?;
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(want.len());
    let mut seen: HashMap<String, ()> = HashMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("cannot read {}: {e}", f.display())))?;
        for (name, t) in tensors {
            let Some(shape) = want.get(&name) else {
                if name == "lm_head.weight" && cfg.tie_word_embeddings {
                    continue;
                }
                return Err(bad(format!(
                    "{name} is not a tensor of the base model (a full fine-tune keeps the base's tensors, no more)"
                )));
            };
            if t.dims() != shape.as_slice() {
                return Err(bad(format!(
                    "{name} has shape {:?}; the base's is {shape:?}",
                    t.dims()
                )));
            }
            let t = if t.dtype().is_float() {
                t.to_dtype(candle_core::DType::F32)
                    .map_err(|e| bad(format!("{name}: {e}")))?
            } else {
                t
            };
            seen.insert(name.clone(), ());
            out.push((name, t));
        }
    }
    let mut missing: Vec<&String> = want.keys().filter(|k| !seen.contains_key(*k)).collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(bad(format!(
            "{first} is missing ({} of the base's {} tensors are)",
            missing.len(),
            want.len()
        )));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest = imported_manifest(base, cfg, crate::Method::Full, Vec::new())?;
    write_artifact(out_dir, out, &manifest)
}
