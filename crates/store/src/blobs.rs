//! Content-addressed blobs on disk: `root/ab/cdef…` named by blake3 hex. Writes go to a
//! temp file and are renamed into place only once the hash is known (and matches, when an
//! id was promised), so a crash never leaves a blob whose bytes differ from its name.

use rand::RngCore;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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

/// A blob written chunk by chunk, in any order and from several threads, whose id is
/// known in advance: each chunk is hashed once, as a subtree of the blob's blake3 tree, and
/// written at its offset only if it matches the chaining value the caller expects;
/// `finish` rebuilds the root from the chaining values of the bytes actually written, so
/// a stored blob always hashes to its name whatever the caller claimed. Chunks are
/// `chunk_size` bytes (a power of two, at least blake3's 1 KiB chunk) except the last,
/// which may be shorter; a blob of one chunk is checked against the id itself.
pub struct ChunkedBlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Mutex<Option<File>>,
    id: BlobId,
    chunks: u64,
    chunk_size: u64,
    limit: Option<u64>,
    state: Mutex<ChunkState>,
}

struct ChunkState {
    /// The chaining value of each chunk written (the root hash for a one-chunk blob).
    cvs: Vec<Option<[u8; 32]>>,
    /// The last chunk's length once written.
    last_len: u64,
    /// Chunks written so far.
    have: u64,
}

fn invalid_input(path: &Path, msg: String) -> BlobError {
    io_err(path)(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

fn tree_cv(cvs: &[[u8; 32]], chunk_size: u64, len: u64) -> [u8; 32] {
    use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_non_root};
    if cvs.len() <= 1 {
        return cvs.first().copied().unwrap_or_default();
    }
    let left = left_subtree_len(len);
    let n = (left / chunk_size) as usize;
    merge_subtrees_non_root(
        &tree_cv(&cvs[..n], chunk_size, left),
        &tree_cv(&cvs[n..], chunk_size, len - left),
        Mode::Hash,
    )
}

impl BlobStore {
    /// Starts a [`ChunkedBlobWriter`] for blob `id` of `chunks` chunks of `chunk_size`
    /// bytes (the last one 1 to `chunk_size` bytes), refusing to grow past `limit`.
    pub fn chunked_writer(
        &self,
        id: BlobId,
        chunks: u64,
        chunk_size: u64,
        limit: Option<u64>,
    ) -> Result<ChunkedBlobWriter, BlobError> {
        if !chunk_size.is_power_of_two() || chunk_size < 1024 {
            return Err(invalid_input(
                &self.root,
                format!("chunk size {chunk_size} is not a power of two of at least 1 KiB"),
            ));
        }
        let slots = usize::try_from(chunks)
            .ok()
            .filter(|_| chunks.checked_mul(chunk_size).is_some())
            .ok_or_else(|| invalid_input(&self.root, format!("{chunks} chunks is too many")))?;
        if let Some(limit) = limit
            && chunks > 0
            && (chunks - 1) * chunk_size + 1 > limit
        {
            return Err(BlobError::TooLarge { limit });
        }
        let mut n = [0u8; 8];
        rand::rng().fill_bytes(&mut n);
        let tmp = self.root.join("tmp").join(hex::encode(n));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(ChunkedBlobWriter {
            store: self.clone(),
            tmp,
            file: Mutex::new(Some(file)),
            id,
            chunks,
            chunk_size,
            limit,
            state: Mutex::new(ChunkState {
                cvs: vec![None; slots],
                last_len: 0,
                have: 0,
            }),
        })
    }
}

impl ChunkedBlobWriter {
    fn state(&self) -> std::sync::MutexGuard<'_, ChunkState> {
        // The state is consistent after every statement, so a panicked writer's is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hashes `data` as chunk `index` and, only if it matches `expected` (the chunk's
    /// chaining value, or the blob id for a one-chunk blob), writes it at its offset.
    /// Returns whether it was written; a chunk of the wrong length is refused too.
    /// Writing a chunk again replaces it.
    pub fn write_chunk_at(
        &self,
        index: u64,
        data: &[u8],
        expected: &[u8; 32],
    ) -> Result<bool, BlobError> {
        let len = data.len() as u64;
        let last = index + 1 == self.chunks;
        if index >= self.chunks
            || len == 0
            || len > self.chunk_size
            || (!last && len != self.chunk_size)
        {
            return Ok(false);
        }
        let offset = index * self.chunk_size;
        if let Some(limit) = self.limit
            && offset + len > limit
        {
            return Err(BlobError::TooLarge { limit });
        }
        let cv: [u8; 32] = if self.chunks == 1 {
            *blake3::hash(data).as_bytes()
        } else {
            use blake3::hazmat::HasherExt;
            let mut h = blake3::Hasher::new();
            h.set_input_offset(offset);
            h.update(data);
            h.finalize_non_root()
        };
        if cv != *expected {
            return Ok(false);
        }
        {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let Some(f) = file.as_mut() else {
                return Err(io_err(&self.tmp)(io::Error::other(
                    "writer already finished",
                )));
            };
            f.seek(SeekFrom::Start(offset))
                .and_then(|_| f.write_all(data))
                .map_err(io_err(&self.tmp))?;
        }
        let mut st = self.state();
        let ChunkState {
            cvs,
            last_len,
            have,
        } = &mut *st;
        if let Some(slot) = cvs.get_mut(index as usize)
            && slot.replace(cv).is_none()
        {
            *have += 1;
        }
        if last {
            *last_len = len;
        }
        Ok(true)
    }

    /// Whether chunk `index` has been written.
    pub fn has(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.state().cvs.get(i).copied())
            .flatten()
            .is_some()
    }

    /// How many chunks have been written.
    pub fn written_chunks(&self) -> u64 {
        self.state().have
    }

    /// Finishes: every chunk must have been written and their chaining values must add up
    /// to the id; then the blob is moved into place. Returns the blob's size. On any
    /// failure nothing is stored.
    pub fn finish(self) -> Result<u64, BlobError> {
        let (cvs, size) = {
            let st = self.state();
            let cvs: Option<Vec<[u8; 32]>> = st.cvs.iter().copied().collect();
            let size = self.chunks.saturating_sub(1) * self.chunk_size + st.last_len;
            (cvs, size)
        };
        let Some(cvs) = cvs else {
            return Err(io_err(&self.tmp)(io::Error::other(format!(
                "blob {} is missing chunks",
                self.id
            ))));
        };
        let actual: BlobId = match cvs.len() {
            0 => BlobId::of(b""),
            1 => BlobId(cvs[0]),
            _ => {
                use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_root};
                let left = left_subtree_len(size);
                let k = (left / self.chunk_size) as usize;
                let root = merge_subtrees_root(
                    &tree_cv(&cvs[..k], self.chunk_size, left),
                    &tree_cv(&cvs[k..], self.chunk_size, size - left),
                    Mode::Hash,
                );
                root.into()
            }
        };
        if actual != self.id {
            return Err(BlobError::HashMismatch {
                expected: self.id,
                actual,
            });
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = file {
            f.set_len(size).map_err(io_err(&self.tmp))?;
            f.sync_all().map_err(io_err(&self.tmp))?;
        }
        let dest = self.store.path(&actual);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::rename(&self.tmp, &dest).map_err(io_err(&dest))?;
        Ok(size)
    }
}

impl Drop for ChunkedBlobWriter {
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

    /// The chaining value a sender would list for chunk `i` of `data`.
    fn cv(data: &[u8], chunk: usize, i: usize) -> [u8; 32] {
        use blake3::hazmat::HasherExt;
        let end = ((i + 1) * chunk).min(data.len());
        let mut h = blake3::Hasher::new();
        h.set_input_offset((i * chunk) as u64);
        h.update(&data[i * chunk..end]);
        h.finalize_non_root()
    }

    #[test]
    fn chunked_writes_in_any_order_store_exactly_the_promised_blob() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let chunk = 4096;
        for len in [1usize, 100, 4096, 4097, 3 * 4096, 5 * 4096 + 7, 8 * 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let id = BlobId::of(&data);
            let n = len.div_ceil(chunk);
            let w = s.chunked_writer(id, n as u64, chunk as u64, None).unwrap();
            for i in (0..n).rev() {
                let part = &data[i * chunk..((i + 1) * chunk).min(len)];
                let expected = if n == 1 { id.0 } else { cv(&data, chunk, i) };
                if n > 1 {
                    // Right bytes at the wrong place, or wrong bytes: not written.
                    let other = (i + 1) % n;
                    assert!(!w.write_chunk_at(other as u64, part, &expected).unwrap());
                }
                let mut bad = part.to_vec();
                bad[0] ^= 1;
                assert!(!w.write_chunk_at(i as u64, &bad, &expected).unwrap());
                assert!(!w.has(i as u64));
                assert!(w.write_chunk_at(i as u64, part, &expected).unwrap());
            }
            assert_eq!(w.written_chunks(), n as u64);
            assert_eq!(w.finish().unwrap(), len as u64, "len {len}");
            assert_eq!(s.get(&id).unwrap(), data);
        }
    }

    #[test]
    fn chunked_writer_refuses_missing_chunks_lies_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let chunk = 1024;
        let data: Vec<u8> = (0..3 * chunk).map(|i| (i % 13) as u8).collect();
        let id = BlobId::of(&data);
        let w = s.chunked_writer(id, 3, chunk as u64, None).unwrap();
        assert!(
            w.write_chunk_at(0, &data[..chunk], &cv(&data, chunk, 0))
                .unwrap()
        );
        assert!(w.finish().is_err(), "two chunks missing");
        // Chaining values of other bytes: each chunk matches what the caller expected,
        // but they do not add up to the id, so nothing is stored under it.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
        let w = s.chunked_writer(id, 3, chunk as u64, None).unwrap();
        for i in 0..3 {
            let part = &other[i * chunk..(i + 1) * chunk];
            assert!(
                w.write_chunk_at(i as u64, part, &cv(&other, chunk, i))
                    .unwrap()
            );
        }
        assert!(matches!(w.finish(), Err(BlobError::HashMismatch { .. })));
        assert!(!s.contains(&id) && !s.contains(&BlobId::of(&other)));
        assert!(matches!(
            s.chunked_writer(id, 3, chunk as u64, Some(2 * chunk as u64)),
            Err(BlobError::TooLarge { .. })
        ));
        assert!(
            s.chunked_writer(id, 3, 1000, None).is_err(),
            "not a power of two"
        );
        let w = s
            .chunked_writer(id, 3, chunk as u64, Some(2 * chunk as u64 + 10))
            .unwrap();
        assert!(matches!(
            w.write_chunk_at(2, &data[2 * chunk..], &cv(&data, chunk, 2)),
            Err(BlobError::TooLarge { .. })
        ));
        drop(w);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }
}
