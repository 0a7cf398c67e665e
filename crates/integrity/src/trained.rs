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

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tunenet_types::{IntegritySettings, Outcome, Verdict};

use crate::stats::mann_whitney_greater;

/// Name of the canary verdict.
pub const CANARY_CHECK: &str = "canaries";
/// Name of the exposure-test verdict (canaries with alternatives).
pub const EXPOSURE_CHECK: &str = "canary_exposure";
/// Name of the assigned-versus-unassigned verdict.
pub const SUBSET_CHECK: &str = "assigned_subset";

/// Relabellings drawn for the exposure test's permutation p-value (its resolution).
const EXPOSURE_DRAWS: usize = 20_000;

/// The exposure test (after Carlini et al.'s "secret sharer" exposure): for each assigned
/// canary, the model's gain (base − tuned, summed over the record's target tokens) on the
/// planted record against its gains on the canary's never-released alternatives, which
/// were drawn exactly alike. `groups[i]` is canary `i`'s gains, the planted one first.
///
/// The statistic is the sum over canaries of the planted record's gain less its group's
/// mean (in standard units of the group when it has two alternatives or more). A model that never saw the canaries cannot tell the planted record from
/// its alternatives, so each group's label is uniform over its members; the p-value is the
/// share of random relabellings (one uniform pick per group) whose statistic is at least as
/// large, so it is exact whatever the model, and its false-"trained" rate is `p` itself.
/// A model trained on its subset has seen each canary several times and gains on it more.
pub fn exposure_verdict(groups: &[Vec<f64>], settings: &IntegritySettings) -> Verdict {
    let alpha = settings.trained_alpha;
    let groups: Vec<&Vec<f64>> = groups
        .iter()
        .filter(|g| g.len() >= 2 && g.iter().all(|x| x.is_finite()))
        .collect();
    if groups.len() < 2 {
        return Verdict {
            check: EXPOSURE_CHECK.into(),
            outcome: Outcome::Pass,
            value: None,
            threshold: Some(alpha),
            reason: format!(
                "not tested: {} assigned canaries with alternatives scored (at least 2 needed)",
                groups.len()
            ),
        };
    }
    // Each group centred on its mean and, with at least two alternatives, in standard
    // units (a pair's standardised values are always ±1, which would throw its size away).
    let z: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let sd = (g.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
            let scale = if g.len() >= 3 && sd > 1e-12 { sd } else { 1.0 };
            g.iter().map(|x| (x - mean) / scale).collect()
        })
        .collect();
    let observed: f64 = z.iter().map(|g| g[0]).sum();
    let mut rng = StdRng::seed_from_u64(0x6578_706f_7375_7265);
    let mut at_least = 0usize;
    for _ in 0..EXPOSURE_DRAWS {
        let t: f64 = z.iter().map(|g| g[rng.random_range(0..g.len())]).sum();
        if t >= observed - 1e-12 {
            at_least += 1;
        }
    }
    let p = (at_least + 1) as f64 / (EXPOSURE_DRAWS + 1) as f64;
    let first = groups
        .iter()
        .filter(|g| g[1..].iter().all(|x| g[0] > *x))
        .count();
    let mean_rank = groups
        .iter()
        .map(|g| 1 + g[1..].iter().filter(|x| **x >= g[0]).count())
        .sum::<usize>() as f64
        / groups.len() as f64;
    let members = groups.iter().map(|g| g.len()).max().unwrap_or(0);
    let numbers = format!(
        "its gain on the canary ranked first among the {members} variants for {first} of {} assigned canaries (mean rank {mean_rank:.2}; {:.2} expected by chance); summed excess gain {observed:.2}, exposure test p = {p:.1e}",
        groups.len(),
        (members as f64 + 1.0) / 2.0
    );
    Verdict {
        check: EXPOSURE_CHECK.into(),
        outcome: Outcome::Pass,
        value: Some(p),
        threshold: Some(alpha),
        reason: if p <= alpha {
            format!("trained on this job's data: {numbers}")
        } else {
            format!("no significant sign of training on its canaries: {numbers}")
        },
    }
}

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
        subset_verdict(assigned, unassigned, settings),
    ]
}

/// The assigned-versus-unassigned verdict alone (jobs whose canaries have alternatives
/// get [`exposure_verdict`] for their canaries instead of the sibling comparison).
pub fn subset_verdict(
    assigned: &[f64],
    unassigned: &[f64],
    settings: &IntegritySettings,
) -> Verdict {
    one(
        SUBSET_CHECK,
        "assigned records",
        "unassigned records of the shard",
        assigned,
        unassigned,
        settings,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_test_is_exact_for_blind_models_and_finds_trained_ones() {
        let s = IntegritySettings::default();
        // A model that never saw the canaries: the planted record is just another draw.
        let mut rng = StdRng::seed_from_u64(3);
        let mut small = 0;
        for _ in 0..200 {
            let groups: Vec<Vec<f64>> = (0..16)
                .map(|_| (0..4).map(|_| rng.random::<f64>()).collect())
                .collect();
            let v = exposure_verdict(&groups, &s);
            if v.value.unwrap() <= 0.05 {
                small += 1;
            }
        }
        assert!(
            (2..=22).contains(&small),
            "{small} of 200 blind models at p <= 0.05"
        );
        // A model that gained a little more on each planted record.
        let groups: Vec<Vec<f64>> = (0..16)
            .map(|_| {
                let mut g: Vec<f64> = (0..4).map(|_| rng.random::<f64>()).collect();
                g[0] += 0.6;
                g
            })
            .collect();
        let v = exposure_verdict(&groups, &s);
        assert!(v.value.unwrap() < 1e-3, "{}", v.reason);
        assert!(
            v.reason.starts_with("trained on this job's data"),
            "{}",
            v.reason
        );
        // Pairs (one alternative each): a smaller excess, still found.
        let pairs: Vec<Vec<f64>> = (0..16)
            .map(|_| vec![rng.random::<f64>() + 0.5, rng.random::<f64>()])
            .collect();
        assert!(exposure_verdict(&pairs, &s).value.unwrap() < 1e-3);
        // Too little to test.
        assert_eq!(exposure_verdict(&groups[..1], &s).value, None);
    }
}
