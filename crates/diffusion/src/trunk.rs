//! The cloud's share of a split image generation, and the one trait the device loop talks to it
//! through, whether it runs in-process or across the network.
//!
//! What crosses, per mode (every tensor encoded with the session's step codec):
//! - `component` (the original work): once per image the text conditioning (and SDXL's pooled
//!   embedding and time ids) and the guidance scale; each step the scaled latent and the timestep
//!   up, the guided noise prediction down.
//! - `lambda:N`: once per image the text conditioning (the trunk's cross-attention reads it); each
//!   step the head's boundary activations and the time embedding up, the trunk's output down. The
//!   latents, the skips, the timestep and the VAE never leave the device.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lsplit_wire::{StepCodec, StepTensor};

use crate::error::DiffusionError;
use crate::unet::{AddedConditioning, Unet, UnetTrunk, check_context};

/// How the UNet is divided between device and cloud (`--unet-split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetSplit {
    /// Everything on the device: the baseline.
    None,
    /// The whole UNet (with guidance) in the cloud, as in the original work.
    Component,
    /// The UNet cut after N levels at each end.
    Lambda(usize),
}

impl fmt::Display for UnetSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnetSplit::None => f.write_str("none"),
            UnetSplit::Component => f.write_str("component"),
            UnetSplit::Lambda(n) => write!(f, "lambda:{n}"),
        }
    }
}

impl FromStr for UnetSplit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(UnetSplit::None),
            "component" => Ok(UnetSplit::Component),
            _ => s
                .strip_prefix("lambda:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .map(UnetSplit::Lambda)
                .ok_or_else(|| {
                    format!(
                        "unknown UNet split {s:?}: expected none, component or lambda:N (N >= 1)"
                    )
                }),
        }
    }
}

/// The per-image setup that crosses once.
#[derive(Debug, Clone)]
pub struct ImageSetup {
    /// Encoded conditioning tensors (see the module docs for their order per mode).
    pub conditioning: Vec<StepTensor>,
    /// Classifier-free guidance scale: sent in `component` mode only.
    pub guidance: Option<f64>,
}

/// One step's uplink.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// Encoded input tensors.
    pub inputs: Vec<StepTensor>,
    /// The timestep: sent in `component` mode only.
    pub timestep: Option<f64>,
}

/// The cloud side as the device loop sees it.
pub trait DiffusionTrunk {
    /// Starts an image; replaces any previous image's state.
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError>;
    /// Runs one step and returns the encoded downlink tensors.
    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError>;
}

/// What the trunk holds: the whole UNet or its middle.
pub enum TrunkModel {
    /// `component` mode.
    Whole(Box<Unet>),
    /// `lambda:N` mode: the middle of a UNet cut after N levels.
    Middle(Box<UnetTrunk>, usize),
}

/// The trunk's state for the image being generated: the conditioning sent once.
pub struct ImageState {
    context: Tensor,
    added: Option<AddedConditioning>,
    guidance: f64,
}

fn decode_all(tensors: &[StepTensor], device: &Device) -> Result<Vec<Tensor>, DiffusionError> {
    tensors.iter().map(|t| Ok(t.decode(device)?)).collect()
}

impl TrunkModel {
    /// The split this model serves.
    pub fn split(&self) -> UnetSplit {
        match self {
            TrunkModel::Whole(_) => UnetSplit::Component,
            TrunkModel::Middle(_, n) => UnetSplit::Lambda(*n),
        }
    }

    /// Refuses a step whose full attention would allocate more than `budget` bytes at once,
    /// from the shapes alone (before anything is decoded): attention memory grows with the
    /// square of the image area, so a hostile or oversized image could exhaust the server.
    pub fn check_attention_budget(
        &self,
        inputs: &[StepTensor],
        budget: u64,
    ) -> Result<(), DiffusionError> {
        let Some([batch, _, h, w]) = inputs
            .first()
            .and_then(|t| <[usize; 4]>::try_from(t.shape.as_slice()).ok())
        else {
            return Ok(());
        };
        let (config, levels, shift) = match self {
            TrunkModel::Whole(unet) => (unet.config(), 0..unet.config().levels(), 0),
            TrunkModel::Middle(trunk, n) => {
                let levels = trunk.config().levels();
                // The head's output is at level N (level n - 1 when the head takes every level).
                let shift = (*n).min(levels - 1);
                (trunk.config(), shift..levels, shift)
            }
        };
        let latent = (h << shift, w << shift);
        let bytes = config.attention_bytes(levels, batch, latent);
        if bytes > budget {
            return Err(DiffusionError::Request(format!(
                "a step of shape {:?} needs {} MiB for attention, past this trunk's limit of {} MiB",
                inputs[0].shape,
                bytes >> 20,
                budget >> 20
            )));
        }
        Ok(())
    }

    /// Checks and decodes an image's setup.
    pub fn begin_image(
        &self,
        setup: &ImageSetup,
        device: &Device,
    ) -> Result<ImageState, DiffusionError> {
        let tensors = decode_all(&setup.conditioning, device)?;
        let image = match (self, tensors.as_slice(), setup.guidance) {
            (TrunkModel::Whole(unet), [context, rest @ ..], Some(guidance))
                if rest.is_empty() || rest.len() == 2 =>
            {
                let batch = context.dim(0)?;
                check_context(unet.config(), batch, context)?;
                let added = match rest {
                    [text_embeds, time_ids] => {
                        if text_embeds.rank() != 2
                            || text_embeds.dim(0)? != batch
                            || time_ids.dims() != [batch, 6]
                        {
                            return Err(DiffusionError::Request(format!(
                                "added conditioning {:?} and {:?}: expected [{batch}, width] \
                                 and [{batch}, 6]",
                                text_embeds.dims(),
                                time_ids.dims()
                            )));
                        }
                        Some(AddedConditioning {
                            text_embeds: text_embeds.clone(),
                            time_ids: time_ids.clone(),
                        })
                    }
                    _ => None,
                };
                let expected = if guidance > 1.0 { 2 } else { 1 };
                if batch != expected {
                    return Err(DiffusionError::Request(format!(
                        "guidance {guidance} needs {expected} conditioning rows, got {batch}"
                    )));
                }
                ImageState {
                    context: context.clone(),
                    added,
                    guidance,
                }
            }
            (TrunkModel::Middle(trunk, _), [context], None) => {
                check_context(trunk.config(), context.dim(0)?, context)?;
                ImageState {
                    context: context.clone(),
                    added: None,
                    guidance: 1.0,
                }
            }
            (model, tensors, guidance) => {
                return Err(DiffusionError::Request(format!(
                    "an image setup with {} conditioning tensors and guidance {guidance:?} does \
                     not fit this {} trunk",
                    tensors.len(),
                    model.split()
                )));
            }
        };
        if !image.guidance.is_finite() {
            return Err(DiffusionError::Request(format!(
                "guidance scale {} is not finite",
                image.guidance
            )));
        }
        Ok(image)
    }

    /// Runs one step for `image` and encodes the answer with `codec`.
    pub fn step(
        &self,
        image: &ImageState,
        request: &StepRequest,
        codec: StepCodec,
        device: &Device,
    ) -> Result<Vec<StepTensor>, DiffusionError> {
        let inputs = decode_all(&request.inputs, device)?;
        let output = match (self, inputs.as_slice(), request.timestep) {
            (TrunkModel::Whole(unet), [latent], Some(timestep)) => {
                if !timestep.is_finite() || !(0.0..=100_000.0).contains(&timestep) {
                    return Err(DiffusionError::Request(format!(
                        "timestep {timestep} is out of range"
                    )));
                }
                if latent.rank() != 4 || latent.dim(0)? != 1 {
                    return Err(DiffusionError::Request(format!(
                        "latent {:?}: expected [1, channels, h, w]",
                        latent.dims()
                    )));
                }
                guided_prediction(
                    unet,
                    latent,
                    timestep,
                    &image.context,
                    image.added.as_ref(),
                    image.guidance,
                )?
            }
            (TrunkModel::Middle(trunk, _), [hidden, temb], None) => {
                trunk.forward(hidden, temb, &image.context)?
            }
            (_, inputs, timestep) => {
                return Err(DiffusionError::Request(format!(
                    "a step with {} tensors and timestep {timestep:?} does not fit this {} trunk",
                    inputs.len(),
                    self.split()
                )));
            }
        };
        Ok(vec![codec.encode(&output)?])
    }
}

/// The trunk in the same process: the wire codec still applies both ways, so its output and byte
/// counts are those of the remote trunk.
pub struct LocalDiffusionTrunk {
    model: Arc<TrunkModel>,
    codec: StepCodec,
    device: Device,
    image: Option<ImageState>,
}

impl LocalDiffusionTrunk {
    /// A trunk answering with `codec`.
    pub fn new(model: Arc<TrunkModel>, codec: StepCodec, device: Device) -> Self {
        Self {
            model,
            codec,
            device,
            image: None,
        }
    }
}

impl DiffusionTrunk for LocalDiffusionTrunk {
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError> {
        self.image = None;
        self.image = Some(self.model.begin_image(&setup, &self.device)?);
        Ok(())
    }

    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError> {
        let image = self.image.as_ref().ok_or_else(|| {
            DiffusionError::Request("a step before the image's conditioning was sent".into())
        })?;
        self.model.step(image, &request, self.codec, &self.device)
    }
}

/// The UNet with classifier-free guidance when `guidance > 1`: the batch is [negative; prompt]
/// and the result `uncond + guidance * (text - uncond)`. The `component` trunk's step, and the
/// unsplit pipeline's.
pub fn guided_prediction(
    unet: &Unet,
    latent: &Tensor,
    timestep: f64,
    context: &Tensor,
    added: Option<&AddedConditioning>,
    guidance: f64,
) -> Result<Tensor, DiffusionError> {
    if guidance > 1.0 {
        let input = Tensor::cat(&[latent, latent], 0)?;
        let noise = unet.forward(&input, timestep, context, added)?;
        apply_guidance(&noise, guidance)
    } else {
        unet.forward(latent, timestep, context, added)
    }
}

/// Splits a `[2B, ...]` prediction into its unconditional and text halves and applies guidance.
pub fn apply_guidance(noise: &Tensor, guidance: f64) -> Result<Tensor, DiffusionError> {
    let halves = noise.chunk(2, 0)?;
    let (uncond, text) = (&halves[0], &halves[1]);
    Ok((uncond + ((text - uncond)? * guidance)?)?)
}
