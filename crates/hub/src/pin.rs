//! Pins: the exact commit and file contents a fetch produced.
//!
//! A competition record stores a [`Pinned`] for its base model and dataset. Every validator
//! and miner refetches against it ([`Pinned::check`], [`crate::fetch_pinned`]) and refuses
//! any difference, so they all train and score on the same bytes even if a branch moves or a
//! server (or a cache) serves something else under the same name.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{HubError, HubId, Result};

/// What a fetch resolved: the repository, the commit, where its snapshot is on disk, and the
/// blake3 of every fetched file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    /// The id that was fetched (its revision as the caller named it).
    pub id: HubId,
    /// The 40-hex commit the revision resolved to.
    pub commit: String,
    /// The snapshot directory (`<cache>/<kind>s--owner--name/snapshots/<commit>`): each
    /// fetched file is at `dir.join(path)`. Local to this machine.
    pub dir: PathBuf,
    /// Path in the repository (`/`-separated) → blake3 hex of the file's bytes.
    pub files: BTreeMap<String, String>,
}

/// One difference between a fetch and the pin it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A different repository (or kind) than the pinned one.
    Repo {
        /// The pinned id.
        expected: String,
        /// The fetched id.
        actual: String,
    },
    /// The revision resolved to another commit.
    Commit {
        /// The pinned commit.
        expected: String,
        /// The fetched commit.
        actual: String,
    },
    /// A file's bytes differ.
    File {
        /// Path in the repository.
        path: String,
        /// The pinned blake3.
        expected: String,
        /// The fetched blake3.
        actual: String,
    },
    /// A pinned file was not fetched.
    Missing {
        /// Path in the repository.
        path: String,
    },
    /// A file was fetched that the pin does not list.
    Unexpected {
        /// Path in the repository.
        path: String,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Repo { expected, actual } => {
                write!(f, "repository is {actual}, pinned {expected}")
            }
            Mismatch::Commit { expected, actual } => {
                write!(f, "commit is {actual}, pinned commit {expected}")
            }
            Mismatch::File {
                path,
                expected,
                actual,
            } => write!(
                f,
                "file `{path}` has blake3 {actual}, pinned blake3 {expected}"
            ),
            Mismatch::Missing { path } => write!(f, "pinned file `{path}` is missing"),
            Mismatch::Unexpected { path } => write!(f, "file `{path}` is not in the pin"),
        }
    }
}

impl Pinned {
    /// Checks that this fetch is exactly `expected`: same repository and kind, same commit,
    /// the same set of files with the same blake3 each. The error lists every difference,
    /// naming both commits and, for each differing file, both hashes. The revision names
    /// and snapshot directories are not compared.
    pub fn check(&self, expected: &Pinned) -> Result<()> {
        let mut mismatches = Vec::new();
        if (self.id.kind(), self.id.owner(), self.id.name())
            != (expected.id.kind(), expected.id.owner(), expected.id.name())
        {
            mismatches.push(Mismatch::Repo {
                expected: format!("{} {}", expected.id.kind(), expected.id.repo_id()),
                actual: format!("{} {}", self.id.kind(), self.id.repo_id()),
            });
        }
        if self.commit != expected.commit {
            mismatches.push(Mismatch::Commit {
                expected: expected.commit.clone(),
                actual: self.commit.clone(),
            });
        }
        for (path, want) in &expected.files {
            match self.files.get(path) {
                Some(got) if got == want => {}
                Some(got) => mismatches.push(Mismatch::File {
                    path: path.clone(),
                    expected: want.clone(),
                    actual: got.clone(),
                }),
                None => mismatches.push(Mismatch::Missing { path: path.clone() }),
            }
        }
        for path in self.files.keys() {
            if !expected.files.contains_key(path) {
                mismatches.push(Mismatch::Unexpected { path: path.clone() });
            }
        }
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(HubError::PinMismatch {
                id: expected.id.to_string(),
                dir: self.dir.clone(),
                mismatches,
            })
        }
    }

    /// The local path of a fetched file, if it is part of this pin.
    pub fn path(&self, repo_path: &str) -> Option<PathBuf> {
        self.files
            .contains_key(repo_path)
            .then(|| self.dir.join(repo_path))
    }
}

/// blake3 hex of a file's bytes, streamed (weights can be many GiB).
pub fn blake3_file(path: &Path) -> Result<String> {
    let io = |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(&mut file).map_err(io)?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RepoKind;

    fn pin(commit: &str, files: &[(&str, &str)]) -> Pinned {
        Pinned {
            id: HubId::parse("hf:o/n", RepoKind::Model).unwrap().unwrap(),
            commit: commit.into(),
            dir: PathBuf::from("/x"),
            files: files
                .iter()
                .map(|(p, h)| (p.to_string(), h.to_string()))
                .collect(),
        }
    }

    #[test]
    fn check_lists_every_difference() {
        let a = pin("c1", &[("a", "h1"), ("b", "h2"), ("c", "h3")]);
        assert!(a.check(&a.clone()).is_ok());
        let b = pin("c2", &[("a", "h1"), ("b", "hX"), ("d", "h4")]);
        let err = b.check(&a).unwrap_err().to_string();
        for needle in [
            "c1",
            "c2",
            "`b` has blake3 hX, pinned blake3 h2",
            "`c` is missing",
            "`d` is not in the pin",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }
}
