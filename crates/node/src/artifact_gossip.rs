//! Artifact records between validators: the signed record (artifact hash, delta sketch,
//! receipt) of each fine-tune submission this validator evaluates is gossiped, and other
//! validators' records are kept in the `foreign_records` tree and handed to the engines
//! that hold a submission of the same artifact, so a copy fails as a duplicate wherever
//! its receipt is later than the first. Signatures are the p2p layer's to check, the
//! verdict the engine's; nothing here blocks the validator loop on the network.

use crate::transport::OnRecord;
use crate::validator::{Cmd, Validator};
use std::collections::{BTreeSet, HashMap};
use tokio::sync::mpsc;
use tunenet_engine::{SubmissionState, ValidatorEngine};
use tunenet_store::{Store, StoreError, StoreExt};
use tunenet_types::{ArtifactRecord, BlobId, JobId, PeerIdStr};

/// The tree of other validators' records, keyed `artifact/validator/job/miner` so that a
/// revealed artifact's records are one prefix scan away.
pub(crate) const TREE: &str = "foreign_records";
/// Most records kept; past this the one with the oldest receipt is forgotten first.
const MAX_RECORDS: usize = 4096;
/// Most records kept per validator, so that one peer cannot crowd out the others.
const MAX_PER_VALIDATOR: usize = 512;

/// A stored record's receipt time and key.
type Entry = (u64, String);

/// The validator's side of artifact-record gossip: how long scoring waits for records,
/// and an index of the stored ones (the records themselves stay in the store).
pub(crate) struct ArtifactGossip {
    grace_ms: u64,
    /// Validators whose records are believed (peer ids). Anyone can sign a receipt as
    /// "a validator"; an untrusted one could backdate a record of an honest miner's
    /// artifact and get it failed as a copy, so records from others are ignored.
    trusted: BTreeSet<String>,
    max_records: usize,
    max_per_validator: usize,
    all: BTreeSet<Entry>,
    by_validator: HashMap<String, BTreeSet<Entry>>,
}

fn key(r: &ArtifactRecord) -> String {
    format!(
        "{}/{}/{}/{}",
        r.artifact, r.receipt.validator, r.receipt.job_id, r.receipt.miner
    )
}

/// The validator part of a key (artifact ids are hex, peer ids base58: no `/` in either).
fn validator_of(key: &str) -> &str {
    key.split('/').nth(1).unwrap_or_default()
}

impl ArtifactGossip {
    /// Indexes the records stored by an earlier run; unreadable ones are deleted.
    pub(crate) fn load(store: &dyn Store, grace_ms: u64) -> Self {
        Self::with_limits(store, grace_ms, MAX_RECORDS, MAX_PER_VALIDATOR)
    }

    fn with_limits(
        store: &dyn Store,
        grace_ms: u64,
        max_records: usize,
        max_per_validator: usize,
    ) -> Self {
        let mut g = ArtifactGossip {
            grace_ms,
            trusted: BTreeSet::new(),
            max_records,
            max_per_validator,
            all: BTreeSet::new(),
            by_validator: HashMap::new(),
        };
        let keys = store.scan(TREE, "").unwrap_or_else(|e| {
            tracing::warn!(error = %e, "stored artifact records could not be read");
            vec![]
        });
        for (k, _) in keys {
            match store.get_json::<ArtifactRecord>(TREE, &k) {
                Ok(Some(r)) => {
                    g.index(r.receipt.received_at_ms, k);
                    g.evict(store, &r.receipt.validator.0);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "unreadable artifact record deleted");
                    let _ = store.delete(TREE, &k);
                }
            }
        }
        g
    }

    /// Believes records only from these validators (peer ids).
    pub(crate) fn trust(mut self, validators: &[String]) -> Self {
        self.trusted = validators.iter().map(|v| v.trim().to_string()).collect();
        self
    }

    /// How long a job waits after its last evaluation before it is scored, in ms.
    /// Whether records and attestations signed by `validator` are believed.
    pub(crate) fn trusts(&self, validator: &str) -> bool {
        self.trusted.contains(validator)
    }

    pub(crate) fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    fn index(&mut self, at: u64, key: String) {
        self.by_validator
            .entry(validator_of(&key).to_string())
            .or_default()
            .insert((at, key.clone()));
        self.all.insert((at, key));
    }

    fn forget(&mut self, store: &dyn Store, entry: &Entry) {
        self.all.remove(entry);
        let v = validator_of(&entry.1);
        if let Some(set) = self.by_validator.get_mut(v) {
            set.remove(entry);
            if set.is_empty() {
                self.by_validator.remove(v);
            }
        }
        if let Err(e) = store.delete(TREE, &entry.1) {
            tracing::warn!(key = %entry.1, error = %e, "could not delete an artifact record");
        }
    }

    /// Forgets the oldest records past the limits: `validator`'s first, then anyone's.
    fn evict(&mut self, store: &dyn Store, validator: &str) {
        while let Some(oldest) = self
            .by_validator
            .get(validator)
            .filter(|s| s.len() > self.max_per_validator)
            .and_then(|s| s.first().cloned())
        {
            self.forget(store, &oldest);
        }
        while self.all.len() > self.max_records {
            let Some(oldest) = self.all.first().cloned() else {
                break;
            };
            self.forget(store, &oldest);
        }
    }

    /// Stores a record; returns whether it is new and kept (not at once the oldest past
    /// the limits).
    fn insert(&mut self, store: &dyn Store, r: &ArtifactRecord) -> Result<bool, StoreError> {
        let k = key(r);
        if store.get(TREE, &k)?.is_some() {
            return Ok(false);
        }
        store.put_json(TREE, &k, r)?;
        let entry = (r.receipt.received_at_ms, k);
        self.index(entry.0, entry.1.clone());
        self.evict(store, &r.receipt.validator.0);
        Ok(self.all.contains(&entry))
    }
}

/// The artifacts revealed to `engine` so far.
fn artifacts(engine: &ValidatorEngine) -> BTreeSet<BlobId> {
    engine
        .plan()
        .jobs
        .iter()
        .filter_map(|p| engine.job(&p.job_id))
        .flat_map(|j| j.slots.values())
        .filter_map(|s| match &s.submission {
            SubmissionState::Uploaded { artifact }
            | SubmissionState::Evaluated { artifact, .. } => Some(*artifact),
            _ => None,
        })
        .collect()
}

/// Hands `engine` the stored records of `artifact` (a submission of it was revealed).
pub(crate) fn attach(store: &dyn Store, engine: &mut ValidatorEngine, artifact: &BlobId) {
    match store.scan_json::<ArtifactRecord>(TREE, &format!("{artifact}/")) {
        Ok(records) => {
            for (_, r) in records {
                tracing::info!(%artifact, validator = %r.receipt.validator, job_id = %r.receipt.job_id, "a revealed artifact was received by another validator too");
                engine.add_foreign(r);
            }
        }
        Err(e) => {
            tracing::warn!(%artifact, error = %e, "stored artifact records could not be read")
        }
    }
}

/// [`attach`] for every artifact already revealed to `engine` (a resumed competition).
pub(crate) fn attach_all(store: &dyn Store, engine: &mut ValidatorEngine) {
    for a in artifacts(engine) {
        attach(store, engine, &a);
    }
}

/// Another validator's record arrived: it is stored, and handed to every competition
/// with a submission of the same artifact (later ones get it when theirs is revealed).
pub(crate) fn receive(v: &mut Validator, record: ArtifactRecord) {
    if !v
        .artifact_gossip
        .trusted
        .contains(&record.receipt.validator.0)
    {
        tracing::info!(validator = %record.receipt.validator, "artifact record ignored: its validator is not in trusted_validators");
        return;
    }
    match v.artifact_gossip.insert(v.store.as_ref(), &record) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "could not store an artifact record");
            return;
        }
    }
    tracing::debug!(validator = %record.receipt.validator, job_id = %record.receipt.job_id, miner = %record.receipt.miner, artifact = %record.artifact, "artifact record stored");
    for c in &mut v.comps {
        if artifacts(&c.engine).contains(&record.artifact) {
            tracing::info!(artifact = %record.artifact, validator = %record.receipt.validator, job_id = %record.receipt.job_id, competition = %c.engine.plan().id, "another validator received an artifact submitted here");
            c.engine.add_foreign(record.clone());
        }
    }
}

/// What the p2p event pump does with a valid record: queue it for the validator loop.
pub(crate) fn on_record(tx: mpsc::Sender<Cmd>) -> OnRecord {
    Box::new(move |peer, record| {
        let job = Box::new(move |v: &mut Validator| receive(v, record));
        if tx.try_send(Cmd::Run(job)).is_err() {
            tracing::warn!(%peer, "artifact record dropped: the validator loop is busy");
        }
    })
}

/// Gossips this validator's record of a fine-tune submission it has just evaluated.
pub(crate) fn publish(
    p2p: Option<&tunenet_p2p::Client>,
    engine: &ValidatorEngine,
    job_id: &JobId,
    miner: &PeerIdStr,
) {
    let Some(client) = p2p.cloned() else {
        return;
    };
    if engine.inference().is_some() {
        return;
    }
    let Some(record) = engine.artifact_record(job_id, miner) else {
        return;
    };
    let (job_id, miner, artifact) = (job_id.clone(), miner.clone(), record.artifact);
    tokio::spawn(async move {
        match client.publish_artifact_record(record).await {
            Ok(()) => tracing::info!(%job_id, %miner, %artifact, "artifact record published"),
            Err(e) => {
                tracing::warn!(%job_id, %miner, error = %e, "artifact record not published")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_store::MemStore;
    use tunenet_types::{Identity, Receipt};

    fn record(v: &Identity, artifact: &[u8], job: &str, at: u64) -> ArtifactRecord {
        let mut receipt = Receipt {
            job_id: JobId::new(job).unwrap(),
            miner: PeerIdStr("12D3KooWminer".into()),
            commit: BlobId::of(job.as_bytes()),
            received_at_ms: at,
            validator: v.peer_id(),
            validator_key: v.public_key_bytes(),
            signature: vec![],
        };
        receipt.signature = v.sign(&receipt.signing_bytes());
        let mut r = ArtifactRecord {
            receipt,
            artifact: BlobId::of(artifact),
            sketch: vec![0.5; 8],
            signature: vec![],
        };
        r.signature = v.sign(&r.signing_bytes());
        r
    }

    fn stored(store: &MemStore) -> Vec<ArtifactRecord> {
        store
            .scan_json::<ArtifactRecord>(TREE, "")
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    #[test]
    fn records_are_kept_once_and_found_by_artifact() {
        let store = MemStore::default();
        let (a, b) = (Identity::generate(), Identity::generate());
        let mut g = ArtifactGossip::load(&store, 5000);
        assert_eq!(g.grace_ms(), 5000);
        let r = record(&a, b"weights", "alpha-0", 10);
        assert!(g.insert(&store, &r).unwrap());
        assert!(!g.insert(&store, &r).unwrap(), "a repeat is not new");
        assert!(
            g.insert(&store, &record(&b, b"weights", "beta-0", 20))
                .unwrap()
        );
        assert!(
            g.insert(&store, &record(&b, b"other", "beta-0", 30))
                .unwrap()
        );
        let same: Vec<ArtifactRecord> = store
            .scan_json::<ArtifactRecord>(TREE, &format!("{}/", BlobId::of(b"weights")))
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(same.len(), 2);
        assert!(same.contains(&r));
        // A restart indexes what is stored.
        let g = ArtifactGossip::load(&store, 0);
        assert_eq!(g.all.len(), 3);
        assert_eq!(g.by_validator[&b.peer_id().0].len(), 2);
    }

    #[test]
    fn the_oldest_records_are_forgotten_past_the_limits() {
        let store = MemStore::default();
        let (a, b) = (Identity::generate(), Identity::generate());
        let mut g = ArtifactGossip::with_limits(&store, 0, 3, 2);
        for (i, at) in [100, 300, 200].into_iter().enumerate() {
            g.insert(&store, &record(&a, &[i as u8], &format!("a-{i}"), at))
                .unwrap();
        }
        // One validator keeps its two newest.
        let mut times: Vec<u64> = stored(&store)
            .iter()
            .map(|r| r.receipt.received_at_ms)
            .collect();
        times.sort();
        assert_eq!(times, vec![200, 300]);
        // A record older than all of a full validator's is not kept.
        assert!(!g.insert(&store, &record(&a, b"old", "a-9", 50)).unwrap());
        // Past the total limit the oldest of anyone's goes; past its own, B's oldest.
        for (i, at) in [250, 400, 500].into_iter().enumerate() {
            assert!(
                g.insert(&store, &record(&b, &[9, i as u8], &format!("b-{i}"), at))
                    .unwrap()
            );
        }
        let mut kept: Vec<(String, u64)> = stored(&store)
            .iter()
            .map(|r| (r.receipt.job_id.to_string(), r.receipt.received_at_ms))
            .collect();
        kept.sort_by_key(|k| k.1);
        assert_eq!(
            kept,
            vec![
                ("a-1".into(), 300),
                ("b-1".into(), 400),
                ("b-2".into(), 500)
            ]
        );
        assert_eq!(g.all.len(), 3);
        // Limits hold across a restart with lower ones.
        let g = ArtifactGossip::with_limits(&store, 0, 2, 2);
        assert_eq!(g.all.len(), 2);
        assert_eq!(stored(&store).len(), 2);
    }
}
