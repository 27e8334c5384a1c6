use std::path::PathBuf;

/// Everything that can go wrong while opening, loading or running a model part.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The path is neither a GGUF file nor a Hugging Face model directory.
    #[error(
        "{path}: not a model: expected a GGUF file or a Hugging Face directory with config.json"
    )]
    NotAModel {
        /// The path that was given.
        path: PathBuf,
    },
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF file (bad magic, truncated header...).
    #[error("{path}: malformed GGUF file: {reason}")]
    MalformedGguf {
        /// The GGUF file.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// The model declares an architecture this engine does not run.
    #[error(
        "unsupported architecture `{0}`: lambda-split runs Llama-family decoders (llama, mistral)"
    )]
    UnknownArchitecture(String),
    /// A required configuration value is missing or has the wrong type.
    #[error("model configuration: {0}")]
    Config(String),
    /// A tensor that the part needs is absent from the model files.
    #[error("tensor `{0}` is missing from the model files")]
    MissingTensor(String),
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name in the model file.
        name: String,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape found in the file.
        got: Vec<usize>,
    },
    /// The split points do not fit the model.
    #[error(
        "invalid split {k1}:{k2}: need 0 <= K1 <= K2 <= L, and this model has L = {layers} layers"
    )]
    InvalidSplit {
        /// First split point.
        k1: usize,
        /// Second split point.
        k2: usize,
        /// Number of layers of the model.
        layers: usize,
    },
    /// A part was asked to do something it holds no weights for.
    #[error("the {part} part cannot {action}: it does not hold those weights")]
    WrongPart {
        /// Which part was called.
        part: &'static str,
        /// What it was asked to do.
        action: &'static str,
    },
    /// Hidden rows arrived for a position other than the next one the cache expects.
    #[error("rows start at position {got} but this part's KV cache holds {expected} positions")]
    Position {
        /// Next position the cache expects.
        expected: usize,
        /// Position the rows claim to start at.
        got: usize,
    },
    /// The sequence would grow past the model's context length.
    #[error("sequence of {requested} positions exceeds the context length of {context}")]
    ContextOverflow {
        /// Positions needed.
        requested: usize,
        /// The model's context length.
        context: usize,
    },
    /// Hidden rows of a shape the part cannot take.
    #[error("hidden rows have shape {got:?}, expected [rows, {hidden}]")]
    HiddenShape {
        /// Shape received.
        got: Vec<usize>,
        /// The model's hidden size.
        hidden: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenId {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A LoRA adapter directory that cannot be applied to this model.
    #[error("{dir}: adapter: {reason}")]
    Adapter {
        /// The adapter's directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A device adapter that updates layers the trunk runs.
    #[error(
        "{dir}: the adapter updates layers {layers:?}, which the trunk (layers {trunk:?}) runs: \
         a device adapter may only update the head's and the tail's layers"
    )]
    AdapterOnTrunk {
        /// The adapter's directory.
        dir: PathBuf,
        /// The trunk layers it updates.
        layers: Vec<usize>,
        /// The trunk's layers.
        trunk: std::ops::Range<usize>,
    },
    /// A GPU was asked for, but this build has no CUDA backend.
    #[error("this lsplit was built without the `cuda` feature; see scripts/build-cuda.sh")]
    CudaNotBuilt,
    /// An error raised by candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
