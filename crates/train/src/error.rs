use std::path::PathBuf;

use lsplit_model::ModelError;
use lsplit_split::SplitError;
use lsplit_tokenizer::TokenizerError;

/// Errors of split fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizing or rendering the chat template failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Loading the tokenizer failed.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the training data is not what it should be.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// Its line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The training data holds nothing to train on.
    #[error("{0}")]
    NoData(String),
    /// A checkpoint does not fit this run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The options do not make a run.
    #[error("{0}")]
    Options(String),
    /// The trunk failed or broke the protocol of a training step.
    #[error("trunk: {0}")]
    Trunk(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
