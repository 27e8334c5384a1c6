//! The device side of a split model and the boundary it talks to the cloud through.
//!
//! The data's path: prompt → tokenizer → head → wire codec → [`Trunk`] → wire codec → tail →
//! sampler → text. [`Session`] runs that loop; it sees the trunk only through the [`Trunk`]
//! trait, so the in-process [`LocalTrunk`] and a remote trunk are interchangeable.

mod device;
mod error;
mod quality;
mod sampler;
mod session;
mod stats;
mod trunk;

pub use device::{DeviceModel, load_tokenizer};
pub use error::SplitError;
pub use quality::{Agreement, GreedyRun};
pub use sampler::{Sampler, SamplingParams};
pub use session::{GenerateOptions, Generation, Session, StopReason};
pub use stats::Stats;
pub use trunk::{LocalTrunk, Trunk, TrunkError};
