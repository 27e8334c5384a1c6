//! 8-bit float conversions (OCP FP8): E4M3 "fn" and E5M2, written out so the wire crate needs no
//! extra dependency.
//!
//! Encoding rounds to nearest, ties to even. Finite values beyond the largest finite value
//! saturate to it (E4M3 and E5M2 alike); infinities saturate for E4M3, which has none, and stay
//! infinite for E5M2; NaN maps to NaN.

/// The layout of one 8-bit float format: 1 sign bit, exponent bits, `mantissa_bits`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fp8Format {
    /// Explicit mantissa (fraction) bits.
    mantissa_bits: u32,
    /// Exponent bias.
    bias: i32,
    /// Bits of the largest finite magnitude.
    max_finite: u8,
    /// The largest finite magnitude.
    max_value: f32,
    /// Bits of +infinity, if the format has one.
    infinity: Option<u8>,
    /// Bits of the positive quiet NaN written for NaN inputs.
    nan: u8,
}

/// E4M3 "fn" (OCP): bias 7, no infinities, largest finite 448 (`S.1111.110`), NaN `S.1111.111`.
pub(crate) const E4M3: Fp8Format = Fp8Format {
    mantissa_bits: 3,
    bias: 7,
    max_finite: 0x7e,
    max_value: 448.0,
    infinity: None,
    nan: 0x7f,
};

/// E5M2 (OCP, IEEE-like): bias 15, largest finite 57344 (`S.11110.11`), infinity `S.11111.00`.
pub(crate) const E5M2: Fp8Format = Fp8Format {
    mantissa_bits: 2,
    bias: 15,
    max_finite: 0x7b,
    max_value: 57344.0,
    infinity: Some(0x7c),
    nan: 0x7e,
};

/// `2^exp` for exponents in f32's normal range.
fn pow2(exp: i32) -> f32 {
    f32::from_bits(((exp + 127) as u32) << 23)
}

impl Fp8Format {
    /// Smallest exponent of a normal number (also the exponent of the subnormals).
    fn min_exp(self) -> i32 {
        1 - self.bias
    }

    /// Rounds `x` to the nearest value of this format (ties to even) and returns its bits.
    pub(crate) fn encode(self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | self.nan;
        }
        let magnitude = x.abs();
        if magnitude.is_infinite() {
            return sign | self.infinity.unwrap_or(self.max_finite);
        }
        if magnitude >= self.max_value {
            return sign | self.max_finite;
        }
        // Exponent of the binade holding `magnitude`, no lower than the subnormals' exponent
        // (f32 subnormals and zero read as -127 and are clamped too).
        let exp = ((magnitude.to_bits() >> 23) as i32 - 127).max(self.min_exp());
        // Units of the last place at that exponent: exact, since it only scales by 2^k.
        let units = (magnitude / pow2(exp - self.mantissa_bits as i32)).round_ties_even() as u32;
        // Subnormals are `units` itself; normals add the biased exponent above the subnormal
        // one. A mantissa that rounds up to 2^(M+1) carries into the exponent by this same sum.
        let bits = (((exp - self.min_exp()) as u32) << self.mantissa_bits) + units;
        sign | bits as u8
    }

    /// The value of `bits`: NaN for the NaN patterns, ±infinity for E5M2's infinities.
    pub(crate) fn decode(self, bits: u8) -> f32 {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let magnitude = bits & 0x7f;
        if Some(magnitude) == self.infinity {
            return sign * f32::INFINITY;
        }
        if magnitude > self.max_finite {
            return f32::NAN;
        }
        let field = i32::from(magnitude >> self.mantissa_bits);
        let mantissa = u32::from(magnitude) & ((1 << self.mantissa_bits) - 1);
        let m = self.mantissa_bits as i32;
        if field == 0 {
            sign * mantissa as f32 * pow2(self.min_exp() - m)
        } else {
            sign * (mantissa + (1 << self.mantissa_bits)) as f32 * pow2(field - self.bias - m)
        }
    }

    /// Every byte's value, for table-driven decoding.
    pub(crate) fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| self.decode(b as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_byte_survives_a_round_trip() {
        for format in [E4M3, E5M2] {
            for b in 0..=255u8 {
                let value = format.decode(b);
                if value.is_finite() {
                    assert_eq!(
                        format.encode(value),
                        b,
                        "{format:?} byte {b:#04x} = {value}"
                    );
                }
            }
        }
    }

    #[test]
    fn ties_round_to_even_mantissas() {
        // E4M3 around 1: neighbours 1.0 (mantissa 000), 1.125 (001), 1.25 (010).
        assert_eq!(E4M3.encode(1.0625), 0x38);
        assert_eq!(E4M3.encode(1.1875), 0x3a);
        // Just above a tie rounds up.
        assert_eq!(E4M3.encode(1.0626), 0x39);
        // Halfway between the largest subnormal (7 * 2^-9) and the smallest normal (2^-6).
        assert_eq!(E4M3.encode(7.5 * 2f32.powi(-9)), 0x08);
        // Half the smallest subnormal rounds to (even) zero, a bit more rounds up to it.
        assert_eq!(E4M3.encode(2f32.powi(-10)), 0x00);
        assert_eq!(E4M3.encode(2f32.powi(-10) * 1.01), 0x01);
        // E5M2 in the top binade: 32768 (00), 40960 (01), 49152 (10); midpoints go to even.
        assert_eq!(E5M2.encode(36864.0), 0x78);
        assert_eq!(E5M2.encode(45056.0), 0x7a);
    }

    /// Our encoder against float8's (saturating, round to nearest even) on every finite f32
    /// that is a rounding boundary (midpoints of adjacent fp8 values and their f32 neighbours)
    /// and on a stride through all f32 bit patterns.
    #[test]
    fn encoding_matches_an_independent_implementation() {
        let theirs = |format: &str, x: f32| match format {
            "e4m3" => float8::F8E4M3::from_f32(x).to_bits(),
            _ => float8::F8E5M2::from_f32(x).to_bits(),
        };
        for (name, format) in [("e4m3", E4M3), ("e5m2", E5M2)] {
            let finite: Vec<f32> = (0..=format.max_finite).map(|b| format.decode(b)).collect();
            let boundaries = finite.windows(2).flat_map(|pair| {
                let mid = (pair[0] + pair[1]) / 2.0;
                [
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ]
            });
            let stride = (0..=u32::MAX).step_by(251).map(f32::from_bits);
            for x in boundaries.chain(stride).filter(|x| x.is_finite()) {
                for x in [x, -x] {
                    assert_eq!(format.encode(x), theirs(name, x), "{name} {x:e}");
                }
            }
        }
    }

    #[test]
    fn largest_finite_values_match_their_bits() {
        for format in [E4M3, E5M2] {
            assert_eq!(format.decode(format.max_finite), format.max_value);
            assert!(!format.decode(format.max_finite + 1).is_finite());
        }
    }

    #[test]
    fn non_finite_inputs_map_as_documented() {
        assert_eq!(E4M3.encode(f32::NAN), 0x7f);
        assert_eq!(E4M3.encode(f32::INFINITY), 0x7e);
        assert_eq!(E4M3.encode(f32::NEG_INFINITY), 0xfe);
        assert_eq!(E5M2.encode(f32::INFINITY), 0x7c);
        assert_eq!(E5M2.encode(f32::NEG_INFINITY), 0xfc);
        assert!(E5M2.decode(E5M2.encode(f32::NAN)).is_nan());
    }
}
