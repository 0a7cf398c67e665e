//! The wire schema (generated from `proto/tunenet/v1/job.proto`) and its conversions to
//! and from `tunenet-types`. Transport-neutral: no tonic, no libp2p here.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tunenet.v1.rs"));
}

mod convert;

pub use convert::ConvertError;
