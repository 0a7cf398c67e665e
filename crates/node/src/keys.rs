//! Key files: libp2p's protobuf encoding of an ed25519 keypair, readable only by the owner.

use crate::error::NodeError;
use std::path::Path;
use tunenet_types::Identity;

/// Writes a new key to `path`; refuses to overwrite an existing key.
pub fn generate(path: &Path) -> Result<Identity, NodeError> {
    if path.exists() {
        return Err(NodeError::Key {
            path: path.to_path_buf(),
            reason: "already exists; remove it first if you really want a new identity".into(),
        });
    }
    let id = Identity::generate();
    write(path, &id)?;
    Ok(id)
}

fn write(path: &Path, id: &Identity) -> Result<(), NodeError> {
    let err = |e: std::io::Error| NodeError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, id.to_protobuf()).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads the key at `path`.
pub fn load(path: &Path) -> Result<Identity, NodeError> {
    let bytes = std::fs::read(path).map_err(|e| NodeError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Identity::from_protobuf(&bytes).map_err(|e| NodeError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads the key at `path`, creating it first if it does not exist.
pub fn load_or_create(path: &Path) -> Result<Identity, NodeError> {
    if path.exists() {
        load(path)
    } else {
        generate(path)
    }
}
