//! `tunenet demo`: a whole competition on one machine. It writes a tiny model and a
//! dataset, starts one validator and three differently-tuned miners as real daemons (this
//! very binary, as child processes on loopback ports), shows progress, and prints the
//! leaderboard.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Keep everything here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training time per job, seconds.
    #[arg(long, default_value_t = 20)]
    budget: u64,
    /// Jobs in the competition.
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Base model: `tiny` (generated), `smollm2` (imported from the GGUF that
    /// scripts/fetch-smollm2.sh fetches), or a model directory in Hugging Face layout.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Dataset: `demo` (generated instruction records; synthetic sets from the same
    /// generator), `instruct` (the 320 original chat records shipped with tunenet), or a
    /// JSONL, JSON, CSV or Parquet file. Real datasets get synthetic sets rewritten by the
    /// base model, with its chat template.
    #[arg(long, default_value = "demo")]
    dataset: String,
    /// How jobs, blobs and artifacts travel: `grpc` (the validator lists its miners'
    /// endpoints) or `p2p` (libp2p alone: miners join through the validator's address,
    /// the validator finds them by their adverts, blobs move between peers).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "p2p"])]
    transport: String,
    /// Run an inference competition instead: HellaSwag-layout items scored as fast as
    /// possible (miners run q8_0, q4_0 and dense weights), timed and checked by the
    /// validator against its reference model.
    #[arg(long)]
    inference: bool,
}

/// Finds the SmolLM2 GGUF: `TUNENET_SMOLLM2_GGUF`, or the fetch script's cache.
fn smollm2_gguf() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("TUNENET_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let mut stack = vec![PathBuf::from(home).join(".cache/tunenet/smollm2/unpacked")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "gguf") {
                return Ok(p);
            }
        }
    }
    bail!("SmolLM2 is not fetched yet: run scripts/fetch-smollm2.sh (or set TUNENET_SMOLLM2_GGUF)")
}

/// The three miners: different methods, ranks, learning rates and step counts.
const MINERS: [(&str, &str); 3] = [
    (
        "lora-r4-slow",
        "method = \"lora\"\nlora_rank = 4\nlora_alpha = 8.0\nlearning_rate = 0.0005\nmax_steps = 30\n",
    ),
    (
        "lora-r16",
        "method = \"lora\"\nlora_rank = 16\nlora_alpha = 32.0\nlearning_rate = 0.003\nmax_steps = 400\n",
    ),
    (
        "full-ft",
        "method = \"full\"\nlearning_rate = 0.002\nmax_steps = 400\n",
    ),
];

struct Daemons {
    children: Vec<(String, Child, PathBuf)>,
}

impl Daemons {
    fn check_alive(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&*log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{name} exited early ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            #[cfg(unix)]
            {
                // SIGTERM first so the daemons flush their stores.
                let _ = Command::new("kill").arg(child.id().to_string()).status();
            }
        }
        let until = Instant::now() + Duration::from_secs(5);
        for (_, child, _) in &mut self.children {
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn spawn(name: &str, args: &[&str], log: &Path, threads: Option<usize>) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the tunenet binary")?;
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null());
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    cmd.spawn().with_context(|| format!("cannot start {name}"))
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let _tmp;
    let root = match &a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            _tmp = tempfile::Builder::new().prefix("tunenet-demo-").tempdir()?;
            _tmp.path().to_path_buf()
        }
    };
    println!("tunenet demo: data in {}", root.display());
    let (model, real) = match a.model.as_str() {
        "tiny" => {
            let dir = root.join("base-model");
            tunenet_ml::init_tiny(&dir, 7)?;
            (dir, false)
        }
        "smollm2" => {
            let dir = root.join("base-model");
            if !dir.join("config.json").exists() {
                let gguf = smollm2_gguf()?;
                println!("  importing {}", gguf.display());
                tunenet_ml::import_gguf(&gguf, &dir)?;
            }
            (dir, true)
        }
        path => (PathBuf::from(path), true),
    };
    let cfg = tunenet_ml::ModelDir::open(&model)?.config()?;
    // A real model trains and evaluates far slower on a CPU: fewer, shorter records, small
    // batches and a longer budget keep the same competition within minutes.
    let (records, batch, seq, budget) = if real {
        (300, 2, 64, a.budget.max(90))
    } else {
        (1500, 8, 96, a.budget)
    };
    // Chat records with a template run longer than the generated ones.
    let seq = match (a.dataset.as_str(), real) {
        ("demo", _) => seq,
        (_, true) => 160,
        (_, false) => 256,
    };
    let margin = if real { 10.0 } else { 2.0 };
    let mut dataset = root.join("dataset.jsonl");
    let generated = a.dataset == "demo";
    if a.inference && !generated {
        bail!(
            "--dataset applies to fine-tuning competitions; an inference demo makes its own items"
        );
    }
    if a.dataset == "instruct" {
        std::fs::write(&dataset, tunenet_ml::SHIPPED_INSTRUCT_JSONL)?;
    } else if !generated {
        dataset = std::fs::canonicalize(&a.dataset)
            .with_context(|| format!("--dataset {}: no such file", a.dataset))?;
    } else if a.inference {
        let mut bytes = Vec::new();
        for it in tunenet_ml::hellaswag_demo_items(if real { 200 } else { 400 }, 11) {
            bytes.extend(serde_json::to_vec(&it)?);
            bytes.push(b'\n');
        }
        std::fs::write(&dataset, bytes)?;
    } else {
        std::fs::write(
            &dataset,
            tunenet_ml::to_jsonl(&tunenet_ml::demo_dataset(records, 11)),
        )?;
    }
    println!(
        "  base model: {} ({} parameters); dataset: {}; {budget} s per job",
        model.display(),
        cfg.param_count(),
        if a.inference {
            "HellaSwag-layout items, one shard per job (an inference speed competition)".to_string()
        } else if generated {
            format!("{records} instruction records")
        } else {
            format!(
                "{} (synthetic sets rewritten by the base model)",
                dataset.display()
            )
        }
    );
    let vport = free_port()?;
    let wport = free_port()?;
    let vdir = root.join("validator");
    std::fs::create_dir_all(&vdir)?;
    let p2p = a.transport == "p2p";
    // Over p2p the miners know nothing but the validator's libp2p address.
    let (validator_p2p, bootstrap) = if p2p {
        let key = tunenet_node::keys::load_or_create(&vdir.join("data").join("identity.key"))?;
        let port = free_port()?;
        let peer = key.peer_id();
        (
            format!(
                "\n[p2p]\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\nmdns = false\nadvert_interval_secs = 2\n"
            ),
            format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"),
        )
    } else {
        (String::new(), String::new())
    };
    let miner_p2p = if p2p {
        format!(
            "\n[p2p]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nbootstrap = [{bootstrap:?}]\nmdns = false\nadvert_interval_secs = 2\n"
        )
    } else {
        String::new()
    };
    let mut miner_urls = Vec::new();
    let mut daemons = Daemons {
        children: Vec::new(),
    };
    let threads = (std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        / 2)
    .max(1);
    for (i, (name, training)) in MINERS.into_iter().enumerate() {
        // For an inference competition: two quantisations and the dense weights.
        let inference = if a.inference {
            format!(
                "\n[inference]\nquantize = {:?}\n",
                ["q8_0", "none", "q4_0"][i % 3]
            )
        } else {
            String::new()
        };
        let name = if a.inference {
            ["miner-q8_0", "miner-dense", "miner-q4_0"][i % 3]
        } else {
            name
        };
        let kinds = if a.inference {
            "kinds = [\"fine_tune\", \"inference\"]\n"
        } else {
            ""
        };
        // A pretrained model wants a far smaller learning rate for full fine-tuning.
        let training = if real {
            training.replace("learning_rate = 0.002", "learning_rate = 0.00002")
        } else {
            training.to_string()
        };
        let port = free_port()?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("miner.toml");
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n\n[policy]\nmax_concurrent_jobs = 1\n{kinds}\n[training]\n{training}batch_size = {batch}\nmax_seq_len = {seq}\ncommit_margin_secs = {margin}\n{inference}{miner_p2p}",
                dir.join("data")
            ),
        )?;
        let log = dir.join("miner.log");
        let child = spawn(
            name,
            &["miner", "--config", conf.to_str().unwrap_or_default()],
            &log,
            Some(threads),
        )?;
        daemons.children.push((name.to_string(), child, log));
        miner_urls.push((name, format!("http://127.0.0.1:{port}")));
    }
    let vconf = vdir.join("validator.toml");
    let miners: Vec<String> = if p2p {
        vec![]
    } else {
        miner_urls.iter().map(|(_, u)| format!("{u:?}")).collect()
    };
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\nminers = [{}]\n\n[web]\nlisten = \"127.0.0.1:{wport}\"\n\n[[competitions]]\nid = \"demo\"\nkind = \"{kind}\"\nbase_model = {:?}\ndataset = {:?}\njobs = {}\nminers_per_job = 3\nmin_miners = 3\ntime_budget_secs = {}\ntest_fraction = {test_fraction}\nseed = 1\nreveal_window_secs = {reveal}\noffer_timeout_secs = 10\neval_max_seq_len = {seq}\nmax_artifact_mb = 4096\n{synthetic}{validator_p2p}",
            vdir.join("data"),
            miners.join(", "),
            model,
            dataset,
            a.jobs,
            budget,
            test_fraction = if real { 0.1 } else { 0.15 },
            kind = if a.inference {
                "inference"
            } else {
                "fine_tune"
            },
            reveal = if real { 300 } else { 30 },
            seq = seq,
            synthetic = if a.inference {
                ""
            } else if generated {
                "synthetic_generator = \"demo\"\n"
            } else if real {
                // A real model writes each record token by token on the CPU: fewer of them.
                "synthetic_generator = \"rewrite\"\nsynthetic_records = 16\n"
            } else {
                "synthetic_generator = \"neighbours\"\n"
            },
        ),
    )?;
    let vlog = vdir.join("validator.log");
    let child = spawn(
        "validator",
        &["validator", "--config", vconf.to_str().unwrap_or_default()],
        &vlog,
        None,
    )?;
    daemons.children.push(("validator".into(), child, vlog));
    if p2p {
        println!(
            "  over libp2p: the miners join through {bootstrap} and the validator finds them by their adverts"
        );
    }
    println!(
        "  validator on 127.0.0.1:{vport}; public site on http://127.0.0.1:{wport}/ while it runs; miners (status endpoints):"
    );
    for (name, url) in &miner_urls {
        println!("    {name:<14} {url}");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let vurl = format!("http://127.0.0.1:{vport}");
    let limit = Duration::from_secs(60 + a.jobs as u64 * (budget + if real { 600 } else { 60 }));
    let mut last_line = String::new();
    let mut names = std::collections::BTreeMap::new();
    let lb = loop {
        std::thread::sleep(Duration::from_millis(1000));
        daemons.check_alive()?;
        if t0.elapsed() > limit {
            bail!(
                "the demo did not finish within {} s; see the logs in {}",
                limit.as_secs(),
                root.display()
            );
        }
        let (lb, statuses) = rt.block_on(async {
            let lb = match tunenet_rpc::ValidatorClient::connect(&vurl).await {
                Ok(mut c) => c.leaderboard("demo").await.ok(),
                Err(_) => None,
            };
            let mut st = Vec::new();
            for (name, url) in &miner_urls {
                if let Ok(mut c) = tunenet_rpc::MinerClient::connect(url).await
                    && let Ok(s) = c.status().await
                {
                    st.push((*name, s));
                }
            }
            (lb, st)
        });
        let mut parts = Vec::new();
        for (name, s) in &statuses {
            names.insert(s.miner.clone(), *name);
            let job = s
                .jobs
                .iter()
                .rev()
                .find(|j| !matches!(j.phase.as_str(), "uploaded" | "failed"));
            parts.push(match job {
                Some(j) if j.phase == "training" => {
                    format!("{name}: {} step {} loss {:.3}", j.job_id, j.step, j.loss)
                }
                Some(j) => format!("{name}: {} {}", j.job_id, j.phase),
                None => format!("{name}: idle"),
            });
        }
        if let Some(lb) = &lb {
            let line = format!(
                "[{:>5.1}s] jobs {}/{} | {}",
                t0.elapsed().as_secs_f64(),
                lb.jobs_done,
                lb.jobs_total,
                parts.join(" | ")
            );
            if line[9..] != last_line.get(9..).unwrap_or_default()[..] {
                println!("{line}");
                last_line = line;
            }
            if lb.jobs_done == lb.jobs_total && lb.jobs_total > 0 {
                break lb.clone();
            }
        }
    };
    println!();
    println!(
        "leaderboard of competition `demo` ({} jobs, {:.0} s):",
        lb.jobs_total,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "{:>4}  {:<14} {:<54} {:>10} {:>9} {:>9}",
        "rank",
        "miner",
        "peer id",
        if a.inference { "items/s" } else { "loss" },
        "quality",
        "standing"
    );
    for r in &lb.rows {
        // An inference result's scored loss is ln(seconds per item), timed by the validator.
        let figure = r
            .mean_loss
            .map(|l| if a.inference { (-l).exp() } else { l });
        println!(
            "{:>4}  {:<14} {:<54} {:>10} {:>9.4} {:>9.4}",
            r.rank,
            names.get(&r.miner.0).copied().unwrap_or("?"),
            r.miner.0,
            figure
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            r.mean_quality,
            r.standing
        );
    }
    for r in lb.rows.iter().filter(|r| !r.verdicts.is_empty()) {
        println!(
            "  {}: {}",
            names.get(&r.miner.0).copied().unwrap_or("?"),
            r.verdicts.join(", ")
        );
    }
    if a.inference {
        let acc: Vec<String> = lb
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    names.get(&r.miner.0).copied().unwrap_or("?"),
                    r.acc_norm
                        .map(|x| format!("{x:.3}"))
                        .unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        println!("acc_norm: {}", acc.join(", "));
    }
    drop(daemons);
    if lb.rows.is_empty() {
        bail!("no miner was scored; see the logs in {}", root.display());
    }
    Ok(())
}
