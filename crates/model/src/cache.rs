use candle_core::Tensor;

use crate::Result;

/// Growth step of the key/value buffers, in positions.
const GROW_BY: usize = 256;

/// Keys and values of one attention layer, in buffers that grow in steps of
/// [`GROW_BY`] positions instead of being copied on every token.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerCache {
    /// Appends `k` and `v` of shape `(1, kv_heads, seq, head_dim)` and returns views of
    /// every cached position.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let needed = self.len + seq;
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) if kb.dim(2)? >= needed => (kb.clone(), vb.clone()),
            _ => {
                let capacity = needed.div_ceil(GROW_BY) * GROW_BY;
                let kb = self.grown(self.k.as_ref(), k, capacity)?;
                let vb = self.grown(self.v.as_ref(), v, capacity)?;
                self.k = Some(kb.clone());
                self.v = Some(vb.clone());
                (kb, vb)
            }
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }

    /// A buffer shaped like `like` with room for `capacity` positions, holding the cached ones.
    fn grown(&self, old: Option<&Tensor>, like: &Tensor, capacity: usize) -> Result<Tensor> {
        let (b, h, _, d) = like.dims4()?;
        let fresh = Tensor::zeros((b, h, capacity, d), like.dtype(), like.device())?;
        if let Some(old) = old.filter(|_| self.len > 0) {
            fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        }
        Ok(fresh)
    }
}

/// The key/value cache of one part for one generation session.
///
/// Every layer of the part has its own buffers; `len` is the number of positions the part has
/// processed, so the next rows it accepts must start there.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a part of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Positions cached by the part's `index`-th layer. Every layer holds [`KvCache::len`]
    /// positions unless the part runs a different range of its layers at each step (random
    /// split points), where a layer lags until it is caught up.
    pub fn layer_len(&self, index: usize) -> usize {
        self.layers.get(index).map_or(0, |l| l.len)
    }

    /// True when nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the key/value buffers (allocated capacity, not just used positions).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets every position, keeping nothing allocated.
    pub fn clear(&mut self) {
        let layers = self.layers.len();
        *self = Self::new(layers);
    }

    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.layers[layer].append(k, v)
    }

    /// Keys and values of the part's `index`-th layer for its cached positions.
    pub(crate) fn view(&self, index: usize) -> Result<Option<(Tensor, Tensor)>> {
        let layer = &self.layers[index];
        match (&layer.k, &layer.v) {
            (Some(k), Some(v)) if layer.len > 0 => Ok(Some((
                k.narrow(2, 0, layer.len)?,
                v.narrow(2, 0, layer.len)?,
            ))),
            _ => Ok(None),
        }
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }

    /// Records that some layer now holds `end` positions: the cache's length is its longest
    /// layer's.
    pub(crate) fn reach(&mut self, end: usize) {
        self.len = self.len.max(end);
    }

    pub(crate) fn layer_count(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn rows(from: usize, count: usize) -> Tensor {
        let values: Vec<f32> = (from * 4..(from + count) * 4).map(|v| v as f32).collect();
        Tensor::from_vec(values, (1, 1, count, 4), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn growing_past_a_step_keeps_every_position() -> Result<()> {
        let mut cache = KvCache::new(1);
        let mut expected = Vec::new();
        for (from, count) in [(0, 200), (200, 100), (300, 1), (301, 300)] {
            let (k, v) = cache.append(0, &rows(from, count), &rows(from, count))?;
            cache.advance(count);
            expected.extend((from * 4..(from + count) * 4).map(|v| v as f32));
            assert_eq!(k.dims(), &[1, 1, from + count, 4]);
            assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, expected);
            assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, expected);
        }
        assert_eq!(cache.len(), 601);
        // Buffers grow in steps of GROW_BY positions: 601 positions need 768.
        assert_eq!(cache.bytes(), 2 * 768 * 4 * 4);
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        Ok(())
    }
}
