//! Synthetic test sets: sample responses from a model (KV-cached decoding) for perturbed
//! prompts, and keep those that pass the filters; or rewrite a real dataset's held-out and
//! test records with the base model, keeping each record's form. Same seed, same set.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::chat::Turn;
use crate::data::Record;
use crate::error::MlError;
use crate::lm::CausalLm;

/// How to sample tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches this.
    pub top_p: f64,
    /// Most new tokens per generation.
    pub max_tokens: usize,
}

impl Default for SamplingConfig {
    /// Temperature 0.8, top-p 0.95, 64 tokens.
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.8,
            top_p: 0.95,
            max_tokens: 64,
        }
    }
}

impl SamplingConfig {
    fn validate(&self) -> Result<(), MlError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(MlError::Invalid(format!(
                "temperature must be zero or positive, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(MlError::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(MlError::Invalid("max_tokens must be at least 1".into()));
        }
        Ok(())
    }
}

/// Picks a token from `logits` as `cfg` says.
fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / cfg.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / total;
        n += 1;
        if kept >= cfg.top_p {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for p in &probs[..n] {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

/// A generation and whether it ended with the end-of-sequence token.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new token ids (eos excluded).
    pub ids: Vec<u32>,
    /// Whether eos ended it (rather than `max_tokens` or the context length).
    pub finished: bool,
}

impl CausalLm {
    /// Continues `prompt` (token ids) with KV-cached decoding, sampling as `cfg` says from
    /// `rng`.
    pub fn generate(
        &self,
        prompt: &[u32],
        cfg: &SamplingConfig,
        rng: &mut StdRng,
    ) -> Result<Generation, MlError> {
        cfg.validate()?;
        let llama = self.llama();
        let mut cache = crate::model::KvCache::default();
        let eos = self.config().eos_token_id;
        let ctx = self.config().max_position_embeddings;
        let run = |ids: &[u32], cache: &mut crate::model::KvCache| -> Result<Vec<f32>, MlError> {
            let logits = llama
                .forward_cached(ids, cache)
                .map_err(|e| MlError::Candle {
                    context: "generating".into(),
                    source: e,
                })?;
            let t = ids.len();
            logits
                .get(t - 1)
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| MlError::Candle {
                    context: "reading logits".into(),
                    source: e,
                })
        };
        if prompt.is_empty() || prompt.len() >= ctx {
            return Err(MlError::Invalid(format!(
                "prompt of {} tokens does not fit the model's context of {ctx}",
                prompt.len()
            )));
        }
        let mut logits = run(prompt, &mut cache)?;
        let mut out = Vec::new();
        while out.len() < cfg.max_tokens {
            let next = sample(&logits, cfg, rng);
            if Some(next) == eos {
                return Ok(Generation {
                    ids: out,
                    finished: true,
                });
            }
            out.push(next);
            if cache.len() + 1 >= ctx {
                break;
            }
            logits = run(&[next], &mut cache)?;
        }
        Ok(Generation {
            ids: out,
            finished: false,
        })
    }
}

/// Deterministic prompt perturbations, chosen by the rng.
fn perturb(prompt: &str, rng: &mut StdRng) -> String {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    match rng.random_range(0..5) {
        0 => prompt.to_string(),
        1 => prompt.to_lowercase(),
        2 if words.len() >= 2 => {
            let i = rng.random_range(0..words.len() - 1);
            let mut w = words.clone();
            w.swap(i, i + 1);
            w.join(" ")
        }
        3 if words.len() >= 3 => {
            let i = rng.random_range(0..words.len());
            let mut w = words.clone();
            w.remove(i);
            w.join(" ")
        }
        _ => {
            const LEADS: &[&str] = &["Please answer: ", "Question: ", "Tell me: "];
            format!("{}{prompt}", LEADS[rng.random_range(0..LEADS.len())])
        }
    }
}

/// Whether some token 3-gram occurs more than three times (degenerate looping).
fn is_repetitive(ids: &[u32]) -> bool {
    let mut seen = std::collections::HashMap::new();
    ids.windows(3).any(|w| {
        let c = seen.entry(w).or_insert(0);
        *c += 1;
        *c > 3
    })
}

/// Up to `n` instruction records made by sampling `lm` on perturbed `prompts`: each
/// attempt picks a prompt, perturbs it (lower-casing, swapping or dropping a word, a
/// lead-in phrase), samples a response, and drops it when it is empty, loops, repeats an
/// earlier record, or runs to `max_tokens` without ending. Stops after `4 n` attempts, so
/// fewer than `n` records come back when the filters reject many. Deterministic from `seed`.
pub fn synthetic_set(
    lm: &CausalLm,
    prompts: &[String],
    seed: u64,
    sampling: &SamplingConfig,
    n: usize,
) -> Result<Vec<Record>, MlError> {
    sampling.validate()?;
    if prompts.is_empty() {
        return Err(MlError::Invalid(
            "synthetic_set needs at least one prompt".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let bos: Vec<u32> = lm.config().bos_token_id.into_iter().collect();
    for _ in 0..n.saturating_mul(4) {
        if out.len() >= n {
            break;
        }
        let prompt = perturb(&prompts[rng.random_range(0..prompts.len())], &mut rng);
        let mut ids = bos.clone();
        ids.extend(lm.tokenizer().encode(&prompt)?);
        if ids.is_empty() || ids.len() >= lm.config().max_position_embeddings {
            continue;
        }
        let g = lm.generate(&ids, sampling, &mut rng)?;
        if !g.finished || is_repetitive(&g.ids) {
            continue;
        }
        let response = lm.tokenizer().decode(&g.ids, true)?;
        if response.trim().is_empty() {
            continue;
        }
        if !seen.insert((prompt.clone(), response.clone())) {
            continue;
        }
        out.push(Record::Instruction { prompt, response });
    }
    Ok(out)
}

/// What one source record becomes: the prompt to continue and how to rebuild a record of
/// the same form from the text generated.
enum Rewrite {
    Instruction { prompt: String },
    Chat { turns: Vec<Turn> },
    Text { prefix: String },
}

impl Rewrite {
    /// The source's prompt, its last user turn perturbed; None for a record with nothing
    /// to continue (a conversation opening with the assistant).
    fn of(r: &Record, lm: &CausalLm, rng: &mut StdRng) -> Result<Option<Rewrite>, MlError> {
        Ok(match r {
            Record::Instruction { prompt, .. } => Some(Rewrite::Instruction {
                prompt: perturb(prompt, rng),
            }),
            Record::Chat { messages } => {
                let Some(last) = messages.iter().rposition(|t| t.role == "assistant") else {
                    return Ok(None);
                };
                let mut turns = messages[..last].to_vec();
                match turns.iter_mut().rev().find(|t| t.role == "user") {
                    Some(t) => t.content = perturb(&t.content, rng),
                    None => return Ok(None),
                }
                Some(Rewrite::Chat { turns })
            }
            Record::Text { text } => {
                // The opening third of the text (at least 4 tokens) is kept.
                let ids = lm.tokenizer().encode(text)?;
                if ids.len() < 8 {
                    return Ok(None);
                }
                let keep = (ids.len() / 3).max(4);
                Some(Rewrite::Text {
                    prefix: lm.tokenizer().decode(&ids[..keep], false)?,
                })
            }
        })
    }

    /// Token ids to continue, as training and scoring tokenize the same record.
    fn prompt_ids(&self, lm: &CausalLm) -> Result<Vec<u32>, MlError> {
        let tok = lm.tokenizer();
        let chat = tok.chat();
        let bos: Vec<u32> = lm.config().bos_token_id.into_iter().collect();
        let turns = match self {
            Rewrite::Text { prefix } => {
                return Ok(bos.into_iter().chain(tok.encode(prefix)?).collect());
            }
            Rewrite::Instruction { prompt } if !chat.is_models_own() => {
                return Ok(bos.into_iter().chain(tok.encode(prompt)?).collect());
            }
            Rewrite::Instruction { prompt } => vec![Turn::new("user", prompt.as_str())],
            Rewrite::Chat { turns } => turns.clone(),
        };
        let text = chat.render(&turns, true)?;
        let mut ids = if chat.writes_bos(&text) {
            Vec::new()
        } else {
            bos
        };
        ids.extend(tok.encode(&text)?);
        Ok(ids)
    }

    fn record(self, generated: String) -> Record {
        match self {
            Rewrite::Instruction { prompt } => Record::Instruction {
                prompt,
                response: generated,
            },
            Rewrite::Chat { mut turns } => {
                turns.push(Turn::new("assistant", generated));
                Record::Chat { messages: turns }
            }
            Rewrite::Text { prefix } => Record::Text {
                text: format!("{prefix}{generated}"),
            },
        }
    }
}

/// Up to `n` records rewritten from `sources` (a dataset's held-out and test records) by
/// `lm` (the competition's base model, or a stronger one): each attempt picks a source,
/// perturbs its prompt (its last user turn; text keeps its opening third) and has the
/// model write the rest, keeping the record's form, rendered with the model's chat
/// template. A generation cut by `max_tokens` is kept (it is still the model's text);
/// empty, looping and repeated ones are dropped. Stops after `4 n` attempts. Deterministic
/// from `seed`, so every validator of a competition rewrites the same set.
pub fn rewrite_set(
    lm: &CausalLm,
    sources: &[Record],
    seed: u64,
    sampling: &SamplingConfig,
    n: usize,
) -> Result<Vec<Record>, MlError> {
    sampling.validate()?;
    if sources.is_empty() {
        return Err(MlError::Invalid(
            "a rewritten synthetic set needs at least one source record".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut seen: HashSet<String> = HashSet::new();
    let ctx = lm.config().max_position_embeddings;
    for _ in 0..n.saturating_mul(4) {
        if out.len() >= n {
            break;
        }
        let source = &sources[rng.random_range(0..sources.len())];
        let Some(rewrite) = Rewrite::of(source, lm, &mut rng)? else {
            continue;
        };
        let ids = rewrite.prompt_ids(lm)?;
        if ids.is_empty() || ids.len() + 2 >= ctx {
            continue;
        }
        let g = lm.generate(&ids, sampling, &mut rng)?;
        if g.ids.is_empty() || is_repetitive(&g.ids) {
            continue;
        }
        let text = lm.tokenizer().decode(&g.ids, true)?;
        if text.trim().is_empty() {
            continue;
        }
        let record = rewrite.record(text);
        let key = serde_json::to_string(&record).unwrap_or_default();
        if seen.insert(key) {
            out.push(record);
        }
    }
    Ok(out)
}

/// Share of the scored words of each answer that [`neighbour_set`] replaces by default.
pub const NEIGHBOUR_RATE: f64 = 0.2;

/// Tries at a replacement word before a chosen word is left as it was.
const NEIGHBOUR_TRIES: usize = 4;

/// Most tokens sampled for one replacement word.
const NEIGHBOUR_WORD_TOKENS: usize = 8;

/// One neighbour per source record, in order (`out[i]` comes from `sources[i]`): the same
/// record with about `rate` of the words of its answers (an instruction's response, the
/// assistant turns of a conversation, all of a plain text) that fall within the first
/// `max_seq_len` tokens replaced, each by a word `lm` writes there in context (a sample,
/// never the word it replaces), at least one word per record where any fits. Prompts and
/// everything else are kept. Deterministic from `seed`, so every validator of a
/// competition makes the same set.
///
/// A neighbour reads like the record it comes from, in the data's own words: a model that
/// generalises from the same data scores a record and its neighbour alike, while one that
/// memorised the record expects its exact words and pays for each replaced one. That makes
/// the pair a paired test of memorisation that holds whatever the writer's style: unlike a
/// rewritten answer, a neighbour does not move away from the data as fine-tuning moves
/// toward it. A record with no word to replace comes back unchanged.
pub fn neighbour_set(
    lm: &CausalLm,
    sources: &[Record],
    seed: u64,
    rate: f64,
    max_seq_len: usize,
) -> Result<Vec<Record>, MlError> {
    if !(rate > 0.0 && rate <= 1.0) {
        return Err(MlError::Invalid(format!(
            "the neighbours' replacement rate must be in (0, 1], got {rate}"
        )));
    }
    let window = max_seq_len.min(lm.config().max_position_embeddings);
    sources
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Each record's own stream: the same record gets the same neighbour whatever
            // else the set holds.
            let mut rng =
                StdRng::seed_from_u64(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            neighbour(lm, r, rate, window, &mut rng)
        })
        .collect()
}

/// The neighbour of one record (see [`neighbour_set`]).
fn neighbour(
    lm: &CausalLm,
    r: &Record,
    rate: f64,
    window: usize,
    rng: &mut StdRng,
) -> Result<Record, MlError> {
    Ok(match r {
        Record::Text { text } => {
            let bos: Vec<u32> = lm.config().bos_token_id.into_iter().collect();
            Record::Text {
                text: replace_words(lm, &bos, text, rate, window, rng)?,
            }
        }
        Record::Instruction { prompt, response } => {
            let before = Rewrite::Instruction {
                prompt: prompt.clone(),
            }
            .prompt_ids(lm)?;
            Record::Instruction {
                prompt: prompt.clone(),
                response: replace_words(lm, &before, response, rate, window, rng)?,
            }
        }
        Record::Chat { messages } => {
            let mut turns = messages.clone();
            for k in 0..turns.len() {
                if turns[k].role != "assistant" {
                    continue;
                }
                let before = Rewrite::Chat {
                    turns: turns[..k].to_vec(),
                }
                .prompt_ids(lm)?;
                if before.len() + 2 >= window {
                    // Later turns lie beyond what is scored.
                    break;
                }
                turns[k].content =
                    replace_words(lm, &before, &turns[k].content, rate, window, rng)?;
            }
            Record::Chat { messages: turns }
        }
    })
}

/// `text` (which follows the token ids `before`) with about `rate` of its words that start
/// within the first `window` tokens replaced by words `lm` samples in their place. A word
/// is a run of letters and digits after a space; its replacement is the first such run
/// the model writes after that space, and must differ from it (letter case aside). A word
/// the model offers no other word for in [`NEIGHBOUR_TRIES`] tries (three times as many
/// with the space given) is kept.
fn replace_words(
    lm: &CausalLm,
    before: &[u32],
    text: &str,
    rate: f64,
    window: usize,
    rng: &mut StdRng,
) -> Result<String, MlError> {
    let tok = lm.tokenizer();
    let room = window.saturating_sub(before.len() + 1);
    if room == 0 {
        return Ok(text.to_string());
    }
    let ids = tok.encode(text)?;
    // How much of the text is scored, in bytes (roughly: decoding may normalise).
    let visible = if ids.len() > room {
        tok.decode(&ids[..room], false)?.len()
    } else {
        text.len()
    };
    let words: Vec<(usize, usize)> = word_spans(text)
        .into_iter()
        .filter(|(s, _)| *s < visible)
        .collect();
    if words.is_empty() {
        return Ok(text.to_string());
    }
    let k = ((words.len() as f64 * rate).round() as usize).clamp(1, words.len());
    let mut chosen: Vec<usize> = rand::seq::index::sample(rng, words.len(), k).into_vec();
    chosen.sort_unstable();
    let sampling = SamplingConfig {
        temperature: 1.0,
        top_p: 0.95,
        max_tokens: NEIGHBOUR_WORD_TOKENS,
    };
    let ctx = lm.config().max_position_embeddings;
    let mut out = String::with_capacity(text.len() + 16);
    let mut cursor = 0;
    for w in chosen {
        let (s, e) = words[w];
        // Everything up to the space before the word; the model writes the space itself,
        // as its tokenizer joins a space to the word after it.
        out.push_str(&text[cursor..s - 1]);
        let original = &text[s..e];
        let mut replacement = None;
        // First as the model would write it, space and all; then, for a model that rarely
        // writes a word there (one that reads bytes and is barely trained), after the space.
        for forced in [false, true] {
            let mut prefix = before.to_vec();
            prefix.extend(tok.encode(&out)?);
            if forced {
                prefix.extend(tok.encode(" ")?);
            }
            if prefix.len() + NEIGHBOUR_WORD_TOKENS >= ctx || replacement.is_some() {
                continue;
            }
            let tries = if forced {
                2 * NEIGHBOUR_TRIES
            } else {
                NEIGHBOUR_TRIES
            };
            for _ in 0..tries {
                let g = lm.generate(&prefix, &sampling, rng)?;
                let written = tok.decode(&g.ids, true)?;
                let rest = if forced {
                    written.as_str()
                } else {
                    match written.strip_prefix(' ') {
                        Some(r) => r,
                        None => continue,
                    }
                };
                let word: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
                if !word.is_empty() && word.to_lowercase() != original.to_lowercase() {
                    replacement = Some(word);
                    break;
                }
            }
        }
        out.push(' ');
        out.push_str(replacement.as_deref().unwrap_or(original));
        cursor = e;
    }
    out.push_str(&text[cursor..]);
    Ok(out)
}

/// Byte spans of the words of `text`: maximal runs of letters and digits that follow a
/// space.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start: Option<usize> = None;
    let mut prev = '\0';
    for (i, c) in text.char_indices() {
        match start {
            Some(s) if !c.is_alphanumeric() => {
                spans.push((s, i));
                start = None;
            }
            None if c.is_alphanumeric() && prev == ' ' => start = Some(i),
            _ => {}
        }
        prev = c;
    }
    if let Some(s) = start {
        spans.push((s, text.len()));
    }
    spans
}
