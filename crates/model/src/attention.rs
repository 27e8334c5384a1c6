//! Decode attention: one query row against a session's cached keys and values, read where they
//! lie in the KV cache.
//!
//! Flash-decoding: each KV head's cached positions are cut into chunks, the cache's pages of
//! [`PAGE`] positions; each chunk is one pass over its keys and values with an online softmax (running maximum, sum
//! and weighted value sum per query head), in blocks of [`BLOCK`] positions whose keys and values
//! stay in L1 between the scores and the value sums. The chunks' partial results are merged at
//! the end. Chunks are independent, so a long context spreads over threads evenly even when
//! there are fewer KV heads than threads (or a number that does not divide among them). The
//! chunking depends only on the number of positions, so the result is the same on every thread
//! count and whether or not the chunks run in parallel.
//!
//! The kernels are plain Rust over arrays of [`TILE`] lanes, written so that the compiler keeps
//! the running sums in vector registers: a key tile (16 positions' keys, transposed) gives up to
//! [`HEADS_AT_ONCE`] query heads their 16 scores with no sums across lanes, and each value row
//! is read once for all of them. Cached f16 and 8-bit values are widened to f32 as they are
//! read. Only `exp` has a hand-written AVX2 version beside the portable one; they agree to
//! within float rounding. The whole pass is compiled twice more, with AVX2, FMA and F16C and
//! with AVX-512 too, and the CPU's [`KernelPath`] picks one at run time.
//!
//! The CPU's own prefetchers load the keys and values: prefetching the next block's by hand, a
//! line or two at a time, measured 1.2-3.9x slower on a 2-core Xeon (BENCHMARKS.md, issue 23's
//! fifth part), from 100 positions to 4000, in every cache precision.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::cache::{CachedHeads, PAGE, Q8_GROUP, TILE, Values};
use crate::{KernelPath, ModelError, Result};

/// Positions scored, exponentiated and summed into the values at once: whole tiles.
const BLOCK: usize = 2 * TILE;

/// Multiply-adds of a single-row attention from which its chunks run on several threads.
const PARALLEL_ATTENTION: usize = 1 << 16;

/// Attention of one query row `q (heads * dim)` against every position of `cached`, read in
/// place: no copy of the cache per token (which repeating the KV heads would make), so a decode
/// step costs only the reads and the arithmetic. Writes the `heads * dim` outputs into `out`.
pub(crate) fn attend_row(q: &[f32], cached: CachedHeads<'_>, out: &mut [f32]) -> Result<()> {
    attend_row_on(KernelPath::active(), q, cached, out)
}

/// [`attend_row`] on `path`.
fn attend_row_on(
    path: KernelPath,
    q: &[f32],
    cached: CachedHeads<'_>,
    out: &mut [f32],
) -> Result<()> {
    let CachedHeads {
        kv_heads, dim, len, ..
    } = cached;
    if len == 0 || dim == 0 || !q.len().is_multiple_of(kv_heads * dim) || out.len() != q.len() {
        return Err(ModelError::Config(format!(
            "attention of {} query values over {len} cached positions of {kv_heads} heads of {dim}",
            q.len()
        )));
    }
    let heads = q.len() / dim;
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let chunks = len.div_ceil(PAGE);
    let attend = |task: usize| {
        // Page by page, a page's heads one after another: the keys and values a task loads
        // past its last block (full pages) are the first of the next head's, which is the next
        // task on the same thread when the tasks run in order.
        let (c, g) = (task / kv_heads, task % kv_heads);
        let queries = &q[g * group * dim..(g + 1) * group * dim];
        let positions = 0..(len - c * PAGE).min(PAGE);
        let (keys, values) = cached.page(c);
        let place = Place {
            cached: &cached,
            g,
            positions,
            scale,
        };
        match (keys, values) {
            (Values::F32(keys), Values::F32(values)) => {
                attend_chunk(path, queries, Task::plain(keys, values, place))
            }
            (Values::F16(keys), Values::F16(values)) => {
                attend_chunk(path, queries, Task::plain(keys, values, place))
            }
            (
                Values::Q8 {
                    quants: keys,
                    scales: key_scales,
                },
                Values::Q8 {
                    quants: values,
                    scales: value_scales,
                },
            ) => attend_chunk(
                path,
                queries,
                Task {
                    keys,
                    values,
                    key_scales,
                    value_scales,
                    place,
                },
            ),
            _ => unreachable!("a layer's keys and values share their precision"),
        }
    };
    let partials: Vec<Partial> = if heads * len * dim < PARALLEL_ATTENTION {
        (0..kv_heads * chunks).map(attend).collect()
    } else {
        (0..kv_heads * chunks).into_par_iter().map(attend).collect()
    };
    for (g, ys) in out.chunks_exact_mut(group * dim).enumerate() {
        merge(path, partials.iter().skip(g).step_by(kv_heads), ys, dim);
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
/// in the vector clone, `V`), 8-bit integers as their values (their scales apply afterwards).
trait Element: Copy + Send + Sync {
    /// Whether the values come with 8-bit scales.
    const SCALED: bool = false;

    /// The first [`TILE`] values of `from` as f32; `V`: inside the vector clone (F16C).
    fn widen<const V: bool>(from: &[Self]) -> [f32; TILE];

    /// The values of `from` (fewer than [`TILE`]) as f32, zeros after them.
    fn widen_part<const V: bool>(from: &[Self]) -> [f32; TILE] {
        let mut whole = [from[0]; TILE];
        whole[..from.len()].copy_from_slice(from);
        let mut out = Self::widen::<V>(&whole);
        out[from.len()..].fill(0.0);
        out
    }
}

impl Element for f32 {
    #[inline(always)]
    fn widen<const V: bool>(from: &[f32]) -> [f32; TILE] {
        let mut out = [0f32; TILE];
        out.copy_from_slice(&from[..TILE]);
        out
    }
}

impl Element for f16 {
    #[inline(always)]
    fn widen<const V: bool>(from: &[f16]) -> [f32; TILE] {
        let from = &from[..TILE];
        #[cfg(target_arch = "x86_64")]
        if V {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
            let mut out = [0f32; TILE];
            // SAFETY: the vector clone runs only where the CPU has F16C; `from` holds 16
            // halves, read as two groups of eight, and `out` has room for 16 floats.
            unsafe {
                for i in 0..2 {
                    let half = _mm_loadu_si128(from.as_ptr().add(8 * i).cast::<__m128i>());
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_cvtph_ps(half));
                }
            }
            return out;
        }
        let mut out = [0f32; TILE];
        for (out, x) in out.iter_mut().zip(from) {
            *out = x.to_f32();
        }
        out
    }
}

impl Element for i8 {
    const SCALED: bool = true;

    #[inline(always)]
    fn widen<const V: bool>(from: &[i8]) -> [f32; TILE] {
        let mut out = [0f32; TILE];
        for (out, &x) in out.iter_mut().zip(&from[..TILE]) {
            *out = f32::from(x);
        }
        out
    }
}

/// Where one task attends: the layer's cached heads, the KV head `g`, its positions within one
/// page and the scores' scale.
struct Place<'a> {
    cached: &'a CachedHeads<'a>,
    g: usize,
    positions: Range<usize>,
    scale: f32,
}

/// One task's keys and values: the page's buffers and their 8-bit scales (empty at other
/// precisions).
struct Task<'a, E> {
    keys: &'a [E],
    values: &'a [E],
    key_scales: &'a [f32],
    value_scales: &'a [f32],
    place: Place<'a>,
}

impl<'a, E> Task<'a, E> {
    /// A task over buffers without scales.
    fn plain(keys: &'a [E], values: &'a [E], place: Place<'a>) -> Self {
        Self {
            keys,
            values,
            key_scales: &[],
            value_scales: &[],
            place,
        }
    }
}

/// The 8-bit scales of the values at `range` of a buffer whose scales are `scales` (none at
/// other precisions).
fn scales_of(scales: &[f32], range: Range<usize>) -> &[f32] {
    if scales.is_empty() {
        scales
    } else {
        &scales[range.start / Q8_GROUP..range.end / Q8_GROUP]
    }
}

/// Query heads one pass over a block's keys and values serves: each key and value is read (and
/// widened) once for all of them, and their running sums fit the vector registers.
const HEADS_AT_ONCE: usize = 4;

/// Attention of the group's query heads `queries (group * dim)` over the task's positions, by
/// the clone of `path`.
fn attend_chunk<E: Element>(path: KernelPath, queries: &[f32], task: Task<'_, E>) -> Partial {
    match path {
        // SAFETY: a path runs only where the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni | KernelPath::Amx => unsafe { attend_chunk_avx512(queries, task) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { attend_chunk_avx2(queries, task) },
        _ => attend_chunk_on::<E, false>(queries, task),
    }
}

/// [`attend_chunk_on`] compiled with AVX2, FMA and F16C.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_chunk_avx2<E: Element>(queries: &[f32], task: Task<'_, E>) -> Partial {
    attend_chunk_on::<E, true>(queries, task)
}

/// [`attend_chunk_on`] compiled with AVX-512 as well (the same operations, so the same bits).
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn attend_chunk_avx512<E: Element>(queries: &[f32], task: Task<'_, E>) -> Partial {
    attend_chunk_on::<E, true>(queries, task)
}

/// The pass itself, inlined into each clone; `V`: the clone has AVX2, FMA and F16C.
#[inline(always)]
fn attend_chunk_on<E: Element, const V: bool>(queries: &[f32], task: Task<'_, E>) -> Partial {
    let dim = task.place.cached.dim;
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
        match heads.len() {
            1 => run.attend::<E, 1, V>(&task),
            2 => run.attend::<E, 2, V>(&task),
            3 => run.attend::<E, 3, V>(&task),
            _ => run.attend::<E, HEADS_AT_ONCE, V>(&task),
        }
        first = heads.end;
    }
    part
}

/// Some query heads of a group and their online softmax state.
struct Heads<'a> {
    queries: &'a [f32],
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

impl Heads<'_> {
    /// Folds the task's positions into `G` heads' running maximum, sum and weighted values, a
    /// block at a time.
    #[inline(always)]
    fn attend<E: Element, const G: usize, const V: bool>(self, task: &Task<'_, E>) {
        let Place {
            cached,
            g,
            ref positions,
            scale,
        } = task.place;
        let dim = cached.dim;
        let by_dimension: Vec<[f32; G]> = (0..dim)
            .map(|d| std::array::from_fn(|h| self.queries[h * dim + d]))
            .collect();
        let mut scores = [[0f32; BLOCK]; G];
        for from in positions.clone().step_by(BLOCK) {
            let block = from..positions.end.min(from + BLOCK);
            let n = block.len();
            let (tiles, rows) = (
                cached.key_tiles(g, block.clone()),
                cached.value_rows(g, block),
            );
            let tile_scales = scales_of(task.key_scales, tiles.clone());
            let row_scales = scales_of(task.value_scales, rows.clone());
            for (t, tile) in task.keys[tiles].chunks_exact(TILE * dim).enumerate() {
                let sums = if !E::SCALED {
                    tile_scores::<E, G, V>(&by_dimension, tile)
                } else {
                    let scales = &tile_scales[t * TILE * dim / Q8_GROUP..][..TILE * dim / Q8_GROUP];
                    scaled_tile_scores::<E, G, V>(&by_dimension, tile, scales)
                };
                for (score, sum) in scores.iter_mut().zip(sums) {
                    for (s, &x) in score[t * TILE..(t + 1) * TILE].iter_mut().zip(&sum) {
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
                self.sum[h] += exp_sum::<V>(score, self.max[h]);
            }
            let rows = (&task.values[rows], row_scales);
            weigh_values::<E, G, V>(&scores, rows, dim, self.acc);
        }
    }
}

/// The dot products of `G` queries, given dimension by dimension as `queries (dim)` (the
/// heads' values of each dimension side by side), with the [`TILE`] keys of the transposed
/// tile `tile (dim * TILE)`: whole vectors of lanes multiplied and added, with no sums across
/// lanes. Written for the compiler to vectorize on any target; the dimensions go in pairs, each
/// into its own running sums, to overlap the additions' latency.
#[inline(always)]
fn tile_scores<E: Element, const G: usize, const V: bool>(
    queries: &[[f32; G]],
    tile: &[E],
) -> [[f32; TILE]; G] {
    let (mut even, mut odd) = ([[0f32; TILE]; G], [[0f32; TILE]; G]);
    let mut pairs = queries.chunks_exact(2);
    let mut keys = tile.chunks_exact(2 * TILE);
    for (q, k) in (&mut pairs).zip(&mut keys) {
        let (k0, k1) = (E::widen::<V>(&k[..TILE]), E::widen::<V>(&k[TILE..]));
        for h in 0..G {
            for l in 0..TILE {
                even[h][l] = q[0][h].mul_add(k0[l], even[h][l]);
                odd[h][l] = q[1][h].mul_add(k1[l], odd[h][l]);
            }
        }
    }
    if let [q] = pairs.remainder() {
        let k = E::widen::<V>(keys.remainder());
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

/// [`tile_scores`] of an 8-bit tile, whose dimensions `[32 b, 32 b + 32)` of lane `l` have
/// the scale `scales[16 b + l]`.
#[inline(always)]
fn scaled_tile_scores<E: Element, const G: usize, const V: bool>(
    queries: &[[f32; G]],
    tile: &[E],
    scales: &[f32],
) -> [[f32; TILE]; G] {
    let mut total = [[0f32; TILE]; G];
    let groups = queries
        .chunks_exact(Q8_GROUP)
        .zip(tile.chunks_exact(Q8_GROUP * TILE))
        .zip(scales.chunks_exact(TILE));
    for ((queries, keys), scales) in groups {
        let sums = tile_scores::<E, G, V>(queries, keys);
        for h in 0..G {
            for l in 0..TILE {
                total[h][l] = sums[h][l].mul_add(scales[l], total[h][l]);
            }
        }
    }
    total
}

/// `acc (G * dim) += Σ_t weights[h][t] * value row t` for the `rows (n * dim)` of a block:
/// each row read once, in passes of up to four slabs of [`TILE`] values whose running sums for
/// the `G` heads stay in registers.
#[inline(always)]
fn weigh_values<E: Element, const G: usize, const V: bool>(
    weights: &[[f32; BLOCK]; G],
    rows: (&[E], &[f32]),
    dim: usize,
    acc: &mut [f32],
) {
    let whole = dim / (4 * TILE) * (4 * TILE);
    for at in (0..whole).step_by(4 * TILE) {
        let span = at..at + 4 * TILE;
        weigh_slabs::<E, G, 4, V>(weights, rows, (dim, span), acc);
    }
    for at in (whole..dim).step_by(TILE) {
        let span = at..dim.min(at + TILE);
        weigh_slabs::<E, G, 1, V>(weights, rows, (dim, span), acc);
    }
}

/// [`weigh_values`] for the values `span` of every row, `S` slabs (the last may be partial);
/// 8-bit rows come with their scales, which multiply the weights.
#[inline(always)]
fn weigh_slabs<E: Element, const G: usize, const S: usize, const V: bool>(
    weights: &[[f32; BLOCK]; G],
    (rows, scales): (&[E], &[f32]),
    (dim, span): (usize, Range<usize>),
    acc: &mut [f32],
) {
    let width = span.len();
    let mut sums = [[[0f32; TILE]; S]; G];
    for (t, row) in rows.chunks_exact(dim).enumerate() {
        let row = &row[span.clone()];
        // Plain loops rather than `array::from_fn`, whose closures the compiler may leave as
        // calls in this hot loop.
        let mut values = [[0f32; TILE]; S];
        let mut scale = [1f32; S];
        for s in 0..S {
            values[s] = slab_of::<E, V>(&row[s * TILE..], TILE.min(width - s * TILE));
            if E::SCALED {
                scale[s] = scales[(t * dim + span.start + s * TILE) / Q8_GROUP];
            }
        }
        for h in 0..G {
            for s in 0..S {
                let w = if E::SCALED {
                    weights[h][t] * scale[s]
                } else {
                    weights[h][t]
                };
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
fn slab_of<E: Element, const V: bool>(row: &[E], width: usize) -> [f32; TILE] {
    if width == TILE {
        E::widen::<V>(row)
    } else {
        E::widen_part::<V>(&row[..width])
    }
}

/// The largest of `scores`: lane by lane over tiles, then across the lanes in halves, so that
/// it vectorizes (a fold of `f32::max`, which must skip NaNs one at a time, does not).
#[inline(always)]
fn largest(scores: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; TILE];
    for tile in scores.chunks(TILE) {
        for (lane, &s) in lanes.iter_mut().zip(tile) {
            *lane = if s > *lane { s } else { *lane };
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

/// Merges the partials of one group's chunks into its output rows `ys (group * dim)`, with
/// FMA instructions on the SIMD paths (`mul_add` is a library call without).
fn merge<'a>(
    path: KernelPath,
    parts: impl Iterator<Item = &'a Partial> + Clone,
    ys: &mut [f32],
    dim: usize,
) {
    match path {
        // SAFETY: the SIMD paths run only where the CPU has FMA.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512Vnni | KernelPath::Amx => unsafe {
            merge_fma(parts, ys, dim)
        },
        _ => merge_on(parts, ys, dim),
    }
}

/// [`merge_on`] compiled with FMA.
///
/// # Safety
/// The CPU has FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn merge_fma<'a>(
    parts: impl Iterator<Item = &'a Partial> + Clone,
    ys: &mut [f32],
    dim: usize,
) {
    merge_on(parts, ys, dim)
}

/// See [`merge`].
#[inline(always)]
fn merge_on<'a>(parts: impl Iterator<Item = &'a Partial> + Clone, ys: &mut [f32], dim: usize) {
    for (h, y) in ys.chunks_exact_mut(dim).enumerate() {
        let top = parts
            .clone()
            .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[h]));
        let mut total = 0f32;
        for part in parts.clone() {
            let weight = (part.max[h] - top).exp();
            total += weight * part.sum[h];
            for (y, &a) in y.iter_mut().zip(&part.acc[h * dim..(h + 1) * dim]) {
                *y = weight.mul_add(a, *y);
            }
        }
        y.iter_mut().for_each(|y| *y /= total);
    }
}

/// Replaces each score `s` by `exp(s - max)`; returns their sum. `V`: inside the vector
/// clone, with the AVX2 version.
#[inline(always)]
fn exp_sum<const V: bool>(scores: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if V {
        // SAFETY: the vector clone runs only where the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_sum(scores, max) };
    }
    portable::exp_sum(scores, max)
}

/// Block primitives in plain Rust.
mod portable {
    /// Replaces each score `s` by `exp(s - max)`; returns their sum.
    pub(super) fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        scores.iter_mut().fold(0.0, |total, s| {
            *s = (*s - max).exp();
            total + *s
        })
    }
}

/// Block primitives with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// See [`super::portable::exp_sum`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        let whole = scores.len() / 8 * 8;
        // SAFETY: every load and store is one of the chunks.
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
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
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
        single_row_on(KernelPath::active(), q, k, v, precision)
    }

    /// [`single_row`] on `path`.
    fn single_row_on(
        path: KernelPath,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        precision: KvPrecision,
    ) -> Result<Tensor> {
        let mut cache = KvCache::with_precision(1, precision);
        cache.append(0, k, v)?;
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; q.len()];
        attend_row_on(path, &q, cache.heads(0), &mut out)?;
        Ok(Tensor::from_vec(out, (1, 1, q.len()), &Device::Cpu)?)
    }

    /// `x (1, kv_heads, len, dim)` rounded to `precision` and back, as a cache at that
    /// precision holds it: 8 bits round each position's groups of 32 values to multiples of
    /// their largest magnitude / 127.
    fn rounded(x: &Tensor, precision: KvPrecision) -> Result<Tensor> {
        Ok(match precision {
            KvPrecision::F32 => x.clone(),
            KvPrecision::F16 => x.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
            KvPrecision::Q8 => {
                let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
                for group in values.chunks_mut(Q8_GROUP) {
                    let scale = group.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    let inverse = 1.0 / scale;
                    for v in group.iter_mut() {
                        *v = (*v * inverse).round() * scale;
                    }
                }
                Tensor::from_vec(values, x.dims(), x.device())?
            }
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
        // end; head dimensions of one pass over a value row (64), two (128), a pass and a
        // partial slab (72), partial slabs only (32, 14), and an odd count of dimension pairs
        // (14); groups of 1 to 8 query heads per KV head (8: two passes of four).
        for (heads, kv_heads, dim, len) in [
            (6, 2, 32, 37),
            (9, 3, 64, 1),
            (9, 3, 64, 300),
            (9, 3, 64, 1000),
            (8, 8, 72, 259),
            (16, 2, 128, 100),
            (4, 2, 14, 70),
        ] {
            let q = Tensor::randn(0f32, 1.0, (1, heads, 1, dim), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev)?;
            for precision in KvPrecision::ALL {
                if precision == KvPrecision::Q8 && dim % Q8_GROUP != 0 {
                    continue;
                }
                let expected = reference(&q, &rounded(&k, precision)?, &rounded(&v, precision)?)?;
                let diff = max_diff(&single_row(&q, &k, &v, precision)?, &expected)?;
                assert!(
                    diff < 1e-5,
                    "{precision}: heads {heads}/{kv_heads}, dim {dim}, len {len}: {diff}"
                );
                // Every path the CPU runs: as close to the reference, and the two SIMD clones
                // (the same operations) bit for bit equal.
                let mut simd: Option<Vec<u32>> = None;
                for path in KernelPath::all_supported() {
                    let ours = single_row_on(path, &q, &k, &v, precision)?;
                    let diff = max_diff(&ours, &expected)?;
                    assert!(diff < 1e-5, "{path} {precision}: {diff}");
                    if path != KernelPath::Portable {
                        let bits = ours.flatten_all()?.to_vec1::<f32>()?;
                        let bits: Vec<u32> = bits.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(simd.get_or_insert_with(|| bits.clone()), &bits, "{path}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn an_8_bit_cache_refuses_a_head_dimension_off_its_groups() -> Result<()> {
        let mut cache = KvCache::with_precision(1, KvPrecision::Q8);
        let rows = Tensor::zeros((1, 2, 3, 72), DType::F32, &Device::Cpu)?;
        let err = cache
            .append(0, &rows, &rows)
            .expect_err("72 is not a multiple of 32");
        assert_eq!(
            err.to_string(),
            "model configuration: an 8-bit KV cache needs a head dimension that is a multiple \
             of 32, not 72: use --kv-cache f16 or f32"
        );
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
        // Scores near 200 carry rounding of a few 1e-5 in either summation order, and their
        // exponentials pass it on relatively (measured up to 5e-5 over random values); an
        // overflow or a wrong running maximum would be off by whole units.
        assert!(diff < 2e-4, "{diff}");
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
            let ours = tile_scores::<f32, 3, false>(&by_dimension, &tile);
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
        weigh_values::<f32, 2, false>(&weights, (&rows, &[]), dim, &mut acc);
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
            <f16 as Element>::widen::<false>(&narrow),
            <f32 as Element>::widen::<false>(&wide)
        );
        if KernelPath::Avx2.supported() {
            assert_eq!(
                <f16 as Element>::widen::<true>(&narrow),
                <f16 as Element>::widen::<false>(&narrow)
            );
        }
        let part = <f16 as Element>::widen_part::<false>(&narrow[TILE..]);
        assert_eq!(part[..5], wide[TILE..]);
        assert_eq!(part[5..], [0.0; TILE - 5]);
    }

    #[cfg(target_arch = "x86_64")]
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
            if !KernelPath::Avx2.supported() {
                eprintln!("this CPU lacks AVX2: only the portable exp runs here");
                return;
            }
            // SAFETY: the CPU has AVX2 and FMA.
            let ours_total = unsafe { avx2::exp_sum(&mut ours, top) };
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
                // On the pool, as a forward pass runs (`on_pool`): a call from outside would
                // also time handing the work to the pool's threads and back.
                crate::on_pool(|| -> Result<()> {
                    for _ in 0..steps {
                        let mut time = 0.0;
                        let per_layer = weights.len() / layers;
                        for (layer, weights) in weights.chunks_exact(per_layer).enumerate() {
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
                    Ok(())
                })?;
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
