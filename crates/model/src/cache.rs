use candle_core::{Device, Tensor};

use crate::{ModelError, Result, values};

/// Growth step of the key/value buffers, in positions.
const GROW_BY: usize = 256;

/// Keys and values of one attention layer: for each KV head, room for `capacity` positions of
/// `dim` values, in buffers that grow in steps of [`GROW_BY`] positions instead of being copied
/// on every token. Plain memory, so a decode step writes its row and reads the cache in place.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    kv_heads: usize,
    dim: usize,
    capacity: usize,
    len: usize,
}

/// The cached keys and values of one layer, read in place: KV head `g`'s positions are rows of
/// `dim` values starting at `g * stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedHeads<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) kv_heads: usize,
    pub(crate) dim: usize,
    pub(crate) stride: usize,
    pub(crate) len: usize,
}

impl CachedHeads<'_> {
    /// Keys and values of KV head `g` at `positions`.
    pub(crate) fn rows(&self, g: usize, positions: std::ops::Range<usize>) -> (&[f32], &[f32]) {
        let at = g * self.stride;
        let span = at + positions.start * self.dim..at + positions.end * self.dim;
        (&self.k[span.clone()], &self.v[span])
    }
}

impl LayerCache {
    /// Appends `seq` positions of keys and values laid out head by head
    /// (`kv_heads * seq * dim` values each, as a `(1, kv_heads, seq, dim)` tensor holds them).
    fn append(&mut self, k: &[f32], v: &[f32], kv_heads: usize, dim: usize) -> Result<()> {
        if self.capacity == 0 {
            (self.kv_heads, self.dim) = (kv_heads, dim);
        }
        if (kv_heads, dim) != (self.kv_heads, self.dim)
            || kv_heads * dim == 0
            || k.len() != v.len()
            || k.len() % (kv_heads * dim) != 0
        {
            return Err(ModelError::Config(format!(
                "KV rows of {} values for {kv_heads} heads of {dim} do not fit a cache of {} \
                 heads of {}",
                k.len(),
                self.kv_heads,
                self.dim
            )));
        }
        let seq = k.len() / (kv_heads * dim);
        let needed = self.len + seq;
        if needed > self.capacity {
            self.grow(needed.div_ceil(GROW_BY) * GROW_BY);
        }
        let stride = self.capacity * dim;
        for g in 0..kv_heads {
            let to = g * stride + self.len * dim..g * stride + needed * dim;
            let from = g * seq * dim..(g + 1) * seq * dim;
            self.k[to.clone()].copy_from_slice(&k[from.clone()]);
            self.v[to].copy_from_slice(&v[from]);
        }
        self.len = needed;
        Ok(())
    }

    /// Moves the cached positions into buffers with room for `capacity`.
    fn grow(&mut self, capacity: usize) {
        let dim = self.dim;
        let regrow = |old: &[f32]| {
            let mut fresh = vec![0f32; self.kv_heads * capacity * dim];
            for g in 0..self.kv_heads {
                let from = g * self.capacity * dim..(g * self.capacity + self.len) * dim;
                fresh[g * capacity * dim..][..self.len * dim].copy_from_slice(&old[from]);
            }
            fresh
        };
        (self.k, self.v) = (regrow(&self.k), regrow(&self.v));
        self.capacity = capacity;
    }

    fn heads(&self) -> CachedHeads<'_> {
        CachedHeads {
            k: &self.k,
            v: &self.v,
            kv_heads: self.kv_heads,
            dim: self.dim,
            stride: self.capacity * self.dim,
            len: self.len,
        }
    }

    /// Copies of the cached keys and values as `(1, kv_heads, len, dim)` tensors.
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let copy = |buffer: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(self.kv_heads * self.len * self.dim);
            for g in 0..self.kv_heads {
                out.extend_from_slice(
                    &buffer[g * self.capacity * self.dim..][..self.len * self.dim],
                );
            }
            Ok(Tensor::from_vec(
                out,
                (1, self.kv_heads, self.len, self.dim),
                device,
            )?)
        };
        Ok((copy(&self.k)?, copy(&self.v)?))
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
            .map(|l| (l.k.len() + l.v.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Forgets every position, keeping nothing allocated.
    pub fn clear(&mut self) {
        let layers = self.layers.len();
        *self = Self::new(layers);
    }

    /// Appends `k`, `v (1, kv_heads, seq, dim)` to the `layer`-th layer; returns copies of
    /// every cached position of it, shaped alike.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (_, kv_heads, _, dim) = k.dims4()?;
        let cache = &mut self.layers[layer];
        cache.append(&values(k)?, &values(v)?, kv_heads, dim)?;
        cache.tensors(k.device())
    }

    /// Appends one position of keys and values (`kv_heads * dim` values each) to the
    /// `layer`-th layer; returns every cached position of it, in place.
    pub(crate) fn push(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        dim: usize,
    ) -> Result<CachedHeads<'_>> {
        let cache = &mut self.layers[layer];
        cache.append(k, v, kv_heads, dim)?;
        Ok(cache.heads())
    }

    /// Copies of the keys and values of the part's `index`-th layer for its cached positions.
    pub(crate) fn view(&self, index: usize, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let layer = &self.layers[index];
        if layer.len == 0 {
            return Ok(None);
        }
        Ok(Some(layer.tensors(device)?))
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
        let (k, _) = cache.view(0, &Device::Cpu)?.expect("cached positions");
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, expected);
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        Ok(())
    }

    #[test]
    fn decode_rows_land_head_by_head_and_read_in_place() -> Result<()> {
        let mut cache = KvCache::new(2);
        // A two-position prompt of two KV heads of 2 values, then one decode row.
        let prompt = Tensor::from_vec(
            vec![1f32, 2., 3., 4., 5., 6., 7., 8.],
            (1, 2, 2, 2),
            &Device::Cpu,
        )?;
        cache.append(1, &prompt, &(&prompt * 10.0)?)?;
        let heads = cache.push(1, &[9., 10., 11., 12.], &[90., 100., 110., 120.], 2, 2)?;
        assert_eq!((heads.len, heads.kv_heads, heads.dim), (3, 2, 2));
        assert_eq!(heads.rows(0, 0..3).0, &[1., 2., 3., 4., 9., 10.]);
        assert_eq!(
            heads.rows(1, 1..3),
            (&[7f32, 8., 11., 12.][..], &[70f32, 80., 110., 120.][..])
        );
        assert_eq!(cache.layer_len(1), 3);
        assert_eq!(cache.layer_len(0), 0);
        assert!(cache.view(0, &Device::Cpu)?.is_none());
        let wrong = cache.push(1, &[1., 2., 3.], &[1., 2., 3.], 3, 1);
        assert!(wrong.is_err(), "a row of another shape must be refused");
        Ok(())
    }
}
