//! The red team: real competitions on the tiny model, run in-process through the real
//! validator engine, real training, real integrity checks and real evaluation, with one
//! cheating miner per known strategy beside honest miners of varied settings. It counts
//! who is caught by which check, and every honest miner wrongly flagged.

use crate::error::NodeError;
use crate::validator::{Binding, JobSets, evaluate_submission};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tunenet_engine::{
    CompetitionPlan, JobPlan, SubmissionState, ValidatorEffect, ValidatorEngine, ValidatorError,
    ValidatorInput,
};
use tunenet_ml::{Device, Method, ModelDir, Record, TrainConfig};
use tunenet_types::{
    Assignment, BlobId, Commitment, CompetitionId, Decision, DecisionReply, HparamBounds, Identity,
    IntegritySettings, JobId, Outcome, ScoringWeights, UploadHeader, commit_hash,
};

/// A way to cheat, and the check expected to catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    /// Trains once and submits the same artifact to several jobs.
    SameArtifactManyJobs,
    /// Submits another miner's artifact byte for byte.
    IdenticalToAnotherMiner,
    /// Submits another miner's artifact with small noise added.
    NoisyCopy,
    /// Submits a model from another random initialisation with the same config.
    OtherInitialisation,
    /// Returns the base unchanged.
    BaseUnchanged,
    /// Trains on the hidden test split (handed to it).
    TrainedOnTestSplit,
    /// A LoRA rank above the job's bound.
    RankAboveBound,
    /// NaN weights.
    NanWeights,
    /// Exploding weight norms.
    ExplodingNorms,
    /// Commits after the deadline.
    LateCommit,
    /// Reveals bytes whose hash differs from the commitment.
    UploadMismatch,
    /// Replays another miner's commitment as its own.
    ReplayedCommitment,
    /// Signs its commitment with a key that is not its own.
    ForgedSignature,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 13] = [
        Strategy::SameArtifactManyJobs,
        Strategy::IdenticalToAnotherMiner,
        Strategy::NoisyCopy,
        Strategy::OtherInitialisation,
        Strategy::BaseUnchanged,
        Strategy::TrainedOnTestSplit,
        Strategy::RankAboveBound,
        Strategy::NanWeights,
        Strategy::ExplodingNorms,
        Strategy::LateCommit,
        Strategy::UploadMismatch,
        Strategy::ReplayedCommitment,
        Strategy::ForgedSignature,
    ];

    fn describe(self) -> &'static str {
        match self {
            Strategy::SameArtifactManyJobs => "one artifact submitted to several jobs",
            Strategy::IdenticalToAnotherMiner => "two miners submitting identical artifacts",
            Strategy::NoisyCopy => "a copy of another miner's artifact with small noise",
            Strategy::OtherInitialisation => {
                "a model from another random initialisation, same config"
            }
            Strategy::BaseUnchanged => "the base returned unchanged",
            Strategy::TrainedOnTestSplit => "a model trained on the hidden test split",
            Strategy::RankAboveBound => "a LoRA rank above the bound",
            Strategy::NanWeights => "NaN weights",
            Strategy::ExplodingNorms => "exploding norms",
            Strategy::LateCommit => "a commit after the deadline",
            Strategy::UploadMismatch => "an upload whose hash differs from the commitment",
            Strategy::ReplayedCommitment => "another miner's commitment replayed",
            Strategy::ForgedSignature => "a forged signature",
        }
    }
}

/// What happened to one cheater in one competition.
#[derive(Clone, Debug)]
pub struct Catch {
    /// The strategy.
    pub strategy: Strategy,
    /// Whether it was caught (a failed verdict or a refused message).
    pub caught: bool,
    /// The check or refusal that caught it.
    pub by: String,
    /// The reason given.
    pub reason: String,
}

/// The red team's findings over all competitions.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Competitions run.
    pub competitions: usize,
    /// Every cheater's outcome.
    pub catches: Vec<Catch>,
    /// Honest submissions scored.
    pub honest_submissions: usize,
    /// Honest submissions that failed a check or got the penalty, and why.
    pub false_positives: Vec<String>,
    /// Flags on honest submissions (e.g. named as the original of a later copy).
    pub honest_flags: Vec<String>,
    /// Per check: (pass, flag, fail) over honest submissions.
    pub honest_checks: BTreeMap<String, (usize, usize, usize)>,
    /// Seconds spent in integrity checks, and in evaluation in total.
    pub check_secs: f64,
    /// Seconds of whole evaluations (checks included).
    pub eval_secs: f64,
    /// Per statistic (leakage, canary and subset p-values): the values seen on honest
    /// submissions and on the test-split cheater's, to show how far apart they sit.
    pub evidence: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
    /// Per job, what the test-split cheater would have gained before its verdict: its
    /// scored loss and the best honest miner's, then its test loss and the best honest one.
    pub leak_gain: Vec<[f64; 4]>,
}

/// Time an in-process miner keeps between its last training step and the deadline, for
/// writing and committing its artifact (a miner daemon's `commit_margin_secs`).
pub(crate) const COMMIT_MARGIN: Duration = Duration::from_secs(3);

fn ml(e: tunenet_ml::MlError) -> NodeError {
    NodeError::Ml(e)
}

pub(crate) fn train(
    model: &ModelDir,
    records: &[Record],
    cfg: &TrainConfig,
    out: &Path,
) -> Result<PathBuf, NodeError> {
    train_until(model, records, cfg, None, out)
}

/// [`train`], stopping early (as a miner daemon does) when a step might not finish
/// [`COMMIT_MARGIN`] before `deadline`.
pub(crate) fn train_until(
    model: &ModelDir,
    records: &[Record],
    cfg: &TrainConfig,
    deadline: Option<std::time::Instant>,
    out: &Path,
) -> Result<PathBuf, NodeError> {
    let cancel = AtomicBool::new(false);
    Ok(tunenet_ml::train(
        model,
        records,
        cfg,
        deadline,
        COMMIT_MARGIN,
        &Device::Cpu,
        &cancel,
        &mut |_| {},
        out,
    )
    .map_err(ml)?
    .artifact)
}

/// Rewrites an artifact's tensors through `f(name, values)`, keeping its manifest.
pub(crate) fn tamper(
    src: &Path,
    dst: &Path,
    mut f: impl FnMut(&str, &mut Vec<f32>),
) -> Result<(), NodeError> {
    let err = |e: String| NodeError::Other(format!("tampering with {}: {e}", src.display()));
    let bytes = std::fs::read(src).map_err(|e| err(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let mut data = Vec::new();
    for (name, view) in st.tensors() {
        let mut v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        f(&name, &mut v);
        data.push((
            name,
            view.shape().to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        ));
    }
    let views = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, meta.metadata().clone(), dst)
        .map_err(|e| err(e.to_string()))
}

/// Replaces an artifact's tensors with those of another model directory's weights.
pub(crate) fn transplant(src: &Path, weights: &Path, dst: &Path) -> Result<(), NodeError> {
    let w = candle_core::safetensors::load(weights, &candle_core::Device::Cpu)
        .map_err(|e| NodeError::Other(e.to_string()))?;
    tamper(src, dst, |name, v| {
        if let Ok(vals) = w[name].flatten_all().and_then(|t| t.to_vec1::<f32>()) {
            *v = vals;
        }
    })
}

struct Miner {
    id: Identity,
    addr: String,
    role: Role,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Honest(usize),
    Cheat(Strategy),
}

/// Runs `n` competitions in `work` and returns the findings.
pub fn run(n: usize, work: &Path, progress: &mut dyn FnMut(&str)) -> Result<Report, NodeError> {
    let mut report = Report {
        competitions: n,
        ..Default::default()
    };
    let base_dir = work.join("base");
    let other_dir = work.join("other-init");
    tunenet_ml::init_tiny(&base_dir, 11).map_err(ml)?;
    tunenet_ml::init_tiny(&other_dir, 12).map_err(ml)?;
    let base = ModelDir::open(&base_dir).map_err(ml)?;
    for c in 0..n {
        let t0 = Instant::now();
        run_one(
            c,
            &base,
            &other_dir.join("model.safetensors"),
            &work.join(format!("c{c}")),
            &mut report,
        )?;
        progress(&format!(
            "competition {}/{n} done in {:.1} s",
            c + 1,
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(report)
}

fn run_one(
    c: usize,
    base: &ModelDir,
    other_weights: &Path,
    dir: &Path,
    report: &mut Report,
) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| NodeError::Other(e.to_string()))?;
    let data = tunenet_ml::demo_dataset(300, 1000 + c as u64);
    let (test, train_split) = data.split_at(60);
    // As `prepare` does: 8 secret canaries planted in each shard, 4 siblings kept back.
    let secret = 0x6361_6e61_7279 ^ ((c as u64) << 20);
    let candidates = tunenet_integrity::pick_candidates(
        &tunenet_ml::demo_dataset(200, secret),
        &data,
        24,
        secret,
    );
    let mut canaries = Vec::new();
    let shards: Vec<Vec<Record>> = [&train_split[..120], &train_split[120..]]
        .into_iter()
        .zip(candidates.chunks(12))
        .enumerate()
        .map(|(j, (shard, cands))| {
            let (planted, c) =
                tunenet_integrity::plant(shard.to_vec(), cands.to_vec(), 8, secret + j as u64);
            canaries.push(c);
            planted
        })
        .collect();
    let bounds = HparamBounds {
        max_lora_rank: 16,
        ..HparamBounds::default()
    };
    let integrity = IntegritySettings::default();
    let comp = CompetitionId::new(format!("rt{c}")).map_err(|e| NodeError::Other(e.to_string()))?;
    let jobs: Vec<JobPlan> = (0..2)
        .map(|j| JobPlan {
            job_id: JobId::new(format!("rt{c}-{j}")).unwrap_or_else(|_| unreachable!("valid id")),
            base_model: BlobId::of(b"base"),
            base_params: 0,
            train_shard: BlobId::of(format!("shard{j}").as_bytes()),
            shard_records: shards[j].len() as u64,
            time_budget_ms: 60_000,
            reward_hint: 0.0,
            model_config: String::new(),
        })
        .collect();
    let mut miners: Vec<Miner> = (0..3)
        .map(Role::Honest)
        .chain(Strategy::ALL.iter().map(|s| Role::Cheat(*s)))
        .enumerate()
        .map(|(i, role)| Miner {
            id: Identity::generate(),
            addr: format!("m{i}"),
            role,
        })
        .collect();
    // The twin needs a partner to copy: the cheater that trains honestly-looking work.
    miners.sort_by_key(|m| matches!(m.role, Role::Cheat(_)));
    let plan = CompetitionPlan {
        id: comp,
        jobs,
        miners_per_job: miners.len() as u32,
        concurrent_jobs: 1,
        hparams: bounds.clone(),
        scoring: ScoringWeights::default(),
        reveal_window_ms: 60_000,
        offer_timeout_ms: 1_000,
        max_artifact_bytes: 64 << 20,
        reply_to: "in-process".into(),
        hardware: "cpu".into(),
        integrity: integrity.clone(),
        requires_synthetic: true,
    };
    let validator = Identity::generate();
    let mut engine = ValidatorEngine::new(
        validator,
        plan,
        miners.iter().map(|m| m.addr.clone()).collect(),
        vec![],
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
    let mut now = 1_000_000u64;
    let mut artifacts: BTreeMap<BlobId, PathBuf> = BTreeMap::new();
    let mut multi_job_artifact: Option<PathBuf> = None;
    let mut refused: BTreeMap<Strategy, (String, String)> = BTreeMap::new();

    for (j, shard) in shards.iter().enumerate() {
        let job_id =
            JobId::new(format!("rt{c}-{j}")).map_err(|e| NodeError::Other(e.to_string()))?;
        // Offer and assign.
        let mut pending = engine.handle(ValidatorInput::Tick, now, &mut rng);
        let mut assignments: BTreeMap<String, Assignment> = BTreeMap::new();
        while let Some(e) = pending.pop() {
            match e {
                ValidatorEffect::SendOffer { addr, offer } => {
                    let m = miners
                        .iter()
                        .find(|m| m.addr == addr)
                        .ok_or_else(|| NodeError::Other("no miner".into()))?;
                    let reply = Ok(DecisionReply::signed(
                        &m.id,
                        offer.job_id,
                        &offer.validator,
                        Decision::Accept,
                    ));
                    pending.extend(engine.handle(
                        ValidatorInput::Decision {
                            job_id: job_id.clone(),
                            addr,
                            reply,
                        },
                        now,
                        &mut rng,
                    ));
                }
                ValidatorEffect::SendAssignment { addr, assignment } => {
                    assignments.insert(addr, assignment);
                }
                _ => {}
            }
        }
        let deadline = assignments
            .values()
            .next()
            .map(|a| a.deadline_ms)
            .unwrap_or(now);
        // Each miner makes its artifact.
        let jdir = dir.join(format!("job{j}"));
        let mut made: Vec<(usize, PathBuf)> = Vec::new();
        let mut honest_first: Option<PathBuf> = None;
        for (i, m) in miners.iter().enumerate() {
            let Some(a) = assignments.get(&m.addr) else {
                continue;
            };
            let subset: Vec<Record> =
                tunenet_integrity::training_subset(&a.nonce, &a.job_id, &a.miner, shard.len())
                    .into_iter()
                    .map(|k| shard[k].clone())
                    .collect();
            let out = jdir.join(format!("m{i}"));
            let honest_cfg = |h: usize| TrainConfig {
                method: if h == 2 {
                    Method::Full
                } else {
                    Method::Lora {
                        rank: [4, 8, 16][(h + c) % 3],
                        alpha: 16.0,
                    }
                },
                learning_rate: [1e-3, 3e-3, 2e-3][(h + c) % 3],
                max_steps: [12, 20, 16][(h + c) % 3],
                max_seq_len: 64,
                seed: (c * 10 + h) as u64,
                ..Default::default()
            };
            let path = match m.role {
                Role::Honest(h) => {
                    let p = train(base, &subset, &honest_cfg(h), &out)?;
                    if honest_first.is_none() {
                        honest_first = Some(p.clone());
                    }
                    p
                }
                Role::Cheat(s) => {
                    let victim = honest_first
                        .clone()
                        .ok_or_else(|| NodeError::Other("no honest artifact".into()))?;
                    std::fs::create_dir_all(&out).map_err(|e| NodeError::Other(e.to_string()))?;
                    let dst = out.join("artifact.safetensors");
                    match s {
                        Strategy::SameArtifactManyJobs => match &multi_job_artifact {
                            Some(p) => p.clone(),
                            None => {
                                let p = train(base, &subset, &honest_cfg(0), &out)?;
                                multi_job_artifact = Some(p.clone());
                                p
                            }
                        },
                        Strategy::IdenticalToAnotherMiner => victim,
                        Strategy::NoisyCopy => {
                            let mut k = c as u32 + 1;
                            tamper(&victim, &dst, |_, v| {
                                for x in v.iter_mut() {
                                    k = k.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                                    *x += ((k >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * 2e-4;
                                }
                            })?;
                            dst
                        }
                        Strategy::OtherInitialisation => {
                            let full = train(
                                base,
                                &subset,
                                &TrainConfig {
                                    method: Method::Full,
                                    max_steps: 1,
                                    max_seq_len: 64,
                                    ..Default::default()
                                },
                                &out,
                            )?;
                            transplant(&full, other_weights, &dst)?;
                            dst
                        }
                        Strategy::BaseUnchanged => {
                            let full = train(
                                base,
                                &subset,
                                &TrainConfig {
                                    method: Method::Full,
                                    max_steps: 1,
                                    max_seq_len: 64,
                                    ..Default::default()
                                },
                                &out,
                            )?;
                            transplant(&full, &base.path.join("model.safetensors"), &dst)?;
                            dst
                        }
                        Strategy::TrainedOnTestSplit => {
                            // Full fine-tuning on its own assigned records (so its canary
                            // and subset tests look like honest work) with the hidden test
                            // split mixed in twice, for twice the honest runs' longest step
                            // count: about 3.5 epochs over the test records, to top the
                            // leaderboard.
                            let mut mix = subset.clone();
                            mix.extend(test.iter().cloned());
                            mix.extend(test.iter().cloned());
                            train(
                                base,
                                &mix,
                                &TrainConfig {
                                    method: Method::Full,
                                    max_steps: 40,
                                    learning_rate: 2e-3,
                                    max_seq_len: 64,
                                    seed: (c * 100 + j) as u64,
                                    ..Default::default()
                                },
                                &out,
                            )?
                        }
                        Strategy::RankAboveBound => train(
                            base,
                            &subset,
                            &TrainConfig {
                                method: Method::Lora {
                                    rank: 32,
                                    alpha: 32.0,
                                },
                                max_steps: 5,
                                max_seq_len: 64,
                                ..Default::default()
                            },
                            &out,
                        )?,
                        Strategy::NanWeights => {
                            let mut first = true;
                            tamper(&victim, &dst, |_, v| {
                                if first {
                                    v[0] = f32::NAN;
                                    first = false;
                                }
                            })?;
                            dst
                        }
                        Strategy::ExplodingNorms => {
                            tamper(&victim, &dst, |_, v| v.iter_mut().for_each(|x| *x *= 1e3))?;
                            dst
                        }
                        Strategy::LateCommit
                        | Strategy::UploadMismatch
                        | Strategy::ReplayedCommitment
                        | Strategy::ForgedSignature => train(base, &subset, &honest_cfg(1), &out)?,
                    }
                }
            };
            made.push((i, path));
        }
        // Commit before the deadline (except the late one), keeping salts for the reveal.
        let mut reveals: Vec<(usize, UploadHeader, PathBuf)> = Vec::new();
        let mut victim_commit: Option<(BlobId, [u8; 32], BlobId)> = None;
        for (i, path) in &made {
            let m = &miners[*i];
            let bytes = std::fs::read(path).map_err(|e| NodeError::Other(e.to_string()))?;
            let art = BlobId::of(&bytes);
            artifacts.insert(art, path.clone());
            let mut salt = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rng, &mut salt);
            let commit = commit_hash(&art, &m.id.peer_id(), &job_id, &salt);
            if matches!(m.role, Role::Honest(0)) {
                victim_commit = Some((art, salt, commit));
            }
            let mut cm = Commitment {
                job_id: job_id.clone(),
                miner: m.id.peer_id(),
                miner_key: m.id.public_key_bytes(),
                commit,
                artifact_size: bytes.len() as u64,
                signature: vec![],
            };
            let mut when = now + 100 + *i as u64;
            let mut header = UploadHeader {
                job_id: job_id.clone(),
                miner: m.id.peer_id(),
                artifact: art,
                size: bytes.len() as u64,
                salt,
            };
            match m.role {
                Role::Cheat(Strategy::LateCommit) => when = deadline + 1,
                Role::Cheat(Strategy::ForgedSignature) => {
                    cm.signature = Identity::generate().sign(&cm.signing_bytes());
                }
                Role::Cheat(Strategy::ReplayedCommitment) => {
                    // The victim's commitment hash under the cheater's own name, then the
                    // victim's artifact and salt at the reveal.
                    if let Some((vart, vsalt, vcommit)) = victim_commit {
                        cm.commit = vcommit;
                        header.artifact = vart;
                        header.salt = vsalt;
                        header.size = std::fs::metadata(&artifacts[&vart])
                            .map(|m| m.len())
                            .unwrap_or(0);
                        cm.artifact_size = header.size;
                    }
                }
                Role::Cheat(Strategy::UploadMismatch) => {
                    // Commits to one artifact, reveals another's id.
                    header.artifact = BlobId::of(b"a different artifact");
                }
                _ => {}
            }
            if cm.signature.is_empty() {
                cm.signature = m.id.sign(&cm.signing_bytes());
            }
            match engine.commit(cm, when) {
                Ok(_) => reveals.push((*i, header, path.clone())),
                Err(e) => {
                    if let Role::Cheat(s) = m.role {
                        let by = match e {
                            ValidatorError::TooLate { .. } => "deadline",
                            ValidatorError::BadSignature(_) => "signature",
                            _ => "commit refused",
                        };
                        refused.insert(s, (by.into(), e.to_string()));
                    }
                }
            }
        }
        // Reveal after the deadline, evaluate, score.
        now = deadline + 1;
        engine.handle(ValidatorInput::Tick, now, &mut rng);
        // The synthetic set exists only now, from the seed drawn at the deadline.
        let synthetic_seed = engine
            .job(&job_id)
            .and_then(|j| j.synthetic_seed)
            .ok_or_else(|| NodeError::Other("no synthetic seed after the deadline".into()))?;
        let mut sets = JobSets {
            test: test.to_vec(),
            synthetic: Some(tunenet_ml::demo_dataset(test.len().max(1), synthetic_seed)),
            control: Vec::new(),
            shard: shard.clone(),
            canaries: canaries[j].clone(),
            base_losses: Default::default(),
            base_scored: None,
        };
        // (honest?, test loss, synthetic loss) of the honest miners and the test-split cheater.
        let mut losses: Vec<(bool, f64, f64)> = Vec::new();
        for (i, header, _) in &reveals {
            let m = &miners[*i];
            match engine.uploaded(header, now, &mut rng) {
                Ok(fx) => {
                    for e in fx {
                        if let ValidatorEffect::Evaluate {
                            job_id,
                            miner,
                            artifact,
                        } = e
                        {
                            let path = artifacts.get(&artifact).cloned().unwrap_or_default();
                            let nonce = engine
                                .job(&job_id)
                                .and_then(|jb| jb.slots.get(&miner))
                                .map(|s| s.assignment.nonce);
                            let binding = nonce.as_ref().map(|nonce| Binding {
                                nonce,
                                job: &job_id,
                                miner: &miner,
                            });
                            let t0 = Instant::now();
                            let result = evaluate_submission(
                                base,
                                &path,
                                &mut sets,
                                binding,
                                &bounds,
                                &integrity,
                                64,
                                &[Device::Cpu],
                            )
                            .map(|(ev, checks)| {
                                report.check_secs += checks;
                                ev
                            });
                            report.eval_secs += t0.elapsed().as_secs_f64();
                            if let Ok(tunenet_engine::Evaluation {
                                test_loss: Some(t),
                                synthetic_loss: Some(s),
                                ..
                            }) = &result
                            {
                                match m.role {
                                    Role::Honest(_) => losses.push((true, *t, *s)),
                                    Role::Cheat(Strategy::TrainedOnTestSplit) => {
                                        losses.push((false, *t, *s))
                                    }
                                    Role::Cheat(_) => {}
                                }
                            }
                            engine.handle(
                                ValidatorInput::Evaluated {
                                    job_id,
                                    miner,
                                    result,
                                },
                                now,
                                &mut rng,
                            );
                        }
                    }
                }
                Err(e) => {
                    if let Role::Cheat(s) = m.role {
                        let by = match e {
                            ValidatorError::CommitMismatch(_) => "commitment",
                            _ => "upload refused",
                        };
                        refused.insert(s, (by.into(), e.to_string()));
                    }
                }
            }
        }
        let scoring = ScoringWeights::default();
        let best = |honest: bool, f: &dyn Fn(f64, f64) -> f64| {
            losses
                .iter()
                .filter(|l| l.0 == honest)
                .map(|l| f(l.1, l.2))
                .fold(f64::INFINITY, f64::min)
        };
        let scored = |t: f64, s: f64| scoring.scored_loss(t, Some(s));
        let test_only = |t: f64, _: f64| t;
        report.leak_gain.push([
            best(false, &scored),
            best(true, &scored),
            best(false, &test_only),
            best(true, &test_only),
        ]);
        now += 70_000;
        engine.handle(ValidatorInput::Tick, now, &mut rng);
        now += 1_000;
    }

    // Tally: cheaters by their worst verdict or refusal, honest miners by any flag or failure.
    for m in &miners {
        let subs: Vec<(&JobId, &SubmissionState, Vec<tunenet_types::Verdict>)> = engine
            .jobs()
            .filter_map(|j| {
                let slot = j.slots.get(&m.id.peer_id())?;
                let verdicts = j
                    .scores
                    .iter()
                    .find(|s| s.miner == m.id.peer_id())
                    .map(|s| s.verdicts.clone())
                    .unwrap_or_default();
                Some((&j.plan.job_id, &slot.submission, verdicts))
            })
            .collect();
        for (_, _, verdicts) in &subs {
            for v in verdicts {
                let key = match v.check.as_str() {
                    tunenet_engine::LEAKAGE_CHECK => "per-record leakage test p-value",
                    tunenet_integrity::CANARY_CHECK => "canary test p-value",
                    tunenet_integrity::SUBSET_CHECK => "assigned-subset test p-value",
                    _ => continue,
                };
                let Some(x) = v.value else { continue };
                let e = report.evidence.entry(key.to_string()).or_default();
                match m.role {
                    Role::Honest(_) => e.0.push(x),
                    Role::Cheat(Strategy::TrainedOnTestSplit) => e.1.push(x),
                    Role::Cheat(_) => {}
                }
            }
        }
        match m.role {
            Role::Honest(_) => {
                for (job, sub, verdicts) in subs {
                    report.honest_submissions += 1;
                    for v in &verdicts {
                        let e = report.honest_checks.entry(v.check.clone()).or_default();
                        match v.outcome {
                            Outcome::Pass => e.0 += 1,
                            Outcome::Flag => e.1 += 1,
                            Outcome::Fail => e.2 += 1,
                        }
                        match v.outcome {
                            Outcome::Fail => report
                                .false_positives
                                .push(format!("{job}: {} failed: {}", v.check, v.reason)),
                            Outcome::Flag => report
                                .honest_flags
                                .push(format!("{job}: {}: {}", v.check, v.reason)),
                            Outcome::Pass => {}
                        }
                    }
                    if let SubmissionState::Failed { reason, .. } = sub
                        && verdicts.iter().all(|v| v.outcome != Outcome::Fail)
                    {
                        report
                            .false_positives
                            .push(format!("{job}: penalty: {reason}"));
                    }
                }
            }
            Role::Cheat(s) => {
                let catch = if let Some((by, reason)) = refused.get(&s) {
                    Catch {
                        strategy: s,
                        caught: true,
                        by: by.clone(),
                        reason: reason.clone(),
                    }
                } else {
                    let failed = subs
                        .iter()
                        .flat_map(|(_, _, v)| v.iter())
                        .find(|v| v.outcome == Outcome::Fail)
                        .cloned();
                    match failed {
                        Some(v) => Catch {
                            strategy: s,
                            caught: true,
                            by: v.check,
                            reason: v.reason,
                        },
                        None => Catch {
                            strategy: s,
                            caught: false,
                            by: "-".into(),
                            reason: "scored like an honest miner".into(),
                        },
                    }
                };
                report.catches.push(catch);
            }
        }
    }
    Ok(())
}

/// The report as Markdown (docs/INTEGRITY.md).
pub fn markdown(r: &Report) -> String {
    let mut s = String::from(
        "# Integrity: the in-process red-team report\n\nIn process, through the engine: quick for trying thresholds, but not evidence of what holds against a miner on the wire (`tunenet redteam` without `--in-process` is).\n\n",
    );
    s.push_str(&format!(
        "Written by `tunenet redteam --in-process --competitions {}`. Each competition runs two jobs on the tiny model through the \
         real validator engine, real LoRA/full training, the integrity checks and the evaluation, with three honest \
         miners (LoRA ranks 4/8/16 and full fine-tuning, learning rates 1e-3 to 3e-3, 12 to 20 steps, different \
         seeds) and one cheater per strategy. Each shard carries 8 secret canaries (4 siblings kept back); each job's \
         synthetic set (60 fresh demo records) is generated after its deadline from a seed the engine draws then, and \
         the scored loss weighs test and synthetic losses equally. A cheater counts as caught when a check fails its \
         submission or the validator refuses its message.\n\n\
         The test-split cheater is handed the job's hidden test split (60 records). It fine-tunes all weights \
         (learning rate 2e-3) for 40 steps of 8 sequences, twice the honest miners' longest run, on its own \
         assigned records with the test split mixed in twice: about 3.5 epochs over the test records, while its \
         canaries and assigned records are trained on as an honest miner's are.\n\n",
        r.competitions
    ));
    s.push_str(
        "## Cheaters\n\n| strategy | caught | by | example reason |\n| --- | --- | --- | --- |\n",
    );
    let mut by: BTreeMap<Strategy, Vec<&Catch>> = BTreeMap::new();
    for c in &r.catches {
        by.entry(c.strategy).or_default().push(c);
    }
    for (strategy, cs) in &by {
        let caught = cs.iter().filter(|c| c.caught).count();
        let first = cs.iter().find(|c| c.caught).or(cs.first());
        let mut checks: Vec<&str> = cs
            .iter()
            .filter(|c| c.caught)
            .map(|c| c.by.as_str())
            .collect();
        checks.sort();
        checks.dedup();
        s.push_str(&format!(
            "| {} | {caught}/{} | {} | {} |\n",
            strategy.describe(),
            cs.len(),
            if checks.is_empty() {
                "-".to_string()
            } else {
                checks.join(", ")
            },
            first
                .map(|c| c.reason.replace('|', "/"))
                .unwrap_or_default()
        ));
    }
    s.push_str(&format!(
        "\n## Honest miners\n\n{} honest submissions; {} false positives.\n\n| check | pass | flag | fail |\n| --- | --- | --- | --- |\n",
        r.honest_submissions,
        r.false_positives.len()
    ));
    for (check, (p, f, x)) in &r.honest_checks {
        s.push_str(&format!("| {check} | {p} | {f} | {x} |\n"));
    }
    for fp in &r.false_positives {
        s.push_str(&format!("\n- false positive: {fp}"));
    }
    if !r.honest_flags.is_empty() {
        s.push_str(&format!(
            "\n\n{} flags on honest submissions (a flag names a party without a penalty; here, the original of a later copy):\n",
            r.honest_flags.len()
        ));
        for f in r.honest_flags.iter().take(10) {
            s.push_str(&format!("\n- {f}"));
        }
    }
    if !r.evidence.is_empty() {
        s.push_str(
            "\n\n## How far apart honest miners and the test-split cheater sit\n\n\
             Per-record leakage test: for every hidden test record and every synthetic record, the submission's loss \
             minus the job cohort's median loss on that record; a one-sided Mann–Whitney U test (normal \
             approximation, tie-corrected) of \"lower on the test records than on the synthetic ones\". Both sets \
             are drawn from the same generator and the synthetic one only after the deadline, so for a model that saw \
             neither the test is exact; it fails at p ≤ `leak_alpha`. The canary and subset p-values are one-sided \
             Mann–Whitney U tests on per-record loss improvements over the base (assigned canaries against \
             never-released siblings; assigned records against unassigned ones); they never fail a submission \
             alone.\n\n\
             | statistic | honest: min / median / max (n) | test-split cheater: min / median / max (n) |\n| --- | --- | --- |\n",
        );
        let summary = crate::wire_redteam::summary;
        for (k, (h, c)) in &r.evidence {
            s.push_str(&format!("| {k} | {} | {} |\n", summary(h), summary(c)));
        }
    }
    let judged: Vec<&[f64; 4]> = r
        .leak_gain
        .iter()
        .filter(|g| g.iter().all(|x| x.is_finite()))
        .collect();
    if !judged.is_empty() {
        let beat = |a: usize, b: usize| judged.iter().filter(|g| g[a] < g[b]).count();
        let mean = |a: usize| judged.iter().map(|g| g[a]).sum::<f64>() / judged.len() as f64;
        s.push_str(&format!(
            "\n\n## What the test-split cheater gains\n\nBefore its verdict, in {} jobs: its scored loss (test and \
             synthetic, equally weighted) beat the best honest miner's in {} (mean {:.4} against {:.4}); its test loss \
             beat the best honest one in {} (mean {:.4} against {:.4}). Uncaught, it would rank first that often.\n",
            judged.len(),
            beat(0, 1),
            mean(0),
            mean(1),
            beat(2, 3),
            mean(2),
            mean(3),
        ));
    }
    s.push_str(&format!(
        "\n\n## Cost\n\nIntegrity checks took {:.2} s of {:.2} s spent evaluating submissions ({:.1} % of the \
         evaluation time). The checks' time is the per-artifact checks, the base model's per-record losses on the \
         probe records (once per record and job) and the probe records' share, by tokens, of the one batched \
         scoring pass; the rest is scoring the hidden test split and the synthetic set.\n",
        r.check_secs,
        r.eval_secs,
        if r.eval_secs > 0.0 { 100.0 * r.check_secs / r.eval_secs } else { 0.0 }
    ));
    let missed: Vec<Strategy> = by
        .iter()
        .filter(|(_, cs)| cs.iter().any(|c| !c.caught))
        .map(|(s, _)| *s)
        .collect();
    if !missed.is_empty() {
        s.push_str("\n## Not caught every time\n\n");
        for m in missed {
            s.push_str(&format!("- {}", m.describe()));
            s.push('\n');
        }
    }
    s
}
