//! End-to-end tests: the real hub client against the local test server, over real sockets,
//! into a real cache in a temporary directory.

use std::collections::BTreeMap;
use std::path::Path;

use tempfile::TempDir;
use tunenet_hub::testserver::{self, add_commit, commit_id, set_ref};
use tunenet_hub::{
    HubConfig, HubError, HubId, Pinned, RepoKind, fetch_dataset, fetch_model, fetch_pinned,
};

const MODEL: &str = "acme/tiny-llama";
const DATASET: &str = "acme/chat";

const CONFIG: &[u8] = br#"{"hidden_size": 8, "num_hidden_layers": 1}"#;
const TOKENIZER: &[u8] = br#"{"model": {"type": "BPE"}}"#;
const WEIGHTS: &[u8] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      not really safetensors";
const TRAIN: &[u8] = b"PAR1 train rows PAR1";
const TEST: &[u8] = b"PAR1 test rows PAR1";

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn model_id(rev: &str) -> HubId {
    HubId::parse(&format!("hf:{MODEL}@{rev}"), RepoKind::Model)
        .unwrap()
        .unwrap()
}

fn dataset_id(rev: &str) -> HubId {
    HubId::parse(&format!("hf:{DATASET}@{rev}"), RepoKind::Dataset)
        .unwrap()
        .unwrap()
}

/// A served root with a model repository (`main` → commit "m1") and a dataset repository
/// (`main` and `refs/convert/parquet` → commit "d1").
fn hub_root() -> TempDir {
    let root = TempDir::new().unwrap();
    let r = root.path();
    add_commit(
        r,
        RepoKind::Model,
        MODEL,
        &commit_id("m1"),
        &[
            ("config.json", CONFIG),
            ("tokenizer.json", TOKENIZER),
            ("model.safetensors", WEIGHTS),
            ("pytorch_model.bin", b"pickle"),
            ("model.onnx", b"onnx"),
            (".gitattributes", b"*.safetensors filter=lfs"),
            ("README.md", b"# tiny"),
        ],
    )
    .unwrap();
    set_ref(r, RepoKind::Model, MODEL, "main", &commit_id("m1")).unwrap();
    add_commit(
        r,
        RepoKind::Dataset,
        DATASET,
        &commit_id("d1"),
        &[
            ("data/train-00000-of-00001.parquet", TRAIN),
            ("data/test-00000-of-00001.parquet", TEST),
            ("README.md", b"# chat"),
            (".gitattributes", b""),
        ],
    )
    .unwrap();
    set_ref(r, RepoKind::Dataset, DATASET, "main", &commit_id("d1")).unwrap();
    set_ref(
        r,
        RepoKind::Dataset,
        DATASET,
        "refs/convert/parquet",
        &commit_id("d1"),
    )
    .unwrap();
    root
}

fn files(pairs: &[(&str, &[u8])]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(path, bytes)| (path.to_string(), blake3_hex(bytes)))
        .collect()
}

fn read_ref(cache: &Path, folder: &str, rev: &str) -> String {
    std::fs::read_to_string(cache.join(folder).join("refs").join(rev)).unwrap()
}

#[test]
fn model_is_fetched_into_the_cache_layout_and_pinned() {
    let root = hub_root();
    let (endpoint, server) = testserver::serve(root.path().to_path_buf());
    let cache = TempDir::new().unwrap();
    let cfg = HubConfig::new(&endpoint, cache.path());
    let m1 = commit_id("m1");

    let pin = fetch_model(&cfg, &model_id("main")).unwrap();
    assert_eq!(pin.commit, m1);
    assert_eq!(pin.id, model_id("main"));
    assert_eq!(
        pin.files,
        files(&[
            ("config.json", CONFIG),
            ("model.safetensors", WEIGHTS),
            ("tokenizer.json", TOKENIZER),
        ])
    );

    // The standard layout: refs/main → commit, snapshot links into blobs.
    let repo = cache.path().join("models--acme--tiny-llama");
    assert_eq!(pin.dir, repo.join("snapshots").join(&m1));
    assert_eq!(
        read_ref(cache.path(), "models--acme--tiny-llama", "main"),
        m1
    );
    assert!(
        !repo.join("refs").join(&m1).exists(),
        "no ref named after a commit"
    );
    for (path, bytes) in [
        ("config.json", CONFIG),
        ("model.safetensors", WEIGHTS),
        ("tokenizer.json", TOKENIZER),
    ] {
        let link = pin.dir.join(path);
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let blob = std::fs::canonicalize(&link).unwrap();
        assert_eq!(
            blob.parent().unwrap(),
            std::fs::canonicalize(repo.join("blobs")).unwrap()
        );
        assert_eq!(std::fs::read(&link).unwrap(), bytes);
        assert_eq!(pin.path(path).unwrap(), link);
    }
    for skipped in [
        "pytorch_model.bin",
        "model.onnx",
        ".gitattributes",
        "README.md",
    ] {
        assert!(!pin.dir.join(skipped).exists(), "{skipped} was fetched");
    }
    let resolves: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/resolve/"))
        .collect();
    assert!(
        resolves.iter().all(|r| r.path.contains(&m1)),
        "files are fetched by commit: {resolves:?}"
    );
    assert!(resolves.iter().all(|r| r.authorization.is_none()));

    // Online again: only the API is asked, nothing is downloaded twice.
    let before = server.requests().len();
    assert_eq!(fetch_model(&cfg, &model_id("main")).unwrap(), pin);
    let again = &server.requests()[before..];
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(
        again[0]
            .path
            .starts_with("/api/models/acme/tiny-llama/revision/main")
    );

    // Offline, with the server gone: the same pin, from the cache alone.
    drop(server);
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    assert_eq!(fetch_model(&offline, &model_id("main")).unwrap(), pin);
    assert_eq!(
        fetch_model(&offline, &model_id(&m1)).unwrap().files,
        pin.files
    );
    assert_eq!(fetch_pinned(&offline, &pin).unwrap(), pin);
    assert_eq!(
        fetch_model(&HubConfig::offline(cache.path()), &model_id("main")).unwrap(),
        pin
    );

    // And the pin survives serialization.
    let json = serde_json::to_string(&pin).unwrap();
    assert_eq!(serde_json::from_str::<Pinned>(&json).unwrap(), pin);
}

#[test]
fn dataset_is_fetched_by_split() {
    let root = hub_root();
    let (endpoint, _server) = testserver::serve(root.path().to_path_buf());
    let cache = TempDir::new().unwrap();
    let cfg = HubConfig::new(&endpoint, cache.path());
    let d1 = commit_id("d1");

    let all = fetch_dataset(&cfg, &dataset_id("main"), None).unwrap();
    assert_eq!(all.commit, d1);
    assert_eq!(
        all.files,
        files(&[
            ("data/test-00000-of-00001.parquet", TEST),
            ("data/train-00000-of-00001.parquet", TRAIN),
        ])
    );
    let repo = cache.path().join("datasets--acme--chat");
    assert_eq!(all.dir, repo.join("snapshots").join(&d1));
    assert_eq!(read_ref(cache.path(), "datasets--acme--chat", "main"), d1);
    assert_eq!(
        std::fs::read(all.dir.join("data/train-00000-of-00001.parquet")).unwrap(),
        TRAIN
    );
    assert!(!all.dir.join("README.md").exists());

    let train = fetch_dataset(&cfg, &dataset_id("main"), Some("train")).unwrap();
    assert_eq!(
        train.files,
        files(&[("data/train-00000-of-00001.parquet", TRAIN)])
    );

    // A revision with `/` in it (escaped on the wire, a nested ref file in the cache).
    let parquet = fetch_dataset(&cfg, &dataset_id("refs/convert/parquet"), Some("test")).unwrap();
    assert_eq!(parquet.commit, d1);
    assert_eq!(
        parquet.files,
        files(&[("data/test-00000-of-00001.parquet", TEST)])
    );
    assert_eq!(
        read_ref(cache.path(), "datasets--acme--chat", "refs/convert/parquet"),
        d1
    );

    // No such split: the error lists the repository's files.
    let err = fetch_dataset(&cfg, &dataset_id("main"), Some("validation")).unwrap_err();
    assert!(matches!(err, HubError::NoMatchingFiles { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("validation"), "{msg}");
    assert!(msg.contains("data/train-00000-of-00001.parquet"), "{msg}");
    assert!(msg.contains("README.md"), "{msg}");

    // Offline.
    let offline = HubConfig::offline(cache.path());
    assert_eq!(
        fetch_dataset(&offline, &dataset_id("main"), Some("test"))
            .unwrap()
            .files,
        files(&[("data/test-00000-of-00001.parquet", TEST)])
    );
    assert_eq!(
        fetch_dataset(&offline, &dataset_id("main"), None).unwrap(),
        all
    );
}

#[test]
fn unknown_repos_revisions_and_uncached_ids_are_clear_errors() {
    let root = hub_root();
    let (endpoint, _server) = testserver::serve(root.path().to_path_buf());
    let cache = TempDir::new().unwrap();
    let cfg = HubConfig::new(&endpoint, cache.path());

    let nope = HubId::parse("hf:acme/nope", RepoKind::Model)
        .unwrap()
        .unwrap();
    let err = fetch_model(&cfg, &nope).unwrap_err();
    assert!(
        matches!(err, HubError::NotFound { status: 404, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    for needle in [
        "acme/nope",
        "`main`",
        "does not exist or needs a token",
        "404",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }

    let err = fetch_model(&cfg, &model_id("v9")).unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains("acme/tiny-llama at revision `v9`"),
        "{err}"
    );

    // A model id fetched as a dataset is a different repository: unknown.
    let as_dataset = HubId::parse(&format!("hf:{MODEL}"), RepoKind::Dataset)
        .unwrap()
        .unwrap();
    assert!(matches!(
        fetch_dataset(&cfg, &as_dataset, None),
        Err(HubError::NotFound { .. })
    ));
    assert!(matches!(
        fetch_model(&cfg, &as_dataset),
        Err(HubError::WrongKind { .. })
    ));

    // A model repository without safetensors weights.
    add_commit(
        root.path(),
        RepoKind::Model,
        "acme/bin-only",
        &commit_id("b1"),
        &[("config.json", CONFIG), ("pytorch_model.bin", b"pickle")],
    )
    .unwrap();
    set_ref(
        root.path(),
        RepoKind::Model,
        "acme/bin-only",
        "main",
        &commit_id("b1"),
    )
    .unwrap();
    let bin_only = HubId::parse("hf:acme/bin-only", RepoKind::Model)
        .unwrap()
        .unwrap();
    let err = fetch_model(&cfg, &bin_only).unwrap_err();
    assert!(matches!(err, HubError::NoMatchingFiles { .. }), "{err:?}");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");

    // Offline and not cached.
    let offline = HubConfig::offline(cache.path());
    let err = fetch_model(&offline, &model_id("main")).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("acme/tiny-llama") && msg.contains("`main`"),
        "{msg}"
    );

    // Cached at main, but not at another revision.
    fetch_model(&cfg, &model_id("main")).unwrap();
    let err = fetch_model(&offline, &model_id("dev")).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    assert!(err.to_string().contains("`dev`"), "{err}");

    // Online with no endpoint configured.
    let err = fetch_model(&HubConfig::new("", cache.path()), &model_id("main")).unwrap_err();
    assert!(matches!(err, HubError::NoEndpoint), "{err:?}");
    assert!(err.to_string().contains("HF_ENDPOINT"), "{err}");
}

#[test]
fn a_moved_revision_is_refused_against_the_pin() {
    let root = hub_root();
    let (endpoint, _server) = testserver::serve(root.path().to_path_buf());
    let cache = TempDir::new().unwrap();
    let cfg = HubConfig::new(&endpoint, cache.path());
    let (m1, m2) = (commit_id("m1"), commit_id("m2"));

    let pinned = fetch_model(&cfg, &model_id("main")).unwrap();

    // `main` moves to a new commit whose weights differ.
    let new_weights: &[u8] = b"retrained weights";
    add_commit(
        root.path(),
        RepoKind::Model,
        MODEL,
        &m2,
        &[
            ("config.json", CONFIG),
            ("tokenizer.json", TOKENIZER),
            ("model.safetensors", new_weights),
        ],
    )
    .unwrap();
    set_ref(root.path(), RepoKind::Model, MODEL, "main", &m2).unwrap();

    let moved = fetch_model(&cfg, &model_id("main")).unwrap();
    assert_eq!(moved.commit, m2);
    assert_eq!(
        read_ref(cache.path(), "models--acme--tiny-llama", "main"),
        m2
    );
    let err = moved.check(&pinned).unwrap_err();
    assert!(matches!(err, HubError::PinMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        m1.as_str(),
        m2.as_str(),
        "model.safetensors",
        &blake3_hex(WEIGHTS),
        &blake3_hex(new_weights),
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    assert!(
        !msg.contains("config.json"),
        "unchanged files are not listed: {msg}"
    );

    // Fetching by the pin still gets the pinned commit's bytes, online and offline.
    let again = fetch_pinned(&cfg, &pinned).unwrap();
    assert_eq!(again.commit, m1);
    assert_eq!(again.files, pinned.files);
    let fresh = TempDir::new().unwrap();
    let fresh_cfg = HubConfig::new(&endpoint, fresh.path());
    assert_eq!(
        fetch_pinned(&fresh_cfg, &pinned).unwrap().files,
        pinned.files
    );
    assert!(
        !fresh
            .path()
            .join("models--acme--tiny-llama/refs/main")
            .exists(),
        "a pinned fetch does not move refs"
    );
    assert_eq!(
        fetch_pinned(&HubConfig::offline(cache.path()), &pinned)
            .unwrap()
            .commit,
        m1
    );
}

#[test]
fn a_server_changing_bytes_under_a_commit_is_refused() {
    let root = hub_root();
    let (endpoint, _server) = testserver::serve(root.path().to_path_buf());
    let cache = TempDir::new().unwrap();
    let cfg = HubConfig::new(&endpoint, cache.path());
    let m1 = commit_id("m1");

    let pinned = fetch_model(&cfg, &model_id("main")).unwrap();

    // The server now serves other weights under the very same commit.
    let lie: &[u8] = b"tampered weights";
    add_commit(
        root.path(),
        RepoKind::Model,
        MODEL,
        &m1,
        &[("model.safetensors", lie)],
    )
    .unwrap();

    // The cache still holds the pinned bytes, so a refetch there is fine...
    assert_eq!(fetch_pinned(&cfg, &pinned).unwrap(), pinned);

    // ...but a fresh cache gets the server's bytes, and they are refused.
    let fresh = TempDir::new().unwrap();
    let fresh_cfg = HubConfig::new(&endpoint, fresh.path());
    let err = fetch_pinned(&fresh_cfg, &pinned).unwrap_err();
    assert!(matches!(err, HubError::PinMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in ["model.safetensors", &blake3_hex(WEIGHTS), &blake3_hex(lie)] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    assert!(!msg.contains("commit is"), "same commit: {msg}");

    let fresh2 = TempDir::new().unwrap();
    let refetched =
        fetch_model(&HubConfig::new(&endpoint, fresh2.path()), &model_id("main")).unwrap();
    assert_eq!(refetched.commit, m1);
    let err = refetched.check(&pinned).unwrap_err().to_string();
    assert!(
        err.contains(&blake3_hex(lie)) && err.contains(&blake3_hex(WEIGHTS)),
        "{err}"
    );
}

#[test]
fn malformed_ids_are_refused_with_the_reason() {
    let cases = [
        ("hf:", "missing owner and name"),
        ("hf:gpt2", "missing owner"),
        ("hf:/tiny", "missing owner"),
        ("hf:acme/", "missing name"),
        ("hf:acme/tiny@", "empty revision"),
        ("hf:acme/tiny llama", "character ' '"),
        ("hf:acme/tiny/extra", "more than two"),
        ("hf:../tiny", "starts or ends with"),
        ("hf:acme/ti--ny", "`--`"),
        ("hf:acme/tiny@../../etc", "`..`"),
        ("hf:acme/tiny@a//b", "empty"),
        ("hf:acme/tiny@v1 ", "character ' '"),
        ("hf:ac$me/tiny", "character '$'"),
    ];
    for (input, reason) in cases {
        let err = HubId::parse(input, RepoKind::Model).unwrap_err();
        assert!(
            matches!(err, HubError::InvalidId { .. }),
            "{input}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(reason) && msg.contains(input.trim_end()),
            "{input}: {reason:?} not in {msg}"
        );
    }
    assert_eq!(HubId::parse("models/tiny", RepoKind::Model).unwrap(), None);
    let id = HubId::parse("hf:acme/tiny@refs/pr/5", RepoKind::Model)
        .unwrap()
        .unwrap();
    assert_eq!(id.to_string(), "hf:acme/tiny@refs/pr/5");
}

#[test]
fn the_token_is_sent_as_a_bearer_header() {
    let root = hub_root();
    let (endpoint, server) = testserver::serve_with_token(root.path().to_path_buf(), "s3cret");
    let cache = TempDir::new().unwrap();

    // No token: refused, with a hint.
    let cfg = HubConfig::new(&endpoint, cache.path());
    let err = fetch_model(&cfg, &model_id("main")).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::NotFound {
                status: 401,
                token_sent: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    // A wrong token: refused, and never printed.
    let err = fetch_model(&cfg.clone().with_token("wrong-t0ken"), &model_id("main")).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::NotFound {
                status: 401,
                token_sent: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("wrong-t0ken"), "{err:?}");

    // The right token: every request carries it.
    let before = server.requests().len();
    let cfg = cfg.with_token("s3cret");
    assert!(!format!("{cfg:?}").contains("s3cret"));
    let pin = fetch_model(&cfg, &model_id("main")).unwrap();
    assert_eq!(pin.files.len(), 3);
    let requests = &server.requests()[before..];
    assert!(requests.len() >= 4, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer s3cret")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/resolve/") && r.range.is_some())
    );
}
