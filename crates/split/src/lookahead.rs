//! Lookahead decoding (`--speculate lookahead`; Fu et al. 2024, "Break the Sequential
//! Dependency of LLM Inference Using Lookahead Decoding"): Jacobi iterations over a window of
//! guessed future tokens, whose trajectories fill a pool of n-grams; a step checks the pool's
//! n-gram that starts with the token just chosen, then the window.
//!
//! A causal form of the paper's, because a step is one causal chunk of rows (the trunk and the
//! protocol carry no 2-D attention mask). Where it differs:
//! - The paper's lookahead branch feeds the window's last N-1 Jacobi levels in one pass, each
//!   token attending to the prefix and to its predecessors on its diagonal. Here a step feeds the
//!   newest level only, as ordinary causal rows after the chosen token and the checked n-gram:
//!   each row's output is one Jacobi update of the next position (given the guesses before it),
//!   and the earlier levels stay on the device, remembered with each guess, to form the n-grams.
//!   An n-gram is still a diagonal of the trajectory: each of its tokens was produced from the
//!   one before it, an iteration earlier.
//! - The paper's verification branch checks up to G pool n-grams side by side, each attending
//!   to the prefix alone. Here one n-gram (the newest in the pool for the chosen token) is
//!   checked, at the head of the chunk, and the window's rows come after it (so they are
//!   conditioned on it, right or wrong).
//!
//! Drafts only change how many round trips a generation takes: checking keeps a drafted token
//! only when it is the sampler's choice (see [`crate::speculate`]).

use std::collections::{HashMap, VecDeque};

/// N, the size of the pool's n-grams: a token and the N-1 that followed it on a trajectory.
const NGRAM: usize = 4;
/// W, the guessed positions a step runs after the checked n-gram.
const WINDOW: usize = 8;
/// The n-grams the pool keeps per first token, the oldest forgotten first.
const PER_TOKEN: usize = 8;

/// A guess of the token at one position, with the tokens that led to it on its diagonal (the
/// guess one position earlier, an iteration earlier, and so on), at most N-2 of them.
#[derive(Debug, Clone)]
struct Guess {
    token: u32,
    chain: Vec<u32>,
}

/// One session's lookahead state: the current Jacobi iterate and the n-gram pool.
#[derive(Debug, Default)]
pub(crate) struct Lookahead {
    /// The position of `guesses[0]`.
    start: usize,
    guesses: Vec<Guess>,
    /// For each first token, the N-1 tokens that followed it, newest last.
    pool: HashMap<u32, VecDeque<Vec<u32>>>,
}

impl Lookahead {
    /// Up to `max` tokens to check after the last of `tokens` (the sequence so far, the token
    /// just chosen last): the pool's newest n-gram for that token, then the window's guesses
    /// for the positions after it. Positions never guessed (the first step, or past the last
    /// iterate) start as the sequence's own tokens, cycled from its start, as the paper starts
    /// its window from the prompt's tokens.
    pub(crate) fn propose(&self, tokens: &[u32], max: usize) -> Vec<u32> {
        let Some(&last) = tokens.last() else {
            return Vec::new();
        };
        let mut draft: Vec<u32> = self
            .pool
            .get(&last)
            .and_then(VecDeque::back)
            .cloned()
            .unwrap_or_default();
        let from = tokens.len() + draft.len();
        draft.extend((from..from + WINDOW).map(|position| {
            self.guess(position)
                .map_or(tokens[position % tokens.len()], |g| g.token)
        }));
        draft.truncate(max);
        draft
    }

    /// Learns from a step that ran `run` from position `start` and whose rows' greedy choices
    /// were `outputs` (`outputs[i]` follows `run[..=i]`): the outputs are the next Jacobi
    /// iterate of the positions after `start`, and each completes an n-gram along its diagonal.
    pub(crate) fn observe(&mut self, start: usize, run: &[u32], outputs: &[u32]) {
        let mut next = Vec::with_capacity(run.len());
        for (i, (&input, &output)) in run.iter().zip(outputs).enumerate() {
            // The input continues its guess's diagonal when it is that guess.
            let mut chain = self
                .guess(start + i)
                .filter(|g| g.token == input)
                .map_or_else(Vec::new, |g| g.chain.clone());
            chain.push(input);
            if chain.len() == NGRAM - 1 {
                let mut gram = chain[1..].to_vec();
                gram.push(output);
                self.remember(chain[0], gram);
                chain.remove(0);
            }
            next.push(Guess {
                token: output,
                chain,
            });
        }
        self.start = start + 1;
        self.guesses = next;
    }

    /// The current guess at `position`, if the iterate covers it.
    fn guess(&self, position: usize) -> Option<&Guess> {
        self.guesses.get(position.checked_sub(self.start)?)
    }

    /// Adds the n-gram `first, rest` to the pool as its newest for `first`.
    fn remember(&mut self, first: u32, rest: Vec<u32>) {
        let grams = self.pool.entry(first).or_default();
        grams.retain(|g| *g != rest);
        if grams.len() == PER_TOKEN {
            grams.pop_front();
        }
        grams.push_back(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_window_is_the_sequence_cycled_and_each_step_is_a_jacobi_update() {
        let mut la = Lookahead::default();
        let tokens = [10, 11, 12];
        // Positions 3.. are guessed as tokens 0, 1, 2, 0...
        assert_eq!(la.propose(&tokens, 4), vec![10, 11, 12, 10]);
        // The step ran the chosen token (position 2) and the four guesses; its rows chose these.
        la.observe(2, &[12, 10, 11, 12, 10], &[20, 21, 22, 23, 24]);
        // Token 20 was chosen at position 3: the guesses for positions 4.. are the outputs.
        assert_eq!(la.propose(&[10, 11, 12, 20], 3), vec![21, 22, 23]);
        // Positions past the iterate start from the sequence again.
        assert_eq!(
            la.propose(&[10, 11, 12, 20], 6),
            vec![21, 22, 23, 24, 10, 11]
        );
    }

    #[test]
    fn n_grams_follow_the_trajectory_diagonally_and_are_checked_first() {
        let mut la = Lookahead::default();
        // After the prompt 1 2 3, iteration 1: the guesses 5 and 6 at positions 3 and 4 lead to 7 and 8.
        la.observe(2, &[3, 5, 6], &[4, 7, 8]);
        // Iteration 2 (token 4 chosen at position 3): the guesses at positions 4 and 5 are 7
        // and 8, which lead to 9 and 10.
        la.observe(3, &[4, 7, 8], &[11, 9, 10]);
        // Iteration 3 (token 11 chosen): 9 and 10 at positions 5 and 6 lead to 12 and 13.
        la.observe(4, &[11, 9, 10], &[14, 12, 13]);
        // Diagonals of four: 5 -> 7 -> 9 -> 12 (from position 3 to 6), 6 -> 8 -> 10 -> 13, and
        // 3 -> 4 -> 11 -> 14 (the chosen tokens 4 and 11 had been guessed).
        assert_eq!(la.pool[&5], VecDeque::from([vec![7, 9, 12]]));
        assert_eq!(la.pool[&6], VecDeque::from([vec![8, 10, 13]]));
        assert_eq!(la.pool[&3], VecDeque::from([vec![4, 11, 14]]));
        // A sequence ending in 5 checks the n-gram 7 9 12 first, then guesses after it.
        let tokens = [1, 2, 3, 4, 11, 5];
        let draft = la.propose(&tokens, 5);
        assert_eq!(draft[..3], [7, 9, 12]);
        assert_eq!(draft.len(), 5);
    }

    #[test]
    fn the_pool_keeps_the_newest_n_grams_per_token_once_each() {
        let mut la = Lookahead::default();
        for i in 0..PER_TOKEN as u32 + 2 {
            la.remember(1, vec![i, i, i]);
        }
        la.remember(1, vec![4, 4, 4]);
        let grams = &la.pool[&1];
        assert_eq!(grams.len(), PER_TOKEN);
        assert_eq!(grams.front(), Some(&vec![2, 2, 2]));
        assert_eq!(grams.back(), Some(&vec![4, 4, 4]));
    }
}
