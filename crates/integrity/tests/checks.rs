//! The per-artifact checks on real artifacts trained on the tiny model: honest ones pass,
//! each tampered one fails the check that should catch it, with the reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tunenet_integrity::{ArtifactReport, check_artifact, cosine};
use tunenet_ml::{Device, Method, ModelDir, TrainConfig};
use tunenet_types::{HparamBounds, IntegritySettings, Outcome};

fn train(model: &ModelDir, method: Method, seed: u64, out: &Path) -> PathBuf {
    let records = tunenet_ml::demo_dataset(120, seed);
    let cfg = TrainConfig {
        method,
        max_steps: 25,
        learning_rate: 3e-3,
        max_seq_len: 64,
        seed,
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    tunenet_ml::train(
        model,
        &records,
        &cfg,
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        out,
    )
    .unwrap()
    .artifact
}

/// Rewrites an artifact's tensors (keeping its manifest) through `f(name, values)`.
fn rewrite(src: &Path, dst: &Path, mut f: impl FnMut(&str, &mut Vec<f32>)) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        f(&name, &mut v);
        data.push((
            name,
            view.shape().to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta.metadata().clone(), dst).unwrap();
}

fn outcome(r: &ArtifactReport, check: &str) -> Outcome {
    r.verdicts
        .iter()
        .find(|v| v.check == check)
        .map(|v| v.outcome)
        .unwrap_or_else(|| panic!("no `{check}` verdict: {r:?}"))
}

fn reason(r: &ArtifactReport, check: &str) -> String {
    r.verdicts
        .iter()
        .find(|v| v.check == check)
        .map(|v| v.reason.clone())
        .unwrap_or_default()
}

#[test]
fn honest_artifacts_pass_and_each_cheat_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tunenet_ml::init_tiny(&root.join("base"), 1).unwrap();
    let base = ModelDir::open(&root.join("base")).unwrap();
    let bounds = HparamBounds {
        max_lora_rank: 16,
        ..HparamBounds::default()
    };
    let s = IntegritySettings::default();
    let check = |p: &Path, b: &HparamBounds| check_artifact(&base, p, b, &s).unwrap();

    // Honest: LoRA at two seeds and ranks, and full fine-tuning.
    let lora_a = train(
        &base,
        Method::Lora {
            rank: 8,
            alpha: 16.0,
        },
        1,
        &root.join("la"),
    );
    let lora_b = train(
        &base,
        Method::Lora {
            rank: 4,
            alpha: 8.0,
        },
        2,
        &root.join("lb"),
    );
    let full = train(&base, Method::Full, 3, &root.join("f"));
    let (ra, rb, rf) = (
        check(&lora_a, &bounds),
        check(&lora_b, &bounds),
        check(&full, &bounds),
    );
    for r in [&ra, &rb, &rf] {
        assert!(!r.failed(), "an honest artifact failed: {r:?}");
    }
    assert!(
        cosine(&ra.sketch, &rb.sketch) < s.near_duplicate_cosine,
        "two honest miners look alike"
    );

    // A rank above the job's bound.
    let tight = HparamBounds {
        max_lora_rank: 4,
        ..bounds.clone()
    };
    let r = check(&lora_a, &tight);
    assert_eq!(outcome(&r, "lora_rank"), Outcome::Fail);
    assert!(reason(&r, "lora_rank").contains("above the job's bound 4"));

    // Full fine-tuning where the job forbids it.
    let no_full = HparamBounds {
        allow_full: false,
        ..bounds.clone()
    };
    assert_eq!(outcome(&check(&full, &no_full), "method"), Outcome::Fail);

    // NaN weights.
    let nan = root.join("nan.safetensors");
    let mut done = false;
    rewrite(&full, &nan, |_, v| {
        if !done {
            v[0] = f32::NAN;
            done = true;
        }
    });
    let r = check(&nan, &bounds);
    assert_eq!(outcome(&r, "finite"), Outcome::Fail, "{r:?}");

    // Exploding norms.
    let big = root.join("big.safetensors");
    rewrite(&full, &big, |n, v| {
        if n.ends_with("mlp.down_proj.weight") {
            v.iter_mut().for_each(|x| *x *= 50.0);
        }
    });
    let r = check(&big, &bounds);
    assert_eq!(outcome(&r, "delta_norm"), Outcome::Fail, "{r:?}");
    assert!(reason(&r, "delta_norm").contains("exploded"));

    // The base returned unchanged, dressed as a full fine-tune.
    let base_w = candle_core::safetensors::load(
        base.path.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let same = root.join("same.safetensors");
    rewrite(&full, &same, |n, v| {
        *v = base_w[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    });
    let r = check(&same, &bounds);
    assert_eq!(outcome(&r, "fine_tuned"), Outcome::Fail, "{r:?}");

    // Another random initialisation with the same config.
    tunenet_ml::init_tiny(&root.join("other"), 99).unwrap();
    let other_w = candle_core::safetensors::load(
        root.join("other/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let foreign = root.join("foreign.safetensors");
    rewrite(&full, &foreign, |n, v| {
        *v = other_w[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    });
    let r = check(&foreign, &bounds);
    assert_eq!(
        outcome(&r, "base_similarity_median"),
        Outcome::Fail,
        "{r:?}"
    );
    assert!(reason(&r, "base_similarity_median").contains("not the base model"));

    // A copy with a little noise: its sketch is a near duplicate of the original's.
    let noisy = root.join("noisy.safetensors");
    let mut k = 0u32;
    rewrite(&lora_a, &noisy, |_, v| {
        for x in v.iter_mut() {
            k = k.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *x += (k >> 9) as f32 / (1u32 << 23) as f32 * 1e-3 - 5e-4;
        }
    });
    let rn = check(&noisy, &bounds);
    assert!(!rn.failed());
    assert!(
        cosine(&ra.sketch, &rn.sketch) > s.near_duplicate_cosine,
        "{}",
        cosine(&ra.sketch, &rn.sketch)
    );

    // Garbage is a failed verdict, not a crash.
    let junk = root.join("junk.safetensors");
    std::fs::write(&junk, b"not an artifact").unwrap();
    assert_eq!(outcome(&check(&junk, &bounds), "manifest"), Outcome::Fail);
}
