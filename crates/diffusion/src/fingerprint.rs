//! Identity of a diffusion trunk: which split of which UNet, down to the bytes of the weights the
//! trunk runs. The server announces it in the handshake; the device computes the same from its
//! own copy of the model and refuses to send anything to different weights.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::DiffusionError;
use crate::model_dir::ModelDir;
use crate::trunk::UnetSplit;
use crate::unet::{UnetConfig, UnetCut};

/// The tag that starts every digest, so it can never collide with another kind of fingerprint.
const TAG: &[u8] = b"lsplit diffusion trunk fingerprint v1";

/// A split's trunk and the SHA-256 of what it runs.
///
/// The digest covers, in this order (integers as little-endian `u64`; strings and byte blobs as
/// their `u64` length then their bytes):
/// 1. the tag `lsplit diffusion trunk fingerprint v1`;
/// 2. the split as written on the command line (`component`, `lambda:1`...);
/// 3. the bytes of `unet/config.json`;
/// 4. the number of trunk tensors, then for each, sorted by name: its name, its rank and
///    dimensions (outermost first), its safetensors dtype name (`F32`, `F16`...), its bytes.
///
/// The trunk tensors are every UNet tensor for `component`, and for `lambda:N` those under
/// `down_blocks.{i}` for `i >= N`, `mid_block` and `up_blocks.{i}` for `i < levels - N`: exactly
/// the weights [`crate::unet::UnetTrunk`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrunkFingerprint {
    /// The split whose trunk this is.
    pub split: UnetSplit,
    /// The digest.
    pub sha256: [u8; 32],
}

impl TrunkFingerprint {
    /// The digest in hexadecimal.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for TrunkFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UNet {} trunk sha256 {}", self.split, self.hex())
    }
}

/// Whether tensor `name` belongs to the trunk of `split` for a UNet of `levels` levels.
pub fn trunk_uses(name: &str, split: UnetSplit, levels: usize) -> bool {
    let n = match split {
        UnetSplit::None => return false,
        UnetSplit::Component => return true,
        UnetSplit::Lambda(n) => n,
    };
    let block = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|index| index.parse::<usize>().ok())
    };
    if name.starts_with("mid_block.") {
        return true;
    }
    if let Some(i) = block("down_blocks.") {
        return i >= n;
    }
    if let Some(i) = block("up_blocks.") {
        return i + n < levels;
    }
    false
}

/// Fingerprints the trunk of `split` of the diffusers model at `root`, reading the bytes of every
/// trunk tensor (memory-mapped, one at a time).
pub fn trunk_fingerprint(
    root: &Path,
    split: UnetSplit,
) -> Result<TrunkFingerprint, DiffusionError> {
    if split == UnetSplit::None {
        return Err(DiffusionError::Request(
            "--unet-split none has no trunk to fingerprint".into(),
        ));
    }
    let dir = ModelDir::open(root)?;
    let config_path = root.join("unet").join("config.json");
    let config_bytes = std::fs::read(&config_path).map_err(|source| DiffusionError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: UnetConfig = dir.config("unet", "config.json")?;
    config.validate()?;
    if let UnetSplit::Lambda(n) = split {
        UnetCut::new(&config, n)?;
    }
    let file = dir.weights("unet")?;
    let weights_error = |e: candle_core::Error| DiffusionError::Weights {
        file: file.display().to_string(),
        message: e.to_string(),
    };
    // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
    let weights = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }
        .map_err(weights_error)?;
    let mut tensors: Vec<_> = weights
        .tensors()
        .into_iter()
        .filter(|(name, _)| trunk_uses(name, split, config.levels()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let mut hash = Sha256::new();
    let blob = |hash: &mut Sha256, bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    blob(&mut hash, TAG);
    blob(&mut hash, split.to_string().as_bytes());
    blob(&mut hash, &config_bytes);
    hash.update((tensors.len() as u64).to_le_bytes());
    for (name, view) in &tensors {
        blob(&mut hash, name.as_bytes());
        hash.update((view.shape().len() as u64).to_le_bytes());
        for &dim in view.shape() {
            hash.update((dim as u64).to_le_bytes());
        }
        blob(&mut hash, view.dtype().to_string().as_bytes());
        blob(&mut hash, view.data());
    }
    Ok(TrunkFingerprint {
        split,
        sha256: hash.finalize().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_trunks_take_the_middle_blocks_only() {
        let split = UnetSplit::Lambda(1);
        for (name, used) in [
            ("conv_in.weight", false),
            ("time_embedding.linear_1.weight", false),
            ("down_blocks.0.resnets.0.conv1.weight", false),
            ("down_blocks.1.resnets.0.conv1.weight", true),
            ("down_blocks.10.resnets.0.conv1.weight", true),
            ("mid_block.attentions.0.proj_in.weight", true),
            ("up_blocks.0.resnets.0.conv1.weight", true),
            ("up_blocks.1.resnets.0.conv1.weight", true),
            ("up_blocks.2.resnets.0.conv1.weight", false),
            ("conv_norm_out.weight", false),
            ("conv_out.weight", false),
        ] {
            assert_eq!(trunk_uses(name, split, 3), used, "{name}");
        }
        assert!(trunk_uses("conv_in.weight", UnetSplit::Component, 3));
        assert!(!trunk_uses("mid_block.x", UnetSplit::None, 3));
    }
}
