//! Registered miners: owner, endpoint, bans. The competition's rule of at most five miners
//! per owner is enforced here, on normalised owner names (see [`owner_key`]), and a miner's
//! record can be changed only by its own owner, never while it is banned.

use crate::error::NodeError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tunenet_store::{Store, StoreExt};
use tunenet_types::PeerIdStr;
use unicode_normalization::UnicodeNormalization;

/// Tree of miner records, keyed by peer id.
pub const MINERS: &str = "miners";
/// Most miners one owner may register.
pub const MAX_PER_OWNER: usize = 5;
/// Owner of a miner banned before it was registered: any owner may claim it once unbanned.
pub const UNCLAIMED_OWNER: &str = "-";
/// Longest owner name accepted as typed, before normalising (NFKC can lengthen a name).
const MAX_OWNER_INPUT: usize = 256;
/// Longest normalised owner name.
const MAX_OWNER: usize = 64;

/// The form owner names are stored and compared in: NFKC (fullwidth and other
/// compatibility forms become their plain letters), trimmed, lowercased. `Alice`, ` alice `
/// and `ａｌｉｃｅ` are one owner. Records stored before normalisation are compared through
/// this too, so they need no migration.
pub fn owner_key(owner: &str) -> String {
    owner.nfkc().collect::<String>().trim().to_lowercase()
}

/// Characters that render as nothing, so that names differing only by them look the same.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}' | '\u{034F}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
        )
}

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
        "field `owner`: `{owner}` already has {MAX_PER_OWNER} miners, the most one owner may register (owner names are compared ignoring case, surrounding spaces and Unicode compatibility forms)"
    )]
    OwnerFull {
        /// The owner.
        owner: String,
    },
    /// No such miner.
    #[error("miner {0} is not registered")]
    Unknown(String),
    /// The miner is banned; its record stays as it is.
    #[error(
        "miner {peer_id} is banned ({reason}); it cannot be registered again unless an admin lifts the ban"
    )]
    Banned {
        /// The miner.
        peer_id: String,
        /// Why it was banned.
        reason: String,
    },
    /// The miner is registered to someone else.
    #[error(
        "field `owner`: miner {peer_id} is registered to owner `{owner}`; an owner cannot take another owner's miner"
    )]
    OtherOwner {
        /// The miner.
        peer_id: String,
        /// The owner it is registered to.
        owner: String,
    },
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

/// Registers a miner, or updates the endpoint of one its owner registered before. Refused
/// for a banned miner, for another owner's miner, and for a sixth miner of one owner.
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
    let key = owner_key(owner);
    if owner.len() > MAX_OWNER_INPUT || key.is_empty() || key.len() > MAX_OWNER {
        return Ok(Err(RegistryError::Field {
            field: "owner",
            reason: format!("must be 1-{MAX_OWNER} characters"),
        }));
    }
    if key.chars().any(invisible) {
        return Ok(Err(RegistryError::Field {
            field: "owner",
            reason: "must not contain control or invisible characters".into(),
        }));
    }
    if key == UNCLAIMED_OWNER {
        return Ok(Err(RegistryError::Field {
            field: "owner",
            reason: format!(
                "`{UNCLAIMED_OWNER}` is reserved for miners banned before registration"
            ),
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
    if let Some(e) = existing {
        if e.banned {
            return Ok(Err(RegistryError::Banned {
                peer_id: peer_id.to_string(),
                reason: e.ban_reason.clone(),
            }));
        }
        let theirs = owner_key(&e.owner);
        if theirs != key && theirs != UNCLAIMED_OWNER {
            return Ok(Err(RegistryError::OtherOwner {
                peer_id: peer_id.to_string(),
                owner: e.owner.clone(),
            }));
        }
    }
    let owned = all
        .iter()
        .filter(|r| r.peer_id != peer_id && owner_key(&r.owner) == key)
        .count();
    if owned >= MAX_PER_OWNER {
        return Ok(Err(RegistryError::OwnerFull { owner: key }));
    }
    let rec = MinerRecord {
        peer_id: peer_id.to_string(),
        owner: key,
        endpoint: endpoint.to_string(),
        banned: false,
        ban_reason: String::new(),
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

    fn peer(c: char, n: usize) -> String {
        format!("12D3KooW{}", c.to_string().repeat(n))
    }

    #[test]
    fn a_sixth_miner_for_one_owner_is_refused() {
        let s = MemStore::default();
        for i in 0..5 {
            register(&s, &peer('a', 40 + i), "alice", "", 0)
                .unwrap()
                .unwrap();
        }
        let err = register(&s, &peer('b', 44), "alice", "", 0)
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("owner"), "{err}");
        // Re-registering an existing miner is not a sixth one.
        register(&s, &peer('a', 40), "alice", "http://x:1", 0)
            .unwrap()
            .unwrap();
        let bad = register(&s, "nope", "bob", "", 0).unwrap().unwrap_err();
        assert!(bad.to_string().contains("peer_id"));
    }

    #[test]
    fn owner_names_differing_in_case_spaces_or_width_are_one_owner() {
        let s = MemStore::default();
        let spellings = [
            "alice",
            "Alice",
            " ALICE ",
            "ａｌｉｃｅ",
            "\u{3000}Ａlice\t",
        ];
        for (i, o) in spellings.iter().enumerate() {
            let rec = register(&s, &peer('a', 40 + i), o, "", 0).unwrap().unwrap();
            assert_eq!(rec.owner, "alice", "{o:?} is stored normalised");
        }
        for o in ["alice", "aLiCe", "  alice", "ＡＬＩＣＥ"] {
            let err = register(&s, &peer('b', 44), o, "", 0).unwrap().unwrap_err();
            assert_eq!(
                err,
                RegistryError::OwnerFull {
                    owner: "alice".into()
                },
                "{o:?} escaped the cap"
            );
        }
        assert!(list(&s).unwrap().iter().all(|r| r.owner == "alice"));
        // A different owner is not affected.
        register(&s, &peer('b', 44), "bob", "", 0).unwrap().unwrap();
    }

    #[test]
    fn records_stored_before_normalisation_count_toward_the_cap() {
        let s = MemStore::default();
        for i in 0..5 {
            let rec = MinerRecord {
                peer_id: peer('a', 40 + i),
                owner: [" Alice", "ALICE", "ａｌｉｃｅ", "alice ", "Alice"][i].into(),
                endpoint: String::new(),
                banned: false,
                ban_reason: String::new(),
                registered_at_ms: 7,
            };
            s.put_json(MINERS, &rec.peer_id, &rec).unwrap();
        }
        let err = register(&s, &peer('b', 44), "alice", "", 0)
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, RegistryError::OwnerFull { .. }), "{err}");
        // Its own owner, spelt either way, may still update an old record.
        let rec = register(&s, &peer('a', 42), "Alice", "http://x:1", 99)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                rec.owner.as_str(),
                rec.endpoint.as_str(),
                rec.registered_at_ms
            ),
            ("alice", "http://x:1", 7)
        );
    }

    #[test]
    fn unusable_owner_names_are_refused() {
        let s = MemStore::default();
        for o in [
            "",
            "   ",
            "\u{3000}",
            "-",
            "al\u{200B}ice",
            "a\nb",
            &"x".repeat(65),
        ] {
            let err = register(&s, &peer('a', 40), o, "", 0).unwrap().unwrap_err();
            assert!(
                matches!(err, RegistryError::Field { field: "owner", .. }),
                "{o:?}: {err}"
            );
        }
        assert!(list(&s).unwrap().is_empty());
    }

    #[test]
    fn a_banned_miner_cannot_be_registered_again() {
        let s = MemStore::default();
        let p = peer('a', 40);
        register(&s, &p, "alice", "http://a:1", 5).unwrap().unwrap();
        let banned = set_ban(&s, &p, true, "copied artifacts", 6)
            .unwrap()
            .unwrap();
        for o in ["mallory", "alice"] {
            let err = register(&s, &p, o, "http://m:1", 9).unwrap().unwrap_err();
            assert_eq!(
                err,
                RegistryError::Banned {
                    peer_id: p.clone(),
                    reason: "copied artifacts".into()
                }
            );
            let msg = err.to_string();
            assert!(
                msg.contains("banned") && msg.contains("copied artifacts"),
                "{msg}"
            );
        }
        assert_eq!(list(&s).unwrap(), vec![banned]);
        // Banned before it was ever registered: refused too, and claimable once unbanned.
        let q = peer('b', 40);
        set_ban(&s, &q, true, "spam", 1).unwrap().unwrap();
        let err = register(&s, &q, "bob", "", 2).unwrap().unwrap_err();
        assert!(err.to_string().contains("spam"), "{err}");
        set_ban(&s, &q, false, "", 3).unwrap().unwrap();
        let rec = register(&s, &q, "Bob", "", 4).unwrap().unwrap();
        assert_eq!((rec.owner.as_str(), rec.banned), ("bob", false));
    }

    #[test]
    fn an_owner_cannot_take_another_owners_miner() {
        let s = MemStore::default();
        let p = peer('a', 40);
        let mine = register(&s, &p, "alice", "http://a:1", 5).unwrap().unwrap();
        let err = register(&s, &p, "mallory", "http://m:1", 9)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::OtherOwner {
                peer_id: p.clone(),
                owner: "alice".into()
            }
        );
        assert!(err.to_string().contains("another owner"), "{err}");
        assert_eq!(list(&s).unwrap(), vec![mine]);
        // The owner itself, in any spelling, may move its miner.
        let moved = register(&s, &p, " ALICE", "http://a:2", 9)
            .unwrap()
            .unwrap();
        assert_eq!(
            (moved.endpoint.as_str(), moved.registered_at_ms),
            ("http://a:2", 5)
        );
    }
}
