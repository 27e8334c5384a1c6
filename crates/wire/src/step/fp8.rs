//! 8-bit float conversions (OCP FP8), E4M3 "fn" and E5M2, by the `float8` crate.
//!
//! Encoding rounds to nearest, ties to even. Finite values beyond the largest finite value
//! saturate to it (E4M3 and E5M2 alike); infinities saturate for E4M3, which has none, and stay
//! infinite for E5M2; NaN maps to NaN.

use float8::{F8E4M3, F8E5M2};

/// One of the two 8-bit float formats.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fp8Format {
    /// E4M3 "fn": bias 7, no infinities, largest finite 448 (`S.1111.110`), NaN `S.1111.111`.
    E4M3,
    /// E5M2 (IEEE-like): bias 15, largest finite 57344 (`S.11110.11`), infinity `S.11111.00`.
    E5M2,
}

pub(crate) use Fp8Format::{E4M3, E5M2};

/// E5M2's +infinity.
const E5M2_INFINITY: u8 = 0x7c;

impl Fp8Format {
    /// Rounds `x` to the nearest value of this format (ties to even) and returns its bits.
    pub(crate) fn encode(self, x: f32) -> u8 {
        match self {
            E4M3 => F8E4M3::from_f32(x).to_bits(),
            // float8 saturates infinities too; E5M2 has its own.
            E5M2 if x.is_infinite() => (u8::from(x.is_sign_negative()) << 7) | E5M2_INFINITY,
            E5M2 => F8E5M2::from_f32(x).to_bits(),
        }
    }

    /// The value of `bits`: NaN for the NaN patterns, ±infinity for E5M2's infinities.
    pub(crate) fn decode(self, bits: u8) -> f32 {
        match self {
            E4M3 => F8E4M3::from_bits(bits).to_f32(),
            E5M2 => F8E5M2::from_bits(bits).to_f32(),
        }
    }

    /// Every byte's value, for table-driven decoding.
    pub(crate) fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| self.decode(b as u8))
    }

    /// The bits and value of the largest finite magnitude.
    #[cfg(test)]
    fn largest_finite(self) -> (u8, f32) {
        match self {
            E4M3 => (0x7e, 448.0),
            E5M2 => (0x7b, 57344.0),
        }
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

    #[test]
    fn largest_finite_values_match_their_bits() {
        for format in [E4M3, E5M2] {
            let (bits, value) = format.largest_finite();
            assert_eq!(format.decode(bits), value);
            assert!(!format.decode(bits + 1).is_finite());
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
