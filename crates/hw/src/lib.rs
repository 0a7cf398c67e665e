//! Hardware as a verified fact of the network: what a box says it has ([`inventory`]),
//! and a benchmark whose answers a validator checks in `O(n²)` while the miner's work is
//! `O(n³)` ([`bench`]).

pub mod bench;
pub mod inventory;

pub use bench::{Challenge, Dtype, Spec};
pub use inventory::{CpuInfo, GpuInfo, Inventory};
