//! Offline model commands: create a tiny model, make a dataset, train and evaluate, so a
//! miner can try settings without a validator.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a random model in Hugging Face layout (config.json, tokenizer.json, model.safetensors).
    Init {
        /// Model size preset; `tiny` is the only one today.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print a model directory's config and parameter count.
    Info {
        /// The model directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DatasetCmd {
    /// Write the synthetic instruction dataset the demo uses (JSONL).
    Demo {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Records to write.
        #[arg(long, default_value_t = 1000)]
        records: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// Base model directory.
    #[arg(long)]
    model: PathBuf,
    /// Training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Where to write artifact.safetensors and manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// `lora` or `full`.
    #[arg(long, default_value = "lora")]
    method: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest sequence, tokens.
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop (and save) before this many seconds have passed.
    #[arg(long)]
    time_budget: Option<f64>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Base model directory.
    #[arg(long)]
    model: PathBuf,
    /// Evaluation data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// A training artifact to apply (LoRA adapter or full weights).
    #[arg(long)]
    artifact: Option<PathBuf>,
    /// Longest sequence, tokens.
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn model(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Init { preset, out, seed } => {
            if preset != "tiny" {
                bail!("unknown preset `{preset}`: the only preset is `tiny`");
            }
            let cfg = tunenet_ml::init_tiny(&out, seed)?;
            println!(
                "wrote a tiny Llama ({} parameters) to {}",
                cfg.param_count(),
                out.display()
            );
        }
        ModelCmd::Info { dir } => {
            let m = tunenet_ml::ModelDir::open(&dir)?;
            let cfg = m.config()?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            println!("parameters: {}", cfg.param_count());
        }
    }
    Ok(())
}

pub fn dataset(cmd: DatasetCmd) -> Result<()> {
    match cmd {
        DatasetCmd::Demo { out, records, seed } => {
            let data = tunenet_ml::demo_dataset(records, seed);
            std::fs::write(&out, tunenet_ml::to_jsonl(&data))
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} records to {}", data.len(), out.display());
        }
    }
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    let method = match a.method.as_str() {
        "lora" => tunenet_ml::Method::Lora {
            rank: a.rank,
            alpha: a.alpha,
        },
        "full" => tunenet_ml::Method::Full,
        other => bail!("unknown --method `{other}`: use `lora` or `full`"),
    };
    let cfg = tunenet_ml::TrainConfig {
        method,
        learning_rate: a.lr,
        max_steps: a.steps,
        batch_size: a.batch_size,
        max_seq_len: a.max_seq_len,
        seed: a.seed,
        weight_decay: 0.0,
        ..Default::default()
    };
    let device = tunenet_ml::parse_device(&a.device)?;
    let model = tunenet_ml::ModelDir::open(&a.model)?;
    let records = tunenet_ml::load_jsonl(&a.data)?;
    let deadline = a
        .time_budget
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let cancel = AtomicBool::new(false);
    let mut last = Instant::now();
    let mut progress = |p: &tunenet_ml::Progress| {
        if last.elapsed() >= Duration::from_secs(1) || p.step == p.max_steps {
            last = Instant::now();
            eprintln!(
                "step {:>5}/{}  loss {:.4}  {:.0} tokens/s  {:.1} s",
                p.step,
                p.max_steps,
                p.loss,
                p.tokens_per_sec,
                p.elapsed.as_secs_f64()
            );
        }
    };
    let r = tunenet_ml::train(
        &model,
        &records,
        &cfg,
        deadline,
        Duration::from_millis(500),
        &device,
        &cancel,
        &mut progress,
        &a.out,
    )?;
    println!(
        "trained {} steps in {:.1} s: loss {:.4} -> {:.4}{}; artifact {}",
        r.steps,
        r.seconds,
        r.first_loss,
        r.final_loss,
        if r.stopped_by_deadline {
            " (stopped for the time budget)"
        } else {
            ""
        },
        r.artifact.display()
    );
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let device = tunenet_ml::parse_device(&a.device)?;
    let model = tunenet_ml::ModelDir::open(&a.model)?;
    let records = tunenet_ml::load_jsonl(&a.data)?;
    let r = tunenet_ml::evaluate(
        &model,
        a.artifact.as_deref(),
        &records,
        a.max_seq_len,
        a.batch_size,
        &device,
    )?;
    println!(
        "mean token loss {:.4} over {} tokens in {} records ({:.1} s)",
        r.mean_loss, r.tokens, r.records, r.seconds
    );
    Ok(())
}
