//! Validator quorum: each validator signs its view of a competition's standings (a score
//! attestation) and gossips it to the others running the same competition; each
//! leaderboard row then shows how many validators scored the miner, how many agree with
//! their median, and which disagree, with their numbers.

use crate::identity::Canonical;
use crate::{
    CompetitionId, Identity, Leaderboard, PeerIdStr, SignatureError, UnixMillis, verify_signature,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most rows an attestation may carry.
pub const MAX_ATTESTED_ROWS: usize = 1024;

/// How far (relative to the median) a validator's standing for a miner may be from the
/// median of all validators' and still agree, by default.
pub const DEFAULT_QUORUM_TOLERANCE: f64 = 0.1;

/// One miner's standing as one validator scored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttestedStanding {
    /// The miner.
    pub miner: PeerIdStr,
    /// Jobs scored.
    pub jobs: u32,
    /// Mean scored loss.
    pub mean_loss: Option<f64>,
    /// Its standing (geometric mean of its qualities).
    pub standing: f64,
}

/// A validator's signed view of a competition's standings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreAttestation {
    /// The competition.
    pub competition: CompetitionId,
    /// Jobs it has finished.
    pub jobs_done: u32,
    /// Jobs in the competition.
    pub jobs_total: u32,
    /// Each miner it scored.
    pub rows: Vec<AttestedStanding>,
    /// When it was signed.
    pub issued_at_ms: UnixMillis,
    /// The validator.
    pub validator: PeerIdStr,
    /// Its public key.
    pub validator_key: Vec<u8>,
    /// Its signature over [`ScoreAttestation::signing_bytes`].
    pub signature: Vec<u8>,
}

impl ScoreAttestation {
    /// The signed view of `lb`, as `validator`, at `now`.
    pub fn of(lb: &Leaderboard, validator: &Identity, now: UnixMillis) -> Self {
        let mut a = ScoreAttestation {
            competition: lb.competition_id.clone(),
            jobs_done: lb.jobs_done,
            jobs_total: lb.jobs_total,
            rows: lb
                .rows
                .iter()
                .take(MAX_ATTESTED_ROWS)
                .map(|r| AttestedStanding {
                    miner: r.miner.clone(),
                    jobs: r.jobs,
                    mean_loss: r.mean_loss,
                    standing: r.standing,
                })
                .collect(),
            issued_at_ms: now,
            validator: validator.peer_id(),
            validator_key: validator.public_key_bytes(),
            signature: vec![],
        };
        a.signature = validator.sign(&a.signing_bytes());
        a
    }

    /// The bytes the validator signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new("tunenet/v1/score-attestation");
        c.bytes(self.competition.as_str().as_bytes())
            .u64(self.jobs_done as u64)
            .u64(self.jobs_total as u64)
            .u64(self.rows.len() as u64);
        for r in &self.rows {
            c.bytes(r.miner.0.as_bytes()).u64(r.jobs as u64);
            match r.mean_loss {
                Some(l) => c.u64(1).u64(l.to_bits()),
                None => c.u64(0),
            };
            c.u64(r.standing.to_bits());
        }
        c.u64(self.issued_at_ms)
            .bytes(self.validator.0.as_bytes())
            .finish()
    }

    /// Checks the signature and that the numbers make sense (finite, not negative, at most
    /// [`MAX_ATTESTED_ROWS`] rows, each miner once).
    pub fn verify(&self) -> Result<(), String> {
        verify_signature(
            &self.validator,
            &self.validator_key,
            &self.signing_bytes(),
            &self.signature,
        )
        .map_err(|e: SignatureError| format!("score attestation: {e}"))?;
        if self.rows.len() > MAX_ATTESTED_ROWS {
            return Err(format!(
                "score attestation: {} rows, at most {MAX_ATTESTED_ROWS}",
                self.rows.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.rows {
            let ok = r.standing.is_finite()
                && r.standing >= 0.0
                && r.mean_loss.is_none_or(|l| l.is_finite() && l >= 0.0);
            if !ok {
                return Err(format!(
                    "score attestation: miner {}'s numbers are not finite and non-negative",
                    r.miner
                ));
            }
            if !seen.insert(&r.miner) {
                return Err(format!(
                    "score attestation: miner {} appears twice",
                    r.miner
                ));
            }
        }
        Ok(())
    }
}

/// One validator's numbers for a miner that disagree with the median.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    /// The validator.
    pub validator: PeerIdStr,
    /// Its standing for the miner.
    pub standing: f64,
    /// Its mean loss for the miner.
    pub mean_loss: Option<f64>,
    /// Jobs it scored the miner on.
    pub jobs: u32,
}

/// How the validators that scored a miner agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuorumRow {
    /// Validators that scored the miner (this one included).
    pub validators: u32,
    /// Of those, how many are within the tolerance of the median.
    pub agreeing: u32,
    /// The median standing across them.
    pub median_standing: f64,
    /// The ones that are not, with their numbers.
    pub outliers: Vec<Outlier>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per miner of `own` (this validator's leaderboard, signed by `me`), how the validators
/// whose `attestations` are given agree on its standing: the latest attestation of each
/// other validator for the same competition counts. A validator agrees when its standing is
/// within `tolerance` of the median, relative to the median.
pub fn quorum(
    me: &PeerIdStr,
    own: &Leaderboard,
    attestations: &[ScoreAttestation],
    tolerance: f64,
) -> BTreeMap<PeerIdStr, QuorumRow> {
    let mut latest: BTreeMap<&PeerIdStr, &ScoreAttestation> = BTreeMap::new();
    for a in attestations {
        if a.competition != own.competition_id || &a.validator == me {
            continue;
        }
        match latest.get(&a.validator) {
            Some(b) if b.issued_at_ms >= a.issued_at_ms => {}
            _ => {
                latest.insert(&a.validator, a);
            }
        }
    }
    let mut out = BTreeMap::new();
    for row in &own.rows {
        let mut views: Vec<Outlier> = vec![Outlier {
            validator: me.clone(),
            standing: row.standing,
            mean_loss: row.mean_loss,
            jobs: row.jobs,
        }];
        for a in latest.values() {
            if let Some(r) = a.rows.iter().find(|r| r.miner == row.miner) {
                views.push(Outlier {
                    validator: a.validator.clone(),
                    standing: r.standing,
                    mean_loss: r.mean_loss,
                    jobs: r.jobs,
                });
            }
        }
        let mut standings: Vec<f64> = views.iter().map(|v| v.standing).collect();
        let m = median(&mut standings);
        let allowed = tolerance * m.abs().max(1e-9);
        let (agree, outliers): (Vec<Outlier>, Vec<Outlier>) = views
            .into_iter()
            .partition(|v| (v.standing - m).abs() <= allowed);
        out.insert(
            row.miner.clone(),
            QuorumRow {
                validators: (agree.len() + outliers.len()) as u32,
                agreeing: agree.len() as u32,
                median_standing: m,
                outliers,
            },
        );
    }
    out
}

/// `lb` with each row's quorum filled in from `attestations` (rows no other validator
/// scored keep none), and, when `by_median`, ranked
/// by the median standing across validators instead of this validator's own.
pub fn with_quorum(
    me: &PeerIdStr,
    mut lb: Leaderboard,
    attestations: &[ScoreAttestation],
    tolerance: f64,
    by_median: bool,
) -> Leaderboard {
    let q = quorum(me, &lb, attestations, tolerance);
    // Only where another validator scored the miner too: alone, there is nothing to agree
    // on, and the board stays as this validator's scores made it.
    for r in &mut lb.rows {
        r.quorum = q.get(&r.miner).filter(|q| q.validators > 1).cloned();
    }
    if by_median {
        let key =
            |r: &crate::LeaderboardRow| r.quorum.as_ref().map_or(r.standing, |q| q.median_standing);
        lb.rows
            .sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.miner.cmp(&b.miner)));
        for (i, r) in lb.rows.iter_mut().enumerate() {
            r.rank = i as u32 + 1;
        }
    }
    lb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LeaderboardRow;

    fn lb(rows: &[(&str, f64)]) -> Leaderboard {
        Leaderboard {
            competition_id: CompetitionId::new("q").unwrap(),
            rows: rows
                .iter()
                .enumerate()
                .map(|(i, (m, s))| LeaderboardRow {
                    rank: i as u32 + 1,
                    miner: PeerIdStr(m.to_string()),
                    jobs: 2,
                    mean_loss: Some(2.0 - s),
                    mean_quality: *s,
                    standing: *s,
                    verdicts: vec![],
                    acc_norm: None,
                    seconds: None,
                    quorum: None,
                })
                .collect(),
            jobs_done: 2,
            jobs_total: 2,
            kind: Default::default(),
        }
    }

    #[test]
    fn two_validators_agree_and_an_outlier_is_flagged_with_its_numbers() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let own = lb(&[("m1", 1.10), ("m2", 0.90)]);
        let from_b = ScoreAttestation::of(&lb(&[("m1", 1.08), ("m2", 0.92)]), &b, 10);
        // C scores the miners the other way round.
        let from_c = ScoreAttestation::of(&lb(&[("m2", 1.40), ("m1", 0.60)]), &c, 10);
        from_b.verify().unwrap();
        from_c.verify().unwrap();
        let q = quorum(&a.peer_id(), &own, &[from_b.clone(), from_c.clone()], 0.1);
        let m1 = &q[&PeerIdStr("m1".into())];
        assert_eq!((m1.validators, m1.agreeing), (3, 2));
        assert!((m1.median_standing - 1.08).abs() < 1e-12);
        assert_eq!(m1.outliers.len(), 1);
        assert_eq!(m1.outliers[0].validator, c.peer_id());
        assert_eq!(m1.outliers[0].standing, 0.60);
        let m2 = &q[&PeerIdStr("m2".into())];
        assert_eq!((m2.validators, m2.agreeing), (3, 2));
        assert_eq!(m2.outliers[0].validator, c.peer_id());
        // Ranked by the median, the order is the agreeing majority's.
        let ranked = with_quorum(&a.peer_id(), own.clone(), &[from_b, from_c], 0.1, true);
        assert_eq!(ranked.rows[0].miner.0, "m1");
        assert!(ranked.rows[0].quorum.is_some());
        // Alone, a validator agrees with itself, and its board is left as it was.
        let alone = quorum(&a.peer_id(), &own, &[], 0.1);
        assert_eq!(alone[&PeerIdStr("m1".into())].agreeing, 1);
        assert_eq!(with_quorum(&a.peer_id(), own.clone(), &[], 0.1, false), own);
    }

    #[test]
    fn only_the_latest_attestation_of_the_same_competition_counts_and_forgeries_fail() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let own = lb(&[("m1", 1.0)]);
        let old = ScoreAttestation::of(&lb(&[("m1", 0.2)]), &b, 5);
        let new = ScoreAttestation::of(&lb(&[("m1", 1.02)]), &b, 9);
        let mut other = lb(&[("m1", 0.1)]);
        other.competition_id = CompetitionId::new("other").unwrap();
        let elsewhere = ScoreAttestation::of(&other, &b, 20);
        let q = quorum(&a.peer_id(), &own, &[new, old, elsewhere], 0.1);
        let m1 = &q[&PeerIdStr("m1".into())];
        assert_eq!((m1.validators, m1.agreeing), (2, 2));
        // Changed numbers, a bad value or a repeated miner are refused.
        let mut t = ScoreAttestation::of(&lb(&[("m1", 1.0)]), &b, 9);
        t.rows[0].standing = 3.0;
        assert!(t.verify().is_err());
        let nan = ScoreAttestation::of(&lb(&[("m1", f64::NAN)]), &b, 9);
        assert!(nan.verify().unwrap_err().contains("not finite"));
        let twice = ScoreAttestation::of(&lb(&[("m1", 1.0), ("m1", 1.0)]), &b, 9);
        assert!(twice.verify().unwrap_err().contains("twice"));
    }
}
