//! The UNet's down and up blocks, built by one loader: a block's level, channels, weight names
//! and attention settings are worked out in [`Block::load`] for both halves, and each half only
//! names candle's constructors for its plain and cross-attention blocks.

use std::ops::Range;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UpBlock2D, UpBlock2DConfig,
};

use super::{UnetConfig, load};
use crate::error::DiffusionError;

/// What a block is built from, worked out the same way for both halves.
pub(super) struct BlockPlan {
    /// Channels coming in: the shallower level's width (level 0 takes its own).
    input: usize,
    /// Channels going out: this level's width.
    output: usize,
    /// The deeper level's width (the deepest takes its own): what an up block receives from
    /// below.
    deeper: usize,
    /// Resnets in the block.
    resnets: usize,
    /// Whether the block ends with a down- or upsampler: all but the last of each half.
    resample: bool,
    /// Width of the time embedding.
    temb: usize,
    /// Group norm epsilon of the resnets.
    eps: f64,
    /// Group norm groups of the resnets.
    groups: usize,
    /// Padding of a down block's downsampling convolution.
    downsample_padding: usize,
}

/// The cross-attention settings of a block that has transformers.
pub(super) struct Attention {
    /// Attention heads.
    heads: usize,
    /// Width of the text conditioning.
    cross_attention_dim: usize,
    /// Linear rather than 1x1-conv projections around the transformers.
    linear_projection: bool,
    /// Layers in each transformer.
    transformer_layers: usize,
}

/// One half of the UNet: how its blocks are named and numbered, and candle's constructors for
/// them.
pub(super) trait Half {
    /// The blocks' prefix in the checkpoint (`down_blocks`, `up_blocks`).
    const PREFIX: &'static str;
    /// Resnets beyond `layers_per_block`: an up block has one more, for the extra skip.
    const EXTRA_RESNETS: usize;
    /// A block of resnets only.
    type Plain;
    /// A block of resnets and cross-attention transformers.
    type CrossAttn;
    /// The level block `i` works at; up blocks count from the deepest, as diffusers does.
    fn level(levels: usize, i: usize) -> usize;
    /// Builds a plain block.
    fn plain(vb: VarBuilder, plan: &BlockPlan) -> candle_core::Result<Self::Plain>;
    /// Builds a block with cross-attention.
    fn cross_attn(
        vb: VarBuilder,
        plan: &BlockPlan,
        attention: Attention,
    ) -> candle_core::Result<Self::CrossAttn>;
}

/// The encoder half: each block ends by halving the sides.
pub(super) enum Down {}

/// The decoder half: each block consumes skips of the down half and ends by doubling the sides.
pub(super) enum Up {}

/// A block of either half, with or without cross-attention.
pub(super) enum Block<H: Half> {
    /// Resnets (and a resampler) only.
    Plain(H::Plain),
    /// Resnets each followed by a cross-attention transformer.
    CrossAttn(H::CrossAttn),
}

/// A block of the encoder half.
pub(super) type DownBlock = Block<Down>;

/// A block of the decoder half.
pub(super) type UpBlock = Block<Up>;

impl<H: Half> Block<H> {
    /// Blocks `range` of their half, numbered as diffusers numbers them.
    pub(super) fn load_range(
        vb: &VarBuilder,
        config: &UnetConfig,
        range: Range<usize>,
        file: &str,
    ) -> Result<Vec<Self>, DiffusionError> {
        range.map(|i| Self::load(vb, config, i, file)).collect()
    }

    /// Block `i` of its half.
    fn load(
        vb: &VarBuilder,
        config: &UnetConfig,
        i: usize,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let n = config.levels();
        let level = H::level(n, i);
        let widths = &config.block_out_channels;
        let plan = BlockPlan {
            input: widths[level.saturating_sub(1)],
            output: widths[level],
            deeper: widths[(level + 1).min(n - 1)],
            resnets: config.layers() + H::EXTRA_RESNETS,
            resample: i < n - 1,
            temb: config.time_embed_dim(),
            eps: config.norm_eps,
            groups: config.norm_num_groups,
            downsample_padding: config.downsample_padding,
        };
        let vb = vb.pp(H::PREFIX).pp(i.to_string());
        let block = match config.cross_attn(level)? {
            Some(transformer_layers) => {
                let attention = Attention {
                    heads: config.heads(level)?,
                    cross_attention_dim: config.cross_attention_dim,
                    linear_projection: config.use_linear_projection,
                    transformer_layers,
                };
                H::cross_attn(vb, &plan, attention).map(Block::CrossAttn)
            }
            None => H::plain(vb, &plan).map(Block::Plain),
        };
        load(block, file, &format!("{}.{i}", H::PREFIX))
    }
}

impl Half for Down {
    const PREFIX: &'static str = "down_blocks";
    const EXTRA_RESNETS: usize = 0;
    type Plain = DownBlock2D;
    type CrossAttn = CrossAttnDownBlock2D;

    fn level(_levels: usize, i: usize) -> usize {
        i
    }

    fn plain(vb: VarBuilder, plan: &BlockPlan) -> candle_core::Result<DownBlock2D> {
        let settings = down_settings(plan);
        DownBlock2D::new(vb, plan.input, plan.output, Some(plan.temb), settings)
    }

    fn cross_attn(
        vb: VarBuilder,
        plan: &BlockPlan,
        attention: Attention,
    ) -> candle_core::Result<CrossAttnDownBlock2D> {
        let settings = CrossAttnDownBlock2DConfig {
            downblock: down_settings(plan),
            attn_num_head_channels: attention.heads,
            cross_attention_dim: attention.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: attention.linear_projection,
            transformer_layers_per_block: attention.transformer_layers,
        };
        let temb = Some(plan.temb);
        CrossAttnDownBlock2D::new(vb, plan.input, plan.output, temb, false, settings)
    }
}

/// The resnet settings of a down block.
fn down_settings(plan: &BlockPlan) -> DownBlock2DConfig {
    DownBlock2DConfig {
        num_layers: plan.resnets,
        resnet_eps: plan.eps,
        resnet_groups: plan.groups,
        add_downsample: plan.resample,
        downsample_padding: plan.downsample_padding,
        ..Default::default()
    }
}

impl Half for Up {
    const PREFIX: &'static str = "up_blocks";
    const EXTRA_RESNETS: usize = 1;
    type Plain = UpBlock2D;
    type CrossAttn = CrossAttnUpBlock2D;

    fn level(levels: usize, i: usize) -> usize {
        levels - 1 - i
    }

    fn plain(vb: VarBuilder, plan: &BlockPlan) -> candle_core::Result<UpBlock2D> {
        let settings = up_settings(plan);
        let temb = Some(plan.temb);
        UpBlock2D::new(vb, plan.input, plan.deeper, plan.output, temb, settings)
    }

    fn cross_attn(
        vb: VarBuilder,
        plan: &BlockPlan,
        attention: Attention,
    ) -> candle_core::Result<CrossAttnUpBlock2D> {
        let settings = CrossAttnUpBlock2DConfig {
            upblock: up_settings(plan),
            attn_num_head_channels: attention.heads,
            cross_attention_dim: attention.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: attention.linear_projection,
            transformer_layers_per_block: attention.transformer_layers,
        };
        let (input, deeper, output, temb) = (plan.input, plan.deeper, plan.output, Some(plan.temb));
        CrossAttnUpBlock2D::new(vb, input, deeper, output, temb, false, settings)
    }
}

/// The resnet settings of an up block.
fn up_settings(plan: &BlockPlan) -> UpBlock2DConfig {
    UpBlock2DConfig {
        num_layers: plan.resnets,
        resnet_eps: plan.eps,
        resnet_groups: plan.groups,
        add_upsample: plan.resample,
        ..Default::default()
    }
}

impl DownBlock {
    /// Runs the block; returns its output and the skips it leaves for the up half.
    pub(super) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        match self {
            Block::Plain(b) => b.forward(xs, Some(temb)),
            Block::CrossAttn(b) => b.forward(xs, Some(temb), Some(context)),
        }
    }
}

impl UpBlock {
    /// Runs the block, consuming its skips from the end of `skips`.
    pub(super) fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, DiffusionError> {
        let want = match self {
            Block::Plain(b) => b.resnets.len(),
            Block::CrossAttn(b) => b.upblock.resnets.len(),
        };
        if skips.len() < want {
            return Err(DiffusionError::Request(format!(
                "up block needs {want} skip tensors, {} left",
                skips.len()
            )));
        }
        let mine = skips.split_off(skips.len() - want);
        Ok(match self {
            Block::Plain(b) => b.forward(xs, &mine, Some(temb), None)?,
            Block::CrossAttn(b) => b.forward(xs, &mine, Some(temb), None, Some(context))?,
        })
    }
}
