//! AMX-INT8 kernels for batches of Q4_K, Q5_K and Q6_K products, and of Q4_0 and Q4_1
//! ([`dot_blocks`]): sixteen activation rows against sixteen weight rows per tile instruction
//! (16·16·64 multiply-adds), where the CPU has AMX (Intel Xeon since Sapphire Rapids) and the
//! OS lets this process use its tile registers.
//!
//! A tile product sums over its whole width in i32 with no scale in between, while the
//! K-quants' scales change every 16 or 32 values. So each super-block of sixteen weight rows is
//! unpacked once into its scaled values `sc·q` (Q6_K: `sc·(q − 32)`, at most 13 bits and a
//! sign), each split into a low byte (unsigned) and a high byte: `Σ sc·q·y = Σ y·lo +
//! 256·Σ y·hi`, two tile products over the whole super-block. That is [`super::kquant`]'s
//! exact integer sum, rounded once per super-block as there (`acc = fma(d_y·d, T, acc)`, then
//! the minimums' `acc = fma(−d_y·dmin, Σ m·Σy, acc)`), so every row's result is the portable
//! code's bit for bit. One unpacking serves every group of sixteen activation rows, whose
//! Q8_K values the tile loads read where they are.
//!
//! Tile registers are out of the compiler's sight: the instructions are written in `asm!`
//! (Rust's AMX intrinsics are unstable), and each call configures the tiles and releases them.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::f16;

use super::Band;
use super::dot::{ActBlock, BLOCK, Format, TILE};
use super::kquant::{
    D, DMIN, FIFTH, KActBlock, KFormat, MINS, QUANT6_BYTES, QUANTS, QUANTS6, SCALES, SCALES6, SUBS,
    SUPER,
};
use super::kwide::transpose;

/// Rows of a tile: activation rows per group, weight rows per unpacked super-block.
pub(crate) const ROWS: usize = 16;

/// Fewest activation rows worth the kernels: they unpack each block of weights once per
/// product, which one group of sixteen rows does not pay for (one thread, 2048 x 5632 weights,
/// against the AVX-512 VNNI kernels: K-quants 0.8-1.0x at 16 rows, 1.3-1.8x at 64, 1.7-2.3x at
/// 256; Q4_0 and Q4_1 0.9-1.0x, 1.3-1.4x, 1.4-1.6x).
pub(crate) const MIN_ROWS: usize = 2 * ROWS;

/// Whether this CPU and OS run the kernel: CPUID reports AMX-TILE and AMX-INT8, and Linux
/// grants this process the tile registers' state (asked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let leaf = __cpuid_count(7, 0);
        let amx = (leaf.edx >> 24) & 1 == 1 && (leaf.edx >> 25) & 1 == 1;
        amx && std::arch::is_x86_feature_detected!("avx512vbmi") && request_tile_state()
    })
}

/// Asks Linux for the tile registers' state (`ARCH_REQ_XCOMP_PERM`), which a process must do
/// before its first tile instruction.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request only widens the CPU state the kernel saves for this process.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether the kernel reads `format`.
pub(crate) fn covers(format: KFormat) -> bool {
    format.sums_exactly()
}

/// One super-block of sixteen weight rows, unpacked and scaled as the tile products' second
/// operand: `bytes[h][t][k]`, tile `t` (values `64t..64t + 64`) of the low (`h` 0) or high
/// bytes, its row `k` holding values `64t + 4k..64t + 4k + 4` of each weight row in turn.
#[repr(C, align(64))]
struct Scaled {
    bytes: [[[[u8; 64]; ROWS]; SUPER / 64]; 2],
    /// The rows' `d`.
    d: [f32; ROWS],
    /// The rows' `dmin` (Q4_K, Q5_K).
    dmin: [f32; ROWS],
    /// `mins[p][n]`: row `n`'s minimums `2p` and `2p + 1` as a pair of i16 (Q4_K, Q5_K).
    mins: [[u32; ROWS]; SUBS / 2],
}

/// The tiles' shapes, as `ldtilecfg` reads them.
#[repr(C, align(64))]
struct Config([u8; 64]);

/// The K-quant kernel's tile shapes: all eight tiles of sixteen rows of 64 bytes.
const CONFIG: Config = Config::new(&[(ROWS, 64); 8]);

impl Config {
    /// Palette 1 with tile `t` of `shapes[t].0` rows of `shapes[t].1` bytes (the rest unused).
    const fn new(shapes: &[(usize, usize)]) -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut t = 0;
        while t < shapes.len() {
            bytes[16 + 2 * t] = shapes[t].1 as u8;
            bytes[48 + t] = shapes[t].0 as u8;
            t += 1;
        }
        Self(bytes)
    }
}

/// Tiles in `tiles` (those of `band`, [`super::kquant::repack`]'s layout, `blocks` super-blocks
/// each) against the leading groups of sixteen rows of `acts` (rows of `blocks` super-blocks).
/// Returns the rows done; `None`, with nothing done, where the band's tiles are not a whole
/// number of sixteen rows.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL, VBMI and VNNI, and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
pub(crate) unsafe fn dot_columns(
    format: KFormat,
    tiles: &[u8],
    acts: &[KActBlock],
    blocks: usize,
    band: &mut Band,
) -> Option<usize> {
    assert!(covers(format));
    let tile_bytes = blocks * format.tile_bytes();
    let mut scaled = Scaled {
        bytes: [[[[0; 64]; ROWS]; SUPER / 64]; 2],
        d: [0.0; ROWS],
        dmin: [0.0; ROWS],
        mins: [[0; ROWS]; SUBS / 2],
    };
    let mut each = |four: &[u8], acc: &mut [Results]| {
        acc.fill(Results([[0.0; ROWS]; ROWS]));
        // Super-block by super-block, so that its unpacked weights stay in the first-level
        // cache while every group of activation rows passes.
        for b in 0..blocks {
            for tb in 0..ROWS / TILE {
                let block =
                    &four[tb * tile_bytes + b * format.tile_bytes()..][..format.tile_bytes()];
                // SAFETY: `block` is one tile block of `format`; the CPU has the features.
                unsafe { unpack(format, block, tb, &mut scaled) };
            }
            // SAFETY: the tiles are configured (by `by_sixteen`); the CPU has the features.
            unsafe { super_block(format, &scaled, acts, blocks, b, acc) };
        }
    };
    // SAFETY: passed on from the caller.
    unsafe {
        by_sixteen(
            &CONFIG,
            tiles,
            tile_bytes,
            acts.len() / blocks,
            band,
            &mut each,
        )
    }
}

/// The frame of both kernels: checks that `band` (its tiles in `tiles`, `tile_bytes` each, and
/// `rows` activation rows) is a whole number of sixteen weight rows (`None` if not), configures
/// the tiles as `config`, and writes, for each sixteen weight rows, what `each` puts for them in
/// its second argument (one [`Results`] per group of sixteen activation rows). Returns the rows
/// done.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL, VBMI and VNNI, and F16C; `each` uses the tiles as `config`
/// shapes them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn by_sixteen(
    config: &Config,
    tiles: &[u8],
    tile_bytes: usize,
    rows: usize,
    band: &mut Band,
    each: &mut dyn FnMut(&[u8], &mut [Results]),
) -> Option<usize> {
    // Without the OS's grant (asked once, by `available`) the first tile instruction faults.
    assert!(available(), "AMX tile state granted");
    assert_eq!(tiles.len(), band.tiles() * tile_bytes);
    assert_eq!(rows, band.rows());
    if !band.tiles().is_multiple_of(ROWS / TILE) {
        return None;
    }
    // SAFETY: the configuration is a valid palette-1 layout; the CPU has AMX (see above).
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
    // Per group of activation rows, `[r][n]`: activation row `r` times weight row `n`.
    let mut acc = vec![Results([[0.0; ROWS]; ROWS]); rows / ROWS];
    for (g, four) in tiles.chunks_exact(ROWS / TILE * tile_bytes).enumerate() {
        each(four, &mut acc);
        for (i, acc) in acc.iter().enumerate() {
            for (r, values) in acc.0.iter().enumerate() {
                band.set_columns(g * ROWS / TILE, ROWS * i + r, values);
            }
        }
    }
    // SAFETY: the CPU has AMX.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    Some(rows / ROWS * ROWS)
}

/// Unpacks the tile block `block` (weight rows `4tb..4tb + 4`) into `scaled`.
///
/// # Safety
/// `block` is a whole tile block of `format`; the CPU has AVX-512 F, BW, VL, VBMI and VNNI,
/// and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn unpack(format: KFormat, block: &[u8], tb: usize, scaled: &mut Scaled) {
    assert_eq!(block.len(), format.tile_bytes());
    let p = block.as_ptr();
    let f16_at = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    for w in 0..TILE {
        scaled.d[TILE * tb + w] = f16_at(D + 2 * w);
    }
    // SAFETY: every load stays inside the block (its length checked above); the CPU has the
    // features.
    unsafe {
        if format == KFormat::Q6K {
            // Rows 0 and 1's sixteen scales, then rows 2 and 3's, as i16.
            let s01 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(SCALES6).cast()));
            let s23 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(SCALES6 + 32).cast()));
            let quants = |r: usize| p.add(QUANTS6 + QUANT6_BYTES * r);
            let (nibble, two_bits, bias) = (
                _mm512_set1_epi8(0x0f),
                _mm512_set1_epi8(3),
                _mm512_set1_epi8(32),
            );
            // Value 128n + 32j + l: low nibble (j < 2) or high of low byte 64n + 32(j % 2) +
            // l, its top bits at bit 2j of high byte 128 + 32n + l.
            let low = [rows(quants, 0), rows(quants, 64)];
            let top = rows(quants, 128);
            for n in 0..2 {
                for j in 0..4 {
                    for h in 0..2 {
                        let chunk = 8 * n + 2 * j + h;
                        let x = low[n][2 * (j % 2) + h];
                        let x = if j < 2 { x } else { _mm512_srli_epi16::<4>(x) };
                        let t = _mm512_srl_epi16(top[2 * n + h], _mm_cvtsi32_si128(2 * j as i32));
                        let v = _mm512_sub_epi8(
                            _mm512_or_si512(
                                _mm512_and_si512(x, nibble),
                                _mm512_slli_epi16::<4>(_mm512_and_si512(t, two_bits)),
                            ),
                            bias,
                        );
                        // Row `w`'s scale of the chunk at `16w + chunk` of `s01` and `s23`.
                        let sc = pair_index(chunk, 16);
                        let sc = (
                            _mm512_permutexvar_epi16(sc, s01),
                            _mm512_permutexvar_epi16(sc, s23),
                        );
                        store_scaled(v, true, sc, chunk, tb, scaled);
                    }
                }
            }
            return;
        }
        for w in 0..TILE {
            scaled.dmin[TILE * tb + w] = f16_at(DMIN + 2 * w);
            for (pair, mins) in scaled.mins.iter_mut().enumerate() {
                let m = &block[MINS + SUBS * w + 2 * pair..][..2];
                mins[TILE * tb + w] = u32::from(m[0]) | u32::from(m[1]) << 16;
            }
        }
        // Each row's eight scales, as i16: row `w`'s at `8w..8w + 8`.
        let scales = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(SCALES).cast()));
        let fifth = if format == KFormat::Q5K {
            let (x01, x23) = (
                _mm512_loadu_si512(p.add(FIFTH).cast()),
                _mm512_loadu_si512(p.add(FIFTH + 64).cast()),
            );
            // Quarter `w` of `fifth[h]`: row `w`'s fifth bits of values `16h..16h+16` of each
            // sub-block (bit `i` for sub-block `i`).
            Some([
                _mm512_shuffle_i32x4::<0x88>(x01, x23),
                _mm512_shuffle_i32x4::<0xdd>(x01, x23),
            ])
        } else {
            None
        };
        let nibble = _mm512_set1_epi8(0x0f);
        // A row's byte `64h + k` holds value `128h + k` (low nibble) and `128h + 64 + k`.
        for h in 0..2 {
            let c = rows(|r| p.add(QUANTS + 128 * r), 64 * h);
            for (q, &c) in c.iter().enumerate() {
                for (high, x) in [(0, c), (1, _mm512_srli_epi16::<4>(c))] {
                    let chunk = 8 * h + 4 * high + q;
                    let mut v = _mm512_and_si512(x, nibble);
                    if let Some(fifth) = fifth {
                        let bit = _mm512_set1_epi8((1u8 << (chunk / 2)) as i8);
                        let set = _mm512_test_epi8_mask(fifth[chunk % 2], bit);
                        v = _mm512_mask_add_epi8(v, set, v, _mm512_set1_epi8(16));
                    }
                    // Row `w`'s scale of the chunk at `8w + chunk / 2` of `scales`.
                    let sc = pair_index(chunk / 2, 8);
                    let sc = (
                        _mm512_permutexvar_epi16(sc, scales),
                        _mm512_permutexvar_epi16(
                            _mm512_add_epi16(sc, _mm512_set1_epi16(16)),
                            scales,
                        ),
                    );
                    store_scaled(v, false, sc, chunk, tb, scaled);
                }
            }
        }
    }
}

/// Quarter `w` of `rows(quants, at)[q]`: row `w`'s 16 bytes at `at + 16q` of its quants
/// (`quants(w)`).
///
/// # Safety
/// 64 readable bytes at `quants(w) + at` for each row; the CPU has AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn rows(quants: impl Fn(usize) -> *const u8, at: usize) -> [__m512i; 4] {
    // SAFETY: passed on from the caller.
    transpose(std::array::from_fn(|r| unsafe {
        _mm512_loadu_si512(quants(r).add(at).cast())
    }))
}

/// Dword `4w + g` (row `w`'s values `4g..4g + 4`) to dword `4g + w`: quarter `g` then holds
/// the four rows' values `4g..4g + 4`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
fn by_group(x: __m512i) -> __m512i {
    let index = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    _mm512_permutexvar_epi32(index, x)
}

/// The i16 index `i` in the first 16 lanes and `i + per_row` in the others: a pair of rows'
/// scale `i`, each in its half, where each row has `per_row` of them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
fn pair_index(i: usize, per_row: usize) -> __m512i {
    let second = _mm512_mask_set1_epi16(_mm512_setzero_si512(), 0xffff_0000, per_row as i16);
    _mm512_add_epi16(second, _mm512_set1_epi16(i as i16))
}

/// Scales the values of one chunk (`v`, quarter `w` row `w`'s 16 values; signed or not) by
/// `sc` (rows 0 and 1's scale, each in its half, then rows 2 and 3's) and stores their low
/// and high bytes where the chunk's rows (`4tb..4tb + 4`) go in `scaled`.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL, VBMI and VNNI, and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn store_scaled(
    v: __m512i,
    signed: bool,
    sc: (__m512i, __m512i),
    chunk: usize,
    tb: usize,
    scaled: &mut Scaled,
) {
    let (v01, v23) = (_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
    let (v01, v23) = if signed {
        (_mm512_cvtepi8_epi16(v01), _mm512_cvtepi8_epi16(v23))
    } else {
        (_mm512_cvtepu8_epi16(v01), _mm512_cvtepu8_epi16(v23))
    };
    let (p01, p23) = (_mm512_mullo_epi16(v01, sc.0), _mm512_mullo_epi16(v23, sc.1));
    let even: [u8; 64] = std::array::from_fn(|i| 2 * i as u8);
    // SAFETY: 64 readable bytes.
    let even = unsafe { _mm512_loadu_si512(even.as_ptr().cast()) };
    for (h, odd) in [(0, 0), (1, 1)] {
        let bytes =
            _mm512_permutex2var_epi8(p01, _mm512_add_epi8(even, _mm512_set1_epi8(odd)), p23);
        // Quarter `g`: the four rows' values `4g..4g + 4` of the chunk.
        let bytes = by_group(bytes);
        let quarters = [
            _mm512_castsi512_si128(bytes),
            _mm512_extracti32x4_epi32::<1>(bytes),
            _mm512_extracti32x4_epi32::<2>(bytes),
            _mm512_extracti32x4_epi32::<3>(bytes),
        ];
        for (g, quarter) in quarters.into_iter().enumerate() {
            // Values `16·chunk + 4g..`: tile `chunk / 4`, its row `4·(chunk % 4) + g`.
            let row = &mut scaled.bytes[h][chunk / 4][4 * (chunk % 4) + g];
            // SAFETY: 16 writable bytes at `16·tb` of the row's 64.
            unsafe { _mm_storeu_si128(row.as_mut_ptr().add(16 * tb).cast(), quarter) };
        }
    }
}

/// The instructions of one step of [`super_block`]: tile `t` of the weights' low and high
/// bytes (at `$w = 1024t`) into `tmm6` and `tmm7`, the two groups' activation values
/// `64t..64t + 64` (at `$y = 64t`) into `tmm4` and `tmm5`, their products added to `tmm0`
/// (first group, low bytes), `tmm1` (high), `tmm2` and `tmm3` (second group).
macro_rules! k_step {
    ($w:literal, $y:literal) => {
        concat!(
            "tileloadd tmm6, [{lo} + {s64}*1 + ",
            $w,
            "]\n",
            "tileloadd tmm7, [{hi} + {s64}*1 + ",
            $w,
            "]\n",
            "tileloadd tmm4, [{y0} + {sy}*1 + ",
            $y,
            "]\n",
            "tileloadd tmm5, [{y1} + {sy}*1 + ",
            $y,
            "]\n",
            "tdpbsud tmm0, tmm4, tmm6\n",
            "tdpbssd tmm1, tmm4, tmm7\n",
            "tdpbsud tmm2, tmm5, tmm6\n",
            "tdpbssd tmm3, tmm5, tmm7\n",
        )
    };
}

/// Super-block `b` of sixteen weight rows (`scaled`) against every group of sixteen rows of
/// `acts` (rows of `blocks` super-blocks), added to the groups' results `acc`. Two groups at a
/// time share each loaded weight tile.
///
/// # Safety
/// The tiles are configured as [`CONFIG`]; the CPU has AMX, AVX-512 F, BW, VL, VBMI and
/// VNNI, and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn super_block(
    format: KFormat,
    scaled: &Scaled,
    acts: &[KActBlock],
    blocks: usize,
    b: usize,
    acc: &mut [Results],
) {
    // Each pass's products: group 0's sums of low and high bytes, then group 1's (`[r][n]`:
    // activation row `r` times weight row `n`).
    let mut sums = Sums([[[0; ROWS]; ROWS]; 4]);
    let (low, high) = (scaled.bytes[0].as_ptr(), scaled.bytes[1].as_ptr());
    let stride = blocks * size_of::<KActBlock>();
    // SAFETY: 16 readable f32 each; the CPU has AVX-512 F.
    let (d, dmin) = unsafe {
        (
            _mm512_loadu_ps(scaled.d.as_ptr()),
            _mm512_loadu_ps(scaled.dmin.as_ptr()),
        )
    };
    let mut i = 0;
    while i < acc.len() {
        let two = i + 1 < acc.len();
        let y0 = acts[ROWS * i * blocks + b].q.as_ptr();
        let c = sums.0.as_mut_ptr();
        // SAFETY: every tile load reads sixteen rows of 64 bytes: of `scaled` (rows 64 bytes
        // apart), or of the group's activation rows' values in super-block `b` (rows `stride`
        // apart, each 64 bytes at `64t` of its 256); the stores write inside `sums`.
        unsafe {
            // A last group alone is multiplied twice, its second products unused.
            let y1 = acts[ROWS * (i + usize::from(two)) * blocks + b].q.as_ptr();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                k_step!(0, 0),
                k_step!(1024, 64),
                k_step!(2048, 128),
                k_step!(3072, 192),
                "tilestored [{c} + {s64}*1], tmm0",
                "tilestored [{c} + {s64}*1 + 1024], tmm1",
                "tilestored [{c} + {s64}*1 + 2048], tmm2",
                "tilestored [{c} + {s64}*1 + 3072], tmm3",
                lo = in(reg) low,
                hi = in(reg) high,
                y0 = in(reg) y0,
                y1 = in(reg) y1,
                c = in(reg) c,
                sy = in(reg) stride,
                s64 = in(reg) 64usize,
                options(nostack),
            );
        }
        // Each pair's `T = Σ y·lo + 256·Σ y·hi`, then `acc = fma(d_y·d, T, acc)`, and with
        // minimums `acc = fma(−d_y·dmin, Σ m·Σy, acc)`.
        for (g, acc) in acc[i..].iter_mut().enumerate().take(1 + usize::from(two)) {
            for (r, acc) in acc.0.iter_mut().enumerate() {
                let a = &acts[(ROWS * (i + g) + r) * blocks + b];
                // SAFETY: 16 readable i32 and f32 each, 16 writable f32; the CPU has AVX-512 F.
                unsafe {
                    let low = _mm512_loadu_si512(sums.0[2 * g][r].as_ptr().cast());
                    let high = _mm512_loadu_si512(sums.0[2 * g + 1][r].as_ptr().cast());
                    let total = _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low);
                    let mut sum = _mm512_loadu_ps(acc.as_ptr());
                    let scale = _mm512_mul_ps(_mm512_set1_ps(a.d), d);
                    sum = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(total), sum);
                    if format != KFormat::Q6K {
                        let mins = (0..SUBS / 2).fold(_mm512_setzero_si512(), |m, pair| {
                            let y = i32::from(a.sums[2 * pair] as u16)
                                | i32::from(a.sums[2 * pair + 1]) << 16;
                            let w = _mm512_loadu_si512(scaled.mins[pair].as_ptr().cast());
                            _mm512_dpwssd_epi32(m, w, _mm512_set1_epi32(y))
                        });
                        let scale = _mm512_mul_ps(_mm512_set1_ps(-a.d), dmin);
                        sum = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(mins), sum);
                    }
                    _mm512_storeu_ps(acc.as_mut_ptr(), sum);
                }
            }
        }
        i += 2;
    }
}

/// One group's results against sixteen weight rows, aligned to a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Results([[f32; ROWS]; ROWS]);

/// Four tiles of i32 sums, aligned to a cache line.
#[repr(C, align(64))]
struct Sums([[[i32; ROWS]; ROWS]; 4]);

/// Whether the block kernel ([`dot_blocks`]) reads `format`: Q4_0 and Q4_1, whose pairs sum
/// each block of 32 exactly (Q8_0 keeps candle's eight float lanes per pair, which a tile sum
/// over the block cannot give; Q5_0 and Q5_1 are rare).
pub(crate) fn covers_blocks(format: Format) -> bool {
    matches!(format, Format::Q4_0 | Format::Q4_1)
}

/// The block kernel's tile shapes: `tmm0` and `tmm1` the sums of sixteen activation rows by
/// sixteen weight rows (i32), `tmm2` the activation rows' 32 values, `tmm3` the weight rows'
/// (eight rows of four values of each).
const BLOCK_CONFIG: Config = Config::new(&[(ROWS, 64), (ROWS, 64), (ROWS, BLOCK), (BLOCK / 4, 64)]);

/// One block of sixteen weight rows as the tile product's second operand: row `k` holds
/// values `4k..4k + 4` of each weight row in turn (unsigned quants), then the rows' scales
/// and minimums (Q4_1).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct WeightBlock {
    quants: [[u8; 64]; BLOCK / 4],
    d: [f32; ROWS],
    min: [f32; ROWS],
}

/// [`dot_columns`] for Q4_0 and Q4_1 weights ([`super::dot::repack`]'s tiles) and activations
/// quantized per block of 32. Each pair's block sum is exact in the tile product (the unsigned
/// quants times the activations, less Q4_0's offset `8·Σy`), then scaled as the portable code
/// does (`acc += dot·d·d_y`, plus `m·s_y` for Q4_1), so results are its bit for bit.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL, VBMI and VNNI, and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
pub(crate) unsafe fn dot_blocks(
    format: Format,
    tiles: &[u8],
    acts: &[ActBlock],
    blocks: usize,
    band: &mut Band,
) -> Option<usize> {
    assert!(covers_blocks(format));
    let tile_bytes = blocks * TILE * format.block_bytes();
    let mut weights = vec![
        WeightBlock {
            quants: [[0; 64]; BLOCK / 4],
            d: [0.0; ROWS],
            min: [0.0; ROWS],
        };
        blocks
    ];
    let mut each = |four: &[u8], acc: &mut [Results]| {
        for (b, weights) in weights.iter_mut().enumerate() {
            let at = |tb: usize| tb * tile_bytes + b * TILE * format.block_bytes();
            let blocks: [&[u8]; ROWS / TILE] =
                std::array::from_fn(|tb| &four[at(tb)..at(tb) + TILE * format.block_bytes()]);
            // SAFETY: each is one tile block of `format`; the CPU has the features.
            unsafe { unpack_blocks(format, blocks, weights) };
        }
        for (acc, rows) in acc.iter_mut().zip(acts.chunks_exact(ROWS * blocks)) {
            // SAFETY: the tiles are configured as `BLOCK_CONFIG` (by `by_sixteen`); the CPU
            // has the features.
            *acc = unsafe { block_rows(format, &weights, rows) };
        }
    };
    // SAFETY: passed on from the caller.
    unsafe {
        by_sixteen(
            &BLOCK_CONFIG,
            tiles,
            tile_bytes,
            acts.len() / blocks,
            band,
            &mut each,
        )
    }
}

/// Unpacks one block of four tiles (sixteen weight rows) into `to`.
///
/// # Safety
/// Each of `blocks` is a whole tile block of `format` (Q4_0 or Q4_1); the CPU has AVX-512 F,
/// BW, VL, VBMI and VNNI, and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn unpack_blocks(format: Format, blocks: [&[u8]; ROWS / TILE], to: &mut WeightBlock) {
    let header = if format.has_min() { 4 } else { 2 };
    let nibble = _mm512_set1_epi8(0x0f);
    let mut low = [_mm512_setzero_si512(); ROWS / TILE];
    let mut high = low;
    for (tb, block) in blocks.iter().enumerate() {
        assert_eq!(block.len(), TILE * format.block_bytes());
        // SAFETY: the loads stay inside the block (its length checked above): the four f16
        // scales, the four minimums after them (Q4_1), 64 bytes of quants (16 a row, byte `j`
        // holding values `j` and `j + 16`); the stores write 16 bytes of 64.
        unsafe {
            let p = block.as_ptr();
            let d = _mm_cvtph_ps(_mm_loadl_epi64(p.cast()));
            _mm_storeu_ps(to.d.as_mut_ptr().add(TILE * tb), d);
            if format.has_min() {
                let min = _mm_cvtph_ps(_mm_loadl_epi64(p.add(2 * TILE).cast()));
                _mm_storeu_ps(to.min.as_mut_ptr().add(TILE * tb), min);
            }
            let x = _mm512_loadu_si512(p.add(TILE * header).cast());
            low[tb] = by_group(_mm512_and_si512(x, nibble));
            high[tb] = by_group(_mm512_and_si512(_mm512_srli_epi16::<4>(x), nibble));
        }
    }
    // Row `k` of the tile: values `4k..4k + 4` of the sixteen rows, quarter `tb` holding
    // rows `4tb..4tb + 4`.
    for (half, rows) in [low, high].into_iter().enumerate() {
        for (k, row) in transpose(rows).into_iter().enumerate() {
            // SAFETY: 64 writable bytes.
            unsafe { _mm512_storeu_si512(to.quants[4 * half + k].as_mut_ptr().cast(), row) };
        }
    }
}

/// The instructions of one block's product in [`block_rows`]: sixteen activation rows' values
/// (at `{y}`, rows `{sy}` apart) into `tmm2`, the weights' (at `{w}`) into `tmm3`, their
/// products into `tmm$sum`, zeroed first.
macro_rules! block_product {
    ($sum:literal) => {
        concat!(
            "tilezero tmm",
            $sum,
            "\n",
            "tileloadd tmm2, [{y} + {sy}*1]\n",
            "tileloadd tmm3, [{w} + {s64}*1]\n",
            "tdpbsud tmm",
            $sum,
            ", tmm2, tmm3\n",
        )
    };
}

/// The instruction that stores the sums in `tmm$sum` at `{c}` (rows `{s64}` apart).
macro_rules! store {
    ($sum:literal) => {
        concat!("tilestored [{c} + {s64}*1], tmm", $sum)
    };
}

/// Starts the next block's product into `tmm$next` (activations at `$y`, rows `$stride` apart,
/// weights at `$w`), then stores the sums in `tmm$sum` at `$c`.
macro_rules! next_then_store {
    ($next:literal, $sum:literal, $y:expr, $w:expr, $c:expr, $stride:expr) => {
        asm!(
            block_product!($next),
            store!($sum),
            y = in(reg) $y,
            w = in(reg) $w,
            c = in(reg) $c,
            sy = in(reg) $stride,
            s64 = in(reg) 64usize,
            options(nostack),
        )
    };
}

/// Sixteen activation rows (`rows`, `weights.len()` blocks each) times the sixteen weight
/// rows of `weights`: `[r][n]`, activation row `r` times weight row `n`.
///
/// # Safety
/// The tiles are configured as [`BLOCK_CONFIG`]; the CPU has AMX, AVX-512 F, BW, VL, VBMI
/// and VNNI, and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn block_rows(format: Format, weights: &[WeightBlock], rows: &[ActBlock]) -> Results {
    let blocks = weights.len();
    let stride = blocks * size_of::<ActBlock>();
    let offset = if format == Format::Q4_0 { 8 } else { 0 };
    let mut acc = [_mm512_setzero_ps(); ROWS];
    // Block `b`'s sums in `sums[b % 2]`, from `tmm0` or `tmm1` in turn: the product of the
    // next block runs while this one's are scaled.
    let mut sums = Sums2([[[0; ROWS]; ROWS]; 2]);
    let product = |b: usize| (rows[b].q.as_ptr(), weights[b].quants.as_ptr());
    // SAFETY (every `asm!` below): the tile loads read sixteen rows of 32 bytes, each an
    // activation row's block `b` (rows `stride` apart), and eight rows of 64 bytes of
    // `weights[b]`; the stores write inside `sums`.
    let (y, w) = product(0);
    unsafe {
        asm!(
            block_product!(0),
            y = in(reg) y,
            w = in(reg) w,
            sy = in(reg) stride,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
    for b in 0..blocks {
        let c = sums.0[b % 2].as_mut_ptr();
        let next = (b + 1 < blocks).then(|| product(b + 1));
        // SAFETY: see above.
        unsafe {
            match (next, b % 2) {
                (Some((y, w)), 0) => next_then_store!(1, 0, y, w, c, stride),
                (Some((y, w)), _) => next_then_store!(0, 1, y, w, c, stride),
                (None, 0) => {
                    asm!(store!(0), c = in(reg) c, s64 = in(reg) 64usize, options(nostack))
                }
                (None, _) => {
                    asm!(store!(1), c = in(reg) c, s64 = in(reg) 64usize, options(nostack))
                }
            }
        }
        let weights = &weights[b];
        // SAFETY: 16 readable f32 and i32 each; the CPU has AVX-512 F.
        unsafe {
            let (d, min) = (
                _mm512_loadu_ps(weights.d.as_ptr()),
                _mm512_loadu_ps(weights.min.as_ptr()),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = &rows[r * blocks + b];
                let sum = _mm512_loadu_si512(sums.0[b % 2][r].as_ptr().cast());
                let dot = _mm512_sub_epi32(sum, _mm512_set1_epi32(offset * a.sum));
                let mut x = _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(dot), d),
                    _mm512_set1_ps(a.d),
                );
                if format.has_min() {
                    x = _mm512_add_ps(x, _mm512_mul_ps(min, _mm512_set1_ps(a.s)));
                }
                *acc = _mm512_add_ps(*acc, x);
            }
        }
    }
    let mut out = Results([[0.0; ROWS]; ROWS]);
    for (out, acc) in out.0.iter_mut().zip(acc) {
        // SAFETY: 16 writable f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
    }
    out
}

/// Two tiles of i32 sums, aligned to a cache line.
#[repr(C, align(64))]
struct Sums2([[[i32; ROWS]; ROWS]; 2]);

#[cfg(test)]
mod tests {
    use super::super::KernelPath;
    use super::super::dot;
    use super::super::kquant::tests::{gguf_rows, values};
    use super::super::kquant::{self, portable};
    use super::*;

    #[test]
    fn amx_block_kernel_equals_the_portable_code_bit_for_bit() {
        if !KernelPath::Amx.supported() {
            eprintln!("this CPU or OS has no AMX: its kernel is not run here");
            return;
        }
        for format in [Format::Q4_0, Format::Q4_1] {
            for (blocks, tiles, rows) in [(1, 4, 16usize), (3, 8, 48), (5, 4, 37)] {
                let gguf: Vec<u8> = (0..tiles as u64)
                    .flat_map(|t| dot::tests::gguf_rows(format, blocks, 7 + t))
                    .collect();
                let tile = dot::repack(format, &gguf, TILE * tiles, blocks);
                let acts: Vec<ActBlock> = (0..rows as u64)
                    .flat_map(|i| dot::tests::act_row(blocks, 50 + i))
                    .collect();
                let mut out = vec![f32::NAN; rows * TILE * tiles];
                let mut bands = Band::split(&mut out, rows, TILE * tiles, TILE * tiles);
                // SAFETY: the test runs only where the CPU has the features.
                let done = unsafe { dot_blocks(format, &tile, &acts, blocks, &mut bands[0]) };
                assert_eq!(done, Some(rows / ROWS * ROWS));
                let tile_bytes = blocks * TILE * format.block_bytes();
                for r in 0..rows / ROWS * ROWS {
                    for (t, tile) in tile.chunks_exact(tile_bytes).enumerate() {
                        let mut one = [[0f32; TILE]; 1];
                        let row = &acts[r * blocks..(r + 1) * blocks];
                        dot::portable::dot_tile(format, tile, blocks, [row], &mut one);
                        for w in 0..TILE {
                            let got = out[r * TILE * tiles + TILE * t + w];
                            assert_eq!(
                                got.to_bits(),
                                one[0][w].to_bits(),
                                "{format:?} row {r} tile {t} {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn amx_kernel_equals_the_portable_code_bit_for_bit() {
        if !KernelPath::Amx.supported() {
            eprintln!("this CPU or OS has no AMX: its kernel is not run here");
            return;
        }
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            for (blocks, tiles, rows) in [(1, 4, 16usize), (3, 8, 48), (2, 4, 37)] {
                let gguf = gguf_rows(format, TILE * tiles, blocks, 5);
                let repacked: Vec<u8> = gguf
                    .chunks_exact(TILE * blocks * format.gguf_bytes())
                    .flat_map(|four| kquant::repack(format, four, TILE, blocks))
                    .collect();
                let mut acts: Vec<KActBlock> = (0..rows)
                    .flat_map(|i| {
                        let x = values(30 + i as u64, blocks * SUPER);
                        KActBlock::quantize_all(KernelPath::Portable, &x)
                    })
                    .collect();
                // Extremes: full-scale activations of both signs.
                for (row, value) in [(1, 127i8), (2, -128)] {
                    for a in &mut acts[row * blocks..(row + 1) * blocks] {
                        a.q = [value; SUPER];
                        a.sums = [i16::from(value) * 32; SUBS];
                    }
                }
                let mut out = vec![f32::NAN; rows * TILE * tiles];
                let mut bands = Band::split(&mut out, rows, TILE * tiles, TILE * tiles);
                // SAFETY: the test runs only where the CPU has the features.
                let done = unsafe { dot_columns(format, &repacked, &acts, blocks, &mut bands[0]) };
                assert_eq!(done, Some(rows / ROWS * ROWS));
                let tile_bytes = blocks * format.tile_bytes();
                for r in 0..rows / ROWS * ROWS {
                    for (t, tile) in repacked.chunks_exact(tile_bytes).enumerate() {
                        let mut one = [[0f32; TILE]; 1];
                        let row = &acts[r * blocks..(r + 1) * blocks];
                        portable::dot_tile(format, tile, blocks, [row], &mut one);
                        for w in 0..TILE {
                            let got = out[r * TILE * tiles + TILE * t + w];
                            assert_eq!(
                                got.to_bits(),
                                one[0][w].to_bits(),
                                "{format:?} row {r} tile {t} {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
