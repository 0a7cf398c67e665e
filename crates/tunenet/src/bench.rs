//! `tunenet bench`: load figures measured from outside, against real daemon processes.
//!
//! - `offers`: offer → decision round trips per second against a miner daemon, at several
//!   concurrencies, with latency percentiles and the daemon's CPU and memory.
//! - `fanout`: a validator daemon offering jobs to many miners (every one served by this
//!   process, each on its own port): the time to reach them all, and the validator's CPU
//!   and memory.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tunenet_types::{
    BlobId, CompetitionId, Decision, DecisionReply, Identity, JobId, JobKind, Offer, PeerIdStr,
    RejectCode, RejectReason,
};

/// What to measure.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Offer → decision round trips against a miner daemon, at each concurrency.
    Offers(OffersArgs),
    /// A validator daemon offering jobs to many miners served by this process.
    Fanout(FanoutArgs),
}

/// `tunenet bench offers`.
#[derive(Args)]
pub struct OffersArgs {
    /// The miner's gRPC URL; when absent a fresh miner daemon (this binary) is started on
    /// a free port and stopped afterwards, and its CPU and memory are reported.
    #[arg(long)]
    miner: Option<String>,
    /// Requests in flight at once, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections the requests in flight share (0: one each, as from that many
    /// validators).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Also time a raw TCP ping-pong of the offer's encoded size at each level (one
    /// connection per request in flight, TCP_NODELAY): the floor any protocol pays here.
    #[arg(long)]
    reference: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// `tunenet bench fanout`.
#[derive(Args)]
pub struct FanoutArgs {
    /// Miners, one run after another.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    miners: Vec<usize>,
    /// Jobs offered to every miner, one after another.
    #[arg(long, default_value_t = 6)]
    jobs: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cmd {
        BenchCmd::Offers(a) => rt.block_on(offers(a)),
        BenchCmd::Fanout(a) => rt.block_on(fanout(a)),
    }
}

/// A daemon this bench started: killed when dropped.
struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's CPU seconds (user + system) and memory, from `/proc` (Linux).
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_secs: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Usage {
        // The kernel reports USER_HZ ticks, 100 a second on Linux.
        cpu_secs: ticks / 100.0,
        rss_mib: kib("VmRSS:")? / 1024.0,
        peak_rss_mib: kib("VmHWM:")? / 1024.0,
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// Starts this binary as a daemon with `args`; its log goes to `dir/log`.
fn spawn(dir: tempfile::TempDir, args: &[&str]) -> Result<Daemon> {
    let log = std::fs::File::create(dir.path().join("log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .env("TUNENET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the daemon")?;
    Ok(Daemon { child, _dir: dir })
}

/// An offer like a validator's, for a job no one runs, signed by `validator`.
fn offer(job: String, validator: &Identity) -> Result<Offer> {
    let mut o = Offer {
        job_id: JobId::new(job)?,
        competition_id: CompetitionId::new("bench")?,
        kind: JobKind::FineTune,
        validator: validator.peer_id(),
        base_model: BlobId::of(b"bench model"),
        base_params: 1_000_000,
        dataset_records: 100,
        time_budget_ms: 60_000,
        reward_hint: 0.0,
        hardware: String::new(),
        reply_to: "http://127.0.0.1:9".into(),
        model_config: String::new(),
        inference: None,
        validator_key: vec![],
        signature: vec![],
    };
    o.sign(validator);
    Ok(o)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn offers(a: OffersArgs) -> Result<()> {
    if a.concurrency.contains(&0) {
        bail!("--concurrency takes levels of at least 1");
    }
    let (url, daemon) = match &a.miner {
        Some(u) => (u.clone(), None),
        None => {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let conf = dir.path().join("miner.toml");
            std::fs::write(
                &conf,
                // Capacity, not the per-address limits: every request comes from here.
                format!(
                    "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n\n[limits]\nrequests_per_sec = 0.0\nconnections_per_addr = 0\n",
                    dir.path().join("data")
                ),
            )?;
            let conf = conf.to_string_lossy().to_string();
            let d = spawn(dir, &["miner", "--config", &conf])?;
            (format!("http://127.0.0.1:{port}"), Some(d))
        }
    };
    // Wait for the miner to answer.
    let start = Instant::now();
    loop {
        if let Ok(mut c) = tunenet_rpc::MinerClient::connect(&url).await
            && c.status().await.is_ok()
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the miner at {url} did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = daemon.as_ref().map(|d| d.child.id());
    let validator = Identity::generate();
    if !a.json {
        println!(
            "offer → decision round trips against {url} ({} s a level; load average {})",
            a.seconds,
            load_average()
        );
        println!(
            "| in flight | connections | offers/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | over 20 ms | accepted | rejected | errors | miner CPU (cores) | miner RSS MiB | raw TCP round trips/s | vs raw TCP | raw TCP p99 ms |"
        );
        println!(
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
    }
    for &level in &a.concurrency {
        let conns = if a.connections == 0 {
            level
        } else {
            a.connections.min(level)
        };
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(tunenet_rpc::MinerClient::connect(&url).await?);
        }
        // A short warm-up on every connection, not measured.
        for c in clients.iter_mut() {
            let _ = c
                .offer(offer(
                    format!("warm-{level}-{}", rand::random::<u64>()),
                    &validator,
                )?)
                .await;
        }
        let floor = if a.reference {
            let bytes = tunenet_proto::v1::Offer::from(offer("bench-0-0-0".into(), &validator)?)
                .encoded_len();
            Some(tcp_pingpong(level, a.seconds, bytes).await?)
        } else {
            None
        };
        let before = pid.and_then(usage);
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs_f64(a.seconds);
        let mut tasks = Vec::with_capacity(level);
        for w in 0..level {
            let mut client = clients[w % conns].clone();
            let validator = validator.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                let (mut acc, mut rej, mut err) = (0u64, 0u64, 0u64);
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    let o = match offer(format!("bench-{level}-{w}-{n}"), &validator) {
                        Ok(o) => o,
                        Err(_) => break,
                    };
                    let t = Instant::now();
                    match client.offer(o).await {
                        Ok(DecisionReply {
                            decision: Decision::Accept,
                            ..
                        }) => acc += 1,
                        Ok(_) => rej += 1,
                        Err(_) => err += 1,
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                (lat, acc, rej, err)
            }));
        }
        let mut lat = Vec::new();
        let (mut acc, mut rej, mut err) = (0u64, 0u64, 0u64);
        for t in tasks {
            let (l, x, y, z) = t.await?;
            lat.extend(l);
            acc += x;
            rej += y;
            err += z;
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = pid.and_then(usage);
        lat.sort_unstable();
        let slow = lat.iter().filter(|&&l| l > 20_000).count();
        let rate = lat.len() as f64 / secs;
        let cpu = before
            .zip(after)
            .map(|(b, a)| (a.cpu_secs - b.cpu_secs) / secs);
        let rss = after.map(|u| u.rss_mib);
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "offers", "in_flight": level, "connections": conns,
                    "offers_per_sec": rate, "p50_ms": percentile(&lat, 0.5),
                    "p90_ms": percentile(&lat, 0.9), "p99_ms": percentile(&lat, 0.99),
                    "p999_ms": percentile(&lat, 0.999),
                    "max_ms": lat.last().map(|&l| l as f64 / 1000.0),
                    "over_20ms": slow, "accepted": acc, "rejected": rej, "errors": err,
                    "miner_cpu_cores": cpu, "miner_rss_mib": rss,
                    "raw_tcp_per_sec": floor.as_ref().map(|f| f.0),
                    "raw_tcp_p99_ms": floor.as_ref().map(|f| percentile(&f.1, 0.99)),
                })
            );
        } else {
            let opt = |v: Option<f64>, d: usize| {
                v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into())
            };
            println!(
                "| {level} | {conns} | {rate:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {slow} ({:.2} %) | {acc} | {rej} | {err} | {} | {} | {} | {} | {} |",
                percentile(&lat, 0.5),
                percentile(&lat, 0.9),
                percentile(&lat, 0.99),
                percentile(&lat, 0.999),
                lat.last().map(|&l| l as f64 / 1000.0).unwrap_or(f64::NAN),
                100.0 * slow as f64 / lat.len().max(1) as f64,
                opt(cpu, 2),
                opt(rss, 1),
                opt(floor.as_ref().map(|f| f.0), 0),
                opt(floor.as_ref().map(|f| rate / f.0), 2),
                opt(floor.as_ref().map(|f| percentile(&f.1, 0.99)), 2),
            );
        }
    }
    if !a.json {
        // What the measured decisions were (a miner holding its one accepted job refuses
        // the rest as busy).
        if let Ok(mut c) = tunenet_rpc::MinerClient::connect(&url).await
            && let Ok(d) = c.offer(offer("bench-sample".into(), &validator)?).await
        {
            println!("\na sample decision: {:?}", d.decision);
        }
    }
    if let Some(u) = pid.and_then(usage)
        && !a.json
    {
        println!(
            "\nminer peak RSS {:.1} MiB, {:.1} CPU seconds in all",
            u.peak_rss_mib, u.cpu_secs
        );
    }
    drop(daemon);
    Ok(())
}

/// Round trips a second (and their latencies, µs) of a raw TCP ping-pong of `bytes` each
/// way, `level` connections each with one message in flight, for `seconds`.
async fn tcp_pingpong(level: usize, seconds: f64, bytes: usize) -> Result<(f64, Vec<u32>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; bytes];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut conns = Vec::with_capacity(level);
    for _ in 0..level {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = vec![7u8; bytes];
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    if s.write_all(&buf).await.is_err() || s.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let secs = t0.elapsed().as_secs_f64();
    server.abort();
    lat.sort_unstable();
    Ok((lat.len() as f64 / secs, lat))
}

/// A miner that answers every offer at once (turning it down as busy, so the job ends and
/// the next one is offered) and notes when each offer arrived.
struct FakeMiner {
    id: PeerIdStr,
    arrivals: Arc<Mutex<BTreeMap<String, Vec<Instant>>>>,
}

#[tonic::async_trait]
impl tunenet_rpc::MinerBackend for FakeMiner {
    async fn offer(&self, offer: Offer) -> Result<DecisionReply, tunenet_rpc::Status> {
        if let Ok(mut m) = self.arrivals.lock() {
            m.entry(offer.job_id.to_string())
                .or_default()
                .push(Instant::now());
        }
        Ok(DecisionReply::unsigned(
            offer.job_id,
            self.id.clone(),
            Decision::Reject(RejectReason {
                code: RejectCode::Busy,
                detail: "a bench miner".into(),
            }),
        ))
    }
    async fn assign(&self, _a: tunenet_types::Assignment) -> Result<(), tunenet_rpc::Status> {
        Err(tunenet_rpc::Status::failed_precondition(
            "a bench miner takes no assignments",
        ))
    }
    async fn status(&self) -> Result<tunenet_proto::v1::MinerStatus, tunenet_rpc::Status> {
        Ok(tunenet_proto::v1::MinerStatus {
            miner: self.id.0.clone(),
            ..Default::default()
        })
    }
}

/// Writes the tiny model and a small dataset for the bench competition.
fn competition_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let model = dir.join("model");
    tunenet_ml::init_tiny(&model, 7)?;
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        tunenet_ml::to_jsonl(&tunenet_ml::demo_dataset(200, 11)),
    )?;
    Ok((model, data))
}

async fn fanout(a: FanoutArgs) -> Result<()> {
    if a.jobs == 0 || a.miners.contains(&0) {
        bail!("--jobs and --miners take at least 1");
    }
    if !a.json {
        println!(
            "a validator daemon offering {} jobs, one after another, to miners served by this process (load average {})",
            a.jobs,
            load_average()
        );
        println!(
            "| miners | offers answered | fan-out p50 ms | fan-out max ms | offers/s | validator CPU s per job | validator RSS MiB after | validator peak RSS MiB |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for &n in &a.miners {
        let arrivals: Arc<Mutex<BTreeMap<String, Vec<Instant>>>> = Default::default();
        let mut servers = Vec::with_capacity(n);
        let mut urls = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(format!("http://{}", listener.local_addr()?));
            let backend = Arc::new(FakeMiner {
                id: Identity::generate().peer_id(),
                arrivals: arrivals.clone(),
            });
            servers.push(tunenet_node::base::Server::spawn(
                tonic::transport::Server::builder().add_service(tunenet_rpc::miner_server(backend)),
                listener,
                &tunenet_node::limits::Limits::none(),
            ));
        }
        let dir = tempfile::tempdir()?;
        let (model, data) = competition_files(dir.path())?;
        let port = free_port()?;
        let conf = dir.path().join("validator.toml");
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nminers = [{}]\n\n[[competitions]]\nid = \"fanout\"\nbase_model = {:?}\ndataset = {:?}\njobs = {}\nminers_per_job = 1\nmin_miners = 1\ntime_budget_secs = 60\ntest_fraction = 0.2\nseed = 1\noffer_timeout_secs = 60\n",
                dir.path().join("data"),
                urls.iter()
                    .map(|u| format!("{u:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                model,
                data,
                a.jobs,
            ),
        )?;
        let conf = conf.to_string_lossy().to_string();
        let init = Command::new(std::env::current_exe()?)
            .args(["validator", "--config", &conf, "init"])
            .output()?;
        if !init.status.success() {
            bail!(
                "validator init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        let log = dir.path().join("log").to_string_lossy().to_string();
        let d = spawn(dir, &["validator", "--config", &conf])?;
        let pid = d.child.id();
        let started = Instant::now();
        // The validator's usage is counted from the first offer on (not its start-up).
        let mut before = None;
        // Every job is offered to every miner.
        let limit = Duration::from_secs(120 + 2 * a.jobs as u64 * (1 + n as u64 / 100));
        loop {
            let done = arrivals
                .lock()
                .map(|m| m.len() >= a.jobs && m.values().all(|v| v.len() >= n))
                .unwrap_or(false);
            if done {
                break;
            }
            if before.is_none() && arrivals.lock().map(|m| !m.is_empty()).unwrap_or(false) {
                before = usage(pid);
            }
            if started.elapsed() > limit {
                let got: usize = arrivals
                    .lock()
                    .map(|m| m.values().map(Vec::len).sum())
                    .unwrap_or(0);
                bail!(
                    "{n} miners: only {got} of {} offers arrived within {} s (validator log: {log})",
                    n * a.jobs,
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the last job's answers be taken in before reading the validator's usage.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = usage(pid);
        let spans: Vec<f64> = arrivals
            .lock()
            .map(|m| {
                m.values()
                    .map(|v| {
                        let first = v.iter().min().copied().unwrap_or_else(Instant::now);
                        let last = v.iter().max().copied().unwrap_or(first);
                        (last - first).as_secs_f64() * 1000.0
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut sorted = spans.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = sorted[sorted.len() / 2];
        let max = sorted.last().copied().unwrap_or(f64::NAN);
        let answered: usize = arrivals
            .lock()
            .map(|m| m.values().map(Vec::len).sum())
            .unwrap_or(0);
        let rate = n as f64 / (p50 / 1000.0).max(1e-9);
        let cpu = before
            .zip(after)
            .map(|(b, a2)| (a2.cpu_secs - b.cpu_secs) / a.jobs as f64);
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "fanout", "miners": n, "jobs": a.jobs, "offers_answered": answered,
                    "fanout_p50_ms": p50, "fanout_max_ms": max, "offers_per_sec": rate,
                    "validator_cpu_secs_per_job": cpu,
                    "validator_rss_mib": after.map(|u| u.rss_mib),
                    "validator_peak_rss_mib": after.map(|u| u.peak_rss_mib),
                })
            );
        } else {
            let opt = |v: Option<f64>, d: usize| {
                v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into())
            };
            println!(
                "| {n} | {answered} | {p50:.1} | {max:.1} | {rate:.0} | {} | {} | {} |",
                opt(cpu, 3),
                opt(after.map(|u| u.rss_mib), 1),
                opt(after.map(|u| u.peak_rss_mib), 1),
            );
        }
        drop(d);
        for s in servers {
            s.stop().await;
        }
    }
    Ok(())
}
