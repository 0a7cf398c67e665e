//! `tunenet hardware`: what this box has, and optionally the benchmark a validator would
//! send it, run and verified locally with both sides timed.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tunenet_hw::bench::{self, Challenge, Dtype, Spec};
use tunenet_hw::inventory::Inventory;

#[derive(clap::Args)]
pub struct HardwareArgs {
    /// Print the inventory (and the benchmark) as JSON.
    #[arg(long)]
    json: bool,
    /// Also run a benchmark challenge of this matrix side on `--device`, verify it as a
    /// validator would, and time both sides (e.g. 4096).
    #[arg(long, value_name = "N")]
    benchmark: Option<u32>,
    /// The benchmark's dtype: f32, bf16 or f16 (f32 on a CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Matrices per challenge.
    #[arg(long, default_value_t = 1)]
    k: u32,
    /// Side of a committed tile.
    #[arg(long, default_value_t = 32)]
    tile: u32,
    /// Tiles the validator opens per matrix.
    #[arg(long, default_value_t = 8)]
    open: u32,
    /// Where the miner side computes: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One local benchmark: the miner's compute and the validator's check, timed apart.
#[derive(serde::Serialize)]
struct LocalBenchmark {
    spec: Spec,
    device: String,
    compute_s: f64,
    tflops: f64,
    open_s: f64,
    verify_s: f64,
    verify_share_of_compute: f64,
    verified: bool,
    failure: Option<String>,
    /// The device's datasheet peak for this dtype (dense), where its model is known.
    datasheet_tflops: Option<f64>,
}

pub fn run(a: HardwareArgs) -> Result<()> {
    let inv = Inventory::collect();
    let bench = match a.benchmark {
        Some(n) => Some(local_benchmark(&a, n, &inv)?),
        None => None,
    };
    if a.json {
        let v = serde_json::json!({ "inventory": inv, "benchmark": bench });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", inv.render());
    if let Some(b) = bench {
        println!(
            "Benchmark  n {} x{} {} on {}: {:.3} s, {:.3} TFLOPS{}; the validator's check {:.3} s ({:.2} % of the compute); {}",
            b.spec.n,
            b.spec.k,
            b.spec.dtype,
            b.device,
            b.compute_s,
            b.tflops,
            match b.datasheet_tflops {
                Some(d) => format!(
                    " ({:.0} % of the datasheet's {d} TFLOPS)",
                    100.0 * b.tflops / d
                ),
                None => String::new(),
            },
            b.verify_s,
            100.0 * b.verify_share_of_compute,
            match &b.failure {
                None => "verified".to_string(),
                Some(f) => format!("FAILED: {f}"),
            }
        );
    }
    Ok(())
}

fn local_benchmark(a: &HardwareArgs, n: u32, inv: &Inventory) -> Result<LocalBenchmark> {
    let dtype = Dtype::parse(&a.dtype).map_err(anyhow::Error::msg)?;
    let spec = Spec {
        n,
        k: a.k,
        tile: a.tile,
        dtype,
    };
    if let Err(e) = spec.validate() {
        bail!("--benchmark {n}: {e}");
    }
    let device = tunenet_ml::parse_device(&a.device)?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let ch = Challenge {
        seed: rng.random(),
        spec,
        device: 0,
    };
    let t = Instant::now();
    let computed = bench::compute(&ch, &device).map_err(anyhow::Error::msg)?;
    let compute_s = t.elapsed().as_secs_f64();
    let reveal = bench::draw_reveal(&spec, a.open, &mut rng);
    let t = Instant::now();
    let opening = bench::open(&computed, &reveal).map_err(anyhow::Error::msg)?;
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let result = bench::verify(&ch, &computed.roots(), &reveal, &opening);
    let verify_s = t.elapsed().as_secs_f64();
    Ok(LocalBenchmark {
        spec,
        device: a.device.clone(),
        compute_s,
        tflops: bench::tflops(&spec, compute_s),
        open_s,
        verify_s,
        verify_share_of_compute: verify_s / compute_s,
        verified: result.is_ok(),
        failure: result.err().map(|f| f.to_string()),
        datasheet_tflops: a
            .device
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| inv.gpus.get(i))
            .and_then(|g| bench::datasheet(&g.name))
            .and_then(|d| match dtype {
                Dtype::F32 => Some(d.f32),
                Dtype::Bf16 => d.bf16,
                Dtype::F16 => Some(d.f16),
            }),
    })
}
