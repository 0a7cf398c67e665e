//! Validator quorum on the validator: its signed view of each competition's standings is
//! gossiped after every scored job (and again on the announcement heartbeat, for validators
//! that join later); other trusted validators' views of the competitions it runs are kept,
//! the latest per validator, and each leaderboard row it serves shows how many validators
//! scored the miner, how many agree with their median, and the outliers with their numbers.

use crate::transport::OnAttestation;
use crate::validator::{Cmd, Validator, leaderboard_of};
use tokio::sync::mpsc;
use tunenet_store::{Store, StoreExt};
use tunenet_types::{Leaderboard, ScoreAttestation};

/// The store tree of other validators' attestations, keyed `competition/validator`.
pub const TREE: &str = "score_attestations";

/// Another validator's attestation arrived: kept if its validator is trusted, it is for a
/// competition this validator runs, and it is newer than the one kept.
pub(crate) fn receive(v: &mut Validator, a: ScoreAttestation) {
    if !v.artifact_gossip.trusts(&a.validator.0) {
        tracing::info!(validator = %a.validator, "score attestation ignored: its validator is not in trusted_validators");
        return;
    }
    if !v.comps.iter().any(|c| c.id() == a.competition.as_str()) {
        tracing::debug!(validator = %a.validator, competition = %a.competition, "score attestation for a competition not run here");
        return;
    }
    let key = format!("{}/{}", a.competition, a.validator);
    match v.store.get_json::<ScoreAttestation>(TREE, &key) {
        Ok(Some(kept)) if kept.issued_at_ms >= a.issued_at_ms => return,
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "a stored score attestation could not be read"),
    }
    if let Err(e) = v.store.put_json(TREE, &key, &a) {
        tracing::warn!(error = %e, "could not store a score attestation");
        return;
    }
    tracing::info!(validator = %a.validator, competition = %a.competition, rows = a.rows.len(), jobs_done = a.jobs_done, "score attestation stored");
}

/// What the p2p event pump does with a valid attestation: queue it for the validator loop.
pub(crate) fn on_attestation(tx: mpsc::Sender<Cmd>) -> OnAttestation {
    Box::new(move |peer, a| {
        let job = Box::new(move |v: &mut Validator| receive(v, a));
        if tx.try_send(Cmd::Run(job)).is_err() {
            tracing::warn!(%peer, "score attestation dropped: the validator loop is busy");
        }
    })
}

/// The other validators' latest attestations of competition `id`.
pub fn attestations(store: &dyn Store, id: &str) -> Vec<ScoreAttestation> {
    store
        .scan_json::<ScoreAttestation>(TREE, &format!("{id}/"))
        .map(|v| v.into_iter().map(|(_, a)| a).collect())
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "stored score attestations could not be read");
            vec![]
        })
}

/// Competition `i`'s leaderboard with each row's quorum, ranked by the median standing
/// across validators when `by_median`.
pub(crate) fn leaderboard(v: &Validator, i: usize, by_median: bool) -> Leaderboard {
    let c = &v.comps[i];
    tunenet_types::with_quorum(
        &v.identity.peer_id(),
        leaderboard_of(&c.engine),
        &attestations(v.store.as_ref(), c.id()),
        v.quorum_tolerance,
        by_median,
    )
}

/// Gossips this validator's signed view of competition `i` (nothing before a job is scored,
/// and nothing without p2p).
pub(crate) fn publish(v: &Validator, i: usize) {
    let Some(client) = v.transport.p2p().cloned() else {
        return;
    };
    let lb = leaderboard_of(&v.comps[i].engine);
    if lb.jobs_done == 0 {
        return;
    }
    let a = ScoreAttestation::of(&lb, &v.identity, tunenet_types::time::now_ms());
    let competition = a.competition.clone();
    tokio::spawn(async move {
        if let Err(e) = client.publish_attestation(a).await {
            tracing::debug!(%competition, error = %e, "score attestation not published");
        }
    });
}
