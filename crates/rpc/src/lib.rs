//! gRPC for tunenet: the generated `MinerService` and `ValidatorService`, servers that
//! forward each call to a backend trait the node implements, and typed clients.
//! No job logic here, and no libp2p.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod services {
    include!(concat!(env!("OUT_DIR"), "/tunenet.v1.rs"));
}

mod client;
mod server;

pub use client::{MinerClient, RpcError, ValidatorClient, endpoint, endpoint_with_ca};
pub use server::{
    MinerBackend, UploadReceiver, UploadSink, ValidatorBackend, miner_server, validator_server,
};
pub use tonic::{Code, Status};

/// Size of the chunks blobs and artifacts travel in.
pub const CHUNK: usize = 1 << 20;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 4 * CHUNK;
