//! HellaSwag scoring as lm-evaluation-harness does it: the same preprocessing, each ending
//! scored as the summed log-likelihood of `" " + ending` given the context, `acc` by the
//! raw sum and `acc_norm` by the sum over the ending's character count.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::MlError;
use crate::lm::CausalLm;

/// One HellaSwag item in the dataset's own JSONL layout (other fields are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HellaSwagItem {
    /// Activity label, e.g. "Removing ice from car".
    pub activity_label: String,
    /// First part of the context.
    pub ctx_a: String,
    /// Second part of the context (capitalised when joined).
    pub ctx_b: String,
    /// Candidate endings (four in HellaSwag).
    pub endings: Vec<String>,
    /// Index of the right ending (a number or a numeric string, as the dataset varies).
    #[serde(deserialize_with = "label_number")]
    pub label: usize,
}

fn label_number<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(usize),
        Str(String),
    }
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("label {s:?} is not a number"))),
    }
}

/// Outcome of a HellaSwag evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HellaSwagReport {
    /// Items scored.
    pub items: usize,
    /// Accuracy by summed log-likelihood.
    pub acc: f64,
    /// Accuracy by log-likelihood per character of the ending.
    pub acc_norm: f64,
    /// Items per second (scoring only, loading excluded).
    pub items_per_sec: f64,
    /// Tokens run through the model per second.
    pub tokens_per_sec: f64,
    /// Wall time of the scoring.
    pub seconds: f64,
}

/// lm-evaluation-harness's `preprocess`: strip, `" [title]"` -> `". "`, drop bracketed
/// text, and collapse double spaces once.
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    // Non-greedy `\[.*?\]`: `.` does not match a newline.
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if !after[..close].contains('\n') => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
    }
}

/// The query of an item: `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`.
pub fn hellaswag_context(item: &HellaSwagItem) -> String {
    hellaswag_preprocess(&format!(
        "{}: {} {}",
        item.activity_label,
        item.ctx_a,
        capitalize(&item.ctx_b)
    ))
}

/// Reads HellaSwag JSONL; errors name the line.
pub fn load_hellaswag(path: &Path) -> Result<Vec<HellaSwagItem>, MlError> {
    let bytes = std::fs::read(path).map_err(|e| MlError::io("cannot read dataset", path, e))?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let err = |problem: String| MlError::Dataset {
            source_name: path.display().to_string(),
            line: i + 1,
            problem,
        };
        let item: HellaSwagItem = serde_json::from_slice(line).map_err(|e| {
            err(format!(
                "{e}; expected HellaSwag fields activity_label, ctx_a, ctx_b, endings, label"
            ))
        })?;
        if item.endings.is_empty() || item.label >= item.endings.len() {
            return Err(err(format!(
                "label {} does not index one of {} endings",
                item.label,
                item.endings.len()
            )));
        }
        out.push(item);
    }
    Ok(out)
}

/// Context-to-ending length ratio from which an item's context runs once and its endings
/// continue from copies of its KV cache, instead of all endings running as one batch.
const KV_REUSE_RATIO: usize = 4;

/// Scores `items` with `lm`. The endings of an item run as one padded batch (a single
/// forward pass); when the context is at least four times as long as the longest ending,
/// the context runs once and each ending continues from a copy of its KV cache. Context and continuation are split as the harness does: the continuation's
/// tokens are those of `context + " " + ending` past the context's own tokens; a context
/// too long for the model loses its first tokens. No BOS token is added.
pub fn evaluate_hellaswag(
    lm: &CausalLm,
    items: &[HellaSwagItem],
) -> Result<HellaSwagReport, MlError> {
    if items.is_empty() {
        return Err(MlError::Invalid("no HellaSwag items to score".into()));
    }
    let start = Instant::now();
    let tok = lm.tokenizer();
    let max_len = lm.config().max_position_embeddings + 1;
    let (mut right, mut right_norm, mut tokens) = (0usize, 0usize, 0usize);
    for item in items {
        let context = hellaswag_context(item);
        let ctx_ids = tok.encode(&context)?;
        let mut pairs = Vec::with_capacity(item.endings.len());
        let mut lens = Vec::with_capacity(item.endings.len());
        for ending in &item.endings {
            let ending = hellaswag_preprocess(ending);
            let whole = tok.encode(&format!("{context} {ending}"))?;
            let shared = ctx_ids
                .iter()
                .zip(&whole)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ctx_ids.len());
            let mut ctx: Vec<u32> = whole[..shared].to_vec();
            let cont: Vec<u32> = whole[shared..].to_vec();
            if cont.is_empty() {
                return Err(MlError::Invalid(format!(
                    "ending {ending:?} adds no tokens to its context"
                )));
            }
            if ctx.is_empty() {
                return Err(MlError::Invalid(
                    "HellaSwag item with an empty context".into(),
                ));
            }
            let overflow = (ctx.len() + cont.len()).saturating_sub(max_len);
            if overflow >= ctx.len() {
                return Err(MlError::Invalid(format!(
                    "ending {ending:?} alone exceeds the model's context"
                )));
            }
            ctx.drain(..overflow);
            tokens += ctx.len() + cont.len() - 1;
            lens.push(ending.chars().count().max(1) as f64);
            pairs.push((ctx, cont));
        }
        let truncated = pairs.iter().any(|(c, k)| c.len() + k.len() > max_len - 1);
        let longest_ending = pairs.iter().map(|(_, k)| k.len()).max().unwrap_or(0);
        // One padded batch reads the weights once, which wins on CPU unless the context
        // dwarfs the endings; then running the context once and reusing its KV cache does.
        let share_context = ctx_ids.len() >= KV_REUSE_RATIO * longest_ending;
        let scores: Vec<(f64, bool)> = if truncated || !share_context {
            lm.continuation_logprobs(&pairs)?
        } else {
            // The context runs once; each ending continues from a copy of its KV cache.
            let seqs: Vec<Vec<u32>> = pairs
                .iter()
                .map(|(c, k)| c.iter().chain(k).copied().collect())
                .collect();
            let starts: Vec<usize> = pairs.iter().map(|(c, _)| c.len()).collect();
            lm.shared_prefix_logprobs(&seqs, &starts)?
                .into_iter()
                .map(|s| (s, false))
                .collect()
        };
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..scores.len())
                .max_by(|&a, &b| f(a).total_cmp(&f(b)))
                .unwrap_or(0)
        };
        if argmax(&|i| scores[i].0) == item.label {
            right += 1;
        }
        if argmax(&|i| scores[i].0 / lens[i]) == item.label {
            right_norm += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(HellaSwagReport {
        items: items.len(),
        acc: right as f64 / items.len() as f64,
        acc_norm: right_norm as f64 / items.len() as f64,
        items_per_sec: items.len() as f64 / secs,
        tokens_per_sec: tokens as f64 / secs,
        seconds: secs,
    })
}

/// `n` synthetic items in HellaSwag's layout (for tests and benchmarks), deterministic
/// from `seed`. They exercise the preprocessing (`[title]`, brackets, double spaces,
/// capitalisation) and have endings of different lengths.
pub fn hellaswag_demo_items(n: usize, seed: u64) -> Vec<HellaSwagItem> {
    const ACTIVITIES: &[&str] = &[
        "Baking cookies",
        "Washing a car",
        "Playing guitar",
        "Making tea",
    ];
    const VERBS: &[&str] = &["picks up", "puts down", "looks at", "cleans", "moves"];
    const THINGS: &[&str] = &["the bowl", "a sponge", "the strings", "a cup", "the towel"];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let pick =
                |rng: &mut StdRng, xs: &[&str]| xs[rng.random_range(0..xs.len())].to_string();
            let activity = pick(&mut rng, ACTIVITIES);
            let who = if rng.random_bool(0.5) {
                "A man"
            } else {
                "A WOMAN"
            };
            let ctx_a = format!(
                "{who} {} {} [title] in the kitchen  [step]",
                pick(&mut rng, VERBS),
                pick(&mut rng, THINGS)
            );
            let ctx_b = format!("then SHE {}", pick(&mut rng, VERBS));
            let endings = (0..4)
                .map(|k| {
                    let mut e = format!("{} [header] carefully", pick(&mut rng, THINGS));
                    for _ in 0..k {
                        e.push_str(" and slowly");
                    }
                    e
                })
                .collect();
            HellaSwagItem {
                activity_label: activity,
                ctx_a,
                ctx_b,
                endings,
                label: rng.random_range(0..4),
            }
        })
        .collect()
}
