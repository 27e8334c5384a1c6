//! The Llama decoder (Touvron et al., <https://arxiv.org/abs/2302.13971>), read top to bottom:
//! the weights of a layer and of a part, the layer's body [`Layer::forward`] (norm, attention,
//! residual, norm, SwiGLU feed-forward, residual), then a part's pass over its layers and its
//! LM head.
//!
//! Every pass runs that one body; they differ only in what the attention attends to: one
//! session's rows here, several sessions' rows at once in [`batch`] (the trunk server), or many
//! candidate tokens at one position in [`alternatives`] (the attack).
//!
//! Embedding, each layer, its attention and MLP, and the LM head have a `tracing` span at
//! TRACE level (`embed`, `layer`, `attention`, `mlp`, `lm_head`), so a profile reads by name.
//! They are made once at load; made while no subscriber listens, they cost nothing to enter.

mod alternatives;
mod batch;

use std::ops::Range;

use candle_core::{Device, Tensor};
use tracing::{Span, trace_span};

use crate::adapter::{LayerLora, Target};
use crate::attention::attend_row;
use crate::kernels::Linear;
use crate::rowwise::{rms_norm, swiglu};
use crate::{
    KvCache, KvPrecision, LlamaConfig, ModelError, PartSpec, Result, TensorRecord, values,
};

/// Rows a part runs through its layers at once: a longer prompt goes in chunks, so that
/// attention's score matrices stay small (a 1000-token prompt at once would hold 36 MB of scores
/// per layer for SmolLM2) while the products still get many rows each.
const PREFILL_CHUNK: usize = 256;

/// The most rows a step after the first may carry and still be computed as that many one-row
/// steps in a row: each row attends through the decode path, so a step that checks several
/// drafted tokens at once gives bit for bit the logits of decoding them one by one.
pub const MAX_STEP_ROWS: usize = 16;

/// One decoder layer: pre-norm attention then pre-norm SwiGLU feed-forward.
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) w_gate: Linear,
    pub(crate) w_up: Linear,
    pub(crate) w_down: Linear,
    /// The LoRA updates of this layer's projections (none without an adapter).
    pub(crate) lora: LayerLora,
    pub(crate) spans: LayerSpans,
}

/// A layer's profile spans: `layer` (with its index) and, inside it, `attention` and `mlp`.
pub(crate) struct LayerSpans {
    layer: Span,
    attention: Span,
    mlp: Span,
}

impl LayerSpans {
    /// The spans of the model's layer `index`.
    pub(crate) fn new(index: usize) -> Self {
        let layer = trace_span!("layer", index);
        Self {
            attention: trace_span!(parent: &layer, "attention"),
            mlp: trace_span!(parent: &layer, "mlp"),
            layer,
        }
    }
}

impl Layer {
    /// The layer's body over rows `x (1, rows, hidden)`: RMS norm, attention, residual, RMS
    /// norm, SwiGLU feed-forward, residual. `attend` turns the rows' query, key and value
    /// projections `(1, rows, heads * head_dim)` into the attention's output before `wo`: the
    /// one step where a session alone, a batch of sessions and the attack's candidates differ.
    fn forward(
        &self,
        x: &Tensor,
        eps: f32,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.spans.layer.enter();
        let h = rms_norm(x, &self.attn_norm, eps)?;
        let x = (x + self.attention(&h, attend)?)?;
        let h = rms_norm(&x, &self.ffn_norm, eps)?;
        Ok((x + self.mlp(&h)?)?)
    }

    /// Projects the normed rows `h` to queries, keys and values, attends with `attend`, and
    /// projects the result back with `wo`.
    fn attention(
        &self,
        h: &Tensor,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.spans.attention.enter();
        let [q, k, v] = self.project([Target::Q, Target::K, Target::V], h)?;
        let [y] = self.project([Target::O], &attend(&q, &k, &v)?)?;
        Ok(y)
    }

    /// The SwiGLU feed-forward of the normed rows `h`: `w_down(silu(w_gate(h)) * w_up(h))`.
    fn mlp(&self, h: &Tensor) -> Result<Tensor> {
        let _enter = self.spans.mlp.enter();
        let [gate, up] = self.project([Target::Gate, Target::Up], h)?;
        let [y] = self.project([Target::Down], &swiglu(&gate, &up)?)?;
        Ok(y)
    }

    /// The projections `targets` of the same rows `x` (quantized once for all of them): each
    /// weight's product, plus the adapter's update when the layer has one for it.
    fn project<const N: usize>(&self, targets: [Target; N], x: &Tensor) -> Result<[Tensor; N]> {
        let weights = targets.map(|target| match target {
            Target::Q => &self.wq,
            Target::K => &self.wk,
            Target::V => &self.wv,
            Target::O => &self.wo,
            Target::Gate => &self.w_gate,
            Target::Up => &self.w_up,
            Target::Down => &self.w_down,
        });
        let mut projected = Vec::with_capacity(N);
        for (target, y) in targets.into_iter().zip(Linear::forward_shared(weights, x)?) {
            projected.push(match self.lora.get(target) {
                Some(lora) => lora.add(x, y)?,
                None => y,
            });
        }
        Ok(projected
            .try_into()
            .unwrap_or_else(|_| unreachable!("one projection per target")))
    }
}

/// Final norm and LM head, held by the tail (or the whole model).
pub(crate) struct OutputHead {
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
}

/// One loaded part of a split model: the embeddings (head), a range of layers, and the output
/// head (tail). Immutable once loaded; sessions keep their state in a [`KvCache`].
pub struct ModelPart {
    spec: PartSpec,
    config: LlamaConfig,
    embeddings: Option<Linear>,
    layers: Vec<Layer>,
    output: Option<OutputHead>,
    inv_freq: Vec<f32>,
    tensors: Vec<TensorRecord>,
    device: Device,
    kv_precision: KvPrecision,
    embed_span: Span,
    lm_head_span: Span,
}

impl std::fmt::Debug for ModelPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelPart")
            .field("spec", &self.spec)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl ModelPart {
    pub(crate) fn new(
        spec: PartSpec,
        config: LlamaConfig,
        embeddings: Option<Linear>,
        layers: Vec<Layer>,
        output: Option<OutputHead>,
        tensors: Vec<TensorRecord>,
        device: Device,
    ) -> Result<Self> {
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            spec,
            config,
            embeddings,
            layers,
            output,
            inv_freq,
            tensors,
            device,
            kv_precision: KvPrecision::default(),
            embed_span: trace_span!("embed"),
            lm_head_span: trace_span!("lm_head"),
        })
    }

    /// The same part, making its KV caches at `precision`.
    pub(crate) fn with_kv_precision(mut self, precision: KvPrecision) -> Self {
        self.kv_precision = precision;
        self
    }

    /// Which part this is and the layers it runs.
    pub fn spec(&self) -> &PartSpec {
        &self.spec
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The tensors this part holds, in load order.
    pub fn tensors(&self) -> &[TensorRecord] {
        &self.tensors
    }

    /// The device the part computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh, empty KV cache for one session of this part, at the part's KV precision.
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_precision(self.layers.len(), self.kv_precision)
    }

    /// The precision of the KV caches [`ModelPart::new_cache`] makes.
    pub fn kv_precision(&self) -> KvPrecision {
        self.kv_precision
    }

    /// Looks up the embeddings of `tokens`: hidden rows of shape `(tokens, hidden)`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let _enter = self.embed_span.enter();
        let embeddings = self.embeddings.as_ref().ok_or(ModelError::WrongPart {
            part: self.spec.kind.name(),
            action: "embed tokens",
        })?;
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::TokenId { id, vocab });
        }
        Ok(embeddings.embedding(tokens, &self.device)?)
    }

    /// Runs this part's layers over hidden rows `(rows, hidden)` that start at sequence
    /// position `start`, appending to `cache`; returns rows of the same shape.
    ///
    /// On a part loaded on a GPU the rows cross to it and the result comes back to the device
    /// `hidden` is on (the trunk's boundary); the KV cache stays in host memory either way.
    pub fn forward(&self, hidden: &Tensor, start: usize, cache: &mut KvCache) -> Result<Tensor> {
        on_pool(|| {
            let rows = self.check_rows(hidden, start, cache)?;
            if self.layers.is_empty() {
                cache.advance(rows);
                return Ok(hidden.clone());
            }
            let out = self.run_layers(
                &hidden.to_device(&self.device)?,
                start,
                0..self.layers.len(),
                cache,
            )?;
            Ok(out.to_device(hidden.device())?)
        })
    }

    /// Runs only the model layers `layers` (absolute indices, within this part's) over rows
    /// `(rows, hidden)` that start at position `start`, in chunks of 256 rows
    /// like [`ModelPart::forward`]; the other layers' caches are left alone.
    ///
    /// Random split points need it: a part runs a different range of its layers at each step
    /// and catches up a layer it skipped by running it later over the rows it missed. Each layer
    /// in `layers` must hold exactly `start` positions, so a catch-up out of order is refused.
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        start: usize,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        on_pool(|| {
            let own = &self.spec.layers;
            if layers.start < own.start || layers.end > own.end || layers.start > layers.end {
                return Err(ModelError::Config(format!(
                    "layers {layers:?} are not within the {} part's layers {own:?}",
                    self.spec.kind.name()
                )));
            }
            let rows = self.check_shape(hidden)?;
            self.check_cache(cache)?;
            for layer in layers.clone() {
                let held = cache.layer_len(layer - own.start);
                if held != start {
                    return Err(ModelError::Position {
                        expected: held,
                        got: start,
                    });
                }
            }
            self.check_context(start, rows)?;
            if layers.is_empty() {
                return Ok(hidden.clone());
            }
            let out = self.run_layers(
                &hidden.to_device(&self.device)?,
                start,
                layers.start - own.start..layers.end - own.start,
                cache,
            )?;
            Ok(out.to_device(hidden.device())?)
        })
    }

    /// Runs checked rows `(rows, hidden)` at positions from `start` through this part's layers
    /// `layers` (indices from the part's first), in chunks of at most [`PREFILL_CHUNK`] rows;
    /// the cache then holds at least `start + rows` positions.
    fn run_layers(
        &self,
        hidden: &Tensor,
        start: usize,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let rows = hidden.dim(0)?;
        if rows > PREFILL_CHUNK {
            let mut outputs = Vec::with_capacity(rows.div_ceil(PREFILL_CHUNK));
            for offset in (0..rows).step_by(PREFILL_CHUNK) {
                let chunk = hidden.narrow(0, offset, PREFILL_CHUNK.min(rows - offset))?;
                outputs.push(self.run_layers(&chunk, start + offset, layers.clone(), cache)?);
            }
            return Ok(Tensor::cat(&outputs, 0)?);
        }
        let width = self.config.hidden_size;
        let eps = self.config.rms_norm_eps as f32;
        let rotation = self.rotation(start, rows)?;
        let mask = causal_mask(start, rows, &self.device)?;
        let mut x = hidden.reshape((1, rows, width))?;
        for index in layers {
            x = self.layers[index].forward(&x, eps, |q, k, v| {
                self.session_attention(index, (q, k, v), (&rotation, mask.as_ref()), cache)
            })?;
        }
        cache.reach(start + rows);
        Ok(x.reshape((rows, width))?)
    }

    /// Final norm and LM head over the last hidden row: logits of shape `(vocab,)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let rows = self.check_shape(hidden)?;
        Ok(self
            .row_logits(&hidden.narrow(0, rows - 1, 1)?)?
            .squeeze(0)?)
    }

    /// Final norm and LM head over every hidden row: logits of shape `(rows, vocab)`, each row
    /// bit for bit what [`ModelPart::logits`] gives for it alone (a step that checks several
    /// drafted tokens needs the prediction after each).
    pub fn row_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let _enter = self.lm_head_span.enter();
        let output = self.output.as_ref().ok_or(ModelError::WrongPart {
            part: self.spec.kind.name(),
            action: "produce logits",
        })?;
        self.check_shape(hidden)?;
        let normed = rms_norm(
            &hidden.contiguous()?,
            &output.norm,
            self.config.rms_norm_eps as f32,
        )?;
        Ok(output.lm_head.forward(&normed)?)
    }

    /// Attention of one session's rows from its query, key and value projections
    /// `(1, rows, heads * head_dim)`: a single row through [`ModelPart::decode_row`], a prompt
    /// chunk through the full matrix products.
    fn session_attention(
        &self,
        index: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (rotation, mask): (&Rotation, Option<&Tensor>),
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let rows = q.dim(1)?;
        if rows == 1 || (cache.layer_len(index) > 0 && rows <= MAX_STEP_ROWS) {
            let (width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
            let (qs, ks, vs) = (values(q)?, values(k)?, values(v)?);
            let mut y = vec![0f32; rows * width];
            for (i, out) in y.chunks_exact_mut(width).enumerate() {
                let row = |values: &[f32], w: usize| values[i * w..(i + 1) * w].to_vec();
                let this = (
                    row(&qs, width),
                    row(&ks, kv_width),
                    &vs[i * kv_width..(i + 1) * kv_width],
                );
                self.decode_row(index, rotation, i, this, cache, out)?;
            }
            return Ok(Tensor::from_vec(y, (1, rows, width), &self.device)?);
        }
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((1, rows, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotation.apply(&heads(q, c.num_heads)?)?;
        let k = rotation.apply(&heads(k, c.num_kv_heads)?)?;
        let v = heads(v, c.num_kv_heads)?;
        let (k, v) = cache.append(index, &k, &v)?;
        let group = c.num_heads / c.num_kv_heads;
        let k = repeat_kv(&k, group)?;
        let v = repeat_kv(&v, group)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?;
        Ok(y.transpose(1, 2)?
            .reshape((1, rows, c.num_heads * c.head_dim))?)
    }

    /// Attention of one decode row: rotates its query `q (heads * head_dim)` and key
    /// `k (kv_heads * head_dim)` by the `row`-th angles of `rotation`, appends the key and
    /// the value `v` to the layer's cache and attends over every cached position, in place; writes
    /// `heads * head_dim` values into `y`. The solo and the batched paths both run it, so a
    /// batch computes exactly what each of its sessions would alone.
    fn decode_row(
        &self,
        index: usize,
        rotation: &Rotation,
        row: usize,
        (mut q, mut k, v): (Vec<f32>, Vec<f32>, &[f32]),
        cache: &mut KvCache,
        y: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        for head in q
            .chunks_exact_mut(c.head_dim)
            .chain(k.chunks_exact_mut(c.head_dim))
        {
            rotation.apply_row(row, head);
        }
        let cached = cache.push(index, &k, v, c.num_kv_heads, c.head_dim)?;
        attend_row(&q, cached, y)
    }

    /// The rotation of positions `[start, start + rows)`, computed once for every layer.
    fn rotation(&self, start: usize, rows: usize) -> Result<Rotation> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(rows * half);
        for pos in start..start + rows {
            angles.extend(self.inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (rows, half), &self.device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Rotation {
            cos_values: values(&cos)?,
            sin_values: values(&sin)?,
            cos,
            sin,
            interleaved: self.config.rope_interleaved,
        })
    }

    /// Checks rows before any cache is touched: their shape, the cache's part, the position
    /// they start at and the context they need. Returns the number of rows.
    fn check_rows(&self, hidden: &Tensor, start: usize, cache: &KvCache) -> Result<usize> {
        let rows = self.check_shape(hidden)?;
        self.check_cache(cache)?;
        if start != cache.len() {
            return Err(ModelError::Position {
                expected: cache.len(),
                got: start,
            });
        }
        self.check_context(start, rows)?;
        Ok(rows)
    }

    /// Checks that `hidden` is `(rows, hidden)` with at least one row; returns the rows.
    fn check_shape(&self, hidden: &Tensor) -> Result<usize> {
        match hidden.dims() {
            &[rows, width] if width == self.config.hidden_size && rows > 0 => Ok(rows),
            dims => Err(ModelError::HiddenShape {
                got: dims.to_vec(),
                hidden: self.config.hidden_size,
            }),
        }
    }

    /// Checks that `cache` was made for this part.
    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if cache.layer_count() != self.layers.len() {
            return Err(ModelError::Config(format!(
                "KV cache has {} layers but the {} part runs {}",
                cache.layer_count(),
                self.spec.kind.name(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Checks that `rows` more positions from `start` fit the context.
    fn check_context(&self, start: usize, rows: usize) -> Result<()> {
        if start + rows > self.config.context_length {
            return Err(ModelError::ContextOverflow {
                requested: start + rows,
                context: self.config.context_length,
            });
        }
        Ok(())
    }
}

/// The rotary position embedding (RoPE) of a run of positions: the cosines and sines of their
/// angles `(rows, head_dim / 2)`, as tensors for candle's rotary kernels and as the same values
/// in plain memory for one decode row, and the model's convention: pairs of neighbours when
/// `interleaved` (GGUF), else the two halves of each head (Hugging Face).
struct Rotation {
    cos: Tensor,
    sin: Tensor,
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
    interleaved: bool,
}

impl Rotation {
    /// Rotates heads `(batch, heads, rows, head_dim)`, row `i` by the run's `i`-th angles.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let rope = if self.interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        Ok(rope(x, &self.cos, &self.sin)?)
    }

    /// Rotates one head's values `x (head_dim)` by the run's `row`-th angles in place, with the
    /// same arithmetic as candle's kernels in [`Rotation::apply`].
    fn apply_row(&self, row: usize, x: &mut [f32]) {
        let half = x.len() / 2;
        let angles = self.cos_values[row * half..]
            .iter()
            .zip(&self.sin_values[row * half..]);
        for (i, (&c, &s)) in angles.enumerate().take(half) {
            let (a, b) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * c - x2 * s;
            x[b] = x1 * s + x2 * c;
        }
    }
}

/// Runs `work` on a thread of rayon's pool (at once when already on one). The products and
/// attention inside a forward pass then share their work with the pool's other threads by work
/// stealing, instead of the calling thread waking the pool and sleeping for each of them.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        rayon::scope(|_| work())
    }
}

/// Additive causal mask `(rows, start + rows)` for a prefill; none for a single row, which
/// may attend to every cached position.
fn causal_mask(start: usize, rows: usize, device: &Device) -> Result<Option<Tensor>> {
    if rows == 1 {
        return Ok(None);
    }
    let total = start + rows;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (rows, total), device)?))
}

/// Repeats each key/value head `group` times so grouped-query attention can use one matmul.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.contiguous()?);
    }
    let (b, heads, seq, dim) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, heads, group, seq, dim))?
        .reshape((b, heads * group, seq, dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_blocks_future_positions_only() -> Result<()> {
        let mask = causal_mask(2, 3, &Device::Cpu)?.expect("prefill has a mask");
        let rows: Vec<Vec<f32>> = mask.to_vec2()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            rows,
            vec![
                vec![0.0, 0.0, 0.0, inf, inf],
                vec![0.0, 0.0, 0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        );
        assert!(causal_mask(7, 1, &Device::Cpu)?.is_none());
        Ok(())
    }

    #[test]
    fn repeat_kv_copies_each_head_in_place() -> Result<()> {
        let x = Tensor::arange(0f32, 4.0, &Device::Cpu)?.reshape((1, 2, 1, 2))?;
        let y = repeat_kv(&x, 2)?;
        assert_eq!(y.dims(), &[1, 4, 1, 2]);
        let flat: Vec<f32> = y.flatten_all()?.to_vec1()?;
        assert_eq!(flat, vec![0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]);
        Ok(())
    }
}
