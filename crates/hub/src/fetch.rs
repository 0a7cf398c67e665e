//! Fetching repositories into the hub cache and pinning what was fetched.
//!
//! Online, a fetch asks the hub's API which commit the revision names and which files the
//! repository has (`/api/{models|datasets}/{owner}/{name}/revision/{rev}`), picks the files
//! it needs, and downloads each one *at that commit* through the `hf-hub` crate, so all files
//! come from the same commit even if the branch moves meanwhile. Files land in the standard
//! cache layout:
//!
//! ```text
//! <cache>/models--owner--name/
//!     blobs/<etag>                       file contents
//!     snapshots/<commit>/<path>          links to the blobs
//!     refs/<revision>                    the commit the revision named when last fetched
//! ```
//!
//! (`datasets--owner--name/` likewise). Files already in the snapshot are not downloaded
//! again. Offline, the revision is resolved through `refs/<revision>` and the files are read
//! from the snapshot; nothing touches the network.
//!
//! Every fetch returns a [`Pinned`] with the blake3 of each file it selected. To refetch what
//! a competition pinned, use [`fetch_pinned`], which fetches the pinned commit and exactly
//! the pinned files and refuses any difference.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::id::is_commit_hash;
use crate::pin::blake3_file;
use crate::{HubConfig, HubError, HubId, Pinned, RepoKind, Result};

/// The files a candle Llama-style model is loaded from, besides the `*.safetensors` weights.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
];

/// Extensions of dataset data files.
pub const DATA_EXTENSIONS: &[&str] = &["parquet", "jsonl", "json", "csv"];

/// JSON files that describe a dataset rather than hold its rows.
const DATASET_METADATA: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
];

/// Fetches the model files of `id` (see [`select_model_files`]) and pins them.
///
/// Blocks. Online it resolves `id`'s revision through the hub's API and downloads what the
/// cache lacks; offline ([`HubConfig::offline`]) it reads only the cache. Fails with
/// [`HubError::NotFound`] for a repository or revision the hub does not know (or will not
/// show without a token), [`HubError::NotCached`] offline when the cache lacks it, and
/// [`HubError::NoMatchingFiles`] when the repository has no `*.safetensors` weights.
pub fn fetch_model(cfg: &HubConfig, id: &HubId) -> Result<Pinned> {
    fetch(cfg, id, RepoKind::Model, Want::Model)
}

/// Fetches the data files of `id` (see [`select_dataset_files`]), optionally only those of
/// one `split` (such as `train`), and pins them. Blocks; errors as [`fetch_model`].
pub fn fetch_dataset(cfg: &HubConfig, id: &HubId, split: Option<&str>) -> Result<Pinned> {
    if let Some(split) = split
        && (split.is_empty() || split.contains(['/', '\\']))
    {
        return Err(HubError::InvalidId {
            input: format!("{id} (split `{split}`)"),
            reason: "a split name must be non-empty and contain no path separator".into(),
        });
    }
    fetch(cfg, id, RepoKind::Dataset, Want::Dataset(split))
}

/// Refetches exactly what `expected` pinned: its commit (not its revision name, which may
/// have moved) and its files, online or from the cache as `cfg` says, and checks every
/// file's blake3 against the pin. Any difference is refused with
/// [`HubError::PinMismatch`], naming each differing file with both hashes.
pub fn fetch_pinned(cfg: &HubConfig, expected: &Pinned) -> Result<Pinned> {
    let id = &expected.id;
    if !is_commit_hash(&expected.commit) {
        return Err(HubError::InvalidId {
            input: format!("{id} (pinned commit `{}`)", expected.commit),
            reason: "a pinned commit must be 40 lowercase hex digits".into(),
        });
    }
    for path in expected.files.keys() {
        check_repo_path(id, path)?;
    }
    let pinned = fetch(cfg, id, id.kind(), Want::Exact(expected))?;
    pinned.check(expected)?;
    Ok(pinned)
}

/// The files of a model repository a candle Llama model needs: the top-level
/// [`MODEL_FILES`] and `*.safetensors` it has. Other files (`*.bin`, `*.onnx`, `*.gguf`,
/// `.gitattributes`, READMEs, subfolders) are skipped. Sorted.
pub fn select_model_files(files: &[String]) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && (MODEL_FILES.contains(&f.as_str()) || is_safetensors(f)))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The data files of a dataset repository, sorted.
///
/// Preferably the hub's parquet shards, `data/*.parquet`; when there are none (or none of
/// the split), the `*.parquet`, `*.jsonl`, `*.json` and `*.csv` files at the top level or
/// directly in `data/` (except metadata such as `dataset_infos.json`).
///
/// With a `split`, only files whose name starts with it or contains it as a word
/// (delimited by non-alphanumerics: `my_train.jsonl`, `data/x-train-0.parquet`), ASCII
/// case-insensitively.
pub fn select_dataset_files(files: &[String], split: Option<&str>) -> Vec<String> {
    let of_split = |f: &&String| split.is_none_or(|s| name_matches_split(file_name(f), s));
    let shards: Vec<String> = files
        .iter()
        .filter(|f| {
            f.strip_prefix("data/")
                .is_some_and(|rest| !rest.contains('/') && extension(rest) == Some("parquet"))
        })
        .filter(of_split)
        .cloned()
        .collect();
    let mut out = if shards.is_empty() {
        files
            .iter()
            .filter(|f| {
                let rest = f.strip_prefix("data/").unwrap_or(f);
                !rest.contains('/')
                    && extension(rest).is_some_and(|e| DATA_EXTENSIONS.contains(&e))
                    && !DATASET_METADATA.contains(&rest)
            })
            .filter(of_split)
            .cloned()
            .collect()
    } else {
        shards
    };
    out.sort();
    out.dedup();
    out
}

/// What a fetch selects.
enum Want<'a> {
    Model,
    Dataset(Option<&'a str>),
    /// The files of a pin (only those present: missing ones are reported by the check).
    Exact(&'a Pinned),
}

impl Want<'_> {
    /// The files to fetch out of the repository's `available` ones.
    fn select(&self, id: &HubId, available: &[String]) -> Result<Vec<String>> {
        let (selected, wanted) = match self {
            Want::Model => {
                let selected = select_model_files(available);
                let wanted = "model weights (*.safetensors at the top level)".to_string();
                if !selected.iter().any(|f| is_safetensors(f)) {
                    return Err(no_match(id, wanted, available));
                }
                (selected, wanted)
            }
            Want::Dataset(split) => (
                select_dataset_files(available, *split),
                match split {
                    Some(split) => format!(
                        "data files of split `{split}` (data/*.parquet, or *.parquet, *.jsonl, \
                         *.json, *.csv at the top level or in data/, named after the split)"
                    ),
                    None => "data files (data/*.parquet, or *.parquet, *.jsonl, *.json, \
                             *.csv at the top level or in data/)"
                        .to_string(),
                },
            ),
            Want::Exact(pin) => (
                pin.files
                    .keys()
                    .filter(|f| available.contains(f))
                    .cloned()
                    .collect(),
                "pinned files".to_string(),
            ),
        };
        if selected.is_empty() {
            return Err(no_match(id, wanted, available));
        }
        for path in &selected {
            check_repo_path(id, path)?;
        }
        Ok(selected)
    }
}

fn no_match(id: &HubId, wanted: String, available: &[String]) -> HubError {
    HubError::NoMatchingFiles {
        id: id.to_string(),
        wanted,
        available: available.to_vec(),
    }
}

fn fetch(cfg: &HubConfig, id: &HubId, kind: RepoKind, want: Want<'_>) -> Result<Pinned> {
    if id.kind() != kind {
        return Err(HubError::WrongKind {
            id: id.to_string(),
            expected: kind,
            actual: id.kind(),
        });
    }
    let repo_dir = cfg.cache_dir.join(id.cache_folder());
    let (commit, files) = if cfg.offline {
        from_cache(cfg, id, &repo_dir, &want)?
    } else {
        from_hub(cfg, id, &repo_dir, &want)?
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    let mut hashes = BTreeMap::new();
    for path in files {
        let hash = blake3_file(&dir.join(&path))?;
        hashes.insert(path, hash);
    }
    Ok(Pinned {
        id: id.clone(),
        commit,
        dir,
        files: hashes,
    })
}

/// Offline: resolve the commit through `refs/` and list the snapshot.
fn from_cache(
    cfg: &HubConfig,
    id: &HubId,
    repo_dir: &Path,
    want: &Want<'_>,
) -> Result<(String, Vec<String>)> {
    let not_cached = |detail: String| HubError::NotCached {
        kind: id.kind(),
        repo: id.repo_id(),
        revision: id.revision().to_string(),
        cache_dir: cfg.cache_dir.clone(),
        detail,
    };
    let commit = if let Want::Exact(pin) = want {
        pin.commit.clone()
    } else if id.revision_is_commit() {
        id.revision().to_string()
    } else {
        let ref_path = repo_dir.join("refs").join(id.revision());
        let commit = match fs::read_to_string(&ref_path) {
            Ok(commit) => commit.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_cached(format!("no ref file {}", ref_path.display())));
            }
            Err(source) => {
                return Err(HubError::Io {
                    path: ref_path,
                    source,
                });
            }
        };
        if !is_commit_hash(&commit) {
            return Err(not_cached(format!(
                "ref file {} does not hold a commit hash",
                ref_path.display()
            )));
        }
        commit
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_cached(format!(
            "no snapshot of commit {commit} at {}",
            snapshot.display()
        )));
    }
    let mut available = Vec::new();
    list_files(&snapshot, "", &mut available)?;
    available.sort();
    let files = want.select(id, &available)?;
    Ok((commit, files))
}

/// Recursively lists the files under `dir` as `/`-separated paths relative to the snapshot.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let io = |source| HubError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        let rel = format!("{prefix}{name}");
        // `is_dir`/`is_file` follow the snapshot's links to the blobs; dangling links are
        // neither and are left out (their file is then missing from the pin).
        if path.is_dir() {
            list_files(&path, &format!("{rel}/"), out)?;
        } else if path.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

/// Online: resolve the commit through the API and download what the snapshot lacks.
fn from_hub(
    cfg: &HubConfig,
    id: &HubId,
    repo_dir: &Path,
    want: &Want<'_>,
) -> Result<(String, Vec<String>)> {
    let endpoint = cfg.require_endpoint()?;
    let hub_error = |action: String, source: ApiError| HubError::Hub {
        action,
        id: id.to_string(),
        endpoint: endpoint.to_string(),
        source,
    };
    let api = ApiBuilder::from_cache(Cache::new(cfg.cache_dir.clone()))
        .with_endpoint(endpoint.to_string())
        // Always set, also to `None`: the builder would otherwise pick up a token file.
        .with_token(cfg.token.clone())
        .with_progress(false)
        .with_user_agent("tunenet-hub", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| hub_error("setting up the hub client for".into(), e))?;
    let repo_type = match id.kind() {
        RepoKind::Model => RepoType::Model,
        RepoKind::Dataset => RepoType::Dataset,
    };
    let token_sent = cfg.token.is_some();

    // Resolve the revision (a pinned fetch asks for the pinned commit itself).
    let revision = match want {
        Want::Exact(pin) => pin.commit.as_str(),
        _ => id.revision(),
    };
    let info = api
        .repo(Repo::with_revision(
            id.repo_id(),
            repo_type,
            revision.to_string(),
        ))
        .info()
        .map_err(|e| match http_status(&e) {
            Some(status @ (401 | 403 | 404)) => HubError::NotFound {
                kind: id.kind(),
                repo: id.repo_id(),
                revision: revision.to_string(),
                status,
                token_sent,
            },
            _ => hub_error(format!("resolving revision `{revision}` of"), e),
        })?;
    let commit = info.sha;
    if !is_commit_hash(&commit) {
        return Err(HubError::BadAnswer {
            id: id.to_string(),
            detail: format!("revision `{revision}` resolved to `{commit}`, not a commit hash"),
        });
    }
    if is_commit_hash(revision) && commit != revision {
        return Err(HubError::BadAnswer {
            id: id.to_string(),
            detail: format!("asked for commit {revision}, the hub answered commit {commit}"),
        });
    }
    let mut available: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    available.sort();
    let files = want.select(id, &available)?;

    // Download, at the commit, each file the snapshot lacks.
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let at_commit = api.repo(Repo::with_revision(id.repo_id(), repo_type, commit.clone()));
    let mut downloaded = false;
    for path in &files {
        let pointer = snapshot.join(path);
        if pointer.is_file() {
            continue;
        }
        // A dangling link (its blob was deleted) would make the client fail to relink.
        if fs::symlink_metadata(&pointer).is_ok() {
            fs::remove_file(&pointer).map_err(|source| HubError::Io {
                path: pointer.clone(),
                source,
            })?;
        }
        let got = at_commit
            .download(path)
            .map_err(|e| match http_status(&e) {
                Some(status @ (401 | 403 | 404)) => HubError::FileNotFound {
                    kind: id.kind(),
                    repo: id.repo_id(),
                    commit: commit.clone(),
                    path: path.clone(),
                    status,
                    token_sent,
                },
                _ => hub_error(format!("downloading `{path}` at commit {commit} of"), e),
            })?;
        downloaded = true;
        if got != pointer {
            return Err(HubError::BadAnswer {
                id: id.to_string(),
                detail: format!(
                    "file `{path}` of commit {commit} was served as {} (another commit?)",
                    got.display()
                ),
            });
        }
    }

    let refs = repo_dir.join("refs");
    if downloaded {
        // The client records the revision it was given, here the commit itself; the
        // standard layout has no refs named after commits.
        let _ = fs::remove_file(refs.join(&commit));
    }
    if !matches!(want, Want::Exact(_)) && !id.revision_is_commit() {
        let ref_path = refs.join(id.revision());
        let io = |source| HubError::Io {
            path: ref_path.clone(),
            source,
        };
        if let Some(parent) = ref_path.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        fs::write(&ref_path, &commit).map_err(io)?;
    }
    Ok((commit, files))
}

/// The HTTP status of a client error, if the hub answered one.
fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(e) => match **e {
            ureq::Error::StatusCode(status) => Some(status),
            _ => None,
        },
        ApiError::TooManyRetries(e) => http_status(e),
        _ => None,
    }
}

/// Refuses repository paths that are not plain relative `/`-separated paths.
fn check_repo_path(id: &HubId, path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains(['\\', '\0', ':'])
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        Err(HubError::UnsafePath {
            id: id.to_string(),
            path: path.to_string(),
        })
    } else {
        Ok(())
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn extension(name: &str) -> Option<&str> {
    name.rsplit_once('.').map(|(_, ext)| ext)
}

fn is_safetensors(path: &str) -> bool {
    extension(path) == Some("safetensors")
}

/// Whether a file name belongs to `split`: it starts with the split name, or contains it
/// delimited by non-alphanumeric characters (ASCII case-insensitive).
fn name_matches_split(name: &str, split: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let split = split.to_ascii_lowercase();
    if name.starts_with(&split) {
        return true;
    }
    let delimited = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    name.match_indices(&split).any(|(at, _)| {
        delimited(name[..at].chars().next_back())
            && delimited(name[at + split.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn model_selection() {
        let files = strings(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "onnx/model.onnx",
            "original/consolidated.safetensors",
            "pytorch_model.bin",
            "model.gguf",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]);
        assert_eq!(
            select_model_files(&files),
            strings(&[
                "config.json",
                "generation_config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ])
        );
    }

    #[test]
    fn dataset_selection() {
        let files = strings(&[
            ".gitattributes",
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "raw/train.jsonl",
            "train.jsonl",
        ]);
        assert_eq!(
            select_dataset_files(&files, None),
            strings(&[
                "data/test-00000-of-00001.parquet",
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
            ])
        );
        assert_eq!(
            select_dataset_files(&files, Some("test")),
            strings(&["data/test-00000-of-00001.parquet"])
        );
        assert_eq!(
            select_dataset_files(&files, Some("validation")),
            strings(&[])
        );

        let files = strings(&[
            "dataset_infos.json",
            "my_train.jsonl",
            "pretrain.jsonl",
            "data/eval.csv",
            "train.json",
            "nested/dir/train.csv",
        ]);
        assert_eq!(
            select_dataset_files(&files, None),
            strings(&[
                "data/eval.csv",
                "my_train.jsonl",
                "pretrain.jsonl",
                "train.json"
            ])
        );
        assert_eq!(
            select_dataset_files(&files, Some("train")),
            strings(&["my_train.jsonl", "train.json"])
        );
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let id = HubId::parse("hf:o/n", RepoKind::Model).unwrap().unwrap();
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "",
            "a\\b",
            "./a",
        ] {
            assert!(check_repo_path(&id, bad).is_err(), "{bad:?}");
        }
        assert!(check_repo_path(&id, "data/train.parquet").is_ok());
    }
}
