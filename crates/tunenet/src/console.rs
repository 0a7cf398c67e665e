//! `tunenet console`: the admin's gRPC client. Tables for people, `--json` for scripts,
//! `watch` for the live feed. Errors say what to do.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tunenet_rpc::services as pb;
use tunenet_rpc::services::console_service_client::ConsoleServiceClient;

#[derive(Args)]
pub struct ConsoleArgs {
    /// The validator's gRPC URL.
    #[arg(
        long,
        env = "TUNENET_VALIDATOR",
        default_value = "http://127.0.0.1:7100",
        global = true
    )]
    validator: String,
    /// Bearer token (from `tunenet validator init` or `console token create`).
    #[arg(long, env = "TUNENET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// PEM CA certificate that signed the validator's TLS certificate (for https:// URLs).
    #[arg(long, env = "TUNENET_CA", global = true)]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: ConsoleCmd,
}

#[derive(Subcommand)]
enum ConsoleCmd {
    /// Who the token belongs to.
    Whoami,
    /// Competitions.
    #[command(subcommand)]
    Competition(CompCmd),
    /// A competition's leaderboard, or the overall one.
    Leaderboard {
        /// Competition id; omit for the overall leaderboard.
        id: Option<String>,
        /// Rank by the median standing across the validators running the competition
        /// (their signed attestations), not this validator's own.
        #[arg(long)]
        median: bool,
    },
    /// Miners: register, ban, unban, list.
    #[command(subcommand)]
    Miner(MinerCmd),
    /// Every benchmarked miner in one table: devices, verified TFLOPS, price per
    /// device-hour, cost per job, mean quality and quality per unit of cost.
    Miners {
        /// Order of the rows, best first.
        #[arg(long, value_enum, default_value = "value")]
        sort: MinerSort,
    },
    /// The caller's own jobs and verdicts (miner tokens).
    MyJobs,
    /// Tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// The audit log (admin).
    Audit,
    /// Follow the live event feed.
    Watch {
        /// Only this competition.
        #[arg(long, default_value = "")]
        competition: String,
    },
    /// Recompute a competition's finished jobs under a proposed scoring formula and show
    /// the rank changes beside today's leaderboard; nothing is changed.
    Replay {
        /// Competition id.
        id: String,
        /// The proposed formula, a TOML file of scoring weights: `test`, `synthetic` (the
        /// weights of the hidden test loss and the synthetic-set loss), `penalty_quality`
        /// (the quality of a missing or failed submission) and `temperature` (quality is
        /// exp(-loss / temperature)); fields left out keep their defaults.
        #[arg(long)]
        scoring: PathBuf,
    },
    /// Signed evaluation receipts (a miner token gets its own). Once the competition has
    /// finished they carry per-record losses, and `tunenet verify-receipt` recomputes them.
    Receipts {
        /// Competition id.
        id: String,
        /// Only this job.
        #[arg(long, default_value = "")]
        job: String,
        /// Only this miner (a miner token: its own).
        #[arg(long, default_value = "")]
        miner: String,
        /// Write the receipts (a JSON array) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Dispute your evaluation receipt for a job (a miner token), with your own
    /// recomputation: the JSON `tunenet verify-receipt --json` prints. The admin sees
    /// both computations side by side (`disputes`).
    Dispute {
        /// Competition id.
        id: String,
        /// The job.
        job: String,
        /// Your recomputation (`tunenet verify-receipt ... --json > mine.json`).
        #[arg(long)]
        recomputed: PathBuf,
        /// Why, in words.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Disputes filed in a competition, each with the validator's and the miner's numbers
    /// (a miner token: its own).
    Disputes {
        /// Competition id.
        id: String,
    },
    /// Export a competition's scores.
    Export {
        /// Competition id.
        id: String,
        /// csv or json.
        #[arg(long, default_value = "csv")]
        format: String,
    },
}

#[derive(Subcommand)]
enum CompCmd {
    /// Create a competition from a TOML or JSON spec file (the fields of a [[competitions]] entry).
    Create {
        /// The spec file.
        spec: PathBuf,
    },
    /// List competitions.
    List,
    /// Show a competition with its jobs, offers, submissions and scores.
    Show {
        /// Competition id.
        id: String,
    },
    /// Start a created competition.
    Start { id: String },
    /// Hold new jobs back.
    Pause { id: String },
    /// Let new jobs start again.
    Resume { id: String },
    /// End early: jobs not started are closed, jobs in flight finish.
    Stop { id: String },
    /// Hide a finished or stopped competition.
    Archive { id: String },
    /// Change integrity thresholds while the competition runs.
    Integrity {
        /// Competition id.
        id: String,
        /// The fields to change, as JSON, e.g. '{"near_duplicate_cosine": 0.9}'.
        #[arg(long)]
        set: String,
    },
}

#[derive(Subcommand)]
enum MinerCmd {
    /// Register a miner under an owner (at most 5 per owner).
    Register {
        /// The miner's peer id.
        peer_id: String,
        /// Who runs it.
        #[arg(long)]
        owner: String,
        /// The miner's gRPC URL, to offer it jobs.
        #[arg(long, default_value = "")]
        endpoint: String,
    },
    /// Ban a miner, with a reason it will see.
    Ban {
        peer_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Lift a ban.
    Unban { peer_id: String },
    /// List registered miners, and every miner's hardware: its own inventory and the
    /// benchmark this validator verified.
    List,
    /// One miner's hardware in full: inventory, every verified run, flags.
    Show {
        /// The miner's peer id.
        peer_id: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token (printed once; only its hash is kept).
    Create {
        /// admin, operator, miner or viewer.
        #[arg(long)]
        role: String,
        /// Who holds it.
        #[arg(long)]
        name: String,
        /// Lifetime in seconds (0: no expiry).
        #[arg(long, default_value_t = 0)]
        ttl_secs: u64,
        /// For miner tokens: the miner's peer id.
        #[arg(long, default_value = "")]
        miner_peer_id: String,
    },
    /// Revoke a token by id.
    Revoke { id: String },
    /// List tokens.
    List,
}

type Client = ConsoleServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

#[derive(Clone)]
struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn connect(a: &ConsoleArgs) -> Result<Client> {
    let ca = match &a.ca {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("cannot read the CA file {}", p.display()))?,
        ),
        None => None,
    };
    let ch = tunenet_rpc::endpoint_with_ca(&a.validator, ca.as_deref())
        .with_context(|| {
            format!(
                "`{}` is not a usable validator URL (e.g. http://127.0.0.1:7100)",
                a.validator
            )
        })?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the validator at {}: is it running?",
                a.validator
            )
        })?;
    let auth = match &a.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token has characters a header cannot carry")?,
        ),
        None => None,
    };
    // A competition's jobs (every submission's sketch and per-record losses) pass tonic's
    // default 4 MB after a few jobs; found by the chaos run at 9 jobs of 3 miners.
    Ok(ConsoleServiceClient::with_interceptor(ch, Auth(auth)).max_decoding_message_size(256 << 20))
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// How long ago a timestamp was, in seconds.
fn ago(t: u64) -> String {
    format!(
        "{}s ago",
        tunenet_types::time::now_ms().saturating_sub(t) / 1000
    )
}

fn print_comps(list: &[pb::CompetitionInfo]) {
    println!(
        "{:<20} {:<10} {:>5} {:>7} {:>5} {:>7} {:>8}",
        "id", "state", "jobs", "running", "done", "miners", "budget"
    );
    for c in list {
        println!(
            "{:<20} {:<10} {:>5} {:>7} {:>5} {:>7} {:>7}s",
            c.id,
            c.state,
            c.jobs_total,
            c.jobs_running,
            c.jobs_done,
            c.miners_per_job,
            c.time_budget_secs
        );
    }
}

fn print_miners(list: &[pb::MinerRecord]) {
    println!(
        "{:<54} {:<12} {:<28} status",
        "peer id", "owner", "endpoint"
    );
    for m in list {
        let status = if m.banned {
            format!("banned: {}", m.ban_reason)
        } else {
            "ok".into()
        };
        println!(
            "{:<54} {:<12} {:<28} {}",
            m.peer_id, m.owner, m.endpoint, status
        );
    }
}

fn print_hardware(list: &[pb::MinerHardware]) {
    if list.is_empty() {
        println!("\nno miner benchmarked yet");
        return;
    }
    println!("\nhardware (inventory as declared; TFLOPS as verified by this validator)");
    for h in list {
        println!("{}  {}", h.miner, h.addr);
        println!("    declares  {}", h.inventory);
        println!("    verified  {}", h.verified);
        println!("    price     {}", price_line(h));
        for f in &h.flags {
            println!("    FLAG      {f}");
        }
    }
}

/// Price, cost per job and quality per unit of cost, in words.
fn price_line(h: &pb::MinerHardware) -> String {
    if h.price_per_gpu_hour <= 0.0 {
        return "not priced".into();
    }
    let mut s = format!(
        "{} per device-hour x {} device{}",
        h.price_per_gpu_hour,
        h.devices,
        if h.devices == 1 { "" } else { "s" }
    );
    if h.jobs_scored > 0 {
        s += &format!(
            ": {:.4} per job, mean quality {:.3} over {} job{}, {:.3} quality per unit of cost",
            h.cost_per_job,
            h.mean_quality,
            h.jobs_scored,
            if h.jobs_scored == 1 { "" } else { "s" },
            h.quality_per_cost
        );
    } else {
        s += ", not scored in a job yet";
    }
    s
}

/// How `tunenet console miners` orders its rows (best first).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MinerSort {
    /// Quality per unit of cost (unpriced or unscored miners last).
    Value,
    /// Mean quality.
    Quality,
    /// Cost per job, cheapest first (unpriced last).
    Cost,
    /// Verified TFLOPS.
    Tflops,
    /// Peer id.
    Miner,
}

fn sort_miners(rows: &mut [pb::MinerHardware], by: MinerSort) {
    let key = |h: &pb::MinerHardware| -> f64 {
        match by {
            MinerSort::Value => h.quality_per_cost,
            MinerSort::Quality => h.mean_quality,
            MinerSort::Cost if h.cost_per_job > 0.0 => -h.cost_per_job,
            MinerSort::Cost => f64::NEG_INFINITY,
            MinerSort::Tflops => h.verified_tflops,
            MinerSort::Miner => 0.0,
        }
    };
    rows.sort_by(|a, b| {
        key(b)
            .total_cmp(&key(a))
            .then_with(|| a.miner.cmp(&b.miner))
    });
}

/// One row per benchmarked miner: devices, verified speed, price, cost, quality, value.
fn print_miner_table(rows: &[pb::MinerHardware]) {
    if rows.is_empty() {
        println!("no miner benchmarked yet");
        return;
    }
    println!(
        "{:<54} {:>7} {:>9} {:>9} {:>10} {:>5} {:>8} {:>10}",
        "miner", "devices", "TFLOPS", "price/h", "cost/job", "jobs", "quality", "value"
    );
    for h in rows {
        let priced = h.price_per_gpu_hour > 0.0;
        let scored = h.jobs_scored > 0;
        println!(
            "{:<54} {:>7} {:>9.3} {:>9} {:>10} {:>5} {:>8} {:>10}",
            h.miner,
            h.devices,
            h.verified_tflops,
            if priced {
                format!("{}", h.price_per_gpu_hour)
            } else {
                "-".into()
            },
            if priced && scored {
                format!("{:.4}", h.cost_per_job)
            } else {
                "-".into()
            },
            h.jobs_scored,
            if scored {
                format!("{:.3}", h.mean_quality)
            } else {
                "-".into()
            },
            if priced && scored {
                format!("{:.3}", h.quality_per_cost)
            } else {
                "-".into()
            },
        );
    }
}

fn print_hardware_record(h: &pb::MinerHardware) -> Result<()> {
    let r: tunenet_node::hardware::HardwareRecord = serde_json::from_str(&h.record_json)?;
    println!("miner {}  at {}", r.miner, r.addr);
    print!("{}", r.inventory.render());
    for run in &r.runs {
        println!(
            "benchmark {} n {} x{} (tile {}): {}; the validator measured {} ms, the miner reported {} ms; verification {} ms",
            run.spec.dtype,
            run.spec.n,
            run.spec.k,
            run.spec.tile,
            match &run.failure {
                None => "verified".to_string(),
                Some(f) => format!("FAILED: {f}"),
            },
            run.measured_ms,
            run.reported_ms,
            run.verify_ms
        );
        for d in &run.devices {
            println!(
                "    device {} {}: {:.3} TFLOPS {}{}",
                d.device,
                d.name,
                d.tflops,
                d.dtype,
                d.datasheet_tflops
                    .map(|p| format!(" (datasheet {p} TFLOPS, {:.1} %)", 100.0 * d.tflops / p))
                    .unwrap_or_default()
            );
        }
    }
    for f in &r.flags {
        println!("FLAG {f}");
    }
    if let Some(u) = &r.unreachable {
        println!("last attempt: {u}");
    }
    Ok(())
}

async fn change(c: &mut Client, id: String, action: &str) -> Result<()> {
    let info = c
        .change_competition(pb::StateChange {
            id,
            action: action.into(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!("competition `{}` is now {}", info.id, info.state);
    Ok(())
}

pub fn run(a: ConsoleArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: ConsoleArgs) -> Result<()> {
    let mut c = connect(&a).await?;
    let json = a.json;
    macro_rules! call {
        ($e:expr) => {
            $e.await.map_err(refused)?.into_inner()
        };
    }
    match a.cmd {
        ConsoleCmd::Whoami => {
            let w = call!(c.who_am_i(pb::Empty {}));
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": w.id, "role": w.role, "name": w.name})
                );
            } else {
                println!("token {} ({}), role {}", w.id, w.name, w.role);
            }
        }
        ConsoleCmd::Competition(cmd) => match cmd {
            CompCmd::Create { spec } => {
                let text = std::fs::read_to_string(&spec)
                    .with_context(|| format!("cannot read {}", spec.display()))?;
                let format = if spec.extension().is_some_and(|e| e == "json") {
                    "json"
                } else {
                    "toml"
                };
                let info = call!(c.create_competition(pb::CompetitionSpec {
                    format: format.into(),
                    text
                }));
                println!(
                    "created competition `{}` ({} jobs); start it with `tunenet console competition start {}`",
                    info.id, info.jobs_total, info.id
                );
            }
            CompCmd::List => {
                let l = call!(c.list_competitions(pb::Empty {}));
                if json {
                    let v: Vec<_> = l.competitions.iter().map(|c| serde_json::json!({"id": c.id, "state": c.state, "jobs_total": c.jobs_total, "jobs_done": c.jobs_done, "jobs_running": c.jobs_running})).collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_comps(&l.competitions);
                }
            }
            CompCmd::Show { id } => {
                let d = call!(c.show_competition(pb::CompetitionRef {
                    id,
                    ..Default::default()
                }));
                if json {
                    println!(
                        "{{\"config\": {}, \"jobs\": {}, \"eligibility\": {}}}",
                        d.config_json,
                        d.jobs_json,
                        if d.eligibility_json.is_empty() {
                            "[]"
                        } else {
                            &d.eligibility_json
                        }
                    );
                } else {
                    if let Some(i) = &d.info {
                        print_comps(std::slice::from_ref(i));
                    }
                    let el: serde_json::Value =
                        serde_json::from_str(&d.eligibility_json).unwrap_or_default();
                    for e in el.as_array().into_iter().flatten() {
                        println!(
                            "  miner {} {}: {}",
                            e["addr"].as_str().unwrap_or("?"),
                            if e["offered"] == true {
                                "offered"
                            } else {
                                "NOT offered"
                            },
                            e["reason"].as_str().unwrap_or("")
                        );
                    }
                    let jobs: serde_json::Value = serde_json::from_str(&d.jobs_json)?;
                    for j in jobs.as_array().into_iter().flatten() {
                        println!(
                            "\njob {}  phase {}",
                            j["plan"]["job_id"].as_str().unwrap_or("?"),
                            j["phase"]
                        );
                        for (addr, o) in j["offers"].as_object().into_iter().flatten() {
                            println!("  offer {addr}: {o}");
                        }
                        for (miner, s) in j["slots"].as_object().into_iter().flatten() {
                            println!(
                                "  {miner}: committed {}  submission {}",
                                !s["commitment"].is_null(),
                                s["submission"]
                            );
                        }
                        for s in j["scores"].as_array().into_iter().flatten() {
                            println!(
                                "  score {}: loss {} quality {} {}",
                                s["miner"], s["loss"], s["quality"], s["penalty_reason"]
                            );
                        }
                    }
                }
            }
            CompCmd::Start { id } => change(&mut c, id, "start").await?,
            CompCmd::Resume { id } => change(&mut c, id, "resume").await?,
            CompCmd::Pause { id } => change(&mut c, id, "pause").await?,
            CompCmd::Stop { id } => change(&mut c, id, "stop").await?,
            CompCmd::Archive { id } => change(&mut c, id, "archive").await?,
            CompCmd::Integrity { id, set } => {
                let v = call!(c.set_integrity(pb::IntegrityChange {
                    id,
                    settings_json: set
                }));
                println!("integrity settings of `{}` now: {}", v.id, v.settings_json);
            }
        },
        ConsoleCmd::Leaderboard { id, median } => {
            let lb = match id {
                Some(id) => call!(c.competition_leaderboard(pb::CompetitionRef {
                    id,
                    by_median: median
                })),
                None => call!(c.overall_leaderboard(pb::Empty {})),
            };
            let lb: tunenet_types::Leaderboard = lb
                .try_into()
                .map_err(|e| anyhow::anyhow!("bad leaderboard: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lb)?);
            } else {
                print!("{}", tunenet_node::validator::format_leaderboard(&lb));
            }
        }
        ConsoleCmd::Miner(cmd) => match cmd {
            MinerCmd::Register {
                peer_id,
                owner,
                endpoint,
            } => {
                let m = call!(c.register_miner(pb::MinerRegistration {
                    peer_id,
                    owner,
                    endpoint
                }));
                print_miners(&[m]);
            }
            MinerCmd::Ban { peer_id, reason } => {
                let m = call!(c.ban_miner(pb::BanRequest { peer_id, reason }));
                print_miners(&[m]);
            }
            MinerCmd::Unban { peer_id } => {
                let m = call!(c.unban_miner(pb::BanRequest {
                    peer_id,
                    reason: String::new()
                }));
                print_miners(&[m]);
            }
            MinerCmd::List => {
                let l = call!(c.list_miners(pb::Empty {}));
                if json {
                    let v: Vec<_> = l.miners.iter().map(|m| serde_json::json!({"peer_id": m.peer_id, "owner": m.owner, "endpoint": m.endpoint, "banned": m.banned, "ban_reason": m.ban_reason})).collect();
                    let h: Vec<serde_json::Value> = l
                        .hardware
                        .iter()
                        .filter_map(|h| serde_json::from_str(&h.record_json).ok())
                        .collect();
                    let out = serde_json::json!({"miners": v, "hardware": h});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    print_miners(&l.miners);
                    print_hardware(&l.hardware);
                }
            }
            MinerCmd::Show { peer_id } => {
                let l = call!(c.list_miners(pb::Empty {}));
                let Some(h) = l.hardware.iter().find(|h| h.miner == peer_id) else {
                    anyhow::bail!("this validator has benchmarked no miner `{peer_id}` (yet)");
                };
                if json {
                    println!("{}", h.record_json);
                } else {
                    print_hardware_record(h)?;
                }
            }
        },
        ConsoleCmd::Miners { sort } => {
            let mut l = call!(c.list_miners(pb::Empty {})).hardware;
            sort_miners(&mut l, sort);
            if json {
                let rows: Vec<serde_json::Value> = l
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "miner": h.miner,
                            "addr": h.addr,
                            "devices": h.devices,
                            "verified_tflops": h.verified_tflops,
                            "price_per_gpu_hour": h.price_per_gpu_hour,
                            "cost_per_job": h.cost_per_job,
                            "jobs_scored": h.jobs_scored,
                            "mean_quality": h.mean_quality,
                            "quality_per_cost": h.quality_per_cost,
                            "flags": h.flags,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_miner_table(&l);
            }
        }
        ConsoleCmd::MyJobs => {
            let j = call!(c.my_jobs(pb::Empty {}));
            println!("{}", j.jobs_json);
        }
        ConsoleCmd::Token(cmd) => match cmd {
            TokenCmd::Create {
                role,
                name,
                ttl_secs,
                miner_peer_id,
            } => {
                let t = call!(c.create_token(pb::TokenRequest {
                    role,
                    name,
                    ttl_secs,
                    miner_peer_id
                }));
                if json {
                    println!("{}", serde_json::json!({"id": t.id, "token": t.token}));
                } else {
                    println!("token {} (shown once, keep it safe):\n{}", t.id, t.token);
                }
            }
            TokenCmd::Revoke { id } => {
                call!(c.revoke_token(pb::TokenRef { id: id.clone() }));
                println!("token {id} revoked");
            }
            TokenCmd::List => {
                let l = call!(c.list_tokens(pb::Empty {}));
                println!(
                    "{:<18} {:<9} {:<20} {:<10} state",
                    "id", "role", "name", "expires"
                );
                for t in l.tokens {
                    let exp = if t.expires_at_ms == 0 {
                        "never".to_string()
                    } else {
                        format!("{}", t.expires_at_ms)
                    };
                    println!(
                        "{:<18} {:<9} {:<20} {:<10} {}",
                        t.id,
                        t.role,
                        t.name,
                        exp,
                        if t.revoked { "revoked" } else { "active" }
                    );
                }
            }
        },
        ConsoleCmd::Audit => {
            let l = call!(c.audit(pb::Empty {}));
            for e in l.entries {
                println!(
                    "{:<10} {:<28} {:<9} {:<22} {}",
                    ago(e.at_ms),
                    e.actor,
                    e.role,
                    e.action,
                    e.detail
                );
            }
        }
        ConsoleCmd::Watch { competition } => {
            let mut s = call!(c.watch(pb::WatchRequest {
                competition_id: competition
            }));
            while let Some(e) = s.message().await.map_err(refused)? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"at_ms": e.at_ms, "competition": e.competition_id, "job": e.job_id, "message": e.message})
                    );
                } else {
                    println!("[{}] {}", e.competition_id, e.message);
                }
            }
        }
        ConsoleCmd::Replay { id, scoring } => {
            let text = std::fs::read_to_string(&scoring)
                .with_context(|| format!("cannot read {}", scoring.display()))?;
            let weights: tunenet_types::ScoringWeights = toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a scoring formula: {e}", scoring.display())
            })?;
            let r = call!(c.replay(pb::ReplayRequest {
                competition_id: id,
                scoring_json: serde_json::to_string(&weights)?,
            }));
            let board = |lb: Option<tunenet_proto::v1::Leaderboard>| {
                tunenet_types::Leaderboard::try_from(lb.unwrap_or_default())
                    .map_err(|e| anyhow::anyhow!("bad leaderboard: {e}"))
            };
            let (now, replayed) = (board(r.now)?, board(r.replayed)?);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "jobs_replayed": r.jobs_replayed,
                        "scoring_now": serde_json::from_str::<serde_json::Value>(&r.scoring_now_json)?,
                        "scoring_replayed": serde_json::from_str::<serde_json::Value>(&r.scoring_replayed_json)?,
                        "now": now,
                        "replayed": replayed,
                    }))?
                );
            } else {
                println!(
                    "replay of `{}` over {} finished jobs\n  now:      {}\n  proposed: {}",
                    now.competition_id,
                    r.jobs_replayed,
                    r.scoring_now_json,
                    r.scoring_replayed_json
                );
                print!(
                    "{}",
                    tunenet_node::validator::format_replay(&now, &replayed)
                );
            }
        }
        ConsoleCmd::Receipts {
            id,
            job,
            miner,
            out,
        } => {
            let r = call!(c.receipts(pb::ReceiptRequest {
                competition_id: id.clone(),
                job_id: job,
                miner,
            }));
            let receipts: Vec<tunenet_types::EvaluationReceipt> =
                serde_json::from_str(&r.receipts_json)
                    .map_err(|e| anyhow::anyhow!("bad receipts from the validator: {e}"))?;
            if let Some(path) = &out {
                std::fs::write(path, &r.receipts_json)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if json {
                println!("{}", r.receipts_json);
            } else {
                print!(
                    "{}",
                    tunenet_node::receipts::format_receipts(&id, &receipts, r.published)
                );
                if let Some(path) = &out {
                    println!("written to {}", path.display());
                }
            }
        }
        ConsoleCmd::Dispute {
            id,
            job,
            recomputed,
            reason,
        } => {
            let text = std::fs::read_to_string(&recomputed)
                .with_context(|| format!("cannot read {}", recomputed.display()))?;
            let r = call!(c.file_dispute(pb::DisputeRequest {
                competition_id: id.clone(),
                job_id: job,
                recomputed_json: text,
                reason,
            }));
            if json {
                println!("{}", r.disputes_json);
            } else {
                let d: Vec<tunenet_node::receipts::Dispute> =
                    serde_json::from_str(&r.disputes_json)
                        .map_err(|e| anyhow::anyhow!("bad dispute from the validator: {e}"))?;
                print!(
                    "filed: {}",
                    tunenet_node::receipts::format_disputes(&id, &d)
                );
            }
        }
        ConsoleCmd::Disputes { id } => {
            let r = call!(c.disputes(pb::CompetitionRef {
                id: id.clone(),
                ..Default::default()
            }));
            if json {
                println!("{}", r.disputes_json);
            } else {
                let d: Vec<tunenet_node::receipts::Dispute> =
                    serde_json::from_str(&r.disputes_json)
                        .map_err(|e| anyhow::anyhow!("bad disputes from the validator: {e}"))?;
                print!("{}", tunenet_node::receipts::format_disputes(&id, &d));
            }
        }
        ConsoleCmd::Export { id, format } => {
            let d = call!(c.export(pb::ExportRequest {
                competition_id: id,
                format
            }));
            print!("{}", d.data);
        }
    }
    Ok(())
}
