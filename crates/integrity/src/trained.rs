//! "Trained on this job's data" (DESIGN.md §4.5): per-record loss improvements over the
//! base model (base loss − tuned loss, so each record's own difficulty cancels) on the
//! miner's assigned canaries against never-released siblings, and on a sample of its
//! assigned records against the shard's unassigned ones, each compared with a one-sided
//! Mann–Whitney U test (see [`crate::stats`] for why that test).
//!
//! A significant result is evidence the miner trained on what it was given. Its absence is
//! weak evidence of anything: a short honest run on a small model barely memorises single
//! records. So these verdicts never fail a submission alone; the leakage check at job end
//! reads their p-values to decide how hard to come down on an outlying loss ratio.

use tunenet_types::{IntegritySettings, Outcome, Verdict};

use crate::stats::mann_whitney_greater;

/// Name of the canary verdict.
pub const CANARY_CHECK: &str = "canaries";
/// Name of the assigned-versus-unassigned verdict.
pub const SUBSET_CHECK: &str = "assigned_subset";

/// The two verdicts from per-record improvements (base loss − tuned loss).
pub fn trained_verdicts(
    canaries: &[f64],
    siblings: &[f64],
    assigned: &[f64],
    unassigned: &[f64],
    settings: &IntegritySettings,
) -> Vec<Verdict> {
    vec![
        one(
            CANARY_CHECK,
            "assigned canaries",
            "never-released siblings",
            canaries,
            siblings,
            settings,
        ),
        one(
            SUBSET_CHECK,
            "assigned records",
            "unassigned records of the shard",
            assigned,
            unassigned,
            settings,
        ),
    ]
}

fn one(
    check: &str,
    what: &str,
    against: &str,
    x: &[f64],
    y: &[f64],
    settings: &IntegritySettings,
) -> Verdict {
    let alpha = settings.trained_alpha;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    if x.len() < 2 || y.len() < 2 {
        return Verdict {
            check: check.into(),
            outcome: Outcome::Pass,
            value: None,
            threshold: Some(alpha),
            reason: format!(
                "not tested: {} {what} and {} {against} (at least 2 of each needed)",
                x.len(),
                y.len()
            ),
        };
    }
    let t = mann_whitney_greater(x, y);
    let numbers = format!(
        "{} {what} improved by {:.4} nats on average against {:.4} for {} {against} (one-sided Mann–Whitney U = {}, P(X>Y) = {:.2}, p = {:.4})",
        x.len(),
        mean(x),
        mean(y),
        y.len(),
        t.u,
        t.effect,
        t.p
    );
    Verdict {
        check: check.into(),
        outcome: Outcome::Pass,
        value: Some(t.p),
        threshold: Some(alpha),
        reason: if t.p <= alpha {
            format!("trained on this job's data: {numbers}")
        } else {
            format!("no significant sign of training on them (weak evidence on its own): {numbers}")
        },
    }
}
