//! How a blob is cut into chunks that can each be checked on arrival. A chunk is a 1 MiB
//! aligned subtree of the blob's blake3 tree, so its chaining value is an inner node of
//! that tree: the manifest lists every chunk's chaining value, the receiver rebuilds the
//! root from them and compares it with the blob id, and from then on each chunk is
//! checked against its own entry. No hash other than the blob id has to be trusted.

use crate::messages::pb;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use tunenet_types::BlobId;

/// Bytes per chunk (a power of two, at least blake3's 1 KiB chunk).
pub const CHUNK_SIZE: u64 = 1 << 20;

/// The largest blob the protocol moves (bounds the manifest to 2 MiB).
pub const MAX_BLOB_SIZE: u64 = 64 << 30;

/// How many chunks a blob of `size` bytes has.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The length of chunk `index` of a blob of `size` bytes (0 when out of range).
pub fn chunk_len(size: u64, index: u64) -> u64 {
    let start = index.saturating_mul(CHUNK_SIZE);
    size.saturating_sub(start).min(CHUNK_SIZE)
}

/// The chaining value of chunk `index`. Only meaningful when the blob has more than one
/// chunk; `data` must be the whole chunk (non-empty, at most `CHUNK_SIZE`).
fn chunk_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK_SIZE);
    h.update(data);
    h.finalize_non_root()
}

fn subtree_cv(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() <= 1 {
        return cvs.first().copied().unwrap_or_default();
    }
    let left = left_subtree_len(len);
    let n = (left / CHUNK_SIZE) as usize;
    merge_subtrees_non_root(
        &subtree_cv(&cvs[..n], left),
        &subtree_cv(&cvs[n..], len - left),
        Mode::Hash,
    )
}

/// The blob id that the chunk chaining values of a `size`-byte blob add up to; `None`
/// when they cannot describe such a blob (wrong count, or a blob of one chunk or less,
/// whose id is simply the hash of its bytes).
pub fn root_of(cvs: &[ChainingValue], size: u64) -> Option<BlobId> {
    let n = chunk_count(size);
    if n < 2 || cvs.len() as u64 != n {
        return None;
    }
    let left = left_subtree_len(size);
    let k = (left / CHUNK_SIZE) as usize;
    let root = merge_subtrees_root(
        &subtree_cv(&cvs[..k], left),
        &subtree_cv(&cvs[k..], size - left),
        Mode::Hash,
    );
    Some(root.into())
}

/// A manifest that has been checked against its blob id.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The blob.
    pub id: BlobId,
    /// Its size in bytes.
    pub size: u64,
    cvs: Vec<ChainingValue>,
}

impl Manifest {
    /// Checks a manifest received from a peer: chunk size, bounds, and that the chaining
    /// values rebuild `id`. This proves less than it seems: the size field is not covered
    /// by the root, and a peer holding the blob can regroup the tree's inner nodes into a
    /// different chunk count. So the last chunk's length is taken from its bytes, and a
    /// chunk that fails must be cross-checked with the manifest's sender before anyone is
    /// blamed (see `fetch`).
    pub fn verify(pb: &pb::BlobManifest, id: BlobId, max_size: u64) -> Result<Self, String> {
        if u64::from(pb.chunk_size) != CHUNK_SIZE {
            return Err(format!(
                "chunk size {} is not the protocol's {CHUNK_SIZE}",
                pb.chunk_size
            ));
        }
        if pb.size > max_size.min(MAX_BLOB_SIZE) {
            return Err(format!(
                "announced size {} is over the limit of {}",
                pb.size,
                max_size.min(MAX_BLOB_SIZE)
            ));
        }
        let n = chunk_count(pb.size);
        if n == 0 && id != BlobId::of(b"") {
            return Err("an empty blob cannot have this id".into());
        }
        if n < 2 {
            if !pb.chunk_hashes.is_empty() {
                return Err("a single-chunk blob carries no chunk hashes".into());
            }
            return Ok(Manifest {
                id,
                size: pb.size,
                cvs: Vec::new(),
            });
        }
        if pb.chunk_hashes.len() as u64 != n * 32 {
            return Err(format!(
                "{} bytes of chunk hashes for {n} chunks",
                pb.chunk_hashes.len()
            ));
        }
        let cvs: Vec<ChainingValue> = pb
            .chunk_hashes
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        match root_of(&cvs, pb.size) {
            Some(root) if root == id => Ok(Manifest {
                id,
                size: pb.size,
                cvs,
            }),
            _ => Err("chunk hashes do not add up to the blob id".into()),
        }
    }

    /// How many chunks the blob has.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size)
    }

    /// Whether `data` is exactly chunk `index` of this blob. Every chunk but the last is
    /// `CHUNK_SIZE` long; the last one's length is whatever hashes right.
    pub fn check_chunk(&self, index: u64, data: &[u8]) -> bool {
        let n = self.chunks();
        let len = data.len() as u64;
        if index >= n || len == 0 || len > CHUNK_SIZE || (index + 1 < n && len != CHUNK_SIZE) {
            return false;
        }
        if self.cvs.is_empty() {
            return BlobId::of(data) == self.id;
        }
        usize::try_from(index)
            .ok()
            .and_then(|i| self.cvs.get(i))
            .is_some_and(|cv| chunk_cv(index, data) == *cv)
    }

    /// What chunk `index` must hash to as a subtree of the blob (see
    /// `tunenet_store::ChunkedBlobWriter`): its chaining value, or for a blob of one chunk
    /// the blob id itself. `None` past the last chunk.
    pub fn expected_cv(&self, index: u64) -> Option<[u8; 32]> {
        if index >= self.chunks() {
            return None;
        }
        if self.cvs.is_empty() {
            return Some(self.id.0);
        }
        usize::try_from(index)
            .ok()
            .and_then(|i| self.cvs.get(i))
            .copied()
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::BlobManifest {
        pb::BlobManifest {
            size: self.size,
            chunk_size: CHUNK_SIZE as u32,
            chunk_hashes: self.cvs.concat(),
        }
    }

    /// Hashes a stored blob chunk by chunk; fails when its bytes are not `id` (a damaged
    /// store must not be served).
    pub fn of_file(path: &Path, id: BlobId) -> io::Result<Self> {
        let mut f = File::open(path)?;
        let size = f.metadata()?.len();
        if size > MAX_BLOB_SIZE {
            return Err(io::Error::other(format!(
                "blob of {size} bytes is over the protocol's limit"
            )));
        }
        let n = chunk_count(size);
        let mut cvs = Vec::with_capacity(n as usize);
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut whole = blake3::Hasher::new();
        for i in 0..n {
            let len = chunk_len(size, i) as usize;
            f.read_exact(&mut buf[..len])?;
            if n < 2 {
                whole.update(&buf[..len]);
            } else {
                cvs.push(chunk_cv(i, &buf[..len]));
            }
        }
        let actual = if n < 2 {
            Some(BlobId::from(whole.finalize()))
        } else {
            root_of(&cvs, size)
        };
        if actual != Some(id) {
            return Err(io::Error::other(format!(
                "stored bytes of blob {id} no longer hash to its id"
            )));
        }
        Ok(Manifest { id, size, cvs })
    }
}

/// Reads chunk `index` of the file at `path` (of `size` bytes).
pub fn read_chunk(path: &Path, size: u64, index: u64) -> io::Result<Vec<u8>> {
    let len = chunk_len(size, index) as usize;
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(index * CHUNK_SIZE))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: u64) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn manifest_of(data: &[u8]) -> pb::BlobManifest {
        let size = data.len() as u64;
        let n = chunk_count(size);
        let cvs: Vec<ChainingValue> = if n < 2 {
            Vec::new()
        } else {
            (0..n)
                .map(|i| {
                    let s = (i * CHUNK_SIZE) as usize;
                    chunk_cv(i, &data[s..s + chunk_len(size, i) as usize])
                })
                .collect()
        };
        pb::BlobManifest {
            size,
            chunk_size: CHUNK_SIZE as u32,
            chunk_hashes: cvs.concat(),
        }
    }

    #[test]
    fn chunk_hashes_rebuild_the_blake3_of_the_whole() {
        let m = CHUNK_SIZE;
        for size in [0, 1, 1000, m, m + 1, 2 * m, 3 * m + 17, 5 * m - 1, 8 * m] {
            let data = bytes(size);
            let id = BlobId::of(&data);
            let pb = manifest_of(&data);
            let man =
                Manifest::verify(&pb, id, u64::MAX).unwrap_or_else(|e| panic!("size {size}: {e}"));
            for i in 0..man.chunks() {
                let s = (i * m) as usize;
                let chunk = &data[s..s + chunk_len(size, i) as usize];
                assert!(man.check_chunk(i, chunk), "size {size} chunk {i}");
            }
            assert!(!man.check_chunk(man.chunks(), b"x"));
        }
    }

    #[test]
    fn tampered_manifests_and_chunks_are_refused() {
        let data = bytes(3 * CHUNK_SIZE + 5);
        let id = BlobId::of(&data);
        let good = manifest_of(&data);
        let mut bad = good.clone();
        bad.chunk_hashes[40] ^= 1;
        assert!(Manifest::verify(&bad, id, u64::MAX).is_err());
        let mut short = good.clone();
        short.chunk_hashes.truncate(64);
        assert!(Manifest::verify(&short, id, u64::MAX).is_err());
        let mut other_count = good.clone();
        other_count.size += CHUNK_SIZE;
        assert!(Manifest::verify(&other_count, id, u64::MAX).is_err());
        // The size is not covered by the root: a lie within the last chunk passes the
        // manifest check, but the honest last chunk still checks out by its own hash.
        let mut other_size = good.clone();
        other_size.size += 1;
        let lax = Manifest::verify(&other_size, id, u64::MAX).unwrap();
        assert!(lax.check_chunk(3, &data[3 * CHUNK_SIZE as usize..]));
        assert!(!lax.check_chunk(3, &data[3 * CHUNK_SIZE as usize + 1..]));
        let mut empty = good.clone();
        empty.size = 0;
        empty.chunk_hashes.clear();
        assert!(Manifest::verify(&empty, id, u64::MAX).is_err());
        assert!(Manifest::verify(&good, id, 1000).is_err(), "size limit");
        assert!(Manifest::verify(&good, BlobId::of(b"other"), u64::MAX).is_err());

        let man = Manifest::verify(&good, id, u64::MAX).unwrap();
        let mut chunk = data[..CHUNK_SIZE as usize].to_vec();
        assert!(man.check_chunk(0, &chunk));
        assert!(
            !man.check_chunk(1, &chunk),
            "right bytes at the wrong index"
        );
        chunk[7] ^= 0x80;
        assert!(!man.check_chunk(0, &chunk));
        assert!(!man.check_chunk(3, &data[..4]), "short last chunk");
    }

    #[test]
    fn manifest_of_file_refuses_damaged_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let data = bytes(2 * CHUNK_SIZE + 3);
        let id = BlobId::of(&data);
        let path = dir.path().join("b");
        std::fs::write(&path, &data).unwrap();
        let m = Manifest::of_file(&path, id).unwrap();
        assert_eq!(m.to_pb(), manifest_of(&data));
        assert_eq!(
            read_chunk(&path, m.size, 2).unwrap(),
            &data[2 * CHUNK_SIZE as usize..]
        );
        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(Manifest::of_file(&path, id).is_err());
    }
}
