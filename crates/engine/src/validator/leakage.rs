//! The per-record test-set leakage check (DESIGN.md §4.6), judged over a job's cohort at
//! job end from the per-record losses each evaluation measured. Pure arithmetic: no model
//! work happens here.
//!
//! For every hidden test record and every synthetic record, each submission's loss is
//! compared with that predicted from the other models' losses on that same record (see
//! [`judge`]): the record's own difficulty cancels, leaving how much better or worse this
//! model does on it than its peers. A model trained on the test split does unusually well on test
//! records and not on synthetic ones. The test and synthetic records are independent draws
//! from one data-generating process, and the synthetic set exists only after the deadline,
//! so for a model that saw neither, its residuals on the two sets are exchangeable and a
//! one-sided Mann–Whitney U test of "lower on the test records" is exact whatever the
//! residuals' distribution: `leak_alpha` is its false-positive rate per honest submission.
//! That exactness needs the synthetic generator to draw records as the test split was
//! drawn; a generator of another style would make every strong fine-tune look leaky.
//!
//! On real data the synthetic set is made from the test split itself. Its neighbours
//! (`synthetic_paired`: synthetic record `i` is test record `i` with some of its answer's
//! words replaced by the base model's) pair every test record with a near copy in the
//! data's own words, and the test becomes a paired one (Wilcoxon signed-rank on each
//! record's residual less its neighbour's): a model that memorised the record expects its
//! exact words and pays for each replaced one, while one that only learned the data's
//! style scores the two alike. Sets that are not drawn alike (rewritten or neighbours)
//! are not exchangeable with the test split, so there a submission must also stand out
//! from its job's other submissions (`leak_cohort_z`).
//!
//! References are screened first. Leakers memorise the same records, so two of them in one
//! job are each other's best reference: the fit explains one's low test losses by the
//! other's, and neither stands out, however many rounds peel off the ones that do. The
//! base model is the one model sure never to have seen the test split: every submission is
//! first judged against it alone, and one that beats it by more on the test records than
//! on the comparison set at [`SCREEN_ALPHA`] is set aside as a reference (not failed: the
//! base is a coarser yardstick than the cohort). It is still judged, against the rest.
//!
//! A competition may also hold out control records: real records of the dataset drawn by
//! the same seeded shuffle as the test split and never released. For a model that saw
//! neither, its residuals on test and control records are exchangeable, so the unpaired
//! test against them is exact on any data; it catches a model trained on the test split
//! alone (which memorised every word of it, not only the neighbours' replaced ones), while
//! the neighbours catch one trained on the whole public dataset, control records included.
//! Control records are drawn alike on any data, so their references are always screened
//! against the base; the comparison fails on its own at `control_alpha`.

use super::{JobState, LEAKAGE_CHECK, SubmissionState, median};
use std::collections::BTreeSet;
use tunenet_types::stats::erfc;
use tunenet_types::{IntegritySettings, Outcome, PeerIdStr, Verdict};

/// One submission's per-record losses: (miner, test records, synthetic records).
type Row<'a> = (&'a PeerIdStr, &'a [Option<f64>], &'a [Option<f64>]);
/// One submission's per-record losses: (miner, test, synthetic, control records).
type FullRow<'a> = (
    &'a PeerIdStr,
    &'a [Option<f64>],
    &'a [Option<f64>],
    &'a [Option<f64>],
);

/// Verdicts from the per-record test for every evaluated submission of `job`, or None when
/// some evaluated submission has no per-record test losses, or neither a synthetic set nor
/// held-out control records every submission was scored on alike: then the loss-ratio
/// test judges the cohort instead. With control records, the test records are also
/// judged against them (exact, like a synthetic set drawn alike), and a finding there
/// fails the submission whatever the synthetic set found.
///
/// `suspect` names miners that other job-end checks already fail (copies, derived
/// submissions, models that never saw their data): they are judged like the rest but never
/// serve as references. The test runs in two rounds: a submission that fails the first
/// round is removed from the references too, and every other one is judged again without
/// it, since a reference that itself trained on the test split can only hide leakage.
pub(super) fn per_record_findings(
    job: &JobState,
    settings: &IntegritySettings,
    suspect: &BTreeSet<PeerIdStr>,
) -> Option<Vec<(PeerIdStr, Verdict)>> {
    // (miner, test, synthetic, control) for every evaluated submission.
    let mut rows: Vec<FullRow<'_>> = Vec::new();
    for (m, slot) in &job.slots {
        if let SubmissionState::Evaluated {
            test_records,
            synthetic_records,
            control_records,
            ..
        } = &slot.submission
        {
            if test_records.is_empty() {
                return None;
            }
            rows.push((m, test_records, synthetic_records, control_records));
        }
    }
    let (_, t0, s0, c0) = *rows.first()?;
    if rows.iter().any(|(_, t, ..)| t.len() != t0.len()) {
        return None;
    }
    // A comparison set every submission was scored on alike.
    let usable = |set: &dyn Fn(&FullRow<'_>) -> usize, first: usize| {
        first > 0 && rows.iter().all(|r| set(r) == first)
    };
    let with_synthetic = usable(&|r| r.2.len(), s0.len());
    let with_control = usable(&|r| r.3.len(), c0.len());
    if !with_synthetic && !with_control {
        return None;
    }
    let n = rows.len();
    let not_judged = |m: &PeerIdStr, why: &str| {
        (
            m.clone(),
            Verdict {
                check: LEAKAGE_CHECK.into(),
                outcome: Outcome::Pass,
                value: None,
                threshold: Some(settings.leak_alpha),
                reason: format!("not judged: {why}"),
            },
        )
    };
    if n < 2 {
        return Some(rows.iter().map(|r| not_judged(r.0, ALONE)).collect());
    }
    let synthetic_cohort: Vec<Row<'_>> = rows.iter().map(|r| (r.0, r.1, r.2)).collect();
    let control_cohort: Vec<Row<'_>> = rows.iter().map(|r| (r.0, r.1, r.3)).collect();
    // The base model's own losses on the same records, where every set was measured.
    let base_id = PeerIdStr(BASE_NAME.into());
    let base = job
        .base_records
        .as_ref()
        .filter(|b| b.test.len() == t0.len());
    // Only a set drawn as the test split was makes the base's residuals exchangeable: on
    // a rewritten set or neighbours every honest fine-tune beats the base by more on the
    // real test records (it learned the data's own words), so there is no screen.
    let base_synthetic = base
        .filter(|b| settings.synthetic_alike && b.synthetic.len() == s0.len())
        .map(|b| (&base_id, b.test.as_slice(), b.synthetic.as_slice()));

    let synthetic = if with_synthetic {
        two_rounds(
            &synthetic_cohort,
            suspect,
            base_synthetic,
            settings.synthetic_paired,
            settings.leak_alpha,
        )
    } else {
        rows.iter().map(|_| None).collect()
    };
    // Control records are drawn as the test split was on any data, so the screen always
    // holds there.
    let base_control = base
        .filter(|b| b.control.len() == c0.len())
        .map(|b| (&base_id, b.test.as_slice(), b.control.as_slice()));
    let control = if with_control {
        two_rounds(
            &control_cohort,
            suspect,
            base_control,
            false,
            settings.control_alpha,
        )
    } else {
        rows.iter().map(|_| None).collect()
    };
    let shifts: Vec<Option<f64>> = synthetic
        .iter()
        .map(|f| f.as_ref().map(|f| f.shift))
        .collect();
    Some(
        rows.iter()
            .zip(synthetic)
            .zip(control)
            .enumerate()
            .map(|(i, ((row, found), held))| {
                let m = row.0;
                // Against the held-out control records: drawn as the test split was and
                // never released, so the test is exact, and a finding fails whatever the
                // synthetic set is.
                if let Some(h) = &held
                    && h.p <= settings.control_alpha
                {
                    return (m.clone(), Verdict {
                        check: LEAKAGE_CHECK.into(),
                        outcome: Outcome::Fail,
                        value: Some(h.p),
                        threshold: Some(settings.control_alpha),
                        reason: format!(
                            "the hidden test split leaked into training: it beats comparable models by more on the hidden test records than on held-out records of the same dataset, drawn as the test split was and never released ({}; at most {:.0e} allowed)",
                            h.describe(n, CONTROL),
                            settings.control_alpha
                        ),
                    });
                }
                let held_numbers = held
                    .as_ref()
                    .map(|h| format!("; against held-out records: {}", h.describe(n, CONTROL)))
                    .unwrap_or_default();
                let Some(found) = found else {
                    return match held {
                        Some(h) => (m.clone(), Verdict {
                            check: LEAKAGE_CHECK.into(),
                            outcome: Outcome::Pass,
                            value: Some(h.p),
                            threshold: Some(settings.control_alpha),
                            reason: format!("against held-out records: {}", h.describe(n, CONTROL)),
                        }),
                        None => not_judged(m, NO_REFERENCE),
                    };
                };
                let p = found.p;
                let mut numbers = found.describe(n, SYNTHETIC);
                // A rewritten synthetic set: the shift must also stand out from the
                // other submissions' (suspects aside).
                let mut stands_out = true;
                if !settings.synthetic_alike {
                    let others: Vec<f64> = rows
                        .iter()
                        .zip(&shifts)
                        .enumerate()
                        .filter(|(j, (o, _))| *j != i && !suspect.contains(o.0))
                        .filter_map(|(_, (_, s))| *s)
                        .collect();
                    if others.len() < 3 {
                        let mut v = not_judged(
                            m,
                            &format!(
                                "the synthetic set was rewritten from real records, not drawn as the test split was, so a submission is judged against at least 3 other submissions' test-versus-synthetic shifts; its job has {} ({numbers}{held_numbers})",
                                others.len()
                            ),
                        );
                        v.1.value = held.as_ref().map(|h| h.p);
                        return v;
                    }
                    let mid = median(&others);
                    let deviations: Vec<f64> = others.iter().map(|x| (x - mid).abs()).collect();
                    let spread = (1.4826 * median(&deviations)).max(settings.leak_spread_floor);
                    let shift = found.shift;
                    let z = (mid - shift) / spread;
                    stands_out = z >= settings.leak_cohort_z;
                    numbers = format!(
                        "{numbers}; shift {shift:+.4} nats against the others' median {mid:+.4} (spread {spread:.4}): {z:.1} spreads below, at least {} needed",
                        settings.leak_cohort_z
                    );
                }
                numbers.push_str(&held_numbers);
                let found_leak = p <= settings.leak_alpha && stands_out;
                let (outcome, reason) = if found_leak
                    && !settings.synthetic_alike
                    && !settings.leak_rewritten_fails
                {
                    (
                        Outcome::Flag,
                        format!(
                            "flagged, not failed (leak_rewritten_fails is off: a rewritten set is only as like the test split as its rewriter writes like the data): it beats comparable models by more on the hidden test records than on records rewritten after the deadline ({numbers}; at most {:.0e} allowed)",
                            settings.leak_alpha
                        ),
                    )
                } else if found_leak {
                    (
                        Outcome::Fail,
                        format!(
                            "the hidden test split leaked into training: it beats comparable models by more on the hidden test records than on {} after the deadline ({numbers}; at most {:.0e} allowed)",
                            if settings.synthetic_alike {
                                "records drawn alike"
                            } else if settings.synthetic_paired {
                                "their neighbours, written"
                            } else {
                                "records rewritten"
                            },
                            settings.leak_alpha
                        ),
                    )
                } else {
                    (Outcome::Pass, numbers)
                };
                (m.clone(), Verdict {
                    check: LEAKAGE_CHECK.into(),
                    outcome,
                    value: Some(p),
                    threshold: Some(settings.leak_alpha),
                    reason,
                })
            })
            .collect(),
    )
}

/// The level at which a submission judged against the base model alone is set aside as a
/// reference. An honest one is set aside this often, which only leaves its peers one
/// reference fewer; a leaker left in would hide the others.
pub(super) const SCREEN_ALPHA: f64 = 0.05;

/// Name the base model goes by when it serves as a reference.
const BASE_NAME: &str = "the base model";

/// The rows of `cohort` that beat `base` by more on the test records than on the
/// comparison set at [`SCREEN_ALPHA`], judged against the base alone.
fn screened<'a>(cohort: &[Row<'a>], base: Row<'_>, paired: bool) -> BTreeSet<&'a PeerIdStr> {
    let none = BTreeSet::new();
    cohort
        .iter()
        .filter(|row| judge(row, &[base], &none, paired, None).is_some_and(|f| f.p <= SCREEN_ALPHA))
        .map(|row| row.0)
        .collect()
}

/// The per-record test of every row of `cohort` in two rounds: a submission that fails
/// the first round is removed from the references, and every other one is judged again
/// without it, since a reference that itself trained on the test split can only hide
/// leakage. Suspects are never references.
///
/// With the base model's per-record losses (`base`), submissions the screen sets aside
/// (see [`screened`]) are never references either; a submission left with no reference
/// at all is judged against the base alone.
fn two_rounds<'a>(
    cohort: &[Row<'a>],
    suspect: &BTreeSet<PeerIdStr>,
    base: Option<Row<'a>>,
    paired: bool,
    alpha: f64,
) -> Vec<Option<Found<'a>>> {
    let mut excluded: BTreeSet<&PeerIdStr> = suspect.iter().collect();
    let aside = base
        .map(|b| screened(cohort, b, paired))
        .unwrap_or_default();
    excluded.extend(aside.iter().copied());
    let judge = |row: &Row<'a>, excluded: &BTreeSet<&PeerIdStr>| {
        judge(row, cohort, excluded, paired, base.as_ref()).map(|mut f| {
            f.aside = aside.iter().filter(|m| **m != row.0).count();
            f
        })
    };
    let first: Vec<Option<Found<'a>>> = cohort.iter().map(|row| judge(row, &excluded)).collect();
    let leaked = |f: &Option<Found<'_>>| f.as_ref().is_some_and(|f| f.p <= alpha);
    excluded.extend(
        cohort
            .iter()
            .zip(&first)
            .filter(|(_, f)| leaked(f))
            .map(|(row, _)| row.0),
    );
    cohort
        .iter()
        .zip(first)
        .map(|(row, first)| {
            if leaked(&first) {
                first
            } else {
                judge(row, &excluded).or(first)
            }
        })
        .collect()
}

/// What the comparison set is called in reasons.
const SYNTHETIC: &str = "synthetic";
const CONTROL: &str = "held-out";

/// Why a lone submission is not judged.
const ALONE: &str =
    "the only evaluated submission of its job has no peers to compare its per-record losses with";
/// Why a submission without a usable reference is not judged.
const NO_REFERENCE: &str = "no other submission of its job is a different model that passed the other checks, to compare its per-record losses with";

/// Mean absolute difference (nats) of synthetic-record losses below which two submissions
/// count as the same model (a copy, or a copy with noise), useless as each other's reference.
const SAME_MODEL: f64 = 1e-3;

/// What the per-record test found for one submission.
struct Found<'a> {
    /// The references with a weight above zero, heaviest first.
    weights: Vec<(&'a PeerIdStr, f64)>,
    references: usize,
    test_median: f64,
    test_n: usize,
    synthetic_median: f64,
    synthetic_n: usize,
    effect: f64,
    p: f64,
    /// How much lower this model sits on the test records than on the synthetic ones,
    /// beyond its peers: the median paired difference, or (unpaired) the difference of
    /// the medians.
    shift: f64,
    /// Pairs compared (0: the sets were compared as wholes).
    pairs: usize,
    /// Other submissions set aside as references by the screen against the base model.
    aside: usize,
}

impl Found<'_> {
    fn describe(&self, cohort: usize, set: &str) -> String {
        let named: Vec<String> = self
            .weights
            .iter()
            .take(3)
            .map(|(m, w)| format!("{m} {w:.2}"))
            .collect();
        let more = self.weights.len().saturating_sub(3);
        let comparison = if self.pairs > 0 {
            format!(
                "paired with its neighbour, lower on the test record in {:.0} % of {} pairs (median difference {:+.4} nats); one-sided Wilcoxon signed-rank p = {:.1e}",
                100.0 * self.effect,
                self.pairs,
                self.shift,
                self.p
            )
        } else {
            format!(
                "lower on the test record in {:.0} % of test/{set} pairs; one-sided Mann–Whitney p = {:.1e}",
                100.0 * self.effect,
                self.p
            )
        };
        let aside = if self.aside > 0 {
            format!(
                "; {} other submission{} set aside as reference{}: against the base model alone {} beat{} it by more on the test records than on the {set} ones (p <= {SCREEN_ALPHA})",
                self.aside,
                if self.aside == 1 { "" } else { "s" },
                if self.aside == 1 { "" } else { "s" },
                if self.aside == 1 { "it" } else { "they" },
                if self.aside == 1 { "s" } else { "" },
            )
        } else {
            String::new()
        };
        format!(
            "its per-record loss less that predicted from {} other model{}' (non-negative least squares over both sets; weights {}{}{aside}; {cohort} submissions): median {:+.4} nats on {} hidden test records against {:+.4} on {} {set} records, {comparison}",
            self.references,
            if self.references == 1 { "" } else { "s" },
            named.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            self.test_median,
            self.test_n,
            self.synthetic_median,
            self.synthetic_n,
        )
    }
}

fn mean_loss(xs: &[Option<f64>]) -> f64 {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Whether two submissions' synthetic-record losses differ enough to be different models.
fn different(a: &[Option<f64>], b: &[Option<f64>]) -> bool {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).abs()))
        .collect();
    !d.is_empty() && d.iter().sum::<f64>() / d.len() as f64 > SAME_MODEL
}

/// The per-record test for `row` against the cohort's other models, `excluded` aside. This
/// submission's per-record losses are predicted from every reference's losses on the same
/// records by one non-negative least-squares fit (with an intercept) over both sets
/// together, treating every record alike so the null's exchangeability survives; the
/// residuals on the test records are then tested against those on the synthetic records.
/// Each record's own difficulty cancels, and with several references each one's quirks
/// average out, so the residuals are tighter than against any single peer. References
/// are the other submissions that are different models from this one and from each other
/// (a copy adds nothing), nearest first in mean synthetic loss. A reference that itself
/// trained on the test split is lower on test records, which with weights of at least 0
/// only raises this submission's test residuals: it can hide leakage, never invent it.
/// None when no reference is left.
fn judge<'a>(
    row: &Row<'a>,
    cohort: &[Row<'a>],
    excluded: &BTreeSet<&PeerIdStr>,
    paired: bool,
    fallback: Option<&Row<'a>>,
) -> Option<Found<'a>> {
    let (me, own_t, own_s) = *row;
    let mine = mean_loss(own_s);
    let mut candidates: Vec<&Row<'a>> = cohort
        .iter()
        .filter(|(m, _, s)| *m != me && !excluded.contains(m) && different(s, own_s))
        .collect();
    candidates.sort_by(|a, b| {
        (mean_loss(a.2) - mine)
            .abs()
            .total_cmp(&(mean_loss(b.2) - mine).abs())
    });
    let mut refs: Vec<&Row<'a>> = Vec::new();
    for c in candidates {
        if refs.iter().all(|r| different(r.2, c.2)) {
            refs.push(c);
        }
    }
    if refs.is_empty() {
        refs.extend(fallback.filter(|b| different(b.2, own_s)));
    }
    if refs.is_empty() {
        return None;
    }
    // One row per record every model scored: the references' losses, then this one's.
    let mut xs: Vec<Vec<f64>> = Vec::new();
    let mut ys: Vec<f64> = Vec::new();
    let mut is_test: Vec<bool> = Vec::new();
    let mut index: Vec<usize> = Vec::new();
    // Test records (each reference's `.1`) and synthetic ones (`.2`), alike.
    for test in [true, false] {
        let own = if test { own_t } else { own_s };
        for (i, o) in own.iter().enumerate() {
            let Some(o) = o.filter(|o| o.is_finite()) else {
                continue;
            };
            let x: Option<Vec<f64>> = refs
                .iter()
                .map(|r| {
                    let losses = if test { r.1 } else { r.2 };
                    losses.get(i).copied().flatten().filter(|v| v.is_finite())
                })
                .collect();
            if let Some(x) = x {
                xs.push(x);
                ys.push(o);
                is_test.push(test);
                index.push(i);
            }
        }
    }
    let (weights, residuals) = nnls(&xs, &ys);
    let (mut rt, mut rs) = (Vec::new(), Vec::new());
    for (r, t) in residuals.iter().zip(&is_test) {
        if *t { rt.push(*r) } else { rs.push(*r) }
    }
    let (p, effect, shift, pairs) = if paired {
        // Test record i against its own neighbour, synthetic record i.
        let mut syn: Vec<Option<f64>> = vec![None; own_s.len()];
        for ((r, t), i) in residuals.iter().zip(&is_test).zip(&index) {
            if !*t {
                syn[*i] = Some(*r);
            }
        }
        let d: Vec<f64> = residuals
            .iter()
            .zip(&is_test)
            .zip(&index)
            .filter(|((_, t), _)| **t)
            .filter_map(|((r, _), i)| Some(r - syn.get(*i).copied().flatten()?))
            .collect();
        let (p, effect) = signed_rank_less(&d);
        (p, effect, median(&d), d.len())
    } else {
        let (p, effect) = rank_sum_greater(&rs, &rt);
        (p, effect, median(&rt) - median(&rs), 0)
    };
    let mut named: Vec<(&'a PeerIdStr, f64)> = refs
        .iter()
        .zip(&weights)
        .filter(|(_, w)| **w > 0.0)
        .map(|(r, w)| (r.0, *w))
        .collect();
    named.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(Found {
        weights: named,
        references: refs.len(),
        test_median: median(&rt),
        test_n: rt.len(),
        synthetic_median: median(&rs),
        synthetic_n: rs.len(),
        effect,
        p,
        shift,
        pairs,
        aside: 0,
    })
}

/// One-sided Wilcoxon signed-rank test that the differences `d` tend to lie below 0, by
/// the normal approximation with tie and continuity corrections; zero differences are
/// dropped (Wilcoxon's convention). Returns the p-value and the share of the non-zero
/// differences that are negative. With no non-zero difference the p-value is 1.
pub(super) fn signed_rank_less(d: &[f64]) -> (f64, f64) {
    let mut nz: Vec<f64> = d
        .iter()
        .copied()
        .filter(|x| *x != 0.0 && x.is_finite())
        .collect();
    let n = nz.len();
    if n == 0 {
        return (1.0, 0.5);
    }
    nz.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    let (mut w_neg, mut ties) = (0f64, 0f64);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && nz[j + 1].abs() == nz[i].abs() {
            j += 1;
        }
        let mean_rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        w_neg += mean_rank * nz[i..=j].iter().filter(|x| **x < 0.0).count() as f64;
        i = j + 1;
    }
    let nf = n as f64;
    let mean = nf * (nf + 1.0) / 4.0;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - ties / 48.0;
    let effect = nz.iter().filter(|x| **x < 0.0).count() as f64 / nf;
    if var <= 0.0 {
        return (1.0, effect);
    }
    let z = (w_neg - mean - 0.5) / var.sqrt();
    (0.5 * erfc(z / std::f64::consts::SQRT_2), effect)
}

/// Least squares of `y` on the columns of `x` plus an intercept, every column's weight at
/// least 0 (cyclic coordinate descent on the centred problem, which converges for this
/// convex problem). Returns the weights and the residuals.
pub(super) fn nnls(x: &[Vec<f64>], y: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = y.len();
    let k = x.first().map_or(0, |r| r.len());
    if n == 0 {
        return (vec![0.0; k], vec![]);
    }
    let nf = n as f64;
    let col_mean: Vec<f64> = (0..k)
        .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / nf)
        .collect();
    let cols: Vec<Vec<f64>> = (0..k)
        .map(|j| x.iter().map(|r| r[j] - col_mean[j]).collect())
        .collect();
    let y_mean = y.iter().sum::<f64>() / nf;
    let mut res: Vec<f64> = y.iter().map(|v| v - y_mean).collect();
    let norms: Vec<f64> = cols.iter().map(|c| c.iter().map(|v| v * v).sum()).collect();
    let mut w = vec![0.0; k];
    for _ in 0..10_000 {
        let mut moved = 0f64;
        for j in 0..k {
            if norms[j] <= 0.0 {
                continue;
            }
            let g: f64 = cols[j].iter().zip(&res).map(|(c, r)| c * r).sum();
            let next = (w[j] + g / norms[j]).max(0.0);
            let d = next - w[j];
            if d != 0.0 {
                for (r, c) in res.iter_mut().zip(&cols[j]) {
                    *r -= d * c;
                }
                w[j] = next;
                moved = moved.max(d.abs());
            }
        }
        if moved < 1e-12 {
            break;
        }
    }
    (w, res)
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

#[cfg(test)]
mod tests {
    use super::{nnls, signed_rank_less};

    #[test]
    fn signed_rank_finds_differences_below_zero_and_not_above() {
        // 30 differences, 27 of them negative: far below 0.
        let d: Vec<f64> = (0..30)
            .map(|i| {
                if i % 10 == 0 {
                    0.1
                } else {
                    -0.05 - 0.01 * i as f64
                }
            })
            .collect();
        let (p, effect) = signed_rank_less(&d);
        assert!(p < 1e-4, "{p}");
        assert!((effect - 0.9).abs() < 1e-9, "{effect}");
        // Mirrored: nowhere near.
        let up: Vec<f64> = d.iter().map(|x| -x).collect();
        assert!(signed_rank_less(&up).0 > 0.99);
        // Symmetric around 0: p near one half; zeros alone: p = 1.
        let sym: Vec<f64> = (1..=20).flat_map(|i| [i as f64, -(i as f64)]).collect();
        let (p, _) = signed_rank_less(&sym);
        assert!((p - 0.5).abs() < 0.05, "{p}");
        assert_eq!(signed_rank_less(&[0.0, 0.0]).0, 1.0);
    }

    #[test]
    fn nnls_recovers_non_negative_weights_and_clamps_negative_ones() {
        // y = 2 + 0.7 a + 0.3 b - 0.5 c: the fit keeps a and b, and sets c's weight to 0.
        let x: Vec<Vec<f64>> = (0..50)
            .map(|i| {
                let i = i as f64;
                vec![(i * 0.37).sin(), (i * 0.91).cos(), (i * 1.3).sin() * 0.1]
            })
            .collect();
        let y: Vec<f64> = x.iter().map(|r| 2.0 + 0.7 * r[0] + 0.3 * r[1]).collect();
        let (w, res) = nnls(&x, &y);
        assert!(
            (w[0] - 0.7).abs() < 1e-6 && (w[1] - 0.3).abs() < 1e-6,
            "{w:?}"
        );
        assert!(w[2].abs() < 1e-6, "{w:?}");
        assert!(res.iter().all(|r| r.abs() < 1e-6));
        let y: Vec<f64> = x.iter().map(|r| 1.0 + 0.5 * r[0] - 0.5 * r[2]).collect();
        let (w, _) = nnls(&x, &y);
        assert_eq!(w[2], 0.0, "{w:?}");
        assert!(w.iter().all(|v| *v >= 0.0));
    }
}
