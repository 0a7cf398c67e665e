//! The inventory without a driver, and the benchmark's checks against honest and cheating
//! answers (the cheats over real daemons are in the workspace's tests/e2e.rs).

use candle_core::Device;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tunenet_hw::bench::{self, Challenge, Dtype, Failure, Spec};
use tunenet_hw::inventory::{GpuInfo, Inventory};

fn challenge(seed: u64, n: u32, k: u32, tile: u32, dtype: Dtype) -> Challenge {
    let mut rng = StdRng::seed_from_u64(seed);
    Challenge {
        seed: rng.random(),
        spec: Spec { n, k, tile, dtype },
        device: 0,
    }
}

fn round_trip(ch: &Challenge, c: &bench::Computed, seed: u64) -> Result<(), Failure> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xABCD);
    let reveal = bench::draw_reveal(&ch.spec, 8, &mut rng);
    let opening = bench::open(c, &reveal).expect("opens");
    bench::verify(ch, &c.roots(), &reveal, &opening)
}

#[test]
fn honest_answers_pass_fifty_seeded_runs_in_every_dtype() {
    let mut failures = Vec::new();
    for seed in 0..54u64 {
        let dtype = Dtype::ALL[seed as usize % 3];
        let n = [64, 96, 128][(seed / 3) as usize % 3];
        let ch = challenge(seed, n, 1 + (seed % 2) as u32, 16, dtype);
        let c = bench::compute(&ch, &Device::Cpu).expect("computes");
        if let Err(f) = round_trip(&ch, &c, seed) {
            failures.push(format!("seed {seed} ({dtype}, n {n}): {f}"));
        }
    }
    assert!(failures.is_empty(), "honest answers failed: {failures:#?}");
}

#[test]
fn large_honest_products_pass() {
    for dtype in Dtype::ALL {
        let ch = challenge(7, 512, 1, 64, dtype);
        let c = bench::compute(&ch, &Device::Cpu).unwrap();
        round_trip(&ch, &c, 7).unwrap();
    }
}

#[test]
fn a_random_product_fails_on_its_tiles() {
    let ch = challenge(1, 128, 1, 16, Dtype::F32);
    let honest = bench::compute(&ch, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let random: Vec<f32> = (0..128 * 128)
        .map(|_| rng.random_range(-40..40) as f32)
        .collect();
    let cheat = honest.with_product(0, random);
    let f = round_trip(&ch, &cheat, 1).unwrap_err();
    assert!(matches!(f, Failure::Tile { .. }), "{f}");
}

#[test]
fn computing_half_the_rows_is_caught_by_the_opened_tiles() {
    // Half of the tiles left at zero: 8 opened tiles all land on computed ones with
    // probability about 1/256; over 20 challenges none may pass.
    let mut passed = 0;
    for seed in 0..20u64 {
        let ch = challenge(100 + seed, 128, 1, 16, Dtype::F32);
        let honest = bench::compute(&ch, &Device::Cpu).unwrap();
        let mut c = honest.product(0).to_vec();
        for v in &mut c[64 * 128..] {
            *v = 0.0;
        }
        if round_trip(&ch, &honest.with_product(0, c), seed).is_ok() {
            passed += 1;
        }
    }
    assert_eq!(passed, 0, "half-computed answers passed");
}

#[test]
fn an_old_answer_replayed_against_a_new_seed_fails() {
    let old = challenge(5, 128, 1, 16, Dtype::F32);
    let new = challenge(6, 128, 1, 16, Dtype::F32);
    let computed = bench::compute(&old, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let reveal = bench::draw_reveal(&new.spec, 8, &mut rng);
    let opening = bench::open(&computed, &reveal).unwrap();
    let f = bench::verify(&new, &computed.roots(), &reveal, &opening).unwrap_err();
    assert!(matches!(f, Failure::Tile { .. }), "{f}");
}

#[test]
fn opened_tiles_that_do_not_match_the_commitment_fail() {
    let ch = challenge(8, 128, 2, 16, Dtype::F32);
    let c = bench::compute(&ch, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let reveal = bench::draw_reveal(&ch.spec, 8, &mut rng);
    // Honest tiles and products, but a commitment to something else.
    let opening = bench::open(&c, &reveal).unwrap();
    let mut roots = c.roots();
    roots[1][0] ^= 1;
    let f = bench::verify(&ch, &roots, &reveal, &opening).unwrap_err();
    assert_eq!(f.check(), "commitment", "{f}");
    // A changed tile value under the honest roots.
    let mut opening = bench::open(&c, &reveal).unwrap();
    opening.tiles[0].values[3] += 1.0;
    let f = bench::verify(&ch, &c.roots(), &reveal, &opening).unwrap_err();
    assert_eq!(f.check(), "commitment", "{f}");
}

#[test]
fn a_product_vector_from_a_wrong_commitment_fails_freivalds() {
    // One entry outside every opened tile is wrong, and C r is answered from it.
    let ch = challenge(12, 128, 1, 16, Dtype::F32);
    let honest = bench::compute(&ch, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(12 ^ 0xABCD);
    let reveal = bench::draw_reveal(&ch.spec, 8, &mut rng);
    let spare = (0..ch.spec.tiles_per_matrix())
        .find(|i| !reveal.tiles.iter().any(|t| t.index == *i))
        .unwrap();
    let (ti, tj) = (spare / 8, spare % 8);
    let mut c = honest.product(0).to_vec();
    c[(ti * 16) as usize * 128 + (tj * 16) as usize] += 1.0;
    let cheat = honest.with_product(0, c);
    let opening = bench::open(&cheat, &reveal).unwrap();
    let f = bench::verify(&ch, &cheat.roots(), &reveal, &opening).unwrap_err();
    assert_eq!(f.check(), "freivalds", "{f}");
}

#[test]
fn a_lower_precision_product_fails_a_higher_precision_challenge() {
    // TF32, bf16 or f16 tensor cores would be 8 to 16 times faster on an f32 challenge:
    // each input rounds, and the opened tiles miss by far more than the tolerance.
    for (asked, used) in [
        (Dtype::F32, Dtype::Bf16),
        (Dtype::F32, Dtype::F16),
        (Dtype::F16, Dtype::Bf16),
    ] {
        let ch = challenge(13, 256, 1, 32, asked);
        let cheap = bench::compute_in(&ch, &Device::Cpu, used).unwrap();
        let f = round_trip(&ch, &cheap, 2).unwrap_err();
        assert_eq!(f.check(), "tile", "{asked} computed in {used}: {f}");
    }
}

#[test]
fn malformed_answers_and_sizes_are_refused_with_the_reason() {
    let ch = challenge(14, 64, 1, 16, Dtype::F32);
    let c = bench::compute(&ch, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let reveal = bench::draw_reveal(&ch.spec, 4, &mut rng);
    let mut opening = bench::open(&c, &reveal).unwrap();
    opening.products[0].pop();
    let f = bench::verify(&ch, &c.roots(), &reveal, &opening).unwrap_err();
    assert!(matches!(f, Failure::Malformed(_)), "{f}");
    let bad = Spec {
        n: 100,
        k: 1,
        tile: 16,
        dtype: Dtype::F32,
    };
    assert!(bad.validate().unwrap_err().contains("must divide"));
    let big = Spec {
        n: 32768,
        k: 1,
        tile: 64,
        dtype: Dtype::F16,
    };
    assert!(big.validate().unwrap_err().contains("out of range"));
}

#[test]
fn generated_rows_match_entries_and_do_not_repeat() {
    let key = bench::matrix_key(&[3; 32], 0, 0, 0);
    for dtype in Dtype::ALL {
        let bits = dtype.bits();
        let mut row = vec![0i32; 101];
        bench::fill_row(key, bits, 7, &mut row);
        for (c, v) in row.iter().enumerate() {
            assert_eq!(*v, bench::entry(key, bits, 7, c as u32));
            assert!((-(1 << (bits - 1))..(1 << (bits - 1))).contains(v));
        }
    }
    let mut row = vec![0i32; 100];
    bench::fill_row(key, 24, 7, &mut row);
    let other = bench::matrix_key(&[3; 32], 1, 0, 0);
    let mut row2 = vec![0i32; 100];
    bench::fill_row(other, 24, 7, &mut row2);
    assert_ne!(row, row2, "another device's matrix must differ");
}

#[test]
fn datasheets_match_nvml_names_most_specific_first() {
    let f = |n: &str| bench::datasheet(n).map(|d| d.model);
    assert_eq!(f("NVIDIA A100-SXM4-80GB"), Some("A100"));
    assert_eq!(f("NVIDIA A10"), Some("A10"));
    assert_eq!(f("Tesla V100-SXM2-16GB"), Some("V100 SXM2"));
    assert_eq!(f("Tesla V100-PCIE-32GB"), Some("V100 PCIe"));
    assert_eq!(f("NVIDIA H100 PCIe"), Some("H100 PCIe"));
    assert_eq!(f("NVIDIA H100 80GB HBM3"), Some("H100 SXM"));
    assert_eq!(f("NVIDIA L40S"), Some("L40S"));
    assert_eq!(f("NVIDIA L4"), Some("L4"));
    assert_eq!(f("NVIDIA GeForce RTX 4090"), Some("RTX 4090"));
    assert_eq!(f("Some CPU"), None);
}

#[test]
fn without_an_nvidia_driver_the_inventory_lists_the_cpu_and_says_why_no_gpu() {
    let inv =
        Inventory::collect_with_nvml(Some(std::path::Path::new("/nonexistent/libnvidia-ml.so.1")));
    assert!(inv.gpus.is_empty());
    assert!(inv.cpu.logical_cores >= 1);
    assert!(!inv.cpu.model.is_empty());
    let why = inv.nvml_error.clone().expect("a reason");
    assert!(why.contains("no NVIDIA driver"), "{why}");
    let text = inv.render();
    assert!(
        text.contains("GPUs    none: no NVIDIA driver found"),
        "{text}"
    );
    assert!(inv.summary().contains("no NVIDIA GPU"));
    inv.validate().unwrap();
    let json = serde_json::to_string(&inv).unwrap();
    assert_eq!(serde_json::from_str::<Inventory>(&json).unwrap(), inv);
}

#[test]
fn inventories_from_others_are_bounded() {
    let mut inv = Inventory::default();
    inv.cpu.model = "x\u{7}".into();
    assert!(inv.validate().is_err());
    let inv = Inventory {
        gpus: vec![Default::default(); 65],
        ..Default::default()
    };
    assert!(inv.validate().unwrap_err().contains("65 GPUs"));
}

#[test]
fn free_memory_is_not_a_hardware_change_but_a_lost_gpu_is() {
    let gpu = |i: u32| GpuInfo {
        index: i,
        name: "NVIDIA A100-SXM4-80GB".into(),
        uuid: format!("GPU-{i}"),
        memory_total_bytes: 80 << 30,
        memory_free_bytes: 70 << 30,
        compute_capability: "8.0".into(),
        ..Default::default()
    };
    let before = Inventory {
        gpus: (0..4).map(gpu).collect(),
        memory_total_bytes: 512 << 30,
        memory_available_bytes: 400 << 30,
        ..Default::default()
    };
    let mut busy = before.clone();
    busy.memory_available_bytes = 100 << 30;
    busy.gpus[2].memory_free_bytes = 1 << 30;
    assert!(before.same_hardware(&busy));
    let mut lost = before.clone();
    lost.gpus.pop();
    assert!(!before.same_hardware(&lost));
    let mut swapped = before.clone();
    swapped.gpus[1].uuid = "GPU-other".into();
    assert!(!before.same_hardware(&swapped));
    let mut upgraded = before.clone();
    upgraded.driver_version = Some("560.35".into());
    assert!(!before.same_hardware(&upgraded));
}
