//! Writing safetensors files whose bytes depend on their contents only.
//!
//! The safetensors crate takes a file's `__metadata__` as a `HashMap` and writes its keys
//! in the map's iteration order, which is random per map: two runs writing the same
//! tensors and metadata (an artifact's `format` and manifest) gave files that differed in
//! their header, so identical training had different content hashes. [`write`] writes
//! through the crate, then rewrites the header in place with every key sorted: the same
//! length (the same entries, written compactly), the tensors' bytes untouched.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use candle_core::Tensor;

/// Writes `tensors` and `metadata` to `path` as safetensors with a sorted header. The
/// error says what failed (the write, or the header's rewrite).
pub(crate) fn write(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize_to_file(tensors, Some(meta), path).map_err(|e| e.to_string())?;
    sort_header(path)
}

/// Rewrites the header of the safetensors file at `path` with its keys (tensor names,
/// `__metadata__` and the metadata's own) in sorted order, padded with spaces to its old
/// length as the format allows.
fn sort_header(path: &Path) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot reopen to sort its header: {e}"))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format!("cannot read its header's length: {e}"))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; n];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read its {n}-byte header: {e}"))?;
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format!("its header is not a JSON object: {e}"))?;
    if let Some(meta) = entries.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(meta.take())
            .map_err(|e| format!("its __metadata__ is not a map of strings: {e}"))?;
        *meta = serde_json::Value::Object(sorted.into_iter().map(|(k, v)| (k, v.into())).collect());
    }
    let mut sorted = serde_json::to_vec(&entries).map_err(|e| e.to_string())?;
    if sorted.len() > n {
        return Err(format!(
            "its sorted header ({} bytes) is longer than the written one ({n})",
            sorted.len()
        ));
    }
    sorted.resize(n, b' ');
    file.seek(SeekFrom::Start(8))
        .and_then(|_| file.write_all(&sorted))
        .map_err(|e| format!("cannot rewrite its header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tensors() -> Vec<(String, Tensor)> {
        let d = Device::Cpu;
        vec![
            (
                "b.weight".into(),
                Tensor::arange(0f32, 12.0, &d)
                    .unwrap()
                    .reshape((3, 4))
                    .unwrap(),
            ),
            ("a.bias".into(), Tensor::ones(5, DType::F32, &d).unwrap()),
            ("c.ids".into(), Tensor::arange(0u32, 7, &d).unwrap()),
        ]
    }

    /// Each write builds its own `HashMap` (a fresh random order): without sorting, eight
    /// files with five metadata keys would almost surely not all match.
    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let metadata: BTreeMap<String, String> = (0..5)
            .map(|i| (format!("key{i}"), format!("value \"{i}\" ü\n")))
            .collect();
        let mut files = Vec::new();
        for i in 0..8 {
            let path = dir.path().join(format!("{i}.safetensors"));
            write(&path, tensors(), &metadata).unwrap();
            files.push(std::fs::read(&path).unwrap());
        }
        assert!(files.iter().all(|f| f == &files[0]));

        let bytes = &files[0];
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        let read: BTreeMap<String, String> = meta.metadata().clone().unwrap().into_iter().collect();
        assert_eq!(read, metadata);
        let loaded = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).unwrap();
        for (name, t) in tensors() {
            let got = &loaded[&name];
            assert_eq!(got.dtype(), t.dtype(), "{name}");
            let same = got.eq(&t).unwrap().flatten_all().unwrap().min(0).unwrap();
            assert_eq!(same.to_scalar::<u8>().unwrap(), 1, "{name}");
        }
    }

    #[test]
    fn a_file_that_is_not_safetensors_is_refused_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"[1] ");
        std::fs::write(&path, &bytes).unwrap();
        let err = sort_header(&path).unwrap_err();
        assert!(err.contains("not a JSON object"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }
}
