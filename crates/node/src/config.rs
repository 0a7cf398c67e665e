//! Daemon configuration: TOML files with defaults that run out of the box. Unknown keys
//! are refused and every error names the file, the line and the field.

use crate::error::NodeError;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};
use tunenet_engine::MinerPolicy;
use tunenet_types::{HparamBounds, IntegritySettings, ScoringWeights};

/// Reads and parses a TOML config file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    parse(path, &text)
}

/// Parses TOML config text (the path is only for messages).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, NodeError> {
    toml::from_str(text).map_err(|e| NodeError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// How a miner trains the jobs it takes. Clamped to each job's bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// `lora` or `full`.
    pub method: String,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// Learning rate.
    pub learning_rate: f64,
    /// Most optimiser steps per job.
    pub max_steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Longest sequence in tokens.
    pub max_seq_len: usize,
    /// Seed for batch order and adapter init.
    pub seed: u64,
    /// Seconds kept free before the deadline for saving and committing.
    pub commit_margin_secs: f64,
    /// Train with an external program instead (e.g. `["python3", "train.py"]`): it gets
    /// the job file's path as its last argument and writes a PEFT adapter or a tunenet
    /// artifact (docs/TRAINERS.md). Empty: tunenet's own trainer.
    pub command: Vec<String>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            method: "lora".into(),
            lora_rank: 8,
            lora_alpha: 16.0,
            learning_rate: 2e-3,
            max_steps: 200,
            batch_size: 8,
            max_seq_len: 128,
            seed: 0,
            commit_margin_secs: 3.0,
            command: Vec::new(),
        }
    }
}

/// How many device slots one training job takes: `devices_per_job = 2` or `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicesPerJob {
    /// This many (at least 1).
    Count(usize),
    /// The slots shared out among the jobs the policy runs at once.
    Auto,
}

impl DevicesPerJob {
    /// Slots per job on a miner with `slots` slots running up to `concurrent` jobs.
    pub fn resolve(self, slots: usize, concurrent: usize) -> usize {
        match self {
            DevicesPerJob::Count(n) => n.clamp(1, slots.max(1)),
            DevicesPerJob::Auto => (slots / concurrent.max(1)).max(1),
        }
    }
}

impl Serialize for DevicesPerJob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DevicesPerJob::Count(n) => s.serialize_u64(*n as u64),
            DevicesPerJob::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for DevicesPerJob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DevicesPerJob;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of devices (at least 1) or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<DevicesPerJob, E> {
                if n < 1 {
                    return Err(E::custom(format!(
                        "{n} devices per job: use at least 1, or \"auto\""
                    )));
                }
                Ok(DevicesPerJob::Count(n as usize))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<DevicesPerJob, E> {
                self.visit_i64(n.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DevicesPerJob, E> {
                match v.trim() {
                    "auto" => Ok(DevicesPerJob::Auto),
                    other => Err(E::custom(format!(
                        "{other:?}: write a number of devices per job, or \"auto\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `miner.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinerConfig {
    /// Where the miner keeps its database, blobs and models.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: String,
    /// The ed25519 key file (`tunenet keygen`); created in the data dir if absent.
    pub key_file: Option<PathBuf>,
    /// `cpu` or `cuda:N`: the one device every job shares, when `devices` is empty.
    pub device: String,
    /// Job slots, one job each: `["cuda:0", "cuda:1"]`, `["auto"]` (every GPU of the
    /// inventory; the CPU where there is none) or logical CPU slots `["cpu:0", "cpu:1"]`.
    /// Jobs go to the free slot with the most free memory that their estimate fits, and
    /// `policy.max_concurrent_jobs` is capped at the number of slots. Empty: `device`.
    pub devices: Vec<String>,
    /// Device slots one training job takes at once, for data-parallel training: a number
    /// (1: one device per job), or `"auto"`: as many as the job's time budget needs, judged
    /// from the throughput this miner measured on its last run of the same base model, up
    /// to the slots shared out among `policy.max_concurrent_jobs` jobs (4 GPUs and 1 job
    /// at a time: up to 4; 2 jobs: up to 2 each; every one of those before any run). A job
    /// takes what is free, at least one slot; `max_concurrent_jobs` is capped at the slots
    /// divided by the most a job takes. Ignored with a single shared `device`.
    pub devices_per_job: DevicesPerJob,
    /// Serve Prometheus metrics here (host:port); off when absent.
    pub metrics_listen: Option<String>,
    /// Join the libp2p network: gossip this miner's advert and take jobs over libp2p as
    /// well as gRPC (off when absent).
    pub p2p: Option<tunenet_p2p::P2pConfig>,
    /// How inference jobs run (when `policy.kinds` includes `inference`).
    pub inference: crate::inference::InferenceConfig,
    /// Accept/reject policy.
    pub policy: MinerPolicy,
    /// Training settings.
    pub training: TrainingConfig,
    /// Largest matrix side this miner computes for a validator's benchmark (bounds what a
    /// challenge can make it spend: n = 8192 is 1.1 TFLOP per matrix).
    pub benchmark_max_n: u32,
    /// What this miner asks per device-hour (a GPU, or the CPU when it has none), in
    /// whatever unit the network prices in; 0: not priced. Signed into its adverts and
    /// benchmark answers; validators show cost per job and quality per unit of cost.
    pub price_per_gpu_hour: f64,
    /// Per-address limits on the gRPC server (`[limits]`): connections, requests a
    /// second, HTTP/2 streams and header sizes.
    pub limits: crate::limits::Limits,
    /// PEM certificate chain: with `tls_key`, the miner's gRPC service uses TLS, so the
    /// assignments it is sent (secret nonces included) cross the network encrypted;
    /// validators then list it as `https://…`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert` (readable by its owner only).
    pub tls_key: Option<PathBuf>,
}

impl Default for MinerConfig {
    fn default() -> Self {
        MinerConfig {
            data_dir: PathBuf::from("tunenet-miner"),
            listen: "127.0.0.1:7101".into(),
            key_file: None,
            device: "cpu".into(),
            devices: Vec::new(),
            devices_per_job: DevicesPerJob::Count(1),
            metrics_listen: None,
            p2p: None,
            inference: Default::default(),
            policy: MinerPolicy::default(),
            training: TrainingConfig::default(),
            benchmark_max_n: 8192,
            price_per_gpu_hour: 0.0,
            limits: Default::default(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// One competition a validator runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompetitionConfig {
    /// The competition's id.
    pub id: String,
    /// `fine_tune` (the default) or `inference` (a HellaSwag speed competition: `dataset`
    /// is HellaSwag-layout JSONL, split into one shard per job).
    #[serde(default)]
    pub kind: tunenet_types::JobKind,
    /// The base model: a directory in Hugging Face layout, or a hub id
    /// `hf:owner/name[@revision]` (fetched by the validator and pinned to its commit).
    pub base_model: PathBuf,
    /// The dataset: a JSONL, JSON array, CSV or Parquet file (by extension), or a hub id
    /// `hf:owner/name[@revision]` (its data files: `data/*.parquet` shards, JSONL, JSON or
    /// CSV), read through `fields`.
    pub dataset: PathBuf,
    /// With a hub dataset: only the data files of this split (e.g. `train`).
    #[serde(default)]
    pub dataset_split: Option<String>,
    /// Which fields of the dataset's records hold what (`text`, or `system`,
    /// `instruction`, `input`, `output`, or a `messages` list); unset fields keep their
    /// usual names. Records that fit nothing are counted and logged with their line or row;
    /// a dataset none of whose records fit is refused.
    #[serde(default)]
    pub fields: tunenet_ml::FieldMap,
    /// Inference competitions: the accuracy tolerance, allowed optimisations and the
    /// checks' thresholds.
    #[serde(default)]
    pub inference: tunenet_integrity::inference::InferenceTolerance,
    /// Jobs in the competition; each gets its own shard of the training split.
    #[serde(default = "d_jobs")]
    pub jobs: u32,
    /// Miners assigned per job.
    #[serde(default = "d_miners")]
    pub miners_per_job: u32,
    /// Jobs are not offered until this many miners are known (configured, registered or
    /// found by their p2p adverts).
    #[serde(default = "d_one")]
    pub min_miners: u32,
    /// Jobs in flight at once.
    #[serde(default = "d_one")]
    pub concurrent_jobs: u32,
    /// Training time of the first job, seconds.
    #[serde(default = "d_budget")]
    pub time_budget_secs: u64,
    /// Seconds added to the budget of each later job (the schedule gets harder).
    #[serde(default)]
    pub budget_step_secs: u64,
    /// Each job's shard is this many times the previous one's (1: equal shards).
    #[serde(default = "d_growth")]
    pub shard_growth: f64,
    /// Share of the dataset held back as the hidden test split.
    #[serde(default = "d_test")]
    pub test_fraction: f64,
    /// Seed of the train/test split.
    #[serde(default)]
    pub seed: u64,
    /// Seconds after the deadline in which artifacts may be revealed.
    #[serde(default = "d_reveal")]
    pub reveal_window_secs: u64,
    /// Seconds after the competition finishes in which a miner may dispute its
    /// evaluation receipt (`tunenet console dispute`).
    #[serde(default = "d_dispute")]
    pub dispute_window_secs: u64,
    /// Seconds to wait for decisions on an offer.
    #[serde(default = "d_offer")]
    pub offer_timeout_secs: u64,
    /// Largest artifact accepted, MiB.
    #[serde(default = "d_artifact")]
    pub max_artifact_mb: u64,
    /// Longest sequence the evaluation scores, tokens.
    #[serde(default = "d_seq")]
    pub eval_max_seq_len: usize,
    /// Informational reward per job.
    #[serde(default)]
    pub reward_hint: f64,
    /// Limits on miners' training settings.
    #[serde(default)]
    pub hparams: HparamBounds,
    /// What a miner's verified hardware must meet to be offered this competition's jobs
    /// (`[competitions.hardware]`; empty: every miner).
    #[serde(default)]
    pub hardware: crate::hardware::HardwareRequirement,
    /// How losses become qualities.
    #[serde(default)]
    pub scoring: ScoringWeights,
    /// Integrity check thresholds (changeable while the competition runs).
    #[serde(default)]
    pub integrity: IntegritySettings,
    /// How the validator makes each job's fresh synthetic evaluation set after its
    /// deadline (the basis of the test-leakage check), under a seed drawn then:
    /// `"neighbours"` (the default: each test record with `neighbour_rate` of its answer's
    /// scored words replaced by words the base model, or `synthetic_model`, writes in their
    /// place; one neighbour per test record, judged in pairs), `"rewrite"` (each test
    /// record's prompt perturbed and its answer written anew by the model, keeping its
    /// form), `"demo"` (the demo dataset's generator, for datasets it made), or `"none"`
    /// (no synthetic set, so no leakage check).
    #[serde(default)]
    pub synthetic_generator: Option<String>,
    /// A stronger model directory to rewrite synthetic records with (default: the
    /// competition's base model). It must share the base model's tokenizer.
    #[serde(default)]
    pub synthetic_model: Option<PathBuf>,
    /// Records in each job's synthetic set (0: as many as the test split has). Neighbours
    /// are one per test record, so with `"neighbours"` it must be 0.
    #[serde(default)]
    pub synthetic_records: usize,
    /// With `synthetic_generator = "neighbours"`: the share of each answer's scored words
    /// replaced, in (0, 1].
    #[serde(default = "d_neighbour_rate")]
    pub neighbour_rate: f64,
    /// Records of the dataset held out beside the hidden test split and never released
    /// (None: as many as the test split, which gives the comparison below the most power
    /// for the records it takes, or none with `synthetic_generator = "demo"`,
    /// whose synthetic records are already drawn as the test split is). Both are random
    /// draws from the same records, so a model that saw neither does as well on one as on
    /// the other, and the leakage check compares them exactly: a model trained on the
    /// test split is lower on it than on these. 0 turns the comparison off.
    #[serde(default)]
    pub control_records: Option<usize>,
    /// Secret canary records planted in each job's shard.
    #[serde(default = "d_canaries")]
    pub canaries_per_job: usize,
    /// Never-released sibling canaries kept for each job.
    #[serde(default = "d_siblings")]
    pub sibling_canaries: usize,
    /// Copies of each canary planted in a shard: a miner that trains on its subset sees
    /// each of its canaries this many times an epoch (less the subset's share), enough to
    /// tell training on this job's data from training on anything else.
    #[serde(default = "d_copies")]
    pub canary_copies: usize,
    /// Ordinary records of each shard repeated as often as the canaries, so repetition
    /// does not single the canaries out.
    #[serde(default = "d_decoys")]
    pub repeated_decoys: usize,
    /// Never-released alternatives drawn with each canary, when the competition's
    /// `synthetic_generator` can draw them (then `sibling_canaries` is unused): the
    /// exposure test ranks a model's gain on each canary among its alternatives, exact for
    /// a model that never saw the canary. 0: siblings and the weaker comparison instead.
    #[serde(default = "d_alternatives")]
    pub canary_alternatives: usize,
}

fn d_neighbour_rate() -> f64 {
    tunenet_ml::NEIGHBOUR_RATE
}

fn d_alternatives() -> usize {
    1
}

fn d_copies() -> usize {
    8
}

fn d_decoys() -> usize {
    8
}

fn d_canaries() -> usize {
    16
}

fn d_siblings() -> usize {
    8
}

fn d_growth() -> f64 {
    1.0
}
fn d_jobs() -> u32 {
    2
}
fn d_miners() -> u32 {
    3
}
fn d_one() -> u32 {
    1
}
fn d_budget() -> u64 {
    60
}
fn d_test() -> f64 {
    0.2
}
fn d_reveal() -> u64 {
    60
}
fn d_dispute() -> u64 {
    7 * 24 * 3600
}
fn d_offer() -> u64 {
    10
}
fn d_artifact() -> u64 {
    512
}
fn d_seq() -> usize {
    128
}

impl CompetitionConfig {
    /// Checks the values serde cannot, naming the field.
    pub fn validate(&self) -> Result<(), NodeError> {
        let fail = |reason: String| {
            Err(NodeError::Competition {
                competition: self.id.clone(),
                reason,
            })
        };
        if tunenet_types::CompetitionId::new(self.id.clone()).is_err() {
            return fail("`id` must be 1-64 characters from [A-Za-z0-9._-]".into());
        }
        if self.jobs == 0 {
            return fail("`jobs` must be at least 1".into());
        }
        if self.miners_per_job == 0 {
            return fail("`miners_per_job` must be at least 1".into());
        }
        if self.time_budget_secs == 0 {
            return fail("`time_budget_secs` must be above 0".into());
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return fail(format!(
                "`test_fraction` must lie strictly between 0 and 1, got {}",
                self.test_fraction
            ));
        }
        if !(self.shard_growth.is_finite() && self.shard_growth > 0.0 && self.shard_growth <= 10.0)
        {
            return fail(format!(
                "`shard_growth` must lie in (0, 10], got {}",
                self.shard_growth
            ));
        }
        if self.max_artifact_mb == 0 {
            return fail("`max_artifact_mb` must be above 0".into());
        }
        if let Err(why) = self.scoring.check() {
            return fail(format!("[scoring]: {why}"));
        }
        if let Err(e) = self.hardware.validate() {
            return fail(e);
        }
        if let Some(g) = self.synthetic_generator.as_deref()
            && !SYNTHETIC_GENERATORS.contains(&g)
        {
            return fail(format!(
                "`synthetic_generator` {g:?} is unknown: use \"neighbours\" (the default), \"rewrite\", \"demo\" or \"none\""
            ));
        }
        if self.synthetic_model.is_some()
            && !matches!(self.synthetic(), Some("rewrite" | "neighbours"))
        {
            return fail(
                "`synthetic_model` is used only with synthetic_generator = \"rewrite\" or \"neighbours\"".into(),
            );
        }
        if !(self.neighbour_rate > 0.0 && self.neighbour_rate <= 1.0) {
            return fail(format!(
                "`neighbour_rate` must lie in (0, 1], got {}",
                self.neighbour_rate
            ));
        }
        if self.synthetic() == Some("neighbours") && self.synthetic_records != 0 {
            return fail(format!(
                "`synthetic_records` is {} but neighbours are one per test record: leave it at 0 with synthetic_generator = \"neighbours\"",
                self.synthetic_records
            ));
        }
        Ok(())
    }

    /// How many held-out control records a dataset whose test split has `n_test` records
    /// keeps back (see `control_records`).
    pub fn control_count(&self, n_test: usize) -> usize {
        match self.control_records {
            Some(n) => n,
            None if self.synthetic() == Some("demo") => 0,
            None => n_test,
        }
    }

    /// How this competition's synthetic sets are made (None: it has none).
    pub fn synthetic(&self) -> Option<&str> {
        match self.synthetic_generator.as_deref() {
            None => Some("neighbours"),
            Some("none") => None,
            Some(g) => Some(g),
        }
    }
}

/// The values `synthetic_generator` may take.
pub const SYNTHETIC_GENERATORS: &[&str] = &["rewrite", "neighbours", "demo", "none"];

/// `validator.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidatorConfig {
    /// Where the validator keeps its database and blobs.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: String,
    /// The URL miners use to reach this validator; defaults to `http://<listen>`.
    pub advertise: Option<String>,
    /// The ed25519 key file; created in the data dir if absent.
    pub key_file: Option<PathBuf>,
    /// `cpu` or `cuda:N`, for evaluation.
    pub device: String,
    /// Devices every evaluation is split over (tensor parallelism), for base models larger
    /// than one device: e.g. `["cuda:0", "cuda:1", "cuda:2", "cuda:3"]` (`cpu:N` names a
    /// logical CPU device). The attention heads and the MLP width must divide evenly over
    /// them. Empty: every evaluation runs whole on `device`.
    pub eval_devices: Vec<String>,
    /// Serve Prometheus metrics here (host:port); off when absent.
    pub metrics_listen: Option<String>,
    /// PEM certificate chain: with `tls_key`, the gRPC services (console included) use TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Miners to offer jobs to: gRPC endpoints, or `p2p:<peer id>`.
    pub miners: Vec<String>,
    /// Join the libp2p network: find miners by their adverts, announce competitions, and
    /// carry jobs and blobs over libp2p (off when absent).
    pub p2p: Option<tunenet_p2p::P2pConfig>,
    /// With `[p2p]`: offer jobs to every miner whose advert arrives, besides `miners`.
    pub discover_miners: bool,
    /// How long a job whose submissions are all evaluated waits before it is scored, in
    /// seconds, so that other validators' records of the same artifacts arrive first (a
    /// copy submitted here later than there then fails as a duplicate). Default: 5 with
    /// `[p2p]`, 0 without.
    pub artifact_record_grace_secs: Option<u64>,
    /// Peer ids of the other validators whose signed artifact records are believed (a copy
    /// of an artifact one of them received earlier fails here). Records from anyone else
    /// are ignored: any peer can sign a receipt, and a forged, backdated one would get an
    /// honest miner failed as a copier.
    pub trusted_validators: Vec<String>,
    /// The public, read-only web site (`[web] listen = "host:port"`); off when absent.
    pub web: Option<crate::web::WebConfig>,
    /// Validator quorum: how far (relative to the median) a trusted validator's standing
    /// for a miner may be from the median of all validators' and still agree; further
    /// out, the leaderboard flags it as an outlier with its numbers.
    pub quorum_tolerance: f64,
    /// How miners' hardware is benchmarked and verified (`[hardware]`).
    pub hardware: crate::hardware::HardwareConfig,
    /// Per-address limits on the gRPC server (`[limits]`): connections, requests a
    /// second, HTTP/2 streams, header sizes and failed console logins.
    pub limits: crate::limits::Limits,
    /// Competitions to run.
    pub competitions: Vec<CompetitionConfig>,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            data_dir: PathBuf::from("tunenet-validator"),
            listen: "127.0.0.1:7100".into(),
            advertise: None,
            key_file: None,
            device: "cpu".into(),
            eval_devices: Vec::new(),
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            miners: vec![],
            p2p: None,
            discover_miners: true,
            artifact_record_grace_secs: None,
            trusted_validators: vec![],
            quorum_tolerance: tunenet_types::DEFAULT_QUORUM_TOLERANCE,
            web: None,
            hardware: Default::default(),
            limits: Default::default(),
            competitions: vec![],
        }
    }
}

impl ValidatorConfig {
    /// The address sent to miners: `advertise`, else `listen` (`https://` with TLS on; a
    /// certificate names hosts, so set `advertise` to the name it was issued for).
    pub fn reply_to(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", self.listen))
    }

    /// `artifact_record_grace_secs` in milliseconds, its default applied.
    pub fn artifact_record_grace_ms(&self) -> u64 {
        let default = if self.p2p.is_some() { 5 } else { 0 };
        self.artifact_record_grace_secs
            .unwrap_or(default)
            .saturating_mul(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_config_names_the_field() {
        let err = parse::<MinerConfig>(
            Path::new("m.toml"),
            "listen = \"x\"\n[policy]\nmax_concurrent_jobs = \"two\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_concurrent_jobs"), "{err}");
        let c: MinerConfig = toml::from_str("devices_per_job = \"auto\"\n").unwrap();
        assert_eq!(c.devices_per_job, DevicesPerJob::Auto);
        assert_eq!(c.devices_per_job.resolve(4, 2), 2);
        let c: MinerConfig = toml::from_str("devices_per_job = 3\n").unwrap();
        assert_eq!(c.devices_per_job.resolve(2, 1), 2, "no more than the slots");
        for bad in ["devices_per_job = 0\n", "devices_per_job = \"all\"\n"] {
            let err = toml::from_str::<MinerConfig>(bad).unwrap_err().to_string();
            assert!(
                err.contains("devices_per_job") && err.contains("auto"),
                "{err}"
            );
        }
        assert!(err.contains("m.toml"), "{err}");
        let err = parse::<MinerConfig>(Path::new("m.toml"), "[training]\nlearnin_rate = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("learnin_rate"), "{err}");
    }

    #[test]
    fn defaults_parse_from_empty() {
        let m: MinerConfig = parse(Path::new("m.toml"), "").unwrap();
        assert_eq!(m, MinerConfig::default());
        let v: ValidatorConfig = parse(Path::new("v.toml"), "").unwrap();
        assert_eq!(v.reply_to(), "http://127.0.0.1:7100");
        assert_eq!(v.artifact_record_grace_ms(), 0);
        let tls: ValidatorConfig = parse(
            Path::new("v.toml"),
            "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(tls.reply_to(), "https://127.0.0.1:7100");
        let v: ValidatorConfig = parse(Path::new("v.toml"), "[p2p]\nmdns = false\n").unwrap();
        assert_eq!(v.artifact_record_grace_ms(), 5000);
        let v: ValidatorConfig = parse(
            Path::new("v.toml"),
            "artifact_record_grace_secs = 12\n[p2p]\n",
        )
        .unwrap();
        assert_eq!(v.artifact_record_grace_ms(), 12_000);
    }

    #[test]
    fn bad_competition_values_are_named() {
        let mut c: CompetitionConfig =
            toml::from_str("id = \"c\"\nbase_model = \"m\"\ndataset = \"d\"\n").unwrap();
        c.time_budget_secs = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("time_budget_secs"), "{err}");
    }

    #[test]
    fn neighbours_are_the_default_synthetic_set_and_their_settings_are_checked() {
        let c: CompetitionConfig =
            toml::from_str("id = \"c\"\nbase_model = \"m\"\ndataset = \"d\"\n").unwrap();
        assert_eq!(c.synthetic(), Some("neighbours"));
        assert_eq!(c.neighbour_rate, tunenet_ml::NEIGHBOUR_RATE);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.neighbour_rate = 0.0;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("neighbour_rate"), "{err}");
        let mut bad = c.clone();
        bad.synthetic_records = 12;
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("synthetic_records") && err.contains("one per test record"),
            "{err}"
        );
        // A rewritten set may be any size.
        bad.synthetic_generator = Some("rewrite".into());
        bad.validate().unwrap();
        bad.synthetic_generator = Some("paraphrase".into());
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("\"neighbours\" (the default)"), "{err}");
    }

    #[test]
    fn the_shipped_deploy_configs_parse() {
        let m = parse::<MinerConfig>(
            Path::new("deploy/miner.toml"),
            include_str!("../../../deploy/miner.toml"),
        )
        .unwrap();
        assert_eq!(m.inference.quantize, "q8_0");
        // The documented limits are the defaults.
        assert_eq!(m.limits, crate::limits::Limits::default());
        let v = parse::<ValidatorConfig>(
            Path::new("deploy/validator.toml"),
            include_str!("../../../deploy/validator.toml"),
        )
        .unwrap();
        assert_eq!(v.limits, crate::limits::Limits::default());
        let c = &v.competitions[0];
        c.validate().unwrap();
        assert_eq!(c.sibling_canaries, 8);
        assert_eq!(c.integrity.leak_alpha, 0.001);
    }

    #[test]
    fn the_documented_inference_section_is_the_default() {
        // deploy/validator.toml documents every key of [competitions.inference], commented
        // out at its default: uncommented, it must parse to exactly the defaults.
        let doc = include_str!("../../../deploy/validator.toml");
        let section: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("# [competitions.inference]"))
            .skip(1)
            .take_while(|l| l.starts_with("# "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        assert!(section.contains("dense_loglik_per_token"), "{section}");
        let tol: tunenet_integrity::inference::InferenceTolerance =
            toml::from_str(&section).unwrap_or_else(|e| panic!("{e}\n{section}"));
        assert_eq!(tol, Default::default());
    }
}
