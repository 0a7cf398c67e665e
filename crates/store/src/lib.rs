//! Persistence: a metadata `Store` trait with a sled implementation (and an in-memory one
//! for tests), and a blake3 content-addressed blob store on disk. Nothing here knows about
//! jobs' meaning; callers pick trees and keys.

mod blobs;
#[cfg(test)]
mod full_disk;
mod meta;

pub use blobs::{BlobError, BlobStore, BlobWriter, ChunkedBlobWriter};
pub use meta::{MemStore, SledStore, Store, StoreError, StoreExt, trees};
