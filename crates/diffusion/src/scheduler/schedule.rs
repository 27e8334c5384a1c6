//! The arithmetic diffusers' schedulers share: training betas and cumulative alphas, inference
//! timestep spacing, sigma interpolation, and scalar-tensor operations.
//!
//! diffusers builds betas with `torch.linspace(..., dtype=float32)` and multiplies them out with
//! `torch.cumprod`, then does the scalar arithmetic of each step on float32 tensors, while the
//! timesteps and interpolation go through numpy float64. The functions here follow that split
//! operation by operation so that sigmas and alphas come out as the same float32 values.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::error::Result;

/// `torch.linspace(start, end, steps, dtype=float32)` as torch's scalar CPU kernel computes it:
/// the first half counts up from `start`, the second half counts down from `end`.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|index| {
            if index < halfway {
                start + step * index as f32
            } else {
                end - step * (steps - index - 1) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 vector on the CPU, which accumulates in float64.
fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut product = 1f64;
    values
        .iter()
        .map(|&value| {
            product *= f64::from(value);
            product as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`: rescales betas so that the last timestep has zero
/// signal-to-noise ratio while the first keeps its own (float32 throughout, as in torch).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
    let mut roots: Vec<f32> = torch_cumprod_f32(&alphas)
        .iter()
        .map(|alpha_bar| alpha_bar.sqrt())
        .collect();
    let first = roots[0];
    let last = roots[roots.len() - 1];
    let scale = first / (first - last);
    for root in &mut roots {
        *root = (*root - last) * scale;
    }
    let alpha_bars: Vec<f32> = roots.iter().map(|root| root * root).collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alpha_bars[0]);
    rescaled.extend(alpha_bars.windows(2).map(|pair| 1.0 - pair[1] / pair[0]));
    rescaled
}

/// The cumulative products of `1 - beta` over the training timesteps, as diffusers'
/// `alphas_cumprod` (float32).
pub(crate) fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    let mut betas = match (&config.trained_betas, config.beta_schedule) {
        (Some(betas), _) => betas.iter().map(|&beta| beta as f32).collect(),
        (None, BetaSchedule::Linear) => torch_linspace_f32(config.beta_start, config.beta_end, n),
        (None, BetaSchedule::ScaledLinear) => {
            torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .iter()
                .map(|root| root * root)
                .collect()
        }
    };
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
    torch_cumprod_f32(&alphas)
}

/// The numpy `arange(start, stop, step)` of floats: the length is `ceil((stop - start) / step)`
/// and element `i` is `start + i * (second - start)`, where `second = start + step`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let length = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..length)
        .map(|index| start + index as f64 * delta)
        .collect()
}

/// numpy's `linspace(0, stop, num)` in float64, endpoint included.
fn numpy_linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|index| index as f64 * step).collect();
    values[num - 1] = stop;
    values
}

/// The inference timesteps (descending, float64) for `spacing`, before diffusers casts them:
/// linspace values may be fractional; leading and trailing ones are whole numbers.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut timesteps = numpy_linspace((train_steps - 1) as f64, steps);
            timesteps.reverse();
            timesteps
        }
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|index| (index * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            numpy_arange(train_steps as f64, 0.0, -ratio)
                .iter()
                .map(|value| value.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// `np.interp(x, arange(len(values)), values)` in float64: linear between neighbouring
/// training timesteps, clamped to the end values outside the range.
pub(crate) fn numpy_interp(x: f64, values: &[f32]) -> f64 {
    let last = values.len() - 1;
    if x <= 0.0 {
        return f64::from(values[0]);
    }
    if x >= last as f64 {
        return f64::from(values[last]);
    }
    let low = x.floor() as usize;
    if low as f64 == x {
        return f64::from(values[low]);
    }
    let (below, above) = (f64::from(values[low]), f64::from(values[low + 1]));
    (above - below) * (x - low as f64) + below
}

/// `tensor * factor` in float32, as torch multiplies by a 0-d float32 tensor.
pub(crate) fn mul_scalar(tensor: &Tensor, factor: f32) -> Result<Tensor> {
    Ok(tensor.affine(f64::from(factor), 0.0)?)
}

/// `tensor / divisor` in float32, a true division (not a multiplication by the reciprocal) as
/// torch divides float32 tensors.
pub(crate) fn div_scalar(tensor: &Tensor, divisor: f32) -> Result<Tensor> {
    let divisor = Tensor::new(divisor, tensor.device())?.to_dtype(tensor.dtype())?;
    Ok(tensor.broadcast_div(&divisor)?)
}

/// The tensor in float32, where every scheduler computes.
pub(crate) fn to_f32(tensor: &Tensor) -> Result<Tensor> {
    Ok(tensor.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_matches_numpy_arange_length_quirk() {
        // numpy's arange(1000, 0, -1000/61) has 62 elements: diffusers keeps all of them.
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0).len(),
            62
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 0),
            [999.0, 749.0, 499.0, 249.0]
        );
    }

    #[test]
    fn interp_is_linear_between_training_timesteps() {
        let values = [1.0f32, 3.0, 7.0];
        assert_eq!(numpy_interp(0.5, &values), 2.0);
        assert_eq!(numpy_interp(1.25, &values), 4.0);
        assert_eq!(numpy_interp(2.0, &values), 7.0);
        assert_eq!(numpy_interp(5.0, &values), 7.0);
        assert_eq!(numpy_interp(-1.0, &values), 1.0);
    }

    #[test]
    fn linspace_halves_meet() {
        let values = torch_linspace_f32(0.0, 1.0, 5);
        assert_eq!(values, [0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
