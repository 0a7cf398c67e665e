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
    let _ = std::fs::remove_file(&tmp);
    // Created owner-only from the first byte, not made so afterwards.
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    {
        use std::io::Write;
        let mut f = open.open(&tmp).map_err(err)?;
        f.write_all(&id.to_protobuf()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// Refuses a key file that others than its owner may read or write (as ssh does).
pub fn check_private(path: &Path) -> Result<(), NodeError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| NodeError::Key {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(NodeError::Key {
                path: path.to_path_buf(),
                reason: format!(
                    "its permissions ({mode:04o}) let others than its owner read or change it; \
                     run `chmod 600 {}` (and consider the key exposed if others could read it)",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Reads the key at `path`; refuses one that others than its owner may read or write.
pub fn load(path: &Path) -> Result<Identity, NodeError> {
    check_private(path)?;
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_key_is_owner_only_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/identity.key");
        let id = generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).unwrap().peer_id(), id.peer_id());
        assert!(!path.with_extension("tmp").exists());
        // A second generate refuses to overwrite it.
        assert!(generate(&path).is_err());
        assert_eq!(load_or_create(&path).unwrap().peer_id(), id.peer_id());
    }

    #[test]
    fn a_key_others_can_read_or_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        generate(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = match load(&path) {
                Ok(_) => panic!("a key with mode {mode:o} was read"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
            assert!(e.contains(&format!("{mode:04o}")), "{mode:o}: {e}");
            // load_or_create must not replace it with a new identity either.
            assert!(load_or_create(&path).is_err());
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&path).is_ok());
    }
}
