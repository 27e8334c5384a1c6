//! The attack's pass through a part: many candidate tokens at one position, each as if it alone
//! followed the cached prefix.

use std::ops::Range;

use candle_core::Tensor;

use super::{ModelPart, Rotation, repeat_kv};
use crate::{KvCache, ModelError, Result};

impl ModelPart {
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
        let rotation = self.rotation(start, 1)?;
        let mut x = candidates.reshape((1, n, c.hidden_size))?;
        let mut outputs = Vec::with_capacity(layers.len());
        for index in 0..layers.len() {
            if cache.layer_len(index) != start {
                return Err(ModelError::Position {
                    expected: cache.layer_len(index),
                    got: start,
                });
            }
            x = self.layers[index].forward(&x, eps, |q, k, v| {
                self.alternative_attention(index, start, &rotation, (q, k, v), cache)
            })?;
            outputs.push(x.reshape((n, c.hidden_size))?);
        }
        Ok(outputs)
    }

    /// Attention of `n` candidate rows at position `start` from their query, key and value
    /// projections `(1, n, heads * head_dim)`: each attends to the positions layer `index` of
    /// `cache` holds and to itself, but not to the other candidates. Returns `(1, n, heads *
    /// head_dim)`.
    fn alternative_attention(
        &self,
        index: usize,
        start: usize,
        rotation: &Rotation,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = q.dim(1)?;
        let heads = |t: &Tensor, count: usize| -> Result<Tensor> {
            Ok(t.reshape((n, 1, count, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotation.apply(&heads(q, c.num_heads)?)?;
        let k = rotation.apply(&heads(k, c.num_kv_heads)?)?;
        let v = heads(v, c.num_kv_heads)?;
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
        Ok(y.transpose(1, 2)?
            .reshape((1, n, c.num_heads * c.head_dim))?)
    }
}
