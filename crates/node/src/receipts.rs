//! Evaluation receipts on the validator: signed when a job is scored, stored, handed to the
//! miner they concern; and their verification, which recomputes a receipt's per-record
//! losses from the artifact, the base model and the sets published when the competition
//! ended (`tunenet verify-receipt`).

use crate::validator::CompetitionRecord;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tunenet_engine::{JobState, SubmissionState};
use tunenet_store::{Store, StoreError, StoreExt};
use tunenet_types::{BlobId, EvaluationReceipt, Identity, LossComparison, UnixMillis};

/// The store tree of evaluation receipts, keyed `competition/job/miner`.
pub const TREE: &str = "evaluation_receipts";

/// Recomputed losses may differ from the validator's by this much per record (mean nats per
/// token) and still agree: different thread counts and devices sum in different orders.
pub const DEFAULT_TOLERANCE: f64 = 1e-3;

/// One signed receipt per submission of a scored job that revealed an artifact: evaluated
/// ones with their losses, failed ones with the checks that failed them.
pub fn sign_job(
    identity: &Identity,
    record: &CompetitionRecord,
    job: &JobState,
    now: UnixMillis,
) -> Vec<EvaluationReceipt> {
    let mut out = Vec::new();
    for (miner, slot) in &job.slots {
        let score = job.scores.iter().find(|s| &s.miner == miner);
        let (artifact, test_loss, synthetic_loss, verdicts, test, synthetic) =
            match &slot.submission {
                SubmissionState::Evaluated {
                    artifact,
                    test_loss,
                    synthetic_loss,
                    verdicts,
                    test_records,
                    synthetic_records,
                    ..
                } => (
                    *artifact,
                    Some(*test_loss),
                    *synthetic_loss,
                    verdicts.clone(),
                    test_records.clone(),
                    synthetic_records.clone(),
                ),
                SubmissionState::Failed {
                    artifact: Some(artifact),
                    verdicts,
                    ..
                } => (*artifact, None, None, verdicts.clone(), vec![], vec![]),
                _ => continue,
            };
        let mut losses = test.clone();
        losses.extend(synthetic.iter().copied());
        let mut r = EvaluationReceipt {
            competition: job.competition_id.clone(),
            job_id: job.plan.job_id.clone(),
            miner: miner.clone(),
            artifact,
            base_model: record.base_model,
            test_split: record.test_blob,
            synthetic_set: if synthetic.is_empty() {
                None
            } else {
                job.synthetic_set
            },
            max_seq_len: record.config.eval_max_seq_len as u64,
            test_loss,
            synthetic_loss,
            test_records: test.len() as u64,
            synthetic_records: synthetic.len() as u64,
            losses_root: tunenet_types::losses_root(&losses),
            verdicts,
            quality: score.map_or(0.0, |s| s.quality),
            penalty: score.and_then(|s| s.penalty_reason.clone()).or_else(|| {
                match &slot.submission {
                    SubmissionState::Failed { reason, .. } => Some(reason.clone()),
                    _ => None,
                }
            }),
            issued_at_ms: now,
            validator: identity.peer_id(),
            validator_key: vec![],
            signature: vec![],
            losses,
        };
        r.sign(identity);
        out.push(r);
    }
    out
}

fn key(competition: &str, job: &str, miner: &str) -> String {
    format!("{competition}/{job}/{miner}")
}

/// Stores receipts (a later one for the same submission replaces the earlier).
pub fn store(store: &dyn Store, receipts: &[EvaluationReceipt]) -> Result<(), StoreError> {
    for r in receipts {
        store.put_json(
            TREE,
            &key(r.competition.as_str(), r.job_id.as_str(), &r.miner.0),
            r,
        )?;
    }
    Ok(())
}

/// The stored receipts of a competition, optionally of one job and one miner.
pub fn load(
    store: &dyn Store,
    competition: &str,
    job: Option<&str>,
    miner: Option<&str>,
) -> Result<Vec<EvaluationReceipt>, StoreError> {
    let prefix = match job {
        Some(j) => format!("{competition}/{j}/"),
        None => format!("{competition}/"),
    };
    Ok(store
        .scan_json::<EvaluationReceipt>(TREE, &prefix)?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| miner.is_none_or(|m| r.miner.0 == m))
        .collect())
}

/// What checking a receipt against a recomputation found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    /// The receipt's own numbers.
    pub receipt_test_loss: Option<f64>,
    /// The receipt's synthetic loss.
    pub receipt_synthetic_loss: Option<f64>,
    /// The recomputed mean test loss.
    pub test_loss: Option<f64>,
    /// The recomputed mean synthetic loss.
    pub synthetic_loss: Option<f64>,
    /// Record by record.
    pub comparison: LossComparison,
    /// The tolerance held to.
    pub tolerance: f64,
    /// The recomputed per-record losses, test records then synthetic ones.
    pub losses: Vec<Option<f64>>,
}

impl Verification {
    /// Whether the recomputation agrees with the receipt.
    pub fn agrees(&self) -> bool {
        self.comparison.agrees()
            && close(self.receipt_test_loss, self.test_loss, self.tolerance)
            && close(
                self.receipt_synthetic_loss,
                self.synthetic_loss,
                self.tolerance,
            )
    }

    /// A short account in words.
    pub fn summary(&self) -> String {
        let f = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
        let mut s = format!(
            "test loss: receipt {}, recomputed {}; synthetic loss: receipt {}, recomputed {}; {} records, largest difference {:.2e} (tolerance {:.0e})",
            f(self.receipt_test_loss),
            f(self.test_loss),
            f(self.receipt_synthetic_loss),
            f(self.synthetic_loss),
            self.comparison.records,
            self.comparison.max_abs_diff,
            self.tolerance
        );
        if self.agrees() {
            s.push_str(": the receipt holds");
        } else {
            let shown: Vec<String> = self
                .comparison
                .disagreeing
                .iter()
                .take(5)
                .map(|(i, a, b)| format!("record {i}: receipt {}, recomputed {}", f(*a), f(*b)))
                .collect();
            s.push_str(&format!(
                ": the receipt does NOT hold ({} records disagree{}{})",
                self.comparison.disagreeing.len(),
                if shown.is_empty() { "" } else { ": " },
                shown.join("; ")
            ));
        }
        s
    }
}

fn close(a: Option<f64>, b: Option<f64>, tol: f64) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x - y).abs() <= tol,
        (None, None) => true,
        _ => false,
    }
}

/// Checks `receipt` (signature, root) and recomputes its losses: `artifact` scored on top of
/// the base model in `base`, over the published test split and synthetic set (their bytes,
/// which must be the blobs the receipt names).
pub fn verify(
    receipt: &EvaluationReceipt,
    base: &tunenet_ml::ModelDir,
    artifact: &Path,
    test_split: &[u8],
    synthetic_set: Option<&[u8]>,
    devices: &[tunenet_ml::Device],
    tolerance: f64,
) -> Result<Verification, String> {
    receipt.verify().map_err(|e| e.to_string())?;
    if receipt.losses.is_empty() && receipt.test_records + receipt.synthetic_records > 0 {
        return Err("the receipt carries no per-record losses to compare with".into());
    }
    let bytes = std::fs::read(artifact)
        .map_err(|e| format!("cannot read the artifact {}: {e}", artifact.display()))?;
    let got = BlobId::of(&bytes);
    if got != receipt.artifact {
        return Err(format!(
            "{} is not the artifact the receipt names: its blake3 is {got}, the receipt's {}",
            artifact.display(),
            receipt.artifact
        ));
    }
    let got = BlobId::of(test_split);
    if got != receipt.test_split {
        return Err(format!(
            "the test split given is not the one the receipt names: its blake3 is {got}, the receipt's {}",
            receipt.test_split
        ));
    }
    let mut records =
        tunenet_ml::parse_jsonl(test_split).map_err(|e| format!("test split: {e}"))?;
    if records.len() as u64 != receipt.test_records {
        return Err(format!(
            "the test split holds {} records, the receipt counts {}",
            records.len(),
            receipt.test_records
        ));
    }
    match (receipt.synthetic_set, synthetic_set) {
        (Some(want), Some(b)) => {
            let got = BlobId::of(b);
            if got != want {
                return Err(format!(
                    "the synthetic set given is not the one the receipt names: its blake3 is {got}, the receipt's {want}"
                ));
            }
            let syn = tunenet_ml::parse_jsonl(b).map_err(|e| format!("synthetic set: {e}"))?;
            if syn.len() as u64 != receipt.synthetic_records {
                return Err(format!(
                    "the synthetic set holds {} records, the receipt counts {}",
                    syn.len(),
                    receipt.synthetic_records
                ));
            }
            records.extend(syn);
        }
        (Some(want), None) => {
            return Err(format!(
                "the receipt names synthetic set {want}: give it too"
            ));
        }
        (None, _) => {}
    }
    if receipt.test_records == 0 {
        // A submission failed before scoring: nothing to recompute.
        return Ok(Verification {
            receipt_test_loss: receipt.test_loss,
            receipt_synthetic_loss: receipt.synthetic_loss,
            test_loss: None,
            synthetic_loss: None,
            comparison: tunenet_types::compare_losses(&[], &[], tolerance),
            tolerance,
            losses: vec![],
        });
    }
    let r = tunenet_ml::record_losses_on(
        base,
        Some(artifact),
        &records,
        receipt.max_seq_len as usize,
        8,
        devices,
    )
    .map_err(|e| format!("scoring the artifact: {e}"))?;
    let n_test = receipt.test_records as usize;
    let comparison = tunenet_types::compare_losses(&receipt.losses, &r.losses, tolerance);
    Ok(Verification {
        receipt_test_loss: receipt.test_loss,
        receipt_synthetic_loss: receipt.synthetic_loss,
        test_loss: r.mean_over(0..n_test),
        synthetic_loss: r.mean_over(n_test..records.len()),
        comparison,
        tolerance,
        losses: r.losses,
    })
}

/// Receipts as a table: job, miner, losses, quality, penalty, and whether each signature
/// and loss root holds.
pub fn format_receipts(
    competition: &str,
    receipts: &[EvaluationReceipt],
    published: bool,
) -> String {
    let f = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    let mut s = format!(
        "{} evaluation receipts of `{competition}`; {}\n",
        receipts.len(),
        if published {
            "the competition is finished: per-record losses included, hidden sets published"
        } else {
            "the competition runs: per-record losses and hidden sets are withheld until it finishes"
        }
    );
    s.push_str(&format!(
        "{:<14} {:<54} {:>9} {:>9} {:>8}  {:<9} {}\n",
        "job", "miner", "test", "synth", "quality", "receipt", "penalty"
    ));
    for r in receipts {
        let holds = match r.verify() {
            Ok(()) => "valid".to_string(),
            Err(e) => format!("INVALID ({e})"),
        };
        s.push_str(&format!(
            "{:<14} {:<54} {:>9} {:>9} {:>8.4}  {:<9} {}\n",
            r.job_id.as_str(),
            r.miner.0,
            f(r.test_loss),
            f(r.synthetic_loss),
            r.quality,
            holds,
            r.penalty.as_deref().unwrap_or("-")
        ));
    }
    s
}

/// The store tree of disputes, keyed `competition/job/miner`.
pub const DISPUTES: &str = "disputes";
/// When each competition first finished (ms since epoch), keyed by competition id: the
/// dispute window runs from then.
pub const FINISHED: &str = "competitions_finished";

/// The longest reason a dispute may give, in bytes.
pub const MAX_DISPUTE_REASON: usize = 4096;

/// A miner's dispute of its evaluation receipt: the validator's computation (the receipt,
/// with its per-record losses) beside the miner's, compared record by record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dispute {
    /// The receipt disputed, as the validator signed it.
    pub receipt: EvaluationReceipt,
    /// When it was filed.
    pub filed_at_ms: UnixMillis,
    /// The miner's words.
    pub reason: String,
    /// The miner's recomputed mean test loss.
    pub miner_test_loss: Option<f64>,
    /// The miner's recomputed mean synthetic loss.
    pub miner_synthetic_loss: Option<f64>,
    /// The miner's per-record losses, test records then synthetic ones.
    pub miner_losses: Vec<Option<f64>>,
    /// The receipt's losses against the miner's, at the validator's tolerance.
    pub comparison: LossComparison,
    /// That tolerance.
    pub tolerance: f64,
}

/// Notes that competition `id` finished at `now`, unless it already had (a restart
/// finishes it again).
pub fn mark_finished(store: &dyn Store, id: &str, now: UnixMillis) -> Result<(), StoreError> {
    if store.get_json::<UnixMillis>(FINISHED, id)?.is_none() {
        store.put_json(FINISHED, id, &now)?;
    }
    Ok(())
}

/// When competition `id` finished, if it has.
pub fn finished_at(store: &dyn Store, id: &str) -> Result<Option<UnixMillis>, StoreError> {
    store.get_json(FINISHED, id)
}

/// Files a dispute of `receipt` with the miner's `recomputed` losses, if the window is
/// open (it closes `window_ms` after `finished`) and the receipt was not disputed before.
/// Bad input is refused saying what was wrong; nothing stored changes then.
pub fn file_dispute(
    store: &dyn Store,
    receipt: EvaluationReceipt,
    recomputed: &Verification,
    reason: &str,
    finished: UnixMillis,
    window_ms: u64,
    now: UnixMillis,
) -> Result<Dispute, String> {
    let closes = finished.saturating_add(window_ms);
    if now > closes {
        return Err(format!(
            "the dispute window closed {} s after the competition finished ({} s ago)",
            window_ms / 1000,
            (now - closes) / 1000
        ));
    }
    if reason.len() > MAX_DISPUTE_REASON {
        return Err(format!(
            "the reason is {} bytes; at most {MAX_DISPUTE_REASON}",
            reason.len()
        ));
    }
    if receipt.losses.is_empty() {
        return Err(format!(
            "the receipt for job {} has no per-record losses to dispute (the submission failed before it was scored)",
            receipt.job_id
        ));
    }
    if recomputed.losses.len() != receipt.losses.len() {
        return Err(format!(
            "the recomputation gives {} per-record losses; the receipt has {}",
            recomputed.losses.len(),
            receipt.losses.len()
        ));
    }
    let finite = |l: &Option<f64>| l.is_none_or(|x| x.is_finite() && x >= 0.0);
    if let Some(i) = recomputed.losses.iter().position(|l| !finite(l)) {
        return Err(format!(
            "recomputed loss {i} is not a finite non-negative number"
        ));
    }
    if ![recomputed.test_loss, recomputed.synthetic_loss]
        .iter()
        .all(finite)
    {
        return Err("the recomputed mean losses must be finite and non-negative".into());
    }
    let key = key(
        receipt.competition.as_str(),
        receipt.job_id.as_str(),
        &receipt.miner.0,
    );
    if let Some(earlier) = store
        .get_json::<Dispute>(DISPUTES, &key)
        .map_err(|e| e.to_string())?
    {
        return Err(format!(
            "this receipt was already disputed (at {} ms since epoch); a receipt is disputed once",
            earlier.filed_at_ms
        ));
    }
    let d = Dispute {
        comparison: tunenet_types::compare_losses(
            &receipt.losses,
            &recomputed.losses,
            DEFAULT_TOLERANCE,
        ),
        tolerance: DEFAULT_TOLERANCE,
        receipt,
        filed_at_ms: now,
        reason: reason.to_string(),
        miner_test_loss: recomputed.test_loss,
        miner_synthetic_loss: recomputed.synthetic_loss,
        miner_losses: recomputed.losses.clone(),
    };
    store
        .put_json(DISPUTES, &key, &d)
        .map_err(|e| e.to_string())?;
    store.flush().map_err(|e| e.to_string())?;
    Ok(d)
}

/// The disputes of a competition, optionally of one miner.
pub fn disputes(
    store: &dyn Store,
    competition: &str,
    miner: Option<&str>,
) -> Result<Vec<Dispute>, StoreError> {
    Ok(store
        .scan_json::<Dispute>(DISPUTES, &format!("{competition}/"))?
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| miner.is_none_or(|m| d.receipt.miner.0 == m))
        .collect())
}

/// Disputes as the admin reads them: each with the validator's and the miner's numbers.
pub fn format_disputes(competition: &str, disputes: &[Dispute]) -> String {
    let f = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    let mut s = format!("{} disputes in `{competition}`\n", disputes.len());
    for d in disputes {
        let r = &d.receipt;
        s.push_str(&format!(
            "job {} miner {} (filed at {} ms): {}\n  test loss: validator {}, miner {}; synthetic loss: validator {}, miner {}\n  {} of {} records disagree by more than {:.0e} (largest difference {:.2e}){}\n",
            r.job_id,
            r.miner,
            d.filed_at_ms,
            if d.reason.is_empty() { "(no reason given)" } else { &d.reason },
            f(r.test_loss),
            f(d.miner_test_loss),
            f(r.synthetic_loss),
            f(d.miner_synthetic_loss),
            d.comparison.disagreeing.len(),
            d.comparison.records,
            d.tolerance,
            d.comparison.max_abs_diff,
            if d.comparison.agrees() {
                ": the two computations agree"
            } else {
                ""
            }
        ));
        for (i, v, m) in d.comparison.disagreeing.iter().take(10) {
            s.push_str(&format!(
                "    record {i}: validator {}, miner {}\n",
                f(*v),
                f(*m)
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_types::{CompetitionId, JobId, PeerIdStr};

    fn jsonl(prefix: &str, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"prompt\": \"What is the capital of {prefix} land {i}?\", \"response\": \"The capital of {prefix} land {i} is city {}.\"}}\n",
                    i * 7 % 5
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    /// A receipt as a validator would sign it for `artifact`, with `losses` as its
    /// per-record losses (test records first).
    fn receipt(
        id: &Identity,
        artifact: &Path,
        test: &[u8],
        synthetic: &[u8],
        losses: Vec<Option<f64>>,
        n_test: usize,
    ) -> EvaluationReceipt {
        let mean = |r: &[Option<f64>]| {
            let v: Vec<f64> = r.iter().flatten().copied().collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let mut r = EvaluationReceipt {
            competition: CompetitionId::new("c").unwrap(),
            job_id: JobId::new("c-0").unwrap(),
            miner: PeerIdStr("m".into()),
            artifact: BlobId::of(&std::fs::read(artifact).unwrap()),
            base_model: BlobId::of(b"base"),
            test_split: BlobId::of(test),
            synthetic_set: Some(BlobId::of(synthetic)),
            max_seq_len: 64,
            test_loss: None,
            synthetic_loss: None,
            test_records: n_test as u64,
            synthetic_records: (losses.len() - n_test) as u64,
            losses_root: tunenet_types::losses_root(&losses),
            verdicts: vec![],
            quality: 1.0,
            penalty: None,
            issued_at_ms: 1,
            validator: PeerIdStr(String::new()),
            validator_key: vec![],
            signature: vec![],
            losses: vec![],
        };
        r.test_loss = mean(&losses[..n_test]);
        r.synthetic_loss = mean(&losses[n_test..]);
        r.losses = losses;
        r.sign(id);
        r
    }

    #[test]
    fn an_honest_receipt_verifies_and_a_tampered_loss_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (base_dir, art_dir) = (dir.path().join("base"), dir.path().join("tuned"));
        tunenet_ml::init_tiny(&base_dir, 1).unwrap();
        let base = tunenet_ml::ModelDir::open(&base_dir).unwrap();
        // A real artifact: a few LoRA steps on records of the kind scored.
        let cfg = tunenet_ml::TrainConfig {
            max_steps: 3,
            max_seq_len: 64,
            batch_size: 4,
            ..Default::default()
        };
        let report = tunenet_ml::train(
            &base,
            &tunenet_ml::parse_jsonl(&jsonl("train", 8)).unwrap(),
            &cfg,
            None,
            std::time::Duration::ZERO,
            &tunenet_ml::Device::Cpu,
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
            &art_dir,
        )
        .unwrap();
        let artifact = report.artifact;
        let (test, synthetic) = (jsonl("test", 6), jsonl("synthetic", 4));
        let mut records = tunenet_ml::parse_jsonl(&test).unwrap();
        records.extend(tunenet_ml::parse_jsonl(&synthetic).unwrap());
        // The validator scores all its records in one pass (control and probe records
        // too); the miner recomputes the test and synthetic ones alone.
        records.extend(tunenet_ml::parse_jsonl(&jsonl("probe", 5)).unwrap());
        let dev = [tunenet_ml::Device::Cpu];
        let scored =
            tunenet_ml::record_losses_on(&base, Some(&artifact), &records, 64, 8, &dev).unwrap();
        let losses = scored.losses[..10].to_vec();
        let v_id = Identity::generate();

        let check = |r: &EvaluationReceipt, art: &Path, test: &[u8], syn: Option<&[u8]>| {
            verify(r, &base, art, test, syn, &dev, DEFAULT_TOLERANCE)
        };
        let honest = receipt(&v_id, &artifact, &test, &synthetic, losses.clone(), 6);
        let v = check(&honest, &artifact, &test, Some(&synthetic)).unwrap();
        assert!(v.agrees(), "{}", v.summary());
        assert!(v.summary().contains("the receipt holds"), "{}", v.summary());
        assert!(v.comparison.max_abs_diff <= DEFAULT_TOLERANCE);

        // A validator that signs one loss it did not measure is caught by the recomputation.
        let mut lied = losses.clone();
        lied[2] = lied[2].map(|l| l + 0.25);
        let tampered = receipt(&v_id, &artifact, &test, &synthetic, lied, 6);
        let v = check(&tampered, &artifact, &test, Some(&synthetic)).unwrap();
        assert!(!v.agrees());
        assert_eq!(v.comparison.disagreeing.len(), 1, "{}", v.summary());
        assert_eq!(v.comparison.disagreeing[0].0, 2);
        assert!(v.summary().contains("does NOT hold"), "{}", v.summary());

        // A loss changed after signing breaks the root before anything is recomputed.
        let mut edited = honest.clone();
        edited.losses[7] = Some(0.0);
        let e = check(&edited, &artifact, &test, Some(&synthetic)).unwrap_err();
        assert!(e.contains("signed root"), "{e}");

        // The wrong artifact or the wrong sets are named as such.
        let other = base_dir.join("model.safetensors");
        let e = check(&honest, &other, &test, Some(&synthetic)).unwrap_err();
        assert!(e.contains("is not the artifact the receipt names"), "{e}");
        let e = check(&honest, &artifact, &synthetic, Some(&test)).unwrap_err();
        assert!(e.contains("test split given is not the one"), "{e}");
        let e = check(&honest, &artifact, &test, None).unwrap_err();
        assert!(e.contains("give it too"), "{e}");
    }

    #[test]
    fn a_dispute_is_filed_once_within_its_window_and_bad_ones_are_refused() {
        let store = tunenet_store::MemStore::default();
        let id = Identity::generate();
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("a.safetensors");
        std::fs::write(&art, b"artifact").unwrap();
        let (test, syn) = (jsonl("t", 3), jsonl("s", 2));
        let theirs = vec![Some(1.0), Some(1.5), None, Some(2.0), Some(2.5)];
        let r = receipt(&id, &art, &test, &syn, theirs.clone(), 3);
        let mine = |losses: Vec<Option<f64>>| Verification {
            receipt_test_loss: r.test_loss,
            receipt_synthetic_loss: r.synthetic_loss,
            test_loss: Some(1.25),
            synthetic_loss: Some(2.25),
            comparison: tunenet_types::compare_losses(&theirs, &losses, DEFAULT_TOLERANCE),
            tolerance: DEFAULT_TOLERANCE,
            losses,
        };
        let day = 86_400_000;
        let file = |v: &Verification, reason: &str, now: u64| {
            file_dispute(&store, r.clone(), v, reason, 1_000, day, now)
        };
        let mut lied = theirs.clone();
        lied[1] = Some(1.2);
        // Refusals store nothing.
        let e = file(&mine(lied.clone()), "x", 1_000 + day + 1).unwrap_err();
        assert!(e.contains("window closed"), "{e}");
        let e = file(&mine(lied[..4].to_vec()), "x", 2_000).unwrap_err();
        assert!(
            e.contains("gives 4 per-record losses; the receipt has 5"),
            "{e}"
        );
        let mut nan = lied.clone();
        nan[0] = Some(f64::NAN);
        let e = file(&mine(nan), "x", 2_000).unwrap_err();
        assert!(e.contains("recomputed loss 0 is not a finite"), "{e}");
        let e = file(
            &mine(lied.clone()),
            &"x".repeat(MAX_DISPUTE_REASON + 1),
            2_000,
        )
        .unwrap_err();
        assert!(e.contains("at most 4096"), "{e}");
        assert!(disputes(&store, "c", None).unwrap().is_empty());
        // Filed: both computations side by side, the disagreeing record named.
        let d = file(&mine(lied.clone()), "record 1 is wrong", 2_000).unwrap();
        assert_eq!(d.comparison.disagreeing, vec![(1, Some(1.5), Some(1.2))]);
        let listed = disputes(&store, "c", Some("m")).unwrap();
        assert_eq!(listed.len(), 1);
        let text = format_disputes("c", &listed);
        assert!(
            text.contains("record 1: validator 1.5000, miner 1.2000")
                && text.contains("record 1 is wrong")
                && text.contains("1 of 5 records disagree"),
            "{text}"
        );
        let e = file(&mine(theirs.clone()), "again", 3_000).unwrap_err();
        assert!(e.contains("already disputed"), "{e}");
        assert!(disputes(&store, "c", Some("other")).unwrap().is_empty());
    }
}
