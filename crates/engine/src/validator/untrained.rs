//! "Trained on this job's data", judged over a job's cohort at job end (DESIGN.md §4.5).
//!
//! Each evaluation carries a canary exposure verdict: the p-value of the test that the
//! model gained more on its assigned canaries than on their never-released alternatives.
//! For a model that never saw them the test is exact, whatever the model. Its power depends
//! on how much a run memorises, which no validator knows in advance, so the cohort decides
//! when it is decisive, like with like: a submission whose own test stays above
//! `trained_alpha` fails when another miner's submission that learned no more than it did
//! on fresh records (its synthetic loss, or its test loss when the job has no synthetic
//! set, is no lower) shows its canaries at `trained_decisive_alpha`. A model that learned
//! the task as well from something else (other data, the test split, the whole public
//! dataset) and never saw its canaries escapes with probability `trained_alpha`; an honest
//! run that learned less than every decisive peer is not judged by them.
//!
//! Like with like also means the same kind of training. A full fine-tune memorises its
//! records far more readily than a LoRA adapter that learns as much from them: the red team
//! measured an honest rank-4 LoRA at exposure p = 0.07, failed because a full fine-tune that
//! learned less on fresh records showed its canaries at 1e-4. So a LoRA submission is judged
//! only by LoRA peers; a full fine-tune by every peer. (A LoRA submission is one with a
//! `lora_rank` verdict, which the artifact check gives every adapter.)

use super::{JobState, SubmissionState};
use tunenet_types::{IntegritySettings, Outcome, PeerIdStr, Verdict};

/// Name of the job-end verdict.
pub const UNTRAINED_CHECK: &str = "trained_on_job_data";
/// The per-evaluation verdict it reads.
const EXPOSURE_CHECK: &str = "canary_exposure";
/// The verdict every LoRA adapter carries (its rank against the job's bound).
const LORA_CHECK: &str = "lora_rank";

/// Failing verdicts for the job's evaluated submissions that show no sign of training on
/// their canaries while the test is decisive; nothing for the others.
pub(super) fn untrained_findings(
    job: &JobState,
    settings: &IntegritySettings,
) -> Vec<(PeerIdStr, Verdict)> {
    if !settings.enabled {
        return vec![];
    }
    let p_of = |verdicts: &[Verdict]| {
        verdicts
            .iter()
            .find(|v| v.check == EXPOSURE_CHECK)
            .and_then(|v| v.value)
    };
    // (miner, exposure p, loss on fresh records: synthetic, else test, a LoRA adapter).
    let cohort: Vec<(&PeerIdStr, f64, f64, bool)> = job
        .slots
        .iter()
        .filter_map(|(m, s)| match &s.submission {
            SubmissionState::Evaluated {
                verdicts,
                test_loss,
                synthetic_loss,
                ..
            } => p_of(verdicts).map(|p| {
                let lora = verdicts.iter().any(|v| v.check == LORA_CHECK);
                (m, p, synthetic_loss.unwrap_or(*test_loss), lora)
            }),
            _ => None,
        })
        .collect();
    cohort
        .iter()
        .filter(|(_, p, ..)| *p > settings.trained_alpha)
        .filter_map(|(m, p, loss, lora)| {
            // Decisive peers that learned no more than this one on fresh records, of the
            // same kind when this one is a LoRA adapter.
            let peers: Vec<f64> = cohort
                .iter()
                .filter(|(q, pq, lq, qlora)| {
                    q != m
                        && *pq <= settings.trained_decisive_alpha
                        && *lq >= *loss
                        && (*qlora || !*lora)
                })
                .map(|(_, _, lq, _)| *lq)
                .collect();
            let worst = peers.iter().copied().fold(f64::NAN, f64::max);
            (!peers.is_empty()).then(|| {
                ((*m).clone(), Verdict {
                    check: UNTRAINED_CHECK.into(),
                    outcome: Outcome::Fail,
                    value: Some(*p),
                    threshold: Some(settings.trained_alpha),
                    reason: format!(
                        "no sign of training on its assigned data: its canary exposure test gives p = {p:.2} (at most {} needed), while {} other {}submission{} of the job that learned no more than it did on fresh records (loss up to {worst:.4} against its {loss:.4}) show{} their canaries at p <= {:.0e}",
                        settings.trained_alpha,
                        peers.len(),
                        if *lora { "LoRA " } else { "" },
                        if peers.len() == 1 { "" } else { "s" },
                        if peers.len() == 1 { "s" } else { "" },
                        settings.trained_decisive_alpha
                    ),
                })
            })
        })
        .collect()
}
