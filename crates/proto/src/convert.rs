//! `From`/`TryFrom` between the wire messages and `tunenet-types`. Every field that
//! comes off the wire is checked here (id syntax, hash lengths) before the engine sees it.

use crate::v1;
use tunenet_types as t;

/// A wire message that does not make a valid domain message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConvertError {
    /// A field is missing or malformed.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn field(field: &'static str, reason: impl ToString) -> ConvertError {
    ConvertError::Field {
        field,
        reason: reason.to_string(),
    }
}

fn job_id(s: &str) -> Result<t::JobId, ConvertError> {
    t::JobId::new(s).map_err(|e| field("job_id", e))
}

fn comp_id(s: &str) -> Result<t::CompetitionId, ConvertError> {
    t::CompetitionId::new(s).map_err(|e| field("competition_id", e))
}

fn blob(name: &'static str, b: &[u8]) -> Result<t::BlobId, ConvertError> {
    t::BlobId::from_slice(b).map_err(|_| field(name, format!("expected 32 bytes, got {}", b.len())))
}

fn peer(name: &'static str, s: &str) -> Result<t::PeerIdStr, ConvertError> {
    if s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(field(name, format!("`{s}` is not a peer id")));
    }
    Ok(t::PeerIdStr(s.to_string()))
}

fn bytes32(name: &'static str, b: &[u8]) -> Result<[u8; 32], ConvertError> {
    b.try_into()
        .map_err(|_| field(name, format!("expected 32 bytes, got {}", b.len())))
}

fn bounded(name: &'static str, b: &[u8], max: usize) -> Result<Vec<u8>, ConvertError> {
    if b.len() > max {
        return Err(field(
            name,
            format!("{} bytes is over the limit of {max}", b.len()),
        ));
    }
    Ok(b.to_vec())
}

impl From<t::JobKind> for v1::JobKind {
    fn from(k: t::JobKind) -> Self {
        match k {
            t::JobKind::FineTune => v1::JobKind::FineTune,
            t::JobKind::Inference => v1::JobKind::Inference,
        }
    }
}

fn kind_from(k: i32) -> Result<t::JobKind, ConvertError> {
    match v1::JobKind::try_from(k) {
        Ok(v1::JobKind::FineTune) => Ok(t::JobKind::FineTune),
        Ok(v1::JobKind::Inference) => Ok(t::JobKind::Inference),
        _ => Err(field("kind", format!("unknown job kind {k}"))),
    }
}

impl From<t::HparamBounds> for v1::HparamBounds {
    fn from(h: t::HparamBounds) -> Self {
        v1::HparamBounds {
            max_lora_rank: h.max_lora_rank,
            allow_full: h.allow_full,
            min_learning_rate: h.min_learning_rate,
            max_learning_rate: h.max_learning_rate,
            max_seq_len: h.max_seq_len,
        }
    }
}

impl From<v1::HparamBounds> for t::HparamBounds {
    fn from(h: v1::HparamBounds) -> Self {
        t::HparamBounds {
            max_lora_rank: h.max_lora_rank,
            allow_full: h.allow_full,
            min_learning_rate: h.min_learning_rate,
            max_learning_rate: h.max_learning_rate,
            max_seq_len: h.max_seq_len,
        }
    }
}

impl From<t::Offer> for v1::Offer {
    fn from(o: t::Offer) -> Self {
        v1::Offer {
            job_id: o.job_id.to_string(),
            competition_id: o.competition_id.to_string(),
            kind: v1::JobKind::from(o.kind) as i32,
            validator: o.validator.0,
            base_model: o.base_model.0.to_vec(),
            base_params: o.base_params,
            dataset_records: o.dataset_records,
            time_budget_ms: o.time_budget_ms,
            reward_hint: o.reward_hint,
            hardware: o.hardware,
            reply_to: o.reply_to,
            model_config: o.model_config,
            inference: o.inference.map(|t| v1::InferenceTerms {
                accuracy_tolerance: t.accuracy_tolerance,
                allow_quantized: t.allow_quantized,
            }),
            validator_key: o.validator_key,
            signature: o.signature,
        }
    }
}

impl TryFrom<v1::Offer> for t::Offer {
    type Error = ConvertError;
    fn try_from(o: v1::Offer) -> Result<Self, ConvertError> {
        if o.hardware.len() > 256 {
            return Err(field("hardware", "longer than 256 bytes"));
        }
        if o.model_config.len() > 64 * 1024 {
            return Err(field("model_config", "longer than 64 KiB"));
        }
        if o.reply_to.is_empty() || o.reply_to.len() > 512 {
            return Err(field(
                "reply_to",
                "must be a non-empty address of at most 512 bytes",
            ));
        }
        Ok(t::Offer {
            job_id: job_id(&o.job_id)?,
            competition_id: comp_id(&o.competition_id)?,
            kind: kind_from(o.kind)?,
            validator: peer("validator", &o.validator)?,
            base_model: blob("base_model", &o.base_model)?,
            base_params: o.base_params,
            dataset_records: o.dataset_records,
            time_budget_ms: o.time_budget_ms,
            reward_hint: o.reward_hint,
            hardware: o.hardware,
            reply_to: o.reply_to,
            model_config: o.model_config,
            inference: match o.inference {
                Some(t) if !(0.0..=1.0).contains(&t.accuracy_tolerance) => {
                    return Err(field(
                        "inference.accuracy_tolerance",
                        "must be between 0 and 1",
                    ));
                }
                Some(t) => Some(t::InferenceTerms {
                    accuracy_tolerance: t.accuracy_tolerance,
                    allow_quantized: t.allow_quantized,
                }),
                None => None,
            },
            validator_key: o.validator_key,
            signature: o.signature,
        })
    }
}

fn code_to(c: t::RejectCode) -> v1::RejectCode {
    match c {
        t::RejectCode::Busy => v1::RejectCode::Busy,
        t::RejectCode::Paused => v1::RejectCode::Paused,
        t::RejectCode::KindNotSupported => v1::RejectCode::KindNotSupported,
        t::RejectCode::ModelTooLarge => v1::RejectCode::ModelTooLarge,
        t::RejectCode::BudgetTooShort => v1::RejectCode::BudgetTooShort,
        t::RejectCode::BudgetTooLong => v1::RejectCode::BudgetTooLong,
        t::RejectCode::Other => v1::RejectCode::Other,
        t::RejectCode::InsufficientMemory => v1::RejectCode::InsufficientMemory,
        t::RejectCode::Hardware => v1::RejectCode::Hardware,
    }
}

fn code_from(c: i32) -> t::RejectCode {
    match v1::RejectCode::try_from(c) {
        Ok(v1::RejectCode::Busy) => t::RejectCode::Busy,
        Ok(v1::RejectCode::Paused) => t::RejectCode::Paused,
        Ok(v1::RejectCode::KindNotSupported) => t::RejectCode::KindNotSupported,
        Ok(v1::RejectCode::ModelTooLarge) => t::RejectCode::ModelTooLarge,
        Ok(v1::RejectCode::BudgetTooShort) => t::RejectCode::BudgetTooShort,
        Ok(v1::RejectCode::BudgetTooLong) => t::RejectCode::BudgetTooLong,
        Ok(v1::RejectCode::InsufficientMemory) => t::RejectCode::InsufficientMemory,
        Ok(v1::RejectCode::Hardware) => t::RejectCode::Hardware,
        _ => t::RejectCode::Other,
    }
}

impl From<t::DecisionReply> for v1::Decision {
    fn from(d: t::DecisionReply) -> Self {
        let (accept, code, reason) = match d.decision {
            t::Decision::Accept => (true, v1::RejectCode::Unspecified, String::new()),
            t::Decision::Reject(r) => (false, code_to(r.code), r.detail),
        };
        v1::Decision {
            job_id: d.job_id.to_string(),
            miner: d.miner.0,
            accept,
            reject_code: code as i32,
            reject_reason: reason,
            miner_key: d.miner_key,
            signature: d.signature,
        }
    }
}

impl TryFrom<v1::Decision> for t::DecisionReply {
    type Error = ConvertError;
    fn try_from(d: v1::Decision) -> Result<Self, ConvertError> {
        let decision = if d.accept {
            t::Decision::Accept
        } else {
            let mut detail = d.reject_reason;
            detail.truncate(1024);
            t::Decision::Reject(t::RejectReason {
                code: code_from(d.reject_code),
                detail,
            })
        };
        Ok(t::DecisionReply {
            job_id: job_id(&d.job_id)?,
            miner: peer("miner", &d.miner)?,
            decision,
            miner_key: d.miner_key,
            signature: d.signature,
        })
    }
}

impl From<t::Assignment> for v1::Assignment {
    fn from(a: t::Assignment) -> Self {
        v1::Assignment {
            job_id: a.job_id.to_string(),
            competition_id: a.competition_id.to_string(),
            miner: a.miner.0,
            validator: a.validator.0,
            validator_key: a.validator_key,
            nonce: a.nonce.to_vec(),
            base_model: a.base_model.0.to_vec(),
            train_shard: a.train_shard.0.to_vec(),
            hparams: Some(a.hparams.into()),
            deadline_ms: a.deadline_ms,
            max_artifact_bytes: a.max_artifact_bytes,
            signature: a.signature,
        }
    }
}

impl TryFrom<v1::Assignment> for t::Assignment {
    type Error = ConvertError;
    fn try_from(a: v1::Assignment) -> Result<Self, ConvertError> {
        Ok(t::Assignment {
            job_id: job_id(&a.job_id)?,
            competition_id: comp_id(&a.competition_id)?,
            miner: peer("miner", &a.miner)?,
            validator: peer("validator", &a.validator)?,
            validator_key: bounded("validator_key", &a.validator_key, 128)?,
            nonce: bytes32("nonce", &a.nonce)?,
            base_model: blob("base_model", &a.base_model)?,
            train_shard: blob("train_shard", &a.train_shard)?,
            hparams: a.hparams.ok_or_else(|| field("hparams", "missing"))?.into(),
            deadline_ms: a.deadline_ms,
            max_artifact_bytes: a.max_artifact_bytes,
            signature: bounded("signature", &a.signature, 128)?,
        })
    }
}

impl From<t::Commitment> for v1::Commitment {
    fn from(c: t::Commitment) -> Self {
        v1::Commitment {
            job_id: c.job_id.to_string(),
            miner: c.miner.0,
            miner_key: c.miner_key,
            commit: c.commit.0.to_vec(),
            artifact_size: c.artifact_size,
            signature: c.signature,
        }
    }
}

impl TryFrom<v1::Commitment> for t::Commitment {
    type Error = ConvertError;
    fn try_from(c: v1::Commitment) -> Result<Self, ConvertError> {
        Ok(t::Commitment {
            job_id: job_id(&c.job_id)?,
            miner: peer("miner", &c.miner)?,
            miner_key: bounded("miner_key", &c.miner_key, 128)?,
            commit: blob("commit", &c.commit)?,
            artifact_size: c.artifact_size,
            signature: bounded("signature", &c.signature, 128)?,
        })
    }
}

impl From<t::Receipt> for v1::Receipt {
    fn from(r: t::Receipt) -> Self {
        v1::Receipt {
            job_id: r.job_id.to_string(),
            miner: r.miner.0,
            commit: r.commit.0.to_vec(),
            received_at_ms: r.received_at_ms,
            validator: r.validator.0,
            validator_key: r.validator_key,
            signature: r.signature,
        }
    }
}

impl TryFrom<v1::Receipt> for t::Receipt {
    type Error = ConvertError;
    fn try_from(r: v1::Receipt) -> Result<Self, ConvertError> {
        Ok(t::Receipt {
            job_id: job_id(&r.job_id)?,
            miner: peer("miner", &r.miner)?,
            commit: blob("commit", &r.commit)?,
            received_at_ms: r.received_at_ms,
            validator: peer("validator", &r.validator)?,
            validator_key: bounded("validator_key", &r.validator_key, 128)?,
            signature: bounded("signature", &r.signature, 128)?,
        })
    }
}

impl From<t::UploadHeader> for v1::UploadHeader {
    fn from(h: t::UploadHeader) -> Self {
        v1::UploadHeader {
            job_id: h.job_id.to_string(),
            miner: h.miner.0,
            artifact: h.artifact.0.to_vec(),
            size: h.size,
            salt: h.salt.to_vec(),
        }
    }
}

impl TryFrom<v1::UploadHeader> for t::UploadHeader {
    type Error = ConvertError;
    fn try_from(h: v1::UploadHeader) -> Result<Self, ConvertError> {
        Ok(t::UploadHeader {
            job_id: job_id(&h.job_id)?,
            miner: peer("miner", &h.miner)?,
            artifact: blob("artifact", &h.artifact)?,
            size: h.size,
            salt: bytes32("salt", &h.salt)?,
        })
    }
}

impl From<t::Leaderboard> for v1::Leaderboard {
    fn from(l: t::Leaderboard) -> Self {
        v1::Leaderboard {
            competition_id: l.competition_id.to_string(),
            rows: l
                .rows
                .into_iter()
                .map(|r| v1::LeaderboardRow {
                    rank: r.rank,
                    miner: r.miner.0,
                    jobs: r.jobs,
                    mean_loss: r.mean_loss,
                    mean_quality: r.mean_quality,
                    standing: r.standing,
                    verdicts: r.verdicts,
                    acc_norm: r.acc_norm,
                    seconds: r.seconds,
                    quorum: r.quorum.map(|q| v1::QuorumRow {
                        validators: q.validators,
                        agreeing: q.agreeing,
                        median_standing: q.median_standing,
                        outliers: q
                            .outliers
                            .into_iter()
                            .map(|o| v1::QuorumOutlier {
                                validator: o.validator.0,
                                standing: o.standing,
                                mean_loss: o.mean_loss,
                                jobs: o.jobs,
                            })
                            .collect(),
                    }),
                })
                .collect(),
            jobs_done: l.jobs_done,
            jobs_total: l.jobs_total,
            kind: v1::JobKind::from(l.kind) as i32,
        }
    }
}

impl TryFrom<v1::Leaderboard> for t::Leaderboard {
    type Error = ConvertError;
    fn try_from(l: v1::Leaderboard) -> Result<Self, ConvertError> {
        Ok(t::Leaderboard {
            competition_id: comp_id(&l.competition_id)?,
            rows: l
                .rows
                .into_iter()
                .map(|r| {
                    Ok(t::LeaderboardRow {
                        rank: r.rank,
                        miner: peer("miner", &r.miner)?,
                        jobs: r.jobs,
                        mean_loss: r.mean_loss,
                        mean_quality: r.mean_quality,
                        standing: r.standing,
                        verdicts: r.verdicts.into_iter().take(64).collect(),
                        acc_norm: r.acc_norm,
                        seconds: r.seconds,
                        quorum: match r.quorum {
                            Some(q) => Some(t::QuorumRow {
                                validators: q.validators,
                                agreeing: q.agreeing,
                                median_standing: q.median_standing,
                                outliers: q
                                    .outliers
                                    .into_iter()
                                    .take(64)
                                    .map(|o| {
                                        Ok(t::Outlier {
                                            validator: peer("validator", &o.validator)?,
                                            standing: o.standing,
                                            mean_loss: o.mean_loss,
                                            jobs: o.jobs,
                                        })
                                    })
                                    .collect::<Result<_, ConvertError>>()?,
                            }),
                            None => None,
                        },
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
            jobs_done: l.jobs_done,
            jobs_total: l.jobs_total,
            kind: if l.kind == 0 {
                t::JobKind::FineTune
            } else {
                kind_from(l.kind)?
            },
        })
    }
}

impl From<t::MinerJobStatus> for v1::JobStatus {
    fn from(s: t::MinerJobStatus) -> Self {
        v1::JobStatus {
            job_id: s.job_id.to_string(),
            phase: s.phase,
            step: s.step,
            loss: s.loss,
            detail: s.detail,
            device: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commitment_round_trips_and_bad_hash_is_named() {
        let id = t::Identity::generate();
        let c = t::Commitment {
            job_id: t::JobId::new("j").unwrap(),
            miner: id.peer_id(),
            miner_key: id.public_key_bytes(),
            commit: t::BlobId::of(b"x"),
            artifact_size: 3,
            signature: vec![1, 2],
        };
        let wire: v1::Commitment = c.clone().into();
        assert_eq!(t::Commitment::try_from(wire.clone()).unwrap(), c);
        let mut bad = wire;
        bad.commit = vec![1, 2, 3];
        let err = t::Commitment::try_from(bad).unwrap_err();
        assert!(err.to_string().contains("commit"), "{err}");
    }
}
