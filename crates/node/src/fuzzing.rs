//! Fuzz targets: one function per decoder of untrusted input, each taking raw bytes and
//! driving them through the same code a daemon runs on bytes from the network or disk.
//! A target may return errors (bad input is expected) but must never panic, hang or
//! allocate without bound. `fuzz/` wraps each in a libFuzzer target (`scripts/fuzz.sh`),
//! and the tests below run every seed and every input the fuzzer ever found through them,
//! so a fixed crash stays fixed in `cargo test`.
//!
//! Inputs that need a choice (which message, which format) take it from their first byte.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use tunenet_p2p::codec::WireMessage;
use tunenet_proto::v1;
use tunenet_types as t;

/// A fuzz target: bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by the name its `fuzz/fuzz_targets/<name>.rs` and corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("job_messages", job_messages),
    ("upload", upload),
    ("p2p_gossip", p2p_gossip),
    ("p2p_frames", p2p_frames),
    ("artifact", artifact),
    ("gguf", gguf),
    ("dataset", dataset),
    ("chat_template", chat_template),
    ("hellaswag", hellaswag),
    ("config", config),
    ("manifests", manifests),
];

/// Splits off the selector byte.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => (0, data),
    }
}

/// A scratch directory for this process (targets that must read from a path).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("tunenet-fuzz-")
            .tempdir()
            .expect("a scratch directory for fuzzing")
    })
    .path()
}

/// Writes `data` to a fresh file in the scratch directory.
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    let mut f = std::fs::File::create(&path).expect("a scratch file");
    f.write_all(data).expect("a scratch file written");
    path
}

/// Decodes `M` and converts it to the typed form: what a daemon does with every job
/// message it is sent over gRPC or p2p.
fn typed<M, T>(bytes: &[u8]) -> Option<T>
where
    M: Message + Default,
    T: TryFrom<M>,
{
    T::try_from(M::decode(bytes).ok()?).ok()
}

/// [`typed`], then `check` (the signature) on a message that converts, which must also
/// come back from the wire form unchanged (compared encoded, so a NaN equals itself).
fn round_trip<M, T>(bytes: &[u8], check: impl Fn(&T))
where
    M: Message + Default + From<T>,
    T: TryFrom<M> + Clone,
{
    let Some(v) = typed::<M, T>(bytes) else {
        return;
    };
    check(&v);
    let wire = M::from(v.clone()).encode_to_vec();
    let again = T::try_from(M::decode(&wire[..]).expect("our own encoding decodes"))
        .ok()
        .map(|a| M::from(a).encode_to_vec());
    assert_eq!(
        again.as_ref(),
        Some(&wire),
        "{} changed on the wire",
        std::any::type_name::<T>()
    );
}

/// Every job message of `proto/tunenet/v1/job.proto`, as the miner and validator daemons
/// decode them: prost, then the typed conversion, then the signature check; typed values
/// that convert must survive the trip back to the wire form and again.
pub fn job_messages(data: &[u8]) {
    let (which, bytes) = split(data);
    match which % 14 {
        0 => round_trip::<v1::Offer, t::Offer>(bytes, |o| {
            let _ = o.verify();
        }),
        1 => round_trip::<v1::Decision, t::DecisionReply>(bytes, |d| {
            let _ = d.verify(&t::PeerIdStr("12D3KooWvalidator".into()));
        }),
        2 => round_trip::<v1::Assignment, t::Assignment>(bytes, |a| {
            let _ = a.verify();
        }),
        3 => round_trip::<v1::Commitment, t::Commitment>(bytes, |c| {
            let _ = c.verify();
        }),
        4 => round_trip::<v1::Receipt, t::Receipt>(bytes, |r| {
            let _ = r.verify();
        }),
        5 => round_trip::<v1::UploadHeader, t::UploadHeader>(bytes, |_| {}),
        6 => round_trip::<v1::Leaderboard, t::Leaderboard>(bytes, |_| {}),
        7 => {
            if let Ok(b) = v1::BlobRequest::decode(bytes) {
                let _ = t::BlobId::from_slice(&b.id);
            }
        }
        8 => {
            if let Ok(inv) = v1::HardwareInventory::decode(bytes) {
                let _ = crate::hardware::inventory_from_pb(&inv);
            }
        }
        9 => {
            if let Ok(c) = v1::BenchmarkChallenge::decode(bytes) {
                let _ = crate::hardware::spec_of(&c);
                let _ = crate::hardware::challenge_signing_bytes(&c);
            }
        }
        10 => {
            if let Ok(c) = v1::BenchmarkCommitment::decode(bytes) {
                let _ = crate::hardware::commitment_signing_bytes(&c);
            }
        }
        11 => {
            if let Ok(o) = v1::BenchmarkOpening::decode(bytes) {
                for d in &o.devices {
                    let _ = crate::hardware::opening_from_pb(d);
                }
            }
        }
        12 => {
            let _ = v1::MinerStatus::decode(bytes);
            let _ = v1::BlobChunk::decode(bytes);
        }
        _ => {
            // The console's requests (an admin's client is still a client).
            let _ = tunenet_rpc::services::CompetitionSpec::decode(bytes);
            let _ = tunenet_rpc::services::MinerRegistration::decode(bytes);
            let _ = tunenet_rpc::services::TokenRequest::decode(bytes);
            let _ = tunenet_rpc::services::IntegrityChange::decode(bytes);
        }
    }
}

/// An upload stream as the validator's `UploadArtifact` receives it: a sequence of
/// length-prefixed `ArtifactChunk` messages (the header first, then data) into a real blob
/// store writer that keeps the bytes only if they hash to the header's artifact id.
pub fn upload(data: &[u8]) {
    static BLOBS: OnceLock<tunenet_store::BlobStore> = OnceLock::new();
    let blobs = BLOBS.get_or_init(|| {
        tunenet_store::BlobStore::open(&scratch().join("blobs")).expect("a blob store")
    });
    let mut messages = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        match v1::ArtifactChunk::decode(&rest[2..2 + len]) {
            Ok(m) => messages.push(m),
            Err(_) => return, // tonic refuses the stream at the first message that does not decode
        }
        rest = &rest[2 + len..];
    }
    let mut messages = messages.into_iter();
    let Ok(mut receiver) = tunenet_rpc::UploadReceiver::start(messages.next()) else {
        return;
    };
    // The daemon caps an upload at the job's model size; here at 1 MiB.
    let limit = receiver.header().size.min(1 << 20);
    let Ok(writer) = blobs.writer(Some(limit)) else {
        return;
    };
    let mut sink = crate::validator::upload_sink(writer, receiver.header().clone());
    for m in messages {
        match receiver.data(m) {
            Ok(bytes) => {
                if sink.write(&bytes).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    if receiver.end().is_err() {
        return;
    }
    if let Ok(result) = sink.finish() {
        let id = t::BlobId::from_slice(&result.artifact).expect("a stored id is 32 bytes");
        assert_eq!(id, receiver.header().artifact, "stored under another id");
        blobs.verify(&id).expect("a stored blob hashes to its name");
    }
}

/// A gossip message on each topic, checked as the libp2p event loop checks it before
/// anything is believed: size, decoding, freshness, signer and signature.
pub fn p2p_gossip(data: &[u8]) {
    let (which, bytes) = split(data);
    let topic = match which % 4 {
        0 => tunenet_p2p::ADVERT_TOPIC,
        1 => tunenet_p2p::COMPETITION_TOPIC,
        2 => tunenet_p2p::ARTIFACT_RECORD_TOPIC,
        _ => tunenet_p2p::SCORE_ATTESTATION_TOPIC,
    };
    let _ = tunenet_p2p::gossip::validate(
        topic,
        bytes,
        None,
        1_800_000_000_000,
        tunenet_p2p::gossip::MAX_CLOCK_SKEW_MS,
    );
    let _ = tunenet_p2p::gossip::decode_record(bytes);
    if let Ok(a) = tunenet_p2p::gossip::decode_attestation(bytes) {
        let _ = a.verify();
    }
}

/// Frames on the p2p request and stream protocols: a length-prefixed job request or
/// response (`/tunenet/job/1`), a blob range request and a blob manifest with a chunk
/// checked against it (`/tunenet/blob/1`, `/tunenet/blob-stream/1`).
pub fn p2p_frames(data: &[u8]) {
    use tunenet_p2p::messages::pb;
    let (which, bytes) = split(data);
    let max = tunenet_p2p::MAX_JOB_MESSAGE;
    let mut io = futures::io::Cursor::new(bytes);
    futures::executor::block_on(async {
        match which % 4 {
            0 => {
                if let Ok(m) =
                    tunenet_p2p::codec::read_frame::<pb::JobRequest, _>(&mut io, max).await
                {
                    let _ = tunenet_p2p::JobRequest::from_pb(m);
                }
            }
            1 => {
                if let Ok(m) =
                    tunenet_p2p::codec::read_frame::<pb::JobResponse, _>(&mut io, max).await
                {
                    let _ = tunenet_p2p::JobResponse::from_pb(m);
                }
            }
            2 => {
                if let Ok(r) =
                    tunenet_p2p::codec::read_frame::<pb::BlobRangeRequest, _>(&mut io, 256).await
                {
                    let _ = t::BlobId::from_slice(&r.id);
                    let _ = r.first.saturating_add(r.count);
                }
            }
            _ => {
                // A manifest, then a chunk: the fetcher believes a chunk only if it rebuilds
                // the chaining value the verified manifest names for it.
                let Ok(m) =
                    tunenet_p2p::codec::read_frame::<pb::BlobManifest, _>(&mut io, max).await
                else {
                    return;
                };
                let at = io.position() as usize;
                let chunk = &bytes[at.min(bytes.len())..];
                let id = t::BlobId::of(chunk);
                for claimed in [id, t::BlobId([7; 32])] {
                    if let Ok(man) = tunenet_p2p::chunks::Manifest::verify(&m, claimed, 1 << 30) {
                        for index in 0..man.chunks().min(4) {
                            let _ = man.check_chunk(index, chunk);
                        }
                    }
                }
            }
        }
    });
}

/// The tiny base model the artifact target checks against (made once per process).
fn tiny_base() -> &'static tunenet_ml::ModelDir {
    static BASE: OnceLock<tunenet_ml::ModelDir> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch().join("base");
        tunenet_ml::init_tiny(&dir, 1).expect("the tiny base model");
        tunenet_ml::ModelDir::open(&dir).expect("the tiny base model opens")
    })
}

/// A submitted artifact through every per-artifact integrity check, against the tiny
/// base; one that passes is then loaded onto the base and scored, as the validator does.
pub fn artifact(data: &[u8]) {
    let base = tiny_base();
    let path = scratch_file("artifact.safetensors", data);
    let bounds = t::HparamBounds::default();
    let settings = t::IntegritySettings::default();
    let report = tunenet_integrity::check_artifact(base, &path, &bounds, &settings)
        .expect("the base model is readable, so a bad artifact is a verdict, not an error");
    if !report.failed() {
        let record = tunenet_ml::Record::Text {
            text: "the capital of Freedonia is Fredville".into(),
        };
        let _ = tunenet_ml::evaluate(
            base,
            Some(&path),
            std::slice::from_ref(&record),
            32,
            1,
            &tunenet_ml::Device::Cpu,
        );
    }
}

/// A GGUF file imported into a Hugging Face layout model directory (`tunenet model import`).
pub fn gguf(data: &[u8]) {
    let path = scratch_file("model.gguf", data);
    let out = scratch().join("gguf-out");
    let _ = std::fs::remove_dir_all(&out);
    let _ = tunenet_ml::import_gguf(&path, &out);
}

/// A dataset in each format under each kind of field mapping, as a validator loads a
/// competition's dataset; records that load are rendered with the plain chat template.
pub fn dataset(data: &[u8]) {
    let (which, bytes) = split(data);
    let format = ["jsonl", "json", "csv", "parquet"][usize::from(which % 4)];
    let s = |v: &str| Some(v.to_string());
    let map = match (which / 4) % 4 {
        0 => tunenet_ml::FieldMap::default(),
        1 => tunenet_ml::FieldMap {
            system: s("system"),
            instruction: s("instruction"),
            input: s("input"),
            output: s("output"),
            ..Default::default()
        },
        2 => tunenet_ml::FieldMap {
            messages: s("messages"),
            ..Default::default()
        },
        _ => tunenet_ml::FieldMap {
            text: s("text"),
            ..Default::default()
        },
    };
    let parse = || tunenet_ml::parse_dataset(bytes, format, &map, "fuzz");
    // The Parquet reader's panics are caught and turned into an error (see
    // `tunenet_ml::parse_dataset`); libFuzzer's panic hook would abort before that.
    let parsed = if format == "parquet" {
        unwinding(parse)
    } else {
        parse()
    };
    if let Ok(load) = parsed {
        assert!(
            load.bad.len() <= load.bad_count,
            "more bad records listed than counted"
        );
        let chat = tunenet_ml::ChatTemplate::plain("<s>", "</s>");
        for turns in load.records.iter().take(8).filter_map(|r| r.turns()) {
            let _ = chat.segments(&turns);
        }
    }
}

/// Runs `f` with panics unwinding as they do in the daemons, not aborting at once as the
/// panic hook libFuzzer installs makes them: for code that catches a third-party decoder's
/// panics on purpose. A panic that escapes `f` still fails the run.
fn unwinding<R>(f: impl FnOnce() -> R) -> R {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A model's own chat template (from its `tokenizer_config.json`, which a hub model or an
/// operator supplies) compiled and rendered over a short conversation.
pub fn chat_template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    if let Ok(chat) = tunenet_ml::ChatTemplate::new(&source, "<s>", "</s>") {
        let turns = [
            tunenet_ml::Turn::new("system", "be brief"),
            tunenet_ml::Turn::new("user", "the capital of Freedonia?"),
            tunenet_ml::Turn::new("assistant", "Fredville"),
        ];
        let _ = chat.render(&turns, true);
        let _ = chat.segments(&turns);
    }
}

/// An inference shard (HellaSwag layout), as a miner reads the one a validator sends.
pub fn hellaswag(data: &[u8]) {
    let _ = crate::inference::parse_items(data);
    let _ = tunenet_ml::parse_hellaswag(data, "fuzz");
}

/// Daemon configs and competition specs, as `tunenet miner`/`validator` and the console
/// read them: parsed, then every competition validated.
pub fn config(data: &[u8]) {
    let (which, bytes) = split(data);
    let text = String::from_utf8_lossy(bytes);
    let path = Path::new("fuzz.toml");
    match which % 4 {
        0 => {
            let _ = crate::config::parse::<crate::config::MinerConfig>(path, &text);
        }
        1 => {
            if let Ok(v) = crate::config::parse::<crate::config::ValidatorConfig>(path, &text) {
                for c in &v.competitions {
                    let _ = c.validate();
                }
            }
        }
        2 => {
            let _ = crate::console::parse_spec("toml", &text);
        }
        _ => {
            let _ = crate::console::parse_spec("json", &text);
        }
    }
}

/// A model manifest (a validator's model list) and an inference submission (a miner's
/// answers), both read from other nodes.
pub fn manifests(data: &[u8]) {
    let _ = t::ModelManifest::parse(data);
    let _ = tunenet_integrity::inference::InferenceSubmission::parse(data);
}

#[cfg(test)]
mod tests {
    use super::TARGETS;
    use std::path::{Path, PathBuf};

    /// This crate's directory at run time (cargo sets it), not the one compiled in: a build
    /// cache shared between two checkouts can run a test binary built in the other.
    fn manifest_dir() -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
    }

    /// `fuzz/seeds/<target>` (real files each corpus starts from) and
    /// `fuzz/regressions/<target>` (every input the fuzzer found that crashed, hung or ran
    /// out of memory before its fix).
    fn inputs(target: &str) -> Vec<PathBuf> {
        let root = manifest_dir().join("../../fuzz");
        let mut out = Vec::new();
        for kind in ["seeds", "regressions"] {
            if let Ok(rd) = std::fs::read_dir(root.join(kind).join(target)) {
                out.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn every_seed_and_found_input_runs_clean() {
        let mut seen = 0;
        for (name, target) in TARGETS {
            let files = inputs(name);
            assert!(!files.is_empty(), "fuzz target {name} has no seeds");
            for f in files {
                let data = std::fs::read(&f).unwrap();
                let started = std::time::Instant::now();
                target(&data);
                assert!(
                    started.elapsed().as_secs() < 20,
                    "{} took {:?}",
                    f.display(),
                    started.elapsed()
                );
                seen += 1;
            }
        }
        assert!(seen >= TARGETS.len());
    }

    /// The seeds are inputs the decoders accept, so each corpus starts deep in its decoder
    /// (a seed that went stale after a format change would start it at the first check).
    #[test]
    fn seeds_are_inputs_the_decoders_accept() {
        use prost::Message;
        let root = manifest_dir().join("../../fuzz/seeds");
        let read = |t: &str, n: &str| std::fs::read(root.join(t).join(n)).unwrap();
        let body = |t: &str, n: &str| read(t, n)[1..].to_vec();
        let offer = tunenet_proto::v1::Offer::decode(&body("job_messages", "offer")[..]).unwrap();
        tunenet_types::Offer::try_from(offer)
            .unwrap()
            .verify()
            .unwrap();
        let receipt =
            tunenet_proto::v1::Receipt::decode(&body("job_messages", "receipt")[..]).unwrap();
        tunenet_types::Receipt::try_from(receipt)
            .unwrap()
            .verify()
            .unwrap();
        for name in ["lora", "full"] {
            let path = super::scratch_file(name, &read("artifact", name));
            let report = tunenet_integrity::check_artifact(
                super::tiny_base(),
                &path,
                &tunenet_types::HparamBounds::default(),
                &tunenet_types::IntegritySettings::default(),
            )
            .unwrap();
            assert!(!report.failed(), "{name}: {:?}", report.verdicts);
        }
        for name in ["tiny-f32", "tiny-q8_0"] {
            let path = super::scratch_file(name, &read("gguf", name));
            let out = tempfile::tempdir().unwrap();
            tunenet_ml::import_gguf(&path, out.path()).unwrap();
        }
        let hs = crate::inference::parse_items(&read("hellaswag", "two-items")).unwrap();
        assert_eq!(hs.len(), 2);
        for (name, format) in [
            ("shipped.jsonl", "jsonl"),
            ("alpaca.jsonl", "jsonl"),
            ("chat.json", "json"),
            ("alpaca.csv", "csv"),
            ("text.csv", "csv"),
            ("alpaca.parquet", "parquet"),
            ("text.parquet", "parquet"),
        ] {
            let data = read("dataset", name);
            let map = match data[0] / 4 % 4 {
                1 => tunenet_ml::FieldMap {
                    system: Some("system".into()),
                    instruction: Some("instruction".into()),
                    input: Some("input".into()),
                    output: Some("output".into()),
                    ..Default::default()
                },
                2 => tunenet_ml::FieldMap {
                    messages: Some("messages".into()),
                    ..Default::default()
                },
                3 => tunenet_ml::FieldMap {
                    text: Some("text".into()),
                    ..Default::default()
                },
                _ => tunenet_ml::FieldMap::default(),
            };
            assert_eq!(
                ["jsonl", "json", "csv", "parquet"][usize::from(data[0] % 4)],
                format
            );
            let load = tunenet_ml::parse_dataset(&data[1..], format, &map, name).unwrap();
            assert!(!load.records.is_empty() && load.bad_count == 0, "{name}");
        }
        let text = String::from_utf8(body("config", "spec.toml")).unwrap();
        crate::console::parse_spec("toml", &text).unwrap();
        let text = String::from_utf8(body("config", "validator.toml")).unwrap();
        crate::config::parse::<crate::config::ValidatorConfig>(Path::new("v.toml"), &text).unwrap();
        tunenet_types::ModelManifest::parse(&read("manifests", "model")).unwrap();
        tunenet_integrity::inference::InferenceSubmission::parse(&read(
            "manifests",
            "inference-submission",
        ))
        .unwrap();
    }

    /// Found by fuzzing: Parquet files whose metadata made the parquet crate panic
    /// (capacity overflow), ask for 7.8 GB (a list's element count taken from the file
    /// unchecked: where the allocation fails, the process aborts) or spend 12 s on 399
    /// bytes are refused with an error that says so, the last at the reader's deadline
    /// (2 s for a file this small), not when the reader gives up. (That file took 12 s in
    /// a debug build of the reader and takes milliseconds in an optimised one: its reads
    /// pause 50 ms each here, so it is past the deadline in any build.)
    #[test]
    fn parquet_files_that_crashed_the_reader_are_refused() {
        let root = manifest_dir().join("../../fuzz/regressions");
        for name in [
            "crash-9b59b77a40b5c10c0a201c81fb48446fb868d083",
            "oom-9e4273cbac33d8b16e73dbaabadac39146c18726",
            "timeout-6cb82cc2a44d644f3f9531d875339072e2b921ad",
        ] {
            let data = std::fs::read(root.join("dataset").join(name)).unwrap();
            let pause = if name.starts_with("timeout") { 50 } else { 0 };
            tunenet_ml::pause_parquet_reads_on_this_thread(std::time::Duration::from_millis(pause));
            let t0 = std::time::Instant::now();
            let err = tunenet_ml::parse_dataset(
                &data[1..],
                "parquet",
                &tunenet_ml::FieldMap::default(),
                "bad.parquet",
            )
            .unwrap_err()
            .to_string();
            tunenet_ml::pause_parquet_reads_on_this_thread(std::time::Duration::ZERO);
            assert!(err.contains("not a readable Parquet file"), "{name}: {err}");
            assert!(t0.elapsed().as_secs() < 8, "{name}: {:?}", t0.elapsed());
        }
    }

    /// Found by fuzzing (`gguf`, half a minute in): a GGUF naming a tensor whose dimensions
    /// multiply past `usize` made candle's element count overflow (a panic with overflow
    /// checks, a wrapped tiny size without). It is refused before any tensor is read (the
    /// overflow itself is `tunenet_ml`'s unit test; this file, minimised, is also cut short).
    #[test]
    fn a_gguf_whose_tensor_dimensions_overflow_is_refused() {
        let root = manifest_dir().join("../../fuzz/regressions/gguf");
        let mut seen = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            let out = tempfile::tempdir().unwrap();
            let err = tunenet_ml::import_gguf(&path, out.path())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tensor ")
                    && (err.contains("too many") || err.contains("past the end")),
                "{}: {err}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen > 0);
    }

    #[test]
    fn empty_and_tiny_inputs_are_refused_cleanly() {
        for (_, target) in TARGETS {
            for data in [&[][..], &[0], &[1, 0], &[255; 3]] {
                target(data);
            }
        }
    }

    /// Writes `fuzz/seeds/`: real messages, signed as the daemons sign them, and real
    /// files (a trained LoRA and a full artifact, GGUF exports, every dataset format, the
    /// shipped configs). Run after a wire format changes:
    /// `cargo test -p tunenet-node --lib fuzzing::tests::write_seeds -- --ignored`.
    #[test]
    #[ignore]
    fn write_seeds() {
        use prost::Message;
        use tunenet_proto::v1;
        use tunenet_types as t;
        let root = manifest_dir().join("../../fuzz/seeds");
        let put = |target: &str, name: &str, bytes: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        };
        let sel = |s: u8, m: &[u8]| [&[s][..], m].concat();
        let validator = t::Identity::generate();
        let miner = t::Identity::generate();
        let job = t::JobId::new("c1-job-0").unwrap();
        let blob = t::BlobId::of(b"model manifest");

        // Job messages.
        let mut offer = t::Offer {
            job_id: job.clone(),
            competition_id: t::CompetitionId::new("c1").unwrap(),
            kind: t::JobKind::FineTune,
            validator: validator.peer_id(),
            base_model: blob,
            base_params: 1_000_000,
            dataset_records: 64,
            time_budget_ms: 60_000,
            reward_hint: 1.0,
            hardware: "cpu".into(),
            reply_to: "http://127.0.0.1:7000".into(),
            model_config: r#"{"hidden_size": 64}"#.into(),
            inference: None,
            validator_key: vec![],
            signature: vec![],
        };
        offer.sign(&validator);
        put(
            "job_messages",
            "offer",
            &sel(0, &v1::Offer::from(offer.clone()).encode_to_vec()),
        );
        let mut inference = offer.clone();
        inference.kind = t::JobKind::Inference;
        inference.inference = Some(t::InferenceTerms::default());
        inference.sign(&validator);
        put(
            "job_messages",
            "offer-inference",
            &sel(0, &v1::Offer::from(inference).encode_to_vec()),
        );
        let accept = t::DecisionReply::signed(
            &miner,
            job.clone(),
            &validator.peer_id(),
            t::Decision::Accept,
        );
        put(
            "job_messages",
            "accept",
            &sel(1, &v1::Decision::from(accept).encode_to_vec()),
        );
        let reject = t::DecisionReply::unsigned(
            job.clone(),
            miner.peer_id(),
            t::Decision::Reject(t::RejectReason {
                code: t::RejectCode::Busy,
                detail: "busy".into(),
            }),
        );
        put(
            "job_messages",
            "reject",
            &sel(1, &v1::Decision::from(reject).encode_to_vec()),
        );
        let mut a = t::Assignment {
            job_id: job.clone(),
            competition_id: t::CompetitionId::new("c1").unwrap(),
            miner: miner.peer_id(),
            validator: validator.peer_id(),
            validator_key: validator.public_key_bytes(),
            nonce: [3; 32],
            base_model: blob,
            train_shard: t::BlobId::of(b"shard"),
            hparams: t::HparamBounds::default(),
            deadline_ms: 1_800_000_000_000,
            max_artifact_bytes: 1 << 30,
            signature: vec![],
        };
        a.signature = validator.sign(&a.signing_bytes());
        put(
            "job_messages",
            "assignment",
            &sel(2, &v1::Assignment::from(a).encode_to_vec()),
        );
        let mut c = t::Commitment {
            job_id: job.clone(),
            miner: miner.peer_id(),
            miner_key: miner.public_key_bytes(),
            commit: t::commit_hash(
                &t::BlobId::of(b"artifact"),
                &miner.peer_id(),
                &job,
                &[5; 32],
            ),
            artifact_size: 8,
            signature: vec![],
        };
        c.signature = miner.sign(&c.signing_bytes());
        put(
            "job_messages",
            "commitment",
            &sel(3, &v1::Commitment::from(c.clone()).encode_to_vec()),
        );
        let mut r = t::Receipt {
            job_id: job.clone(),
            miner: miner.peer_id(),
            commit: c.commit,
            received_at_ms: 1_800_000_000_000,
            validator: validator.peer_id(),
            validator_key: validator.public_key_bytes(),
            signature: vec![],
        };
        r.signature = validator.sign(&r.signing_bytes());
        put(
            "job_messages",
            "receipt",
            &sel(4, &v1::Receipt::from(r).encode_to_vec()),
        );
        let header = t::UploadHeader {
            job_id: job.clone(),
            miner: miner.peer_id(),
            artifact: t::BlobId::of(b"artifact"),
            size: 8,
            salt: [5; 32],
        };
        put(
            "job_messages",
            "upload-header",
            &sel(5, &v1::UploadHeader::from(header).encode_to_vec()),
        );
        let board = t::Leaderboard {
            competition_id: t::CompetitionId::new("c1").unwrap(),
            rows: vec![t::LeaderboardRow {
                rank: 1,
                miner: miner.peer_id(),
                jobs: 2,
                mean_loss: Some(1.5),
                mean_quality: 0.7,
                standing: 0.9,
                verdicts: vec!["pass".into()],
                acc_norm: None,
                seconds: None,
                quorum: None,
            }],
            jobs_done: 1,
            jobs_total: 2,
            kind: t::JobKind::FineTune,
        };
        put(
            "job_messages",
            "leaderboard",
            &sel(6, &v1::Leaderboard::from(board).encode_to_vec()),
        );
        put(
            "job_messages",
            "blob-request",
            &sel(
                7,
                &v1::BlobRequest {
                    id: blob.0.to_vec(),
                    offset: 0,
                }
                .encode_to_vec(),
            ),
        );
        let inv = crate::hardware::inventory_pb(&tunenet_hw::Inventory::collect());
        put("job_messages", "inventory", &sel(8, &inv.encode_to_vec()));
        let challenge = v1::BenchmarkChallenge {
            n: 256,
            k: 256,
            tile: 64,
            dtype: 0,
            ..Default::default()
        };
        put(
            "job_messages",
            "challenge",
            &sel(9, &challenge.encode_to_vec()),
        );

        // An upload: the header, then the bytes in two chunks (u16 length before each).
        let body = b"an artifact's bytes, in two chunks".to_vec();
        let frame = |m: v1::ArtifactChunk| {
            let b = m.encode_to_vec();
            [&(b.len() as u16).to_le_bytes()[..], &b].concat()
        };
        let up_header = t::UploadHeader {
            job_id: job.clone(),
            miner: miner.peer_id(),
            artifact: t::BlobId::of(&body),
            size: body.len() as u64,
            salt: [5; 32],
        };
        let mut stream = frame(v1::ArtifactChunk {
            part: Some(v1::artifact_chunk::Part::Header(up_header.into())),
        });
        for half in body.chunks(body.len() / 2 + 1) {
            stream.extend(frame(v1::ArtifactChunk {
                part: Some(v1::artifact_chunk::Part::Data(half.to_vec())),
            }));
        }
        put("upload", "two-chunks", &stream);

        // Gossip.
        let now = 1_800_000_000_000;
        let mut advert = tunenet_p2p::MinerAdvert {
            inventory: Some(inv.clone()),
            ..Default::default()
        };
        advert.sign(miner.keypair(), now);
        put("p2p_gossip", "advert", &sel(0, &advert.encode_to_vec()));
        let mut ann = tunenet_p2p::CompetitionAnnouncement {
            competition_id: "c1".into(),
            ..Default::default()
        };
        ann.sign(validator.keypair(), now);
        put("p2p_gossip", "announcement", &sel(1, &ann.encode_to_vec()));
        let standings = t::Leaderboard {
            competition_id: t::CompetitionId::new("c1").unwrap(),
            rows: vec![t::LeaderboardRow {
                rank: 1,
                miner: miner.peer_id(),
                jobs: 2,
                mean_loss: Some(1.25),
                mean_quality: 1.0,
                standing: 1.0,
                verdicts: vec![],
                acc_norm: None,
                seconds: None,
                quorum: None,
            }],
            jobs_done: 2,
            jobs_total: 2,
            kind: Default::default(),
        };
        let attestation = t::ScoreAttestation::of(&standings, &validator, now);
        put(
            "p2p_gossip",
            "attestation",
            &sel(3, &tunenet_p2p::gossip::encode_attestation(&attestation)),
        );

        // p2p frames: a 4-byte big-endian length, then the message.
        let p2p_frame = |m: &[u8]| [&(m.len() as u32).to_be_bytes()[..], m].concat();
        use tunenet_p2p::codec::WireMessage;
        let req = tunenet_p2p::JobRequest::Offer(offer.clone().into()).into_pb();
        put(
            "p2p_frames",
            "job-request",
            &sel(0, &p2p_frame(&req.encode_to_vec())),
        );
        let resp = tunenet_p2p::JobResponse::Refused("busy".into()).into_pb();
        put(
            "p2p_frames",
            "job-response",
            &sel(1, &p2p_frame(&resp.encode_to_vec())),
        );
        let range = tunenet_p2p::messages::pb::BlobRangeRequest {
            id: blob.0.to_vec(),
            first: 0,
            count: 4,
        };
        put(
            "p2p_frames",
            "range-request",
            &sel(2, &p2p_frame(&range.encode_to_vec())),
        );
        let chunk = b"one chunk of a small blob".to_vec();
        let scratch = tempfile::tempdir().unwrap();
        let chunk_file = scratch.path().join("blob");
        std::fs::write(&chunk_file, &chunk).unwrap();
        let manifest =
            tunenet_p2p::chunks::Manifest::of_file(&chunk_file, t::BlobId::of(&chunk)).unwrap();
        let mut m = p2p_frame(&manifest.to_pb().encode_to_vec());
        m.extend_from_slice(&chunk);
        put("p2p_frames", "manifest-and-chunk", &sel(3, &m));

        // Artifacts: a LoRA and a full fine-tune of the tiny model, two steps each.
        let base_dir = scratch.path().join("base");
        tunenet_ml::init_tiny(&base_dir, 1).unwrap();
        let base = tunenet_ml::ModelDir::open(&base_dir).unwrap();
        let records = tunenet_ml::demo_dataset(16, 1);
        for (name, method) in [
            (
                "lora",
                tunenet_ml::Method::Lora {
                    rank: 2,
                    alpha: 4.0,
                },
            ),
            ("full", tunenet_ml::Method::Full),
        ] {
            let cfg = tunenet_ml::TrainConfig {
                method,
                max_steps: 2,
                batch_size: 2,
                max_seq_len: 32,
                ..Default::default()
            };
            let out = scratch.path().join(name);
            tunenet_ml::train(
                &base,
                &records,
                &cfg,
                None,
                std::time::Duration::ZERO,
                &tunenet_ml::Device::Cpu,
                &std::sync::atomic::AtomicBool::new(false),
                &mut |_| {},
                &out,
            )
            .unwrap();
            put(
                "artifact",
                name,
                &std::fs::read(out.join("artifact.safetensors")).unwrap(),
            );
        }

        // GGUF: the tiny model exported dense and quantised.
        let g = scratch.path().join("tiny.gguf");
        tunenet_ml::export_gguf(&base, &g, "llama").unwrap();
        put("gguf", "tiny-f32", &std::fs::read(&g).unwrap());
        tunenet_ml::export_gguf_quantized(&base, &g, "llama", "q8_0").unwrap();
        put("gguf", "tiny-q8_0", &std::fs::read(&g).unwrap());

        // Datasets: the shipped records in each format, under each mapping.
        let shipped: Vec<&str> = std::str::from_utf8(tunenet_ml::SHIPPED_INSTRUCT_JSONL)
            .unwrap()
            .lines()
            .take(12)
            .collect();
        put(
            "dataset",
            "shipped.jsonl",
            &sel(0, shipped.join("\n").as_bytes()),
        );
        let alpaca = r#"{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
{"instruction": "Name a colour", "input": "", "output": "blue"}
"#;
        put("dataset", "alpaca.jsonl", &sel(4, alpaca.as_bytes()));
        let chat = r#"[{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]"#;
        put("dataset", "chat.json", &sel(9, chat.as_bytes()));
        let csv = "instruction,input,output,system\nAdd,\"2, and 3\",5,Be brief.\n\"Say \"\"hi\"\"\",,hi,\n";
        put("dataset", "alpaca.csv", &sel(6, csv.as_bytes()));
        put(
            "dataset",
            "text.csv",
            &sel(14, b"text\nplain words\n\"quoted, words\"\n"),
        );
        put(
            "dataset",
            "alpaca.parquet",
            &sel(7, &parquet_of(&[("instruction", "Add"), ("output", "5")])),
        );
        put(
            "dataset",
            "text.parquet",
            &sel(15, &parquet_of(&[("text", "plain words")])),
        );

        // Chat templates: the plain one and two models' own.
        put(
            "chat_template",
            "plain",
            tunenet_ml::PLAIN_TEMPLATE.as_bytes(),
        );
        put("chat_template", "chatml", b"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}");
        put("chat_template", "llama", b"{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] | trim }}<</SYS>>{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}");

        // HellaSwag shards.
        let item = r#"{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."], "label": "3"}"#;
        put(
            "hellaswag",
            "two-items",
            format!("{item}\n{item}\n").as_bytes(),
        );

        // Configs and specs: the shipped ones.
        put(
            "config",
            "miner.toml",
            &sel(0, include_bytes!("../../../deploy/miner.toml")),
        );
        put(
            "config",
            "validator.toml",
            &sel(1, include_bytes!("../../../deploy/validator.toml")),
        );
        let competition = crate::config::parse::<crate::config::ValidatorConfig>(
            std::path::Path::new("validator.toml"),
            include_str!("../../../deploy/validator.toml"),
        )
        .unwrap()
        .competitions
        .into_iter()
        .next()
        .expect("deploy/validator.toml has a competition");
        let spec = tunenet_rpc::services::CompetitionSpec {
            format: "toml".into(),
            text: toml::to_string(&competition).unwrap(),
        };
        put(
            "job_messages",
            "console-spec",
            &sel(13, &spec.encode_to_vec()),
        );
        put(
            "config",
            "spec.toml",
            &sel(2, toml::to_string(&competition).unwrap().as_bytes()),
        );
        put(
            "config",
            "spec.json",
            &sel(3, serde_json::to_string(&competition).unwrap().as_bytes()),
        );

        // Manifests.
        let blobs = tunenet_store::BlobStore::open(&scratch.path().join("blobs")).unwrap();
        let (_, manifest) = crate::models::import_model_dir(&blobs, &base_dir).unwrap();
        put("manifests", "model", &manifest.to_bytes());
        let sub = tunenet_integrity::inference::InferenceSubmission {
            format: tunenet_integrity::inference::INFERENCE_FORMAT.into(),
            scores: vec![tunenet_ml::ItemScore {
                index: 0,
                logliks: vec![-3.0, -2.5, -4.0, -1.0],
                ending_tokens: vec![5, 6, 7, 8],
                ending_bytes: vec![10, 12, 14, 16],
                context_tokens: 20,
                pred: 3,
                pred_norm: 3,
            }],
            acc: 1.0,
            acc_norm: 1.0,
            reported_secs: 2.0,
            weights: "dense f32".into(),
        };
        put(
            "manifests",
            "inference-submission",
            &serde_json::to_vec(&sub).unwrap(),
        );
    }

    /// A one-row Parquet file of string columns.
    fn parquet_of(columns: &[(&str, &str)]) -> Vec<u8> {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use std::sync::Arc;
        let fields: String = columns
            .iter()
            .map(|(n, _)| format!("required binary {n} (UTF8);"))
            .collect();
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(&format!("message m {{ {fields} }}"))
                .unwrap(),
        );
        let props = Arc::new(parquet::file::properties::WriterProperties::builder().build());
        let mut out = Vec::new();
        let mut w =
            parquet::file::writer::SerializedFileWriter::new(&mut out, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut values = columns.iter();
        while let Some(mut col) = rg.next_column().unwrap() {
            let (_, v) = values.next().unwrap();
            col.typed::<ByteArrayType>()
                .write_batch(&[ByteArray::from(*v)], None, None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
        out
    }
}
