//! The device side of a split model and the boundary it talks to the cloud through.
//!
//! The data's path: prompt → tokenizer → head → wire codec → [`Trunk`] → wire codec → tail →
//! sampler → text. [`Session`] runs that loop; it sees the trunk only through the [`Trunk`]
//! trait, so the in-process [`LocalTrunk`] and a remote trunk are interchangeable.
//!
//! Every split session runs one step path (`step.rs`): its [`SessionKeys`] hold the split policy
//! (one draw for a fixed split, several for random split points) and a fresh secret shared with
//! the trunk, from which each step's split points, the tags of its messages and the optional
//! permutation of the hidden dimension derive; parts catch up their KV caches when the draws
//! move. [`TrunkState`] is the trunk's side, shared by [`LocalTrunk`] and the trunk server.
//! [`DividedTrunk`] relays a session through a trunk divided over several servers.
//! [`UplinkNoise`] is the device's calibrated noise on the uplink. [`CaptureWriter`] records
//! what crosses.

mod capture;
mod device;
mod divided;
mod draft;
mod error;
mod lookahead;
mod noise;
mod policy;
mod quality;
mod sampler;
mod secret;
mod session;
mod speculate;
mod staged;
mod stats;
mod step;
mod trunk;

pub use capture::{CaptureError, CaptureWriter, CapturedMessage, Way, read_capture};
pub use device::{DeviceModel, load_tokenizer};
pub use divided::{DividedTrunk, Hop};
pub use draft::DraftModel;
pub use error::SplitError;
pub use noise::{MAX_SIGMA, UplinkNoise, add_noise, epsilon};
pub use policy::{Obfuscation, PolicyError, SessionKeys, SplitPolicy};
pub use quality::{Agreement, GreedyRun, codecs, devices};
pub use sampler::{Sampler, SamplingParams};
pub use secret::SessionSecret;
pub use session::{GenerateOptions, Generation, RejectedDraft, Session, Step, StopReason};
pub use speculate::{MAX_DRAFT, Speculate, lookup};
pub use stats::Stats;
pub use step::{PreparedStep, TrunkState};
pub use trunk::{LocalTrunk, StepRows, Trunk, TrunkError};
