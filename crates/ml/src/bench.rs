//! Throughput measurement on fixed-length sequences: training steps (LoRA or full) and
//! evaluation forward passes, warm-up excluded. Used by `tunenet model bench` and
//! `scripts/bench-ml.sh`.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::Record;
use crate::error::MlError;
use crate::lm::CausalLm;
use crate::loader::WeightDtype;
use crate::model_dir::ModelDir;
use crate::train::{Method, Progress, TrainConfig, train};

/// Text repeated until every benchmark sequence is truncated to exactly `seq` tokens.
pub const BENCH_TEXT: &str = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill and the birds sing in the old oak tree. ";

/// One throughput measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchResult {
    /// `lora`, `full` or `eval`.
    pub mode: String,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence (the model sees `seq - 1` inputs).
    pub seq: usize,
    /// Timed steps.
    pub steps: usize,
    /// Input tokens per second over the timed steps.
    pub tokens_per_sec: f64,
    /// Seconds of the timed steps.
    pub seconds: f64,
    /// Precision of the base weights (`f32`, `bf16`, `f16`).
    #[serde(default)]
    pub dtype: String,
    /// The model's parameters.
    #[serde(default)]
    pub params: u64,
    /// Matrix-multiply work per token by the usual estimate (attention's own products
    /// left out): 2 x params for evaluation, 4 x params for LoRA training (forward, and
    /// backward through activations only), 6 x params for full fine-tuning.
    #[serde(default)]
    pub flops_per_token: f64,
    /// `tokens_per_sec x flops_per_token`, in TFLOPS: divide by the device's peak for the
    /// model FLOPs utilisation (MFU).
    #[serde(default)]
    pub model_tflops: f64,
}

/// What [`bench_throughput`] measures.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec<'a> {
    /// `lora`, `full` or `eval`.
    pub mode: &'a str,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps.
    pub steps: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Precision of the base weights.
    pub dtype: WeightDtype,
}

/// Times `steps` training steps (`mode` "lora" with rank `rank` on q/v, or "full"; AdamW)
/// or evaluation passes ("eval": forward and mean loss) of `batch_size` sequences of `seq`
/// tokens of [`BENCH_TEXT`], after one untimed warm-up step.
pub fn bench_throughput(
    model: &ModelDir,
    spec: &BenchSpec<'_>,
    device: &Device,
) -> Result<BenchResult, MlError> {
    let BenchSpec {
        mode,
        batch_size,
        seq,
        steps,
        rank,
        dtype,
    } = *spec;
    if steps == 0 || batch_size == 0 || seq < 2 {
        return Err(MlError::Invalid(
            "benchmark needs steps >= 1, batch_size >= 1 and seq >= 2".into(),
        ));
    }
    let text = BENCH_TEXT.repeat(seq / 8 + 4);
    let (tokens_per_sec, seconds) = if mode == "eval" {
        let lm = CausalLm::load(model, None, dtype, device)?;
        let mut ids: Vec<u32> = lm.config().bos_token_id.into_iter().collect();
        ids.extend(lm.tokenizer().encode(&text)?);
        ids.truncate(seq);
        if ids.len() < seq {
            return Err(MlError::Invalid(format!(
                "benchmark text is too short for seq {seq}"
            )));
        }
        let batch = vec![ids; batch_size];
        lm.mean_nll(&batch)?;
        let t = Instant::now();
        for _ in 0..steps {
            lm.mean_nll(&batch)?;
        }
        let secs = t.elapsed().as_secs_f64();
        ((steps * batch_size * (seq - 1)) as f64 / secs, secs)
    } else {
        let method = match mode {
            "lora" => Method::Lora {
                rank,
                alpha: 2.0 * rank as f64,
            },
            "full" => Method::Full,
            other => {
                return Err(MlError::Invalid(format!(
                    "unknown benchmark mode {other:?}: use lora, full or eval"
                )));
            }
        };
        let records: Vec<Record> = (0..batch_size)
            .map(|_| Record::Text { text: text.clone() })
            .collect();
        let cfg = TrainConfig {
            method,
            learning_rate: 1e-4,
            max_steps: steps + 1,
            batch_size,
            max_seq_len: seq,
            checkpoint_every_secs: 0.0,
            dtype,
            ..Default::default()
        };
        let out = std::env::temp_dir().join(format!("tunenet-bench-{}", std::process::id()));
        let mut first: Option<(Instant, u64)> = None;
        let mut last: Option<(Instant, u64)> = None;
        let cancel = AtomicBool::new(false);
        let mut progress = |p: &Progress| {
            if p.step == 1 {
                first = Some((Instant::now(), p.tokens));
            }
            last = Some((Instant::now(), p.tokens));
        };
        let r = train(
            model,
            &records,
            &cfg,
            None,
            Duration::ZERO,
            device,
            &cancel,
            &mut progress,
            &out,
        );
        let _ = std::fs::remove_dir_all(&out);
        r?;
        let (Some((t0, n0)), Some((t1, n1))) = (first, last) else {
            return Err(MlError::Invalid("no training step ran".into()));
        };
        let secs = (t1 - t0).as_secs_f64();
        ((n1 - n0) as f64 / secs, secs)
    };
    let params = model.config()?.param_count();
    let flops_per_token = params as f64
        * match mode {
            "eval" => 2.0,
            "lora" => 4.0,
            _ => 6.0,
        };
    Ok(BenchResult {
        mode: mode.to_string(),
        batch_size,
        seq,
        steps,
        tokens_per_sec,
        seconds,
        dtype: format!("{:?}", dtype.resolve(device)).to_lowercase(),
        params,
        flops_per_token,
        model_tflops: tokens_per_sec * flops_per_token / 1e12,
    })
}

/// The rate, in GFLOP/s over about `seconds` of repetitions, of the matrix product a linear
/// layer runs on the CPU, for `w` `[n, k]` in f32 and random values: forward, `x wᵀ` for
/// `x` `[m, k]`; or `backward`, `g w` for `g` `[m, n]` (the gradient its input gets when
/// `w` is frozen, as in LoRA training). `packed`: tunenet's product on a weight packed once
/// (what evaluation and LoRA training use where the CPU has AVX2 and FMA); otherwise
/// candle's matmul on the weight as stored.
pub fn bench_linear_product(
    m: usize,
    k: usize,
    n: usize,
    packed: bool,
    backward: bool,
    seconds: f64,
) -> Result<f64, MlError> {
    use crate::error::CandleContext;
    let dev = Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1.0, (m, if backward { n } else { k }), &dev)
        .ctx("making x")?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (n, k), &dev).ctx("making w")?;
    let run: Box<dyn Fn() -> Result<(), MlError>> = if packed {
        if !crate::pgemm::available() {
            return Err(MlError::Invalid(
                "the packed product needs an x86-64 CPU with AVX2 and FMA".into(),
            ));
        }
        let wv = w
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx("reading w")?;
        let xv = x
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ctx("reading x")?;
        let pw = crate::pgemm::PackedWeight::pack(&wv, n, k);
        Box::new(move || {
            std::hint::black_box(if backward {
                pw.matmul_t(&xv, m)
            } else {
                pw.matmul(&xv, m)
            });
            Ok(())
        })
    } else {
        Box::new(move || {
            let y = if backward {
                x.matmul(&w)
            } else {
                w.t().and_then(|wt| x.matmul(&wt))
            };
            std::hint::black_box(y.ctx("matmul")?);
            Ok(())
        })
    };
    run()?;
    let (mut reps, start) = (0u32, Instant::now());
    while reps < 3 || start.elapsed().as_secs_f64() < seconds {
        run()?;
        reps += 1;
    }
    Ok(2.0 * (m * k * n) as f64 * f64::from(reps) / start.elapsed().as_secs_f64() / 1e9)
}
