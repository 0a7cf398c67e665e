//! Gossip payloads: signing miner adverts and competition announcements, and the checks
//! every received gossip message passes before it is accepted (topic, size, decoding,
//! freshness, signature, signer = publisher). Pure functions: time is passed in.

use crate::messages::pb::{CompetitionAnnouncement, MinerAdvert};
use libp2p::PeerId;
use libp2p_identity::Keypair;
use prost::Message;
use tunenet_types::identity::Canonical;
use tunenet_types::{PeerIdStr, UnixMillis, verify_signature};

/// The gossipsub topic of miner adverts.
pub const ADVERT_TOPIC: &str = "tunenet/v1/miner-adverts";
/// The gossipsub topic of competition announcements.
pub const COMPETITION_TOPIC: &str = "tunenet/v1/competitions";
/// The largest miner advert accepted, in bytes.
pub const MAX_ADVERT_BYTES: usize = 4 * 1024;
/// The largest competition announcement accepted, in bytes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 8 * 1024;
/// How far in the future a timestamp may be (clock skew), in milliseconds.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// A gossip message that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub enum Gossip {
    /// A miner advert.
    Advert(MinerAdvert),
    /// A competition announcement.
    Competition(CompetitionAnnouncement),
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
}
