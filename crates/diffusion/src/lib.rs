//! Stable Diffusion (1.5, 2.1, SDXL) from diffusers-format directories, split the Λ-Split way:
//! the device keeps the text encoders, the scheduler, the VAE and the ends of the UNet; the trunk
//! (the heavy middle of the UNet, or the whole UNet) runs elsewhere.

pub mod error;
pub mod noise;
pub mod scheduler;

pub use error::{DiffusionError, Result};
pub use noise::NoiseSource;
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
