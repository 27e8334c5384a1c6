//! The device's loop for one image: prompt to conditioning, noise to latents through the
//! scheduler, with the UNet whole, cut, or in the cloud, then the VAE. Talks to the cloud only
//! through [`DiffusionTrunk`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lsplit_wire::{StepCodec, StepTensor};

use crate::error::DiffusionError;
use crate::model_dir::ModelDir;
use crate::noise::NoiseSource;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::TextEncoders;
use crate::trunk::{
    DiffusionTrunk, ImageSetup, StepRequest, UnetSplit, apply_guidance, guided_prediction,
};
use crate::unet::{AddedConditioning, Unet, UnetConfig, UnetCut, UnetHead, UnetTail, UnetTrunk};
use crate::vae::{RgbImage, Vae};

/// What to draw.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// The prompt.
    pub prompt: String,
    /// What to steer away from; `None` is the empty prompt (zeros for SDXL).
    pub negative: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` turns guidance off.
    pub guidance: f64,
    /// Seed of the initial noise (and of Euler ancestral's noise): same seed, same image.
    pub seed: u64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Overrides the scheduler class named in `scheduler_config.json`.
    pub scheduler: Option<SchedulerKind>,
}

/// Bytes that crossed between device and trunk for one image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// The once-per-image setup.
    pub setup: usize,
    /// Device to trunk over all steps.
    pub up: usize,
    /// Trunk to device over all steps.
    pub down: usize,
    /// Steps that crossed.
    pub steps: usize,
}

/// What the device loop reports after each step (for progress bars, previews and wire views).
pub struct StepProgress<'a> {
    /// Steps done, from 1.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// The latents after this step (decode them for a preview).
    pub latents: &'a Tensor,
    /// The main tensor that crossed to the trunk this step, as the trunk decoded it (the head's
    /// boundary activations, or the latent in `component` mode); `None` unsplit.
    pub uplink: Option<&'a Tensor>,
}

/// The callback the device loop calls after each step; an error stops the image.
pub type OnStep<'a> = dyn FnMut(&StepProgress<'_>) -> Result<(), DiffusionError> + 'a;

/// The result of one image.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The image.
    pub image: RgbImage,
    /// What crossed the wire (zero for `none`).
    pub bytes: WireBytes,
}

/// The device's share of the UNet.
enum DeviceUnet {
    Whole(Box<Unet>),
    Cloud,
    Ends(Box<UnetHead>, Box<UnetTail>),
}

/// Loads a component's UNet weights lazily (only the tensors a part asks for are read).
pub fn unet_weights(
    dir: &ModelDir,
    device: &Device,
) -> Result<(UnetConfig, VarBuilder<'static>, String), DiffusionError> {
    let config: UnetConfig = dir.config("unet", "config.json")?;
    config.validate()?;
    let file = dir.weights("unet")?;
    let name = file.display().to_string();
    // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }.map_err(
        |e| DiffusionError::Weights {
            file: name.clone(),
            message: e.to_string(),
        },
    )?;
    Ok((config, vb, name))
}

/// The device side of a (possibly split) Stable Diffusion pipeline.
pub struct DevicePipeline {
    device: Device,
    split: UnetSplit,
    codec: StepCodec,
    text: TextEncoders,
    vae: Vae,
    unet_config: UnetConfig,
    unet: DeviceUnet,
    scheduler_config: SchedulerConfig,
}

impl DevicePipeline {
    /// Loads what the device runs for `split` from a diffusers directory.
    pub fn load(
        root: &Path,
        split: UnetSplit,
        codec: StepCodec,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let dir = ModelDir::open(root)?;
        let scheduler_config =
            SchedulerConfig::load(&root.join("scheduler").join("scheduler_config.json"))?;
        let (unet_config, vb, file) = unet_weights(&dir, device)?;
        let unet = match split {
            UnetSplit::None => DeviceUnet::Whole(Box::new(Unet::load(
                &vb,
                &unet_config,
                UnetCut::new(&unet_config, 1)?,
                &file,
            )?)),
            UnetSplit::Component => DeviceUnet::Cloud,
            UnetSplit::Lambda(n) => {
                let cut = UnetCut::new(&unet_config, n)?;
                DeviceUnet::Ends(
                    Box::new(UnetHead::load(&vb, &unet_config, cut, &file)?),
                    Box::new(UnetTail::load(&vb, &unet_config, cut, &file)?),
                )
            }
        };
        Ok(Self {
            device: device.clone(),
            split,
            codec,
            text: TextEncoders::load(&dir, device)?,
            vae: Vae::load(&dir, device)?,
            unet_config,
            unet,
            scheduler_config,
        })
    }

    /// How the UNet is divided.
    pub fn split(&self) -> UnetSplit {
        self.split
    }

    /// Levels of the UNet: `lambda:N` takes N from 1 to this.
    pub fn unet_levels(&self) -> usize {
        self.unet_config.levels()
    }

    /// The image side the model was trained at: the UNet's `sample_size` times the VAE's scale.
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size.unwrap_or(64) * self.vae.scale()
    }

    /// Bytes of the largest attention-score matrix this device allocates for an image of
    /// `width` x `height`: the UNet levels it runs (both guidance halves at once) and the VAE
    /// decoder's single-head attention over every latent position. Like the trunk's, it grows
    /// with the square of the image area, so the edge bounds it.
    pub fn attention_bytes(&self, width: usize, height: usize) -> u64 {
        let scale = self.vae.scale();
        let latent = (height / scale, width / scale);
        let levels = match self.split {
            UnetSplit::None => 0..self.unet_config.levels(),
            UnetSplit::Component => 0..0,
            UnetSplit::Lambda(n) => 0..n.min(self.unet_config.levels()),
        };
        let unet = self.unet_config.attention_bytes(levels, 2, latent);
        let positions = (latent.0 as u64).saturating_mul(latent.1 as u64);
        let vae = positions.saturating_mul(positions).saturating_mul(4);
        unet.max(vae)
    }

    /// The latent shape of an image of `width` x `height`, after checking the sizes.
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<[usize; 4], DiffusionError> {
        let multiple = self.vae.scale() * self.unet_config.downsample_factor();
        if width == 0
            || height == 0
            || !width.is_multiple_of(multiple)
            || !height.is_multiple_of(multiple)
            || width > 8192
            || height > 8192
        {
            return Err(DiffusionError::Request(format!(
                "image size {width}x{height}: width and height must be multiples of {multiple} \
                 (at most 8192) for this model"
            )));
        }
        Ok([
            1,
            self.vae.latent_channels(),
            height / self.vae.scale(),
            width / self.vae.scale(),
        ])
    }

    /// Decodes latents to an image (the final image, or a preview).
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage, DiffusionError> {
        self.vae.decode(latents)
    }

    /// Generates an image from seeded noise.
    pub fn generate(
        &self,
        request: &ImageRequest,
        trunk: Option<&mut dyn DiffusionTrunk>,
        on_step: &mut OnStep<'_>,
    ) -> Result<Generated, DiffusionError> {
        let shape = self.latent_shape(request.width, request.height)?;
        let mut noise = NoiseSource::new(request.seed);
        let latents = noise.tensor(&shape, &self.device)?;
        self.generate_from(request, latents, &mut noise, trunk, on_step)
    }

    /// Generates an image from the given initial latents (before `init_noise_sigma`), drawing
    /// any further noise from `noise`.
    pub fn generate_from(
        &self,
        request: &ImageRequest,
        latents: Tensor,
        noise: &mut NoiseSource,
        mut trunk: Option<&mut dyn DiffusionTrunk>,
        on_step: &mut OnStep<'_>,
    ) -> Result<Generated, DiffusionError> {
        let shape = self.latent_shape(request.width, request.height)?;
        if latents.dims() != shape {
            return Err(DiffusionError::Request(format!(
                "initial latents {:?}, expected {shape:?}",
                latents.dims()
            )));
        }
        if request.steps == 0 || request.steps > 1000 {
            return Err(DiffusionError::Request(format!(
                "{} steps: expected 1 to 1000",
                request.steps
            )));
        }
        if !request.guidance.is_finite() {
            return Err(DiffusionError::Request("guidance must be finite".into()));
        }
        let needs_trunk = !matches!(self.unet, DeviceUnet::Whole(_));
        if needs_trunk != trunk.is_some() {
            return Err(DiffusionError::Request(if needs_trunk {
                format!("UNet split {} needs a trunk", self.split)
            } else {
                format!("UNet split {} runs without a trunk", self.split)
            }));
        }
        let kind = match request.scheduler {
            Some(kind) => kind,
            None => self.scheduler_config.class_kind()?,
        };
        let scheduler = Scheduler::new(kind, &self.scheduler_config, request.steps)?;

        let cfg = request.guidance > 1.0;
        let embeds =
            self.text
                .encode(&request.prompt, request.negative.as_deref(), &self.device)?;
        let context = if cfg {
            Tensor::cat(&[&embeds.negative, &embeds.prompt], 0)?
        } else {
            embeds.prompt.clone()
        };
        let batch = context.dim(0)?;
        let added = match &embeds.pooled {
            None => None,
            Some((pooled, negative)) => {
                let (h, w) = (request.height as f32, request.width as f32);
                let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?;
                Some(AddedConditioning {
                    text_embeds: if cfg {
                        Tensor::cat(&[negative, pooled], 0)?
                    } else {
                        pooled.clone()
                    },
                    time_ids: ids.repeat((batch, 1))?,
                })
            }
        };

        let mut bytes = WireBytes::default();
        let encode = |t: &Tensor, total: &mut usize| -> Result<StepTensor, DiffusionError> {
            let encoded = self.codec.encode(t)?;
            *total += encoded.byte_len();
            Ok(encoded)
        };
        if let Some(trunk) = trunk.as_deref_mut() {
            let setup = match self.unet {
                DeviceUnet::Cloud => {
                    let mut conditioning = vec![encode(&context, &mut bytes.setup)?];
                    if let Some(added) = &added {
                        conditioning.push(encode(&added.text_embeds, &mut bytes.setup)?);
                        conditioning.push(encode(&added.time_ids, &mut bytes.setup)?);
                    }
                    ImageSetup {
                        conditioning,
                        guidance: Some(request.guidance),
                    }
                }
                _ => ImageSetup {
                    conditioning: vec![encode(&context, &mut bytes.setup)?],
                    guidance: None,
                },
            };
            trunk.begin_image(setup)?;
        }

        let mut latents = (latents * scheduler.init_noise_sigma())?;
        let total = scheduler.timesteps().len();
        for (i, &t) in scheduler.timesteps().iter().enumerate() {
            let input = scheduler.scale_model_input(&latents, i)?;
            let mut uplink = None;
            let prediction = match (&self.unet, trunk.as_deref_mut()) {
                (DeviceUnet::Whole(unet), _) => {
                    guided_prediction(unet, &input, t, &context, added.as_ref(), request.guidance)?
                }
                (DeviceUnet::Cloud, Some(trunk)) => {
                    let sent = encode(&input, &mut bytes.up)?;
                    uplink = Some(sent.decode(&self.device)?);
                    let up = StepRequest {
                        inputs: vec![sent],
                        timestep: Some(t),
                    };
                    let out = self.receive(trunk.step(up)?, &mut bytes.down)?;
                    if out.dims() != input.dims() {
                        return Err(DiffusionError::Trunk(format!(
                            "noise prediction {:?} does not match the latent {:?}",
                            out.dims(),
                            input.dims()
                        )));
                    }
                    out
                }
                (DeviceUnet::Ends(head, tail), Some(trunk)) => {
                    let x = if cfg {
                        Tensor::cat(&[&input, &input], 0)?
                    } else {
                        input.clone()
                    };
                    let temb = head.time_embedding(batch, t, added.as_ref(), &self.device)?;
                    let out = head.forward(&x, temb, &context)?;
                    let sent = encode(&out.hidden, &mut bytes.up)?;
                    uplink = Some(sent.decode(&self.device)?);
                    let up = StepRequest {
                        inputs: vec![sent, encode(&out.temb, &mut bytes.up)?],
                        timestep: None,
                    };
                    let back = self.receive(trunk.step(up)?, &mut bytes.down)?;
                    let prediction = tail.forward(&back, out.skips, &out.temb, &context)?;
                    if cfg {
                        apply_guidance(&prediction, request.guidance)?
                    } else {
                        prediction
                    }
                }
                (_, None) => {
                    return Err(DiffusionError::Request(format!(
                        "UNet split {} needs a trunk",
                        self.split
                    )));
                }
            };
            let step_noise = if scheduler.needs_noise() {
                Some(noise.tensor(latents.dims(), &self.device)?)
            } else {
                None
            };
            latents = scheduler.step(&prediction, i, &latents, step_noise.as_ref())?;
            if trunk.is_some() {
                bytes.steps += 1;
            }
            on_step(&StepProgress {
                step: i + 1,
                total,
                latents: &latents,
                uplink: uplink.as_ref(),
            })?;
        }
        Ok(Generated {
            image: self.vae.decode(&latents)?,
            bytes,
        })
    }

    /// Decodes the single tensor a trunk step returns.
    fn receive(
        &self,
        tensors: Vec<StepTensor>,
        total: &mut usize,
    ) -> Result<Tensor, DiffusionError> {
        let [tensor] = <[StepTensor; 1]>::try_from(tensors).map_err(|t| {
            DiffusionError::Trunk(format!("a step returned {} tensors, expected 1", t.len()))
        })?;
        *total += tensor.byte_len();
        Ok(tensor.decode(&self.device)?)
    }
}

/// Loads the cloud's part for `split` (never the text encoders, the VAE or the UNet's ends).
pub fn load_trunk_model(
    root: &Path,
    split: UnetSplit,
    device: &Device,
) -> Result<crate::trunk::TrunkModel, DiffusionError> {
    let dir = ModelDir::open(root)?;
    let (config, vb, file) = unet_weights(&dir, device)?;
    match split {
        UnetSplit::None => Err(DiffusionError::Request(
            "--unet-split none has no trunk to serve".into(),
        )),
        UnetSplit::Component => Ok(crate::trunk::TrunkModel::Whole(Box::new(Unet::load(
            &vb,
            &config,
            UnetCut::new(&config, 1)?,
            &file,
        )?))),
        UnetSplit::Lambda(n) => Ok(crate::trunk::TrunkModel::Middle(
            Box::new(UnetTrunk::load(
                &vb,
                &config,
                UnetCut::new(&config, n)?,
                &file,
            )?),
            n,
        )),
    }
}
