//! Drafted tokens for multi-token steps: guesses of the next few tokens that one step checks
//! together, so that a slow link costs one round trip for several tokens.
//!
//! Checking keeps a drafted token only when it is the token the sampler picks from the logits
//! after the tokens before it, with the same random draws as one-token steps; the first miss is
//! replaced by that pick. The output is therefore exactly that of one-token steps, greedy or
//! sampled, and a draft source only changes how many round trips it takes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lsplit_model::MAX_STEP_ROWS;

/// The most tokens one step drafts: a step carries them after the token it must run.
pub const MAX_DRAFT: usize = MAX_STEP_ROWS - 1;

/// Where drafted tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculate {
    /// One token per step.
    #[default]
    Off,
    /// Prompt lookup while drafting pays: the trunk is remote, and the time drafted steps cost
    /// beyond one-token steps stays below the time the tokens they kept would have cost.
    Auto,
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the last one to
    /// three tokens, in the prompt or in the output so far.
    Lookup,
}

impl Speculate {
    /// Every value, in the order `--speculate` lists them.
    pub const ALL: [Speculate; 3] = [Speculate::Off, Speculate::Auto, Speculate::Lookup];

    /// The name `--speculate` takes.
    pub fn name(self) -> &'static str {
        match self {
            Speculate::Off => "off",
            Speculate::Auto => "auto",
            Speculate::Lookup => "lookup",
        }
    }
}

impl fmt::Display for Speculate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Speculate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Speculate::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown speculation {s:?}: expected off, auto or lookup"))
    }
}

/// The longest run of tokens at the end of the sequence that lookup tries to find earlier.
const LOOKUP_NGRAM: usize = 3;

/// Up to `max` tokens that followed the latest earlier occurrence of the longest suffix of
/// `tokens` (three tokens down to one) found earlier in `tokens`; empty when none recurs.
pub fn lookup(tokens: &[u32], max: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (1..=LOOKUP_NGRAM.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        let found = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix);
        if let Some(i) = found {
            let from = i + n;
            return tokens[from..(from + max).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// Steps a drafted step must be ahead by before `auto` judges it, and how often it tries
/// drafting again after judging that it does not pay.
const AUTO_PROBE: usize = 8;

/// Decides, step by step, how many tokens to draft.
#[derive(Debug)]
pub(crate) struct Drafter {
    speculate: Speculate,
    /// Mean wall time of a one-token step, as measured.
    single: Option<Duration>,
    /// Time drafted steps took beyond one-token steps, and the time the tokens they kept
    /// would have taken as one-token steps (`auto`).
    spent: Duration,
    saved: Duration,
    drafted_steps: usize,
    /// One-token steps since `auto` stopped drafting.
    paused_for: Option<usize>,
}

impl Drafter {
    /// A drafter for `speculate`; `auto` never drafts for an in-process trunk, where a step has
    /// no round trip to save.
    pub(crate) fn new(speculate: Speculate, in_process: bool) -> Self {
        let speculate = match speculate {
            Speculate::Auto if in_process => Speculate::Off,
            other => other,
        };
        Self {
            speculate,
            single: None,
            spent: Duration::ZERO,
            saved: Duration::ZERO,
            drafted_steps: 0,
            paused_for: None,
        }
    }

    /// Tokens to check after the last of `tokens`, at most `max`.
    pub(crate) fn draft(&mut self, tokens: &[u32], max: usize) -> Vec<u32> {
        let max = max.min(MAX_DRAFT);
        match self.speculate {
            Speculate::Off => Vec::new(),
            Speculate::Lookup => lookup(tokens, max),
            Speculate::Auto => match self.paused_for {
                Some(steps) if steps < AUTO_PROBE * 4 => {
                    self.paused_for = Some(steps + 1);
                    Vec::new()
                }
                _ => lookup(tokens, max),
            },
        }
    }

    /// Records a step of `drafted` drafted tokens, `kept` of them kept, that took `time`.
    pub(crate) fn record(&mut self, drafted: usize, kept: usize, time: Duration) {
        if drafted == 0 {
            self.single = Some(match self.single {
                Some(mean) => (mean * 7 + time) / 8,
                None => time,
            });
            return;
        }
        let Some(single) = self.single else {
            return;
        };
        self.spent += time.saturating_sub(single);
        self.saved += single * kept as u32;
        self.drafted_steps += 1;
        if self.speculate == Speculate::Auto && self.drafted_steps >= AUTO_PROBE {
            self.paused_for = (self.spent > self.saved).then_some(0);
            self.spent = Duration::ZERO;
            self.saved = Duration::ZERO;
            self.drafted_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_earlier_occurrence_of_the_longest_suffix() {
        // "... 5 6 7 8 9 ... 5 6 7": the trigram 5 6 7 recurs, followed by 8 9.
        let tokens = [1, 5, 6, 7, 8, 9, 2, 5, 6, 7];
        assert_eq!(lookup(&tokens, 4), vec![8, 9, 2, 5]);
        assert_eq!(lookup(&tokens, 1), vec![8]);
        // Only the last token recurs: its latest earlier occurrence wins.
        assert_eq!(lookup(&[4, 1, 3, 4, 2, 4], 2), vec![2, 4]);
        // Nothing recurs.
        assert_eq!(lookup(&[1, 2, 3], 4), Vec::<u32>::new());
        assert_eq!(lookup(&[], 4), Vec::<u32>::new());
    }

    #[test]
    fn names_round_trip() {
        for v in Speculate::ALL {
            assert_eq!(v.name().parse::<Speculate>(), Ok(v));
        }
        assert_eq!(
            "fast".parse::<Speculate>().unwrap_err(),
            "unknown speculation \"fast\": expected off, auto or lookup"
        );
    }

    #[test]
    fn auto_stops_drafting_when_drafted_steps_cost_more_than_they_save() {
        let ms = Duration::from_millis;
        let tokens = [1, 2, 1, 2, 1, 2];
        let mut auto = Drafter::new(Speculate::Auto, false);
        auto.record(0, 0, ms(10));
        for _ in 0..AUTO_PROBE {
            assert!(!auto.draft(&tokens, 4).is_empty());
            // Each drafted step costs 30 ms more than a one-token step and keeps nothing.
            auto.record(4, 0, ms(40));
        }
        assert!(auto.draft(&tokens, 4).is_empty());

        let mut paying = Drafter::new(Speculate::Auto, false);
        paying.record(0, 0, ms(80));
        for _ in 0..AUTO_PROBE {
            paying.record(4, 3, ms(82));
        }
        assert_eq!(paying.draft(&tokens, 4), vec![1, 2]);

        let mut local = Drafter::new(Speculate::Auto, true);
        assert!(local.draft(&tokens, 4).is_empty());
    }
}
