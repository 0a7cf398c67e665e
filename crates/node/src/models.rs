//! Models as blobs: a validator imports a model directory into its blob store as one
//! manifest plus one blob per file; a miner materialises a model directory from them.

use crate::error::NodeError;
use std::path::{Path, PathBuf};
use tunenet_store::BlobStore;
use tunenet_types::{BlobId, ModelFile, ModelManifest};

/// Stores every file of `dir` and a manifest listing them; returns the manifest's id.
pub fn import_model_dir(
    blobs: &BlobStore,
    dir: &Path,
) -> Result<(BlobId, ModelManifest), NodeError> {
    let model = tunenet_ml::ModelDir::open(dir)?;
    let mut files = Vec::new();
    for path in model.files() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                NodeError::Other(format!("model file {} has no usable name", path.display()))
            })?
            .to_string();
        let blob = blobs.put_file(&path)?;
        let size = blobs.size(&blob)?;
        files.push(ModelFile { name, blob, size });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = ModelManifest {
        format: "tunenet-model/1".into(),
        files,
    };
    let id = blobs.put(&manifest.to_bytes())?;
    Ok((id, manifest))
}

/// Writes the model `manifest` describes into `root/<manifest id>/`, from blobs already in
/// the store (each verified on the way), unless it is already there.
pub fn materialise(
    blobs: &BlobStore,
    id: &BlobId,
    manifest: &ModelManifest,
    root: &Path,
) -> Result<PathBuf, NodeError> {
    let dir = root.join(id.to_hex());
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    // Built in a directory of its own, then renamed into place whole: jobs on the same
    // model materialise it at once without one reading what another is still writing.
    let tmp = root.join(format!(
        ".tmp-{}-{:016x}",
        id.to_hex(),
        rand::random::<u64>()
    ));
    let io = |what: &str, p: &Path, e: std::io::Error| {
        NodeError::Other(format!("cannot {what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(&tmp).map_err(|e| io("create", &tmp, e))?;
    let built = (|| {
        for f in &manifest.files {
            blobs.export(&f.blob, &tmp.join(&f.name))?;
        }
        std::fs::write(tmp.join(".complete"), id.to_hex())
            .map_err(|e| io("write", &tmp.join(".complete"), e))
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !done.exists() {
        // Left half-written by an older version or a crash: nothing reads it.
        let _ = std::fs::remove_dir_all(&dir);
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another job finished the same model first: use its copy.
        Err(_) if done.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(io("move the model into", &dir, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs on the same model materialise it at the same moment: every one gets the whole
    /// directory (a race here once failed a job with "config.json: No such file").
    #[test]
    fn concurrent_materialisations_all_see_the_whole_model() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let files: Vec<ModelFile> = ["config.json", "model.safetensors", "tokenizer.json"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let bytes = vec![i as u8 + 1; 200_000 * (i + 1)];
                ModelFile {
                    name: name.to_string(),
                    blob: blobs.put(&bytes).unwrap(),
                    size: bytes.len() as u64,
                }
            })
            .collect();
        let manifest = ModelManifest {
            format: "tunenet-model/1".into(),
            files,
        };
        let id = BlobId::of(b"the manifest");
        let root = tmp.path().join("models");
        for round in 0..5 {
            let _ = std::fs::remove_dir_all(&root);
            let dirs: Vec<PathBuf> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| materialise(&blobs, &id, &manifest, &root).unwrap()))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for d in &dirs {
                for f in &manifest.files {
                    let len = std::fs::metadata(d.join(&f.name)).unwrap().len();
                    assert_eq!(len, f.size, "round {round}: {}", f.name);
                }
            }
            // Nothing half-built is left behind.
            let left: Vec<_> = std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                .collect();
            assert!(left.is_empty(), "round {round}: {left:?}");
        }
    }
}
