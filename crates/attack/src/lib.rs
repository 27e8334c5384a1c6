//! Attacks on a wire capture of a split model: what an eavesdropper who strips TLS, or the
//! cloud operator, can read from the hidden rows with the public weights alone.
//!
//! Three attacks, each giving a token guess per position:
//! - **replay**: the downlink rows through the public tail, greedy; it reads the generated
//!   text (position `p`'s row predicts token `p + 1`);
//! - **vocabulary matching**: at each position, candidate tokens are run through the public
//!   head after the already recovered prefix, and the one whose row matches the uplink row is
//!   taken. Candidates are tried in the order of two rankings merged: the public whole model's
//!   next-token prediction after the recovered prefix (text is predictable, so the true token
//!   is usually among the first few), and the nearness of each token's row in a table made by
//!   running the whole vocabulary through the head once, after a one-token context. They go
//!   through the head in growing chunks until one matches (to
//!   a relative distance of [`MATCH_TOLERANCE`], or of [`LOOSE_TOLERANCE`] with every other
//!   token [`SEPARATION`] times farther) or the budget (by default the whole
//!   vocabulary) is spent. With the whole vocabulary and rows as computed (f32, f16 or bf16 on
//!   the wire), the true token always matches, so a known split is inverted exactly;
//! - **logit lens**: the uplink row through the public final norm and LM head (with tied
//!   embeddings, the nearest embedding by dot product), the baseline.
//!
//! Unknown split points (a random policy) are handled by trying every boundary up to a depth
//! and keeping the best match. Permuted rows are matched on their sorted values, which a
//! permutation leaves unchanged; the first exact match then gives the permutation itself, and
//! the attack goes on unpermuted.

use std::ops::Range;

use candle_core::{Device, Tensor};
use lsplit_model::{ModelError, ModelPart, ModelSource, PartKind, PartSpec};
use lsplit_split::{CapturedMessage, Way};
use lsplit_wire::WireError;

/// Relative L2 distance under which a candidate's row is taken to be the observed row: above
/// f16/bf16 rounding (about 0.001 and 0.004), far below the distance between different
/// tokens' rows (above 0.1 after one layer).
pub const MATCH_TOLERANCE: f32 = 0.008;

/// Deep boundaries (8 or more layers) add rounding that the device's batched prefill and the
/// attacker's one-position-at-a-time head do in different orders, re-quantized to 8 bits at
/// every matrix product: the true row can land a little above [`MATCH_TOLERANCE`]. A candidate
/// within this looser distance is still taken when every other token tried is at least
/// [`SEPARATION`] times farther.
pub const LOOSE_TOLERANCE: f32 = 0.05;

/// How much farther the runner-up token must be for a match under [`LOOSE_TOLERANCE`].
pub const SEPARATION: f32 = 4.0;

/// Candidates run through the head in the first chunk of a position: the ranking usually puts
/// the true token there.
const FIRST_CHUNK: usize = 32;

/// Candidates run through the head at once after the first chunk: rows go through each
/// weight four at a time, so big chunks amortise the weights.
const CHUNK: usize = 512;

/// Errors of an attack.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// Loading or running the public weights failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A captured payload does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The capture does not fit the model or holds nothing to attack.
    #[error("{0}")]
    Capture(String),
}

/// What the attacker knows of the split points: the handshake of a fixed split announces
/// the trunk's layers; a random policy's draws stay secret, so every boundary is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knowledge {
    /// The uplink's layer, when known.
    pub k1: Option<usize>,
    /// The downlink's layer, when known.
    pub k2: Option<usize>,
    /// Deepest boundary tried from either end when a split point is unknown.
    pub max_k: usize,
    /// Most candidate tokens tried per position by vocabulary matching (`usize::MAX`: the
    /// whole vocabulary, which makes matching exact).
    pub budget: usize,
}

/// The attacks' guesses, per sequence position that crossed the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Replay: the token guessed to follow each position.
    pub replay_next: Vec<u32>,
    /// The downlink layer replay read each position at (the most confident one).
    pub replay_k2: Vec<usize>,
    /// Vocabulary matching: the token guessed at each position.
    pub matching: Vec<u32>,
    /// Positions whose uplink row a candidate matched (see [`Candidate::matches`]).
    pub exact_matches: usize,
    /// Logit lens: the token guessed at each position.
    pub lens: Vec<u32>,
    /// True when the rows were permuted and matching recovered the permutation.
    pub permutation_recovered: bool,
}

/// Fractions of tokens recovered exactly.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate {
    /// Prompt tokens recovered.
    pub prompt: usize,
    /// Prompt tokens in all.
    pub prompt_total: usize,
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
        self.generated += other.generated;
        self.generated_total += other.generated_total;
    }

    /// Percent of prompt tokens recovered.
    pub fn prompt_percent(&self) -> f64 {
        percent(self.prompt, self.prompt_total)
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
}

impl Recovery {
    /// Scores the guesses against the prompt and generated tokens of the session.
    pub fn score(&self, prompt: &[u32], generated: &[u32]) -> Scores {
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
        }
    }
}

/// The public weights an attacker runs: a head as deep as the deepest boundary tried, a tail
/// from the shallowest, and the embedding table.
pub struct Attacker {
    head: ModelPart,
    tail: ModelPart,
    /// The whole public model: its next-token prediction after the recovered prefix ranks
    /// the candidates of the next position.
    whole: ModelPart,
    /// Every token's row at each boundary `k` (`tables[0]` the embeddings), computed once
    /// after a one-token context: the order candidates are tried in.
    tables: Vec<Table>,
    layers: usize,
    max_k: usize,
}

/// Every vocabulary token's row at one boundary, as is and sorted within the row.
struct Table {
    rows: Tensor,
    norms: Tensor,
    sorted: Tensor,
    sorted_norms: Tensor,
}

impl Table {
    fn new(rows: Tensor) -> Result<Self, AttackError> {
        let sorted = rows.sort_last_dim(true)?.0;
        Ok(Self {
            norms: rows.sqr()?.sum(1)?,
            sorted_norms: sorted.sqr()?.sum(1)?,
            rows,
            sorted,
        })
    }

    /// Cosine distances (one minus the cosine) of every token's row to `values` (on sorted
    /// values when `sorted`): the direction of a row ranks candidates better than its length.
    fn distances(&self, values: &[f32], sorted: bool) -> Result<Tensor, AttackError> {
        let (table, norms) = match sorted {
            true => (&self.sorted, &self.sorted_norms),
            false => (&self.rows, &self.norms),
        };
        let mut values = values.to_vec();
        if sorted {
            values.sort_by(f32::total_cmp);
        }
        let norm: f32 = values
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let column = Tensor::from_vec(values, (table.dim(1)?, 1), table.device())?;
        let dots = table.matmul(&column)?.squeeze(1)?;
        let cosine = (dots / (norms.sqrt()? * f64::from(norm))?)?;
        Ok(cosine.affine(-1.0, 1.0)?)
    }
}

/// Vocabulary rows computed per batch while building the tables.
const TABLE_BATCH: usize = 1024;

impl Attacker {
    /// Loads the parts of `source` that boundaries up to `max_k` from either end need, and
    /// runs the whole vocabulary through the head once (after the token `context`) to rank
    /// candidates later; `progress` is told the tokens done and the total.
    pub fn new(
        source: &ModelSource,
        max_k: usize,
        context: u32,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, AttackError> {
        let layers = source.config().num_layers;
        let max_k = max_k.min(layers);
        let head = source.load_part(
            &PartSpec {
                kind: PartKind::Head,
                layers: 0..max_k,
            },
            device,
        )?;
        let tail = source.load_part(
            &PartSpec {
                kind: PartKind::Tail,
                layers: layers - max_k..layers,
            },
            device,
        )?;
        let whole = source.load_part(&PartSpec::whole(layers), device)?;
        let vocab = source.config().vocab_size;
        let mut cache = head.new_cache();
        head.forward(&head.embed(&[context])?, 0, &mut cache)?;
        let mut per_boundary: Vec<Vec<Tensor>> = vec![Vec::new(); max_k + 1];
        for first in (0..vocab).step_by(TABLE_BATCH) {
            let ids: Vec<u32> = (first as u32..(first + TABLE_BATCH).min(vocab) as u32).collect();
            let rows = head.embed(&ids)?;
            if max_k > 0 {
                let outputs = head.forward_alternatives(&rows, 1, 0..max_k, &cache)?;
                for (k, out) in outputs.into_iter().enumerate() {
                    per_boundary[k + 1].push(out);
                }
            }
            per_boundary[0].push(rows);
            progress(first + ids.len(), vocab);
        }
        let tables = per_boundary
            .into_iter()
            .map(|parts| Table::new(Tensor::cat(&parts, 0)?))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            head,
            tail,
            whole,
            tables,
            layers,
            max_k,
        })
    }

    /// Runs every attack on the messages of one capture.
    pub fn run(
        &self,
        messages: &[CapturedMessage],
        knowledge: &Knowledge,
    ) -> Result<Recovery, AttackError> {
        let up = first_rows(messages, Way::Up, self.head.device())?;
        let down = first_rows(messages, Way::Down, self.head.device())?;
        if up.is_empty() || up.len() != down.len() {
            return Err(AttackError::Capture(format!(
                "the capture holds {} uplink and {} downlink positions",
                up.len(),
                down.len()
            )));
        }
        let width = self.head.config().hidden_size;
        if up[0].dims() != [width] {
            return Err(AttackError::Capture(format!(
                "captured rows are {:?} wide but the model's hidden size is {width}",
                up[0].dims()
            )));
        }
        let boundaries = match knowledge.k1 {
            Some(k) if k <= self.max_k => k..k + 1,
            Some(k) => {
                return Err(AttackError::Capture(format!(
                    "K1 = {k} is deeper than the attack's --max-k {}",
                    self.max_k
                )));
            }
            None => 0..knowledge.max_k.min(self.max_k) + 1,
        };
        let matched = self.vocabulary_matching(&up, boundaries, knowledge.budget)?;
        let down: Vec<Tensor> = match &matched.mode {
            Mode::Permuted(inverse) => down
                .iter()
                .map(|row| row.index_select(inverse, 0))
                .collect::<Result<_, _>>()?,
            Mode::Unknown | Mode::Plain => down,
        };
        let k2s = match knowledge.k2 {
            Some(k) if k + self.max_k >= self.layers => k..k + 1,
            Some(k) => {
                return Err(AttackError::Capture(format!(
                    "K2 = {k} leaves more tail layers than the attack's --max-k {}",
                    self.max_k
                )));
            }
            None => self.layers - knowledge.max_k.min(self.max_k)..self.layers + 1,
        };
        let (replay_k2, replay_next) = self.replay(&down, k2s)?;
        Ok(Recovery {
            replay_next,
            replay_k2,
            matching: matched.tokens,
            exact_matches: matched.exact,
            lens: matched.lens,
            permutation_recovered: matches!(matched.mode, Mode::Permuted(_)),
        })
    }

    /// Runs the downlink rows through the tail from each candidate boundary and keeps, per
    /// position, the boundary the model is most confident at (a random policy draws K2 per
    /// step; the prefix's keys then come from rows at the same boundary, close enough for
    /// greedy decoding).
    fn replay(
        &self,
        down: &[Tensor],
        k2s: Range<usize>,
    ) -> Result<(Vec<usize>, Vec<u32>), AttackError> {
        let rows = Tensor::stack(down, 0)?;
        let mut best: Vec<(f32, usize, u32)> = vec![(f32::NEG_INFINITY, 0, 0); down.len()];
        for k2 in k2s {
            let mut cache = self.tail.new_cache();
            let out = self
                .tail
                .forward_layers(&rows, 0, k2..self.layers, &mut cache)?;
            for (p, best) in best.iter_mut().enumerate() {
                let logits = self.tail.logits(&out.narrow(0, p, 1)?)?.to_vec1::<f32>()?;
                let (token, p_max) = most_likely(&logits);
                if p_max > best.0 {
                    *best = (p_max, k2, token);
                }
            }
        }
        Ok(best.into_iter().map(|(_, k2, token)| (k2, token)).unzip())
    }

    fn vocabulary_matching(
        &self,
        up: &[Tensor],
        boundaries: Range<usize>,
        budget: usize,
    ) -> Result<Matched, AttackError> {
        let mut cache = self.head.new_cache();
        let mut whole_cache = self.whole.new_cache();
        let mut predicted: Vec<u32> = Vec::new();
        let mut matched = Matched::default();
        let deepest = boundaries.end - 1;
        for (position, observed) in up.iter().enumerate() {
            let observed = match &matched.mode {
                Mode::Permuted(inverse) => observed.index_select(inverse, 0)?,
                Mode::Unknown | Mode::Plain => observed.clone(),
            };
            let values = observed.to_vec1::<f32>()?;
            let lens = self
                .tail
                .logits(&observed.unsqueeze(0)?)?
                .to_vec1::<f32>()?;
            let direct_only = !matches!(matched.mode, Mode::Unknown);
            let ranking = interleave(&[
                std::mem::take(&mut predicted),
                self.rank(&values, boundaries.clone(), direct_only)?,
                self.rank(&values, 0..1, direct_only)?,
                descending(&lens),
            ]);
            matched.lens.push(match matched.mode {
                Mode::Plain => descending(&lens)[0],
                Mode::Unknown | Mode::Permuted(_) => {
                    let nearest = self.tables[0].distances(&values, true)?;
                    nearest.argmin(0)?.to_scalar::<u32>()?
                }
            });
            let mut best = Candidate::none();
            let budget = budget.clamp(1, ranking.len());
            let mut tried = 0;
            while tried < budget && !best.matches() {
                let size = if tried == 0 { FIRST_CHUNK } else { CHUNK };
                let chunk = &ranking[tried..(tried + size).min(budget)];
                tried += chunk.len();
                let rows = self.head.embed(chunk)?;
                let outputs = if deepest == 0 {
                    Vec::new()
                } else {
                    self.head
                        .forward_alternatives(&rows, position, 0..deepest, &cache)?
                };
                for k in boundaries.clone() {
                    let at_k = if k == 0 { &rows } else { &outputs[k - 1] };
                    for (i, candidate) in at_k.to_vec2::<f32>()?.into_iter().enumerate() {
                        best.consider(chunk[i], candidate, &values, direct_only);
                    }
                }
            }
            tracing::debug!(
                position,
                tried,
                distance = best.distance,
                runner_up = best.runner_up,
                "matched"
            );
            if best.matches() {
                matched.exact += 1;
                if matches!(matched.mode, Mode::Unknown) {
                    matched.mode = if best.sorted {
                        Mode::Permuted(recover_permutation(&best.row, &values, observed.device())?)
                    } else {
                        Mode::Plain
                    };
                }
            }
            matched.tokens.push(best.token);
            let row = self.head.embed(&[best.token])?;
            self.head.forward(&row, position, &mut cache)?;
            if position + 1 < up.len() {
                let out = self.whole.forward(&row, position, &mut whole_cache)?;
                predicted = descending(&self.whole.logits(&out)?.to_vec1::<f32>()?);
            }
        }
        Ok(matched)
    }

    /// Candidate tokens for `values`, nearest first: by the distance to each token's table
    /// row at the boundaries tried (and, unless `direct_only`, on sorted values too).
    fn rank(
        &self,
        values: &[f32],
        boundaries: Range<usize>,
        direct_only: bool,
    ) -> Result<Vec<u32>, AttackError> {
        let mut nearest: Option<Tensor> = None;
        for k in boundaries {
            let table = &self.tables[k];
            let mut distances = table.distances(values, false)?;
            if !direct_only {
                distances = distances.minimum(&table.distances(values, true)?)?;
            }
            nearest = Some(match nearest {
                Some(n) => n.minimum(&distances)?,
                None => distances,
            });
        }
        let nearest = nearest.expect("at least one boundary").to_vec1::<f32>()?;
        let mut order: Vec<u32> = (0..nearest.len() as u32).collect();
        order.sort_by(|&a, &b| nearest[a as usize].total_cmp(&nearest[b as usize]));
        Ok(order)
    }
}

/// Whether the rows are permuted, as far as matching has found out.
#[derive(Default)]
enum Mode {
    /// No row matched yet.
    #[default]
    Unknown,
    /// A row matched as is: the rows travel unpermuted.
    Plain,
    /// A row matched only on sorted values; the inverse permutation recovered from it.
    Permuted(Tensor),
}

/// What vocabulary matching found.
#[derive(Default)]
struct Matched {
    tokens: Vec<u32>,
    lens: Vec<u32>,
    exact: usize,
    mode: Mode,
}

/// The best candidate so far at one position.
struct Candidate {
    token: u32,
    distance: f32,
    /// The best distance of any other token tried.
    runner_up: f32,
    sorted: bool,
    row: Vec<f32>,
}

impl Candidate {
    fn none() -> Self {
        Self {
            token: 0,
            distance: f32::INFINITY,
            runner_up: f32::INFINITY,
            sorted: false,
            row: Vec::new(),
        }
    }

    /// Keeps `row` (the candidate `token`'s hidden state) if it is closer to `observed` than
    /// the best so far: as is, or (unless `direct_only`) on sorted values.
    fn consider(&mut self, token: u32, row: Vec<f32>, observed: &[f32], direct_only: bool) {
        let direct = relative_distance(&row, observed);
        let (distance, sorted) = if direct_only || direct < LOOSE_TOLERANCE {
            (direct, false)
        } else {
            let mut a = row.clone();
            let mut b = observed.to_vec();
            a.sort_by(f32::total_cmp);
            b.sort_by(f32::total_cmp);
            let on_sorted = relative_distance(&a, &b);
            if on_sorted < direct {
                (on_sorted, true)
            } else {
                (direct, false)
            }
        };
        if distance < self.distance {
            let runner_up = if token == self.token {
                self.runner_up
            } else {
                self.distance.min(self.runner_up)
            };
            *self = Self {
                token,
                distance,
                runner_up,
                sorted,
                row,
            };
        } else if token != self.token && distance < self.runner_up {
            self.runner_up = distance;
        }
    }
}

impl Candidate {
    /// Whether the best candidate is the observed row: within [`MATCH_TOLERANCE`], or within
    /// [`LOOSE_TOLERANCE`] and clearly nearer than every other token tried.
    fn matches(&self) -> bool {
        self.distance < MATCH_TOLERANCE
            || (self.distance < LOOSE_TOLERANCE
                && self.runner_up.is_finite()
                && self.runner_up > SEPARATION * self.distance)
    }
}

/// `|a - b| / |b|`.
fn relative_distance(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(f32::MIN_POSITIVE)).sqrt()
}

/// The inverse permutation that puts the observed (permuted) row back in the order of
/// `row`, its unpermuted match: the i-th smallest value of each goes to the same place.
fn recover_permutation(
    row: &[f32],
    observed: &[f32],
    device: &Device,
) -> Result<Tensor, AttackError> {
    let order = |values: &[f32]| {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        order
    };
    let (by_row, by_observed) = (order(row), order(observed));
    let mut inverse = vec![0u32; row.len()];
    for (&r, &o) in by_row.iter().zip(&by_observed) {
        inverse[r] = o as u32;
    }
    Ok(Tensor::new(inverse, device)?)
}

/// The first row seen of each position going `way`, in position order; a position's first
/// row is the one its own step sent (later ones are catch-up copies at other layers).
fn first_rows(
    messages: &[CapturedMessage],
    way: Way,
    device: &Device,
) -> Result<Vec<Tensor>, AttackError> {
    let mut rows: Vec<Tensor> = Vec::new();
    for message in messages.iter().filter(|m| m.direction == way) {
        let r = &message.rows;
        if r.start + r.rows <= rows.len() {
            continue;
        }
        if r.start > rows.len() {
            return Err(AttackError::Capture(format!(
                "a {way:?} message starts at position {} but positions up to {} never crossed",
                r.start,
                rows.len()
            )));
        }
        let decoded = r.decode(device)?;
        for p in rows.len()..r.start + r.rows {
            rows.push(decoded.get(p - r.start)?);
        }
    }
    Ok(rows)
}

/// The orders merged round-robin, each token once.
fn interleave(orders: &[Vec<u32>]) -> Vec<u32> {
    let len = orders.iter().map(Vec::len).max().unwrap_or(0);
    let mut seen = vec![false; len];
    let mut merged = Vec::with_capacity(len);
    for i in 0..len {
        for order in orders {
            if let Some(&t) = order.get(i)
                && !std::mem::replace(&mut seen[t as usize], true)
            {
                merged.push(t);
            }
        }
    }
    merged
}

/// Token ids by descending score.
fn descending(scores: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
    order
}

/// The most likely token of `logits` and its probability.
fn most_likely(logits: &[f32]) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let best = logits
        .iter()
        .enumerate()
        .fold(0, |best, (i, l)| if *l > logits[best] { i } else { best });
    (best as u32, 1.0 / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_is_recovered_from_one_matched_row() -> Result<(), AttackError> {
        let row = [0.5f32, -1.0, 2.0, 0.25];
        let observed = [2.0f32, 0.25, 0.5, -1.0];
        let inverse = recover_permutation(&row, &observed, &Device::Cpu)?;
        let back = Tensor::new(&observed, &Device::Cpu)?.index_select(&inverse, 0)?;
        assert_eq!(back.to_vec1::<f32>()?, row);
        Ok(())
    }

    #[test]
    fn scores_count_exact_tokens_in_place() {
        let recovery = Recovery {
            replay_next: vec![5, 6, 7, 9],
            replay_k2: vec![28; 4],
            matching: vec![1, 5, 6, 7],
            exact_matches: 4,
            lens: vec![0, 5, 0, 0],
            permutation_recovered: false,
        };
        let s = recovery.score(&[1, 5, 6], &[7, 9]);
        assert_eq!((s.matching.prompt, s.matching.generated), (3, 1));
        assert_eq!((s.replay.prompt, s.replay.generated), (2, 2));
        assert_eq!((s.lens.prompt, s.lens.generated), (1, 0));
        assert_eq!(s.matching.generated_total, 2);
        assert!((s.replay.prompt_percent() - 66.666).abs() < 0.01);
    }

    #[test]
    fn a_loose_match_needs_a_clear_runner_up() {
        let observed = [1.0f32, 0.0, 0.0, 0.0];
        let mut best = Candidate::none();
        // The true token, off by deep-boundary rounding (relative distance 0.015).
        best.consider(7, vec![1.0, 0.015, 0.0, 0.0], &observed, true);
        assert!(!best.matches(), "no other token tried yet");
        best.consider(9, vec![1.0, 0.4, 0.0, 0.0], &observed, true);
        assert_eq!(best.token, 7);
        assert!(best.matches(), "0.015 against a runner-up at 0.4");
        // The same token again does not count as its own runner-up.
        best.consider(7, vec![1.0, 0.016, 0.0, 0.0], &observed, true);
        assert!((best.runner_up - 0.4).abs() < 1e-6);
        // Another token nearly as close: no longer a clear match.
        best.consider(11, vec![1.0, 0.03, 0.0, 0.0], &observed, true);
        assert!(!best.matches(), "0.015 against a runner-up at 0.03");
        // Within the strict tolerance a match needs no runner-up.
        best.consider(12, vec![1.0, 0.005, 0.0, 0.0], &observed, true);
        assert_eq!(best.token, 12);
        assert!(best.matches());
    }

    #[test]
    fn distances_and_likelihoods() {
        assert_eq!(relative_distance(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_distance(&[0.0, 0.0], &[3.0, 4.0]) - 1.0).abs() < 1e-6);
        let (token, p) = most_likely(&[0.0, 2.0f32.ln(), 0.0]);
        assert_eq!(token, 1);
        assert!((p - 0.5).abs() < 1e-6);
        assert_eq!(descending(&[0.1, 0.3, 0.2]), vec![1, 2, 0]);
    }
}
