//! Dot products of one quantized weight row with up to four quantized activation rows.
//!
//! The weight block is unpacked once and reused for every activation row, which is what makes
//! a batch of rows cheaper than the same rows one by one. Each row keeps its own accumulators
//! and sees exactly the same operations in the same order whatever the number of rows, so a
//! row's result never depends on which other rows share the call.
//!
//! The arithmetic is candle's, operation for operation: Q4_0 and Q8_0 accumulate in eight float
//! lanes summed in the order of candle's AVX2 kernels, Q4_1 sums each block exactly in integers
//! and accumulates sequentially as candle's generic kernel does. So the model's outputs equal
//! candle-transformers' bit for bit; that matters because every product re-quantizes its input
//! to 8 bits, which turns any rounding difference into a visible one a few layers later.
//!
//! Two implementations compute bit-identical results: an AVX2 one (with VNNI's `vpdpbusd` when
//! the target has it) and a portable one.

use half::f16;

/// Values per quantization block, for weights and activations alike.
pub(crate) const BLOCK: usize = 32;

/// 32 activations quantized to 8 bits: value ≈ `d * q`. `s` is `d * Σq` rounded through f16
/// as candle's Q8_1 does; only the Q4_1 kernel needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActBlock {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) q: [i8; BLOCK],
}

impl ActBlock {
    /// Quantizes 32 values the way candle's (and ggml's) reference Q8_0/Q8_1 code does.
    pub(crate) fn quantize(xs: &[f32]) -> Self {
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; BLOCK];
        let mut sum = 0i32;
        for (q, &x) in q.iter_mut().zip(xs) {
            *q = (x * id).round() as i8;
            sum += i32::from(*q);
        }
        let d16 = f16::from_f32(d);
        Self {
            d: d16.to_f32(),
            s: (f16::from_f32(sum as f32) * d16).to_f32(),
            q,
        }
    }
}

/// The GGUF block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// f16 scale, 32 unsigned nibbles biased by 8.
    Q4_0,
    /// f16 scale and minimum, 32 unsigned nibbles.
    Q4_1,
    /// f16 scale, 32 signed bytes.
    Q8_0,
}

impl Format {
    /// Bytes of one block of 32 weights.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Dots weight row `w` (`blocks` blocks of `format`) with each of the `R` activation rows.
pub(crate) fn dot_rows<const R: usize>(
    format: Format,
    w: &[u8],
    acts: [&[ActBlock]; R],
    out: &mut [f32; R],
) {
    let blocks = w.len() / format.block_bytes();
    assert!(acts.iter().all(|a| a.len() == blocks));
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: the target has AVX2 and FMA, and every load stays inside `w` and `acts`,
        // whose lengths were checked above.
        unsafe { avx2::dot_rows(format, w, blocks, acts, out) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    portable::dot_rows(format, w, blocks, acts, out)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The weight block's 32 integer values in order, and what the kernel needs besides them:
/// the scale, and for Q4_1 the minimum. Q4_0 and Q8_0 values are signed.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn unpack(format: Format, block: &[u8]) -> ([i32; BLOCK], f32, f32) {
    let mut v = [0i32; BLOCK];
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let (qs, bias) = match format {
                Format::Q4_0 => (&block[2..18], 8),
                _ => (&block[4..20], 0),
            };
            for (j, &b) in qs.iter().enumerate() {
                v[j] = i32::from(b & 0x0f) - bias;
                v[j + 16] = i32::from(b >> 4) - bias;
            }
        }
        Format::Q8_0 => {
            for (v, &b) in v.iter_mut().zip(&block[2..34]) {
                *v = i32::from(b as i8);
            }
        }
    }
    let min = if format == Format::Q4_1 {
        f16_at(block, 2)
    } else {
        0.0
    };
    (v, f16_at(block, 0), min)
}

/// Sum of eight lanes in the order of the AVX2 kernel's horizontal sum.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn hsum8(x: [f32; 8]) -> f32 {
    let a = [x[4] + x[0], x[5] + x[1], x[6] + x[2], x[7] + x[3]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// Portable kernels: for Q4_0 and Q8_0 eight float lanes, lane `u` holding the products of
/// values `4u..4u+4`; for Q4_1 one exact integer sum per block.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
pub(crate) mod portable {
    use super::{ActBlock, BLOCK, Format, hsum8, unpack};

    /// See [`super::dot_rows`].
    pub(crate) fn dot_rows<const R: usize>(
        format: Format,
        w: &[u8],
        blocks: usize,
        acts: [&[ActBlock]; R],
        out: &mut [f32; R],
    ) {
        let mut acc = [[0f32; 8]; R];
        let mut sums = [0f32; R];
        for b in 0..blocks {
            let bytes = format.block_bytes();
            let (v, d, min) = unpack(format, &w[b * bytes..(b + 1) * bytes]);
            for r in 0..R {
                let a = &acts[r][b];
                let dot = |t: std::ops::Range<usize>| -> i32 {
                    t.map(|t| v[t] * i32::from(a.q[t])).sum()
                };
                if format == Format::Q4_1 {
                    sums[r] += dot(0..BLOCK) as f32 * d * a.d + min * a.s;
                } else {
                    let scale = d * a.d;
                    for (u, lane) in acc[r].iter_mut().enumerate() {
                        *lane = scale.mul_add(dot(4 * u..4 * u + 4) as f32, *lane);
                    }
                }
            }
        }
        for r in 0..R {
            out[r] = if format == Format::Q4_1 {
                sums[r]
            } else {
                hsum8(acc[r])
            };
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, Format, f16_at};

    /// Unsigned bytes times signed bytes, summed in groups of four into eight i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8(w: __m256i, y: __m256i) -> __m256i {
        #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
        // SAFETY: the target has AVX512-VNNI and AVX512-VL.
        // Stable since Rust 1.89: building for a VNNI target needs that toolchain; the
        // workspace's older MSRV holds for every other target.
        #[allow(clippy::incompatible_msrv)]
        unsafe {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, y)
        }
        #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
        // SAFETY: the target has AVX2.
        unsafe {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1))
        }
    }

    /// Exact sum of eight i32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(x: __m256i) -> i32 {
        // SAFETY: the target has AVX2.
        unsafe {
            let s = _mm_add_epi32(_mm256_extracti128_si256(x, 1), _mm256_castsi256_si128(x));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// Sum of eight float lanes in the order of candle's `hsum_float_8`.
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        // SAFETY: the target has AVX.
        unsafe {
            let hi = _mm256_extractf128_ps(x, 1);
            let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Sixteen packed bytes at `p` to 32 nibbles: low nibbles first, then high ones.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller passes 16 readable bytes; the target has AVX2.
        unsafe {
            let qs = _mm_loadu_si128(p as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
        }
    }

    /// 32 bytes at `p`.
    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        // SAFETY: the caller passes 32 readable bytes; the target has AVX.
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    /// See [`super::dot_rows`]. Signed weights use the sign trick (|w| times y with w's sign)
    /// so that one unsigned-by-signed product serves every format.
    ///
    /// # Safety
    /// `w` holds `blocks` blocks of `format` and every row of `acts` holds `blocks` blocks.
    #[inline(always)]
    pub(super) unsafe fn dot_rows<const R: usize>(
        format: Format,
        w: &[u8],
        blocks: usize,
        acts: [&[ActBlock]; R],
        out: &mut [f32; R],
    ) {
        let bytes = format.block_bytes();
        // SAFETY: the target has AVX2 and FMA; loads stay inside the blocks (see above).
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut sums = [0f32; R];
            for b in 0..blocks {
                let block = &w[b * bytes..(b + 1) * bytes];
                let d = f16_at(block, 0);
                let p = block.as_ptr();
                match format {
                    Format::Q4_1 => {
                        let min = f16_at(block, 2);
                        let wq = nibbles(p.add(4));
                        for r in 0..R {
                            let a = &acts[r][b];
                            let dot = hsum_i32(dot_u8_i8(wq, load32(a.q.as_ptr().cast())));
                            sums[r] += dot as f32 * d * a.d + min * a.s;
                        }
                    }
                    Format::Q4_0 | Format::Q8_0 => {
                        let wq = if format == Format::Q4_0 {
                            _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))
                        } else {
                            load32(p.add(2))
                        };
                        let wabs = _mm256_sign_epi8(wq, wq);
                        for r in 0..R {
                            let a = &acts[r][b];
                            let y = _mm256_sign_epi8(load32(a.q.as_ptr().cast()), wq);
                            let dot = _mm256_cvtepi32_ps(dot_u8_i8(wabs, y));
                            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot, acc[r]);
                        }
                    }
                }
            }
            for r in 0..R {
                out[r] = if format == Format::Q4_1 {
                    sums[r]
                } else {
                    hsum(acc[r])
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so the test needs no extra crate.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn weight_row(format: Format, blocks: usize, seed: u64) -> Vec<u8> {
        let mut w = bytes(seed, blocks * format.block_bytes());
        for b in 0..blocks {
            let at = b * format.block_bytes();
            // Small finite scales and minimums instead of random f16 bit patterns.
            let scale = f16::from_f32(0.01 + (b % 7) as f32 * 0.003).to_le_bytes();
            w[at..at + 2].copy_from_slice(&scale);
            if format == Format::Q4_1 {
                let min = f16::from_f32(-0.05 + (b % 5) as f32 * 0.01).to_le_bytes();
                w[at + 2..at + 4].copy_from_slice(&min);
            }
        }
        w
    }

    fn act_row(blocks: usize, seed: u64) -> Vec<ActBlock> {
        let raw = bytes(seed, blocks * BLOCK);
        let xs: Vec<f32> = raw.iter().map(|&b| (b as f32 - 127.5) / 40.0).collect();
        xs.chunks(BLOCK).map(ActBlock::quantize).collect()
    }

    /// The dot product in f64 from the dequantized values, for an accuracy check.
    fn exact(format: Format, w: &[u8], acts: &[ActBlock]) -> f64 {
        let bytes = format.block_bytes();
        acts.iter()
            .enumerate()
            .map(|(b, a)| {
                let (v, d, min) = unpack(format, &w[b * bytes..(b + 1) * bytes]);
                (0..BLOCK)
                    .map(|t| {
                        let weight = f64::from(d) * f64::from(v[t]) + f64::from(min);
                        weight * f64::from(a.d) * f64::from(a.q[t])
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn kernels_agree_with_the_portable_code_bit_for_bit_and_with_exact_math() {
        for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            for blocks in [1, 18, 48] {
                let w = weight_row(format, blocks, 7 + blocks as u64);
                let rows: Vec<Vec<ActBlock>> =
                    (0..4).map(|i| act_row(blocks, 100 + i as u64)).collect();
                let mut fast = [0f32; 4];
                dot_rows(
                    format,
                    &w,
                    [&rows[0], &rows[1], &rows[2], &rows[3]],
                    &mut fast,
                );
                let mut reference = [0f32; 4];
                portable::dot_rows(
                    format,
                    &w,
                    blocks,
                    [&rows[0], &rows[1], &rows[2], &rows[3]],
                    &mut reference,
                );
                assert_eq!(fast.map(f32::to_bits), reference.map(f32::to_bits));
                for (r, row) in rows.iter().enumerate() {
                    let mut one = [0f32; 1];
                    dot_rows(format, &w, [row], &mut one);
                    assert_eq!(one[0].to_bits(), fast[r].to_bits(), "row {r} alone");
                    // Q4_1's minimum term uses the f16-rounded Σq·d, as candle does.
                    let tolerance = if format == Format::Q4_1 { 2e-2 } else { 1e-3 };
                    let want = exact(format, &w, row);
                    assert!(
                        (f64::from(fast[r]) - want).abs() <= tolerance * want.abs().max(1.0),
                        "{format:?} {blocks} blocks row {r}: {} vs {want}",
                        fast[r]
                    );
                }
            }
        }
    }

    #[test]
    fn quantize_matches_the_reference_rounding() {
        let xs: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
        let a = ActBlock::quantize(&xs);
        assert_eq!(a.d, f16::from_f32(15.5 / 127.0).to_f32());
        assert_eq!((a.q[0], a.q[16], a.q[31]), (-127, 4, 127));
        let zeros = ActBlock::quantize(&[0.0; 32]);
        assert_eq!((zeros.d, zeros.s, zeros.q), (0.0, 0.0, [0; 32]));
    }
}
