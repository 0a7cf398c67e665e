//! The tunenet side of scripts/bench-hellaswag.sh, built from this crate alone so the
//! benchmark does not depend on the rest of the workspace (it runs the same code as
//! `tunenet eval hellaswag`):
//!
//!   hellaswag-bench demo OUT N SEED
//!   hellaswag-bench import GGUF OUT_DIR
//!   hellaswag-bench export MODEL_DIR OUT_GGUF f32|f16|q8_0|q4_0|q4_1
//!   hellaswag-bench score gguf|gguf-f32|dir PATH DATA BATCH_TOKENS SCORES_OUT
//!
//! `score` prints one JSON object: items, acc, acc_norm, items/s, tokens/s, seconds, and
//! the process's peak resident memory.

use std::path::Path;
use std::time::Instant;

use tunenet_ml::HellaSwagScorer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tunenet_ml::alloc::keep_freed_memory();
    tunenet_ml::threads::one_tensor_pool();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str, String> {
        args.get(i).map(String::as_str).ok_or_else(|| {
            "usage: hellaswag-bench demo OUT N SEED | import GGUF OUT | score gguf|gguf-f32|dir PATH DATA BATCH_TOKENS SCORES_OUT"
                .to_string()
        })
    };
    match arg(0)? {
        "demo" => {
            let items = tunenet_ml::hellaswag_demo_items(arg(2)?.parse()?, arg(3)?.parse()?);
            let mut bytes = Vec::new();
            for it in &items {
                bytes.extend(serde_json::to_vec(it)?);
                bytes.push(b'\n');
            }
            std::fs::write(arg(1)?, bytes)?;
        }
        "import" => {
            tunenet_ml::import_gguf(Path::new(arg(1)?), Path::new(arg(2)?))?;
        }
        "export" => {
            let dir = tunenet_ml::ModelDir::open(Path::new(arg(1)?))?;
            tunenet_ml::export_gguf_quantized(&dir, Path::new(arg(2)?), "llama", arg(3)?)?;
        }
        "score" => {
            let path = Path::new(arg(2)?);
            let device = tunenet_ml::Device::Cpu;
            let load = Instant::now();
            let scorer: Box<dyn HellaSwagScorer> = match arg(1)? {
                "gguf" => Box::new(tunenet_ml::ScoringModel::load_gguf(
                    path,
                    &device,
                    tunenet_ml::GgufWeights::Quantized,
                )?),
                "gguf-f32" => Box::new(tunenet_ml::ScoringModel::load_gguf(
                    path,
                    &device,
                    tunenet_ml::GgufWeights::Dequantized,
                )?),
                _ => {
                    let dir = tunenet_ml::ModelDir::open(path)?;
                    let lm = tunenet_ml::CausalLm::load(
                        &dir,
                        None,
                        tunenet_ml::WeightDtype::F32,
                        &device,
                    )?;
                    Box::new(tunenet_ml::ScoringModel::from_causal_lm(&lm)?)
                }
            };
            let load_secs = load.elapsed().as_secs_f64();
            let items = tunenet_ml::load_hellaswag(Path::new(arg(3)?))?;
            let opts = tunenet_ml::ScoreOptions {
                batch_tokens: arg(4)?.parse()?,
                indices: None,
            };
            let start = Instant::now();
            let scores = tunenet_ml::score_items(scorer.as_ref(), &items, &opts, &mut |_| {})?;
            let r = tunenet_ml::hellaswag_summary(&items, &scores, start.elapsed().as_secs_f64())?;
            let mut bytes = Vec::new();
            for s in &scores {
                bytes.extend(serde_json::to_vec(s)?);
                bytes.push(b'\n');
            }
            std::fs::write(arg(5)?, bytes)?;
            println!(
                "{}",
                serde_json::json!({
                    "weights": scorer.describe(),
                    "items": r.items,
                    "acc": r.acc,
                    "acc_norm": r.acc_norm,
                    "items_per_sec": r.items_per_sec,
                    "tokens_per_sec": r.tokens_per_sec,
                    "seconds": r.seconds,
                    "load_seconds": load_secs,
                    "peak_rss_mib": tunenet_ml::peak_rss_bytes().map(|b| b as f64 / 1048576.0),
                })
            );
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
