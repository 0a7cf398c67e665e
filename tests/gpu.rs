//! Tests that need an NVIDIA GPU: built with `--features cuda` (`scripts/gpu-check.sh`
//! runs them). Without the feature this binary holds one test that says so; with it and
//! no usable GPU, each test says why it did not run and passes, so a build machine without
//! a GPU can still compile and run the binary.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_need_the_cuda_feature() {
    eprintln!("the GPU tests run with `--features cuda` (scripts/gpu-check.sh)");
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use tunenet_hw::bench::{self, Challenge, Dtype, Spec};
    use tunenet_ml::{Device, ModelDir, TrainConfig, WeightDtype};

    /// `cuda:i`, or None (with the reason printed) when there is no such device.
    fn gpu(i: usize) -> Option<Device> {
        match tunenet_ml::parse_device(&format!("cuda:{i}")) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: no cuda:{i} ({e})");
                None
            }
        }
    }

    fn tiny(root: &Path) -> (ModelDir, Vec<tunenet_ml::Record>) {
        let dir = root.join("model");
        tunenet_ml::init_tiny(&dir, 3).unwrap();
        (
            ModelDir::open(&dir).unwrap(),
            tunenet_ml::demo_dataset(64, 4),
        )
    }

    fn train_on(
        model: &ModelDir,
        records: &[tunenet_ml::Record],
        device: &Device,
        out: &Path,
    ) -> tunenet_ml::TrainReport {
        let cfg = TrainConfig {
            max_steps: 8,
            batch_size: 4,
            max_seq_len: 64,
            seed: 11,
            dtype: WeightDtype::F32,
            checkpoint_every_secs: 0.0,
            ..Default::default()
        };
        tunenet_ml::train(
            model,
            records,
            &cfg,
            None,
            Duration::ZERO,
            device,
            &AtomicBool::new(false),
            &mut |_| {},
            out,
        )
        .unwrap()
    }

    #[test]
    fn training_on_the_gpu_matches_the_cpu_on_the_same_seed() {
        let Some(dev) = gpu(0) else { return };
        let tmp = tempfile::tempdir().unwrap();
        let (model, records) = tiny(tmp.path());
        let on_cpu = train_on(&model, &records, &Device::Cpu, &tmp.path().join("cpu"));
        let on_gpu = train_on(&model, &records, &dev, &tmp.path().join("gpu"));
        assert_eq!(on_cpu.steps, on_gpu.steps);
        let (a, b) = (on_cpu.final_loss as f64, on_gpu.final_loss as f64);
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "cpu {a}, gpu {b}");
        // Both adapters scored on the CPU: the same weights within float tolerance.
        let score = |artifact: &Path| {
            tunenet_ml::evaluate(&model, Some(artifact), &records, 64, 8, &Device::Cpu)
                .unwrap()
                .mean_loss
        };
        let (a, b) = (score(&on_cpu.artifact), score(&on_gpu.artifact));
        assert!((a - b).abs() <= 1e-3, "cpu-trained {a}, gpu-trained {b}");
    }

    /// Every GPU `parse_device` opens, in order.
    fn all_gpus() -> Vec<Device> {
        (0..16)
            .map_while(|i| tunenet_ml::parse_device(&format!("cuda:{i}")).ok())
            .collect()
    }

    #[test]
    fn data_parallel_training_over_every_gpu_matches_one_gpu() {
        let devices = all_gpus();
        if devices.len() < 2 {
            eprintln!(
                "skipped: {} GPU(s); data parallelism needs 2",
                devices.len()
            );
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (model, records) = tiny(tmp.path());
        let cfg = TrainConfig {
            max_steps: 8,
            batch_size: 8,
            max_seq_len: 64,
            seed: 11,
            dtype: WeightDtype::F32,
            checkpoint_every_secs: 0.0,
            ..Default::default()
        };
        let targets: Vec<String> = tunenet_ml::DEFAULT_LORA_TARGETS
            .iter()
            .map(|t| t.to_string())
            .collect();
        let run = |devices: &[Device],
                   collective: Option<std::sync::Arc<dyn tunenet_ml::Collective>>,
                   out: &str| {
            tunenet_ml::train_data_parallel(
                &model,
                &records,
                &cfg,
                &targets,
                None,
                Duration::ZERO,
                devices,
                collective,
                &AtomicBool::new(false),
                &mut |_| {},
                &tmp.path().join(out),
            )
            .unwrap()
        };
        let one = run(&devices[..1], None, "one");
        // The build's own choice (NCCL with the `nccl` feature), then threads explicitly.
        let all = run(&devices, None, "all");
        let threads = run(
            &devices,
            Some(std::sync::Arc::new(tunenet_ml::ThreadCollective::new(
                devices.len(),
            ))),
            "threads",
        );
        let score = |artifact: &Path| {
            tunenet_ml::evaluate(&model, Some(artifact), &records, 64, 8, &Device::Cpu)
                .unwrap()
                .mean_loss
        };
        let base = score(&one.artifact);
        for (name, r) in [("collective_for", &all), ("threads", &threads)] {
            assert_eq!(r.steps, one.steps, "{name}");
            assert_eq!(r.tokens, one.tokens, "{name}");
            let s = score(&r.artifact);
            assert!(
                (s - base).abs() <= 1e-3,
                "{}-way {name}: {s} against one GPU's {base}",
                devices.len()
            );
        }
    }

    #[test]
    fn a_model_split_over_every_gpu_scores_as_one_gpu() {
        let devices = all_gpus();
        if devices.len() < 2 {
            eprintln!(
                "skipped: {} GPU(s); tensor parallelism needs 2",
                devices.len()
            );
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (model, records) = tiny(tmp.path());
        // The tiny model's 4 heads split over 2 or 4 devices.
        let n = if devices.len() >= 4 { 4 } else { 2 };
        let one = tunenet_ml::evaluate(&model, None, &records, 64, 8, &devices[0])
            .unwrap()
            .mean_loss;
        let split = tunenet_ml::evaluate_on(&model, None, &records, 64, 8, &devices[..n])
            .unwrap()
            .mean_loss;
        assert!(
            (one - split).abs() <= 1e-4,
            "one GPU {one}, {n} GPUs {split}"
        );
    }

    #[test]
    fn evaluation_on_the_gpu_matches_the_cpu() {
        let Some(dev) = gpu(0) else { return };
        let tmp = tempfile::tempdir().unwrap();
        let (model, records) = tiny(tmp.path());
        let cpu = tunenet_ml::evaluate(&model, None, &records, 64, 8, &Device::Cpu)
            .unwrap()
            .mean_loss;
        let gpu = tunenet_ml::evaluate(&model, None, &records, 64, 8, &dev)
            .unwrap()
            .mean_loss;
        // The GPU scores in bf16 by default: within half a percent of f32.
        assert!((cpu - gpu).abs() <= 5e-3 * cpu, "cpu {cpu}, gpu {gpu}");
    }

    #[test]
    fn the_verified_benchmark_passes_on_every_gpu_in_each_dtype() {
        let inv = tunenet_hw::Inventory::collect();
        if inv.gpus.is_empty() {
            eprintln!(
                "skipped: NVML lists no GPU ({})",
                inv.nvml_error.unwrap_or_default()
            );
            return;
        }
        let mut rng = rand::rng();
        for g in &inv.gpus {
            let Some(dev) = gpu(g.index as usize) else {
                continue;
            };
            let cc: f64 = g.compute_capability.parse().unwrap_or(0.0);
            for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                if dtype == Dtype::Bf16 && cc < 8.0 {
                    continue; // candle builds bf16 kernels for 8.0 and newer only
                }
                let spec = Spec {
                    n: 4096,
                    k: 1,
                    tile: 32,
                    dtype,
                };
                let ch = Challenge {
                    seed: rand::Rng::random(&mut rng),
                    spec,
                    device: g.index,
                };
                // Once to warm up (kernels load), once timed.
                bench::compute(&ch, &dev).unwrap();
                let t = std::time::Instant::now();
                let computed = bench::compute(&ch, &dev).unwrap();
                let secs = t.elapsed().as_secs_f64();
                let reveal = bench::draw_reveal(&spec, 8, &mut rng);
                let opening = bench::open(&computed, &reveal).unwrap();
                bench::verify(&ch, &computed.roots(), &reveal, &opening)
                    .unwrap_or_else(|f| panic!("{} {dtype}: {f}", g.name));
                eprintln!(
                    "{} (cuda:{}) {dtype}: {:.2} TFLOPS verified (datasheet {:?})",
                    g.name,
                    g.index,
                    bench::tflops(&spec, secs),
                    bench::datasheet(&g.name)
                );
            }
        }
    }
}
