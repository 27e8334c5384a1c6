//! The crate's error type.

use std::path::PathBuf;

/// Error type of the `tokenizers` crate, kept as the source of our own errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong while building a tokenizer, encoding, decoding or rendering a
/// chat template. Messages name the offending key, file, id or template so a user can act on them.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF metadata key the tokenizer cannot do without is absent.
    #[error("GGUF metadata has no `{0}` key")]
    MissingKey(String),

    /// A GGUF metadata key holds a value of an unexpected type.
    #[error("GGUF metadata key `{key}` should be {expected}, found {found}")]
    WrongType {
        /// The metadata key.
        key: String,
        /// What the key should hold.
        expected: &'static str,
        /// What it holds.
        found: String,
    },

    /// `tokenizer.ggml.model` names a tokenizer kind this crate does not implement.
    #[error("unsupported tokenizer.ggml.model `{0}` (supported: `gpt2`, `llama`)")]
    UnsupportedModel(String),

    /// `tokenizer.ggml.pre` names a byte-level BPE pre-tokenizer this crate does not implement.
    #[error(
        "unsupported pre-tokenizer tokenizer.ggml.pre `{0}` (supported: `smollm`, `llama-bpe`, `llama3`, `gpt-2`, `default`)"
    )]
    UnsupportedPreTokenizer(String),

    /// GGUF tokenizer metadata is present but inconsistent (lengths differ, malformed merges...).
    #[error("invalid GGUF tokenizer metadata: {0}")]
    InvalidMetadata(String),

    /// A file of a Hugging Face model directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A file of a Hugging Face model directory is not the JSON it should be.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },

    /// A file of a Hugging Face model directory is valid JSON with unexpected content.
    #[error("unexpected content in {}: {message}", path.display())]
    HfConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The `tokenizers` pipeline could not be assembled from otherwise well-formed data.
    #[error("cannot build the tokenizer: {0}")]
    Build(#[source] BoxError),

    /// The `tokenizers` pipeline failed to encode text.
    #[error("cannot encode text: {0}")]
    Encode(#[source] BoxError),

    /// The `tokenizers` pipeline failed to decode ids.
    #[error("cannot decode tokens: {0}")]
    Decode(#[source] BoxError),

    /// A token id passed to decode is not part of the vocabulary.
    #[error("token id {id} is out of range for a vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Number of ids in the vocabulary.
        vocab_size: usize,
    },

    /// `apply_chat_template` was called on a model that ships no chat template.
    #[error("the model has no chat template")]
    NoChatTemplate,

    /// The chat template failed to parse or render (including `raise_exception` calls).
    #[error("chat template error: {0}")]
    Template(#[from] minijinja::Error),
}
