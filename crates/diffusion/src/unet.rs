//! The UNet of Stable Diffusion cut into head, trunk and tail (`--unet-split lambda:N`).
//!
//! Head = `conv_in`, the time embedding (plus SDXL's added text/time embedding) and the first N
//! down blocks; trunk = the remaining down blocks, the mid block and all up blocks but the last N;
//! tail = the last N up blocks, the output norm and `conv_out`. Skip connections stay on the side
//! that made them: the tail consumes exactly the head's skips, the trunk its own. The blocks are
//! candle-transformers' (weights named as in diffusers); the wiring and the split are ours.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Conv2d, GroupNorm, Module, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};
use serde::Deserialize;

use crate::error::DiffusionError;

/// A config value diffusers writes either as one number or as one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per down block.
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize, what: &str) -> Result<usize, DiffusionError> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) => v.get(i).copied().ok_or_else(|| {
                DiffusionError::Config(format!(
                    "unet: {what} has {} entries, block {i} needs one",
                    v.len()
                ))
            }),
        }
    }
}

fn default_one() -> PerBlock {
    PerBlock::One(1)
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`, the fields this engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// The latent side the model was trained at (the default image size / VAE scale).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Whether the input is mapped from [0,1] to [-1,1] first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Order of sin/cos in the timestep embedding.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, per level.
    pub down_block_types: Vec<String>,
    /// The mirror of `down_block_types`.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock,
    /// Padding of the downsampling convolutions.
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    /// Output scale of the mid block.
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Group norm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Group norm epsilon.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Width of the text conditioning the cross-attention reads.
    pub cross_attention_dim: usize,
    /// Number of attention heads per level (diffusers' legacy name for it).
    pub attention_head_dim: PerBlock,
    /// The non-legacy name; wins over `attention_head_dim` when set.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer layers in each cross-attention block.
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear (SD 2.x, SDXL) or 1x1-conv projections around the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `"text_time"` for SDXL's pooled-text and size conditioning.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: sinusoidal width per time id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: pooled text width + 6 * `addition_time_embed_dim`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be absent: class-conditioned UNets are not Stable Diffusion.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Must be absent or `UNetMidBlock2DCrossAttn`.
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Must be absent or "silu".
    #[serde(default)]
    pub act_fn: Option<String>,
    /// Must be absent or "positional".
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    /// Must be absent or "default".
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Must be absent: LCM-style guidance embedding.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Must be absent or 3.
    #[serde(default)]
    pub conv_in_kernel: Option<usize>,
    /// Must be absent or 3.
    #[serde(default)]
    pub conv_out_kernel: Option<usize>,
}

fn default_true() -> bool {
    true
}
fn default_one_usize() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}

impl UnetConfig {
    /// Checks everything this engine relies on, with a message naming the offending field.
    pub fn validate(&self) -> Result<(), DiffusionError> {
        let bad = |m: String| Err(DiffusionError::Config(format!("unet: {m}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let PerBlock::Each(_) = self.layers_per_block {
            return bad("layers_per_block must be one number".into());
        }
        for (i, down) in self.down_block_types.iter().enumerate() {
            let up = &self.up_block_types[n - 1 - i];
            let pair = (down.as_str(), up.as_str());
            if !matches!(
                pair,
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") | ("DownBlock2D", "UpBlock2D")
            ) {
                return bad(format!(
                    "down block {i} {down} with up block {} {up} is not supported \
                     (CrossAttnDownBlock2D/CrossAttnUpBlock2D or DownBlock2D/UpBlock2D)",
                    n - 1 - i
                ));
            }
            let channels = self.block_out_channels[i];
            if channels % self.norm_num_groups != 0 {
                return bad(format!(
                    "block {i} has {channels} channels, not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            let heads = self.heads(i)?;
            if heads == 0 || channels % heads != 0 {
                return bad(format!(
                    "block {i}: {channels} channels do not split into {heads} heads"
                ));
            }
            self.transformer_layers_per_block
                .get(i, "transformer_layers_per_block")?;
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.as_deref(), None),
            (
                "mid_block_type",
                self.mid_block_type.as_deref(),
                Some("UNetMidBlock2DCrossAttn"),
            ),
            ("act_fn", self.act_fn.as_deref(), Some("silu")),
            (
                "time_embedding_type",
                self.time_embedding_type.as_deref(),
                Some("positional"),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.as_deref(),
                Some("default"),
            ),
        ];
        for (field, value, allowed) in unsupported {
            if let Some(value) = value {
                if Some(value) != allowed {
                    return bad(format!("{field} {value:?} is not supported"));
                }
            }
        }
        if self.time_cond_proj_dim.is_some() {
            return bad("time_cond_proj_dim (guidance embedding) is not supported".into());
        }
        for (field, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel.is_some_and(|k| k != 3) {
                return bad(format!("{field} {kernel:?} is not supported (3)"));
            }
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return bad(
                    "addition_embed_type \"text_time\" needs addition_time_embed_dim \
                            and projection_class_embeddings_input_dim"
                        .into(),
                );
            }
            Some("text_time") => {}
            Some(other) => return bad(format!("addition_embed_type {other:?} is not supported")),
        }
        Ok(())
    }

    /// Number of levels (down blocks).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    fn layers(&self) -> usize {
        match self.layers_per_block {
            PerBlock::One(v) => v,
            PerBlock::Each(ref v) => v[0],
        }
    }

    fn heads(&self, i: usize) -> Result<usize, DiffusionError> {
        match &self.num_attention_heads {
            Some(h) => h.get(i, "num_attention_heads"),
            None => self.attention_head_dim.get(i, "attention_head_dim"),
        }
    }

    fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// The factor by which the UNet downsamples: latent sides must be multiples of it.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// Bytes of the largest attention-score matrix (batch x heads x positions²) over `levels`
    /// for a latent of `latent_h` x `latent_w`: what full attention allocates at once.
    pub fn attention_bytes(
        &self,
        levels: impl Iterator<Item = usize>,
        batch: usize,
        (latent_h, latent_w): (usize, usize),
    ) -> u64 {
        levels
            .filter(|&l| {
                // Cross-attention blocks, and the mid block at the deepest level.
                l + 1 == self.levels()
                    || self.down_block_types.get(l).map(String::as_str)
                        == Some("CrossAttnDownBlock2D")
            })
            .map(|l| {
                let positions = ((latent_h >> l) * (latent_w >> l)) as u64;
                let heads = self.heads(l).unwrap_or(1) as u64;
                (batch as u64)
                    .saturating_mul(heads)
                    .saturating_mul(positions.saturating_mul(positions))
                    .saturating_mul(4)
            })
            .max()
            .unwrap_or(0)
    }

    fn cross_attn(&self, i: usize) -> Result<Option<usize>, DiffusionError> {
        if self.down_block_types[i] == "CrossAttnDownBlock2D" {
            Ok(Some(
                self.transformer_layers_per_block
                    .get(i, "transformer_layers_per_block")?,
            ))
        } else {
            Ok(None)
        }
    }
}

/// Where the UNet is cut: the head takes `n` down blocks and the tail `n` up blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetCut {
    n: usize,
}

impl UnetCut {
    /// A cut after `n` of the config's levels: `1 <= n <= levels`.
    pub fn new(config: &UnetConfig, n: usize) -> Result<Self, DiffusionError> {
        let levels = config.levels();
        if n == 0 || n > levels {
            return Err(DiffusionError::Request(format!(
                "lambda:{n}: this UNet has {levels} levels; N must be between 1 and {levels}"
            )));
        }
        Ok(Self { n })
    }

    /// Down (and up) blocks on the device at each end.
    pub fn n(self) -> usize {
        self.n
    }
}

fn load<T>(r: candle_core::Result<T>, file: &str, what: &str) -> Result<T, DiffusionError> {
    r.map_err(|e| DiffusionError::Weights {
        file: file.to_string(),
        message: format!("{what}: {e}"),
    })
}

enum DownBlock {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

impl DownBlock {
    fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        i: usize,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let n = config.levels();
        let in_channels = if i > 0 {
            config.block_out_channels[i - 1]
        } else {
            config.block_out_channels[0]
        };
        let out_channels = config.block_out_channels[i];
        let downblock = DownBlock2DConfig {
            num_layers: config.layers(),
            resnet_eps: config.norm_eps,
            resnet_groups: config.norm_num_groups,
            add_downsample: i < n - 1,
            downsample_padding: config.downsample_padding,
            ..Default::default()
        };
        let vb = vb.pp("down_blocks").pp(i.to_string());
        let temb = Some(config.time_embed_dim());
        let what = format!("down_blocks.{i}");
        Ok(match config.cross_attn(i)? {
            Some(layers) => {
                let cfg = CrossAttnDownBlock2DConfig {
                    downblock,
                    attn_num_head_channels: config.heads(i)?,
                    cross_attention_dim: config.cross_attention_dim,
                    sliced_attention_size: None,
                    use_linear_projection: config.use_linear_projection,
                    transformer_layers_per_block: layers,
                };
                DownBlock::CrossAttn(load(
                    CrossAttnDownBlock2D::new(vb, in_channels, out_channels, temb, false, cfg),
                    file,
                    &what,
                )?)
            }
            None => DownBlock::Basic(load(
                DownBlock2D::new(vb, in_channels, out_channels, temb, downblock),
                file,
                &what,
            )?),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        match self {
            DownBlock::Basic(b) => b.forward(xs, Some(temb)),
            DownBlock::CrossAttn(b) => b.forward(xs, Some(temb), Some(context)),
        }
    }
}

enum UpBlock {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

impl UpBlock {
    /// Up block `i` (0 = the deepest), as diffusers numbers them.
    fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        i: usize,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let n = config.levels();
        let level = n - 1 - i;
        let out_channels = config.block_out_channels[level];
        let prev_out_channels = if i > 0 {
            config.block_out_channels[n - i]
        } else {
            config.block_out_channels[n - 1]
        };
        let in_channels = config.block_out_channels[if i == n - 1 { 0 } else { n - i - 2 }];
        let upblock = UpBlock2DConfig {
            num_layers: config.layers() + 1,
            resnet_eps: config.norm_eps,
            resnet_groups: config.norm_num_groups,
            add_upsample: i < n - 1,
            ..Default::default()
        };
        let vb = vb.pp("up_blocks").pp(i.to_string());
        let temb = Some(config.time_embed_dim());
        let what = format!("up_blocks.{i}");
        Ok(match config.cross_attn(level)? {
            Some(layers) => {
                let cfg = CrossAttnUpBlock2DConfig {
                    upblock,
                    attn_num_head_channels: config.heads(level)?,
                    cross_attention_dim: config.cross_attention_dim,
                    sliced_attention_size: None,
                    use_linear_projection: config.use_linear_projection,
                    transformer_layers_per_block: layers,
                };
                UpBlock::CrossAttn(load(
                    CrossAttnUpBlock2D::new(
                        vb,
                        in_channels,
                        prev_out_channels,
                        out_channels,
                        temb,
                        false,
                        cfg,
                    ),
                    file,
                    &what,
                )?)
            }
            None => UpBlock::Basic(load(
                UpBlock2D::new(
                    vb,
                    in_channels,
                    prev_out_channels,
                    out_channels,
                    temb,
                    upblock,
                ),
                file,
                &what,
            )?),
        })
    }

    /// Consumes its skips from the end of `skips`.
    fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, DiffusionError> {
        let want = match self {
            UpBlock::Basic(b) => b.resnets.len(),
            UpBlock::CrossAttn(b) => b.upblock.resnets.len(),
        };
        if skips.len() < want {
            return Err(DiffusionError::Request(format!(
                "up block needs {want} skip tensors, {} left",
                skips.len()
            )));
        }
        let mine = skips.split_off(skips.len() - want);
        Ok(match self {
            UpBlock::Basic(b) => b.forward(xs, &mine, Some(temb), None)?,
            UpBlock::CrossAttn(b) => b.forward(xs, &mine, Some(temb), None, Some(context))?,
        })
    }
}

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
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = load(
            candle_nn::conv2d(config.in_channels, c0, 3, conv_cfg, vb.pp("conv_in")),
            file,
            "conv_in",
        )?;
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
        let down = (0..cut.n)
            .map(|i| DownBlock::load(vb, config, i, file))
            .collect::<Result<_, _>>()?;
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
        skips.truncate(self.cut.n * (self.config.layers() + 1));
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
        let down = (cut.n..n)
            .map(|i| DownBlock::load(vb, config, i, file))
            .collect::<Result<_, _>>()?;
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
        let up = (0..n - cut.n)
            .map(|i| UpBlock::load(vb, config, i, file))
            .collect::<Result<_, _>>()?;
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
        let level = self.cut.n - 1;
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
        let f = if self.cut.n < n {
            1usize << (n - 1 - self.cut.n)
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
        let mut skips = if self.cut.n < self.config.levels() {
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
        let up = (n - cut.n..n)
            .map(|i| UpBlock::load(vb, config, i, file))
            .collect::<Result<_, _>>()?;
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
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_out = load(
            candle_nn::conv2d(c0, config.out_channels, 3, conv_cfg, vb.pp("conv_out")),
            file,
            "conv_out",
        )?;
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
