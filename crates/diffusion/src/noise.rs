//! Seeded Gaussian noise for the starting latents and the ancestral steps: the same seed gives
//! the same values on every machine, so the same seed gives the same image.
//!
//! The generator is xoshiro256** seeded through SplitMix64 (both fixed, published algorithms
//! implemented here, so no library update can change the stream), and normal values come from
//! the Box–Muller transform in float64 using `libm`'s pure-Rust `log`, `sin` and `cos`, which give
//! the same bits on every platform. Values are produced in row-major order, two per pair of
//! 64-bit draws, and rounded to float32.

use candle_core::{Device, Shape, Tensor};

use crate::error::Result;

/// A deterministic source of standard normal float32 tensors.
#[derive(Debug, Clone)]
pub struct NoiseSource {
    /// xoshiro256** state.
    state: [u64; 4],
}

/// One SplitMix64 step: the recommended way to expand a 64-bit seed into xoshiro state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 2^-53: turns the top 53 bits of a draw into a float64 in [0, 1).
const UNIT: f64 = 1.0 / 9_007_199_254_740_992.0;

impl NoiseSource {
    /// A source whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut splitmix = seed;
        let state = std::array::from_fn(|_| splitmix64(&mut splitmix));
        Self { state }
    }

    /// The next 64 random bits (xoshiro256**).
    fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.state;
        let result = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        result
    }

    /// Two independent standard normal values (Box–Muller).
    fn next_normal_pair(&mut self) -> [f64; 2] {
        // (0, 1]: the logarithm stays finite.
        let radius_draw = ((self.next_u64() >> 11) + 1) as f64 * UNIT;
        let angle_draw = (self.next_u64() >> 11) as f64 * UNIT;
        let radius = (-2.0 * libm::log(radius_draw)).sqrt();
        let angle = std::f64::consts::TAU * angle_draw;
        [radius * libm::cos(angle), radius * libm::sin(angle)]
    }

    /// A float32 tensor of `shape` on `device` filled with standard normal values, continuing
    /// the stream (an odd element count drops the pair's second value).
    pub fn tensor<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let count = shape.elem_count();
        let mut values = Vec::with_capacity(count + 1);
        while values.len() < count {
            values.extend(self.next_normal_pair().map(|value| value as f32));
        }
        values.truncate(count);
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}
