//! Content-addressed blobs on disk: `root/ab/cdef…` named by blake3 hex. Writes go to a
//! temp file and are renamed into place only once the hash is known (and matches, when an
//! id was promised), so a crash never leaves a blob whose bytes differ from its name.

use rand::RngCore;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tunenet_types::BlobId;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with that id is stored.
    #[error("blob {0} is not stored here")]
    NotFound(BlobId),
    /// The bytes do not hash to the expected id.
    #[error("blob bytes hash to {actual}, expected {expected}")]
    HashMismatch {
        /// The promised id.
        expected: BlobId,
        /// What the bytes hash to.
        actual: BlobId,
    },
    /// The blob is larger than allowed.
    #[error("blob is over the size limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// A file-system error.
    #[error("blob store I/O at {path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A directory of blobs named by their blake3.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) a blob store at `root`.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        fs::create_dir_all(root.join("tmp")).map_err(io_err(root))?;
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    /// Where the blob `id` lives (whether or not it is stored).
    pub fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(&hex[2..])
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    /// The stored size of `id`.
    pub fn size(&self, id: &BlobId) -> Result<u64, BlobError> {
        let p = self.path(id);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::NotFound(*id)),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Starts a streamed write with an optional size limit.
    pub fn writer(&self, limit: Option<u64>) -> Result<BlobWriter, BlobError> {
        let mut n = [0u8; 8];
        rand::rng().fill_bytes(&mut n);
        let tmp = self.root.join("tmp").join(hex::encode(n));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            written: 0,
            limit,
        })
    }

    /// Stores `bytes` and returns their id.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobId, BlobError> {
        let mut w = self.writer(None)?;
        w.write_chunk(bytes)?;
        w.finish(None)
    }

    /// Stores a file's contents and returns their id.
    pub fn put_file(&self, path: &Path) -> Result<BlobId, BlobError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let mut w = self.writer(None)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            w.write_chunk(&buf[..n])?;
        }
        w.finish(None)
    }

    /// Reads a whole blob, checking that its bytes still hash to its id.
    pub fn get(&self, id: &BlobId) -> Result<Vec<u8>, BlobError> {
        let p = self.path(id);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound(*id)),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let actual = BlobId::of(&bytes);
        if actual != *id {
            return Err(BlobError::HashMismatch {
                expected: *id,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Checks a stored blob's bytes against its id without keeping them in memory.
    pub fn verify(&self, id: &BlobId) -> Result<(), BlobError> {
        let p = self.path(id);
        let mut f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BlobError::NotFound(*id)
            } else {
                io_err(&p)(e)
            }
        })?;
        let mut h = blake3::Hasher::new();
        io::copy(&mut f, &mut h).map_err(io_err(&p))?;
        let actual: BlobId = h.finalize().into();
        if actual != *id {
            return Err(BlobError::HashMismatch {
                expected: *id,
                actual,
            });
        }
        Ok(())
    }

    /// Copies a stored blob to `dest` (atomically), verifying it on the way.
    pub fn export(&self, id: &BlobId, dest: &Path) -> Result<(), BlobError> {
        let bytes = self.get(id)?;
        let tmp = dest.with_extension("tunenet-tmp");
        fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, dest).map_err(io_err(dest))
    }
}

/// A blob being written: hashed as it streams in, renamed into place by `finish`.
pub struct BlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    written: u64,
    limit: Option<u64>,
}

impl BlobWriter {
    /// Appends bytes; fails once the size limit is passed.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.written += data.len() as u64;
        if let Some(limit) = self.limit
            && self.written > limit
        {
            return Err(BlobError::TooLarge { limit });
        }
        self.hasher.update(data);
        let tmp = self.tmp.clone();
        match self.file.as_mut() {
            Some(f) => f.write_all(data).map_err(io_err(&tmp)),
            None => Err(io_err(&tmp)(io::Error::other("writer already finished"))),
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Finishes: checks the hash against `expected` (if given) and moves the blob into place.
    /// On a mismatch nothing is stored.
    pub fn finish(mut self, expected: Option<BlobId>) -> Result<BlobId, BlobError> {
        let actual: BlobId = self.hasher.finalize().into();
        if let Some(exp) = expected
            && exp != actual
        {
            return Err(BlobError::HashMismatch {
                expected: exp,
                actual,
            });
        }
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io_err(&self.tmp))?;
        }
        let dest = self.store.path(&actual);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::rename(&self.tmp, &dest).map_err(io_err(&dest))?;
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // An unfinished or refused write leaves nothing behind.
        if self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verify() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let id = s.put(b"hello blobs").unwrap();
        assert_eq!(id, BlobId::of(b"hello blobs"));
        assert_eq!(s.get(&id).unwrap(), b"hello blobs");
        assert_eq!(s.size(&id).unwrap(), 11);
        // Corrupt the file on disk: reads must notice.
        fs::write(s.path(&id), b"tampered").unwrap();
        assert!(matches!(s.get(&id), Err(BlobError::HashMismatch { .. })));
        assert!(matches!(s.verify(&id), Err(BlobError::HashMismatch { .. })));
        assert!(matches!(
            s.get(&BlobId::of(b"nope")),
            Err(BlobError::NotFound(_))
        ));
    }

    #[test]
    fn mismatch_and_limit_store_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let mut w = s.writer(None).unwrap();
        w.write_chunk(b"abc").unwrap();
        let wrong = BlobId::of(b"xyz");
        assert!(matches!(
            w.finish(Some(wrong)),
            Err(BlobError::HashMismatch { .. })
        ));
        assert!(!s.contains(&BlobId::of(b"abc")));
        let mut w = s.writer(Some(4)).unwrap();
        w.write_chunk(b"abc").unwrap();
        assert!(matches!(
            w.write_chunk(b"de"),
            Err(BlobError::TooLarge { limit: 4 })
        ));
        drop(w);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }
}
