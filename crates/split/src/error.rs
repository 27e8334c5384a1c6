use lsplit_model::ModelError;
use lsplit_tokenizer::TokenizerError;
use lsplit_wire::WireError;

use crate::{CaptureError, TrunkError};

/// Errors of the device-side generation loop.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// Loading or running the head or tail failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizing, detokenizing or rendering the chat template failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Encoding or decoding hidden rows failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The trunk failed or could not be reached.
    #[error("trunk: {0}")]
    Trunk(#[from] TrunkError),
    /// The prompt does not fit the model's context.
    #[error("the prompt is {tokens} tokens long but the model's context length is {context}")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// Nothing to generate from.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A split session was started without a trunk, or an unsplit one with a trunk.
    #[error("{0}")]
    Layout(&'static str),
    /// The draft model cannot draft for this model.
    #[error("draft model: {0}")]
    DraftModel(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Device and trunk disagree on a session's steps: refused, never computed.
    #[error("desync: {0}")]
    Desync(String),
    /// The uplink noise's settings are out of range.
    #[error("{0}")]
    Noise(String),
    /// Writing the wire capture failed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}
