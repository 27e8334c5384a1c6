//! Calibrated Gaussian noise on the uplink (`--uplink-noise SIGMA`): the device adds noise to
//! every row it sends to the trunk, after clipping the row's RMS, so that the rows the cloud
//! sees are a Gaussian mechanism of the head's rows.
//!
//! For a row `x` of width `d`, with `ρ = ‖x‖/√d` its RMS and `C` the clip (`--uplink-clip`):
//! `x̂ = x · min(1, C/ρ)`, `ρ̂ = min(ρ, C)`, and the trunk receives `x̂ + σ ρ̂ z`, `z ~ N(0, I_d)`.
//! The noise is relative to the row's own (clipped) RMS, so one `σ` means the same at every
//! layer and position. The row's clipped RMS is what the mechanism does not hide; given it, two
//! rows at distance `D` are told apart no better than the Gaussian mechanism of sensitivity
//! `D` and standard deviation `σ ρ̂` allows: [`epsilon`] of `D / (σ ρ̂)` (Balle and Wang's
//! analytic Gaussian mechanism, 2018), at worst `D = 2 √d ρ̂`. Rows whose RMS reaches the clip
//! all share `ρ̂ = C`, so for them the scale reveals nothing either.
//!
//! Draws come from ChaCha20 seeded per session: from a given seed, a session's noise repeats
//! exactly (experiments); without one, from the operating system's generator (users: a seed the
//! cloud could guess would let it subtract the noise).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

use crate::SplitError;

/// Largest `σ` accepted: beyond it the rows are noise and nothing else (and `σ ρ̂` could
/// overflow for the largest rows).
pub const MAX_SIGMA: f32 = 1e4;

/// The uplink noise a device adds: its relative standard deviation, clip and seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UplinkNoise {
    sigma: f32,
    clip: Option<f32>,
    seed: Option<u64>,
}

impl UplinkNoise {
    /// Noise of standard deviation `sigma` times each row's clipped RMS; rows' RMS clipped to
    /// `clip` (none: not clipped); drawn from `seed` (none: fresh from the OS per session).
    pub fn new(sigma: f32, clip: Option<f32>, seed: Option<u64>) -> Result<Self, SplitError> {
        if !(sigma > 0.0 && sigma <= MAX_SIGMA) {
            return Err(SplitError::Noise(format!(
                "--uplink-noise must be a number in (0, {MAX_SIGMA}], not {sigma}"
            )));
        }
        if let Some(c) = clip.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return Err(SplitError::Noise(format!(
                "--uplink-clip must be a positive finite RMS, not {c}"
            )));
        }
        Ok(Self { sigma, clip, seed })
    }

    /// The standard deviation relative to each row's clipped RMS.
    pub fn sigma(&self) -> f32 {
        self.sigma
    }

    /// The RMS rows are clipped to, if any.
    pub fn clip(&self) -> Option<f32> {
        self.clip
    }

    /// The seed draws come from, if fixed.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The flags of `lsplit generate` that give this noise (the seed left out).
    pub fn flags(&self) -> String {
        match self.clip {
            Some(c) => format!("--uplink-noise {} --uplink-clip {c}", self.sigma),
            None => format!("--uplink-noise {}", self.sigma),
        }
    }

    /// The ε, at `delta`, that this noise guarantees between any two rows of width `width`
    /// with the same clipped RMS (the worst case, rows `2 √d ρ̂` apart).
    pub fn worst_epsilon(&self, width: usize, delta: f64) -> f64 {
        epsilon(2.0 * (width as f64).sqrt() / f64::from(self.sigma), delta)
    }

    /// The generator of one session's draws.
    pub(crate) fn stream(&self) -> NoiseStream {
        let rng = match self.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_seed(rand::random()),
        };
        NoiseStream { noise: *self, rng }
    }
}

/// One session's noise: [`UplinkNoise`] and the generator its rows draw from, in the order
/// they are sent.
pub(crate) struct NoiseStream {
    noise: UplinkNoise,
    rng: ChaCha20Rng,
}

impl NoiseStream {
    /// `rows` (positions × width, f32) clipped and noised.
    pub(crate) fn apply(&mut self, rows: &Tensor) -> Result<Tensor, SplitError> {
        let (count, width) = rows.dims2()?;
        let mut values = rows.flatten_all()?.to_vec1::<f32>()?;
        add_noise(&mut values, width, &self.noise, &mut self.rng);
        Ok(Tensor::from_vec(values, (count, width), rows.device())?)
    }
}

/// Clips each row of `values` (rows of `width` values, back to back) to the clip's RMS and adds
/// `σ ρ̂` times a standard normal draw from `rng` to each value.
pub fn add_noise(values: &mut [f32], width: usize, noise: &UplinkNoise, rng: &mut impl Rng) {
    for row in values.chunks_mut(width.max(1)) {
        let rms = (row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / row.len() as f64).sqrt()
            as f32;
        let kept = match noise.clip {
            Some(c) if rms > c => {
                let shrink = c / rms;
                row.iter_mut().for_each(|v| *v *= shrink);
                c
            }
            _ => rms,
        };
        let scale = noise.sigma * kept;
        for v in row.iter_mut() {
            let z: f32 = rng.sample(StandardNormal);
            *v += scale * z;
        }
    }
}

/// The smallest ε for which the Gaussian mechanism whose sensitivity is `ratio` standard
/// deviations is (ε, δ)-differentially private, by the analytic Gaussian mechanism (Balle and
/// Wang 2018): the least ε ≥ 0 with `Φ(r/2 − ε/r) − e^ε Φ(−r/2 − ε/r) ≤ δ`, `r` the ratio.
pub fn epsilon(ratio: f64, delta: f64) -> f64 {
    let excess = |eps: f64| {
        let a = normal_cdf(ratio / 2.0 - eps / ratio);
        let b = (eps + log_normal_cdf(-ratio / 2.0 - eps / ratio)).exp();
        a - b
    };
    if ratio <= 0.0 || excess(0.0) <= delta {
        return 0.0;
    }
    let mut high = 1.0;
    while excess(high) > delta {
        high *= 2.0;
    }
    let mut low = 0.0;
    // Bisection to a relative precision far below what the table prints.
    for _ in 0..100 {
        let mid = 0.5 * (low + high);
        if excess(mid) > delta {
            low = mid;
        } else {
            high = mid;
        }
    }
    high
}

/// `Φ(x)`, the standard normal distribution function.
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// `ln Φ(x)`, finite far into the lower tail where `Φ` itself underflows (the asymptotic
/// series `φ(x)/|x| · (1 − 1/x² + 3/x⁴)` below -20).
fn log_normal_cdf(x: f64) -> f64 {
    if x > -20.0 {
        return normal_cdf(x).ln();
    }
    let x2 = x * x;
    -x2 / 2.0 - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        + (1.0 - 1.0 / x2 + 3.0 / (x2 * x2)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rms(row: &[f32]) -> f32 {
        (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32).sqrt()
    }

    #[test]
    fn noise_repeats_from_its_seed_and_differs_between_seeds() {
        let noise = UplinkNoise::new(0.5, None, Some(7)).expect("noise");
        let rows = Tensor::new(
            &[[1f32, -2.0, 3.0, 0.5], [0.0, 0.1, 0.2, 0.3]],
            &candle_core::Device::Cpu,
        )
        .expect("rows");
        let run = |noise: &UplinkNoise| {
            noise
                .stream()
                .apply(&rows)
                .expect("apply")
                .to_vec2::<f32>()
                .expect("values")
        };
        assert_eq!(run(&noise), run(&noise));
        let other = UplinkNoise::new(0.5, None, Some(8)).expect("noise");
        assert_ne!(run(&noise), run(&other));
        let fresh = UplinkNoise::new(0.5, None, None).expect("noise");
        assert_ne!(
            run(&fresh),
            run(&fresh),
            "without a seed each session draws anew"
        );
        // The draws are ChaCha20's from seed 7: the first value, exactly.
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let z: f32 = rng.sample(StandardNormal);
        let expected = 1.0 + 0.5 * rms(&[1.0, -2.0, 3.0, 0.5]) * z;
        assert_eq!(run(&noise)[0][0], expected);
    }

    #[test]
    fn noise_scales_with_each_rows_rms() {
        let width = 4096;
        let noise = UplinkNoise::new(0.25, None, Some(1)).expect("noise");
        for scale in [0.01f32, 1.0, 300.0] {
            let row: Vec<f32> = (0..width)
                .map(|i| scale * if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let mut noised = row.clone();
            add_noise(
                &mut noised,
                width,
                &noise,
                &mut ChaCha20Rng::seed_from_u64(1),
            );
            let added: Vec<f32> = noised.iter().zip(&row).map(|(n, r)| n - r).collect();
            // The added noise's RMS is σ times the row's, within sampling error (1/√4096).
            let ratio = rms(&added) / (0.25 * scale);
            assert!((ratio - 1.0).abs() < 0.05, "scale {scale}: ratio {ratio}");
            // The same standard draws, scaled by the row's RMS: exactly proportional.
            let mut unit: Vec<f32> = row.iter().map(|v| v / scale).collect();
            add_noise(&mut unit, width, &noise, &mut ChaCha20Rng::seed_from_u64(1));
            let unit_added = unit[0] - 1.0;
            assert!((added[0] / scale - unit_added).abs() <= 1e-4 * unit_added.abs().max(1.0));
        }
    }

    #[test]
    fn clipping_bounds_the_rms_before_the_noise() {
        let noise = UplinkNoise::new(1e-30, Some(2.0), Some(3)).expect("noise");
        // Two rows: RMS 5 (clipped to 2) and RMS 1 (kept).
        let mut values = vec![5.0f32, -5.0, 5.0, -5.0, 1.0, 1.0, -1.0, 1.0];
        add_noise(&mut values, 4, &noise, &mut ChaCha20Rng::seed_from_u64(3));
        assert_eq!(values, [2.0, -2.0, 2.0, -2.0, 1.0, 1.0, -1.0, 1.0]);
        // With real noise, a clipped row's noise is σ·C whatever its own RMS.
        let noise = UplinkNoise::new(0.5, Some(2.0), Some(3)).expect("noise");
        let draws = |row: [f32; 4]| {
            let mut v = row.to_vec();
            add_noise(&mut v, 4, &noise, &mut ChaCha20Rng::seed_from_u64(3));
            v
        };
        let a = draws([5.0, -5.0, 5.0, -5.0]);
        let b = draws([50.0, -50.0, 50.0, -50.0]);
        assert_eq!(a, b, "rows clipped to the same RMS receive the same noise");
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag() {
        for sigma in [0.0, -1.0, f32::NAN, f32::INFINITY, 2e4] {
            let err = UplinkNoise::new(sigma, None, None).expect_err("refused");
            assert!(
                err.to_string().starts_with("--uplink-noise must be"),
                "{err}"
            );
        }
        for clip in [0.0, -2.0, f32::NAN, f32::INFINITY] {
            let err = UplinkNoise::new(1.0, Some(clip), None).expect_err("refused");
            assert!(
                err.to_string().starts_with("--uplink-clip must be"),
                "{err}"
            );
        }
        assert_eq!(
            UplinkNoise::new(0.5, Some(3.0), Some(1))
                .expect("ok")
                .flags(),
            "--uplink-noise 0.5 --uplink-clip 3"
        );
    }

    #[test]
    fn epsilon_is_the_analytic_gaussian_mechanisms() {
        // At the epsilon found, the mechanism's delta is the one asked for.
        for ratio in [0.1f64, 1.0, 4.0, 40.0] {
            let eps = epsilon(ratio, 1e-5);
            let delta = normal_cdf(ratio / 2.0 - eps / ratio)
                - (eps + log_normal_cdf(-ratio / 2.0 - eps / ratio)).exp();
            assert!(
                (delta - 1e-5).abs() < 1e-9,
                "ratio {ratio}: eps {eps}, delta {delta}"
            );
        }
        // Below the classical bound r·√(2 ln(1.25/δ)) where that bound holds (ε < 1).
        let classical = 0.1 * (2.0 * (1.25f64 / 1e-5).ln()).sqrt();
        assert!(epsilon(0.1, 1e-5) < classical);
        // Half the ratio, less privacy loss; far tails stay finite.
        assert!(epsilon(1.0, 1e-5) < epsilon(2.0, 1e-5));
        assert!(epsilon(200.0, 1e-5).is_finite());
        assert!(epsilon(200.0, 1e-5) > 200.0 * 200.0 / 2.0);
        // The worst case of a 576-wide row at σ = 1: rows 2·24 RMS apart.
        let noise = UplinkNoise::new(1.0, None, None).expect("noise");
        assert_eq!(noise.worst_epsilon(576, 1e-5), epsilon(48.0, 1e-5));
        assert!(
            (log_normal_cdf(-19.99) - log_normal_cdf(-20.01)).abs() < 0.5,
            "the tail's two forms meet"
        );
    }
}
