//! Dot products of a tile of four Q4_K weight rows with up to four activation rows quantized to
//! Q8_K, the K-quant counterpart of [`super::dot`].
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
//! The arithmetic is candle's AVX2 kernel's, operation for operation: per (weight row,
//! activation row) pair, eight i32 lanes, lane `l` summing `sc·(q·y)` over values `4l..4l+4` of
//! every sub-block; per super-block, eight float lanes `+= d·d_y · lane` (fused) and four lanes
//! for the minimums (lane `l`: sub-blocks `2l` and `2l+1`) `+= −d_y·dmin · (m·Σy)`, summed at
//! the end in candle's order. So outputs equal candle's bit for bit on x86-64 CPUs with AVX2
//! (candle's portable fallback orders its sums differently).
//!
//! Three implementations compute the same bits, chosen at run time by [`KernelPath`]: portable
//! Rust, AVX2 (`maddubs` then `madd` with the scale), and AVX-512 VNNI, whose `vpdpwssd` fuses
//! the scale's multiply-add.

use half::f16;

use super::KernelPath;
use super::dot::TILE;

/// Values per super-block (weights and activations alike).
pub(crate) const SUPER: usize = 256;

/// Values per sub-block, which has its own scale and minimum.
const SUB: usize = 32;

/// Sub-blocks per super-block.
const SUBS: usize = SUPER / SUB;

/// Bytes of a GGUF Q4_K block: `d`, `dmin`, 12 bytes of packed scales, 128 of nibbles.
pub(crate) const GGUF_BYTES: usize = 144;

/// Bytes of one row's super-block in a tile (see the module doc).
const ROW_BYTES: usize = 148;

/// Bytes of one super-block of a tile of four rows.
pub(crate) const TILE_BYTES: usize = TILE * ROW_BYTES;

/// Offsets in a tile block: the four `d`, the four `dmin`, the scales, the minimums, the quants.
const D: usize = 0;
const DMIN: usize = 8;
const SCALES: usize = 16;
const MINS: usize = SCALES + TILE * SUBS;
const QUANTS: usize = MINS + TILE * SUBS;

/// 256 activations quantized to 8 bits (candle's and ggml's Q8_K): value ≈ `d · q`, and
/// `sums[i]` = `Σq` over sub-block `i`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KActBlock {
    pub(crate) d: f32,
    pub(crate) q: [i8; SUPER],
    pub(crate) sums: [i16; SUBS],
}

impl KActBlock {
    /// Quantizes each block of 256 values of `xs` as candle's Q8_K code does: the value of
    /// largest magnitude (the first, on ties) maps to −127, `q = round(x · −127/max)`.
    pub(crate) fn quantize_all(xs: &[f32]) -> Vec<Self> {
        xs.chunks_exact(SUPER).map(Self::quantize).collect()
    }

    fn quantize(xs: &[f32]) -> Self {
        let mut block = Self {
            d: 0.0,
            q: [0; SUPER],
            sums: [0; SUBS],
        };
        let (mut max, mut amax) = (0f32, 0f32);
        for &x in xs {
            if amax < x.abs() {
                amax = x.abs();
                max = x;
            }
        }
        if amax == 0.0 {
            return block;
        }
        let iscale = -127.0 / max;
        for (q, &x) in block.q.iter_mut().zip(xs) {
            *q = (iscale * x).round().clamp(-128.0, 127.0) as i8;
        }
        for (sum, q) in block.sums.iter_mut().zip(block.q.chunks_exact(SUB)) {
            *sum = q.iter().map(|&q| i16::from(q)).sum();
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

/// Repacks `rows` rows (a multiple of [`TILE`]) of `blocks` GGUF Q4_K blocks each into tiles
/// (see the module doc).
pub(crate) fn repack(gguf: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let mut packed = vec![0u8; rows * blocks * ROW_BYTES];
    for (t, tile) in packed.chunks_exact_mut(blocks * TILE_BYTES).enumerate() {
        for (b, out) in tile.chunks_exact_mut(TILE_BYTES).enumerate() {
            for w in 0..TILE {
                let at = ((t * TILE + w) * blocks + b) * GGUF_BYTES;
                let block = &gguf[at..at + GGUF_BYTES];
                out[D + 2 * w..D + 2 * w + 2].copy_from_slice(&block[0..2]);
                out[DMIN + 2 * w..DMIN + 2 * w + 2].copy_from_slice(&block[2..4]);
                for j in 0..SUBS {
                    let (sc, m) = scale_min(j, &block[4..16]);
                    out[SCALES + SUBS * w + j] = sc;
                    out[MINS + SUBS * w + j] = m;
                }
                let quants = &mut out[QUANTS + 128 * w..QUANTS + 128 * (w + 1)];
                // GGUF: byte 32c + l holds value 64c + l low and 64c + 32 + l high.
                for (i, &byte) in block[16..].iter().enumerate() {
                    let (c, l) = (i / 32, i % 32);
                    for (v, q) in [(64 * c + l, byte & 0x0f), (64 * c + 32 + l, byte >> 4)] {
                        let (at, high) = nibble_at(v);
                        quants[at] |= if high { q << 4 } else { q };
                    }
                }
            }
        }
    }
    packed
}

/// Dots one tile (`blocks` super-blocks of four rows, as [`repack`] lays them out) with each of
/// the `R` activation rows on `path`: `out[r][w]` is weight row `w` times activation row `r`.
pub(crate) fn dot_tile<const R: usize>(
    path: KernelPath,
    tile: &[u8],
    acts: [&[KActBlock]; R],
    out: &mut [[f32; TILE]; R],
) {
    let blocks = tile.len() / TILE_BYTES;
    assert!(acts.iter().all(|a| a.len() == blocks));
    assert_eq!(tile.len(), blocks * TILE_BYTES);
    // SAFETY (both SIMD paths): a path runs only where the CPU has its features, and every
    // load stays inside `tile` and `acts`, whose lengths were checked above.
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni => unsafe { vnni::dot_tile(tile, blocks, acts, out) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { avx2::dot_tile(tile, blocks, acts, out) },
        _ => portable::dot_tile(tile, blocks, acts, out),
    }
}

/// The portable kernel, lane by lane as candle's AVX2 one (see the module doc).
pub(crate) mod portable {
    use super::*;

    /// One row of a tile block: its 256 quants in order, scales, minimums, `d` and `dmin`.
    pub(crate) struct Row {
        pub(crate) q: [u8; SUPER],
        pub(crate) scales: [u8; SUBS],
        pub(crate) mins: [u8; SUBS],
        pub(crate) d: f32,
        pub(crate) dmin: f32,
    }

    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    }

    /// Row `w` of one tile block.
    pub(crate) fn unpack(block: &[u8], w: usize) -> Row {
        let quants = &block[QUANTS + 128 * w..QUANTS + 128 * (w + 1)];
        let sub = |from: usize| -> [u8; SUBS] {
            block[from + SUBS * w..from + SUBS * (w + 1)]
                .try_into()
                .expect("eight bytes")
        };
        Row {
            q: std::array::from_fn(|v| {
                let (at, high) = nibble_at(v);
                if high {
                    quants[at] >> 4
                } else {
                    quants[at] & 0x0f
                }
            }),
            scales: sub(SCALES),
            mins: sub(MINS),
            d: f16_at(block, D + 2 * w),
            dmin: f16_at(block, DMIN + 2 * w),
        }
    }

    /// Sum of eight lanes in candle's order (`hsum_float_8`), then its four minimum lanes.
    fn total(lanes: [f32; 8], mins: [f32; 4]) -> f32 {
        let a = [
            lanes[4] + lanes[0],
            lanes[5] + lanes[1],
            lanes[6] + lanes[2],
            lanes[7] + lanes[3],
        ];
        (a[0] + a[2]) + (a[1] + a[3]) + ((mins[0] + mins[2]) + (mins[1] + mins[3]))
    }

    /// See [`super::dot_tile`].
    pub(crate) fn dot_tile<const R: usize>(
        tile: &[u8],
        blocks: usize,
        acts: [&[KActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        let mut lanes = [[[0f32; 8]; TILE]; R];
        let mut mins = [[[0f32; 4]; TILE]; R];
        for b in 0..blocks {
            let block = &tile[b * TILE_BYTES..(b + 1) * TILE_BYTES];
            for w in 0..TILE {
                let row = unpack(block, w);
                for r in 0..R {
                    let a = &acts[r][b];
                    let mut sums = [0i32; 8];
                    for (i, &sc) in row.scales.iter().enumerate() {
                        for (l, sum) in sums.iter_mut().enumerate() {
                            let dot: i32 = (SUB * i + 4 * l..SUB * i + 4 * l + 4)
                                .map(|t| i32::from(row.q[t]) * i32::from(a.q[t]))
                                .sum();
                            *sum += i32::from(sc) * dot;
                        }
                    }
                    let scale = a.d * row.d;
                    for (lane, &sum) in lanes[r][w].iter_mut().zip(&sums) {
                        *lane = scale.mul_add(sum as f32, *lane);
                    }
                    let scale = -a.d * row.dmin;
                    for (l, lane) in mins[r][w].iter_mut().enumerate() {
                        let m = |i: usize| i32::from(row.mins[i]) * i32::from(a.sums[i]);
                        *lane = scale.mul_add((m(2 * l) + m(2 * l + 1)) as f32, *lane);
                    }
                }
            }
        }
        for r in 0..R {
            for w in 0..TILE {
                out[r][w] = total(lanes[r][w], mins[r][w]);
            }
        }
    }
}

/// The SIMD kernels, written once and compiled twice: into `avx2` for AVX2, FMA and F16C, and
/// into `vnni` with AVX-512 VNNI and VL too, whose `vpdpwssd` adds the scaled products.
macro_rules! k_kernels {
    ($module:ident, $features:literal, |$acc:ident, $products:ident, $scale:ident| $add:expr) => {
        // VNNI's intrinsic is stable since Rust 1.89, which an x86-64 build needs; the
        // workspace's older MSRV holds for other targets.
        #[allow(clippy::incompatible_msrv)]
        mod $module {
            use std::arch::x86_64::*;

            use super::*;

            /// `acc` plus the pairs of i16 `products` times the i16 `scale`, summed in pairs.
            #[inline]
            #[target_feature(enable = $features)]
            fn add_scaled($acc: __m256i, $products: __m256i, $scale: __m256i) -> __m256i {
                $add
            }

            /// Sum of eight float lanes in the order of candle's `hsum_float_8`.
            #[inline]
            #[target_feature(enable = $features)]
            fn hsum8(x: __m256) -> f32 {
                let hi = _mm256_extractf128_ps(x, 1);
                let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// Sum of four float lanes in candle's order: `(x0 + x2) + (x1 + x3)`.
            #[inline]
            #[target_feature(enable = $features)]
            fn hsum4(x: __m128) -> f32 {
                let s = _mm_add_ps(x, _mm_movehl_ps(x, x));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// See [`super::dot_tile`].
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks and every row of `acts` `blocks` blocks.
            // Block `b` addresses both the tile's bytes and each activation row.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_tile<const R: usize>(
                tile: &[u8],
                blocks: usize,
                acts: [&[KActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                // SAFETY: the CPU has the features; loads stay inside the blocks (see above).
                unsafe {
                    let nibble = _mm256_set1_epi8(0x0f);
                    let mut lanes = [[_mm256_setzero_ps(); TILE]; R];
                    // Rows 0 and 1 (four lanes each), then rows 2 and 3.
                    let mut mins = [[_mm256_setzero_ps(); 2]; R];
                    for b in 0..blocks {
                        let p = tile.as_ptr().add(b * TILE_BYTES);
                        let mut d = [0f32; TILE];
                        _mm_storeu_ps(
                            d.as_mut_ptr(),
                            _mm_cvtph_ps(_mm_loadl_epi64(p.add(D).cast())),
                        );
                        let dmin = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(
                            p.add(DMIN).cast(),
                        )));
                        let dmin = [
                            _mm256_permutevar8x32_ps(
                                dmin,
                                _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                            ),
                            _mm256_permutevar8x32_ps(
                                dmin,
                                _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                            ),
                        ];
                        let m = [0, 1].map(|h| {
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(MINS + 16 * h).cast()))
                        });
                        for r in 0..R {
                            let a = &acts[r][b];
                            let sums = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                a.sums.as_ptr().cast(),
                            ));
                            let neg = _mm256_set1_ps(-a.d);
                            for h in 0..2 {
                                mins[r][h] = _mm256_fmadd_ps(
                                    _mm256_mul_ps(neg, dmin[h]),
                                    _mm256_cvtepi32_ps(_mm256_madd_epi16(m[h], sums)),
                                    mins[r][h],
                                );
                            }
                        }
                        for w in 0..TILE {
                            let scales = p.add(SCALES + SUBS * w);
                            let scale = |i: usize| _mm256_set1_epi16(i16::from(*scales.add(i)));
                            let quants = p.add(QUANTS + 128 * w);
                            // Load `g` holds sub-blocks 4h + c (low nibbles) and 4h + 2 + c.
                            let subs: [[__m256i; 2]; 4] = std::array::from_fn(|g| {
                                let x = _mm256_loadu_si256(quants.add(32 * g).cast());
                                [
                                    _mm256_and_si256(x, nibble),
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(x), nibble),
                                ]
                            });
                            for r in 0..R {
                                let a = &acts[r][b];
                                let y = a.q.as_ptr();
                                let mut sum = _mm256_setzero_si256();
                                for (g, pair) in subs.iter().enumerate() {
                                    for (half, &q) in pair.iter().enumerate() {
                                        let i = 4 * (g / 2) + g % 2 + 2 * half;
                                        let ys = _mm256_loadu_si256(y.add(SUB * i).cast());
                                        sum =
                                            add_scaled(sum, _mm256_maddubs_epi16(q, ys), scale(i));
                                    }
                                }
                                lanes[r][w] = _mm256_fmadd_ps(
                                    _mm256_set1_ps(a.d * d[w]),
                                    _mm256_cvtepi32_ps(sum),
                                    lanes[r][w],
                                );
                            }
                        }
                    }
                    for r in 0..R {
                        for w in 0..TILE {
                            let pair = mins[r][w / 2];
                            let m = if w % 2 == 0 {
                                _mm256_castps256_ps128(pair)
                            } else {
                                _mm256_extractf128_ps::<1>(pair)
                            };
                            out[r][w] = hsum8(lanes[r][w]) + hsum4(m);
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
k_kernels!(avx2, "avx2,fma,f16c", |acc, products, scale| {
    _mm256_add_epi32(acc, _mm256_madd_epi16(products, scale))
});
#[cfg(target_arch = "x86_64")]
k_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |acc, products, scale| _mm256_dpwssd_epi32(acc, products, scale)
);

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// Deterministic values in about [-1, 1] (xorshift), so the test needs no extra crate.
    fn values(seed: u64, n: usize) -> Vec<f32> {
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

    /// `rows` GGUF Q4_K rows of `blocks` super-blocks, quantized by candle.
    fn gguf_rows(rows: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let t = Tensor::from_vec(
            values(seed, rows * blocks * SUPER),
            (rows, blocks * SUPER),
            &Device::Cpu,
        )
        .expect("tensor");
        let q = QTensor::quantize(&t, GgmlDType::Q4K).expect("quantize");
        q.data().expect("bytes").to_vec()
    }

    #[test]
    fn repacking_keeps_each_values_quant_scale_and_minimum() {
        let gguf = gguf_rows(TILE, 2, 9);
        let tile = repack(&gguf, TILE, 2);
        assert_eq!(tile.len(), 2 * TILE_BYTES);
        for b in 0..2 {
            for w in 0..TILE {
                let row = portable::unpack(&tile[b * TILE_BYTES..], w);
                let block = &gguf[(w * 2 + b) * GGUF_BYTES..][..GGUF_BYTES];
                assert_eq!(row.d, f16::from_le_bytes([block[0], block[1]]).to_f32());
                assert_eq!(row.dmin, f16::from_le_bytes([block[2], block[3]]).to_f32());
                // Value 64c + 32 + l is the high nibble of byte 32c + l.
                assert_eq!(row.q[64 + 32 + 5], block[16 + 32 + 5] >> 4);
                assert_eq!(row.q[200], block[16 + 96 + 8] & 0x0f);
                // Sub-block 5: low nibble of byte 9, top bits of byte 1.
                let packed = &block[4..16];
                assert_eq!(row.scales[5], (packed[9] & 0x0f) | ((packed[1] >> 6) << 4));
                assert_eq!(row.mins[2], packed[6] & 63);
            }
        }
    }

    #[test]
    fn activations_quantize_as_candles_q8k() {
        let mut xs = values(3, 2 * SUPER);
        xs[7] = -1.5;
        xs[SUPER..].fill(0.0);
        let a = KActBlock::quantize_all(&xs);
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].q[7], a[0].d), (-127, 1.0 / (-127.0 / -1.5)));
        assert_eq!(
            a[0].sums[3],
            a[0].q[96..128].iter().map(|&q| i16::from(q)).sum::<i16>()
        );
        assert_eq!((a[1].d, a[1].q, a[1].sums), (0.0, [0; SUPER], [0; SUBS]));
    }

    #[test]
    fn every_path_equals_the_portable_code_bit_for_bit() {
        for blocks in [1, 3] {
            let tile = repack(&gguf_rows(TILE, blocks, 11 + blocks as u64), TILE, blocks);
            let rows: Vec<Vec<KActBlock>> = (0..4)
                .map(|i| KActBlock::quantize_all(&values(50 + i, blocks * SUPER)))
                .collect();
            let four = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
            let mut reference = [[0f32; TILE]; 4];
            portable::dot_tile(&tile, blocks, four, &mut reference);
            for path in KernelPath::all_supported() {
                let mut fast = [[0f32; TILE]; 4];
                dot_tile(path, &tile, four, &mut fast);
                assert_eq!(
                    fast.map(|r| r.map(f32::to_bits)),
                    reference.map(|r| r.map(f32::to_bits)),
                    "{path}"
                );
                for (r, row) in rows.iter().enumerate() {
                    let mut one = [[0f32; TILE]; 1];
                    dot_tile(path, &tile, [row], &mut one);
                    assert_eq!(
                        one[0].map(f32::to_bits),
                        fast[r].map(f32::to_bits),
                        "{path}"
                    );
                }
            }
        }
    }
}
