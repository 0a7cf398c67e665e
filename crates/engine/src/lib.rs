//! The validator's competition state machine and the miner's job state machine.
//! Pure: time (`now`, Unix ms) and randomness (an `RngCore`) are passed in, effects come
//! out. No tokio, no sockets, no files, no clocks here.

pub mod miner;
pub mod validator;

pub use miner::{
    MinerEffect, MinerEngine, MinerError, MinerInput, MinerJob, MinerPhase, MinerPolicy, OfferGate,
};
pub use validator::{
    BaseRecords, CompetitionPlan, Evaluation, JobPhase, JobPlan, JobState, LEAKAGE_CHECK,
    MinerSlot, OfferState, SubmissionState, UNTRAINED_CHECK, ValidatorEffect, ValidatorEngine,
    ValidatorError, ValidatorInput, replay_scores, score_slots,
};
