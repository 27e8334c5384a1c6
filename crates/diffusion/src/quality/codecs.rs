//! The codec table of `lsplit image --codec-table`: one request drawn under every split mode and
//! every step codec with an in-process trunk, each image's wire bytes and its PSNR and SSIM
//! against the lossless unsplit image.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use lsplit_wire::StepCodec;

use super::{psnr, ssim};
use crate::error::DiffusionError;
use crate::pipeline::{DevicePipeline, ImageRequest, StepProgress, WireBytes, load_trunk_model};
use crate::trunk::{LocalDiffusionTrunk, UnetSplit};

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecRow {
    /// How the UNet was divided.
    pub split: UnetSplit,
    /// How the step tensors were encoded.
    pub codec: StepCodec,
    /// What crossed the wire for the image.
    pub bytes: WireBytes,
    /// PSNR against the lossless unsplit image, in dB (infinite when identical).
    pub psnr: f64,
    /// SSIM against the lossless unsplit image (1 when identical).
    pub ssim: f64,
}

/// Draws `request` with `reference` (the unsplit f32 pipeline of the model directory `model`),
/// then under `component` and every `lambda:N` of the UNet, each with every codec, and scores
/// each image against the first. `on_step` sees each image's steps with its label (`f32
/// reference`, then `SPLIT CODEC`); `on_row` sees each row as soon as it is done.
pub fn codec_table(
    model: &Path,
    reference: &DevicePipeline,
    request: &ImageRequest,
    device: &Device,
    on_step: &mut dyn FnMut(&str, &StepProgress<'_>) -> Result<(), DiffusionError>,
    on_row: &mut dyn FnMut(&CodecRow),
) -> Result<Vec<CodecRow>, DiffusionError> {
    let lossless = reference.generate(request, None, &mut |p| on_step("f32 reference", p))?;
    let mut splits = vec![UnetSplit::Component];
    splits.extend((1..=reference.unet_levels()).map(UnetSplit::Lambda));
    let mut rows = Vec::new();
    for split in splits {
        let trunk_model = Arc::new(load_trunk_model(model, split, device)?);
        for codec in StepCodec::all() {
            let pipeline = DevicePipeline::load(model, split, codec, device)?;
            let mut trunk = LocalDiffusionTrunk::new(trunk_model.clone(), codec, device.clone());
            let label = format!("{split} {codec}");
            let out = pipeline.generate(request, Some(&mut trunk), &mut |p| on_step(&label, p))?;
            let row = CodecRow {
                split,
                codec,
                bytes: out.bytes,
                psnr: psnr(&out.image, &lossless.image)?,
                ssim: ssim(&out.image, &lossless.image)?,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}
