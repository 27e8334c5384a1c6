//! diffusers' `DDIMScheduler` with `eta = 0`: the deterministic DDIM update from the predicted
//! clean sample and noise at one timestep to the previous timestep.

use candle_core::{DType, Tensor};

use super::SchedulerKind;
use super::config::{PredictionType, SchedulerConfig};
use super::schedule::{alphas_cumprod, div_scalar, mul_scalar, spaced_timesteps, to_f32};
use crate::error::{DiffusionError, Result};

/// A DDIM schedule set for a number of inference steps.
#[derive(Debug, Clone)]
pub(crate) struct Ddim {
    /// The inference timesteps, whole numbers.
    timesteps: Vec<f64>,
    /// Cumulative alphas of the training timesteps (float32).
    alphas_cumprod: Vec<f32>,
    /// The cumulative alpha after the last step.
    final_alpha_cumprod: f32,
    /// How far back each step goes: `train_steps / steps`, whatever the spacing (as diffusers).
    step_ratio: usize,
    /// What the model predicts.
    prediction: PredictionType,
    /// Bound for the predicted clean sample, when clipping.
    clip_range: Option<f32>,
}

impl Ddim {
    /// Sets DDIM up for `steps` inference steps, as diffusers' `set_timesteps(steps)`.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config.thresholding {
            return Err(DiffusionError::InvalidConfig(
                "thresholding is not supported by the DDIM scheduler".to_string(),
            ));
        }
        let train_steps = config.num_train_timesteps;
        let timesteps: Vec<f64> = spaced_timesteps(
            config.timestep_spacing_for(SchedulerKind::Ddim),
            train_steps,
            steps,
            config.steps_offset,
        )
        .iter()
        .map(|timestep| timestep.round_ties_even())
        .collect();
        if let Some(timestep) = timesteps
            .iter()
            .find(|&&timestep| !(0.0..train_steps as f64).contains(&timestep))
        {
            return Err(DiffusionError::InvalidConfig(format!(
                "DDIM timestep {timestep} for {steps} steps (steps_offset {}) is outside the {} \
                 training timesteps",
                config.steps_offset, train_steps
            )));
        }
        let alphas_cumprod = alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train_steps / steps,
            prediction: config.prediction_type,
            clip_range: config
                .clip_sample
                .then_some(config.clip_sample_range as f32),
        })
    }

    /// The inference timesteps.
    pub(crate) fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// One DDIM step from `sample` at step `step` to the previous timestep.
    pub(crate) fn step(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let timestep = self.timesteps[step] as usize;
        let alpha_bar = self.alphas_cumprod[timestep];
        let previous_alpha_bar = timestep
            .checked_sub(self.step_ratio)
            .map_or(self.final_alpha_cumprod, |previous| {
                self.alphas_cumprod[previous]
            });
        let beta_bar = 1.0 - alpha_bar;
        let output = to_f32(model_output)?;
        let sample_f32 = to_f32(sample)?;
        let (mut predicted_original, predicted_noise) = match self.prediction {
            PredictionType::Epsilon => {
                let noise_part = mul_scalar(&output, beta_bar.sqrt())?;
                let original = div_scalar(&(&sample_f32 - noise_part)?, alpha_bar.sqrt())?;
                (original, output)
            }
            PredictionType::Sample => {
                let signal_part = mul_scalar(&output, alpha_bar.sqrt())?;
                let noise = div_scalar(&(&sample_f32 - signal_part)?, beta_bar.sqrt())?;
                (output, noise)
            }
            PredictionType::VPrediction => {
                let original = (mul_scalar(&sample_f32, alpha_bar.sqrt())?
                    - mul_scalar(&output, beta_bar.sqrt())?)?;
                let noise = (mul_scalar(&output, alpha_bar.sqrt())?
                    + mul_scalar(&sample_f32, beta_bar.sqrt())?)?;
                (original, noise)
            }
        };
        if let Some(range) = self.clip_range {
            predicted_original = predicted_original.clamp(-range, range)?;
        }
        let direction = mul_scalar(&predicted_noise, (1.0 - previous_alpha_bar).sqrt())?;
        let previous = (mul_scalar(&predicted_original, previous_alpha_bar.sqrt())? + direction)?;
        // torch promotes mixed precision to float32; equal dtypes stay as they are.
        let dtype = if model_output.dtype() == sample.dtype() {
            sample.dtype()
        } else {
            DType::F32
        };
        Ok(previous.to_dtype(dtype)?)
    }
}
