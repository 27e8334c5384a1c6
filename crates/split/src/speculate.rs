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
    /// Prompt lookup, as many of its tokens as the measured step time, cost of a drafted row
    /// and chance of a draft being kept say will save time; none with an in-process trunk.
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

/// Tokens `auto` drafts at most while it learns what a drafted row costs.
const PROBE_ROWS: usize = 4;
/// One-token steps after which `auto`, drafting nothing because it does not pay, probes again
/// so that its estimates follow the link.
const REPROBE_AFTER: usize = 16;
/// Weight of the newest measure in `auto`'s running estimates.
const NEWEST: f64 = 0.25;

/// Decides, step by step, how many tokens to draft.
///
/// `auto` keeps running estimates of a one-token step's time `s` (round trip and compute), of
/// the time a step of `k` drafted tokens adds to it, `a + b k` (a least-squares line through
/// the drafted steps seen: the first drafted row costs more than the next ones), and of the
/// chance `p` that a drafted token is kept given the one before it was. It drafts the `k`
/// tokens that maximise the time saved, `s (p + p^2 + ... + p^k) - (a + b k)`, and none when no
/// `k` saves time.
#[derive(Debug)]
pub(crate) struct Drafter {
    speculate: Speculate,
    single: Option<f64>,
    cost: CostLine,
    /// Running counts of drafted tokens kept, and of drafted steps that hit a rejection.
    kept: f64,
    missed: f64,
    idle_steps: usize,
}

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |old| old + NEWEST * (new - old))
}

/// The extra time of a drafted step against its draft length: running sums of a weighted
/// least-squares line.
#[derive(Debug, Default)]
struct CostLine {
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl CostLine {
    fn add(&mut self, k: f64, extra: f64) {
        let keep = 1.0 - NEWEST;
        self.n = self.n * keep + 1.0;
        self.x = self.x * keep + k;
        self.y = self.y * keep + extra;
        self.xx = self.xx * keep + k * k;
        self.xy = self.xy * keep + k * extra;
    }

    /// The estimated extra time of `k` drafted tokens; `None` before any drafted step. With
    /// one draft length seen so far, every length is taken to cost what it cost.
    fn at(&self, k: f64) -> Option<f64> {
        if self.n == 0.0 {
            return None;
        }
        let (mx, my) = (self.x / self.n, self.y / self.n);
        let var = self.xx / self.n - mx * mx;
        let slope = if var > 1e-9 {
            ((self.xy / self.n - mx * my) / var).max(0.0)
        } else {
            0.0
        };
        Some((my + slope * (k - mx)).max(0.0))
    }
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
            cost: CostLine::default(),
            kept: 1.0,
            missed: 1.0,
            idle_steps: 0,
        }
    }

    /// Tokens to check after the last of `tokens`, at most `max`.
    pub(crate) fn draft(&mut self, tokens: &[u32], max: usize) -> Vec<u32> {
        let max = max.min(MAX_DRAFT);
        match self.speculate {
            Speculate::Off => Vec::new(),
            Speculate::Lookup => lookup(tokens, max),
            Speculate::Auto => {
                let mut proposal = lookup(tokens, max);
                let length = match self.single {
                    // A one-token step is measured first, then what drafted rows add.
                    None => 0,
                    Some(single) => match self.best_length(single, proposal.len()) {
                        0 if self.idle_steps >= REPROBE_AFTER => PROBE_ROWS,
                        best => best,
                    },
                };
                proposal.truncate(length);
                proposal
            }
        }
    }

    /// The draft length that saves the most time by the estimates, 0 when none saves any;
    /// [`PROBE_ROWS`] while no drafted step has been measured.
    fn best_length(&self, single: f64, available: usize) -> usize {
        let chance = self.kept / (self.kept + self.missed);
        let (mut best, mut best_gain) = (0, 0.0);
        let (mut expected, mut reach) = (0.0, 1.0);
        for k in 1..=available {
            let Some(cost) = self.cost.at(k as f64) else {
                return PROBE_ROWS;
            };
            reach *= chance;
            expected += reach;
            let gain = single * expected - cost;
            if gain > best_gain {
                (best, best_gain) = (k, gain);
            }
        }
        best
    }

    /// Records a step of `drafted` drafted tokens, `kept` of them kept, that took `time`.
    pub(crate) fn record(&mut self, drafted: usize, kept: usize, time: Duration) {
        let time = time.as_secs_f64();
        if drafted == 0 {
            self.single = Some(blend(self.single, time));
            self.idle_steps += 1;
            return;
        }
        self.idle_steps = 0;
        if let Some(single) = self.single {
            self.cost.add(drafted as f64, (time - single).max(0.0));
        }
        let keep = 1.0 - NEWEST;
        self.kept = self.kept * keep + kept as f64;
        self.missed = self.missed * keep + f64::from(u8::from(kept < drafted));
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
    fn auto_drafts_only_while_drafted_rows_cost_less_than_the_steps_they_save() {
        let ms = Duration::from_millis;
        let tokens = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3];
        // A link with no round trip: a step is its compute, 10 ms; a drafted step adds 30 ms
        // and keeps nothing. After one probe, auto stops drafting.
        let mut local_link = Drafter::new(Speculate::Auto, false);
        assert!(
            local_link.draft(&tokens, 8).is_empty(),
            "a one-token step first"
        );
        local_link.record(0, 0, ms(10));
        assert_eq!(local_link.draft(&tokens, 8).len(), PROBE_ROWS);
        local_link.record(PROBE_ROWS, 0, ms(40));
        assert!(local_link.draft(&tokens, 8).is_empty());
        // It probes again after a while.
        for _ in 0..REPROBE_AFTER {
            local_link.record(0, 0, ms(10));
        }
        assert_eq!(local_link.draft(&tokens, 8).len(), PROBE_ROWS);

        // An 80 ms round trip where a drafted step adds 2 ms and most drafts are kept: it
        // drafts all that lookup offers.
        let mut slow_link = Drafter::new(Speculate::Auto, false);
        slow_link.draft(&tokens, 8);
        slow_link.record(0, 0, ms(80));
        slow_link.draft(&tokens, 8);
        slow_link.record(PROBE_ROWS, 3, ms(82));
        assert_eq!(slow_link.draft(&tokens, 8), lookup(&tokens, 8));

        let mut in_process = Drafter::new(Speculate::Auto, true);
        in_process.record(0, 0, ms(80));
        assert!(in_process.draft(&tokens, 8).is_empty());
    }

    #[test]
    fn the_cost_line_fits_a_fixed_and_a_per_row_part() {
        let mut line = CostLine::default();
        assert_eq!(line.at(3.0), None);
        line.add(4.0, 0.030);
        assert!((line.at(1.0).expect("one point") - 0.030).abs() < 1e-12);
        // 15 ms for the first drafted row, 5 ms for each further one.
        for k in [1.0, 8.0, 2.0, 16.0] {
            line.add(k, 0.010 + 0.005 * k);
        }
        line.add(4.0, 0.030);
        let at = |k: f64| line.at(k).expect("fitted");
        assert!((at(1.0) - 0.015).abs() < 1e-9, "{}", at(1.0));
        assert!((at(10.0) - 0.060).abs() < 1e-9, "{}", at(10.0));
    }
}
