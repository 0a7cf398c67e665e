//! Plain data shared by every tunenet crate: ids, job messages, verdicts and scores.
//! Serde only: nothing here does I/O. Canonical signing bytes live beside each signed
//! message so that both transports sign and verify exactly the same bytes.

pub mod identity;
pub mod ids;
pub mod job;
pub mod model;
pub mod quorum;
pub mod receipt;
pub mod score;
pub mod stats;
pub mod time;

pub use identity::{Identity, SignatureError, verify_signature};
pub use ids::{BlobId, CompetitionId, IdError, JobId, PeerIdStr};
pub use job::*;
pub use model::{ManifestError, ModelFile, ModelManifest};
pub use quorum::{
    AttestedStanding, DEFAULT_QUORUM_TOLERANCE, Outlier, QuorumRow, ScoreAttestation, quorum,
    with_quorum,
};
pub use receipt::{
    EvaluationReceipt, LossComparison, ReceiptError, compare_losses, loss_proof, losses_root,
    verify_loss,
};
pub use score::*;
pub use time::UnixMillis;
