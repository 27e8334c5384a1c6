//! AVX-512 kernel for batches: one tile of four weight rows against groups of four activation
//! rows, sixteen (weight row, activation row) pairs to a 512-bit register.
//!
//! Lane `4w + r` of a register belongs to weight row `w` and activation row `r`. For each group
//! `g` of four values in a block, `vpdpbusd` multiplies weight row `w`'s values `4g..4g+4`
//! (broadcast across the four lanes of its 128-bit quarter) with activation row `r`'s (the four
//! rows side by side, broadcast to every quarter), so one instruction yields the exact integer
//! dot of four values for all sixteen pairs, with no horizontal sums.
//!
//! Each lane then does, operation for operation, what [`super::dot::portable`] does for its
//! pair: Q4_1 and Q4_0 sum the eight groups exactly and accumulate `Σ·d·d_act (+ min·s_act)` in
//! one float; Q8_0 keeps one register per group (the eight float lanes of candle's AVX2 kernel,
//! one pair per lane) and sums them at the end in candle's order. So the results equal the other
//! kernels' bit for bit, and a pair's result never depends on the rows batched with it.

//!
//! Built into every x86-64 binary; it runs only on the AVX-512 VNNI [`super::KernelPath`].

use std::arch::x86_64::*;

use super::Band;
use super::dot::{ActBlock, BLOCK, Format, TILE};

/// Whether the kernel reads `format` (Q4_0, Q4_1 and Q8_0; the five-bit formats go through
/// [`super::dot`]'s four-row kernels).
pub(crate) fn covers(format: Format) -> bool {
    matches!(format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0)
}

/// Activation rows per group.
pub(crate) const GROUP: usize = 4;

/// One block of four activation rows, laid out for the kernel.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
pub(crate) struct ActGroup {
    /// `q[g]`: values `4g..4g+4` of each of the four rows, one row after the other.
    q: [[i8; 16]; 8],
    /// `-128 · Σ` of the same four values per row, for Q8_0, whose kernel multiplies by
    /// weights biased by 128 to be unsigned, so that each group's dot is the exact signed one
    /// (zero for the other formats).
    correction: [[i32; 4]; 8],
    /// `-8 · Σ` of each row's 32 values, for Q4_0, whose kernel multiplies by its unsigned
    /// nibbles, so that the block's dot is the exact signed one (zero for the other formats).
    offset: [i32; 4],
    /// The rows' scales.
    d: [f32; 4],
    /// The rows' `d · Σq` (see [`ActBlock`]).
    s: [f32; 4],
}

impl ActGroup {
    /// Interleaves one block of four rows for weights in `format`.
    pub(crate) fn new(format: Format, rows: [&ActBlock; GROUP]) -> Self {
        let bias = if format == Format::Q8_0 { 128 } else { 0 };
        let mut group = Self {
            q: [[0; 16]; 8],
            correction: [[0; 4]; 8],
            offset: rows.map(|a| {
                if format == Format::Q4_0 {
                    -8 * a.sum
                } else {
                    0
                }
            }),
            d: rows.map(|a| a.d),
            s: rows.map(|a| a.s),
        };
        for g in 0..BLOCK / 4 {
            for (r, a) in rows.iter().enumerate() {
                let values = &a.q[4 * g..4 * g + 4];
                group.q[g][4 * r..4 * r + 4].copy_from_slice(values);
                group.correction[g][r] = -bias * values.iter().map(|&v| i32::from(v)).sum::<i32>();
            }
        }
        group
    }
}

/// Dots one tile (`blocks` blocks of four weight rows, as [`super::dot::repack`] lays them
/// out) with `G` groups of four activation rows: `out[i][w][r]` is weight row `w` times row
/// `r` of group `i`. `cold`: the tile comes from memory, not cache, so the weights after it are
/// prefetched as it is read.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(crate) unsafe fn dot_tile<const G: usize>(
    format: Format,
    tile: &[u8],
    groups: [&[ActGroup]; G],
    out: &mut [[[f32; GROUP]; TILE]; G],
    cold: bool,
) {
    let blocks = tile.len() / (TILE * format.block_bytes());
    assert!(groups.iter().all(|a| a.len() == blocks));
    assert_eq!(tile.len(), blocks * TILE * format.block_bytes());
    // SAFETY: the CPU has AVX-512 F, BW, VL and VNNI (see above), and every load stays inside
    // `tile` and `groups`, whose lengths were checked above.
    unsafe { kernel(format, tile, blocks, groups, out, cold) }
}

/// `[x0, x1, x2, x3]` to `[x0 ×4, x1 ×4, x2 ×4, x3 ×4]`: weight row `w`'s value in its quarter.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) fn per_weight_row(x: __m128) -> __m512 {
    let index = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    _mm512_permutexvar_ps(index, _mm512_castps128_ps512(x))
}

/// Four f16 at `p` as f32 (exact, as `half` converts them).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn f16x4(p: *const u8) -> __m128 {
    // SAFETY: the caller passes 8 readable bytes; the target has F16C.
    unsafe { _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i)) }
}

/// 16 bytes at `p` in each quarter.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn broadcast16(p: *const u8) -> __m512i {
    // SAFETY: the caller passes 16 readable bytes; the target has AVX-512 F.
    unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i)) }
}

/// 64 bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn load64(p: *const u8) -> __m512i {
    // SAFETY: the caller passes 64 readable bytes; the target has AVX-512 F.
    unsafe { _mm512_loadu_si512(p as *const __m512i) }
}

/// Quarter `w` of register `g`: quarter `w` of `x`'s four bytes `4g..4g+4`, four times.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) fn spread(x: __m512i) -> [__m512i; 4] {
    [
        _mm512_shuffle_epi32::<0x00>(x),
        _mm512_shuffle_epi32::<0x55>(x),
        _mm512_shuffle_epi32::<0xaa>(x),
        _mm512_shuffle_epi32::<0xff>(x),
    ]
}

/// The tile block's weights as unsigned bytes, one register per group of four values: in
/// quarter `w`, weight row `w`'s values `4g..4g+4` four times. `lo` holds each row's values
/// 0..16 in its quarter, `hi` values 16..32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
fn weight_groups(lo: __m512i, hi: __m512i) -> [__m512i; 8] {
    let (lo, hi) = (spread(lo), spread(hi));
    std::array::from_fn(|g| if g < 4 { lo[g] } else { hi[g - 4] })
}

/// Sixteen nibble bytes per row (four rows at `p`) to their low and high nibbles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn nibbles(p: *const u8) -> (__m512i, __m512i) {
    // SAFETY: the caller passes 64 readable bytes; the target has AVX-512 F and BW.
    unsafe {
        let x = load64(p);
        let mask = _mm512_set1_epi8(0x0f);
        (
            _mm512_and_si512(x, mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask),
        )
    }
}

/// `f(0)`, ..., `f(G - 1)` written out, so that each group's accumulators, indexed by
/// constants, stay in registers (a loop keeps them on the stack).
#[inline(always)]
fn unrolled<const G: usize>(mut f: impl FnMut(usize)) {
    const { assert!(G <= 4) };
    if G > 0 {
        f(0);
    }
    if G > 1 {
        f(1);
    }
    if G > 2 {
        f(2);
    }
    if G > 3 {
        f(3);
    }
}

/// See [`dot_tile`].
///
/// # Safety
/// The target has AVX-512 F, BW, VL and VNNI; `tile` holds `blocks` tile blocks of `format`
/// and every slice of `groups` `blocks` blocks.
// Block `b` addresses both the tile's bytes and each group of activation rows.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn kernel<const G: usize>(
    format: Format,
    tile: &[u8],
    blocks: usize,
    groups: [&[ActGroup]; G],
    out: &mut [[[f32; GROUP]; TILE]; G],
    cold: bool,
) {
    let bytes = TILE * format.block_bytes();
    // SAFETY: see above; loads stay inside the blocks.
    unsafe {
        match format {
            Format::Q4_1 | Format::Q4_0 => {
                let q4_1 = format == Format::Q4_1;
                let mut sums = [_mm512_setzero_ps(); G];
                for b in 0..blocks {
                    let p = tile.as_ptr().add(b * bytes);
                    if cold {
                        crate::kernels::prefetch_ahead(p, bytes);
                    }
                    let d = per_weight_row(f16x4(p));
                    let (min, quants) = if q4_1 {
                        (per_weight_row(f16x4(p.add(8))), 16)
                    } else {
                        (_mm512_setzero_ps(), 8)
                    };
                    let (lo, hi) = nibbles(p.add(quants));
                    let w = weight_groups(lo, hi);
                    unrolled::<G>(|i| {
                        let a = &groups[i][b];
                        let q = a.q.as_ptr().cast::<u8>();
                        // Two chains of exact integer sums, for latency; their sum is exact.
                        // Q4_0's starts from its offset (zero for Q4_1).
                        let mut even =
                            _mm512_broadcast_i32x4(_mm_loadu_si128(a.offset.as_ptr().cast()));
                        let mut odd = _mm512_setzero_si512();
                        for g in (0..8).step_by(2) {
                            even = _mm512_dpbusd_epi32(even, w[g], broadcast16(q.add(16 * g)));
                            odd =
                                _mm512_dpbusd_epi32(odd, w[g + 1], broadcast16(q.add(16 * g + 16)));
                        }
                        let dots = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                        let d_act = _mm512_broadcast_f32x4(_mm_loadu_ps(a.d.as_ptr()));
                        let s_act = _mm512_broadcast_f32x4(_mm_loadu_ps(a.s.as_ptr()));
                        // ((Σ * d) * d_act) + (min * s_act), then accumulated: candle's order.
                        let t = _mm512_mul_ps(_mm512_mul_ps(dots, d), d_act);
                        let t = if q4_1 {
                            _mm512_add_ps(t, _mm512_mul_ps(min, s_act))
                        } else {
                            t
                        };
                        sums[i] = _mm512_add_ps(sums[i], t);
                    });
                }
                for i in 0..G {
                    _mm512_storeu_ps(out[i].as_mut_ptr().cast(), sums[i]);
                }
            }
            Format::Q8_0 => {
                let mut acc = [[_mm512_setzero_ps(); 8]; G];
                for b in 0..blocks {
                    let p = tile.as_ptr().add(b * bytes);
                    if cold {
                        crate::kernels::prefetch_ahead(p, bytes);
                    }
                    let d = per_weight_row(f16x4(p));
                    // Rows 0 and 1, then 2 and 3, 32 bytes each: gather the first halves and
                    // the second halves, and bias them by 128 to unsigned.
                    let (x0, x1) = (load64(p.add(8)), load64(p.add(72)));
                    let flip = _mm512_set1_epi8(-128);
                    let (lo, hi) = (
                        _mm512_xor_si512(_mm512_shuffle_i32x4::<0x88>(x0, x1), flip),
                        _mm512_xor_si512(_mm512_shuffle_i32x4::<0xdd>(x0, x1), flip),
                    );
                    let w = weight_groups(lo, hi);
                    unrolled::<G>(|i| {
                        let a = &groups[i][b];
                        let q = a.q.as_ptr().cast::<u8>();
                        let correction = a.correction.as_ptr().cast::<u8>();
                        let d_act = _mm512_broadcast_f32x4(_mm_loadu_ps(a.d.as_ptr()));
                        let scale = _mm512_mul_ps(d, d_act);
                        for g in 0..8 {
                            let dot = _mm512_dpbusd_epi32(
                                broadcast16(correction.add(16 * g)),
                                w[g],
                                broadcast16(q.add(16 * g)),
                            );
                            acc[i][g] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[i][g]);
                        }
                    });
                }
                for i in 0..G {
                    // candle's `hsum_float_8`, lane by lane: ((x4+x0)+(x6+x2))+((x5+x1)+(x7+x3)).
                    let x = acc[i];
                    let a: [__m512; 4] = std::array::from_fn(|u| _mm512_add_ps(x[u + 4], x[u]));
                    let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
                    _mm512_storeu_ps(out[i].as_mut_ptr().cast(), sum);
                }
            }
            Format::Q5_0 | Format::Q5_1 => {
                unreachable!("the wide kernel covers no five-bit format")
            }
        }
    }
}

/// The activation rows' blocks in groups of four (a trailing one to three rows are left out):
/// group `i`'s block `b` at `i * blocks + b`.
pub(crate) fn groups(format: Format, acts: &[ActBlock], blocks: usize) -> Vec<ActGroup> {
    in_groups(acts, blocks, |rows| ActGroup::new(format, rows))
}

/// `group` of each block of each four activation rows of `acts` (rows of `blocks` blocks; a
/// trailing one to three rows are left out): group `i`'s block `b` at `i * blocks + b`.
pub(crate) fn in_groups<A, G>(
    acts: &[A],
    blocks: usize,
    group: impl Fn([&A; GROUP]) -> G,
) -> Vec<G> {
    let rows = acts.len() / blocks;
    (0..rows / GROUP)
        .flat_map(|i| (0..blocks).map(move |b| (i, b)))
        .map(|(i, b)| group(std::array::from_fn(|r| &acts[(i * GROUP + r) * blocks + b])))
        .collect()
}

/// Tiles after one another in `tiles` (those of `band`) against every group of four activation
/// rows, the first group being the band's rows `row0..row0 + 4`. Returns the rows done, the
/// groups' rows.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(crate) unsafe fn dot_columns(
    format: Format,
    tiles: &[u8],
    groups: &[ActGroup],
    blocks: usize,
    band: &mut Band,
    row0: usize,
) -> usize {
    let tile_bytes = TILE * blocks * format.block_bytes();
    let count = groups.len() / blocks;
    // Registers: Q4_1 and Q4_0 need one accumulator per group, Q8_0 eight.
    let per_pass = if format == Format::Q8_0 { 2 } else { 4 };
    by_runs(
        tiles,
        tile_bytes,
        count,
        per_pass,
        band,
        row0,
        |tile, first, out| {
            let mut pass = groups[first * blocks..].chunks_exact(blocks);
            let mut group = || pass.next().expect("a group per pass");
            // The first pass over a run reads its tiles from memory, the others from cache.
            let cold = first == 0;
            let fits = "one output per group";
            // SAFETY (each arm): the CPU has the features (see above).
            match out.len() {
                4 => unsafe {
                    let groups = [group(), group(), group(), group()];
                    dot_tile(format, tile, groups, out.try_into().expect(fits), cold)
                },
                3 => unsafe {
                    dot_tile(
                        format,
                        tile,
                        [group(), group(), group()],
                        out.try_into().expect(fits),
                        cold,
                    )
                },
                2 => unsafe {
                    dot_tile(
                        format,
                        tile,
                        [group(), group()],
                        out.try_into().expect(fits),
                        cold,
                    )
                },
                _ => unsafe {
                    dot_tile(format, tile, [group()], out.try_into().expect(fits), cold)
                },
            }
        },
    )
}

/// Most groups of activation rows [`by_runs`] passes to its kernel at once.
pub(crate) const MAX_PASS: usize = 16;

/// Results of one group of activation rows against one tile: `[w][r]`, weight row `w` times
/// the group's row `r`.
pub(crate) type GroupOut = [[f32; GROUP]; TILE];

/// Tiles of `tile_bytes` after one another in `tiles` (the tiles of `band`) against `count`
/// groups of four activation rows, `per_pass` (at most [`MAX_PASS`]) groups at a time:
/// `kernel(tile, first, out)` dots one tile with groups `first..first + out.len()`. Returns the
/// rows done, the groups' rows.
///
/// Each pass over a run of tiles takes several groups (one unpacking of a weight block serves
/// them all); the run is short enough to stay in the core's cache for every pass, so the
/// weights come from memory once, not once per pass.
pub(crate) fn by_runs(
    tiles: &[u8],
    tile_bytes: usize,
    count: usize,
    per_pass: usize,
    band: &mut Band,
    row0: usize,
    mut kernel: impl FnMut(&[u8], usize, &mut [GroupOut]),
) -> usize {
    /// Bytes of weights per run of tiles: a quarter of a 1 MiB L2 cache.
    const RUN_BYTES: usize = 256 << 10;
    let run = (RUN_BYTES / tile_bytes).max(1);
    let mut out = [[[0f32; GROUP]; TILE]; MAX_PASS];
    for (r, tiles) in tiles.chunks(run * tile_bytes).enumerate() {
        let mut first = 0;
        while first < count {
            let take = per_pass.min(count - first);
            for (t, tile) in tiles.chunks_exact(tile_bytes).enumerate() {
                kernel(tile, first, &mut out[..take]);
                for (i, group) in out[..take].iter().enumerate() {
                    for (w, rows) in group.iter().enumerate() {
                        for (k, &value) in rows.iter().enumerate() {
                            band.set(r * run + t, w, row0 + (first + i) * GROUP + k, value);
                        }
                    }
                }
            }
            first += take;
        }
    }
    count * GROUP
}

#[cfg(test)]
mod tests {
    use super::super::KernelPath;
    use super::super::dot::tests::{act_row, gguf_rows};
    use super::super::dot::{portable, repack};
    use super::*;

    /// `G` groups of rows `rows[4i..4i+4]` through the wide kernel.
    fn wide<const G: usize>(format: Format, tile: &[u8], rows: &[Vec<ActBlock>]) -> Vec<[f32; 4]> {
        let blocks = rows[0].len();
        let flat: Vec<ActBlock> = rows.iter().flatten().copied().collect();
        let all = groups(format, &flat, blocks);
        let mut out = [[[0f32; GROUP]; TILE]; G];
        // SAFETY: the test runs only where the CPU has the features.
        unsafe {
            dot_tile(
                format,
                tile,
                std::array::from_fn(|i| &all[i * blocks..(i + 1) * blocks]),
                &mut out,
                G > 2,
            )
        };
        // Per activation row, its four weight rows' results.
        (0..G * GROUP)
            .map(|r| std::array::from_fn(|w| out[r / GROUP][w][r % GROUP]))
            .collect()
    }

    #[test]
    fn wide_kernel_equals_the_portable_code_bit_for_bit_for_any_grouping() {
        if !KernelPath::Avx512Vnni.supported() {
            eprintln!("this CPU lacks AVX-512 VNNI: its wide kernel is not run here");
            return;
        }
        for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            for blocks in [1, 18, 64] {
                let gguf = gguf_rows(format, blocks, 3 + blocks as u64);
                let tile = repack(format, &gguf, TILE, blocks);
                let mut rows: Vec<Vec<ActBlock>> =
                    (0..16).map(|i| act_row(blocks, 200 + i as u64)).collect();
                // Extremes: full-scale values of both signs and an all-zero row.
                for (row, value) in [(5, 127i8), (6, -127)] {
                    rows[row].iter_mut().for_each(|a| {
                        a.q = [value; BLOCK];
                        a.sum = i32::from(value) * BLOCK as i32;
                    });
                }
                rows[7].iter_mut().for_each(|a| {
                    *a = ActBlock::quantize_all(KernelPath::Portable, &[0.0; BLOCK])[0]
                });
                let reference: Vec<[u32; 4]> = rows
                    .iter()
                    .map(|row| {
                        let mut one = [[0f32; TILE]; 1];
                        portable::dot_tile(format, &tile, blocks, [&row[..]], &mut one);
                        one[0].map(f32::to_bits)
                    })
                    .collect();
                let bits = |v: Vec<[f32; 4]>| -> Vec<[u32; 4]> {
                    v.into_iter().map(|r| r.map(f32::to_bits)).collect()
                };
                assert_eq!(
                    bits(wide::<4>(format, &tile, &rows)),
                    reference,
                    "{format:?}"
                );
                assert_eq!(bits(wide::<3>(format, &tile, &rows[4..])), reference[4..]);
                assert_eq!(bits(wide::<2>(format, &tile, &rows[8..])), reference[8..]);
                assert_eq!(bits(wide::<1>(format, &tile, &rows[12..])), reference[12..]);
            }
        }
    }
}
