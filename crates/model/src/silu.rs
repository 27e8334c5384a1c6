//! SwiGLU's gating `silu(g) · u = g / (1 + e^-g) · u` over slices, with the exponential eight
//! or sixteen lanes at a time and every value bit for bit glibc's `expf`, so candle's `silu`.
//!
//! glibc's `expf` (2.28 and later; the build of it that its loader picks on every CPU with AVX2
//! and FMA) works in double precision: `k = round(x · 32/ln2)` and the remainder `r`, `2^(k/32)`
//! from a table of 32 entries and a cubic in `r`, rounded to f32 once. The code here does the
//! same double operations in the same order, fused where glibc's are, in the lanes of a vector
//! ([`avx512`], [`avx2`]) or one value at a time ([`exp`], the portable path and every path's
//! tail), so each value is the C library's and never depends on its neighbours. Candle calls
//! `expf` once per value: 3.4% of a trunk batch of sixteen SmolLM2 rows, and the scalar loop
//! around it 3.0% more; 1.6% in all here. The tests compare every path with `f32::exp` over
//! every float. Hand-written rather than a crate's: the crates' vector `exp`s round
//! differently, and candle's values are the reference.

use crate::KernelPath;

/// `32 / ln 2`, rounded to double.
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `1.5 · 2^52`: adding it rounds a double of magnitude under `2^51` to an integer, which its
/// low mantissa bits then hold.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients for `2^(r/32)`, highest degree first (its constant term is 1).
const POLY: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394),
    f64::from_bits(0x3f2e_bfce_50fa_c4f3),
    f64::from_bits(0x3f96_2e42_ff0c_52d6),
];
/// `bits(2^(i/32)) − i · 2^47`: adding `k · 2^47` for `k ≡ i (mod 32)` gives `2^(k/32)`.
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// The top twelve bits (sign dropped) from which an input leaves the common path: |x| ≥ 88,
/// infinities and NaN.
const SPECIAL_TOP: u32 = 0x42b;
/// Above this, `e^x` overflows f32.
const OVERFLOW: f32 = f32::from_bits(0x42b1_7217);
/// Below this, `e^x` rounds to zero.
const UNDERFLOW: f32 = f32::from_bits(0xc2cf_f1b4);
/// Below this (and from [`UNDERFLOW`]), `e^x` rounds to the least subnormal.
const LEAST: f32 = f32::from_bits(0xc2ce_8ecf);

/// `out[i] = gate[i] / (1 + e^-gate[i]) · up[i]` on `path`'s vectors; the slices have one
/// length.
pub(crate) fn silu_times(path: KernelPath, gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if path.avx512() {
            // SAFETY: the AVX-512 paths run only where the CPU has AVX-512 F.
            return unsafe { avx512::silu_times(gate, up, out) };
        }
        if path == KernelPath::Avx2 {
            // SAFETY: the AVX2 path runs only where the CPU has AVX2 and FMA.
            return unsafe { avx2::silu_times(gate, up, out) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = path;
    portable(gate, up, out);
}

/// [`silu_times`] one value at a time.
fn portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// `e^x`, glibc's `expf` bit for bit.
fn exp(x: f32) -> f32 {
    if (x.to_bits() >> 20) & 0x7ff >= SPECIAL_TOP {
        special(x)
    } else {
        common(x)
    }
}

/// The common path of [`exp`]: |x| < 88, and from [`special`] the finite rest between the
/// limits.
fn common(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd = xd.mul_add(INV_LN2_N, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(POLY[0], POLY[1]);
    let y = r.mul_add(POLY[2], 1.0);
    let y = z.mul_add(r * r, y);
    (y * s) as f32
}

/// [`exp`] of |x| ≥ 88, infinities and NaN: the limits, and the common path in between.
fn special(x: f32) -> f32 {
    if x == f32::NEG_INFINITY {
        0.0
    } else if !x.is_finite() {
        // NaN stays NaN (quieted, as glibc's `x + x`); +∞ stays +∞.
        x + x
    } else if x > OVERFLOW {
        f32::INFINITY
    } else if x < UNDERFLOW {
        0.0
    } else if x < LEAST {
        f32::from_bits(1)
    } else {
        common(x)
    }
}

/// `y` with the lanes whose bit is set in `leaving` (inputs that left the common path)
/// replaced by [`special`] of their input in `x`.
#[cfg(target_arch = "x86_64")]
fn redo_leaving<const N: usize>(x: [f32; N], mut y: [f32; N], leaving: u32) -> [f32; N] {
    for lane in (0..N).filter(|lane| leaving >> lane & 1 == 1) {
        y[lane] = special(x[lane]);
    }
    y
}

/// The AVX-512 F code: sixteen values per step, as two halves of eight doubles.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// See [`super::silu_times`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_times(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let whole = gate.len() / 16 * 16;
        let (one, sign) = (_mm512_set1_ps(1.0), _mm512_set1_epi32(i32::MIN));
        for i in (0..whole).step_by(16) {
            // SAFETY: `i + 16 <= whole`, within every slice.
            unsafe {
                let g = _mm512_loadu_ps(gate.as_ptr().add(i));
                let e = exp16(_mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(g),
                    sign,
                )));
                let y = _mm512_mul_ps(
                    _mm512_div_ps(g, _mm512_add_ps(one, e)),
                    _mm512_loadu_ps(up.as_ptr().add(i)),
                );
                _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
            }
        }
        portable(&gate[whole..], &up[whole..], &mut out[whole..]);
    }

    /// [`super::exp`] of sixteen lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp16(x: __m512) -> __m512 {
        let bits = _mm512_castps_si512(x);
        let low = exp8(_mm256_castsi256_ps(_mm512_castsi512_si256(bits)));
        let high = exp8(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(bits, 1)));
        let mut y = _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_castps_si256(low)),
            _mm256_castps_si256(high),
            1,
        ));
        let top = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(0x7ff));
        let leaving = _mm512_cmpge_epi32_mask(top, _mm512_set1_epi32(SPECIAL_TOP as i32));
        if leaving != 0 {
            // SAFETY: a register of sixteen f32 and an array of them have one layout.
            y = unsafe {
                std::mem::transmute::<[f32; 16], __m512>(redo_leaving(
                    std::mem::transmute::<__m512, [f32; 16]>(x),
                    std::mem::transmute::<__m512, [f32; 16]>(y),
                    leaving.into(),
                ))
            };
        }
        y
    }

    /// The common path of [`super::exp`] for eight lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp8(x: __m256) -> __m256 {
        let xd = _mm512_cvtps_pd(x);
        let inv = _mm512_set1_pd(INV_LN2_N);
        let shift = _mm512_set1_pd(SHIFT);
        let kd = _mm512_fmadd_pd(xd, inv, shift);
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, shift);
        let r = _mm512_fmsub_pd(inv, xd, kd);
        // 2^(k/32): entries `k mod 16` of the table's two halves, the second where bit 4 is set.
        let table = |part: usize| {
            // SAFETY: `part * 8 + 8 <= 32`, within the table.
            unsafe { _mm512_loadu_si512(TABLE.as_ptr().add(8 * part) as *const _) }
        };
        let first = _mm512_permutex2var_epi64(table(0), ki, table(1));
        let second = _mm512_permutex2var_epi64(table(2), ki, table(3));
        let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
        let entry = _mm512_mask_blend_epi64(upper, first, second);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(entry, _mm512_slli_epi64(ki, 47)));
        let z = _mm512_fmadd_pd(r, _mm512_set1_pd(POLY[0]), _mm512_set1_pd(POLY[1]));
        let y = _mm512_fmadd_pd(r, _mm512_set1_pd(POLY[2]), _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y);
        _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
    }
}

/// The AVX2 and FMA code: eight values per step, as two halves of four doubles.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// See [`super::silu_times`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_times(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let whole = gate.len() / 8 * 8;
        let (one, sign) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= whole`, within every slice.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = exp8(_mm256_xor_ps(g, sign));
                let y = _mm256_mul_ps(
                    _mm256_div_ps(g, _mm256_add_ps(one, e)),
                    _mm256_loadu_ps(up.as_ptr().add(i)),
                );
                _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            }
        }
        portable(&gate[whole..], &up[whole..], &mut out[whole..]);
    }

    /// [`super::exp`] of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        let low = exp4(_mm256_castps256_ps128(x));
        let high = exp4(_mm256_extractf128_ps(x, 1));
        let mut y = _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
        let bits = _mm256_castps_si256(x);
        let top = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(0x7ff));
        let leaving = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
            top,
            _mm256_set1_epi32(SPECIAL_TOP as i32 - 1),
        )));
        if leaving != 0 {
            // SAFETY: a register of eight f32 and an array of them have one layout.
            y = unsafe {
                std::mem::transmute::<[f32; 8], __m256>(redo_leaving(
                    std::mem::transmute::<__m256, [f32; 8]>(x),
                    std::mem::transmute::<__m256, [f32; 8]>(y),
                    leaving as u32,
                ))
            };
        }
        y
    }

    /// The common path of [`super::exp`] for four lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp4(x: __m128) -> __m128 {
        let xd = _mm256_cvtps_pd(x);
        let inv = _mm256_set1_pd(INV_LN2_N);
        let shift = _mm256_set1_pd(SHIFT);
        let kd = _mm256_fmadd_pd(xd, inv, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(inv, xd, kd);
        let index = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: every index is under 32, within the table.
        let entry = unsafe { _mm256_i64gather_epi64::<8>(TABLE.as_ptr() as *const i64, index) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(entry, _mm256_slli_epi64(ki, 47)));
        let z = _mm256_fmadd_pd(r, _mm256_set1_pd(POLY[0]), _mm256_set1_pd(POLY[1]));
        let y = _mm256_fmadd_pd(r, _mm256_set1_pd(POLY[2]), _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, _mm256_mul_pd(r, r), y);
        _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;
    use crate::rowwise::tests::values;

    /// `path`'s `e^x` of each of `xs`.
    fn exps(path: KernelPath, xs: &[f32]) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if path.avx512() && xs.len().is_multiple_of(16) {
                let mut out = vec![0f32; xs.len()];
                for (x, e) in xs.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                    // SAFETY: the path runs only where the CPU has AVX-512 F; sixteen values.
                    unsafe {
                        let y = avx512::exp16(_mm512_loadu_ps(x.as_ptr()));
                        _mm512_storeu_ps(e.as_mut_ptr(), y);
                    }
                }
                return out;
            }
            if path == KernelPath::Avx2 && xs.len().is_multiple_of(8) {
                let mut out = vec![0f32; xs.len()];
                for (x, e) in xs.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                    // SAFETY: the path runs only where the CPU has AVX2 and FMA; eight values.
                    unsafe {
                        let y = avx2::exp8(_mm256_loadu_ps(x.as_ptr()));
                        _mm256_storeu_ps(e.as_mut_ptr(), y);
                    }
                }
                return out;
            }
        }
        xs.iter().map(|&x| exp(x)).collect()
    }

    #[test]
    fn every_path_is_the_c_librarys_expf_for_every_float() {
        // Every float, in slices of 2^16 bit patterns, through every path (the portable one
        // takes every 61st: its fused multiply-adds are calls into the C library where the
        // build has no FMA); (path, input, ours, the C library's), at most ten.
        let paths = KernelPath::all_supported();
        let mismatches: Vec<(KernelPath, u32, u32, u32)> = (0u32..1 << 16)
            .into_par_iter()
            .flat_map_iter(|high| {
                let xs: Vec<f32> = (0..1 << 16)
                    .map(|low| f32::from_bits(high << 16 | low))
                    .collect();
                let libc: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
                let mut found = Vec::new();
                for &path in &paths {
                    let step = if path.avx512() || path == KernelPath::Avx2 {
                        1
                    } else {
                        61
                    };
                    let xs: Vec<f32> = xs.iter().step_by(step).copied().collect();
                    for (i, e) in exps(path, &xs).into_iter().enumerate() {
                        let c = libc[i * step];
                        if e.to_bits() != c && found.len() < 10 {
                            found.push((path, xs[i].to_bits(), e.to_bits(), c));
                        }
                    }
                }
                found
            })
            .take_any(10)
            .collect();
        assert_eq!(mismatches, []);
    }

    #[test]
    fn every_path_gates_as_candles_silu_then_product() {
        // Lengths with and without a tail after the vectors, the edge cases first, then a
        // negative NaN and a value whose exponential is the least subnormal.
        for len in [16 * 40, 16 * 40 + 13, 5] {
            let (mut gate, up) = (values(len, 1), values(len, 2));
            for (g, special) in gate.iter_mut().skip(len / 2).zip([-f32::NAN, 103.5]) {
                *g = special;
            }
            let candle: Vec<u32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| (g / (1.0 + (-g).exp()) * u).to_bits())
                .collect();
            for path in KernelPath::all_supported() {
                let mut out = vec![0f32; len];
                silu_times(path, &gate, &up, &mut out);
                let ours: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(ours, candle, "{path}, {len} values");
            }
        }
    }
}
