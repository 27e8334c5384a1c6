//! Split fine-tuning (`lsplit finetune`): LoRA adapters on the head's and the tail's layers,
//! trained on the device while the trunk computes its layers' forward pass and the gradient of
//! its input rows ([`TrainTrunk`]), in-process or on a server. The trunk sees hidden rows and
//! their gradients only: no tokens, no labels, no adapter.
//!
//! One training step: the head's forward pass (the adapter's matrices as variables), the
//! trunk's forward pass, the tail's forward pass and the masked cross-entropy, the tail's
//! backward pass (its adapter's gradients and its input rows'), the trunk's backward pass, the
//! head's backward pass from the gradient the trunk returned, then AdamW ([`AdamW`]) after
//! `accumulate` examples.

mod adapter;
mod data;
mod error;
mod optim;
mod trainer;
mod trunk;

pub use adapter::TrainableAdapter;
pub use data::{Dataset, Example};
pub use error::{Result, TrainError};
pub use optim::{AdamW, Schedule};
pub use trainer::{Evaluation, StepReport, TrainOptions, Trainer};
pub use trunk::{LocalTrainTrunk, TrainTrunk};
