//! Training artifacts: a safetensors file (LoRA adapter tensors or full weights) with the
//! manifest embedded in its metadata, plus the manifest as `manifest.json`.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{CandleContext, MlError};
use crate::train::{Method, TrainConfig};

/// Value of [`ArtifactManifest::format`].
pub const ARTIFACT_FORMAT: &str = "tunenet-artifact/1";
/// File name of the artifact tensors in the output directory.
pub const ARTIFACT_FILE: &str = "artifact.safetensors";
/// File name of the manifest in the output directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Key of the manifest JSON in the safetensors `__metadata__`.
pub const MANIFEST_METADATA_KEY: &str = "tunenet_manifest";
/// Largest safetensors header [`read_artifact_manifest`] accepts.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// What a training run produced and from what.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArtifactManifest {
    /// Always [`ARTIFACT_FORMAT`].
    pub format: String,
    /// Full weights or a LoRA adapter (flattened: `"method": "lora", "rank", "alpha"`).
    #[serde(flatten)]
    pub method: Method,
    /// Linear layers carrying adapters (LoRA); empty for full fine-tuning.
    pub target_modules: Vec<String>,
    /// Configuration of the base model the artifact applies to.
    pub base_config: LlamaConfig,
    /// blake3 (hex) of the base model's config.json and weight files, in that order.
    pub base_model_hash: String,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Non-padding tokens trained on.
    pub tokens: u64,
    /// Training loss of the last step.
    pub final_train_loss: f32,
    /// The training configuration used.
    pub train_config: TrainConfig,
}

/// Writes `out_dir/artifact.safetensors` (tensors plus the manifest in its metadata) and
/// `out_dir/manifest.json`. Returns the artifact path.
pub(crate) fn write_artifact(
    out_dir: &Path,
    tensors: Vec<(String, Tensor)>,
    manifest: &ArtifactManifest,
) -> Result<PathBuf, MlError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| MlError::io("cannot create output dir", out_dir, e))?;
    let json = serde_json::to_string(manifest)
        .map_err(|e| MlError::Invalid(format!("cannot serialise the artifact manifest: {e}")))?;
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (MANIFEST_METADATA_KEY.to_string(), json),
    ]);
    let path = out_dir.join(ARTIFACT_FILE);
    let tmp = out_dir.join(format!("{ARTIFACT_FILE}.tmp"));
    crate::st_write::write(&tmp, tensors, &metadata).map_err(|e| MlError::Artifact {
        path: tmp.clone(),
        problem: format!("cannot write: {e}"),
    })?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| MlError::io("cannot move artifact into place", &path, e))?;
    let pretty = serde_json::to_vec_pretty(manifest)
        .map_err(|e| MlError::Invalid(format!("cannot serialise the artifact manifest: {e}")))?;
    let mpath = out_dir.join(MANIFEST_FILE);
    std::fs::write(&mpath, pretty).map_err(|e| MlError::io("cannot write", &mpath, e))?;
    Ok(path)
}

/// Reads the manifest from an artifact's safetensors metadata without loading tensors.
/// Refuses headers over 100 MB and files that are not tunenet artifacts.
pub fn read_artifact_manifest(path: &Path) -> Result<ArtifactManifest, MlError> {
    let bad = |problem: String| MlError::Artifact {
        path: path.to_path_buf(),
        problem,
    };
    let mut file =
        std::fs::File::open(path).map_err(|e| MlError::io("cannot open artifact", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| MlError::io("cannot stat artifact", path, e))?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| {
        bad(
            "too short to be a safetensors file; pass the artifact.safetensors written by training"
                .into(),
        )
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "safetensors header claims {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit; not a tunenet artifact"
        )));
    }
    if header_len + 8 > file_len {
        return Err(bad(format!(
            "safetensors header claims {header_len} bytes but the file has only {file_len}; the file is truncated or not safetensors"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| MlError::io("cannot read artifact header", path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
    let manifest_json = header
        .get("__metadata__")
        .and_then(|m| m.get(MANIFEST_METADATA_KEY))
        .and_then(|m| m.as_str())
        .ok_or_else(|| {
            bad(format!(
                "has no {MANIFEST_METADATA_KEY:?} entry in its safetensors metadata: not a tunenet artifact"
            ))
        })?;
    let manifest: ArtifactManifest = serde_json::from_str(manifest_json)
        .map_err(|e| bad(format!("embedded manifest is malformed: {e}")))?;
    if manifest.format != ARTIFACT_FORMAT {
        return Err(bad(format!(
            "format {:?} is not supported (expected {ARTIFACT_FORMAT:?}); upgrade tunenet",
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Loads every tensor of an artifact.
pub(crate) fn load_artifact_tensors(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, MlError> {
    candle_core::safetensors::load(path, device)
        .ctx(&format!("loading artifact {}", path.display()))
}

/// Names and shapes of the tensors in safetensors files, read from their headers.
pub(crate) fn tensor_shapes(files: &[PathBuf]) -> Result<HashMap<String, Vec<usize>>, MlError> {
    let mut out = HashMap::new();
    for f in files {
        // SAFETY: the file is memory-mapped read-only; tunenet never modifies model or
        // artifact files while they are being read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .ctx(&format!("reading safetensors {}", f.display()))?;
        for (name, view) in st.tensors() {
            out.insert(name, view.shape().to_vec());
        }
    }
    Ok(out)
}

/// blake3 (hex) of the model's config.json followed by its weight files.
pub(crate) fn hash_files(files: &[PathBuf]) -> Result<String, MlError> {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| MlError::io("cannot open", f, e))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| MlError::io("cannot read", f, e))?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}
