//! The miner side of a job: decide on offers by policy, take signed assignments, and once
//! the runtime has trained, commit before the deadline and reveal after it.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tunenet_types::{
    Assignment, BlobId, Commitment, Decision, Identity, JobId, JobKind, MinerJobStatus, Offer,
    PeerIdStr, Receipt, RejectCode, RejectReason, UnixMillis, UploadHeader, commit_hash,
};

/// The operator's accept/reject policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinerPolicy {
    /// Most jobs accepted or running at once.
    pub max_concurrent_jobs: u32,
    /// Largest base model accepted, in parameters.
    pub max_model_params: u64,
    /// Shortest time budget accepted, in seconds.
    pub min_time_budget_secs: u64,
    /// Longest time budget accepted, in seconds.
    pub max_time_budget_secs: u64,
    /// Job kinds this miner runs.
    pub kinds: Vec<JobKind>,
    /// Reject everything (maintenance).
    pub paused: bool,
    /// How long an accepted offer holds a slot while waiting for its assignment.
    pub accept_hold_secs: u64,
    /// Memory the miner's device has for one job, GiB; jobs estimated above it are refused.
    pub max_memory_gb: Option<f64>,
    /// The validators (peer ids) this miner takes jobs from; empty: any validator whose
    /// offer is signed by its own key.
    pub validators: Vec<String>,
}

impl Default for MinerPolicy {
    fn default() -> Self {
        MinerPolicy {
            max_concurrent_jobs: 1,
            max_model_params: 2_000_000_000,
            min_time_budget_secs: 5,
            max_time_budget_secs: 24 * 3600,
            kinds: vec![JobKind::FineTune],
            paused: false,
            accept_hold_secs: 60,
            max_memory_gb: None,
            validators: Vec::new(),
        }
    }
}

impl MinerPolicy {
    /// The policy's verdict on an offer, given how many jobs are already held and the
    /// runtime's estimate of the memory training it would need.
    pub fn decide(&self, offer: &Offer, held: u32, memory_needed: Option<u64>) -> Decision {
        let reject = |code, detail: String| Decision::Reject(RejectReason { code, detail });
        if self.paused {
            return reject(RejectCode::Paused, "the operator paused this miner".into());
        }
        if !self.validators.is_empty() && !self.validators.contains(&offer.validator.0) {
            return reject(
                RejectCode::Other,
                format!(
                    "validator {} is not one this miner works for (`[policy] validators`)",
                    offer.validator
                ),
            );
        }
        if !self.kinds.contains(&offer.kind) {
            return reject(
                RejectCode::KindNotSupported,
                format!(
                    "job kind {} is not in this miner's kinds {:?}",
                    offer.kind, self.kinds
                ),
            );
        }
        if held >= self.max_concurrent_jobs {
            return reject(
                RejectCode::Busy,
                format!(
                    "already holding {held} of {} concurrent jobs",
                    self.max_concurrent_jobs
                ),
            );
        }
        if offer.base_params > self.max_model_params {
            return reject(
                RejectCode::ModelTooLarge,
                format!(
                    "model has {} parameters, this miner takes at most {}",
                    offer.base_params, self.max_model_params
                ),
            );
        }
        if let (Some(gb), Some(need)) = (self.max_memory_gb, memory_needed)
            && need as f64 > gb * (1u64 << 30) as f64
        {
            return reject(
                RejectCode::InsufficientMemory,
                format!(
                    "training would need about {:.1} GiB, this miner has {gb:.1} GiB",
                    need as f64 / (1u64 << 30) as f64
                ),
            );
        }
        let budget_s = offer.time_budget_ms / 1000;
        if budget_s < self.min_time_budget_secs {
            return reject(
                RejectCode::BudgetTooShort,
                format!(
                    "time budget {budget_s} s is below this miner's minimum {} s",
                    self.min_time_budget_secs
                ),
            );
        }
        if budget_s > self.max_time_budget_secs {
            return reject(
                RejectCode::BudgetTooLong,
                format!(
                    "time budget {budget_s} s is above this miner's maximum {} s",
                    self.max_time_budget_secs
                ),
            );
        }
        Decision::Accept
    }
}

/// Where one of the miner's jobs is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MinerPhase {
    /// Accepted; waiting for the assignment.
    Accepted {
        /// When it was accepted.
        at: UnixMillis,
    },
    /// Fetching data and training.
    Training,
    /// Commitment sent; waiting for the receipt.
    Committing,
    /// Receipt held; waiting for the deadline to reveal.
    Committed,
    /// Uploading the artifact.
    Uploading,
    /// Revealed; nothing left to do.
    Uploaded,
    /// Ended without a submission; the detail says why.
    Failed,
}

/// One of the miner's jobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerJob {
    /// The offer.
    pub offer: Offer,
    /// The assignment, once received.
    pub assignment: Option<Assignment>,
    /// The phase.
    pub phase: MinerPhase,
    /// The artifact and its size, once trained.
    pub artifact: Option<(BlobId, u64)>,
    /// The commitment's salt (secret until the reveal).
    pub salt: Option<[u8; 32]>,
    /// The validator's receipt.
    pub receipt: Option<Receipt>,
    /// Training step reached.
    pub step: u64,
    /// Latest training loss.
    pub loss: f32,
    /// A sentence about the job.
    pub detail: String,
    /// This miner's clock less the validator's, as measured when the assignment arrived
    /// (see [`MinerEngine::assign`]); the job's deadline on this miner's clock is the
    /// assignment's plus this.
    #[serde(default)]
    pub clock_offset_ms: i64,
}

impl MinerJob {
    /// The deadline on this miner's clock (None before the assignment).
    pub fn local_deadline(&self) -> Option<UnixMillis> {
        self.assignment
            .as_ref()
            .map(|a| a.deadline_ms.saturating_add_signed(self.clock_offset_ms))
    }
}

/// Clock-offset samples kept per validator: the offset used is the least of them.
const CLOCK_SAMPLES: usize = 8;

/// Largest clock offset to a validator a miner corrects for (10 minutes). Beyond it the
/// clocks are broken, not skewed; the correction stops there and the job will likely be
/// refused as late or early, with the validator's reason.
pub const MAX_CLOCK_OFFSET_MS: i64 = 600_000;

/// Why the miner refused an assignment.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MinerError {
    /// Never offered or already expired.
    #[error("unknown job `{0}`: not offered to this miner, or the accepted offer expired")]
    UnknownJob(JobId),
    /// The offer was not accepted or the job is past that point.
    #[error("job {0} is not waiting for an assignment")]
    NotAwaiting(JobId),
    /// The assignment names another miner.
    #[error("assignment is for miner {0}, not this one")]
    WrongMiner(String),
    /// The signature does not verify or comes from another validator.
    #[error("assignment signature: {0}")]
    BadSignature(String),
    /// The deadline has already passed.
    #[error("assignment deadline {0} has already passed")]
    Expired(UnixMillis),
}

/// What happened to the miner.
#[derive(Clone, Debug, PartialEq)]
pub enum MinerInput {
    /// Time passed.
    Tick,
    /// Training progress.
    Progress {
        /// The job.
        job_id: JobId,
        /// Step reached.
        step: u64,
        /// Latest loss.
        loss: f32,
    },
    /// Training finished with an artifact stored in the blob store, or failed.
    Trained {
        /// The job.
        job_id: JobId,
        /// The artifact and its size, or why training failed.
        result: Result<(BlobId, u64), String>,
    },
    /// The validator answered the commitment.
    CommitAnswered {
        /// The job.
        job_id: JobId,
        /// The receipt, or why it was refused.
        result: Result<Receipt, String>,
    },
    /// The upload finished.
    UploadAnswered {
        /// The job.
        job_id: JobId,
        /// Ok, or why it failed.
        result: Result<(), String>,
    },
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq)]
pub enum MinerEffect {
    /// Fetch the assignment's blobs and train (or, for an inference job, score the shard);
    /// answer with `Progress` and `Trained`.
    Train {
        /// The assignment.
        assignment: Assignment,
        /// Its deadline on this miner's clock (the assignment's is on the validator's).
        deadline_ms: UnixMillis,
        /// Where the validator is.
        reply_to: String,
        /// An inference job's terms; None for fine-tuning.
        inference: Option<tunenet_types::InferenceTerms>,
    },
    /// Send a commitment; answer with `CommitAnswered`.
    SendCommit {
        /// Where the validator is.
        reply_to: String,
        /// The signed commitment.
        commitment: Commitment,
    },
    /// Upload the artifact; answer with `UploadAnswered`.
    Upload {
        /// Where the validator is.
        reply_to: String,
        /// What is revealed.
        header: UploadHeader,
    },
    /// Store this job.
    Persist(Box<MinerJob>),
    /// One line for the operator.
    Event(String),
}

/// The miner's state machine.
pub struct MinerEngine {
    identity: Identity,
    policy: MinerPolicy,
    jobs: BTreeMap<JobId, MinerJob>,
    /// Per validator, the latest clock-offset samples (see [`MinerEngine::assign`]).
    clocks: BTreeMap<PeerIdStr, std::collections::VecDeque<i64>>,
}

/// What a miner's request handlers may decide without its main loop: a snapshot of the
/// policy and the jobs held, enough to give every refusal the engine would give (an offer
/// it might take still goes to the engine). Taken after each change to the engine.
#[derive(Clone, Debug, Default)]
pub struct OfferGate {
    policy: MinerPolicy,
    held: u32,
    /// Jobs not yet ended, and the validator each is held for.
    holders: BTreeMap<JobId, PeerIdStr>,
}

impl OfferGate {
    /// The refusal the engine would give `offer` (memory aside: that check needs the
    /// device and only refuses more), or None when the engine must decide.
    pub fn refusal(&self, offer: &Offer) -> Option<Decision> {
        match self.holders.get(&offer.job_id) {
            Some(v) if *v == offer.validator => return None,
            Some(v) => return Some(Decision::Reject(held_elsewhere(&offer.job_id, v))),
            None => {}
        }
        match self.policy.decide(offer, self.held, None) {
            Decision::Accept => None,
            refusal => Some(refusal),
        }
    }
}

/// The refusal of a job id already held for validator `v`.
fn held_elsewhere(job: &JobId, v: &PeerIdStr) -> RejectReason {
    RejectReason {
        code: RejectCode::Busy,
        detail: format!(
            "already working on job {job} for validator {v}; a job id is held for one validator at a time"
        ),
    }
}

fn held(phase: &MinerPhase) -> bool {
    matches!(
        phase,
        MinerPhase::Accepted { .. } | MinerPhase::Training | MinerPhase::Committing
    )
}

impl MinerEngine {
    /// A miner with the given identity and policy, resuming stored jobs.
    pub fn new(identity: Identity, policy: MinerPolicy, stored: Vec<MinerJob>) -> Self {
        let jobs: BTreeMap<JobId, MinerJob> = stored
            .into_iter()
            .map(|j| (j.offer.job_id.clone(), j))
            .collect();
        // The clock offsets measured before the restart, oldest first.
        let mut measured: Vec<(UnixMillis, &PeerIdStr, i64)> = jobs
            .values()
            .filter_map(|j| {
                let a = j.assignment.as_ref()?;
                Some((a.deadline_ms, &a.validator, j.clock_offset_ms))
            })
            .collect();
        measured.sort_by_key(|m| m.0);
        let mut clocks: BTreeMap<PeerIdStr, std::collections::VecDeque<i64>> = BTreeMap::new();
        for (_, v, offset) in measured {
            let samples = clocks.entry(v.clone()).or_default();
            samples.push_back(offset);
            if samples.len() > CLOCK_SAMPLES {
                samples.pop_front();
            }
        }
        MinerEngine {
            identity,
            policy,
            jobs,
            clocks,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &MinerPolicy {
        &self.policy
    }

    /// Replaces the policy (e.g. pause/unpause).
    pub fn set_policy(&mut self, p: MinerPolicy) {
        self.policy = p;
    }

    /// This miner's id.
    pub fn peer_id(&self) -> tunenet_types::PeerIdStr {
        self.identity.peer_id()
    }

    /// After a restart: jobs that were training go on (the trainer resumes from its last
    /// checkpoint) while their deadline is ahead; the others are failed with the reason. A
    /// commitment or a reveal that was under way is sent again: the validator may never
    /// have had it, and without it the job would wait in that phase for ever (a job being
    /// committed also holds a slot, so the miner would refuse every later offer as busy).
    pub fn resume(&mut self, now: UnixMillis) -> Vec<MinerEffect> {
        let mut fx = Vec::new();
        let me = self.identity.peer_id();
        for (id, j) in self.jobs.iter_mut() {
            let deadline = j.local_deadline();
            match j.phase {
                MinerPhase::Training => match (&j.assignment, deadline) {
                    (Some(a), Some(deadline)) if deadline > now => {
                        j.detail = "resuming training after a restart".into();
                        fx.push(MinerEffect::Event(format!(
                            "job {id}: resuming training after a restart"
                        )));
                        fx.push(MinerEffect::Train {
                            assignment: a.clone(),
                            deadline_ms: deadline,
                            reply_to: j.offer.reply_to.clone(),
                            inference: j.offer.inference.clone(),
                        });
                    }
                    _ => {
                        j.phase = MinerPhase::Failed;
                        j.detail =
                            "the miner restarted while training and the deadline has passed".into();
                        fx.push(MinerEffect::Event(format!(
                            "job {id}: deadline passed during a restart"
                        )));
                    }
                },
                MinerPhase::Committing => {
                    let (Some(deadline), Some((artifact, size)), Some(salt)) =
                        (deadline, j.artifact, j.salt)
                    else {
                        j.phase = MinerPhase::Failed;
                        j.detail =
                            "the miner restarted while committing and lost the artifact's record"
                                .into();
                        fx.push(MinerEffect::Persist(Box::new(j.clone())));
                        continue;
                    };
                    if deadline > now {
                        // A commitment the validator already has gets its first receipt back.
                        j.detail = "sending the commitment again after a restart".into();
                        fx.push(MinerEffect::Event(format!(
                            "job {id}: sending the commitment again after a restart"
                        )));
                        fx.push(MinerEffect::SendCommit {
                            reply_to: j.offer.reply_to.clone(),
                            commitment: commitment(&self.identity, id, artifact, size, salt),
                        });
                    } else {
                        // Too late to commit; the validator may have the commitment all the
                        // same: reveal, and it takes the artifact or says why not.
                        j.phase = MinerPhase::Uploading;
                        j.detail =
                            "revealing after a restart (the commitment's answer was lost)".into();
                        fx.push(MinerEffect::Event(format!(
                            "job {id}: the deadline passed during a restart while committing; revealing"
                        )));
                        fx.extend(reveal(j, &me));
                    }
                }
                MinerPhase::Uploading => {
                    let Some(upload) = reveal(j, &me) else {
                        continue;
                    };
                    j.detail = "revealing again after a restart".into();
                    fx.push(MinerEffect::Event(format!(
                        "job {id}: revealing again after a restart"
                    )));
                    fx.push(upload);
                }
                _ => continue,
            }
            fx.push(MinerEffect::Persist(Box::new(j.clone())));
        }
        fx
    }

    /// The snapshot request handlers refuse offers by, without the main loop.
    pub fn offer_gate(&self) -> OfferGate {
        OfferGate {
            policy: self.policy.clone(),
            held: self.running(),
            holders: self
                .jobs
                .iter()
                .filter(|(_, j)| !matches!(j.phase, MinerPhase::Uploaded | MinerPhase::Failed))
                .map(|(id, j)| (id.clone(), j.offer.validator.clone()))
                .collect(),
        }
    }

    /// Jobs that hold a slot (accepted, training or committing).
    pub fn running(&self) -> u32 {
        self.jobs.values().filter(|j| held(&j.phase)).count() as u32
    }

    /// A status line per job.
    pub fn status(&self) -> Vec<MinerJobStatus> {
        self.jobs
            .values()
            .map(|j| MinerJobStatus {
                job_id: j.offer.job_id.clone(),
                phase: match j.phase {
                    MinerPhase::Accepted { .. } => "accepted",
                    MinerPhase::Training => "training",
                    MinerPhase::Committing => "committing",
                    MinerPhase::Committed => "committed",
                    MinerPhase::Uploading => "uploading",
                    MinerPhase::Uploaded => "uploaded",
                    MinerPhase::Failed => "failed",
                }
                .into(),
                step: j.step,
                loss: j.loss,
                detail: j.detail.clone(),
            })
            .collect()
    }

    /// A job's record.
    pub fn job(&self, id: &JobId) -> Option<&MinerJob> {
        self.jobs.get(id)
    }

    /// This miner's signed answer to `validator`'s offer of `job_id`.
    pub fn reply(
        &self,
        job_id: JobId,
        validator: &tunenet_types::PeerIdStr,
        decision: Decision,
    ) -> tunenet_types::DecisionReply {
        tunenet_types::DecisionReply::signed(&self.identity, job_id, validator, decision)
    }

    /// Decides on an offer. A repeated offer for a job already held is accepted again.
    pub fn offer(
        &mut self,
        offer: Offer,
        now: UnixMillis,
        memory_needed: Option<u64>,
    ) -> (Decision, Vec<MinerEffect>) {
        if let Some(j) = self.jobs.get(&offer.job_id)
            && j.offer.validator == offer.validator
            && matches!(j.phase, MinerPhase::Accepted { .. })
        {
            return (Decision::Accept, vec![]);
        }
        // A job id is held for one validator at a time: validators running the same
        // competition offer the same ids, and taking a second would overwrite the first.
        if let Some(j) = self.jobs.get(&offer.job_id)
            && j.offer.validator != offer.validator
            && !matches!(j.phase, MinerPhase::Uploaded | MinerPhase::Failed)
        {
            let r = held_elsewhere(&offer.job_id, &j.offer.validator);
            return (
                Decision::Reject(r.clone()),
                vec![MinerEffect::Event(format!(
                    "job {}: rejected: {r}",
                    offer.job_id
                ))],
            );
        }
        let mut d = self.policy.decide(&offer, self.running(), memory_needed);
        if d == Decision::Accept
            && let Err(e) = offer.verify()
        {
            // Checked only when it would be taken: a refusal holds nothing, so a flood of
            // offers costs no signature checks while the miner is busy.
            d = Decision::Reject(RejectReason {
                code: RejectCode::Other,
                detail: format!(
                    "the offer is not signed by the validator it names ({}): {e}",
                    offer.validator
                ),
            });
        }
        let mut fx = vec![];
        match &d {
            Decision::Accept => {
                let job = MinerJob {
                    offer: offer.clone(),
                    assignment: None,
                    phase: MinerPhase::Accepted { at: now },
                    artifact: None,
                    salt: None,
                    receipt: None,
                    step: 0,
                    loss: 0.0,
                    detail: "accepted; waiting for the assignment".into(),
                    clock_offset_ms: 0,
                };
                fx.push(MinerEffect::Event(format!(
                    "job {}: accepted offer from {}",
                    offer.job_id, offer.validator
                )));
                fx.push(MinerEffect::Persist(Box::new(job.clone())));
                self.jobs.insert(offer.job_id.clone(), job);
            }
            Decision::Reject(r) => {
                fx.push(MinerEffect::Event(format!(
                    "job {}: rejected: {r}",
                    offer.job_id
                )));
            }
        }
        (d, fx)
    }

    /// Takes an assignment: it must be for this miner, for an accepted offer, signed by
    /// the offering validator, and not expired.
    pub fn assign(
        &mut self,
        a: Assignment,
        now: UnixMillis,
    ) -> Result<Vec<MinerEffect>, MinerError> {
        if a.miner != self.identity.peer_id() {
            return Err(MinerError::WrongMiner(a.miner.0.clone()));
        }
        let job = self
            .jobs
            .get_mut(&a.job_id)
            .ok_or_else(|| MinerError::UnknownJob(a.job_id.clone()))?;
        // The same assignment again (a validator restarted before it knew this one had
        // arrived): already taken.
        if job.assignment.as_ref() == Some(&a) {
            return Ok(vec![]);
        }
        if !matches!(job.phase, MinerPhase::Accepted { .. }) {
            return Err(MinerError::NotAwaiting(a.job_id.clone()));
        }
        a.verify()
            .map_err(|e| MinerError::BadSignature(e.to_string()))?;
        if a.validator != job.offer.validator {
            return Err(MinerError::BadSignature(format!(
                "signed by {}, but the offer came from {}",
                a.validator, job.offer.validator
            )));
        }
        // The deadline is on the validator's clock, set at assignment to its `now` plus
        // the offer's time budget; so `now - (deadline - budget)` here is this miner's clock
        // less the validator's, plus the assignment's time on the way. The least such
        // sample of the last few assignments from this validator estimates the offset (the
        // delay only ever adds), and the job runs to the deadline on this miner's clock.
        let issued = a.deadline_ms.saturating_sub(job.offer.time_budget_ms);
        let sample = (now as i64).saturating_sub(issued as i64);
        let samples = self.clocks.entry(a.validator.clone()).or_default();
        samples.push_back(sample);
        if samples.len() > CLOCK_SAMPLES {
            samples.pop_front();
        }
        let offset = samples
            .iter()
            .copied()
            .min()
            .unwrap_or(0)
            .clamp(-MAX_CLOCK_OFFSET_MS, MAX_CLOCK_OFFSET_MS);
        let deadline = a.deadline_ms.saturating_add_signed(offset);
        if deadline <= now {
            return Err(MinerError::Expired(a.deadline_ms));
        }
        job.phase = MinerPhase::Training;
        job.detail = "fetching the base model and shard".into();
        job.assignment = Some(a.clone());
        job.clock_offset_ms = offset;
        let mut fx = vec![MinerEffect::Event(format!(
            "job {}: assigned, {} s to the deadline",
            a.job_id,
            (deadline - now) / 1000
        ))];
        if offset.abs() >= 1000 {
            fx.push(MinerEffect::Event(format!(
                "job {}: this miner's clock is {:+.1} s from validator {}'s; deadlines are kept on the validator's",
                a.job_id,
                offset as f64 / 1000.0,
                a.validator
            )));
        }
        fx.push(MinerEffect::Persist(Box::new(job.clone())));
        fx.push(MinerEffect::Train {
            assignment: a,
            deadline_ms: deadline,
            reply_to: job.offer.reply_to.clone(),
            inference: job.offer.inference.clone(),
        });
        Ok(fx)
    }

    /// Handles an input.
    pub fn handle(
        &mut self,
        input: MinerInput,
        now: UnixMillis,
        rng: &mut dyn RngCore,
    ) -> Vec<MinerEffect> {
        let mut fx = Vec::new();
        match input {
            MinerInput::Tick => {}
            MinerInput::Progress { job_id, step, loss } => {
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    j.step = step;
                    j.loss = loss;
                    j.detail = format!("training: step {step}, loss {loss:.4}");
                }
            }
            MinerInput::Trained { job_id, result } => {
                self.on_trained(job_id, result, now, rng, &mut fx)
            }
            MinerInput::CommitAnswered { job_id, result } => {
                if let Some(j) = self.jobs.get_mut(&job_id)
                    && j.phase == MinerPhase::Committing
                {
                    match result.and_then(|r| check_receipt(j, &r).map(|_| r)) {
                        Ok(r) => {
                            j.phase = MinerPhase::Committed;
                            j.detail = "committed; revealing after the deadline".into();
                            j.receipt = Some(r);
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: commitment acknowledged"
                            )));
                        }
                        Err(e) => {
                            j.phase = MinerPhase::Failed;
                            j.detail = format!("commitment refused: {e}");
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: commitment refused: {e}"
                            )));
                        }
                    }
                    fx.push(MinerEffect::Persist(Box::new(j.clone())));
                }
            }
            MinerInput::UploadAnswered { job_id, result } => {
                if let Some(j) = self.jobs.get_mut(&job_id)
                    && j.phase == MinerPhase::Uploading
                {
                    match result {
                        Ok(()) => {
                            j.phase = MinerPhase::Uploaded;
                            j.detail = "artifact revealed".into();
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: artifact uploaded"
                            )));
                        }
                        // The first reveal got through but its answer was lost (the
                        // miner restarted): the validator has the artifact.
                        Err(e) if e.contains(ALREADY_UPLOADED) => {
                            j.phase = MinerPhase::Uploaded;
                            j.detail = "artifact revealed (the validator already had it)".into();
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: artifact already uploaded"
                            )));
                        }
                        // Revealed before the validator's deadline: this miner's estimate
                        // of the validator's clock was short. Wait a second longer and
                        // reveal again (within the reveal window, which the validator keeps).
                        Err(e)
                            if e.contains(REVEAL_TOO_EARLY)
                                && j.clock_offset_ms < MAX_CLOCK_OFFSET_MS =>
                        {
                            j.phase = MinerPhase::Committed;
                            j.clock_offset_ms += 1000;
                            j.detail =
                                "revealed too early for the validator's clock; revealing again"
                                    .into();
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: revealed before the validator's deadline; revealing again in a second"
                            )));
                        }
                        Err(e) => {
                            j.phase = MinerPhase::Failed;
                            j.detail = format!("upload failed: {e}");
                            fx.push(MinerEffect::Event(format!(
                                "job {job_id}: upload failed: {e}"
                            )));
                        }
                    }
                    fx.push(MinerEffect::Persist(Box::new(j.clone())));
                }
            }
        }
        self.tick(now, &mut fx);
        fx
    }

    fn on_trained(
        &mut self,
        job_id: JobId,
        result: Result<(BlobId, u64), String>,
        now: UnixMillis,
        rng: &mut dyn RngCore,
        fx: &mut Vec<MinerEffect>,
    ) {
        let Some(j) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if j.phase != MinerPhase::Training {
            return;
        }
        let Some(a) = j.assignment.clone() else {
            return;
        };
        match result {
            Err(e) => {
                j.phase = MinerPhase::Failed;
                j.detail = format!("training failed: {e}");
                fx.push(MinerEffect::Event(format!(
                    "job {job_id}: training failed: {e}"
                )));
            }
            Ok(_) if now > a.deadline_ms.saturating_add_signed(j.clock_offset_ms) => {
                j.phase = MinerPhase::Failed;
                j.detail = "training finished after the deadline; nothing committed".into();
                fx.push(MinerEffect::Event(format!(
                    "job {job_id}: missed the deadline"
                )));
            }
            Ok((artifact, size)) => {
                let mut salt = [0u8; 32];
                rng.fill_bytes(&mut salt);
                let c = commitment(&self.identity, &job_id, artifact, size, salt);
                j.artifact = Some((artifact, size));
                j.salt = Some(salt);
                j.phase = MinerPhase::Committing;
                j.detail = format!("trained ({size} bytes); committing");
                fx.push(MinerEffect::SendCommit {
                    reply_to: j.offer.reply_to.clone(),
                    commitment: c,
                });
            }
        }
        fx.push(MinerEffect::Persist(Box::new(j.clone())));
    }

    fn tick(&mut self, now: UnixMillis, fx: &mut Vec<MinerEffect>) {
        let hold = self.policy.accept_hold_secs * 1000;
        let me = self.identity.peer_id();
        for (id, j) in self.jobs.iter_mut() {
            match j.phase {
                MinerPhase::Accepted { at } if now > at + hold => {
                    j.phase = MinerPhase::Failed;
                    j.detail = "no assignment arrived; the slot was released".into();
                    fx.push(MinerEffect::Event(format!(
                        "job {id}: not assigned; slot released"
                    )));
                    fx.push(MinerEffect::Persist(Box::new(j.clone())));
                }
                MinerPhase::Committed => {
                    if j.local_deadline().is_none_or(|d| now <= d) {
                        continue;
                    }
                    let Some(upload) = reveal(j, &me) else {
                        continue;
                    };
                    j.phase = MinerPhase::Uploading;
                    j.detail = "revealing the artifact".into();
                    fx.push(upload);
                    fx.push(MinerEffect::Persist(Box::new(j.clone())));
                }
                _ => {}
            }
        }
    }
}

/// The reveal of `j`'s committed artifact, once it has one.
fn reveal(j: &MinerJob, me: &tunenet_types::PeerIdStr) -> Option<MinerEffect> {
    let ((artifact, size), salt) = (j.artifact?, j.salt?);
    Some(MinerEffect::Upload {
        reply_to: j.offer.reply_to.clone(),
        header: UploadHeader {
            job_id: j.offer.job_id.clone(),
            miner: me.clone(),
            artifact,
            size,
            salt,
        },
    })
}

/// What a validator's refusal of a second reveal of one artifact says (see
/// [`crate::ValidatorError::AlreadyUploaded`]).
pub const ALREADY_UPLOADED: &str = "already uploaded its artifact";

/// What a validator's refusal of a reveal before its deadline says (see
/// [`crate::ValidatorError::TooEarly`]).
pub const REVEAL_TOO_EARLY: &str = "reveal the artifact after the deadline";

/// This miner's signed commitment to `artifact` for `job_id`, salted with `salt`.
fn commitment(
    identity: &Identity,
    job_id: &JobId,
    artifact: BlobId,
    size: u64,
    salt: [u8; 32],
) -> Commitment {
    let me = identity.peer_id();
    let mut c = Commitment {
        job_id: job_id.clone(),
        miner: me.clone(),
        miner_key: identity.public_key_bytes(),
        commit: commit_hash(&artifact, &me, job_id, &salt),
        artifact_size: size,
        signature: vec![],
    };
    c.signature = identity.sign(&c.signing_bytes());
    c
}

fn check_receipt(j: &MinerJob, r: &Receipt) -> Result<(), String> {
    r.verify().map_err(|e| format!("receipt signature: {e}"))?;
    if r.validator != j.offer.validator {
        return Err(format!(
            "receipt signed by {}, not the job's validator",
            r.validator
        ));
    }
    if r.job_id != j.offer.job_id {
        return Err("receipt is for another job".into());
    }
    Ok(())
}
