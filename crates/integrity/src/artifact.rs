//! Checks on one artifact against the validator's own copy of the base model: the right
//! base (config, per-tensor cosine), sane weights (finite, bounded change), actually tuned,
//! and within the job's bounds (LoRA rank, full fine-tuning allowed).

use crate::sketch::{Sketch, accumulate};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tunenet_ml::{Method, ModelDir};
use tunenet_types::{HparamBounds, IntegritySettings, Outcome, Verdict};

/// The checks could not run at all (the validator's own files are unreadable).
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// The base model could not be read.
    #[error("cannot read the base model: {0}")]
    Base(String),
}

/// Every verdict on an artifact, and its delta sketch for cross-submission checks.
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactReport {
    /// One verdict per check.
    pub verdicts: Vec<Verdict>,
    /// The delta sketch (empty when the artifact could not be read).
    pub sketch: Sketch,
}

impl ArtifactReport {
    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.verdicts.iter().any(|v| v.outcome == Outcome::Fail)
    }
}

/// A verdict with its numbers and reason (shared by every check in this crate).
pub(crate) fn verdict(
    check: &str,
    outcome: Outcome,
    value: Option<f64>,
    threshold: Option<f64>,
    reason: String,
) -> Verdict {
    Verdict {
        check: check.into(),
        outcome,
        value,
        threshold,
        reason,
    }
}

fn fail(check: &str, reason: String) -> Verdict {
    verdict(check, Outcome::Fail, None, None, reason)
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| e.to_string())
}

fn load_base(base: &ModelDir) -> Result<HashMap<String, Tensor>, IntegrityError> {
    let mut all = HashMap::new();
    for f in base
        .weight_files()
        .map_err(|e| IntegrityError::Base(e.to_string()))?
    {
        all.extend(load(&f).map_err(IntegrityError::Base)?);
    }
    Ok(all)
}

fn f32s(t: &Tensor) -> Result<Vec<f32>, String> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

fn norm2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum()
}

/// Where a tensor's elements start in the sketch's index space: a 64-bit hash of its name
/// (tensors have far fewer than 2^40 elements, so two names' ranges never meet in practice).
fn name_offset(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// The PEFT name of a LoRA tensor back to the base weight it adapts, and which half it is.
fn lora_target(name: &str) -> Option<(String, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        return Some((format!("{p}.weight"), true));
    }
    rest.strip_suffix(".lora_B.weight")
        .map(|p| (format!("{p}.weight"), false))
}

/// Runs every per-artifact check. A malformed artifact is a failed verdict, not an error.
pub fn check_artifact(
    base: &ModelDir,
    artifact: &Path,
    bounds: &HparamBounds,
    settings: &IntegritySettings,
) -> Result<ArtifactReport, IntegrityError> {
    let mut out = Vec::new();
    let bail = |mut out: Vec<Verdict>, v: Verdict| {
        out.push(v);
        Ok(ArtifactReport {
            verdicts: out,
            sketch: Vec::new(),
        })
    };
    let manifest = match tunenet_ml::read_artifact_manifest(artifact) {
        Ok(m) => m,
        Err(e) => {
            return bail(
                out,
                fail("manifest", format!("not a readable tunenet artifact: {e}")),
            );
        }
    };
    let base_cfg = base
        .config()
        .map_err(|e| IntegrityError::Base(e.to_string()))?;
    if manifest.base_config != base_cfg {
        return bail(
            out,
            fail(
                "base_config",
                "the artifact was trained for a model whose config differs from this job's base"
                    .into(),
            ),
        );
    }
    out.push(verdict(
        "base_config",
        Outcome::Pass,
        None,
        None,
        "config equals the base's".into(),
    ));
    let tensors = match load(artifact) {
        Ok(t) => t,
        Err(e) => return bail(out, fail("tensors", format!("tensors do not load: {e}"))),
    };
    let base_w = load_base(base)?;

    // The delta of every adapted or replaced weight, by base tensor name.
    let mut deltas: Vec<(String, Vec<f32>)> = Vec::new();
    match &manifest.method {
        Method::Lora { rank, alpha } => {
            if *rank as u64 > bounds.max_lora_rank as u64 {
                out.push(verdict(
                    "lora_rank",
                    Outcome::Fail,
                    Some(*rank as f64),
                    Some(bounds.max_lora_rank as f64),
                    format!(
                        "LoRA rank {rank} is above the job's bound {}",
                        bounds.max_lora_rank
                    ),
                ));
            } else {
                out.push(verdict(
                    "lora_rank",
                    Outcome::Pass,
                    Some(*rank as f64),
                    Some(bounds.max_lora_rank as f64),
                    "within bounds".into(),
                ));
            }
            let mut pairs: HashMap<String, (Option<&Tensor>, Option<&Tensor>)> = HashMap::new();
            for (name, t) in &tensors {
                match lora_target(name) {
                    Some((target, true)) => pairs.entry(target).or_default().0 = Some(t),
                    Some((target, false)) => pairs.entry(target).or_default().1 = Some(t),
                    None => {
                        return bail(
                            out,
                            fail("tensors", format!("`{name}` is not a LoRA adapter tensor")),
                        );
                    }
                }
            }
            let scale = *alpha / (*rank).max(1) as f64;
            let mut names: Vec<&String> = pairs.keys().collect();
            names.sort();
            for target in names {
                let (Some(a), Some(b)) = pairs[target] else {
                    return bail(
                        out,
                        fail(
                            "tensors",
                            format!("adapter for `{target}` lacks its A or B half"),
                        ),
                    );
                };
                let Some(w0) = base_w.get(target) else {
                    return bail(
                        out,
                        fail(
                            "lora_targets",
                            format!("adapter targets `{target}`, which the base does not have"),
                        ),
                    );
                };
                let real_rank = a.dims().first().copied().unwrap_or(0);
                if real_rank as u64 > bounds.max_lora_rank as u64 {
                    return bail(
                        out,
                        verdict(
                            "lora_rank",
                            Outcome::Fail,
                            Some(real_rank as f64),
                            Some(bounds.max_lora_rank as f64),
                            format!(
                                "adapter on `{target}` has rank {real_rank}, above the job's bound {}",
                                bounds.max_lora_rank
                            ),
                        ),
                    );
                }
                let delta = b
                    .to_dtype(DType::F32)
                    .and_then(|b| b.matmul(&a.to_dtype(DType::F32)?))
                    .and_then(|d| d.affine(scale, 0.0));
                let delta = match delta {
                    Ok(d) if d.dims() == w0.dims() => d,
                    Ok(d) => {
                        return bail(
                            out,
                            fail(
                                "tensors",
                                format!(
                                    "adapter on `{target}` makes shape {:?}, base is {:?}",
                                    d.dims(),
                                    w0.dims()
                                ),
                            ),
                        );
                    }
                    Err(e) => {
                        return bail(out, fail("tensors", format!("adapter on `{target}`: {e}")));
                    }
                };
                deltas.push((target.clone(), f32s(&delta).map_err(IntegrityError::Base)?));
            }
        }
        Method::Full => {
            if !bounds.allow_full {
                out.push(fail(
                    "method",
                    "full fine-tuning is not allowed in this job".into(),
                ));
            }
            let mut names: Vec<&String> = base_w.keys().collect();
            names.sort();
            for name in names {
                let w0 = &base_w[name];
                let Some(w) = tensors.get(name) else {
                    return bail(
                        out,
                        fail("tensors", format!("full artifact lacks `{name}`")),
                    );
                };
                if w.dims() != w0.dims() {
                    return bail(
                        out,
                        fail(
                            "tensors",
                            format!("`{name}` has shape {:?}, base is {:?}", w.dims(), w0.dims()),
                        ),
                    );
                }
                let (w, w0v) = (
                    f32s(w).map_err(IntegrityError::Base)?,
                    f32s(w0).map_err(IntegrityError::Base)?,
                );
                deltas.push((
                    name.clone(),
                    w.iter().zip(&w0v).map(|(a, b)| a - b).collect(),
                ));
            }
        }
    }

    // Finite, per-tensor cosine to the base, bounded change, and tuned at all.
    let mut nonfinite = None;
    let (mut min_cos, mut min_cos_at) = (1.0f64, String::new());
    let mut cosines: Vec<f64> = Vec::new();
    let (mut max_rel, mut max_rel_at) = (0.0f64, String::new());
    let (mut total_d, mut total_w) = (0.0f64, 0.0f64);
    let mut sketch = vec![0f32; settings.sketch_dim.max(1)];
    for (name, d) in &deltas {
        if nonfinite.is_none() && d.iter().any(|x| !x.is_finite()) {
            nonfinite = Some(name.clone());
        }
        let w0 = f32s(&base_w[name]).map_err(IntegrityError::Base)?;
        let (dd, ww) = (norm2(d), norm2(&w0));
        // cos(W0 + Δ, W0) from the norms and the inner product.
        let dot: f64 = d.iter().zip(&w0).map(|(a, b)| *a as f64 * *b as f64).sum();
        let nw = (ww + 2.0 * dot + dd).max(0.0).sqrt();
        let cos = if nw > 0.0 && ww > 0.0 {
            (ww + dot) / (nw * ww.sqrt())
        } else {
            1.0
        };
        cosines.push(if cos.is_nan() { -1.0 } else { cos });
        if cos < min_cos || cos.is_nan() {
            min_cos = cos;
            min_cos_at = name.clone();
        }
        let rel = if ww > 0.0 {
            (dd / ww).sqrt()
        } else {
            dd.sqrt()
        };
        if rel > max_rel || rel.is_nan() {
            max_rel = rel;
            max_rel_at = name.clone();
        }
        total_d += dd;
        total_w += ww;
        // Each tensor's elements are placed by the tensor's name, not by its position
        // in the artifact: a LoRA artifact's delta on `q_proj` and a full artifact's on
        // the same tensor land in the same buckets, so the two kinds can be compared
        // (a blend of a LoRA submission into a full one is still found).
        accumulate(&mut sketch, name_offset(name), d);
    }
    if let Some(name) = nonfinite {
        return bail(
            out,
            fail(
                "finite",
                format!("tensor `{name}` holds NaN or infinite values"),
            ),
        );
    }
    out.push(verdict(
        "finite",
        Outcome::Pass,
        None,
        None,
        "every weight is finite".into(),
    ));
    // Tensors the artifact leaves alone count as unchanged (cosine 1).
    let untouched = base_w.len().saturating_sub(cosines.len());
    cosines.extend(std::iter::repeat_n(1.0, untouched));
    cosines.sort_by(f64::total_cmp);
    let median = cosines.get(cosines.len() / 2).copied().unwrap_or(1.0);
    out.push(if median < settings.median_tensor_cosine {
        verdict("base_similarity_median", Outcome::Fail, Some(median), Some(settings.median_tensor_cosine),
            format!("the median tensor has cosine {median:.3} to the base's: this is not the base model the job asked for"))
    } else {
        verdict("base_similarity_median", Outcome::Pass, Some(median), Some(settings.median_tensor_cosine), "the model as a whole is the base's".into())
    });
    out.push(if min_cos.is_nan() || min_cos < settings.min_tensor_cosine {
        verdict("base_similarity", Outcome::Fail, Some(min_cos), Some(settings.min_tensor_cosine),
            format!("`{min_cos_at}` has cosine {min_cos:.3} to the base's: this is not the base model the job asked for"))
    } else {
        verdict("base_similarity", Outcome::Pass, Some(min_cos), Some(settings.min_tensor_cosine), "every tensor stays close to the base".into())
    });
    out.push(
        if max_rel.is_nan() || max_rel > settings.max_relative_delta {
            verdict(
                "delta_norm",
                Outcome::Fail,
                Some(max_rel),
                Some(settings.max_relative_delta),
                format!("`{max_rel_at}` changed by {max_rel:.3}× its norm: the weights exploded"),
            )
        } else {
            verdict(
                "delta_norm",
                Outcome::Pass,
                Some(max_rel),
                Some(settings.max_relative_delta),
                "changes are bounded".into(),
            )
        },
    );
    let total_rel = if total_w > 0.0 {
        (total_d / total_w).sqrt()
    } else {
        0.0
    };
    out.push(if total_rel < settings.min_relative_delta {
        verdict(
            "fine_tuned",
            Outcome::Fail,
            Some(total_rel),
            Some(settings.min_relative_delta),
            "the artifact equals the base model: it was not fine-tuned".into(),
        )
    } else {
        verdict(
            "fine_tuned",
            Outcome::Pass,
            Some(total_rel),
            Some(settings.min_relative_delta),
            "the weights moved".into(),
        )
    });
    Ok(ArtifactReport {
        verdicts: out,
        sketch,
    })
}
