//! The red team over the wire, in a test binary of its own: its twenty adversaries train
//! while the competition runs, and beside the other end-to-end tests' daemons (which have
//! budgets of a few seconds) that load would make them miss their deadlines.

use std::path::Path;
use std::process::Command;

mod common;
use common::BIN;

/// The red team over the wire, one competition: a validator daemon, honest miner daemons
/// and adversary miners that speak only gRPC. Every strategy the report lists is caught for
/// its expected reason, no honest submission fails, and every honest evaluation has its
/// synthetic loss and leakage verdict.
#[test]
fn redteam_over_the_wire_catches_every_cheat_and_fails_no_honest_miner() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("INTEGRITY.md");
    let run = Command::new(BIN)
        // A budget with room for a slow machine: the adversaries train while it runs.
        .args([
            "redteam",
            "--competitions",
            "1",
            // More than the published run's 60 s: on a slow machine the adversary that
            // reuses one artifact for both jobs trains it in the first job, behind the
            // accomplices, and must still reveal it in time.
            "--budget",
            "90",
            "--work-dir",
        ])
        .arg(tmp.path().join("work"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(&out).unwrap();
    for (row, by) in [
        ("one artifact submitted to both jobs", "duplicate"),
        ("another miner's artifact, byte for byte", "exact_duplicate"),
        (
            "another miner's artifact with small noise",
            "near_duplicate",
        ),
        (
            "a copy, then the original's signed commitment",
            "exact_duplicate",
        ),
        ("a model soup", "derived"),
        ("a model from another initialisation", "base_similarity"),
        ("the base returned unchanged", "fine_tuned"),
        (
            "its assigned records plus the hidden test split",
            "test_leakage",
        ),
        ("a LoRA rank above the bound", "lora_rank"),
        ("NaN weights", "finite"),
        ("exploding norms", "base_similarity"),
        ("a commit after the deadline", "deadline"),
        ("an upload that is not the committed artifact", "commitment"),
        (
            "another miner's commitment replayed as its own",
            "commitment",
        ),
        ("a commitment signed with another key", "signature"),
        // Caught by the canary exposure test (no sign of training on its assigned data
        // while peers that learned no more show theirs) or by the per-record leakage test.
        (
            "trained only on the hidden test split",
            "trained_on_job_data|test_leakage",
        ),
        (
            "the whole public dataset once",
            "trained_on_job_data|test_leakage",
        ),
        (
            "in-distribution records that are not its assigned data",
            "trained_on_job_data",
        ),
    ] {
        let line = report
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("no row for {row}:\n{report}"));
        // | strategy | caught for the expected reason | caught at all | by | ...
        let cols: Vec<&str> = line.split(" | ").collect();
        let caught = cols.get(1) == Some(&"1/1")
            && cols
                .get(3)
                .is_some_and(|b| by.split('|').any(|x| b.contains(x)));
        assert!(
            caught,
            "{row} not caught for its reason ({by}): {line}\n\n{}\n\n{report}",
            diagnosis(&tmp.path().join("work").join("c0"), &report, row)
        );
    }
    let honest = report
        .lines()
        .find(|l| l.contains("honest submissions;"))
        .unwrap_or_else(|| panic!("no honest line:\n{report}"));
    assert!(
        honest.contains("; 0 failed or penalised"),
        "{honest}\n{report}"
    );
    // "N honest submissions; 0 failed or penalised; N of them evaluated with a synthetic
    // loss and N with a leakage verdict."
    let n: Vec<&str> = honest.split_whitespace().collect();
    // Three honest daemons (one of which starts listening only after the first offers,
    // so it is in only through the retries) and two honest accomplices, in two jobs.
    assert_eq!(n[0], "10", "{honest}");
    assert_eq!(n[0], n[7], "{honest}");
    assert_eq!(n[0], n[16], "{honest}");
}

/// What a failed run needs to be understood, short enough to survive a truncated CI log:
/// the strategy's own statistics from the report, then every submission of each job with
/// who made it (the run's `roles.txt`), its losses, its canary exposure and leakage
/// p-values, and what the leakage test compared it with.
fn diagnosis(comp: &Path, report: &str, row: &str) -> String {
    let mut out = format!("== {row}: its statistics\n");
    for line in report
        .lines()
        .filter(|l| l.contains(" / ") && l.contains(row))
    {
        let stat = line
            .split(" | ")
            .next()
            .unwrap_or("")
            .trim_start_matches("| ");
        let mine = line.split("; ").find(|x| x.contains(row)).unwrap_or("");
        out.push_str(&format!("{stat}: {}\n", mine.trim_start_matches("| ")));
    }
    let roles: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(comp.join("roles.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(p, r)| (p.to_string(), r.to_string()))
            .collect();
    let name = |text: &str| {
        roles
            .iter()
            .fold(text.to_string(), |t, (p, r)| t.replace(p.as_str(), r))
    };
    let Ok(detail) = std::fs::read_to_string(comp.join("competition.json")) else {
        return out + "(no competition.json)";
    };
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap_or_default();
    for job in detail["jobs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "== {}: who | state | test loss | synthetic loss | canary exposure p | leakage p | leakage references\n",
            job["plan"]["job_id"]
        ));
        for (peer, slot) in job["slots"].as_object().into_iter().flatten() {
            let sub = &slot["submission"];
            let (state, body) = sub
                .as_object()
                .and_then(|o| o.iter().next())
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap_or((sub.to_string(), serde_json::Value::Null));
            let verdict = |check: &str| {
                body["verdicts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["check"] == check)
                    .cloned()
                    .unwrap_or_default()
            };
            let leak = verdict("test_leakage");
            let refs = leak["reason"]
                .as_str()
                .and_then(|r| r.split("weights ").nth(1))
                .and_then(|r| r.split(':').next())
                .unwrap_or("");
            out.push_str(&format!(
                "{} | {state} | {} | {} | {} | {} | {}\n",
                roles.get(peer).map_or(peer.as_str(), String::as_str),
                body["test_loss"],
                body["synthetic_loss"],
                verdict("canary_exposure")["value"],
                leak["value"],
                name(refs)
            ));
        }
    }
    out
}
