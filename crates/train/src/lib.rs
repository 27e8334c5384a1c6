//! Split fine-tuning (`lsplit finetune`): LoRA adapters on the head's and the tail's layers,
//! trained on the device while the trunk computes its layers' forward pass and the gradient of
//! its input rows ([`TrainTrunk`]), in-process or on a server. The trunk sees hidden rows and
//! their gradients only: no tokens, no labels, no adapter.
//!
//! One training step: the head's forward pass (the adapter's matrices as variables), the
//! trunk's forward pass, the tail's forward pass and the masked cross-entropy, the tail's
//! backward pass (its adapter's gradients and its input rows'), the trunk's backward pass, the
//! head's backward pass from the gradient the trunk returned, then AdamW ([`AdamW`]) after
//! `accumulate` examples. With a privacy weight, the head's backward pass also carries the
//! gradient of a privacy term ([`distance_correlation`] between the head's rows and the public
//! head's), so that the rows the trunk sees drift from what the public weights would send.
//! With uplink noise, the trunk receives the head's rows noised as `lsplit generate
//! --uplink-noise` noises them (the gradient passes straight through), so that the tail's
//! adapter learns to undo the noise's effect on the trunk's output: a device-side denoiser
//! (Split-N-Denoise, Mai et al. 2024).

mod adapter;
mod data;
mod error;
mod optim;
mod privacy;
mod trainer;
mod trunk;

pub use adapter::TrainableAdapter;
pub use data::{Dataset, Example};
pub use error::{Result, TrainError};
pub use optim::{AdamW, Schedule};
pub use privacy::distance_correlation;
pub use trainer::{Evaluation, StepReport, TrainOptions, Trainer};
pub use trunk::{LocalTrainTrunk, TrainTrunk};
