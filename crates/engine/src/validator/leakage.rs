//! The per-record test-set leakage check (DESIGN.md §4.6), judged over a job's cohort at
//! job end from the per-record losses each evaluation measured. Pure arithmetic: no model
//! work happens here.
//!
//! For every hidden test record and every synthetic record, each submission's loss is
//! compared with a reference model's loss on that same record (see [`judge`]): the
//! record's own difficulty cancels, leaving how much better or worse this model does on it
//! than a comparable peer. A model trained on the test split does unusually well on test
//! records and not on synthetic ones. The test and synthetic records are independent draws
//! from one data-generating process, and the synthetic set exists only after the deadline,
//! so for a model that saw neither, its residuals on the two sets are exchangeable and a
//! one-sided Mann–Whitney U test of "lower on the test records" is exact whatever the
//! residuals' distribution: `leak_alpha` is its false-positive rate per honest submission.
//! That exactness needs the synthetic generator to draw records as the test split was
//! drawn; a generator of another style would make every strong fine-tune look leaky.

use super::{JobState, LEAKAGE_CHECK, SubmissionState, median};
use tunenet_types::{IntegritySettings, Outcome, PeerIdStr, Verdict};

/// One submission's per-record losses: (miner, test records, synthetic records).
type Row<'a> = (&'a PeerIdStr, &'a [Option<f64>], &'a [Option<f64>]);

/// Verdicts from the per-record test for every evaluated submission of `job`, or None when
/// some evaluated submission has no per-record losses on both sets (evaluated without them,
/// or the job has no synthetic set), or their lengths disagree: then the loss-ratio test
/// judges the cohort instead.
pub(super) fn per_record_findings(
    job: &JobState,
    settings: &IntegritySettings,
) -> Option<Vec<(PeerIdStr, Verdict)>> {
    let mut cohort: Vec<Row<'_>> = Vec::new();
    for (m, slot) in &job.slots {
        if let SubmissionState::Evaluated {
            test_records,
            synthetic_records,
            ..
        } = &slot.submission
        {
            if test_records.is_empty() || synthetic_records.is_empty() {
                return None;
            }
            cohort.push((m, test_records, synthetic_records));
        }
    }
    let (_, t0, s0) = cohort.first()?;
    let (nt, ns) = (t0.len(), s0.len());
    if cohort
        .iter()
        .any(|(_, t, s)| t.len() != nt || s.len() != ns)
    {
        return None;
    }
    let n = cohort.len();
    if n < 2 {
        return Some(
            cohort
                .iter()
                .map(|(m, _, _)| {
                    ((*m).clone(), Verdict {
                        check: LEAKAGE_CHECK.into(),
                        outcome: Outcome::Pass,
                        value: None,
                        threshold: Some(settings.leak_alpha),
                        reason: "not judged: the only evaluated submission of its job has no peers to compare its per-record losses with".into(),
                    })
                })
                .collect(),
        );
    }
    Some(
        cohort
            .iter()
            .map(|row| {
                let (m, ..) = row;
                let verdict = match judge(row, &cohort) {
                    None => Verdict {
                        check: LEAKAGE_CHECK.into(),
                        outcome: Outcome::Pass,
                        value: None,
                        threshold: Some(settings.leak_alpha),
                        reason: "not judged: no other submission of its job is a different model to compare its per-record losses with".into(),
                    },
                    Some(found) => {
                        let p = found.p;
                        let numbers = found.describe(n);
                        let (outcome, reason) = if p <= settings.leak_alpha {
                            (
                                Outcome::Fail,
                                format!(
                                    "the hidden test split leaked into training: it beats a comparable model by more on the hidden test records than on records drawn alike after the deadline ({numbers}; at most {:.0e} allowed)",
                                    settings.leak_alpha
                                ),
                            )
                        } else {
                            (Outcome::Pass, numbers)
                        };
                        Verdict {
                            check: LEAKAGE_CHECK.into(),
                            outcome,
                            value: Some(p),
                            threshold: Some(settings.leak_alpha),
                            reason,
                        }
                    }
                };
                ((*m).clone(), verdict)
            })
            .collect(),
    )
}

/// Mean absolute difference (nats) of synthetic-record losses below which two submissions
/// count as the same model (a copy, or a copy with noise), useless as each other's reference.
const SAME_MODEL: f64 = 1e-3;

/// What the per-record test found for one submission.
struct Found<'a> {
    reference: &'a PeerIdStr,
    slope: f64,
    test_median: f64,
    test_n: usize,
    synthetic_median: f64,
    synthetic_n: usize,
    effect: f64,
    p: f64,
}

impl Found<'_> {
    fn describe(&self, cohort: usize) -> String {
        format!(
            "its per-record loss less that predicted from the closest other model's ({}, by synthetic loss, slope {:.3}; {cohort} submissions): median {:+.4} nats on {} hidden test records against {:+.4} on {} synthetic records, lower on the test record in {:.0} % of test/synthetic pairs; one-sided Mann–Whitney p = {:.1e}",
            self.reference,
            self.slope,
            self.test_median,
            self.test_n,
            self.synthetic_median,
            self.synthetic_n,
            100.0 * self.effect,
            self.p
        )
    }
}

/// The per-record test for `row` against the cohort. The reference is the other submission
/// closest in mean synthetic loss that is a different model: a model of like strength ranks
/// records' difficulty as this one does, which the cohort's median (often weaker runs)
/// does not. This submission's per-record losses are regressed on the reference's over
/// both sets together (one least-squares line, slope at least 0, treating every record
/// alike so the null's exchangeability survives), and the residuals on the test records
/// are tested against those on the synthetic records. A reference that itself trained on
/// the test split is lower on test records, which with a slope of at least 0 only raises
/// this submission's test residuals: it can hide leakage, never invent it. None when no
/// other submission is a different model.
fn judge<'a>(row: &Row<'a>, cohort: &[Row<'a>]) -> Option<Found<'a>> {
    let (me, own_t, own_s) = *row;
    let mean = |xs: &[Option<f64>]| {
        let v: Vec<f64> = xs.iter().flatten().copied().collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let mine = mean(own_s);
    let (reference, ref_t, ref_s) = cohort
        .iter()
        .filter(|(m, _, s)| {
            if *m == me {
                return false;
            }
            let d: Vec<f64> = s
                .iter()
                .zip(own_s)
                .filter_map(|(a, b)| Some((a.as_ref()? - b.as_ref()?).abs()))
                .collect();
            !d.is_empty() && d.iter().sum::<f64>() / d.len() as f64 > SAME_MODEL
        })
        .min_by(|a, b| {
            (mean(a.2) - mine)
                .abs()
                .total_cmp(&(mean(b.2) - mine).abs())
        })?;
    let pairs = |own: &[Option<f64>], refs: &[Option<f64>]| -> Vec<(f64, f64)> {
        own.iter()
            .zip(refs)
            .filter_map(|(o, r)| Some((r.as_ref().copied()?, o.as_ref().copied()?)))
            .filter(|(r, o)| r.is_finite() && o.is_finite())
            .collect()
    };
    let test = pairs(own_t, ref_t);
    let syn = pairs(own_s, ref_s);
    let all: Vec<&(f64, f64)> = test.iter().chain(&syn).collect();
    let k = all.len().max(1) as f64;
    let (mx, my) = (
        all.iter().map(|p| p.0).sum::<f64>() / k,
        all.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let sxx: f64 = all.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = all.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    let residuals = |ps: &[(f64, f64)]| -> Vec<f64> {
        ps.iter().map(|(r, o)| o - my - slope * (r - mx)).collect()
    };
    let (rt, rs) = (residuals(&test), residuals(&syn));
    let (p, effect) = rank_sum_greater(&rs, &rt);
    Some(Found {
        reference,
        slope,
        test_median: median(&rt),
        test_n: rt.len(),
        synthetic_median: median(&rs),
        synthetic_n: rs.len(),
        effect,
        p,
    })
}

/// One-sided Mann–Whitney U test that values in `x` tend to exceed those in `y`, by the
/// normal approximation with tie and continuity corrections (accurate at the set sizes used
/// here, tens of records a side). Returns the p-value and U/(|x|·|y|), the estimated
/// P(X > Y). With an empty side the p-value is 1.
pub(super) fn rank_sum_greater(x: &[f64], y: &[f64]) -> (f64, f64) {
    let (m, n) = (x.len(), y.len());
    if m == 0 || n == 0 {
        return (1.0, 0.5);
    }
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|v| (*v, true))
        .chain(y.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = all.len();
    let (mut rank_x, mut ties) = (0f64, 0f64);
    let mut i = 0;
    while i < total {
        let mut j = i;
        while j + 1 < total && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1..=j+1 share their mean.
        let mean_rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_x += mean_rank * all[i..=j].iter().filter(|a| a.1).count() as f64;
        i = j + 1;
    }
    let (mf, nf, nn) = (m as f64, n as f64, total as f64);
    let u = rank_x - mf * (mf + 1.0) / 2.0;
    let mean = mf * nf / 2.0;
    let var = mf * nf / 12.0 * ((nn + 1.0) - ties / (nn * (nn - 1.0)));
    let effect = u / (mf * nf);
    if var <= 0.0 {
        return (1.0, effect);
    }
    let z = (u - mean - 0.5) / var.sqrt();
    (0.5 * erfc(z / std::f64::consts::SQRT_2), effect)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit; relative error below
/// 1.2e-7 everywhere), enough for p-values.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}
