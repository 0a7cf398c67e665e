//! The tunenet side of scripts/bench-ml.sh, built from this crate alone so the benchmark
//! does not depend on the rest of the workspace:
//!
//!   ml-bench init OUT | ml-bench import GGUF OUT | ml-bench bench DIR MODE BATCH SEQ STEPS
//!   ml-bench gemm M K N [packed|candle] [forward|backward]
//!
//! `bench` prints one JSON object: the throughput and the process's peak resident memory.
//! `gemm` prints the rate of the matrix product a linear layer runs on the CPU, `x wᵀ` for
//! `x` `[M, K]` and `w` `[N, K]` in f32, in GFLOP/s over about two seconds of repetitions:
//! tunenet's product on a packed weight (`packed`, the default: what evaluation runs on
//! an x86-64 CPU with AVX2 and FMA) or candle's matmul (`candle`); `backward` times the
//! product LoRA training's backward pass runs for a frozen weight instead, `g w` for `g`
//! `[M, N]`.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tunenet_ml::alloc::keep_freed_memory();
    tunenet_ml::threads::one_tensor_pool();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Result<&str, String> {
        args.get(i).map(String::as_str).ok_or_else(|| {
            "usage: ml-bench init OUT | import GGUF OUT | bench DIR MODE BATCH SEQ STEPS | gemm M K N [packed|candle] [forward|backward]"
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
            let packed = match args.get(4).map(String::as_str) {
                None | Some("packed") => true,
                Some("candle") => false,
                Some(other) => {
                    return Err(format!("unknown product {other:?}: packed or candle").into());
                }
            };
            let backward = match args.get(5).map(String::as_str) {
                None | Some("forward") => false,
                Some("backward") => true,
                Some(other) => {
                    return Err(format!("unknown pass {other:?}: forward or backward").into());
                }
            };
            let gflops = tunenet_ml::bench_linear_product(m, k, n, packed, backward, 2.0)?;
            println!(
                "{}",
                serde_json::json!({ "m": m, "k": k, "n": n, "backward": backward, "gflops": gflops })
            );
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
