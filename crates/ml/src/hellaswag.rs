//! HellaSwag scoring as lm-evaluation-harness does it: the same preprocessing, each ending
//! scored as the summed log-likelihood of `" " + ending` given the context, `acc` by the
//! raw sum and `acc_norm` by the sum over the ending's length. [`score_items`] is the
//! inference-job API (per-item scores, subsets for recomputation); the model side is any
//! [`HellaSwagScorer`].

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::MlError;
use crate::lm::CausalLm;
use crate::scoring::{Branch, HellaSwagScorer, PackedGroup};

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
    parse_hellaswag(&bytes, &path.display().to_string())
}

/// [`load_hellaswag`] on bytes already read (`source_name` names them in errors): one item
/// per non-blank line, each label checked against its endings.
pub fn parse_hellaswag(bytes: &[u8], source_name: &str) -> Result<Vec<HellaSwagItem>, MlError> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let err = |problem: String| MlError::Dataset {
            source_name: source_name.to_string(),
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

/// Tokens per forward pass [`ScoreOptions::default`] packs items up to (padding included).
pub const DEFAULT_BATCH_TOKENS: usize = 1024;

/// The scores of one item's endings, as a miner reports them and a validator recomputes
/// them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemScore {
    /// Index of the item in the dataset.
    pub index: usize,
    /// Summed log-probability of each ending's tokens given the context.
    pub logliks: Vec<f64>,
    /// Tokens of each ending (those of `context + " " + ending` past the context's own).
    pub ending_tokens: Vec<u32>,
    /// UTF-8 bytes of each preprocessed ending (the `acc_norm` divisor; lm-eval-harness
    /// divides by characters, the same for the ASCII text HellaSwag is nearly all made of).
    pub ending_bytes: Vec<u32>,
    /// Tokens of the item's context (for throughput figures).
    pub context_tokens: u32,
    /// Ending with the highest log-likelihood (`acc`).
    pub pred: usize,
    /// Ending with the highest log-likelihood per byte (`acc_norm`).
    pub pred_norm: usize,
}

/// How [`score_items`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScoreOptions {
    /// Items are packed into forward passes of at most this many tokens, padding included
    /// (an item longer than that runs alone). Larger batches use the matmuls better.
    pub batch_tokens: usize,
    /// Score only these item indices, in this order (a validator recomputing a sample);
    /// `None` scores every item.
    pub indices: Option<Vec<usize>>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            batch_tokens: DEFAULT_BATCH_TOKENS,
            indices: None,
        }
    }
}

/// Progress of [`score_items`], reported after every forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreProgress {
    /// Items scored so far.
    pub done: usize,
    /// Items to score.
    pub total: usize,
    /// Seconds since scoring started.
    pub seconds: f64,
}

/// An item turned into token groups, and which (group, branch) scores each ending.
struct Prepared {
    index: usize,
    groups: Vec<PackedGroup>,
    endings: Vec<(usize, usize)>,
    ending_tokens: Vec<u32>,
    ending_bytes: Vec<u32>,
    context_tokens: u32,
}

/// Tokenises an item the way lm-evaluation-harness does: the continuation's tokens are
/// those of `context + " " + ending` past the context's own tokens, and a context too
/// long for the model loses its first tokens. No BOS token is added. Endings share the
/// context in one group; an item that needs truncation gets one group per ending.
fn prepare(
    scorer: &dyn HellaSwagScorer,
    index: usize,
    item: &HellaSwagItem,
) -> Result<Prepared, MlError> {
    if item.endings.is_empty() {
        return Err(MlError::Invalid(format!(
            "HellaSwag item {index} has no endings"
        )));
    }
    let context = hellaswag_context(item);
    let ctx_ids = scorer.encode(&context)?;
    if ctx_ids.is_empty() {
        return Err(MlError::Invalid(format!(
            "HellaSwag item {index} has an empty context"
        )));
    }
    let max_len = scorer.max_positions() + 1;
    let mut wholes = Vec::with_capacity(item.endings.len());
    let mut ending_bytes = Vec::with_capacity(item.endings.len());
    let mut overflowing = false;
    for ending in &item.endings {
        let ending = hellaswag_preprocess(ending);
        let whole = scorer.encode(&format!("{context} {ending}"))?;
        let shared = ctx_ids
            .iter()
            .zip(&whole)
            .take_while(|(a, b)| a == b)
            .count();
        if shared == whole.len() {
            return Err(MlError::Invalid(format!(
                "ending {ending:?} adds no tokens to its context"
            )));
        }
        if shared == 0 {
            return Err(MlError::Invalid(format!(
                "HellaSwag item {index}: context and ending share no tokens"
            )));
        }
        let overflow = whole.len().saturating_sub(max_len);
        if overflow >= shared {
            return Err(MlError::Invalid(format!(
                "ending {ending:?} alone exceeds the model's context"
            )));
        }
        overflowing |= overflow > 0;
        ending_bytes.push(ending.len().max(1) as u32);
        wholes.push((whole, shared, overflow));
    }
    let ending_tokens = wholes
        .iter()
        .map(|(w, s, _)| (w.len() - s) as u32)
        .collect();
    let (groups, endings) = if overflowing {
        let groups = wholes
            .iter()
            .map(|(whole, shared, overflow)| {
                let seq = &whole[*overflow..];
                let start = shared - overflow;
                PackedGroup {
                    prefix: seq[..start].to_vec(),
                    branches: vec![Branch {
                        tokens: seq[start..].to_vec(),
                        score_from: start,
                    }],
                }
            })
            .collect();
        (groups, (0..wholes.len()).map(|i| (i, 0)).collect())
    } else {
        let p = wholes.iter().map(|(_, s, _)| *s).min().unwrap_or(1);
        let group = PackedGroup {
            prefix: ctx_ids[..p].to_vec(),
            branches: wholes
                .iter()
                .map(|(whole, shared, _)| Branch {
                    tokens: whole[p..].to_vec(),
                    score_from: *shared,
                })
                .collect(),
        };
        (vec![group], (0..wholes.len()).map(|i| (0, i)).collect())
    };
    Ok(Prepared {
        index,
        groups,
        endings,
        ending_tokens,
        ending_bytes,
        context_tokens: ctx_ids.len() as u32,
    })
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    xs.enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// Scores HellaSwag `items` (or the subset `opts.indices`) with `scorer`, as
/// lm-evaluation-harness does (see [`prepare`]'s rules): per item, the summed
/// log-likelihood of each ending and the predictions by it (`acc`) and by it per byte
/// (`acc_norm`). Each item's context runs once and its endings attend to it; items are
/// packed into forward passes of about `opts.batch_tokens` tokens. Results come in the
/// order of `opts.indices` (or of `items`) and do not depend on which other items are
/// scored, beyond float rounding. `progress` hears after every forward pass.
pub fn score_items(
    scorer: &dyn HellaSwagScorer,
    items: &[HellaSwagItem],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(&ScoreProgress),
) -> Result<Vec<ItemScore>, MlError> {
    let start = Instant::now();
    let indices: Vec<usize> = match &opts.indices {
        Some(ix) => ix.clone(),
        None => (0..items.len()).collect(),
    };
    if let Some(&bad) = indices.iter().find(|&&i| i >= items.len()) {
        return Err(MlError::Invalid(format!(
            "item index {bad} is out of range ({} items)",
            items.len()
        )));
    }
    let mut prepared = indices
        .iter()
        .map(|&i| prepare(scorer, i, &items[i]))
        .collect::<Result<Vec<_>, _>>()?;
    // Items of similar length share a batch, so little of it is padding.
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.sort_by_key(|&k| {
        prepared[k]
            .groups
            .iter()
            .map(PackedGroup::run_len)
            .max()
            .unwrap_or(0)
    });
    let budget = opts.batch_tokens.max(1);
    let mut logliks: Vec<Vec<f64>> = prepared
        .iter()
        .map(|p| vec![0.0; p.endings.len()])
        .collect();
    let total = prepared.len();
    let mut done = 0;
    let mut next = 0;
    while next < order.len() {
        // Greedy: add items while (groups x longest group) stays within the budget.
        let mut batch: Vec<usize> = Vec::new();
        let (mut n_groups, mut longest) = (0usize, 0usize);
        while next < order.len() {
            let p = &prepared[order[next]];
            let len = p.groups.iter().map(PackedGroup::run_len).max().unwrap_or(0);
            let cost = (n_groups + p.groups.len()) * longest.max(len);
            if !batch.is_empty() && cost > budget {
                break;
            }
            n_groups += p.groups.len();
            longest = longest.max(len);
            batch.push(order[next]);
            next += 1;
        }
        let groups: Vec<PackedGroup> = batch
            .iter()
            .flat_map(|&k| prepared[k].groups.iter().cloned())
            .collect();
        let scores = scorer.score_groups(&groups)?;
        if scores.len() != groups.len() {
            return Err(MlError::Invalid(format!(
                "scorer returned {} groups for {}",
                scores.len(),
                groups.len()
            )));
        }
        let mut offset = 0;
        for &k in &batch {
            for (e, &(g, b)) in prepared[k].endings.iter().enumerate() {
                logliks[k][e] = scores
                    .get(offset + g)
                    .and_then(|s| s.get(b))
                    .copied()
                    .ok_or_else(|| MlError::Invalid("scorer returned too few branches".into()))?;
            }
            offset += prepared[k].groups.len();
        }
        done += batch.len();
        progress(&ScoreProgress {
            done,
            total,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(prepared
        .iter_mut()
        .zip(logliks)
        .map(|(p, ll)| {
            let pred = argmax(ll.iter().copied());
            let pred_norm = argmax(
                ll.iter()
                    .zip(&p.ending_bytes)
                    .map(|(l, &b)| l / f64::from(b)),
            );
            ItemScore {
                index: p.index,
                logliks: ll,
                ending_tokens: std::mem::take(&mut p.ending_tokens),
                ending_bytes: std::mem::take(&mut p.ending_bytes),
                context_tokens: p.context_tokens,
                pred,
                pred_norm,
            }
        })
        .collect())
}

/// `acc`, `acc_norm` and throughput of `scores` against the labels of `items` (each score
/// names its item by index), for a run that took `seconds`. Tokens count what
/// lm-evaluation-harness would run: context plus ending, less one, per ending.
pub fn hellaswag_summary(
    items: &[HellaSwagItem],
    scores: &[ItemScore],
    seconds: f64,
) -> Result<HellaSwagReport, MlError> {
    if scores.is_empty() {
        return Err(MlError::Invalid("no HellaSwag items to score".into()));
    }
    let (mut right, mut right_norm, mut tokens) = (0usize, 0usize, 0usize);
    for s in scores {
        let item = items.get(s.index).ok_or_else(|| {
            MlError::Invalid(format!("score for item {} of {}", s.index, items.len()))
        })?;
        right += usize::from(s.pred == item.label);
        right_norm += usize::from(s.pred_norm == item.label);
        tokens += s
            .ending_tokens
            .iter()
            .map(|&t| (s.context_tokens + t) as usize - 1)
            .sum::<usize>();
    }
    let secs = seconds.max(1e-9);
    let n = scores.len();
    Ok(HellaSwagReport {
        items: n,
        acc: right as f64 / n as f64,
        acc_norm: right_norm as f64 / n as f64,
        items_per_sec: n as f64 / secs,
        tokens_per_sec: tokens as f64 / secs,
        seconds: secs,
    })
}

/// Scores every item with `lm` ([`score_items`] with default options) and summarises.
pub fn evaluate_hellaswag(
    lm: &CausalLm,
    items: &[HellaSwagItem],
) -> Result<HellaSwagReport, MlError> {
    if items.is_empty() {
        return Err(MlError::Invalid("no HellaSwag items to score".into()));
    }
    let start = Instant::now();
    let scores = score_items(lm, items, &ScoreOptions::default(), &mut |_| {})?;
    hellaswag_summary(items, &scores, start.elapsed().as_secs_f64())
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

/// Tokenizes like a model without loading its weights: what [`item_scores_from_logliks`]
/// needs to count each ending's tokens and bytes as [`score_items`] does.
struct TokenizerOnly {
    tok: crate::tokenizer::TextTokenizer,
    max_positions: usize,
}

impl HellaSwagScorer for TokenizerOnly {
    fn encode(&self, text: &str) -> Result<Vec<u32>, MlError> {
        self.tok.encode(text)
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn score_groups(&self, _: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError> {
        Err(MlError::Invalid("a tokenizer alone cannot score".into()))
    }

    fn describe(&self) -> String {
        "tokenizer".into()
    }
}

/// Item scores from log-likelihoods computed elsewhere (an external inference program):
/// `logliks[i]` is item `i`'s summed log-probability of each ending given its context.
/// Ending token counts, byte counts and predictions are derived with `model`'s tokenizer
/// exactly as [`score_items`] derives them, so a validator checks them alike. Every item
/// must have exactly one entry with one finite value per ending.
pub fn item_scores_from_logliks(
    model: &crate::ModelDir,
    items: &[HellaSwagItem],
    logliks: &std::collections::BTreeMap<usize, Vec<f64>>,
) -> Result<Vec<ItemScore>, MlError> {
    let cfg = model.config()?;
    let enc = TokenizerOnly {
        tok: crate::loader::load_tokenizer(model, &cfg)?,
        max_positions: cfg.max_position_embeddings,
    };
    if let Some((&extra, _)) = logliks.range(items.len()..).next() {
        return Err(MlError::Invalid(format!(
            "log-likelihoods for item {extra}, but there are {} items",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let ll = logliks
                .get(&i)
                .ok_or_else(|| MlError::Invalid(format!("no log-likelihoods for item {i}")))?;
            if ll.len() != item.endings.len() {
                return Err(MlError::Invalid(format!(
                    "item {i} has {} endings but {} log-likelihoods",
                    item.endings.len(),
                    ll.len()
                )));
            }
            if let Some(bad) = ll.iter().find(|l| !l.is_finite() || **l > 0.0) {
                return Err(MlError::Invalid(format!(
                    "item {i}: log-likelihood {bad} is not a finite log-probability"
                )));
            }
            let p = prepare(&enc, i, item)?;
            Ok(ItemScore {
                index: i,
                pred: argmax(ll.iter().copied()),
                pred_norm: argmax(
                    ll.iter()
                        .zip(&p.ending_bytes)
                        .map(|(l, &b)| l / f64::from(b)),
                ),
                logliks: ll.clone(),
                ending_tokens: p.ending_tokens,
                ending_bytes: p.ending_bytes,
                context_tokens: p.context_tokens,
            })
        })
        .collect()
}
