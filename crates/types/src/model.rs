//! A model as blobs: a manifest naming each file of a Hugging Face model directory by
//! blake3. The model's id is the blake3 of the manifest's canonical JSON.

use crate::ids::BlobId;
use serde::{Deserialize, Serialize};

/// One file of a model directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// File name inside the model directory (no directories, no `..`).
    pub name: String,
    /// The file's content id.
    pub blob: BlobId,
    /// The file's size.
    pub size: u64,
}

/// The files that make up a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Always `tunenet-model/1`.
    pub format: String,
    /// The files, sorted by name.
    pub files: Vec<ModelFile>,
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    /// Not JSON of the right shape.
    #[error("model manifest does not parse: {0}")]
    Parse(String),
    /// A file name could escape the model directory or is unusable.
    #[error("model manifest names an unsafe file `{0}`: names must be plain file names")]
    UnsafeName(String),
    /// Too many files.
    #[error("model manifest lists {0} files; at most 4096 are accepted")]
    TooManyFiles(usize),
}

impl ModelManifest {
    /// The manifest's canonical bytes (what its id hashes).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a manifest from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: ModelManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if m.files.len() > 4096 {
            return Err(ManifestError::TooManyFiles(m.files.len()));
        }
        for f in &m.files {
            let ok = !f.name.is_empty()
                && f.name.len() <= 255
                && f.name != "."
                && f.name != ".."
                && !f.name.contains(['/', '\\', '\0']);
            if !ok {
                return Err(ManifestError::UnsafeName(f.name.clone()));
            }
        }
        Ok(m)
    }

    /// Total size of the model's files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_path_traversal() {
        let m = ModelManifest {
            format: "tunenet-model/1".into(),
            files: vec![ModelFile {
                name: "../etc/passwd".into(),
                blob: BlobId::of(b""),
                size: 0,
            }],
        };
        assert!(matches!(
            ModelManifest::parse(&m.to_bytes()),
            Err(ManifestError::UnsafeName(_))
        ));
        assert!(ModelManifest::parse(b"{").is_err());
    }
}
