//! Gossip payloads: signing miner adverts and competition announcements, the wire form of
//! validators' artifact records, and the checks every received gossip message passes
//! before it is accepted (topic, size, decoding, freshness, signature, signer = publisher).
//! Pure functions: time is passed in.

use crate::messages::pb::{self, CompetitionAnnouncement, MinerAdvert};
use libp2p::PeerId;
use libp2p_identity::Keypair;
use prost::Message;
use tunenet_types::identity::Canonical;
use tunenet_types::{
    ArtifactRecord, AttestedStanding, BlobId, CompetitionId, MAX_RECORD_SKETCH, PeerIdStr,
    ScoreAttestation, UnixMillis, verify_signature,
};

/// The gossipsub topic of miner adverts.
pub const ADVERT_TOPIC: &str = "tunenet/v1/miner-adverts";
/// The gossipsub topic of competition announcements.
pub const COMPETITION_TOPIC: &str = "tunenet/v1/competitions";
/// The gossipsub topic of validators' signed artifact records.
pub const ARTIFACT_RECORD_TOPIC: &str = "tunenet/v1/artifact-records";
/// The gossipsub topic of validators' signed score attestations.
pub const SCORE_ATTESTATION_TOPIC: &str = "tunenet/v1/score-attestations";
/// The largest score attestation accepted, in bytes (1024 rows of a peer id and numbers).
pub const MAX_ATTESTATION_BYTES: usize = 128 * 1024;
/// The largest miner advert accepted, in bytes.
pub const MAX_ADVERT_BYTES: usize = 4 * 1024;
/// The largest competition announcement accepted, in bytes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 8 * 1024;
/// The largest artifact record accepted, in bytes: the longest sketch allowed (4 bytes a
/// value) and room for the receipt, the ids and the signatures.
pub const MAX_RECORD_BYTES: usize = 4 * MAX_RECORD_SKETCH + 4 * 1024;
/// How far in the future a timestamp may be (clock skew), in milliseconds.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// A gossip message that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub enum Gossip {
    /// A miner advert.
    Advert(MinerAdvert),
    /// A competition announcement.
    Competition(CompetitionAnnouncement),
    /// A validator's record of an artifact it received.
    ArtifactRecord(ArtifactRecord),
    /// A validator's signed view of a competition's standings.
    Attestation(ScoreAttestation),
}

fn sign_bytes(keypair: &Keypair, bytes: &[u8]) -> Vec<u8> {
    // ed25519 signing cannot fail; an empty signature would simply not verify.
    keypair.sign(bytes).unwrap_or_default()
}

impl MinerAdvert {
    /// The canonical bytes the signature covers (every field but the signature).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/p2p/v1/miner-advert");
        c.bytes(self.peer_id.as_bytes())
            .bytes(&self.public_key)
            .bytes(self.hardware.as_bytes())
            .u64(self.job_kinds.len() as u64);
        for k in &self.job_kinds {
            c.u64(*k as u32 as u64);
        }
        c.u64(self.max_model_params)
            .bytes(self.policy.as_bytes())
            .u64(self.price_hint.to_bits())
            .u64(self.timestamp_ms);
        // prost encodes a message's fields in order: the same inventory, the same bytes.
        if let Some(inv) = &self.inventory {
            c.bytes(&prost::Message::encode_to_vec(inv));
        }
        c.finish()
    }

    /// Stamps the advert with `keypair`'s peer id, public key and `now`, and signs it.
    pub fn sign(&mut self, keypair: &Keypair, now: UnixMillis) {
        let public = keypair.public();
        self.peer_id = public.to_peer_id().to_base58();
        self.public_key = public.encode_protobuf();
        self.timestamp_ms = now;
        self.signature = sign_bytes(keypair, &self.signing_bytes());
    }

    /// Checks the signature against the advertised peer id and key.
    pub fn verify(&self) -> Result<(), String> {
        verify_signature(
            &PeerIdStr(self.peer_id.clone()),
            &self.public_key,
            &self.signing_bytes(),
            &self.signature,
        )
        .map_err(|e| e.to_string())
    }
}

impl CompetitionAnnouncement {
    /// The canonical bytes the signature covers (every field but the signature).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/p2p/v1/competition");
        c.bytes(self.competition_id.as_bytes())
            .bytes(self.validator.as_bytes())
            .bytes(&self.public_key)
            .u64(self.kind as u32 as u64)
            .bytes(&self.base_model)
            .u64(self.base_params)
            .u64(self.jobs)
            .u64(self.time_budget_ms)
            .u64(self.reward_hint.to_bits())
            .bytes(self.description.as_bytes())
            .u64(self.timestamp_ms);
        c.finish()
    }

    /// Stamps the announcement with `keypair`'s peer id, public key and `now`, and signs it.
    pub fn sign(&mut self, keypair: &Keypair, now: UnixMillis) {
        let public = keypair.public();
        self.validator = public.to_peer_id().to_base58();
        self.public_key = public.encode_protobuf();
        self.timestamp_ms = now;
        self.signature = sign_bytes(keypair, &self.signing_bytes());
    }

    /// Checks the signature against the announcing validator's id and key.
    pub fn verify(&self) -> Result<(), String> {
        verify_signature(
            &PeerIdStr(self.validator.clone()),
            &self.public_key,
            &self.signing_bytes(),
            &self.signature,
        )
        .map_err(|e| e.to_string())
    }
}

/// The wire form of an artifact record.
pub fn encode_record(record: &ArtifactRecord) -> Vec<u8> {
    pb::ArtifactRecord {
        receipt: Some(record.receipt.clone().into()),
        artifact: record.artifact.0.to_vec(),
        sketch: record.sketch.clone(),
        signature: record.signature.clone(),
    }
    .encode_to_vec()
}

/// Reads an artifact record off the wire (its fields checked, its signatures not).
pub fn decode_record(data: &[u8]) -> Result<ArtifactRecord, String> {
    let r = pb::ArtifactRecord::decode(data).map_err(|e| format!("artifact record: {e}"))?;
    let receipt = r
        .receipt
        .ok_or("artifact record: no receipt")?
        .try_into()
        .map_err(|e| format!("artifact record: receipt: {e}"))?;
    let artifact = BlobId::from_slice(&r.artifact).map_err(|_| {
        format!(
            "artifact record: the artifact id has {} bytes, not 32",
            r.artifact.len()
        )
    })?;
    Ok(ArtifactRecord {
        receipt,
        artifact,
        sketch: r.sketch,
        signature: r.signature,
    })
}

/// The wire form of a score attestation.
pub fn encode_attestation(a: &ScoreAttestation) -> Vec<u8> {
    pb::ScoreAttestation {
        competition: a.competition.to_string(),
        jobs_done: a.jobs_done,
        jobs_total: a.jobs_total,
        rows: a
            .rows
            .iter()
            .map(|r| pb::AttestedStanding {
                miner: r.miner.0.clone(),
                jobs: r.jobs,
                mean_loss: r.mean_loss,
                standing: r.standing,
            })
            .collect(),
        issued_at_ms: a.issued_at_ms,
        validator: a.validator.0.clone(),
        validator_key: a.validator_key.clone(),
        signature: a.signature.clone(),
    }
    .encode_to_vec()
}

/// Reads a score attestation off the wire (its ids checked, its signature not).
pub fn decode_attestation(data: &[u8]) -> Result<ScoreAttestation, String> {
    let a = pb::ScoreAttestation::decode(data).map_err(|e| format!("score attestation: {e}"))?;
    let competition = CompetitionId::new(a.competition)
        .map_err(|e| format!("score attestation: competition: {e}"))?;
    Ok(ScoreAttestation {
        competition,
        jobs_done: a.jobs_done,
        jobs_total: a.jobs_total,
        rows: a
            .rows
            .into_iter()
            .map(|r| AttestedStanding {
                miner: PeerIdStr(r.miner),
                jobs: r.jobs,
                mean_loss: r.mean_loss,
                standing: r.standing,
            })
            .collect(),
        issued_at_ms: a.issued_at_ms,
        validator: PeerIdStr(a.validator),
        validator_key: a.validator_key,
        signature: a.signature,
    })
}

fn check_fresh(timestamp: UnixMillis, now: UnixMillis, max_age_ms: u64) -> Result<(), String> {
    if timestamp > now.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(format!(
            "timestamp {timestamp} is {} ms in the future",
            timestamp - now
        ));
    }
    if now.saturating_sub(timestamp) > max_age_ms {
        return Err(format!(
            "message is stale: signed {} ms ago, the limit is {max_age_ms} ms",
            now - timestamp
        ));
    }
    Ok(())
}

fn check_signer(signer: &str, publisher: Option<&PeerId>) -> Result<PeerId, String> {
    let signer: PeerId = signer
        .parse()
        .map_err(|_| format!("signer {signer:?} is not a peer id"))?;
    match publisher {
        Some(p) if *p != signer => Err(format!("published by {p} but signed by {signer}")),
        _ => Ok(signer),
    }
}

/// Validates one gossip message received on `topic` from `publisher` at `now`. Returns the
/// signer's peer id and the message, or why it must be rejected.
pub fn validate(
    topic: &str,
    data: &[u8],
    publisher: Option<&PeerId>,
    now: UnixMillis,
    max_age_ms: u64,
) -> Result<(PeerId, Gossip), String> {
    match topic {
        ADVERT_TOPIC => {
            if data.len() > MAX_ADVERT_BYTES {
                return Err(format!(
                    "advert of {} bytes is over the limit of {MAX_ADVERT_BYTES}",
                    data.len()
                ));
            }
            let advert = MinerAdvert::decode(data).map_err(|e| format!("advert: {e}"))?;
            check_fresh(advert.timestamp_ms, now, max_age_ms)?;
            let signer = check_signer(&advert.peer_id, publisher)?;
            advert.verify()?;
            Ok((signer, Gossip::Advert(advert)))
        }
        COMPETITION_TOPIC => {
            if data.len() > MAX_ANNOUNCEMENT_BYTES {
                return Err(format!(
                    "announcement of {} bytes is over the limit of {MAX_ANNOUNCEMENT_BYTES}",
                    data.len()
                ));
            }
            let ann =
                CompetitionAnnouncement::decode(data).map_err(|e| format!("announcement: {e}"))?;
            check_fresh(ann.timestamp_ms, now, max_age_ms)?;
            let signer = check_signer(&ann.validator, publisher)?;
            ann.verify()?;
            Ok((signer, Gossip::Competition(ann)))
        }
        ARTIFACT_RECORD_TOPIC => {
            if data.len() > MAX_RECORD_BYTES {
                return Err(format!(
                    "artifact record of {} bytes is over the limit of {MAX_RECORD_BYTES}",
                    data.len()
                ));
            }
            let record = decode_record(data)?;
            // A record stays true however old it is (a copy may be submitted long after the
            // original), so only receipts from the future are refused.
            check_fresh(record.receipt.received_at_ms, now, u64::MAX)?;
            // Only the validator that gave the receipt may tell of it.
            let publisher = publisher.ok_or("an artifact record must come from its signer")?;
            let signer = check_signer(&record.receipt.validator.0, Some(publisher))?;
            record
                .verify()
                .map_err(|e| format!("artifact record: {e}"))?;
            Ok((signer, Gossip::ArtifactRecord(record)))
        }
        SCORE_ATTESTATION_TOPIC => {
            if data.len() > MAX_ATTESTATION_BYTES {
                return Err(format!(
                    "score attestation of {} bytes is over the limit of {MAX_ATTESTATION_BYTES}",
                    data.len()
                ));
            }
            let a = decode_attestation(data)?;
            // A later attestation supersedes an earlier one; only the future is refused.
            check_fresh(a.issued_at_ms, now, u64::MAX)?;
            let publisher = publisher.ok_or("a score attestation must come from its signer")?;
            let signer = check_signer(&a.validator.0, Some(publisher))?;
            a.verify()?;
            Ok((signer, Gossip::Attestation(a)))
        }
        other => Err(format!("unknown topic {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const AGE: u64 = 300_000;

    fn advert(kp: &Keypair) -> MinerAdvert {
        let mut a = MinerAdvert {
            hardware: "1x A100".into(),
            job_kinds: vec![1, 2],
            max_model_params: 7_000_000_000,
            policy: "lora and full, 1-60 min".into(),
            price_hint: 0.5,
            ..Default::default()
        };
        a.sign(kp, NOW);
        a
    }

    fn pid(kp: &Keypair) -> PeerId {
        kp.public().to_peer_id()
    }

    #[test]
    fn a_signed_advert_passes() {
        let kp = Keypair::generate_ed25519();
        let a = advert(&kp);
        let (signer, g) = validate(
            ADVERT_TOPIC,
            &a.encode_to_vec(),
            Some(&pid(&kp)),
            NOW + 1,
            AGE,
        )
        .unwrap();
        assert_eq!(signer, pid(&kp));
        assert_eq!(g, Gossip::Advert(a));
    }

    #[test]
    fn bad_adverts_are_rejected() {
        let kp = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let a = advert(&kp);
        let ok = |a: &MinerAdvert, from: &Keypair, now: u64, topic: &str| {
            validate(topic, &a.encode_to_vec(), Some(&pid(from)), now, AGE)
        };
        let mut tampered = a.clone();
        tampered.max_model_params += 1;
        assert!(
            ok(&tampered, &kp, NOW, ADVERT_TOPIC)
                .unwrap_err()
                .contains("signature")
        );
        assert!(
            ok(&a, &kp, NOW + AGE + 1, ADVERT_TOPIC)
                .unwrap_err()
                .contains("stale")
        );
        assert!(
            ok(&a, &kp, NOW - 60_000, ADVERT_TOPIC)
                .unwrap_err()
                .contains("future")
        );
        assert!(
            ok(&a, &other, NOW, ADVERT_TOPIC)
                .unwrap_err()
                .contains("signed by")
        );
        assert!(
            ok(&a, &kp, NOW, "tunenet/v1/other")
                .unwrap_err()
                .contains("topic")
        );
        let mut big = advert(&kp);
        big.policy = "x".repeat(MAX_ADVERT_BYTES);
        big.sign(&kp, NOW);
        assert!(
            ok(&big, &kp, NOW, ADVERT_TOPIC)
                .unwrap_err()
                .contains("limit")
        );
        assert!(validate(ADVERT_TOPIC, &[0xff, 0xff], None, NOW, AGE).is_err());
    }

    #[test]
    fn announcements_are_signed_and_checked() {
        let kp = Keypair::generate_ed25519();
        let mut c = CompetitionAnnouncement {
            competition_id: "comp1".into(),
            jobs: 4,
            ..Default::default()
        };
        c.sign(&kp, NOW);
        let (_, g) = validate(
            COMPETITION_TOPIC,
            &c.encode_to_vec(),
            Some(&pid(&kp)),
            NOW,
            AGE,
        )
        .unwrap();
        assert_eq!(g, Gossip::Competition(c.clone()));
        c.jobs = 5;
        assert!(validate(COMPETITION_TOPIC, &c.encode_to_vec(), None, NOW, AGE).is_err());
    }

    fn record(id: &tunenet_types::Identity, artifact: &[u8], dim: usize) -> ArtifactRecord {
        let mut receipt = tunenet_types::Receipt {
            job_id: tunenet_types::JobId::new("alpha-0").unwrap(),
            miner: tunenet_types::Identity::generate().peer_id(),
            commit: BlobId::of(b"commit"),
            received_at_ms: NOW - 60_000,
            validator: id.peer_id(),
            validator_key: id.public_key_bytes(),
            signature: vec![],
        };
        receipt.signature = id.sign(&receipt.signing_bytes());
        let mut r = ArtifactRecord {
            receipt,
            artifact: BlobId::of(artifact),
            sketch: (0..dim).map(|i| (i as f32 * 0.37).sin()).collect(),
            signature: vec![],
        };
        r.signature = id.sign(&r.signing_bytes());
        r
    }

    fn check_record(data: &[u8], from: Option<&PeerId>) -> Result<(PeerId, Gossip), String> {
        validate(ARTIFACT_RECORD_TOPIC, data, from, NOW, AGE)
    }

    #[test]
    fn a_signed_artifact_record_passes_however_old() {
        let v = tunenet_types::Identity::generate();
        let me = pid(v.keypair());
        let r = record(&v, b"weights", 4096);
        let wire = encode_record(&r);
        assert!(wire.len() < 20 * 1024, "{} bytes", wire.len());
        let (signer, g) = check_record(&wire, Some(&me)).unwrap();
        assert_eq!(signer, me);
        assert_eq!(g, Gossip::ArtifactRecord(r.clone()));
        let (_, g) =
            validate(ARTIFACT_RECORD_TOPIC, &wire, Some(&me), NOW + 10 * AGE, AGE).unwrap();
        assert_eq!(g, Gossip::ArtifactRecord(r));
    }

    #[test]
    fn bad_artifact_records_are_rejected_with_the_reason() {
        let v = tunenet_types::Identity::generate();
        let me = pid(v.keypair());
        let good = record(&v, b"weights", 64);
        let fails = |r: &ArtifactRecord, from: Option<&PeerId>| {
            check_record(&encode_record(r), from).unwrap_err()
        };
        // Another artifact under the same signature: a copy claimed as the original.
        let mut tampered = good.clone();
        tampered.artifact = BlobId::of(b"someone else's weights");
        assert!(fails(&tampered, Some(&me)).contains("signature"));
        // An earlier receipt time, not re-signed.
        let mut backdated = good.clone();
        backdated.receipt.received_at_ms -= 1;
        assert!(fails(&backdated, Some(&me)).contains("signature"));
        // A record signed by a key that is not the named validator's.
        let forger = tunenet_types::Identity::generate();
        let mut forged = good.clone();
        forged.signature = forger.sign(&forged.signing_bytes());
        assert!(fails(&forged, Some(&me)).contains("signature"));
        // A validator's genuine record, published by another peer.
        let relay = pid(forger.keypair());
        assert!(fails(&good, Some(&relay)).contains("signed by"));
        assert!(fails(&good, None).contains("signer"));
        // A receipt from the future.
        let mut future = good.clone();
        future.receipt.received_at_ms = NOW + 2 * MAX_CLOCK_SKEW_MS;
        future.receipt.signature = v.sign(&future.receipt.signing_bytes());
        future.signature = v.sign(&future.signing_bytes());
        assert!(fails(&future, Some(&me)).contains("future"));
        // Too big to read, though signed; a sketch over its own limit in fewer bytes.
        let big = record(&v, b"weights", MAX_RECORD_SKETCH + 1024);
        assert!(encode_record(&big).len() > MAX_RECORD_BYTES);
        assert!(fails(&big, Some(&me)).contains("bytes is over the limit"));
        let long = record(&v, b"weights", MAX_RECORD_SKETCH + 1);
        assert!(encode_record(&long).len() <= MAX_RECORD_BYTES);
        assert!(fails(&long, Some(&me)).contains("values is over the limit"));
        // Garbage, and a record without its receipt.
        assert!(check_record(&[0xff, 0xff, 0xff], Some(&me)).is_err());
        let bare = pb::ArtifactRecord {
            artifact: vec![1; 32],
            ..Default::default()
        };
        assert!(
            check_record(&bare.encode_to_vec(), Some(&me))
                .unwrap_err()
                .contains("receipt")
        );
    }

    fn attestation(id: &tunenet_types::Identity, rows: usize, at: u64) -> ScoreAttestation {
        let lb = tunenet_types::Leaderboard {
            competition_id: CompetitionId::new("q").unwrap(),
            rows: (0..rows)
                .map(|i| tunenet_types::LeaderboardRow {
                    rank: i as u32 + 1,
                    miner: PeerIdStr(format!("12D3KooW{i:044}")),
                    jobs: 3,
                    mean_loss: Some(1.5),
                    mean_quality: 1.0,
                    standing: 1.0 - i as f64 / 4096.0,
                    verdicts: vec![],
                    acc_norm: None,
                    seconds: None,
                    quorum: None,
                })
                .collect(),
            jobs_done: 3,
            jobs_total: 4,
            kind: Default::default(),
        };
        ScoreAttestation::of(&lb, id, at)
    }

    #[test]
    fn score_attestations_pass_only_from_their_signer_and_unchanged() {
        let v = tunenet_types::Identity::generate();
        let me = pid(v.keypair());
        let check = |a: &ScoreAttestation, from: Option<&PeerId>| {
            validate(
                SCORE_ATTESTATION_TOPIC,
                &encode_attestation(a),
                from,
                NOW,
                AGE,
            )
        };
        let good = attestation(&v, 5, NOW - 10 * AGE);
        let (signer, g) = check(&good, Some(&me)).unwrap();
        assert_eq!(signer, me);
        assert_eq!(g, Gossip::Attestation(good.clone()));
        // The most rows allowed fit the byte limit and the transmit size.
        let full = attestation(&v, tunenet_types::quorum::MAX_ATTESTED_ROWS, NOW);
        assert!(encode_attestation(&full).len() <= MAX_ATTESTATION_BYTES);
        check(&full, Some(&me)).unwrap();
        // `of` keeps the most allowed; one more, signed, is refused.
        let mut over = full.clone();
        over.rows.push(AttestedStanding {
            miner: PeerIdStr("12D3KooWextra".into()),
            jobs: 1,
            mean_loss: None,
            standing: 0.5,
        });
        over.signature = v.sign(&over.signing_bytes());
        let why = check(&over, Some(&me)).map(|_| ()).unwrap_err();
        assert!(why.contains("rows"), "{why}");
        // Changed numbers, another publisher, a forged key, the future.
        let mut t = good.clone();
        t.rows[0].standing = 9.0;
        assert!(check(&t, Some(&me)).unwrap_err().contains("signature"));
        let other = tunenet_types::Identity::generate();
        assert!(
            check(&good, Some(&pid(other.keypair())))
                .unwrap_err()
                .contains("signed by")
        );
        assert!(check(&good, None).unwrap_err().contains("signer"));
        let mut forged = good.clone();
        forged.signature = other.sign(&forged.signing_bytes());
        assert!(check(&forged, Some(&me)).unwrap_err().contains("signature"));
        let future = attestation(&v, 1, NOW + 2 * MAX_CLOCK_SKEW_MS);
        assert!(check(&future, Some(&me)).unwrap_err().contains("future"));
        assert!(validate(SCORE_ATTESTATION_TOPIC, &[0xff; 3], Some(&me), NOW, AGE).is_err());
    }
}
