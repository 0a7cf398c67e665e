//! Derived submissions (DESIGN.md §4.3): a model soup or any other blend of earlier
//! submissions. An exact or near copy is one source; a blend of several is not near any one
//! of them, so the duplicate checks miss it. Instead each submission's delta sketch is
//! fitted, by least squares, from the sketches of earlier submissions by other miners
//! (forward selection: each time the source whose addition leaves the least residual, at
//! most `derived_max_sources`). Every sketch is taken less the mean of the judged job's
//! submissions: honest runs on one task share their first direction, which the mean
//! removes, and an affine blend (weights summing to one, as a soup's do) stays an exact
//! blend of its sources after any common vector is removed. A residual ‖r‖ / ‖x‖ at or
//! below `derived_residual` with at least two sources weighing a tenth or more fails,
//! naming the sources and their weights.

use super::{JobState, SubmissionState};
use std::collections::BTreeMap;
use tunenet_types::{IntegritySettings, JobId, Outcome, PeerIdStr, Verdict};

/// Name of the derived-submission verdict.
pub const DERIVED_CHECK: &str = "derived";

/// Fewest sketch dimensions the fit is judged on.
const MIN_DIM: usize = 64;

/// One evaluated submission with a sketch.
struct Sub<'a> {
    job: &'a JobId,
    miner: &'a PeerIdStr,
    received: u64,
    sketch: &'a [f32],
}

/// Verdicts for job `id`'s evaluated submissions: derived from earlier ones, or not.
pub(super) fn derived_findings(
    jobs: &BTreeMap<JobId, JobState>,
    id: &JobId,
    settings: &IntegritySettings,
) -> Vec<(PeerIdStr, Verdict)> {
    if !settings.enabled || settings.derived_max_sources == 0 {
        return vec![];
    }
    let mut all: Vec<Sub<'_>> = Vec::new();
    for j in jobs.values() {
        for (m, slot) in &j.slots {
            if let SubmissionState::Evaluated { sketch, .. } = &slot.submission
                && !sketch.is_empty()
            {
                all.push(Sub {
                    job: &j.plan.job_id,
                    miner: m,
                    received: slot
                        .receipt
                        .as_ref()
                        .map(|r| r.received_at_ms)
                        .unwrap_or(u64::MAX),
                    sketch,
                });
            }
        }
    }
    let mine: Vec<&Sub<'_>> = all.iter().filter(|s| s.job == id).collect();
    let Some(first) = mine.first() else {
        return vec![];
    };
    let dim = first.sketch.len();
    // A sketch of few dimensions is spanned by a few of anything; and without a job mean
    // to remove (three submissions at least), honest runs on one task share a direction.
    if dim < MIN_DIM || mine.len() < 3 {
        return vec![];
    }
    // The judged job's mean sketch (zero with fewer than three submissions).
    let same: Vec<&&Sub<'_>> = mine.iter().filter(|s| s.sketch.len() == dim).collect();
    let mut mean = vec![0f64; dim];
    if same.len() >= 3 {
        for s in &same {
            for (a, b) in mean.iter_mut().zip(s.sketch) {
                *a += *b as f64 / same.len() as f64;
            }
        }
    }
    let centred = |s: &Sub<'_>| -> Vec<f64> {
        s.sketch
            .iter()
            .zip(&mean)
            .map(|(x, m)| *x as f64 - m)
            .collect()
    };
    let mut out = Vec::new();
    for me in &mine {
        if me.sketch.len() != dim {
            continue;
        }
        let x = centred(me);
        let sources: Vec<(&Sub<'_>, Vec<f64>)> = all
            .iter()
            .filter(|o| {
                o.miner != me.miner
                    && o.sketch.len() == dim
                    && (o.received, o.job, o.miner) < (me.received, me.job, me.miner)
            })
            .map(|o| (o, centred(o)))
            .filter(|(_, v)| dot(v, v) > 0.0)
            .collect();
        let Some(fit) = fit(&x, &sources, settings.derived_max_sources) else {
            continue;
        };
        let names: Vec<String> = fit
            .picked
            .iter()
            .zip(&fit.weights)
            .map(|(i, w)| {
                let (o, _) = &sources[*i];
                format!("{} in job {} ×{w:.2}", o.miner, o.job)
            })
            .collect();
        // One source is a copy, judged by the duplicate checks (which also allow honest
        // runs that point one way at different sizes); a blend takes a real share (at
        // least a tenth) from two sources at least.
        let shares = fit.weights.iter().filter(|w| **w >= 0.1).count();
        let derived = shares >= 2 && fit.residual <= settings.derived_residual;
        out.push((
            me.miner.clone(),
            Verdict {
                check: DERIVED_CHECK.into(),
                outcome: if derived { Outcome::Fail } else { Outcome::Pass },
                value: Some(fit.residual),
                threshold: Some(settings.derived_residual),
                reason: if derived {
                    format!(
                        "derived from earlier submissions: {} explain its delta to a residual of {:.4}",
                        names.join(" + "),
                        fit.residual
                    )
                } else {
                    format!(
                        "not derived: the closest blend of earlier submissions ({}) leaves a residual of {:.4}",
                        names.join(" + "),
                        fit.residual
                    )
                },
            },
        ));
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A least-squares fit of a sketch from a few sources.
struct Fit {
    picked: Vec<usize>,
    weights: Vec<f64>,
    residual: f64,
}

/// Forward selection: up to `k` sources, each time the one whose addition leaves the
/// smallest least-squares residual (not merely the one most correlated with what is left,
/// which a near copy of one source can mislead). None when `x` is zero or there are no
/// sources.
fn fit(x: &[f64], sources: &[(&Sub<'_>, Vec<f64>)], k: usize) -> Option<Fit> {
    let xx = dot(x, x);
    if xx <= 0.0 || sources.is_empty() {
        return None;
    }
    let mut best: Option<Fit> = None;
    let mut picked: Vec<usize> = Vec::new();
    for _ in 0..k.min(sources.len()) {
        let mut step: Option<(usize, Vec<f64>, f64)> = None;
        for c in 0..sources.len() {
            if picked.contains(&c) {
                continue;
            }
            let vs: Vec<&[f64]> = picked
                .iter()
                .chain(std::iter::once(&c))
                .map(|i| sources[*i].1.as_slice())
                .collect();
            let Some(w) = least_squares(x, &vs) else {
                continue;
            };
            let mut r = x.to_vec();
            for (v, w) in vs.iter().zip(&w) {
                for (ri, vi) in r.iter_mut().zip(v.iter()) {
                    *ri -= w * vi;
                }
            }
            let res = (dot(&r, &r) / xx).sqrt();
            if step.as_ref().is_none_or(|(_, _, b)| res < *b) {
                step = Some((c, w, res));
            }
        }
        let Some((c, weights, residual)) = step else {
            break;
        };
        picked.push(c);
        best = Some(Fit {
            picked: picked.clone(),
            weights,
            residual,
        });
        if residual <= 1e-6 {
            break;
        }
    }
    best
}

/// Solves the normal equations (VᵀV) w = Vᵀx by Gaussian elimination with partial
/// pivoting; None when the sources are (numerically) linearly dependent.
fn least_squares(x: &[f64], vs: &[&[f64]]) -> Option<Vec<f64>> {
    let n = vs.len();
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).map(|j| dot(vs[i], vs[j])).collect();
            row.push(dot(vs[i], x));
            row
        })
        .collect();
    let scale = (0..n).map(|i| a[i][i]).fold(0.0f64, f64::max);
    for col in 0..n {
        let piv = (col..n).max_by(|p, q| a[*p][col].abs().total_cmp(&a[*q][col].abs()))?;
        if a[piv][col].abs() <= 1e-10 * scale {
            return None;
        }
        a.swap(col, piv);
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub<'a>(job: &'a JobId, miner: &'a PeerIdStr, sketch: &'a [f32]) -> Sub<'a> {
        Sub {
            job,
            miner,
            received: 0,
            sketch,
        }
    }

    #[test]
    fn a_blend_of_two_sources_is_fitted_exactly_and_independent_work_is_not() {
        let job = JobId::new("j").unwrap();
        let (m1, m2, m3) = (
            PeerIdStr("a".into()),
            PeerIdStr("b".into()),
            PeerIdStr("c".into()),
        );
        // Pseudo-random vectors of a 256-dim sketch.
        let v = |seed: u64| -> Vec<f32> {
            let mut z = seed;
            (0..256u64)
                .map(|_| {
                    // splitmix64
                    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut h = z;
                    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    h ^= h >> 31;
                    ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        let (a, b, c) = (v(1), v(2), v(3));
        let subs = [sub(&job, &m1, &a), sub(&job, &m2, &b), sub(&job, &m3, &c)];
        let sources: Vec<(&Sub<'_>, Vec<f64>)> = subs
            .iter()
            .map(|s| (s, s.sketch.iter().map(|x| *x as f64).collect()))
            .collect();
        let soup: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| 0.5 * *x as f64 + 0.5 * *y as f64)
            .collect();
        let f = fit(&soup, &sources, 3).unwrap();
        assert!(f.residual < 1e-6, "{}", f.residual);
        let mut names = f.picked.clone();
        names.sort();
        assert_eq!(names, vec![0, 1]);
        // A noisy copy of one source among the candidates does not hide the blend.
        let noisy: Vec<f32> = a.iter().zip(v(9)).map(|(x, e)| x + 0.3 * e).collect();
        let with_noisy = [
            sub(&job, &m3, &noisy),
            sub(&job, &m1, &a),
            sub(&job, &m2, &b),
        ];
        let sources2: Vec<(&Sub<'_>, Vec<f64>)> = with_noisy
            .iter()
            .map(|s| (s, s.sketch.iter().map(|x| *x as f64).collect()))
            .collect();
        let f = fit(&soup, &sources2, 3).unwrap();
        assert!(f.residual < 1e-6, "{}", f.residual);
        let other: Vec<f64> = v(4).iter().map(|x| *x as f64).collect();
        let g = fit(&other, &sources, 3).unwrap();
        assert!(g.residual > 0.8, "{}", g.residual);
    }
}
