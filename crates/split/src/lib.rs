//! The device side of a split model and the boundary it talks to the cloud through.
//!
//! The data's path: prompt → tokenizer → head → wire codec → [`Trunk`] → wire codec → tail →
//! sampler → text. [`Session`] runs that loop; it sees the trunk only through the [`Trunk`]
//! trait, so the in-process [`LocalTrunk`] and a remote trunk are interchangeable.
//!
//! A keyed session ([`DeviceModel::keyed`], [`SessionKeys`]) draws its split points per step
//! from a secret shared with the trunk, catches up KV caches between parts, and may permute the
//! hidden dimension on the wire; [`CaptureWriter`] records what crosses.

mod capture;
mod device;
mod error;
mod keyed;
mod policy;
mod quality;
mod sampler;
mod secret;
mod session;
mod staged;
mod stats;
mod trunk;

pub use capture::{CaptureError, CaptureWriter, CapturedMessage, Way, read_capture};
pub use device::{DeviceModel, load_tokenizer};
pub use error::SplitError;
pub use keyed::KeyedTrunk;
pub use policy::{Obfuscation, PolicyError, SessionKeys, SplitPolicy};
pub use quality::{Agreement, GreedyRun, codecs};
pub use sampler::{Sampler, SamplingParams};
pub use secret::SessionSecret;
pub use session::{GenerateOptions, Generation, Session, Step, StopReason};
pub use stats::Stats;
pub use trunk::{LocalTrunk, StepRows, Trunk, TrunkError};
