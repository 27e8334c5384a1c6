//! `unet/config.json`: the fields this engine reads, their checks, and where the UNet is cut.

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
            if !channels.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block {i} has {channels} channels, not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            let heads = self.heads(i)?;
            if heads == 0 || !channels.is_multiple_of(heads) {
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
            if let Some(value) = value
                && Some(value) != allowed
            {
                return bad(format!("{field} {value:?} is not supported"));
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

    /// Resnets per down block (`validate` refused a list).
    pub(super) fn layers(&self) -> usize {
        match self.layers_per_block {
            PerBlock::One(v) => v,
            PerBlock::Each(ref v) => v[0],
        }
    }

    /// Attention heads at level `i`, from the non-legacy field when it is set.
    pub(super) fn heads(&self, i: usize) -> Result<usize, DiffusionError> {
        match &self.num_attention_heads {
            Some(h) => h.get(i, "num_attention_heads"),
            None => self.attention_head_dim.get(i, "attention_head_dim"),
        }
    }

    /// Width of the time embedding.
    pub(super) fn time_embed_dim(&self) -> usize {
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

    /// Transformer layers at level `i` when its blocks have cross-attention, else `None`.
    pub(super) fn cross_attn(&self, i: usize) -> Result<Option<usize>, DiffusionError> {
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
