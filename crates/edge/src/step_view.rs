//! What the page shows of an image being drawn: the step tensor that crossed to the trunk (its
//! channel mean and first channels, as heat maps) and small previews of the latents so far.

use base64::Engine;
use candle_core::Tensor;
use lsplit_diffusion::{DiffusionError, RgbImage};
use serde::Serialize;

/// Channels of the step tensor shown one by one (after their mean).
const SHOWN_CHANNELS: usize = 4;
/// The longest side of a heat map; larger maps are average-pooled down to it.
const MAX_MAP_SIDE: usize = 64;
/// The longest side of a preview image.
const MAX_PREVIEW_SIDE: usize = 256;

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One batch row of a `[B, C, H, W]` tensor that crossed the wire, as heat maps.
#[derive(Debug, Serialize)]
pub(crate) struct TensorView {
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    /// The batch row shown: the last, the prompt's half when guidance doubles the batch.
    pub row: usize,
    /// Each map's size after pooling.
    pub height: usize,
    pub width: usize,
    /// Maps in `f32_base64`: the channel mean first, then the first channels.
    pub maps: usize,
    /// The maps' values, map by map, row-major, little-endian f32, base64.
    pub f32_base64: String,
}

impl TensorView {
    /// The view of `tensor`, or an error when it is not `[B, C, H, W]`.
    pub fn of(tensor: &Tensor) -> Result<Self, DiffusionError> {
        let (batch, channels, height, width) = tensor.dims4()?;
        let row = batch.saturating_sub(1);
        let one = tensor.narrow(0, row, 1)?;
        let shown = channels.min(SHOWN_CHANNELS);
        let mean = one.mean_keepdim(1)?;
        let maps = Tensor::cat(&[&mean, &one.narrow(1, 0, shown)?], 1)?;
        let factor = height.max(width).div_ceil(MAX_MAP_SIDE);
        let maps = if factor > 1 {
            maps.avg_pool2d(factor)?
        } else {
            maps
        };
        let (_, count, pooled_height, pooled_width) = maps.dims4()?;
        let values = maps.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(Self {
            shape: tensor.dims().to_vec(),
            row,
            height: pooled_height,
            width: pooled_width,
            maps: count,
            f32_base64: base64(&bytes),
        })
    }
}

/// `image` shrunk by a whole factor to at most [`MAX_PREVIEW_SIDE`] pixels a side (each pixel
/// the mean of its block), as a base64 PNG.
pub(crate) fn preview_png(image: &RgbImage) -> Result<String, DiffusionError> {
    let factor = image.width.max(image.height).div_ceil(MAX_PREVIEW_SIDE);
    if factor <= 1 {
        return Ok(base64(&image.to_png()?));
    }
    let (width, height) = (image.width / factor, image.height / factor);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        let i = ((y * factor + dy) * image.width + x * factor + dx) * 3 + c;
                        sum += u32::from(image.data[i]);
                    }
                }
                data.push((sum / (factor * factor) as u32) as u8);
            }
        }
    }
    let small = RgbImage {
        width,
        height,
        data,
    };
    Ok(base64(&small.to_png()?))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn the_view_holds_the_channel_mean_then_the_first_channels_of_the_last_row() {
        let values: Vec<f32> = (0..2 * 6 * 2 * 2).map(|v| v as f32).collect();
        let tensor = Tensor::from_vec(values, (2, 6, 2, 2), &Device::Cpu).expect("tensor");
        let view = TensorView::of(&tensor).expect("view");
        assert_eq!(view.shape, vec![2, 6, 2, 2]);
        assert_eq!((view.row, view.maps, view.height, view.width), (1, 5, 2, 2));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&view.f32_base64)
            .expect("base64");
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        // Row 1 starts at 24; channel c, pixel p is 24 + 4c + p; the mean over six channels
        // of pixel p is 24 + 10 + p.
        assert_eq!(&got[..4], &[34.0, 35.0, 36.0, 37.0]);
        assert_eq!(&got[4..8], &[24.0, 25.0, 26.0, 27.0]);
        assert_eq!(got.len(), 5 * 4);
    }

    #[test]
    fn large_maps_are_pooled_and_previews_shrunk() {
        let tensor =
            Tensor::ones((1, 2, 130, 64), candle_core::DType::F32, &Device::Cpu).expect("tensor");
        let view = TensorView::of(&tensor).expect("view");
        assert_eq!((view.height, view.width), (43, 21));
        let image = RgbImage {
            width: 600,
            height: 300,
            data: vec![200; 600 * 300 * 3],
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(preview_png(&image).expect("preview"))
            .expect("base64");
        // The PNG header's width and height: 600 / 3 and 300 / 3.
        assert_eq!(&png[16..24], &[0, 0, 0, 200, 0, 0, 0, 100]);
    }
}
