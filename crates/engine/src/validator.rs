//! The validator side of a competition: offer each job, assign it to the miners that
//! accept, take signed commitments until the deadline, take reveals after it, have each
//! revealed artifact evaluated, and score the job (qualities with mean 1).

use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tunenet_types::{
    Assignment, BlobId, Commitment, CompetitionId, Decision, DecisionReply, HparamBounds, Identity,
    IntegritySettings, JobId, JobKind, JobScore, Offer, Outcome, PeerIdStr, Receipt,
    ScoringWeights, UnixMillis, UploadHeader, Verdict, commit_hash,
};

/// The most different commitments one miner may make to one job (each replaces the last;
/// their receipts are all kept so a re-sent one changes nothing).
pub const MAX_COMMITMENTS_PER_JOB: usize = 16;

/// One job of a competition, as planned before it starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobPlan {
    /// The job's id.
    pub job_id: JobId,
    /// The base model's manifest blob.
    pub base_model: BlobId,
    /// The base model's parameter count.
    pub base_params: u64,
    /// The training shard blob.
    pub train_shard: BlobId,
    /// Records in the shard.
    pub shard_records: u64,
    /// Training time allowed from assignment to deadline.
    pub time_budget_ms: u64,
    /// Informational reward.
    pub reward_hint: f64,
    /// The base's `config.json`, sent with offers for the miners' memory estimates.
    #[serde(default)]
    pub model_config: String,
}

/// A competition: its jobs and the rules that apply to all of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompetitionPlan {
    /// The competition's id.
    pub id: CompetitionId,
    /// The jobs, started in order.
    pub jobs: Vec<JobPlan>,
    /// How many miners each job is assigned to (at most).
    pub miners_per_job: u32,
    /// How many jobs may be in flight at once.
    pub concurrent_jobs: u32,
    /// Limits on training settings.
    pub hparams: HparamBounds,
    /// How losses become qualities.
    pub scoring: ScoringWeights,
    /// How long after the deadline artifacts may be revealed.
    pub reveal_window_ms: u64,
    /// How long to wait for miners to answer an offer.
    pub offer_timeout_ms: u64,
    /// Largest artifact accepted.
    pub max_artifact_bytes: u64,
    /// Where miners reach this validator (sent in offers).
    pub reply_to: String,
    /// Hardware the jobs are sized for, informational.
    pub hardware: String,
    /// Integrity thresholds (changeable while the competition runs).
    #[serde(default)]
    pub integrity: IntegritySettings,
    /// Every submission must be scored on a synthetic set drawn after the deadline too: a
    /// job whose evaluations lack one (or its per-record losses, which the leakage check
    /// needs) is not scored at all, with the reason, rather than scored without the check.
    #[serde(default)]
    pub requires_synthetic: bool,
}

/// Where a job is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobPhase {
    /// Not started.
    Pending,
    /// Offers sent; waiting for decisions.
    Offering {
        /// When the offers went out.
        since: UnixMillis,
    },
    /// Assigned; miners train and commit until the deadline.
    Running {
        /// No commitment after this.
        deadline: UnixMillis,
    },
    /// Past the deadline; artifacts are revealed and evaluated.
    Revealing {
        /// The deadline that passed.
        deadline: UnixMillis,
        /// No reveal after this.
        until: UnixMillis,
    },
    /// Scored (or abandoned, with the reason).
    Done {
        /// Why the job ended without scores, if it did.
        note: Option<String>,
    },
}

/// The state of one offer to one miner address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OfferState {
    /// Sent; no answer yet.
    Sent,
    /// Accepted by this miner.
    Accepted {
        /// The miner at the address.
        miner: PeerIdStr,
        /// Arrival order, so the first accepters are assigned.
        order: u32,
    },
    /// Rejected, with the miner's reason.
    Rejected {
        /// The miner at the address.
        miner: PeerIdStr,
        /// The reason it gave.
        reason: String,
    },
    /// Not delivered yet (the miner was unreachable); sent again at `retry_at` while the
    /// offer window lasts, so a miner that starts listening late still gets the job.
    Retrying {
        /// What went wrong last time.
        error: String,
        /// Deliveries tried so far.
        attempts: u32,
        /// When to send it again.
        retry_at: UnixMillis,
    },
    /// The offer could not be delivered or answered.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// What happened to one assigned miner's submission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SubmissionState {
    /// Assigned; nothing revealed yet.
    Waiting,
    /// Revealed and stored; being evaluated.
    Uploaded {
        /// The artifact.
        artifact: BlobId,
    },
    /// Evaluated.
    Evaluated {
        /// The artifact.
        artifact: BlobId,
        /// Mean token loss on the hidden test split.
        test_loss: f64,
        /// Mean token loss on the job's synthetic set, when it has one.
        #[serde(default)]
        synthetic_loss: Option<f64>,
        /// The integrity checks' verdicts.
        #[serde(default)]
        verdicts: Vec<Verdict>,
        /// The delta sketch, for near-duplicate checks across submissions.
        #[serde(default)]
        sketch: Vec<f32>,
        /// Each hidden test record's mean token loss, in the split's order (None: nothing
        /// to score in it), for the per-record leakage test at job end.
        #[serde(default)]
        test_records: Vec<Option<f64>>,
        /// Each synthetic record's mean token loss, likewise.
        #[serde(default)]
        synthetic_records: Vec<Option<f64>>,
        /// Each held-out control record's mean token loss, likewise (empty: the
        /// competition keeps none).
        #[serde(default)]
        control_records: Vec<Option<f64>>,
    },
    /// Gets the penalty; the reason says why.
    Failed {
        /// Why, in words.
        reason: String,
        /// The integrity checks' verdicts, when the failure is theirs.
        #[serde(default)]
        verdicts: Vec<Verdict>,
        /// The artifact, when one was revealed and stored: a failed submission is still
        /// the original that a later copy of it is named against.
        #[serde(default)]
        artifact: Option<BlobId>,
        /// Its delta sketch, when it was evaluated, for the same reason.
        #[serde(default)]
        sketch: Vec<f32>,
    },
}

/// One assigned miner within a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerSlot {
    /// The miner's address.
    pub addr: String,
    /// The signed assignment it was sent.
    pub assignment: Assignment,
    /// Its latest commitment before the deadline.
    pub commitment: Option<Commitment>,
    /// The receipt given for that commitment.
    pub receipt: Option<Receipt>,
    /// Receipts of this miner's earlier commitments to the job, superseded by a later one:
    /// a re-sent earlier commitment gets its first receipt back and changes nothing.
    #[serde(default)]
    pub superseded: Vec<Receipt>,
    /// The submission's state.
    pub submission: SubmissionState,
}

/// A job's whole state: stored after every change, so a restarted validator resumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// The competition.
    pub competition_id: CompetitionId,
    /// The plan.
    pub plan: JobPlan,
    /// The phase.
    pub phase: JobPhase,
    /// Offers by miner address.
    pub offers: BTreeMap<String, OfferState>,
    /// Assigned miners.
    pub slots: BTreeMap<PeerIdStr, MinerSlot>,
    /// Scores, once the job is done.
    pub scores: Vec<JobScore>,
    /// Seed of the job's synthetic evaluation set, drawn when the deadline passes (so no
    /// miner could have trained on the set); None before, and for jobs stored earlier.
    #[serde(default)]
    pub synthetic_seed: Option<u64>,
    /// Offers not delivered so far, by miner address: how many tries each has had.
    #[serde(default)]
    pub retries: BTreeMap<String, u32>,
    /// When every submission was first found settled (evaluated or failed): scoring waits
    /// a grace period after it for other validators' artifact records.
    #[serde(default)]
    pub settled_at: Option<UnixMillis>,
    /// The base model's own per-record losses on the test and synthetic records,
    /// from the first evaluation that measured them: the one model sure never to have
    /// seen the test split, against which the leakage test screens its references.
    #[serde(default)]
    pub base_records: Option<BaseRecords>,
    /// The job's synthetic set as stored (JSON lines), once evaluation made it.
    #[serde(default)]
    pub synthetic_set: Option<BlobId>,
}

/// The base model's per-record mean token losses on a job's test and synthetic sets, in each set's
/// order (None: nothing to score in that record).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseRecords {
    /// On the hidden test split.
    pub test: Vec<Option<f64>>,
    /// On the synthetic set (empty: the job has none, or it is not drawn alike).
    #[serde(default)]
    pub synthetic: Vec<Option<f64>>,
    /// On the held-out control records (empty: the job has none).
    #[serde(default)]
    pub control: Vec<Option<f64>>,
}

/// Why the validator refused a commitment or an upload. Each says what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidatorError {
    /// No such job.
    #[error("unknown job `{0}`: it was never offered by this validator")]
    UnknownJob(JobId),
    /// The miner is not assigned to the job.
    #[error("miner {miner} is not assigned to job {job}")]
    NotAssigned {
        /// The job.
        job: JobId,
        /// The miner.
        miner: PeerIdStr,
    },
    /// The signature or key is bad.
    #[error("commitment signature does not verify: {0}")]
    BadSignature(String),
    /// Past the deadline.
    #[error(
        "commitment for job {job} arrived at {now}, after the deadline {deadline} (ms since epoch)"
    )]
    TooLate {
        /// The job.
        job: JobId,
        /// The deadline.
        deadline: UnixMillis,
        /// When it arrived.
        now: UnixMillis,
    },
    /// The artifact is over the limit.
    #[error("artifact of {size} bytes is over the job's limit of {limit} bytes")]
    TooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A reveal before the deadline.
    #[error("job {job} is still running: reveal the artifact after the deadline {deadline}")]
    TooEarly {
        /// The job.
        job: JobId,
        /// The deadline.
        deadline: UnixMillis,
    },
    /// A reveal with no commitment.
    #[error("no commitment from {miner} for job {job}: commit before the deadline, then upload")]
    NoCommitment {
        /// The job.
        job: JobId,
        /// The miner.
        miner: PeerIdStr,
    },
    /// The revealed artifact and salt do not match the commitment.
    #[error("upload does not match the commitment: {0}")]
    CommitMismatch(String),
    /// The reveal window is over or the job is done.
    #[error("job {0} no longer takes uploads (reveal window over)")]
    Closed(JobId),
    /// A miner changed its commitment too often.
    #[error("job {job}: already {limit} different commitments from this miner; its latest stands")]
    TooManyCommitments {
        /// The job.
        job: JobId,
        /// The most commitments one miner may make to one job.
        limit: usize,
    },
    /// Already revealed.
    #[error("job {job}: {miner} already uploaded its artifact")]
    AlreadyUploaded {
        /// The job.
        job: JobId,
        /// The miner.
        miner: PeerIdStr,
    },
}

/// Things that happen to the validator, other than commit and upload (which answer at once).
/// What the validator's evaluation found for one artifact.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Mean token loss on the hidden test split (None when a check failed first).
    pub test_loss: Option<f64>,
    /// Mean token loss on the job's synthetic set (None when the job has none).
    pub synthetic_loss: Option<f64>,
    /// The per-artifact integrity verdicts.
    pub verdicts: Vec<Verdict>,
    /// The delta sketch for cross-submission checks.
    pub sketch: Vec<f32>,
    /// Each hidden test record's mean token loss, in the split's order (empty when not
    /// measured), for the per-record leakage test at job end.
    pub test_records: Vec<Option<f64>>,
    /// Each synthetic record's mean token loss, in the set's order (empty when not measured).
    pub synthetic_records: Vec<Option<f64>>,
    /// Each held-out control record's mean token loss (empty when the competition keeps none).
    pub control_records: Vec<Option<f64>>,
    /// The base model's per-record losses on the same sets (None: not measured), kept
    /// once per job for the leakage test.
    pub base_records: Option<BaseRecords>,
    /// The job's synthetic set as stored (JSON lines), when it has one: named in the
    /// evaluation receipts and published when the competition ends.
    pub synthetic_set: Option<BlobId>,
}

pub enum ValidatorInput {
    /// Time passed.
    Tick,
    /// A miner answered an offer, or the offer failed.
    Decision {
        /// The job.
        job_id: JobId,
        /// The miner's address.
        addr: String,
        /// Its answer, or why there is none.
        reply: Result<DecisionReply, String>,
    },
    /// An assignment was delivered, or failed.
    Assigned {
        /// The job.
        job_id: JobId,
        /// The miner.
        miner: PeerIdStr,
        /// Ok, or why it failed.
        result: Result<(), String>,
    },
    /// An evaluation finished.
    Evaluated {
        /// The job.
        job_id: JobId,
        /// The miner.
        miner: PeerIdStr,
        /// The test loss, or why evaluation failed (the artifact gets the penalty).
        result: Result<Evaluation, String>,
    },
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq)]
pub enum ValidatorEffect {
    /// Send an offer to a miner address; answer with [`ValidatorInput::Decision`].
    SendOffer {
        /// The miner's address.
        addr: String,
        /// The offer.
        offer: Offer,
    },
    /// Deliver an assignment; answer with [`ValidatorInput::Assigned`].
    SendAssignment {
        /// The miner's address.
        addr: String,
        /// The signed assignment.
        assignment: Assignment,
    },
    /// Evaluate a stored artifact; answer with [`ValidatorInput::Evaluated`].
    Evaluate {
        /// The job.
        job_id: JobId,
        /// The miner.
        miner: PeerIdStr,
        /// The artifact blob.
        artifact: BlobId,
    },
    /// Store this job state.
    Persist(Box<JobState>),
    /// Store this job's state soon (it changed in a way a restart can redo: an offer's
    /// answer, which a re-sent offer gets again); the caller batches these, so that a job
    /// offered to N miners is not written N times whole.
    PersistSoon(JobId),
    /// A job was scored.
    JobFinished {
        /// The job.
        job_id: JobId,
        /// Its scores.
        scores: Vec<JobScore>,
    },
    /// Every job of the competition is done.
    CompetitionFinished(CompetitionId),
    /// Something an operator wants to see, one line.
    Event(String),
}

/// The validator's state machine for one competition.
pub struct ValidatorEngine {
    identity: Identity,
    plan: CompetitionPlan,
    miners: Vec<String>,
    jobs: BTreeMap<JobId, JobState>,
    order: Vec<JobId>,
    finished_announced: bool,
    paused: bool,
    min_miners: usize,
    inference: Option<tunenet_types::InferenceTerms>,
    banned: BTreeMap<PeerIdStr, String>,
    /// Artifacts other validators received, by their signed records (verified by the
    /// runtime): a copy of one of them fails here too when its receipt is later.
    foreign: Vec<tunenet_types::ArtifactRecord>,
    settle_grace_ms: u64,
}

impl ValidatorEngine {
    /// A fresh competition, or one resumed from stored job states (`stored`).
    pub fn new(
        identity: Identity,
        plan: CompetitionPlan,
        miners: Vec<String>,
        stored: Vec<JobState>,
    ) -> Self {
        let mut stored: BTreeMap<JobId, JobState> = stored
            .into_iter()
            .map(|j| (j.plan.job_id.clone(), j))
            .collect();
        let mut jobs = BTreeMap::new();
        let mut order = Vec::new();
        for p in &plan.jobs {
            let st = stored.remove(&p.job_id).unwrap_or_else(|| JobState {
                competition_id: plan.id.clone(),
                plan: p.clone(),
                phase: JobPhase::Pending,
                offers: BTreeMap::new(),
                slots: BTreeMap::new(),
                scores: Vec::new(),
                synthetic_seed: None,
                retries: BTreeMap::new(),
                settled_at: None,
                base_records: None,
                synthetic_set: None,
            });
            order.push(p.job_id.clone());
            jobs.insert(p.job_id.clone(), st);
        }
        ValidatorEngine {
            identity,
            plan,
            miners,
            jobs,
            order,
            finished_announced: false,
            paused: false,
            min_miners: 1,
            inference: None,
            banned: BTreeMap::new(),
            foreign: Vec::new(),
            settle_grace_ms: 0,
        }
    }

    /// How long a job whose submissions are all evaluated waits before it is scored, so
    /// that other validators' records of the same artifacts can arrive (0: none).
    pub fn set_settle_grace(&mut self, ms: u64) {
        self.settle_grace_ms = ms;
    }

    /// Adds another validator's record of an artifact it received. The runtime verifies
    /// the signatures first; records signed by this validator are ignored.
    pub fn add_foreign(&mut self, record: tunenet_types::ArtifactRecord) {
        if record.receipt.validator == self.identity.peer_id()
            || self.foreign.iter().any(|r| {
                r.receipt.validator == record.receipt.validator
                    && r.receipt.job_id == record.receipt.job_id
                    && r.receipt.miner == record.receipt.miner
            })
        {
            return;
        }
        self.foreign.push(record);
    }

    /// The signed record of a submission this validator evaluated, to tell the others.
    pub fn artifact_record(
        &self,
        job_id: &JobId,
        miner: &PeerIdStr,
    ) -> Option<tunenet_types::ArtifactRecord> {
        let slot = self.jobs.get(job_id)?.slots.get(miner)?;
        let SubmissionState::Evaluated {
            artifact, sketch, ..
        } = &slot.submission
        else {
            return None;
        };
        let mut r = tunenet_types::ArtifactRecord {
            receipt: slot.receipt.clone()?,
            artifact: *artifact,
            sketch: sketch.clone(),
            signature: vec![],
        };
        r.signature = self.identity.sign(&r.signing_bytes());
        Some(r)
    }

    /// Holds new jobs back (jobs in flight go on) or lets them start again.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// New jobs wait until at least `n` miner addresses are known (at least 1), so miners
    /// found one by one over p2p all get the first offers.
    pub fn set_min_miners(&mut self, n: usize) {
        self.min_miners = n.max(1);
    }

    /// Makes the competition's jobs inference jobs with these terms (None: fine-tuning).
    /// The commit-reveal flow is the same; the miner commits to its results instead of an
    /// artifact, and the commitment's receipt time is when the validator timed it.
    pub fn set_inference(&mut self, terms: Option<tunenet_types::InferenceTerms>) {
        self.inference = terms;
    }

    /// The inference terms, for an inference competition.
    pub fn inference(&self) -> Option<&tunenet_types::InferenceTerms> {
        self.inference.as_ref()
    }

    /// Whether new jobs are held back.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Replaces the miner addresses new jobs are offered to.
    pub fn set_miners(&mut self, miners: Vec<String>) {
        self.miners = miners;
    }

    /// Changes the integrity thresholds; they apply to submissions evaluated from now on.
    pub fn set_integrity(&mut self, settings: IntegritySettings) {
        self.plan.integrity = settings;
    }

    /// Replaces the banned miners (id → reason): their acceptances count as rejections.
    pub fn set_banned(&mut self, banned: BTreeMap<PeerIdStr, String>) {
        self.banned = banned;
    }

    /// Ends the competition early: jobs not yet started are closed with a note; jobs in
    /// flight finish and are scored.
    pub fn stop(&mut self) -> Vec<ValidatorEffect> {
        let mut fx = Vec::new();
        for job in self.jobs.values_mut() {
            if job.phase == JobPhase::Pending {
                job.phase = JobPhase::Done {
                    note: Some("stopped by the competition admin".into()),
                };
                fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
            }
        }
        fx
    }

    /// The competition plan.
    pub fn plan(&self) -> &CompetitionPlan {
        &self.plan
    }

    /// A job's state.
    pub fn job(&self, id: &JobId) -> Option<&JobState> {
        self.jobs.get(id)
    }

    /// All jobs, in plan order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobState> {
        self.order.iter().filter_map(|id| self.jobs.get(id))
    }

    /// Whether every job is done.
    pub fn is_finished(&self) -> bool {
        self.jobs
            .values()
            .all(|j| matches!(j.phase, JobPhase::Done { .. }))
    }

    /// Effects a restarted validator must redo: offers whose answers were not stored
    /// (a miner answers a repeated offer as before), assignments that may not have left
    /// before the restart (a miner takes the same assignment again as a no-op), and
    /// evaluations that were under way.
    pub fn resume(&self, now: UnixMillis) -> Vec<ValidatorEffect> {
        let mut out = Vec::new();
        for j in self.jobs() {
            if let JobPhase::Running { deadline } = j.phase
                && deadline > now
            {
                for slot in j.slots.values() {
                    if slot.commitment.is_none() && slot.submission == SubmissionState::Waiting {
                        out.push(ValidatorEffect::SendAssignment {
                            addr: slot.addr.clone(),
                            assignment: slot.assignment.clone(),
                        });
                    }
                }
            }
            if matches!(j.phase, JobPhase::Offering { .. }) {
                let offers = Offers::new(&self.plan, &self.identity, &self.inference, &j.plan);
                for (addr, o) in &j.offers {
                    if matches!(o, OfferState::Sent) {
                        out.push(ValidatorEffect::SendOffer {
                            addr: addr.clone(),
                            offer: offers.to(addr),
                        });
                    }
                }
            }
            for (miner, slot) in &j.slots {
                if let SubmissionState::Uploaded { artifact } = &slot.submission {
                    out.push(ValidatorEffect::Evaluate {
                        job_id: j.plan.job_id.clone(),
                        miner: miner.clone(),
                        artifact: *artifact,
                    });
                }
            }
        }
        out
    }

    /// Handles an input.
    pub fn handle(
        &mut self,
        input: ValidatorInput,
        now: UnixMillis,
        rng: &mut dyn RngCore,
    ) -> Vec<ValidatorEffect> {
        let mut fx = Vec::new();
        match input {
            ValidatorInput::Tick => {}
            ValidatorInput::Decision {
                job_id,
                addr,
                reply,
            } => self.on_decision(&job_id, addr, reply, now, &mut fx),
            ValidatorInput::Assigned {
                job_id,
                miner,
                result,
            } => {
                // Only a slot still waiting fails: an answer lost on the way back may
                // follow an assignment that arrived, and its commitment may be here.
                if let (Err(e), Some(job)) = (result, self.jobs.get_mut(&job_id))
                    && let Some(slot) = job.slots.get_mut(&miner)
                    && slot.commitment.is_none()
                    && slot.submission == SubmissionState::Waiting
                {
                    slot.submission = SubmissionState::Failed {
                        verdicts: vec![],
                        reason: format!("assignment could not be delivered: {e}"),
                        artifact: None,
                        sketch: vec![],
                    };
                    fx.push(ValidatorEffect::Event(format!(
                        "job {job_id}: assignment to {miner} failed: {e}"
                    )));
                    fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                }
            }
            ValidatorInput::Evaluated {
                job_id,
                miner,
                result,
            } => {
                if let Some(job) = self.jobs.get_mut(&job_id)
                    && job
                        .slots
                        .get(&miner)
                        .is_some_and(|s| matches!(s.submission, SubmissionState::Uploaded { .. }))
                    && let Ok(Evaluation {
                        base_records: Some(base),
                        ..
                    }) = &result
                    && job.base_records.is_none()
                    && base.test.len() == result.as_ref().map_or(0, |e| e.test_records.len())
                {
                    job.base_records = Some(base.clone());
                }
                if let Some(job) = self.jobs.get_mut(&job_id)
                    && let Ok(Evaluation {
                        synthetic_set: Some(set),
                        ..
                    }) = &result
                {
                    job.synthetic_set = Some(*set);
                }
                if let Some(job) = self.jobs.get_mut(&job_id)
                    && let Some(slot) = job.slots.get_mut(&miner)
                    && let SubmissionState::Uploaded { artifact } = slot.submission.clone()
                {
                    slot.submission = match result {
                        Ok(ev) if ev.verdicts.iter().any(|v| v.outcome == Outcome::Fail) => {
                            let reason = failed_reasons(&ev.verdicts);
                            fx.push(ValidatorEffect::Event(format!(
                                "job {job_id}: {miner} failed integrity: {reason}"
                            )));
                            SubmissionState::Failed {
                                reason,
                                verdicts: ev.verdicts,
                                artifact: Some(artifact),
                                sketch: ev.sketch,
                            }
                        }
                        Ok(Evaluation {
                            test_loss: Some(test_loss),
                            synthetic_loss,
                            verdicts,
                            sketch,
                            test_records,
                            synthetic_records,
                            control_records,
                            ..
                        }) if test_loss.is_finite() => {
                            let synthetic_loss = synthetic_loss.filter(|l| l.is_finite());
                            fx.push(ValidatorEffect::Event(format!(
                                "job {job_id}: {miner} test loss {test_loss:.4}{}",
                                synthetic_loss
                                    .map(|l| format!(", synthetic loss {l:.4}"))
                                    .unwrap_or_default()
                            )));
                            SubmissionState::Evaluated {
                                artifact,
                                test_loss,
                                synthetic_loss,
                                verdicts,
                                sketch,
                                test_records,
                                synthetic_records,
                                control_records,
                            }
                        }
                        Ok(ev) => SubmissionState::Failed {
                            verdicts: ev.verdicts,
                            reason: format!("evaluation gave no finite loss ({:?})", ev.test_loss),
                            artifact: Some(artifact),
                            sketch: ev.sketch,
                        },
                        Err(e) => SubmissionState::Failed {
                            verdicts: vec![],
                            reason: format!("artifact could not be evaluated: {e}"),
                            artifact: Some(artifact),
                            sketch: vec![],
                        },
                    };
                    fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                }
            }
        }
        self.advance(now, rng, &mut fx);
        fx
    }

    fn on_decision(
        &mut self,
        job_id: &JobId,
        addr: String,
        reply: Result<DecisionReply, String>,
        now: UnixMillis,
        fx: &mut Vec<ValidatorEffect>,
    ) {
        let offer_timeout = self.plan.offer_timeout_ms;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if !matches!(job.offers.get(&addr), Some(OfferState::Sent)) {
            return; // unknown address or already answered
        }
        let attempts = job.retries.get(&addr).copied().unwrap_or(0) + 1;
        let accepted = job
            .offers
            .values()
            .filter(|o| matches!(o, OfferState::Accepted { .. }))
            .count() as u32;
        let me = self.identity.peer_id();
        let state = match reply {
            Ok(r) if &r.job_id != job_id => OfferState::Failed {
                error: format!("answered about job {} instead", r.job_id),
            },
            Ok(r) if matches!(r.decision, Decision::Accept) && r.verify(&me).is_err() => {
                // Whoever answers at an address could otherwise accept in another miner's
                // name, and that miner would be penalised for the commitment it never
                // knew it owed.
                let why = r
                    .verify(&me)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                fx.push(ValidatorEffect::Event(format!(
                    "job {job_id}: {addr} accepted in the name of {} without its signature ({why}); not assigned",
                    r.miner
                )));
                OfferState::Failed {
                    error: format!(
                        "the acceptance is not signed by the miner it names ({}): {why}",
                        r.miner
                    ),
                }
            }
            Ok(r)
                if matches!(r.decision, Decision::Accept) && self.banned.contains_key(&r.miner) =>
            {
                let reason = format!("banned: {}", self.banned[&r.miner]);
                fx.push(ValidatorEffect::Event(format!(
                    "job {job_id}: {} is banned; not assigned",
                    r.miner
                )));
                OfferState::Rejected {
                    miner: r.miner,
                    reason,
                }
            }
            Ok(r) => match r.decision {
                Decision::Accept => {
                    fx.push(ValidatorEffect::Event(format!(
                        "job {job_id}: {} accepted",
                        r.miner
                    )));
                    OfferState::Accepted {
                        miner: r.miner,
                        order: accepted,
                    }
                }
                Decision::Reject(reason) => {
                    fx.push(ValidatorEffect::Event(format!(
                        "job {job_id}: {} rejected: {reason}",
                        r.miner
                    )));
                    OfferState::Rejected {
                        miner: r.miner,
                        reason: reason.to_string(),
                    }
                }
            },
            Err(error) => {
                // A miner that is not listening yet (still starting, restarting) gets the
                // offer again while the offer window lasts.
                let retry_at = now + retry_delay_ms(attempts);
                let open = match job.phase {
                    JobPhase::Offering { since } => retry_at < since + offer_timeout,
                    _ => false,
                };
                if open {
                    job.retries.insert(addr.clone(), attempts);
                    fx.push(ValidatorEffect::Event(format!(
                        "job {job_id}: offer to {addr} not delivered ({error}); retrying (attempt {attempts})"
                    )));
                    OfferState::Retrying {
                        error,
                        attempts,
                        retry_at,
                    }
                } else {
                    fx.push(ValidatorEffect::Event(format!(
                        "job {job_id}: offer to {addr} failed after {attempts} attempts: {error}"
                    )));
                    OfferState::Failed { error }
                }
            }
        };
        job.offers.insert(addr, state);
        fx.push(ValidatorEffect::PersistSoon(job_id.clone()));
    }

    /// Takes a commitment: checks it and returns the signed receipt.
    pub fn commit(
        &mut self,
        c: Commitment,
        now: UnixMillis,
    ) -> Result<(Receipt, Vec<ValidatorEffect>), ValidatorError> {
        let max = self.plan.max_artifact_bytes;
        let job = self
            .jobs
            .get_mut(&c.job_id)
            .ok_or_else(|| ValidatorError::UnknownJob(c.job_id.clone()))?;
        let deadline = match job.phase {
            JobPhase::Running { deadline } => deadline,
            JobPhase::Revealing { deadline, .. } => deadline,
            JobPhase::Done { .. } => {
                return Err(ValidatorError::Closed(c.job_id.clone()));
            }
            JobPhase::Pending | JobPhase::Offering { .. } => {
                return Err(ValidatorError::NotAssigned {
                    job: c.job_id.clone(),
                    miner: c.miner.clone(),
                });
            }
        };
        let slot = job
            .slots
            .get_mut(&c.miner)
            .ok_or_else(|| ValidatorError::NotAssigned {
                job: c.job_id.clone(),
                miner: c.miner.clone(),
            })?;
        c.verify()
            .map_err(|e| ValidatorError::BadSignature(e.to_string()))?;
        // Idempotent: the first receipt of a (job, miner, commitment) stands. A commitment
        // is signed by its miner, so anyone who saw it can re-send it; moving its receipt
        // later would hand the earlier time to whoever committed the same artifact between.
        if let Some(r) = slot
            .receipt
            .iter()
            .chain(slot.superseded.iter())
            .find(|r| r.commit == c.commit)
        {
            return Ok((r.clone(), vec![]));
        }
        if now > deadline {
            return Err(ValidatorError::TooLate {
                job: c.job_id.clone(),
                deadline,
                now,
            });
        }
        if c.artifact_size > max {
            return Err(ValidatorError::TooLarge {
                size: c.artifact_size,
                limit: max,
            });
        }
        if slot.superseded.len() + 1 >= MAX_COMMITMENTS_PER_JOB {
            return Err(ValidatorError::TooManyCommitments {
                job: c.job_id.clone(),
                limit: MAX_COMMITMENTS_PER_JOB,
            });
        }
        let mut receipt = Receipt {
            job_id: c.job_id.clone(),
            miner: c.miner.clone(),
            commit: c.commit,
            received_at_ms: now,
            validator: self.identity.peer_id(),
            validator_key: self.identity.public_key_bytes(),
            signature: vec![],
        };
        receipt.signature = self.identity.sign(&receipt.signing_bytes());
        let event = format!(
            "job {}: commitment from {} ({} bytes)",
            c.job_id, c.miner, c.artifact_size
        );
        slot.commitment = Some(c);
        if let Some(previous) = slot.receipt.replace(receipt.clone()) {
            slot.superseded.push(previous);
        }
        Ok((
            receipt,
            vec![
                ValidatorEffect::Event(event),
                ValidatorEffect::Persist(Box::new(job.clone())),
            ],
        ))
    }

    /// Checks an upload's header before any byte is received.
    pub fn check_upload(&self, h: &UploadHeader, now: UnixMillis) -> Result<(), ValidatorError> {
        let job = self
            .jobs
            .get(&h.job_id)
            .ok_or_else(|| ValidatorError::UnknownJob(h.job_id.clone()))?;
        let slot = job
            .slots
            .get(&h.miner)
            .ok_or_else(|| ValidatorError::NotAssigned {
                job: h.job_id.clone(),
                miner: h.miner.clone(),
            })?;
        match job.phase {
            JobPhase::Running { deadline } if now <= deadline => {
                return Err(ValidatorError::TooEarly {
                    job: h.job_id.clone(),
                    deadline,
                });
            }
            JobPhase::Done { .. } => return Err(ValidatorError::Closed(h.job_id.clone())),
            JobPhase::Revealing { until, .. } if now > until => {
                return Err(ValidatorError::Closed(h.job_id.clone()));
            }
            _ => {}
        }
        if !matches!(slot.submission, SubmissionState::Waiting) {
            return Err(ValidatorError::AlreadyUploaded {
                job: h.job_id.clone(),
                miner: h.miner.clone(),
            });
        }
        let c = slot
            .commitment
            .as_ref()
            .ok_or_else(|| ValidatorError::NoCommitment {
                job: h.job_id.clone(),
                miner: h.miner.clone(),
            })?;
        if h.size > self.plan.max_artifact_bytes {
            return Err(ValidatorError::TooLarge {
                size: h.size,
                limit: self.plan.max_artifact_bytes,
            });
        }
        if h.size != c.artifact_size {
            return Err(ValidatorError::CommitMismatch(format!(
                "size {} differs from the committed {}",
                h.size, c.artifact_size
            )));
        }
        if commit_hash(&h.artifact, &h.miner, &h.job_id, &h.salt) != c.commit {
            return Err(ValidatorError::CommitMismatch(
                "artifact id and salt do not hash to the commitment".into(),
            ));
        }
        Ok(())
    }

    /// Records a revealed artifact whose bytes the runtime has stored and verified
    /// against `h.artifact`; asks for its evaluation. A reveal can arrive after the
    /// deadline but before the runtime's next tick: the job is moved past its deadline
    /// first, so its synthetic seed is drawn before any of its submissions is evaluated.
    pub fn uploaded(
        &mut self,
        h: &UploadHeader,
        now: UnixMillis,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<ValidatorEffect>, ValidatorError> {
        self.check_upload(h, now)?;
        let mut fx = Vec::new();
        self.advance_job(&h.job_id, now, rng, &mut fx);
        self.check_upload(h, now)?;
        if let Some(job) = self.jobs.get_mut(&h.job_id)
            && let Some(slot) = job.slots.get_mut(&h.miner)
        {
            slot.submission = SubmissionState::Uploaded {
                artifact: h.artifact,
            };
            fx.push(ValidatorEffect::Event(format!(
                "job {}: {} revealed {}",
                h.job_id, h.miner, h.artifact
            )));
            fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
            fx.push(ValidatorEffect::Evaluate {
                job_id: h.job_id.clone(),
                miner: h.miner.clone(),
                artifact: h.artifact,
            });
        }
        Ok(fx)
    }

    fn advance(&mut self, now: UnixMillis, rng: &mut dyn RngCore, fx: &mut Vec<ValidatorEffect>) {
        // Start pending jobs while the concurrency allows.
        let active = self
            .jobs
            .values()
            .filter(|j| !matches!(j.phase, JobPhase::Pending | JobPhase::Done { .. }))
            .count() as u32;
        let mut free = if self.paused || self.miners.len() < self.min_miners {
            0
        } else {
            self.plan.concurrent_jobs.max(1).saturating_sub(active)
        };
        for id in self.order.clone() {
            if free == 0 {
                break;
            }
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.phase != JobPhase::Pending {
                continue;
            }
            free -= 1;
            job.phase = JobPhase::Offering { since: now };
            let offers = Offers::new(&self.plan, &self.identity, &self.inference, &job.plan);
            for addr in &self.miners {
                job.offers.insert(addr.clone(), OfferState::Sent);
                fx.push(ValidatorEffect::SendOffer {
                    addr: addr.clone(),
                    offer: offers.to(addr),
                });
            }
            fx.push(ValidatorEffect::Event(format!(
                "job {id}: offered to {} miners (budget {} s)",
                self.miners.len(),
                job.plan.time_budget_ms / 1000
            )));
            fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
        }

        for id in self.order.clone() {
            self.advance_job(&id, now, rng, fx);
        }

        if !self.finished_announced && self.is_finished() {
            self.finished_announced = true;
            fx.push(ValidatorEffect::CompetitionFinished(self.plan.id.clone()));
        }
    }

    fn advance_job(
        &mut self,
        id: &JobId,
        now: UnixMillis,
        rng: &mut dyn RngCore,
        fx: &mut Vec<ValidatorEffect>,
    ) {
        let plan = &self.plan;
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        match job.phase.clone() {
            JobPhase::Offering { since } => {
                let mut accepted: Vec<(u32, String, PeerIdStr)> = job
                    .offers
                    .iter()
                    .filter_map(|(addr, o)| match o {
                        OfferState::Accepted { miner, order } => {
                            Some((*order, addr.clone(), miner.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                accepted.sort();
                let due: Vec<String> = job
                    .offers
                    .iter()
                    .filter(|(_, o)| matches!(o, OfferState::Retrying { retry_at, .. } if *retry_at <= now))
                    .map(|(a, _)| a.clone())
                    .collect();
                if !due.is_empty() {
                    let offers = Offers::new(plan, &self.identity, &self.inference, &job.plan);
                    for addr in due {
                        job.offers.insert(addr.clone(), OfferState::Sent);
                        fx.push(ValidatorEffect::SendOffer {
                            offer: offers.to(&addr),
                            addr,
                        });
                    }
                }
                let answered = job
                    .offers
                    .values()
                    .all(|o| !matches!(o, OfferState::Sent | OfferState::Retrying { .. }));
                let enough = accepted.len() as u32 >= plan.miners_per_job;
                let timed_out = now >= since + plan.offer_timeout_ms;
                if !(enough || answered || timed_out) {
                    return;
                }
                for o in job.offers.values_mut() {
                    if let OfferState::Retrying { error, .. } = o {
                        *o = OfferState::Failed {
                            error: std::mem::take(error),
                        };
                    }
                }
                if accepted.is_empty() {
                    job.phase = JobPhase::Done {
                        note: Some("no miner accepted the offer".into()),
                    };
                    fx.push(ValidatorEffect::Event(format!(
                        "job {id}: no miner accepted; job skipped"
                    )));
                    fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                    fx.push(ValidatorEffect::JobFinished {
                        job_id: id.clone(),
                        scores: vec![],
                    });
                    return;
                }
                let deadline = now + job.plan.time_budget_ms;
                let mut seen = std::collections::BTreeSet::new();
                for (_, addr, miner) in accepted.into_iter().take(plan.miners_per_job as usize) {
                    if !seen.insert(miner.clone()) {
                        continue; // one miner behind two addresses gets one slot
                    }
                    let mut nonce = [0u8; 32];
                    rng.fill_bytes(&mut nonce);
                    let mut a = Assignment {
                        job_id: id.clone(),
                        competition_id: plan.id.clone(),
                        miner: miner.clone(),
                        validator: self.identity.peer_id(),
                        validator_key: self.identity.public_key_bytes(),
                        nonce,
                        base_model: job.plan.base_model,
                        train_shard: job.plan.train_shard,
                        hparams: plan.hparams.clone(),
                        deadline_ms: deadline,
                        max_artifact_bytes: plan.max_artifact_bytes,
                        signature: vec![],
                    };
                    a.signature = self.identity.sign(&a.signing_bytes());
                    job.slots.insert(
                        miner.clone(),
                        MinerSlot {
                            addr: addr.clone(),
                            assignment: a.clone(),
                            commitment: None,
                            receipt: None,
                            superseded: Vec::new(),
                            submission: SubmissionState::Waiting,
                        },
                    );
                    fx.push(ValidatorEffect::SendAssignment {
                        addr,
                        assignment: a,
                    });
                }
                job.phase = JobPhase::Running { deadline };
                fx.push(ValidatorEffect::Event(format!(
                    "job {id}: assigned to {} miners, deadline in {} s",
                    job.slots.len(),
                    job.plan.time_budget_ms / 1000
                )));
                fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
            }
            JobPhase::Running { deadline } => {
                if now <= deadline {
                    return;
                }
                for (miner, slot) in job.slots.iter_mut() {
                    if slot.commitment.is_none() && slot.submission == SubmissionState::Waiting {
                        slot.submission = SubmissionState::Failed {
                            verdicts: vec![],
                            reason: "no commitment before the deadline".into(),
                            artifact: None,
                            sketch: vec![],
                        };
                        fx.push(ValidatorEffect::Event(format!(
                            "job {id}: {miner} did not commit in time"
                        )));
                    }
                }
                job.phase = JobPhase::Revealing {
                    deadline,
                    until: deadline + plan.reveal_window_ms,
                };
                if job.synthetic_seed.is_none() {
                    job.synthetic_seed = Some(rng.next_u64());
                }
                fx.push(ValidatorEffect::Event(format!(
                    "job {id}: deadline passed; reveals open"
                )));
                fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                self.advance_job(id, now, rng, fx);
            }
            JobPhase::Revealing { until, .. } => {
                let window_over = now > until;
                if window_over {
                    for slot in job.slots.values_mut() {
                        if slot.submission == SubmissionState::Waiting {
                            slot.submission = SubmissionState::Failed {
                                verdicts: vec![],
                                reason: "artifact not revealed within the reveal window".into(),
                                artifact: None,
                                sketch: vec![],
                            };
                        }
                    }
                }
                let settled = job.slots.values().all(|s| {
                    matches!(
                        s.submission,
                        SubmissionState::Evaluated { .. } | SubmissionState::Failed { .. }
                    )
                });
                if !settled {
                    return;
                }
                // Other validators' records of the same artifacts arrive by gossip after
                // their own evaluations: wait for them a little before judging copies.
                let since = *job.settled_at.get_or_insert(now);
                if now < since + self.settle_grace_ms {
                    return;
                }
                if plan.requires_synthetic
                    && let Some(note) = missing_synthetic(job)
                {
                    job.phase = JobPhase::Done {
                        note: Some(note.clone()),
                    };
                    job.scores = vec![];
                    fx.push(ValidatorEffect::Event(format!("job {id}: {note}")));
                    fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                    fx.push(ValidatorEffect::JobFinished {
                        job_id: id.clone(),
                        scores: vec![],
                    });
                    return;
                }
                let mut findings =
                    duplicate_findings(&self.jobs, &self.foreign, id, &plan.integrity);
                findings.extend(derived::derived_findings(&self.jobs, id, &plan.integrity));
                if let Some(job) = self.jobs.get(id) {
                    findings.extend(untrained::untrained_findings(job, &plan.integrity));
                    // Submissions already failing are never the leakage test's references.
                    let suspect: BTreeSet<PeerIdStr> = findings
                        .iter()
                        .filter(|(_, v)| v.outcome == Outcome::Fail)
                        .map(|(m, _)| m.clone())
                        .collect();
                    findings.extend(leakage_findings(job, &plan.integrity, &suspect));
                }
                let Some(job) = self.jobs.get_mut(id) else {
                    return;
                };
                for (miner, v) in findings {
                    let Some(slot) = job.slots.get_mut(&miner) else {
                        continue;
                    };
                    if v.outcome != Outcome::Pass {
                        fx.push(ValidatorEffect::Event(format!(
                            "job {id}: {miner}: {}",
                            v.reason
                        )));
                    }
                    match (&mut slot.submission, v.outcome) {
                        (
                            SubmissionState::Evaluated {
                                verdicts,
                                artifact,
                                sketch,
                                ..
                            },
                            Outcome::Fail,
                        ) => {
                            let mut all = std::mem::take(verdicts);
                            all.push(v);
                            let reason = failed_reasons(&all);
                            slot.submission = SubmissionState::Failed {
                                reason,
                                verdicts: all,
                                artifact: Some(*artifact),
                                sketch: std::mem::take(sketch),
                            };
                        }
                        (SubmissionState::Evaluated { verdicts, .. }, _) => verdicts.push(v),
                        // Already failed by an earlier finding of this job: every further
                        // finding is kept too (a copy of two earlier submissions names
                        // both), and the reason lists them all.
                        (
                            SubmissionState::Failed {
                                verdicts, reason, ..
                            },
                            _,
                        ) => {
                            verdicts.push(v);
                            if verdicts.iter().any(|x| x.outcome == Outcome::Fail) {
                                *reason = failed_reasons(verdicts);
                            }
                        }
                        _ => {}
                    }
                }
                job.scores = score_slots(id, &job.slots, &plan.scoring);
                job.phase = JobPhase::Done { note: None };
                fx.push(ValidatorEffect::Event(format!(
                    "job {id}: scored {} submissions",
                    job.scores.len()
                )));
                fx.push(ValidatorEffect::Persist(Box::new(job.clone())));
                fx.push(ValidatorEffect::JobFinished {
                    job_id: id.clone(),
                    scores: job.scores.clone(),
                });
            }
            JobPhase::Pending | JobPhase::Done { .. } => {}
        }
    }
}

/// A job's scores from its settled slots under `weights`: each evaluated submission's
/// scored loss, the job's qualities (normalised to mean 1), and the penalty with its reason
/// for the rest.
pub fn score_slots(
    job_id: &JobId,
    slots: &BTreeMap<PeerIdStr, MinerSlot>,
    weights: &ScoringWeights,
) -> Vec<JobScore> {
    let losses: Vec<Option<f64>> = slots
        .values()
        .map(|s| match s.submission {
            SubmissionState::Evaluated {
                test_loss,
                synthetic_loss,
                ..
            } => Some(weights.scored_loss(test_loss, synthetic_loss)),
            _ => None,
        })
        .collect();
    let qs = weights.qualities(&losses);
    slots
        .iter()
        .zip(losses.iter().zip(qs))
        .map(|((m, slot), (loss, quality))| JobScore {
            job_id: job_id.clone(),
            miner: m.clone(),
            loss: *loss,
            quality,
            penalty_reason: match &slot.submission {
                SubmissionState::Failed { reason, .. } => Some(reason.clone()),
                _ => None,
            },
            verdicts: match &slot.submission {
                SubmissionState::Failed { verdicts, .. }
                | SubmissionState::Evaluated { verdicts, .. } => verdicts.clone(),
                _ => vec![],
            },
        })
        .collect()
}

/// The scores of every finished, scored job of `jobs` again, under `weights`, from the
/// losses stored with each submission: what a proposed scoring formula would have given.
/// Jobs not finished, or finished without scores (cancelled, unscorable), are left out;
/// the second value counts the jobs replayed.
pub fn replay_scores<'a>(
    jobs: impl IntoIterator<Item = &'a JobState>,
    weights: &ScoringWeights,
) -> (Vec<JobScore>, u32) {
    let mut out = Vec::new();
    let mut n = 0;
    for j in jobs {
        if matches!(j.phase, JobPhase::Done { .. }) && !j.scores.is_empty() {
            out.extend(score_slots(&j.plan.job_id, &j.slots, weights));
            n += 1;
        }
    }
    (out, n)
}

/// Why a job that must be scored on a synthetic set cannot be (None: every evaluated
/// submission has its synthetic loss and per-record losses). Failing closed: scoring
/// without the set would silently drop the leakage check and a third of the criteria.
fn missing_synthetic(job: &JobState) -> Option<String> {
    let lacking: Vec<&PeerIdStr> = job
        .slots
        .iter()
        .filter(|(_, s)| match &s.submission {
            SubmissionState::Evaluated {
                synthetic_loss,
                synthetic_records,
                ..
            } => synthetic_loss.is_none() || synthetic_records.is_empty(),
            _ => false,
        })
        .map(|(m, _)| m)
        .collect();
    if job.synthetic_seed.is_none() {
        return Some("not scored: the job has no synthetic set (its seed was never drawn)".into());
    }
    (!lacking.is_empty()).then(|| {
        format!(
            "not scored: {} of its evaluations have no synthetic loss, so the test-leakage check cannot run ({})",
            lacking.len(),
            lacking.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// The offer of one job, as every miner gets it.
/// A job's offer, signed, in its two forms: to a gRPC miner (commit to the validator's
/// URL) and to a libp2p miner (commit to the validator's peer id, `p2p:<peer id>`).
struct Offers {
    grpc: Offer,
    p2p: Offer,
}

impl Offers {
    fn new(
        plan: &CompetitionPlan,
        identity: &Identity,
        inference: &Option<tunenet_types::InferenceTerms>,
        job: &JobPlan,
    ) -> Self {
        let mut grpc = make_offer(plan, identity, inference, job);
        let mut p2p = grpc.clone();
        p2p.reply_to = format!("p2p:{}", identity.peer_id());
        grpc.sign(identity);
        p2p.sign(identity);
        Offers { grpc, p2p }
    }

    /// The one for the miner at `addr`.
    fn to(&self, addr: &str) -> Offer {
        if addr.starts_with("p2p:") {
            self.p2p.clone()
        } else {
            self.grpc.clone()
        }
    }
}

fn make_offer(
    plan: &CompetitionPlan,
    identity: &Identity,
    inference: &Option<tunenet_types::InferenceTerms>,
    job: &JobPlan,
) -> Offer {
    Offer {
        job_id: job.job_id.clone(),
        competition_id: plan.id.clone(),
        kind: if inference.is_some() {
            JobKind::Inference
        } else {
            JobKind::FineTune
        },
        validator: identity.peer_id(),
        base_model: job.base_model,
        base_params: job.base_params,
        dataset_records: job.shard_records,
        time_budget_ms: job.time_budget_ms,
        reward_hint: job.reward_hint,
        hardware: plan.hardware.clone(),
        reply_to: plan.reply_to.clone(),
        model_config: job.model_config.clone(),
        inference: inference.clone(),
        validator_key: vec![],
        signature: vec![],
    }
}

/// How long to wait before sending an undelivered offer again: 0.5 s, doubling, at most 4 s.
fn retry_delay_ms(attempts: u32) -> u64 {
    (500u64 << attempts.saturating_sub(1).min(3)).min(4_000)
}

/// The failed verdicts' reasons, joined.
fn failed_reasons(verdicts: &[Verdict]) -> String {
    let r: Vec<String> = verdicts
        .iter()
        .filter(|v| v.outcome == Outcome::Fail)
        .map(|v| format!("{}: {}", v.check, v.reason))
        .collect();
    format!("integrity: {}", r.join("; "))
}

/// Name of the leakage verdict.
pub const LEAKAGE_CHECK: &str = "test_leakage";
pub use untrained::UNTRAINED_CHECK;

/// Test-set leakage (DESIGN.md §4.6), judged over the job's cohort. When every evaluated
/// submission carries per-record losses, the per-record test judges it (see
/// [`leakage::per_record_findings`]). Otherwise (evaluations recorded without them), each
/// submission's synthetic/test loss ratio against the cohort's median, in robust spreads
/// (1.4826 × MAD, at least `leak_spread_floor` × the median). Training on the hidden test
/// split lowers the test loss and not the synthetic one, so the ratio rises; honest runs of
/// any length or method move both alike. A ratio `leak_fail_z` spreads above fails; one
/// `leak_flag_z` spreads above fails if the submission's canary and subset tests both found
/// no significant sign of training on its assigned data, and is flagged otherwise.
/// With fewer than three ratios there is no cohort to judge against: each gets a passing
/// verdict saying so, with its ratio.
fn leakage_findings(
    job: &JobState,
    settings: &IntegritySettings,
    suspect: &BTreeSet<PeerIdStr>,
) -> Vec<(PeerIdStr, Verdict)> {
    if !settings.enabled {
        return vec![];
    }
    if let Some(found) = leakage::per_record_findings(job, settings, suspect) {
        return found;
    }
    let cohort: Vec<(&PeerIdStr, f64, f64, &Vec<Verdict>)> = job
        .slots
        .iter()
        .filter_map(|(m, s)| match &s.submission {
            SubmissionState::Evaluated {
                test_loss,
                synthetic_loss: Some(syn),
                verdicts,
                ..
            } if *test_loss > 0.0 && syn.is_finite() => Some((m, *test_loss, *syn, verdicts)),
            _ => None,
        })
        .collect();
    let ratios: Vec<f64> = cohort.iter().map(|(_, t, s, _)| s / t).collect();
    let n = ratios.len();
    if n < 3 {
        return cohort
            .iter()
            .zip(&ratios)
            .map(|((m, t, s, _), r)| {
                ((*m).clone(), Verdict {
                    check: LEAKAGE_CHECK.into(),
                    outcome: Outcome::Pass,
                    value: Some(*r),
                    threshold: None,
                    reason: format!(
                        "not judged: a cohort of {n} evaluated submissions is too small (3 needed); synthetic/test loss ratio {r:.4} (test {t:.4}, synthetic {s:.4})"
                    ),
                })
            })
            .collect();
    }
    let mid = median(&ratios);
    let deviations: Vec<f64> = ratios.iter().map(|r| (r - mid).abs()).collect();
    let mad: f64 = 1.4826 * median(&deviations);
    let floor = settings.leak_spread_floor * mid.abs();
    let spread = mad.max(floor).max(f64::MIN_POSITIVE);
    cohort
        .iter()
        .zip(&ratios)
        .map(|((m, t, s, verdicts), r)| {
            let z = (r - mid) / spread;
            // Evidence of honest work: a significant canary or subset test.
            let trained = verdicts.iter().any(|v| {
                (v.check == "canaries"
                    || v.check == "canary_exposure"
                    || v.check == "assigned_subset")
                    && matches!((v.value, v.threshold), (Some(p), Some(a)) if p <= a)
            });
            let numbers = format!(
                "synthetic/test loss ratio {r:.4} (test {t:.4}, synthetic {s:.4}) is {z:.1} spreads from the cohort's median {mid:.4} (spread {spread:.4}, {n} submissions)"
            );
            let (outcome, reason) = if z >= settings.leak_fail_z {
                (
                    Outcome::Fail,
                    format!("the hidden test split leaked into training: {numbers}"),
                )
            } else if z >= settings.leak_flag_z && !trained {
                (
                    Outcome::Fail,
                    format!(
                        "the hidden test split leaked into training: {numbers}, and its canary and subset tests show no sign of training on its assigned data"
                    ),
                )
            } else if z >= settings.leak_flag_z {
                (
                    Outcome::Flag,
                    format!(
                        "test loss suspiciously low for its synthetic loss: {numbers} (it did train on its assigned data)"
                    ),
                )
            } else {
                (Outcome::Pass, numbers)
            };
            ((*m).clone(), Verdict {
                check: LEAKAGE_CHECK.into(),
                outcome,
                value: Some(z),
                threshold: Some(settings.leak_fail_z),
                reason,
            })
        })
        .collect()
}

/// Median of finite values (0 when there are none).
fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let k = v.len() / 2;
    if v.len() % 2 == 1 {
        v[k]
    } else {
        (v[k - 1] + v[k]) / 2.0
    }
}

/// A failed `exact_duplicate` verdict with its reason.
fn exact_duplicate(reason: String) -> Verdict {
    Verdict {
        check: "exact_duplicate".into(),
        outcome: Outcome::Fail,
        value: Some(1.0),
        threshold: None,
        reason,
    }
}

/// Exact and near duplicates between job `id`'s evaluated submissions and every other
/// evaluated submission of the competition. The submission whose commitment was received
/// later fails; the earlier one is flagged, so both parties are named.
fn duplicate_findings(
    jobs: &BTreeMap<JobId, JobState>,
    foreign: &[tunenet_types::ArtifactRecord],
    id: &JobId,
    settings: &IntegritySettings,
) -> Vec<(PeerIdStr, Verdict)> {
    struct Sub<'a> {
        job: &'a JobId,
        miner: &'a PeerIdStr,
        artifact: BlobId,
        received: u64,
        sketch: Vec<f32>,
        norm: f64,
    }
    let mut all = Vec::new();
    for j in jobs.values() {
        // Everyone fine-tuning one base on one task moves its weights the same way at
        // first; what tells a copy from independent work is the part of the delta that
        // differs from the job's mean. With fewer than three submissions there is no
        // mean worth removing.
        let evaluated: Vec<&Vec<f32>> = j
            .slots
            .values()
            .filter_map(|s| match &s.submission {
                SubmissionState::Evaluated { sketch, .. } if !sketch.is_empty() => Some(sketch),
                _ => None,
            })
            .collect();
        let same_len = evaluated.iter().all(|s| s.len() == evaluated[0].len());
        let mean: Option<Vec<f32>> = (evaluated.len() >= 3 && same_len).then(|| {
            let mut m = vec![0f32; evaluated[0].len()];
            for s in &evaluated {
                for (a, b) in m.iter_mut().zip(s.iter()) {
                    *a += b / evaluated.len() as f32;
                }
            }
            m
        });
        for (m, slot) in &j.slots {
            // Failed submissions count too: a copy of one that failed is no less a copy.
            let (artifact, sketch) = match &slot.submission {
                SubmissionState::Evaluated {
                    artifact, sketch, ..
                } => (artifact, sketch),
                SubmissionState::Failed {
                    artifact: Some(artifact),
                    sketch,
                    ..
                } => (artifact, sketch),
                _ => continue,
            };
            let received = slot
                .receipt
                .as_ref()
                .map(|r| r.received_at_ms)
                .unwrap_or(u64::MAX);
            let residual = match &mean {
                Some(mean) if mean.len() == sketch.len() => {
                    sketch.iter().zip(mean).map(|(a, b)| a - b).collect()
                }
                _ => sketch.clone(),
            };
            let norm = sketch
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt();
            all.push(Sub {
                job: &j.plan.job_id,
                miner: m,
                artifact: *artifact,
                received,
                sketch: residual,
                norm,
            });
        }
    }
    let mut out = Vec::new();
    if !settings.enabled {
        return out;
    }
    // Another validator's earlier receipt of the same artifact: the copy fails here, the
    // earliest signed receipt winning wherever it was given.
    for me in all.iter().filter(|s| s.job == id) {
        if let Some(r) = foreign
            .iter()
            .filter(|r| r.artifact == me.artifact && r.receipt.received_at_ms < me.received)
            .min_by_key(|r| r.receipt.received_at_ms)
        {
            out.push((
                me.miner.clone(),
                exact_duplicate(format!(
                    "the same artifact as {}'s in job {} on validator {}, whose signed receipt is earlier ({} ms before this one's)",
                    r.receipt.miner,
                    r.receipt.job_id,
                    r.receipt.validator,
                    me.received - r.receipt.received_at_ms
                )),
            ));
        }
    }
    for me in all.iter().filter(|s| s.job == id) {
        let my_key = (me.received, me.job, me.miner);
        for other in all
            .iter()
            .filter(|o| !(o.job == me.job && o.miner == me.miner))
        {
            let earlier = (other.received, other.job, other.miner) < my_key;
            if other.artifact == me.artifact {
                if earlier {
                    out.push((
                        me.miner.clone(),
                        exact_duplicate(format!(
                            "the same artifact as {}'s in job {}, which was committed earlier",
                            other.miner, other.job
                        )),
                    ));
                }
                continue;
            }
            let cos = tunenet_types::sketch_cosine(&me.sketch, &other.sketch);
            let size_ratio = if me.norm.max(other.norm) > 0.0 {
                me.norm.min(other.norm) / me.norm.max(other.norm)
            } else {
                1.0
            };
            if cos > settings.near_duplicate_cosine
                && size_ratio >= settings.near_duplicate_norm_ratio
            {
                out.push((me.miner.clone(), Verdict {
                    check: "near_duplicate".into(),
                    outcome: if earlier { Outcome::Fail } else { Outcome::Flag },
                    value: Some(cos),
                    threshold: Some(settings.near_duplicate_cosine),
                    reason: if earlier {
                        format!(
                            "a near copy (delta cosine {cos:.4}) of {}'s artifact in job {}, committed earlier",
                            other.miner, other.job
                        )
                    } else {
                        format!(
                            "{}'s artifact in job {} is a near copy of this one (delta cosine {cos:.4})",
                            other.miner, other.job
                        )
                    },
                }));
            }
        }
    }
    out
}

mod derived;
mod leakage;
#[cfg(test)]
mod tests;
mod untrained;
