//! Anti-cheat checks over submitted artifacts (DESIGN.md §4): each check is a function of
//! the artifact, the validator's own copy of the base model and the job's bounds, and
//! returns a verdict with its numbers and a reason in words. No I/O beyond reading the
//! model files; no network, no clocks.

mod artifact;
pub mod binding;
mod sketch;

pub use artifact::{ArtifactReport, IntegrityError, check_artifact};
pub use binding::training_subset;
pub use sketch::{Sketch, cosine};
