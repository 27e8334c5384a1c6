//! Image quality against a reference: PSNR and SSIM, for `lsplit image --compare` and the codec
//! table ([`codecs`]).

pub mod codecs;

use crate::error::DiffusionError;
use crate::vae::RgbImage;

fn check_same_size(a: &RgbImage, b: &RgbImage) -> Result<(), DiffusionError> {
    if (a.width, a.height) != (b.width, b.height) || a.data.len() != b.data.len() {
        return Err(DiffusionError::Request(format!(
            "images of different sizes: {}x{} and {}x{}",
            a.width, a.height, b.width, b.height
        )));
    }
    Ok(())
}

/// Peak signal-to-noise ratio in dB over all channels (8-bit peak 255); infinite when equal.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64, DiffusionError> {
    check_same_size(a, b)?;
    let sum: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum();
    let mse = sum / a.data.len() as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    })
}

/// Side of the Gaussian SSIM window (Wang et al. 2004: 11, sigma 1.5).
const WINDOW: usize = 11;
const SIGMA: f64 = 1.5;

fn gaussian_window() -> [f64; WINDOW] {
    let mut w = [0.0; WINDOW];
    let c = (WINDOW / 2) as f64;
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - c;
        *v = (-x * x / (2.0 * SIGMA * SIGMA)).exp();
    }
    let total: f64 = w.iter().sum();
    w.map(|v| v / total)
}

/// Structural similarity (Wang et al. 2004): Gaussian 11x11 window with sigma 1.5, K1 = 0.01,
/// K2 = 0.03, per channel over the windows that fit inside the image, averaged. 1 when equal.
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Result<f64, DiffusionError> {
    check_same_size(a, b)?;
    if a.width < WINDOW || a.height < WINDOW {
        return Err(DiffusionError::Request(format!(
            "SSIM needs images of at least {WINDOW}x{WINDOW}, got {}x{}",
            a.width, a.height
        )));
    }
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let w = gaussian_window();
    let (width, height) = (a.width, a.height);
    let mut total = 0.0;
    let mut count = 0usize;
    for channel in 0..3 {
        let px =
            |img: &RgbImage, x: usize, y: usize| f64::from(img.data[(y * width + x) * 3 + channel]);
        for y0 in 0..=height - WINDOW {
            for x0 in 0..=width - WINDOW {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for (dy, wy) in w.iter().enumerate() {
                    for (dx, wx) in w.iter().enumerate() {
                        let k = wy * wx;
                        let (va, vb) = (px(a, x0 + dx, y0 + dy), px(b, x0 + dx, y0 + dy));
                        ma += k * va;
                        mb += k * vb;
                        saa += k * va * va;
                        sbb += k * vb * vb;
                        sab += k * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
    }
    Ok(total / count as f64)
}
