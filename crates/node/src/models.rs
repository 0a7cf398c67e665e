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
    std::fs::create_dir_all(&dir)
        .map_err(|e| NodeError::Other(format!("cannot create {}: {e}", dir.display())))?;
    for f in &manifest.files {
        blobs.export(&f.blob, &dir.join(&f.name))?;
    }
    std::fs::write(&done, id.to_hex())
        .map_err(|e| NodeError::Other(format!("cannot write {}: {e}", done.display())))?;
    Ok(dir)
}
