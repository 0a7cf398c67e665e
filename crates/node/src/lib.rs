//! The tunenet runtime: configuration, the validator and miner daemons that own an engine,
//! the stores, the ML worker threads and the gRPC servers and clients. The engines decide;
//! this crate carries out their effects and feeds results back.

mod artifact_gossip;
pub mod auth;
pub mod base;
pub mod chaos;
pub mod config;
pub mod console;
pub mod devices;
pub mod error;
pub mod external;
pub mod fetch;
pub mod fuzzing;
pub mod hardware;
pub mod inference;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod miner;
pub mod models;
pub mod presence;
pub mod quorum;
pub mod receipts;
pub mod redteam;
pub mod registry;
pub mod snapshot;
pub mod sources;
pub mod transport;
pub mod validator;
pub mod web;
pub mod wire_redteam;

pub use error::NodeError;
