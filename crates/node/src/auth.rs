//! Console access: roles, bearer tokens stored only as blake3 hashes (with expiry and
//! revocation), and the audit log of what each token did.

use crate::error::NodeError;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tunenet_store::{Store, StoreExt};
use tunenet_types::time::now_ms;

/// Tree of token records, keyed by token id.
pub const TOKENS: &str = "tokens";
/// Tree of audit entries, keyed by time and sequence.
pub const AUDIT: &str = "audit";

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens.
    Admin,
    /// Runs competitions and miners; no token management.
    Operator,
    /// Sees its own jobs and verdicts, and the public leaderboards.
    Miner,
    /// Reads competitions, leaderboards, miners and events.
    Viewer,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "miner" => Ok(Role::Miner),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role `{other}`: use admin, operator, miner or viewer"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Miner => "miner",
            Role::Viewer => "viewer",
        })
    }
}

/// Kinds of console action, each allowed to some roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read competitions, jobs, miners, events.
    Read,
    /// Read the public leaderboards.
    Leaderboard,
    /// Read one's own jobs.
    OwnJobs,
    /// Create and steer competitions.
    RunCompetitions,
    /// Register, ban and unban miners.
    ManageMiners,
    /// Change integrity settings.
    Integrity,
    /// Issue, list and revoke tokens; read the audit log.
    ManageTokens,
}

impl Role {
    /// Whether this role may do `a`.
    pub fn allows(self, a: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => a != Action::ManageTokens,
            Role::Viewer => matches!(a, Action::Read | Action::Leaderboard),
            Role::Miner => matches!(a, Action::Leaderboard | Action::OwnJobs),
        }
    }
}

/// A stored token: its hash, never the token itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public id (the first 16 hex digits of the hash).
    pub id: String,
    /// blake3 of the token, hex.
    pub hash: String,
    /// The role.
    pub role: Role,
    /// Who holds it.
    pub name: String,
    /// For miner tokens: the miner's peer id.
    pub miner_peer_id: Option<String>,
    /// When it was issued.
    pub created_at_ms: u64,
    /// When it stops working (0: never).
    pub expires_at_ms: u64,
    /// Revoked tokens are refused.
    pub revoked: bool,
}

/// Why a call was refused. Each says what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    /// No token sent.
    #[error(
        "no token: send `authorization: Bearer <token>` (tunenet console --token or TUNENET_TOKEN)"
    )]
    Missing,
    /// Not a known token.
    #[error("unknown token: ask an admin for one (`tunenet console token create`)")]
    Unknown,
    /// Revoked.
    #[error("token {0} was revoked: ask an admin for a new one")]
    Revoked(String),
    /// Expired.
    #[error("token {0} expired: ask an admin for a new one")]
    Expired(String),
    /// The role may not do this.
    #[error("role `{role}` may not {action}")]
    Forbidden {
        /// The caller's role.
        role: Role,
        /// What it tried, in words.
        action: String,
    },
}

fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Issues a token; returns the token (shown once) and its record.
pub fn issue(
    store: &dyn Store,
    role: Role,
    name: &str,
    ttl_secs: u64,
    miner_peer_id: Option<String>,
) -> Result<(String, TokenRecord), NodeError> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = format!("tn_{}", hex::encode(raw));
    let h = hash(&token);
    let now = now_ms();
    let rec = TokenRecord {
        id: h[..16].to_string(),
        hash: h,
        role,
        name: name.to_string(),
        miner_peer_id,
        created_at_ms: now,
        expires_at_ms: if ttl_secs == 0 {
            0
        } else {
            now + ttl_secs * 1000
        },
        revoked: false,
    };
    store.put_json(TOKENS, &rec.id, &rec)?;
    store.flush()?;
    Ok((token, rec))
}

/// Checks a presented token at time `now`.
pub fn verify(store: &dyn Store, token: Option<&str>, now: u64) -> Result<TokenRecord, AuthError> {
    let token = token.ok_or(AuthError::Missing)?;
    let h = hash(token);
    let rec: TokenRecord = store
        .get_json(TOKENS, &h[..16])
        .ok()
        .flatten()
        .filter(|r: &TokenRecord| r.hash == h)
        .ok_or(AuthError::Unknown)?;
    if rec.revoked {
        return Err(AuthError::Revoked(rec.id));
    }
    if rec.expires_at_ms != 0 && now >= rec.expires_at_ms {
        return Err(AuthError::Expired(rec.id));
    }
    Ok(rec)
}

/// Checks that `rec` may do `action` (described as `what` in the refusal).
pub fn permit(rec: &TokenRecord, action: Action, what: &str) -> Result<(), AuthError> {
    if rec.role.allows(action) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            role: rec.role,
            action: what.to_string(),
        })
    }
}

/// Revokes a token by id.
pub fn revoke(store: &dyn Store, id: &str) -> Result<bool, NodeError> {
    let Some(mut rec) = store.get_json::<TokenRecord>(TOKENS, id)? else {
        return Ok(false);
    };
    rec.revoked = true;
    store.put_json(TOKENS, id, &rec)?;
    store.flush()?;
    Ok(true)
}

/// Every token record.
pub fn list(store: &dyn Store) -> Result<Vec<TokenRecord>, NodeError> {
    Ok(store
        .scan_json(TOKENS, "")?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// One audit log entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub at_ms: u64,
    /// Token id and holder.
    pub actor: String,
    /// The token's role (none for a refused login).
    pub role: Option<Role>,
    /// What was done.
    pub action: String,
    /// Details.
    pub detail: String,
}

/// Appends to the audit log.
pub fn audit(store: &dyn Store, who: &TokenRecord, action: &str, detail: &str) {
    let (at, key) = audit_key();
    let e = AuditEntry {
        at_ms: at,
        actor: format!("{} ({})", who.id, who.name),
        role: Some(who.role),
        action: action.to_string(),
        detail: detail.to_string(),
    };
    append(store, &key, &e);
}

/// Appends a refused console login from `from` (an address) to the audit log; `locked`
/// says that this failure locked the address out for a while.
pub fn audit_refused(store: &dyn Store, from: &str, reason: &str, locked: bool) {
    let (at, key) = audit_key();
    let e = AuditEntry {
        at_ms: at,
        actor: format!("unauthenticated, from {from}"),
        role: None,
        action: "login refused".into(),
        detail: if locked {
            format!("{reason}; too many failures: the address is refused for a while")
        } else {
            reason.to_string()
        },
    };
    tracing::warn!(from, reason, locked, "console login refused");
    append(store, &key, &e);
}

/// A new audit entry's time and key: entries sort by time, then in the order this process
/// wrote them (a random suffix keeps keys from two runs apart).
fn audit_key() -> (u64, String) {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let at = now_ms();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut n = [0u8; 4];
    rand::rng().fill_bytes(&mut n);
    (at, format!("{at:016}-{seq:012}-{}", hex::encode(n)))
}

fn append(store: &dyn Store, key: &str, e: &AuditEntry) {
    if let Err(err) = store.put_json(AUDIT, key, e) {
        tracing::error!(error = %err, "could not write the audit log");
    }
}

/// The audit log, oldest first.
pub fn audit_log(store: &dyn Store) -> Result<Vec<AuditEntry>, NodeError> {
    Ok(store
        .scan_json(AUDIT, "")?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_store::MemStore;

    #[test]
    fn tokens_are_hashed_expire_and_revoke() {
        let s = MemStore::default();
        let (tok, rec) = issue(&s, Role::Operator, "op", 10, None).unwrap();
        let raw = s.get(TOKENS, &rec.id).unwrap().unwrap();
        assert!(
            !String::from_utf8_lossy(&raw).contains(&tok),
            "the token itself is never stored"
        );
        assert_eq!(
            verify(&s, Some(&tok), rec.created_at_ms).unwrap().role,
            Role::Operator
        );
        assert_eq!(
            verify(&s, Some(&tok), rec.expires_at_ms),
            Err(AuthError::Expired(rec.id.clone()))
        );
        assert_eq!(verify(&s, None, 0), Err(AuthError::Missing));
        assert_eq!(verify(&s, Some("tn_nope"), 0), Err(AuthError::Unknown));
        revoke(&s, &rec.id).unwrap();
        assert_eq!(
            verify(&s, Some(&tok), rec.created_at_ms),
            Err(AuthError::Revoked(rec.id))
        );
    }

    #[test]
    fn role_boundaries() {
        assert!(Role::Admin.allows(Action::ManageTokens));
        assert!(!Role::Operator.allows(Action::ManageTokens));
        assert!(Role::Operator.allows(Action::RunCompetitions));
        assert!(!Role::Miner.allows(Action::RunCompetitions));
        assert!(!Role::Miner.allows(Action::ManageMiners));
        assert!(!Role::Miner.allows(Action::Read));
        assert!(Role::Miner.allows(Action::OwnJobs));
        assert!(!Role::Viewer.allows(Action::ManageMiners));
        assert!(Role::Viewer.allows(Action::Leaderboard));
    }
}
