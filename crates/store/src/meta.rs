//! Metadata storage behind one trait, so sled can be swapped out and every engine runs the
//! same test suite. Values are JSON in a versioned envelope so later releases can migrate.

use serde::{Serialize, de::DeserializeOwned};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// Names of the trees tunenet uses.
pub mod trees {
    /// Competition specs and state.
    pub const COMPETITIONS: &str = "competitions";
    /// Jobs with everything about them: offers and decisions, assignments, commitments
    /// and receipts, submissions and their evaluation. Keyed `competition/job`; one record
    /// per job so a job's state is written atomically.
    pub const JOBS: &str = "jobs";
    /// Per-job scores, keyed `competition/job`.
    pub const SCORES: &str = "scores";
    /// A miner's own jobs.
    pub const MINER_JOBS: &str = "miner_jobs";
    /// Node metadata (schema version, identity).
    pub const META: &str = "meta";
}

/// The record envelope's current version.
pub const RECORD_VERSION: u32 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (locked by another process, corrupt, no permission).
    #[error("cannot open the database at {path}: {reason}")]
    Open {
        /// Where.
        path: String,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error("database error: {0}")]
    Backend(String),
    /// A stored record does not decode.
    #[error("record {tree}/{key} does not decode: {reason}")]
    Decode {
        /// Tree.
        tree: String,
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A stored record is newer than this release understands.
    #[error(
        "record {tree}/{key} has version {version}, this tunenet reads up to {RECORD_VERSION}: upgrade tunenet"
    )]
    TooNew {
        /// Tree.
        tree: String,
        /// Key.
        key: String,
        /// The record's version.
        version: u32,
    },
}

/// Raw key-value storage in named trees.
pub trait Store: Send + Sync {
    /// The value at `tree/key`.
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `tree/key`.
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Removes `tree/key`; absent keys are fine.
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError>;
    /// All entries of `tree` whose key starts with `prefix`, in key order.
    fn scan(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// The names of the trees that hold data.
    fn trees(&self) -> Result<Vec<String>, StoreError>;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

fn decode<T: DeserializeOwned>(tree: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    #[derive(serde::Deserialize)]
    struct Version {
        v: u32,
    }
    let err = |reason: String| StoreError::Decode {
        tree: tree.into(),
        key: key.into(),
        reason,
    };
    let ver: Version = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
    if ver.v > RECORD_VERSION {
        return Err(StoreError::TooNew {
            tree: tree.into(),
            key: key.into(),
            version: ver.v,
        });
    }
    let env: Envelope<T> = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
    Ok(env.data)
}

/// Typed, versioned records on top of any [`Store`].
pub trait StoreExt: Store {
    /// Reads a typed record.
    fn get_json<T: DeserializeOwned>(
        &self,
        tree: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.get(tree, key)?
            .map(|b| decode(tree, key, &b))
            .transpose()
    }
    /// Writes a typed record.
    fn put_json<T: Serialize>(&self, tree: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&Envelope {
            v: RECORD_VERSION,
            data: value,
        })
        .map_err(|e| StoreError::Backend(e.to_string()))?;
        self.put(tree, key, &bytes)
    }
    /// Reads every typed record under a prefix.
    fn scan_json<T: DeserializeOwned>(
        &self,
        tree: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.scan(tree, prefix)?
            .into_iter()
            .map(|(k, v)| decode(tree, &k, &v).map(|t| (k, t)))
            .collect()
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// sled-backed metadata.
pub struct SledStore {
    dir: std::path::PathBuf,
    /// None after a write failed on a full disk: sled keeps failing on that handle even
    /// once space is freed, so the next call opens the database again.
    db: std::sync::RwLock<Option<sled::Db>>,
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(SledStore {
            dir: dir.to_path_buf(),
            db: std::sync::RwLock::new(Some(open_db(dir)?)),
        })
    }

    /// The open database, opened again if a full disk broke the last handle.
    fn db(&self) -> Result<sled::Db, StoreError> {
        let read = self.db.read().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = read.as_ref() {
            return Ok(db.clone());
        }
        drop(read);
        let mut write = self.db.write().unwrap_or_else(|p| p.into_inner());
        match write.as_ref() {
            Some(db) => Ok(db.clone()),
            None => {
                let db = open_db(&self.dir)?;
                *write = Some(db.clone());
                Ok(db)
            }
        }
    }

    /// A backend error; on a full disk the handle is dropped, to be opened again.
    fn failed(&self, e: sled::Error) -> StoreError {
        if let sled::Error::Io(io) = &e
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        StoreError::Backend(explain(&e))
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db()?.open_tree(name).map_err(|e| self.failed(e))
    }
}

/// Opens (or creates) the sled database in `dir`.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    // sled reports its lock as an `Other` error whose message quotes the WouldBlock.
    let locked = |e: &sled::Error| {
        matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().starts_with("could not acquire lock"))
    };
    // A database just closed in this process is unlocked only when sled's flusher
    // thread has gone, a moment later: a lock held for over a second is another
    // process's.
    let mut tries = 0;
    let db = loop {
        match sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()
        {
            Err(e) if locked(&e) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            r => break r,
        }
    }
    .map_err(|e| StoreError::Open {
        path: dir.display().to_string(),
        reason: if locked(&e) {
            format!("{} (is another tunenet using this data dir?)", explain(&e))
        } else {
            explain(&e)
        },
    })?;
    Ok(db)
}

/// A sled error in words: an I/O error by its message (a full disk says so), the rest as
/// sled puts them.
fn explain(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => format!(
            "{io}: the disk holding the data directory is full; free space and retry (nothing stored before is lost)"
        ),
        sled::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

impl Store for SledStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)?
            .get(key)
            .map_err(|e| self.failed(e))?
            .map(|v| v.to_vec()))
    }
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?
            .insert(key, value)
            .map_err(|e| self.failed(e))?;
        Ok(())
    }
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        self.tree(tree)?.remove(key).map_err(|e| self.failed(e))?;
        Ok(())
    }
    fn scan(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|r| {
                let (k, v) = r.map_err(|e| self.failed(e))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.db()?.flush().map_err(|e| self.failed(e))?;
        Ok(())
    }
    fn trees(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .db()?
            .tree_names()
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .filter(|n| n != "__sled__default")
            .collect())
    }
}

/// In-memory metadata, for tests and throwaway nodes.
#[derive(Default)]
pub struct MemStore {
    trees: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl MemStore {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> R,
    ) -> Result<R, StoreError> {
        let mut g = self
            .trees
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))?;
        Ok(f(&mut g))
    }
}

impl Store for MemStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|t| t.get(tree).and_then(|m| m.get(key)).cloned())
    }
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with(|t| {
            t.entry(tree.into())
                .or_default()
                .insert(key.into(), value.to_vec());
        })
    }
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        self.with(|t| {
            if let Some(m) = t.get_mut(tree) {
                m.remove(key);
            }
        })
    }
    fn scan(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|t| {
            t.get(tree)
                .map(|m| {
                    m.range(prefix.to_string()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        })
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn trees(&self) -> Result<Vec<String>, StoreError> {
        self.with(|t| {
            t.iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(k, _)| k.clone())
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Rec {
        a: u32,
        b: String,
    }

    /// The one suite every Store implementation must pass.
    fn suite(s: &dyn Store) {
        assert_eq!(s.get("t", "k").unwrap(), None);
        s.put("t", "a/1", b"x").unwrap();
        s.put("t", "a/2", b"y").unwrap();
        s.put("t", "b/1", b"z").unwrap();
        s.put("u", "a/1", b"other tree").unwrap();
        assert_eq!(s.get("t", "a/1").unwrap().as_deref(), Some(&b"x"[..]));
        let keys: Vec<String> = s
            .scan("t", "a/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["a/1", "a/2"]);
        s.delete("t", "a/1").unwrap();
        s.delete("t", "missing").unwrap();
        assert_eq!(s.get("t", "a/1").unwrap(), None);
        s.put_json(
            "t",
            "r",
            &Rec {
                a: 1,
                b: "two".into(),
            },
        )
        .unwrap();
        assert_eq!(
            s.get_json::<Rec>("t", "r").unwrap(),
            Some(Rec {
                a: 1,
                b: "two".into()
            })
        );
        s.put("t", "bad", b"not json").unwrap();
        assert!(matches!(
            s.get_json::<Rec>("t", "bad"),
            Err(StoreError::Decode { .. })
        ));
        s.put("t", "new", br#"{"v":99,"data":{}}"#).unwrap();
        assert!(matches!(
            s.get_json::<Rec>("t", "new"),
            Err(StoreError::TooNew { version: 99, .. })
        ));
        let names = s.trees().unwrap();
        assert!(
            names.contains(&"t".to_string()) && names.contains(&"u".to_string()),
            "{names:?}"
        );
        // A bad record does not hide the good ones from a direct read.
        assert!(s.get_json::<Rec>("t", "r").unwrap().is_some());
        s.flush().unwrap();
    }

    /// A database another handle holds is refused naming the likely cause, after the
    /// short wait a just-closed handle needs; once that handle is gone, it opens.
    #[test]
    fn a_database_in_use_is_refused_with_the_cause_and_opens_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path()).unwrap();
        let e = match SledStore::open(dir.path()) {
            Ok(_) => panic!("two handles on one database"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("could not acquire lock") && e.contains("another tunenet"),
            "{e}"
        );
        drop(first);
        // sled's flusher thread lets go of the lock a moment after the handle is dropped:
        // the open waits for it rather than failing.
        SledStore::open(dir.path()).unwrap();
    }

    #[test]
    fn mem_store_passes_suite() {
        suite(&MemStore::default());
    }

    #[test]
    fn sled_store_passes_suite_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            suite(&s);
            s.put_json(
                "keep",
                "k",
                &Rec {
                    a: 7,
                    b: "kept".into(),
                },
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get_json::<Rec>("keep", "k").unwrap().unwrap().a, 7);
    }
}
