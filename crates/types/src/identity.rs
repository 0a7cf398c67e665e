//! Node identity: an ed25519 key that is also the node's libp2p identity, so the
//! PeerId in leaderboards and commitments is the one the p2p layer uses.

use crate::ids::PeerIdStr;
use libp2p_identity::{Keypair, PeerId, PublicKey};

/// Why a signature or a key was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    /// The public key bytes do not decode.
    #[error("public key does not decode: {0}")]
    BadKey(String),
    /// The key does not belong to the peer that claims it.
    #[error("public key belongs to {actual}, not to the claimed peer {claimed}")]
    WrongPeer {
        /// The peer named in the message.
        claimed: String,
        /// The peer the key belongs to.
        actual: String,
    },
    /// The signature does not verify over the message's canonical bytes.
    #[error("signature does not verify for peer {0}")]
    Invalid(String),
    /// A key file could not be used.
    #[error("key file: {0}")]
    KeyFile(String),
    /// The signed message is malformed (too large, inconsistent).
    #[error("malformed signed message: {0}")]
    Malformed(String),
}

/// A node's keypair and derived PeerId.
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
    peer_id: PeerId,
}

impl Identity {
    /// A fresh random ed25519 identity.
    pub fn generate() -> Self {
        Self::from_keypair(Keypair::generate_ed25519())
    }

    /// Wraps an existing libp2p keypair.
    pub fn from_keypair(keypair: Keypair) -> Self {
        let peer_id = keypair.public().to_peer_id();
        Identity { keypair, peer_id }
    }

    /// Decodes a key file written by [`Identity::to_protobuf`] (`tunenet keygen`).
    pub fn from_protobuf(bytes: &[u8]) -> Result<Self, SignatureError> {
        let kp = Keypair::from_protobuf_encoding(bytes)
            .map_err(|e| SignatureError::KeyFile(format!("not a libp2p protobuf keypair: {e}")))?;
        if kp.key_type() != libp2p_identity::KeyType::Ed25519 {
            return Err(SignatureError::KeyFile(
                "only ed25519 keys are supported".into(),
            ));
        }
        Ok(Self::from_keypair(kp))
    }

    /// The keypair in libp2p's protobuf encoding (the key file format).
    pub fn to_protobuf(&self) -> Vec<u8> {
        self.keypair.to_protobuf_encoding().unwrap_or_default()
    }

    /// The libp2p keypair, for the p2p layer.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// This node's id.
    pub fn peer_id(&self) -> PeerIdStr {
        PeerIdStr(self.peer_id.to_base58())
    }

    /// The public key in libp2p's protobuf encoding.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.keypair.public().encode_protobuf()
    }

    /// Signs `msg` (already domain-separated canonical bytes).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        // ed25519 signing cannot fail; an empty signature would simply not verify.
        self.keypair.sign(msg).unwrap_or_default()
    }
}

/// Verifies that `sig` is `peer`'s signature over `msg`, given `peer`'s public key bytes.
pub fn verify_signature(
    peer: &PeerIdStr,
    public_key: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<(), SignatureError> {
    let pk = PublicKey::try_decode_protobuf(public_key)
        .map_err(|e| SignatureError::BadKey(e.to_string()))?;
    let actual = pk.to_peer_id().to_base58();
    if actual != peer.0 {
        return Err(SignatureError::WrongPeer {
            claimed: peer.0.clone(),
            actual,
        });
    }
    if pk.verify(msg, sig) {
        Ok(())
    } else {
        Err(SignatureError::Invalid(peer.0.clone()))
    }
}

/// Builds canonical signing bytes: a domain tag, then each field length-prefixed, so no
/// two different messages share bytes.
pub struct Canonical(Vec<u8>);

impl Canonical {
    /// Starts a message of the given domain (e.g. `tunenet/v1/commitment`).
    pub fn new(domain: &str) -> Self {
        let mut c = Canonical(Vec::with_capacity(128));
        c.bytes(domain.as_bytes());
        c
    }
    /// Appends a length-prefixed field.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    /// Appends a u64 field.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// The finished bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_reject() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"msg");
        verify_signature(&a.peer_id(), &a.public_key_bytes(), b"msg", &sig).unwrap();
        assert!(matches!(
            verify_signature(&a.peer_id(), &a.public_key_bytes(), b"other", &sig),
            Err(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            verify_signature(&a.peer_id(), &b.public_key_bytes(), b"msg", &sig),
            Err(SignatureError::WrongPeer { .. })
        ));
        let back = Identity::from_protobuf(&a.to_protobuf()).unwrap();
        assert_eq!(back.peer_id(), a.peer_id());
    }
}
