//! The CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`), read
//! from a diffusers `text_encoder/` folder with its own `config.json`.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::error::DiffusionError;

/// `text_encoder/config.json`, the fields the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Longest token sequence (77 for Stable Diffusion).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (OpenCLIP).
    pub hidden_act: String,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of the pooled projection (`CLIPTextModelWithProjection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// The end-of-text token whose final state is the pooled output.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q.forward(xs)? * scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let weights = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        let weights = candle_nn::ops::softmax_last_dim(&weights.broadcast_add(mask)?)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&out)
    }
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipConfig, act: Activation) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            norm1: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            norm2: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(d, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let h = self
            .act
            .forward(&self.fc1.forward(&self.norm2.forward(&xs)?)?)?;
        xs + self.fc2.forward(&h)?
    }
}

/// What one pass of the text encoder gives the pipelines.
pub struct ClipOutput {
    /// After the final layer norm (SD 1.x/2.x conditioning).
    pub last: Tensor,
    /// The input of the last layer, without final norm (SDXL conditioning).
    pub penultimate: Tensor,
    /// `text_projection` of the final state at the end-of-text token, when the model has one.
    pub pooled: Option<Tensor>,
}

/// A CLIP text transformer with causal attention.
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
}

impl ClipTextModel {
    /// Loads `text_model.*` (and `text_projection` when `with_projection`).
    pub fn load(
        vb: VarBuilder,
        config: &ClipConfig,
        with_projection: bool,
        file: &str,
    ) -> Result<Self, DiffusionError> {
        let act = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(DiffusionError::Config(format!(
                    "text encoder: hidden_act {other:?} is not supported (quick_gelu, gelu)"
                )));
            }
        };
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
            || config.num_hidden_layers < 2
        {
            return Err(DiffusionError::Config(format!(
                "text encoder: hidden_size {} with {} heads and {} layers",
                config.hidden_size, config.num_attention_heads, config.num_hidden_layers
            )));
        }
        let weights = |e: candle_core::Error| DiffusionError::Weights {
            file: file.to_string(),
            message: e.to_string(),
        };
        let tm = vb.pp("text_model");
        let d = config.hidden_size;
        let token_embedding = candle_nn::embedding(
            config.vocab_size,
            d,
            tm.pp("embeddings").pp("token_embedding"),
        )
        .map_err(weights)?;
        let position_embedding = candle_nn::embedding(
            config.max_position_embeddings,
            d,
            tm.pp("embeddings").pp("position_embedding"),
        )
        .map_err(weights)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), config, act))
            .collect::<candle_core::Result<_>>()
            .map_err(weights)?;
        let final_norm = candle_nn::layer_norm(d, config.layer_norm_eps, tm.pp("final_layer_norm"))
            .map_err(weights)?;
        let projection = if with_projection {
            let p = config.projection_dim.ok_or_else(|| {
                DiffusionError::Config("text encoder with projection has no projection_dim".into())
            })?;
            Some(candle_nn::linear_no_bias(d, p, vb.pp("text_projection")).map_err(weights)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
        })
    }

    /// Encodes token ids `[batch, tokens]`.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput, DiffusionError> {
        let (batch, len) = ids.dims2()?;
        if len == 0 || len > self.config.max_position_embeddings {
            return Err(DiffusionError::Request(format!(
                "{len} tokens: the text encoder takes 1 to {}",
                self.config.max_position_embeddings
            )));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(len, device)?;
        let mut penultimate = None;
        let last_layer = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last_layer {
                penultimate = Some(xs.clone());
            }
            xs = layer.forward(&xs, &mask)?;
        }
        let last = self.final_norm.forward(&xs)?;
        let pooled = match &self.projection {
            None => None,
            Some(projection) => {
                let ids_vec = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                let rows = (0..batch)
                    .map(|b| {
                        let at = self.eos_position(&ids_vec[b]);
                        last.i((b, at))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::stack(&rows, 0)?)?)
            }
        };
        Ok(ClipOutput {
            last,
            penultimate: penultimate.unwrap_or_else(|| xs.clone()),
            pooled,
        })
    }

    /// Where transformers reads the pooled state: the first end-of-text token, or (legacy
    /// configs whose `eos_token_id` is 2) the highest id.
    fn eos_position(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&id| id == self.config.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// The config it was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }
}

fn causal_mask(len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_slice(&mask, (1, 1, len, len), device)
}
