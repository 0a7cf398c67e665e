//! Datasets: JSONL records, a synthetic demo dataset, and turning records into padded,
//! masked token batches.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::Turn;
use crate::config::LlamaConfig;
use crate::error::MlError;
use crate::tokenizer::TextTokenizer;

/// One dataset record. In JSONL a line is `{"text": ...}`, instruction data
/// `{"prompt" | "instruction": ..., "response" | "output": ...}` whose prompt tokens are
/// masked out of the loss, or a conversation `{"messages": [...]}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Record {
    /// Plain text; every token is trained on.
    Text {
        /// The text.
        text: String,
    },
    /// An instruction and its response; only the response (and end of sequence) is trained on.
    Instruction {
        /// The prompt, fed to the model but not trained on.
        #[serde(alias = "instruction")]
        prompt: String,
        /// The response the model should produce.
        #[serde(alias = "output")]
        response: String,
    },
    /// A conversation (`{"messages": [{"role", "content"}, ...]}`), rendered with the
    /// model's chat template; every assistant turn is trained on, nothing else.
    Chat {
        /// The turns, in order.
        messages: Vec<Turn>,
    },
}

impl Record {
    /// The record as a conversation: instructions become a user and an assistant turn;
    /// None for plain text.
    pub fn turns(&self) -> Option<Vec<Turn>> {
        match self {
            Record::Text { .. } => None,
            Record::Instruction { prompt, response } => Some(vec![
                Turn::new("user", prompt.as_str()),
                Turn::new("assistant", response.as_str()),
            ]),
            Record::Chat { messages } => Some(messages.clone()),
        }
    }
}

/// Parses JSONL bytes into records. Empty lines are skipped; an error names the 1-based
/// line number and what is wrong with it.
pub fn parse_jsonl(bytes: &[u8]) -> Result<Vec<Record>, MlError> {
    parse_jsonl_named(bytes, "<bytes>")
}

/// Reads a JSONL file into records; errors name the file.
pub fn load_jsonl(path: &Path) -> Result<Vec<Record>, MlError> {
    let bytes = std::fs::read(path).map_err(|e| MlError::io("cannot read dataset", path, e))?;
    parse_jsonl_named(&bytes, &path.display().to_string())
}

/// Serialises records as JSONL (one object per line, `text` or `prompt`/`response`).
pub fn to_jsonl(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        // Serialising a struct of strings cannot fail.
        if let Ok(line) = serde_json::to_vec(r) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    out
}

fn parse_jsonl_named(bytes: &[u8], source_name: &str) -> Result<Vec<Record>, MlError> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = raw.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let record = parse_line(line).map_err(|problem| MlError::Dataset {
            source_name: source_name.to_string(),
            line: i + 1,
            problem,
        })?;
        out.push(record);
    }
    Ok(out)
}

fn parse_line(line: &[u8]) -> Result<Record, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err(
            "expected a JSON object like {\"text\": ...}, {\"prompt\": ..., \"response\": ...} or {\"messages\": [...]}"
                .into(),
        );
    };
    crate::formats::FieldMap::default().record(&obj)
}

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ra", "ten", "vo", "shi", "dor", "al", "be", "nu", "zar", "qui", "pe", "fa",
    "gri",
];
const ADJECTIVES: &[&str] = &[
    "quick", "lazy", "red", "small", "happy", "old", "brave", "quiet",
];
const ANIMALS: &[&str] = &[
    "fox", "dog", "cat", "bird", "horse", "mouse", "wolf", "bear",
];
const VERBS: &[&str] = &[
    "jumps over",
    "looks at",
    "runs past",
    "sleeps near",
    "chases",
];
const NOUNS: &[&str] = &["fence", "river", "tree", "house", "hill", "stone"];
const WORLD_SIZE: usize = 24;

fn make_name(rng: &mut StdRng) -> String {
    let n = rng.random_range(2..=3);
    let mut s: String = (0..n)
        .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
        .collect();
    if let Some(first) = s.get(0..1) {
        let up = first.to_ascii_uppercase();
        s.replace_range(0..1, &up);
    }
    s
}

/// A fixed world of (country, capital) pairs shared by every seed, so held-out data
/// shares facts with training data.
fn world() -> Vec<(String, String)> {
    let mut rng = StdRng::seed_from_u64(0x7475_6e65_6e65_7400);
    (0..WORLD_SIZE)
        .map(|_| (make_name(&mut rng), make_name(&mut rng)))
        .collect()
}

/// A small synthetic dataset with learnable structure: capital-city facts over a fixed
/// invented world, two-number additions, word repetition (all instruction records) and
/// templated sentences (text records). Deterministic from `seed`.
pub fn demo_dataset(n: usize, seed: u64) -> Vec<Record> {
    let world = world();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| match rng.random_range(0..4) {
            0 => {
                let (country, city) = &world[rng.random_range(0..world.len())];
                Record::Instruction {
                    prompt: format!("What is the capital of {country}?\n"),
                    response: format!("The capital of {country} is {city}."),
                }
            }
            1 => {
                let a: u32 = rng.random_range(0..50);
                let b: u32 = rng.random_range(0..50);
                Record::Instruction {
                    prompt: format!("{a}+{b}="),
                    response: format!("{}", a + b),
                }
            }
            2 => {
                let word = make_name(&mut rng).to_lowercase();
                Record::Instruction {
                    prompt: format!("Repeat: {word}\n"),
                    response: format!("{word} {word}"),
                }
            }
            _ => {
                let pick =
                    |rng: &mut StdRng, xs: &[&'static str]| xs[rng.random_range(0..xs.len())];
                Record::Text {
                    text: format!(
                        "The {} {} {} the {}.",
                        pick(&mut rng, ADJECTIVES),
                        pick(&mut rng, ANIMALS),
                        pick(&mut rng, VERBS),
                        pick(&mut rng, NOUNS)
                    ),
                }
            }
        })
        .collect()
}

/// Canaries for the demo generator, each with its never-released alternatives: `n`
/// groups of `1 + alternatives` capital questions about one invented country that is not
/// in the demo world, each naming a different invented capital. Within a group the records
/// are independent draws alike, so for a model that never saw any of them, which one was
/// planted (the first) is exchangeable with the others: the exposure test's null is exact.
/// The capital is the secret a model can only predict by having trained on the record.
/// Deterministic from `seed`.
pub fn demo_canaries(n: usize, alternatives: usize, seed: u64) -> Vec<Vec<Record>> {
    let world = world();
    let known: std::collections::HashSet<&str> = world
        .iter()
        .flat_map(|(c, y)| [c.as_str(), y.as_str()])
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut used: std::collections::HashSet<String> = Default::default();
    let mut fresh = |rng: &mut StdRng| loop {
        let name = make_name(rng);
        if !known.contains(name.as_str()) && used.insert(name.clone()) {
            return name;
        }
    };
    (0..n)
        .map(|_| {
            let country = fresh(&mut rng);
            (0..=alternatives)
                .map(|_| {
                    let city = fresh(&mut rng);
                    Record::Instruction {
                        prompt: format!("What is the capital of {country}?\n"),
                        response: format!("The capital of {country} is {city}."),
                    }
                })
                .collect()
        })
        .collect()
}

/// A tokenized record: `ids` (bos, tokens, eos; truncated) and which of them are training
/// targets (never the first).
#[derive(Clone, Debug)]
pub(crate) struct Example {
    pub(crate) ids: Vec<u32>,
    pub(crate) trained: Vec<bool>,
}

impl Example {
    /// An example trained on every token from index `from` (at least 1) on.
    pub(crate) fn from_index(ids: Vec<u32>, from: usize) -> Example {
        let from = from.max(1);
        let trained = (0..ids.len()).map(|i| i >= from).collect();
        Example { ids, trained }
    }

    /// Number of next-token predictions that count towards the loss.
    pub(crate) fn targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|t| **t).count()
    }
}

/// Tokenizes records: prepends bos when the config has one (unless a chat template
/// already wrote it), appends eos to text and to instructions on models without a chat
/// template, truncates to `max_seq_len` tokens (and the model's context), and marks the
/// training targets: every token of text, the response of an instruction, the assistant
/// turns of a conversation. On a model with its own chat template, instructions are
/// rendered as a user and an assistant turn. Records left with no target are dropped.
pub(crate) fn tokenize(
    tok: &TextTokenizer,
    cfg: &LlamaConfig,
    records: &[Record],
    max_seq_len: usize,
) -> Result<Vec<Example>, MlError> {
    let max_len = max_seq_len.min(cfg.max_position_embeddings + 1);
    let chat = tok.chat();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let bos: Vec<u32> = cfg.bos_token_id.into_iter().collect();
        let mut ex = match (r, chat.is_models_own()) {
            (Record::Text { text }, _) => {
                let mut ids = bos;
                ids.extend(tok.encode(text)?);
                ids.extend(cfg.eos_token_id);
                Example::from_index(ids, 1)
            }
            (Record::Instruction { prompt, response }, false) => {
                let mut ids = bos;
                ids.extend(tok.encode(prompt)?);
                let from = ids.len();
                ids.extend(tok.encode(response)?);
                ids.extend(cfg.eos_token_id);
                Example::from_index(ids, from)
            }
            (Record::Instruction { .. } | Record::Chat { .. }, _) => {
                let turns = r.turns().unwrap_or_default();
                let segments = chat.segments(&turns)?;
                let wrote_bos = segments.first().is_some_and(|(s, _)| chat.writes_bos(s));
                let mut ids = if wrote_bos { Vec::new() } else { bos };
                let mut trained = vec![false; ids.len()];
                for (text, train) in &segments {
                    let seg = tok.encode(text)?;
                    trained.extend(std::iter::repeat_n(*train, seg.len()));
                    ids.extend(seg);
                }
                Example { ids, trained }
            }
        };
        if let Some(bad) = ex.ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(MlError::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {}; the tokenizer does not match the model",
                cfg.vocab_size
            )));
        }
        ex.ids.truncate(max_len);
        ex.trained.truncate(max_len);
        if let Some(first) = ex.trained.first_mut() {
            *first = false;
        }
        if ex.targets() > 0 {
            out.push(ex);
        }
    }
    Ok(out)
}

/// A padded batch: inputs and targets `[b, t]` (u32), key mask and loss mask `[b, t]` (f32).
pub(crate) struct Batch {
    pub(crate) inputs: Tensor,
    pub(crate) targets: Tensor,
    pub(crate) key_mask: Tensor,
    pub(crate) loss_mask: Tensor,
    /// Real (non-padding) input tokens.
    pub(crate) tokens: usize,
    /// Positions that count towards the loss.
    pub(crate) predicted: usize,
}

/// Builds a right-padded batch from examples (each at least two tokens long).
pub(crate) fn make_batch(examples: &[&Example], device: &Device) -> candle_core::Result<Batch> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut inputs = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let mut key_mask = vec![0f32; b * t];
    let mut loss_mask = vec![0f32; b * t];
    let (mut tokens, mut predicted) = (0, 0);
    for (row, e) in examples.iter().enumerate() {
        let n = e.ids.len() - 1;
        for j in 0..n {
            let k = row * t + j;
            inputs[k] = e.ids[j];
            targets[k] = e.ids[j + 1];
            key_mask[k] = 1.0;
            if e.trained[j + 1] {
                loss_mask[k] = 1.0;
                predicted += 1;
            }
        }
        tokens += n;
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        key_mask: Tensor::from_vec(key_mask, (b, t), device)?,
        loss_mask: Tensor::from_vec(loss_mask, (b, t), device)?,
        tokens,
        predicted,
    })
}

/// The 320 original chat records shipped with tunenet (`crates/ml/data`), as JSONL: real
/// instruction data that was never published anywhere else, so no miner can fetch a test
/// split drawn from it.
pub const SHIPPED_INSTRUCT_JSONL: &[u8] = include_bytes!("../data/tunenet-instruct.jsonl");
