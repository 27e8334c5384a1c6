//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`: Euler steps of the
//! probability-flow ODE over sigmas interpolated at the inference timesteps; the ancestral
//! variant steps below the target sigma and adds fresh noise back up to it.

use candle_core::Tensor;

use super::SchedulerKind;
use super::config::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
    TimestepType,
};
use super::schedule::{
    alphas_cumprod, div_scalar, mul_scalar, numpy_interp, spaced_timesteps, to_f32,
};
use crate::error::{DiffusionError, Result};

/// diffusers pins the last cumulative alpha of a zero-SNR schedule to 2^-24 so that its sigma
/// stays finite (4096).
const ZERO_SNR_ALPHA_CUMPROD: f32 = 1.0 / 16_777_216.0;

/// An Euler or Euler ancestral schedule set for a number of inference steps.
#[derive(Debug, Clone)]
pub(crate) struct Euler {
    /// Whether each step adds fresh noise (Euler ancestral).
    ancestral: bool,
    /// The inference timesteps, float32 values.
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final one, float32 as diffusers keeps them.
    sigmas: Vec<f32>,
    /// Standard deviation of the starting latents.
    init_noise_sigma: f32,
    /// What the model predicts.
    prediction: PredictionType,
}

/// An error for a config option this Euler implementation does not honour.
fn unsupported(option: &str) -> DiffusionError {
    DiffusionError::InvalidConfig(format!(
        "{option} is not supported by the Euler scheduler (supported: linear interpolation of \
         the training sigmas)"
    ))
}

impl Euler {
    /// Sets up `kind` (Euler or Euler ancestral) for `steps` inference steps, as diffusers'
    /// `set_timesteps(steps)`.
    pub(crate) fn new(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let ancestral = kind == SchedulerKind::EulerAncestral;
        // Euler ancestral has none of these options: diffusers ignores them for it.
        let final_sigma_type = if ancestral {
            FinalSigmasType::Zero
        } else {
            if config.use_karras_sigmas {
                return Err(unsupported("use_karras_sigmas"));
            }
            if config.use_exponential_sigmas {
                return Err(unsupported("use_exponential_sigmas"));
            }
            if config.use_beta_sigmas {
                return Err(unsupported("use_beta_sigmas"));
            }
            if config.interpolation_type == InterpolationType::LogLinear {
                return Err(unsupported("interpolation_type `log_linear`"));
            }
            if config.timestep_type == TimestepType::Continuous {
                return Err(unsupported("timestep_type `continuous`"));
            }
            config.final_sigmas_type
        };
        if ancestral && config.prediction_type == PredictionType::Sample {
            return Err(DiffusionError::InvalidConfig(
                "prediction_type `sample` is not supported by the Euler ancestral scheduler \
                 (diffusers does not implement it either)"
                    .to_string(),
            ));
        }

        let mut alpha_bars = alphas_cumprod(config);
        if config.rescale_betas_zero_snr {
            let last = alpha_bars.len() - 1;
            alpha_bars[last] = ZERO_SNR_ALPHA_CUMPROD;
        }
        let train_sigmas: Vec<f32> = alpha_bars
            .iter()
            .map(|alpha_bar| ((1.0 - alpha_bar) / alpha_bar).sqrt())
            .collect();

        let spacing = config.timestep_spacing_for(kind);
        let timesteps: Vec<f64> = spaced_timesteps(
            spacing,
            config.num_train_timesteps,
            steps,
            config.steps_offset,
        )
        .iter()
        .map(|&timestep| f64::from(timestep as f32))
        .collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&timestep| numpy_interp(timestep, &train_sigmas) as f32)
            .collect();
        if let Some((index, sigma)) = sigmas
            .iter()
            .enumerate()
            .find(|(_, sigma)| !(sigma.is_finite() && **sigma > 0.0))
        {
            return Err(DiffusionError::InvalidConfig(format!(
                "the sigma at timestep {} is {sigma}: Euler needs positive finite sigmas",
                timesteps[index]
            )));
        }
        sigmas.push(match final_sigma_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        });

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            ancestral,
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction_type,
        })
    }

    /// Whether each step needs fresh noise.
    pub(crate) fn is_ancestral(&self) -> bool {
        self.ancestral
    }

    /// The inference timesteps.
    pub(crate) fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Standard deviation of the starting latents.
    pub(crate) fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// `sample / sqrt(sigma^2 + 1)`: the model sees unit-variance input.
    pub(crate) fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        let scaled = div_scalar(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(scaled.to_dtype(sample.dtype())?)
    }

    /// One Euler (or Euler ancestral) step from `sample` at step `step` to the next sigma.
    /// `noise` is used (and required) only by the ancestral variant.
    pub(crate) fn step(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let output = to_f32(model_output)?;
        let sample_f32 = to_f32(sample)?;
        let sigma = self.sigmas[step];
        let next_sigma = self.sigmas[step + 1];
        let predicted_original = match self.prediction {
            PredictionType::Epsilon => (&sample_f32 - mul_scalar(&output, sigma)?)?,
            PredictionType::VPrediction => {
                let variance = sigma * sigma + 1.0;
                let output_scale = -sigma / variance.sqrt();
                (mul_scalar(&output, output_scale)? + div_scalar(&sample_f32, variance)?)?
            }
            PredictionType::Sample => output,
        };
        let derivative = div_scalar(&(&sample_f32 - &predicted_original)?, sigma)?;
        let previous = if self.ancestral {
            let noise = noise.ok_or_else(|| {
                DiffusionError::InvalidInput(
                    "the Euler ancestral scheduler needs noise for every step".to_string(),
                )
            })?;
            let (from, to) = (sigma * sigma, next_sigma * next_sigma);
            let sigma_up = (to * (from - to) / from).sqrt();
            let sigma_down = (to - sigma_up * sigma_up).sqrt();
            let deterministic = (&sample_f32 + mul_scalar(&derivative, sigma_down - sigma)?)?;
            (deterministic + mul_scalar(&to_f32(noise)?, sigma_up)?)?
        } else {
            (&sample_f32 + mul_scalar(&derivative, next_sigma - sigma)?)?
        };
        Ok(previous.to_dtype(model_output.dtype())?)
    }
}
