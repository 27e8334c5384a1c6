//! Llama-family decoder cut into parts.
//!
//! A model is opened once ([`ModelSource`]), then each part of a split ([`PartSpec`]) is loaded
//! on its own: it reads only the tensors it runs, so the cloud never holds the embeddings or the
//! LM head and the device never holds the trunk's layers. A [`ModelPart`] is immutable and can be
//! shared between sessions; the per-session state lives in a [`KvCache`]. A
//! [`TrunkFingerprint`] hashes a trunk's weights, so that both ends of a split can check that
//! they hold the same ones.

mod adapter;
mod attention;
mod cache;
mod config;
mod device;
mod error;
mod fingerprint;
mod kernels;
mod llama;
mod plan;
mod rowwise;
mod silu;
mod source;
mod train;

pub use adapter::{Adapter, LoraShape, Target, lora_scale, write_peft};
pub use cache::{KvCache, KvPrecision};
pub use config::{LlamaConfig, RopeScaling};
pub use device::ComputeDevice;
pub use error::ModelError;
pub use fingerprint::TrunkFingerprint;
pub use kernels::KernelPath;
pub use llama::{MAX_STEP_ROWS, ModelPart, on_pool};
pub use plan::{PartKind, PartSpec, SplitPlan};
pub use source::{ModelFormat, ModelSource, TensorRecord, TokenizerSource};
pub use train::{
    DenseLayer, DenseOutput, DenseTrunk, LayerPairs, LoraPair, Pass, TrunkActivations,
};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Every value of `t` in order, as f32: where a part's plain loops take over from candle.
fn values(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}
