//! Evaluation receipts: what a validator signs after scoring a submission, so that a miner
//! can check its own score once the competition's hidden sets are published.
//!
//! A receipt names the artifact, the base model, the sets it was scored on (by blob id),
//! the losses and check outcomes, and a Merkle root over the per-record losses (test
//! records first, then synthetic ones). The per-record losses travel beside the signed
//! part and must hash to that root; any one of them can also be shown on its own with an
//! inclusion proof ([`loss_proof`], [`verify_loss`]).

use crate::{BlobId, CompetitionId, JobId, PeerIdStr, SignatureError, UnixMillis, Verdict};
use crate::{Identity, identity::Canonical, verify_signature};
use serde::{Deserialize, Serialize};

const LEAF: &str = "tunenet/v1/loss-leaf";
const NODE: &str = "tunenet/v1/loss-node";
const ROOT: &str = "tunenet/v1/loss-root";

/// The hash of record `index`'s loss (None: the record had nothing to score).
pub fn loss_leaf(index: usize, loss: Option<f64>) -> [u8; 32] {
    let mut c = Canonical::new(LEAF);
    c.u64(index as u64);
    match loss {
        Some(l) => c.u64(1).u64(l.to_bits()),
        None => c.u64(0),
    };
    *blake3::hash(&c.finish()).as_bytes()
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    *blake3::hash(&Canonical::new(NODE).bytes(left).bytes(right).finish()).as_bytes()
}

/// One level up: pairs hashed together, an odd last node carried up unchanged.
fn level_up(level: &[[u8; 32]]) -> Vec<[u8; 32]> {
    level
        .chunks(2)
        .map(|p| {
            if p.len() == 2 {
                node(&p[0], &p[1])
            } else {
                p[0]
            }
        })
        .collect()
}

/// The root: the tree's top hash bound to the record count.
fn root_of(count: usize, top: &[u8; 32]) -> BlobId {
    BlobId(*blake3::hash(&Canonical::new(ROOT).u64(count as u64).bytes(top).finish()).as_bytes())
}

/// The Merkle root over `losses`, in order (the count is part of it).
pub fn losses_root(losses: &[Option<f64>]) -> BlobId {
    if losses.is_empty() {
        return root_of(0, &[0; 32]);
    }
    let mut level: Vec<[u8; 32]> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| loss_leaf(i, *l))
        .collect();
    while level.len() > 1 {
        level = level_up(&level);
    }
    root_of(losses.len(), &level[0])
}

/// The inclusion proof of record `index` among `losses`: the sibling hashes from the leaf
/// up (None where the node had no sibling and was carried up). None: no such record.
pub fn loss_proof(losses: &[Option<f64>], index: usize) -> Option<Vec<Option<[u8; 32]>>> {
    if index >= losses.len() {
        return None;
    }
    let mut level: Vec<[u8; 32]> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| loss_leaf(i, *l))
        .collect();
    let mut at = index;
    let mut path = Vec::new();
    while level.len() > 1 {
        path.push(level.get(at ^ 1).copied());
        level = level_up(&level);
        at /= 2;
    }
    Some(path)
}

/// Whether `loss` is record `index`'s among `count` records under `root`, by its proof.
pub fn verify_loss(
    root: &BlobId,
    count: usize,
    index: usize,
    loss: Option<f64>,
    proof: &[Option<[u8; 32]>],
) -> bool {
    if index >= count {
        return false;
    }
    let mut h = loss_leaf(index, loss);
    let (mut at, mut width) = (index, count);
    let mut steps = proof.iter();
    while width > 1 {
        let Some(sibling) = steps.next() else {
            return false;
        };
        let has_sibling = (at ^ 1) < width;
        match (sibling, has_sibling) {
            (Some(s), true) => {
                h = if at % 2 == 0 {
                    node(&h, s)
                } else {
                    node(s, &h)
                };
            }
            (None, false) => {}
            _ => return false,
        }
        at /= 2;
        width = width.div_ceil(2);
    }
    steps.next().is_none() && root_of(count, &h) == *root
}

/// A validator's signed account of how it scored one submission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReceipt {
    /// The competition.
    pub competition: CompetitionId,
    /// The job.
    pub job_id: JobId,
    /// The miner whose submission this is.
    pub miner: PeerIdStr,
    /// The artifact scored.
    pub artifact: BlobId,
    /// The base model's manifest blob.
    pub base_model: BlobId,
    /// The hidden test split it was scored on (published when the competition ends).
    pub test_split: BlobId,
    /// The job's synthetic set, when it had one (published likewise).
    pub synthetic_set: Option<BlobId>,
    /// The longest sequence scored, in tokens (longer records are truncated).
    pub max_seq_len: u64,
    /// Mean token loss on the test split (None: not scored).
    pub test_loss: Option<f64>,
    /// Mean token loss on the synthetic set.
    pub synthetic_loss: Option<f64>,
    /// How many test records the losses cover; synthetic records follow them.
    pub test_records: u64,
    /// How many synthetic records.
    pub synthetic_records: u64,
    /// Merkle root over the per-record losses, test records then synthetic ones.
    pub losses_root: BlobId,
    /// The integrity checks' verdicts, with their numbers.
    pub verdicts: Vec<Verdict>,
    /// The submission's quality in the job (0 with a penalty).
    pub quality: f64,
    /// Why it got the penalty, if it did.
    pub penalty: Option<String>,
    /// When the receipt was signed.
    pub issued_at_ms: UnixMillis,
    /// The validator.
    pub validator: PeerIdStr,
    /// The validator's public key.
    pub validator_key: Vec<u8>,
    /// The validator's signature over [`EvaluationReceipt::signing_bytes`].
    pub signature: Vec<u8>,
    /// The per-record losses (not signed themselves: they must hash to `losses_root`).
    #[serde(default)]
    pub losses: Vec<Option<f64>>,
}

fn opt_f64(c: &mut Canonical, v: Option<f64>) {
    match v {
        Some(x) => c.u64(1).u64(x.to_bits()),
        None => c.u64(0),
    };
}

impl EvaluationReceipt {
    /// The bytes the validator signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/v1/evaluation-receipt");
        c.bytes(self.competition.as_str().as_bytes())
            .bytes(self.job_id.as_str().as_bytes())
            .bytes(self.miner.0.as_bytes())
            .bytes(&self.artifact.0)
            .bytes(&self.base_model.0)
            .bytes(&self.test_split.0);
        match &self.synthetic_set {
            Some(s) => c.u64(1).bytes(&s.0),
            None => c.u64(0),
        };
        c.u64(self.max_seq_len);
        opt_f64(&mut c, self.test_loss);
        opt_f64(&mut c, self.synthetic_loss);
        c.u64(self.test_records)
            .u64(self.synthetic_records)
            .bytes(&self.losses_root.0)
            .u64(self.verdicts.len() as u64);
        for v in &self.verdicts {
            c.bytes(v.check.as_bytes())
                .bytes(format!("{:?}", v.outcome).as_bytes());
            opt_f64(&mut c, v.value);
            opt_f64(&mut c, v.threshold);
            c.bytes(v.reason.as_bytes());
        }
        c.u64(self.quality.to_bits());
        match &self.penalty {
            Some(p) => c.u64(1).bytes(p.as_bytes()),
            None => c.u64(0),
        };
        c.u64(self.issued_at_ms)
            .bytes(self.validator.0.as_bytes())
            .finish()
    }

    /// Signs it as `validator` (setting the validator fields).
    pub fn sign(&mut self, validator: &Identity) {
        self.validator = validator.peer_id();
        self.validator_key = validator.public_key_bytes();
        self.signature = validator.sign(&self.signing_bytes());
    }

    /// Checks the signature, and that the per-record losses carried with it (if any) are
    /// the ones signed for: as many as the counts say, hashing to the root.
    pub fn verify(&self) -> Result<(), ReceiptError> {
        verify_signature(
            &self.validator,
            &self.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
        .map_err(ReceiptError::Signature)?;
        if !self.losses.is_empty() {
            let want = (self.test_records + self.synthetic_records) as usize;
            if self.losses.len() != want {
                return Err(ReceiptError::Losses(format!(
                    "{} per-record losses carried, the receipt counts {want}",
                    self.losses.len()
                )));
            }
            if losses_root(&self.losses) != self.losses_root {
                return Err(ReceiptError::Losses(
                    "the per-record losses carried do not hash to the signed root".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Why a receipt does not hold up.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The signature is not the validator's.
    #[error("the receipt's signature does not verify: {0}")]
    Signature(SignatureError),
    /// The per-record losses are not the ones signed for.
    #[error("{0}")]
    Losses(String),
}

/// How recomputed per-record losses compare with a receipt's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossComparison {
    /// Records compared.
    pub records: usize,
    /// The largest absolute difference over records both scored.
    pub max_abs_diff: f64,
    /// Records whose losses differ by more than the tolerance, or that one side scored and
    /// the other did not: (index, receipt's, recomputed).
    pub disagreeing: Vec<(usize, Option<f64>, Option<f64>)>,
}

impl LossComparison {
    /// Whether every record agrees within the tolerance.
    pub fn agrees(&self) -> bool {
        self.disagreeing.is_empty()
    }
}

/// Compares a receipt's per-record losses with recomputed ones, `tolerance` apart at most.
pub fn compare_losses(
    claimed: &[Option<f64>],
    recomputed: &[Option<f64>],
    tolerance: f64,
) -> LossComparison {
    let mut out = LossComparison {
        records: claimed.len().max(recomputed.len()),
        max_abs_diff: 0.0,
        disagreeing: Vec::new(),
    };
    for i in 0..out.records {
        let (a, b) = (
            claimed.get(i).copied().flatten(),
            recomputed.get(i).copied().flatten(),
        );
        match (a, b) {
            (Some(x), Some(y)) => {
                let d = (x - y).abs();
                if d.is_nan() || d > tolerance {
                    out.disagreeing.push((i, a, b));
                }
                if d.is_finite() {
                    out.max_abs_diff = out.max_abs_diff.max(d);
                }
            }
            (None, None) => {}
            _ => out.disagreeing.push((i, a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(n: usize) -> Vec<Option<f64>> {
        (0..n)
            .map(|i| (i % 7 != 3).then(|| 1.0 + i as f64 / 10.0))
            .collect()
    }

    #[test]
    fn every_record_has_a_proof_and_a_changed_loss_fails_it() {
        for n in [1, 2, 3, 5, 8, 13, 60] {
            let l = losses(n);
            let root = losses_root(&l);
            for i in 0..n {
                let p = loss_proof(&l, i).unwrap();
                assert!(verify_loss(&root, n, i, l[i], &p), "n {n} i {i}");
                let other = Some(l[i].unwrap_or(0.0) + 1e-9);
                assert!(!verify_loss(&root, n, i, other, &p), "n {n} i {i}");
                assert!(!verify_loss(&root, n + 1, i, l[i], &p), "n {n} i {i}");
                if n > 1 {
                    assert!(!verify_loss(&root, n, (i + 1) % n, l[i], &p), "n {n} i {i}");
                }
            }
            assert!(loss_proof(&l, n).is_none());
        }
        // Order and count matter.
        let l = losses(4);
        let mut swapped = l.clone();
        swapped.swap(0, 1);
        assert_ne!(losses_root(&l), losses_root(&swapped));
        assert_ne!(losses_root(&l), losses_root(&l[..3]));
        assert_ne!(losses_root(&[]), losses_root(&[None]));
    }

    fn receipt(id: &Identity) -> EvaluationReceipt {
        let l = losses(5);
        let mut r = EvaluationReceipt {
            competition: CompetitionId::new("c").unwrap(),
            job_id: JobId::new("c-0").unwrap(),
            miner: PeerIdStr("m".into()),
            artifact: BlobId::of(b"a"),
            base_model: BlobId::of(b"b"),
            test_split: BlobId::of(b"t"),
            synthetic_set: Some(BlobId::of(b"s")),
            max_seq_len: 256,
            test_loss: Some(1.1),
            synthetic_loss: Some(1.3),
            test_records: 3,
            synthetic_records: 2,
            losses_root: losses_root(&l),
            verdicts: vec![],
            quality: 1.0,
            penalty: None,
            issued_at_ms: 5,
            validator: PeerIdStr(String::new()),
            validator_key: vec![],
            signature: vec![],
            losses: l,
        };
        r.sign(id);
        r
    }

    #[test]
    fn a_receipt_verifies_and_any_tampering_fails_it() {
        let id = Identity::generate();
        let r = receipt(&id);
        r.verify().unwrap();
        let mut t = r.clone();
        t.test_loss = Some(1.0);
        assert!(matches!(t.verify(), Err(ReceiptError::Signature(_))));
        let mut t = r.clone();
        t.losses[2] = Some(0.5);
        let e = t.verify().unwrap_err().to_string();
        assert!(e.contains("do not hash to the signed root"), "{e}");
        let mut t = r.clone();
        t.losses.pop();
        assert!(t.verify().unwrap_err().to_string().contains("counts 5"));
        // Signed by someone else under the validator's name.
        let mut t = r.clone();
        t.signature = Identity::generate().sign(&t.signing_bytes());
        assert!(t.verify().is_err());
        let json = serde_json::to_string(&r).unwrap();
        let back: EvaluationReceipt = serde_json::from_str(&json).unwrap();
        back.verify().unwrap();
    }

    #[test]
    fn losses_compare_within_tolerance() {
        let a = vec![Some(1.0), Some(2.0), None, Some(3.0)];
        let b = vec![Some(1.0005), Some(2.0), None, Some(3.1)];
        let c = compare_losses(&a, &b, 1e-3);
        assert_eq!(c.disagreeing, vec![(3, Some(3.0), Some(3.1))]);
        assert!((c.max_abs_diff - 0.1).abs() < 1e-9);
        assert!(compare_losses(&a, &a, 0.0).agrees());
        let c = compare_losses(&a, &[Some(1.0), Some(2.0), Some(1.0)], 1e-3);
        assert_eq!(c.records, 4);
        assert_eq!(c.disagreeing.len(), 2);
    }
}
