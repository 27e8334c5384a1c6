//! Stable Diffusion (1.5, 2.1, SDXL) from diffusers-format directories, split the Λ-Split way:
//! the device keeps the text encoders, the scheduler, the VAE and the ends of the UNet; the trunk
//! (the heavy middle of the UNet, or the whole UNet) runs elsewhere.

pub mod clip;
pub mod clip_tokenizer;
pub mod error;
pub mod fingerprint;
pub mod model_dir;
pub mod noise;
pub mod pipeline;
pub mod quality;
pub mod scheduler;
pub mod text;
pub mod trunk;
pub mod unet;
pub mod vae;

pub use error::{DiffusionError, Result};
pub use fingerprint::{TrunkFingerprint, trunk_fingerprint};
pub use model_dir::{Family, ModelDir};
pub use noise::NoiseSource;
pub use pipeline::{
    DevicePipeline, Generated, ImageRequest, OnStep, StepProgress, WireBytes, load_trunk_model,
};
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
pub use trunk::{
    DiffusionTrunk, ImageSetup, ImageState, LocalDiffusionTrunk, StepRequest, TrunkModel, UnetSplit,
};
pub use vae::RgbImage;
