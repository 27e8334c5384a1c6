//! Dot products of a tile of four quantized weight rows with up to four quantized activation
//! rows.
//!
//! Weights are repacked at load time into tiles: for each block of 32 columns, the four rows'
//! scales (and Q4_1 minimums) side by side, then their quants. One load brings four rows'
//! scales, each weight block is unpacked once for every activation row, and four weight rows
//! give four independent accumulations to overlap. Each (weight row, activation row) pair keeps
//! its own accumulator and sees the same operations in the same order whatever else shares the
//! call, so a row's result never depends on which other rows are in the batch.
//!
//! Q4_1, Q5_0, Q5_1 and Q8_0 do candle's arithmetic, operation for operation: Q8_0 accumulates in
//! eight float lanes summed in the order of candle's AVX2 kernel, Q4_1 and the five-bit formats
//! sum each block exactly in integers and accumulate sequentially as candle's generic kernels do. So those models'
//! outputs equal candle-transformers' bit for bit; that matters because every product
//! re-quantizes its input to 8 bits, which turns any rounding difference into a visible one a
//! few layers later. Q4_0 sums each block exactly in integers as Q4_1 does (one float product
//! per block instead of candle's eight lanes: fewer instructions and no rounding inside a
//! block), so its outputs differ from candle's by rounding.
//!
//! Four implementations compute bit-identical results, chosen at run time by [`KernelPath`]:
//! AVX2 (with FMA and F16C), the same with VNNI's `vpdpbusd`, NEON on aarch64, and portable
//! Rust.

use half::f16;

use super::KernelPath;

/// Values per quantization block, for weights and activations alike.
pub(crate) const BLOCK: usize = 32;

/// Weight rows per tile.
pub(crate) const TILE: usize = 4;

/// 32 activations quantized to 8 bits: value ≈ `d * q`. `s` is `d * Σq` rounded through f16
/// as candle's Q8_1 does; only the Q4_1 kernel needs it. `sum` is `Σq` exactly, which takes
/// Q4_0's offset of 8 out of a product with its unsigned nibbles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActBlock {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) sum: i32,
    pub(crate) q: [i8; BLOCK],
}

impl ActBlock {
    /// Quantizes each block of 32 values of `xs` the way candle's (and ggml's) reference
    /// Q8_0/Q8_1 code does, with AVX-512 on that path (same results). Long inputs (prefill,
    /// batches) are quantized on the thread pool.
    pub(crate) fn quantize_all(path: KernelPath, xs: &[f32]) -> Vec<Self> {
        let empty = Self {
            d: 0.0,
            s: 0.0,
            sum: 0,
            q: [0; BLOCK],
        };
        super::quantize_rows(xs, BLOCK, empty, |xs, out| match path {
            // SAFETY: the path runs only where the CPU has AVX-512 F and BW, and F16C.
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni | KernelPath::Amx => unsafe { avx512::quantize_all(xs, out) },
            _ => {
                for (xs, block) in xs.chunks_exact(BLOCK).zip(out) {
                    *block = portable::quantize(xs.try_into().expect("a block of 32 values"));
                }
            }
        })
    }

    /// The block with scale `d` (before rounding through f16), quants `q` summing to `sum`.
    fn new(d: f32, q: [i8; BLOCK], sum: i32) -> Self {
        let d16 = f16::from_f32(d);
        Self {
            d: d16.to_f32(),
            s: (f16::from_f32(sum as f32) * d16).to_f32(),
            sum,
            q,
        }
    }
}

/// Quantization of activations with AVX-512 (its rounding helpers serve the Q8_K quantizer of
/// [`super::kquant`] too).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{ActBlock, BLOCK};

    /// See [`ActBlock::quantize_all`]. A loop rather than an iterator chain, and helper
    /// functions rather than closures, so that all of it is compiled with AVX-512 (a closure
    /// does not get its function's target features, and in a plain build was left a call per
    /// vector).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW, and F16C.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    pub(super) unsafe fn quantize_all(xs: &[f32], out: &mut [ActBlock]) {
        for (xs, block) in xs.chunks_exact(BLOCK).zip(out) {
            // SAFETY: the CPU has AVX-512 F and BW, and F16C (see above).
            *block = unsafe { quantize(xs.try_into().expect("a block of 32 values")) };
        }
    }

    /// The scalar code's operations on sixteen lanes. NaN counts as 0 in the maximum (as
    /// `f32::max` skips it) and becomes 0, and the conversion to i8 saturates, as `as i8` does;
    /// rounding is half away from zero, as `f32::round`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW, and F16C.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn quantize(xs: &[f32; BLOCK]) -> ActBlock {
        // SAFETY: the CPU has AVX-512 F and BW; `xs` holds 32 values.
        unsafe {
            let x = [
                _mm512_loadu_ps(xs.as_ptr()),
                _mm512_loadu_ps(xs.as_ptr().add(16)),
            ];
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs_or_zero(x[0]), abs_or_zero(x[1])));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = [round_to_i32(x[0], id), round_to_i32(x[1], id)];
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            let mut bytes = [0i8; BLOCK];
            _mm_storeu_si128(bytes.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q[0]));
            _mm_storeu_si128(
                bytes.as_mut_ptr().add(16).cast(),
                _mm512_cvtepi32_epi8(q[1]),
            );
            // What `ActBlock::new` computes with `half`, with the F16C instructions (both round
            // to nearest even), so that no call to `half` is left per block.
            let d16 = to_f16(d);
            ActBlock {
                d: d16,
                s: to_f16(to_f16(sum as f32) * d16),
                sum,
                q: bytes,
            }
        }
    }

    /// `|v|` in each lane, with NaN as 0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(in crate::kernels) fn abs_or_zero(v: __m512) -> __m512 {
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), _mm512_abs_ps(v))
    }

    /// Each lane of `x · id` rounded half away from zero, saturated to i8's range (NaN as 0).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(in crate::kernels) fn round_to_i32(x: __m512, id: f32) -> __m512i {
        let v = _mm512_mul_ps(x, _mm512_set1_ps(id));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        // `v - t` is exact; a fraction of at least one half rounds away from zero.
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
            _mm512_abs_ps(_mm512_sub_ps(v, t)),
            _mm512_set1_ps(0.5),
        );
        // ±1 with `v`'s sign, by integer and/or (the float forms need AVX-512 DQ).
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let one = _mm512_or_si512(_mm512_castps_si512(_mm512_set1_ps(1.0)), sign);
        let r = _mm512_mask_add_ps(t, away, t, _mm512_castsi512_ps(one));
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        _mm512_maskz_mov_epi32(
            _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v),
            _mm512_cvtps_epi32(r),
        )
    }

    /// `x` rounded through f16 (to nearest even, as `half::f16::from_f32`).
    #[inline]
    #[target_feature(enable = "f16c")]
    fn to_f16(x: f32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(x),
        )))
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
    /// f16 scale, 32 five-bit values biased by 16: their fifth bits (4 bytes), then nibbles.
    Q5_0,
    /// f16 scale and minimum, 32 five-bit values: their fifth bits (4 bytes), then nibbles.
    Q5_1,
}

impl Format {
    /// Bytes of one GGUF block of 32 weights.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
        }
    }

    /// Whether blocks carry a minimum (weight = `d·q + m`).
    pub(crate) fn has_min(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q5_1)
    }

    /// Bytes of the scales (and minimums) that start a GGUF block.
    fn header_bytes(self) -> usize {
        if self.has_min() { 4 } else { 2 }
    }

    /// Bytes of the quants of one row in one block.
    fn quant_bytes(self) -> usize {
        self.block_bytes() - self.header_bytes()
    }
}

/// Repacks `rows` rows (a multiple of [`TILE`]) of `blocks` GGUF blocks each into tiles: per
/// tile and block, the four scales, then for Q4_1 and Q5_1 the four minimums, then the four rows'
/// quants.
/// The size is unchanged.
pub(crate) fn repack(format: Format, gguf: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let qb = format.quant_bytes();
    let mut packed = Vec::with_capacity(gguf.len());
    for tile in 0..rows / TILE {
        for b in 0..blocks {
            let block = |w: usize| {
                let at = ((tile * TILE + w) * blocks + b) * bb;
                &gguf[at..at + bb]
            };
            for w in 0..TILE {
                packed.extend_from_slice(&block(w)[0..2]);
            }
            if format.has_min() {
                for w in 0..TILE {
                    packed.extend_from_slice(&block(w)[2..4]);
                }
            }
            for w in 0..TILE {
                packed.extend_from_slice(&block(w)[bb - qb..]);
            }
        }
    }
    packed
}

/// Dots one tile (`blocks` blocks of four rows, as [`repack`] lays them out) with each of the
/// `R` activation rows on `path`: `out[r][w]` is weight row `w` times activation row `r`.
pub(crate) fn dot_tile<const R: usize>(
    path: KernelPath,
    format: Format,
    tile: &[u8],
    acts: [&[ActBlock]; R],
    out: &mut [[f32; TILE]; R],
) {
    let blocks = tile.len() / (TILE * format.block_bytes());
    assert!(acts.iter().all(|a| a.len() == blocks));
    assert_eq!(tile.len(), blocks * TILE * format.block_bytes());
    // SAFETY (both SIMD paths): a path runs only where the CPU has its features, and every
    // load stays inside `tile` and `acts`, whose lengths were checked above.
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni | KernelPath::Amx => unsafe {
            vnni::dot_tile(format, tile, blocks, acts, out)
        },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { avx2::dot_tile(format, tile, blocks, acts, out) },
        #[cfg(target_arch = "aarch64")]
        KernelPath::Neon => unsafe { neon::dot_tile(format, tile, blocks, acts, out) },
        _ => portable::dot_tile(format, tile, blocks, acts, out),
    }
}

/// Portable kernels: for Q8_0 eight float lanes, lane `u` holding the products of values
/// `4u..4u+4` (candle's arithmetic); for Q4_0 and Q4_1 one exact integer sum per block.
pub(crate) mod portable {
    use half::f16;

    use super::{ActBlock, BLOCK, Format, TILE};

    /// See [`ActBlock::quantize_all`].
    pub(crate) fn quantize(xs: &[f32; BLOCK]) -> ActBlock {
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; BLOCK];
        let mut sum = 0i32;
        for (q, &x) in q.iter_mut().zip(xs) {
            *q = (x * id).round() as i8;
            sum += i32::from(*q);
        }
        ActBlock::new(d, q, sum)
    }

    pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    }

    /// One tile block's four rows: their 32 values in order (signed for Q4_0 and Q8_0), their
    /// scales and their minimums (zero but for Q4_1).
    pub(crate) fn unpack(format: Format, block: &[u8]) -> [([i32; BLOCK], f32, f32); TILE] {
        let quants = TILE * format.header_bytes();
        let qb = format.quant_bytes();
        std::array::from_fn(|w| {
            let qs = &block[quants + w * qb..quants + (w + 1) * qb];
            let mut v = [0i32; BLOCK];
            match format {
                Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => {
                    let bias = match format {
                        Format::Q4_0 => 8,
                        Format::Q5_0 => 16,
                        _ => 0,
                    };
                    let (fifth, nibbles) = match format {
                        Format::Q5_0 | Format::Q5_1 => {
                            let (fifth, nibbles) = qs.split_at(4);
                            let fifth = u32::from_le_bytes(fifth.try_into().expect("4 bytes"));
                            (fifth, nibbles)
                        }
                        _ => (0, qs),
                    };
                    let high = |j: usize| ((fifth >> j & 1) << 4) as i32;
                    for (j, &b) in nibbles.iter().enumerate() {
                        v[j] = (i32::from(b & 0x0f) | high(j)) - bias;
                        v[j + 16] = (i32::from(b >> 4) | high(j + 16)) - bias;
                    }
                }
                Format::Q8_0 => {
                    for (v, &b) in v.iter_mut().zip(qs) {
                        *v = i32::from(b as i8);
                    }
                }
            }
            let min = if format.has_min() {
                f16_at(block, 2 * TILE + 2 * w)
            } else {
                0.0
            };
            (v, f16_at(block, 2 * w), min)
        })
    }

    /// Sum of eight lanes in the order of the AVX2 kernel's horizontal sum (candle's
    /// `hsum_float_8`), shared with the portable K-quant kernels.
    pub(in crate::kernels) fn hsum8(x: [f32; 8]) -> f32 {
        let a = [x[4] + x[0], x[5] + x[1], x[6] + x[2], x[7] + x[3]];
        let b = [a[0] + a[2], a[1] + a[3]];
        b[0] + b[1]
    }

    /// See [`super::dot_tile`].
    pub(crate) fn dot_tile<const R: usize>(
        format: Format,
        tile: &[u8],
        blocks: usize,
        acts: [&[ActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        let bytes = TILE * format.block_bytes();
        let mut lanes = [[[0f32; 8]; TILE]; R];
        let mut sums = [[0f32; TILE]; R];
        for b in 0..blocks {
            let rows = unpack(format, &tile[b * bytes..(b + 1) * bytes]);
            for r in 0..R {
                let a = &acts[r][b];
                for (w, (v, d, min)) in rows.iter().enumerate() {
                    let dot = |t: std::ops::Range<usize>| -> i32 {
                        t.map(|t| v[t] * i32::from(a.q[t])).sum()
                    };
                    if format.has_min() {
                        sums[r][w] += dot(0..BLOCK) as f32 * d * a.d + min * a.s;
                    } else if format != Format::Q8_0 {
                        sums[r][w] += dot(0..BLOCK) as f32 * d * a.d;
                    } else {
                        let scale = d * a.d;
                        for (u, lane) in lanes[r][w].iter_mut().enumerate() {
                            *lane = scale.mul_add(dot(4 * u..4 * u + 4) as f32, *lane);
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for w in 0..TILE {
                out[r][w] = if format != Format::Q8_0 {
                    sums[r][w]
                } else {
                    hsum8(lanes[r][w])
                };
            }
        }
    }
}

/// The AVX2 kernels, written once and compiled twice: into `avx2` for AVX2, FMA and F16C, and
/// into `vnni` with AVX-512 VNNI and VL too, whose `vpdpbusd` does the byte products.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_kernels {
    ($module:ident, $features:literal, |$w:ident, $y:ident| $dot:expr) => {
        pub(super) mod $module {
            use std::arch::x86_64::*;

            use super::{ActBlock, Format, TILE};

            /// Unsigned bytes times signed bytes, summed in groups of four into eight i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            fn dot_u8_i8($w: __m256i, $y: __m256i) -> __m256i {
                $dot
            }

            /// Exact sums of four vectors of eight i32 lanes: `[Σv0, Σv1, Σv2, Σv3]` (the
            /// K-quant kernels of the same module name share it).
            #[inline]
            #[target_feature(enable = $features)]
            pub(in crate::kernels) fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
                let a = _mm256_hadd_epi32(v[0], v[1]);
                let b = _mm256_hadd_epi32(v[2], v[3]);
                let c = _mm256_hadd_epi32(a, b);
                _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1))
            }

            /// Sum of eight float lanes in the order of candle's `hsum_float_8` (the K-quant
            /// kernels of the same module name share it).
            #[inline]
            #[target_feature(enable = $features)]
            pub(in crate::kernels) fn hsum(x: __m256) -> f32 {
                let hi = _mm256_extractf128_ps(x, 1);
                let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// Sixteen packed bytes at `p` to 32 nibbles: low nibbles first, then high ones.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                // SAFETY: the caller passes 16 readable bytes; the CPU has AVX2.
                unsafe {
                    let qs = _mm_loadu_si128(p as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
                    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
                }
            }

            /// Row `w`'s 32 unsigned values of a four- or five-bit format, whose tile block's
            /// quants start at `quants`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn values(format: Format, quants: *const u8, w: usize) -> __m256i {
                // SAFETY: the caller passes a tile block's quants; the CPU has AVX2.
                unsafe {
                    match format {
                        Format::Q5_0 | Format::Q5_1 => {
                            let p = quants.add(20 * w);
                            // Byte j takes byte j / 8 of the fifth bits, then its bit j % 8.
                            let bits = _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()));
                            let spread = _mm256_shuffle_epi8(
                                bits,
                                _mm256_setr_epi64x(
                                    0,
                                    0x0101_0101_0101_0101,
                                    0x0202_0202_0202_0202,
                                    0x0303_0303_0303_0303,
                                ),
                            );
                            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                            let sixteen = _mm256_and_si256(set, _mm256_set1_epi8(16));
                            _mm256_or_si256(nibbles(p.add(4)), sixteen)
                        }
                        _ => nibbles(quants.add(16 * w)),
                    }
                }
            }

            /// 32 bytes at `p`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load32(p: *const u8) -> __m256i {
                // SAFETY: the caller passes 32 readable bytes; the CPU has AVX.
                unsafe { _mm256_loadu_si256(p as *const __m256i) }
            }

            /// Four f16 at `p` as f32 (exact, as `half` converts them).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn f16x4(p: *const u8) -> __m128 {
                // SAFETY: the caller passes 8 readable bytes; the CPU has F16C.
                unsafe { _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i)) }
            }

            /// See [`super::dot_tile`]. Signed weights use the sign trick (|w| times y with w's sign)
            /// so that one unsigned-by-signed product serves every format.
            ///
            /// # Safety
            /// `tile` holds `blocks` tile blocks of `format` and every row of `acts` `blocks` blocks.
            // Block `b` addresses both the tile's bytes and each activation row.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_tile<const R: usize>(
                format: Format,
                tile: &[u8],
                blocks: usize,
                acts: [&[ActBlock]; R],
                out: &mut [[f32; TILE]; R],
            ) {
                let bytes = TILE * format.block_bytes();
                // SAFETY: the CPU has AVX2, FMA and F16C; loads stay inside the blocks (see above).
                unsafe {
                    match format {
                        Format::Q4_1 | Format::Q5_1 => {
                            let mut sums = [_mm_setzero_ps(); R];
                            for b in 0..blocks {
                                let p = tile.as_ptr().add(b * bytes);
                                crate::kernels::prefetch_ahead(p, bytes);
                                let d = f16x4(p);
                                let min = f16x4(p.add(8));
                                let wq: [__m256i; TILE] =
                                    std::array::from_fn(|w| values(format, p.add(16), w));
                                for r in 0..R {
                                    let a = &acts[r][b];
                                    let y = load32(a.q.as_ptr().cast());
                                    let dots = hsum4_i32(wq.map(|w| dot_u8_i8(w, y)));
                                    // ((Σ * d) * d_act) + (min * s_act), then accumulated: candle's order.
                                    let t = _mm_mul_ps(
                                        _mm_mul_ps(_mm_cvtepi32_ps(dots), d),
                                        _mm_set1_ps(a.d),
                                    );
                                    let t = _mm_add_ps(t, _mm_mul_ps(min, _mm_set1_ps(a.s)));
                                    sums[r] = _mm_add_ps(sums[r], t);
                                }
                            }
                            for r in 0..R {
                                _mm_storeu_ps(out[r].as_mut_ptr(), sums[r]);
                            }
                        }
                        Format::Q4_0 | Format::Q5_0 => {
                            // As Q4_1 without the minimum: Σ (w - 8) y = Σ w y - 8 Σ y (16 for
                            // Q5_0), so the unsigned values go into the product as they are.
                            let bias = if format == Format::Q4_0 { 8 } else { 16 };
                            let mut sums = [_mm_setzero_ps(); R];
                            for b in 0..blocks {
                                let p = tile.as_ptr().add(b * bytes);
                                crate::kernels::prefetch_ahead(p, bytes);
                                let d = f16x4(p);
                                let wq: [__m256i; TILE] =
                                    std::array::from_fn(|w| values(format, p.add(8), w));
                                for r in 0..R {
                                    let a = &acts[r][b];
                                    let y = load32(a.q.as_ptr().cast());
                                    let dots = _mm_sub_epi32(
                                        hsum4_i32(wq.map(|w| dot_u8_i8(w, y))),
                                        _mm_set1_epi32(bias * a.sum),
                                    );
                                    let t = _mm_mul_ps(
                                        _mm_mul_ps(_mm_cvtepi32_ps(dots), d),
                                        _mm_set1_ps(a.d),
                                    );
                                    sums[r] = _mm_add_ps(sums[r], t);
                                }
                            }
                            for r in 0..R {
                                _mm_storeu_ps(out[r].as_mut_ptr(), sums[r]);
                            }
                        }
                        Format::Q8_0 => {
                            let mut acc = [[_mm256_setzero_ps(); TILE]; R];
                            for b in 0..blocks {
                                let p = tile.as_ptr().add(b * bytes);
                                crate::kernels::prefetch_ahead(p, bytes);
                                let mut d = [0f32; TILE];
                                _mm_storeu_ps(d.as_mut_ptr(), f16x4(p));
                                let wq: [__m256i; TILE] =
                                    std::array::from_fn(|w| load32(p.add(8 + 32 * w)));
                                let wabs = wq.map(|w| _mm256_sign_epi8(w, w));
                                for r in 0..R {
                                    let a = &acts[r][b];
                                    let y = load32(a.q.as_ptr().cast());
                                    for w in 0..TILE {
                                        let dot = dot_u8_i8(wabs[w], _mm256_sign_epi8(y, wq[w]));
                                        acc[r][w] = _mm256_fmadd_ps(
                                            _mm256_set1_ps(d[w] * a.d),
                                            _mm256_cvtepi32_ps(dot),
                                            acc[r][w],
                                        );
                                    }
                                }
                            }
                            for r in 0..R {
                                for w in 0..TILE {
                                    out[r][w] = hsum(acc[r][w]);
                                }
                            }
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
avx2_kernels!(avx2, "avx2,fma,f16c", |w, y| _mm256_madd_epi16(
    _mm256_maddubs_epi16(w, y),
    _mm256_set1_epi16(1)
));
#[cfg(target_arch = "x86_64")]
avx2_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", |w, y| {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, y)
});

/// The NEON kernels (aarch64): the portable code's arithmetic on 128-bit vectors. Values are
/// widened to exact 32-bit integer sums per block (per group of four for Q8_0's eight lanes),
/// and the float operations are the portable code's, in its order, four weight rows at a time.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{ActBlock, Format, TILE, portable};

    /// The four f16 at the start of `bytes` as f32 (exact).
    fn f16x4(bytes: &[u8]) -> [f32; TILE] {
        std::array::from_fn(|w| portable::f16_at(bytes, 2 * w))
    }

    /// Row `w`'s 32 values of a tile block whose quants start at `quants`, signed as the
    /// portable code unpacks them (the bias of Q4_0 and Q5_0 taken off), as two vectors.
    ///
    /// # Safety
    /// `quants` points to a tile block's quants of `format`; the CPU has NEON.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn values(format: Format, quants: *const u8, w: usize) -> [int8x16_t; 2] {
        // SAFETY: the loads stay inside row `w`'s quants (see above).
        unsafe {
            let nibbles = |p: *const u8| {
                let qs = vld1q_u8(p);
                [vandq_u8(qs, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(qs)]
            };
            let (unsigned, bias) = match format {
                Format::Q8_0 => {
                    let p = quants.add(32 * w).cast::<i8>();
                    return [vld1q_s8(p), vld1q_s8(p.add(16))];
                }
                Format::Q4_0 | Format::Q4_1 => (nibbles(quants.add(16 * w)), 8),
                Format::Q5_0 | Format::Q5_1 => {
                    let p = quants.add(20 * w);
                    // Value j takes bit j of the fifth bits: byte j / 8, bit j % 8.
                    let bit = vcombine_u8(
                        vcreate_u8(0x8040_2010_0804_0201),
                        vcreate_u8(0x8040_2010_0804_0201),
                    );
                    let fifth = |lo: usize| {
                        let bytes = vcombine_u8(vdup_n_u8(*p.add(lo)), vdup_n_u8(*p.add(lo + 1)));
                        vandq_u8(vtstq_u8(bytes, bit), vdupq_n_u8(16))
                    };
                    let [low, high] = nibbles(p.add(4));
                    ([vorrq_u8(low, fifth(0)), vorrq_u8(high, fifth(2))], 16)
                }
            };
            let bias = if format.has_min() { 0 } else { bias };
            unsigned.map(|v| vsubq_s8(vreinterpretq_s8_u8(v), vdupq_n_s8(bias)))
        }
    }

    /// Products of 16 values, summed in pairs: `[v0y0 + v1y1, ..., v14y14 + v15y15]` as two
    /// vectors of four (exact).
    #[inline]
    #[target_feature(enable = "neon")]
    fn pairs(v: int8x16_t, y: int8x16_t) -> [int32x4_t; 2] {
        [
            vpaddlq_s16(vmull_s8(vget_low_s8(v), vget_low_s8(y))),
            vpaddlq_s16(vmull_high_s8(v, y)),
        ]
    }

    /// The exact dot product of 32 values with 32 activations.
    #[inline]
    #[target_feature(enable = "neon")]
    fn dot32(v: [int8x16_t; 2], y: [int8x16_t; 2]) -> i32 {
        let [a, b] = pairs(v[0], y[0]);
        let [c, d] = pairs(v[1], y[1]);
        vaddvq_s32(vaddq_s32(vaddq_s32(a, b), vaddq_s32(c, d)))
    }

    /// The eight lanes of Q8_0: lane `u` the exact sum of products `4u..4u+4`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn lanes8(v: [int8x16_t; 2], y: [int8x16_t; 2]) -> [int32x4_t; 2] {
        let [a, b] = pairs(v[0], y[0]);
        let [c, d] = pairs(v[1], y[1]);
        [vpaddq_s32(a, b), vpaddq_s32(c, d)]
    }

    /// See [`super::dot_tile`].
    ///
    /// # Safety
    /// `tile` holds `blocks` tile blocks of `format` and every row of `acts` `blocks` blocks;
    /// the CPU has NEON.
    // Block `b` addresses both the tile's bytes and each activation row.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_tile<const R: usize>(
        format: Format,
        tile: &[u8],
        blocks: usize,
        acts: [&[ActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        let bytes = TILE * format.block_bytes();
        let quants = TILE * if format.has_min() { 4 } else { 2 };
        let mut sums = [vdupq_n_f32(0.0); R];
        let mut lanes = [[[vdupq_n_f32(0.0); 2]; TILE]; R];
        // SAFETY: every load stays inside block `b` of `tile` and of each row of `acts`.
        unsafe {
            for b in 0..blocks {
                let block = &tile[b * bytes..(b + 1) * bytes];
                let p = block.as_ptr();
                let d = f16x4(block);
                let min = if format.has_min() {
                    f16x4(&block[2 * TILE..])
                } else {
                    [0.0; TILE]
                };
                let rows: [[int8x16_t; 2]; TILE] =
                    std::array::from_fn(|w| values(format, p.add(quants), w));
                for r in 0..R {
                    let a = &acts[r][b];
                    let q = a.q.as_ptr();
                    let y = [vld1q_s8(q), vld1q_s8(q.add(16))];
                    if format == Format::Q8_0 {
                        for w in 0..TILE {
                            let scale = vdupq_n_f32(d[w] * a.d);
                            let dots = lanes8(rows[w], y);
                            for (lane, dot) in lanes[r][w].iter_mut().zip(dots) {
                                *lane = vfmaq_f32(*lane, scale, vcvtq_f32_s32(dot));
                            }
                        }
                        continue;
                    }
                    // ((Σ * d) * d_act) [+ (min * s_act)], then accumulated, as portable.
                    let dots: [i32; TILE] = std::array::from_fn(|w| dot32(rows[w], y));
                    let t = vmulq_f32(
                        vcvtq_f32_s32(vld1q_s32(dots.as_ptr())),
                        vld1q_f32(d.as_ptr()),
                    );
                    let mut t = vmulq_f32(t, vdupq_n_f32(a.d));
                    if format.has_min() {
                        t = vaddq_f32(t, vmulq_f32(vld1q_f32(min.as_ptr()), vdupq_n_f32(a.s)));
                    }
                    sums[r] = vaddq_f32(sums[r], t);
                }
            }
            for r in 0..R {
                if format == Format::Q8_0 {
                    for w in 0..TILE {
                        // The portable `hsum8`'s order: [x4 + x0, ...], then halves, then the two.
                        let [low, high] = lanes[r][w];
                        let a = vaddq_f32(high, low);
                        let b = vadd_f32(vget_low_f32(a), vget_high_f32(a));
                        out[r][w] = vget_lane_f32::<0>(b) + vget_lane_f32::<1>(b);
                    }
                } else {
                    vst1q_f32(out[r].as_mut_ptr(), sums[r]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
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

    /// Four GGUF rows of `blocks` blocks with small finite scales and minimums.
    pub(in crate::kernels) fn gguf_rows(format: Format, blocks: usize, seed: u64) -> Vec<u8> {
        let bb = format.block_bytes();
        let mut w = bytes(seed, TILE * blocks * bb);
        for i in 0..TILE * blocks {
            let at = i * bb;
            let scale = f16::from_f32(0.01 + (i % 7) as f32 * 0.003).to_le_bytes();
            w[at..at + 2].copy_from_slice(&scale);
            if format.has_min() {
                let min = f16::from_f32(-0.05 + (i % 5) as f32 * 0.01).to_le_bytes();
                w[at + 2..at + 4].copy_from_slice(&min);
            }
        }
        w
    }

    /// Every format.
    const FORMATS: [Format; 5] = [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q8_0,
        Format::Q5_0,
        Format::Q5_1,
    ];

    /// Every path this CPU runs (each is checked against the portable code), with each format.
    fn paths_and_formats() -> Vec<(KernelPath, Format)> {
        KernelPath::all_supported()
            .into_iter()
            .flat_map(|path| FORMATS.map(|f| (path, f)))
            .collect()
    }

    pub(in crate::kernels) fn act_row(blocks: usize, seed: u64) -> Vec<ActBlock> {
        let raw = bytes(seed, blocks * BLOCK);
        let xs: Vec<f32> = raw.iter().map(|&b| (b as f32 - 127.5) / 40.0).collect();
        ActBlock::quantize_all(KernelPath::Portable, &xs)
    }

    /// Weight row `w` times `acts` in f64 from the dequantized values, for an accuracy check.
    fn exact(format: Format, tile: &[u8], w: usize, acts: &[ActBlock]) -> f64 {
        let bytes = TILE * format.block_bytes();
        acts.iter()
            .enumerate()
            .map(|(b, a)| {
                let (v, d, min) = portable::unpack(format, &tile[b * bytes..(b + 1) * bytes])[w];
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
    fn repacking_keeps_each_rows_scales_and_quants() {
        for format in FORMATS {
            let gguf = gguf_rows(format, 3, 5);
            let tile = repack(format, &gguf, TILE, 3);
            assert_eq!(tile.len(), gguf.len());
            let bb = format.block_bytes();
            for b in 0..3 {
                let rows = portable::unpack(format, &tile[b * TILE * bb..(b + 1) * TILE * bb]);
                for (w, (v, d, _)) in rows.iter().enumerate() {
                    let block = &gguf[(w * 3 + b) * bb..(w * 3 + b + 1) * bb];
                    assert_eq!(
                        d.to_bits(),
                        f16::from_le_bytes([block[0], block[1]]).to_f32().to_bits()
                    );
                    let first = match format {
                        Format::Q8_0 => i32::from(block[2] as i8),
                        Format::Q4_0 => i32::from(block[2] & 0x0f) - 8,
                        Format::Q4_1 => i32::from(block[4] & 0x0f),
                        Format::Q5_0 => i32::from(block[6] & 0x0f | (block[2] & 1) << 4) - 16,
                        Format::Q5_1 => i32::from(block[8] & 0x0f | (block[4] & 1) << 4),
                    };
                    assert_eq!(v[0], first, "{format:?} block {b} row {w}");
                }
            }
        }
    }

    #[test]
    fn kernels_agree_with_the_portable_code_bit_for_bit_and_with_exact_math() {
        for (path, format) in paths_and_formats() {
            for blocks in [1, 18, 48] {
                let tile = repack(
                    format,
                    &gguf_rows(format, blocks, 7 + blocks as u64),
                    TILE,
                    blocks,
                );
                let rows: Vec<Vec<ActBlock>> =
                    (0..4).map(|i| act_row(blocks, 100 + i as u64)).collect();
                let four = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                let mut fast = [[0f32; TILE]; 4];
                dot_tile(path, format, &tile, four, &mut fast);
                let mut reference = [[0f32; TILE]; 4];
                portable::dot_tile(format, &tile, blocks, four, &mut reference);
                assert_eq!(
                    fast.map(|r| r.map(f32::to_bits)),
                    reference.map(|r| r.map(f32::to_bits)),
                    "{path} {format:?}"
                );
                for (r, row) in rows.iter().enumerate() {
                    let mut one = [[0f32; TILE]; 1];
                    dot_tile(path, format, &tile, [row], &mut one);
                    assert_eq!(
                        one[0].map(f32::to_bits),
                        fast[r].map(f32::to_bits),
                        "row {r} alone"
                    );
                    for (w, &got) in fast[r].iter().enumerate() {
                        // Q4_1's minimum term uses the f16-rounded Σq·d, as candle does.
                        let tolerance = if format.has_min() { 2e-2 } else { 1e-3 };
                        let want = exact(format, &tile, w, row);
                        let got = f64::from(got);
                        assert!(
                            (got - want).abs() <= tolerance * want.abs().max(1.0),
                            "{format:?} {blocks} blocks, weight row {w}, row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_equals_the_portable_code_bit_for_bit() {
        let raw = bytes(41, 64 * BLOCK * 4);
        let mut blocks: Vec<[f32; BLOCK]> = raw
            .chunks_exact(BLOCK * 4)
            .map(|b| {
                std::array::from_fn(|i| {
                    let v = f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"));
                    // Mostly ordinary magnitudes, some of the raw bit patterns.
                    if i % 5 == 0 {
                        v
                    } else {
                        (v.to_bits() % 20011) as f32 / 97.0 - 100.0
                    }
                })
            })
            .collect();
        // Ties at every magnitude (amax 127 makes the scale 1), infinities, NaN, zeros of
        // both signs, tiny and huge maxima.
        blocks.push(std::array::from_fn(|i| {
            if i == 0 { 127.0 } else { i as f32 - 15.5 }
        }));
        blocks.push(std::array::from_fn(|i| -(i as f32) * 4.0 - 0.5));
        blocks.push(std::array::from_fn(|i| [f32::INFINITY, 1.0, -2.5][i % 3]));
        blocks.push(std::array::from_fn(|i| [f32::NAN, 3.0, -7.0, -0.0][i % 4]));
        blocks.push([f32::NAN; BLOCK]);
        blocks.push([-0.0; BLOCK]);
        blocks.push(std::array::from_fn(|i| i as f32 * 1e-44));
        blocks.push(std::array::from_fn(|i| (i as f32 - 16.0) * 1e37));
        for (path, xs) in KernelPath::all_supported()
            .into_iter()
            .flat_map(|path| blocks.iter().map(move |xs| (path, xs)))
        {
            let fast = ActBlock::quantize_all(path, xs)[0];
            let reference = portable::quantize(xs);
            assert_eq!(
                (fast.d.to_bits(), fast.s.to_bits(), fast.q, fast.sum),
                (
                    reference.d.to_bits(),
                    reference.s.to_bits(),
                    reference.q,
                    reference.sum
                ),
                "{path} {xs:?}"
            );
            assert_eq!(fast.sum, fast.q.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
    }

    #[test]
    fn quantize_matches_the_reference_rounding() {
        let xs: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
        let a = ActBlock::quantize_all(KernelPath::Portable, &xs)[0];
        assert_eq!(a.d, f16::from_f32(15.5 / 127.0).to_f32());
        assert_eq!((a.q[0], a.q[16], a.q[31]), (-127, 4, 127));
        let zeros = ActBlock::quantize_all(KernelPath::Portable, &[0.0; 32])[0];
        assert_eq!((zeros.d, zeros.s, zeros.q), (0.0, 0.0, [0; 32]));
    }
}
