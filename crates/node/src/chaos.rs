//! The chaos run (issue 15): one competition on the tiny model with a real `tunenet
//! validator` daemon and several real `tunenet miner` daemons on loopback, while a seeded
//! random choice of daemon is SIGKILLed at a chosen phase of a job's life (offer,
//! training, commit, upload, evaluation, scoring) and restarted on the same data directory
//! and config. Afterwards the invariants are checked as an operator would check them
//! (through the console and the miners' status) and on the stores themselves once every
//! daemon has stopped. The seed fixes every choice (targets, phases, jitter, downtime);
//! when a kill lands depends on the machine's timing, so two runs of a seed differ in detail.

use crate::error::NodeError;
use crate::wire_redteam::{Daemon, admin_token, free_port, other};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tunenet_engine::{JobPhase, JobState, MinerJob};
use tunenet_rpc::services as pb;
use tunenet_store::{SledStore, StoreExt, trees};
use tunenet_types::{CompetitionId, JobScore, Leaderboard};

/// The phases of a job's life a kill aims at, in the order a job passes them.
pub const PHASES: [&str; 6] = [
    "offer",
    "training",
    "commit",
    "upload",
    "evaluation",
    "scoring",
];

/// The competition's id.
const COMP: &str = "chaos";
/// How long a job may wait for its offers' answers, seconds.
const OFFER_TIMEOUT: u64 = 6;
/// How long after the deadline a miner may reveal, seconds: a restarted miner must get
/// its upload in within it.
const REVEAL_WINDOW: u64 = 20;
/// How long a settled job waits before it is scored, seconds (a window to kill in).
const SCORE_GRACE: u64 = 2;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The `tunenet` binary the daemons run as.
    pub exe: PathBuf,
    /// Fixes every random choice.
    pub seed: u64,
    /// SIGKILLs to make.
    pub kills: usize,
    /// Miner daemons (3 or 4).
    pub miners: usize,
    /// Training time per job, seconds.
    pub budget_secs: u64,
    /// Jobs in the competition (default: enough for the kills).
    pub jobs: Option<u32>,
    /// Where the daemons' data and logs go.
    pub work: PathBuf,
    /// The miners' clocks run this far from the validator's, in milliseconds: ahead for
    /// the even miners, behind for the odd ones (0: one clock).
    pub clock_skew_ms: i64,
}

impl ChaosOptions {
    /// Refuses options the run cannot honour, saying which and why.
    pub fn validate(&self) -> Result<(), NodeError> {
        if !(3..=4).contains(&self.miners) {
            return Err(other(format!(
                "--miners {}: the chaos run fields 3 or 4 miner daemons",
                self.miners
            )));
        }
        if !(5..=120).contains(&self.budget_secs) {
            return Err(other(format!(
                "--budget {}: give each job 5 to 120 s of training (miners refuse budgets under 5 s)",
                self.budget_secs
            )));
        }
        if self.clock_skew_ms.abs() > tunenet_engine::miner::MAX_CLOCK_OFFSET_MS {
            return Err(other(format!(
                "--clock-skew-ms {}: at most {} ms (the largest offset a miner corrects for)",
                self.clock_skew_ms,
                tunenet_engine::miner::MAX_CLOCK_OFFSET_MS
            )));
        }
        if self.kills > 500 {
            return Err(other(format!(
                "--kills {}: at most 500 kills in one run",
                self.kills
            )));
        }
        if let Some(j) = self.jobs
            && !(1..=200).contains(&j)
        {
            return Err(other(format!(
                "--jobs {j}: give the competition 1 to 200 jobs"
            )));
        }
        Ok(())
    }

    /// Jobs in the competition: a kill aimed at a phase the current job has passed waits
    /// for the next job, and a loaded machine stretches restarts, so one job per kill and
    /// two to spare (with 2 kills a job, seed 2 of 20 kills ran out of jobs after 18).
    pub fn job_count(&self) -> u32 {
        self.jobs.unwrap_or(self.kills as u32 + 2)
    }
}

/// One SIGKILL.
#[derive(Clone, Debug)]
pub struct Kill {
    /// Seconds since the daemons started.
    pub at_secs: f64,
    /// Which daemon (`validator`, `miner-0`, ...).
    pub target: String,
    /// The phase it was aimed at.
    pub aimed: &'static str,
    /// The phase the competition was in when the signal went (`between jobs` when no job
    /// was active; `unknown` when the validator could not be asked).
    pub phase: String,
    /// The job that was in that phase, if any.
    pub job: Option<String>,
    /// Seconds from the kill until the daemon answered again.
    pub down_secs: f64,
}

/// One invariant's verdict.
#[derive(Clone, Debug)]
pub struct Check {
    /// The invariant, in words.
    pub name: &'static str,
    /// Whether it holds.
    pub pass: bool,
    /// What was counted, and every violation.
    pub detail: Vec<String>,
}

/// What a chaos run found.
#[derive(Clone, Debug, Default)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Kills asked for.
    pub kills_wanted: usize,
    /// Miner daemons.
    pub miners: usize,
    /// Jobs in the competition.
    pub jobs: u32,
    /// Training time per job, seconds.
    pub budget_secs: u64,
    /// The miners' clock skew, milliseconds (see [`ChaosOptions::clock_skew_ms`]).
    pub clock_skew_ms: i64,
    /// Every kill made.
    pub kills: Vec<Kill>,
    /// Every invariant.
    pub checks: Vec<Check>,
    /// Seconds from the last kill until the competition was finished (None: it was not).
    pub finished_after_last_kill: Option<f64>,
    /// The bound it had to finish within, seconds.
    pub bound_secs: f64,
    /// Wall seconds of the whole run.
    pub wall_secs: f64,
    /// Where the data and logs are.
    pub work: PathBuf,
}

impl ChaosReport {
    /// Whether every invariant holds.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    /// Kills per phase hit, in phase order.
    pub fn per_phase(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for k in &self.kills {
            *counts.entry(k.phase.clone()).or_default() += 1;
        }
        let mut out: Vec<(String, usize)> = PHASES
            .iter()
            .map(|p| (p.to_string(), counts.remove(*p).unwrap_or(0)))
            .collect();
        out.extend(counts);
        out
    }

    /// The report as people read it.
    pub fn text(&self) -> String {
        let mut s = format!(
            "chaos run: seed {}, {} of {} kills, 1 validator + {} miners, {} jobs of {} s; data and logs in {}\n\nkills:\n{:>3} {:>7}  {:<10} {:<11} {:<12} {:<10} {:>6}\n",
            self.seed,
            self.kills.len(),
            self.kills_wanted,
            self.miners,
            self.jobs,
            self.budget_secs,
            self.work.display(),
            "#",
            "at (s)",
            "target",
            "aimed at",
            "hit",
            "job",
            "down"
        );
        if self.clock_skew_ms != 0 {
            s.push_str(&format!(
                "clocks: the even miners {:+.1} s from the validator's, the odd ones {:+.1} s\n",
                self.clock_skew_ms as f64 / 1000.0,
                -self.clock_skew_ms as f64 / 1000.0
            ));
        }
        for (i, k) in self.kills.iter().enumerate() {
            s.push_str(&format!(
                "{:>3} {:>7.1}  {:<10} {:<11} {:<12} {:<10} {:>5.1}s\n",
                i + 1,
                k.at_secs,
                k.target,
                k.aimed,
                k.phase,
                k.job.as_deref().unwrap_or("-"),
                k.down_secs
            ));
        }
        let per: Vec<String> = self
            .per_phase()
            .into_iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        s.push_str(&format!("kills per phase hit: {}\n", per.join(", ")));
        let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
        for k in &self.kills {
            *targets.entry(k.target.as_str()).or_default() += 1;
        }
        let targets: Vec<String> = targets.iter().map(|(t, n)| format!("{t} {n}")).collect();
        s.push_str(&format!(
            "kills per target: {}\n\ninvariants:\n",
            targets.join(", ")
        ));
        for c in &self.checks {
            s.push_str(&format!(
                "  {}  {}\n",
                if c.pass { "PASS" } else { "FAIL" },
                c.name
            ));
            for d in &c.detail {
                s.push_str(&format!("        {d}\n"));
            }
        }
        s.push_str(&format!(
            "\n{}; wall time {:.0} s\n",
            match self.finished_after_last_kill {
                Some(t) => format!(
                    "finished {t:.0} s after the last kill (bound {:.0} s)",
                    self.bound_secs
                ),
                None => format!(
                    "NOT finished within {:.0} s of the last kill",
                    self.bound_secs
                ),
            },
            self.wall_secs
        ));
        s.push_str(if self.passed() {
            "every invariant holds\n"
        } else {
            "SOME INVARIANTS FAIL\n"
        });
        s
    }
}

/// One daemon: how to start it again on the same data directory and config.
struct Proc {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    data: PathBuf,
    port: u16,
    url: String,
    /// Extra environment (a skewed clock).
    env: Vec<(String, String)>,
    daemon: Option<Daemon>,
}

impl Proc {
    fn start(&mut self, exe: &Path) -> Result<(), NodeError> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start_with_env(
            exe, &self.name, &args, &self.log, &self.env,
        )?);
        Ok(())
    }

    /// SIGKILL (what `Child::kill` sends on Unix), and reap it.
    fn sigkill(&mut self) -> Result<(), NodeError> {
        if let Some(mut d) = self.daemon.take() {
            d.child
                .kill()
                .map_err(|e| other(format!("cannot kill {}: {e}", self.name)))?;
            d.child.wait().map_err(other)?;
        }
        Ok(())
    }

    /// Whether it exited on its own; if so, the tail of its log.
    fn crashed(&mut self) -> Option<String> {
        let d = self.daemon.as_mut()?;
        let err = d.check().err()?;
        self.daemon = None;
        Some(err.to_string())
    }

    /// Whether its port takes connections.
    async fn listening(&self) -> bool {
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

/// The admin console, as an operator reaches it.
struct Console {
    url: String,
    token: String,
}

impl Console {
    async fn client(
        &self,
    ) -> Result<
        pb::console_service_client::ConsoleServiceClient<tonic::transport::Channel>,
        NodeError,
    > {
        let ch = tunenet_rpc::endpoint(&self.url)
            .map_err(other)?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(other)?;
        // A competition's jobs, with every submission's sketch and per-record losses, pass
        // tonic's default 4 MB after a few jobs.
        Ok(pb::console_service_client::ConsoleServiceClient::new(ch)
            .max_decoding_message_size(256 << 20))
    }

    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, NodeError> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().map_err(other)?,
        );
        Ok(req)
    }

    /// Every job of the competition, as `console competition show` gives them.
    async fn jobs(&self) -> Result<Vec<Value>, NodeError> {
        let detail = self
            .client()
            .await?
            .show_competition(self.request(pb::CompetitionRef {
                id: COMP.into(),
                ..Default::default()
            })?)
            .await
            .map_err(|s| other(s.message()))?
            .into_inner();
        serde_json::from_str(&detail.jobs_json).map_err(other)
    }

    async fn leaderboard(&self) -> Result<Leaderboard, NodeError> {
        let lb = self
            .client()
            .await?
            .competition_leaderboard(self.request(pb::CompetitionRef {
                id: COMP.into(),
                ..Default::default()
            })?)
            .await
            .map_err(|s| other(s.message()))?
            .into_inner();
        Leaderboard::try_from(lb).map_err(other)
    }
}

/// The variant name of a serialised enum (`"Waiting"` or `{"Uploaded": {...}}`).
fn variant(v: &Value) -> &str {
    v.as_str()
        .or_else(|| {
            v.as_object()
                .and_then(|o| o.keys().next().map(String::as_str))
        })
        .unwrap_or("")
}

/// One job as followed through the console's live feed.
#[derive(Clone, Debug, Default)]
struct JobTrack {
    assigned: bool,
    deadline_passed: bool,
    done: bool,
    slots: BTreeSet<String>,
    committed: BTreeSet<String>,
    revealed: BTreeSet<String>,
    /// Evaluated or failed.
    settled: BTreeSet<String>,
}

impl JobTrack {
    /// The job as `console competition show` gives it.
    fn of(job: &Value) -> JobTrack {
        let mut t = JobTrack::default();
        let phase = variant(&job["phase"]);
        t.assigned = !matches!(phase, "Pending" | "Offering");
        t.deadline_passed = matches!(phase, "Revealing" | "Done");
        t.done = phase == "Done";
        for (m, slot) in job["slots"].as_object().into_iter().flatten() {
            t.slots.insert(m.clone());
            let committed = slot["committed"] == true;
            if committed {
                t.committed.insert(m.clone());
            }
            match variant(&slot["submission"]) {
                "Uploaded" => {
                    t.revealed.insert(m.clone());
                }
                "Evaluated" => {
                    t.revealed.insert(m.clone());
                    t.settled.insert(m.clone());
                }
                "Failed" => {
                    t.settled.insert(m.clone());
                }
                _ => {}
            }
        }
        t
    }

    /// Applies one event of the feed (the engine's words for it).
    fn apply(&mut self, what: &str) {
        let first = what.split_whitespace().next().unwrap_or("").to_string();
        if what.starts_with("assigned to ") {
            self.assigned = true;
        } else if let Some(rest) = what.strip_prefix("commitment from ") {
            let m = rest.split_whitespace().next().unwrap_or("").to_string();
            self.slots.insert(m.clone());
            self.committed.insert(m);
        } else if what.starts_with("deadline passed") {
            self.deadline_passed = true;
        } else if what.starts_with("scored ") || what.starts_with("no miner accepted") {
            self.done = true;
        } else if let Some(m) = what.strip_prefix("assignment to ") {
            let m = m.split_whitespace().next().unwrap_or("").to_string();
            self.settled.insert(m);
        } else if what.contains(" revealed ") {
            self.revealed.insert(first);
        } else if what.contains(" test loss ")
            || what.contains(" failed integrity:")
            || what.ends_with(" did not commit in time")
        {
            self.settled.insert(first);
        }
    }

    /// Where in its life the job is (None: not started, or done).
    fn phase(&self) -> Option<&'static str> {
        if self.done {
            return None;
        }
        if !self.assigned {
            return Some("offer");
        }
        if !self.deadline_passed {
            let all = !self.slots.is_empty() && self.committed.len() >= self.slots.len();
            return Some(if all { "commit" } else { "training" });
        }
        let waiting = |m: &String| !self.revealed.contains(m) && !self.settled.contains(m);
        if self.committed.iter().any(waiting) {
            Some("upload")
        } else if self.revealed.iter().any(|m| !self.settled.contains(m)) {
            Some("evaluation")
        } else {
            Some("scoring")
        }
    }
}

/// The competition as the console's feed shows it: a snapshot each time the feed is
/// (re)joined, then every event.
#[derive(Clone, Debug, Default)]
struct Tracker {
    /// Jobs in plan order.
    order: Vec<String>,
    jobs: BTreeMap<String, JobTrack>,
    /// Whether the feed is joined now.
    live: bool,
}

impl Tracker {
    fn snapshot(&mut self, jobs: &[Value]) {
        let mut order: Vec<String> = jobs
            .iter()
            .map(|j| j["plan"]["job_id"].as_str().unwrap_or("?").to_string())
            .collect();
        // `chaos-10` after `chaos-9`.
        order.sort_by_key(|id| {
            (
                id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()),
                id.clone(),
            )
        });
        self.jobs = jobs
            .iter()
            .map(|j| {
                (
                    j["plan"]["job_id"].as_str().unwrap_or("?").to_string(),
                    JobTrack::of(j),
                )
            })
            .collect();
        self.order = order;
    }

    fn apply(&mut self, job: &str, message: &str) {
        let Some(what) = message.strip_prefix(&format!("job {job}: ")) else {
            return;
        };
        if let Some(t) = self.jobs.get_mut(job) {
            t.apply(what);
        }
    }

    fn view(&self) -> View {
        let active = self.order.iter().find_map(|id| {
            let t = self.jobs.get(id)?;
            // Not started yet: offered at the validator's next tick.
            let p = if !t.done && !t.assigned {
                "offer"
            } else {
                t.phase()?
            };
            Some((id.clone(), p))
        });
        View {
            active,
            done: self.jobs.values().filter(|t| t.done).count() as u32,
            total: self.jobs.len() as u32,
            live: self.live,
        }
    }
}

/// Follows the console's feed until dropped.
struct Follower {
    state: Arc<Mutex<Tracker>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    fn start(console: Arc<Console>) -> Follower {
        let state = Arc::new(Mutex::new(Tracker::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let _ = follow(&console, &st).await;
                if let Ok(mut t) = st.lock() {
                    t.live = false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Follower { state, task }
    }

    fn view(&self) -> View {
        self.state.lock().map(|t| t.view()).unwrap_or_default()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Joins the feed, takes a snapshot, then applies events until the feed ends.
async fn follow(console: &Console, state: &Mutex<Tracker>) -> Result<(), NodeError> {
    let mut feed = console
        .client()
        .await?
        .watch(console.request(pb::WatchRequest {
            competition_id: COMP.into(),
        })?)
        .await
        .map_err(|s| other(s.message()))?
        .into_inner();
    // Joined before the snapshot, so nothing falls between the two.
    let jobs = console.jobs().await?;
    if let Ok(mut t) = state.lock() {
        t.snapshot(&jobs);
        t.live = true;
    }
    while let Some(e) = feed.message().await.map_err(|s| other(s.message()))? {
        if e.message.contains("events skipped") {
            return Ok(()); // join again for a fresh snapshot
        }
        if let Ok(mut t) = state.lock() {
            t.apply(&e.job_id, &e.message);
        }
    }
    Ok(())
}

/// What the console shows now.
#[derive(Clone, Debug, Default)]
struct View {
    /// The active job and its phase (None: every job done).
    active: Option<(String, &'static str)>,
    done: u32,
    total: u32,
    /// Whether the console's feed was joined (false while the validator is down).
    live: bool,
}

impl View {
    fn finished(&self) -> bool {
        self.total > 0 && self.done == self.total
    }

    fn phase_index(&self) -> Option<usize> {
        let (_, p) = self.active.as_ref()?;
        PHASES.iter().position(|x| x == p)
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Runs the chaos run and checks the invariants; `progress` gets a line per step.
pub async fn run(
    opts: &ChaosOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<ChaosReport, NodeError> {
    opts.validate()?;
    let t_run = Instant::now();
    let work = &opts.work;
    std::fs::create_dir_all(work).map_err(other)?;
    if std::fs::read_dir(work).map_err(other)?.next().is_some() {
        return Err(other(format!(
            "{} is not empty: the chaos run starts from fresh data directories",
            work.display()
        )));
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let jobs = opts.job_count();
    let base = work.join("base");
    tunenet_ml::init_tiny(&base, opts.seed).map_err(NodeError::Ml)?;
    let dataset = work.join("dataset.jsonl");
    std::fs::write(
        &dataset,
        tunenet_ml::to_jsonl(&tunenet_ml::demo_dataset(400, opts.seed ^ 0xc4a0)),
    )
    .map_err(other)?;

    // The miners: different methods, ranks and learning rates; few steps, so that each
    // job has a training phase and then a wait for the deadline with its commitment made.
    const TRAINING: [&str; 4] = [
        "method = \"lora\"\nlora_rank = 4\nlora_alpha = 8.0\nlearning_rate = 0.002\n",
        "method = \"lora\"\nlora_rank = 8\nlora_alpha = 16.0\nlearning_rate = 0.003\n",
        "method = \"full\"\nlearning_rate = 0.001\n",
        "method = \"lora\"\nlora_rank = 2\nlora_alpha = 4.0\nlearning_rate = 0.001\n",
    ];
    let mut procs: Vec<Proc> = Vec::new();
    for (m, training) in TRAINING.iter().enumerate().take(opts.miners) {
        let port = free_port()?;
        let dir = work.join(format!("miner-{m}"));
        std::fs::create_dir_all(&dir).map_err(other)?;
        let conf = dir.join("miner.toml");
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n\n[policy]\nmax_concurrent_jobs = 1\naccept_hold_secs = {}\n\n[training]\n{training}max_steps = 24\nbatch_size = 4\nmax_seq_len = 48\ncommit_margin_secs = 1.0\nseed = {}\n",
                dir.join("data"),
                OFFER_TIMEOUT + 4,
                opts.seed.wrapping_mul(10).wrapping_add(m as u64)
            ),
        )
        .map_err(other)?;
        procs.push(Proc {
            name: format!("miner-{m}"),
            args: vec![
                "miner".into(),
                "--config".into(),
                conf.to_string_lossy().into(),
            ],
            log: dir.join("miner.log"),
            data: dir.join("data"),
            port,
            url: format!("http://127.0.0.1:{port}"),
            env: if opts.clock_skew_ms == 0 {
                vec![]
            } else {
                let skew = if m % 2 == 0 {
                    opts.clock_skew_ms
                } else {
                    -opts.clock_skew_ms
                };
                vec![(
                    tunenet_types::time::CLOCK_SKEW_ENV.to_string(),
                    skew.to_string(),
                )]
            },
            daemon: None,
        });
    }
    let vport = free_port()?;
    let vdir = work.join("validator");
    std::fs::create_dir_all(&vdir).map_err(other)?;
    let vconf = vdir.join("validator.toml");
    let miners: Vec<String> = procs.iter().map(|p| format!("{:?}", p.url)).collect();
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\nminers = [{}]\nartifact_record_grace_secs = {SCORE_GRACE}\n\n[[competitions]]\nid = \"{COMP}\"\nbase_model = {:?}\ndataset = {:?}\njobs = {jobs}\nminers_per_job = {n}\nmin_miners = {n}\ntime_budget_secs = {}\ntest_fraction = 0.2\nseed = {}\nreveal_window_secs = {REVEAL_WINDOW}\noffer_timeout_secs = {OFFER_TIMEOUT}\neval_max_seq_len = 48\nsynthetic_generator = \"demo\"\nsynthetic_records = 40\n",
            vdir.join("data"),
            miners.join(", "),
            base,
            dataset,
            opts.budget_secs,
            opts.seed,
            n = opts.miners,
        ),
    )
    .map_err(other)?;
    let token = admin_token(&opts.exe, &vconf)?;
    procs.push(Proc {
        name: "validator".into(),
        args: vec![
            "validator".into(),
            "--config".into(),
            vconf.to_string_lossy().into(),
        ],
        log: vdir.join("validator.log"),
        data: vdir.join("data"),
        port: vport,
        url: format!("http://127.0.0.1:{vport}"),
        env: vec![],
        daemon: None,
    });
    let v = procs.len() - 1;
    let console = Arc::new(Console {
        url: procs[v].url.clone(),
        token,
    });
    for p in procs.iter_mut() {
        p.start(&opts.exe)?;
    }
    let follower = Follower::start(console.clone());
    progress(&format!(
        "chaos: validator and {} miners started; {jobs} jobs of {} s; {} kills (seed {})",
        opts.miners, opts.budget_secs, opts.kills, opts.seed
    ));

    let t0 = Instant::now();
    let mut report = ChaosReport {
        seed: opts.seed,
        kills_wanted: opts.kills,
        miners: opts.miners,
        jobs,
        budget_secs: opts.budget_secs,
        clock_skew_ms: opts.clock_skew_ms,
        work: work.clone(),
        ..Default::default()
    };
    let mut crashes: Vec<String> = Vec::new();
    // The longest one job should take with nothing killed, seconds.
    let per_job = (OFFER_TIMEOUT + opts.budget_secs + REVEAL_WINDOW + SCORE_GRACE + 30) as f64;
    let mut view = View::default();

    for k in 0..opts.kills {
        // Aimed at a random phase; in the last job only at the phases still ahead, so that
        // the competition does not end before the kills do.
        let last_job = view.total > 0 && view.done + 1 >= view.total;
        let from = match (last_job, view.phase_index()) {
            (true, Some(i)) => i,
            _ => 0,
        };
        let aimed = PHASES[rng.random_range(from..PHASES.len())];
        let target = rng.random_range(0..procs.len());
        let jitter = Duration::from_millis(rng.random_range(0..400));
        let down = Duration::from_millis(rng.random_range(200..1500));
        let settle = Duration::from_millis(rng.random_range(500..2500));
        let limit = Instant::now() + Duration::from_secs_f64(per_job * 2.0);
        let mut polls = 0u32;
        loop {
            // Following the feed costs nothing here: look every 10 ms, and check the
            // daemons every 200 ms.
            if polls.is_multiple_of(20) {
                restart_crashed(&mut procs, &opts.exe, &mut crashes, progress)?;
            }
            polls += 1;
            view = follower.view();
            if view.finished() || Instant::now() > limit {
                break;
            }
            if view.live && view.active.as_ref().is_some_and(|(_, p)| *p == aimed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if view.finished() {
            progress(&format!(
                "chaos: the competition finished after {k} of {} kills",
                opts.kills
            ));
            break;
        }
        // The offer and the upload last a tick or two on loopback: no jitter there.
        if !matches!(aimed, "offer" | "upload") {
            tokio::time::sleep(jitter).await;
        }
        // The phase right before the signal.
        view = follower.view();
        let (phase, job) = match &view.active {
            _ if !view.live => ("unknown".to_string(), None),
            Some((j, p)) => (p.to_string(), Some(j.clone())),
            None => ("after the last job".to_string(), None),
        };
        let at = secs(t0);
        procs[target].sigkill()?;
        progress(&format!(
            "chaos: kill {} at {at:.1} s: SIGKILL {} (aimed at {aimed}, hit {phase}{})",
            k + 1,
            procs[target].name,
            job.as_ref().map(|j| format!(" of {j}")).unwrap_or_default()
        ));
        let killed = Instant::now();
        tokio::time::sleep(down).await;
        procs[target].start(&opts.exe)?;
        let up_limit = Instant::now() + Duration::from_secs(60);
        while !procs[target].listening().await {
            restart_crashed(&mut procs, &opts.exe, &mut crashes, progress)?;
            if Instant::now() > up_limit {
                return Err(other(format!(
                    "{} did not listen again within 60 s of its restart; see {}",
                    procs[target].name,
                    procs[target].log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.kills.push(Kill {
            at_secs: at,
            target: procs[target].name.clone(),
            aimed,
            phase,
            job,
            down_secs: secs(killed),
        });
        tokio::time::sleep(settle).await;
    }

    // Nothing stays stuck: the competition finishes within a bound after the last kill.
    let last_kill = Instant::now();
    let left = view.total.saturating_sub(view.done).max(1);
    report.bound_secs = 30.0 + per_job * left as f64;
    loop {
        restart_crashed(&mut procs, &opts.exe, &mut crashes, progress)?;
        view = follower.view();
        if view.live && view.finished() {
            report.finished_after_last_kill = Some(secs(last_kill));
            break;
        }
        if secs(last_kill) > report.bound_secs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress(&format!(
        "chaos: {} of {} jobs done {:.0} s after the last kill; checking the invariants",
        view.done,
        view.total,
        secs(last_kill)
    ));

    drop(follower);
    // What an operator sees: the console and the miners' own status.
    let console_jobs = console.jobs().await?;
    let console_lb = console.leaderboard().await?;
    let mut statuses = Vec::new();
    for p in &procs[..v] {
        let st = match tunenet_rpc::MinerClient::connect(&p.url).await {
            Ok(mut c) => c.status().await.map_err(other),
            Err(e) => Err(other(e)),
        };
        statuses.push((p.name.clone(), st));
    }
    // Then the stores themselves, with every daemon stopped.
    for p in procs.iter_mut() {
        if let Some(err) = p.crashed() {
            crashes.push(err);
        }
        p.daemon = None;
    }
    let vlog = std::fs::read_to_string(&procs[v].log).unwrap_or_default();
    let stored = stored_validator(&procs[v].data);
    let miner_stores: Vec<(String, Result<Vec<MinerJob>, NodeError>)> = procs[..v]
        .iter()
        .map(|p| (p.name.clone(), stored_miner(&p.data)))
        .collect();

    report.checks.push(check_final(
        &console_jobs,
        &statuses,
        &stored,
        &miner_stores,
        opts.kills == 0,
    ));
    report
        .checks
        .push(check_scored_once(&console_jobs, &stored, &vlog));
    report
        .checks
        .push(check_leaderboard(&console_lb, &stored, view.total));
    report.checks.push(check_blobs(&procs));
    report
        .checks
        .push(check_not_stuck(&report, &view, &crashes));
    report.wall_secs = secs(t_run);
    Ok(report)
}

/// Starts again any daemon that exited on its own, noting it.
fn restart_crashed(
    procs: &mut [Proc],
    exe: &Path,
    crashes: &mut Vec<String>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), NodeError> {
    for p in procs.iter_mut() {
        if let Some(err) = p.crashed() {
            progress(&format!("chaos: {err}"));
            crashes.push(err);
            p.start(exe)?;
        }
    }
    Ok(())
}

/// The validator's stored jobs and per-job scores.
struct Stored {
    jobs: Vec<JobState>,
    scores: BTreeMap<String, Vec<JobScore>>,
}

fn stored_validator(data: &Path) -> Result<Stored, NodeError> {
    let store = SledStore::open(&data.join("db"))?;
    let jobs = store
        .scan_json::<JobState>(trees::JOBS, &format!("{COMP}/"))?
        .into_iter()
        .map(|(_, j)| j)
        .collect();
    let scores = store
        .scan_json::<Vec<JobScore>>(trees::SCORES, &format!("{COMP}/"))?
        .into_iter()
        .map(|(k, s)| (k.trim_start_matches(&format!("{COMP}/")).to_string(), s))
        .collect();
    Ok(Stored { jobs, scores })
}

fn stored_miner(data: &Path) -> Result<Vec<MinerJob>, NodeError> {
    let store = SledStore::open(&data.join("db"))?;
    Ok(store
        .scan_json::<MinerJob>(trees::MINER_JOBS, "")?
        .into_iter()
        .map(|(_, j)| j)
        .collect())
}

/// How a failure by the per-record leakage test begins (its check's name).
const CHANCE_FINDING: &str = "integrity: test_leakage:";

/// Every accepted job ends scored or failed with a reason; no submission, on the
/// validator or on a miner, is left in a state that is not final. With nothing killed,
/// nothing excuses a failure, except one chance finding of the per-record leakage test.
fn check_final(
    jobs: &[Value],
    statuses: &[(String, Result<tunenet_proto::v1::MinerStatus, NodeError>)],
    stored: &Result<Stored, NodeError>,
    miner_stores: &[(String, Result<Vec<MinerJob>, NodeError>)],
    no_kills: bool,
) -> Check {
    let mut bad = Vec::new();
    let (mut scored, mut failed, mut abandoned, mut chance) = (0, 0, 0, 0);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for j in jobs {
        let id = j["plan"]["job_id"].as_str().unwrap_or("?");
        let phase = variant(&j["phase"]);
        if phase != "Done" {
            bad.push(format!("{id}: still {phase}"));
            continue;
        }
        let note = j["phase"]["Done"]["note"].as_str();
        let slots = j["slots"].as_object().cloned().unwrap_or_default();
        if let Some(n) = note {
            abandoned += 1;
            if n.trim().is_empty() {
                bad.push(format!("{id}: ended without scores and without a reason"));
            }
            *reasons.entry(format!("job: {n}")).or_default() += 1;
        }
        let scores = j["scores"].as_array().cloned().unwrap_or_default();
        for (miner, slot) in &slots {
            match variant(&slot["submission"]) {
                "Evaluated" => scored += 1,
                "Failed" => {
                    failed += 1;
                    let r = slot["submission"]["Failed"]["reason"]
                        .as_str()
                        .unwrap_or("");
                    if r.trim().is_empty() {
                        bad.push(format!("{id}: {miner} failed without a reason"));
                    } else if no_kills && r.starts_with(CHANCE_FINDING) {
                        // Judged after its evaluation by the per-record leakage test, which
                        // fails an honest submission at its level (leak_alpha): see below.
                        chance += 1;
                    } else if no_kills {
                        // Nothing was killed, so nothing excuses it (a skewed clock
                        // making a miner late or early would show here).
                        bad.push(format!("{id}: {miner} failed with no kill: {r}"));
                    }
                    *reasons.entry(short_reason(r)).or_default() += 1;
                }
                other => bad.push(format!("{id}: {miner}'s submission is still {other}")),
            }
            if note.is_none() && !scores.iter().any(|s| s["miner"] == miner.as_str()) {
                bad.push(format!("{id}: {miner} has no score in a scored job"));
            }
        }
        for s in &scores {
            if s["loss"].is_null() && s["penalty_reason"].as_str().is_none_or(str::is_empty) {
                bad.push(format!(
                    "{id}: {} penalised without a reason",
                    s["miner"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    match stored {
        Ok(s) => {
            for j in &s.jobs {
                if !matches!(j.phase, JobPhase::Done { .. }) {
                    bad.push(format!("stored {}: still {:?}", j.plan.job_id, j.phase));
                }
            }
        }
        Err(e) => bad.push(format!("the validator's store: {e}")),
    }
    let mut miner_jobs = 0;
    for (name, st) in statuses {
        match st {
            Ok(st) => {
                for j in &st.jobs {
                    miner_jobs += 1;
                    if !matches!(j.phase.as_str(), "uploaded" | "failed") {
                        bad.push(format!(
                            "{name}: job {} is still {} ({})",
                            j.job_id, j.phase, j.detail
                        ));
                    } else if j.phase == "failed" && j.detail.trim().is_empty() {
                        bad.push(format!("{name}: job {} failed without a reason", j.job_id));
                    } else if j.phase == "failed" && no_kills {
                        bad.push(format!(
                            "{name}: job {} failed with no kill: {}",
                            j.job_id, j.detail
                        ));
                    }
                }
            }
            Err(e) => bad.push(format!("{name}: status unavailable: {e}")),
        }
    }
    for (name, st) in miner_stores {
        if let Err(e) = st {
            bad.push(format!("{name}'s store: {e}"));
        }
    }
    if scored == 0 {
        bad.push(
            "no submission was evaluated, so nothing was tested (see the validator's log)".into(),
        );
    }
    if chance > 1 {
        bad.push(format!(
            "{chance} submissions failed the per-record leakage test with no kill: it fails an honest one at its level (leak_alpha, 1e-3 by default), so more than one in a run is a fault, not chance"
        ));
    }
    let mut detail = vec![format!(
        "{} jobs ({abandoned} ended with a note); {} submissions: {scored} evaluated, {failed} failed; {miner_jobs} jobs on the miners' side",
        jobs.len(),
        scored + failed
    )];
    if chance == 1 {
        detail.push(
            "one submission failed the per-record leakage test with no kill: the test fails an honest submission at its level (leak_alpha) by chance, so one in a run is not a fault".into(),
        );
    }
    if !reasons.is_empty() {
        detail.push(format!(
            "reasons: {}",
            reasons
                .iter()
                .map(|(r, n)| format!("{r} x{n}"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let pass = bad.is_empty();
    detail.extend(bad);
    Check {
        name: "every accepted job ends scored or failed with a reason (validator and miners)",
        pass,
        detail,
    }
}

/// A failure reason without its numbers, so that alike reasons count together.
fn short_reason(r: &str) -> String {
    let r: String = r
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    r.chars().take(90).collect()
}

/// No submission is scored twice: one score per (job, miner) in the console's jobs and in
/// the stored per-job scores, the two agree, and the validator never logged two different
/// scores for one (job, miner) across its restarts.
fn check_scored_once(jobs: &[Value], stored: &Result<Stored, NodeError>, vlog: &str) -> Check {
    let mut bad = Vec::new();
    let mut pairs = 0;
    for j in jobs {
        let id = j["plan"]["job_id"].as_str().unwrap_or("?");
        let mut seen = BTreeMap::new();
        for s in j["scores"].as_array().into_iter().flatten() {
            *seen
                .entry(s["miner"].as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
        for (m, n) in seen {
            pairs += 1;
            if n > 1 {
                bad.push(format!("{id}: {m} scored {n} times"));
            }
        }
    }
    match stored {
        Ok(s) => {
            for j in &s.jobs {
                let id = j.plan.job_id.to_string();
                let stored_scores = s.scores.get(&id).cloned().unwrap_or_default();
                if matches!(j.phase, JobPhase::Done { .. }) && stored_scores != j.scores {
                    bad.push(format!(
                        "{id}: the stored scores ({}) differ from the job's record ({})",
                        stored_scores.len(),
                        j.scores.len()
                    ));
                }
            }
        }
        Err(e) => bad.push(format!("the validator's store: {e}")),
    }
    // `scored job_id=J miner=M loss=.. quality=Q ...` once per score the validator made.
    let mut logged: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in vlog.lines().filter(|l| l.contains(" scored job_id=")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or("")
                .to_string()
        };
        logged
            .entry((field("job_id="), field("miner=")))
            .or_default()
            .push(field("quality="));
    }
    let mut repeated = 0;
    for ((job, miner), qs) in &logged {
        if qs.len() > 1 {
            repeated += 1;
        }
        let mut distinct = qs.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > 1 {
            bad.push(format!(
                "{job}: {miner} was scored {} times with different qualities ({})",
                qs.len(),
                distinct.join(", ")
            ));
        }
    }
    let mut detail = vec![format!(
        "{pairs} (job, miner) scores; {} logged by the validator, {repeated} logged more than once",
        logged.len()
    )];
    let pass = bad.is_empty();
    detail.extend(bad);
    Check {
        name: "no submission is scored twice",
        pass,
        detail,
    }
}

/// The console's leaderboard equals one recomputed from the stored per-job scores.
fn check_leaderboard(lb: &Leaderboard, stored: &Result<Stored, NodeError>, total: u32) -> Check {
    let mut bad = Vec::new();
    let mut detail = Vec::new();
    match stored {
        Ok(s) => {
            let scores: Vec<JobScore> = s.scores.values().flatten().cloned().collect();
            let done = s
                .jobs
                .iter()
                .filter(|j| matches!(j.phase, JobPhase::Done { .. }))
                .count() as u32;
            let cid = match CompetitionId::new(COMP) {
                Ok(c) => c,
                Err(e) => {
                    return Check {
                        name: "the leaderboard equals a recomputation from the stored records",
                        pass: false,
                        detail: vec![e.to_string()],
                    };
                }
            };
            let again = tunenet_types::leaderboard(&cid, &scores, done, s.jobs.len() as u32);
            detail.push(format!(
                "{} rows over {} stored scores of {done} of {} jobs",
                again.rows.len(),
                scores.len(),
                s.jobs.len()
            ));
            if lb.jobs_done != again.jobs_done || lb.jobs_total != again.jobs_total {
                bad.push(format!(
                    "jobs: console {}/{}, stored {}/{}",
                    lb.jobs_done, lb.jobs_total, again.jobs_done, again.jobs_total
                ));
            }
            if lb.jobs_total != total {
                bad.push(format!(
                    "the console lists {} jobs, the competition has {total}",
                    lb.jobs_total
                ));
            }
            if lb.rows.len() != again.rows.len() {
                bad.push(format!(
                    "{} rows on the console, {} recomputed",
                    lb.rows.len(),
                    again.rows.len()
                ));
            }
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
            for (a, b) in lb.rows.iter().zip(&again.rows) {
                let same = a.miner == b.miner
                    && a.rank == b.rank
                    && a.jobs == b.jobs
                    && close(a.standing, b.standing)
                    && close(a.mean_quality, b.mean_quality)
                    && match (a.mean_loss, b.mean_loss) {
                        (Some(x), Some(y)) => close(x, y),
                        (None, None) => true,
                        _ => false,
                    }
                    && a.verdicts == b.verdicts;
                if !same {
                    bad.push(format!("console row {a:?} != recomputed {b:?}"));
                }
            }
            for r in &again.rows {
                detail.push(format!(
                    "#{} {} jobs {} standing {:.4}",
                    r.rank, r.miner, r.jobs, r.standing
                ));
            }
        }
        Err(e) => bad.push(format!("the validator's store: {e}")),
    }
    let pass = bad.is_empty();
    detail.extend(bad);
    Check {
        name: "the leaderboard equals a recomputation from the stored records",
        pass,
        detail,
    }
}

/// Every blob in every daemon's blob store hashes (blake3) to its name.
fn check_blobs(procs: &[Proc]) -> Check {
    let mut bad = Vec::new();
    let mut detail = Vec::new();
    for p in procs {
        let root = p.data.join("blobs");
        let (mut n, mut bytes, mut tmp) = (0usize, 0u64, 0usize);
        let Ok(dirs) = std::fs::read_dir(&root) else {
            bad.push(format!("{}: no blob store at {}", p.name, root.display()));
            continue;
        };
        for d in dirs.flatten() {
            let prefix = d.file_name().to_string_lossy().to_string();
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for f in files.flatten() {
                if prefix == "tmp" {
                    tmp += 1;
                    continue;
                }
                let name = format!("{prefix}{}", f.file_name().to_string_lossy());
                match std::fs::read(f.path()) {
                    Ok(b) => {
                        n += 1;
                        bytes += b.len() as u64;
                        let hash = blake3::hash(&b).to_hex().to_string();
                        if hash != name {
                            bad.push(format!(
                                "{}: blob {name} hashes to {hash} ({} bytes)",
                                p.name,
                                b.len()
                            ));
                        }
                    }
                    Err(e) => bad.push(format!("{}: blob {name} unreadable: {e}", p.name)),
                }
            }
        }
        detail.push(format!(
            "{}: {n} blobs, {:.1} MB, all verified; {tmp} partial writes left in tmp/",
            p.name,
            bytes as f64 / 1e6
        ));
    }
    let pass = bad.is_empty();
    detail.extend(bad);
    Check {
        name: "every stored blob hashes to its name",
        pass,
        detail,
    }
}

/// Nothing stays stuck: the competition finished within the bound after the last kill,
/// and no daemon exited on its own (a store it cannot read, a panic on restart).
fn check_not_stuck(report: &ChaosReport, view: &View, crashes: &[String]) -> Check {
    let mut detail = vec![match report.finished_after_last_kill {
        Some(t) => format!(
            "finished {t:.0} s after the last kill (bound {:.0} s)",
            report.bound_secs
        ),
        None => format!(
            "{} of {} jobs done {:.0} s after the last kill",
            view.done, view.total, report.bound_secs
        ),
    }];
    if report.kills.len() < report.kills_wanted {
        detail.push(format!(
            "only {} of {} kills were made before the competition ended",
            report.kills.len(),
            report.kills_wanted
        ));
    }
    for c in crashes {
        detail.push(format!("exited on its own: {c}"));
    }
    Check {
        name: "nothing stays stuck: the competition finishes within a bound after the last kill, no daemon exits on its own",
        pass: report.finished_after_last_kill.is_some() && crashes.is_empty(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_read_from_the_consoles_jobs_and_its_feed() {
        let phase = |phase: Value, slots: Value| {
            JobTrack::of(&serde_json::json!({"phase": phase, "slots": slots})).phase()
        };
        assert_eq!(phase("Pending".into(), Value::Null), Some("offer"));
        let offering = serde_json::json!({"Offering": {"since": 1}});
        assert_eq!(phase(offering, Value::Null), Some("offer"));
        let running = serde_json::json!({"Running": {"deadline": 1}});
        let slots = |a: Value, b: Value| serde_json::json!({"m1": a, "m2": b});
        let w = |c: bool| serde_json::json!({"submission": "Waiting", "committed": c});
        assert_eq!(
            phase(running.clone(), slots(w(true), w(false))),
            Some("training")
        );
        assert_eq!(
            phase(running.clone(), slots(w(true), w(true))),
            Some("commit")
        );
        let revealing = serde_json::json!({"Revealing": {"deadline": 1, "until": 2}});
        let up =
            serde_json::json!({"submission": {"Uploaded": {"artifact": "x"}}, "committed": true});
        let ev = serde_json::json!({"submission": {"Evaluated": {}}, "committed": true});
        assert_eq!(
            phase(revealing.clone(), slots(w(true), up.clone())),
            Some("upload")
        );
        assert_eq!(
            phase(revealing.clone(), slots(ev.clone(), up)),
            Some("evaluation")
        );
        assert_eq!(phase(revealing, slots(ev.clone(), ev)), Some("scoring"));
        let done = serde_json::json!({"Done": {"note": null}});
        assert_eq!(phase(done, Value::Null), None);

        // From a snapshot taken while training, the feed's events carry it through.
        let mut t =
            JobTrack::of(&serde_json::json!({"phase": running, "slots": slots(w(true), w(false))}));
        let steps = [
            ("commitment from m2 (9256 bytes)", Some("commit")),
            ("deadline passed; reveals open", Some("upload")),
            ("m1 revealed abc", Some("upload")),
            ("m2 revealed def", Some("evaluation")),
            ("m1 test loss 3.1, synthetic loss 3.0", Some("evaluation")),
            ("m2 failed integrity: finite: NaN", Some("scoring")),
            ("scored 2 submissions", None),
        ];
        for (event, want) in steps {
            t.apply(event);
            assert_eq!(t.phase(), want, "after `{event}`");
        }
    }

    #[test]
    fn with_no_kill_one_chance_leakage_finding_passes_and_two_do_not() {
        let failed = |reason: &str| serde_json::json!({"submission": {"Failed": {"artifact": "x", "reason": reason}}});
        let ev = serde_json::json!({"submission": {"Evaluated": {}}});
        let leak = "integrity: test_leakage: the hidden test split leaked into training";
        let job = |id: &str, slots: Value| {
            serde_json::json!({
                "plan": {"job_id": id},
                "phase": {"Done": {"note": null}},
                "slots": slots,
                "scores": [{"miner": "m1", "loss": 1.0}, {"miner": "m2", "loss": 1.0}],
            })
        };
        let stored = Ok(Stored {
            jobs: Vec::new(),
            scores: BTreeMap::new(),
        });
        let check = |jobs: &[Value]| check_final(jobs, &[], &stored, &[], true);
        let one = check(&[
            job(
                "a",
                serde_json::json!({"m1": ev.clone(), "m2": failed(leak)}),
            ),
            job("b", serde_json::json!({"m1": ev.clone(), "m2": ev.clone()})),
        ]);
        assert!(one.pass, "{:?}", one.detail);
        assert!(
            one.detail
                .iter()
                .any(|d| d.contains("one submission failed the per-record leakage test")),
            "{:?}",
            one.detail
        );
        let two = check(&[
            job(
                "a",
                serde_json::json!({"m1": ev.clone(), "m2": failed(leak)}),
            ),
            job(
                "b",
                serde_json::json!({"m1": failed(leak), "m2": ev.clone()}),
            ),
        ]);
        assert!(!two.pass, "{:?}", two.detail);
        assert!(
            two.detail
                .iter()
                .any(|d| d.contains("is a fault, not chance"))
        );
        // Any other failure with no kill is a fault at once.
        let other = check(&[job(
            "a",
            serde_json::json!({"m1": ev, "m2": failed("integrity: finite: NaN")}),
        )]);
        assert!(
            !other.pass
                && other
                    .detail
                    .iter()
                    .any(|d| d.contains("failed with no kill"))
        );
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let ok = ChaosOptions {
            exe: "tunenet".into(),
            seed: 1,
            kills: 20,
            miners: 3,
            budget_secs: 6,
            jobs: None,
            work: "/tmp/x".into(),
            clock_skew_ms: 30_000,
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.job_count(), 22);
        let refusal = |o: ChaosOptions| o.validate().unwrap_err().to_string();
        let cases = [
            (
                ChaosOptions {
                    miners: 9,
                    ..ok.clone()
                },
                "3 or 4 miner daemons",
            ),
            (
                ChaosOptions {
                    budget_secs: 0,
                    ..ok.clone()
                },
                "--budget 0",
            ),
            (
                ChaosOptions {
                    jobs: Some(0),
                    ..ok.clone()
                },
                "--jobs 0",
            ),
            (
                ChaosOptions {
                    clock_skew_ms: -700_000,
                    ..ok.clone()
                },
                "--clock-skew-ms -700000",
            ),
            (ChaosOptions { kills: 501, ..ok }, "--kills 501"),
        ];
        for (o, says) in cases {
            let e = refusal(o);
            assert!(e.contains(says), "`{e}` does not say `{says}`");
        }
    }
}
