//! Noise schedulers, matching Hugging Face diffusers 0.31: Euler discrete, Euler ancestral and
//! DDIM (eta 0), configured from a model's `scheduler/scheduler_config.json`.
//!
//! A [`Scheduler`] is set for a number of inference steps when it is built and is addressed by
//! step index (`0..timesteps().len()`), which is how a pipeline walks it; it keeps no state
//! between calls.

mod config;
mod ddim;
mod euler;
mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

pub use config::{
    BetaSchedule, FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig,
    TimestepSpacing, TimestepType,
};

use crate::error::{DiffusionError, Result};

/// The schedulers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`).
    EulerAncestral,
    /// `DDIMScheduler` with eta 0 (`ddim`).
    Ddim,
}

impl SchedulerKind {
    /// Every kind, in the order names are listed.
    pub const ALL: [SchedulerKind; 3] = [Self::Euler, Self::EulerAncestral, Self::Ddim];

    /// The command-line name: `euler`, `euler-a` or `ddim`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Ddim => "ddim",
        }
    }

    /// The diffusers class implementing this scheduler.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
        }
    }

    /// The kind for a diffusers `_class_name`, or an error naming the supported classes.
    pub fn from_class_name(class: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.class_name() == class)
            .ok_or_else(|| DiffusionError::UnsupportedScheduler(class.to_string()))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = DiffusionError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| DiffusionError::UnknownSchedulerName(name.to_string()))
    }
}

/// The per-kind schedule.
#[derive(Debug, Clone)]
enum Schedule {
    Euler(euler::Euler),
    Ddim(ddim::Ddim),
}

/// A noise scheduler set for a number of inference steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    schedule: Schedule,
}

impl Scheduler {
    /// Builds `kind` from `config` and sets it for `num_inference_steps` steps (diffusers'
    /// `Class.from_config(config)` then `set_timesteps(num_inference_steps)`).
    pub fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self> {
        if num_inference_steps == 0 || num_inference_steps > config.num_train_timesteps {
            return Err(DiffusionError::InvalidConfig(format!(
                "the number of steps must be between 1 and num_train_timesteps ({}), got {}",
                config.num_train_timesteps, num_inference_steps
            )));
        }
        let schedule = match kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                Schedule::Euler(euler::Euler::new(kind, config, num_inference_steps)?)
            }
            SchedulerKind::Ddim => Schedule::Ddim(ddim::Ddim::new(config, num_inference_steps)?),
        };
        tracing::debug!(%kind, steps = num_inference_steps, "scheduler set");
        Ok(Self { kind, schedule })
    }

    /// Which scheduler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timesteps the model is called at, in order, as diffusers' `scheduler.timesteps`.
    /// Trailing spacing can give one more than the steps asked for, as numpy's `arange` does.
    pub fn timesteps(&self) -> &[f64] {
        match &self.schedule {
            Schedule::Euler(euler) => euler.timesteps(),
            Schedule::Ddim(ddim) => ddim.timesteps(),
        }
    }

    /// Standard deviation of the starting latents: unit noise is multiplied by it.
    pub fn init_noise_sigma(&self) -> f64 {
        match &self.schedule {
            Schedule::Euler(euler) => f64::from(euler.init_noise_sigma()),
            Schedule::Ddim(_) => 1.0,
        }
    }

    /// Whether [`Scheduler::step`] needs fresh noise each step (Euler ancestral).
    pub fn needs_noise(&self) -> bool {
        match &self.schedule {
            Schedule::Euler(euler) => euler.is_ancestral(),
            Schedule::Ddim(_) => false,
        }
    }

    /// Scales the latents before they go to the model at step `step_index`.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.check_step(step_index)?;
        match &self.schedule {
            Schedule::Euler(euler) => euler.scale_model_input(sample, step_index),
            Schedule::Ddim(_) => Ok(sample.clone()),
        }
    }

    /// The latents after step `step_index`, from the model's output for `sample` (diffusers'
    /// `step(...).prev_sample`). `noise`, standard normal of the sample's shape, is required when
    /// [`Scheduler::needs_noise`] and ignored otherwise. Computed in float32.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_step(step_index)?;
        if model_output.dims() != sample.dims() {
            return Err(DiffusionError::InvalidInput(format!(
                "model output shape {:?} does not match the sample shape {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        match &self.schedule {
            Schedule::Euler(euler) => {
                let noise = noise.filter(|_| euler.is_ancestral());
                if let Some(noise) = noise.filter(|noise| noise.dims() != sample.dims()) {
                    return Err(DiffusionError::InvalidInput(format!(
                        "noise shape {:?} does not match the sample shape {:?}",
                        noise.dims(),
                        sample.dims()
                    )));
                }
                euler.step(model_output, step_index, sample, noise)
            }
            Schedule::Ddim(ddim) => ddim.step(model_output, step_index, sample),
        }
    }

    /// Rejects a step index past the schedule.
    fn check_step(&self, step_index: usize) -> Result<()> {
        let steps = self.timesteps().len();
        if step_index >= steps {
            return Err(DiffusionError::InvalidInput(format!(
                "step index {step_index} is out of range: the schedule has {steps} steps"
            )));
        }
        Ok(())
    }
}
