//! Identifiers: content ids (blake3), job, competition and peer ids.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid id.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdError {
    /// A blob id must be 64 lowercase hex characters (a blake3 hash).
    #[error("`{0}` is not a blob id: expected 64 hex characters (a blake3 hash)")]
    BadBlobId(String),
    /// Job and competition ids are short printable names.
    #[error("`{0}` is not a valid id: use 1-64 characters from [A-Za-z0-9._-]")]
    BadName(String),
}

/// A blake3 content id: the hash of a blob's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        BlobId(*blake3::hash(bytes).as_bytes())
    }
    /// Lowercase hex, as used in file names and messages.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Parses a raw 32-byte id.
    pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| IdError::BadBlobId(hex::encode(b)))?;
        Ok(BlobId(arr))
    }
}

impl From<blake3::Hash> for BlobId {
    fn from(h: blake3::Hash) -> Self {
        BlobId(*h.as_bytes())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_hex()[..12])
    }
}

impl FromStr for BlobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bytes = hex::decode(s).map_err(|_| IdError::BadBlobId(s.to_string()))?;
        BlobId::from_slice(&bytes).map_err(|_| IdError::BadBlobId(s.to_string()))
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if valid_name(&s) { Ok($name(s)) } else { Err(IdError::BadName(s)) }
            }
            /// The name as a string slice.
            pub fn as_str(&self) -> &str { &self.0 }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> { $name::new(s) }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String { id.0 }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> { $name::new(s) }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
    };
}

name_id!(
    /// A job's id, unique within a validator (e.g. `comp1-0`).
    JobId
);
name_id!(
    /// A competition's id, chosen by the admin.
    CompetitionId
);

/// A node's id: the base58 libp2p PeerId derived from its ed25519 key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct PeerIdStr(pub String);

impl fmt::Display for PeerIdStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_round_trips_and_rejects_garbage() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_hex().parse::<BlobId>().unwrap(), id);
        assert!(matches!(
            "xyz".parse::<BlobId>(),
            Err(IdError::BadBlobId(_))
        ));
        assert!("ab".repeat(31).parse::<BlobId>().is_err());
    }

    #[test]
    fn names_are_bounded() {
        assert!(JobId::new("comp-1.0_a").is_ok());
        assert!(JobId::new("").is_err());
        assert!(JobId::new("a/b").is_err());
        assert!(JobId::new("x".repeat(65)).is_err());
    }
}
