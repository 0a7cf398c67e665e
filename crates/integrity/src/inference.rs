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

/// Thresholds of the inference checks (competition settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceTolerance {
    /// Largest drop of `acc_norm` below the reference's, absolute (0.005 = 0.5 points).
    pub acc_norm_drop: f64,
    /// Share of items whose log-likelihoods are compared with the reference.
    pub sample_fraction: f64,
    /// ...but at least this many items.
    pub min_sample: usize,
    /// Largest mean absolute difference from the reference, nats per ending token, over
    /// the sampled endings (quantised weights move it by a few hundredths).
    pub loglik_per_token: f64,
    /// Largest single ending's difference, nats per token.
    pub loglik_per_token_max: f64,
    /// A reported time more than this many seconds shorter than the validator's
    /// measurement, or longer, is flagged (the two differ by the network's two legs only:
    /// the miner counts from taking the assignment to its results).
    pub timing_slack_secs: f64,
    /// Whether miners may run quantised weights.
    pub allow_quantized: bool,
}

impl Default for InferenceTolerance {
    fn default() -> Self {
        InferenceTolerance {
            acc_norm_drop: 0.005,
            sample_fraction: 0.05,
            min_sample: 8,
            loglik_per_token: 0.1,
            loglik_per_token_max: 0.5,
            timing_slack_secs: 5.0,
            allow_quantized: true,
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

/// The items whose log-likelihoods are compared, drawn from `seed` (which the validator
/// draws only after the results arrived).
pub fn sample_items(seed: u64, n: usize, tol: &InferenceTolerance) -> Vec<usize> {
    let k = ((n as f64 * tol.sample_fraction).ceil() as usize)
        .max(tol.min_sample)
        .min(n);
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

    // The sample: log-likelihoods per ending token against the reference model's.
    let mut diffs = Vec::new();
    let mut missing = 0usize;
    for &i in sample {
        let (Some(Some(s)), Some(r)) = (by_index.get(i), reference.iter().find(|r| r.index == i))
        else {
            missing += 1;
            continue;
        };
        for e in 0..r.logliks.len().min(s.logliks.len()) {
            let tokens = f64::from(r.ending_tokens.get(e).copied().unwrap_or(1).max(1));
            diffs.push((s.logliks[e] - r.logliks[e]).abs() / tokens);
        }
    }
    let mean = if diffs.is_empty() {
        f64::INFINITY
    } else {
        diffs.iter().sum::<f64>() / diffs.len() as f64
    };
    let max = diffs.iter().copied().fold(0.0, f64::max);
    let ok = missing == 0 && mean <= tol.loglik_per_token && max <= tol.loglik_per_token_max;
    verdicts.push(verdict(
        "loglik_sample",
        if ok { Outcome::Pass } else { Outcome::Fail },
        Some(mean),
        Some(tol.loglik_per_token),
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
                "{} sampled items: log-likelihoods differ from the reference model's by {mean:.3} nats/token on average (max {max:.3}; allowed {} and {}): made up, or another model",
                sample.len(),
                tol.loglik_per_token,
                tol.loglik_per_token_max
            )
        },
    ));

    // Accuracy within the tolerance of the reference, over the whole shard.
    let floor = reference_acc_norm - tol.acc_norm_drop;
    let ok = acc_norm + 1e-12 >= floor;
    verdicts.push(verdict(
        "accuracy",
        if ok { Outcome::Pass } else { Outcome::Fail },
        Some(acc_norm),
        Some(floor),
        format!(
            "acc_norm {acc_norm:.4} against the reference's {reference_acc_norm:.4} (at most {:.4} lower allowed)",
            tol.acc_norm_drop
        ),
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
        assert_eq!(sample.len(), 10);
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
