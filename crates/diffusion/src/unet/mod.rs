//! The UNet of Stable Diffusion cut into head, trunk and tail (`--unet-split lambda:N`).
//!
//! Head = `conv_in`, the time embedding (plus SDXL's added text/time embedding) and the first N
//! down blocks; trunk = the remaining down blocks, the mid block and all up blocks but the last N;
//! tail = the last N up blocks, the output norm and `conv_out`. Skip connections stay on the side
//! that made them: the tail consumes exactly the head's skips, the trunk its own. The blocks are
//! candle-transformers' (weights named as in diffusers); the wiring and the split are ours.

mod blocks;
mod config;
mod parts;

pub use config::{PerBlock, UnetConfig, UnetCut};
pub use parts::{
    AddedConditioning, HeadOutput, Unet, UnetHead, UnetTail, UnetTrunk, check_context,
};

use crate::error::DiffusionError;

/// Wraps a candle error in loading `what` from `file` as a weights error naming both.
fn load<T>(r: candle_core::Result<T>, file: &str, what: &str) -> Result<T, DiffusionError> {
    r.map_err(|e| DiffusionError::Weights {
        file: file.to_string(),
        message: format!("{what}: {e}"),
    })
}
