//! Decode attention: one query row against a session's cached keys and values, read where they
//! lie in the KV cache.
//!
//! Flash-decoding: each KV head's cached positions are cut into chunks of [`CHUNK`] positions;
//! each chunk is one pass over its keys and values with an online softmax (running maximum, sum
//! and weighted value sum per query head), in blocks of [`BLOCK`] positions whose keys and values
//! stay in L1 between the scores and the value sums. The chunks' partial results are merged at
//! the end. Chunks are independent, so a long context spreads over threads evenly even when
//! there are fewer KV heads than threads (or a number that does not divide among them). The
//! chunking depends only on the number of positions, so the result is the same on every thread
//! count and whether or not the chunks run in parallel.
//!
//! Two implementations of the block primitives: AVX2 with FMA (scores of eight positions at once,
//! a vectorized `exp`) and a portable one; they agree to within float rounding.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::cache::{CachedHeads, TILE, Values};
use crate::{ModelError, Result};

/// Positions of one KV head that one task attends to.
const CHUNK: usize = 256;

/// Positions scored, exponentiated and summed into the values at once: whole tiles.
const BLOCK: usize = 2 * TILE;

/// Multiply-adds of a single-row attention from which its chunks run on several threads.
const PARALLEL_ATTENTION: usize = 1 << 16;

/// Attention of one query row `q (heads * dim)` against every position of `cached`, read in
/// place: no copy of the cache per token (which repeating the KV heads would make), so a decode
/// step costs only the reads and the arithmetic. Writes the `heads * dim` outputs into `out`.
pub(crate) fn attend_row(q: &[f32], cached: CachedHeads<'_>, out: &mut [f32]) -> Result<()> {
    let CachedHeads {
        kv_heads, dim, len, ..
    } = cached;
    if len == 0 || dim == 0 || q.len() % (kv_heads * dim) != 0 || out.len() != q.len() {
        return Err(ModelError::Config(format!(
            "attention of {} query values over {len} cached positions of {kv_heads} heads of {dim}",
            q.len()
        )));
    }
    let heads = q.len() / dim;
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let chunks = len.div_ceil(CHUNK);
    let attend = |task: usize| {
        let (g, c) = (task / chunks, task % chunks);
        let queries = &q[g * group * dim..(g + 1) * group * dim];
        let positions = c * CHUNK..len.min((c + 1) * CHUNK);
        match (cached.k, cached.v) {
            (Values::F32(k), Values::F32(v)) => {
                attend_chunk(queries, (k, v), &cached, g, positions, scale)
            }
            (Values::F16(k), Values::F16(v)) => {
                attend_chunk(queries, (k, v), &cached, g, positions, scale)
            }
            _ => unreachable!("a layer's keys and values share their precision"),
        }
    };
    let partials: Vec<Partial> = if heads * len * dim < PARALLEL_ATTENTION {
        (0..kv_heads * chunks).map(attend).collect()
    } else {
        (0..kv_heads * chunks).into_par_iter().map(attend).collect()
    };
    for (ys, parts) in out
        .chunks_exact_mut(group * dim)
        .zip(partials.chunks_exact(chunks))
    {
        merge(parts, ys, dim);
    }
    Ok(())
}

/// The online softmax of a group of query heads over some positions: per head the largest
/// score, the sum of `exp(score - max)` and the sum of the values weighted by those.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// A cached number the kernels read: f32 as it is, f16 widened sixteen at a time (with F16C
/// where the target has it).
trait Element: Copy + Send + Sync {
    /// The first [`TILE`] values of `from` as f32.
    fn widen(from: &[Self]) -> [f32; TILE];

    /// The values of `from` (fewer than [`TILE`]) as f32, zeros after them.
    fn widen_part(from: &[Self]) -> [f32; TILE];
}

impl Element for f32 {
    #[inline(always)]
    fn widen(from: &[f32]) -> [f32; TILE] {
        let mut out = [0f32; TILE];
        out.copy_from_slice(&from[..TILE]);
        out
    }

    fn widen_part(from: &[f32]) -> [f32; TILE] {
        let mut out = [0f32; TILE];
        out[..from.len()].copy_from_slice(from);
        out
    }
}

impl Element for f16 {
    #[inline(always)]
    fn widen(from: &[f16]) -> [f32; TILE] {
        let from = &from[..TILE];
        #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
        {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
            let mut out = [0f32; TILE];
            // SAFETY: the target has F16C; `from` holds 16 halves, read as two groups of eight,
            // and `out` has room for 16 floats.
            unsafe {
                for i in 0..2 {
                    let half = _mm_loadu_si128(from.as_ptr().add(8 * i).cast::<__m128i>());
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_cvtph_ps(half));
                }
            }
            out
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
        std::array::from_fn(|i| from[i].to_f32())
    }

    fn widen_part(from: &[f16]) -> [f32; TILE] {
        let mut out = [0f32; TILE];
        from.convert_to_f32_slice(&mut out[..from.len()]);
        out
    }
}

/// Query heads one pass over a block's keys and values serves: each key and value is read (and
/// widened) once for all of them, and their running sums fit the vector registers.
const HEADS_AT_ONCE: usize = 4;

/// Attention of the group's query heads `queries (group * dim)` over KV head `g`'s
/// `positions` (starting at a tile's first) in the buffers `keys`, `values` that `cached`
/// describes.
fn attend_chunk<E: Element>(
    queries: &[f32],
    (keys, values): (&[E], &[E]),
    cached: &CachedHeads<'_>,
    g: usize,
    positions: Range<usize>,
    scale: f32,
) -> Partial {
    let dim = cached.dim;
    let group = queries.len() / dim;
    let mut part = Partial {
        max: vec![f32::NEG_INFINITY; group],
        sum: vec![0.0; group],
        acc: vec![0.0; group * dim],
    };
    let mut first = 0;
    while first < group {
        let heads = first..group.min(first + HEADS_AT_ONCE);
        let run = Heads {
            queries: &queries[heads.start * dim..heads.end * dim],
            max: &mut part.max[heads.clone()],
            sum: &mut part.sum[heads.clone()],
            acc: &mut part.acc[heads.start * dim..heads.end * dim],
        };
        let span = (keys, values, cached, g, positions.clone(), scale);
        match heads.len() {
            1 => run.attend::<E, 1>(span),
            2 => run.attend::<E, 2>(span),
            3 => run.attend::<E, 3>(span),
            _ => run.attend::<E, HEADS_AT_ONCE>(span),
        }
        first = heads.end;
    }
    part
}

/// Where a task's keys and values lie: the key and value buffers, the layer's heads, the KV
/// head, its positions, and the scores' scale.
type Span<'a, E> = (
    &'a [E],
    &'a [E],
    &'a CachedHeads<'a>,
    usize,
    Range<usize>,
    f32,
);

/// Some query heads of a group and their online softmax state.
struct Heads<'a> {
    queries: &'a [f32],
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

impl Heads<'_> {
    /// Folds the positions of `span` into `G` heads' running maximum, sum and weighted values,
    /// a block at a time.
    #[inline(always)]
    fn attend<E: Element, const G: usize>(self, span: Span<'_, E>) {
        let (keys, values, cached, g, positions, scale) = span;
        let dim = cached.dim;
        let by_dimension: Vec<[f32; G]> = (0..dim)
            .map(|d| std::array::from_fn(|h| self.queries[h * dim + d]))
            .collect();
        let mut scores = [[0f32; BLOCK]; G];
        for from in positions.clone().step_by(BLOCK) {
            let block = from..positions.end.min(from + BLOCK);
            let n = block.len();
            let tiles = &keys[cached.key_tiles(g, block.clone())];
            let rows = &values[cached.value_rows(g, block)];
            for (tile, at) in tiles.chunks_exact(TILE * dim).zip((0..).step_by(TILE)) {
                let sums = tile_scores::<E, G>(&by_dimension, tile);
                for (score, sum) in scores.iter_mut().zip(sums) {
                    for (s, &x) in score[at..at + TILE].iter_mut().zip(&sum) {
                        *s = scale * x;
                    }
                }
            }
            for (h, score) in scores.iter_mut().enumerate() {
                let score = &mut score[..n];
                let top = largest(score);
                if top > self.max[h] {
                    let shrink = (self.max[h] - top).exp();
                    self.sum[h] *= shrink;
                    self.acc[h * dim..(h + 1) * dim]
                        .iter_mut()
                        .for_each(|a| *a *= shrink);
                    self.max[h] = top;
                }
                self.sum[h] += block::exp_sum(score, self.max[h]);
            }
            weigh_values::<E, G>(&scores, rows, dim, self.acc);
        }
    }
}

/// The dot products of `G` queries, given dimension by dimension as `queries (dim)` (the
/// heads' values of each dimension side by side), with the [`TILE`] keys of the transposed
/// tile `tile (dim * TILE)`: whole vectors of lanes multiplied and added, with no sums across
/// lanes. Written for the compiler to vectorize on any target; the dimensions go in pairs, each
/// into its own running sums, to overlap the additions' latency.
#[inline(always)]
fn tile_scores<E: Element, const G: usize>(queries: &[[f32; G]], tile: &[E]) -> [[f32; TILE]; G] {
    let (mut even, mut odd) = ([[0f32; TILE]; G], [[0f32; TILE]; G]);
    let mut pairs = queries.chunks_exact(2);
    let mut keys = tile.chunks_exact(2 * TILE);
    for (q, k) in (&mut pairs).zip(&mut keys) {
        let (k0, k1) = (E::widen(&k[..TILE]), E::widen(&k[TILE..]));
        for h in 0..G {
            for l in 0..TILE {
                even[h][l] = q[0][h].mul_add(k0[l], even[h][l]);
                odd[h][l] = q[1][h].mul_add(k1[l], odd[h][l]);
            }
        }
    }
    if let [q] = pairs.remainder() {
        let k = E::widen(keys.remainder());
        for h in 0..G {
            for l in 0..TILE {
                even[h][l] = q[h].mul_add(k[l], even[h][l]);
            }
        }
    }
    for h in 0..G {
        for l in 0..TILE {
            even[h][l] += odd[h][l];
        }
    }
    even
}

/// `acc (G * dim) += Σ_t weights[h][t] * value row t` for the `rows (n * dim)` of a block:
/// each row read once, in passes of up to four slabs of [`TILE`] values whose running sums for
/// the `G` heads stay in registers.
#[inline(always)]
fn weigh_values<E: Element, const G: usize>(
    weights: &[[f32; BLOCK]; G],
    rows: &[E],
    dim: usize,
    acc: &mut [f32],
) {
    let whole = dim / (4 * TILE) * (4 * TILE);
    for at in (0..whole).step_by(4 * TILE) {
        weigh_slabs::<E, G, 4>(weights, rows, dim, at..at + 4 * TILE, acc);
    }
    for at in (whole..dim).step_by(TILE) {
        weigh_slabs::<E, G, 1>(weights, rows, dim, at..dim.min(at + TILE), acc);
    }
}

/// [`weigh_values`] for the values `span` of every row, `S` slabs (the last may be partial).
#[inline(always)]
fn weigh_slabs<E: Element, const G: usize, const S: usize>(
    weights: &[[f32; BLOCK]; G],
    rows: &[E],
    dim: usize,
    span: Range<usize>,
    acc: &mut [f32],
) {
    let width = span.len();
    let mut sums = [[[0f32; TILE]; S]; G];
    for (t, row) in rows.chunks_exact(dim).enumerate() {
        let row = &row[span.clone()];
        let values: [[f32; TILE]; S] =
            std::array::from_fn(|s| slab_of::<E>(&row[s * TILE..], TILE.min(width - s * TILE)));
        for h in 0..G {
            let w = weights[h][t];
            for s in 0..S {
                for l in 0..TILE {
                    sums[h][s][l] = w.mul_add(values[s][l], sums[h][s][l]);
                }
            }
        }
    }
    for (h, sums) in sums.iter().enumerate() {
        let out = &mut acc[h * dim + span.start..h * dim + span.end];
        for (a, &x) in out.iter_mut().zip(sums.as_flattened()) {
            *a += x;
        }
    }
}

/// The `width` values at the start of `row` (a whole tile's or fewer) as f32.
#[inline(always)]
fn slab_of<E: Element>(row: &[E], width: usize) -> [f32; TILE] {
    if width == TILE {
        E::widen(row)
    } else {
        E::widen_part(&row[..width])
    }
}

/// The largest of `scores`: lane by lane over tiles, then halving, so that it vectorizes (a
/// fold of `f32::max`, which must skip NaNs one at a time, does not).
fn largest(scores: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; TILE];
    for tile in scores.chunks(TILE) {
        for (lane, &s) in lanes.iter_mut().zip(tile) {
            if s > *lane {
                *lane = s;
            }
        }
    }
    let mut width = TILE / 2;
    while width > 0 {
        for i in 0..width {
            if lanes[i + width] > lanes[i] {
                lanes[i] = lanes[i + width];
            }
        }
        width /= 2;
    }
    lanes[0]
}

/// Merges the partials of one group's chunks into its output rows `ys (group * dim)`.
fn merge(parts: &[Partial], ys: &mut [f32], dim: usize) {
    for (h, y) in ys.chunks_exact_mut(dim).enumerate() {
        let top = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[h]));
        let mut total = 0f32;
        for part in parts {
            let weight = (part.max[h] - top).exp();
            total += weight * part.sum[h];
            for (y, &a) in y.iter_mut().zip(&part.acc[h * dim..(h + 1) * dim]) {
                *y = weight.mul_add(a, *y);
            }
        }
        y.iter_mut().for_each(|y| *y /= total);
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
use avx2 as block;
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
use portable as block;

/// Block primitives in plain Rust.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
mod portable {
    /// Replaces each score `s` by `exp(s - max)`; returns their sum.
    pub(super) fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        scores.iter_mut().fold(0.0, |total, s| {
            *s = (*s - max).exp();
            total + *s
        })
    }
}

/// Block primitives with AVX2 and FMA; a head dimension that is not a multiple of 8 falls
/// back to the portable ones.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of eight lanes.
    ///
    /// # Safety
    /// AVX.
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        // SAFETY: the target has AVX.
        unsafe {
            let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// See [`portable::exp_sum`].
    pub(super) fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        let whole = scores.len() / 8 * 8;
        // SAFETY: the target has AVX2 and FMA; every load and store is one of the chunks.
        let mut total = unsafe {
            let shift = _mm256_set1_ps(max);
            let mut total = _mm256_setzero_ps();
            for eight in scores[..whole].chunks_exact_mut(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(eight.as_ptr()), shift));
                _mm256_storeu_ps(eight.as_mut_ptr(), e);
                total = _mm256_add_ps(total, e);
            }
            hsum(total)
        };
        for s in &mut scores[whole..] {
            *s = (*s - max).exp();
            total += *s;
        }
        total
    }

    /// `exp` of eight lanes, within about two units in the last place of `f32::exp` for inputs
    /// above -87 (the result is flushed to zero below, far under any weight that matters).
    ///
    /// Cephes' method: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree 6 polynomial for `e^r`,
    /// and `2^n` put in the exponent bits.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: the target has AVX2 and FMA.
        unsafe {
            let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
            let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let p = _mm256_fmadd_ps(
                p,
                _mm256_mul_ps(r, r),
                _mm256_add_ps(r, _mm256_set1_ps(1.0)),
            );
            let bits = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            let e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
            _mm256_andnot_ps(tiny, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::KvCache;
    use crate::cache::KvPrecision;

    /// [`attend_row`] of `q (1, heads, 1, dim)` over keys and values `k`, `v (1, kv_heads, len,
    /// dim)` held in a KV cache at `precision`, as a `(1, 1, heads * dim)` tensor.
    fn single_row(q: &Tensor, k: &Tensor, v: &Tensor, precision: KvPrecision) -> Result<Tensor> {
        let mut cache = KvCache::with_precision(1, precision);
        cache.append(0, k, v)?;
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; q.len()];
        attend_row(&q, cache.heads(0), &mut out)?;
        Ok(Tensor::from_vec(out, (1, 1, q.len()), &Device::Cpu)?)
    }

    /// `x` rounded to `precision` and back, as a cache at that precision holds it.
    fn rounded(x: &Tensor, precision: KvPrecision) -> Result<Tensor> {
        Ok(match precision {
            KvPrecision::F32 => x.clone(),
            KvPrecision::F16 => x.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
        })
    }

    /// The attention every other path computes: the KV heads repeated for their query heads,
    /// then a matrix product, a softmax and a matrix product.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (heads, dim) = (q.dim(1)?, q.dim(3)?);
        let group = heads / k.dim(1)?;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let (b, h, s, d) = x.dims4()?;
            Ok(x.unsqueeze(2)?
                .expand((b, h, group, s, d))?
                .reshape((b, h * group, s, d))?)
        };
        let scores = (q.matmul(&repeat(k)?.t()?)? / (dim as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs
            .matmul(&repeat(v)?)?
            .transpose(1, 2)?
            .reshape((1, 1, heads * dim))?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn row_attention_equals_the_repeated_kv_path() -> Result<()> {
        let dev = Device::Cpu;
        // Lengths below one tile, across tiles, blocks and chunks, with and without a ragged
        // end; head dimensions for the SIMD slabs (64, 72 = 64 + 8) and for the portable
        // fallback (14: not a multiple of 4 either).
        for (heads, kv_heads, dim, len) in [
            (6, 2, 32, 37),
            (9, 3, 64, 1),
            (9, 3, 64, 300),
            (9, 3, 64, 1000),
            (8, 8, 72, 259),
            (4, 2, 14, 70),
        ] {
            let q = Tensor::randn(0f32, 1.0, (1, heads, 1, dim), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev)?;
            for precision in KvPrecision::ALL {
                let expected = reference(&q, &rounded(&k, precision)?, &rounded(&v, precision)?)?;
                let diff = max_diff(&single_row(&q, &k, &v, precision)?, &expected)?;
                assert!(
                    diff < 1e-5,
                    "{precision}: heads {heads}/{kv_heads}, dim {dim}, len {len}: {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn large_scores_do_not_overflow() -> Result<()> {
        let dev = Device::Cpu;
        // Scores in the hundreds, rising along the positions so that the running maximum moves.
        let q = (Tensor::ones((1, 3, 1, 64), DType::F32, &dev)? * 4.0)?;
        let ramp = Tensor::arange(0f32, 600.0, &dev)?.reshape((1, 1, 600, 1))?;
        let k = (ramp.broadcast_as((1, 1, 600, 64))? * 0.01)?.contiguous()?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 600, 64), &dev)?;
        let ours = single_row(&q, &k, &v, KvPrecision::F32)?;
        let diff = max_diff(&ours, &reference(&q, &k, &v)?)?;
        // Scores near 200 carry rounding of about 1e-5 in either summation order, and their
        // exponentials pass it on relatively.
        assert!(diff < 5e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn tile_scores_are_the_dot_products_of_each_position() {
        for dim in [64, 13] {
            let queries: Vec<f32> = (0..3 * dim)
                .map(|i| ((i * 11 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let keys: Vec<Vec<f32>> = (0..TILE)
                .map(|p| {
                    (0..dim)
                        .map(|d| ((p * 7 + d * 3) % 17) as f32 / 8.0 - 1.0)
                        .collect()
                })
                .collect();
            let tile: Vec<f32> = (0..dim)
                .flat_map(|d| keys.iter().map(move |key| key[d]))
                .collect();
            let by_dimension: Vec<[f32; 3]> = (0..dim)
                .map(|d| std::array::from_fn(|h| queries[h * dim + d]))
                .collect();
            let ours = tile_scores::<f32, 3>(&by_dimension, &tile);
            for (h, query) in queries.chunks_exact(dim).enumerate() {
                for (p, key) in keys.iter().enumerate() {
                    let expected: f32 = query.iter().zip(key).map(|(q, k)| q * k).sum();
                    assert!(
                        (ours[h][p] - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                        "dim {dim}, head {h}, position {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn weighed_values_sum_every_row_of_the_block_in_place() {
        // A pass of four slabs, then a whole and a ragged one (dim 64 + 16 + 4) and fewer rows
        // than a block; every product and sum is exact in f32, so the order of the additions
        // does not matter.
        let (dim, n) = (84, 7);
        let rows: Vec<f32> = (0..n * dim).map(|i| (i % 9) as f32 - 4.0).collect();
        let mut weights = [[0f32; BLOCK]; 2];
        for (h, w) in weights.iter_mut().enumerate() {
            for (t, w) in w.iter_mut().take(n).enumerate() {
                *w = (t + h) as f32 / 8.0;
            }
        }
        let mut acc = vec![1.0f32; 2 * dim];
        weigh_values::<f32, 2>(&weights, &rows, dim, &mut acc);
        for h in 0..2 {
            for d in 0..dim {
                let expected = 1.0
                    + (0..n)
                        .map(|t| weights[h][t] * rows[t * dim + d])
                        .sum::<f32>();
                assert_eq!(acc[h * dim + d], expected, "head {h}, value {d}");
            }
        }
    }

    #[test]
    fn half_precision_widens_to_the_same_values() {
        let wide: Vec<f32> = (0..TILE + 5).map(|i| i as f32 * 0.375 - 3.0).collect();
        let narrow: Vec<f16> = wide.iter().map(|&x| f16::from_f32(x)).collect();
        assert_eq!(
            <f16 as Element>::widen(&narrow),
            <f32 as Element>::widen(&wide)
        );
        let part = <f16 as Element>::widen_part(&narrow[TILE..]);
        assert_eq!(part[..5], wide[TILE..]);
        assert_eq!(part[5..], [0.0; TILE - 5]);
    }

    #[test]
    fn the_simd_primitives_agree_with_the_portable_ones() {
        let values: Vec<f32> = (0..BLOCK * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let query: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 4.0)
            .collect();
        for n in [BLOCK, 13] {
            let keys = &values[..n * 64];
            let mut theirs: Vec<f32> = keys
                .chunks_exact(64)
                .map(|key| 0.125 * query.iter().zip(key).map(|(q, k)| q * k).sum::<f32>())
                .collect();
            let mut ours = theirs.clone();
            let top = theirs.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let ours_total = block::exp_sum(&mut ours, top);
            let theirs_total = portable::exp_sum(&mut theirs, top);
            assert!((ours_total - theirs_total).abs() <= 1e-6 * theirs_total);
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-6 * b.max(1e-30), "{a} {b}");
            }
        }
    }

    /// Times decode attention over the 30 layers of SmolLM2-135M (9 query heads, 3 KV heads,
    /// head dimension 64) at several context lengths, from f32 and from f16 caches, each layer
    /// with its own cache and a model's worth of weights read between the layers, as in a real
    /// decode step. A measurement, not a check:
    /// `cargo test --release -p lsplit-model --lib attention_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_speed() -> Result<()> {
        let dev = Device::Cpu;
        let (layers, heads, kv_heads, dim) = (30, 9, 3, 64);
        let q: Vec<f32> = Tensor::randn(0f32, 1.0, heads * dim, &dev)?.to_vec1()?;
        let mut out = vec![0f32; q.len()];
        // As many bytes as SmolLM2-135M's quantized weights.
        let weights: Vec<u64> = (0..84 << 17).collect();
        for len in [100, 1000, 4000] {
            for precision in KvPrecision::ALL {
                let mut cache = KvCache::with_precision(layers, precision);
                for layer in 0..layers {
                    let rows = || Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev);
                    cache.append(layer, &rows()?, &rows()?)?;
                }
                let steps = 50;
                let mut times = Vec::with_capacity(steps);
                for _ in 0..steps {
                    let mut time = 0.0;
                    for (layer, weights) in weights.chunks_exact(weights.len() / layers).enumerate()
                    {
                        // Between two layers' attention a decode step streams the layer's
                        // weights, which pushes the cache out of the CPU's caches.
                        let read = weights
                            .par_chunks(4096)
                            .map(|c| c.iter().fold(0, |a, &w| a ^ w));
                        std::hint::black_box(read.reduce(|| 0, |a, b| a ^ b));
                        let t = Instant::now();
                        attend_row(&q, cache.heads(layer), &mut out)?;
                        time += t.elapsed().as_secs_f64() * 1e3;
                    }
                    times.push(time);
                }
                times.sort_by(f64::total_cmp);
                println!(
                    "{len} positions, {precision}: {:.3} ms per token (best), {:.3} (median)",
                    times[0],
                    times[steps / 2]
                );
            }
        }
        Ok(())
    }
}
