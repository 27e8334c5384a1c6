//! AdamW (Loshchilov and Hutter, <https://arxiv.org/abs/1711.05101>) and the learning-rate
//! schedule.
//!
//! Written here rather than taken from `candle_nn::optim::AdamW`: that one keeps its moments
//! private, and a checkpoint that resumes exactly needs them saved and restored.

use candle_core::{Tensor, Var};

use crate::{Result, TrainError};

/// How the learning rate moves after a linear warmup from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Down to 0 along half a cosine by the last step.
    Cosine,
    /// Down to 0 along a line by the last step.
    Linear,
    /// Held.
    Constant,
}

impl Schedule {
    /// The factor of the peak learning rate at step `step` (from 0) of `steps`, after `warmup`.
    pub fn factor(self, step: usize, steps: usize, warmup: usize) -> f64 {
        if step < warmup {
            return (step + 1) as f64 / warmup as f64;
        }
        let span = steps.saturating_sub(warmup).max(1) as f64;
        let done = ((step - warmup) as f64 / span).min(1.0);
        match self {
            Self::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            Self::Linear => 1.0 - done,
            Self::Constant => 1.0,
        }
    }
}

/// AdamW's state: the step count and each variable's two moments.
#[derive(Debug)]
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: usize,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// Fresh state for variables of `shapes`, with decoupled `weight_decay`.
    pub fn new<'a>(vars: impl Iterator<Item = &'a Var>, weight_decay: f64) -> Result<Self> {
        let moments = vars
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments,
        })
    }

    /// Updates every variable with its gradient at learning rate `lr`.
    pub fn step<'a>(
        &mut self,
        vars: impl Iterator<Item = &'a Var>,
        grads: &[Tensor],
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (scale_m, scale_v) = (
            1.0 / (1.0 - self.beta1.powi(t)),
            1.0 / (1.0 - self.beta2.powi(t)),
        );
        for ((var, grad), (m, v)) in vars.zip(grads).zip(&mut self.moments) {
            *m = ((&*m * self.beta1)? + (grad * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&*m * scale_m)? / ((&*v * scale_v)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The moments, first then second of each variable, to save.
    pub fn moments(&self) -> Vec<Tensor> {
        self.moments
            .iter()
            .flat_map(|(m, v)| [m.clone(), v.clone()])
            .collect()
    }

    /// Restores a saved state: `steps` taken and `moments` as [`AdamW::moments`] gave them.
    pub fn restore(&mut self, steps: usize, moments: Vec<Tensor>) -> Result<()> {
        if moments.len() != self.moments.len() * 2 {
            return Err(TrainError::Options(format!(
                "{} optimizer moments for {} variables",
                moments.len(),
                self.moments.len()
            )));
        }
        for (slot, pair) in self.moments.iter_mut().zip(moments.chunks_exact(2)) {
            if slot.0.shape() != pair[0].shape() || slot.1.shape() != pair[1].shape() {
                return Err(TrainError::Options(
                    "an optimizer moment has the wrong shape".into(),
                ));
            }
            *slot = (pair[0].clone(), pair[1].clone());
        }
        self.step = steps;
        Ok(())
    }
}
