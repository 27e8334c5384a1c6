//! How far a lossy wire codec moves a split model's output from a reference run: greedy
//! agreement and the largest logit error. [`codecs`] is the experiment of `lsplit bench
//! --quality`; the codec tests use the same measures.

pub mod codecs;
pub mod devices;

use std::ops::ControlFlow;

use crate::{GenerateOptions, Session, SplitError};

/// A greedy continuation and the logits that chose each of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyRun {
    /// The chosen tokens; an end-of-sequence token is kept and fed back like any other, so
    /// every run has the same length.
    pub tokens: Vec<u32>,
    /// `logits[i]` are the logits `tokens[i]` was chosen from.
    pub logits: Vec<Vec<f32>>,
}

impl GreedyRun {
    /// Runs `prompt` through a fresh `session`, then picks `count` tokens greedily (the
    /// session's own loop at temperature 0, through end-of-sequence tokens).
    pub fn generate(
        mut session: Session<'_>,
        prompt: &[u32],
        count: usize,
    ) -> Result<Self, SplitError> {
        let options = GenerateOptions {
            max_tokens: count,
            ignore_eos: true,
            ..GenerateOptions::default()
        };
        let mut run = Self {
            tokens: Vec::with_capacity(count),
            logits: Vec::with_capacity(count),
        };
        session.generate_steps(prompt, &options, &mut |step| {
            run.tokens.push(step.token);
            run.logits.push(step.logits.to_vec());
            ControlFlow::Continue(())
        })?;
        Ok(run)
    }
}

/// How a run with a lossy codec compares with the reference on one prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Leading greedy tokens equal to the reference's (all of them when the texts agree).
    pub agreeing_tokens: usize,
    /// Tokens the reference generated.
    pub tokens: usize,
    /// Largest `|logit - reference logit|` over every position and vocabulary entry, with the
    /// reference's tokens forced so that the inputs stay the same after a divergence.
    pub max_logit_error: f32,
}

impl Agreement {
    /// Compares `free` (a fresh session left to choose its own tokens) and `forced` (a fresh
    /// session fed the reference's tokens) against `reference`, all on `prompt`.
    pub fn measure(
        reference: &GreedyRun,
        free: Session<'_>,
        mut forced: Session<'_>,
        prompt: &[u32],
    ) -> Result<Self, SplitError> {
        let run = GreedyRun::generate(free, prompt, reference.tokens.len())?;
        let agreeing_tokens = run
            .tokens
            .iter()
            .zip(&reference.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let mut max_logit_error = 0f32;
        let mut input = prompt;
        for (step, expected) in reference.logits.iter().enumerate() {
            let logits = forced.forward(input)?;
            max_logit_error = max_logit_error.max(max_abs_difference(&logits, expected));
            input = &reference.tokens[step..=step];
        }
        Ok(Self {
            agreeing_tokens,
            tokens: reference.tokens.len(),
            max_logit_error,
        })
    }
}

/// `max |a - b|`; infinite when a value is not finite or the lengths differ, so that a broken
/// run can never look accurate.
fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).fold(0f32, |max, (x, y)| {
        let difference = (x - y).abs();
        if difference.is_nan() {
            f32::INFINITY
        } else {
            max.max(difference)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_absolute_and_never_hide_a_broken_run() {
        assert_eq!(max_abs_difference(&[1.0, -2.0], &[1.5, 1.0]), 3.0);
        assert_eq!(max_abs_difference(&[1.0], &[1.0]), 0.0);
        assert_eq!(max_abs_difference(&[f32::NAN], &[1.0]), f32::INFINITY);
        assert_eq!(max_abs_difference(&[0.0], &[0.0, 1.0]), f32::INFINITY);
    }
}
