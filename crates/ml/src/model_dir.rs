//! A model directory in Hugging Face layout.

use std::path::{Path, PathBuf};

use crate::config::LlamaConfig;
use crate::error::MlError;

/// Name of the model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the (unsharded) weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// A model directory in Hugging Face layout: `config.json`, `tokenizer.json`, and
/// `model.safetensors` (or shards listed in `model.safetensors.index.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
}

impl ModelDir {
    /// Opens a model directory, checking that it holds a config, a tokenizer and weights.
    pub fn open(path: &Path) -> Result<ModelDir, MlError> {
        let problem = |p: String| MlError::ModelDir {
            path: path.to_path_buf(),
            problem: p,
        };
        if !path.is_dir() {
            return Err(problem(
                "does not exist or is not a directory; pass a directory holding config.json, tokenizer.json and model.safetensors (e.g. from `init_tiny`)".into(),
            ));
        }
        for (file, what) in [
            (CONFIG_FILE, "the model configuration"),
            (TOKENIZER_FILE, "the tokenizer"),
        ] {
            if !path.join(file).is_file() {
                return Err(problem(format!(
                    "has no {file}: it must hold {what} in Hugging Face layout"
                )));
            }
        }
        if !path.join(WEIGHTS_FILE).is_file() && !path.join(WEIGHTS_INDEX_FILE).is_file() {
            return Err(problem(format!(
                "has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}): it must hold the weights in safetensors format"
            )));
        }
        Ok(ModelDir {
            path: path.to_path_buf(),
        })
    }

    /// Reads and validates `config.json`.
    pub fn config(&self) -> Result<LlamaConfig, MlError> {
        LlamaConfig::from_file(&self.path.join(CONFIG_FILE))
    }

    /// Path of `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.path.join(TOKENIZER_FILE)
    }

    /// The safetensors files holding the weights (one, or the shards of an index).
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, MlError> {
        let single = self.path.join(WEIGHTS_FILE);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = self.path.join(WEIGHTS_INDEX_FILE);
        let bytes = std::fs::read(&index).map_err(|e| MlError::io("cannot read", &index, e))?;
        let bad = |problem: String| MlError::ModelDir {
            path: self.path.clone(),
            problem,
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("has an unreadable {WEIGHTS_INDEX_FILE}: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                bad(format!(
                    "has a {WEIGHTS_INDEX_FILE} without a weight_map object"
                ))
            })?;
        let mut files: Vec<String> = Vec::new();
        for v in map.values() {
            let name = v.as_str().ok_or_else(|| {
                bad(format!(
                    "{WEIGHTS_INDEX_FILE}: weight_map values must be file names"
                ))
            })?;
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(bad(format!(
                    "{WEIGHTS_INDEX_FILE} names a shard outside the directory: {name}"
                )));
            }
            if !files.iter().any(|f| f == name) {
                files.push(name.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.into_iter().map(|f| self.path.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(bad(format!("is missing shard {}", missing.display())));
        }
        Ok(paths)
    }

    /// The files that make up the model: config.json, tokenizer.json, the weights, and the
    /// chat template's files (tokenizer_config.json, chat_template.jinja) when it has them.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.path.join(CONFIG_FILE), self.path.join(TOKENIZER_FILE)];
        match self.weight_files() {
            Ok(w) => {
                if !self.path.join(WEIGHTS_FILE).is_file() {
                    out.push(self.path.join(WEIGHTS_INDEX_FILE));
                }
                out.extend(w);
            }
            Err(_) => out.push(self.path.join(WEIGHTS_FILE)),
        }
        // How conversations are rendered travels with the model, so miners train with the
        // chat template the validator scores with.
        out.extend(
            ["tokenizer_config.json", "chat_template.jinja"]
                .into_iter()
                .map(|f| self.path.join(f))
                .filter(|p| p.is_file()),
        );
        out
    }
}
