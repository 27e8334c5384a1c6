//! The decoder itself: one struct per piece, a `forward` to read top to bottom.

use std::ops::Range;

use candle_core::{Device, Tensor};

use rayon::prelude::*;

use crate::attention::attend_row;
use crate::kernels::Linear;
use crate::{
    KvCache, KvPrecision, LlamaConfig, ModelError, PartSpec, Result, TensorRecord, values,
};

/// Rows a part runs through its layers at once: a longer prompt goes in chunks, so that
/// attention's score matrices stay small (a 1000-token prompt at once would hold 36 MB of scores
/// per layer for SmolLM2) while the products still get many rows each.
const PREFILL_CHUNK: usize = 256;

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
    pub fn forward(&self, hidden: &Tensor, start: usize, cache: &mut KvCache) -> Result<Tensor> {
        on_pool(|| {
            let rows = self.check_rows(hidden, start, cache)?;
            if rows > PREFILL_CHUNK {
                let mut outputs = Vec::with_capacity(rows.div_ceil(PREFILL_CHUNK));
                for offset in (0..rows).step_by(PREFILL_CHUNK) {
                    let chunk = hidden.narrow(0, offset, PREFILL_CHUNK.min(rows - offset))?;
                    outputs.push(self.forward(&chunk, start + offset, cache)?);
                }
                return Ok(Tensor::cat(&outputs, 0)?);
            }
            let width = self.config.hidden_size;
            if self.layers.is_empty() {
                cache.advance(rows);
                return Ok(hidden.clone());
            }
            let rotation = self.rotation(start, rows)?;
            let mask = causal_mask(start, rows, &self.device)?;
            let mut x = hidden.reshape((1, rows, width))?;
            for (i, layer) in self.layers.iter().enumerate() {
                x = self.layer_forward(layer, i, &x, &rotation, mask.as_ref(), cache)?;
            }
            cache.advance(rows);
            Ok(x.reshape((rows, width))?)
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
            if rows > PREFILL_CHUNK {
                let mut outputs = Vec::with_capacity(rows.div_ceil(PREFILL_CHUNK));
                for offset in (0..rows).step_by(PREFILL_CHUNK) {
                    let chunk = hidden.narrow(0, offset, PREFILL_CHUNK.min(rows - offset))?;
                    outputs.push(self.forward_layers(
                        &chunk,
                        start + offset,
                        layers.clone(),
                        cache,
                    )?);
                }
                return Ok(Tensor::cat(&outputs, 0)?);
            }
            let width = self.config.hidden_size;
            let rotation = self.rotation(start, rows)?;
            let mask = causal_mask(start, rows, &self.device)?;
            let mut x = hidden.reshape((1, rows, width))?;
            for layer in layers {
                let index = layer - own.start;
                x = self.layer_forward(
                    &self.layers[index],
                    index,
                    &x,
                    &rotation,
                    mask.as_ref(),
                    cache,
                )?;
            }
            cache.reach(start + rows);
            Ok(x.reshape((rows, width))?)
        })
    }

    /// Runs `candidates` rows `(n, hidden)` that all sit at position `start` through `layers`
    /// (absolute indices, from this part's first), each as if it alone followed the positions
    /// `cache` holds; the cache is not changed. Returns the rows after each layer:
    /// `out[i]` is the output of layer `layers.start + i`.
    ///
    /// This is what an attacker with the public weights needs to test every vocabulary token
    /// at one position at once (see `lsplit attack`).
    pub fn forward_alternatives(
        &self,
        candidates: &Tensor,
        start: usize,
        layers: Range<usize>,
        cache: &KvCache,
    ) -> Result<Vec<Tensor>> {
        let own = &self.spec.layers;
        if layers.start != own.start || layers.end > own.end {
            return Err(ModelError::Config(format!(
                "layers {layers:?} do not start the {} part's layers {own:?}",
                self.spec.kind.name()
            )));
        }
        let n = self.check_shape(candidates)?;
        self.check_cache(cache)?;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let Rotation { cos, sin, .. } = self.rotation(start, 1)?;
        let mut x = candidates.reshape((1, n, c.hidden_size))?;
        let mut outputs = Vec::with_capacity(layers.len());
        for index in 0..layers.len() {
            let layer = &self.layers[index];
            if cache.layer_len(index) != start {
                return Err(ModelError::Position {
                    expected: cache.layer_len(index),
                    got: start,
                });
            }
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let heads = |t: Tensor, count: usize| -> Result<Tensor> {
                Ok(t.reshape((n, 1, count, c.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = heads(layer.wq.forward(&h)?, c.num_heads)?;
            let k = heads(layer.wk.forward(&h)?, c.num_kv_heads)?;
            let v = heads(layer.wv.forward(&h)?, c.num_kv_heads)?;
            let (q, k) = if c.rope_interleaved {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            let group = c.num_heads / c.num_kv_heads;
            let (k, v) = (repeat_kv(&k, group)?, repeat_kv(&v, group)?);
            let scale = 1.0 / (c.head_dim as f64).sqrt();
            let own_score = (q.mul(&k)?.sum_keepdim(3)? * scale)?;
            let y = match cache.view(index, &self.device)? {
                None => v,
                Some((cached_k, cached_v)) => {
                    let cached_k = repeat_kv(&cached_k, group)?;
                    let cached_v = repeat_kv(&cached_v, group)?;
                    let scores = (q.broadcast_matmul(&cached_k.t()?)? * scale)?;
                    let scores = Tensor::cat(&[&scores, &own_score], 3)?;
                    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                    let prefix = probs.narrow(3, 0, start)?.broadcast_matmul(&cached_v)?;
                    let own = probs.narrow(3, start, 1)?.broadcast_mul(&v)?;
                    (prefix + own)?
                }
            };
            let y = y
                .transpose(1, 2)?
                .reshape((1, n, c.num_heads * c.head_dim))?;
            let x_attn = (&x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x_attn, &layer.ffn_norm, eps)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (x_attn + layer.w_down.forward(&(gate * up)?)?)?;
            outputs.push(x.reshape((n, c.hidden_size))?);
        }
        Ok(outputs)
    }

    /// Runs several sessions' rows through this part's layers together: one matrix product per
    /// weight for all their rows, attention per session against its own cache. Each output is
    /// exactly what [`ModelPart::forward`] returns for that session alone, because every
    /// product, norm and activation works row by row.
    ///
    /// Every item is checked before anything runs, so a refused batch leaves the caches as they
    /// were; the server then retries its items one by one to tell which one was at fault.
    pub fn forward_batch(
        &self,
        batch: &mut [(&Tensor, usize, &mut KvCache)],
    ) -> Result<Vec<Tensor>> {
        on_pool(|| {
            for (hidden, start, cache) in batch.iter() {
                self.check_rows(hidden, *start, cache)?;
            }
            if batch.iter().any(|(h, _, _)| h.dims()[0] > PREFILL_CHUNK) {
                // Long prompts run in chunks, exactly as alone; the rest still share their products.
                let mut outputs: Vec<Option<Tensor>> = vec![None; batch.len()];
                let mut rest = Vec::new();
                for (i, (hidden, start, cache)) in batch.iter_mut().enumerate() {
                    if hidden.dims()[0] > PREFILL_CHUNK {
                        outputs[i] = Some(self.forward(hidden, *start, cache)?);
                    } else {
                        rest.push((i, (*hidden, *start, &mut **cache)));
                    }
                }
                let (indices, mut items): (Vec<usize>, Vec<_>) = rest.into_iter().unzip();
                if !items.is_empty() {
                    for (i, out) in indices.into_iter().zip(self.forward_batch(&mut items)?) {
                        outputs[i] = Some(out);
                    }
                }
                return Ok(outputs.into_iter().flatten().collect());
            }
            let width = self.config.hidden_size;
            let rows: Vec<usize> = batch.iter().map(|(h, _, _)| h.dims()[0]).collect();
            if self.layers.is_empty() {
                for ((_, _, cache), &r) in batch.iter_mut().zip(&rows) {
                    cache.advance(r);
                }
                return Ok(batch.iter().map(|(h, _, _)| (*h).clone()).collect());
            }
            let mut tables = Vec::with_capacity(batch.len());
            for ((_, start, _), &r) in batch.iter().zip(&rows) {
                tables.push((
                    self.rotation(*start, r)?,
                    causal_mask(*start, r, &self.device)?,
                ));
            }
            let total: usize = rows.iter().sum();
            let hiddens: Vec<&Tensor> = batch.iter().map(|(h, _, _)| *h).collect();
            let mut x = Tensor::cat(&hiddens, 0)?.reshape((1, total, width))?;
            let eps = self.config.rms_norm_eps as f32;
            for (index, layer) in self.layers.iter().enumerate() {
                let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
                let (q, k, v) = (
                    layer.wq.forward(&h)?,
                    layer.wk.forward(&h)?,
                    layer.wv.forward(&h)?,
                );
                let y = self.batch_attention(index, batch, &rows, &tables, (&q, &k, &v))?;
                let x_attn = (&x + layer.wo.forward(&y)?)?;
                let h = candle_nn::ops::rms_norm(&x_attn, &layer.ffn_norm, eps)?;
                let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
                let up = layer.w_up.forward(&h)?;
                x = (x_attn + layer.w_down.forward(&(gate * up)?)?)?;
            }
            let x = x.reshape((total, width))?;
            let mut outputs = Vec::with_capacity(batch.len());
            let mut offset = 0;
            for ((_, _, cache), &r) in batch.iter_mut().zip(&rows) {
                cache.advance(r);
                outputs.push(x.narrow(0, offset, r)?);
                offset += r;
            }
            Ok(outputs)
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

    /// Attention of every session of a batch from the batch's query, key and value projections
    /// `(1, total rows, heads * head_dim)`: the sessions' decode rows in parallel, each on its
    /// own ([`ModelPart::decode_row`]), then their prompt chunks. Returns `(1, total rows,
    /// heads * head_dim)`.
    fn batch_attention(
        &self,
        index: usize,
        batch: &mut [(&Tensor, usize, &mut KvCache)],
        rows: &[usize],
        tables: &[(Rotation, Option<Tensor>)],
        (q, k, v): (&Tensor, &Tensor, &Tensor),
    ) -> Result<Tensor> {
        let c = &self.config;
        let (width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let (qs, ks, vs) = (values(q)?, values(k)?, values(v)?);
        let total: usize = rows.iter().sum();
        let mut ys = vec![0f32; total * width];
        let mut jobs = Vec::with_capacity(batch.len());
        let (mut rest, mut offset) = (ys.as_mut_slice(), 0);
        for (((_, _, cache), &r), table) in batch.iter_mut().zip(rows).zip(tables) {
            let (y, tail) = std::mem::take(&mut rest).split_at_mut(r * width);
            rest = tail;
            jobs.push((offset, r, &mut **cache, table, y));
            offset += r;
        }
        jobs.par_iter_mut().filter(|job| job.1 == 1).try_for_each(
            |(at, _, cache, (rotation, _), y)| {
                let row = |values: &[f32], w: usize| values[*at * w..(*at + 1) * w].to_vec();
                self.decode_row(
                    index,
                    rotation,
                    (row(&qs, width), row(&ks, kv_width), &row(&vs, kv_width)),
                    cache,
                    y,
                )
            },
        )?;
        for (at, r, cache, (rotation, mask), y) in jobs.iter_mut().filter(|job| job.1 > 1) {
            let rows_of = |t: &Tensor| t.narrow(1, *at, *r);
            let out = self.session_attention(
                index,
                (&rows_of(q)?, &rows_of(k)?, &rows_of(v)?),
                (rotation, mask.as_ref()),
                cache,
            )?;
            y.copy_from_slice(&values(&out)?);
        }
        Ok(Tensor::from_vec(ys, (1, total, width), &self.device)?)
    }

    /// Attention of one decode row: rotates its query `q (heads * head_dim)` and key
    /// `k (kv_heads * head_dim)` by `rotation` (of the row's position), appends the key and
    /// the value `v` to the layer's cache and attends over every cached position, in place; writes
    /// `heads * head_dim` values into `y`. The solo and the batched paths both run it, so a
    /// batch computes exactly what each of its sessions would alone.
    fn decode_row(
        &self,
        index: usize,
        rotation: &Rotation,
        (mut q, mut k, v): (Vec<f32>, Vec<f32>, &[f32]),
        cache: &mut KvCache,
        y: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        for head in q
            .chunks_exact_mut(c.head_dim)
            .chain(k.chunks_exact_mut(c.head_dim))
        {
            rotate(
                head,
                &rotation.cos_values,
                &rotation.sin_values,
                c.rope_interleaved,
            );
        }
        let cached = cache.push(index, &k, v, c.num_kv_heads, c.head_dim)?;
        attend_row(&q, cached, y)
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
        if rows == 1 {
            let mut y = vec![0f32; c.num_heads * c.head_dim];
            let row = (values(q)?, values(k)?, &values(v)?[..]);
            self.decode_row(index, rotation, row, cache, &mut y)?;
            return Ok(Tensor::from_vec(
                y,
                (1, 1, c.num_heads * c.head_dim),
                &self.device,
            )?);
        }
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((1, rows, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (
            heads(q, c.num_heads)?,
            heads(k, c.num_kv_heads)?,
            heads(v, c.num_kv_heads)?,
        );
        let (cos, sin) = (&rotation.cos, &rotation.sin);
        let (q, k) = if c.rope_interleaved {
            (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
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

    /// Final norm and LM head over the last hidden row: logits of shape `(vocab,)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let output = self.output.as_ref().ok_or(ModelError::WrongPart {
            part: self.spec.kind.name(),
            action: "produce logits",
        })?;
        let rows = match hidden.dims() {
            &[rows, width] if rows > 0 && width == self.config.hidden_size => rows,
            dims => {
                return Err(ModelError::HiddenShape {
                    got: dims.to_vec(),
                    hidden: self.config.hidden_size,
                });
            }
        };
        let last = hidden.narrow(0, rows - 1, 1)?.contiguous()?;
        let normed =
            candle_nn::ops::rms_norm(&last, &output.norm, self.config.rms_norm_eps as f32)?;
        Ok(output.lm_head.forward(&normed)?.squeeze(0)?)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        rotation: &Rotation,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let attn = self.attention(layer, index, &h, rotation, mask, cache)?;
        let x = (x + attn)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
        let up = layer.w_up.forward(&h)?;
        let ffn = layer.w_down.forward(&(gate * up)?)?;
        Ok((x + ffn)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        h: &Tensor,
        rotation: &Rotation,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (q, k, v) = (
            layer.wq.forward(h)?,
            layer.wk.forward(h)?,
            layer.wv.forward(h)?,
        );
        let y = self.session_attention(index, (&q, &k, &v), (rotation, mask), cache)?;
        Ok(layer.wo.forward(&y)?)
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
        })
    }
}

/// Cosines and sines of the rotation angles of a run of positions `(rows, head_dim / 2)`: as
/// tensors for candle's rotary kernels (prompt chunks) and as the same values in plain memory
/// for [`ModelPart::decode_row`].
struct Rotation {
    cos: Tensor,
    sin: Tensor,
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
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

/// Rotates one head's values `x (head_dim)` by the angles whose cosines and sines are `cos`,
/// `sin (head_dim / 2)`: pairs of neighbours when `interleaved`, else the two halves, with the
/// same arithmetic as candle's `rope_i` and `rope` kernels.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = x.len() / 2;
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate().take(half) {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x1, x2) = (x[a], x[b]);
        x[a] = x1 * c - x2 * s;
        x[b] = x1 * s + x2 * c;
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
