//! AVX-512 kernel for batches of K-quant products (Q4_K, Q5_K, Q6_K): one tile of four weight
//! rows against groups of four activation rows, sixteen (weight row, activation row) pairs to a
//! 512-bit register, as [`super::wide`] does for blocks of 32.
//!
//! Lane `4w + r` of a register belongs to weight row `w` and activation row `r`. Each
//! super-block of the tile is unpacked once, register `j` holding in quarter `w` weight row
//! `w`'s values `4j..4j+4` (unsigned), and serves every group (up to sixteen). Value groups `j`
//! and `j + 8` go side by side (`j = 16q + l`, `l < 8`): two `vpdpbusd` (rows 0 and 1, then 2
//! and 3, each with both value groups) give each pair's two dots of four values; a chain of
//! them that shares its scales (four of Q4_K's value groups, two of Q5_K's) adds up in i32
//! while it stays within i16, `vpackssdw` puts the two side by side as i16 in the pair's lane,
//! and one `vpdpwssd` with their two scales adds `sc·(q·y)` for both to the pair's exact sum
//! over the super-block. Q6_K's operands are the other way round: its weights less their bias
//! of 32 (signed) against the activations plus 128 (unsigned), whose excess
//! `128·Σ sc·(q − 32)` depends on the weights only, so it comes off once per tile block, not
//! once per group (and its chains are one value group long). Per super-block each pair then
//! takes `+= d·d_y · sum` and, for Q4_K and Q5_K, `+= −d_y·dmin · Σ m·Σy` (both fused): the
//! arithmetic of [`super::kquant`], so each pair's result is [`super::kquant::portable`]'s bit
//! for bit, whatever rows are batched with it.
//!
//! Built into every x86-64 binary; it runs only on the AVX-512 VNNI [`super::KernelPath`].

use std::arch::asm;
use std::arch::x86_64::*;

use super::Band;
use super::kquant::{
    D, DMIN, FIFTH, KActBlock, KFormat, MINS, QUANT6_BYTES, QUANTS, QUANTS6, SCALES, SCALES6, SUBS,
    SUPER,
};
use super::wide::{self, GROUP, GroupOut, broadcast16, f16x4, load64, per_weight_row, spread};

/// Whether the kernel reads `format` (Q4_K, Q5_K and Q6_K; Q2_K and Q3_K go through
/// [`super::kquant`]'s four-row kernels).
pub(crate) fn covers(format: KFormat) -> bool {
    matches!(format, KFormat::Q4K | KFormat::Q5K | KFormat::Q6K)
}

/// Groups of four values in a super-block.
const QUADS: usize = SUPER / 4;

/// Scales per super-block of the widest kind (Q6_K's, one per 16 values).
const CHUNKS: usize = SUPER / 16;

/// Most groups of activation rows one call of [`dot_tile`] takes: each unpacking of a weight
/// block serves them all (their accumulators live in memory, not registers).
pub(crate) const MAX_GROUPS: usize = wide::MAX_PASS;

/// One super-block of four activation rows, laid out for the kernel.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct KActGroup {
    /// `q[at(l, p, h)]`: for rows `2h` and `2h + 1`, one after the other, values `4j..4j+4` of
    /// `j = 16p + l` then of `j + 8` (the value groups that one `vpdpbusd` takes for a lane `l`
    /// of candle's, two at a time); for Q6_K each value plus 128, as an unsigned byte.
    q: [[i8; 16]; QUADS],
    /// `sums[p]`: each row's sums of sub-blocks `2p` and `2p + 1` (for the minimums).
    sums: [[i16; 8]; SUBS / 2],
    /// The rows' scales.
    d: [f32; GROUP],
    /// The rows' scales negated.
    neg_d: [f32; GROUP],
}

impl KActGroup {
    /// Where [`KActGroup::q`] holds lane `l`'s value groups `16p + l` and `16p + 8 + l` of rows
    /// `2h` and `2h + 1`.
    const fn at(l: usize, p: usize, h: usize) -> usize {
        (4 * l + p) * 2 + h
    }

    /// Interleaves one super-block of four rows for weights in `format`.
    fn new(format: KFormat, rows: [&KActBlock; GROUP]) -> Self {
        let mut group = Self {
            q: [[0; 16]; QUADS],
            sums: [[0; 8]; SUBS / 2],
            d: rows.map(|a| a.d),
            neg_d: rows.map(|a| -a.d),
        };
        for (r, a) in rows.iter().enumerate() {
            for j in 0..QUADS {
                let values = &a.q[4 * j..4 * j + 4];
                let (l, p, k) = (j % 8, j / 16, j / 8 % 2);
                let to = &mut group.q[Self::at(l, p, r / 2)][8 * (r % 2) + 4 * k..][..4];
                if format == KFormat::Q6K {
                    // y + 128 = y with its top bit flipped, read as unsigned.
                    for (to, &y) in to.iter_mut().zip(values) {
                        *to = y ^ i8::MIN;
                    }
                } else {
                    to.copy_from_slice(values);
                }
            }
            for p in 0..SUBS / 2 {
                group.sums[p][2 * r..2 * r + 2].copy_from_slice(&a.sums[2 * p..2 * p + 2]);
            }
        }
        group
    }
}

/// The activation rows' super-blocks in groups of four (a trailing one to three rows are left
/// out): group `i`'s super-block `b` at `i * blocks + b`.
pub(crate) fn groups(format: KFormat, acts: &[KActBlock], blocks: usize) -> Vec<KActGroup> {
    wide::in_groups(acts, blocks, |rows| KActGroup::new(format, rows))
}

/// Dots one tile (`blocks` super-blocks of four weight rows, as [`super::kquant::repack`] lays
/// them out) with up to [`MAX_GROUPS`] groups of four activation rows: `out[i][w][r]` is weight
/// row `w` times row `r` of group `i`. `cold`: the tile comes from memory, not cache, so the
/// weights after it are prefetched as it is read.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(crate) unsafe fn dot_tile(
    format: KFormat,
    tile: &[u8],
    groups: &[&[KActGroup]],
    out: &mut [GroupOut],
    cold: bool,
) {
    let blocks = tile.len() / format.tile_bytes();
    assert!(covers(format), "the wide kernel covers no {format:?}");
    assert!(groups.len() <= MAX_GROUPS && out.len() == groups.len());
    assert!(groups.iter().all(|g| g.len() == blocks));
    assert_eq!(tile.len(), blocks * format.tile_bytes());
    // SAFETY: the CPU has the features (see above), and every load stays inside `tile` and
    // `groups`, whose lengths were checked above.
    unsafe { kernel(format, tile, blocks, groups, out, cold) }
}

/// `[r0, r1, r2, r3]`, each four quarters of 16 bytes, to `[c0, c1, c2, c3]` with `c_q`'s
/// quarter `w` `r_w`'s quarter `q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) fn transpose(r: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_shuffle_i32x4::<0x44>(r[0], r[1]);
    let t1 = _mm512_shuffle_i32x4::<0xee>(r[0], r[1]);
    let t2 = _mm512_shuffle_i32x4::<0x44>(r[2], r[3]);
    let t3 = _mm512_shuffle_i32x4::<0xee>(r[2], r[3]);
    [
        _mm512_shuffle_i32x4::<0x88>(t0, t2),
        _mm512_shuffle_i32x4::<0xdd>(t0, t2),
        _mm512_shuffle_i32x4::<0x88>(t1, t3),
        _mm512_shuffle_i32x4::<0xdd>(t1, t3),
    ]
}

/// The i16 lane `n` of a register in quarter `n / 8`: `8 · (n / 8) + odd · (n % 2)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
fn quarter_index(per_quarter: i16, odd: i16) -> __m512i {
    let index: [i16; 32] =
        std::array::from_fn(|n| per_quarter * (n / 8) as i16 + odd * (n % 2) as i16);
    // SAFETY: 64 readable bytes; the target has AVX-512 F.
    unsafe { _mm512_loadu_si512(index.as_ptr().cast()) }
}

/// The weight registers of one Q4_K or Q5_K (`five`) tile block at `p` (see the module doc),
/// each 16 values' scales (`sc[c]`, quarter `w`: row `w`'s scale of values `16c..16c+16`, as
/// i16) and the minimums (`mins[p]`, quarter `w`: row `w`'s minimums `2p` and `2p + 1` as a pair
/// of i16).
///
/// # Safety
/// `p` is a tile block of the format; the CPU has AVX-512 F, BW and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn unpack_q4k(
    p: *const u8,
    five: bool,
    w: &mut [__m512i; QUADS],
    sc: &mut [__m512i; CHUNKS],
    mins: &mut [__m512i; SUBS / 2],
) {
    // SAFETY: loads stay inside the tile block (see above).
    unsafe {
        let nibble = _mm512_set1_epi8(0x0f);
        // Quarter `w` of `fifth[h]`: row `w`'s fifth bits of values `16h..16h+16` of each
        // sub-block (bit `i` for sub-block `i`).
        let fifth = if five {
            let (x01, x23) = (load64(p.add(FIFTH)), load64(p.add(FIFTH + 64)));
            [
                _mm512_shuffle_i32x4::<0x88>(x01, x23),
                _mm512_shuffle_i32x4::<0xdd>(x01, x23),
            ]
        } else {
            [_mm512_setzero_si512(); 2]
        };
        // A row's byte `64h + k` holds value `128h + k` (low nibble) and `128h + 64 + k`.
        for h in 0..2 {
            let c = transpose(std::array::from_fn(|r| {
                load64(p.add(QUANTS + 128 * r + 64 * h))
            }));
            for (q, &c) in c.iter().enumerate() {
                for (high, x) in [(0, c), (1, _mm512_srli_epi16::<4>(c))] {
                    let chunk = 8 * h + 4 * high + q;
                    let mut v = _mm512_and_si512(x, nibble);
                    if five {
                        let bit = _mm512_set1_epi8((1u8 << (chunk / 2)) as i8);
                        let set = _mm512_test_epi8_mask(fifth[chunk % 2], bit);
                        v = _mm512_mask_add_epi8(v, set, v, _mm512_set1_epi8(16));
                    }
                    w[4 * chunk..4 * chunk + 4].copy_from_slice(&spread(v));
                }
            }
        }
        let scales = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(SCALES).cast()));
        let by_row = quarter_index(8, 0);
        for (c, sc) in sc.iter_mut().enumerate() {
            let i = _mm512_set1_epi16((c / 2) as i16);
            *sc = _mm512_permutexvar_epi16(_mm512_add_epi16(by_row, i), scales);
        }
        let m = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(MINS).cast()));
        let pairs = quarter_index(8, 1);
        for (q, mins) in mins.iter_mut().enumerate() {
            let i = _mm512_set1_epi16(2 * q as i16);
            *mins = _mm512_permutexvar_epi16(_mm512_add_epi16(pairs, i), m);
        }
    }
}

/// The weight registers of the Q6_K tile block at `p` as signed values (each less its bias
/// of 32), each 16 values' scales (see [`unpack_q4k`]) and, per lane `l` of candle's eight,
/// `excess[l]`: `−128·Σ sc·(q − 32)` over the lane's value groups, in quarter `w` row `w`'s,
/// which starts each pair's integer sum to take the activations' 128 off.
///
/// # Safety
/// `p` is a Q6_K tile block; the CPU has AVX-512 F, BW and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn unpack_q6k(
    p: *const u8,
    w: &mut [__m512i; QUADS],
    sc: &mut [__m512i; CHUNKS],
    excess: &mut __m512i,
) {
    // SAFETY: loads stay inside the tile block (see above).
    unsafe {
        // Rows 0 and 1's sixteen scales, then rows 2 and 3's, as i16.
        let scales = p.add(SCALES6);
        let (s01, s23) = (
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(scales.cast())),
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(scales.add(32).cast())),
        );
        let by_row = quarter_index(16, 0);
        for (c, sc) in sc.iter_mut().enumerate() {
            let index = _mm512_add_epi16(by_row, _mm512_set1_epi16(c as i16));
            *sc = _mm512_permutex2var_epi16(s01, index, s23);
        }
        let (nibble, two_bits) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(3));
        let (bias, half) = (_mm512_set1_epi8(32), _mm512_set1_epi8(i8::MIN));
        let quants = |r: usize| p.add(QUANTS6 + QUANT6_BYTES * r);
        // Value 128n + 32j + l: low nibble (j < 2) or high of low byte 64n + 32(j % 2) + l,
        // its top bits at bit 2j of high byte 128 + 32n + l.
        let low: [[__m512i; 4]; 2] = std::array::from_fn(|n| {
            transpose(std::array::from_fn(|r| load64(quants(r).add(64 * n))))
        });
        let top = transpose(std::array::from_fn(|r| load64(quants(r).add(128))));
        // `sums[h]`, i32 `i` of quarter `w`: row `w`'s `128·Σ sc·(q − 32)` over the value
        // groups `4c + i` of the chunks `c ≡ h (mod 2)`, which are lane `4h + i`'s.
        let mut sums = [_mm512_setzero_si512(); 2];
        for n in 0..2 {
            for j in 0..4 {
                for h in 0..2 {
                    let chunk = 8 * n + 2 * j + h;
                    let x = low[n][2 * (j % 2) + h];
                    let x = if j < 2 { x } else { _mm512_srli_epi16::<4>(x) };
                    let t = _mm512_srl_epi16(top[2 * n + h], _mm_cvtsi32_si128(2 * j as i32));
                    let v = _mm512_or_si512(
                        _mm512_and_si512(x, nibble),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(t, two_bits)),
                    );
                    let v = _mm512_sub_epi8(v, bias);
                    w[4 * chunk..4 * chunk + 4].copy_from_slice(&spread(v));
                    // Both i16 of a pair hold the chunk's scale.
                    let weighted = _mm512_madd_epi16(_mm512_maddubs_epi16(half, v), sc[chunk]);
                    sums[h] = _mm512_add_epi32(sums[h], weighted);
                }
            }
        }
        // Each quarter's four lanes added up, in all four.
        let total = _mm512_add_epi32(sums[0], sums[1]);
        let total = _mm512_add_epi32(total, _mm512_shuffle_epi32::<0x4e>(total));
        let total = _mm512_add_epi32(total, _mm512_shuffle_epi32::<0xb1>(total));
        *excess = _mm512_sub_epi32(_mm512_setzero_si512(), total);
    }
}

/// `acc + Σ a·b` over each i32 lane's two i16 pairs (`_mm512_dpwssd_epi32`) as one
/// `vpdpwssd`: LLVM splits a chain of the intrinsic into `vpmaddwd` and `vpaddd` (a shorter
/// chain, but half again as many instructions on the vector ports, which bound this kernel).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: the target has AVX-512 VNNI; the instruction reads and writes registers only.
    unsafe {
        asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// See [`dot_tile`]: [`kernel_for`] with the format as constants, so that each format's loops
/// compile without its branches.
///
/// # Safety
/// The target has AVX-512 F, BW, VL and VNNI; `tile` holds `blocks` tile blocks of `format`
/// and every slice of `groups` `blocks` blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn kernel(
    format: KFormat,
    tile: &[u8],
    blocks: usize,
    groups: &[&[KActGroup]],
    out: &mut [GroupOut],
    cold: bool,
) {
    // SAFETY: passed on from the caller.
    unsafe {
        match format {
            KFormat::Q4K => kernel_for::<false, false>(tile, blocks, groups, out, cold),
            KFormat::Q5K => kernel_for::<true, false>(tile, blocks, groups, out, cold),
            KFormat::Q6K => kernel_for::<false, true>(tile, blocks, groups, out, cold),
            KFormat::Q2K | KFormat::Q3K => unreachable!("the wide kernel covers no Q2_K or Q3_K"),
        }
    }
}

/// The kernel for Q4_K, Q5_K (`FIVE`) or Q6_K (`SIX`). Per tile block and quarter `p` of
/// it (value groups `16p..16p + 16`), the eight weight registers of the quarter stay in
/// registers while every group passes, so the inner loop loads only the activations.
///
/// # Safety
/// As [`kernel`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn kernel_for<const FIVE: bool, const SIX: bool>(
    tile: &[u8],
    blocks: usize,
    groups: &[&[KActGroup]],
    out: &mut [GroupOut],
    cold: bool,
) {
    let format = match (FIVE, SIX) {
        (false, false) => KFormat::Q4K,
        (true, _) => KFormat::Q5K,
        (false, true) => KFormat::Q6K,
    };
    // Value groups whose dots add up in i32 before `vpackssdw` takes them to i16: four
    // (sixteen values) of Q4_K's (at most 16 · 15 · 128), two of Q5_K's (8 · 31 · 128); each
    // of Q6_K's alone (4 · 32 · 255), its activations being unsigned.
    let chain = match format {
        KFormat::Q4K => 4,
        KFormat::Q5K => 2,
        _ => 1,
    };
    // SAFETY: see [`kernel`]; loads stay inside the blocks.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); MAX_GROUPS];
        let mut w = [_mm512_setzero_si512(); QUADS];
        let mut sc = [_mm512_setzero_si512(); CHUNKS];
        let mut mins = [_mm512_setzero_si512(); SUBS / 2];
        let mut excess = _mm512_setzero_si512();
        for b in 0..blocks {
            let p = tile.as_ptr().add(b * format.tile_bytes());
            if cold {
                crate::kernels::prefetch_ahead(p, format.tile_bytes());
            }
            if SIX {
                unpack_q6k(p, &mut w, &mut sc, &mut excess);
            } else {
                unpack_q4k(p, FIVE, &mut w, &mut sc, &mut mins);
            }
            // Each pair's exact `Σ sc·(q·y)` over the super-block (Q6_K's from its excess).
            let mut sums = [excess; MAX_GROUPS];
            for q in 0..4 {
                // Value group `16q + l` and `16q + l + 8` of each weight row, side by side in
                // its quarter (`w[l]`), and their two scales in each i32 lane (`sc[l / 4]`).
                let w: [__m512i; 8] = std::array::from_fn(|l| {
                    let j = 16 * q + l;
                    _mm512_mask_blend_epi32(0xaaaa, w[j], w[j + 8])
                });
                let sc: [__m512i; 2] = std::array::from_fn(|half| {
                    let c = 4 * q + half;
                    _mm512_mask_blend_epi16(0xaaaa_aaaa, sc[c], sc[c + 2])
                });
                for (group, sum) in groups.iter().zip(&mut sums) {
                    let a = &group[b];
                    // Rows 0 and 1 (`dots[0]`), then 2 and 3: each pair's dots of a chain of
                    // value groups (and those 8 on), side by side as i16 in the pair's lane,
                    // times their scales.
                    let mut dots = [_mm512_setzero_si512(); 2];
                    for l in 0..8 {
                        for (h, dot) in dots.iter_mut().enumerate() {
                            let y = broadcast16(a.q[KActGroup::at(l, q, h)].as_ptr().cast());
                            *dot = if SIX {
                                _mm512_dpbusd_epi32(*dot, y, w[l])
                            } else {
                                _mm512_dpbusd_epi32(*dot, w[l], y)
                            };
                        }
                        if (l + 1) % chain == 0 {
                            let packed = _mm512_packs_epi32(dots[0], dots[1]);
                            *sum = dpwssd(*sum, packed, sc[l / 4]);
                            dots = [_mm512_setzero_si512(); 2];
                        }
                    }
                }
            }
            let d = per_weight_row(f16x4(p.add(D)));
            for ((group, acc), sum) in groups.iter().zip(&mut acc).zip(&sums) {
                let d_act = _mm512_broadcast_f32x4(_mm_loadu_ps(group[b].d.as_ptr()));
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(d_act, d), _mm512_cvtepi32_ps(*sum), *acc);
            }
            if SIX {
                continue;
            }
            // Each pair's exact `Σ m·Σy`.
            let dmin = per_weight_row(f16x4(p.add(DMIN)));
            for (group, acc) in groups.iter().zip(&mut acc) {
                let a = &group[b];
                let neg_d = _mm512_broadcast_f32x4(_mm_loadu_ps(a.neg_d.as_ptr()));
                let sum = (0..SUBS / 2).fold(_mm512_setzero_si512(), |sum, q| {
                    dpwssd(sum, mins[q], broadcast16(a.sums[q].as_ptr().cast()))
                });
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(neg_d, dmin), _mm512_cvtepi32_ps(sum), *acc);
            }
        }
        for (acc, out) in acc.iter().zip(out) {
            _mm512_storeu_ps(out.as_mut_ptr().cast(), *acc);
        }
    }
}

/// Tiles after one another in `tiles` (those of `band`) against every group of four activation
/// rows, the first group being the band's rows `row0..row0 + 4` (see [`wide::by_runs`]).
/// Returns the rows done, the groups' rows.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(crate) unsafe fn dot_columns(
    format: KFormat,
    tiles: &[u8],
    groups: &[KActGroup],
    blocks: usize,
    band: &mut Band,
    row0: usize,
) -> usize {
    let tile_bytes = blocks * format.tile_bytes();
    let count = groups.len() / blocks;
    wide::by_runs(
        tiles,
        tile_bytes,
        count,
        MAX_GROUPS,
        band,
        row0,
        |tile, first, out| {
            let mut pass: [&[KActGroup]; MAX_GROUPS] = [&[]; MAX_GROUPS];
            for (to, group) in pass
                .iter_mut()
                .zip(groups[first * blocks..].chunks_exact(blocks))
            {
                *to = group;
            }
            // SAFETY: the CPU has the features (see above). The first pass over a run reads
            // its tiles from memory, the others from cache.
            unsafe { dot_tile(format, tile, &pass[..out.len()], out, first == 0) }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::KernelPath;
    use super::super::dot::TILE;
    use super::super::kquant::tests::{gguf_rows, values};
    use super::super::kquant::{self, portable};
    use super::*;

    #[test]
    fn wide_k_kernel_equals_the_portable_code_bit_for_bit_for_any_grouping() {
        if !KernelPath::Avx512Vnni.supported() {
            eprintln!("this CPU lacks AVX-512 VNNI: its wide K-quant kernel is not run here");
            return;
        }
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            for (blocks, seed) in [(1, 3), (3, 4), (3, 0)] {
                // Seed 0: random bytes (every quant, scale and minimum, Q6_K's negative
                // scales), with sane `d` and `dmin`; otherwise candle's quantization.
                let gguf = if seed == 0 {
                    random_blocks(format, TILE * blocks)
                } else {
                    gguf_rows(format, TILE, blocks, seed)
                };
                let tile = kquant::repack(format, &gguf, TILE, blocks);
                let mut rows: Vec<Vec<KActBlock>> = (0..16)
                    .map(|i| {
                        KActBlock::quantize_all(
                            KernelPath::Portable,
                            &values(70 + i, blocks * SUPER),
                        )
                    })
                    .collect();
                // Extremes: full-scale values of both signs and an all-zero row.
                for (row, value) in [(5, 127i8), (6, -127)] {
                    rows[row].iter_mut().for_each(|a| {
                        a.q = [value; SUPER];
                        a.sums = [i16::from(value) * 32; SUBS];
                    });
                }
                rows[7] = KActBlock::quantize_all(KernelPath::Portable, &vec![0.0; blocks * SUPER]);
                let reference: Vec<[u32; TILE]> = rows
                    .iter()
                    .map(|row| {
                        let mut one = [[0f32; TILE]; 1];
                        portable::dot_tile(format, &tile, blocks, [&row[..]], &mut one);
                        one[0].map(f32::to_bits)
                    })
                    .collect();
                let flat: Vec<KActBlock> = rows.iter().flatten().copied().collect();
                let all = groups(format, &flat, blocks);
                for (first, count) in [(0, 4), (1, 3), (2, 2), (3, 1)] {
                    let pass: Vec<&[KActGroup]> = all[first * blocks..]
                        .chunks_exact(blocks)
                        .take(count)
                        .collect();
                    let mut out = vec![[[0f32; GROUP]; TILE]; count];
                    // SAFETY: the test runs only where the CPU has the features.
                    unsafe { dot_tile(format, &tile, &pass, &mut out, first == 0) };
                    for row in first * GROUP..(first + count) * GROUP {
                        let group = &out[row / GROUP - first];
                        let got: [u32; TILE] =
                            std::array::from_fn(|w| group[w][row % GROUP].to_bits());
                        assert_eq!(got, reference[row], "{format:?} seed {seed} row {row}");
                    }
                }
            }
        }
    }

    /// `rows` GGUF rows of random bytes, each super-block's `d` (and `dmin`) set to a small
    /// positive f16.
    fn random_blocks(format: KFormat, rows: usize) -> Vec<u8> {
        let bytes: Vec<u8> = values(99, rows * format.gguf_bytes())
            .iter()
            .map(|v| (v.to_bits() >> 7) as u8)
            .collect();
        let scale = half::f16::from_f32(0.0123).to_le_bytes();
        let mut bytes = bytes;
        for block in bytes.chunks_exact_mut(format.gguf_bytes()) {
            match format {
                KFormat::Q4K | KFormat::Q5K => {
                    block[..2].copy_from_slice(&scale);
                    block[2..4].copy_from_slice(&scale);
                }
                KFormat::Q6K => block[208..].copy_from_slice(&scale),
                KFormat::Q2K | KFormat::Q3K => {
                    unreachable!("the wide kernel covers no Q2_K or Q3_K")
                }
            }
        }
        bytes
    }
}
