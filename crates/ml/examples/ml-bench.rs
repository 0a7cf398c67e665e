//! The tunenet side of scripts/bench-ml.sh, built from this crate alone so the benchmark
//! does not depend on the rest of the workspace:
//!
//!   ml-bench init OUT | ml-bench import GGUF OUT | ml-bench bench DIR MODE BATCH SEQ STEPS
//!   ml-bench gemm M K N
//!
//! `bench` prints one JSON object: the throughput and the process's peak resident memory.
//! `gemm` prints the rate of the matrix product a linear layer runs on the CPU, `x wᵀ` for
//! `x` `[M, K]` and `w` `[N, K]` in f32 (candle's matmul, as evaluation calls it), in
//! GFLOP/s over about two seconds of repetitions.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tunenet_ml::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str, String> {
        args.get(i).map(String::as_str).ok_or_else(|| {
            "usage: ml-bench init OUT | import GGUF OUT | bench DIR MODE BATCH SEQ STEPS | gemm M K N"
                .to_string()
        })
    };
    match arg(0)? {
        "init" => {
            tunenet_ml::init_tiny(Path::new(arg(1)?), 0)?;
        }
        "import" => {
            tunenet_ml::import_gguf(Path::new(arg(1)?), Path::new(arg(2)?))?;
        }
        "bench" => {
            let dir = tunenet_ml::ModelDir::open(Path::new(arg(1)?))?;
            let r = tunenet_ml::bench_throughput(
                &dir,
                &tunenet_ml::BenchSpec {
                    mode: arg(2)?,
                    batch_size: arg(3)?.parse()?,
                    seq: arg(4)?.parse()?,
                    steps: arg(5)?.parse()?,
                    rank: 8,
                    dtype: tunenet_ml::WeightDtype::F32,
                },
                &tunenet_ml::Device::Cpu,
            )?;
            let mut out = serde_json::to_value(&r)?;
            out["peak_rss_mib"] =
                serde_json::json!(tunenet_ml::peak_rss_bytes().map(|b| b as f64 / 1048576.0));
            println!("{out}");
        }
        "gemm" => {
            let (m, k, n): (usize, usize, usize) =
                (arg(1)?.parse()?, arg(2)?.parse()?, arg(3)?.parse()?);
            let dev = candle_core::Device::Cpu;
            let x = candle_core::Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = candle_core::Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let flops = 2.0 * (m * k * n) as f64;
            x.matmul(&w.t()?)?;
            let (mut reps, start) = (0u32, std::time::Instant::now());
            while reps < 3 || start.elapsed().as_secs_f64() < 2.0 {
                x.matmul(&w.t()?)?;
                reps += 1;
            }
            let gflops = flops * f64::from(reps) / start.elapsed().as_secs_f64() / 1e9;
            println!(
                "{}",
                serde_json::json!({ "m": m, "k": k, "n": n, "gflops": gflops })
            );
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
