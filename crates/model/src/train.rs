//! The differentiable pass that training runs: the same decoder as [`crate::ModelPart`], written
//! with candle's tensor operations that have a backward pass (the inference path's kernels and
//! fused norm, RoPE and softmax have none), over f32 weights read one layer at a time
//! ([`ModelSource::dense_layer`]).
//!
//! A whole sequence goes through at once, from position 0, with causal attention and no KV
//! cache. LoRA pairs are passed as tensors (a [`candle_core::Var`]'s tensor when trained), so
//! `Tensor::backward` reaches them. RoPE rotates in the row order of the model's file:
//! neighbouring pairs for GGUF (whose query and key rows llama.cpp permuted), halves for
//! Hugging Face, as the inference path does.
//!
//! [`DenseTrunk`] is the trunk's side of training: its forward pass, and the gradient of its
//! input rows from the gradient of its output rows, recomputing each layer's forward (no weight
//! gradients, no tokens).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{D, Device, Tensor};
use candle_nn::ops::{rms_norm_slow, softmax};
use candle_nn::rotary_emb::{rope_i_slow, rope_slow};

use crate::adapter::Target;
use crate::source::Weight;
use crate::{LlamaConfig, ModelError, ModelSource, Result};

/// One projection's LoRA pair as the training pass applies it: `y = W x + scale · B (A x)`, with
/// `a (r, in)` and `b (out, r)` in the base weight's row order.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A (r, in)`.
    pub a: Tensor,
    /// `B (out, r)`.
    pub b: Tensor,
    /// `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

/// A layer's LoRA pairs, by the projection they update.
pub type LayerPairs = BTreeMap<Target, LoraPair>;

/// One decoder layer's weights in f32 on the CPU.
#[derive(Debug, Clone)]
pub struct DenseLayer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// The final norm and the LM head in f32 on the CPU.
#[derive(Debug, Clone)]
pub struct DenseOutput {
    norm: Tensor,
    lm_head: Tensor,
}

impl ModelSource {
    /// Layer `layer`'s weights in f32 (dequantized when stored quantized).
    pub fn dense_layer(&self, layer: usize) -> Result<DenseLayer> {
        if layer >= self.config().num_layers {
            return Err(ModelError::InvalidSplit {
                k1: layer,
                k2: layer + 1,
                layers: self.config().num_layers,
            });
        }
        let [attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down] =
            self.dense(Weight::layer(layer))?;
        Ok(DenseLayer {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            w_gate,
            w_up,
            w_down,
        })
    }

    /// The final norm and LM head in f32 (the embeddings when they are tied).
    pub fn dense_output(&self) -> Result<DenseOutput> {
        let head = if self.config().tied_embeddings {
            Weight::Embeddings
        } else {
            Weight::Output
        };
        let [norm, lm_head] = self.dense([Weight::FinalNorm, head])?;
        Ok(DenseOutput { norm, lm_head })
    }
}

/// What every layer of one pass over a sequence shares: the RoPE angles of its positions and
/// the causal mask.
#[derive(Debug, Clone)]
pub struct Pass {
    config: LlamaConfig,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

impl Pass {
    /// The pass over a sequence of `rows` positions from 0 under `config`.
    pub fn new(config: &LlamaConfig, rows: usize) -> Result<Self> {
        if rows == 0 || rows > config.context_length {
            return Err(ModelError::ContextOverflow {
                requested: rows,
                context: config.context_length,
            });
        }
        let inv_freq = config.rope_inv_freq();
        let half = inv_freq.len();
        let angles: Vec<f32> = (0..rows)
            .flat_map(|pos| inv_freq.iter().map(move |f| pos as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (rows, half), &Device::Cpu)?;
        let mask: Vec<f32> = (0..rows)
            .flat_map(|i| (0..rows).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Self {
            config: config.clone(),
            cos: angles.cos()?,
            sin: angles.sin()?,
            mask: Tensor::from_vec(mask, (rows, rows), &Device::Cpu)?,
        })
    }

    /// The number of positions.
    pub fn rows(&self) -> usize {
        self.mask.dims()[0]
    }

    /// Checks that `x` is `(rows, hidden)` for this pass.
    fn check(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            &[rows, width] if rows == self.rows() && width == self.config.hidden_size => Ok(()),
            dims => Err(ModelError::HiddenShape {
                got: dims.to_vec(),
                hidden: self.config.hidden_size,
            }),
        }
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Rotates heads `(1, heads, rows, head_dim)` in the file's row order.
    fn rotate(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.config.rope_interleaved {
            rope_i_slow(x, &self.cos, &self.sin)?
        } else {
            rope_slow(x, &self.cos, &self.sin)?
        })
    }
}

impl DenseLayer {
    /// The layer over rows `x (rows, hidden)` at positions `0..rows`, with the LoRA pairs
    /// `lora` applied beside its projections.
    pub fn forward(&self, x: &Tensor, lora: Option<&LayerPairs>, pass: &Pass) -> Result<Tensor> {
        pass.check(x)?;
        let project = |target: Target, w: &Tensor, x: &Tensor| -> Result<Tensor> {
            let y = x.matmul(&w.t()?)?;
            match lora.and_then(|l| l.get(&target)) {
                Some(p) => {
                    let delta = x.matmul(&p.a.t()?)?.matmul(&p.b.t()?)?;
                    Ok((y + (delta * p.scale)?)?)
                }
                None => Ok(y),
            }
        };
        let c = &pass.config;
        let rows = pass.rows();
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((1, rows, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let h = rms_norm_slow(x, &self.attn_norm, pass.eps())?;
        let q = pass.rotate(&heads(project(Target::Q, &self.wq, &h)?, c.num_heads)?)?;
        let k = pass.rotate(&heads(project(Target::K, &self.wk, &h)?, c.num_kv_heads)?)?;
        let v = heads(project(Target::V, &self.wv, &h)?, c.num_kv_heads)?;
        let group = c.num_heads / c.num_kv_heads;
        let (k, v) = (repeat_kv(&k, group)?, repeat_kv(&v, group)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (c.head_dim as f64).sqrt()))?;
        let probs = softmax(&scores.broadcast_add(&pass.mask)?, D::Minus1)?;
        let y = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((rows, c.num_heads * c.head_dim))?;
        let x = (x + project(Target::O, &self.wo, &y)?)?;
        let h = rms_norm_slow(&x, &self.ffn_norm, pass.eps())?;
        let gate = project(Target::Gate, &self.w_gate, &h)?.silu()?;
        let up = project(Target::Up, &self.w_up, &h)?;
        Ok((&x + project(Target::Down, &self.w_down, &(gate * up)?)?)?)
    }
}

impl DenseOutput {
    /// Final norm and LM head over every row: logits `(rows, vocab)`.
    pub fn logits(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        pass.check(x)?;
        let h = rms_norm_slow(x, &self.norm, pass.eps())?;
        Ok(h.matmul(&self.lm_head.t()?)?)
    }
}

/// Repeats each key/value head `group` times, differentiably, for grouped-query attention.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, heads, seq, dim) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, heads, group, seq, dim))?
        .reshape((b, heads * group, seq, dim))?)
}

/// The trunk's side of training over the model layers `layers`: the forward pass of rows, and
/// the gradient of its input rows from that of its output rows. Each layer is read and
/// dequantized when it runs, and kept for later passes only within its weight cache
/// ([`DenseTrunk::with_weight_cache`]); a forward pass keeps at most `budget` bytes of layer
/// inputs, and the inputs it did not keep are recomputed from the nearest kept one.
#[derive(Debug, Clone)]
pub struct DenseTrunk {
    source: Arc<ModelSource>,
    layers: Range<usize>,
    budget: usize,
    weights: Arc<WeightCache>,
}

/// Dequantized layers kept between passes, up to a number of bytes: reading and dequantizing a
/// layer costs more than its pass over a short sequence. Shared by every clone of a trunk.
#[derive(Debug, Default)]
struct WeightCache {
    limit: usize,
    held: Mutex<(usize, BTreeMap<usize, Arc<DenseLayer>>)>,
}

impl DenseLayer {
    /// Bytes its weights hold.
    fn bytes(&self) -> usize {
        [
            &self.attn_norm,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.ffn_norm,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
        .iter()
        .map(|t| t.elem_count() * 4)
        .sum()
    }
}

/// The layer inputs a [`DenseTrunk`]'s forward pass kept for its backward pass: the first
/// layer's always, the others while the budget lasts.
#[derive(Debug, Clone)]
pub struct TrunkActivations {
    inputs: Vec<Option<Tensor>>,
}

impl TrunkActivations {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inputs
            .iter()
            .flatten()
            .map(|t| t.elem_count() * 4)
            .sum()
    }
}

impl DenseTrunk {
    /// The trunk over `layers` of the model `source`, keeping at most `budget` bytes of layer
    /// inputs per pass.
    pub fn new(source: Arc<ModelSource>, layers: Range<usize>, budget: usize) -> Result<Self> {
        let total = source.config().num_layers;
        if layers.start > layers.end || layers.end > total {
            return Err(ModelError::InvalidSplit {
                k1: layers.start,
                k2: layers.end,
                layers: total,
            });
        }
        Ok(Self {
            source,
            layers,
            budget,
            weights: Arc::default(),
        })
    }

    /// The same trunk keeping up to `bytes` of dequantized layers between passes (none unless
    /// set), shared by its clones.
    pub fn with_weight_cache(mut self, bytes: usize) -> Self {
        self.weights = Arc::new(WeightCache {
            limit: bytes,
            held: Mutex::default(),
        });
        self
    }

    /// Model layer `layer`'s weights: kept, or read (and kept while the cache has room).
    fn layer(&self, layer: usize) -> Result<Arc<DenseLayer>> {
        let cache = &self.weights;
        let lock = || cache.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = lock().1.get(&layer) {
            return Ok(kept.clone());
        }
        let read = Arc::new(self.source.dense_layer(layer)?);
        let mut held = lock();
        let bytes = read.bytes();
        if held.0 + bytes <= cache.limit && !held.1.contains_key(&layer) {
            held.0 += bytes;
            held.1.insert(layer, read.clone());
        }
        Ok(read)
    }

    /// The model layers it runs.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Runs rows `x (rows, hidden)` through the layers; returns the output rows and the inputs
    /// kept for [`DenseTrunk::backward`].
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, TrunkActivations)> {
        let pass = Pass::new(self.source.config(), x.dims().first().copied().unwrap_or(0))?;
        pass.check(x)?;
        let row_bytes = x.elem_count() * 4;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut held = 0;
        let mut x = x.detach();
        for layer in self.layers.clone() {
            if inputs.is_empty() || held + row_bytes <= self.budget {
                held += row_bytes;
                inputs.push(Some(x.clone()));
            } else {
                inputs.push(None);
            }
            x = self.layer(layer)?.forward(&x, None, &pass)?;
        }
        Ok((x, TrunkActivations { inputs }))
    }

    /// The gradient of the loss with respect to the trunk's input rows, from `grad (rows,
    /// hidden)`, its gradient with respect to the output rows of the forward pass that kept
    /// `activations`: each layer, last to first, recomputed with its input as a variable.
    pub fn backward(&self, activations: &TrunkActivations, grad: &Tensor) -> Result<Tensor> {
        if activations.inputs.len() != self.layers.len() {
            return Err(ModelError::Config(format!(
                "activations of {} layers for a trunk of {}",
                activations.inputs.len(),
                self.layers.len()
            )));
        }
        let Some(Some(first)) = activations.inputs.first() else {
            return Ok(grad.clone());
        };
        let pass = Pass::new(self.source.config(), first.dims()[0])?;
        pass.check(grad)?;
        let mut grad = grad.detach();
        for (i, layer) in self.layers.clone().enumerate().rev() {
            let weights = self.layer(layer)?;
            let input = self.input(activations, i, &pass)?;
            let var = candle_core::Var::from_tensor(&input)?;
            let out = weights.forward(var.as_tensor(), None, &pass)?;
            let grads = (out * &grad)?.sum_all()?.backward()?;
            grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| ModelError::Config("no gradient reached the layer input".into()))?
                .detach();
        }
        Ok(grad)
    }

    /// The input of the trunk's `i`-th layer: kept, or recomputed from the nearest kept one.
    fn input(&self, activations: &TrunkActivations, i: usize, pass: &Pass) -> Result<Tensor> {
        let kept = (0..=i)
            .rev()
            .find(|&j| activations.inputs[j].is_some())
            .unwrap_or(0);
        let mut x = activations.inputs[kept]
            .clone()
            .ok_or_else(|| ModelError::Config("the first layer's input was not kept".into()))?;
        for j in kept..i {
            x = self.layer(self.layers.start + j)?.forward(&x, None, pass)?;
        }
        Ok(x)
    }
}
