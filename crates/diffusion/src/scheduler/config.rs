//! `scheduler/scheduler_config.json` as diffusers writes it, with diffusers' defaults.

use std::path::Path;

use serde::Deserialize;

use super::SchedulerKind;
use crate::error::{DiffusionError, Result};

/// How the training betas run from `beta_start` to `beta_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Betas evenly spaced.
    Linear,
    /// Square roots of the betas evenly spaced (the latent-diffusion schedule).
    ScaledLinear,
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD 1.5, SDXL base).
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0` (SD 2.1 768).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are picked among the training timesteps (table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// Evenly spaced from 0 to the last training timestep, both included.
    Linspace,
    /// Multiples of `train_steps / steps` from 0, shifted by `steps_offset`.
    Leading,
    /// Evenly spaced down from the last training timestep.
    Trailing,
}

/// How Euler interpolates sigmas between training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// Linear in sigma over the timestep axis.
    Linear,
    /// Evenly spaced in log sigma (not supported by this crate's Euler).
    LogLinear,
}

/// The sigma Euler steps to after the last timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// Zero: the last step lands on the clean sample.
    Zero,
    /// The sigma of training timestep 0.
    SigmaMin,
}

/// Whether Euler's timesteps are the discrete training timesteps or `0.25 * ln(sigma)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// Training timesteps.
    Discrete,
    /// `0.25 * ln(sigma)` (not supported by this crate).
    Continuous,
}

/// A diffusers scheduler configuration. Fields a class does not use are kept but ignored by that
/// class, as diffusers' `from_config` does; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class the file was written for.
    pub class_name: Option<String>,
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First training beta.
    pub beta_start: f64,
    /// Last training beta.
    pub beta_end: f64,
    /// How betas run from `beta_start` to `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Explicit training betas, replacing the schedule when present.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Timestep spacing; `None` means the class's default (linspace for Euler, leading for DDIM).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to every timestep under leading spacing.
    pub steps_offset: usize,
    /// DDIM: clamp the predicted clean sample to `±clip_sample_range`.
    pub clip_sample: bool,
    /// DDIM: bound for `clip_sample`.
    pub clip_sample_range: f64,
    /// DDIM: the cumulative alpha after the last step is 1 (otherwise that of timestep 0).
    pub set_alpha_to_one: bool,
    /// DDIM: dynamic thresholding (not supported by this crate).
    pub thresholding: bool,
    /// Euler: sigma interpolation.
    pub interpolation_type: InterpolationType,
    /// Euler: Karras sigmas (not supported by this crate).
    pub use_karras_sigmas: bool,
    /// Euler: exponential sigmas (not supported by this crate).
    pub use_exponential_sigmas: bool,
    /// Euler: beta-distributed sigmas (not supported by this crate).
    pub use_beta_sigmas: bool,
    /// Euler: discrete or continuous timesteps.
    pub timestep_type: TimestepType,
    /// Euler: the sigma after the last step.
    pub final_sigmas_type: FinalSigmasType,
    /// Rescale betas so the last timestep has zero signal-to-noise ratio.
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' constructor defaults, shared by the three supported classes.
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The file as written, before names are checked. `null` reads as absent, as diffusers does.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<String>,
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    thresholding: Option<bool>,
    interpolation_type: Option<String>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    timestep_type: Option<String>,
    final_sigmas_type: Option<String>,
    rescale_betas_zero_snr: Option<bool>,
}

/// Maps a config string to one of `choices`, or names the field and the accepted values.
fn choose<T: Copy>(field: &str, value: &str, choices: &[(&str, T)]) -> Result<T> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, choice)| *choice)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            DiffusionError::InvalidConfig(format!(
                "{field} `{value}` is not supported (expected one of: {})",
                names.join(", ")
            ))
        })
}

/// Parses an optional string field, falling back to `default` when absent.
fn choose_or<T: Copy>(
    field: &str,
    value: Option<&str>,
    default: T,
    choices: &[(&str, T)],
) -> Result<T> {
    value.map_or(Ok(default), |value| choose(field, value, choices))
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|err| {
            DiffusionError::InvalidConfig(format!("scheduler_config.json: {err}"))
        })?;
        let defaults = Self::default();
        let config = Self {
            class_name: raw.class_name,
            num_train_timesteps: raw
                .num_train_timesteps
                .unwrap_or(defaults.num_train_timesteps),
            beta_start: raw.beta_start.unwrap_or(defaults.beta_start),
            beta_end: raw.beta_end.unwrap_or(defaults.beta_end),
            beta_schedule: choose_or(
                "beta_schedule",
                raw.beta_schedule.as_deref(),
                defaults.beta_schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                ],
            )?,
            trained_betas: raw.trained_betas,
            prediction_type: choose_or(
                "prediction_type",
                raw.prediction_type.as_deref(),
                defaults.prediction_type,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                ],
            )?,
            timestep_spacing: raw
                .timestep_spacing
                .as_deref()
                .map(|value| {
                    choose(
                        "timestep_spacing",
                        value,
                        &[
                            ("linspace", TimestepSpacing::Linspace),
                            ("leading", TimestepSpacing::Leading),
                            ("trailing", TimestepSpacing::Trailing),
                        ],
                    )
                })
                .transpose()?,
            steps_offset: raw.steps_offset.unwrap_or(defaults.steps_offset),
            clip_sample: raw.clip_sample.unwrap_or(defaults.clip_sample),
            clip_sample_range: raw.clip_sample_range.unwrap_or(defaults.clip_sample_range),
            set_alpha_to_one: raw.set_alpha_to_one.unwrap_or(defaults.set_alpha_to_one),
            thresholding: raw.thresholding.unwrap_or(defaults.thresholding),
            interpolation_type: choose_or(
                "interpolation_type",
                raw.interpolation_type.as_deref(),
                defaults.interpolation_type,
                &[
                    ("linear", InterpolationType::Linear),
                    ("log_linear", InterpolationType::LogLinear),
                ],
            )?,
            use_karras_sigmas: raw.use_karras_sigmas.unwrap_or(defaults.use_karras_sigmas),
            use_exponential_sigmas: raw
                .use_exponential_sigmas
                .unwrap_or(defaults.use_exponential_sigmas),
            use_beta_sigmas: raw.use_beta_sigmas.unwrap_or(defaults.use_beta_sigmas),
            timestep_type: choose_or(
                "timestep_type",
                raw.timestep_type.as_deref(),
                defaults.timestep_type,
                &[
                    ("discrete", TimestepType::Discrete),
                    ("continuous", TimestepType::Continuous),
                ],
            )?,
            final_sigmas_type: choose_or(
                "final_sigmas_type",
                raw.final_sigmas_type.as_deref(),
                defaults.final_sigmas_type,
                &[
                    ("zero", FinalSigmasType::Zero),
                    ("sigma_min", FinalSigmasType::SigmaMin),
                ],
            )?,
            rescale_betas_zero_snr: raw
                .rescale_betas_zero_snr
                .unwrap_or(defaults.rescale_betas_zero_snr),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses `path` (a model directory's `scheduler/scheduler_config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DiffusionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The scheduler `_class_name` names, or an error naming the supported classes.
    pub fn class_kind(&self) -> Result<SchedulerKind> {
        let class = self.class_name.as_deref().ok_or_else(|| {
            DiffusionError::InvalidConfig(
                "`_class_name` is missing (pass --scheduler euler|euler-a|ddim)".to_string(),
            )
        })?;
        SchedulerKind::from_class_name(class)
    }

    /// The timestep spacing `kind` uses: the configured one, else that class's default.
    pub fn timestep_spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => TimestepSpacing::Linspace,
            SchedulerKind::Ddim => TimestepSpacing::Leading,
        })
    }

    /// Rejects values no scheduler could run with (they would give NaN or index out of range).
    fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(DiffusionError::InvalidConfig(message));
        if self.num_train_timesteps < 2 {
            return invalid(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            ));
        }
        match &self.trained_betas {
            Some(betas) => {
                if betas.len() != self.num_train_timesteps {
                    return invalid(format!(
                        "trained_betas has {} values but num_train_timesteps is {}",
                        betas.len(),
                        self.num_train_timesteps
                    ));
                }
                if let Some(beta) = betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
                    return invalid(format!("trained_betas value {beta} is outside [0, 1)"));
                }
            }
            None => {
                for (name, beta) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                    if !(beta > 0.0 && beta < 1.0) {
                        return invalid(format!("{name} must be in (0, 1), got {beta}"));
                    }
                }
            }
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return invalid(format!(
                "clip_sample_range must be positive, got {}",
                self.clip_sample_range
            ));
        }
        Ok(())
    }
}
