//! A job's messages, in the order they travel: offer, decision, assignment, commitment,
//! receipt, upload header. Signed messages expose `signing_bytes` so both transports
//! sign and check the very same bytes.

use crate::identity::{Canonical, SignatureError, verify_signature};
use crate::ids::{BlobId, CompetitionId, JobId, PeerIdStr};
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a job asks the miner to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Fine-tune the base model on the assigned shard.
    #[default]
    FineTune,
    /// Run the model over an evaluation shard (HellaSwag layout) as fast as it can.
    Inference,
}

/// The terms of an inference job, sent with its offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceTerms {
    /// Largest drop of `acc_norm` below the validator's reference allowed (absolute).
    pub accuracy_tolerance: f64,
    /// Whether quantised weights (GGUF Q8_0, Q4, ...) may be used.
    pub allow_quantized: bool,
}

impl Default for InferenceTerms {
    fn default() -> Self {
        InferenceTerms {
            accuracy_tolerance: 0.005,
            allow_quantized: true,
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::FineTune => "fine_tune",
            JobKind::Inference => "inference",
        })
    }
}

/// Limits on the miner's training settings that a job allows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HparamBounds {
    /// Largest LoRA rank accepted.
    pub max_lora_rank: u32,
    /// Whether full fine-tuning (all weights) is accepted.
    pub allow_full: bool,
    /// Smallest learning rate accepted.
    pub min_learning_rate: f64,
    /// Largest learning rate accepted.
    pub max_learning_rate: f64,
    /// Longest training sequence, in tokens.
    pub max_seq_len: u32,
}

impl Default for HparamBounds {
    fn default() -> Self {
        HparamBounds {
            max_lora_rank: 64,
            allow_full: true,
            min_learning_rate: 1e-6,
            max_learning_rate: 1e-1,
            max_seq_len: 256,
        }
    }
}

/// A job offered to a miner, before it commits to anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The job.
    pub job_id: JobId,
    /// The competition the job belongs to.
    pub competition_id: CompetitionId,
    /// Fine-tuning or inference.
    pub kind: JobKind,
    /// The offering validator.
    pub validator: PeerIdStr,
    /// The base model's id (blake3 of its manifest).
    pub base_model: BlobId,
    /// The base model's parameter count.
    pub base_params: u64,
    /// Records in the training shard.
    pub dataset_records: u64,
    /// Training time allowed, counted from the assignment.
    pub time_budget_ms: u64,
    /// What the validator expects to pay, informational.
    pub reward_hint: f64,
    /// Hardware the job was sized for, informational (e.g. `cpu`, `1xA100`).
    pub hardware: String,
    /// Where the miner sends its commitment, fetches blobs and uploads: a gRPC URL
    /// today, a multiaddr once the p2p transport carries jobs.
    pub reply_to: String,
    /// The base model's `config.json`, so a miner can estimate the job's memory before
    /// it accepts (empty when unknown).
    #[serde(default)]
    pub model_config: String,
    /// For an inference job, its terms (the shard is the assignment's `train_shard`).
    #[serde(default)]
    pub inference: Option<InferenceTerms>,
    /// The validator's public key (libp2p protobuf encoding); empty on an unsigned offer.
    #[serde(default)]
    pub validator_key: Vec<u8>,
    /// The validator's signature over [`Offer::signing_bytes`]; empty when unsigned.
    #[serde(default)]
    pub signature: Vec<u8>,
}

impl Offer {
    /// The bytes the validator signs: every term, `reply_to` included (a forged offer sent
    /// first must not send the miner's commitment elsewhere).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/v1/offer");
        c.bytes(self.job_id.as_str().as_bytes())
            .bytes(self.competition_id.as_str().as_bytes())
            .u64(matches!(self.kind, JobKind::Inference) as u64)
            .bytes(self.validator.0.as_bytes())
            .bytes(&self.base_model.0)
            .u64(self.base_params)
            .u64(self.dataset_records)
            .u64(self.time_budget_ms)
            .u64(self.reward_hint.to_bits())
            .bytes(self.hardware.as_bytes())
            .bytes(self.reply_to.as_bytes())
            .bytes(self.model_config.as_bytes());
        match &self.inference {
            Some(t) => c
                .u64(1)
                .u64(t.accuracy_tolerance.to_bits())
                .u64(t.allow_quantized as u64),
            None => c.u64(0),
        };
        c.finish()
    }

    /// Signs the offer as `validator` (which must be the validator it names).
    pub fn sign(&mut self, validator: &crate::Identity) {
        self.validator_key = validator.public_key_bytes();
        self.signature = validator.sign(&self.signing_bytes());
    }

    /// Checks that the validator it names signed it, as it stands.
    pub fn verify(&self) -> Result<(), SignatureError> {
        verify_signature(
            &self.validator,
            &self.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
    }
}

/// Why a miner turned an offer down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Already running as many jobs as the policy allows.
    Busy,
    /// The operator paused the miner.
    Paused,
    /// The job kind is not in the policy's list.
    KindNotSupported,
    /// The base model has more parameters than the policy allows.
    ModelTooLarge,
    /// Training the job would need more memory than the miner has.
    InsufficientMemory,
    /// The miner's hardware does not meet the job's requirement.
    Hardware,
    /// The time budget is below the policy's minimum.
    BudgetTooShort,
    /// The time budget is above the policy's maximum.
    BudgetTooLong,
    /// Anything else; the detail says what.
    Other,
}

/// A rejection: a machine-readable code and a sentence for people.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectReason {
    /// Machine-readable cause.
    pub code: RejectCode,
    /// What was wrong, in words.
    pub detail: String,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.detail)
    }
}

/// A miner's answer to an offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// The miner will take the job if assigned.
    Accept,
    /// The miner declines, with the reason.
    Reject(RejectReason),
}

/// The miner's answer with its identity, so the validator learns who sits at an address.
/// An acceptance is signed by the miner it names: whoever answers at an address cannot
/// accept a job in another miner's name (who would then be penalised for not committing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionReply {
    /// The job the decision is about.
    pub job_id: JobId,
    /// The deciding miner.
    pub miner: PeerIdStr,
    /// Accept or reject.
    pub decision: Decision,
    /// The miner's public key (libp2p protobuf encoding); empty on an unsigned reply.
    #[serde(default)]
    pub miner_key: Vec<u8>,
    /// The miner's signature over [`DecisionReply::signing_bytes`]; empty when unsigned.
    #[serde(default)]
    pub signature: Vec<u8>,
}

impl DecisionReply {
    /// An unsigned decision: enough for a refusal (which gives no one a job).
    pub fn unsigned(job_id: JobId, miner: PeerIdStr, decision: Decision) -> Self {
        DecisionReply {
            job_id,
            miner,
            decision,
            miner_key: vec![],
            signature: vec![],
        }
    }

    /// `miner`'s decision on `job_id`, offered by `validator`, signed.
    pub fn signed(
        miner: &crate::Identity,
        job_id: JobId,
        validator: &PeerIdStr,
        decision: Decision,
    ) -> Self {
        let mut d = DecisionReply {
            job_id,
            miner: miner.peer_id(),
            decision,
            miner_key: miner.public_key_bytes(),
            signature: vec![],
        };
        d.signature = miner.sign(&d.signing_bytes(validator));
        d
    }

    /// The bytes the miner signs: the job, the miner, the offering validator (so the
    /// answer cannot be replayed to another) and whether it accepts (a refusal's wording
    /// is not signed).
    pub fn signing_bytes(&self, validator: &PeerIdStr) -> Vec<u8> {
        Canonical::new("tunenet/v1/decision")
            .bytes(self.job_id.as_str().as_bytes())
            .bytes(self.miner.0.as_bytes())
            .bytes(validator.0.as_bytes())
            .u64(matches!(self.decision, Decision::Accept) as u64)
            .finish()
    }

    /// Checks that the miner it names signed it, for an offer from `validator`.
    pub fn verify(&self, validator: &PeerIdStr) -> Result<(), SignatureError> {
        verify_signature(
            &self.miner,
            &self.miner_key,
            &self.signing_bytes(validator),
            &self.signature,
        )
    }
}

/// The go-ahead: the secret nonce, the data to train on, the limits and the deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The job.
    pub job_id: JobId,
    /// The competition.
    pub competition_id: CompetitionId,
    /// The miner this assignment is for.
    pub miner: PeerIdStr,
    /// The validator that signs it.
    pub validator: PeerIdStr,
    /// The validator's public key (libp2p protobuf encoding).
    pub validator_key: Vec<u8>,
    /// A secret sent only now; binds the work to this job and miner.
    pub nonce: [u8; 32],
    /// The base model's manifest blob.
    pub base_model: BlobId,
    /// The training shard blob (JSONL).
    pub train_shard: BlobId,
    /// Limits on the training settings.
    pub hparams: HparamBounds,
    /// Commitments are refused after this instant.
    pub deadline_ms: UnixMillis,
    /// Artifacts above this size are refused.
    pub max_artifact_bytes: u64,
    /// The validator's signature over [`Assignment::signing_bytes`].
    pub signature: Vec<u8>,
}

impl Assignment {
    /// The bytes the validator signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let h = serde_json::to_vec(&self.hparams).unwrap_or_default();
        Canonical::new("tunenet/v1/assignment")
            .bytes(self.job_id.as_str().as_bytes())
            .bytes(self.competition_id.as_str().as_bytes())
            .bytes(self.miner.0.as_bytes())
            .bytes(self.validator.0.as_bytes())
            .bytes(&self.nonce)
            .bytes(&self.base_model.0)
            .bytes(&self.train_shard.0)
            .bytes(&h)
            .u64(self.deadline_ms)
            .u64(self.max_artifact_bytes)
            .finish()
    }

    /// Checks the validator's signature.
    pub fn verify(&self) -> Result<(), SignatureError> {
        verify_signature(
            &self.validator,
            &self.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
    }
}

/// The commitment hash: binds an artifact to the miner, the job and a secret salt, so a
/// commitment reveals nothing and cannot be replayed by another miner.
pub fn commit_hash(artifact: &BlobId, miner: &PeerIdStr, job: &JobId, salt: &[u8; 32]) -> BlobId {
    let mut h = blake3::Hasher::new();
    h.update(b"tunenet/v1/commit");
    h.update(&artifact.0);
    h.update(&(miner.0.len() as u64).to_le_bytes());
    h.update(miner.0.as_bytes());
    h.update(&(job.as_str().len() as u64).to_le_bytes());
    h.update(job.as_str().as_bytes());
    h.update(salt);
    h.finalize().into()
}

/// A miner's signed promise of an artifact, sent before the deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Commitment {
    /// The job.
    pub job_id: JobId,
    /// The committing miner.
    pub miner: PeerIdStr,
    /// The miner's public key (libp2p protobuf encoding).
    pub miner_key: Vec<u8>,
    /// [`commit_hash`] of the artifact.
    pub commit: BlobId,
    /// The artifact's size in bytes (checked at upload).
    pub artifact_size: u64,
    /// The miner's signature over [`Commitment::signing_bytes`].
    pub signature: Vec<u8>,
}

impl Commitment {
    /// The bytes the miner signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        Canonical::new("tunenet/v1/commitment")
            .bytes(self.job_id.as_str().as_bytes())
            .bytes(self.miner.0.as_bytes())
            .bytes(&self.commit.0)
            .u64(self.artifact_size)
            .finish()
    }

    /// Checks the miner's signature and that the key is the miner's.
    pub fn verify(&self) -> Result<(), SignatureError> {
        verify_signature(
            &self.miner,
            &self.miner_key,
            &self.signing_bytes(),
            &self.signature,
        )
    }
}

/// The validator's signed, timestamped acknowledgement of a commitment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: JobId,
    /// The miner whose commitment this acknowledges.
    pub miner: PeerIdStr,
    /// The acknowledged commitment hash.
    pub commit: BlobId,
    /// When the validator received it.
    pub received_at_ms: UnixMillis,
    /// The validator.
    pub validator: PeerIdStr,
    /// The validator's public key.
    pub validator_key: Vec<u8>,
    /// The validator's signature over [`Receipt::signing_bytes`].
    pub signature: Vec<u8>,
}

impl Receipt {
    /// The bytes the validator signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        Canonical::new("tunenet/v1/receipt")
            .bytes(self.job_id.as_str().as_bytes())
            .bytes(self.miner.0.as_bytes())
            .bytes(&self.commit.0)
            .u64(self.received_at_ms)
            .bytes(self.validator.0.as_bytes())
            .finish()
    }

    /// Checks the validator's signature.
    pub fn verify(&self) -> Result<(), SignatureError> {
        verify_signature(
            &self.validator,
            &self.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
    }
}

/// What one validator tells the others about an artifact it received (DESIGN.md §4.3):
/// the artifact's blake3, its delta sketch and the signed receipt of the commitment to it,
/// so that a copy submitted to another validator is caught there too, the earliest signed
/// receipt winning. Signed by the validator that received it (the receipt's signer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The receipt the receiving validator gave for the commitment.
    pub receipt: Receipt,
    /// The revealed artifact (its commitment is `receipt.commit`).
    pub artifact: BlobId,
    /// Its delta sketch (may be empty).
    pub sketch: Vec<f32>,
    /// The validator's signature over [`ArtifactRecord::signing_bytes`].
    pub signature: Vec<u8>,
}

/// Most sketch values an [`ArtifactRecord`] may carry.
pub const MAX_RECORD_SKETCH: usize = 16_384;

impl ArtifactRecord {
    /// The bytes the validator signs: the receipt's own bytes, the artifact and the sketch.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/v1/artifact-record");
        c.bytes(&self.receipt.signing_bytes())
            .bytes(&self.artifact.0)
            .u64(self.sketch.len() as u64);
        for x in &self.sketch {
            c.u64(x.to_bits() as u64);
        }
        c.finish()
    }

    /// Checks both signatures (the receipt's and the record's, by the same validator) and
    /// the sketch's size.
    pub fn verify(&self) -> Result<(), SignatureError> {
        if self.sketch.len() > MAX_RECORD_SKETCH {
            return Err(SignatureError::Malformed(format!(
                "a sketch of {} values is over the limit of {MAX_RECORD_SKETCH}",
                self.sketch.len()
            )));
        }
        self.receipt.verify()?;
        verify_signature(
            &self.receipt.validator,
            &self.receipt.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
    }
}

/// The first message of an artifact upload: what is being revealed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadHeader {
    /// The job.
    pub job_id: JobId,
    /// The uploading miner.
    pub miner: PeerIdStr,
    /// The artifact's blake3.
    pub artifact: BlobId,
    /// The artifact's size.
    pub size: u64,
    /// The salt of the commitment, revealed now.
    pub salt: [u8; 32],
}

/// A miner's view of one of its jobs, for `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerJobStatus {
    /// The job.
    pub job_id: JobId,
    /// The phase, in words (`accepted`, `fetching`, `training`, `committed`, `uploaded`, `failed`).
    pub phase: String,
    /// Training step reached.
    pub step: u64,
    /// Latest training loss.
    pub loss: f32,
    /// A sentence about the job's state.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn commitment_signature_binds_fields() {
        let id = Identity::generate();
        let job = JobId::new("j1").unwrap();
        let art = BlobId::of(b"artifact");
        let salt = [7u8; 32];
        let mut c = Commitment {
            job_id: job.clone(),
            miner: id.peer_id(),
            miner_key: id.public_key_bytes(),
            commit: commit_hash(&art, &id.peer_id(), &job, &salt),
            artifact_size: 8,
            signature: vec![],
        };
        c.signature = id.sign(&c.signing_bytes());
        c.verify().unwrap();
        c.artifact_size = 9;
        assert!(c.verify().is_err());
        // Another miner's commit hash differs for the same artifact and salt.
        let other = Identity::generate();
        assert_ne!(
            commit_hash(&art, &other.peer_id(), &job, &salt),
            commit_hash(&art, &id.peer_id(), &job, &salt)
        );
    }
}
