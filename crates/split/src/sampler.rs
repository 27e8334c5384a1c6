use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability adds up to `p`.
    pub top_p: Option<f32>,
    /// Divides positive (multiplies negative) logits of recently seen tokens; 1 disables it.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator, so that a run can be repeated exactly.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

/// What a sampler chooses from: one sure token (greedy), or tokens weighted by their
/// probabilities (after top-p, not normalised again) to draw one from.
enum Choice {
    Sure(u32),
    Draw(Vec<(u32, f64)>),
}

/// Chooses tokens from logits according to [`SamplingParams`], with its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Picks the next token given the logits and the tokens seen so far (prompt included).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let weights = match self.choice(logits, history) {
            Choice::Sure(token) => return token,
            Choice::Draw(weights) => weights,
        };
        let total: f64 = weights.iter().map(|&(_, w)| w).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for &(token, w) in &weights {
            draw -= w;
            if draw < 0.0 {
                return token;
            }
        }
        weights[weights.len() - 1].0
    }

    /// The tokens [`Sampler::sample`] may pick after `logits` given `history`, with the
    /// probability of each (they add up to 1): what sampling with drafts must keep (tests
    /// compare drafted generations against it).
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        match self.choice(logits, history) {
            Choice::Sure(token) => vec![(token, 1.0)],
            Choice::Draw(weights) => {
                let total: f64 = weights.iter().map(|&(_, w)| w).sum();
                weights.into_iter().map(|(t, w)| (t, w / total)).collect()
            }
        }
    }

    /// What the next token is chosen from: penalty, temperature, top-k and top-p applied.
    fn choice(&self, logits: &[f32], history: &[u32]) -> Choice {
        let mut logits = logits.to_vec();
        self.penalize(&mut logits, history);
        if self.params.temperature <= 0.0 {
            return Choice::Sure(argmax(&logits));
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / self.params.temperature))
            .collect();
        if candidates.is_empty() {
            return Choice::Sure(argmax(&logits));
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            candidates.truncate(k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= f64::from(top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        Choice::Draw(candidates.iter().map(|&(t, _)| t).zip(probs).collect())
    }

    fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let start = history.len().saturating_sub(self.params.repeat_last_n);
        let mut seen = history[start..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l >= 0.0 {
                    *l / penalty
                } else {
                    *l * penalty
                };
            }
        }
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let logits = [2.0, 1.9, -1.0];
        let mut plain = Sampler::new(params(0.0));
        assert_eq!(plain.sample(&logits, &[0]), 0);
        let mut penalized = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0)
        });
        assert_eq!(penalized.sample(&logits, &[0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(5.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.4], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.5),
            ..params(1.0)
        });
        // Token 2 alone holds ~84% of the mass: with p = 0.5 it is the only candidate.
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 3.0, -2.0], &[]), 2);
        }
    }

    #[test]
    fn same_seed_same_draws_and_sampling_follows_probabilities() {
        let logits = [0.0f32, (3f32).ln(), 0.0, 0.0];
        let draws = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..600).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        // Token 1 has probability 3/6: expect ~300 of 600.
        let ones = a.iter().filter(|&&t| t == 1).count();
        assert!((240..360).contains(&ones), "token 1 drawn {ones} times");
    }
}
