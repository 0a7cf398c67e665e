//! The admin console against a real validator and real miners: role boundaries, bad specs,
//! a competition created and started from the console, a SIGKILL in the middle of it, and
//! every submission scored exactly once after the restart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
// deploy/ checked against the binary, and the network across namespaces (in this binary,
// so no new test executable links).
mod deploy;
mod netns;
use common::{BIN, Daemon, port};
use tunenet_node::console;

struct Console {
    url: String,
}

impl Console {
    fn run(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("console")
            .arg("--validator")
            .arg(&self.url)
            .args(args)
            .env_remove("TUNENET_TOKEN");
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        cmd.output().unwrap()
    }
    /// Runs and expects success; returns stdout.
    fn ok(&self, token: &str, args: &[&str]) -> String {
        let out = self.run(Some(token), args);
        assert!(
            out.status.success(),
            "console {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// Runs and expects a refusal whose message contains every `words`.
    fn refused(&self, token: Option<&str>, args: &[&str], words: &[&str]) {
        let out = self.run(token, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "console {args:?} should have been refused"
        );
        for w in words {
            assert!(
                err.contains(w),
                "refusal of {args:?} does not say `{w}`: {err}"
            );
        }
    }
    fn token(&self, admin: &str, role: &str, extra: &[&str]) -> String {
        let mut args = vec!["--json", "token", "create", "--role", role, "--name", role];
        args.extend_from_slice(extra);
        let out = self.ok(admin, &args);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["token"].as_str().unwrap().to_string()
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn console_roles_specs_and_a_competition_that_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = root.join("model");
    tunenet_ml::init_tiny(&model, 4).unwrap();
    let data = root.join("data.jsonl");
    std::fs::write(
        &data,
        tunenet_ml::to_jsonl(&tunenet_ml::demo_dataset(400, 2)),
    )
    .unwrap();
    let empty = root.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();

    let mut miners = vec![];
    let mut miner_urls = vec![];
    for (i, steps) in [20, 60].iter().enumerate() {
        let p = port();
        let conf = root.join(format!("m{i}.toml"));
        std::fs::write(
            &conf,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{p}\"\n[training]\nmax_steps = {steps}\nmax_seq_len = 64\ncommit_margin_secs = 1.0\n",
                root.join(format!("m{i}"))
            ),
        )
        .unwrap();
        miners.push(Daemon::start(
            &["miner", "--config", conf.to_str().unwrap()],
            &root.join(format!("m{i}.log")),
        ));
        miner_urls.push(format!("http://127.0.0.1:{p}"));
    }

    let vport = port();
    let mport = port();
    let wport = port();
    let vconf = root.join("v.toml");
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\nminers = [{:?}, {:?}]\n[web]\nlisten = \"127.0.0.1:{wport}\"\n",
            root.join("v"),
            miner_urls[0],
            miner_urls[1]
        ),
    )
    .unwrap();
    let admin = common::admin_token(&vconf);
    let again = Command::new(BIN)
        .args(["validator", "--config", vconf.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("already has an admin token"));

    let vlog = root.join("v.log");
    let mut validator = Daemon::start(&["validator", "--config", vconf.to_str().unwrap()], &vlog);
    let c = Console {
        url: format!("http://127.0.0.1:{vport}"),
    };
    wait_for(
        "the validator",
        30,
        || c.run(Some(&admin), &["whoami"]).status.success(),
        || validator.log(),
    );

    // Role boundaries: each refusal says why.
    c.refused(None, &["whoami"], &["no token"]);
    c.refused(
        Some("tn_forged"),
        &["competition", "list"],
        &["unknown token"],
    );
    let miner_peer = "12D3KooWAbcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTU";
    let miner_tok = c.token(&admin, "miner", &["--miner-peer-id", miner_peer]);
    let viewer_tok = c.token(&admin, "viewer", &[]);
    let op_tok = c.token(&admin, "operator", &[]);
    let spec = root.join("comp.toml");
    let write_spec = |extra: &str, dataset: &Path, model: &Path| {
        std::fs::write(
            &spec,
            format!(
                "id = \"live\"\nbase_model = {model:?}\ndataset = {dataset:?}\njobs = 2\nminers_per_job = 2\ntime_budget_secs = 12\nreveal_window_secs = 20\noffer_timeout_secs = 5\neval_max_seq_len = 64\n{extra}"
            ),
        )
        .unwrap();
    };
    write_spec("", &data, &model);
    let spec_s = spec.to_str().unwrap();
    c.refused(
        Some(&miner_tok),
        &["competition", "create", spec_s],
        &["role `miner` may not create competitions"],
    );
    c.refused(
        Some(&miner_tok),
        &["miner", "ban", miner_peer, "--reason", "x"],
        &["role `miner` may not ban miners"],
    );
    c.refused(
        Some(&viewer_tok),
        &["miner", "register", miner_peer, "--owner", "v"],
        &["role `viewer` may not register miners"],
    );
    c.refused(
        Some(&op_tok),
        &["token", "create", "--role", "admin", "--name", "x"],
        &["role `operator` may not issue tokens"],
    );
    c.ok(&viewer_tok, &["competition", "list"]);
    c.ok(&miner_tok, &["leaderboard"]);
    let short = {
        let out = c.ok(
            &admin,
            &[
                "--json",
                "token",
                "create",
                "--role",
                "viewer",
                "--name",
                "short",
                "--ttl-secs",
                "1",
            ],
        );
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    std::thread::sleep(Duration::from_millis(1200));
    c.refused(Some(&short), &["competition", "list"], &["expired"]);
    let revoked = c.token(&admin, "viewer", &[]);
    let id = c.ok(&admin, &["--json", "whoami"]);
    assert!(id.contains("admin"));
    let rid = {
        let out = c.ok(&revoked, &["--json", "whoami"]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    c.ok(&admin, &["token", "revoke", &rid]);
    c.refused(Some(&revoked), &["competition", "list"], &["revoked"]);

    // Bad specs are refused with the field named, and nothing is created.
    write_spec("", &data, &root.join("no-such-model"));
    c.refused(
        Some(&op_tok),
        &["competition", "create", spec_s],
        &["base_model"],
    );
    write_spec("", &empty, &model);
    c.refused(
        Some(&op_tok),
        &["competition", "create", spec_s],
        &["dataset"],
    );
    write_spec("", &data, &model);
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("time_budget_secs = 12", "time_budget_secs = 0"),
    )
    .unwrap();
    c.refused(
        Some(&op_tok),
        &["competition", "create", spec_s],
        &["time_budget_secs"],
    );
    for i in 0..5 {
        let peer = format!("12D3KooW{}{}", "Q".repeat(40), i);
        c.ok(&op_tok, &["miner", "register", &peer, "--owner", "alice"]);
    }
    // Owner names differing only in case, spaces or width are one owner.
    let sixth = format!("12D3KooW{}", "Z".repeat(41));
    for owner in ["alice", " Alice ", "ａｌｉｃｅ"] {
        c.refused(
            Some(&op_tok),
            &["miner", "register", &sixth, "--owner", owner],
            &["owner", "`alice` already has 5 miners"],
        );
    }
    // Nobody takes another owner's miner, and a banned one stays banned under any owner.
    let q = |i: u32| format!("12D3KooW{}{}", "Q".repeat(40), i);
    c.refused(
        Some(&op_tok),
        &["miner", "register", &q(1), "--owner", "bob"],
        &["registered to owner `alice`"],
    );
    c.ok(
        &admin,
        &["miner", "ban", &q(0), "--reason", "copied artifacts"],
    );
    c.refused(
        Some(&op_tok),
        &["miner", "register", &q(0), "--owner", "mallory"],
        &["banned", "copied artifacts"],
    );
    let listed = c.ok(&admin, &["--json", "miner", "list"]);
    assert!(
        !listed.contains("mallory") && !listed.contains("bob"),
        "{listed}"
    );
    assert!(!c.ok(&admin, &["competition", "list"]).contains("live"));

    // A competition created and started from the console.
    write_spec("", &data, &model);
    c.ok(&op_tok, &["competition", "create", spec_s]);
    assert!(
        c.ok(&viewer_tok, &["competition", "list"])
            .contains("created")
    );
    // Follow the live feed from before the start.
    let feed_log = root.join("feed.log");
    let feed = Daemon {
        child: Command::new(BIN)
            .args([
                "console",
                "--validator",
                &c.url,
                "--token",
                &viewer_tok,
                "watch",
                "--competition",
                "live",
            ])
            .stdout(std::fs::File::create(&feed_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        log: feed_log.clone(),
    };
    std::thread::sleep(Duration::from_millis(500));
    let none = c.ok(&admin, &["receipts", "live"]);
    assert!(
        none.contains("0 evaluation receipts") && none.contains("withheld"),
        "{none}"
    );
    // The public site's live updates: a server-sent event stream from before the start.
    let sse = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", wport)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("offered to 2 miners") {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            }
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(300));
    c.ok(&op_tok, &["competition", "start", "live"]);

    // SIGKILL the validator while job 0 is running, then restart it.
    let show = |tok: &str| -> serde_json::Value {
        serde_json::from_str(&c.ok(tok, &["--json", "competition", "show", "live"])).unwrap()
    };
    wait_for(
        "job 0 to run",
        60,
        || show(&admin)["jobs"][0]["phase"].get("Running").is_some(),
        || validator.log(),
    );
    std::thread::sleep(Duration::from_secs(2));
    // No role sees a nonce, or a commitment before its job is scored.
    let mut unscored_commitments = 0;
    for tok in [&viewer_tok, &admin] {
        unscored_commitments += assert_redacted(&show(tok));
    }
    validator.child.kill().unwrap();
    validator.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let vlog2 = root.join("v2.log");
    let validator2 = Daemon::start(&["validator", "--config", vconf.to_str().unwrap()], &vlog2);
    wait_for(
        "the restarted validator",
        30,
        || c.run(Some(&admin), &["whoami"]).status.success(),
        || validator2.log(),
    );
    wait_for(
        "the competition to finish",
        150,
        || {
            unscored_commitments += assert_redacted(&show(&viewer_tok));
            let out = c.run(Some(&viewer_tok), &["--json", "competition", "list"]);
            String::from_utf8_lossy(&out.stdout).contains("\"finished\"")
        },
        || format!("{}\n---\n{}", validator2.log(), show(&admin)),
    );

    let streamed = sse.join().unwrap();
    assert!(
        streamed.contains("text/event-stream")
            && streamed.contains("data: {")
            && streamed.contains("offered to 2 miners"),
        "{streamed}"
    );

    // The feed showed the offers before the validator was killed.
    let fed = feed.log();
    assert!(
        fed.contains("[live] job live-0: offered to 2 miners"),
        "feed:\n{fed}"
    );
    drop(feed);

    // Every submission was scored exactly once, across both runs.
    let detail = show(&admin);
    assert!(
        unscored_commitments > 0,
        "no poll saw a received commitment of a running job, so its hiding went untested"
    );
    assert_redacted(&detail);
    let shown = detail["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|j| j["slots"].as_object().unwrap().values())
        .filter(|s| s["commitment"]["commit"].is_string())
        .count();
    assert!(shown > 0, "scored jobs show their commitments: {detail}");
    let logs = validator.log() + &validator2.log();
    let mut scored: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in logs
        .lines()
        .filter(|l| l.contains(" scored ") || l.ends_with(" scored"))
    {
        if let (Some(j), Some(m)) = (field(line, "job_id"), field(line, "miner")) {
            *scored.entry((j, m)).or_default() += 1;
        }
    }
    for job in detail["jobs"].as_array().unwrap() {
        let id = job["plan"]["job_id"].as_str().unwrap().to_string();
        let slots = job["slots"].as_object().unwrap();
        let scores = job["scores"].as_array().unwrap();
        assert_eq!(scores.len(), slots.len(), "job {id}: {job}");
        for miner in slots.keys() {
            assert_eq!(
                scored.get(&(id.clone(), miner.clone())),
                Some(&1),
                "job {id} miner {miner} scored {:?} times",
                scored.get(&(id.clone(), miner.clone()))
            );
        }
        assert!(!slots.is_empty(), "job {id} had no miners: {job}");
    }
    let lb = c.ok(&miner_tok, &["--json", "leaderboard", "live"]);
    let lb: serde_json::Value = serde_json::from_str(&lb).unwrap();
    assert_eq!(lb["jobs_done"], 2);

    // Scoring replay: a proposed formula is recomputed from the stored losses and shown
    // beside the leaderboard; the formula in force gives the stored leaderboard back
    // exactly; bad formulas are refused saying why; nothing changes.
    let spec = root.join("scoring.toml");
    let spec_arg = spec.to_str().unwrap();
    let replay = |tok: &str| -> serde_json::Value {
        serde_json::from_str(&c.ok(tok, &["--json", "replay", "live", "--scoring", spec_arg]))
            .unwrap()
    };
    std::fs::write(
        &spec,
        "test = 1.0\nsynthetic = 0.0\npenalty_quality = 0.0\ntemperature = 2.0\n",
    )
    .unwrap();
    let r = replay(&viewer_tok);
    assert_eq!(r["jobs_replayed"], 2, "{r}");
    assert_eq!(r["now"], lb);
    assert_eq!(
        r["replayed"]["rows"].as_array().unwrap().len(),
        lb["rows"].as_array().unwrap().len()
    );
    let f = &r["scoring_now"];
    std::fs::write(
        &spec,
        format!(
            "test = {}\nsynthetic = {}\npenalty_quality = {}\ntemperature = {}\n",
            f["test"], f["synthetic"], f["penalty_quality"], f["temperature"]
        ),
    )
    .unwrap();
    let same = replay(&viewer_tok);
    assert_eq!(
        same["replayed"], lb,
        "the formula in force must give the stored leaderboard back"
    );
    let table = c.ok(&viewer_tok, &["replay", "live", "--scoring", spec_arg]);
    assert!(
        table.contains("0 of") && table.contains("would change rank"),
        "{table}"
    );
    std::fs::write(&spec, "test = -1.0\nsynthetic = 0.0\n").unwrap();
    c.refused(
        Some(&viewer_tok),
        &["replay", "live", "--scoring", spec_arg],
        &["must be finite and not negative"],
    );
    std::fs::write(&spec, "tset = 1.0\n").unwrap();
    c.refused(
        Some(&viewer_tok),
        &["replay", "live", "--scoring", spec_arg],
        &["not a scoring formula", "tset"],
    );
    let after: serde_json::Value =
        serde_json::from_str(&c.ok(&miner_tok, &["--json", "leaderboard", "live"])).unwrap();
    assert_eq!(after, lb, "a replay changes nothing");

    // Evaluation receipts: every revealed submission's, signed by the validator. A miner
    // token reads its own; the competition has finished, so they carry their per-record
    // losses and `tunenet verify-receipt` recomputes them from the artifact, the base model
    // and the hidden sets, now published.
    let scored_slot = detail["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|j| j["slots"].as_object().unwrap().iter())
        .find(|(_, s)| s["submission"].get("Evaluated").is_some())
        .map(|(m, _)| m.clone())
        .expect("a scored submission");
    let own_tok = c.token(&admin, "miner", &["--miner-peer-id", &scored_slot]);
    let rfile = root.join("receipts.json");
    let table = c.ok(
        &own_tok,
        &["receipts", "live", "--out", rfile.to_str().unwrap()],
    );
    assert!(
        table.contains("is finished") && table.contains("valid"),
        "{table}"
    );
    c.refused(
        Some(&own_tok),
        &["receipts", "live", "--miner", miner_peer],
        &["its own receipts only"],
    );
    let receipts: Vec<tunenet_types::EvaluationReceipt> =
        serde_json::from_str(&std::fs::read_to_string(&rfile).unwrap()).unwrap();
    assert!(receipts.iter().all(|r| r.miner.0 == scored_slot));
    let r = receipts
        .iter()
        .find(|r| r.test_records > 0)
        .expect("a receipt with losses");
    r.verify().unwrap();
    assert_eq!(r.losses.len() as u64, r.test_records + r.synthetic_records);
    let all = c.ok(&admin, &["--json", "receipts", "live"]);
    let all: Vec<tunenet_types::EvaluationReceipt> = serde_json::from_str(&all).unwrap();
    let revealed = detail["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|j| j["slots"].as_object().unwrap().values())
        .filter(|s| {
            s["submission"].get("Evaluated").is_some()
                || s["submission"]["Failed"]["artifact"].is_string()
        })
        .count();
    assert_eq!(
        all.len(),
        revealed,
        "one receipt per revealed submission: {all:?}"
    );
    // The artifact as the miner kept it: any file under the test's root with its blake3.
    fn find(dir: &Path, id: &tunenet_types::BlobId) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p, id) {
                    return Some(f);
                }
            } else if std::fs::read(&p).is_ok_and(|b| tunenet_types::BlobId::of(&b) == *id) {
                return Some(p);
            }
        }
        None
    }
    let artifact = find(root, &r.artifact).expect("the artifact on disk");
    let verify = |file: &Path| {
        Command::new(BIN)
            .args(["verify-receipt", file.to_str().unwrap(), "--job"])
            .arg(r.job_id.as_str())
            .args(["--base", model.to_str().unwrap(), "--artifact"])
            .arg(&artifact)
            .args(["--validator", &c.url])
            .output()
            .unwrap()
    };
    let out = verify(&rfile);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("the receipt holds"),
        "{said}"
    );
    // A dispute round trip: the miner files its own recomputation; the admin sees both
    // computations side by side; a receipt is disputed once; only its miner may.
    let mine = Command::new(BIN)
        .args(["verify-receipt", rfile.to_str().unwrap(), "--json", "--job"])
        .arg(r.job_id.as_str())
        .args(["--base", model.to_str().unwrap(), "--artifact"])
        .arg(&artifact)
        .args(["--validator", &c.url])
        .output()
        .unwrap();
    assert!(mine.status.success());
    let mine_file = root.join("mine.json");
    std::fs::write(&mine_file, &mine.stdout).unwrap();
    let dispute = |tok: &str| {
        c.run(
            Some(tok),
            &[
                "dispute",
                "live",
                r.job_id.as_str(),
                "--recomputed",
                mine_file.to_str().unwrap(),
                "--reason",
                "my loss looks high",
            ],
        )
    };
    let filed = dispute(&own_tok);
    let said = String::from_utf8_lossy(&filed.stdout);
    assert!(
        filed.status.success() && said.contains("the two computations agree"),
        "{said}{}",
        String::from_utf8_lossy(&filed.stderr)
    );
    let seen = c.ok(&admin, &["disputes", "live"]);
    assert!(
        seen.contains("1 disputes")
            && seen.contains("my loss looks high")
            && seen.contains(&format!("validator {:.4}", r.test_loss.unwrap())),
        "{seen}"
    );
    // Once per receipt; only its own miner's token; not a reading role.
    let again = [
        "dispute",
        "live",
        r.job_id.as_str(),
        "--recomputed",
        mine_file.to_str().unwrap(),
    ];
    for (tok, why) in [
        (&own_tok, "already disputed"),
        (&miner_tok, "no evaluation receipt for miner"),
        (&viewer_tok, "may not"),
    ] {
        c.refused(Some(tok), &again, &[why]);
    }

    // The published split is not reused: a new competition that would draw the same
    // hidden records is refused.
    write_spec("", &data, &model);
    let again = root.join("comp.toml");
    std::fs::write(
        &again,
        std::fs::read_to_string(&again)
            .unwrap()
            .replace("id = \"live\"", "id = \"again\""),
    )
    .unwrap();
    c.refused(
        Some(&op_tok),
        &["competition", "create", again.to_str().unwrap()],
        &["published for its receipts", "seed"],
    );

    // A loss changed after signing is caught.
    let mut t = r.clone();
    t.losses[0] = t.losses[0].map(|l| l + 0.5);
    let tfile = root.join("tampered.json");
    std::fs::write(&tfile, serde_json::to_string(&t).unwrap()).unwrap();
    let out = verify(&tfile);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("signed root"),
        "{said}"
    );

    // The public site, in a real browser: each page renders what it should and nothing
    // hidden (no record of the dataset, so neither test split nor canary, and no nonce).
    let site = format!("http://127.0.0.1:{wport}");
    let secrets: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["response"].as_str().map(str::to_string))
        .filter(|r| r.len() > 24)
        .collect();
    assert!(!secrets.is_empty());
    let job0 = detail["jobs"][0]["plan"]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let pages = [
        (
            "index",
            site.clone(),
            vec!["id=\"competitions\"", "href=\"/competitions/live\""],
        ),
        (
            "competition",
            format!("{site}/competitions/live"),
            vec![
                "id=\"leaderboard\"",
                "class=\"miner\"",
                "<svg",
                "id=\"jobs\"",
            ],
        ),
        (
            "job",
            format!("{site}/competitions/live/jobs/{job0}"),
            vec!["id=\"submissions\"", "scored"],
        ),
        (
            "miner",
            format!("{site}/miners/{scored_slot}"),
            vec!["id=\"history\"", "live"],
        ),
    ];
    for (name, url, wants) in &pages {
        let Some(dom) = common::browser_dom(url, name) else {
            break;
        };
        for w in wants {
            assert!(dom.contains(w), "{name} page lacks {w}:\n{dom}");
        }
        assert!(!dom.to_lowercase().contains("nonce"), "{name} page: {dom}");
        for r in &secrets {
            assert!(
                !dom.contains(r.as_str()),
                "{name} page shows a dataset record: {r}"
            );
        }
    }
    if let Some(dom) = common::browser_dom(&format!("{site}/competitions/live"), "svg-count") {
        assert!(dom.matches("<svg").count() >= 3, "{dom}");
        let rows = dom.matches("class=\"miner\"").count();
        assert!(rows >= 2, "{dom}");
    }

    // A client loading pages faster than the site allows is told to slow down.
    let statuses: Vec<String> = (0..60)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", wport)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body.lines().next().unwrap_or_default().to_string()
        })
        .collect();
    assert!(
        statuses.iter().any(|l| l.contains("429")) && statuses[0].contains("200"),
        "{statuses:?}"
    );

    // The audit log, the feed's history in CSV, and the metrics endpoint.
    let audit = c.ok(&admin, &["audit"]);
    for action in [
        "token.create",
        "token.revoke",
        "competition.create",
        "competition.start",
        "miner.register",
    ] {
        assert!(audit.contains(action), "audit log lacks {action}:\n{audit}");
    }
    c.refused(Some(&op_tok), &["audit"], &["may not read the audit log"]);
    let csv = c.ok(&viewer_tok, &["export", "live", "--format", "csv"]);
    assert!(csv.starts_with("competition,job,miner,loss,quality,penalty_reason\n"));
    assert_eq!(
        csv.lines().count(),
        1 + detail["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["scores"].as_array().unwrap().len())
            .sum::<usize>()
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("tunenet_jobs_offered_total"), "{body}");

    // Snapshot, restore into a fresh data dir, and the same leaderboard comes back.
    let busy = Command::new(BIN)
        .args([
            "validator",
            "--config",
            vconf.to_str().unwrap(),
            "snapshot",
            "--out",
        ])
        .arg(root.join("busy.jsonl"))
        .output()
        .unwrap();
    assert!(
        !busy.status.success(),
        "a running validator's database is locked"
    );
    drop(validator2);
    let snap = root.join("snap.jsonl");
    let out = Command::new(BIN)
        .args([
            "validator",
            "--config",
            vconf.to_str().unwrap(),
            "snapshot",
            "--out",
        ])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = root.join("fresh");
    let restored = Command::new(BIN)
        .args([
            "validator",
            "--config",
            vconf.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(&fresh)
        .args(["restore", "--from"])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    // Blobs are copied as files.
    let status = Command::new("cp")
        .arg("-r")
        .arg(root.join("v/blobs"))
        .arg(fresh.join("blobs"))
        .status()
        .unwrap();
    assert!(status.success());
    let v3 = Daemon::start(
        &[
            "validator",
            "--config",
            vconf.to_str().unwrap(),
            "--data-dir",
            fresh.to_str().unwrap(),
        ],
        &root.join("v3.log"),
    );
    wait_for(
        "the restored validator",
        30,
        || c.run(Some(&admin), &["whoami"]).status.success(),
        || v3.log(),
    );
    let lb3: serde_json::Value =
        serde_json::from_str(&c.ok(&admin, &["--json", "leaderboard", "live"])).unwrap();
    assert_eq!(
        lb3, lb,
        "the restored validator serves the same leaderboard"
    );
    drop(miners);
}

/// Asserts that `competition show` output holds no assignment nonce anywhere, and no
/// commitment hash in a job that is not yet done; returns how many slots of such jobs had a
/// commitment received (shown only as received).
fn assert_redacted(detail: &serde_json::Value) -> usize {
    fn values_of<'a>(v: &'a serde_json::Value, key: &str, out: &mut Vec<&'a serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == key {
                        out.push(x);
                    }
                    values_of(x, key, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| values_of(x, key, out)),
            _ => {}
        }
    }
    let mut nonces = vec![];
    values_of(detail, "nonce", &mut nonces);
    assert!(
        nonces.iter().all(|n| *n == console::REDACTED),
        "a nonce is shown: {detail}"
    );
    let mut received = 0;
    for job in detail["jobs"].as_array().unwrap() {
        if job["phase"].get("Done").is_some() {
            continue;
        }
        let mut commits = vec![];
        values_of(job, "commit", &mut commits);
        assert!(
            commits.iter().all(|c| *c == console::HIDDEN),
            "a running job shows a commitment hash: {job}"
        );
        for s in job["slots"].as_object().unwrap().values() {
            assert!(!s["commitment"].is_object(), "{job}");
            if s["committed"] == true {
                assert_eq!(s["commitment"], console::RECEIVED, "{job}");
                received += 1;
            }
        }
    }
    received
}

/// The value of a `key=value` field in a tracing log line.
fn field(line: &str, key: &str) -> Option<String> {
    let i = line.find(&format!("{key}="))? + key.len() + 1;
    Some(
        line[i..]
            .split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}

/// A CA and a certificate for `localhost` signed by it, as `root/ca.pem`, `root/cert.pem`
/// and `root/key.pem` (the key readable by its owner only).
fn tls_files(root: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(root.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(root.join("cert.pem"), leaf.pem()).unwrap();
    let key = root.join("key.pem");
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A job over TLS both ways: the validator calls a miner whose gRPC service is TLS only
/// (its assignment and secret nonce cross encrypted), the miner commits and uploads to a
/// TLS validator, and both trust the private CA through `TUNENET_CA`. Plain HTTP to the
/// miner's port gets nowhere.
#[test]
fn a_job_runs_over_tls_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tls_files(root);
    let (model, data) = common::tiny_model_and_data(root, 5, 300, 9);
    let (cert, key, ca) = (
        root.join("cert.pem"),
        root.join("key.pem"),
        root.join("ca.pem"),
    );
    let mport = port();
    let mconf = root.join("m.toml");
    std::fs::write(
        &mconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{mport}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n[training]\nmax_steps = 20\nmax_seq_len = 48\ncommit_margin_secs = 1.0\n",
            root.join("m")
        ),
    )
    .unwrap();
    let vport = port();
    let vconf = root.join("v.toml");
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\nadvertise = \"https://localhost:{vport}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\nminers = [\"https://localhost:{mport}\"]\n[[competitions]]\nid = \"t\"\nbase_model = {model:?}\ndataset = {data:?}\njobs = 1\nminers_per_job = 1\ntime_budget_secs = 8\nreveal_window_secs = 20\neval_max_seq_len = 48\n",
            root.join("v")
        ),
    )
    .unwrap();
    let trust = [("TUNENET_CA", ca.to_str().unwrap())];
    let miner = Daemon::start_env(
        &["miner", "--config", mconf.to_str().unwrap()],
        &root.join("m.log"),
        &trust,
    );
    let validator = Daemon::start_env(
        &["validator", "--config", vconf.to_str().unwrap()],
        &root.join("v.log"),
        &trust,
    );
    let board = || {
        Command::new(BIN)
            .args([
                "leaderboard",
                "--validator",
                &format!("https://localhost:{vport}"),
                "--competition",
                "t",
                "--json",
            ])
            .env("TUNENET_CA", &ca)
            .output()
            .unwrap()
    };
    wait_for(
        "the job over TLS to be scored",
        120,
        || {
            let out = board();
            let lb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            lb["jobs_done"] == 1
        },
        || format!("{}\n{}", miner.log(), validator.log()),
    );
    let lb: serde_json::Value = serde_json::from_slice(&board().stdout).unwrap();
    assert!(lb["rows"][0]["mean_loss"].is_number(), "{lb}");
    assert!(miner.log().contains("artifact uploaded"), "{}", miner.log());
    // The miner's port speaks TLS only.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plain = rt.block_on(async {
        tunenet_rpc::MinerClient::connect(&format!("http://127.0.0.1:{mport}"))
            .await?
            .status()
            .await
    });
    assert!(
        plain.is_err(),
        "plain HTTP reached the TLS miner: {plain:?}"
    );
}

#[test]
fn console_over_tls_needs_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tls_files(root);

    let vport = port();
    let vconf = root.join("v.toml");
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            root.join("v"),
            root.join("cert.pem"),
            root.join("key.pem")
        ),
    )
    .unwrap();
    let admin = common::admin_token(&vconf);
    // A TLS key others may read is refused at start, with the fix.
    {
        use std::os::unix::fs::PermissionsExt;
        let key = root.join("key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut child = Command::new(BIN)
            .args(["validator", "--config", vconf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("a validator with a world-readable TLS key kept running");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success());
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let v = Daemon::start(
        &["validator", "--config", vconf.to_str().unwrap()],
        &root.join("v.log"),
    );
    let c = Console {
        url: format!("https://localhost:{vport}"),
    };
    let ca = root.join("ca.pem");
    let with_ca = |args: &[&str]| {
        let mut a = vec!["--ca", ca.to_str().unwrap()];
        a.extend_from_slice(args);
        c.run(Some(&admin), &a)
    };
    wait_for(
        "the TLS validator",
        30,
        || with_ca(&["whoami"]).status.success(),
        || v.log(),
    );
    let out = with_ca(&["whoami"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("role admin"));
    // Without the CA the server's certificate is not trusted.
    c.refused(Some(&admin), &["whoami"], &["cannot reach the validator"]);
    // Plain HTTP to a TLS port does not get through either.
    let plain = Console {
        url: format!("http://127.0.0.1:{vport}"),
    };
    assert!(!plain.run(Some(&admin), &["whoami"]).status.success());
}

/// A console client whose connection comes from `from` (any 127.0.0.0/8 address reaches
/// the loopback validator), so one test can play several peers.
async fn console_from(
    url: &str,
    from: &str,
) -> tunenet_rpc::services::console_service_client::ConsoleServiceClient<tonic::transport::Channel>
{
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .local_address(Some(from.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    tunenet_rpc::services::console_service_client::ConsoleServiceClient::new(ch)
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Each abuse limit of a validator daemon, crossed from one address over the wire: token
/// guessing, a request flood and a connection flood are each refused with the limit named,
/// and another address is served throughout.
#[test]
fn abuse_limits_refuse_the_offender_and_keep_serving_others() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vport = port();
    let vconf = root.join("v.toml");
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\n\n[limits]\nrequests_per_sec = 10.0\nburst = 20\nconnections_per_addr = 4\nfailed_logins = 3\nlogin_window_secs = 60\n",
            root.join("v")
        ),
    )
    .unwrap();
    let admin = common::admin_token(&vconf);
    let v = Daemon::start(
        &["validator", "--config", vconf.to_str().unwrap()],
        &root.join("v.log"),
    );
    let url = format!("http://127.0.0.1:{vport}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t0 = Instant::now();
        let mut honest = loop {
            if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .local_address(Some("127.0.0.2".parse().unwrap()))
                .connect()
                .await
            {
                break tunenet_rpc::services::console_service_client::ConsoleServiceClient::new(ch);
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{}", v.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ok = |c: &mut tunenet_rpc::services::console_service_client::ConsoleServiceClient<
            tonic::transport::Channel,
        >| {
            let mut c = c.clone();
            let admin = admin.clone();
            async move {
                c.who_am_i(with_token(tunenet_rpc::services::Empty {}, &admin))
                    .await
                    .map(|r| r.into_inner().role)
            }
        };
        assert_eq!(ok(&mut honest).await.unwrap(), "admin");

        // Token guessing from 127.0.0.3: three wrong tokens, then even the right one is
        // refused for the window; the honest address is not.
        let mut guesser = console_from(&url, "127.0.0.3").await;
        for k in 0..3 {
            let e = guesser
                .who_am_i(with_token(
                    tunenet_rpc::services::Empty {},
                    &format!("tn_guess{k}"),
                ))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        let e = ok(&mut guesser).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("3 failed logins within 60 s"), "{e:?}");
        assert_eq!(ok(&mut honest).await.unwrap(), "admin");
        // Each refused login is in the audit log, with the address.
        let audit = honest
            .audit(with_token(tunenet_rpc::services::Empty {}, &admin))
            .await
            .unwrap()
            .into_inner()
            .entries;
        let refused: Vec<_> = audit
            .iter()
            .filter(|e| e.action == "login refused" && e.actor.contains("127.0.0.3"))
            .collect();
        assert_eq!(refused.len(), 3, "{audit:?}");
        assert!(
            refused[2].detail.contains("refused for a while"),
            "{audit:?}"
        );

        // A request flood from 127.0.0.4: past the burst, refused with the limit named.
        let flooder = console_from(&url, "127.0.0.4").await;
        let mut calls = Vec::new();
        for _ in 0..60 {
            let (mut c, admin) = (flooder.clone(), admin.clone());
            calls.push(async move {
                c.overall_leaderboard(with_token(tunenet_rpc::services::Empty {}, &admin))
                    .await
            });
        }
        let results = futures::future::join_all(calls).await;
        let limited: Vec<_> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|e| e.code() == tonic::Code::ResourceExhausted)
            .collect();
        assert!(
            limited.len() >= 30,
            "{} of 60 refused: {results:?}",
            limited.len()
        );
        assert!(
            limited[0]
                .message()
                .contains("limit of 10 requests a second"),
            "{:?}",
            limited[0]
        );
        assert_eq!(ok(&mut honest).await.unwrap(), "admin");

        // A connection flood from 127.0.0.5: the fifth connection is closed at once, the
        // first four stay open, and the honest address still gets in.
        let mut open = Vec::new();
        for _ in 0..4 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.5:0".parse().unwrap()).unwrap();
            open.push(
                s.connect(format!("127.0.0.1:{vport}").parse().unwrap())
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.5:0".parse().unwrap()).unwrap();
        let mut fifth = s
            .connect(format!("127.0.0.1:{vport}").parse().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut fifth, &mut buf),
        )
        .await
        .expect("the fifth connection was not closed")
        .unwrap_or(0);
        assert_eq!(
            n, 0,
            "the fifth connection got bytes instead of being closed"
        );
        for s in open.iter_mut() {
            let still = tokio::time::timeout(
                Duration::from_millis(300),
                tokio::io::AsyncReadExt::read(s, &mut buf),
            )
            .await;
            assert!(
                !matches!(still, Ok(Ok(0))),
                "one of the first four connections was closed"
            );
        }
        let mut late = console_from(&url, "127.0.0.2").await;
        assert_eq!(ok(&mut late).await.unwrap(), "admin");

        // A header block over the 16 KiB bound is refused before any handler reads it.
        let mut big = console_from(&url, "127.0.0.6").await;
        let e = big
            .who_am_i(with_token(
                tunenet_rpc::services::Empty {},
                &"x".repeat(20 * 1024),
            ))
            .await
            .unwrap_err();
        assert_ne!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert_eq!(ok(&mut late).await.unwrap(), "admin");
    });
    assert!(v.log().contains("console login refused"), "{}", v.log());
}

/// A validator whose data directory is full refuses to start with a message that says
/// the disk is full (not that another tunenet holds it), and starts once space is freed,
/// with its first admin token still valid. Needs root to mount a small tmpfs; says it
/// skipped otherwise.
#[test]
fn a_validator_on_a_full_disk_says_so_and_starts_once_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    let tmpfs = match common::Tmpfs::mount(&disk, "16m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: cannot mount a small tmpfs to fill ({why}); this test needs root");
            return;
        }
    };
    let vport = port();
    let vconf = tmp.path().join("v.toml");
    std::fs::write(
        &vconf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{vport}\"\n",
            disk.join("v")
        ),
    )
    .unwrap();
    let admin = common::admin_token(&vconf);
    // Fill the disk.
    let filler = tmpfs.fill();
    let out = Command::new(BIN)
        .args(["validator", "--config", vconf.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a validator started on a full disk");
    assert!(
        err.contains("No space left on device") && err.contains("full"),
        "{err}"
    );
    assert!(!err.contains("another tunenet"), "{err}");
    // Space again: it starts, and what it stored before is there.
    std::fs::remove_file(&filler).unwrap();
    let v = Daemon::start(
        &["validator", "--config", vconf.to_str().unwrap()],
        &tmp.path().join("v.log"),
    );
    let c = Console {
        url: format!("http://127.0.0.1:{vport}"),
    };
    wait_for(
        "the validator after space was freed",
        30,
        || c.run(Some(&admin), &["whoami"]).status.success(),
        || v.log(),
    );
}
