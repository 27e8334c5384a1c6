//! Several sessions' steps through a part at once, for the trunk server: their rows share each
//! layer's matrix products, and each attends only to its own cache, exactly as alone.

use candle_core::Tensor;
use rayon::prelude::*;

use super::{ModelPart, PREFILL_CHUNK, Rotation, causal_mask, on_pool};
use crate::{KvCache, Result, values};

impl ModelPart {
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
            // The batch's rows cross to the part's device together, and come back together.
            let origin = hiddens[0].device().clone();
            let mut x = Tensor::cat(&hiddens, 0)?
                .to_device(&self.device)?
                .reshape((1, total, width))?;
            let eps = self.config.rms_norm_eps as f32;
            for (index, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x, eps, |q, k, v| {
                    self.batch_attention(index, batch, &rows, &tables, (q, k, v))
                })?;
            }
            let x = x.reshape((total, width))?.to_device(&origin)?;
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
                    0,
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
}
