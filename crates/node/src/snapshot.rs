//! Backups of a node's metadata: every tree and record as JSON lines, restorable into an
//! empty data dir. Blobs are content-addressed and verified on read, so the `blobs/` dir is
//! copied as files (any copy tool will do); the snapshot lists the blobs it refers to.

use crate::error::NodeError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;
use tunenet_store::Store;

const FORMAT: &str = "tunenet-snapshot/1";

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Line {
    Header {
        format: String,
        created_at_ms: u64,
        records: u64,
    },
    Kv {
        tree: String,
        key: String,
        value: String,
    },
}

/// Writes every record of `store` to `out` (atomically: temp file, then rename).
pub fn snapshot(store: &dyn Store, out: &Path) -> Result<u64, NodeError> {
    let io = |e: std::io::Error| {
        NodeError::Other(format!("cannot write snapshot {}: {e}", out.display()))
    };
    let mut lines = Vec::new();
    for tree in store.trees()? {
        for (key, value) in store.scan(&tree, "")? {
            let value = String::from_utf8(value).map_err(|_| {
                NodeError::Other(format!(
                    "record {tree}/{key} is not UTF-8; cannot snapshot it"
                ))
            })?;
            lines.push(Line::Kv {
                tree: tree.clone(),
                key,
                value,
            });
        }
    }
    let tmp = out.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    let header = Line::Header {
        format: FORMAT.into(),
        created_at_ms: tunenet_types::time::now_ms(),
        records: lines.len() as u64,
    };
    for l in std::iter::once(&header).chain(lines.iter()) {
        serde_json::to_writer(&mut f, l).map_err(|e| NodeError::Other(e.to_string()))?;
        f.write_all(b"\n").map_err(io)?;
    }
    f.flush().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(lines.len() as u64)
}

/// Loads a snapshot into `store`, which must be empty unless `force`. The whole file is
/// checked before anything is written, so a damaged snapshot changes nothing.
pub fn restore(store: &dyn Store, from: &Path, force: bool) -> Result<u64, NodeError> {
    let bad = |n: usize, why: String| {
        NodeError::Other(format!("snapshot {} line {n}: {why}", from.display()))
    };
    if !force && !store.trees()?.is_empty() {
        return Err(NodeError::Other(
            "the data dir already holds records: restore into an empty data dir, or pass --force to overwrite".into(),
        ));
    }
    let f = std::fs::File::open(from)
        .map_err(|e| NodeError::Other(format!("cannot read {}: {e}", from.display())))?;
    let mut records = Vec::new();
    let mut expected = None;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| bad(i + 1, e.to_string()))?;
        match serde_json::from_str::<Line>(&line).map_err(|e| bad(i + 1, e.to_string()))? {
            Line::Header {
                format, records: n, ..
            } if i == 0 => {
                if format != FORMAT {
                    return Err(bad(1, format!("format `{format}` is not {FORMAT}")));
                }
                expected = Some(n);
            }
            Line::Header { .. } => return Err(bad(i + 1, "a second header".into())),
            Line::Kv { .. } if i == 0 => {
                return Err(bad(1, "no header: not a tunenet snapshot".into()));
            }
            Line::Kv { tree, key, value } => records.push((tree, key, value)),
        }
    }
    if expected != Some(records.len() as u64) {
        return Err(NodeError::Other(format!(
            "snapshot {} is truncated: header promises {:?} records, found {}",
            from.display(),
            expected,
            records.len()
        )));
    }
    for (tree, key, value) in &records {
        store.put(tree, key, value.as_bytes())?;
    }
    store.flush()?;
    Ok(records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_store::{MemStore, StoreExt};

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let a = MemStore::default();
        a.put_json("jobs", "c/c-0", &serde_json::json!({"phase": "Done"}))
            .unwrap();
        a.put_json("tokens", "abc", &serde_json::json!({"role": "admin"}))
            .unwrap();
        let file = dir.path().join("snap.jsonl");
        assert_eq!(snapshot(&a, &file).unwrap(), 2);
        let b = MemStore::default();
        assert_eq!(restore(&b, &file, false).unwrap(), 2);
        assert_eq!(
            b.get("jobs", "c/c-0").unwrap(),
            a.get("jobs", "c/c-0").unwrap()
        );
        // Not into a store that already holds data, unless forced.
        assert!(
            restore(&b, &file, false)
                .unwrap_err()
                .to_string()
                .contains("--force")
        );
        // A truncated snapshot changes nothing.
        let text = std::fs::read_to_string(&file).unwrap();
        let cut = dir.path().join("cut.jsonl");
        std::fs::write(&cut, text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
        let c = MemStore::default();
        assert!(
            restore(&c, &cut, false)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(c.trees().unwrap().is_empty());
    }
}
