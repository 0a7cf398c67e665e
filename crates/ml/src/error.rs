//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `tunenet-ml`. Messages say what was wrong and,
/// where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// A file or directory could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        what: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A model directory is missing something or holds something unusable.
    #[error("model dir {path} {problem}")]
    ModelDir {
        /// The model directory.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        problem: String,
    },
    /// A `config.json` could not be parsed or describes an unsupported model.
    #[error("bad model config {path}: {problem}")]
    Config {
        /// The config file (or a description of where the config came from).
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The tokenizer could not be built, loaded or used.
    #[error("tokenizer {path}: {problem}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A dataset line or file is malformed.
    #[error("dataset {source_name}: line {line}: {problem}")]
    Dataset {
        /// Where the data came from (a path, or "<bytes>").
        source_name: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: String,
    },
    /// The input is unusable for reasons not tied to one line (e.g. no records).
    #[error("{0}")]
    Invalid(String),
    /// An artifact file is malformed, not a tunenet artifact, or does not fit the base model.
    #[error("artifact {path}: {problem}")]
    Artifact {
        /// The artifact file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A device string could not be understood or the device is not available.
    #[error("device {spec:?}: {problem}")]
    Device {
        /// The device string as given.
        spec: String,
        /// What is wrong.
        problem: String,
    },
    /// Training diverged (non-finite loss).
    #[error(
        "training diverged at step {step}: loss is {loss}; lower the learning rate or check the data"
    )]
    Diverged {
        /// The 1-based step at which the loss became non-finite.
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// The deadline left no time for even one training step.
    #[error(
        "deadline leaves no time for a single training step (margin {margin:?}); give the job more time"
    )]
    NoTimeToTrain {
        /// The safety margin that was requested.
        margin: std::time::Duration,
    },
    /// Training was cancelled through the cancel flag.
    #[error("training cancelled after {steps} steps")]
    Cancelled {
        /// Steps completed before the cancellation was seen.
        steps: usize,
    },
    /// An error from candle (tensor maths, safetensors loading).
    #[error("tensor error while {context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// The candle error.
        source: candle_core::Error,
    },
}

impl MlError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MlError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Adds context to candle results.
pub(crate) trait CandleContext<T> {
    /// Wraps a candle error in [`MlError::Candle`] with a description of what was being done.
    fn ctx(self, context: &str) -> Result<T, MlError>;
}

impl<T> CandleContext<T> for Result<T, candle_core::Error> {
    fn ctx(self, context: &str) -> Result<T, MlError> {
        self.map_err(|source| MlError::Candle {
            context: context.to_string(),
            source,
        })
    }
}
