//! Binding the work to the job (DESIGN.md §4.1): the assignment's secret nonce keys
//! `blake3::keyed_hash(nonce, job ‖ miner)`, which fixes this miner's training subset and
//! its order. Two miners on one job, or one miner on two jobs, train on different data.

use tunenet_types::{JobId, PeerIdStr};

/// Share of the shard each miner trains on.
pub const SUBSET_FRACTION: f64 = 0.8;

/// The seed both sides derive from the nonce.
pub fn binding_seed(nonce: &[u8; 32], job: &JobId, miner: &PeerIdStr) -> [u8; 32] {
    let mut msg = Vec::with_capacity(128);
    msg.extend_from_slice(b"tunenet/v1/binding");
    msg.extend_from_slice(&(job.as_str().len() as u64).to_le_bytes());
    msg.extend_from_slice(job.as_str().as_bytes());
    msg.extend_from_slice(miner.0.as_bytes());
    *blake3::keyed_hash(nonce, &msg).as_bytes()
}

/// The indices of the shard's `n` records this miner trains on, in its order.
pub fn training_subset(nonce: &[u8; 32], job: &JobId, miner: &PeerIdStr, n: usize) -> Vec<usize> {
    let seed = binding_seed(nonce, job, miner);
    // Rank every index by its keyed hash: a permutation only the nonce's holders can make.
    let mut ranked: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let h = blake3::keyed_hash(&seed, &(i as u64).to_le_bytes());
            let mut b = [0u8; 8];
            b.copy_from_slice(&h.as_bytes()[..8]);
            (u64::from_le_bytes(b), i)
        })
        .collect();
    ranked.sort_unstable();
    let keep = ((n as f64 * SUBSET_FRACTION).ceil() as usize).clamp(n.min(1), n);
    ranked.into_iter().take(keep).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_differ_by_miner_and_job_and_repeat_for_the_same() {
        let nonce = [3u8; 32];
        let (j1, j2) = (JobId::new("c-0").unwrap(), JobId::new("c-1").unwrap());
        let (a, b) = (PeerIdStr("12D3KooWA".into()), PeerIdStr("12D3KooWB".into()));
        let s = training_subset(&nonce, &j1, &a, 100);
        assert_eq!(s.len(), 80);
        assert_eq!(s, training_subset(&nonce, &j1, &a, 100));
        assert_ne!(s, training_subset(&nonce, &j1, &b, 100));
        assert_ne!(s, training_subset(&nonce, &j2, &a, 100));
        assert_ne!(s, training_subset(&[4u8; 32], &j1, &a, 100));
        assert_eq!(training_subset(&nonce, &j1, &a, 1), vec![0]);
        assert!(training_subset(&nonce, &j1, &a, 0).is_empty());
    }
}
