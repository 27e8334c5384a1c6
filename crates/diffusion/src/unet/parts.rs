//! The three parts of the split UNet (head, trunk, tail) and the whole UNet composed of them.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Conv2d, GroupNorm, Module, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
};

use super::blocks::{DownBlock, UpBlock};
use super::{UnetConfig, UnetCut, load};
use crate::error::DiffusionError;

/// SDXL's `text_time` conditioning: sinusoidal time ids and the pooled text embedding, projected
/// and added to the time embedding.
struct AddedEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

/// The pooled text embedding and the six size/crop ids SDXL adds to the time embedding.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `[batch, pooled width]`.
    pub text_embeds: Tensor,
    /// `[batch, 6]`: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

/// The device's first part: `conv_in`, the time embedding and the first N down blocks.
pub struct UnetHead {
    config: UnetConfig,
    cut: UnetCut,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    added: Option<AddedEmbedding>,
    down: Vec<DownBlock>,
}

/// What the head hands on: the boundary tensor and time embedding (to the trunk) and its skips
/// (kept on the device for the tail).
pub struct HeadOutput {
    /// The activations after the head's last down block: crosses to the trunk.
    pub hidden: Tensor,
    /// The time embedding `[batch, 4 * block_out_channels[0]]`: crosses to the trunk.
    pub temb: Tensor,
    /// Skip connections the tail will consume; they never leave the device.
    pub skips: Vec<Tensor>,
}

impl UnetHead {
    /// Loads the head's weights only.
    pub fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        cut: UnetCut,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let c0 = config.block_out_channels[0];
        let conv_in = conv3x3(vb, config.in_channels, c0, file, "conv_in")?;
        let time_proj = Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding = load(
            TimestepEmbedding::new(vb.pp("time_embedding"), c0, config.time_embed_dim()),
            file,
            "time_embedding",
        )?;
        let added = match config.addition_embed_type.as_deref() {
            Some("text_time") => {
                let dim = config.addition_time_embed_dim.unwrap_or_default();
                let input = config
                    .projection_class_embeddings_input_dim
                    .unwrap_or_default();
                Some(AddedEmbedding {
                    time_proj: Timesteps::new(dim, config.flip_sin_to_cos, config.freq_shift),
                    embedding: load(
                        TimestepEmbedding::new(
                            vb.pp("add_embedding"),
                            input,
                            config.time_embed_dim(),
                        ),
                        file,
                        "add_embedding",
                    )?,
                })
            }
            _ => None,
        };
        let down = DownBlock::load_range(vb, config, 0..cut.n(), file)?;
        Ok(Self {
            config: config.clone(),
            cut,
            conv_in,
            time_proj,
            time_embedding,
            added,
            down,
        })
    }

    /// The time embedding for `timestep`, plus SDXL's added conditioning.
    pub fn time_embedding(
        &self,
        batch: usize,
        timestep: f64,
        added: Option<&AddedConditioning>,
        device: &Device,
    ) -> Result<Tensor, DiffusionError> {
        let t = (Tensor::ones(batch, DType::F32, device)? * timestep)?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        match (&self.added, added) {
            (None, None) => Ok(emb),
            (Some(a), Some(cond)) => {
                let ids = cond.time_ids.flatten_all()?;
                let time = a.time_proj.forward(&ids)?.reshape((batch, ()))?;
                let input = Tensor::cat(&[&cond.text_embeds, &time], D::Minus1)?;
                let expected = self.config.projection_class_embeddings_input_dim;
                if Some(input.dim(1)?) != expected {
                    return Err(DiffusionError::Request(format!(
                        "added conditioning has width {}, the UNet expects {expected:?}",
                        input.dim(1)?
                    )));
                }
                Ok((emb + a.embedding.forward(&input)?)?)
            }
            (Some(_), None) => Err(DiffusionError::Request(
                "this UNet (SDXL) needs the pooled text embedding and time ids".into(),
            )),
            (None, Some(_)) => Err(DiffusionError::Request(
                "this UNet takes no added conditioning (not SDXL)".into(),
            )),
        }
    }

    /// Runs `conv_in` and the first N down blocks on `sample` (`[batch, C, h, w]`).
    pub fn forward(
        &self,
        sample: &Tensor,
        temb: Tensor,
        context: &Tensor,
    ) -> Result<HeadOutput, DiffusionError> {
        let (_, channels, h, w) = sample.dims4()?;
        let f = self.config.downsample_factor();
        if channels != self.config.in_channels || h % f != 0 || w % f != 0 {
            return Err(DiffusionError::Request(format!(
                "latent sample {:?}: the UNet needs {} channels and sides that are multiples of {f}",
                sample.dims(),
                self.config.in_channels
            )));
        }
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (out, res) = block.forward(&xs, &temb, context)?;
            skips.extend(res);
            xs = out;
        }
        skips.truncate(self.cut.n() * (self.config.layers() + 1));
        Ok(HeadOutput {
            hidden: xs,
            temb,
            skips,
        })
    }
}

/// The cloud's part: the remaining down blocks, the mid block and the up blocks but the last N.
pub struct UnetTrunk {
    config: UnetConfig,
    cut: UnetCut,
    down: Vec<DownBlock>,
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<UpBlock>,
}

impl UnetTrunk {
    /// Loads the trunk's weights only.
    pub fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        cut: UnetCut,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let n = config.levels();
        let down = DownBlock::load_range(vb, config, cut.n()..n, file)?;
        let last = n - 1;
        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: config.norm_eps,
            output_scale_factor: config.mid_block_scale_factor,
            cross_attn_dim: config.cross_attention_dim,
            attn_num_head_channels: config.heads(last)?,
            resnet_groups: Some(config.norm_num_groups),
            use_linear_projection: config.use_linear_projection,
            transformer_layers_per_block: config.cross_attn(last)?.unwrap_or(1),
            ..Default::default()
        };
        let mid = load(
            UNetMidBlock2DCrossAttn::new(
                vb.pp("mid_block"),
                config.block_out_channels[last],
                Some(config.time_embed_dim()),
                false,
                mid_cfg,
            ),
            file,
            "mid_block",
        )?;
        let up = UpBlock::load_range(vb, config, 0..n - cut.n(), file)?;
        Ok(Self {
            config: config.clone(),
            cut,
            down,
            mid,
            up,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Checks the boundary tensor from the head: the channels of level N and sides the trunk's
    /// remaining downsamplers can halve.
    fn expected_hidden(&self, batch: usize, hidden: &Tensor) -> Result<(), DiffusionError> {
        let level = self.cut.n() - 1;
        let channels = self.config.block_out_channels[level];
        let (b, c, h, w) = hidden.dims4().map_err(|_| {
            DiffusionError::Request(format!(
                "trunk input must be [batch, channels, h, w], got {:?}",
                hidden.dims()
            ))
        })?;
        if b != batch || c != channels || h == 0 || w == 0 {
            return Err(DiffusionError::Request(format!(
                "trunk input {:?}: expected [{batch}, {channels}, h, w]",
                hidden.dims()
            )));
        }
        let n = self.config.levels();
        let f = if self.cut.n() < n {
            1usize << (n - 1 - self.cut.n())
        } else {
            1
        };
        if f > 1 && (h % f != 0 || w % f != 0) {
            return Err(DiffusionError::Request(format!(
                "trunk input {:?}: sides must be multiples of {f}",
                hidden.dims()
            )));
        }
        Ok(())
    }

    /// Runs the trunk on the head's boundary tensor; returns the tensor the tail continues from.
    pub fn forward(
        &self,
        hidden: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, DiffusionError> {
        let batch = temb.dim(0)?;
        self.expected_hidden(batch, hidden)?;
        if temb.dims() != [batch, self.config.time_embed_dim()] {
            return Err(DiffusionError::Request(format!(
                "time embedding {:?}: expected [{batch}, {}]",
                temb.dims(),
                self.config.time_embed_dim()
            )));
        }
        check_context(&self.config, batch, context)?;
        let mut skips = if self.cut.n() < self.config.levels() {
            vec![hidden.clone()]
        } else {
            Vec::new()
        };
        let mut xs = hidden.clone();
        for block in &self.down {
            let (out, res) = block.forward(&xs, temb, context)?;
            skips.extend(res);
            xs = out;
        }
        let mut xs = self.mid.forward(&xs, Some(temb), Some(context))?;
        for block in &self.up {
            xs = block.forward(&xs, &mut skips, temb, context)?;
        }
        Ok(xs)
    }
}

/// Checks the text conditioning: `[batch, tokens, cross_attention_dim]`.
pub fn check_context(
    config: &UnetConfig,
    batch: usize,
    context: &Tensor,
) -> Result<(), DiffusionError> {
    match context.dims() {
        [b, t, d] if *b == batch && *t > 0 && *d == config.cross_attention_dim => Ok(()),
        dims => Err(DiffusionError::Request(format!(
            "text conditioning {dims:?}: expected [{batch}, tokens, {}]",
            config.cross_attention_dim
        ))),
    }
}

/// The device's last part: the last N up blocks, the output norm and `conv_out`.
pub struct UnetTail {
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UnetTail {
    /// Loads the tail's weights only.
    pub fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        cut: UnetCut,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let n = config.levels();
        let c0 = config.block_out_channels[0];
        let up = UpBlock::load_range(vb, config, n - cut.n()..n, file)?;
        let norm_out = load(
            candle_nn::group_norm(
                config.norm_num_groups,
                c0,
                config.norm_eps,
                vb.pp("conv_norm_out"),
            ),
            file,
            "conv_norm_out",
        )?;
        let conv_out = conv3x3(vb, c0, config.out_channels, file, "conv_out")?;
        Ok(Self {
            up,
            norm_out,
            conv_out,
        })
    }

    /// Finishes the UNet: the trunk's output plus the head's skips give the noise prediction.
    pub fn forward(
        &self,
        hidden: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, DiffusionError> {
        let mut xs = hidden.clone();
        for block in &self.up {
            let (_, _, h, w) = xs.dims4()?;
            let Some(skip) = skips.last() else {
                return Err(DiffusionError::Request("the tail has no skips left".into()));
            };
            let (_, _, sh, sw) = skip.dims4()?;
            if (h, w) != (sh, sw) || xs.dim(0)? != skip.dim(0)? {
                return Err(DiffusionError::Request(format!(
                    "tail input {:?} does not fit the head's skip {:?}",
                    xs.dims(),
                    skip.dims()
                )));
            }
            xs = block.forward(&xs, &mut skips, temb, context)?;
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}

/// The whole UNet on one side: head, trunk and tail composed, exactly the ops of the split.
pub struct Unet {
    /// `conv_in`, time embedding, first down block.
    pub head: UnetHead,
    /// The middle.
    pub trunk: UnetTrunk,
    /// Last up block and output.
    pub tail: UnetTail,
}

impl Unet {
    /// Loads the whole UNet, cut after `cut` levels (the cut does not change the result).
    pub fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        cut: UnetCut,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        Ok(Self {
            head: UnetHead::load(vb, config, cut, file)?,
            trunk: UnetTrunk::load(vb, config, cut, file)?,
            tail: UnetTail::load(vb, config, cut, file)?,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.head.config
    }

    /// The noise (or v) prediction for `sample` at `timestep`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let batch = sample.dim(0)?;
        check_context(&self.head.config, batch, context)?;
        let temb = self
            .head
            .time_embedding(batch, timestep, added, sample.device())?;
        let head = self.head.forward(sample, temb, context)?;
        let hidden = self.trunk.forward(&head.hidden, &head.temb, context)?;
        self.tail.forward(&hidden, head.skips, &head.temb, context)
    }
}

/// A 3x3 convolution with padding 1, as `conv_in` and `conv_out` are.
fn conv3x3(
    vb: &VarBuilder,
    in_channels: usize,
    out_channels: usize,
    file: &str,
    name: &str,
) -> Result<Conv2d, DiffusionError> {
    let config = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    load(
        candle_nn::conv2d(in_channels, out_channels, 3, config, vb.pp(name)),
        file,
        name,
    )
}
