//! The runtime's error type: each variant says what failed and what to do about it.

use std::path::PathBuf;

/// A daemon could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config file is unreadable or invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong (the field is named).
        reason: String,
    },
    /// The key file is unreadable or invalid.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] tunenet_store::StoreError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] tunenet_store::BlobError),
    /// Model or dataset work failed.
    #[error(transparent)]
    Ml(#[from] tunenet_ml::MlError),
    /// A remote call failed.
    #[error(transparent)]
    Rpc(#[from] tunenet_rpc::RpcError),
    /// The competition spec is unusable.
    #[error("competition `{competition}`: {reason}")]
    Competition {
        /// Which competition.
        competition: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A listening socket could not be opened.
    #[error("cannot listen on {addr}: {reason} (is the port in use?)")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Anything else, in words.
    #[error("{0}")]
    Other(String),
}
