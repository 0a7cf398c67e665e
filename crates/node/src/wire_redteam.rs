//! The red team over the wire (DESIGN.md §4): real competitions on the tiny model, with a
//! `tunenet validator` daemon and honest `tunenet miner` daemons as separate processes, and
//! adversary miners that speak only the protocol. Each adversary serves its own
//! `MinerService` on its own port, accepts offers, fetches its shard from the validator by
//! blake3, signs its own commitments and reveals by upload, as any miner written from the
//! `.proto` files could. The adversaries live in this orchestrating process and share
//! nothing with the validator but what the wire carries, plus what a leak would hand them
//! (the public dataset; for the test-split cheats, the hidden split itself). The outcome is
//! read back through the admin console, as an operator reads it; the checks' cost comes
//! from the validator's own log lines.

use crate::error::NodeError;
use crate::redteam::{tamper, train, train_until, transplant};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;
use tunenet_ml::{Method, ModelDir, Record, TrainConfig};
use tunenet_proto::v1;
use tunenet_types::{
    Assignment, BlobId, Commitment, Decision, DecisionReply, Identity, JobId, Offer, UploadHeader,
    commit_hash,
};

/// A way to cheat that an adversary miner tries over the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cheat {
    /// Trains once and submits the same artifact to both jobs.
    SameArtifactManyJobs,
    /// Submits an accomplice's artifact byte for byte.
    IdenticalToAnotherMiner,
    /// Submits an accomplice's artifact with small noise added.
    NoisyCopy,
    /// A model from another random initialisation with the same config.
    OtherInitialisation,
    /// The base unchanged.
    BaseUnchanged,
    /// Its own assigned records with the hidden test split mixed in twice.
    TrainedOnTestSplit,
    /// Only the hidden test split.
    TestSplitOnly,
    /// The whole public dataset once (test split included), then a few steps on each job.
    WholeDataset,
    /// In-distribution records that are not its assigned subset.
    OtherData,
    /// The average of two accomplices' artifacts (a model soup).
    ModelSoup,
    /// A LoRA rank above the job's bound.
    RankAboveBound,
    /// NaN weights.
    NanWeights,
    /// Exploding weight norms.
    ExplodingNorms,
    /// Commits after the deadline.
    LateCommit,
    /// Reveals an artifact that is not the one committed to.
    UploadMismatch,
    /// Another miner's commitment hash under its own name, then that miner's reveal.
    ReplayedCommitment,
    /// Signs its commitment with a key that is not its own.
    ForgedSignature,
    /// Copies an accomplice's artifact, commits it, then re-sends the accomplice's signed
    /// commitment so that the accomplice's receipt would move after its own.
    DisplacingReplay,
}

impl Cheat {
    /// Every strategy, in report order.
    pub const ALL: [Cheat; 18] = [
        Cheat::SameArtifactManyJobs,
        Cheat::IdenticalToAnotherMiner,
        Cheat::NoisyCopy,
        Cheat::DisplacingReplay,
        Cheat::ModelSoup,
        Cheat::OtherInitialisation,
        Cheat::BaseUnchanged,
        Cheat::TrainedOnTestSplit,
        Cheat::TestSplitOnly,
        Cheat::WholeDataset,
        Cheat::OtherData,
        Cheat::RankAboveBound,
        Cheat::NanWeights,
        Cheat::ExplodingNorms,
        Cheat::LateCommit,
        Cheat::UploadMismatch,
        Cheat::ReplayedCommitment,
        Cheat::ForgedSignature,
    ];

    /// The strategy in words.
    pub fn describe(self) -> &'static str {
        match self {
            Cheat::SameArtifactManyJobs => "one artifact submitted to both jobs",
            Cheat::IdenticalToAnotherMiner => "another miner's artifact, byte for byte",
            Cheat::NoisyCopy => "another miner's artifact with small noise",
            Cheat::DisplacingReplay => {
                "a copy, then the original's signed commitment re-sent to move its receipt"
            }
            Cheat::ModelSoup => "the average of two other miners' artifacts (a model soup)",
            Cheat::OtherInitialisation => "a model from another initialisation, same config",
            Cheat::BaseUnchanged => "the base returned unchanged",
            Cheat::TrainedOnTestSplit => "its assigned records plus the hidden test split",
            Cheat::TestSplitOnly => "trained only on the hidden test split",
            Cheat::WholeDataset => {
                "the whole public dataset once (test split included), then a few steps per job"
            }
            Cheat::OtherData => "in-distribution records that are not its assigned data",
            Cheat::RankAboveBound => "a LoRA rank above the bound",
            Cheat::NanWeights => "NaN weights",
            Cheat::ExplodingNorms => "exploding norms",
            Cheat::LateCommit => "a commit after the deadline",
            Cheat::UploadMismatch => "an upload that is not the committed artifact",
            Cheat::ReplayedCommitment => "another miner's commitment replayed as its own",
            Cheat::ForgedSignature => "a commitment signed with another key",
        }
    }

    /// Whether making its artifact trains a model (seconds) rather than copying or
    /// tampering with one (milliseconds).
    pub fn trains(self) -> bool {
        matches!(
            self,
            Cheat::SameArtifactManyJobs
                | Cheat::TrainedOnTestSplit
                | Cheat::TestSplitOnly
                | Cheat::WholeDataset
                | Cheat::OtherData
                | Cheat::RankAboveBound
        )
    }

    /// The checks (or refusals) that catch it for the right reason.
    pub fn expected(self) -> &'static [&'static str] {
        match self {
            Cheat::SameArtifactManyJobs | Cheat::IdenticalToAnotherMiner => {
                &["exact_duplicate", "near_duplicate", "derived"]
            }
            Cheat::DisplacingReplay => &["exact_duplicate"],
            Cheat::NoisyCopy => &["near_duplicate", "derived"],
            Cheat::ModelSoup => &["derived"],
            Cheat::OtherInitialisation => &["base_similarity", "base_similarity_median"],
            Cheat::BaseUnchanged => &["fine_tuned"],
            Cheat::TrainedOnTestSplit => &["test_leakage"],
            Cheat::TestSplitOnly | Cheat::WholeDataset => &["test_leakage", "trained_on_job_data"],
            Cheat::OtherData => &["trained_on_job_data"],
            Cheat::RankAboveBound => &["lora_rank"],
            Cheat::NanWeights => &["finite"],
            Cheat::ExplodingNorms => &["base_similarity", "base_similarity_median", "delta_norm"],
            Cheat::LateCommit => &["deadline"],
            Cheat::UploadMismatch | Cheat::ReplayedCommitment => &["commitment"],
            Cheat::ForgedSignature => &["signature"],
        }
    }
}

/// Who an adversary-process miner is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// Trains honestly on its assigned subset (the source the copiers and the soup take
    /// from); its submissions count as honest ones.
    Accomplice(usize),
    /// Cheats.
    Cheat(Cheat),
}

/// For a cheater its expected checks did not catch: per job, what each of those checks said.
fn missed_detail<'a>(
    cheat: Cheat,
    jobs: impl Iterator<Item = (&'a str, &'a [tunenet_types::Verdict])>,
) -> Vec<String> {
    const MAX_REASON: usize = 400;
    jobs.map(|(job, verdicts)| {
        let said: Vec<String> = verdicts
            .iter()
            .filter(|v| cheat.expected().contains(&v.check.as_str()))
            .map(|v| {
                let mut reason = v.reason.clone();
                if reason.len() > MAX_REASON {
                    let mut cut = MAX_REASON;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    reason.push_str("...");
                }
                let value = match (v.value, v.threshold) {
                    (Some(x), Some(t)) => format!(" {x:.3e} (threshold {t:.3e})"),
                    (Some(x), None) => format!(" {x:.3e}"),
                    _ => String::new(),
                };
                format!("{} {:?}{value}: {reason}", v.check, v.outcome)
            })
            .collect();
        if said.is_empty() {
            format!(
                "job {job}: none of its expected checks ({}) ran",
                cheat.expected().join(", ")
            )
        } else {
            format!("job {job}: {}", said.join("; "))
        }
    })
    .collect()
}

/// One cheater's outcome in one competition.
#[derive(Clone, Debug)]
pub struct WireCatch {
    /// The strategy.
    pub cheat: Cheat,
    /// Caught by one of the strategy's expected checks or refusals.
    pub caught: bool,
    /// Caught at all (any failed check or refusal).
    pub caught_any: bool,
    /// What caught it (check names or refusals), comma-separated.
    pub by: String,
    /// The reason given, or what happened.
    pub reason: String,
    /// Its scored rank among all scored submissions of its best job (1 = first), when it
    /// was scored.
    pub rank: Option<usize>,
    /// When not caught for the expected reason: per job, what the strategy's expected checks
    /// said (outcome, value against threshold, reason), so a miss can be read in the report.
    pub missed: Vec<String>,
}

/// One statistic's values: on honest submissions, and on each strategy's.
pub type Evidence = (Vec<f64>, BTreeMap<Cheat, Vec<f64>>);

/// The findings of a red-team run over the wire.
#[derive(Clone, Debug, Default)]
pub struct WireReport {
    /// Competitions run.
    pub competitions: usize,
    /// On which dataset.
    pub data: WireData,
    /// Every cheater's outcome.
    pub catches: Vec<WireCatch>,
    /// Honest submissions (daemons and accomplices).
    pub honest_submissions: usize,
    /// ...of which evaluated with a synthetic loss.
    pub honest_with_synthetic: usize,
    /// ...of which given a leakage verdict.
    pub honest_with_leakage: usize,
    /// Evaluated submissions of anyone, and those with a synthetic loss.
    pub evaluated: usize,
    /// Evaluated submissions that had a synthetic loss.
    pub evaluated_with_synthetic: usize,
    /// Honest submissions failed or penalised, and why.
    pub false_positives: Vec<String>,
    /// Flags on honest submissions.
    pub honest_flags: Vec<String>,
    /// Per check: (pass, flag, fail) over honest submissions.
    pub honest_checks: BTreeMap<String, (usize, usize, usize)>,
    /// Per statistic: values on honest submissions and on cheaters (by strategy).
    pub evidence: BTreeMap<String, Evidence>,
    /// Seconds of integrity checks and of whole evaluations, from the validator's log.
    pub check_secs: f64,
    /// Seconds of whole evaluations (checks included).
    pub eval_secs: f64,
    /// The same two over the evaluations that ended with a loss (scored submissions).
    pub scored_check_secs: f64,
    /// Seconds of whole evaluations that ended with a loss.
    pub scored_eval_secs: f64,
    /// Wall seconds per competition.
    pub wall_secs: Vec<f64>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct WireOptions {
    /// The `tunenet` binary the daemons run as.
    pub exe: PathBuf,
    /// Competitions to run.
    pub competitions: usize,
    /// Where everything goes.
    pub work: PathBuf,
    /// Training time per job, seconds.
    pub budget_secs: u64,
    /// The strategies to field (all by default).
    pub cheats: Vec<Cheat>,
    /// Index of the first competition (so runs can be split and joined).
    pub first: usize,
    /// The competitions' dataset.
    pub data: WireData,
}

/// The dataset the red team's competitions run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireData {
    /// 300 demo records per competition; synthetic sets from the demo generator, drawn
    /// as the test split was.
    #[default]
    Demo,
    /// The 320 original chat records shipped with tunenet (real text), shuffled per
    /// competition; synthetic sets of the test records' neighbours, written by the base
    /// model.
    Instruct,
}

impl WireData {
    /// Tokens per training and evaluation sequence.
    fn seq(self) -> usize {
        match self {
            WireData::Demo => 64,
            // The tiny model reads bytes; chat records run to several hundred, and the
            // adversaries' training in this process must still fit the budget.
            WireData::Instruct => 192,
        }
    }

    /// The competition's records.
    fn records(self, c: usize) -> Result<Vec<Record>, NodeError> {
        Ok(match self {
            WireData::Demo => tunenet_ml::demo_dataset(300, 1000 + c as u64),
            WireData::Instruct => {
                use rand::SeedableRng;
                use rand::seq::SliceRandom;
                // The records the base learned English from are never a competition's.
                let mut r = shipped_instruct()?.split_off(INSTRUCT_PRETRAIN);
                r.shuffle(&mut rand::rngs::StdRng::seed_from_u64(1000 + c as u64));
                r
            }
        })
    }

    /// Share of the records held out as the hidden test split: 64 records either way.
    fn test_fraction(self) -> f64 {
        match self {
            WireData::Demo => 0.2,
            WireData::Instruct => 0.32,
        }
    }

    /// The competition spec's synthetic-set lines.
    fn synthetic(self) -> &'static str {
        match self {
            WireData::Demo => "synthetic_generator = \"demo\"\nsynthetic_records = 180\n",
            // Measured with failing on: that is what the run is for.
            WireData::Instruct => {
                "synthetic_generator = \"neighbours\"\n[competitions.integrity]\nleak_rewritten_fails = true\n"
            }
        }
    }
}

/// The evidence row of the leakage check's cohort comparison.
const COHORT_SPREADS: &str =
    "leakage shift, robust spreads below the job's other submissions' (at least 4 fails)";

/// How many robust spreads a leakage verdict's test-versus-synthetic shift lies below the
/// job's other submissions' (the number its reason gives, when the set was not drawn
/// alike).
fn cohort_spreads(v: &tunenet_types::Verdict) -> Option<f64> {
    if v.check != "test_leakage" {
        return None;
    }
    let head = v.reason.split(" spreads below, at least").next()?;
    if head.len() == v.reason.len() {
        return None;
    }
    head.rsplit(' ').next()?.parse().ok()
}

pub(crate) fn other(e: impl std::fmt::Display) -> NodeError {
    NodeError::Other(e.to_string())
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Daemon {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Daemon {
    /// Starts `exe ARGS`, its output appended to `log` (a restarted daemon keeps one log).
    pub(crate) fn start(
        exe: &Path,
        name: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<Daemon, NodeError> {
        Daemon::start_with_env(exe, name, args, log, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub(crate) fn start_with_env(
        exe: &Path,
        name: &str,
        args: &[&str],
        log: &Path,
        env: &[(String, String)],
    ) -> Result<Daemon, NodeError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(other)?;
        let child = Command::new(exe)
            .args(args)
            .stdout(out.try_clone().map_err(other)?)
            .stderr(out)
            .stdin(Stdio::null())
            .env("RAYON_NUM_THREADS", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .map_err(|e| other(format!("cannot start {name}: {e}")))?;
        Ok(Daemon {
            name: name.into(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn check(&mut self) -> Result<(), NodeError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(other(format!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Already reaped (killed and waited for): its pid may belong to another process now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An adversary-process miner: its key and the assignments the validator sent it.
struct Adversary {
    role: Role,
    id: Identity,
    url: String,
    assigned: Mutex<BTreeMap<JobId, Assignment>>,
}

struct AdversaryService(Arc<Adversary>);

#[tonic::async_trait]
impl tunenet_rpc::MinerBackend for AdversaryService {
    async fn offer(&self, offer: Offer) -> Result<DecisionReply, Status> {
        Ok(DecisionReply::signed(
            &self.0.id,
            offer.job_id,
            &offer.validator,
            Decision::Accept,
        ))
    }

    async fn assign(&self, a: Assignment) -> Result<(), Status> {
        if a.miner != self.0.id.peer_id() {
            return Err(Status::invalid_argument("assignment names another miner"));
        }
        if let Ok(mut m) = self.0.assigned.lock() {
            m.insert(a.job_id.clone(), a);
        }
        Ok(())
    }

    async fn status(&self) -> Result<v1::MinerStatus, Status> {
        Ok(v1::MinerStatus {
            miner: self.0.id.peer_id().0,
            ..Default::default()
        })
    }
}

/// Honest miner daemons: method, rank, learning rate (varied by competition), steps: the
/// miner's default `max_steps`, about three passes over a subset, well inside the budget.
const HONEST: [(&str, u32, f64, u32); 3] = [
    ("lora", 4, 1e-3, 100),
    ("lora", 16, 3e-3, 100),
    ("full", 0, 2e-3, 100),
];

/// Records and optimiser steps of the base model's pretraining.
const PRETRAIN: (usize, usize) = (4000, 300);

/// On real text: the shipped chat records the base model also learns from (the first
/// ones of the file; competitions use the rest), each seen [`INSTRUCT_PRETRAIN_COPIES`]
/// times, and its optimiser steps on 192-byte sequences.
const INSTRUCT_PRETRAIN: usize = 120;
const INSTRUCT_PRETRAIN_COPIES: usize = 8;
const INSTRUCT_PRETRAIN_STEPS: usize = 400;

/// The chat records shipped with tunenet, in file order.
fn shipped_instruct() -> Result<Vec<Record>, NodeError> {
    tunenet_ml::parse_jsonl(tunenet_ml::SHIPPED_INSTRUCT_JSONL).map_err(NodeError::Ml)
}

/// The competitions' base model: the tiny model pretrained on demo-style records drawn
/// from a seed no competition uses, so that, as with any real base model, fine-tuning
/// starts from a model that already knows the data's style and what is left to learn is
/// each record's own content. (A randomly initialised base spends a short run learning the
/// style, and nothing tells training on one record from training on another.) On real
/// text it also learns English from [`INSTRUCT_PRETRAIN`] shipped chat records no
/// competition uses: a base that cannot read the data (about 7 nats a byte on it after
/// demo text alone) writes its neighbours' words at random and memorises nothing a test
/// can see, which no real base model is like.
fn pretrained_base(
    work: &Path,
    out: &Path,
    data: WireData,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), NodeError> {
    let init = work.join("base-init");
    tunenet_ml::init_tiny(&init, 11).map_err(NodeError::Ml)?;
    let model = ModelDir::open(&init).map_err(NodeError::Ml)?;
    let t0 = Instant::now();
    let mut records = tunenet_ml::demo_dataset(PRETRAIN.0, 0x7072_6574_7261_696e);
    let mut cfg = TrainConfig {
        method: Method::Full,
        learning_rate: 3e-3,
        max_steps: PRETRAIN.1,
        batch_size: 16,
        max_seq_len: 64,
        seed: 1,
        ..Default::default()
    };
    if data == WireData::Instruct {
        let english = &shipped_instruct()?[..INSTRUCT_PRETRAIN];
        records.truncate(PRETRAIN.0 / 2);
        for _ in 0..INSTRUCT_PRETRAIN_COPIES {
            records.extend(english.iter().cloned());
        }
        cfg.max_steps = INSTRUCT_PRETRAIN_STEPS;
        cfg.max_seq_len = data.seq();
    }
    let artifact = train(&model, &records, &cfg, &work.join("pretrain"))?;
    model_from_full(&model, &artifact, out)?;
    progress(&format!(
        "base model pretrained ({} steps on {} records) in {:.0} s",
        cfg.max_steps,
        records.len(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Runs the competitions and returns the findings; `progress` gets a line per step.
pub async fn run(
    opts: &WireOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<WireReport, NodeError> {
    let mut report = WireReport {
        competitions: opts.competitions,
        data: opts.data,
        ..Default::default()
    };
    std::fs::create_dir_all(&opts.work).map_err(other)?;
    let base_dir = opts.work.join("base");
    let other_dir = opts.work.join("other-init");
    if !base_dir.join(tunenet_ml::WEIGHTS_FILE).exists() {
        pretrained_base(&opts.work, &base_dir, opts.data, progress)?;
        tunenet_ml::init_tiny(&other_dir, 12).map_err(NodeError::Ml)?;
    }
    for c in opts.first..opts.first + opts.competitions {
        let t0 = Instant::now();
        run_one(c, opts, &base_dir, &other_dir, &mut report, progress).await?;
        report.wall_secs.push(t0.elapsed().as_secs_f64());
        progress(&format!(
            "competition rt{c} done in {:.0} s",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(report)
}

/// What one adversary did in one job.
#[derive(Default)]
struct Done {
    /// Refusals, as (what refused, message).
    refused: Vec<(String, String)>,
}

async fn run_one(
    c: usize,
    opts: &WireOptions,
    base_dir: &Path,
    other_dir: &Path,
    report: &mut WireReport,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), NodeError> {
    let dir = opts.work.join(format!("c{c}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(other)?;
    let comp = format!("rt{c}");
    let dataset = dir.join("dataset.jsonl");
    let records = opts.data.records(c)?;
    std::fs::write(&dataset, tunenet_ml::to_jsonl(&records)).map_err(other)?;

    // The adversaries, each on its own port.
    let mut adversaries: Vec<Arc<Adversary>> = Vec::new();
    let roles = [Role::Accomplice(0), Role::Accomplice(1)]
        .into_iter()
        .chain(opts.cheats.iter().map(|s| Role::Cheat(*s)));
    let mut servers = Vec::new();
    for role in roles {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(other)?;
        let port = listener.local_addr().map_err(other)?.port();
        let a = Arc::new(Adversary {
            role,
            id: Identity::generate(),
            url: format!("http://127.0.0.1:{port}"),
            assigned: Mutex::new(BTreeMap::new()),
        });
        let router = tonic::transport::Server::builder().add_service(tunenet_rpc::miner_server(
            Arc::new(AdversaryService(a.clone())),
        ));
        servers.push(crate::base::Server::spawn(
            router,
            listener,
            &crate::limits::Limits::none(),
        ));
        adversaries.push(a);
    }

    // Honest miner daemons.
    let mut daemons = Vec::new();
    let mut urls: Vec<String> = Vec::new();
    // The last honest miner starts listening only after the validator has sent its first
    // offers: they fail, and must be retried for it to get the job.
    let mut late_start: Option<(String, String, PathBuf)> = None;
    for (h, (method, rank, lr, steps)) in HONEST.iter().enumerate() {
        let port = free_port()?;
        let mdir = dir.join(format!("honest{h}"));
        std::fs::create_dir_all(&mdir).map_err(other)?;
        let lr = lr * [1.0, 1.5, 0.75][c % 3];
        let training = if *method == "lora" {
            format!(
                "method = \"lora\"\nlora_rank = {rank}\nlora_alpha = 16.0\nlearning_rate = {lr}\nmax_steps = {steps}\n"
            )
        } else {
            format!("method = \"full\"\nlearning_rate = {lr}\nmax_steps = {steps}\n")
        };
        let conf = mdir.join("miner.toml");
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n\n[policy]\nmax_concurrent_jobs = 1\n\n[training]\n{training}batch_size = 8\nmax_seq_len = {}\ncommit_margin_secs = 3\nseed = {}\n",
                mdir.join("data"),
                opts.data.seq(),
                c * 10 + h
            ),
        )
        .map_err(other)?;
        let start = (
            format!("honest miner {h}"),
            conf.to_string_lossy().to_string(),
            mdir.join("miner.log"),
        );
        if h + 1 == HONEST.len() {
            late_start = Some(start);
        } else {
            daemons.push(Daemon::start(
                &opts.exe,
                &start.0,
                &["miner", "--config", &start.1],
                &start.2,
            )?);
        }
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    urls.extend(adversaries.iter().map(|a| a.url.clone()));

    // The validator daemon.
    let vport = free_port()?;
    let vurl = format!("http://127.0.0.1:{vport}");
    let vdir = dir.join("validator");
    std::fs::create_dir_all(&vdir).map_err(other)?;
    let n = urls.len();
    let vtoml = format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\nminers = [{}]\n\n[[competitions]]\nid = \"{comp}\"\nbase_model = {:?}\ndataset = {:?}\njobs = 2\nminers_per_job = {n}\nmin_miners = {n}\ntime_budget_secs = {}\ntest_fraction = {}\nseed = {c}\nreveal_window_secs = {}\noffer_timeout_secs = 20\neval_max_seq_len = {}\n{}\n[competitions.hparams]\nmax_lora_rank = 16\n",
        vdir.join("data"),
        urls.iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        base_dir,
        dataset,
        opts.budget_secs,
        opts.data.test_fraction(),
        // Longer records take the adversaries in this process longer to train.
        match opts.data {
            WireData::Demo => 25,
            WireData::Instruct => 90,
        },
        opts.data.seq(),
        opts.data.synthetic(),
    );
    let vconf = vdir.join("validator.toml");
    std::fs::write(&vconf, &vtoml).map_err(other)?;
    // The hidden test split, as a leak would hand it to the test-split cheaters: the same
    // split the validator makes of the public dataset.
    let cfg: crate::config::ValidatorConfig = toml::from_str(&vtoml).map_err(other)?;
    let ccfg = cfg
        .competitions
        .first()
        .ok_or_else(|| other("no competition in the generated config"))?;
    let split = crate::validator::split(ccfg, records.clone())?;
    let (test, shards) = (split.test, crate::validator::shard(ccfg, &split.train)?);
    // The cheats that need no assignment are made before the competition opens.
    let carry_ready = {
        let (base, public, test) = (
            ModelDir::open(base_dir).map_err(NodeError::Ml)?,
            records.clone(),
            test.clone(),
        );
        let (cheats, pdir) = (opts.cheats.clone(), dir.join("prepared"));
        let shard_len = shards.first().map(Vec::len).unwrap_or(0);
        let (seq, data) = (opts.data.seq(), opts.data);
        tokio::task::spawn_blocking(move || {
            prepare(
                &base,
                &public,
                &test,
                shard_len,
                &cheats,
                &pdir,
                (c, seq, data),
            )
        })
        .await
        .map_err(other)??
    };
    progress(&format!(
        "{comp}: cheats that need no assignment prepared in advance"
    ));
    let token = admin_token(&opts.exe, &vconf)?;
    daemons.push(Daemon::start(
        &opts.exe,
        "validator",
        &["validator", "--config", &vconf.to_string_lossy()],
        &vdir.join("validator.log"),
    )?);
    if let Some((name, conf, log)) = late_start {
        tokio::time::sleep(Duration::from_secs(4)).await;
        daemons.push(Daemon::start(
            &opts.exe,
            &name,
            &["miner", "--config", &conf],
            &log,
        )?);
    }
    progress(&format!(
        "{comp}: validator, {} honest miner daemons and {} adversaries started",
        HONEST.len(),
        adversaries.len()
    ));

    let base = ModelDir::open(base_dir).map_err(NodeError::Ml)?;
    let mut outcomes: BTreeMap<usize, Done> = BTreeMap::new();
    let mut carry: Carry = carry_ready;
    for j in 0..2 {
        let job = JobId::new(format!("{comp}-{j}")).map_err(other)?;
        // Wait for every adversary's assignment.
        let limit = Instant::now() + Duration::from_secs(180);
        let assignments: Vec<Assignment> = loop {
            for d in daemons.iter_mut() {
                d.check()?;
            }
            let got: Vec<Option<Assignment>> = adversaries
                .iter()
                .map(|a| a.assigned.lock().ok().and_then(|m| m.get(&job).cloned()))
                .collect();
            if got.iter().all(Option::is_some) {
                break got.into_iter().flatten().collect();
            }
            if Instant::now() > limit {
                return Err(other(format!(
                    "{job}: only {} of {} adversaries were assigned within 180 s",
                    got.iter().filter(|g| g.is_some()).count(),
                    got.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let shard_id = assignments[0].train_shard;
        let deadline = assignments[0].deadline_ms;
        let mut client = tunenet_rpc::ValidatorClient::connect(&vurl)
            .await
            .map_err(other)?;
        let mut bytes = Vec::new();
        client
            .download(shard_id, 0, 64 << 20, &mut |b| {
                bytes.extend_from_slice(b);
                Ok(())
            })
            .await
            .map_err(other)?;
        if BlobId::of(&bytes) != shard_id {
            return Err(other(format!("{job}: the shard does not hash to its id")));
        }
        let shard = tunenet_ml::parse_jsonl(&bytes).map_err(NodeError::Ml)?;
        progress(&format!(
            "{job}: {} adversaries assigned; making their artifacts",
            assignments.len()
        ));
        // Make every artifact off the runtime.
        let jdir = dir.join(format!("job{j}"));
        let plan: Vec<(Role, Assignment)> = adversaries
            .iter()
            .map(|a| a.role)
            .zip(assignments.iter().cloned())
            .collect();
        let ctx = MakeCtx {
            base: base.clone(),
            other_weights: other_dir.join("model.safetensors"),
            shard,
            test: test.clone(),
            public: records.clone(),
            dir: jdir,
            c,
            j,
            seq: opts.data.seq(),
            prepared_first: opts.data == WireData::Instruct,
            deadline: Instant::now() + Duration::from_millis(deadline.saturating_sub(now_ms())),
        };
        // Each artifact is committed as soon as it is made, as a miner would; the
        // accomplices' come first (they are the originals the copiers take).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, PathBuf)>();
        let mut carry_in = std::mem::take(&mut carry);
        let maker = tokio::task::spawn_blocking(move || {
            let r = make_artifacts(&ctx, &plan, &mut carry_in, &tx);
            (r, carry_in)
        });
        let mut made: BTreeMap<usize, PathBuf> = BTreeMap::new();
        let mut headers: BTreeMap<usize, UploadHeader> = BTreeMap::new();
        let mut source_commit: Option<Commitment> = None;
        let mut late: Vec<(usize, Commitment)> = Vec::new();
        // Every committed artifact is revealed 1.5 s after the deadline, as an honest miner
        // would, whether or not a late training cheat is still being made; the late commit
        // goes first.
        let reveal_at = tokio::time::Instant::now()
            + Duration::from_millis(deadline.saturating_sub(now_ms()) + 1_500);
        let (mut making, mut revealed) = (true, false);
        while making || !revealed {
            let (i, path) = tokio::select! {
                got = rx.recv(), if making => match got {
                    Some(got) => got,
                    None => {
                        making = false;
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(reveal_at), if !revealed => {
                    revealed = true;
                    for (i, cm) in std::mem::take(&mut late) {
                        if let Err(e) = client.commit(cm).await {
                            headers.remove(&i);
                            outcomes
                                .entry(i)
                                .or_default()
                                .refused
                                .push((refusal_kind(&e.to_string()), e.to_string()));
                        }
                    }
                    for (i, h) in &headers {
                        let Some(path) = made.get(i).cloned() else { continue };
                        let path = if matches!(
                            adversaries[*i].role,
                            Role::Cheat(Cheat::ReplayedCommitment)
                        ) {
                            made.get(&0).cloned().unwrap_or(path)
                        } else {
                            path
                        };
                        if let Err(e) = client.upload(h.clone(), &path).await {
                            outcomes
                                .entry(*i)
                                .or_default()
                                .refused
                                .push((refusal_kind(&e.to_string()), e.to_string()));
                        }
                    }
                    progress(&format!(
                        "{job}: committed and revealed; the validator evaluates"
                    ));
                    continue;
                }
            };
            made.insert(i, path.clone());
            let a = &adversaries[i];
            if now_ms() > deadline {
                progress(&format!(
                    "{job}: adversary {i}'s artifact was ready after the deadline"
                ));
            }
            let art_bytes = std::fs::read(&path).map_err(other)?;
            let art = BlobId::of(&art_bytes);
            let salt: [u8; 32] = rand::random();
            let me = a.id.peer_id();
            let mut header = UploadHeader {
                job_id: job.clone(),
                miner: me.clone(),
                artifact: art,
                size: art_bytes.len() as u64,
                salt,
            };
            let mut cm = Commitment {
                job_id: job.clone(),
                miner: me.clone(),
                miner_key: a.id.public_key_bytes(),
                commit: commit_hash(&art, &me, &job, &salt),
                artifact_size: art_bytes.len() as u64,
                signature: vec![],
            };
            match a.role {
                Role::Cheat(Cheat::ForgedSignature) => {
                    cm.signature = Identity::generate().sign(&cm.signing_bytes());
                }
                Role::Cheat(Cheat::ReplayedCommitment) => {
                    // The accomplice's commitment hash under its own name; at the reveal,
                    // the accomplice's artifact and salt.
                    if let (Some(src), Some(h)) = (&source_commit, headers.get(&0)) {
                        cm.commit = src.commit;
                        cm.artifact_size = src.artifact_size;
                        header.artifact = h.artifact;
                        header.salt = h.salt;
                        header.size = h.size;
                    }
                }
                Role::Cheat(Cheat::UploadMismatch) => {
                    header.artifact = BlobId::of(b"a different artifact");
                }
                _ => {}
            }
            if cm.signature.is_empty() {
                cm.signature = a.id.sign(&cm.signing_bytes());
            }
            if a.role == Role::Cheat(Cheat::LateCommit) {
                late.push((i, cm));
                headers.insert(i, header);
                continue;
            }
            match client.commit(cm.clone()).await {
                Ok(_) => {
                    if a.role == Role::Accomplice(0) {
                        source_commit = Some(cm);
                    }
                    headers.insert(i, header);
                }
                Err(e) => outcomes
                    .entry(i)
                    .or_default()
                    .refused
                    .push((refusal_kind(&e.to_string()), e.to_string())),
            }
            if a.role == Role::Cheat(Cheat::DisplacingReplay)
                && let Some(src) = &source_commit
            {
                // Anyone who saw the accomplice's signed commitment can re-send it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Err(e) = client.commit(src.clone()).await {
                    progress(&format!("{job}: the re-sent commitment was refused: {e}"));
                }
            }
            // Distinct receipt times keep "who committed first" unambiguous.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (r, c) = maker.await.map_err(other)?;
        carry = c;
        r?;
    }
    // Wait for the scores.
    let limit = Instant::now() + Duration::from_secs(900);
    loop {
        for d in daemons.iter_mut() {
            d.check()?;
        }
        if let Ok(mut cl) = tunenet_rpc::ValidatorClient::connect(&vurl).await
            && let Ok(lb) = cl.leaderboard(&comp).await
            && lb.jobs_total > 0
            && lb.jobs_done == lb.jobs_total
        {
            break;
        }
        if Instant::now() > limit {
            return Err(other(format!("{comp} was not scored within 900 s")));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let out = Command::new(&opts.exe)
        .args([
            "console",
            "--validator",
            &vurl,
            "--token",
            &token,
            "--json",
            "competition",
            "show",
            &comp,
        ])
        .output()
        .map_err(other)?;
    if !out.status.success() {
        return Err(other(format!(
            "console competition show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(other)?;
    // Kept beside the daemons' logs, with who was who, for anyone checking the report.
    let _ = std::fs::write(dir.join("competition.json"), &out.stdout);
    let who: Vec<String> = adversaries
        .iter()
        .map(|a| format!("{} {:?}", a.id.peer_id(), a.role))
        .chain(
            daemon_peers(&dir)?
                .into_iter()
                .map(|p| format!("{p} honest daemon")),
        )
        .collect();
    let _ = std::fs::write(dir.join("roles.txt"), who.join("\n"));
    let vlog = std::fs::read_to_string(vdir.join("validator.log")).unwrap_or_default();
    tally(
        &detail,
        &vlog,
        &adversaries,
        &outcomes,
        &daemon_peers(&dir)?,
        report,
    );
    for s in servers {
        s.stop().await;
    }
    drop(daemons);
    Ok(())
}

/// Runs `tunenet validator --config CONF init` and returns the first admin token it prints.
pub fn admin_token(exe: &Path, conf: &Path) -> Result<String, NodeError> {
    let init = Command::new(exe)
        .args(["validator", "--config", &conf.to_string_lossy(), "init"])
        .output()
        .map_err(other)?;
    let token = String::from_utf8_lossy(&init.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    if !token.starts_with("tn_") {
        return Err(other(format!(
            "validator init gave no admin token: {}",
            String::from_utf8_lossy(&init.stderr)
        )));
    }
    Ok(token)
}

/// The honest daemons' peer ids, from their identity files.
fn daemon_peers(dir: &Path) -> Result<Vec<String>, NodeError> {
    let mut out = Vec::new();
    for h in 0..HONEST.len() {
        let key = dir.join(format!("honest{h}/data/identity.key"));
        if key.exists() {
            out.push(crate::keys::load_or_create(&key)?.peer_id().0);
        }
    }
    Ok(out)
}

fn refusal_kind(msg: &str) -> String {
    if msg.contains("after the deadline") {
        "deadline"
    } else if msg.contains("signature") {
        "signature"
    } else if msg.contains("commitment") {
        "commitment"
    } else {
        "refused"
    }
    .into()
}

pub(crate) fn free_port() -> Result<u16, NodeError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(other)?;
    Ok(l.local_addr().map_err(other)?.port())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the artifact makers need.
struct MakeCtx {
    base: ModelDir,
    other_weights: PathBuf,
    shard: Vec<Record>,
    test: Vec<Record>,
    public: Vec<Record>,
    dir: PathBuf,
    c: usize,
    j: usize,
    /// Tokens per training sequence.
    seq: usize,
    /// Commit what was made before the competition opened before anything is trained
    /// (on real text, whose longer records make the in-job training slow enough that a
    /// loaded machine would push prepared cheats past the deadline; the demo report was
    /// measured with them after the accomplices).
    prepared_first: bool,
    /// The job's deadline: the accomplices and the cheats that train on their assigned
    /// records stop in time for it, as a miner daemon does.
    deadline: Instant,
}

/// What a cheater keeps from one job to the next.
#[derive(Default)]
struct Carry {
    /// The artifact submitted to every job.
    reused: Option<PathBuf>,
    /// The model trained once on the whole public dataset.
    whole: Option<PathBuf>,
    /// A full artifact of the base to take the layout from.
    template: Option<PathBuf>,
    /// Per job: the adapter trained on fresh in-distribution records (made in advance).
    other_data: BTreeMap<usize, PathBuf>,
    /// Per job: the adapter trained on the hidden test split alone (made in advance).
    test_only: BTreeMap<usize, PathBuf>,
    /// The full fine-tune on the hidden test split (made in advance).
    test_split: Option<PathBuf>,
}

/// Trains on `records` from a full fine-tune of `base` (`weights`, made a model directory
/// of its own in `odir/pretrained`), in `odir/t`; returns the new full artifact.
fn train_on_top(
    base: &ModelDir,
    weights: &Path,
    records: &[Record],
    cfg: &TrainConfig,
    deadline: Option<Instant>,
    odir: &Path,
) -> Result<PathBuf, NodeError> {
    let mdir = odir.join("pretrained");
    model_from_full(base, weights, &mdir)?;
    let pre = ModelDir::open(&mdir).map_err(NodeError::Ml)?;
    train_until(&pre, records, cfg, deadline, &odir.join("t"))
}

/// Optimiser steps of the cheats that train on the leaked test split before the
/// competition opens, on real text: about five passes over its 64-record test split at a
/// batch of 8.
const TEST_SPLIT_STEPS: usize = 40;

/// `cfg` with exactly `steps` optimiser steps.
fn exact_steps(cfg: TrainConfig, steps: usize) -> TrainConfig {
    TrainConfig {
        max_steps: steps,
        ..cfg
    }
}

/// What the cheaters can make before the competition opens: everything whose training
/// does not depend on the assignment (the whole public dataset, fresh in-distribution
/// records, the leaked test split), as a prepared cheater would. Only training on the
/// assigned subset is left inside the job's time budget. On real text (longer records,
/// so fewer per step) the test-split cheats go over the split [`TEST_SPLIT_STEPS`] times
/// as a cheater who wants the test loss would; on demo data they keep the steps the
/// published demo report was measured with.
fn prepare(
    base: &ModelDir,
    public: &[Record],
    test: &[Record],
    shard_len: usize,
    cheats: &[Cheat],
    dir: &Path,
    (c, seq, data): (usize, usize, WireData),
) -> Result<Carry, NodeError> {
    let mut carry = Carry::default();
    let real = data == WireData::Instruct;
    if real && cheats.contains(&Cheat::TrainedOnTestSplit) {
        // Over the leaked test split in advance; its assigned records are added per job.
        let p = train(
            base,
            test,
            &exact_steps(full(2e-3, 0, 98, seq), TEST_SPLIT_STEPS),
            &dir.join("test-split"),
        )?;
        carry.test_split = Some(p);
    }
    if cheats.contains(&Cheat::WholeDataset) {
        let p = train(base, public, &full(2e-3, 40, 99, seq), &dir.join("whole"))?;
        carry.whole = Some(p);
    }
    for j in 0..2 {
        let seed = (c * 100 + j) as u64;
        if cheats.contains(&Cheat::OtherData) {
            // As many fresh records as the shard holds, from a seed no one else uses.
            let fresh = tunenet_ml::demo_dataset(shard_len, 7_000 + seed);
            let p = train(
                base,
                &fresh,
                &lora(8, 2e-3, 100, seed + 6, seq),
                &dir.join(format!("other-data{j}")),
            )?;
            carry.other_data.insert(j, p);
        }
        if cheats.contains(&Cheat::TestSplitOnly) {
            let p = train(
                base,
                test,
                &if real {
                    exact_steps(lora(16, 3e-3, 0, seed + 4, seq), TEST_SPLIT_STEPS)
                } else {
                    lora(16, 3e-3, 20, seed + 4, seq)
                },
                &dir.join(format!("test-only{j}")),
            )?;
            carry.test_only.insert(j, p);
        }
    }
    Ok(carry)
}

fn lora(rank: usize, lr: f64, steps: usize, seed: u64, seq: usize) -> TrainConfig {
    TrainConfig {
        method: Method::Lora { rank, alpha: 16.0 },
        learning_rate: lr,
        // As many tokens whatever the sequence length (the steps are set for 64).
        max_steps: (steps * 64 / seq).max(1),
        max_seq_len: seq,
        seed,
        ..Default::default()
    }
}

fn full(lr: f64, steps: usize, seed: u64, seq: usize) -> TrainConfig {
    TrainConfig {
        method: Method::Full,
        learning_rate: lr,
        // As many tokens whatever the sequence length (the steps are set for 64).
        max_steps: (steps * 64 / seq).max(1),
        max_seq_len: seq,
        seed,
        ..Default::default()
    }
}

/// Makes every adversary's artifact for one job, sending (index, path) as each is ready.
fn make_artifacts(
    ctx: &MakeCtx,
    plan: &[(Role, Assignment)],
    carry: &mut Carry,
    out: &tokio::sync::mpsc::UnboundedSender<(usize, PathBuf)>,
) -> Result<(), NodeError> {
    let send = |i: usize, p: PathBuf| {
        let _ = out.send((i, p));
    };
    let seed = (ctx.c * 100 + ctx.j) as u64;
    let subset_of = |a: &Assignment| -> Vec<Record> {
        tunenet_integrity::training_subset(&a.nonce, &a.job_id, &a.miner, ctx.shard.len())
            .into_iter()
            .map(|k| ctx.shard[k].clone())
            .collect()
    };
    // Artifacts made before the competition opened are committed at once, as a prepared
    // cheater would, whatever the machine's load does to the training that follows.
    let mut sent: std::collections::BTreeSet<usize> = Default::default();
    for (i, (role, _)) in plan.iter().enumerate().filter(|_| ctx.prepared_first) {
        let prepared = match role {
            Role::Cheat(Cheat::TestSplitOnly) => carry.test_only.get(&ctx.j),
            Role::Cheat(Cheat::OtherData) => carry.other_data.get(&ctx.j),
            _ => None,
        };
        if let Some(p) = prepared {
            send(i, p.clone());
            sent.insert(i);
        } else if *role == Role::Cheat(Cheat::TrainedOnTestSplit) && carry.test_split.is_some() {
            // Its in-job step needs no accomplice: made before them, so that the
            // accomplices' training, not the cheat's, is what a busy machine shortens.
            let p = test_split_step(ctx, carry, &subset_of(&plan[i].1), i)?;
            send(i, p);
            sent.insert(i);
        }
    }
    // Then the accomplices: the copies and the soup are made from their artifacts.
    let mut sources: Vec<PathBuf> = Vec::new();
    for (i, (role, a)) in plan.iter().enumerate() {
        if let Role::Accomplice(k) = role {
            let cfg = [
                lora(8, 2e-3, 100, seed + 1, ctx.seq),
                lora(8, 1.5e-3, 100, seed + 2, ctx.seq),
            ][*k % 2]
                .clone();
            // An honest miner: it stops training in time for the deadline.
            match train_until(
                &ctx.base,
                &subset_of(a),
                &cfg,
                Some(ctx.deadline),
                &ctx.dir.join(format!("a{i}")),
            ) {
                Ok(p) => {
                    sources.push(p.clone());
                    send(i, p);
                }
                Err(NodeError::Ml(tunenet_ml::MlError::NoTimeToTrain { .. })) => {}
                Err(e) => return Err(e),
            }
        }
    }
    // The copiers' and tamperers' source (none needed when only the test-split cheats run).
    let victim = || {
        sources
            .first()
            .cloned()
            .ok_or_else(|| other("no accomplice artifact"))
    };
    // Copied, tampered and prepared artifacts take milliseconds, the rest train on the
    // assigned subset now: the quick ones first, the longest training last, so a busy
    // machine can push only the longest training cheats towards the deadline.
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| match plan[i].0 {
        Role::Cheat(Cheat::RankAboveBound) => 1,
        Role::Cheat(Cheat::WholeDataset) => 2,
        Role::Cheat(Cheat::SameArtifactManyJobs) => 3,
        Role::Cheat(Cheat::TrainedOnTestSplit) => 4,
        Role::Cheat(Cheat::OtherData) if !carry.other_data.contains_key(&ctx.j) => 5,
        Role::Cheat(Cheat::TestSplitOnly) if !carry.test_only.contains_key(&ctx.j) => 5,
        _ => 0,
    });
    for i in order.into_iter().filter(|i| !sent.contains(i)) {
        let (role, a) = &plan[i];
        let Role::Cheat(cheat) = role else { continue };
        let odir = ctx.dir.join(format!("x{i}"));
        std::fs::create_dir_all(&odir).map_err(other)?;
        let dst = odir.join("artifact.safetensors");
        let subset = subset_of(a);
        let path = match cheat {
            Cheat::SameArtifactManyJobs => match &carry.reused {
                Some(p) => p.clone(),
                None => {
                    let p = train(
                        &ctx.base,
                        &subset,
                        &lora(8, 2e-3, 40, seed + 7, ctx.seq),
                        &odir,
                    )?;
                    let keep = ctx.dir.join("..").join("reused.safetensors");
                    std::fs::copy(&p, &keep).map_err(other)?;
                    carry.reused = Some(keep.clone());
                    keep
                }
            },
            Cheat::IdenticalToAnotherMiner | Cheat::DisplacingReplay => victim()?,
            Cheat::NoisyCopy => {
                let mut k = ctx.c as u32 + 1;
                tamper(&victim()?, &dst, |_, v| {
                    for x in v.iter_mut() {
                        k = k.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        *x += ((k >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * 2e-4;
                    }
                })?;
                dst
            }
            Cheat::ModelSoup => {
                soup(&ctx.base, &sources, &full_template(ctx, carry)?, &odir)?;
                dst
            }
            Cheat::OtherInitialisation => {
                transplant(&full_template(ctx, carry)?, &ctx.other_weights, &dst)?;
                dst
            }
            Cheat::BaseUnchanged => {
                let base_weights = ctx.base.path.join("model.safetensors");
                transplant(&full_template(ctx, carry)?, &base_weights, &dst)?;
                dst
            }
            Cheat::TrainedOnTestSplit => match &carry.test_split {
                Some(_) => test_split_step(ctx, carry, &subset, i)?,
                None => {
                    // Its assigned records and the test split again, from the base.
                    let mut mix = subset.clone();
                    mix.extend(ctx.test.iter().cloned());
                    mix.extend(ctx.test.iter().cloned());
                    train(&ctx.base, &mix, &full(2e-3, 40, seed + 3, ctx.seq), &odir)?
                }
            },
            Cheat::TestSplitOnly => match carry.test_only.get(&ctx.j) {
                Some(p) => p.clone(),
                None => train(
                    &ctx.base,
                    &ctx.test,
                    &lora(16, 3e-3, 20, seed + 4, ctx.seq),
                    &odir,
                )?,
            },
            Cheat::WholeDataset => {
                // Trained once, on everything public (the test split is part of the
                // public dataset the validator split), then a few steps on this job.
                let whole = match &carry.whole {
                    Some(p) => p.clone(),
                    None => {
                        let wdir = ctx.dir.join("..").join("whole");
                        let p = train(&ctx.base, &ctx.public, &full(2e-3, 40, 99, ctx.seq), &wdir)?;
                        carry.whole = Some(p.clone());
                        p
                    }
                };
                let cfg = full(1e-3, 3, seed + 5, ctx.seq);
                let step = train_on_top(&ctx.base, &whole, &subset, &cfg, None, &odir)?;
                // The final weights in an artifact whose manifest names the real base, as
                // a cheater would present it.
                transplant(&full_template(ctx, carry)?, &step, &dst)?;
                dst
            }
            Cheat::OtherData => match carry.other_data.get(&ctx.j) {
                Some(p) => p.clone(),
                None => {
                    let fresh = tunenet_ml::demo_dataset(subset.len(), 7_000 + seed);
                    train(
                        &ctx.base,
                        &fresh,
                        &lora(8, 2e-3, 100, seed + 6, ctx.seq),
                        &odir,
                    )?
                }
            },
            Cheat::RankAboveBound => {
                train(&ctx.base, &subset, &lora(32, 2e-3, 5, seed, ctx.seq), &odir)?
            }
            Cheat::NanWeights => {
                let mut first = true;
                tamper(&victim()?, &dst, |_, v| {
                    if first {
                        v[0] = f32::NAN;
                        first = false;
                    }
                })?;
                dst
            }
            Cheat::ExplodingNorms => {
                tamper(&victim()?, &dst, |_, v| {
                    v.iter_mut().for_each(|x| *x *= 1e3)
                })?;
                dst
            }
            // Refused before any evaluation: what they submit does not matter.
            Cheat::LateCommit
            | Cheat::UploadMismatch
            | Cheat::ReplayedCommitment
            | Cheat::ForgedSignature => victim()?,
        };
        send(i, path);
    }
    Ok(())
}

/// The test-split cheat's artifact when it went over the test split before the
/// competition opened: its assigned records and the test split again, a few steps on top
/// of that model, stopping in time for the deadline (with no time left, the prepared model
/// as it is), in an artifact whose manifest names the real base.
fn test_split_step(
    ctx: &MakeCtx,
    carry: &mut Carry,
    subset: &[Record],
    i: usize,
) -> Result<PathBuf, NodeError> {
    let pre = carry
        .test_split
        .clone()
        .ok_or_else(|| other("nothing was trained on the test split in advance"))?;
    let odir = ctx.dir.join(format!("x{i}"));
    std::fs::create_dir_all(&odir).map_err(other)?;
    let dst = odir.join("artifact.safetensors");
    let mut mix = subset.to_vec();
    mix.extend(ctx.test.iter().cloned());
    mix.extend(ctx.test.iter().cloned());
    let seed = (ctx.c * 100 + ctx.j) as u64;
    let cfg = full(2e-3, 40, seed + 3, ctx.seq);
    let weights = match train_on_top(&ctx.base, &pre, &mix, &cfg, Some(ctx.deadline), &odir) {
        Ok(step) => step,
        Err(NodeError::Ml(tunenet_ml::MlError::NoTimeToTrain { .. })) => pre,
        Err(e) => return Err(e),
    };
    transplant(&full_template(ctx, carry)?, &weights, &dst)?;
    Ok(dst)
}

/// A full artifact of the base (one tiny step of full fine-tuning) whose tensors the
/// cheaters replace: its manifest names the real base, as a cheater would present it.
fn full_template(ctx: &MakeCtx, carry: &mut Carry) -> Result<PathBuf, NodeError> {
    if let Some(p) = &carry.template {
        return Ok(p.clone());
    }
    let dir = ctx.dir.join("..").join("template");
    let p = train(
        &ctx.base,
        &tunenet_ml::demo_dataset(8, 1),
        &full(1e-5, 1, 1, ctx.seq),
        &dir,
    )?;
    carry.template = Some(p.clone());
    Ok(p)
}

/// A model directory with the base's config and tokenizer and a full artifact's weights.
fn model_from_full(base: &ModelDir, artifact: &Path, out: &Path) -> Result<(), NodeError> {
    std::fs::create_dir_all(out).map_err(other)?;
    for f in [tunenet_ml::CONFIG_FILE, tunenet_ml::TOKENIZER_FILE] {
        let src = base.path.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).map_err(other)?;
        }
    }
    std::fs::copy(artifact, out.join(tunenet_ml::WEIGHTS_FILE)).map_err(other)?;
    Ok(())
}

/// The model soup: each source adapter merged into the base, the merged weights averaged,
/// submitted as a full fine-tune (written to `dir/artifact.safetensors`).
fn soup(
    base: &ModelDir,
    sources: &[PathBuf],
    template: &Path,
    dir: &Path,
) -> Result<(), NodeError> {
    let mut merged: Vec<BTreeMap<String, Vec<f32>>> = Vec::new();
    for (k, s) in sources.iter().enumerate() {
        let m = dir.join(format!("merged{k}"));
        tunenet_ml::merge_adapter(base, s, &m).map_err(NodeError::Ml)?;
        let w = candle_core::safetensors::load(
            m.join(tunenet_ml::WEIGHTS_FILE),
            &candle_core::Device::Cpu,
        )
        .map_err(other)?;
        let mut map = BTreeMap::new();
        for (name, t) in w {
            let v = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(other)?;
            map.insert(name, v);
        }
        merged.push(map);
    }
    let k = merged.len().max(1) as f32;
    tamper(template, &dir.join("artifact.safetensors"), |name, v| {
        let mut acc = vec![0f32; v.len()];
        for m in &merged {
            if let Some(w) = m.get(name)
                && w.len() == v.len()
            {
                for (a, x) in acc.iter_mut().zip(w) {
                    *a += x / k;
                }
            } else {
                return;
            }
        }
        *v = acc;
    })
}

/// Reads the console's view of the competition into the report.
fn tally(
    detail: &serde_json::Value,
    vlog: &str,
    adversaries: &[Arc<Adversary>],
    outcomes: &BTreeMap<usize, Done>,
    honest_daemons: &[String],
    report: &mut WireReport,
) {
    // The checks' cost, from the validator's "evaluated" lines.
    for line in vlog.lines().filter(|l| l.contains("evaluated")) {
        if let (Some(s), Some(cs)) = (field(line, "secs"), field(line, "check_secs")) {
            report.eval_secs += s;
            report.check_secs += cs;
            // A submission that fails a per-artifact check is never scored: its
            // evaluation is all checks. The share that matters for a scored one is
            // measured over those that got a loss.
            if line.contains(" loss=Some(") {
                report.scored_eval_secs += s;
                report.scored_check_secs += cs;
            }
        }
    }
    let jobs = detail["jobs"].as_array().cloned().unwrap_or_default();
    // Per miner: (job, verdicts, penalty, loss) over its jobs; ranks by scored loss.
    struct Sub {
        job: String,
        verdicts: Vec<tunenet_types::Verdict>,
        penalty: Option<String>,
        rank: Option<usize>,
        synthetic: bool,
        evaluated: bool,
    }
    let mut subs: BTreeMap<String, Vec<Sub>> = BTreeMap::new();
    for j in &jobs {
        let job = j["plan"]["job_id"].as_str().unwrap_or("?").to_string();
        let scores: Vec<tunenet_types::JobScore> =
            serde_json::from_value(j["scores"].clone()).unwrap_or_default();
        let mut losses: Vec<f64> = scores.iter().filter_map(|s| s.loss).collect();
        losses.sort_by(f64::total_cmp);
        for s in scores {
            let slot = &j["slots"][&s.miner.0]["submission"];
            let evaluated = slot.get("Evaluated").is_some();
            let synthetic = slot["Evaluated"]["synthetic_loss"].is_number();
            let rank = s
                .loss
                .filter(|_| s.penalty_reason.is_none())
                .map(|l| losses.iter().filter(|x| **x < l).count() + 1);
            subs.entry(s.miner.0.clone()).or_default().push(Sub {
                job: job.clone(),
                verdicts: s.verdicts,
                penalty: s.penalty_reason,
                rank,
                synthetic,
                evaluated,
            });
        }
    }
    for list in subs.values() {
        for s in list {
            if s.evaluated {
                report.evaluated += 1;
                if s.synthetic {
                    report.evaluated_with_synthetic += 1;
                }
            }
        }
    }
    let mut evidence = |key: &str, cheat: Option<Cheat>, x: f64| {
        let e = report.evidence.entry(key.to_string()).or_default();
        match cheat {
            None => e.0.push(x),
            Some(c) => e.1.entry(c).or_default().push(x),
        }
    };
    let stat_key = |check: &str| match check {
        "test_leakage" => Some("per-record leakage test p-value"),
        "canaries" => Some("canary test p-value"),
        "canary_exposure" => Some("canary exposure test p-value"),
        "assigned_subset" => Some("assigned-subset test p-value"),
        "derived" => Some("derived-submission residual"),
        _ => None,
    };
    let honest_ids: Vec<(String, bool)> = honest_daemons
        .iter()
        .map(|p| (p.clone(), true))
        .chain(
            adversaries
                .iter()
                .filter(|a| matches!(a.role, Role::Accomplice(_)))
                .map(|a| (a.id.peer_id().0, true)),
        )
        .collect();
    for (peer, _) in &honest_ids {
        for s in subs.get(peer).map(Vec::as_slice).unwrap_or_default() {
            report.honest_submissions += 1;
            if s.synthetic {
                report.honest_with_synthetic += 1;
            }
            if s.verdicts.iter().any(|v| v.check == "test_leakage") {
                report.honest_with_leakage += 1;
            }
            for v in &s.verdicts {
                let e = report.honest_checks.entry(v.check.clone()).or_default();
                match v.outcome {
                    tunenet_types::Outcome::Pass => e.0 += 1,
                    tunenet_types::Outcome::Flag => e.1 += 1,
                    tunenet_types::Outcome::Fail => e.2 += 1,
                }
                if let (Some(k), Some(x)) = (stat_key(&v.check), v.value) {
                    evidence(k, None, x);
                }
                if let Some(z) = cohort_spreads(v) {
                    evidence(COHORT_SPREADS, None, z);
                }
                if v.outcome == tunenet_types::Outcome::Flag {
                    report
                        .honest_flags
                        .push(format!("{}: {}: {}", s.job, v.check, v.reason));
                }
            }
            if let Some(p) = &s.penalty {
                report
                    .false_positives
                    .push(format!("{} ({peer}): {p}", s.job));
            }
        }
    }
    for (i, a) in adversaries.iter().enumerate() {
        let Role::Cheat(cheat) = a.role else { continue };
        let peer = a.id.peer_id().0;
        let list = subs.get(&peer).map(Vec::as_slice).unwrap_or_default();
        // (what caught it, the reason), refusals first, then failed checks.
        let mut found: Vec<(String, String)> = outcomes
            .get(&i)
            .map(|d| d.refused.clone())
            .unwrap_or_default();
        for s in list {
            for v in &s.verdicts {
                if let (Some(k), Some(x)) = (stat_key(&v.check), v.value) {
                    evidence(k, Some(cheat), x);
                }
                if let Some(z) = cohort_spreads(v) {
                    evidence(COHORT_SPREADS, Some(cheat), z);
                }
                if v.outcome == tunenet_types::Outcome::Fail {
                    found.push((v.check.clone(), v.reason.clone()));
                }
            }
            if let Some(p) = &s.penalty
                && !s
                    .verdicts
                    .iter()
                    .any(|v| v.outcome == tunenet_types::Outcome::Fail)
            {
                found.push(("penalty".into(), p.clone()));
            }
        }
        let mut by: Vec<String> = found.iter().map(|(b, _)| b.clone()).collect();
        by.sort();
        by.dedup();
        let right = found
            .iter()
            .find(|(b, _)| cheat.expected().contains(&b.as_str()));
        let rank = list.iter().filter_map(|s| s.rank).min();
        let missed = if right.is_some() {
            Vec::new()
        } else {
            missed_detail(
                cheat,
                list.iter().map(|s| (s.job.as_str(), &s.verdicts[..])),
            )
        };
        report.catches.push(WireCatch {
            cheat,
            caught: right.is_some(),
            caught_any: !found.is_empty(),
            by: by.join(", "),
            reason: right
                .or(found.first())
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| {
                    format!(
                        "passed every check{}",
                        rank.map(|r| format!(" (best rank {r})"))
                            .unwrap_or_default()
                    )
                }),
            rank,
            missed,
        });
    }
}

/// A `key=value` number from a tracing line.
fn field(line: &str, key: &str) -> Option<f64> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].trim_end_matches(',').parse().ok()
}

/// min / median / max (count) of the finite values, small ones in scientific notation so
/// p-values do not all read 0.000.
pub(crate) fn summary(xs: &[f64]) -> String {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let fmt = |x: f64| {
        if x != 0.0 && x.abs() < 1e-3 {
            format!("{x:.1e}")
        } else {
            format!("{x:.3}")
        }
    };
    format!(
        "{} / {} / {} ({})",
        fmt(v[0]),
        fmt(v[v.len() / 2]),
        fmt(v[v.len() - 1]),
        v.len()
    )
}

/// The report as `docs/INTEGRITY.md`.
pub fn markdown(r: &WireReport, command: &str) -> String {
    let mut s = String::new();
    s.push_str(match r.data {
        WireData::Demo => "# Integrity: the red-team report, over the wire\n\n",
        WireData::Instruct => "# Integrity on real text: the red-team report, over the wire\n\n",
    });
    s.push_str(&format!(
        "Written by `{command}`. Each competition is a real `tunenet validator` daemon and {} honest `tunenet miner` daemons (LoRA rank 4, LoRA rank 16, full fine-tuning, 100 steps each, the miner's default; learning rates varied by competition), all separate processes on loopback (the last honest daemon starts listening only after the validator's first offers went out, so it gets its jobs only through the offer retries), plus adversary miners that speak only the gRPC protocol from another process: each serves its own `MinerService`, accepts offers, fetches its shard by blake3, signs its own commitments and reveals by upload 1.5 s after the deadline. Cheats whose training needs no assignment (fresh in-distribution records, the test split alone, the whole public dataset) are trained before the competition opens, as a prepared cheater would; the rest train on their assigned subsets within the budget. Two of them are honest accomplices (LoRA rank 8, 100 steps on their assigned subsets, stopping in time for the deadline as a miner daemon does) whose artifacts the copiers and the soup take; their submissions count as honest. Each competition has two jobs on the tiny model pretrained on {} demo-style records from a seed no competition uses ({} steps; fine-tuning then starts, as on any real base, from a model that knows the data's style), {}. Outcomes are read back as an operator reads them, through `tunenet console competition show`; the checks' cost comes from the validator's own log. A cheater counts as caught when one of its strategy's expected checks fails its submission or the validator refuses its message for the expected reason.\n\n",
        HONEST.len(),
        match r.data {
            WireData::Demo => PRETRAIN.0,
            WireData::Instruct => PRETRAIN.0 / 2,
        },
        match r.data {
            WireData::Demo => PRETRAIN.1,
            WireData::Instruct => INSTRUCT_PRETRAIN_STEPS,
        },
        match r.data {
            WireData::Demo => "300 demo records (60 held out as the hidden test split), 16 secret canaries per shard (each an invented country's capital, planted 8 times, with a never-released alternative capital drawn alike for the exposure test), and a synthetic set of 180 records drawn after each deadline",
            WireData::Instruct => "real text: 200 of the 320 original chat records shipped with tunenet (`crates/ml/data`), shuffled per competition (64 held out as the hidden test split and 64 more, drawn by the same seeded shuffle, as control records no one is given; the other 120 records, 8 copies each, are half of the base model's pretraining, so it reads English as any real base does, and no competition uses them), rendered with the plain chat template (the tiny model has none) and trained and scored on 192 bytes per record (a 90 s reveal window: the adversaries' longer records take this process longer to train), held-out real records as canaries (reported, never failed: without alternatives drawn alike there is no exact test), the test-split cheats going over the test split for 40 steps (about five passes) before the competition opens, and a synthetic set of the hidden test records' neighbours written after each deadline by the base model (each test record with a fifth of its answer's scored words replaced by words the model samples in their place, `synthetic_generator = \"neighbours\"`), so the leakage check pairs every test record with its neighbour (a one-sided Wilcoxon signed-rank test on the paired residuals) and judges a submission's shift against its job's other submissions', and also compares the test records with the control records (an exact one-sided Mann–Whitney test on the residuals at `control_alpha`, 1e-4, its references screened against the base model's own losses: both are random draws from the same records)",
        }
    ));
    s.push_str(&format!(
        "Competitions: {}; wall time per competition: {}.\n\n",
        r.competitions,
        summary(&r.wall_secs)
    ));
    if r.data == WireData::Demo {
        s.push_str("The same red team on real text (the shipped chat records, synthetic sets of the test records' neighbours written by the base model: `tunenet redteam --dataset instruct`) is reported in `docs/INTEGRITY-REAL-TEXT.md`.\n\n");
    }
    s.push_str("## Cheaters\n\n| strategy | caught (expected reason) | caught at all | by | best rank when scored | example reason |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut by_cheat: BTreeMap<Cheat, Vec<&WireCatch>> = BTreeMap::new();
    for c in &r.catches {
        by_cheat.entry(c.cheat).or_default().push(c);
    }
    for cheat in Cheat::ALL {
        let Some(list) = by_cheat.get(&cheat) else {
            continue;
        };
        let caught = list.iter().filter(|c| c.caught).count();
        let any = list.iter().filter(|c| c.caught_any).count();
        let mut bys: Vec<&str> = list
            .iter()
            .flat_map(|c| c.by.split(", "))
            .filter(|b| !b.is_empty())
            .collect();
        bys.sort();
        bys.dedup();
        let ranks: Vec<usize> = list.iter().filter_map(|c| c.rank).collect();
        let example = list
            .iter()
            .find(|c| c.caught)
            .or_else(|| list.first())
            .map(|c| c.reason.replace('|', "/"))
            .unwrap_or_default();
        s.push_str(&format!(
            "| {} | {caught}/{} | {any}/{} | {} | {} | {} |\n",
            cheat.describe(),
            list.len(),
            list.len(),
            bys.join(", "),
            ranks
                .iter()
                .min()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            example
        ));
    }
    let misses: Vec<&WireCatch> = r.catches.iter().filter(|c| !c.caught).collect();
    if !misses.is_empty() {
        s.push_str("\nNot caught for the expected reason, with what the strategy's expected checks said in each of its jobs:\n\n");
        for c in misses {
            let jobs = if c.missed.is_empty() {
                "no submission of it is on record".to_string()
            } else {
                c.missed.join("; ")
            };
            s.push_str(&format!(
                "- {}: {}. {}\n",
                c.cheat.describe(),
                c.reason.replace('|', "/"),
                jobs.replace('|', "/")
            ));
        }
    }
    s.push_str(&format!(
        "\n## Honest miners\n\n{} honest submissions; {} failed or penalised; {} of them evaluated with a synthetic loss and {} with a leakage verdict. Over all evaluated submissions: {} of {} had a synthetic loss.\n\n| check | pass | flag | fail |\n| --- | --- | --- | --- |\n",
        r.honest_submissions,
        r.false_positives.len(),
        r.honest_with_synthetic,
        r.honest_with_leakage,
        r.evaluated_with_synthetic,
        r.evaluated
    ));
    for (check, (p, f, x)) in &r.honest_checks {
        s.push_str(&format!("| {check} | {p} | {f} | {x} |\n"));
    }
    if !r.false_positives.is_empty() {
        s.push_str("\nFailed or penalised honest submissions:\n\n");
        for f in &r.false_positives {
            s.push_str(&format!("- {f}\n"));
        }
    }
    if !r.honest_flags.is_empty() {
        s.push_str(&format!(
            "\n{} flags on honest submissions (a flag names a party without a penalty), the first 10:\n\n",
            r.honest_flags.len()
        ));
        for f in r.honest_flags.iter().take(10) {
            s.push_str(&format!("- {f}\n"));
        }
    }
    s.push_str("\n## How far apart honest miners and cheaters sit\n\nmin / median / max (count) of each statistic.\n\n| statistic | honest | cheaters, by strategy |\n| --- | --- | --- |\n");
    for (key, (honest, cheats)) in &r.evidence {
        let parts: Vec<String> = cheats
            .iter()
            .map(|(c, xs)| format!("{}: {}", c.describe(), summary(xs)))
            .collect();
        s.push_str(&format!(
            "| {key} | {} | {} |\n",
            summary(honest),
            parts.join("; ")
        ));
    }
    let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
    s.push_str(&format!(
        "\n## Cost\n\nMeasured in the validator daemon, from its own `evaluated` log lines. Over the submissions that were scored (every check run, then the test and synthetic sets scored): integrity checks took {:.2} s of {:.2} s ({:.1} % of the evaluation time). Over every evaluation, including artifacts that failed a per-artifact check and were never scored (their evaluation is all checks): {:.2} s of {:.2} s ({:.1} %). The checks' time is the per-artifact checks, the base model's per-record losses on the probe records and, once per job, on the records the leakage check compares with the base (the test split, and a synthetic set drawn alike or the held-out control records), and the control and probe records' share, by tokens, of the one batched scoring pass; the rest is scoring the hidden test split and the synthetic set.\n",
        r.scored_check_secs,
        r.scored_eval_secs,
        pct(r.scored_check_secs, r.scored_eval_secs),
        r.check_secs,
        r.eval_secs,
        pct(r.check_secs, r.eval_secs)
    ));
    s.push_str("\nInference competitions' checks (the dense-only tolerance, the log-likelihood sample's size, accuracy on both sides) are measured and described in `docs/INFERENCE-INTEGRITY.md`; their cheaters run over real gRPC in `tests/e2e.rs` (`inference_cheats_are_caught_with_the_reason`).\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_types::{Outcome, Verdict};

    fn verdict(check: &str, outcome: Outcome, value: Option<f64>, reason: &str) -> Verdict {
        Verdict {
            check: check.into(),
            outcome,
            value,
            threshold: value.map(|_| 0.05),
            reason: reason.into(),
        }
    }

    #[test]
    fn a_miss_is_listed_with_what_its_expected_checks_said_in_each_job() {
        let j0 = [
            verdict("finite", Outcome::Pass, None, "all finite"),
            verdict(
                "trained_on_job_data",
                Outcome::Pass,
                Some(0.031),
                "its canaries show exposure",
            ),
        ];
        let j1 = [verdict("finite", Outcome::Pass, None, "all finite")];
        let missed = missed_detail(
            Cheat::OtherData,
            [("rt3-0", &j0[..]), ("rt3-1", &j1[..])].into_iter(),
        );
        assert_eq!(
            missed,
            vec![
                "job rt3-0: trained_on_job_data Pass 3.100e-2 (threshold 5.000e-2): its canaries show exposure".to_string(),
                "job rt3-1: none of its expected checks (trained_on_job_data) ran".to_string(),
            ]
        );
        let long = "x".repeat(1000) + "é";
        let j2 = [verdict("trained_on_job_data", Outcome::Pass, None, &long)];
        let cut = missed_detail(Cheat::OtherData, [("rt4-0", &j2[..])].into_iter());
        assert!(cut[0].ends_with("...") && cut[0].len() < 500, "{}", cut[0]);

        let caught = WireCatch {
            cheat: Cheat::OtherData,
            caught: true,
            caught_any: true,
            by: "trained_on_job_data".into(),
            reason: "no sign of training on its assigned data".into(),
            rank: None,
            missed: Vec::new(),
        };
        let report = WireReport {
            competitions: 2,
            catches: vec![
                caught.clone(),
                WireCatch {
                    caught: false,
                    caught_any: false,
                    by: String::new(),
                    reason: "passed every check (best rank 1)".into(),
                    rank: Some(1),
                    missed,
                    ..caught
                },
            ],
            ..WireReport::default()
        };
        let md = markdown(&report, "tunenet redteam");
        assert!(md.contains("| 1/2 | 1/2 |"), "{md}");
        assert!(
            md.contains("- in-distribution records that are not its assigned data: passed every check (best rank 1). job rt3-0: trained_on_job_data Pass 3.100e-2"),
            "{md}"
        );
        // A run with no miss has no such list.
        let clean = WireReport {
            competitions: 1,
            catches: vec![report.catches[0].clone()],
            ..WireReport::default()
        };
        assert!(!markdown(&clean, "tunenet redteam").contains("Not caught"));
    }
}
