//! OpenAI's image request (`POST /v1/images/generations`) and lsplit's extensions, checked and
//! turned into the diffusion pipeline's [`ImageRequest`]: what a request leaves out is what
//! `lsplit image` would use (its default steps and guidance, the model's training size, a random
//! seed), so the same settings draw the same image.

use lsplit_diffusion::{DevicePipeline, ImageRequest, SchedulerKind};
use serde::Deserialize;

use crate::error::ApiError;

/// Denoising steps when a request leaves them out (`lsplit image --steps`' default).
pub const DEFAULT_STEPS: usize = 30;
/// Guidance scale when a request leaves it out (`lsplit image --guidance`' default).
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// The most steps a request may ask for (the pipeline's own limit).
pub const MAX_STEPS: usize = 1000;

/// The body of `POST /v1/images/generations` and of the page's `POST /lsplit/images/stream`:
/// OpenAI's fields, then lsplit's (`negative_prompt`, `steps`, `guidance`, `seed`,
/// `scheduler`, and for the stream `preview_every`).
#[derive(Debug, Deserialize)]
pub(crate) struct ImageBody {
    pub prompt: String,
    pub model: Option<String>,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub stream: Option<bool>,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    /// Every this many steps the stream carries a preview; 0 or absent for none.
    pub preview_every: Option<usize>,
}

/// Parses OpenAI's `WIDTHxHEIGHT`.
fn parse_size(size: &str) -> Option<(usize, usize)> {
    let (width, height) = size.split_once('x')?;
    Some((width.parse().ok()?, height.parse().ok()?))
}

impl ImageBody {
    /// The pipeline request, after checking every field against what this server and
    /// `pipeline` support, and the image's attention against `max_attention_bytes`.
    pub fn request(
        &self,
        pipeline: &DevicePipeline,
        max_attention_bytes: u64,
    ) -> Result<ImageRequest, ApiError> {
        if self.prompt.trim().is_empty() {
            return Err(ApiError::invalid(
                Some("prompt"),
                "prompt must not be empty",
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                Some("n"),
                "n must be 1: lsplit edge generates one image per request",
            ));
        }
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some("url") => {
                return Err(ApiError::invalid(
                    Some("response_format"),
                    "response_format `url` is not supported: lsplit edge keeps images on this \
                     device and returns them inline; use `b64_json`",
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("response_format"),
                    format!("unknown response_format `{other}`: use `b64_json`"),
                ));
            }
        }
        if let Some(format) = self.output_format.as_deref().filter(|f| *f != "png") {
            return Err(ApiError::invalid(
                Some("output_format"),
                format!("output_format `{format}` is not supported: images are PNG"),
            ));
        }
        if self.stream == Some(true) {
            return Err(ApiError::invalid(
                Some("stream"),
                "stream is not supported on /v1/images/generations; POST the same body to \
                 /lsplit/images/stream for progress events",
            ));
        }
        let (width, height) = match self.size.as_deref() {
            None | Some("auto") => (pipeline.default_size(), pipeline.default_size()),
            Some(size) => parse_size(size).ok_or_else(|| {
                ApiError::invalid(
                    Some("size"),
                    format!("size `{size}` is not WIDTHxHEIGHT (e.g. 512x512) or `auto`"),
                )
            })?,
        };
        pipeline
            .latent_shape(width, height)
            .map_err(|e| ApiError::invalid(Some("size"), e.to_string()))?;
        let needed = pipeline.attention_bytes(width, height);
        if needed > max_attention_bytes {
            return Err(ApiError::invalid(
                Some("size"),
                format!(
                    "an image of {width}x{height} needs {} MiB for attention on this device, past \
                     this server's limit of {} MiB (--max-attention-mib)",
                    needed >> 20,
                    max_attention_bytes >> 20
                ),
            ));
        }
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::invalid(
                Some("steps"),
                format!("steps must be 1 to {MAX_STEPS}, got {steps}"),
            ));
        }
        let guidance = self.guidance.unwrap_or(DEFAULT_GUIDANCE);
        if !(0.0..=100.0).contains(&guidance) {
            return Err(ApiError::invalid(
                Some("guidance"),
                format!("guidance must be 0 to 100, got {guidance}"),
            ));
        }
        let scheduler = self
            .scheduler
            .as_deref()
            .map(str::parse::<SchedulerKind>)
            .transpose()
            .map_err(|e| ApiError::invalid(Some("scheduler"), e.to_string()))?;
        Ok(ImageRequest {
            prompt: self.prompt.clone(),
            negative: self.negative_prompt.clone(),
            steps,
            guidance,
            seed: self.seed.unwrap_or_else(rand::random),
            width,
            height,
            scheduler,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_width_by_height() {
        assert_eq!(parse_size("512x768"), Some((512, 768)));
        assert_eq!(parse_size("64x64"), Some((64, 64)));
        for bad in ["512", "x512", "512x", "-1x5", "axb", "512X512", "1x2x3"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
