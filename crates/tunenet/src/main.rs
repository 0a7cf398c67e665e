//! `tunenet`: one binary for every role. Subcommands parse flags, load configs and call
//! into tunenet-node; `anyhow` lives only here, at the edge.

mod bench;
mod cli_model;
mod console;
mod demo;
mod hardware;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tunenet_node::config::{self, MinerConfig, ValidatorConfig};

#[derive(Parser)]
#[command(
    name = "tunenet",
    version,
    about = "Peer-to-peer fine-tuning competitions: validators, miners and their console"
)]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `tunenet_node=debug`.
    #[arg(long, env = "TUNENET_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum ValidatorAction {
    /// Create the data dir, the node key and the first admin token (printed once).
    Init,
    /// Back up the validator's records (stop it first; copy `blobs/` alongside).
    Snapshot {
        /// The snapshot file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore records from a snapshot into an empty data dir.
    Restore {
        /// The snapshot file.
        #[arg(long)]
        from: PathBuf,
        /// Overwrite records already in the data dir.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a miner daemon.
    Miner {
        /// The miner's TOML config.
        #[arg(long, env = "TUNENET_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long, env = "TUNENET_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides `listen`.
        #[arg(long, env = "TUNENET_LISTEN")]
        listen: Option<String>,
    },
    /// Run a validator daemon.
    Validator {
        /// The validator's TOML config.
        #[arg(long, env = "TUNENET_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long, env = "TUNENET_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides `listen`.
        #[arg(long, env = "TUNENET_LISTEN")]
        listen: Option<String>,
        /// Exit once every competition is finished.
        #[arg(long)]
        exit_when_done: bool,
        /// `init`: create the data dir, the key and the first admin token, then exit.
        #[command(subcommand)]
        action: Option<ValidatorAction>,
    },
    /// The admin console: competitions, miners, leaderboards, tokens, audit, live feed.
    Console(console::ConsoleArgs),
    /// Print a validator's leaderboard.
    Leaderboard {
        /// The validator's gRPC URL.
        #[arg(
            long,
            env = "TUNENET_VALIDATOR",
            default_value = "http://127.0.0.1:7100"
        )]
        validator: String,
        /// Competition id (default: the validator's first).
        #[arg(long, default_value = "")]
        competition: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a miner's status.
    Status {
        /// The miner's gRPC URL.
        #[arg(long, env = "TUNENET_MINER", default_value = "http://127.0.0.1:7101")]
        miner: String,
    },
    /// Write a new ed25519 identity key (also the node's libp2p identity).
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        cmd: cli_model::ModelCmd,
    },
    /// Dataset tools.
    Dataset {
        #[command(subcommand)]
        cmd: cli_model::DatasetCmd,
    },
    /// Fine-tune a model standalone, to try settings offline.
    Train(cli_model::TrainArgs),
    /// Evaluate a model (optionally with an artifact) on a dataset.
    Eval(cli_model::EvalArgs),
    /// Check a validator's signed evaluation receipt: its signature, its per-record losses
    /// against the signed Merkle root, and those losses recomputed from the artifact, the
    /// base model and the sets published when the competition finished.
    VerifyReceipt(cli_model::VerifyReceiptArgs),
    /// Join the p2p network briefly and list the peers seen, with their miner adverts.
    Peers {
        /// Peers to join through, each ending in /p2p/<peer id> (repeatable).
        #[arg(long)]
        bootstrap: Vec<String>,
        /// Also look for peers on the LAN with mDNS.
        #[arg(long)]
        mdns: bool,
        /// How long to listen before printing.
        #[arg(long, default_value_t = 5)]
        wait_secs: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run cheating and honest miners through real competitions; write the report. By
    /// default over the wire: a validator daemon and honest miner daemons as separate
    /// processes, and adversary miners that speak only the gRPC protocol.
    Redteam {
        /// Competitions to run.
        #[arg(long, default_value_t = 20)]
        competitions: usize,
        /// Where to write the Markdown report.
        #[arg(long, default_value = "docs/INTEGRITY.md")]
        out: PathBuf,
        /// Training time per job, seconds (over the wire).
        #[arg(long, default_value_t = 45)]
        budget: u64,
        /// Field only these strategies (comma-separated names as in the report's Debug
        /// form, e.g. `ModelSoup,OtherData`); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Keep the daemons' data and logs here instead of a temporary directory.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// The competitions' dataset: `demo` (generated; synthetic sets drawn by the same
        /// generator) or `instruct` (the shipped real chat records; synthetic sets of the
        /// test records' neighbours, written by the base model).
        #[arg(long, default_value = "demo", value_parser = ["demo", "instruct"])]
        dataset: String,
        /// The old in-process run through the engine (fast; not evidence of what holds
        /// against a miner on the wire).
        #[arg(long)]
        in_process: bool,
    },
    /// Run a whole competition on this machine: one validator and three miners.
    Demo(demo::DemoArgs),
    /// Kill daemons at random and check what must survive: a competition on the tiny
    /// model with a validator and 3-4 miner daemons, a seeded random daemon SIGKILLed at a
    /// job phase (offer, training, commit, upload, evaluation, scoring) and restarted, N
    /// times; then the invariants, each PASS or FAIL. Exits non-zero if any fails.
    Chaos {
        /// Fixes the targets, the phases aimed at, and the timings' jitter.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// SIGKILLs to make.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Miner daemons (3 or 4).
        #[arg(long, default_value_t = 3)]
        miners: usize,
        /// Training time per job, seconds.
        #[arg(long, default_value_t = 6)]
        budget: u64,
        /// Jobs in the competition (default: kills + 2).
        #[arg(long)]
        jobs: Option<u32>,
        /// Keep the daemons' data and logs here (an empty or new directory) instead of a
        /// temporary one.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Run the miners' clocks this many milliseconds from the validator's: ahead for
        /// even miners, behind for odd ones. With --kills 0, every submission must then be
        /// scored.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        clock_skew_ms: i64,
    },
    /// Load figures against real daemon processes: a miner's offer round trips, a
    /// validator's fan-out to many miners.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// What this box has: CPU, memory and NVIDIA GPUs (through the driver's NVML); with
    /// `--benchmark N`, also a verified matrix-multiply benchmark run locally.
    Hardware(hardware::HardwareArgs),
}

/// Writes a Markdown report (making its folder) and prints it.
fn write_report(out: &std::path::Path, md: &str) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, md).with_context(|| format!("cannot write {}", out.display()))?;
    print!("{md}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    // Training and scoring reuse their freed tensors' pages (crates/ml/src/alloc.rs).
    tunenet_ml::alloc::keep_freed_memory();
    // candle's element-wise operations stay on their calling threads: its own spinning
    // pool beside rayon's took the cores the products run on (crates/ml/src/threads.rs).
    tunenet_ml::threads::one_tensor_pool();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: daemons' logs go to files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The config file at `path`, or the built-in defaults when no file is given.
fn load_or_default<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T> {
    Ok(match path {
        Some(p) => config::load(p)?,
        None => T::default(),
    })
}

fn override_opt<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Miner {
            config: path,
            data_dir,
            listen,
        } => {
            let mut cfg: MinerConfig = load_or_default(path.as_deref())?;
            override_opt(&mut cfg.data_dir, data_dir);
            override_opt(&mut cfg.listen, listen);
            runtime()?.block_on(tunenet_node::miner::run(cfg))?;
        }
        Cmd::Validator {
            config: path,
            data_dir,
            listen,
            exit_when_done,
            action,
        } => {
            let mut cfg: ValidatorConfig = load_or_default(path.as_deref())?;
            override_opt(&mut cfg.data_dir, data_dir);
            override_opt(&mut cfg.listen, listen);
            if let Some(ValidatorAction::Snapshot { out }) = &action {
                let store = tunenet_store::SledStore::open(&cfg.data_dir.join("db"))?;
                let n = tunenet_node::snapshot::snapshot(&store, out)?;
                println!(
                    "wrote {n} records to {}; copy {} alongside it",
                    out.display(),
                    cfg.data_dir.join("blobs").display()
                );
                return Ok(());
            }
            if let Some(ValidatorAction::Restore { from, force }) = &action {
                std::fs::create_dir_all(&cfg.data_dir)?;
                let store = tunenet_store::SledStore::open(&cfg.data_dir.join("db"))?;
                let n = tunenet_node::snapshot::restore(&store, from, *force)?;
                println!("restored {n} records into {}", cfg.data_dir.display());
                return Ok(());
            }
            if let Some(ValidatorAction::Init) = action {
                match tunenet_node::validator::init(&cfg)? {
                    Some(token) => {
                        println!("first admin token (shown once, keep it safe):\n{token}")
                    }
                    None => println!(
                        "{} already has an admin token; issue more with `tunenet console token create`",
                        cfg.data_dir.display()
                    ),
                }
                return Ok(());
            }
            let opts = tunenet_node::validator::ValidatorOptions { exit_when_done };
            runtime()?.block_on(tunenet_node::validator::run(cfg, opts))?;
        }
        Cmd::Leaderboard {
            validator,
            competition,
            json,
        } => {
            let lb = runtime()?.block_on(async {
                let mut c = tunenet_rpc::ValidatorClient::connect(&validator).await?;
                c.leaderboard(&competition).await
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lb)?);
            } else {
                print!("{}", tunenet_node::validator::format_leaderboard(&lb));
            }
        }
        Cmd::Status { miner } => {
            let s = runtime()?.block_on(async {
                let mut c = tunenet_rpc::MinerClient::connect(&miner).await?;
                c.status().await
            })?;
            println!(
                "miner {}  running {}/{}{}",
                s.miner,
                s.running,
                s.max_concurrent,
                if s.paused { "  (paused)" } else { "" }
            );
            for j in s.jobs {
                let on = if j.device.is_empty() {
                    String::new()
                } else {
                    format!("on {}  ", j.device)
                };
                println!(
                    "  {:<20} {:<11} {on}step {:>5}  loss {:>8.4}  {}",
                    j.job_id, j.phase, j.step, j.loss, j.detail
                );
            }
        }
        Cmd::Keygen { out } => {
            let id = tunenet_node::keys::generate(&out)?;
            println!("{}", id.peer_id());
        }
        Cmd::Console(a) => console::run(a)?,
        Cmd::Peers {
            bootstrap,
            mdns,
            wait_secs,
            json,
        } => peers(bootstrap, mdns, wait_secs, json)?,
        Cmd::Redteam {
            competitions,
            out,
            budget,
            only,
            work_dir,
            dataset,
            in_process: false,
        } => {
            let tmp = tempfile::Builder::new()
                .prefix("tunenet-redteam-")
                .tempdir()?;
            let work = work_dir.unwrap_or_else(|| tmp.path().to_path_buf());
            let cheats: Vec<tunenet_node::wire_redteam::Cheat> = if only.is_empty() {
                tunenet_node::wire_redteam::Cheat::ALL.to_vec()
            } else {
                let mut v = Vec::new();
                for name in &only {
                    match tunenet_node::wire_redteam::Cheat::ALL
                        .iter()
                        .find(|c| format!("{c:?}").eq_ignore_ascii_case(name.trim()))
                    {
                        Some(c) => v.push(*c),
                        None => anyhow::bail!(
                            "--only: no strategy `{name}`; the strategies are {:?}",
                            tunenet_node::wire_redteam::Cheat::ALL
                        ),
                    }
                }
                v
            };
            let opts = tunenet_node::wire_redteam::WireOptions {
                exe: std::env::current_exe().context("cannot find the tunenet binary")?,
                competitions,
                work,
                budget_secs: budget,
                cheats,
                first: 0,
                data: if dataset == "instruct" {
                    tunenet_node::wire_redteam::WireData::Instruct
                } else {
                    tunenet_node::wire_redteam::WireData::Demo
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(tunenet_node::wire_redteam::run(&opts, &mut |line| {
                eprintln!("{line}")
            }))?;
            let mut command =
                format!("tunenet redteam --competitions {competitions} --budget {budget}");
            if dataset != "demo" {
                command.push_str(&format!(" --dataset {dataset}"));
            }
            if !only.is_empty() {
                command.push_str(&format!(" --only {}", only.join(",")));
            }
            write_report(
                &out,
                &tunenet_node::wire_redteam::markdown(&report, &command),
            )?;
            let missed = report.catches.iter().filter(|c| !c.caught).count();
            eprintln!(
                "{} cheaters caught for the expected reason of {}, {} honest submissions failed; report in {}",
                report.catches.len() - missed,
                report.catches.len(),
                report.false_positives.len(),
                out.display()
            );
        }
        Cmd::Redteam {
            competitions, out, ..
        } => {
            let work = tempfile::Builder::new()
                .prefix("tunenet-redteam-")
                .tempdir()?;
            let report = tunenet_node::redteam::run(competitions, work.path(), &mut |line| {
                eprintln!("{line}")
            })?;
            write_report(&out, &tunenet_node::redteam::markdown(&report))?;
            let missed = report.catches.iter().filter(|c| !c.caught).count();
            eprintln!(
                "{} cheaters caught of {}, {} false positives; report in {}",
                report.catches.len() - missed,
                report.catches.len(),
                report.false_positives.len(),
                out.display()
            );
        }
        Cmd::Model { cmd } => cli_model::model(cmd)?,
        Cmd::Dataset { cmd } => cli_model::dataset(cmd)?,
        Cmd::Train(a) => cli_model::train(a)?,
        Cmd::Eval(a) => cli_model::eval(a)?,
        Cmd::VerifyReceipt(a) => cli_model::verify_receipt(a)?,
        Cmd::Demo(a) => demo::run(a)?,
        Cmd::Chaos {
            seed,
            kills,
            miners,
            budget,
            jobs,
            work_dir,
            clock_skew_ms,
        } => {
            let tmp = tempfile::Builder::new()
                .prefix("tunenet-chaos-")
                .tempdir()?;
            let opts = tunenet_node::chaos::ChaosOptions {
                exe: std::env::current_exe().context("cannot find the tunenet binary")?,
                seed,
                kills,
                miners,
                budget_secs: budget,
                jobs,
                work: work_dir.unwrap_or_else(|| tmp.path().join("run")),
                clock_skew_ms,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(tunenet_node::chaos::run(&opts, &mut |line| {
                eprintln!("{line}")
            }))?;
            print!("{}", report.text());
            if !report.passed() {
                // The data and logs are kept for the post-mortem.
                let _ = tmp.keep();
                anyhow::bail!(
                    "chaos run: an invariant does not hold (seed {seed}); the data and logs are in {}",
                    opts.work.display()
                );
            }
        }
        Cmd::Bench(b) => bench::run(b)?,
        Cmd::Hardware(a) => hardware::run(a)?,
    }
    Ok(())
}

fn peers(bootstrap: Vec<String>, mdns: bool, wait_secs: u64, json: bool) -> Result<()> {
    let mut cfg = tunenet_p2p::P2pConfig::loopback();
    cfg.listen = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
    cfg.mdns = mdns;
    for b in &bootstrap {
        cfg.bootstrap.push(b.parse().with_context(|| {
            format!("`{b}` is not a multiaddr (e.g. /ip4/1.2.3.4/tcp/7200/p2p/12D3KooW...)")
        })?);
    }
    if cfg.bootstrap.is_empty() && !mdns {
        anyhow::bail!(
            "give --bootstrap <multiaddr> or --mdns: with neither there is nobody to meet"
        );
    }
    let tmp = tempfile::tempdir()?;
    let blobs = tunenet_store::BlobStore::open(tmp.path())?;
    let id = tunenet_types::Identity::generate();
    let list = runtime()?.block_on(async move {
        let (client, mut events, event_loop) = tunenet_p2p::new(id.keypair(), cfg, blobs)?;
        tokio::spawn(event_loop.run());
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        tokio::time::sleep(std::time::Duration::from_secs(wait_secs)).await;
        client.peers().await
    })?;
    if json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|p| {
                serde_json::json!({
                    "peer_id": p.peer_id.to_base58(),
                    "connected": p.connected,
                    "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "advert": p.advert.as_ref().map(|a| serde_json::json!({
                        "hardware": a.hardware,
                        "max_model_params": a.max_model_params,
                        "policy": a.policy,
                        "price_hint": a.price_hint,
                        "timestamp_ms": a.timestamp_ms,
                        "inventory": a.inventory.as_ref().map(|i| serde_json::json!({
                            "cpu_model": i.cpu_model,
                            "cpu_cores": i.cpu_cores,
                            "memory_total_bytes": i.memory_total_bytes,
                            "gpus": i.gpus.iter().map(|g| serde_json::json!({
                                "name": g.name,
                                "uuid": g.uuid,
                                "memory_total_bytes": g.memory_total_bytes,
                            })).collect::<Vec<_>>(),
                            "nvml_error": i.nvml_error,
                        })),
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<54} {:<9} advert", "peer", "connected");
        for p in &list {
            let advert = p
                .advert
                .as_ref()
                .map(|a| {
                    format!(
                        "miner on {}: {} (max {} params)",
                        a.hardware, a.policy, a.max_model_params
                    )
                })
                .unwrap_or_else(|| "-".into());
            println!("{:<54} {:<9} {advert}", p.peer_id.to_base58(), p.connected);
        }
    }
    Ok(())
}
