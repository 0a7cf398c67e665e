//! Offline model commands: create a tiny model, make a dataset, train and evaluate, so a
//! miner can try settings without a validator.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
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
    /// Print a model's config and parameter count (a directory or a hub id).
    Info {
        /// The model directory, or `hf:owner/name[@revision]`.
        dir: PathBuf,
    },
    /// Fetch a model or dataset by hub id into the Hugging Face cache (`HF_HOME`,
    /// `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`) and print its pin: the commit and the
    /// blake3 of every file, as a competition record keeps them.
    Fetch {
        /// `hf:owner/name[@revision]`.
        id: String,
        /// It is a dataset (default: a model).
        #[arg(long)]
        dataset: bool,
        /// Only this split's data files (datasets).
        #[arg(long)]
        split: Option<String>,
    },
    /// Import a llama-architecture GGUF (e.g. from scripts/fetch-smollm2.sh) into a
    /// Hugging Face model directory (f32 safetensors, config.json, tokenizer.json).
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a model directory as a llama.cpp-layout GGUF, its 2-D weights quantised to
    /// `--quant` (f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1), for `eval hellaswag --gguf`
    /// or llama.cpp.
    ExportGguf {
        /// Model directory (Hugging Face layout).
        model: PathBuf,
        /// Output .gguf file.
        #[arg(long)]
        out: PathBuf,
        /// Weight type of the 2-D weights.
        #[arg(long, default_value = "q8_0")]
        quant: String,
    },
    /// Measure training (LoRA or full) or evaluation throughput on fixed-length sequences;
    /// prints one JSON line (used by scripts/bench-ml.sh).
    Bench {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// `lora`, `full` or `eval`.
        #[arg(long, default_value = "lora")]
        mode: String,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per sequence (bos included; the model sees seq - 1 inputs).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps (one more runs first as warm-up).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Base weight precision: auto (f32 on a CPU, bf16 on a GPU), f32, bf16, f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Merge a LoRA artifact into its base model's weights, writing a new model directory.
    Merge {
        /// Base model directory.
        #[arg(long)]
        base: PathBuf,
        /// The LoRA artifact (artifact.safetensors written by training).
        #[arg(long)]
        adapter: PathBuf,
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
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
    /// Base model directory, or a hub id `hf:owner/name[@revision]`.
    #[arg(long)]
    model: PathBuf,
    /// Training data: a JSONL, JSON, CSV or Parquet file, or a hub id
    /// `hf:owner/name[@revision]`.
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
    /// Train data-parallel over these devices (comma-separated, e.g. `cuda:0,cuda:1`;
    /// `cpu:N` names a logical CPU device); overrides --device.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// LoRA target modules, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    targets: Vec<String>,
    /// Dropout on LoRA adapter inputs.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// `constant` or `cosine` (after warm-up).
    #[arg(long, default_value = "constant")]
    lr_schedule: String,
    /// Clip gradients to this global norm.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Batch sequences of similar length together.
    #[arg(long)]
    length_bucketing: bool,
    /// Base weight precision: auto (f32 on CPU, bf16 on GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Checkpoint every this many steps (0: only by time); a rerun with the same --out resumes.
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    cmd: Option<EvalCmd>,
    /// Base model directory, or a hub id `hf:owner/name[@revision]`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Evaluation data: a JSONL, JSON, CSV or Parquet file, or a hub id.
    #[arg(long)]
    data: Option<PathBuf>,
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
    /// Split the model over these devices (tensor parallelism, for a model larger than
    /// one device; comma-separated, e.g. `cuda:0,cuda:1`); overrides --device.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
}

/// A dataset (a JSONL, JSON, CSV or Parquet file, or a hub id `hf:owner/name[@rev]`) with
/// the usual field names; records that fit nothing are reported on stderr, by line or row.
fn load_records(spec: &std::path::Path) -> anyhow::Result<Vec<tunenet_ml::Record>> {
    let data = tunenet_node::sources::dataset(spec, None, None)?;
    if let Some(pin) = &data.pin {
        eprintln!(
            "{}: commit {} ({} files)",
            pin.id,
            pin.commit,
            pin.files.len()
        );
    }
    let d = tunenet_node::sources::load_records(&data.paths, &tunenet_ml::FieldMap::default())?;
    if d.bad_count > 0 {
        eprintln!(
            "{}: skipped {} record(s) that fit no field, e.g. {}",
            spec.display(),
            d.bad_count,
            d.bad
                .iter()
                .take(3)
                .map(|b| format!("{} {}: {}", d.unit(), b.at, b.problem))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(d.records)
}

/// A model directory, or a hub id `hf:owner/name[@rev]` fetched into the hub cache.
fn open_model(spec: &std::path::Path) -> anyhow::Result<tunenet_ml::ModelDir> {
    let m = tunenet_node::sources::model(spec, None)?;
    if let Some(pin) = &m.pin {
        eprintln!(
            "{}: commit {} ({} files)",
            pin.id,
            pin.commit,
            pin.files.len()
        );
    }
    Ok(tunenet_ml::ModelDir::open(&m.paths[0])?)
}

/// The devices `--devices` names (`cpu:N` is a logical CPU device), else `--device`.
fn devices_of(device: &str, devices: &[String]) -> anyhow::Result<Vec<tunenet_ml::Device>> {
    if devices.is_empty() {
        return Ok(vec![tunenet_ml::parse_device(device)?]);
    }
    devices
        .iter()
        .map(|d| match d.trim().strip_prefix("cpu:") {
            Some(n) => {
                n.parse::<u32>()
                    .with_context(|| format!("--devices: `{d}`: a logical CPU device is cpu:N"))?;
                Ok(tunenet_ml::Device::Cpu)
            }
            None => Ok(tunenet_ml::parse_device(d)?),
        })
        .collect()
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// HellaSwag accuracy (acc, acc_norm) scored as lm-evaluation-harness does.
    Hellaswag {
        /// Model directory (or, with --quantized, a GGUF file).
        #[arg(long, required_unless_present = "gguf")]
        model: Option<PathBuf>,
        /// Run a llama-architecture GGUF file directly, its weights kept quantised
        /// (Q8_0, Q4_x, K-quants); the same as `--quantized --model FILE`.
        #[arg(long, conflicts_with = "model")]
        gguf: Option<PathBuf>,
        /// Treat --model as a GGUF file and run it with quantised matmuls.
        #[arg(long)]
        quantized: bool,
        /// With a GGUF file: expand its weights to f32 at load (same model, four to eight
        /// times the memory, a few per cent faster on a CPU than expanding per batch).
        #[arg(long)]
        dequantize: bool,
        /// Tokens per forward pass (items are packed up to this many, padding included).
        #[arg(long, default_value_t = tunenet_ml::DEFAULT_BATCH_TOKENS)]
        batch_tokens: usize,
        /// Write each item's scores (logliks, predictions) as JSONL here.
        #[arg(long)]
        scores_out: Option<PathBuf>,
        /// HellaSwag JSONL (activity_label, ctx_a, ctx_b, endings, label).
        #[arg(long)]
        data: PathBuf,
        /// A training artifact to apply (LoRA adapter or full weights).
        #[arg(long)]
        artifact: Option<PathBuf>,
        /// Score only the first N items.
        #[arg(long)]
        limit: Option<usize>,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Base weight precision: auto, f32, bf16, f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Write synthetic items in HellaSwag's layout (for trying the scorer).
    HellaswagDemo {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Items to write.
        #[arg(long, default_value_t = 100)]
        items: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
            let m = open_model(&dir)?;
            let cfg = m.config()?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            println!("parameters: {}", cfg.param_count());
        }
        ModelCmd::Fetch { id, dataset, split } => {
            if !tunenet_node::sources::is_hub(std::path::Path::new(&id)) {
                bail!("`{id}` is not a hub id: write hf:owner/name[@revision]");
            }
            let local = if dataset {
                tunenet_node::sources::dataset(std::path::Path::new(&id), split.as_deref(), None)?
            } else {
                tunenet_node::sources::model(std::path::Path::new(&id), None)?
            };
            let pin = local.pin.context("a hub id always has a pin")?;
            println!("{}", serde_json::to_string_pretty(&pin)?);
        }
        ModelCmd::ImportGguf { file, out } => {
            let cfg = tunenet_ml::import_gguf(&file, &out)?;
            println!(
                "imported {} ({} parameters, {} layers, vocabulary {}) to {}",
                file.display(),
                cfg.param_count(),
                cfg.num_hidden_layers,
                cfg.vocab_size,
                out.display()
            );
        }
        ModelCmd::ExportGguf { model, out, quant } => {
            let dir = open_model(&model)?;
            tunenet_ml::export_gguf_quantized(&dir, &out, "llama", &quant)?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!(
                "wrote {} ({quant}, {:.1} MB)",
                out.display(),
                size as f64 / 1e6
            );
        }
        ModelCmd::Bench {
            model,
            mode,
            batch_size,
            seq,
            steps,
            rank,
            device,
            dtype,
        } => {
            let device = tunenet_ml::parse_device(&device)?;
            let spec = tunenet_ml::BenchSpec {
                mode: &mode,
                batch_size,
                seq,
                steps,
                rank,
                dtype: dtype.parse()?,
            };
            let r = tunenet_ml::bench_throughput(&open_model(&model)?, &spec, &device)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        ModelCmd::Merge { base, adapter, out } => {
            let base = open_model(&base)?;
            tunenet_ml::merge_adapter(&base, &adapter, &out)?;
            println!("wrote merged weights to {}", out.display());
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
        weight_decay: a.weight_decay,
        grad_accum_steps: a.grad_accum,
        warmup_steps: a.warmup_steps,
        lr_schedule: match a.lr_schedule.as_str() {
            "constant" => tunenet_ml::LrSchedule::Constant,
            "cosine" => tunenet_ml::LrSchedule::Cosine,
            other => bail!("unknown --lr-schedule `{other}`: use `constant` or `cosine`"),
        },
        max_grad_norm: a.max_grad_norm,
        lora_dropout: a.lora_dropout,
        length_bucketing: a.length_bucketing,
        dtype: a.dtype.parse()?,
        checkpoint_every_steps: a.checkpoint_every,
        ..Default::default()
    };
    let devices = devices_of(&a.device, &a.devices)?;
    let model = open_model(&a.model)?;
    let records = load_records(&a.data)?;
    let deadline = a
        .time_budget
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let cancel = AtomicBool::new(false);
    let mut last = Instant::now();
    let mut progress = |p: &tunenet_ml::Progress| {
        if last.elapsed() >= Duration::from_secs(1) || p.step == p.max_steps {
            last = Instant::now();
            eprintln!(
                "step {:>5}/{}  loss {:.4}  lr {:.2e}  {:.0} tokens/s  {:.1} s elapsed  {:.1} s left",
                p.step,
                p.max_steps,
                p.loss,
                p.learning_rate,
                p.tokens_per_sec,
                p.elapsed.as_secs_f64(),
                p.time_left.as_secs_f64()
            );
        }
    };
    let r = tunenet_ml::train_data_parallel(
        &model,
        &records,
        &cfg,
        &a.targets,
        deadline,
        Duration::from_millis(500),
        &devices,
        None,
        &cancel,
        &mut progress,
        &a.out,
    )?;
    println!(
        "trained {} steps in {:.1} s: loss {:.4} -> {:.4}{}{}; artifact {}",
        r.steps,
        r.seconds,
        r.first_loss,
        r.final_loss,
        if r.resumed_from > 0 {
            format!(" (resumed from the checkpoint of step {})", r.resumed_from)
        } else {
            String::new()
        },
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
    match a.cmd {
        Some(EvalCmd::Hellaswag {
            model,
            gguf,
            quantized,
            dequantize,
            batch_tokens,
            scores_out,
            data,
            artifact,
            limit,
            device,
            dtype,
        }) => {
            let device = tunenet_ml::parse_device(&device)?;
            let gguf = match (gguf, quantized) {
                (Some(path), _) => Some(path),
                (None, true) => model.clone(),
                (None, false) => None,
            };
            let load_start = std::time::Instant::now();
            let scorer: Box<dyn tunenet_ml::HellaSwagScorer> = match (gguf, model) {
                (Some(path), _) => {
                    if artifact.is_some() {
                        bail!(
                            "--artifact applies to a model directory, not a GGUF file; merge the adapter and export it instead"
                        );
                    }
                    if path.is_dir() {
                        bail!(
                            "{} is a directory; --quantized and --gguf need a .gguf file",
                            path.display()
                        );
                    }
                    let weights = if dequantize {
                        tunenet_ml::GgufWeights::Dequantized
                    } else {
                        tunenet_ml::GgufWeights::Quantized
                    };
                    Box::new(tunenet_ml::ScoringModel::load_gguf(
                        &path, &device, weights,
                    )?)
                }
                (None, Some(dir)) => {
                    let model = tunenet_ml::ModelDir::open(&dir)?;
                    let lm = tunenet_ml::CausalLm::load(
                        &model,
                        artifact.as_deref(),
                        dtype.parse()?,
                        &device,
                    )?;
                    Box::new(tunenet_ml::ScoringModel::from_causal_lm(&lm)?)
                }
                (None, None) => bail!("eval hellaswag needs --model or --gguf"),
            };
            let load_secs = load_start.elapsed().as_secs_f64();
            let mut items = tunenet_ml::load_hellaswag(&data)?;
            if let Some(n) = limit {
                items.truncate(n);
            }
            let opts = tunenet_ml::ScoreOptions {
                batch_tokens,
                indices: None,
            };
            let start = std::time::Instant::now();
            let mut last_report = 0.0;
            let scores = tunenet_ml::score_items(scorer.as_ref(), &items, &opts, &mut |p| {
                if p.seconds - last_report >= 10.0 {
                    last_report = p.seconds;
                    eprintln!(
                        "hellaswag: {}/{} items ({:.1} items/s)",
                        p.done,
                        p.total,
                        p.done as f64 / p.seconds.max(1e-9)
                    );
                }
            })?;
            let r = tunenet_ml::hellaswag_summary(&items, &scores, start.elapsed().as_secs_f64())?;
            if let Some(path) = scores_out {
                let mut bytes = Vec::new();
                for s in &scores {
                    bytes.extend(serde_json::to_vec(s)?);
                    bytes.push(b'\n');
                }
                std::fs::write(&path, bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            println!(
                "hellaswag: {} items  acc {:.4}  acc_norm {:.4}  {:.2} items/s  {:.0} tokens/s  ({:.1} s; {}, loaded in {:.1} s)",
                r.items,
                r.acc,
                r.acc_norm,
                r.items_per_sec,
                r.tokens_per_sec,
                r.seconds,
                scorer.describe(),
                load_secs
            );
            return Ok(());
        }
        Some(EvalCmd::HellaswagDemo { out, items, seed }) => {
            let data = tunenet_ml::hellaswag_demo_items(items, seed);
            let mut bytes = Vec::new();
            for it in &data {
                bytes.extend(serde_json::to_vec(it)?);
                bytes.push(b'\n');
            }
            std::fs::write(&out, bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} items to {}", data.len(), out.display());
            return Ok(());
        }
        None => {}
    }
    let (Some(model), Some(data)) = (a.model, a.data) else {
        bail!("eval needs --model and --data (or a subcommand such as `eval hellaswag`)");
    };
    let devices = devices_of(&a.device, &a.devices)?;
    let model = open_model(&model)?;
    let records = load_records(&data)?;
    let r = tunenet_ml::evaluate_on(
        &model,
        a.artifact.as_deref(),
        &records,
        a.max_seq_len,
        a.batch_size,
        &devices,
    )?;
    println!(
        "mean token loss {:.4} over {} tokens in {} records ({:.1} s)",
        r.mean_loss, r.tokens, r.records, r.seconds
    );
    Ok(())
}

/// `tunenet verify-receipt`: checks a validator's evaluation receipt and recomputes its
/// per-record losses from the artifact, the base model and the published sets.
#[derive(clap::Args)]
pub struct VerifyReceiptArgs {
    /// The receipt: a JSON file with one receipt, or the array `tunenet console receipts
    /// --out` writes (then `--job` picks one when it holds several).
    receipt: PathBuf,
    /// The job whose receipt to check, when the file holds several.
    #[arg(long)]
    job: Option<String>,
    /// The base model's directory (Hugging Face layout), as the job named it.
    #[arg(long)]
    base: PathBuf,
    /// The artifact that was submitted (its blake3 must be the receipt's).
    #[arg(long)]
    artifact: PathBuf,
    /// The published test split (JSON lines); default: downloaded from --validator by the
    /// id the receipt names.
    #[arg(long)]
    test: Option<PathBuf>,
    /// The published synthetic set, likewise.
    #[arg(long)]
    synthetic: Option<PathBuf>,
    /// The validator's gRPC URL, to download the published sets from.
    #[arg(long, env = "TUNENET_VALIDATOR")]
    validator: Option<String>,
    /// Largest difference per record (mean nats per token) that still agrees.
    #[arg(long, default_value_t = tunenet_node::receipts::DEFAULT_TOLERANCE)]
    tolerance: f64,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Reads a set from `path`, or downloads blob `id` from the validator.
fn published_set(
    path: Option<&Path>,
    id: tunenet_types::BlobId,
    validator: Option<&str>,
    what: &str,
) -> anyhow::Result<Vec<u8>> {
    if let Some(p) = path {
        return std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    }
    let Some(url) = validator else {
        anyhow::bail!(
            "give the {what} (--{what}) or the validator to download it from (--validator)"
        );
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bytes = rt
        .block_on(async {
            let mut c = tunenet_rpc::ValidatorClient::connect(url).await?;
            let mut buf = Vec::new();
            c.download(id, 0, 1 << 30, &mut |b: &[u8]| {
                buf.extend_from_slice(b);
                Ok(())
            })
            .await?;
            Ok::<_, tunenet_rpc::RpcError>(buf)
        })
        .with_context(|| {
            format!("cannot download the {what} {id} from {url} (is the competition finished?)")
        })?;
    anyhow::ensure!(
        tunenet_types::BlobId::of(&bytes) == id,
        "the validator sent a {what} whose blake3 is not {id}"
    );
    Ok(bytes)
}

pub fn verify_receipt(a: VerifyReceiptArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.receipt)
        .with_context(|| format!("cannot read {}", a.receipt.display()))?;
    let all: Vec<tunenet_types::EvaluationReceipt> = match serde_json::from_str(&text) {
        Ok(one) => vec![one],
        Err(_) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not an evaluation receipt or a list of them",
                a.receipt.display()
            )
        })?,
    };
    let mut picked: Vec<_> = all
        .into_iter()
        .filter(|r| a.job.as_deref().is_none_or(|j| r.job_id.as_str() == j))
        .collect();
    let receipt = match picked.len() {
        1 => picked.remove(0),
        0 => anyhow::bail!("{}: no receipt for that job", a.receipt.display()),
        n => anyhow::bail!(
            "{} holds {n} receipts: pick one with --job",
            a.receipt.display()
        ),
    };
    let test = published_set(
        a.test.as_deref(),
        receipt.test_split,
        a.validator.as_deref(),
        "test",
    )?;
    let synthetic = match receipt.synthetic_set {
        Some(id) => Some(published_set(
            a.synthetic.as_deref(),
            id,
            a.validator.as_deref(),
            "synthetic",
        )?),
        None => None,
    };
    let base = tunenet_ml::ModelDir::open(&a.base)?;
    let device = tunenet_ml::parse_device(&a.device)?;
    let v = tunenet_node::receipts::verify(
        &receipt,
        &base,
        &a.artifact,
        &test,
        synthetic.as_deref(),
        &[device],
        a.tolerance,
    )
    .map_err(|e| anyhow::anyhow!("receipt for job {} does not hold: {e}", receipt.job_id))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "job {} miner {} validator {}: signature ok, per-record losses match the signed root",
            receipt.job_id, receipt.miner, receipt.validator
        );
        println!("{}", v.summary());
    }
    anyhow::ensure!(v.agrees(), "the recomputation disagrees with the receipt");
    Ok(())
}
