//! The Llama-family model configuration (Hugging Face `config.json`).

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::MlError;

/// A Llama-family model configuration, as found in a Hugging Face `config.json`.
/// Unknown fields are ignored when reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of token ids the embedding table holds.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `None` means one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Whether the output projection shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Id of the beginning-of-sequence token, prepended to every training sequence.
    #[serde(default, deserialize_with = "one_or_first")]
    pub bos_token_id: Option<u32>,
    /// Id of the end-of-sequence token, appended to every training sequence.
    #[serde(default, deserialize_with = "one_or_first")]
    pub eos_token_id: Option<u32>,
    /// Hugging Face model type, e.g. "llama".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Hugging Face architectures, e.g. ["LlamaForCausalLM"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Rotary-embedding scaling (`rope_scaling` in config.json), for long-context models
    /// such as Llama 3.x.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rope_scaling_compat"
    )]
    pub rope_scaling: Option<RopeScaling>,
    /// Width of one attention head when it is not `hidden_size / num_attention_heads`
    /// (e.g. Mistral-Nemo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Mistral-style sliding attention window: a query attends at most this many keys back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

/// Model types (`model_type`) whose checkpoints this crate runs.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral"];

/// Architectures (`architectures[0]`) whose checkpoints this crate runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// How rotary frequencies are rescaled for contexts longer than the pre-training one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (position interpolation).
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// NTK-aware scaling: the base grows with `factor` (HF "dynamic" at full length).
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, smooth in between.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Below this wavelength ratio frequencies are divided by `factor`.
        low_freq_factor: f64,
        /// Above this wavelength ratio frequencies are kept.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
    },
    /// No scaling (HF writes `{"rope_type": "default"}`).
    Default,
}

/// Reads `rope_scaling` objects that name their kind under `type` (older HF configs) or
/// `rope_type`.
fn rope_scaling_compat<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RopeScaling>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    let Some(mut v) = v else { return Ok(None) };
    if let Some(obj) = v.as_object_mut()
        && !obj.contains_key("rope_type")
        && let Some(t) = obj.get("type").cloned()
    {
        obj.insert("rope_type".into(), t);
    }
    RopeScaling::deserialize(v).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "rope_scaling: {e}; supported rope_type values are linear, dynamic, llama3 and default"
        ))
    })
}

fn default_rope_theta() -> f64 {
    10000.0
}

/// Accepts `null`, a number, or a list of numbers (first one wins), as HF configs vary.
fn one_or_first<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(v)) => Some(v),
        Some(OneOrMany::Many(v)) => v.first().copied(),
    })
}

impl LlamaConfig {
    /// Number of key/value heads (defaults to the number of attention heads).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Inverse rotary frequencies per pair of head dimensions, with `rope_scaling` applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        crate::model::rope_inv_freq(self)
    }

    /// Total number of parameters of the model.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let hd = self.head_dim() as u64;
        let q = h * self.num_attention_heads as u64 * hd;
        let kv = 2 * h * self.kv_heads() as u64 * hd;
        let o = self.num_attention_heads as u64 * hd * h;
        let mlp = 3 * h * self.intermediate_size as u64;
        let per_layer = q + kv + o + mlp + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers as u64 * per_layer + h + head
    }

    /// Checks that the architecture is supported and the dimensions are consistent; the
    /// error says which one is not.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(mt) = &self.model_type
            && !SUPPORTED_MODEL_TYPES.contains(&mt.as_str())
        {
            return Err(format!(
                "model_type {mt:?} is not supported; tunenet runs Llama-family models ({SUPPORTED_MODEL_TYPES:?})"
            ));
        }
        if let Some(arch) = self.architectures.as_ref().and_then(|a| a.first())
            && !SUPPORTED_ARCHITECTURES.contains(&arch.as_str())
        {
            return Err(format!(
                "architecture {arch:?} is not supported; tunenet runs {SUPPORTED_ARCHITECTURES:?}"
            ));
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor })
                if !factor.is_finite() || *factor < 1.0 =>
            {
                return Err(format!(
                    "rope_scaling factor must be at least 1, got {factor}"
                ));
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) if !(factor.is_finite()
                && *factor >= 1.0
                && low_freq_factor.is_finite()
                && *low_freq_factor > 0.0
                && high_freq_factor.is_finite()
                && high_freq_factor > low_freq_factor
                && *original_max_position_embeddings > 0) =>
            {
                return Err(format!(
                    "llama3 rope_scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and a positive original_max_position_embeddings; got {:?}",
                    self.rope_scaling
                ));
            }
            _ => {}
        }
        let zero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim()),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return Err(format!(
                    "{name} {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<LlamaConfig, MlError> {
        let bytes = std::fs::read(path).map_err(|e| MlError::io("cannot read", path, e))?;
        // Name an unsupported architecture before complaining about fields it lacks.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let probe = LlamaConfig {
                model_type: v
                    .get("model_type")
                    .and_then(|m| m.as_str())
                    .map(str::to_string),
                architectures: v
                    .get("architectures")
                    .and_then(|a| serde_json::from_value(a.clone()).ok()),
                ..crate::tiny::tiny_config()
            };
            probe.validate().map_err(|problem| MlError::Config {
                path: path.to_path_buf(),
                problem,
            })?;
            for key in ["attention_bias", "mlp_bias"] {
                if v.get(key).and_then(|b| b.as_bool()) == Some(true) {
                    return Err(MlError::Config {
                        path: path.to_path_buf(),
                        problem: format!(
                            "{key} is true; tunenet's Llama has bias-free linear layers"
                        ),
                    });
                }
            }
        }
        let cfg: LlamaConfig = serde_json::from_slice(&bytes).map_err(|e| MlError::Config {
            path: path.to_path_buf(),
            problem: format!("{e}; expected a Hugging Face Llama config.json"),
        })?;
        cfg.validate().map_err(|problem| MlError::Config {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(cfg)
    }
}
