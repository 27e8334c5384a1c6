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

use rayon::prelude::*;

use crate::cache::CachedHeads;
use crate::{ModelError, Result};

/// Positions of one KV head that one task attends to.
const CHUNK: usize = 256;

/// Positions scored, exponentiated and summed into the values at once.
const BLOCK: usize = 64;

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
        let (keys, values) = cached.rows(g, c * CHUNK..len.min((c + 1) * CHUNK));
        attend_chunk(
            &q[g * group * dim..(g + 1) * group * dim],
            keys,
            values,
            dim,
            scale,
        )
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

/// Attention of the group's query heads `queries (group * dim)` over the positions whose keys
/// and values are `keys`, `values (positions * dim)`.
fn attend_chunk(queries: &[f32], keys: &[f32], values: &[f32], dim: usize, scale: f32) -> Partial {
    let group = queries.len() / dim;
    let mut part = Partial {
        max: vec![f32::NEG_INFINITY; group],
        sum: vec![0.0; group],
        acc: vec![0.0; group * dim],
    };
    let mut scores = [0f32; BLOCK];
    for (keys, values) in keys.chunks(BLOCK * dim).zip(values.chunks(BLOCK * dim)) {
        let scores = &mut scores[..keys.len() / dim];
        for (h, query) in queries.chunks_exact(dim).enumerate() {
            let top = block::scores(query, keys, scale, scores);
            let acc = &mut part.acc[h * dim..(h + 1) * dim];
            if top > part.max[h] {
                let shrink = (part.max[h] - top).exp();
                part.sum[h] *= shrink;
                acc.iter_mut().for_each(|a| *a *= shrink);
                part.max[h] = top;
            }
            part.sum[h] += block::exp_sum(scores, part.max[h]);
            block::accumulate(acc, scores, values);
        }
    }
    part
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
    /// `out[t] = scale * (query · key t)` for the keys `keys (out.len() * dim)`; returns the
    /// largest.
    pub(super) fn scores(query: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) -> f32 {
        for (score, key) in out.iter_mut().zip(keys.chunks_exact(query.len())) {
            *score = scale * query.iter().zip(key).map(|(q, k)| q * k).sum::<f32>();
        }
        out.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s))
    }

    /// Replaces each score `s` by `exp(s - max)`; returns their sum.
    pub(super) fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        scores.iter_mut().fold(0.0, |total, s| {
            *s = (*s - max).exp();
            total + *s
        })
    }

    /// `acc += Σ_t weights[t] * value t` for the values `values (weights.len() * acc.len())`.
    pub(super) fn accumulate(acc: &mut [f32], weights: &[f32], values: &[f32]) {
        for (&w, value) in weights.iter().zip(values.chunks_exact(acc.len())) {
            for (a, &x) in acc.iter_mut().zip(value) {
                *a = w.mul_add(x, *a);
            }
        }
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

    use super::portable;

    /// See [`portable::scores`].
    pub(super) fn scores(query: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) -> f32 {
        let dim = query.len();
        assert_eq!(keys.len(), out.len() * dim);
        // SAFETY: the target has AVX2 and FMA; `keys` holds `out.len()` rows of `dim`
        // (checked above), which is a multiple of 8 in every call.
        unsafe {
            // The common head dimensions as constants, so that their loops unroll.
            match dim {
                64 => scores_of(query, keys, scale, out, 64),
                128 => scores_of(query, keys, scale, out, 128),
                _ if dim % 8 == 0 => scores_of(query, keys, scale, out, dim),
                _ => portable::scores(query, keys, scale, out),
            }
        }
    }

    /// [`scores`] for a head dimension `dim`.
    ///
    /// # Safety
    /// AVX2 and FMA; `dim` a multiple of 8, `query.len() == dim` and
    /// `keys.len() == out.len() * dim`.
    #[inline(always)]
    unsafe fn scores_of(
        query: &[f32],
        keys: &[f32],
        scale: f32,
        out: &mut [f32],
        dim: usize,
    ) -> f32 {
        let whole = out.len() / 8 * 8;
        // SAFETY: see the contract above; every row read is one of `keys`' rows.
        unsafe {
            let (q, k) = (query.as_ptr(), keys.as_ptr());
            let scale = _mm256_set1_ps(scale);
            let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
            for t in (0..whole).step_by(8) {
                let s = _mm256_mul_ps(scores8(q, k.add(t * dim), dim), scale);
                _mm256_storeu_ps(out.as_mut_ptr().add(t), s);
                top = _mm256_max_ps(top, s);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), top);
            let mut top = lanes.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            for (t, score) in out.iter_mut().enumerate().skip(whole) {
                let mut acc = _mm256_setzero_ps();
                for j in (0..dim).step_by(8) {
                    acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(q.add(j)),
                        _mm256_loadu_ps(k.add(t * dim + j)),
                        acc,
                    );
                }
                *score = _mm256_cvtss_f32(_mm256_mul_ps(_mm256_set1_ps(hsum(acc)), scale));
                top = top.max(*score);
            }
            top
        }
    }

    /// Dot products of `query (dim)` with the eight rows of `dim` floats at `keys`.
    ///
    /// # Safety
    /// AVX2 and FMA; `dim` a multiple of 8; `dim` floats at `query` and `8 * dim` at `keys`.
    #[inline(always)]
    unsafe fn scores8(query: *const f32, keys: *const f32, dim: usize) -> __m256 {
        // SAFETY: see the contract above.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for j in (0..dim).step_by(8) {
                let q = _mm256_loadu_ps(query.add(j));
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(q, _mm256_loadu_ps(keys.add(t * dim + j)), *a);
                }
            }
            // Sum each accumulator's lanes, the eight sums side by side in position order.
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h45 = _mm256_hadd_ps(acc[4], acc[5]);
            let h67 = _mm256_hadd_ps(acc[6], acc[7]);
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let low = _mm256_permute2f128_ps(h0123, h4567, 0x20);
            let high = _mm256_permute2f128_ps(h0123, h4567, 0x31);
            _mm256_add_ps(low, high)
        }
    }

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

    /// See [`portable::accumulate`].
    pub(super) fn accumulate(acc: &mut [f32], weights: &[f32], values: &[f32]) {
        let dim = acc.len();
        assert_eq!(values.len(), weights.len() * dim);
        // SAFETY: the target has AVX2 and FMA; `values` holds `weights.len()` rows of
        // `dim` (checked above), which is a multiple of 8 in every call.
        unsafe {
            match dim {
                64 => accumulate_of(acc, weights, values, 64),
                128 => accumulate_of(acc, weights, values, 128),
                _ if dim % 8 == 0 => accumulate_of(acc, weights, values, dim),
                _ => portable::accumulate(acc, weights, values),
            }
        }
    }

    /// [`accumulate`] for a head dimension `dim`, in slabs of up to 64 values held in
    /// registers.
    ///
    /// # Safety
    /// AVX2 and FMA; `dim` a multiple of 8, `acc.len() == dim` and
    /// `values.len() == weights.len() * dim`.
    #[inline(always)]
    unsafe fn accumulate_of(acc: &mut [f32], weights: &[f32], values: &[f32], dim: usize) {
        let mut j = 0;
        while j < dim {
            // SAFETY: see the contract above; the slabs stay inside `acc` and each value row.
            unsafe {
                if dim - j >= 64 {
                    slab::<8>(acc, weights, values, j, dim);
                    j += 64;
                } else {
                    slab::<1>(acc, weights, values, j, dim);
                    j += 8;
                }
            }
        }
    }

    /// `acc[j..j + 8N] += Σ_t weights[t] * values[t * dim + j..][..8N]`, with the slab held in
    /// `N` registers.
    ///
    /// # Safety
    /// AVX2 and FMA; `dim == acc.len()`, `j + 8N <= dim` and
    /// `values.len() == weights.len() * dim`.
    #[inline(always)]
    unsafe fn slab<const N: usize>(
        acc: &mut [f32],
        weights: &[f32],
        values: &[f32],
        j: usize,
        dim: usize,
    ) {
        // SAFETY: see the contract above.
        unsafe {
            let mut sums: [__m256; N] =
                std::array::from_fn(|i| _mm256_loadu_ps(acc.as_ptr().add(j + 8 * i)));
            for (t, &w) in weights.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                let row = values.as_ptr().add(t * dim + j);
                for (i, s) in sums.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * i)), *s);
                }
            }
            for (i, s) in sums.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(j + 8 * i), *s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use candle_core::{Device, Tensor};

    use super::*;

    /// [`attend_row`] of `q (1, heads, 1, dim)` over the first `len` positions of the cache
    /// buffers `k`, `v (1, kv_heads, room, dim)`, as a `(1, 1, heads * dim)` tensor.
    fn single_row(q: &Tensor, k: &Tensor, v: &Tensor, len: usize) -> Result<Tensor> {
        let (_, kv_heads, room, dim) = k.dims4()?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        let (q, ks, vs) = (flat(q)?, flat(k)?, flat(v)?);
        let cached = CachedHeads {
            k: &ks,
            v: &vs,
            kv_heads,
            dim,
            stride: room * dim,
            len,
        };
        let mut out = vec![0f32; q.len()];
        attend_row(&q, cached, &mut out)?;
        Ok(Tensor::from_vec(out, (1, 1, q.len()), &Device::Cpu)?)
    }

    /// The attention every other path computes: the KV heads repeated for their query heads,
    /// then a matrix product, a softmax and a matrix product.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, dim: usize) -> Result<Tensor> {
        let heads = q.dim(1)?;
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
        // Lengths below one block, across blocks and chunks, with and without a ragged end;
        // head dimensions for the SIMD slabs (64, 72 = 64 + 8) and for the portable fallback.
        for (heads, kv_heads, dim, len) in [
            (6, 2, 32, 37),
            (9, 3, 64, 1),
            (9, 3, 64, 300),
            (9, 3, 64, 1000),
            (8, 8, 72, 259),
            (4, 2, 12, 70),
        ] {
            let q = Tensor::randn(0f32, 1.0, (1, heads, 1, dim), &dev)?;
            // A cache buffer with room to spare, narrowed to the cached positions, as KvCache has.
            let room = len + 20;
            let k = Tensor::randn(0f32, 1.0, (1, kv_heads, room, dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_heads, room, dim), &dev)?;
            let diff = max_diff(
                &single_row(&q, &k, &v, len)?,
                &reference(&q, &k.narrow(2, 0, len)?, &v.narrow(2, 0, len)?, dim)?,
            )?;
            assert!(
                diff < 1e-5,
                "heads {heads}/{kv_heads}, dim {dim}, len {len}: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn large_scores_do_not_overflow() -> Result<()> {
        let dev = Device::Cpu;
        // Scores in the hundreds, rising along the positions so that the running maximum moves.
        let q = (Tensor::ones((1, 3, 1, 64), candle_core::DType::F32, &dev)? * 4.0)?;
        let ramp = Tensor::arange(0f32, 600.0, &dev)?.reshape((1, 1, 600, 1))?;
        let k = (ramp.broadcast_as((1, 1, 600, 64))? * 0.01)?.contiguous()?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 600, 64), &dev)?;
        let ours = single_row(&q, &k, &v, 600)?;
        let diff = max_diff(&ours, &reference(&q, &k, &v, 64)?)?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
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
            let (mut ours, mut theirs) = (vec![0f32; n], vec![0f32; n]);
            block::scores(&query, keys, 0.125, &mut ours);
            portable::scores(&query, keys, 0.125, &mut theirs);
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} {b}");
            }
            let top = theirs.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let ours_total = block::exp_sum(&mut ours, top);
            let theirs_total = portable::exp_sum(&mut theirs, top);
            assert!((ours_total - theirs_total).abs() <= 1e-6 * theirs_total);
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-6 * b.max(1e-30), "{a} {b}");
            }
            let (mut ours_acc, mut theirs_acc) = (vec![0.5f32; 64], vec![0.5f32; 64]);
            block::accumulate(&mut ours_acc, &theirs, keys);
            portable::accumulate(&mut theirs_acc, &theirs, keys);
            assert_eq!(ours_acc, theirs_acc);
        }
    }

    /// Times decode attention over the 30 layers of SmolLM2-135M (9 query heads, 3 KV heads,
    /// head dimension 64) at long contexts, each layer with its own cache as in a real decode
    /// step (so that they do not all sit in the CPU's caches). A measurement, not a check:
    /// `cargo test --release -p lsplit-model --lib attention_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_speed() -> Result<()> {
        let dev = Device::Cpu;
        let (layers, heads, kv_heads, dim) = (30, 9, 3, 64);
        let q = Tensor::randn(0f32, 1.0, (1, heads, 1, dim), &dev)?;
        for len in [1000, 4000] {
            let room = len + 100;
            let buffer = || -> Result<Vec<f32>> {
                Ok(Tensor::randn(0f32, 1.0, kv_heads * room * dim, &dev)?.to_vec1()?)
            };
            let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
                .map(|_| Ok((buffer()?, buffer()?)))
                .collect::<Result<_>>()?;
            let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; q.len()];
            let steps = 50;
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let t = Instant::now();
                for (k, v) in &caches {
                    let cached = CachedHeads {
                        k,
                        v,
                        kv_heads,
                        dim,
                        stride: room * dim,
                        len,
                    };
                    attend_row(&q, cached, &mut out)?;
                }
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{len} positions: {:.3} ms per token (best), {:.3} (median)",
                times[0],
                times[steps / 2]
            );
        }
        Ok(())
    }
}
