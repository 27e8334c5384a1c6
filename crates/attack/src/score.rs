//! How much of a session each attack recovered: its guesses scored against the true tokens,
//! which `lsplit generate --save-tokens` writes to a [`Truth`] file (they never cross the wire).

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{AttackError, Recovery};

/// Fractions of tokens recovered exactly.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate {
    /// Prompt tokens recovered.
    pub prompt: usize,
    /// Prompt tokens in all.
    pub prompt_total: usize,
    /// Tokens of the user's own text recovered: the prompt less the chat template's public
    /// tokens, which every attacker knows without reading anything (see [`crate::user_text`]).
    pub user: usize,
    /// Tokens of the user's own text in all.
    pub user_total: usize,
    /// Generated tokens recovered.
    pub generated: usize,
    /// Generated tokens in all.
    pub generated_total: usize,
}

impl Rate {
    /// Adds another run's counts.
    pub fn add(&mut self, other: Rate) {
        self.prompt += other.prompt;
        self.prompt_total += other.prompt_total;
        self.user += other.user;
        self.user_total += other.user_total;
        self.generated += other.generated;
        self.generated_total += other.generated_total;
    }

    /// Percent of prompt tokens recovered.
    pub fn prompt_percent(&self) -> f64 {
        percent(self.prompt, self.prompt_total)
    }

    /// Percent of the user's own prompt tokens recovered.
    pub fn user_percent(&self) -> f64 {
        percent(self.user, self.user_total)
    }

    /// Percent of generated tokens recovered.
    pub fn generated_percent(&self) -> f64 {
        percent(self.generated, self.generated_total)
    }
}

fn percent(part: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * part as f64 / total as f64
    }
}

/// Each attack's recovery rate against the true tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    /// Replay of the downlink.
    pub replay: Rate,
    /// Vocabulary matching on the uplink.
    pub matching: Rate,
    /// Logit lens on the uplink.
    pub lens: Rate,
    /// Inversion of the downlink.
    pub inversion: Rate,
    /// The known-plaintext attack on the uplink.
    pub known_plaintext: Rate,
    /// The learned decoder on the uplink.
    pub decoder: Rate,
}

impl Recovery {
    /// Scores the guesses against the prompt and generated tokens of the session; `user` is
    /// where in the prompt the user's own text lies ([`crate::user_text`]).
    pub fn score(&self, prompt: &[u32], generated: &[u32], user: Range<usize>) -> Scores {
        let user = user.start.min(prompt.len())..user.end.min(prompt.len());
        let at =
            |guesses: &[u32], position: usize, truth: u32| guesses.get(position) == Some(&truth);
        let rate = |current: &[u32], next: bool| {
            let guess = |position: usize, truth| {
                if next {
                    position
                        .checked_sub(1)
                        .is_some_and(|p| at(current, p, truth))
                } else {
                    at(current, position, truth)
                }
            };
            Rate {
                prompt: prompt
                    .iter()
                    .enumerate()
                    .filter(|&(p, &t)| guess(p, t))
                    .count(),
                prompt_total: prompt.len(),
                user: user.clone().filter(|&p| guess(p, prompt[p])).count(),
                user_total: user.len(),
                generated: generated
                    .iter()
                    .enumerate()
                    .filter(|&(i, &t)| guess(prompt.len() + i, t))
                    .count(),
                generated_total: generated.len(),
            }
        };
        Scores {
            replay: rate(&self.replay_next, true),
            matching: rate(&self.matching, false),
            lens: rate(&self.lens, false),
            inversion: rate(&self.inversion, false),
            known_plaintext: rate(&self.known_plaintext, false),
            decoder: rate(&self.decoder, false),
        }
    }
}

/// The tokens of one session, written by `lsplit generate --save-tokens`: what the attacks
/// are scored against. It never crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    /// The prompt's tokens (chat template included).
    pub prompt: Vec<u32>,
    /// The generated tokens.
    pub generated: Vec<u32>,
}

impl Truth {
    /// Writes the tokens as JSON.
    pub fn save(&self, path: &Path) -> Result<(), AttackError> {
        let json = serde_json::to_vec(self).map_err(|e| AttackError::TruthFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, json).map_err(|e| AttackError::TruthFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Reads a token file written by [`Truth::save`].
    pub fn load(path: &Path) -> Result<Self, AttackError> {
        let file_error = |reason: String| AttackError::TruthFile {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            file_error(format!(
                "not a token file of `lsplit generate --save-tokens`: {e}"
            ))
        })
    }

    /// Refuses a token file that is not of the captured session: `recovery`'s positions must be
    /// every token of it, or one fewer (the last generated token goes up only when an
    /// end-of-sequence token followed it).
    pub fn check(&self, recovery: &Recovery) -> Result<(), AttackError> {
        let crossed = recovery.matching.len();
        let all = self.prompt.len() + self.generated.len();
        if crossed == all || crossed + 1 == all {
            return Ok(());
        }
        Err(AttackError::Capture(format!(
            "the token file holds {} prompt and {} generated tokens, so {all} or one fewer \
             positions should have crossed, but the capture holds {crossed}: it is not this \
             capture's session",
            self.prompt.len(),
            self.generated.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_exact_tokens_in_place() {
        let recovery = Recovery {
            replay_next: vec![5, 6, 7, 9],
            replay_k2: vec![28; 4],
            matching: vec![1, 5, 6, 7],
            exact_matches: 4,
            lens: vec![0, 5, 0, 0],
            permutation_recovered: false,
            inversion: vec![1, 5, 6, 0],
            inverted_exactly: 3,
            known_plaintext: vec![1, 5],
            decoder: vec![1, 0, 6],
        };
        let s = recovery.score(&[1, 5, 6], &[7, 9], 1..2);
        assert_eq!((s.matching.prompt, s.matching.generated), (3, 1));
        // The user's text is position 1 alone: token 5.
        assert_eq!((s.matching.user, s.matching.user_total), (1, 1));
        assert_eq!((s.lens.user, s.decoder.user), (1, 0));
        assert_eq!((s.replay.prompt, s.replay.generated), (2, 2));
        assert_eq!((s.lens.prompt, s.lens.generated), (1, 0));
        assert_eq!((s.inversion.prompt, s.inversion.generated), (3, 0));
        assert_eq!(s.known_plaintext.prompt, 2);
        assert_eq!((s.decoder.prompt, s.decoder.generated), (2, 0));
        assert_eq!(s.matching.generated_total, 2);
        assert!((s.replay.prompt_percent() - 66.666).abs() < 0.01);
    }
}
