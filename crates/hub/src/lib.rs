//! Fetch and pin models and datasets named by hub ids.
//!
//! A competition names its base model and dataset either by a local path or by a hub id,
//! `hf:owner/name[@revision]`. This crate turns such an id into files on disk, in the
//! standard Hugging Face cache layout (so caches are shared with other tools), and into a
//! [`Pinned`] record: the exact commit plus the blake3 of every file. The competition record
//! stores the pin, and every validator and miner refetches against it, refusing any byte
//! that differs. That is what makes them all train and score on the same data.
//!
//! - [`id`]: [`HubId`] parsing and validation (`hf:` strings; anything else is a local path);
//! - [`config`]: [`HubConfig`], endpoint/cache/token/offline, optionally from the usual
//!   `HF_*` environment variables;
//! - [`fetch`]: [`fetch_model`], [`fetch_dataset`], [`fetch_pinned`], through the `hf-hub`
//!   crate's blocking client, or from the cache alone when offline;
//! - [`pin`]: [`Pinned`] and [`Pinned::check`];
//! - [`testserver`]: a small local server that serves a directory tree as hub repositories,
//!   for tests here and in other crates (nothing here ever contacts a real hub in tests).
//!
//! The fetch functions block (they do HTTP and file I/O); call them from
//! `tokio::task::spawn_blocking` in async code.
//!
//! There is no built-in endpoint: it comes from [`HubConfig::endpoint`] or `HF_ENDPOINT`.

pub mod config;
pub mod fetch;
pub mod id;
pub mod pin;
pub mod testserver;

use std::path::PathBuf;

pub use config::HubConfig;
pub use fetch::{
    fetch_dataset, fetch_model, fetch_pinned, select_dataset_files, select_model_files,
};
pub use id::{HubId, RepoKind};
pub use pin::{Mismatch, Pinned};

/// Result with [`HubError`] as the default error.
pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// Everything that can go wrong parsing ids, fetching, or checking pins.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// An `hf:` string that is not a valid hub id.
    #[error("invalid hub id `{input}`: {reason}")]
    InvalidId {
        /// The string as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Online fetch without an endpoint.
    #[error(
        "no hub endpoint configured: set HF_ENDPOINT (or HubConfig::endpoint), \
         or work offline from the cache with HF_HUB_OFFLINE=1"
    )]
    NoEndpoint,

    /// No cache directory could be derived from the environment.
    #[error("cannot locate the hub cache: set HF_HUB_CACHE or HF_HOME (no home directory found)")]
    NoCacheDir,

    /// A model fetch given a dataset id, or the reverse.
    #[error("{id} names a {actual} but a {expected} fetch was asked for")]
    WrongKind {
        /// The id.
        id: String,
        /// The kind the fetch function handles.
        expected: RepoKind,
        /// The id's kind.
        actual: RepoKind,
    },

    /// The hub answered 401/403/404 for the repository or revision.
    #[error(
        "{kind} {repo} at revision `{revision}` does not exist or needs a token \
         (the hub answered HTTP {status}; {})",
        token_hint(*.token_sent)
    )]
    NotFound {
        /// Model or dataset.
        kind: RepoKind,
        /// `owner/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The HTTP status.
        status: u16,
        /// Whether a token was sent (its value is never recorded).
        token_sent: bool,
    },

    /// The hub answered 401/403/404 for one file of a resolved commit.
    #[error(
        "file `{path}` of {kind} {repo} at commit {commit} was not found or needs a token \
         (the hub answered HTTP {status}; {})",
        token_hint(*.token_sent)
    )]
    FileNotFound {
        /// Model or dataset.
        kind: RepoKind,
        /// `owner/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// Path in the repository.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Whether a token was sent.
        token_sent: bool,
    },

    /// Offline, and the repository or revision is not in the cache.
    #[error(
        "{kind} {repo} at revision `{revision}` is not in the hub cache {} \
         (offline: nothing is downloaded): {detail}",
        cache_dir.display()
    )]
    NotCached {
        /// Model or dataset.
        kind: RepoKind,
        /// `owner/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache directory searched.
        cache_dir: PathBuf,
        /// What exactly is missing.
        detail: String,
    },

    /// None of the repository's files is one the fetch wants.
    #[error("{id}: no {wanted} among the repository's files [{}]", list_files(.available))]
    NoMatchingFiles {
        /// The id.
        id: String,
        /// What was looked for.
        wanted: String,
        /// The repository's files.
        available: Vec<String>,
    },

    /// The hub (or cache) named a file path that could escape the snapshot directory.
    #[error("{id}: refusing unsafe file path `{path}`")]
    UnsafePath {
        /// The id.
        id: String,
        /// The offending path.
        path: String,
    },

    /// The hub answered something inconsistent (a malformed commit, another commit than
    /// the one asked for).
    #[error("{id}: unexpected answer from the hub: {detail}")]
    BadAnswer {
        /// The id.
        id: String,
        /// What was wrong.
        detail: String,
    },

    /// A fetch does not match its pin. Lists every difference, with both commits and both
    /// hashes of each differing file.
    #[error(
        "{id} does not match its pin (snapshot {}): {}",
        dir.display(),
        list_mismatches(.mismatches)
    )]
    PinMismatch {
        /// The pinned id.
        id: String,
        /// The snapshot directory of the refused fetch.
        dir: PathBuf,
        /// The differences.
        mismatches: Vec<Mismatch>,
    },

    /// The hub client failed (connection, protocol, I/O while downloading).
    #[error("{action} {id} via {endpoint}: {source}")]
    Hub {
        /// What was being done.
        action: String,
        /// The id.
        id: String,
        /// The endpoint used.
        endpoint: String,
        /// The client's error.
        source: hf_hub::api::sync::ApiError,
    },

    /// Local file I/O failed.
    #[error("hub cache I/O at {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn token_hint(token_sent: bool) -> &'static str {
    if token_sent {
        "a token was sent: check it grants access"
    } else {
        "no token was sent: set HF_TOKEN if the repository is private or gated"
    }
}

/// At most this many file names in an error message.
const MAX_LISTED_FILES: usize = 50;

fn list_files(files: &[String]) -> String {
    let mut out = files
        .iter()
        .take(MAX_LISTED_FILES)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if files.len() > MAX_LISTED_FILES {
        out.push_str(&format!(", … and {} more", files.len() - MAX_LISTED_FILES));
    }
    out
}

fn list_mismatches(mismatches: &[Mismatch]) -> String {
    mismatches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
