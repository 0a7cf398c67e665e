//! Bring your own trainer: `[training] command = ["python3", "train.py"]` runs an external
//! program for each job instead of tunenet's own trainer, under the contract in
//! docs/TRAINERS.md. The miner writes the job file and the training data, runs the program
//! with the job file's path as its last argument, logs its output, stops it at the deadline
//! less the commit margin (SIGTERM, then SIGKILL), and turns what it wrote into an
//! artifact: a tunenet artifact, a LoRA adapter in PEFT's layout, or full weights in
//! Hugging Face layout (`save_pretrained`). Anything else, a
//! non-zero exit or an overrun fails the job with the reason; the miner keeps serving.

use crate::error::NodeError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tunenet_types::{HparamBounds, JobId};

/// The job file the program reads (its path is the program's last argument, and
/// `TUNENET_JOB`).
#[derive(Debug, Serialize)]
pub struct JobFile {
    /// Always 1 for this layout.
    pub version: u32,
    pub job_id: String,
    /// The base model directory, in Hugging Face layout (config.json, tokenizer.json,
    /// model.safetensors).
    pub base_model: PathBuf,
    /// This miner's training records, in its assigned order: JSONL of `{"text": ...}` or
    /// `{"prompt": ..., "response": ...}`.
    pub train_data: PathBuf,
    pub train_records: usize,
    /// Where the program writes its result (empty when it starts).
    pub output_dir: PathBuf,
    /// The validator's deadline for the commitment (Unix ms).
    pub deadline_unix_ms: u64,
    /// When the program is sent SIGTERM if still running (Unix ms): the deadline less the
    /// miner's commit margin. It is killed a few seconds later.
    pub stop_by_unix_ms: u64,
    /// The devices it may use (`cpu`, `cuda:0`); `CUDA_VISIBLE_DEVICES` is set to match.
    pub devices: Vec<String>,
    /// What the validator accepts: LoRA rank, full fine-tuning, learning rates, sequence
    /// length.
    pub hparams: HparamBounds,
    /// The miner's own training settings, for programs that want a starting point.
    pub suggested: crate::config::TrainingConfig,
}

/// What the program left: the artifact and a line of its output, for the log.
pub struct Outcome {
    pub artifact: PathBuf,
    pub how: String,
}

/// Seconds between SIGTERM and SIGKILL (less when the margin is shorter).
const GRACE: Duration = Duration::from_secs(5);
/// Lines of the program's stderr kept for the failure reason.
const TAIL: usize = 8;

/// Runs `command` for `job` and returns the artifact it produced.
pub async fn run(
    command: &[String],
    job: &JobFile,
    job_id: &JobId,
    work: &Path,
    base: &tunenet_ml::ModelDir,
) -> Result<Outcome, NodeError> {
    let program = Program {
        key: "training.command",
        role: "trainer",
        log_file: "trainer.log",
        stop_by_unix_ms: job.stop_by_unix_ms,
        deadline_unix_ms: job.deadline_unix_ms,
        devices: &job.devices,
    };
    run_program(command, job, job_id, work, &program).await?;
    collect(&job.output_dir, base, &job.hparams, work)
}

/// How one external program runs: what it is called in messages, its log, its stop time.
pub struct Program<'a> {
    /// The config key that names it, for errors.
    pub key: &'a str,
    /// "trainer", "inference program".
    pub role: &'a str,
    /// Its output's log file in the work directory.
    pub log_file: &'a str,
    /// SIGTERM at this time (Unix ms), SIGKILL a few seconds later.
    pub stop_by_unix_ms: u64,
    /// The validator's deadline (Unix ms): the grace before SIGKILL never passes it.
    pub deadline_unix_ms: u64,
    /// Its devices (`CUDA_VISIBLE_DEVICES` is set from the `cuda:N` ones).
    pub devices: &'a [String],
}

/// Writes `job` as `job.json` in `work`, runs `command` with its path as the last
/// argument, logs its output, stops it at the stop time; Ok when it exits 0 in time.
pub async fn run_program<J: Serialize>(
    command: &[String],
    job: &J,
    job_id: &JobId,
    work: &Path,
    spec: &Program<'_>,
) -> Result<(), NodeError> {
    let other = |s: String| NodeError::Other(s);
    let role = spec.role;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| other(format!("`{}` is empty", spec.key)))?;
    let path = work.join("job.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(job).map_err(|e| other(format!("job file: {e}")))?,
    )
    .map_err(|e| other(format!("cannot write {}: {e}", path.display())))?;
    let log_path = work.join(spec.log_file);
    let mut log = tokio::fs::File::create(&log_path)
        .await
        .map_err(|e| other(format!("cannot create {}: {e}", log_path.display())))?;
    let visible: Vec<&str> = spec
        .devices
        .iter()
        .filter_map(|d| d.strip_prefix("cuda:"))
        .collect();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .arg(&path)
        .env("TUNENET_JOB", &path)
        .current_dir(work)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if !visible.is_empty() {
        cmd.env("CUDA_VISIBLE_DEVICES", visible.join(","));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| other(format!("cannot start the {role} `{program}`: {e}")))?;
    let pid = child.id();
    tracing::info!(%job_id, program = %program, pid, "external {role} started");
    // Both streams, line by line, into the job log and the miner's log.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
    for (is_err, stream) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
    ] {
        let Some(stream) = stream else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send((is_err, l));
            }
        });
    }
    drop(tx);
    let stop_in = Duration::from_millis(
        spec.stop_by_unix_ms
            .saturating_sub(tunenet_types::time::now_ms()),
    );
    let stop_at = tokio::time::Instant::now() + stop_in;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut streams_open = true;
    let status = loop {
        tokio::select! {
            line = rx.recv(), if streams_open => match line {
                Some((is_err, l)) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = log.write_all(format!("{}{l}\n", if is_err { "err: " } else { "" }).as_bytes()).await;
                    tracing::info!(%job_id, stream = if is_err { "stderr" } else { "stdout" }, "{role}: {l}");
                    if is_err {
                        tail.push_back(l);
                        if tail.len() > TAIL {
                            tail.pop_front();
                        }
                    }
                }
                None => streams_open = false,
            },
            s = child.wait() => break s.map_err(|e| other(format!("waiting for the {role}: {e}")))?,
            _ = tokio::time::sleep_until(stop_at) => {
                let started = Instant::now();
                if let Some(pid) = pid {
                    // SAFETY: kill(2) on the child's own pid; it has not been reaped (wait
                    // has not returned), so the pid is still ours.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                }
                let grace = GRACE.min(Duration::from_millis(
                    spec.deadline_unix_ms.saturating_sub(tunenet_types::time::now_ms()),
                ));
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                let _ = child.wait().await;
                return Err(other(format!(
                    "the {role} was still running at the deadline less the commit margin, so it was stopped (SIGTERM, then SIGKILL after {:.1} s); nothing it wrote is used",
                    started.elapsed().as_secs_f64()
                )));
            }
        }
    };
    // Drain what is left of its output.
    while let Ok(Some((is_err, l))) =
        tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
    {
        tracing::info!(%job_id, stream = if is_err { "stderr" } else { "stdout" }, "{role}: {l}");
        if is_err {
            tail.push_back(l);
            if tail.len() > TAIL {
                tail.pop_front();
            }
        }
    }
    if !status.success() {
        let said: Vec<String> = tail.into_iter().collect();
        return Err(other(format!(
            "the {role} exited with {status}{}",
            if said.is_empty() {
                String::new()
            } else {
                format!("; its last lines on stderr: {}", said.join(" | "))
            }
        )));
    }
    Ok(())
}

/// The artifact in `out`: a tunenet artifact (`artifact.safetensors`), or a PEFT adapter
/// converted to one. Checked against the job's bounds so a miner does not commit what the
/// validator will refuse.
fn collect(
    out: &Path,
    base: &tunenet_ml::ModelDir,
    bounds: &HparamBounds,
    work: &Path,
) -> Result<Outcome, NodeError> {
    let other = |s: String| NodeError::Other(s);
    let own = out.join(tunenet_ml::ARTIFACT_FILE);
    let peft = out.join(tunenet_ml::PEFT_CONFIG_FILE);
    let (artifact, how) = if own.is_file() {
        (own, "a tunenet artifact".to_string())
    } else if peft.is_file() {
        let a = tunenet_ml::import_peft_adapter(base, out, &work.join("imported"))
            .map_err(|e| other(format!("the trainer's PEFT adapter cannot be used: {e}")))?;
        (a, "a PEFT adapter".to_string())
    } else if out.join(tunenet_ml::WEIGHTS_FILE).is_file()
        || out.join(tunenet_ml::WEIGHTS_INDEX_FILE).is_file()
    {
        let a = tunenet_ml::import_full_weights(base, out, &work.join("imported"))
            .map_err(|e| other(format!("the trainer's full weights cannot be used: {e}")))?;
        (a, "full weights in Hugging Face layout".to_string())
    } else {
        let found: Vec<String> = std::fs::read_dir(out)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(other(format!(
            "the trainer exited 0 but wrote neither {}, a PEFT adapter ({} + {}) nor full weights ({} or {}) to {}; it holds: {}",
            tunenet_ml::ARTIFACT_FILE,
            tunenet_ml::PEFT_CONFIG_FILE,
            tunenet_ml::PEFT_WEIGHTS_FILE,
            tunenet_ml::WEIGHTS_FILE,
            tunenet_ml::WEIGHTS_INDEX_FILE,
            out.display(),
            if found.is_empty() {
                "nothing".into()
            } else {
                found.join(", ")
            }
        )));
    };
    let manifest = tunenet_ml::read_artifact_manifest(&artifact)
        .map_err(|e| other(format!("the trainer's artifact cannot be used: {e}")))?;
    match manifest.method {
        tunenet_ml::Method::Lora { rank, .. } if rank > bounds.max_lora_rank as usize => {
            return Err(other(format!(
                "the trainer's adapter has rank {rank}; this job accepts at most {}",
                bounds.max_lora_rank
            )));
        }
        tunenet_ml::Method::Full if !bounds.allow_full => {
            return Err(other(
                "the trainer fine-tuned every weight; this job accepts LoRA adapters only".into(),
            ));
        }
        _ => {}
    }
    Ok(Outcome { artifact, how })
}
