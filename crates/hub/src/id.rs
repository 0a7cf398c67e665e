//! Hub ids: `hf:owner/name[@revision]` strings naming a model or dataset repository.
//!
//! A competition names its base model and dataset either by a local path or by a hub id.
//! [`HubId::parse`] tells the two apart (anything without the `hf:` prefix is a local path)
//! and validates hub ids strictly, so a typo is reported before any network or cache access
//! and no id can smuggle path separators or `..` into the cache layout.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{HubError, Result};

/// The prefix that marks a string as a hub id rather than a local path.
pub const PREFIX: &str = "hf:";

/// The revision used when an id does not name one.
pub const DEFAULT_REVISION: &str = "main";

/// Longest owner or repository name the hub accepts.
const MAX_NAME_LEN: usize = 96;

/// Longest revision name accepted here (git allows more; nothing real comes close).
const MAX_REVISION_LEN: usize = 255;

/// What kind of repository an id names. The id string does not say; the caller chooses
/// (a competition's `model` field names a model, its `dataset` field a dataset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoKind {
    /// A model repository (weights, config, tokenizer).
    Model,
    /// A dataset repository (data files).
    Dataset,
}

impl RepoKind {
    /// The plural used in the hub's URLs and in cache folder names (`models`, `datasets`).
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// A validated hub id: repository kind, `owner/name`, and a revision (branch, tag or commit).
///
/// Serialized as a struct (`kind`, `owner`, `name`, `revision`); deserializing validates
/// the fields exactly as [`HubId::new`] does. [`Display`](fmt::Display) gives back the
/// `hf:owner/name@revision` form (the kind is not part of the string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawHubId")]
pub struct HubId {
    kind: RepoKind,
    owner: String,
    name: String,
    revision: String,
}

/// Unvalidated mirror of [`HubId`] used for deserialization.
#[derive(Deserialize)]
struct RawHubId {
    kind: RepoKind,
    owner: String,
    name: String,
    revision: String,
}

impl TryFrom<RawHubId> for HubId {
    type Error = HubError;

    fn try_from(raw: RawHubId) -> Result<Self> {
        HubId::new(raw.kind, &raw.owner, &raw.name, &raw.revision)
    }
}

impl HubId {
    /// Parses `hf:owner/name[@revision]`.
    ///
    /// Returns `Ok(None)` when `s` does not start with `hf:` (the caller treats it as a local
    /// path), and an [`HubError::InvalidId`] saying what is wrong when it does but is malformed.
    /// The revision defaults to `main`; it may be a branch, a tag, `refs/pr/N` or a 40-hex
    /// commit.
    pub fn parse(s: &str, kind: RepoKind) -> Result<Option<HubId>> {
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        let invalid = |reason: String| HubError::InvalidId {
            input: s.to_string(),
            reason,
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (rest, DEFAULT_REVISION),
        };
        if repo.is_empty() {
            return Err(invalid(
                "missing owner and name (expected hf:owner/name[@revision])".into(),
            ));
        }
        let Some((owner, name)) = repo.split_once('/') else {
            return Err(invalid(format!(
                "missing owner: `{repo}` has no `/` (expected hf:owner/name[@revision])"
            )));
        };
        if name.contains('/') {
            return Err(invalid(format!(
                "`{repo}` has more than two `/`-separated parts (expected hf:owner/name[@revision])"
            )));
        }
        HubId::new(kind, owner, name, revision)
            .map(Some)
            .map_err(|e| match e {
                HubError::InvalidId { reason, .. } => invalid(reason),
                other => other,
            })
    }

    /// Builds an id from its parts, validating each as [`HubId::parse`] does.
    pub fn new(kind: RepoKind, owner: &str, name: &str, revision: &str) -> Result<HubId> {
        let invalid = |reason: String| HubError::InvalidId {
            input: format!("{PREFIX}{owner}/{name}@{revision}"),
            reason,
        };
        check_name("owner", owner).map_err(invalid)?;
        check_name("name", name).map_err(invalid)?;
        check_revision(revision).map_err(invalid)?;
        Ok(HubId {
            kind,
            owner: owner.to_string(),
            name: name.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The same repository at another revision (validated).
    pub fn with_revision(&self, revision: &str) -> Result<HubId> {
        HubId::new(self.kind, &self.owner, &self.name, revision)
    }

    /// Model or dataset.
    pub fn kind(&self) -> RepoKind {
        self.kind
    }

    /// The owner (user or organisation).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The repository name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The revision: a branch, tag, `refs/...` name, or a 40-hex commit.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// `owner/name`, as the hub's URLs spell the repository.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Whether the revision is already a full commit hash (nothing to resolve).
    pub fn revision_is_commit(&self) -> bool {
        is_commit_hash(&self.revision)
    }

    /// The repository's folder name in the hub cache: `models--owner--name` or
    /// `datasets--owner--name`.
    pub fn cache_folder(&self) -> String {
        format!("{}--{}--{}", self.kind.plural(), self.owner, self.name)
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/{}@{}", self.owner, self.name, self.revision)
    }
}

/// Whether `s` is a full (40 lowercase hex digit) git commit hash.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The hub's rule for owner and repository names: ASCII letters, digits, `-`, `_`, `.`;
/// not starting or ending with `-` or `.`; no `--` or `..`; at most 96 characters.
fn check_name(what: &str, s: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err(format!("missing {what}"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} `{s}` is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} `{s}` contains the character {c:?} (allowed: ASCII letters, digits, `-`, `_`, `.`)"
        ));
    }
    if s.starts_with(['-', '.']) || s.ends_with(['-', '.']) {
        return Err(format!("{what} `{s}` starts or ends with `-` or `.`"));
    }
    if s.contains("--") || s.contains("..") {
        return Err(format!("{what} `{s}` contains `--` or `..`"));
    }
    Ok(())
}

/// Revisions: git-ref-like names (`main`, `v1.0`, `refs/pr/5`) or commit hashes. ASCII
/// letters, digits, `-`, `_`, `.`, `/`; no `..` and no empty or `.` path segments.
fn check_revision(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err("empty revision after `@`".into());
    }
    if s.len() > MAX_REVISION_LEN {
        return Err(format!(
            "revision is longer than {MAX_REVISION_LEN} characters"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(format!(
            "revision `{s}` contains the character {c:?} (allowed: ASCII letters, digits, `-`, `_`, `.`, `/`)"
        ));
    }
    if s.contains("..") || s.split('/').any(|seg| seg.is_empty() || seg == ".") {
        return Err(format!(
            "revision `{s}` contains `..` or an empty or `.` path segment"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let id = HubId::parse("hf:org/model-1.5B", RepoKind::Model)
            .unwrap()
            .unwrap();
        assert_eq!(id.owner(), "org");
        assert_eq!(id.name(), "model-1.5B");
        assert_eq!(id.revision(), "main");
        assert_eq!(id.to_string(), "hf:org/model-1.5B@main");
        assert_eq!(id.cache_folder(), "models--org--model-1.5B");

        let c = "0123456789abcdef0123456789abcdef01234567";
        let id = HubId::parse(&format!("hf:a/b@{c}"), RepoKind::Dataset)
            .unwrap()
            .unwrap();
        assert!(id.revision_is_commit());
        assert_eq!(id.cache_folder(), "datasets--a--b");
        let id = HubId::parse("hf:a/b@refs/pr/5", RepoKind::Model)
            .unwrap()
            .unwrap();
        assert_eq!(id.revision(), "refs/pr/5");
        assert!(!id.revision_is_commit());
    }

    #[test]
    fn local_paths_are_not_ids() {
        assert_eq!(HubId::parse("./models/x", RepoKind::Model).unwrap(), None);
        assert_eq!(HubId::parse("/abs/hf:x", RepoKind::Model).unwrap(), None);
        assert_eq!(HubId::parse("HF:a/b", RepoKind::Model).unwrap(), None);
    }

    #[test]
    fn serde_round_trip_validates() {
        let id = HubId::parse("hf:a/b@v1", RepoKind::Model).unwrap().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"model","owner":"a","name":"b","revision":"v1"}"#
        );
        assert_eq!(serde_json::from_str::<HubId>(&json).unwrap(), id);
        let bad = r#"{"kind":"model","owner":"..","name":"b","revision":"v1"}"#;
        assert!(serde_json::from_str::<HubId>(bad).is_err());
    }
}
