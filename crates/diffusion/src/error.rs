//! The crate's error type.

use std::path::PathBuf;

/// Errors from loading diffusion configurations and running the diffusion loop.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A configuration file holds a value this crate rejects or cannot honour.
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// `scheduler_config.json` names a scheduler class this crate does not implement.
    #[error(
        "scheduler class `{0}` is not supported: supported classes are EulerDiscreteScheduler, \
         EulerAncestralDiscreteScheduler and DDIMScheduler (pass --scheduler euler|euler-a|ddim \
         to override)"
    )]
    UnsupportedScheduler(String),
    /// A scheduler name (as given on the command line) is not one of ours.
    #[error("unknown scheduler `{0}`: valid names are euler, euler-a, ddim")]
    UnknownSchedulerName(String),
    /// A call into the scheduler or noise source got arguments it cannot use.
    #[error("{0}")]
    InvalidInput(String),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`DiffusionError`].
pub type Result<T> = std::result::Result<T, DiffusionError>;
