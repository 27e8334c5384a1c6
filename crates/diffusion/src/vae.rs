//! The VAE decoder (latents to pixels) and the conversion to 8-bit RGB, as diffusers does it.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use crate::error::DiffusionError;
use crate::model_dir::ModelDir;

/// `vae/config.json`, the fields the decoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels (3).
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels per level; the image is `2^(levels-1)` times the latent.
    pub block_out_channels: Vec<usize>,
    /// Resnets per block.
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Group norm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding.
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// Must be absent or null (SD3-style latent shift).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn groups() -> usize {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The decoder half of the VAE (the encoder's weights are loaded too; image-to-image is not a
/// feature yet).
pub struct Vae {
    model: AutoEncoderKL,
    scaling_factor: f64,
    scale: usize,
    latent_channels: usize,
}

impl Vae {
    /// Loads `vae/`.
    pub fn load(dir: &ModelDir, device: &Device) -> Result<Self, DiffusionError> {
        let config: VaeConfig = dir.config("vae", "config.json")?;
        if config.block_out_channels.is_empty()
            || config
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % config.norm_num_groups != 0)
        {
            return Err(DiffusionError::Config(format!(
                "vae: block_out_channels {:?} must be multiples of norm_num_groups {}",
                config.block_out_channels, config.norm_num_groups
            )));
        }
        if config.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(DiffusionError::Config(
                "vae: shift_factor (SD3-style VAE) is not supported".into(),
            ));
        }
        let file = dir.weights("vae")?;
        let weights = |e: candle_core::Error| DiffusionError::Weights {
            file: file.display().to_string(),
            message: e.to_string(),
        };
        // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }
            .map_err(weights)?;
        let model = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )
        .map_err(weights)?;
        Ok(Self {
            model,
            scaling_factor: config.scaling_factor,
            scale: 1 << (config.block_out_channels.len() - 1),
            latent_channels: config.latent_channels,
        })
    }

    /// Pixels per latent along each side.
    pub fn scale(&self) -> usize {
        self.scale
    }

    /// Latent channels.
    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Decodes raw VAE latents (already divided by the scaling factor) to `[-1, 1]` pixels.
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor, DiffusionError> {
        Ok(self.model.decode(latents)?)
    }

    /// Decodes the pipeline's latents to an image.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage, DiffusionError> {
        let pixels = self.decode_raw(&(latents / self.scaling_factor)?)?;
        RgbImage::from_pixels(&pixels)
    }
}

/// An 8-bit RGB image, row-major, three bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Pixels across.
    pub width: usize,
    /// Pixels down.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Converts the first image of `[batch, 3, h, w]` pixels in `[-1, 1]` as diffusers does:
    /// `x / 2 + 0.5`, clamped to [0, 1], times 255, rounded half to even.
    pub fn from_pixels(pixels: &Tensor) -> Result<Self, DiffusionError> {
        let (_, channels, height, width) = pixels.dims4()?;
        if channels != 3 {
            return Err(DiffusionError::Request(format!(
                "decoded image has {channels} channels, expected 3"
            )));
        }
        let unit = ((pixels.get(0)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let hwc = unit.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
        let data = hwc
            .iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect();
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Encodes the image as an 8-bit RGB PNG.
    pub fn to_png(&self) -> Result<Vec<u8>, DiffusionError> {
        let mut out = Vec::new();
        let to_error =
            |e: png::EncodingError| DiffusionError::Request(format!("PNG encoding: {e}"));
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(to_error)?;
        writer.write_image_data(&self.data).map_err(to_error)?;
        writer.finish().map_err(to_error)?;
        Ok(out)
    }
}
