//! Drafted tokens for multi-token steps: guesses of the next few tokens that one step checks
//! together, so that a slow link costs one round trip for several tokens.
//!
//! Checking keeps a drafted token only when it is the token the sampler picks from the logits
//! after the tokens before it, with the same random draws as one-token steps; the first miss is
//! replaced by that pick. The output is therefore exactly that of one-token steps, greedy or
//! sampled, and a draft source only changes how many round trips it takes.
//!
//! Sources: prompt lookup and lookahead decoding (Fu et al. 2024; `crate::lookahead`), both
//! free to draft, early exit (the device's head straight into its tail, skipping the trunk,
//! LayerSkip-style: Elhoushi et al. 2024) and a draft model run whole on the device (Leviathan
//! et al. 2023). The two that run layers draft greedily, token after token, and leave the
//! caches they used as they found them.

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
    /// Whichever available source, and as many of its tokens, as the measured step time, cost
    /// of a drafted row, drafting time and each source's chance of a draft being kept say will
    /// save the most time; none with an in-process trunk.
    Auto,
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the last one to
    /// three tokens, in the prompt or in the output so far.
    Lookup,
    /// Lookahead decoding: Jacobi iterations over a window of guesses, and the n-grams their
    /// trajectories produced (a causal form of Fu et al. 2024: `crate::lookahead`).
    Lookahead,
    /// Early exit: the head's output goes straight into the tail, skipping the trunk; local,
    /// no network cost (a split only).
    EarlyExit,
    /// The draft model of `--draft-model`, run whole on the device.
    Draft,
}

impl Speculate {
    /// Every value, in the order `--speculate` lists them.
    pub const ALL: [Speculate; 6] = [
        Speculate::Off,
        Speculate::Auto,
        Speculate::Lookup,
        Speculate::Lookahead,
        Speculate::EarlyExit,
        Speculate::Draft,
    ];

    /// The name `--speculate` takes.
    pub fn name(self) -> &'static str {
        match self {
            Speculate::Off => "off",
            Speculate::Auto => "auto",
            Speculate::Lookup => "lookup",
            Speculate::Lookahead => "lookahead",
            Speculate::EarlyExit => "early-exit",
            Speculate::Draft => "draft",
        }
    }

    /// The one source this value drafts from; `None` for `off` and `auto`.
    pub(crate) fn source(self) -> Option<Source> {
        match self {
            Speculate::Off | Speculate::Auto => None,
            Speculate::Lookup => Some(Source::Lookup),
            Speculate::Lookahead => Some(Source::Lookahead),
            Speculate::EarlyExit => Some(Source::EarlyExit),
            Speculate::Draft => Some(Source::Model),
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
        let known = Speculate::ALL.into_iter().find(|v| v.name() == s);
        known.ok_or_else(|| {
            format!(
                "unknown speculation {s:?}: expected off, auto or lookup or lookahead (sources \
                 that run no layers), or a source that runs layers: early-exit, or draft (with \
                 --draft-model)"
            )
        })
    }
}

/// One source of drafted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Lookup,
    Lookahead,
    EarlyExit,
    Model,
}

impl Source {
    const COUNT: usize = 4;

    fn index(self) -> usize {
        self as usize
    }

    /// True for a source that drafts without running layers: its proposal is made before
    /// planning and costs nothing to draft.
    fn free(self) -> bool {
        matches!(self, Source::Lookup | Source::Lookahead)
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
/// (each source in turn) so that its estimates follow the link.
const REPROBE_AFTER: usize = 16;
/// The longest wait between probes: each probe that finds nothing worth drafting doubles the
/// wait up to this, so that where drafting never pays (a link with no round trip) probes cost
/// almost nothing; the best-gain rule alone resumes drafting when the link slows down.
const MAX_REPROBE_AFTER: usize = 32 * REPROBE_AFTER;
/// The share of decode time that probes finding nothing may take: the wait between probes
/// stops doubling once a probe's extra time is this share of the one-token steps waited. Over a
/// slow link a probe costs little against a step, so `auto` keeps probing every
/// [`REPROBE_AFTER`] steps there and notices when the text turns copyable (measured: with a
/// wait grown to 512 steps on chat prompts, it never drafted from lookup on rewrites at 150 ms,
/// where lookup alone is 1.56x `off`).
const PROBE_SHARE: f64 = 0.01;
/// The least time a draft must be expected to save, as a share of a one-token step: estimates
/// are noisy, and a draft that saves next to nothing by them costs time as often as it saves it
/// (at a low round trip, where a drafted row costs about what it saves).
const MARGIN: f64 = 0.05;
/// How many times slower a one-token step must have become since the probes' wait last grew
/// for `auto` to stop waiting and probe again (a link that went from loopback to a WAN).
const SLOWER_LINK: f64 = 2.0;
/// Weight of the newest measure in `auto`'s running estimates.
const NEWEST: f64 = 0.25;

/// What the drafter has learnt of one source: running counts of drafted tokens kept and of
/// drafted steps that hit a rejection, and the time it takes to draft one token.
#[derive(Debug, Clone, Copy)]
struct Learnt {
    kept: f64,
    missed: f64,
    per_token: Option<f64>,
    /// The drafting time per token expected before any is measured (see [`Drafter::expect`]).
    prior: Option<f64>,
}

impl Default for Learnt {
    fn default() -> Self {
        Self {
            kept: 1.0,
            missed: 1.0,
            per_token: None,
            prior: None,
        }
    }
}

/// Decides, step by step, which source drafts and how many tokens.
///
/// It keeps running estimates of a one-token step's time `s` (round trip and compute), of the
/// time a step of `k` drafted tokens adds to it, `a + b k` (a least-squares line through the
/// drafted steps seen: the first drafted row costs more than the next ones), and, for each
/// source, of the chance `p` that a drafted token is kept given the one before it was and of
/// the time `d` it takes to draft a token. A source that drafts `k` tokens saves
/// `s (p + p^2 + ... + p^k) - (a + b k) - d k`; `auto` drafts from the source and length that
/// save the most, and nothing when none saves more than [`MARGIN`] of a step. A chosen source
/// that runs layers drafts that source's best length, at least one token.
///
/// A device keeps `auto`'s drafter across its sessions (`DeviceModel::keep_drafter`), so a new
/// generation starts from what earlier ones measured instead of probing again.
#[derive(Debug)]
pub(crate) struct Drafter {
    speculate: Speculate,
    single: Option<f64>,
    cost: CostLine,
    learnt: [Learnt; Source::COUNT],
    idle_steps: usize,
    probes: usize,
    /// One-token steps to wait before the next probe (see [`MAX_REPROBE_AFTER`]).
    reprobe_after: usize,
    /// The one-token step's time when the wait last grew: a link that has since slowed to
    /// [`SLOWER_LINK`] times it is probed again at once, since what drafting saves grows with
    /// the step.
    waited_at: Option<f64>,
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
            learnt: [Learnt::default(); Source::COUNT],
            idle_steps: 0,
            probes: 0,
            reprobe_after: REPROBE_AFTER,
            waited_at: None,
        }
    }

    /// False when it never drafts (`off`, or `auto` with an in-process trunk).
    pub(crate) fn drafts(&self) -> bool {
        self.speculate != Speculate::Off
    }

    /// The source to draft from after the last token, and how many tokens, given how many
    /// each available source offers (lookup: its proposal; a source that runs layers: the
    /// room left); `None` to draft nothing.
    pub(crate) fn plan(&mut self, offers: &[(Source, usize)]) -> Option<(Source, usize)> {
        let offered = |source: Source| {
            offers
                .iter()
                .find(|(s, _)| *s == source)
                .map_or(0, |&(_, n)| n.min(MAX_DRAFT))
        };
        if let Some(source) = self.speculate.source() {
            let available = offered(source);
            let length = match (source, self.single) {
                (s, _) if s.free() => available,
                (_, None) => PROBE_ROWS,
                (_, Some(single)) => self.best_length(source, single, available).0.max(1),
            };
            return (available > 0).then_some((source, length.min(available)));
        }
        if self.speculate == Speculate::Off {
            return None;
        }
        // A one-token step is measured first, then what drafted rows add.
        let single = self.single?;
        // Ties go to the source offered first (lookup, which costs nothing to draft).
        let best = offers
            .iter()
            .rev()
            .map(|&(source, _)| {
                let (length, gain) = self.best_length(source, single, offered(source));
                (source, length, gain)
            })
            .filter(|&(_, length, _)| length > 0)
            .max_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((source, length, _)) = best {
            self.reprobe_after = REPROBE_AFTER;
            return Some((source, length));
        }
        if self.waited_at.is_some_and(|at| single >= SLOWER_LINK * at) {
            self.reprobe_after = REPROBE_AFTER;
            self.idle_steps = self.idle_steps.max(REPROBE_AFTER);
        }
        if self.idle_steps < self.reprobe_after {
            return None;
        }
        // Probes only sources that draft a token in under half a step: a slower one (a draft
        // model as large as the model, where the round trip is short) cannot pay.
        let open: Vec<_> = offers
            .iter()
            .filter(|&&(s, _)| offered(s) > 0 && self.per_token(s).is_none_or(|t| 2.0 * t < single))
            .collect();
        let &&(source, _) = open.get(self.probes % open.len().max(1))?;
        self.probes += 1;
        self.reprobe_after = (2 * self.reprobe_after).min(self.longest_wait(single));
        self.waited_at = Some(single);
        let probe = if source.free() { PROBE_ROWS } else { 1 };
        Some((source, probe.min(offered(source))))
    }

    /// The longest wait between probes, in one-token steps of `single` seconds: long enough
    /// for a probe's extra time to be [`PROBE_SHARE`] of the wait's, within [`REPROBE_AFTER`]
    /// and [`MAX_REPROBE_AFTER`].
    fn longest_wait(&self, single: f64) -> usize {
        let probe = self.cost.at(PROBE_ROWS as f64).unwrap_or(single);
        let wait = (probe / (PROBE_SHARE * single)).ceil();
        (wait.min(MAX_REPROBE_AFTER as f64) as usize).max(REPROBE_AFTER)
    }

    /// The length of `source`'s draft that saves the most time by the estimates, and the time
    /// it saves; length 0 when none saves more than [`MARGIN`] of a step, [`PROBE_ROWS`]
    /// (saving without bound) while no drafted step has been measured.
    fn best_length(&self, source: Source, single: f64, available: usize) -> (usize, f64) {
        let learnt = &self.learnt[source.index()];
        let mut chance = learnt.kept / (learnt.kept + learnt.missed);
        let (per_token, available) = match (source, learnt.per_token, learnt.prior) {
            // A free source is tried once, as long a draft as it offers up to a probe's, before
            // its chance counts: the prior chance would rank an untried one below a tried one.
            (s, None, _) if s.free() => return (PROBE_ROWS.min(available), f64::INFINITY),
            (s, ..) if s.free() => (0.0, available),
            (_, Some(measured), _) => (measured, available),
            // A source that runs layers is first tried with one token, where that token would
            // save time if kept given its expected drafting time (a draft model as large as the
            // model pays only over a slow link); with no expectation, it is tried.
            (_, None, Some(prior)) => {
                chance = 1.0;
                (prior, available.min(1))
            }
            (_, None, None) => return (available.min(1), f64::INFINITY),
        };
        // Drafting a token in half a step or more saves at most half a step per token before
        // its rows' cost, within the estimates' noise: measured, such a source (a draft model as
        // large as the model, over a fast link) loses time, so `auto` leaves it, as it leaves
        // it out of probes.
        if !source.free() && 2.0 * per_token >= single {
            return (0, 0.0);
        }
        let (mut best, mut best_gain) = (0, MARGIN * single);
        let (mut expected, mut reach) = (0.0, 1.0);
        for k in 1..=available {
            let Some(cost) = self.cost.at(k as f64) else {
                return (PROBE_ROWS.min(available), f64::INFINITY);
            };
            reach *= chance;
            expected += reach;
            let gain = single * expected - cost - per_token * k as f64;
            if gain > best_gain {
                (best, best_gain) = (k, gain);
            }
        }
        (best, best_gain)
    }

    /// The measured or expected time `source` takes to draft a token; `None` when unknown.
    fn per_token(&self, source: Source) -> Option<f64> {
        let learnt = &self.learnt[source.index()];
        if source.free() {
            return Some(0.0);
        }
        learnt.per_token.or(learnt.prior)
    }

    /// Sets the time `source` is expected to take to draft a token until one is measured:
    /// the device's share of a one-token step for early exit, scaled by layers for a draft
    /// model. `auto` then never tries a source that could not pay (at a low round trip, a draft
    /// model as large as the model itself).
    pub(crate) fn expect(&mut self, source: Source, per_token: Duration) {
        self.learnt[source.index()].prior = Some(per_token.as_secs_f64());
    }

    /// Records a step of `drafted` tokens drafted by `source` in `drafting`, `kept` of them
    /// kept, whose step took `time`.
    pub(crate) fn record(
        &mut self,
        source: Option<Source>,
        drafted: usize,
        kept: usize,
        time: Duration,
        drafting: Duration,
    ) {
        let time = time.as_secs_f64();
        let Some(source) = source.filter(|_| drafted > 0) else {
            self.single = Some(blend(self.single, time));
            self.idle_steps += 1;
            return;
        };
        self.idle_steps = 0;
        if let Some(single) = self.single {
            self.cost.add(drafted as f64, (time - single).max(0.0));
        }
        let learnt = &mut self.learnt[source.index()];
        let keep = 1.0 - NEWEST;
        learnt.kept = learnt.kept * keep + kept as f64;
        learnt.missed = learnt.missed * keep + f64::from(u8::from(kept < drafted));
        let per_token = drafting.as_secs_f64() / drafted as f64;
        learnt.per_token = Some(blend(learnt.per_token, per_token));
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
            "unknown speculation \"fast\": expected off, auto or lookup or lookahead (sources that \
             run no layers), or a source that runs layers: early-exit, or draft (with \
             --draft-model)"
        );
    }

    /// What `drafter` drafts from lookup alone, as a session does.
    fn draft(drafter: &mut Drafter, tokens: &[u32], max: usize) -> Vec<u32> {
        let mut proposal = lookup(tokens, max);
        let plan = drafter.plan(&[(Source::Lookup, proposal.len())]);
        proposal.truncate(plan.map_or(0, |(_, k)| k));
        proposal
    }

    /// Records a lookup step, drafting taking no time.
    fn record(drafter: &mut Drafter, drafted: usize, kept: usize, time: Duration) {
        let source = Some(Source::Lookup);
        drafter.record(source, drafted, kept, time, Duration::ZERO);
    }

    #[test]
    fn auto_drafts_only_while_drafted_rows_cost_less_than_the_steps_they_save() {
        let ms = Duration::from_millis;
        let tokens = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3];
        // A link with no round trip: a step is its compute, 10 ms; a drafted step adds 30 ms
        // and keeps nothing. After one probe, auto stops drafting.
        let mut local_link = Drafter::new(Speculate::Auto, false);
        assert!(
            draft(&mut local_link, &tokens, 8).is_empty(),
            "a one-token step first"
        );
        record(&mut local_link, 0, 0, ms(10));
        assert_eq!(draft(&mut local_link, &tokens, 8).len(), PROBE_ROWS);
        record(&mut local_link, PROBE_ROWS, 0, ms(40));
        assert!(draft(&mut local_link, &tokens, 8).is_empty());
        // It probes again after a while.
        for _ in 0..REPROBE_AFTER {
            record(&mut local_link, 0, 0, ms(10));
        }
        assert_eq!(draft(&mut local_link, &tokens, 8).len(), PROBE_ROWS);

        // An 80 ms round trip where a drafted step adds 2 ms and most drafts are kept: it
        // drafts all that lookup offers.
        let mut slow_link = Drafter::new(Speculate::Auto, false);
        draft(&mut slow_link, &tokens, 8);
        record(&mut slow_link, 0, 0, ms(80));
        draft(&mut slow_link, &tokens, 8);
        record(&mut slow_link, PROBE_ROWS, 3, ms(82));
        assert_eq!(draft(&mut slow_link, &tokens, 8), lookup(&tokens, 8));

        let mut in_process = Drafter::new(Speculate::Auto, true);
        record(&mut in_process, 0, 0, ms(80));
        assert!(draft(&mut in_process, &tokens, 8).is_empty());
    }

    #[test]
    fn auto_picks_the_source_that_saves_the_most_and_stops_one_that_costs_more_than_it_saves() {
        let ms = Duration::from_millis;
        let mut drafter = Drafter::new(Speculate::Auto, false);
        // Lookup offers nothing; early exit and a draft model could draft up to 8 tokens.
        let offers = [
            (Source::Lookup, 0),
            (Source::EarlyExit, 8),
            (Source::Model, 8),
        ];
        assert_eq!(drafter.plan(&offers), None, "a one-token step first");
        drafter.record(None, 0, 0, ms(80), Duration::ZERO);
        // Nothing measured of either: the first source that offers tokens probes, with one
        // token since its drafting time is unknown.
        assert_eq!(drafter.plan(&offers), Some((Source::EarlyExit, 1)));
        // Early exit drafts a token in 1 ms and it is not kept; a drafted step adds 2 ms.
        drafter.record(Some(Source::EarlyExit), 1, 0, ms(82), ms(1));
        // The draft model, never tried, is tried next.
        assert_eq!(drafter.plan(&offers), Some((Source::Model, 1)));
        // It takes 20 ms a token and keeps all: it drafts the length that saves the most
        // (the next tokens' chance falls as p^k, while their cost grows linearly).
        drafter.record(Some(Source::Model), 4, 4, ms(82), ms(80));
        let (source, length) = drafter.plan(&offers).expect("drafts");
        assert_eq!(source, Source::Model);
        assert!((1..=8).contains(&length), "{length}");
        // On a link with no round trip, a draft that costs 20 ms a token never pays.
        let mut local = Drafter::new(Speculate::Auto, false);
        local.record(None, 0, 0, ms(5), Duration::ZERO);
        local.record(Some(Source::Model), 4, 4, ms(7), ms(80));
        local.record(Some(Source::EarlyExit), 4, 0, ms(7), ms(4));
        assert_eq!(local.plan(&offers), None);
        // Expected to draft a token in 30 ms, a source is never tried on a 5 ms link, and is
        // tried with one token on an 80 ms one.
        let model_only = [(Source::Model, 8)];
        let mut low = Drafter::new(Speculate::Auto, false);
        low.record(None, 0, 0, ms(5), Duration::ZERO);
        low.record(Some(Source::Lookup), 4, 0, ms(7), Duration::ZERO);
        low.expect(Source::Model, ms(30));
        assert_eq!(low.plan(&model_only), None);
        // Nor when auto probes again.
        for _ in 0..REPROBE_AFTER {
            low.record(None, 0, 0, ms(5), Duration::ZERO);
        }
        assert_eq!(low.plan(&model_only), None);
        let mut high = Drafter::new(Speculate::Auto, false);
        high.record(None, 0, 0, ms(80), Duration::ZERO);
        high.record(Some(Source::Lookup), 4, 0, ms(82), Duration::ZERO);
        high.expect(Source::Model, ms(30));
        assert_eq!(high.plan(&model_only), Some((Source::Model, 1)));
        // A fixed source drafts at least one token even where it does not pay.
        let mut fixed = Drafter::new(Speculate::EarlyExit, true);
        assert_eq!(fixed.plan(&offers), Some((Source::EarlyExit, PROBE_ROWS)));
        fixed.record(None, 0, 0, ms(5), Duration::ZERO);
        fixed.record(Some(Source::EarlyExit), 4, 0, ms(7), ms(4));
        assert_eq!(fixed.plan(&offers), Some((Source::EarlyExit, 1)));
    }

    #[test]
    fn auto_on_a_link_with_no_round_trip_drafts_nothing_and_probes_more_rarely() {
        let ms = Duration::from_millis;
        let offers = [
            (Source::Lookup, 4),
            (Source::EarlyExit, 8),
            (Source::Model, 8),
        ];
        // Measured on a loopback link: a one-token step takes 10 ms; a step with drafted rows
        // costs 2x (15 ms more); lookup keeps one drafted token in four, early exit none; the
        // draft model, as large as the model, is expected to take 9 ms a token.
        let mut drafter = Drafter::new(Speculate::Auto, false);
        drafter.record(None, 0, 0, ms(10), Duration::ZERO);
        drafter.record(Some(Source::Lookup), 4, 1, ms(25), Duration::ZERO);
        drafter.record(Some(Source::EarlyExit), 1, 0, ms(19), ms(2));
        drafter.expect(Source::Model, ms(9));
        let mut probes = Vec::new();
        for step in 0..1000 {
            match drafter.plan(&offers) {
                None => drafter.record(None, 0, 0, ms(10), Duration::ZERO),
                Some((source, k)) => {
                    // Each probe confirms that drafting costs more than it saves.
                    assert!(k <= PROBE_ROWS, "a probe, not a draft: {source:?} {k}");
                    probes.push(step);
                    let kept = usize::from(source == Source::Lookup);
                    drafter.record(Some(source), k, kept, ms(25), ms(2 * k as u64));
                }
            }
        }
        // The waits double from 16 steps until a probe's extra time is 1% of the steps waited
        // (PROBE_SHARE), then stay; never the draft model.
        // (About 15 ms a probe against 10 ms steps: 150 steps.)
        assert_eq!(probes, [16, 49, 114, 243, 394, 545, 696, 848], "{probes:?}");
        // The same estimates on an 80 ms link: drafting pays at once, without waiting for a
        // probe, and the draft model, never tried, is tried with one token.
        for _ in 0..8 {
            drafter.record(None, 0, 0, ms(80), Duration::ZERO);
        }
        assert!(drafter.plan(&offers).is_some());
        assert_eq!(
            drafter.plan(&[(Source::Model, 8)]),
            Some((Source::Model, 1))
        );
    }

    #[test]
    fn auto_probes_again_at_once_when_the_link_slows_down() {
        let ms = Duration::from_millis;
        let offers = [(Source::Lookup, 4), (Source::EarlyExit, 8)];
        // On loopback (10 ms steps) neither source's drafts are ever kept: the probes' wait
        // grows to its longest.
        let mut drafter = Drafter::new(Speculate::Auto, false);
        drafter.record(None, 0, 0, ms(10), Duration::ZERO);
        let mut last_probe = 0;
        for step in 0..2000 {
            match drafter.plan(&offers) {
                None => drafter.record(None, 0, 0, ms(10), Duration::ZERO),
                Some((source, k)) => {
                    last_probe = step;
                    drafter.record(Some(source), k, 0, ms(25), ms(k as u64));
                }
            }
        }
        let longest = drafter.longest_wait(0.010);
        assert_eq!(drafter.reprobe_after, longest);
        assert!(longest > 4 * REPROBE_AFTER, "{longest}");
        // The link slows to 80 ms a step: the estimates still say drafting does not pay
        // (nothing was ever kept), but auto probes within a few steps instead of waiting its
        // longest wait, so that what it learns at the new speed decides.
        let mut probed = None;
        for step in 0..8 {
            if drafter.plan(&offers).is_some() {
                probed = Some(step);
                break;
            }
            drafter.record(None, 0, 0, ms(80), Duration::ZERO);
        }
        let step = probed.expect("a probe soon after the link slowed");
        assert_eq!(step, 1, "after the first slow step measured, not before");
        assert!(
            last_probe < 2000 - REPROBE_AFTER,
            "no probe was due anyway: {last_probe}"
        );
    }

    /// Runs `steps` steps of lookup offering 4 tokens over a 150 ms link where a drafted step
    /// adds 8 ms, every draft kept when `kept`, none otherwise; the steps that drafted.
    fn on_a_slow_link(drafter: &mut Drafter, steps: usize, kept: bool) -> Vec<usize> {
        let ms = Duration::from_millis;
        let mut drafted = Vec::new();
        for step in 0..steps {
            match drafter.plan(&[(Source::Lookup, 4)]) {
                None => drafter.record(None, 0, 0, ms(150), Duration::ZERO),
                Some((_, k)) => {
                    drafted.push(step);
                    let kept = if kept { k } else { 0 };
                    drafter.record(Some(Source::Lookup), k, kept, ms(158), Duration::ZERO);
                }
            }
        }
        drafted
    }

    #[test]
    fn auto_keeps_probing_over_a_slow_link_and_drafts_once_the_text_turns_copyable() {
        // For 600 steps (chat) lookup's drafts are never kept: after five drafts its chance has
        // fallen too low to pay, and from then on auto probes every 16 steps, since a probe
        // costs under 1% of 16 steps.
        let mut drafter = Drafter::new(Speculate::Auto, false);
        drafter.record(None, 0, 0, Duration::from_millis(150), Duration::ZERO);
        let probes = on_a_slow_link(&mut drafter, 600, false);
        let expected: Vec<usize> = (0..5).chain((21..600).step_by(REPROBE_AFTER + 1)).collect();
        assert_eq!(probes, expected);
        // Then the text turns copyable (a rewrite): the next probe keeps all it drafted, and
        // auto drafts from lookup at every step after it.
        let drafted = on_a_slow_link(&mut drafter, 3 * REPROBE_AFTER, true);
        let first = drafted[0];
        assert!(first <= REPROBE_AFTER, "{drafted:?}");
        assert_eq!(drafted, (first..3 * REPROBE_AFTER).collect::<Vec<_>>());
    }

    #[test]
    fn auto_leaves_a_source_that_takes_half_a_step_to_draft_a_token() {
        let ms = Duration::from_millis;
        let model_only = [(Source::Model, 8)];
        // A 10 ms step; the draft model drafts 4 tokens in 20 ms, all kept, and its step adds
        // 1 ms: by the estimates 4 tokens would save about 7 ms, but at 5 ms a token (half a
        // step) auto leaves it.
        let mut fast = Drafter::new(Speculate::Auto, false);
        fast.record(None, 0, 0, ms(10), Duration::ZERO);
        fast.record(Some(Source::Model), 4, 4, ms(11), ms(20));
        assert_eq!(fast.plan(&model_only), None);
        // The same source over an 80 ms link drafts several tokens.
        for _ in 0..16 {
            fast.record(None, 0, 0, ms(80), Duration::ZERO);
        }
        let (source, length) = fast.plan(&model_only).expect("drafts");
        assert_eq!(source, Source::Model);
        assert!(length > 1, "{length}");
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
