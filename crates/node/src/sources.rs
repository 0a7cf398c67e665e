//! Where a competition's base model and dataset come from: a local path, or a hub id
//! (`hf:owner/name[@revision]`) fetched into the standard Hugging Face cache (honouring
//! `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`).
//!
//! Only the validator fetches: it imports what it fetched into its blob store, and miners
//! receive models and shards from it as for local files. Every fetch is pinned: the commit
//! the revision resolved to and the blake3 of every file go into the competition record.
//! A commit is immutable, so the validator also keeps the file hashes it first saw for
//! each commit (sled tree `hub_pins`); a later fetch of the same commit whose bytes differ
//! (a cache tampered with, a mirror serving other files) is refused naming the file and
//! both hashes.

use std::path::{Path, PathBuf};

use tunenet_hub::{HubConfig, HubId, Pinned, RepoKind};
use tunenet_store::{Store, StoreExt};

use crate::error::NodeError;

/// Sled tree of the file hashes first seen for each fetched commit.
pub const HUB_PINS: &str = "hub_pins";

/// A model or dataset made local: its path(s) and, for a hub id, its pin.
#[derive(Clone, Debug)]
pub struct Local {
    /// The model directory, or the dataset's data files (in name order).
    pub paths: Vec<PathBuf>,
    /// The commit and file hashes, when it came from the hub.
    pub pin: Option<Pinned>,
}

fn hub_err(what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::Other(format!("{what}: {e}"))
}

/// Whether `spec` names a hub id rather than a local path.
pub fn is_hub(spec: &Path) -> bool {
    spec.to_str()
        .is_some_and(|s| s.starts_with(tunenet_hub::id::PREFIX))
}

/// Checks `pin` against the hashes first seen for its commit (and records them the first
/// time), when a store is given.
fn check_commit(store: Option<&dyn Store>, pin: &Pinned) -> Result<(), NodeError> {
    let Some(store) = store else {
        return Ok(());
    };
    let key = format!(
        "{}:{}@{}",
        pin.id.kind().plural(),
        pin.id.repo_id(),
        pin.commit
    );
    match store.get_json::<Pinned>(HUB_PINS, &key)? {
        Some(first) => {
            // The same commit may be fetched as a subset (a dataset split): compare the
            // files both hold.
            for (path, hash) in &pin.files {
                if let Some(want) = first.files.get(path)
                    && want != hash
                {
                    return Err(NodeError::Other(format!(
                        "{}: commit {} file {path} has blake3 {hash}, but {want} when it was first fetched: the same commit must hold the same bytes (a tampered cache or a lying mirror); refused",
                        pin.id, pin.commit
                    )));
                }
            }
            let mut merged = first;
            merged.files.extend(pin.files.clone());
            store.put_json(HUB_PINS, &key, &merged)?;
        }
        None => store.put_json(HUB_PINS, &key, pin)?,
    }
    Ok(())
}

/// The hub settings from the environment.
fn hub_config() -> Result<HubConfig, NodeError> {
    HubConfig::from_env().map_err(|e| hub_err("hub settings", e))
}

/// The model directory `spec` names: the path itself, or the hub snapshot it was fetched
/// into (weights, config and tokenizer files).
pub fn model(spec: &Path, store: Option<&dyn Store>) -> Result<Local, NodeError> {
    let s = spec.to_string_lossy();
    let Some(id) = HubId::parse(&s, RepoKind::Model).map_err(|e| hub_err("model id", e))? else {
        return Ok(Local {
            paths: vec![spec.to_path_buf()],
            pin: None,
        });
    };
    let pin = tunenet_hub::fetch_model(&hub_config()?, &id).map_err(|e| hub_err("model", e))?;
    check_commit(store, &pin)?;
    tracing::info!(model = %id, commit = %pin.commit, files = pin.files.len(), "model fetched from the hub and pinned");
    Ok(Local {
        paths: vec![pin.dir.clone()],
        pin: Some(pin),
    })
}

/// The dataset files `spec` names: the path itself, or the hub dataset's data files
/// (Parquet shards, JSONL, JSON or CSV; only `split`'s when given).
pub fn dataset(
    spec: &Path,
    split: Option<&str>,
    store: Option<&dyn Store>,
) -> Result<Local, NodeError> {
    let s = spec.to_string_lossy();
    let Some(id) = HubId::parse(&s, RepoKind::Dataset).map_err(|e| hub_err("dataset id", e))?
    else {
        return Ok(Local {
            paths: vec![spec.to_path_buf()],
            pin: None,
        });
    };
    let pin = tunenet_hub::fetch_dataset(&hub_config()?, &id, split)
        .map_err(|e| hub_err("dataset", e))?;
    check_commit(store, &pin)?;
    tracing::info!(dataset = %id, commit = %pin.commit, files = pin.files.len(), "dataset fetched from the hub and pinned");
    let paths = pin.files.keys().filter_map(|f| pin.path(f)).collect();
    Ok(Local {
        paths,
        pin: Some(pin),
    })
}

/// Reads every file of a dataset through `map` into one list; bad records of every file
/// are counted together (the first ones kept, each naming its file).
pub fn load_records(
    paths: &[PathBuf],
    map: &tunenet_ml::FieldMap,
) -> Result<tunenet_ml::DatasetLoad, NodeError> {
    let mut all: Option<tunenet_ml::DatasetLoad> = None;
    for p in paths {
        let mut d = tunenet_ml::load_dataset(p, map)?;
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        for b in &mut d.bad {
            b.problem = format!("{name}: {}", b.problem);
        }
        match &mut all {
            None => all = Some(d),
            Some(a) => {
                a.records.append(&mut d.records);
                a.bad_count += d.bad_count;
                a.bad.extend(d.bad);
            }
        }
    }
    all.ok_or_else(|| NodeError::Other("the dataset has no data files".into()))
}
