//! Dot products of a tile of four Q2_K, Q3_K, Q4_K, Q5_K or Q6_K weight rows with up to four
//! activation rows quantized to Q8_K, the K-quant counterpart of [`super::dot`].
//!
//! A Q4_K super-block holds 256 weights: an f16 scale `d` and minimum scale `dmin`, eight 6-bit
//! scales and eight 6-bit minimums (one of each per sub-block of 32 values, packed into 12
//! bytes) and 128 bytes of nibbles; weight = `d·sc·q − dmin·m`. Activations are quantized per
//! 256 values (Q8_K: an f32 scale, 256 signed bytes and the sums of each sub-block of 32), so
//! `Σ w·y = d·d_y·Σ sc·(q·y) − dmin·d_y·Σ m·Σy`: the minimums meet only the sub-block sums.
//!
//! Weights are repacked at load into tiles of four rows per super-block: the four `d`, the four
//! `dmin`, each row's eight scales and eight minimums unpacked to bytes, then each row's
//! nibbles ordered so that one 32-byte load gives two whole sub-blocks, values in order, in its
//! low and high nibbles (and one 64-byte load four). The tile is 4 bytes per row bigger than the
//! GGUF blocks (148 bytes instead of 144).
//!
//! Q5_K is Q4_K with a fifth bit per weight (32 bytes: bit `i` of byte `l` for value `l` of
//! sub-block `i`), which the tile keeps as it is after the nibbles (180 bytes a row).
//!
//! A Q6_K super-block holds an f16 `d`, sixteen i8 scales (one per 16 values) and 6-bit quants
//! biased by 32 (128 bytes of low nibbles, 64 of high bit pairs); weight = `d·sc·(q − 32)`. Its
//! GGUF quants already give whole registers of 32 values, in order, from 32-byte loads; the tile
//! only puts the four rows' `d` and scales side by side (210 bytes a row, as in GGUF).
//!
//! A Q2_K super-block holds an f16 `d` and `dmin`, sixteen bytes of 4-bit scales (low nibble)
//! and minimums (high nibble), one each per 16 values, and 2-bit quants (bits `2j` of byte
//! `32n + l` for value `128n + 32j + l`); weight = `d·sc·q − dmin·m`. The tile puts the four
//! rows' `d` and `dmin` side by side and keeps the rest as in GGUF (84 bytes a row). A Q3_K
//! super-block holds an f16 `d`, sixteen 6-bit scales biased by 32 (packed into 12 bytes) and
//! 3-bit quants biased by 4 (the low bit pairs as Q2_K's, the high bits in 32 more bytes: bit
//! `4n + j` of byte `l`); weight = `d·sc·(q − 4)`. The tile unpacks the scales to i8 (114 bytes
//! a row, 4 more than GGUF's) and is otherwise Q6_K's.
//!
//! Q4_K, Q5_K and Q6_K sum each (weight row, activation row) pair's products exactly over a
//! super-block, `T = Σ sc·(q·y)` and, with minimums, `M = Σ m·Σy` (both i32), and round once
//! per super-block: `acc = fma(d·d_y, T, acc)`, then `acc = fma(−d_y·dmin, M, acc)`. candle's
//! kernels keep eight float lanes per pair instead (lane `l` summing the values `4l..4l+4` of
//! every 32), so these three types equal candle's outputs up to float rounding, as Q4_0 does
//! (fewer roundings here); the exact sums let the batch kernel ([`super::kwide`]) add a chain
//! of products before scaling them: the batch kernel 1.4-1.5x faster, prefill 1.1-1.3x
//! (BENCHMARKS.md, issue 23's fifth part). Q2_K and Q3_K keep
//! candle's AVX2 arithmetic operation for operation: per pair, eight i32 lanes; per
//! super-block, eight float lanes `+= d·d_y · lane` (fused), Q2_K's first, per super-block, the
//! eight float lanes themselves `+= −d_y·dmin · lane`, lane `l` the minimums times the
//! activations' sums of the sixteens `2l` and `2l+1`; summed at the end in candle's order. So
//! their outputs equal those of candle's `vec_dot` kernels on x86-64 CPUs with AVX2 bit for
//! bit (candle's portable fallback orders its sums differently, and its repacked x86 kernels,
//! which it uses for matrices of a multiple of 16 rows, round each sub-block's sum on its own).
//!
//! Three implementations compute the same bits, chosen at run time by [`KernelPath`]: portable
//! Rust, AVX2 (`maddubs` then `madd` with the scale), and AVX-512 VNNI, whose `vpdpwssd` fuses
//! the scale's multiply-add (Q2_K's and Q3_K's integer sums run the AVX2 code there too).

use half::f16;

use super::KernelPath;
use super::dot::TILE;

/// Values per super-block (weights and activations alike).
pub(crate) const SUPER: usize = 256;

/// Values per Q4_K sub-block, which has its own scale and minimum.
const SUB: usize = 32;

/// Q4_K sub-blocks per super-block.
pub(super) const SUBS: usize = SUPER / SUB;

/// Values per Q6_K scale.
const SUB6: usize = 16;

/// The K-quant formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KFormat {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl KFormat {
    /// Bytes of a GGUF block: Q4_K's `d`, `dmin`, 12 bytes of packed scales and 128 of nibbles;
    /// Q5_K's the same with 32 bytes of fifth bits before the nibbles; Q6_K's 128 bytes of low
    /// nibbles, 64 of high bits, 16 scales and `d`.
    pub(crate) fn gguf_bytes(self) -> usize {
        match self {
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Whether a pair's products are summed exactly over each super-block, then converted
    /// once (Q4_K, Q5_K, Q6_K), rather than in candle's eight float lanes (Q2_K, Q3_K).
    pub(crate) fn sums_exactly(self) -> bool {
        matches!(self, Self::Q4K | Self::Q5K | Self::Q6K)
    }

    /// Bytes of one super-block of a tile of four rows (see the module doc).
    pub(crate) fn tile_bytes(self) -> usize {
        TILE * match self {
            Self::Q2K => 84,
            Self::Q3K => 114,
            Self::Q4K => 148,
            Self::Q5K => 180,
            Self::Q6K => 210,
        }
    }
}

/// Offsets in a Q4_K tile block: the four `d`, the four `dmin`, the scales, the minimums, the
/// quants.
pub(super) const D: usize = 0;
pub(super) const DMIN: usize = 8;
pub(super) const SCALES: usize = 16;
pub(super) const MINS: usize = SCALES + TILE * SUBS;
pub(super) const QUANTS: usize = MINS + TILE * SUBS;
/// Q5_K's fifth bits, after the quants.
pub(super) const FIFTH: usize = QUANTS + TILE * SUPER / 2;

/// Offsets in a Q6_K tile block: the four `d`, the four rows' sixteen scales, then each row's
/// low nibbles and high bits as in GGUF.
pub(super) const SCALES6: usize = 8;
pub(super) const QUANTS6: usize = SCALES6 + TILE * SUPER / SUB6;

/// Offsets in a Q2_K tile block: the four `d`, the four `dmin`, each row's sixteen packed
/// bytes of scales (low nibble) and minimums (high nibble), then each row's 2-bit quants, all
/// as in GGUF.
const SCALES2: usize = 16;
const QUANTS2: usize = SCALES2 + TILE * SUPER / SUB6;

/// Offsets in a Q3_K tile block: the four `d`, each row's sixteen scales unpacked to i8 (less
/// their bias of 32), then each row's 32 bytes of high bits and 64 of low bit pairs as in GGUF.
const SCALES3: usize = 8;
const QUANTS3: usize = SCALES3 + TILE * SUPER / SUB6;

/// Bytes of one row's Q3_K quants.
const QUANT3_BYTES: usize = SUPER / 8 + SUPER / 4;

/// Bytes of one row's Q6_K quants.
pub(super) const QUANT6_BYTES: usize = SUPER / 2 + SUPER / 4;

/// 256 activations quantized to 8 bits (candle's and ggml's Q8_K): value ≈ `d · q`,
/// `sums[i]` = `Σq` over sub-block `i` (of 32 values) and `sums16[i]` over values
/// `16i..16i+16` (Q2_K's minimums have one per 16).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KActBlock {
    pub(crate) d: f32,
    pub(crate) q: [i8; SUPER],
    pub(crate) sums: [i16; SUBS],
    pub(crate) sums16: [i16; SUPER / SUB6],
}

impl KActBlock {
    /// Quantizes each block of 256 values of `xs` as candle's Q8_K code does: the value of
    /// largest magnitude (the first, on ties) maps to −127, `q = round(x · −127/max)`; with
    /// AVX-512 on `path`'s CPU (the same bits: the scalar loop rounds one value at a time, 7.5%
    /// of a K-quant prefill). Long inputs (prefill, batches) are quantized on the thread pool.
    pub(crate) fn quantize_all(path: KernelPath, xs: &[f32]) -> Vec<Self> {
        let quantize = |xs: &[f32]| match path {
            // SAFETY: the path runs only where the CPU has AVX-512 F and BW.
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni | KernelPath::Amx => unsafe { avx512::quantize(xs) },
            _ => Self::quantize(xs),
        };
        let empty = Self {
            d: 0.0,
            q: [0; SUPER],
            sums: [0; SUBS],
            sums16: [0; SUPER / SUB6],
        };
        super::quantize_rows(xs, SUPER, empty, |xs, out| {
            for (xs, block) in xs.chunks_exact(SUPER).zip(out) {
                *block = quantize(xs);
            }
        })
    }

    fn quantize(xs: &[f32]) -> Self {
        let mut block = Self {
            d: 0.0,
            q: [0; SUPER],
            sums: [0; SUBS],
            sums16: [0; SUPER / SUB6],
        };
        // The magnitude first, in a loop that vectorizes (NaN skipped, as `max` does), then the
        // first value of that magnitude: a single loop tracking both ran one value at a time.
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        if amax == 0.0 {
            return block;
        }
        let max = xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for (q, &x) in block.q.iter_mut().zip(xs) {
            *q = round(iscale * x).clamp(-128.0, 127.0) as i8;
        }
        for (sum, q) in block.sums16.iter_mut().zip(block.q.chunks_exact(SUB6)) {
            *sum = q.iter().map(|&q| i16::from(q)).sum();
        }
        for (sum, pair) in block.sums.iter_mut().zip(block.sums16.chunks_exact(2)) {
            *sum = pair[0] + pair[1];
        }
        block.d = 1.0 / iscale;
        block
    }
}

/// `v.round()` (half away from zero; NaN to 0, which `as i8` makes of NaN anyway) without the
/// library call that `round` is on x86-64 CPUs before SSE4.1, so that the loop vectorizes:
/// `v - trunc(v)` is exact, and any `v` beyond `i32` saturates to a value clamped later.
fn round(v: f32) -> f32 {
    let t = v as i32 as f32;
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

/// The Q8_K quantizer with AVX-512, sixteen values to a register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KActBlock, SUB6, SUBS, SUPER};
    use crate::kernels::dot::avx512::{abs_or_zero, round_to_i32};

    /// [`KActBlock::quantize`]'s operations on sixteen lanes: the magnitude skips NaN, the first
    /// value of that magnitude sets the scale, and rounding (half away from zero, NaN to 0,
    /// saturated to i8) is the scalar code's.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; `xs` holds 256 values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(xs: &[f32]) -> KActBlock {
        assert_eq!(xs.len(), SUPER);
        // SAFETY: sixteen loads of sixteen values inside `xs`; the CPU has the features.
        let x: [__m512; SUPER / SUB6] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(xs.as_ptr().add(SUB6 * i)) });
        let mut block = KActBlock {
            d: 0.0,
            q: [0; SUPER],
            sums: [0; SUBS],
            sums16: [0; SUPER / SUB6],
        };
        let amax = _mm512_reduce_max_ps(x.iter().fold(_mm512_setzero_ps(), |m, &x| {
            _mm512_max_ps(m, abs_or_zero(x))
        }));
        if amax == 0.0 {
            return block;
        }
        let max = x
            .iter()
            .find_map(|x| {
                let hits =
                    _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(*x), _mm512_set1_ps(amax));
                (hits != 0).then(|| {
                    let mut lanes = [0f32; SUB6];
                    // SAFETY: sixteen writable values; the CPU has AVX-512 F.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *x) };
                    lanes[hits.trailing_zeros() as usize]
                })
            })
            .unwrap_or(amax);
        let iscale = -127.0 / max;
        for (i, x) in x.iter().enumerate() {
            let q = round_to_i32(*x, iscale);
            // Sixteen values: one i16 sum (at most 16 · 128).
            block.sums16[i] = _mm512_reduce_add_epi32(q) as i16;
            // SAFETY: sixteen writable bytes inside `block.q`; the CPU has AVX-512 F.
            unsafe {
                _mm_storeu_si128(
                    block.q.as_mut_ptr().add(SUB6 * i).cast(),
                    _mm512_cvtepi32_epi8(q),
                )
            };
        }
        for (sum, pair) in block.sums.iter_mut().zip(block.sums16.chunks_exact(2)) {
            *sum = pair[0] + pair[1];
        }
        block.d = 1.0 / iscale;
        block
    }
}

/// Position of value `v` (0..256) in a repacked row's 128 bytes, and whether it is the high
/// nibble: byte `64h + k` holds value `128h + k` low and `128h + 64 + k` high.
fn nibble_at(v: usize) -> (usize, bool) {
    let (h, k) = (v / 128, v % 128);
    (64 * h + k % 64, k >= 64)
}

/// Sub-block `j`'s scale and minimum from a GGUF block's 12 packed bytes: six bits each, the
/// first four sub-blocks' in the low bits of bytes 0..8, the last four's low nibbles in bytes
/// 8..12 with their top two bits in the top bits of bytes 0..8.
fn scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Repacks `rows` rows (a multiple of [`TILE`]) of `blocks` GGUF blocks each into tiles (see
/// the module doc).
pub(crate) fn repack(format: KFormat, gguf: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let gguf_bytes = format.gguf_bytes();
    let mut packed = vec![0u8; rows / TILE * blocks * format.tile_bytes()];
    for (t, tile) in packed
        .chunks_exact_mut(blocks * format.tile_bytes())
        .enumerate()
    {
        for (b, out) in tile.chunks_exact_mut(format.tile_bytes()).enumerate() {
            for w in 0..TILE {
                let at = ((t * TILE + w) * blocks + b) * gguf_bytes;
                let block = &gguf[at..at + gguf_bytes];
                match format {
                    KFormat::Q2K => {
                        out[D + 2 * w..D + 2 * w + 2].copy_from_slice(&block[80..82]);
                        out[DMIN + 2 * w..DMIN + 2 * w + 2].copy_from_slice(&block[82..84]);
                        let scales = SCALES2 + 16 * w;
                        out[scales..scales + 16].copy_from_slice(&block[..16]);
                        let quants = QUANTS2 + 64 * w;
                        out[quants..quants + 64].copy_from_slice(&block[16..80]);
                    }
                    KFormat::Q3K => {
                        out[D + 2 * w..D + 2 * w + 2].copy_from_slice(&block[108..110]);
                        let scales = &mut out[SCALES3 + 16 * w..][..16];
                        for (i, scale) in scales.iter_mut().enumerate() {
                            *scale = (q3k_scale(&block[96..108], i) - 32) as u8;
                        }
                        let quants = QUANTS3 + QUANT3_BYTES * w;
                        out[quants..quants + QUANT3_BYTES].copy_from_slice(&block[..96]);
                    }
                    KFormat::Q4K => repack_q4k(block, &block[16..], w, out),
                    KFormat::Q5K => {
                        repack_q4k(block, &block[48..], w, out);
                        out[FIFTH + 32 * w..FIFTH + 32 * (w + 1)].copy_from_slice(&block[16..48]);
                    }
                    KFormat::Q6K => {
                        out[D + 2 * w..D + 2 * w + 2].copy_from_slice(&block[208..210]);
                        let scales = SCALES6 + 16 * w;
                        out[scales..scales + 16].copy_from_slice(&block[192..208]);
                        let quants = QUANTS6 + QUANT6_BYTES * w;
                        out[quants..quants + QUANT6_BYTES].copy_from_slice(&block[..192]);
                    }
                }
            }
        }
    }
    packed
}

/// Q3_K's scale `i` (of values `16i..16i+16`, biased by 32) from its 12 packed bytes: the low
/// nibble of byte `i` (`i < 8`) or the high one of byte `i - 8`, with bits `2(i / 4)` and
/// `2(i / 4) + 1` of byte `8 + i % 4` above it.
fn q3k_scale(packed: &[u8], i: usize) -> i8 {
    let low = if i < 8 {
        packed[i] & 0x0f
    } else {
        packed[i - 8] >> 4
    };
    let high = packed[8 + i % 4] >> (2 * (i / 4)) & 3;
    (low | high << 4) as i8
}

/// Row `w` of a Q4_K tile block `out` (or all but Q5_K's fifth bits) from its GGUF `block`,
/// whose nibbles are `nibbles`.
fn repack_q4k(block: &[u8], nibbles: &[u8], w: usize, out: &mut [u8]) {
    out[D + 2 * w..D + 2 * w + 2].copy_from_slice(&block[0..2]);
    out[DMIN + 2 * w..DMIN + 2 * w + 2].copy_from_slice(&block[2..4]);
    for j in 0..SUBS {
        let (sc, m) = scale_min(j, &block[4..16]);
        out[SCALES + SUBS * w + j] = sc;
        out[MINS + SUBS * w + j] = m;
    }
    let quants = &mut out[QUANTS + 128 * w..QUANTS + 128 * (w + 1)];
    // GGUF: byte 32c + l holds value 64c + l low and 64c + 32 + l high.
    for (i, &byte) in nibbles.iter().enumerate() {
        let (c, l) = (i / 32, i % 32);
        for (v, q) in [(64 * c + l, byte & 0x0f), (64 * c + 32 + l, byte >> 4)] {
            let (at, high) = nibble_at(v);
            quants[at] |= if high { q << 4 } else { q };
        }
    }
}

/// Dots one tile (`blocks` super-blocks of four rows, as [`repack`] lays them out) with each of
/// the `R` activation rows on `path`: `out[r][w]` is weight row `w` times activation row `r`.
pub(crate) fn dot_tile<const R: usize>(
    path: KernelPath,
    format: KFormat,
    tile: &[u8],
    acts: [&[KActBlock]; R],
    out: &mut [[f32; TILE]; R],
) {
    let blocks = tile.len() / format.tile_bytes();
    assert!(acts.iter().all(|a| a.len() == blocks));
    assert_eq!(tile.len(), blocks * format.tile_bytes());
    // SAFETY (both SIMD paths): a path runs only where the CPU has its features, and every
    // load stays inside `tile` and `acts`, whose lengths were checked above.
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni | KernelPath::Amx => unsafe {
            vnni::dot_tile(format, tile, blocks, acts, out)
        },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { avx2::dot_tile(format, tile, blocks, acts, out) },
        _ => portable::dot_tile(format, tile, blocks, acts, out),
    }
}

/// The portable kernel: exact sums per super-block, or lane by lane as candle's AVX2 kernels
/// (see the module doc).
pub(crate) mod portable {
    use super::*;
    use crate::kernels::dot::portable::hsum8;

    /// One row of a tile block: its 256 weights as integers (Q6_K's less its bias of 32), the
    /// scale and the minimum of each 16 values (no minimums for Q6_K), `d` and `dmin`.
    pub(crate) struct Row {
        pub(crate) q: [i32; SUPER],
        pub(crate) scales: [i32; SUPER / SUB6],
        pub(crate) mins: [i32; SUPER / SUB6],
        pub(crate) d: f32,
        pub(crate) dmin: f32,
    }

    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    }

    /// Row `w` with weights `q`, its scales (signed bytes from offset `scales`), its `d` and no
    /// minimums, as Q3_K and Q6_K tiles hold them.
    fn without_mins(q: [i32; SUPER], block: &[u8], scales: usize, w: usize) -> Row {
        Row {
            q,
            scales: std::array::from_fn(|i| i32::from(block[scales + SUPER / SUB6 * w + i] as i8)),
            mins: [0; SUPER / SUB6],
            d: f16_at(block, D + 2 * w),
            dmin: 0.0,
        }
    }

    /// Row `w` of one tile block.
    pub(crate) fn unpack(format: KFormat, block: &[u8], w: usize) -> Row {
        match format {
            KFormat::Q2K => {
                let quants = &block[QUANTS2 + 64 * w..][..64];
                let packed = |i: usize| i32::from(block[SCALES2 + 16 * w + i]);
                Row {
                    // Value 128n + 32j + l: bits 2j and 2j + 1 of byte 32n + l.
                    q: std::array::from_fn(|v| {
                        let (n, j, l) = (v / 128, v % 128 / 32, v % 32);
                        i32::from(quants[32 * n + l] >> (2 * j) & 3)
                    }),
                    scales: std::array::from_fn(|i| packed(i) & 0x0f),
                    mins: std::array::from_fn(|i| packed(i) >> 4),
                    d: f16_at(block, D + 2 * w),
                    dmin: f16_at(block, DMIN + 2 * w),
                }
            }
            KFormat::Q4K | KFormat::Q5K => {
                let quants = &block[QUANTS + 128 * w..QUANTS + 128 * (w + 1)];
                let fifth = |v: usize| {
                    if format == KFormat::Q5K {
                        let byte = block[FIFTH + 32 * w + v % SUB];
                        i32::from(byte >> (v / SUB) & 1) << 4
                    } else {
                        0
                    }
                };
                let sub = |from: usize, i: usize| i32::from(block[from + SUBS * w + i]);
                Row {
                    q: std::array::from_fn(|v| {
                        let (at, high) = nibble_at(v);
                        let nibble = if high {
                            quants[at] >> 4
                        } else {
                            quants[at] & 0x0f
                        };
                        i32::from(nibble) + fifth(v)
                    }),
                    scales: std::array::from_fn(|i| sub(SCALES, i / 2)),
                    mins: std::array::from_fn(|i| sub(MINS, i / 2)),
                    d: f16_at(block, D + 2 * w),
                    dmin: f16_at(block, DMIN + 2 * w),
                }
            }
            KFormat::Q3K => {
                let quants = &block[QUANTS3 + QUANT3_BYTES * w..][..QUANT3_BYTES];
                let (high, low) = quants.split_at(SUPER / 8);
                // Value 128n + 32j + l: bits 2j of low byte 32n + l, and 4 less unless bit
                // 4n + j of high byte l is set.
                let q = std::array::from_fn(|v| {
                    let (n, j, l) = (v / 128, v % 128 / 32, v % 32);
                    let bits = low[32 * n + l] >> (2 * j) & 3;
                    let top = high[l] >> (4 * n + j) & 1;
                    i32::from(bits | top << 2) - 4
                });
                without_mins(q, block, SCALES3, w)
            }
            KFormat::Q6K => {
                let quants = &block[QUANTS6 + QUANT6_BYTES * w..][..QUANT6_BYTES];
                let (low, high) = quants.split_at(SUPER / 2);
                // Value 128n + 32j + l: low nibble (j even) or high (j odd) of byte
                // 64n + 32(j % 2) + l, its top bits at bit 2j of high byte 32n + l.
                let q = std::array::from_fn(|v| {
                    let (n, j, l) = (v / 128, v % 128 / 32, v % 32);
                    let nibble = low[64 * n + 32 * (j % 2) + l] >> (4 * (j / 2)) & 0x0f;
                    let top = high[32 * n + l] >> (2 * j) & 3;
                    i32::from(nibble | top << 4) - 32
                });
                without_mins(q, block, SCALES6, w)
            }
        }
    }

    /// See [`super::dot_tile`].
    // Weight row `w` addresses both the tile block and each pair's lanes.
    #[allow(clippy::needless_range_loop)]
    pub(crate) fn dot_tile<const R: usize>(
        format: KFormat,
        tile: &[u8],
        blocks: usize,
        acts: [&[KActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        if format.sums_exactly() {
            return exact(format, tile, blocks, acts, out);
        }
        let bytes = format.tile_bytes();
        let mut lanes = [[[0f32; 8]; TILE]; R];
        for b in 0..blocks {
            let block = &tile[b * bytes..(b + 1) * bytes];
            for w in 0..TILE {
                let row = unpack(format, block, w);
                for r in 0..R {
                    let a = &acts[r][b];
                    // Lane `l`: values 4l..4l+4 of every 32, each four times its scale.
                    let mut sums = [0i32; 8];
                    for k in 0..SUPER / 32 {
                        for (l, sum) in sums.iter_mut().enumerate() {
                            let t = 32 * k + 4 * l;
                            let dot: i32 = (t..t + 4).map(|t| row.q[t] * i32::from(a.q[t])).sum();
                            *sum += row.scales[t / SUB6] * dot;
                        }
                    }
                    if format == KFormat::Q2K {
                        // Lane `l`: the minimums of values 32l..32l+32, first.
                        let scale = -a.d * row.dmin;
                        let m = |i: usize| row.mins[i] * i32::from(a.sums16[i]);
                        for (l, lane) in lanes[r][w].iter_mut().enumerate() {
                            *lane = scale.mul_add((m(2 * l) + m(2 * l + 1)) as f32, *lane);
                        }
                    }
                    let d = a.d * row.d;
                    for (lane, &sum) in lanes[r][w].iter_mut().zip(&sums) {
                        *lane = d.mul_add(sum as f32, *lane);
                    }
                }
            }
        }
        for r in 0..R {
            for w in 0..TILE {
                out[r][w] = hsum8(lanes[r][w]);
            }
        }
    }

    /// Q4_K, Q5_K and Q6_K (see the module doc): per super-block, the exact integer sums
    /// `Σ sc·(q·y)` and `Σ m·Σy`, each converted once.
    fn exact<const R: usize>(
        format: KFormat,
        tile: &[u8],
        blocks: usize,
        acts: [&[KActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        let bytes = format.tile_bytes();
        *out = [[0f32; TILE]; R];
        for b in 0..blocks {
            let block = &tile[b * bytes..(b + 1) * bytes];
            for w in 0..TILE {
                let row = unpack(format, block, w);
                for (r, out) in out.iter_mut().enumerate() {
                    let a = &acts[r][b];
                    let sum: i32 = (0..SUPER)
                        .map(|v| row.scales[v / SUB6] * row.q[v] * i32::from(a.q[v]))
                        .sum();
                    out[w] = (a.d * row.d).mul_add(sum as f32, out[w]);
                    if format != KFormat::Q6K {
                        let mins: i32 = (0..SUBS)
                            .map(|i| row.mins[2 * i] * i32::from(a.sums[i]))
                            .sum();
                        out[w] = (-a.d * row.dmin).mul_add(mins as f32, out[w]);
                    }
                }
            }
        }
    }
}

/// The SIMD kernels, written once and compiled twice: into `avx2` for AVX2, FMA and F16C, and
/// into `vnni` with AVX-512 BW, VL and VNNI too. They differ in how each (weight row,
/// activation row) pair's eight integer lanes are summed over a super-block: [`sums256`] a
/// register of 32 values at a time, [`sums512`] 64 with `vpdpwssd` adding the scaled products
/// (and its halves added at the end: the lanes' integer sums are the same).
#[cfg(target_arch = "x86_64")]
macro_rules! k_kernels {
    ($module:ident, $features:literal, $sums:ident) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::*;
            use crate::kernels::dot::$module::{hsum as hsum8, hsum4_i32};

            /// Each row's eight integer lanes summed (exact): `sums[r]`'s in element `r`.
            #[inline]
            #[target_feature(enable = $features)]
            fn totals<const R: usize>(sums: [__m256i; R]) -> [i32; TILE] {
                let four =
                    std::array::from_fn(|r| sums.get(r).copied().unwrap_or(_mm256_setzero_si256()));
                let mut totals = [0i32; TILE];
                // SAFETY: four writable i32; the CPU has the features.
                unsafe { _mm_storeu_si128(totals.as_mut_ptr().cast(), hsum4_i32(four)) };
                totals
            }

            /// The four f16 at `p` (a tile block's `d` or `dmin`).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn four_f16(p: *const u8) -> [f32; TILE] {
                let mut d = [0f32; TILE];
                // SAFETY: the caller passes 8 readable bytes; the CPU has F16C.
                unsafe { _mm_storeu_ps(d.as_mut_ptr(), _mm_cvtph_ps(_mm_loadl_epi64(p.cast()))) };
                d
            }

            /// [`super::dot_tile`] on this module's CPU features, by format.
            ///
            /// # Safety
            /// The CPU has the module's features; `tile` holds `blocks` tile blocks and every
            /// row of `acts` `blocks` blocks.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_tile<const R: usize>(
                format: KFormat,
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                // SAFETY: the same contract.
                unsafe {
                    match format {
                        KFormat::Q4K => q4k::<R, false>(tile, blocks, acts, out),
                        KFormat::Q5K => q4k::<R, true>(tile, blocks, acts, out),
                        KFormat::Q6K => q2k_q6k::<R, false>(tile, blocks, acts, out),
                        KFormat::Q2K => q2k_q6k::<R, true>(tile, blocks, acts, out),
                        KFormat::Q3K => q3k(tile, blocks, acts, out),
                    }
                }
            }

            /// Q4_K, or Q5_K when `FIVE`: see [`super::dot_tile`]. Per super-block and pair,
            /// the eight integer lanes summed, then the minimums (their integer sum).
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks and every row of `acts` `blocks` blocks.
            // Block `b` addresses both the tile's bytes and each activation row.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            unsafe fn q4k<const R: usize, const FIVE: bool>(
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                let format = if FIVE { KFormat::Q5K } else { KFormat::Q4K };
                let bytes = format.tile_bytes();
                // SAFETY: the CPU has the features; loads stay inside the blocks (see above).
                unsafe {
                    *out = [[0f32; TILE]; R];
                    for b in 0..blocks {
                        let p = tile.as_ptr().add(b * bytes);
                        crate::kernels::prefetch_ahead(p, bytes);
                        let d = four_f16(p.add(D));
                        let dmin = four_f16(p.add(DMIN));
                        // Rows 0 and 1's minimums (eight each), then rows 2 and 3's, as i16.
                        let m = [0, 1].map(|h| {
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(MINS + 16 * h).cast()))
                        });
                        let rows: [&KActBlock; R] = std::array::from_fn(|r| &acts[r][b]);
                        // Each pair's `Σ m·Σy`: the weight rows' in elements 0, 4, 1, 5.
                        let mins = rows.map(|a| {
                            let y = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                a.sums.as_ptr().cast(),
                            ));
                            let pairs = m.map(|m| _mm256_madd_epi16(m, y));
                            let t = _mm256_hadd_epi32(pairs[0], pairs[1]);
                            let mut lanes = [0i32; 8];
                            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_hadd_epi32(t, t));
                            [lanes[0], lanes[4], lanes[1], lanes[5]]
                        });
                        for w in 0..TILE {
                            let sums = totals($sums::q4k::<R, FIVE>(p, w, rows));
                            for (r, a) in rows.iter().enumerate() {
                                out[r][w] = (a.d * d[w]).mul_add(sums[r] as f32, out[r][w]);
                                out[r][w] = (-a.d * dmin[w]).mul_add(mins[r][w] as f32, out[r][w]);
                            }
                        }
                    }
                }
            }

            /// Q6_K, or Q2_K when `TWO`: see [`super::dot_tile`]. Each register of 32 values
            /// takes the products of the unsigned quants (Q6_K's less 32 times the activations,
            /// exact in i16) times the scales of its two sixteens. Q2_K's minimums (one per 16
            /// values, times the activations' sums of 16) go first, per super-block, into the
            /// same eight lanes, as in candle's kernel.
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks and every row of `acts` `blocks` blocks.
            // Block `b` addresses both the tile's bytes and each activation row.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            unsafe fn q2k_q6k<const R: usize, const TWO: bool>(
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                let format = if TWO { KFormat::Q2K } else { KFormat::Q6K };
                // SAFETY: the same contract.
                unsafe { no_minimums_first::<R>(format, tile, blocks, acts, out) }
            }

            /// Q3_K: see [`super::dot_tile`]; as Q6_K, its quants biased by 4.
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks and every row of `acts` `blocks` blocks.
            #[target_feature(enable = $features)]
            unsafe fn q3k<const R: usize>(
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                // SAFETY: the same contract.
                unsafe { no_minimums_first::<R>(KFormat::Q3K, tile, blocks, acts, out) }
            }

            /// Q2_K, Q3_K or Q6_K (see [`q2k_q6k`]); Q6_K's lanes summed per super-block
            /// and pair.
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks and every row of `acts` `blocks` blocks.
            // Block `b` addresses both the tile's bytes and each activation row.
            #[allow(clippy::needless_range_loop)]
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn no_minimums_first<const R: usize>(
                format: KFormat,
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                const TWO: KFormat = KFormat::Q2K;
                let bytes = format.tile_bytes();
                // SAFETY: the CPU has the features; loads stay inside the blocks (see above).
                unsafe {
                    let mut lanes = [[_mm256_setzero_ps(); TILE]; R];
                    *out = [[0f32; TILE]; R];
                    for b in 0..blocks {
                        let p = tile.as_ptr().add(b * bytes);
                        crate::kernels::prefetch_ahead(p, bytes);
                        let d = four_f16(p.add(D));
                        let rows: [&KActBlock; R] = std::array::from_fn(|r| &acts[r][b]);
                        for w in 0..TILE {
                            if format == TWO {
                                let dmin = four_f16(p.add(DMIN));
                                let packed = _mm_loadu_si128(p.add(SCALES2 + 16 * w).cast());
                                let mins = _mm256_cvtepu8_epi16(_mm_and_si128(
                                    _mm_srli_epi16::<4>(packed),
                                    _mm_set1_epi8(0x0f),
                                ));
                                for (r, a) in rows.iter().enumerate() {
                                    let sums = _mm256_loadu_si256(a.sums16.as_ptr().cast());
                                    lanes[r][w] = _mm256_fmadd_ps(
                                        _mm256_set1_ps(-a.d * dmin[w]),
                                        _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, sums)),
                                        lanes[r][w],
                                    );
                                }
                            }
                            let sums = match format {
                                KFormat::Q2K => $sums::q2k::<R>(p, w, rows),
                                KFormat::Q3K => $sums::q3k::<R>(p, w, rows),
                                _ => $sums::q6k::<R>(p, w, rows),
                            };
                            let exact = format.sums_exactly().then(|| totals(sums));
                            for (r, a) in rows.iter().enumerate() {
                                if let Some(sums) = exact {
                                    out[r][w] = (a.d * d[w]).mul_add(sums[r] as f32, out[r][w]);
                                    continue;
                                }
                                lanes[r][w] = _mm256_fmadd_ps(
                                    _mm256_set1_ps(a.d * d[w]),
                                    _mm256_cvtepi32_ps(sums[r]),
                                    lanes[r][w],
                                );
                            }
                        }
                    }
                    if !format.sums_exactly() {
                        for r in 0..R {
                            for w in 0..TILE {
                                out[r][w] = hsum8(lanes[r][w]);
                            }
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
k_kernels!(avx2, "avx2,fma,f16c", sums256);
#[cfg(target_arch = "x86_64")]
k_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    sums512
);

/// Each pair's eight integer lanes over one super-block, 256 bits at a time (AVX2). Here and in
/// [`sums512`] each activation row is summed in a loop, not by `map` over the rows: the closure
/// compiled to a call of its own, its results through the stack (15% of Q6_K decode).
#[cfg(target_arch = "x86_64")]
mod sums256 {
    use std::arch::x86_64::*;

    use super::*;

    /// Q4_K, or Q5_K when `FIVE`: row `w` of the tile block at `p` against each of `acts`.
    ///
    /// # Safety
    /// `p` is a tile block of the format; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k<const R: usize, const FIVE: bool>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let nibble = _mm256_set1_epi8(0x0f);
            let scales = p.add(SCALES + SUBS * w);
            let scale = |i: usize| _mm256_set1_epi16(i16::from(*scales.add(i)));
            let quants = p.add(QUANTS + 128 * w);
            // Sub-block `i`'s fifth bits (bit `i` of each byte) as 16 or 0.
            let plus_fifth = |q: __m256i, i: usize| {
                if !FIVE {
                    return q;
                }
                let fifth = _mm256_loadu_si256(p.add(FIFTH + 32 * w).cast());
                let bit = _mm256_set1_epi8((1u8 << i) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(fifth, bit), bit);
                _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)))
            };
            // Load `g` holds sub-blocks 4h + c (low nibbles) and 4h + 2 + c.
            let subs: [[__m256i; 2]; 4] = std::array::from_fn(|g| {
                let x = _mm256_loadu_si256(quants.add(32 * g).cast());
                let i = 4 * (g / 2) + g % 2;
                [
                    plus_fifth(_mm256_and_si256(x, nibble), i),
                    plus_fifth(_mm256_and_si256(_mm256_srli_epi16::<4>(x), nibble), i + 2),
                ]
            });
            let mut results = [_mm256_setzero_si256(); R];
            for (result, a) in results.iter_mut().zip(acts) {
                let y = a.q.as_ptr();
                let mut sum = _mm256_setzero_si256();
                for (g, pair) in subs.iter().enumerate() {
                    for (half, &q) in pair.iter().enumerate() {
                        let i = 4 * (g / 2) + g % 2 + 2 * half;
                        let ys = _mm256_loadu_si256(y.add(SUB * i).cast());
                        let products = _mm256_maddubs_epi16(q, ys);
                        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(products, scale(i)));
                    }
                }
                *result = sum;
            }
            results
        }
    }

    /// Q6_K: row `w` of the tile block at `p` against each of `acts`. Each register of 32
    /// values takes the products of the unsigned quants, less 32 times the activations (exact
    /// in i16), times the scales of its two sixteens.
    ///
    /// # Safety
    /// `p` is a Q6_K tile block; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k<const R: usize>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let (nibble, two_bits) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
            let bias = _mm256_set1_epi8(32);
            let scales = _mm_loadu_si128(p.add(SCALES6 + SUPER / SUB6 * w).cast());
            let quants = p.add(QUANTS6 + QUANT6_BYTES * w);
            let q: [__m256i; 8] = std::array::from_fn(|k| {
                let (n, j) = (k / 4, k % 4);
                let low = _mm256_loadu_si256(quants.add(64 * n + 32 * (j % 2)).cast());
                let low = if j < 2 {
                    low
                } else {
                    _mm256_srli_epi16::<4>(low)
                };
                let high = _mm256_loadu_si256(quants.add(128 + 32 * n).cast());
                let high = match j {
                    0 => high,
                    1 => _mm256_srli_epi16::<2>(high),
                    2 => _mm256_srli_epi16::<4>(high),
                    _ => _mm256_srli_epi16::<6>(high),
                };
                _mm256_or_si256(
                    _mm256_and_si256(low, nibble),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(high, two_bits)),
                )
            });
            biased_sums(&q, bias, scales, acts)
        }
    }

    /// Each activation block's integer sum over eight registers `q` of 32 unsigned quants: the
    /// products less `bias` times the activations (exact in i16), times the scales of each
    /// register's two sixteens (Q3_K's and Q6_K's arithmetic).
    ///
    /// # Safety
    /// Each of `acts` holds 256 quants; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn biased_sums<const R: usize>(
        q: &[__m256i; 8],
        bias: __m256i,
        scales: __m128i,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: each of `acts` holds 256 quants, so the eight loads stay inside it; the CPU
        // has AVX2 (see above).
        unsafe {
            let mut results = [_mm256_setzero_si256(); R];
            for (result, a) in results.iter_mut().zip(acts) {
                let y = a.q.as_ptr();
                let mut sum = _mm256_setzero_si256();
                for (k, &q) in q.iter().enumerate() {
                    let ys = _mm256_loadu_si256(y.add(32 * k).cast());
                    let products = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(q, ys),
                        _mm256_maddubs_epi16(bias, ys),
                    );
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(products, sixteens(scales, k)));
                }
                *result = sum;
            }
            results
        }
    }

    /// Register `k` of 32 values' scales from a row's sixteen i8 `scales`: scale 2k in its
    /// first 16 i16 lanes, 2k + 1 in the others.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sixteens(scales: __m128i, k: usize) -> __m256i {
        let k = k as i64;
        let pick = _mm_set_epi64x(
            (2 * k + 1) * 0x0101_0101_0101_0101,
            2 * k * 0x0101_0101_0101_0101,
        );
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick))
    }

    /// Q3_K: row `w` of the tile block at `p` against each of `acts`. Each register of 32
    /// values (two low bits of 32 bytes, the high bit of 32 more) takes the products of the
    /// unsigned quants, less 4 times the activations (exact in i16), times the scales of its
    /// two sixteens. (The AVX-512 path runs this too.)
    ///
    /// # Safety
    /// `p` is a Q3_K tile block; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q3k<const R: usize>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let (one, two_bits, bias) = (
                _mm256_set1_epi8(1),
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(4),
            );
            let scales = _mm_loadu_si128(p.add(SCALES3 + SUPER / SUB6 * w).cast());
            let quants = p.add(QUANTS3 + QUANT3_BYTES * w);
            let high = _mm256_loadu_si256(quants.cast());
            // Register `k`: values 32k..32k+32, bits 2j of low bytes 32n.. and bit 4n + j of
            // the high bytes (k = 4n + j).
            let q: [__m256i; 8] = std::array::from_fn(|k| {
                let (n, j) = (k / 4, k % 4);
                let low = _mm256_loadu_si256(quants.add(32 + 32 * n).cast());
                let low = _mm256_srl_epi16(low, _mm_cvtsi32_si128(2 * j as i32));
                let top = _mm256_srl_epi16(high, _mm_cvtsi32_si128(k as i32));
                _mm256_or_si256(
                    _mm256_and_si256(low, two_bits),
                    _mm256_slli_epi16::<2>(_mm256_and_si256(top, one)),
                )
            });
            biased_sums(&q, bias, scales, acts)
        }
    }

    /// Q2_K: row `w` of the tile block at `p` against each of `acts`. Each register of 32
    /// values (two bits of 32 bytes) takes the products of the quants times the scales of its
    /// two sixteens. (The AVX-512 path runs this too.)
    ///
    /// # Safety
    /// `p` is a Q2_K tile block; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q2k<const R: usize>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let two_bits = _mm256_set1_epi8(3);
            let packed = _mm_loadu_si128(p.add(SCALES2 + 16 * w).cast());
            let scales = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
            // Register `k`: values 32k..32k+32, bits 2j of bytes 32n.. (k = 4n + j).
            let quants = p.add(QUANTS2 + 64 * w);
            let q: [__m256i; 8] = std::array::from_fn(|k| {
                let (n, j) = (k / 4, k % 4);
                let bits = _mm256_loadu_si256(quants.add(32 * n).cast());
                let shift = _mm_cvtsi32_si128(2 * j as i32);
                _mm256_and_si256(_mm256_srl_epi16(bits, shift), two_bits)
            });
            let mut results = [_mm256_setzero_si256(); R];
            for (result, a) in results.iter_mut().zip(acts) {
                let y = a.q.as_ptr();
                let mut sum = _mm256_setzero_si256();
                for (k, &q) in q.iter().enumerate() {
                    let ys = _mm256_loadu_si256(y.add(32 * k).cast());
                    let products = _mm256_maddubs_epi16(q, ys);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(products, sixteens(scales, k)));
                }
                *result = sum;
            }
            results
        }
    }
}

/// Each pair's eight integer lanes over one super-block, 512 bits at a time (AVX-512 BW and
/// VNNI): registers of 64 values, two Q4_K sub-blocks or four Q6_K sixteens, whose halves are
/// added at the end.
#[cfg(target_arch = "x86_64")]
mod sums512 {
    use std::arch::x86_64::*;

    use super::*;

    pub(super) use super::sums256::{q2k, q3k};

    /// The two halves of `x` added: lane `l` of every 32 values' lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn fold(x: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x))
    }

    /// See [`super::sums256::q4k`].
    ///
    /// # Safety
    /// `p` is a tile block of the format; the CPU has AVX-512 BW and VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4k<const R: usize, const FIVE: bool>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let nibble = _mm512_set1_epi8(0x0f);
            let second = 0xffff_ffff_0000_0000u64;
            let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(
                p.add(SCALES + SUBS * w).cast(),
            )));
            // The register of sub-blocks `i` and `i + 1`: scale `i` in its first 16 i16 lanes.
            let scale = |i: usize| {
                let pick = _mm512_mask_blend_epi16(
                    0xffff_0000,
                    _mm512_set1_epi16(i as i16),
                    _mm512_set1_epi16(i as i16 + 1),
                );
                _mm512_permutexvar_epi16(pick, scales)
            };
            let fifth = if FIVE {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(FIFTH + 32 * w).cast()))
            } else {
                _mm512_setzero_si512()
            };
            // Register `k`: half `h = k / 2`, low nibbles (sub-blocks 4h and 4h + 1) or high
            // ones (4h + 2 and 4h + 3).
            let quants = p.add(QUANTS + 128 * w);
            let subs: [(__m512i, usize); 4] = std::array::from_fn(|k| {
                let (h, high) = (k / 2, k % 2);
                let x = _mm512_loadu_si512(quants.add(64 * h).cast());
                let x = if high == 1 {
                    _mm512_srli_epi16::<4>(x)
                } else {
                    x
                };
                let q = _mm512_and_si512(x, nibble);
                let i = 4 * h + 2 * high;
                let q = if FIVE {
                    let bits = _mm512_mask_blend_epi8(
                        second,
                        _mm512_set1_epi8((1u8 << i) as i8),
                        _mm512_set1_epi8((1u8 << (i + 1)) as i8),
                    );
                    let set = _mm512_test_epi8_mask(fifth, bits);
                    _mm512_mask_add_epi8(q, set, q, _mm512_set1_epi8(16))
                } else {
                    q
                };
                (q, i)
            });
            let scales = subs.map(|(_, i)| scale(i));
            let mut results = [_mm256_setzero_si256(); R];
            for (result, a) in results.iter_mut().zip(acts) {
                let y = a.q.as_ptr();
                let mut sum = _mm512_setzero_si512();
                for (&(q, i), &scale) in subs.iter().zip(&scales) {
                    let ys = _mm512_loadu_si512(y.add(SUB * i).cast());
                    sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(q, ys), scale);
                }
                *result = fold(sum);
            }
            results
        }
    }

    /// See [`super::sums256::q6k`].
    ///
    /// # Safety
    /// `p` is a Q6_K tile block; the CPU has AVX-512 BW and VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q6k<const R: usize>(
        p: *const u8,
        w: usize,
        acts: [&KActBlock; R],
    ) -> [__m256i; R] {
        // SAFETY: loads stay inside the tile block and the activation blocks (see above).
        unsafe {
            let (nibble, two_bits) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(3));
            let bias = _mm512_set1_epi8(32);
            let scales = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                p.add(SCALES6 + SUPER / SUB6 * w).cast(),
            )));
            // Register `k` of 64 values: i16 lane `j` takes scale 4k + j / 8.
            let eighths = _mm512_set_epi64(
                3 * 0x0001_0001_0001_0001,
                3 * 0x0001_0001_0001_0001,
                2 * 0x0001_0001_0001_0001,
                2 * 0x0001_0001_0001_0001,
                0x0001_0001_0001_0001,
                0x0001_0001_0001_0001,
                0,
                0,
            );
            let scale = |k: usize| {
                let pick = _mm512_add_epi16(eighths, _mm512_set1_epi16(4 * k as i16));
                _mm512_permutexvar_epi16(pick, scales)
            };
            // Register `k`: values 64k..64k+64, the low (k even) or high nibbles of 64 bytes,
            // their top bits at bits 0 and 2 (k even) or 4 and 6 of 32 bytes.
            let quants = p.add(QUANTS6 + QUANT6_BYTES * w);
            let q: [__m512i; 4] = std::array::from_fn(|k| {
                let (n, high) = (k / 2, k % 2);
                let low = _mm512_loadu_si512(quants.add(64 * n).cast());
                let low = if high == 1 {
                    _mm512_srli_epi16::<4>(low)
                } else {
                    low
                };
                let top =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(quants.add(128 + 32 * n).cast()));
                let shift = 4 * high as i16;
                let shifts = _mm512_mask_blend_epi16(
                    0xffff_0000,
                    _mm512_set1_epi16(shift),
                    _mm512_set1_epi16(shift + 2),
                );
                let top = _mm512_and_si512(_mm512_srlv_epi16(top, shifts), two_bits);
                _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_slli_epi16::<4>(top))
            });
            let scales: [__m512i; 4] = std::array::from_fn(scale);
            let mut results = [_mm256_setzero_si256(); R];
            for (result, a) in results.iter_mut().zip(acts) {
                let y = a.q.as_ptr();
                let mut sum = _mm512_setzero_si512();
                for (k, (&q, &scale)) in q.iter().zip(&scales).enumerate() {
                    let ys = _mm512_loadu_si512(y.add(64 * k).cast());
                    let products = _mm512_sub_epi16(
                        _mm512_maddubs_epi16(q, ys),
                        _mm512_maddubs_epi16(bias, ys),
                    );
                    sum = _mm512_dpwssd_epi32(sum, products, scale);
                }
                *result = fold(sum);
            }
            results
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// Deterministic values in about [-1, 1] (xorshift), so the test needs no extra crate.
    pub(in crate::kernels) fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// `rows` GGUF rows of `blocks` super-blocks, quantized by candle.
    pub(in crate::kernels) fn gguf_rows(
        format: KFormat,
        rows: usize,
        blocks: usize,
        seed: u64,
    ) -> Vec<u8> {
        let t = Tensor::from_vec(
            values(seed, rows * blocks * SUPER),
            (rows, blocks * SUPER),
            &Device::Cpu,
        )
        .expect("tensor");
        let dtype = match format {
            KFormat::Q4K => GgmlDType::Q4K,
            KFormat::Q5K => GgmlDType::Q5K,
            KFormat::Q6K => GgmlDType::Q6K,
            KFormat::Q2K => GgmlDType::Q2K,
            KFormat::Q3K => GgmlDType::Q3K,
        };
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        q.data().expect("bytes").to_vec()
    }

    #[test]
    fn repacking_keeps_each_values_quant_scale_and_minimum() {
        for format in [
            KFormat::Q2K,
            KFormat::Q3K,
            KFormat::Q4K,
            KFormat::Q5K,
            KFormat::Q6K,
        ] {
            let (bytes, gguf_bytes) = (format.tile_bytes(), format.gguf_bytes());
            let gguf = gguf_rows(format, TILE, 2, 9);
            let tile = repack(format, &gguf, TILE, 2);
            assert_eq!(tile.len(), 2 * bytes);
            for b in 0..2 {
                for w in 0..TILE {
                    let row = portable::unpack(format, &tile[b * bytes..], w);
                    let block = &gguf[(w * 2 + b) * gguf_bytes..][..gguf_bytes];
                    let f16_at = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]);
                    if format == KFormat::Q3K {
                        assert_eq!(row.d, f16_at(108).to_f32());
                        // Value 128 + 64 + 5: bits 4-5 of low byte 32 + 32 + 5, high bit 4 + 2
                        // of byte 5; scale 13: high nibble of byte 5, bits 6-7 of byte 9.
                        let q = (block[32 + 37] >> 4 & 3) | (block[5] >> 6 & 1) << 2;
                        assert_eq!(row.q[197], i32::from(q) - 4);
                        let scale = (block[96 + 5] >> 4) | (block[96 + 9] >> 6) << 4;
                        assert_eq!(row.scales[13], i32::from(scale) - 32);
                        continue;
                    }
                    if format == KFormat::Q2K {
                        assert_eq!(row.d, f16_at(80).to_f32());
                        assert_eq!(row.dmin, f16_at(82).to_f32());
                        // Value 128 + 64 + 5: bits 4-5 of quant byte 32 + 5; its scale and
                        // minimum are the nibbles of scale byte 12.
                        assert_eq!(row.q[197], i32::from(block[16 + 37] >> 4 & 3));
                        assert_eq!(row.scales[12], i32::from(block[12] & 0x0f));
                        assert_eq!(row.mins[12], i32::from(block[12] >> 4));
                        continue;
                    }
                    if format == KFormat::Q6K {
                        assert_eq!(row.d, f16_at(208).to_f32());
                        // Value 128 + 64 + 32 + 3: high nibble of byte 64 + 32 + 3, bits 6-7
                        // of high byte 128 + 32 + 3; scale 12 is scale byte 12.
                        let q = (block[99] >> 4) | ((block[163] >> 6) << 4);
                        assert_eq!(row.q[227], i32::from(q) - 32);
                        assert_eq!(row.scales[12], i32::from(block[192 + 12] as i8));
                        continue;
                    }
                    assert_eq!(row.d, f16_at(0).to_f32());
                    assert_eq!(row.dmin, f16_at(2).to_f32());
                    // Value 64c + 32 + l is the high nibble of byte 32c + l; Q5_K's fifth bit
                    // of value 32i + l is bit i of byte l.
                    let (nibbles, five) = match format {
                        KFormat::Q5K => (48, 1),
                        _ => (16, 0),
                    };
                    let fifth = |l: usize, i: usize| five * (block[16 + l] >> i & 1);
                    let q = (block[nibbles + 32 + 5] >> 4) + 16 * fifth(5, 3);
                    assert_eq!(row.q[64 + 32 + 5], i32::from(q));
                    let q = (block[nibbles + 96 + 8] & 0x0f) + 16 * fifth(8, 6);
                    assert_eq!(row.q[200], i32::from(q));
                    // Sub-block 5: low nibble of byte 9, top bits of byte 1.
                    let packed = &block[4..16];
                    let five = (packed[9] & 0x0f) | ((packed[1] >> 6) << 4);
                    assert_eq!(row.scales[10..12], [i32::from(five); 2]);
                    // Sub-block 2's minimum (values 64..96, sixteens 4 and 5).
                    assert_eq!(row.mins[4..6], [i32::from(packed[6] & 63); 2]);
                }
            }
        }
    }

    #[test]
    fn activations_quantize_as_candles_q8k() {
        let mut xs = values(3, 2 * SUPER);
        xs[7] = -1.5;
        xs[SUPER..].fill(0.0);
        let a = KActBlock::quantize_all(KernelPath::Portable, &xs);
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].q[7], a[0].d), (-127, 1.0 / (-127.0 / -1.5)));
        assert_eq!(
            a[0].sums[3],
            a[0].q[96..128].iter().map(|&q| i16::from(q)).sum::<i16>()
        );
        assert_eq!((a[1].d, a[1].q, a[1].sums), (0.0, [0; SUPER], [0; SUBS]));
    }

    /// candle's portable Q8_K quantizer, the one it runs on x86-64; on aarch64 its NEON
    /// quantizer scales by the absolute maximum instead, so there is nothing to compare with.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn activations_equal_candles_q8k_bit_for_bit() {
        let mut xs = values(8, 6 * SUPER);
        // Ties (the largest value 127 makes the scale -1), ties of the largest magnitude,
        // infinities, NaN, zeros, tiny and huge values.
        for (i, x) in xs[..SUPER].iter_mut().enumerate() {
            *x = if i == 0 {
                -127.0
            } else {
                (i as f32 - 128.0) / 2.0
            };
        }
        xs[SUPER + 3] = 0.9999;
        xs[SUPER + 9] = -0.9999;
        xs[2 * SUPER + 1] = f32::INFINITY;
        xs[3 * SUPER + 2] = f32::NAN;
        xs[4 * SUPER..5 * SUPER]
            .iter_mut()
            .for_each(|x| *x *= 1e-40);
        xs[5 * SUPER..].iter_mut().for_each(|x| *x *= 1e30);
        let t = Tensor::from_vec(xs.clone(), (6, SUPER), &Device::Cpu).expect("tensor");
        let theirs = QTensor::quantize(&t, GgmlDType::Q8K).expect("quantize");
        let theirs = theirs.data().expect("bytes");
        for path in KernelPath::all_supported() {
            let ours = KActBlock::quantize_all(path, &xs);
            // candle's block: d (f32), 256 quants, sixteen i16 sums of 16.
            for (a, block) in ours.iter().zip(theirs.chunks_exact(4 + SUPER + 32)) {
                let d = f32::from_le_bytes(block[..4].try_into().expect("4 bytes"));
                assert_eq!(a.d.to_bits(), d.to_bits(), "{path}");
                assert_eq!(a.q.map(|q| q as u8), block[4..4 + SUPER], "{path}");
                let sums16: Vec<i16> = block[4 + SUPER..]
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let sums32: Vec<i16> = sums16.chunks_exact(2).map(|s| s[0] + s[1]).collect();
                assert_eq!(a.sums[..], sums32, "{path}");
                assert_eq!(a.sums16[..], sums16, "{path}");
            }
        }
    }

    #[test]
    fn every_path_equals_the_portable_code_bit_for_bit() {
        for format in [
            KFormat::Q2K,
            KFormat::Q3K,
            KFormat::Q4K,
            KFormat::Q5K,
            KFormat::Q6K,
        ] {
            for blocks in [1, 3] {
                let gguf = gguf_rows(format, TILE, blocks, 11 + blocks as u64);
                let tile = repack(format, &gguf, TILE, blocks);
                let rows: Vec<Vec<KActBlock>> = (0..4)
                    .map(|i| {
                        KActBlock::quantize_all(
                            KernelPath::Portable,
                            &values(50 + i, blocks * SUPER),
                        )
                    })
                    .collect();
                let four = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                let mut reference = [[0f32; TILE]; 4];
                portable::dot_tile(format, &tile, blocks, four, &mut reference);
                for path in KernelPath::all_supported() {
                    let mut fast = [[0f32; TILE]; 4];
                    dot_tile(path, format, &tile, four, &mut fast);
                    assert_eq!(
                        fast.map(|r| r.map(f32::to_bits)),
                        reference.map(|r| r.map(f32::to_bits)),
                        "{path} {format:?}"
                    );
                    for (r, row) in rows.iter().enumerate() {
                        let mut one = [[0f32; TILE]; 1];
                        dot_tile(path, format, &tile, [row], &mut one);
                        let alone = one[0].map(f32::to_bits);
                        assert_eq!(alone, fast[r].map(f32::to_bits), "{path} {format:?}");
                    }
                }
            }
        }
    }
}
