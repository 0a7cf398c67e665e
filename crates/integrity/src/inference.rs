//! Checks on an inference job's results (a HellaSwag speed competition): the miner's
//! answers must cover every item, agree with themselves, match the validator's reference
//! model on a sample of items drawn after the results arrived, and keep `acc_norm` within
//! the job's tolerance of the reference's; its own timing is informational and is checked
//! against the validator's. Pure functions over scores: the validator computes its
//! reference with `tunenet_ml::score_items` before any result arrives.

use crate::artifact::verdict;
use rand::SeedableRng;
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};
use tunenet_ml::{HellaSwagItem, ItemScore};
use tunenet_types::{Outcome, Verdict};

/// The format tag of an inference submission.
pub const INFERENCE_FORMAT: &str = "tunenet/hellaswag-results/v1";

/// Largest inference submission accepted, bytes (about 100 bytes per item).
pub const MAX_SUBMISSION_BYTES: u64 = 256 << 20;

/// What a miner returns for an inference job (JSON, content-addressed and committed like
/// any artifact).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferenceSubmission {
    /// [`INFERENCE_FORMAT`].
    pub format: String,
    /// Per-item log-likelihoods and predictions, one per shard item.
    pub scores: Vec<ItemScore>,
    /// The miner's own `acc` over the shard.
    pub acc: f64,
    /// The miner's own `acc_norm` over the shard.
    pub acc_norm: f64,
    /// Seconds the miner says the job took, from taking the assignment to the results
    /// (fetching and loading included). Informational: the validator times the job.
    pub reported_secs: f64,
    /// The weights it ran ("dense f32", "gguf q8_0", ...), informational.
    pub weights: String,
}

impl InferenceSubmission {
    /// Reads a submission, refusing anything that is not one.
    pub fn parse(bytes: &[u8]) -> Result<InferenceSubmission, String> {
        if bytes.len() as u64 > MAX_SUBMISSION_BYTES {
            return Err(format!(
                "inference results are {} bytes, over the {MAX_SUBMISSION_BYTES}-byte limit",
                bytes.len()
            ));
        }
        let s: InferenceSubmission = serde_json::from_slice(bytes)
            .map_err(|e| format!("inference results are not valid JSON results: {e}"))?;
        if s.format != INFERENCE_FORMAT {
            return Err(format!(
                "inference results have format `{}`, expected `{INFERENCE_FORMAT}`",
                s.format
            ));
        }
        Ok(s)
    }
}

/// Thresholds of the inference checks (competition settings). Fields added after the
/// first release have serde defaults, so stored competitions keep loading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceTolerance {
    /// Largest difference of `acc_norm` from the reference's, absolute, either way
    /// (0.005 = 0.5 points): lower is a worse model or skipped work, higher is answers the
    /// reference model does not give.
    pub acc_norm_drop: f64,
    /// Share of a shard's items a miner may fabricate that the log-likelihood sample must
    /// catch (0.05 = 5 %); see [`detection_sample_size`].
    pub fabricated_fraction: f64,
    /// Probability with which the sample contains at least one of those items (0.99).
    pub detection_confidence: f64,
    /// The sample is also at least this share of the items (the rule before the
    /// detection bound; it only matters on shards of thousands of items)...
    pub sample_fraction: f64,
    /// ...and at least this many items.
    pub min_sample: usize,
    /// Largest mean absolute difference from the reference, nats per ending token, over
    /// the sampled endings, when quantised weights are allowed (Q8_0/Q4_0 move it by a
    /// few hundredths).
    pub loglik_per_token: f64,
    /// Largest single ending's difference, nats per token, when quantised weights are
    /// allowed.
    pub loglik_per_token_max: f64,
    /// Largest mean difference, nats per token, on a dense-only job
    /// (`allow_quantized = false`): f32 noise only. See [`DENSE_LOGLIK_PER_TOKEN`].
    #[serde(default = "default_dense_mean")]
    pub dense_loglik_per_token: f64,
    /// Largest single ending's difference, nats per token, on a dense-only job. See
    /// [`DENSE_LOGLIK_PER_TOKEN_MAX`].
    #[serde(default = "default_dense_max")]
    pub dense_loglik_per_token_max: f64,
    /// A reported time more than this many seconds shorter than the validator's
    /// measurement, or longer, is flagged (the two differ by the network's two legs only:
    /// the miner counts from taking the assignment to its results).
    pub timing_slack_secs: f64,
    /// Whether miners may run quantised weights; when false the log-likelihoods must match
    /// the dense reference to within f32 noise (`dense_loglik_per_token*`).
    pub allow_quantized: bool,
}

/// Default mean tolerance of a dense-only job, nats per ending token: 2e-4, thousands of
/// times the dense f32 noise measured and a tenth of the smallest Q8_0 error.
///
/// Measured with `tunenet eval hellaswag --scores-out` on 400 demo items (the tiny model,
/// hidden 64) and on 100 (a random model of the same layout, hidden 512, MLP 1376, four
/// layers), against dense f32 at 2 threads and 1 024-token batches (the validator's
/// reference), per ending `|difference| / tokens`:
///
/// | run | tiny: mean / max | hidden 512: mean / max |
/// | --- | --- | --- |
/// | dense f32, `RAYON_NUM_THREADS` 1, 2, 4, 8 x batches 64 to 4 096 | 1.2e-10 / 9.5e-8 | 2.7e-10 / 5.5e-8 |
/// | Q8_0 (quantised matmuls; dequantised to f32) | 2.4e-3 / 1.2e-2; 2.0e-3 / 7.9e-3 | 5.2e-3 / 1.3e-2; 4.7e-3 / 9.1e-3 |
/// | Q4_0 (quantised matmuls; dequantised to f32) | 2.0e-2 / 1.1e-1; 2.0e-2 / 1.1e-1 | 5.7e-2 / 1.1e-1; 5.6e-2 / 1.1e-1 |
///
/// Thread counts and batch shapes leave dense f32 bit-identical or within 1e-7; the margin
/// (over three orders of magnitude) is for other CPUs and GPUs' f32 kernels, not measured
/// here. Q8_0 is caught by the mean alone; a quantised run reported as dense fails.
pub const DENSE_LOGLIK_PER_TOKEN: f64 = 2e-4;

/// Default single-ending tolerance of a dense-only job, nats per token: 2e-3, above any
/// ending's dense noise and below Q8_0's worst endings (see [`DENSE_LOGLIK_PER_TOKEN`]
/// for the measurements); a fabricated item differs by far more.
pub const DENSE_LOGLIK_PER_TOKEN_MAX: f64 = 2e-3;

fn default_dense_mean() -> f64 {
    DENSE_LOGLIK_PER_TOKEN
}

fn default_dense_max() -> f64 {
    DENSE_LOGLIK_PER_TOKEN_MAX
}

impl Default for InferenceTolerance {
    fn default() -> Self {
        InferenceTolerance {
            acc_norm_drop: 0.005,
            fabricated_fraction: 0.05,
            detection_confidence: 0.99,
            sample_fraction: 0.05,
            min_sample: 8,
            loglik_per_token: 0.1,
            loglik_per_token_max: 0.5,
            dense_loglik_per_token: DENSE_LOGLIK_PER_TOKEN,
            dense_loglik_per_token_max: DENSE_LOGLIK_PER_TOKEN_MAX,
            timing_slack_secs: 5.0,
            allow_quantized: true,
        }
    }
}

impl InferenceTolerance {
    /// The log-likelihood tolerances that apply, mean and single ending, nats per token:
    /// quantisation's error where the job allows it, dense f32 noise where it does not.
    pub fn loglik_limits(&self) -> (f64, f64) {
        if self.allow_quantized {
            (self.loglik_per_token, self.loglik_per_token_max)
        } else {
            (self.dense_loglik_per_token, self.dense_loglik_per_token_max)
        }
    }
}

/// The checks' outcome and the submission's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceReport {
    /// One verdict per check.
    pub verdicts: Vec<Verdict>,
    /// `acc_norm` recomputed from the submission's predictions and the labels.
    pub acc_norm: f64,
    /// The reference's `acc_norm`.
    pub reference_acc_norm: f64,
    /// Items answered.
    pub items: usize,
}

impl InferenceReport {
    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.verdicts.iter().any(|v| v.outcome == Outcome::Fail)
    }
}

/// The smallest sample that catches fabrication: if `ceil(fraction * n)` of `n` items
/// (at least one) are fabricated, a sample of `k` items drawn without replacement misses
/// all `f` of them with the hypergeometric probability
///
/// `P(miss) = C(n - f, k) / C(n, k) = prod_{i < k} (n - f - i) / (n - i)`,
///
/// which is at most `(1 - fraction)^k`. Returns the smallest `k` with
/// `P(miss) <= 1 - confidence` (all `n` items when no smaller one does). For 5 % and 99 %:
/// 39 of 50 items, 73 of 200, 86 of 1 000, and 90 from about 10 000 items on
/// (`ln 0.01 / ln 0.95 = 89.8`); shards of 20 items or fewer are compared whole.
pub fn detection_sample_size(n: usize, fraction: f64, confidence: f64) -> usize {
    // Settings that ask for no bound (or certainty) compare every item.
    if n == 0 || fraction.is_nan() || fraction <= 0.0 || confidence.is_nan() || confidence >= 1.0 {
        return n;
    }
    let fabricated = ((n as f64 * fraction.min(1.0)).ceil() as usize).clamp(1, n);
    let allowed_miss = 1.0 - confidence.max(0.0);
    let mut miss = 1.0;
    for k in 0..n {
        if miss <= allowed_miss {
            return k;
        }
        // Zero once every honest item is in the sample (k = n - fabricated).
        miss *= (n - fabricated - k) as f64 / (n - k) as f64;
    }
    n
}

/// How many of `n` items the log-likelihood sample compares: the detection bound
/// ([`detection_sample_size`]), at least `sample_fraction` of the items and `min_sample`,
/// at most `n`.
pub fn sample_size(n: usize, tol: &InferenceTolerance) -> usize {
    detection_sample_size(n, tol.fabricated_fraction, tol.detection_confidence)
        .max((n as f64 * tol.sample_fraction).ceil() as usize)
        .max(tol.min_sample)
        .min(n)
}

/// The items whose log-likelihoods are compared, drawn from `seed` (which the validator
/// draws only after the results arrived); [`sample_size`] of them.
pub fn sample_items(seed: u64, n: usize, tol: &InferenceTolerance) -> Vec<usize> {
    let k = sample_size(n, tol);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ix = sample(&mut rng, n, k).into_vec();
    ix.sort_unstable();
    ix
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    xs.enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// Checks `sub` against the shard's `items`, the validator's `reference` scores (one per
/// item, by index) and the items `sample` drawn after arrival; `measured_secs` is the
/// validator's own time from dispatch to the committed results.
pub fn check_inference(
    items: &[HellaSwagItem],
    reference: &[ItemScore],
    sub: &InferenceSubmission,
    sample: &[usize],
    measured_secs: f64,
    tol: &InferenceTolerance,
) -> InferenceReport {
    let n = items.len();
    let mut verdicts = Vec::new();
    let reference_acc_norm = if n == 0 {
        0.0
    } else {
        reference
            .iter()
            .filter(|r| items.get(r.index).is_some_and(|i| i.label == r.pred_norm))
            .count() as f64
            / n as f64
    };
    // Completeness: every item exactly once, one finite log-likelihood per ending.
    let mut by_index: Vec<Option<&ItemScore>> = vec![None; n];
    let mut problems = Vec::new();
    for s in &sub.scores {
        match items.get(s.index) {
            None => problems.push(format!("item {} is not in the shard", s.index)),
            Some(item) => {
                if by_index[s.index].is_some() {
                    problems.push(format!("item {} answered twice", s.index));
                } else if s.logliks.len() != item.endings.len()
                    || s.ending_tokens.len() != item.endings.len()
                    || s.ending_bytes.len() != item.endings.len()
                {
                    problems.push(format!(
                        "item {} has {} log-likelihoods for {} endings",
                        s.index,
                        s.logliks.len(),
                        item.endings.len()
                    ));
                } else if s.logliks.iter().any(|l| !l.is_finite() || *l > 0.0) {
                    problems.push(format!(
                        "item {} has a log-likelihood that is not a finite log-probability",
                        s.index
                    ));
                } else {
                    by_index[s.index] = Some(s);
                }
            }
        }
    }
    let answered = by_index.iter().filter(|s| s.is_some()).count();
    let complete = answered == n && problems.is_empty();
    verdicts.push(verdict(
        "completeness",
        if complete {
            Outcome::Pass
        } else {
            Outcome::Fail
        },
        Some(answered as f64),
        Some(n as f64),
        if complete {
            format!("all {n} items answered")
        } else {
            format!(
                "answered {answered} of {n} items{}",
                problems
                    .first()
                    .map(|p| format!(" ({p}; {} problems)", problems.len()))
                    .unwrap_or_default()
            )
        },
    ));

    // Consistency: predictions follow from the log-likelihoods, and the reported
    // accuracy from the predictions.
    let mut right_norm = 0usize;
    let mut inconsistent = 0usize;
    for (i, s) in by_index.iter().enumerate() {
        let Some(s) = s else { continue };
        let pred = argmax(s.logliks.iter().copied());
        let pred_norm = argmax(
            s.logliks
                .iter()
                .zip(&s.ending_bytes)
                .map(|(l, b)| l / f64::from((*b).max(1))),
        );
        if pred != s.pred || pred_norm != s.pred_norm {
            inconsistent += 1;
        }
        right_norm += usize::from(items[i].label == pred_norm);
    }
    let acc_norm = if n == 0 {
        0.0
    } else {
        right_norm as f64 / n as f64
    };
    let reported_off = (sub.acc_norm - acc_norm).abs() > 0.5 / n.max(1) as f64;
    verdicts.push(verdict(
        "consistency",
        if inconsistent == 0 && !reported_off {
            Outcome::Pass
        } else {
            Outcome::Fail
        },
        Some(inconsistent as f64),
        Some(0.0),
        if inconsistent == 0 && !reported_off {
            "predictions and accuracy follow from the log-likelihoods".into()
        } else {
            format!(
                "{inconsistent} predictions do not follow from their log-likelihoods; reported acc_norm {:.4}, the log-likelihoods give {acc_norm:.4}",
                sub.acc_norm
            )
        },
    ));

    // The sample: log-likelihoods per ending token against the reference model's; on a
    // dense-only job within f32 noise, far below what quantised weights move them by.
    let (mean_limit, max_limit) = tol.loglik_limits();
    let mut diffs = Vec::new();
    let mut missing = 0usize;
    // Sampled items with an ending past `max_limit`, and the worst one (index, diff).
    let mut off_items = 0usize;
    let mut worst: Option<(usize, f64)> = None;
    for &i in sample {
        let (Some(Some(s)), Some(r)) = (by_index.get(i), reference.iter().find(|r| r.index == i))
        else {
            missing += 1;
            continue;
        };
        let mut item_max = 0.0f64;
        for e in 0..r.logliks.len().min(s.logliks.len()) {
            let tokens = f64::from(r.ending_tokens.get(e).copied().unwrap_or(1).max(1));
            let d = (s.logliks[e] - r.logliks[e]).abs() / tokens;
            item_max = item_max.max(d);
            diffs.push(d);
        }
        if item_max > max_limit {
            off_items += 1;
        }
        if worst.is_none_or(|(_, w)| item_max > w) {
            worst = Some((i, item_max));
        }
    }
    let mean = if diffs.is_empty() {
        f64::INFINITY
    } else {
        diffs.iter().sum::<f64>() / diffs.len() as f64
    };
    let max = diffs.iter().copied().fold(0.0, f64::max);
    let ok = missing == 0 && mean <= mean_limit && max <= max_limit;
    let allowed = if tol.allow_quantized {
        format!("allowed {mean_limit} and {max_limit}")
    } else {
        format!(
            "the dense-only tolerance is {mean_limit} and {max_limit}, f32 noise; quantised weights differ by more"
        )
    };
    let suspects = if tol.allow_quantized {
        "made up, or another model"
    } else {
        "quantised weights on a dense-only job, another model, or made up"
    };
    verdicts.push(verdict(
        "loglik_sample",
        if ok { Outcome::Pass } else { Outcome::Fail },
        Some(mean),
        Some(mean_limit),
        if missing > 0 {
            format!(
                "{missing} of the {} sampled items have no answer to compare",
                sample.len()
            )
        } else if ok {
            format!(
                "{} sampled items: mean difference from the reference {mean:.4} nats/token (max {max:.4})",
                sample.len()
            )
        } else {
            format!(
                "{} sampled items: log-likelihoods differ from the reference model's by {mean:.4} nats/token on average (max {max:.4}, item {}; {off_items} items past the single-ending limit; {allowed}): {suspects}",
                sample.len(),
                worst.map(|(i, _)| i).unwrap_or_default(),
            )
        },
    ));

    // Accuracy within the tolerance of the reference, either way, over the whole shard:
    // a higher one is not the reference model's answers any more than a lower one.
    let gap = acc_norm - reference_acc_norm;
    let ok = gap.abs() <= tol.acc_norm_drop + 1e-12;
    verdicts.push(verdict(
        "accuracy",
        if ok { Outcome::Pass } else { Outcome::Fail },
        Some(acc_norm),
        Some(reference_acc_norm),
        if gap > 0.0 && !ok {
            format!(
                "acc_norm {acc_norm:.4} is {gap:.4} above the reference's {reference_acc_norm:.4} (at most {:.4} either way): better than the job's model scores, so not its answers",
                tol.acc_norm_drop
            )
        } else {
            format!(
                "acc_norm {acc_norm:.4} against the reference's {reference_acc_norm:.4} (at most {:.4} either way)",
                tol.acc_norm_drop
            )
        },
    ));

    // Timing: the validator's clock decides the score; a report far from it is flagged.
    let off = sub.reported_secs - measured_secs;
    let timing_ok = sub.reported_secs.is_finite()
        && sub.reported_secs >= 0.0
        && off <= tol.timing_slack_secs
        && off >= -tol.timing_slack_secs;
    verdicts.push(verdict(
        "timing",
        if timing_ok {
            Outcome::Pass
        } else {
            Outcome::Flag
        },
        Some(sub.reported_secs),
        Some(measured_secs),
        if timing_ok {
            format!(
                "reported {:.2} s; the validator measured {measured_secs:.2} s from dispatch to the committed results",
                sub.reported_secs
            )
        } else {
            format!(
                "reported {:.2} s but the validator measured {measured_secs:.2} s from dispatch to the committed results; the validator's time is scored",
                sub.reported_secs
            )
        },
    ));
    InferenceReport {
        verdicts,
        acc_norm,
        reference_acc_norm,
        items: answered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<HellaSwagItem> {
        tunenet_ml::hellaswag_demo_items(n, 3)
    }

    /// A reference that prefers the labelled ending on two items in three.
    fn reference(items: &[HellaSwagItem]) -> Vec<ItemScore> {
        items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let best = if i % 3 == 0 {
                    (it.label + 1) % 4
                } else {
                    it.label
                };
                let logliks: Vec<f64> = (0..4)
                    .map(|e| if e == best { -4.0 } else { -9.0 - e as f64 })
                    .collect();
                ItemScore {
                    index: i,
                    logliks,
                    ending_tokens: vec![5; 4],
                    ending_bytes: vec![20; 4],
                    context_tokens: 12,
                    pred: best,
                    pred_norm: best,
                }
            })
            .collect()
    }

    fn submission(scores: Vec<ItemScore>, items: &[HellaSwagItem]) -> InferenceSubmission {
        let right = scores
            .iter()
            .filter(|s| items[s.index].label == s.pred_norm)
            .count();
        InferenceSubmission {
            format: INFERENCE_FORMAT.into(),
            acc: right as f64 / items.len() as f64,
            acc_norm: right as f64 / items.len() as f64,
            scores,
            reported_secs: 9.5,
            weights: "dense f32".into(),
        }
    }

    fn outcome(r: &InferenceReport, check: &str) -> Outcome {
        r.verdicts
            .iter()
            .find(|v| v.check == check)
            .map(|v| v.outcome)
            .unwrap_or_else(|| panic!("no {check} verdict"))
    }

    #[test]
    fn honest_quantised_results_pass_and_cheats_fail_with_the_reason() {
        let tol = InferenceTolerance::default();
        let items = items(200);
        let reference = reference(&items);
        let sample = sample_items(7, items.len(), &tol);
        assert_eq!(sample.len(), 73);
        // Quantisation noise: a few hundredths of a nat per token.
        let mut noisy = reference.clone();
        for s in &mut noisy {
            for (e, l) in s.logliks.iter_mut().enumerate() {
                *l += 0.1 * ((s.index + e) % 3) as f64 - 0.1;
            }
        }
        let honest = check_inference(
            &items,
            &reference,
            &submission(noisy, &items),
            &sample,
            10.0,
            &tol,
        );
        assert!(!honest.failed(), "{:?}", honest.verdicts);
        assert_eq!(outcome(&honest, "timing"), Outcome::Pass);

        // Made-up log-likelihoods that still name the right endings.
        let mut made_up = reference.clone();
        for s in &mut made_up {
            for (e, l) in s.logliks.iter_mut().enumerate() {
                *l = if e == s.pred { -1.0 } else { -2.0 };
            }
        }
        let r = check_inference(
            &items,
            &reference,
            &submission(made_up, &items),
            &sample,
            10.0,
            &tol,
        );
        assert_eq!(outcome(&r, "loglik_sample"), Outcome::Fail);
        assert_eq!(outcome(&r, "accuracy"), Outcome::Pass);

        // Only some items answered.
        let partial: Vec<ItemScore> = reference.iter().take(150).cloned().collect();
        let r = check_inference(
            &items,
            &reference,
            &submission(partial, &items),
            &sample,
            10.0,
            &tol,
        );
        assert_eq!(outcome(&r, "completeness"), Outcome::Fail);
        assert!(
            r.verdicts[0].reason.contains("150 of 200"),
            "{:?}",
            r.verdicts[0]
        );

        // A claimed accuracy the log-likelihoods do not give.
        let mut boasted = submission(reference.clone(), &items);
        boasted.acc_norm = 0.99;
        let r = check_inference(&items, &reference, &boasted, &sample, 10.0, &tol);
        assert_eq!(outcome(&r, "consistency"), Outcome::Fail);

        // Worse answers on every third item: accuracy drops past the tolerance.
        let mut worse = reference.clone();
        for s in worse.iter_mut().filter(|s| s.index % 3 == 1) {
            s.logliks.swap(s.pred, (s.pred + 1) % 4);
            s.pred = (s.pred + 1) % 4;
            s.pred_norm = s.pred;
        }
        let r = check_inference(
            &items,
            &reference,
            &submission(worse, &items),
            &sample,
            10.0,
            &tol,
        );
        assert_eq!(outcome(&r, "accuracy"), Outcome::Fail);

        // A padded timing report: flagged, not failed (the validator's clock is scored).
        let mut padded = submission(reference.clone(), &items);
        padded.reported_secs = 0.2;
        let r = check_inference(&items, &reference, &padded, &sample, 10.0, &tol);
        assert_eq!(outcome(&r, "timing"), Outcome::Flag);
        assert!(!r.failed());
    }

    /// The largest dense f32 difference measured (see [`DENSE_LOGLIK_PER_TOKEN`]).
    const DENSE_NOISE_MAX: f64 = 9.5e-8;
    /// The smallest Q8_0 mean difference measured.
    const Q8_0_MEAN: f64 = 2.0e-3;

    /// Shifts every ending by `per_token` nats per token, alternating in sign (as rounding
    /// noise does), predictions unchanged.
    fn shifted(reference: &[ItemScore], per_token: f64) -> Vec<ItemScore> {
        let mut out = reference.to_vec();
        for s in &mut out {
            for (e, l) in s.logliks.iter_mut().enumerate() {
                let sign = if (s.index + e) % 2 == 0 { 1.0 } else { -1.0 };
                *l += sign * per_token * f64::from(s.ending_tokens[e]);
            }
        }
        out
    }

    /// Made-up log-likelihoods on item `i` that keep its predictions (so accuracy and
    /// consistency still hold): every ending's scaled alike, by half again.
    fn fabricate(scores: &mut [ItemScore], i: usize) {
        scores[i].logliks.iter_mut().for_each(|l| *l *= 1.5);
    }

    #[test]
    fn the_sample_catches_a_twentieth_fabricated_with_99_percent() {
        // Exact hypergeometric sizes (checked against C(N-K, n) / C(N, n) with big
        // integers): the smallest n with P(miss) <= 0.01.
        for (n, k) in [
            (1, 1),
            (10, 10),
            (20, 20),
            (50, 39),
            (160, 69),
            (200, 73),
            (1_000, 86),
            (10_000, 90),
            (1_000_000, 90),
        ] {
            assert_eq!(detection_sample_size(n, 0.05, 0.99), k, "N = {n}");
        }
        // The bound itself: P(miss) at n is within 1 %, at n - 1 it is not.
        let miss = |n: usize, k: usize| {
            let f = (n as f64 * 0.05).ceil() as usize;
            (0..k)
                .map(|i| (n - f - i) as f64 / (n - i) as f64)
                .product::<f64>()
        };
        assert!(miss(200, 73) <= 0.01 && miss(200, 72) > 0.01);
        assert!(miss(10_000, 90) <= 0.01 && miss(10_000, 89) > 0.01);
        // Never above the (1 - f)^n bound: ceil(ln 0.01 / ln 0.95) = 90.
        assert!(detection_sample_size(usize::MAX >> 40, 0.05, 0.99) <= 90);
        // Stricter settings sample more; the old share and minimum still floor it.
        assert!(detection_sample_size(10_000, 0.01, 0.999) > 600);
        let tol = InferenceTolerance::default();
        assert_eq!(sample_size(200, &tol), 73);
        assert_eq!(sample_size(100_000, &tol), 5_000);
        assert_eq!(sample_items(3, 10_000, &tol).len(), 500);
    }

    #[test]
    fn any_fabricated_item_in_the_sample_fails_the_check() {
        let items = items(200);
        let reference = reference(&items);
        for allow_quantized in [true, false] {
            let tol = InferenceTolerance {
                allow_quantized,
                ..Default::default()
            };
            let sample = sample_items(11, items.len(), &tol);
            for &i in &sample {
                let mut scores = reference.clone();
                fabricate(&mut scores, i);
                let r = check_inference(
                    &items,
                    &reference,
                    &submission(scores, &items),
                    &sample,
                    10.0,
                    &tol,
                );
                assert_eq!(outcome(&r, "loglik_sample"), Outcome::Fail, "item {i}");
                assert_eq!(outcome(&r, "accuracy"), Outcome::Pass);
                assert_eq!(outcome(&r, "consistency"), Outcome::Pass);
                let reason = &r.verdicts[2].reason;
                assert!(reason.contains(&format!("item {i}")), "{reason}");
            }
        }
    }

    #[test]
    fn a_dense_only_job_tells_quantised_weights_from_f32_noise() {
        let items = items(200);
        let reference = reference(&items);
        let dense = InferenceTolerance {
            allow_quantized: false,
            ..Default::default()
        };
        let quantised = InferenceTolerance::default();
        let sample = sample_items(5, items.len(), &dense);
        let check = |scores: Vec<ItemScore>, tol: &InferenceTolerance| {
            check_inference(
                &items,
                &reference,
                &submission(scores, &items),
                &sample,
                10.0,
                tol,
            )
        };
        // Dense f32 noise (the largest measured, on every ending) passes both.
        let noise = check(shifted(&reference, DENSE_NOISE_MAX), &dense);
        assert!(!noise.failed(), "{:?}", noise.verdicts);
        // Q8_0's measured mean error passes where quantised weights are allowed, and
        // fails a dense-only job with the reason.
        let q8 = shifted(&reference, Q8_0_MEAN);
        assert!(!check(q8.clone(), &quantised).failed());
        let r = check(q8, &dense);
        assert_eq!(outcome(&r, "loglik_sample"), Outcome::Fail);
        let reason = &r.verdicts[2].reason;
        assert!(
            reason.contains("dense-only tolerance") && reason.contains("quantised weights"),
            "{reason}"
        );
        // Old records without the dense fields load with the defaults.
        let old: InferenceTolerance =
            serde_json::from_str(r#"{"acc_norm_drop": 0.01, "allow_quantized": false}"#).unwrap();
        assert_eq!(old.loglik_limits(), dense.loglik_limits());
        assert_eq!(old.acc_norm_drop, 0.01);
    }

    #[test]
    fn accuracy_above_the_reference_fails_too() {
        let tol = InferenceTolerance::default();
        let items = items(200);
        let reference = reference(&items);
        let sample = sample_items(2, items.len(), &tol);
        // Right where the reference model is wrong, on a tenth of the items.
        let mut better = reference.clone();
        for s in better.iter_mut().filter(|s| s.index % 30 == 0) {
            let label = items[s.index].label;
            s.logliks.swap(s.pred, label);
            s.pred = label;
            s.pred_norm = label;
        }
        let r = check_inference(
            &items,
            &reference,
            &submission(better, &items),
            &sample,
            10.0,
            &tol,
        );
        assert_eq!(outcome(&r, "accuracy"), Outcome::Fail);
        let reason = &r.verdicts[3].reason;
        assert!(reason.contains("above the reference"), "{reason}");
        // Within the tolerance either way passes: one item of 200 is 0.005.
        let mut one = reference.clone();
        let label = items[0].label;
        let pred = one[0].pred;
        one[0].logliks.swap(pred, label);
        (one[0].pred, one[0].pred_norm) = (label, label);
        let r = check_inference(
            &items,
            &reference,
            &submission(one, &items),
            &sample,
            10.0,
            &tol,
        );
        assert_eq!(outcome(&r, "accuracy"), Outcome::Pass, "{:?}", r.verdicts);
    }

    #[test]
    fn submissions_are_parsed_with_a_clear_error() {
        assert!(
            InferenceSubmission::parse(b"{}")
                .unwrap_err()
                .contains("not valid JSON results")
        );
        let mut s = submission(vec![], &items(1));
        s.format = "other".into();
        let e = InferenceSubmission::parse(&serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert!(e.contains("format `other`"), "{e}");
    }
}
