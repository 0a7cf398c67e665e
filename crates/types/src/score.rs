//! Scoring: per-job qualities normalised to mean 1, and standings as geometric means.

use crate::ids::{CompetitionId, JobId, PeerIdStr};
use serde::{Deserialize, Serialize};

/// How a submission's losses combine into the scored loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringWeights {
    /// Weight of the hidden test loss.
    pub test: f64,
    /// Weight of the synthetic-set loss: a set the validator generates after the deadline
    /// from a fresh seed, so no miner can have trained on it. Submissions without one (no
    /// generator for the dataset) are scored on the test loss alone.
    pub synthetic: f64,
    /// Quality given to a submission that is missing or fails a check.
    pub penalty_quality: f64,
    /// How sharply scored losses separate submissions: a submission's quality is
    /// `exp(-loss / temperature)`, normalised to mean 1 within its job. 1 makes it the
    /// inverse perplexity; above 1 flattens the differences, below 1 sharpens them.
    pub temperature: f64,
}

impl Default for ScoringWeights {
    fn default() -> Self {
        ScoringWeights {
            test: 0.5,
            synthetic: 0.5,
            penalty_quality: 0.0,
            temperature: 1.0,
        }
    }
}

impl ScoringWeights {
    /// Why these weights make no formula, if they do not: every weight finite and not
    /// negative, `test + synthetic` above 0, `temperature` above 0.
    pub fn check(&self) -> Result<(), String> {
        let ok = |w: f64| w.is_finite() && w >= 0.0;
        if !ok(self.test) || !ok(self.synthetic) || self.test + self.synthetic <= 0.0 {
            return Err(format!(
                "scoring weights `test` and `synthetic` must be finite and not negative, with a sum above 0: got {} and {}",
                self.test, self.synthetic
            ));
        }
        if !ok(self.penalty_quality) {
            return Err(format!(
                "`penalty_quality` must be finite and not negative, got {}",
                self.penalty_quality
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "`temperature` must be finite and above 0, got {}",
                self.temperature
            ));
        }
        Ok(())
    }

    /// The qualities of one job's scored losses under these weights (see [`qualities`]),
    /// the losses divided by `temperature` first.
    pub fn qualities(&self, losses: &[Option<f64>]) -> Vec<f64> {
        let t = if self.temperature.is_finite() && self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        };
        let scaled: Vec<Option<f64>> = losses.iter().map(|l| l.map(|v| v / t)).collect();
        qualities(&scaled, self.penalty_quality)
    }

    /// The scored loss: the weighted mean of the test and synthetic losses, or the test
    /// loss alone when there is no synthetic loss (or the weights make no mean).
    pub fn scored_loss(&self, test: f64, synthetic: Option<f64>) -> f64 {
        match synthetic {
            Some(s) if s.is_finite() && self.test >= 0.0 && self.synthetic >= 0.0 => {
                let w = self.test + self.synthetic;
                if w > 0.0 {
                    (self.test * test + self.synthetic * s) / w
                } else {
                    test
                }
            }
            _ => test,
        }
    }
}

/// One miner's result in one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobScore {
    /// The job.
    pub job_id: JobId,
    /// The miner.
    pub miner: PeerIdStr,
    /// The scored loss, if the submission was evaluated.
    pub loss: Option<f64>,
    /// Quality within the job (the job's qualities have mean 1).
    pub quality: f64,
    /// Why the submission got the penalty, if it did.
    pub penalty_reason: Option<String>,
    /// The integrity checks' verdicts.
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
}

/// Qualities for one job's scored losses: `exp(-loss)` (the inverse perplexity)
/// normalised so the evaluated submissions' qualities have mean 1. `None` losses (missing
/// or failed submissions) get `penalty` and stay out of the mean.
pub fn qualities(losses: &[Option<f64>], penalty: f64) -> Vec<f64> {
    let raw: Vec<Option<f64>> = losses
        .iter()
        .map(|l| l.filter(|v| v.is_finite()).map(|v| (-v).exp()))
        .collect();
    let valid: Vec<f64> = raw.iter().flatten().copied().collect();
    if valid.is_empty() {
        return vec![penalty; losses.len()];
    }
    let mean = valid.iter().sum::<f64>() / valid.len() as f64;
    raw.iter()
        .map(|r| match r {
            Some(v) if mean > 0.0 => v / mean,
            Some(_) => 1.0,
            None => penalty,
        })
        .collect()
}

/// A miner's standing: the geometric mean of its qualities (the product, scaled to the
/// number of jobs so miners with different job counts compare).
pub fn standing(qualities: &[f64]) -> f64 {
    if qualities.is_empty() {
        return 0.0;
    }
    if qualities.iter().any(|q| *q <= 0.0) {
        return 0.0;
    }
    (qualities.iter().map(|q| q.ln()).sum::<f64>() / qualities.len() as f64).exp()
}

/// One row of a leaderboard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardRow {
    /// 1-based rank by standing.
    pub rank: u32,
    /// The miner.
    pub miner: PeerIdStr,
    /// Jobs scored.
    pub jobs: u32,
    /// Mean scored loss over the jobs it was evaluated on.
    pub mean_loss: Option<f64>,
    /// Mean quality.
    pub mean_quality: f64,
    /// Geometric mean of qualities.
    pub standing: f64,
    /// Checks that did not pass on any of its jobs, as `check: outcome (job)`.
    #[serde(default)]
    pub verdicts: Vec<String>,
    /// Inference jobs: mean `acc_norm` of its results.
    #[serde(default)]
    pub acc_norm: Option<f64>,
    /// Inference jobs: mean seconds from dispatch to its committed results, by the
    /// validator's clock.
    #[serde(default)]
    pub seconds: Option<f64>,
    /// How the validators that scored this miner agree (None: not computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<crate::QuorumRow>,
}

/// A competition's leaderboard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    /// The competition.
    pub competition_id: CompetitionId,
    /// Rows, best first.
    pub rows: Vec<LeaderboardRow>,
    /// Jobs finished so far.
    pub jobs_done: u32,
    /// Jobs in the competition.
    pub jobs_total: u32,
    /// Fine-tuning (the loss is a test loss) or inference (the loss is ln(seconds per
    /// item), so quality is speed).
    #[serde(default)]
    pub kind: crate::JobKind,
}

/// Builds a leaderboard from job scores.
pub fn leaderboard(
    competition_id: &CompetitionId,
    scores: &[JobScore],
    jobs_done: u32,
    jobs_total: u32,
) -> Leaderboard {
    let mut by_miner: std::collections::BTreeMap<&PeerIdStr, Vec<&JobScore>> = Default::default();
    for s in scores {
        by_miner.entry(&s.miner).or_default().push(s);
    }
    let mut rows: Vec<LeaderboardRow> = by_miner
        .into_iter()
        .map(|(miner, ss)| {
            let qs: Vec<f64> = ss.iter().map(|s| s.quality).collect();
            let losses: Vec<f64> = ss.iter().filter_map(|s| s.loss).collect();
            let mean_of = |check: &str, pick: fn(&Verdict) -> Option<f64>| {
                let xs: Vec<f64> = ss
                    .iter()
                    .flat_map(|s| s.verdicts.iter())
                    .filter(|v| v.check == check)
                    .filter_map(pick)
                    .collect();
                (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
            };
            let verdicts = ss
                .iter()
                .flat_map(|s| {
                    s.verdicts
                        .iter()
                        .filter(|v| v.outcome != Outcome::Pass)
                        .map(move |v| {
                            let o = if v.outcome == Outcome::Fail {
                                "fail"
                            } else {
                                "flag"
                            };
                            format!("{}: {o} ({})", v.check, s.job_id)
                        })
                        // A penalty no check gave (never revealed, never committed, not
                        // evaluable) is shown with its reason, never as "all passed".
                        .chain(
                            s.penalty_reason
                                .as_ref()
                                .filter(|_| s.verdicts.iter().all(|v| v.outcome != Outcome::Fail))
                                .map(|r| format!("penalty: {r} ({})", s.job_id)),
                        )
                })
                .collect();
            LeaderboardRow {
                rank: 0,
                miner: miner.clone(),
                jobs: ss.len() as u32,
                mean_loss: (!losses.is_empty())
                    .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                mean_quality: qs.iter().sum::<f64>() / qs.len() as f64,
                standing: standing(&qs),
                verdicts,
                acc_norm: mean_of("accuracy", |v| v.value),
                seconds: mean_of("timing", |v| v.threshold),
                quorum: None,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.standing
            .total_cmp(&a.standing)
            .then_with(|| a.miner.cmp(&b.miner))
    });
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as u32 + 1;
    }
    Leaderboard {
        competition_id: competition_id.clone(),
        rows,
        jobs_done,
        jobs_total,
        kind: crate::JobKind::FineTune,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualities_have_mean_one_and_follow_loss() {
        let q = qualities(&[Some(2.0), Some(2.5), Some(3.0)], 0.0);
        let mean = q.iter().sum::<f64>() / 3.0;
        assert!((mean - 1.0).abs() < 1e-12);
        assert!(q[0] > q[1] && q[1] > q[2]);
        let q = qualities(&[Some(2.0), None], 0.0);
        assert_eq!(q, vec![1.0, 0.0]);
    }

    #[test]
    fn scored_loss_weighs_test_and_synthetic() {
        let w = ScoringWeights::default();
        assert!((w.scored_loss(2.0, Some(3.0)) - 2.5).abs() < 1e-12);
        assert_eq!(w.scored_loss(2.0, None), 2.0);
        assert_eq!(w.scored_loss(2.0, Some(f64::NAN)), 2.0);
        let test_only = ScoringWeights {
            test: 1.0,
            synthetic: 0.0,
            ..w
        };
        assert_eq!(test_only.scored_loss(2.0, Some(3.0)), 2.0);
        // Stored settings from before the new fields still load.
        let old: IntegritySettings =
            serde_json::from_str(r#"{"enabled":true,"sketch_dim":16}"#).unwrap();
        assert_eq!(old.leak_fail_z, IntegritySettings::default().leak_fail_z);
        assert!(serde_json::from_str::<IntegritySettings>(r#"{"bogus":1}"#).is_err());
    }

    /// Temperature 1 is the plain inverse perplexity; a higher one flattens the qualities
    /// (still mean 1), a lower one sharpens them; weights that make no formula are refused
    /// saying which; weights stored before `temperature` existed load with it at 1.
    #[test]
    fn temperature_scales_the_spread_of_qualities_and_bad_weights_are_refused() {
        let losses = [Some(2.0), Some(2.5), None];
        let w = ScoringWeights::default();
        assert_eq!(w.qualities(&losses), qualities(&losses, 0.0));
        let flat = ScoringWeights {
            temperature: 4.0,
            ..w.clone()
        }
        .qualities(&losses);
        let sharp = ScoringWeights {
            temperature: 0.25,
            ..w.clone()
        }
        .qualities(&losses);
        let spread = |q: &[f64]| q[0] / q[1];
        let base = w.qualities(&losses);
        assert!(spread(&flat) < spread(&base) && spread(&base) < spread(&sharp));
        assert!(((flat[0] + flat[1]) / 2.0 - 1.0).abs() < 1e-12);
        assert!((spread(&flat) - (0.5f64 / 4.0).exp()).abs() < 1e-12);
        assert_eq!(flat[2], 0.0);
        assert!(w.check().is_ok());
        for (bad, says) in [
            (
                ScoringWeights {
                    test: -1.0,
                    ..w.clone()
                },
                "`test` and `synthetic`",
            ),
            (
                ScoringWeights {
                    test: 0.0,
                    synthetic: 0.0,
                    ..w.clone()
                },
                "sum above 0",
            ),
            (
                ScoringWeights {
                    penalty_quality: f64::NAN,
                    ..w.clone()
                },
                "`penalty_quality`",
            ),
            (
                ScoringWeights {
                    temperature: 0.0,
                    ..w.clone()
                },
                "`temperature`",
            ),
        ] {
            let e = bad.check().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let old: ScoringWeights =
            serde_json::from_str(r#"{"test":0.7,"synthetic":0.3,"penalty_quality":0.0}"#).unwrap();
        assert_eq!(old.temperature, 1.0);
    }

    #[test]
    fn a_penalty_no_check_gave_is_shown_with_its_reason() {
        let c = CompetitionId::new("c").unwrap();
        let job = crate::JobId::new("c-0").unwrap();
        let score = |miner: &str, penalty: Option<&str>, verdicts: Vec<Verdict>| JobScore {
            job_id: job.clone(),
            miner: PeerIdStr(miner.into()),
            loss: penalty.is_none().then_some(2.0),
            quality: if penalty.is_none() { 2.0 } else { 0.0 },
            penalty_reason: penalty.map(str::to_string),
            verdicts,
        };
        let failed = Verdict {
            check: "finite".into(),
            outcome: Outcome::Fail,
            value: None,
            threshold: None,
            reason: "NaN".into(),
        };
        let lb = leaderboard(
            &c,
            &[
                score("honest", None, vec![]),
                score(
                    "silent",
                    Some("artifact not revealed within the reveal window"),
                    vec![],
                ),
                score("nan", Some("integrity: finite: NaN"), vec![failed]),
            ],
            1,
            1,
        );
        let row = |m: &str| lb.rows.iter().find(|r| r.miner.0 == m).unwrap().clone();
        assert!(row("honest").verdicts.is_empty());
        assert_eq!(
            row("silent").verdicts,
            vec!["penalty: artifact not revealed within the reveal window (c-0)".to_string()]
        );
        // A failed check names itself; its penalty is not repeated.
        assert_eq!(row("nan").verdicts, vec!["finite: fail (c-0)".to_string()]);
    }

    #[test]
    fn standing_is_geometric_mean() {
        assert!((standing(&[2.0, 0.5]) - 1.0).abs() < 1e-12);
        assert_eq!(standing(&[1.0, 0.0]), 0.0);
    }
}

/// The result of one integrity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Nothing wrong.
    Pass,
    /// Suspicious: shown to the admin and the miner; the score stands.
    Flag,
    /// Cheating or broken: the submission gets the competition's penalty.
    Fail,
}

/// One integrity check's verdict on a submission, with its numbers and a reason in words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The check's name (e.g. `finite`, `lora_rank`, `delta_norm`).
    pub check: String,
    /// Pass, flag or fail.
    pub outcome: Outcome,
    /// The measured value, when there is one.
    pub value: Option<f64>,
    /// The threshold it was held to, when there is one.
    pub threshold: Option<f64>,
    /// What was found, in words.
    pub reason: String,
}

/// Thresholds of the integrity checks: competition settings an admin may change while the
/// competition runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegritySettings {
    /// Run the checks at all.
    pub enabled: bool,
    /// Smallest cosine similarity allowed between any tuned tensor and the base's.
    pub min_tensor_cosine: f64,
    /// Smallest median (over tensors) of that cosine: another model fails this wholesale,
    /// while honest fine-tuning moves a few tensors at most this far.
    pub median_tensor_cosine: f64,
    /// Largest relative change ‖W − W₀‖ / ‖W₀‖ allowed in one tensor.
    pub max_relative_delta: f64,
    /// Smallest total relative change that counts as fine-tuned at all.
    pub min_relative_delta: f64,
    /// Cosine of two submissions' delta sketches above which they are near duplicates.
    pub near_duplicate_cosine: f64,
    /// ...provided their deltas are also this close in size (smaller norm / larger): a
    /// copy keeps the original's size, while independent short runs that merely point the
    /// same way (the first gradient steps on one task) differ in size.
    pub near_duplicate_norm_ratio: f64,
    /// Length of the delta sketch.
    pub sketch_dim: usize,
    /// Significance level of the "trained on this job's data" tests (one-sided
    /// Mann–Whitney U on per-record loss improvements: assigned canaries against
    /// never-released siblings, assigned records against unassigned ones).
    pub trained_alpha: f64,
    /// The canary exposure test is decisive in a job when some submission of another
    /// miner reaches this p-value: the job's canaries are then shown learnable under its
    /// training, and a submission whose own exposure test stays above `trained_alpha`
    /// fails as not trained on its assigned data. For a model that never saw its canaries
    /// the test is exact, so it escapes with probability `trained_alpha`.
    pub trained_decisive_alpha: f64,
    /// Records sampled from each side (assigned, unassigned) for the subset test: 3 a side
    /// is the fewest at which it can reach `trained_alpha` 0.05 (its smallest p-value is 1/20).
    pub subset_sample: usize,
    /// Leakage (at job end): a synthetic/test loss ratio this many robust spreads above
    /// the cohort's median is flagged, or failed when the submission also shows no
    /// significant sign of training on its assigned data (canaries or subset).
    pub leak_flag_z: f64,
    /// ...and failed outright at this many spreads, whatever else it shows.
    pub leak_fail_z: f64,
    /// Smallest spread the leakage check uses, relative to the cohort's median ratio: a
    /// cohort of near-identical honest runs (or of copies) has a MAD near zero, and honest
    /// ratios still differ by this much.
    pub leak_spread_floor: f64,
    /// Leakage (at job end), per record: significance level of the one-sided Mann–Whitney
    /// U test of "this submission's loss sits further below the cohort's per-record median
    /// on the hidden test records than on the synthetic ones". The test and synthetic
    /// records are drawn alike, so for a model that saw neither the test is exact and this
    /// is its false-positive rate per submission. The loss-ratio settings above judge only
    /// submissions evaluated without per-record losses.
    pub leak_alpha: f64,
    /// Leakage, against held-out control records: significance level of the one-sided
    /// Mann–Whitney U test of "lower on the hidden test records than on the control
    /// records", residuals as above. Both sets are random draws from the same records, so
    /// for a model that saw neither the test is exact and this is its false-positive rate
    /// per submission; a finding fails whatever the synthetic set found. With as many
    /// control records as test records the test has power to spare, so it is held to a
    /// tenth of `leak_alpha`: about one honest submission in 10,000 falsely failed.
    pub control_alpha: f64,
    /// Whether the job's synthetic records are drawn as the test split was (a generator of
    /// the dataset's own process: then `leak_alpha` alone decides). A rewritten set (real
    /// data rewritten by a model) is not: a stronger honest fine-tune gains more on the
    /// real test records than on model-written ones, so there a submission also has to
    /// stand out from its job's other submissions (`leak_cohort_z`). Set by the validator
    /// from the competition's `synthetic_generator`.
    pub synthetic_alike: bool,
    /// With a synthetic set not drawn alike: a submission fails the per-record leakage
    /// test only when its shift (median residual on test records less that on synthetic
    /// ones) also lies this many robust spreads (1.4826 MAD, at least `leak_spread_floor`
    /// nats) below the median shift of its job's other submissions; it needs 3 others.
    pub leak_cohort_z: f64,
    /// Whether synthetic record `i` is a neighbour of hidden test record `i` (the
    /// `neighbours` generator): then the per-record leakage test compares each test record
    /// with its own neighbour (a one-sided Wilcoxon signed-rank test on the paired
    /// residuals) instead of the two sets as wholes. Set by the validator from the
    /// competition's `synthetic_generator`.
    pub synthetic_paired: bool,
    /// Whether the leakage check may fail a submission on a set not drawn alike. A
    /// rewritten set is only as like the test split as the rewriting model writes like the
    /// dataset: with a weak rewriter, honest runs that learned the data's style gain on
    /// the test records and lose on the model's text, and stand out by their amount of
    /// training alone. So by default such findings are flagged, not failed; turn this on
    /// once `tunenet redteam --dataset` has measured the check on your data and rewriter.
    pub leak_rewritten_fails: bool,
    /// Derived submissions (model soups, blends of others' work): a submission whose delta
    /// sketch, less its job's mean, is fitted by at most `derived_max_sources` earlier
    /// submissions of other miners (less the same mean) to within this residual (‖r‖ / ‖x‖)
    /// fails as derived, naming its sources. Any affine blend of earlier work fits exactly;
    /// independent runs leave most of their residual unexplained.
    pub derived_residual: f64,
    /// Most earlier submissions a derived one is fitted from.
    pub derived_max_sources: usize,
}

impl Default for IntegritySettings {
    fn default() -> Self {
        IntegritySettings {
            enabled: true,
            min_tensor_cosine: 0.1,
            median_tensor_cosine: 0.5,
            max_relative_delta: 10.0,
            min_relative_delta: 1e-7,
            near_duplicate_cosine: 0.95,
            near_duplicate_norm_ratio: 0.9,
            sketch_dim: 4096,
            trained_alpha: 0.05,
            trained_decisive_alpha: 1e-3,
            subset_sample: 3,
            leak_flag_z: 6.0,
            leak_fail_z: 10.0,
            leak_spread_floor: 0.01,
            leak_alpha: 1e-3,
            control_alpha: 1e-4,
            synthetic_alike: true,
            leak_cohort_z: 4.0,
            synthetic_paired: false,
            leak_rewritten_fails: false,
            derived_residual: 0.05,
            derived_max_sources: 3,
        }
    }
}

/// Cosine similarity of two delta sketches; 0 when either is empty or zero, or their
/// lengths differ.
pub fn sketch_cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}
