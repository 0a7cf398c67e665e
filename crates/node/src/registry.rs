//! Registered miners: owner, endpoint, bans. The competition's rule of at most five miners
//! per owner is enforced here.

use crate::error::NodeError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tunenet_store::{Store, StoreExt};
use tunenet_types::PeerIdStr;

/// Tree of miner records, keyed by peer id.
pub const MINERS: &str = "miners";
/// Most miners one owner may register.
pub const MAX_PER_OWNER: usize = 5;

/// A registered miner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerRecord {
    /// The miner's peer id.
    pub peer_id: String,
    /// Who runs it.
    pub owner: String,
    /// Where jobs are offered (empty: only reachable through config or discovery).
    pub endpoint: String,
    /// Banned miners get no assignments.
    pub banned: bool,
    /// Why it was banned.
    pub ban_reason: String,
    /// When it was registered.
    pub registered_at_ms: u64,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    /// A field is unusable.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The owner has the most miners allowed.
    #[error(
        "field `owner`: `{owner}` already has {MAX_PER_OWNER} miners, the most one owner may register"
    )]
    OwnerFull {
        /// The owner.
        owner: String,
    },
    /// No such miner.
    #[error("miner {0} is not registered")]
    Unknown(String),
}

fn check_peer(peer: &str) -> Result<(), RegistryError> {
    let ok =
        peer.len() >= 32 && peer.len() <= 128 && peer.chars().all(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Field {
            field: "peer_id",
            reason: format!("`{peer}` is not a peer id (base58, e.g. 12D3KooW…)"),
        })
    }
}

/// Registers (or updates) a miner.
pub fn register(
    store: &dyn Store,
    peer_id: &str,
    owner: &str,
    endpoint: &str,
    now: u64,
) -> Result<Result<MinerRecord, RegistryError>, NodeError> {
    if let Err(e) = check_peer(peer_id) {
        return Ok(Err(e));
    }
    if owner.is_empty() || owner.len() > 64 {
        return Ok(Err(RegistryError::Field {
            field: "owner",
            reason: "must be 1-64 characters".into(),
        }));
    }
    if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Ok(Err(RegistryError::Field {
            field: "endpoint",
            reason: format!("`{endpoint}` is not a gRPC URL (http://host:port)"),
        }));
    }
    let all = list(store)?;
    let existing = all.iter().find(|r| r.peer_id == peer_id);
    let owned = all
        .iter()
        .filter(|r| r.owner == owner && r.peer_id != peer_id)
        .count();
    if owned >= MAX_PER_OWNER {
        return Ok(Err(RegistryError::OwnerFull {
            owner: owner.to_string(),
        }));
    }
    let rec = MinerRecord {
        peer_id: peer_id.to_string(),
        owner: owner.to_string(),
        endpoint: endpoint.to_string(),
        banned: existing.map(|e| e.banned).unwrap_or(false),
        ban_reason: existing.map(|e| e.ban_reason.clone()).unwrap_or_default(),
        registered_at_ms: existing.map(|e| e.registered_at_ms).unwrap_or(now),
    };
    store.put_json(MINERS, peer_id, &rec)?;
    store.flush()?;
    Ok(Ok(rec))
}

/// Bans or unbans a miner. Unregistered miners are registered as banned under owner `-`.
pub fn set_ban(
    store: &dyn Store,
    peer_id: &str,
    banned: bool,
    reason: &str,
    now: u64,
) -> Result<Result<MinerRecord, RegistryError>, NodeError> {
    if let Err(e) = check_peer(peer_id) {
        return Ok(Err(e));
    }
    if banned && reason.trim().is_empty() {
        return Ok(Err(RegistryError::Field {
            field: "reason",
            reason: "a ban needs a reason the miner can read".into(),
        }));
    }
    let mut rec = match store.get_json::<MinerRecord>(MINERS, peer_id)? {
        Some(r) => r,
        None if banned => MinerRecord {
            peer_id: peer_id.to_string(),
            owner: "-".into(),
            endpoint: String::new(),
            banned: false,
            ban_reason: String::new(),
            registered_at_ms: now,
        },
        None => return Ok(Err(RegistryError::Unknown(peer_id.to_string()))),
    };
    rec.banned = banned;
    rec.ban_reason = if banned {
        reason.to_string()
    } else {
        String::new()
    };
    store.put_json(MINERS, peer_id, &rec)?;
    store.flush()?;
    Ok(Ok(rec))
}

/// Every registered miner.
pub fn list(store: &dyn Store) -> Result<Vec<MinerRecord>, NodeError> {
    Ok(store
        .scan_json(MINERS, "")?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Banned miners and why.
pub fn banned(store: &dyn Store) -> BTreeMap<PeerIdStr, String> {
    list(store)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.banned)
        .map(|r| (PeerIdStr(r.peer_id), r.ban_reason))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_store::MemStore;

    #[test]
    fn a_sixth_miner_for_one_owner_is_refused() {
        let s = MemStore::default();
        for i in 0..5 {
            let peer = format!("12D3KooW{}", "a".repeat(40 + i));
            register(&s, &peer, "alice", "", 0).unwrap().unwrap();
        }
        let err = register(&s, &format!("12D3KooW{}", "b".repeat(44)), "alice", "", 0)
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("owner"), "{err}");
        // Re-registering an existing miner is not a sixth one.
        register(
            &s,
            &format!("12D3KooW{}", "a".repeat(40)),
            "alice",
            "http://x:1",
            0,
        )
        .unwrap()
        .unwrap();
        let bad = register(&s, "nope", "bob", "", 0).unwrap().unwrap_err();
        assert!(bad.to_string().contains("peer_id"));
    }
}
