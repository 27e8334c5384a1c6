use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::{ModelError, Result, values};

/// How the KV cache stores keys and values.
///
/// `F32` keeps them exactly as the layers compute them. `F16` (llama.cpp's default) halves the
/// cache's memory and what a decode step reads at long contexts, at the cost of rounding every
/// cached value to half precision. `Q8` (like llama.cpp's `q8_0`) stores 8-bit integers with
/// one f32 scale per [`Q8_GROUP`] values: a little over a quarter of f32's bytes, with every
/// value within half a step (1/254 of its group's largest magnitude). Split and unsplit runs stay
/// identical to each other at any precision as long as both use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// Single precision: the exact path.
    #[default]
    F32,
    /// Half precision: half the memory traffic of a long context.
    F16,
    /// 8-bit integers with a scale per group of values: about 0.28 of f32's traffic.
    Q8,
}

/// Values sharing one scale in an 8-bit KV cache; the head dimension must be a multiple.
pub const Q8_GROUP: usize = 32;

impl KvPrecision {
    /// Every precision, for listings and tests.
    pub const ALL: [KvPrecision; 3] = [KvPrecision::F32, KvPrecision::F16, KvPrecision::Q8];

    /// Bytes that `values` cached values take (a multiple of [`Q8_GROUP`] for `Q8`).
    pub fn bytes_for(self, values: usize) -> usize {
        match self {
            KvPrecision::F32 => 4 * values,
            KvPrecision::F16 => 2 * values,
            KvPrecision::Q8 => values + 4 * values.div_ceil(Q8_GROUP),
        }
    }
}

impl fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvPrecision::F32 => "f32",
            KvPrecision::F16 => "f16",
            KvPrecision::Q8 => "q8",
        })
    }
}

impl FromStr for KvPrecision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(KvPrecision::F32),
            "f16" => Ok(KvPrecision::F16),
            "q8" => Ok(KvPrecision::Q8),
            other => Err(ModelError::Config(format!(
                "unknown KV cache precision {other:?}: expected f32, f16 or q8"
            ))),
        }
    }
}

/// Cached values of one kind (keys or values) at one precision.
///
/// An 8-bit buffer keeps one scale per group of [`Q8_GROUP`] values: for value rows, the
/// group of values `[32 j, 32 j + 32)` has scale `j`; in a key tile (whose first value is at
/// `start`), the dimensions `[32 b, 32 b + 32)` of lane `l` have scale `start / 32 + 16 b + l`.
/// Either way a run of whole rows or whole tiles at `[a, b)` has its scales at `[a / 32, b / 32)`.
#[derive(Debug, Clone)]
enum Buffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8 { quants: Vec<i8>, scales: Vec<f32> },
}

/// The scale and 8-bit values of `from` (at most [`Q8_GROUP`] values): the largest magnitude
/// maps to 127.
fn quantize(from: &[f32]) -> (f32, impl Iterator<Item = i8> + '_) {
    let top = from.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = top / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    (scale, from.iter().map(move |x| (x * inverse).round() as i8))
}

impl Buffer {
    fn zeros(precision: KvPrecision, len: usize) -> Self {
        match precision {
            KvPrecision::F32 => Buffer::F32(vec![0.0; len]),
            KvPrecision::F16 => Buffer::F16(vec![f16::ZERO; len]),
            KvPrecision::Q8 => Buffer::Q8 {
                quants: vec![0; len],
                scales: vec![0.0; len / Q8_GROUP],
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Buffer::F32(b) => b.len(),
            Buffer::F16(b) => b.len(),
            Buffer::Q8 { quants, .. } => quants.len(),
        }
    }

    /// Stores the rows `from` at `at` (both whole groups for 8 bits), rounded to the buffer's
    /// precision.
    fn write(&mut self, at: usize, from: &[f32]) {
        match self {
            Buffer::F32(b) => b[at..at + from.len()].copy_from_slice(from),
            Buffer::F16(b) => b[at..at + from.len()].convert_from_f32_slice(from),
            Buffer::Q8 { quants, scales } => {
                for (i, group) in from.chunks(Q8_GROUP).enumerate() {
                    let start = at + i * Q8_GROUP;
                    let (scale, q) = quantize(group);
                    scales[start / Q8_GROUP] = scale;
                    quants[start..start + group.len()]
                        .iter_mut()
                        .zip(q)
                        .for_each(|(d, q)| *d = q);
                }
            }
        }
    }

    /// Stores `from` at `at`, `at + TILE`, `at + 2 TILE`...: one position's key into its lane of
    /// a transposed tile.
    fn write_column(&mut self, at: usize, from: &[f32]) {
        let lanes = (at..).step_by(TILE);
        match self {
            Buffer::F32(b) => lanes.zip(from).for_each(|(i, &x)| b[i] = x),
            Buffer::F16(b) => {
                // Converted a chunk at a time with `half`'s slice conversion, which picks F16C
                // once per chunk (its per-value conversion checks the CPU on every call).
                let mut narrow = [f16::ZERO; 256];
                let mut lanes = lanes;
                for chunk in from.chunks(narrow.len()) {
                    let narrow = &mut narrow[..chunk.len()];
                    narrow.convert_from_f32_slice(chunk);
                    lanes
                        .by_ref()
                        .zip(narrow.iter())
                        .for_each(|(i, &x)| b[i] = x);
                }
            }
            Buffer::Q8 { quants, scales } => {
                let lane = at % TILE;
                for (g, group) in from.chunks(Q8_GROUP).enumerate() {
                    let (scale, q) = quantize(group);
                    scales[(at - lane) / Q8_GROUP + g * TILE + lane] = scale;
                    let first = at + g * Q8_GROUP * TILE;
                    (first..)
                        .step_by(TILE)
                        .zip(q)
                        .for_each(|(i, q)| quants[i] = q);
                }
            }
        }
    }

    /// The values at `range` (whole rows or tiles) in place.
    fn slice(&self, range: Range<usize>) -> Values<'_> {
        match self {
            Buffer::F32(b) => Values::F32(&b[range]),
            Buffer::F16(b) => Values::F16(&b[range]),
            Buffer::Q8 { quants, scales } => Values::Q8 {
                scales: &scales[range.start / Q8_GROUP..range.end / Q8_GROUP],
                quants: &quants[range],
            },
        }
    }
}

/// Cached keys or values read in place, at the cache's precision.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8 { quants: &'a [i8], scales: &'a [f32] },
}

impl<'a> Values<'a> {
    /// The value rows at `range` as f32: in place at single precision, else widened into
    /// `buffer`.
    pub(crate) fn widen<'b>(&self, range: Range<usize>, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Values::F32(v) => &v[range],
            Values::F16(v) => {
                let v = &v[range];
                buffer.resize(v.len(), 0.0);
                v.convert_to_f32_slice(buffer);
                buffer
            }
            Values::Q8 { .. } => {
                buffer.clear();
                buffer.extend(range.map(|i| self.get(i, i / Q8_GROUP)));
                buffer
            }
        }
    }

    /// The value at `i`, whose 8-bit scale (if any) is at `scale`, as f32.
    fn get(&self, i: usize, scale: usize) -> f32 {
        match *self {
            Values::F32(v) => v[i],
            Values::F16(v) => v[i].to_f32(),
            Values::Q8 { quants, scales } => f32::from(quants[i]) * scales[scale],
        }
    }
}

/// Positions per tile of transposed keys.
pub(crate) const TILE: usize = 16;

/// Positions per page of a layer's cache. A page is allocated whole when the first of its
/// positions arrives and never moves, so the cache grows without copying what it holds; decode
/// attention works a page at a time.
pub(crate) const PAGE: usize = 256;

/// Keys and values of [`PAGE`] positions of one layer, for every KV head: KV head `g`'s
/// positions start at `g * PAGE * dim` in both buffers, `dim` values per position.
///
/// Values are rows, one per position. Keys are transposed in tiles of [`TILE`] positions
/// (`dim` rows of `TILE` lanes), so that a query's scores against a tile's positions are a sum
/// over the dimensions of whole vectors, with no sums across lanes.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    k: Buffer,
    v: Buffer,
}

/// Keys and values of one attention layer, in pages. Plain memory, so a decode step writes its
/// row and reads the cache in place.
#[derive(Debug, Clone)]
struct LayerCache {
    pages: Vec<Page>,
    precision: KvPrecision,
    kv_heads: usize,
    dim: usize,
    len: usize,
}

/// The cached keys and values of one layer, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedHeads<'a> {
    pages: &'a [Page],
    pub(crate) kv_heads: usize,
    pub(crate) dim: usize,
    pub(crate) len: usize,
}

impl<'a> CachedHeads<'a> {
    /// The keys and values of page `c` (positions `[c * PAGE, (c + 1) * PAGE)`).
    pub(crate) fn page(&self, c: usize) -> (Values<'a>, Values<'a>) {
        let page = &self.pages[c];
        (page.k.slice(0..page.k.len()), page.v.slice(0..page.v.len()))
    }

    /// Where KV head `g`'s values at `positions` of a page lie in the page's value buffer.
    pub(crate) fn value_rows(&self, g: usize, positions: Range<usize>) -> Range<usize> {
        let at = g * PAGE * self.dim;
        at + positions.start * self.dim..at + positions.end * self.dim
    }

    /// Where the key tiles that hold KV head `g`'s `positions` of a page lie in the page's key
    /// buffer; the positions start at a tile's first.
    pub(crate) fn key_tiles(&self, g: usize, positions: Range<usize>) -> Range<usize> {
        let tiles = positions.start / TILE..positions.end.div_ceil(TILE);
        let at = g * PAGE * self.dim;
        at + tiles.start * TILE * self.dim..at + tiles.end * TILE * self.dim
    }

    /// KV head `g`'s key value `d` of position `p`, as f32.
    fn key(&self, g: usize, p: usize, d: usize) -> f32 {
        let (keys, _) = self.page(p / PAGE);
        let p = p % PAGE;
        let tile = g * PAGE * self.dim + p / TILE * TILE * self.dim;
        let lane = p % TILE;
        let scale = tile / Q8_GROUP + d / Q8_GROUP * TILE + lane;
        keys.get(tile + d * TILE + lane, scale)
    }

    /// Appends KV head `g`'s keys at `positions`, as f32 rows, to `out`: whole tiles widened at
    /// once, then read lane by lane.
    fn keys_into(&self, g: usize, positions: Range<usize>, out: &mut Vec<f32>) {
        let mut wide = Vec::new();
        for (c, span) in page_spans(positions) {
            let (keys, _) = self.page(c);
            if let Values::Q8 { .. } = keys {
                // A tile's 8-bit scales go by lane, not by run of values as `widen` reads them.
                for p in span {
                    out.extend((0..self.dim).map(|d| self.key(g, c * PAGE + p, d)));
                }
                continue;
            }
            let tiles = keys.widen(self.key_tiles(g, span.clone()), &mut wide);
            for p in span.clone() {
                let tile = &tiles[(p / TILE - span.start / TILE) * TILE * self.dim..];
                out.extend((0..self.dim).map(|d| tile[d * TILE + p % TILE]));
            }
        }
    }

    /// Appends KV head `g`'s values at `positions`, as f32 rows, to `out`.
    fn values_into(&self, g: usize, positions: Range<usize>, out: &mut Vec<f32>) {
        let mut wide = Vec::new();
        for (c, span) in page_spans(positions) {
            let (_, values) = self.page(c);
            out.extend_from_slice(values.widen(self.value_rows(g, span), &mut wide));
        }
    }
}

/// The pages that `positions` cross, each with the positions in it (relative to the page).
fn page_spans(positions: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> {
    (positions.start / PAGE..positions.end.div_ceil(PAGE)).map(move |c| {
        let start = positions.start.max(c * PAGE) - c * PAGE;
        (c, start..positions.end.min((c + 1) * PAGE) - c * PAGE)
    })
}

impl LayerCache {
    /// An empty layer whose pages will hold values at `precision`.
    fn new(precision: KvPrecision) -> Self {
        Self {
            pages: Vec::new(),
            precision,
            kv_heads: 0,
            dim: 0,
            len: 0,
        }
    }

    /// Appends `seq` positions of keys and values laid out head by head
    /// (`kv_heads * seq * dim` values each, as a `(1, kv_heads, seq, dim)` tensor holds them).
    fn append(&mut self, k: &[f32], v: &[f32], kv_heads: usize, dim: usize) -> Result<()> {
        if self.pages.is_empty() {
            (self.kv_heads, self.dim) = (kv_heads, dim);
        }
        if (kv_heads, dim) != (self.kv_heads, self.dim)
            || kv_heads * dim == 0
            || k.len() != v.len()
            || !k.len().is_multiple_of(kv_heads * dim)
        {
            return Err(ModelError::Config(format!(
                "KV rows of {} values for {kv_heads} heads of {dim} do not fit a cache of {} \
                 heads of {}",
                k.len(),
                self.kv_heads,
                self.dim
            )));
        }
        if self.precision == KvPrecision::Q8 && !dim.is_multiple_of(Q8_GROUP) {
            return Err(ModelError::Config(format!(
                "an 8-bit KV cache needs a head dimension that is a multiple of {Q8_GROUP}, not \
                 {dim}: use --kv-cache f16 or f32"
            )));
        }
        let seq = k.len() / (kv_heads * dim);
        for i in 0..seq {
            let p = self.len + i;
            if p / PAGE == self.pages.len() {
                let values = kv_heads * PAGE * dim;
                self.pages.push(Page {
                    k: Buffer::zeros(self.precision, values),
                    v: Buffer::zeros(self.precision, values),
                });
            }
            let page = &mut self.pages[p / PAGE];
            let p = p % PAGE;
            for g in 0..kv_heads {
                let row = (g * seq + i) * dim..(g * seq + i + 1) * dim;
                let at = g * PAGE * dim;
                page.v.write(at + p * dim, &v[row.clone()]);
                page.k
                    .write_column(at + p / TILE * TILE * dim + p % TILE, &k[row]);
            }
        }
        self.len += seq;
        Ok(())
    }

    /// Forgets the positions from `len` on; their storage reads as a fresh page's again, so a
    /// cache cut back and grown holds exactly what one that never went past `len` would.
    fn truncate(&mut self, len: usize) {
        let zeros = vec![0f32; self.dim];
        for p in len..self.len {
            let page = &mut self.pages[p / PAGE];
            let p = p % PAGE;
            for g in 0..self.kv_heads {
                let at = g * PAGE * self.dim;
                page.v.write(at + p * self.dim, &zeros);
                page.k
                    .write_column(at + p / TILE * TILE * self.dim + p % TILE, &zeros);
            }
        }
        self.pages.truncate(len.div_ceil(PAGE));
        self.len = self.len.min(len);
    }

    fn heads(&self) -> CachedHeads<'_> {
        CachedHeads {
            pages: &self.pages,
            kv_heads: self.kv_heads,
            dim: self.dim,
            len: self.len,
        }
    }

    /// Copies of the cached keys and values as `(1, kv_heads, len, dim)` f32 tensors.
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let heads = self.heads();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for g in 0..self.kv_heads {
            heads.keys_into(g, 0..self.len, &mut k);
            heads.values_into(g, 0..self.len, &mut v);
        }
        let shape = (1, self.kv_heads, self.len, self.dim);
        Ok((
            Tensor::from_vec(k, shape, device)?,
            Tensor::from_vec(v, shape, device)?,
        ))
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
    precision: KvPrecision,
}

impl KvCache {
    /// An empty single-precision cache for a part of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self::with_precision(layers, KvPrecision::F32)
    }

    /// An empty cache for a part of `layers` layers that stores values at `precision`.
    pub fn with_precision(layers: usize, precision: KvPrecision) -> Self {
        Self {
            layers: vec![LayerCache::new(precision); layers],
            len: 0,
            precision,
        }
    }

    /// The precision the cache stores keys and values at.
    pub fn precision(&self) -> KvPrecision {
        self.precision
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
        let pages = self.layers.iter().flat_map(|l| &l.pages);
        self.precision
            .bytes_for(pages.map(|page| page.k.len() + page.v.len()).sum())
    }

    /// Keeps only the first `len` positions of every layer: the rows of a multi-token step past
    /// the tokens the device accepted are forgotten, and the next step starts at `len`.
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.truncate(len);
        }
        self.len = self.len.min(len);
    }

    /// Forgets every position, keeping nothing allocated.
    pub fn clear(&mut self) {
        *self = Self::with_precision(self.layers.len(), self.precision);
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

    /// The `layer`-th layer's cached keys and values, read in place.
    #[cfg(test)]
    pub(crate) fn heads(&self, layer: usize) -> CachedHeads<'_> {
        self.layers[layer].heads()
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
        // Pages of PAGE positions: 601 positions take three, room for 768.
        assert_eq!(cache.bytes(), 2 * 768 * 4 * 4);
        let (k, _) = cache.view(0, &Device::Cpu)?.expect("cached positions");
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, expected);
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        Ok(())
    }

    /// A cache cut back after a multi-token step and grown again holds exactly what one that
    /// never went past the cut holds, whatever the precision and across page boundaries.
    #[test]
    fn truncating_and_growing_again_equals_never_going_past_the_cut() -> Result<()> {
        let (kv_heads, dim) = (2, 32);
        let row = |p: usize, salt: f32| -> Vec<f32> {
            (0..kv_heads * dim)
                .map(|i| ((p * 31 + i) % 17) as f32 * 0.25 - 2.0 + salt)
                .collect()
        };
        for precision in [KvPrecision::F32, KvPrecision::F16, KvPrecision::Q8] {
            for (past, cut) in [(300, 250), (260, 255), (40, 0), (20, 19)] {
                let mut cut_back = KvCache::with_precision(1, precision);
                let mut straight = KvCache::with_precision(1, precision);
                for p in 0..past {
                    let r = row(p, 0.5);
                    cut_back.push(0, &r, &r, kv_heads, dim)?;
                }
                cut_back.reach(past);
                cut_back.truncate(cut);
                assert_eq!(cut_back.len(), cut);
                assert_eq!(cut_back.layer_len(0), cut);
                for p in 0..cut {
                    let r = row(p, 0.5);
                    straight.push(0, &r, &r, kv_heads, dim)?;
                }
                straight.reach(cut);
                for cache in [&mut cut_back, &mut straight] {
                    for p in cut..past + 5 {
                        let r = row(p, -1.0);
                        cache.push(0, &r, &r, kv_heads, dim)?;
                    }
                    cache.reach(past + 5);
                }
                assert_eq!(
                    format!("{cut_back:?}"),
                    format!("{straight:?}"),
                    "{precision} cut at {cut} after {past}"
                );
            }
        }
        Ok(())
    }

    /// KV head `g`'s keys and values at `positions`, as f32 rows.
    fn read(heads: &CachedHeads<'_>, g: usize, positions: Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        heads.keys_into(g, positions.clone(), &mut keys);
        heads.values_into(g, positions, &mut values);
        (keys, values)
    }

    #[test]
    fn decode_rows_land_head_by_head_and_read_in_place() -> Result<()> {
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            let mut cache = KvCache::with_precision(2, precision);
            // A two-position prompt of two KV heads of 2 values, then one decode row; every
            // value is exact in half precision too.
            let prompt = Tensor::from_vec(
                vec![1f32, 2., 3., 4., 5., 6., 7., 8.],
                (1, 2, 2, 2),
                &Device::Cpu,
            )?;
            cache.append(1, &prompt, &(&prompt * 10.0)?)?;
            let heads = cache.push(1, &[9., 10., 11., 12.], &[90., 100., 110., 120.], 2, 2)?;
            assert_eq!((heads.len, heads.kv_heads, heads.dim), (3, 2, 2));
            assert_eq!(read(&heads, 0, 0..3).0, [1., 2., 3., 4., 9., 10.]);
            assert_eq!(
                read(&heads, 1, 1..3),
                (vec![7f32, 8., 11., 12.], vec![70f32, 80., 110., 120.])
            );
            assert_eq!(cache.layer_len(1), 3);
            assert_eq!(cache.layer_len(0), 0);
            assert!(cache.view(0, &Device::Cpu)?.is_none());
            let wrong = cache.push(1, &[1., 2., 3.], &[1., 2., 3.], 3, 1);
            assert!(wrong.is_err(), "a row of another shape must be refused");
        }
        Ok(())
    }

    #[test]
    fn a_half_precision_cache_rounds_values_and_takes_half_the_bytes() -> Result<()> {
        let (mut wide, mut narrow) = (
            KvCache::new(1),
            KvCache::with_precision(1, KvPrecision::F16),
        );
        // 1/3 is not exact in either precision; f16 keeps 11 significant bits.
        let row = [1.0f32 / 3.0, -1000.25, 65504.0, 1e-3];
        for cache in [&mut wide, &mut narrow] {
            cache.push(0, &row, &row, 1, 4)?;
        }
        let (k, v) = wide.view(0, &Device::Cpu)?.expect("cached");
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, row);
        assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, row);
        let (k, _) = narrow.view(0, &Device::Cpu)?.expect("cached");
        let rounded: Vec<f32> = row.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, rounded);
        assert_eq!(rounded[0], 0.333_251_95);
        assert_eq!(rounded[1], -1000.0);
        // A page of one head of 4 values, keys and values.
        assert_eq!(wide.bytes(), 2 * 256 * 4 * 4);
        assert_eq!(narrow.bytes(), 2 * 256 * 4 * 2);
        narrow.clear();
        assert_eq!(narrow.precision(), KvPrecision::F16);
        Ok(())
    }

    #[test]
    fn precisions_parse_and_print() {
        for precision in KvPrecision::ALL {
            assert_eq!(
                precision.to_string().parse::<KvPrecision>().ok(),
                Some(precision)
            );
        }
        let err = "q4".parse::<KvPrecision>().expect_err("unknown precision");
        assert_eq!(
            err.to_string(),
            "model configuration: unknown KV cache precision \"q4\": expected f32, f16 or q8"
        );
        assert_eq!(KvPrecision::F32.bytes_for(64), 256);
        assert_eq!(KvPrecision::F16.bytes_for(64), 128);
        assert_eq!(KvPrecision::Q8.bytes_for(64), 72);
    }

    #[test]
    fn an_8_bit_cache_keeps_rows_and_tiles_with_their_scales() -> Result<()> {
        // Two KV heads of 64 values (two groups each); every group's largest magnitude is 127,
        // so its scale is 1 and the integers come back exactly. 300 positions cross tiles, a
        // page and end in a ragged tile.
        let (heads, dim, len) = (2, 64, 300);
        let row = |p: usize, h: usize| -> Vec<f32> {
            (0..dim)
                .map(|d| match d % 32 {
                    0 => 127.0,
                    j => ((p * 7 + h * 5 + d * 3 + j) % 255) as f32 - 127.0,
                })
                .collect()
        };
        let mut cache = KvCache::with_precision(1, KvPrecision::Q8);
        let prompt: Vec<f32> = (0..heads)
            .flat_map(|h| (0..len - 1).flat_map(move |p| row(p, h)))
            .collect();
        let prompt = Tensor::from_vec(prompt, (1, heads, len - 1, dim), &Device::Cpu)?;
        cache.append(0, &prompt, &(&prompt * 0.5)?)?;
        let last: Vec<f32> = (0..heads).flat_map(|h| row(len - 1, h)).collect();
        let halves: Vec<f32> = last.iter().map(|x| x * 0.5).collect();
        let cached = cache.push(0, &last, &halves, heads, dim)?;
        for h in 0..heads {
            let (keys, values) = read(&cached, h, 0..len);
            let expected: Vec<f32> = (0..len).flat_map(|p| row(p, h)).collect();
            assert_eq!(keys, expected, "keys of head {h}");
            let halved: Vec<f32> = expected.iter().map(|x| x * 0.5).collect();
            assert_eq!(values, halved, "values of head {h}");
        }
        // Two pages (512 positions): a byte per value and four per group of 32.
        assert_eq!(cache.bytes(), 2 * heads * 512 * (dim + 4 * dim / 32));
        Ok(())
    }
}
