//! Canaries (DESIGN.md §4.1, §4.5): secret records in the dataset's own style, planted in a
//! job's released shard at positions only the validator knows, each with never-released
//! siblings drawn alike. A miner whose nonce-chosen subset holds a canary and who trained
//! on that subset has seen it; nobody has seen its siblings. Comparing the model's loss
//! improvement on the two tells training on this job's data from training on anything else.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use tunenet_ml::Record;
use tunenet_types::{JobId, PeerIdStr};

use crate::binding::{binding_seed, training_subset};

/// One job's canaries, as the validator keeps them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobCanaries {
    /// Where the planted canaries sit in the released shard (sorted; every copy).
    pub positions: Vec<usize>,
    /// Siblings generated alike and never released.
    pub siblings: Vec<Record>,
    /// Per canary, the positions of its copies (empty for jobs planted one copy each,
    /// before copies existed: then each position is its own canary).
    #[serde(default)]
    pub groups: Vec<Vec<usize>>,
    /// Positions of ordinary records repeated as often as the canaries (decoys, so that
    /// repetition alone does not point at the canaries); kept out of the subset samples.
    #[serde(default)]
    pub repeated: Vec<usize>,
    /// Per canary (index as in `groups`), its never-released alternatives: records drawn
    /// exactly as the planted one was, so that a model which never saw the canary cannot
    /// tell it from them (empty: the job has siblings instead, and no exposure test).
    #[serde(default)]
    pub alternatives: Vec<Vec<Record>>,
}

impl JobCanaries {
    /// Per canary, the positions of its copies.
    pub fn canary_groups(&self) -> Vec<Vec<usize>> {
        if self.groups.is_empty() {
            self.positions.iter().map(|p| vec![*p]).collect()
        } else {
            self.groups.clone()
        }
    }
}

/// The text a record is compared by when canaries must be unlike every other record.
fn key(r: &Record) -> String {
    match r {
        Record::Text { text } => text.clone(),
        Record::Instruction { prompt, response } => format!("{prompt}\u{0}{response}"),
        Record::Chat { messages } => messages
            .iter()
            .map(|t| format!("{}\u{1}{}", t.role, t.content))
            .collect::<Vec<_>>()
            .join("\u{0}"),
    }
}

/// Canary candidates: `n` distinct records from `pool` (shuffled by `seed`) that equal no
/// record of `existing`, so a sibling is never something a miner could have trained on
/// under another name. Fewer than `n` when the pool runs short.
pub fn pick_candidates(pool: &[Record], existing: &[Record], n: usize, seed: u64) -> Vec<Record> {
    let mut seen: HashSet<String> = existing.iter().map(key).collect();
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut out = Vec::with_capacity(n);
    for i in order {
        if out.len() == n {
            break;
        }
        if seen.insert(key(&pool[i])) {
            out.push(pool[i].clone());
        }
    }
    out
}

/// Takes `n` records out of `records` to serve as canary candidates: records whose text
/// occurs once in the dataset, chosen by `seed`. For datasets with no generator the
/// validator can sample from, held-out real records are the best "same style" there is.
pub fn hold_out(records: &mut Vec<Record>, n: usize, seed: u64) -> Vec<Record> {
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for r in records.iter() {
        *counts.entry(key(r)).or_default() += 1;
    }
    let mut unique: Vec<usize> = (0..records.len())
        .filter(|&i| counts.get(&key(&records[i])) == Some(&1))
        .collect();
    unique.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut take: Vec<usize> = unique.into_iter().take(n).collect();
    take.sort_unstable();
    let mut out = Vec::with_capacity(take.len());
    for &i in take.iter().rev() {
        out.push(records.remove(i));
    }
    out.reverse();
    out
}

/// Plants the first `planted` of `candidates` into `shard` at seeded random positions and
/// keeps the rest as never-released siblings. Returns the shard to release and what the
/// validator must remember.
pub fn plant(
    mut shard: Vec<Record>,
    mut candidates: Vec<Record>,
    planted: usize,
    seed: u64,
) -> (Vec<Record>, JobCanaries) {
    let mut rng = StdRng::seed_from_u64(seed);
    candidates.shuffle(&mut rng);
    let planted = planted.min(candidates.len());
    let siblings = candidates.split_off(planted);
    let total = shard.len() + planted;
    let mut slots: Vec<usize> = (0..total).collect();
    slots.shuffle(&mut rng);
    let mut positions: Vec<usize> = slots.into_iter().take(planted).collect();
    positions.sort_unstable();
    // Inserting in increasing order puts each canary at its final index.
    for (&pos, canary) in positions.iter().zip(candidates) {
        shard.insert(pos, canary);
    }
    (
        shard,
        JobCanaries {
            positions,
            siblings,
            groups: Vec::new(),
            repeated: Vec::new(),
            alternatives: Vec::new(),
        },
    )
}

/// Plants canaries that come with alternatives (each of `variants` is the canary first,
/// then its alternatives, as [`tunenet_ml::demo_canaries`] makes them): each canary
/// `copies` times at seeded random positions, with `decoys` ordinary records repeated as
/// often, as [`plant_repeated`] does. The alternatives are never released; the exposure
/// test ranks a model's gain on each canary among its gains on them.
pub fn plant_with_alternatives(
    shard: Vec<Record>,
    variants: Vec<Vec<Record>>,
    copies: usize,
    decoys: usize,
    seed: u64,
) -> (Vec<Record>, JobCanaries) {
    let mut canaries = Vec::with_capacity(variants.len());
    let mut alternatives = Vec::with_capacity(variants.len());
    for mut v in variants.into_iter().filter(|v| !v.is_empty()) {
        let rest = v.split_off(1);
        canaries.push(v.remove(0));
        alternatives.push(rest);
    }
    let n = canaries.len();
    // plant_repeated shuffles its candidates before planting: plant them in a known order
    // by recovering each group's canary from the planted shard.
    let (out, mut c) = plant_repeated(shard, canaries.clone(), n, copies, decoys, seed);
    let mut ordered = vec![Vec::new(); n];
    for g in std::mem::take(&mut c.groups) {
        if let Some(k) = g
            .first()
            .and_then(|&p| canaries.iter().position(|x| *x == out[p]))
        {
            ordered[k] = g;
        }
    }
    c.groups = ordered;
    c.alternatives = alternatives;
    (out, c)
}

/// Plants `planted` of `candidates` into `shard`, each `copies` times at seeded random
/// positions, and repeats `decoys` ordinary records of the shard as often, so that
/// repetition does not single the canaries out. The rest of the candidates become
/// never-released siblings. Repetition is what gives "trained on this job's data" its
/// power: a miner that trains on its subset at all sees each of its canaries several
/// times, enough to lower its loss on them measurably against the siblings, while a model
/// trained on anything else has never seen either.
pub fn plant_repeated(
    shard: Vec<Record>,
    mut candidates: Vec<Record>,
    planted: usize,
    copies: usize,
    decoys: usize,
    seed: u64,
) -> (Vec<Record>, JobCanaries) {
    #[derive(Clone, Copy, PartialEq)]
    enum Tag {
        Ordinary,
        Canary(usize),
        Decoy,
    }
    let mut rng = StdRng::seed_from_u64(seed);
    candidates.shuffle(&mut rng);
    let planted = planted.min(candidates.len());
    let siblings = candidates.split_off(planted);
    let copies = copies.max(1);
    let mut decoy_idx: Vec<usize> = (0..shard.len()).collect();
    decoy_idx.shuffle(&mut rng);
    decoy_idx.truncate(decoys.min(shard.len()));
    let decoy_set: HashSet<usize> = decoy_idx.iter().copied().collect();
    let mut out: Vec<(Record, Tag)> = shard
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let tag = if decoy_set.contains(&i) {
                Tag::Decoy
            } else {
                Tag::Ordinary
            };
            (r.clone(), tag)
        })
        .collect();
    let mut extra: Vec<(Record, Tag)> = Vec::new();
    for (k, c) in candidates.into_iter().enumerate() {
        extra.extend(std::iter::repeat_n((c, Tag::Canary(k)), copies));
    }
    for &i in &decoy_idx {
        extra.extend(std::iter::repeat_n(
            (shard[i].clone(), Tag::Decoy),
            copies - 1,
        ));
    }
    extra.shuffle(&mut rng);
    for item in extra {
        let at = rand::Rng::random_range(&mut rng, 0..=out.len());
        out.insert(at, item);
    }
    let mut groups = vec![Vec::new(); planted];
    let mut positions = Vec::new();
    let mut repeated = Vec::new();
    for (i, (_, tag)) in out.iter().enumerate() {
        match tag {
            Tag::Canary(k) => {
                groups[*k].push(i);
                positions.push(i);
            }
            Tag::Decoy => repeated.push(i),
            Tag::Ordinary => {}
        }
    }
    (
        out.into_iter().map(|(r, _)| r).collect(),
        JobCanaries {
            positions,
            siblings,
            groups,
            repeated,
            alternatives: Vec::new(),
        },
    )
}

/// What one miner is to be tested on: shard indices only the validator can pick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinerProbe {
    /// Canaries inside this miner's training subset.
    pub assigned_canaries: Vec<usize>,
    /// A sample of its assigned (non-canary) records.
    pub assigned: Vec<usize>,
    /// A sample, as large, of the shard's records outside its subset (non-canary).
    pub unassigned: Vec<usize>,
}

/// The shard indices to test a miner on: its assigned canaries, and `sample` assigned and
/// `sample` unassigned ordinary records (fewer when the shard has fewer), chosen from the
/// binding seed so they differ per miner.
pub fn miner_probe(
    nonce: &[u8; 32],
    job: &JobId,
    miner: &PeerIdStr,
    shard_len: usize,
    canaries: &JobCanaries,
    sample: usize,
) -> MinerProbe {
    let subset = training_subset(nonce, job, miner, shard_len);
    let in_subset: HashSet<usize> = subset.iter().copied().collect();
    let canary: HashSet<usize> = canaries
        .positions
        .iter()
        .chain(&canaries.repeated)
        .copied()
        .collect();
    // A canary counts once, when any of its copies is in the subset (the copy that is
    // scored is the same record whichever it is).
    let assigned_canaries: Vec<usize> = canaries
        .canary_groups()
        .iter()
        .filter_map(|g| g.iter().copied().find(|p| in_subset.contains(p)))
        .collect();
    let seed = binding_seed(nonce, job, miner);
    let mut rng = StdRng::from_seed(*blake3::keyed_hash(&seed, b"probe").as_bytes());
    let mut assigned: Vec<usize> = subset
        .iter()
        .copied()
        .filter(|i| !canary.contains(i))
        .collect();
    let mut unassigned: Vec<usize> = (0..shard_len)
        .filter(|i| !in_subset.contains(i) && !canary.contains(i))
        .collect();
    assigned.shuffle(&mut rng);
    unassigned.shuffle(&mut rng);
    let k = sample.min(assigned.len()).min(unassigned.len());
    assigned.truncate(k);
    unassigned.truncate(k);
    MinerProbe {
        assigned_canaries,
        assigned,
        unassigned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(prefix: &str, n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record::Text {
                text: format!("{prefix}{i}"),
            })
            .collect()
    }

    #[test]
    fn planted_canaries_sit_where_recorded_and_siblings_stay_out() {
        let shard = recs("r", 100);
        let cands = recs("c", 16);
        let (out, c) = plant(shard.clone(), cands.clone(), 8, 7);
        assert_eq!(out.len(), 108);
        assert_eq!(c.positions.len(), 8);
        assert_eq!(c.siblings.len(), 8);
        for &p in &c.positions {
            assert!(cands.contains(&out[p]), "position {p} holds {:?}", out[p]);
        }
        // Every canary is planted once, siblings never, and the shard keeps its order.
        let planted: Vec<&Record> = out.iter().filter(|r| cands.contains(r)).collect();
        assert_eq!(planted.len(), 8);
        assert!(c.siblings.iter().all(|s| !out.contains(s)));
        let rest: Vec<Record> = out.into_iter().filter(|r| !cands.contains(r)).collect();
        assert_eq!(rest, shard);
        // Not all at the ends: positions spread over the shard.
        assert!(
            c.positions.iter().any(|&p| p > 10 && p < 98),
            "{:?}",
            c.positions
        );
        // Another seed, other positions.
        let (_, c2) = plant(shard, cands, 8, 8);
        assert_ne!(c.positions, c2.positions);
    }

    #[test]
    fn repeated_canaries_and_decoys_are_planted_as_recorded() {
        let shard = recs("r", 100);
        let cands = recs("c", 12);
        let (out, c) = plant_repeated(shard.clone(), cands.clone(), 8, 4, 16, 5);
        assert_eq!(out.len(), 100 + 8 * 4 + 16 * 3);
        assert_eq!(c.groups.len(), 8);
        assert_eq!(c.siblings.len(), 4);
        for g in &c.groups {
            assert_eq!(g.len(), 4);
            assert!(
                g.iter()
                    .all(|&p| out[p] == out[g[0]] && cands.contains(&out[p]))
            );
        }
        assert_eq!(c.positions.len(), 32);
        assert_eq!(c.repeated.len(), 16 * 4);
        // Each decoy record occurs 4 times, and no sibling is released.
        for &p in &c.repeated {
            assert_eq!(out.iter().filter(|r| **r == out[p]).count(), 4);
        }
        assert!(c.siblings.iter().all(|s| !out.contains(s)));
        // A probe counts each canary once, by one copy inside the subset.
        let job = JobId::new("c-0").unwrap();
        let m = PeerIdStr("12D3KooWA".into());
        let p = miner_probe(&[2u8; 32], &job, &m, out.len(), &c, 6);
        let mut seen: Vec<&Record> = p.assigned_canaries.iter().map(|&i| &out[i]).collect();
        seen.sort_by_key(|r| format!("{r:?}"));
        seen.dedup();
        assert_eq!(seen.len(), p.assigned_canaries.len());
        assert!(
            p.assigned
                .iter()
                .chain(&p.unassigned)
                .all(|i| !c.repeated.contains(i))
        );
    }

    #[test]
    fn canaries_with_alternatives_keep_their_alternatives_by_group() {
        let shard = recs("r", 60);
        let variants: Vec<Vec<Record>> = (0..5).map(|k| recs(&format!("c{k}-"), 4)).collect();
        let (out, c) = plant_with_alternatives(shard, variants.clone(), 3, 4, 9);
        assert_eq!(out.len(), 60 + 5 * 3 + 4 * 2);
        assert_eq!(c.groups.len(), 5);
        assert!(c.siblings.is_empty());
        for (k, g) in c.groups.iter().enumerate() {
            assert_eq!(g.len(), 3);
            assert!(g.iter().all(|&p| out[p] == variants[k][0]));
            assert_eq!(c.alternatives[k], variants[k][1..]);
            assert!(c.alternatives[k].iter().all(|a| !out.contains(a)));
        }
    }

    #[test]
    fn candidates_are_distinct_and_unlike_the_dataset() {
        let mut pool = recs("x", 10);
        pool.extend(recs("x", 10));
        pool.extend(recs("d", 3));
        let existing = recs("d", 3);
        let got = pick_candidates(&pool, &existing, 20, 1);
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|r| !existing.contains(r)));
        let mut dataset = recs("a", 10);
        dataset.push(dataset[0].clone());
        let held = hold_out(&mut dataset, 4, 3);
        assert_eq!(held.len(), 4);
        assert_eq!(dataset.len(), 7);
        assert!(!held.contains(&Record::Text { text: "a0".into() }));
        assert!(held.iter().all(|h| !dataset.contains(h)));
    }

    #[test]
    fn each_miner_is_probed_on_its_own_canaries_and_records() {
        let job = JobId::new("c-0").unwrap();
        let (a, b) = (PeerIdStr("12D3KooWA".into()), PeerIdStr("12D3KooWB".into()));
        let canaries = JobCanaries {
            positions: vec![3, 17, 40, 41, 60, 77, 90, 99],
            siblings: vec![],
            ..Default::default()
        };
        let nonce = [9u8; 32];
        let pa = miner_probe(&nonce, &job, &a, 108, &canaries, 6);
        let pb = miner_probe(&[1u8; 32], &job, &b, 108, &canaries, 6);
        let subset: HashSet<usize> = training_subset(&nonce, &job, &a, 108).into_iter().collect();
        assert!(!pa.assigned_canaries.is_empty());
        assert!(pa.assigned_canaries.iter().all(|p| subset.contains(p)));
        assert!(pa.assigned.iter().all(|p| subset.contains(p)));
        assert!(pa.unassigned.iter().all(|p| !subset.contains(p)));
        assert_eq!((pa.assigned.len(), pa.unassigned.len()), (6, 6));
        assert!(
            pa.assigned
                .iter()
                .chain(&pa.unassigned)
                .all(|p| !canaries.positions.contains(p))
        );
        assert_ne!(pa, pb);
        assert_eq!(pa, miner_probe(&nonce, &job, &a, 108, &canaries, 6));
    }
}
