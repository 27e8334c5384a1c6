//! How much of a session each attack recovered: its guesses scored against the true tokens,
//! which `lsplit generate --save-tokens` writes to a [`Truth`] file (they never cross the wire).

use std::ops::Range;
use std::path::Path;

use lsplit_split::RejectedDraft;
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

/// What the uplink attacks read of the rows of rejected drafts: rows whose token each named
/// exactly, of all the rejected drafted rows that crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DraftScores {
    /// Rejected drafted rows that crossed.
    pub total: usize,
    /// Of them, rows a later step rewound on the wire. The others, the last step's, were
    /// never rewound (the session ended first): an observer reads them as kept positions.
    pub rewound: usize,
    /// Vocabulary matching.
    pub matching: usize,
    /// The logit lens.
    pub lens: usize,
    /// The known-plaintext attack (`None`: not run).
    pub known_plaintext: Option<usize>,
    /// The learned decoder (`None`: not run).
    pub decoder: Option<usize>,
}

/// The tokens of one session, written by `lsplit generate --save-tokens`: what the attacks
/// are scored against. It never crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    /// The prompt's tokens (chat template included).
    pub prompt: Vec<u32>,
    /// The generated tokens.
    pub generated: Vec<u32>,
    /// The drafted tokens whose rows crossed but that were not kept, in the order they
    /// crossed; `None` in token files written before drafts were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<RejectedDraft>>,
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
    /// end-of-sequence token followed it), or end with the last rejected draft (drafts run
    /// past the end of the reply).
    pub fn check(&self, recovery: &Recovery) -> Result<(), AttackError> {
        let crossed = recovery.matching.len();
        let all = self.prompt.len() + self.generated.len();
        let drafted_end = self.rejected.iter().flatten().map(|d| d.position + 1).max();
        if crossed == all || crossed + 1 == all || drafted_end == Some(crossed) {
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

impl Truth {
    /// Scores the uplink attacks' guesses of the rejected drafts' rows (`None` when the token
    /// file predates their recording). The rows the wire rewound are the first of the token
    /// file's drafts, in the same order and at the same positions; the others were never
    /// rewound, and the guesses at their positions are the ones made for kept rows. Anything
    /// else means the file is not of this capture's session.
    pub fn score_drafts(&self, recovery: &Recovery) -> Result<Option<DraftScores>, AttackError> {
        let Some(drafts) = &self.rejected else {
            return Ok(None);
        };
        let rejected = &recovery.rejected;
        let rewound = rejected.positions.len();
        let not_this = |why: String| {
            AttackError::Capture(format!(
                "{why}: the token file is not of this capture's session"
            ))
        };
        if rewound > drafts.len() {
            return Err(not_this(format!(
                "the capture rewinds {rewound} rows but the token file records {} rejected \
                 drafts",
                drafts.len()
            )));
        }
        for (i, (draft, &position)) in drafts.iter().zip(&rejected.positions).enumerate() {
            if draft.position != position {
                return Err(not_this(format!(
                    "rejected draft {i} of the token file is at position {} but the capture's \
                     rewound row {i} is at {position}",
                    draft.position
                )));
            }
        }
        if let Some(past) = drafts[rewound..]
            .iter()
            .find(|d| d.position >= recovery.matching.len())
        {
            return Err(not_this(format!(
                "a rejected draft at position {} but the capture holds {} positions",
                past.position,
                recovery.matching.len()
            )));
        }
        // How many drafts `rewound_guesses` (for the rewound rows) and `kept_guesses` (at the
        // others' positions) name; `None` when the attack made no guesses.
        let count = |rewound_guesses: &[u32], kept_guesses: &[u32]| {
            (!kept_guesses.is_empty()).then(|| {
                drafts
                    .iter()
                    .enumerate()
                    .filter(|&(i, d)| {
                        let guess = match i < rewound {
                            true => rewound_guesses.get(i),
                            false => kept_guesses.get(d.position),
                        };
                        guess == Some(&d.token)
                    })
                    .count()
            })
        };
        Ok(Some(DraftScores {
            total: drafts.len(),
            rewound,
            matching: count(&rejected.matching, &recovery.matching).unwrap_or(0),
            lens: count(&rejected.lens, &recovery.lens).unwrap_or(0),
            known_plaintext: count(&rejected.known_plaintext, &recovery.known_plaintext),
            decoder: count(&rejected.decoder, &recovery.decoder),
        }))
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
            rejected: Default::default(),
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

    /// A recovery of positions 0..5 whose uplink rewound the rows at 3 and 4 once.
    fn drafted_recovery() -> Recovery {
        Recovery {
            replay_next: vec![0; 5],
            replay_k2: vec![28; 5],
            matching: vec![1, 2, 3, 4, 9],
            exact_matches: 5,
            lens: vec![0; 5],
            permutation_recovered: false,
            inversion: vec![0; 5],
            inverted_exactly: 0,
            known_plaintext: Vec::new(),
            decoder: vec![1, 2, 3, 4, 5],
            rejected: crate::Rejected {
                positions: vec![3, 4],
                matching: vec![7, 8],
                exact_matches: 2,
                lens: vec![7, 0],
                known_plaintext: Vec::new(),
                decoder: vec![0, 0],
            },
        }
    }

    fn draft(position: usize, token: u32) -> RejectedDraft {
        RejectedDraft { position, token }
    }

    #[test]
    fn rejected_drafts_are_scored_rewound_then_never_rewound() -> Result<(), AttackError> {
        let recovery = drafted_recovery();
        let truth = Truth {
            prompt: vec![1, 2],
            generated: vec![3, 4, 5],
            // The rewound rows at 3 and 4, then the last step's draft at 4, never rewound:
            // matching read it as the kept row there (9).
            rejected: Some(vec![draft(3, 7), draft(4, 8), draft(4, 9)]),
        };
        truth.check(&recovery)?;
        let scores = truth.score_drafts(&recovery)?.expect("drafts recorded");
        assert_eq!(
            scores,
            DraftScores {
                total: 3,
                rewound: 2,
                matching: 3,
                lens: 1,
                known_plaintext: None,
                decoder: Some(0),
            }
        );
        Ok(())
    }

    #[test]
    fn drafts_of_another_session_are_refused() {
        let recovery = drafted_recovery();
        let with = |rejected: Vec<RejectedDraft>| Truth {
            prompt: vec![1, 2],
            generated: vec![3, 4, 5],
            rejected: Some(rejected),
        };
        for (rejected, expected) in [
            (
                vec![draft(3, 7)],
                "the capture rewinds 2 rows but the token file records 1",
            ),
            (
                vec![draft(3, 7), draft(5, 8)],
                "rejected draft 1 of the token file is at position 5 but the capture's rewound \
                 row 1 is at 4",
            ),
            (
                vec![draft(3, 7), draft(4, 8), draft(40, 1)],
                "a rejected draft at position 40 but the capture holds 5 positions",
            ),
        ] {
            let err = with(rejected).score_drafts(&recovery);
            let err = err.expect_err("not this session's drafts").to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains("not of this capture's session"), "{err}");
        }
    }

    #[test]
    fn a_token_file_without_drafts_still_loads() -> Result<(), AttackError> {
        let dir = tempfile::tempdir().map_err(|e| AttackError::Capture(e.to_string()))?;
        let path = dir.path().join("old.json");
        std::fs::write(&path, r#"{"prompt":[1,2],"generated":[3,4,5]}"#)
            .map_err(|e| AttackError::Capture(e.to_string()))?;
        let truth = Truth::load(&path)?;
        assert_eq!(truth.rejected, None);
        assert_eq!(truth.score_drafts(&drafted_recovery())?, None);
        // Written again, it stays an old file: no drafts field appears.
        truth.save(&path)?;
        let written =
            std::fs::read_to_string(&path).map_err(|e| AttackError::Capture(e.to_string()))?;
        assert_eq!(written, r#"{"prompt":[1,2],"generated":[3,4,5]}"#);
        // Malformed drafts are refused with the reason, never a panic.
        std::fs::write(
            &path,
            r#"{"prompt":[1],"generated":[2],"rejected":[{"position":"3","token":7}]}"#,
        )
        .map_err(|e| AttackError::Capture(e.to_string()))?;
        let err = Truth::load(&path)
            .expect_err("malformed drafts")
            .to_string();
        assert!(
            err.contains("not a token file of `lsplit generate --save-tokens`"),
            "{err}"
        );
        assert!(err.contains("invalid type"), "{err}");
        Ok(())
    }
}
