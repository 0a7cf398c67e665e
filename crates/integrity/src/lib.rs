//! Anti-cheat checks over submitted artifacts (DESIGN.md §4): each check is a function of
//! the artifact, the validator's own copy of the base model and the job's bounds (or of
//! per-record losses the caller measured), and returns a verdict with its numbers and a
//! reason in words. No I/O beyond reading the model files; no network, no clocks.

mod artifact;
pub mod binding;
pub mod canary;
pub mod inference;
mod sketch;
pub mod stats;
mod trained;

pub use artifact::{ArtifactReport, IntegrityError, check_artifact};
pub use binding::training_subset;
pub use canary::{
    JobCanaries, MinerProbe, hold_out, miner_probe, pick_candidates, plant, plant_repeated,
    plant_with_alternatives,
};
pub use sketch::{Sketch, cosine};
pub use stats::{MannWhitney, mann_whitney_greater, median};
pub use trained::{
    CANARY_CHECK, EXPOSURE_CHECK, SUBSET_CHECK, exposure_verdict, subset_verdict, trained_verdicts,
};
