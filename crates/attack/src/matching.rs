//! Vocabulary matching: each row inverted to the token that produced it, the nearest of ranked
//! candidate tokens run through the public weights (see the crate doc).

use std::ops::Range;

use candle_core::{Device, Tensor};
use lsplit_model::ModelPart;

use crate::plaintext::Ridge;
use crate::{AttackError, Attacker};

/// Relative L2 distance under which a candidate's row is taken to be the observed row, and
/// trying more candidates stops (an early exit for speed only: the guess is the nearest
/// candidate tried either way, and tests check that trying the whole budget gives the same):
/// above f16/bf16 rounding (about 0.001 and 0.004), far below the distance between different
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

/// Relative distance below which a candidate is compared as is only, never on sorted values:
/// noise of up to half a row's RMS keeps the true row nearer than this, and a permuted row is
/// about √2 away from its unpermuted self.
const PERMUTED_DISTANCE: f32 = 0.8;

/// Every vocabulary token's row at one boundary, as is and sorted within the row.
pub(crate) struct TokenRows {
    rows: Tensor,
    norms: Tensor,
    sorted: Tensor,
    sorted_norms: Tensor,
}

impl TokenRows {
    fn new(rows: Tensor) -> Result<Self, AttackError> {
        let sorted = rows.sort_last_dim(true)?.0;
        Ok(Self {
            norms: rows.sqr()?.sum(1)?,
            sorted_norms: sorted.sqr()?.sum(1)?,
            rows,
            sorted,
        })
    }

    /// Every token's row `(vocab, d)`.
    pub(crate) fn rows(&self) -> &Tensor {
        &self.rows
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

/// Every token's row at each boundary `0..=max_k` of `head` (`[0]` the embeddings), after the
/// token `context`; `progress` is told the tokens done and the total.
pub(crate) fn vocabulary_tables(
    head: &ModelPart,
    vocab: usize,
    max_k: usize,
    context: u32,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<TokenRows>, AttackError> {
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
    per_boundary
        .into_iter()
        .map(|parts| TokenRows::new(Tensor::cat(&parts, 0)?))
        .collect()
}

/// Where vocabulary matching looks for the tokens behind a run of rows.
pub(crate) struct Search<'a> {
    /// The public part whose layers the candidates go through: the head for the uplink, the
    /// whole model for the downlink.
    pub(crate) part: &'a ModelPart,
    /// The boundaries the rows may have left from (more than one when the split is secret).
    pub(crate) boundaries: Range<usize>,
    /// Whether the vocabulary tables rank the candidates (they hold the head's boundaries only).
    pub(crate) tables: bool,
    /// Most candidates tried per position.
    pub(crate) budget: usize,
    /// Whether every candidate of the budget is tried even after one matched (see
    /// [`crate::Options::exhaustive`]).
    pub(crate) exhaustive: bool,
    /// Tokens known at the first positions: taken as they are, not matched.
    pub(crate) known: &'a [u32],
    /// Tokens already recovered at the positions before the rows (the context of a rejected
    /// draft): they go through the caches in one pass, and the rows start after them.
    pub(crate) prefix: &'a [u32],
    /// The pairs of a map learned from the positions seen, to match through it and go on
    /// learning (the known-plaintext attack, see [`Ridge`]; the boundary must then be known);
    /// `None`: plain matching.
    pub(crate) ridge: Option<&'a Ridge>,
}

impl Attacker {
    /// Vocabulary matching over the rows `observed`: at each position the nearest candidate
    /// of those tried wins (the argmin); trying stops early once one [`Candidate::matches`],
    /// unless `search.exhaustive`. `mode` is what is known of the permutation so far.
    pub(crate) fn vocabulary_matching(
        &self,
        rows: &[Tensor],
        search: &Search,
        mode: Mode,
    ) -> Result<Matched, AttackError> {
        let part = search.part;
        let mut cache = part.new_cache();
        let mut whole_cache = self.whole.new_cache();
        let mut predicted: Vec<u32> = Vec::new();
        let start = search.prefix.len();
        if start > 0 {
            let embedded = part.embed(search.prefix)?;
            part.forward(&embedded, 0, &mut cache)?;
            let out = self.whole.forward(&embedded, 0, &mut whole_cache)?;
            predicted = descending(&self.whole.logits(&out)?.to_vec1::<f32>()?);
        }
        let mut ridge = search.ridge.cloned().unwrap_or_default();
        let mut matched = Matched {
            mode,
            ..Matched::default()
        };
        let boundaries = search.boundaries.clone();
        let deepest = boundaries.end - 1;
        for (i, observed) in rows.iter().enumerate() {
            let position = start + i;
            let observed = matched.mode.unpermute(observed)?;
            let raw = search
                .ridge
                .map(|_| observed.to_vec1::<f32>())
                .transpose()?;
            let observed = if search.ridge.is_some() {
                ridge.fit(observed.device())?;
                ridge.map(&observed)?
            } else {
                observed
            };
            let values = observed.to_vec1::<f32>()?;
            let direct_only = !matches!(matched.mode, Mode::Unknown);
            let ranking = match search.known.get(position) {
                Some(&token) => vec![token],
                None => {
                    let mut orders = vec![std::mem::take(&mut predicted)];
                    if search.tables {
                        let lens = self.tail.logits(&observed.unsqueeze(0)?)?;
                        orders.push(self.rank(&values, boundaries.clone(), direct_only)?);
                        orders.push(self.rank(&values, 0..1, direct_only)?);
                        orders.push(descending(&lens.to_vec1::<f32>()?));
                    } else {
                        orders.push((0..self.whole.config().vocab_size as u32).collect());
                    }
                    interleave(&orders)
                }
            };
            let mut best = Candidate::none();
            // The row of the best candidate as the public weights give it (before projection).
            let mut best_public = Vec::new();
            let budget = search.budget.clamp(1, ranking.len());
            let mut tried = 0;
            while tried < budget && (search.exhaustive || !best.matches()) {
                let size = if tried == 0 { FIRST_CHUNK } else { CHUNK };
                let chunk = &ranking[tried..(tried + size).min(budget)];
                tried += chunk.len();
                let embedded = part.embed(chunk)?;
                let outputs = if deepest == 0 {
                    Vec::new()
                } else {
                    part.forward_alternatives(&embedded, position, 0..deepest, &cache)?
                };
                for k in boundaries.clone() {
                    let at_k = if k == 0 { &embedded } else { &outputs[k - 1] };
                    let rows = at_k.to_vec2::<f32>()?;
                    let seen = match search.ridge {
                        Some(_) => ridge.project(at_k)?.to_vec2::<f32>()?,
                        None => rows.clone(),
                    };
                    for (i, candidate) in seen.into_iter().enumerate() {
                        let mut nearer = best.consider(chunk[i], candidate, &values, direct_only);
                        // Through the map or as is, whichever is nearer: the map adds to plain
                        // matching, never takes from it.
                        if let Some(raw) = &raw {
                            nearer |= best.consider(chunk[i], rows[i].clone(), raw, true);
                        }
                        if nearer {
                            best_public = rows[i].clone();
                        }
                    }
                }
            }
            if let Some(raw) = raw {
                ridge.add(raw, std::mem::take(&mut best_public));
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
            let row = part.embed(&[best.token])?;
            part.forward(&row, position, &mut cache)?;
            if i + 1 < rows.len() {
                let out = self.whole.forward(&row, position, &mut whole_cache)?;
                predicted = descending(&self.whole.logits(&out)?.to_vec1::<f32>()?);
            }
        }
        matched.ridge = ridge;
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
#[derive(Default, Clone)]
pub(crate) enum Mode {
    /// No row matched yet.
    #[default]
    Unknown,
    /// A row matched as is: the rows travel unpermuted.
    Plain,
    /// A row matched only on sorted values; the inverse permutation recovered from it.
    Permuted(Tensor),
}

impl Mode {
    /// `row` back in the model's order, as far as the permutation is known.
    pub(crate) fn unpermute(&self, row: &Tensor) -> Result<Tensor, AttackError> {
        Ok(match self {
            Mode::Permuted(inverse) => row.index_select(inverse, 0)?,
            Mode::Unknown | Mode::Plain => row.clone(),
        })
    }
}

/// What vocabulary matching found.
#[derive(Default)]
pub(crate) struct Matched {
    pub(crate) tokens: Vec<u32>,
    pub(crate) exact: usize,
    pub(crate) mode: Mode,
    /// The known-plaintext map's pairs at the end (empty for plain matching): the rejected
    /// drafts' rows are matched through it.
    pub(crate) ridge: Ridge,
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
    /// Returns whether `row` became the best.
    fn consider(&mut self, token: u32, row: Vec<f32>, observed: &[f32], direct_only: bool) -> bool {
        let direct = relative_distance(&row, observed);
        // A row near the candidate as is is read as is: sorting both rows never moves them
        // apart, so with any rounding (f16, bf16, int8) or noise (`--uplink-noise`) sorted
        // values would always look nearer and fake a permutation. A permuted row is about as
        // far from its unpermuted self as from any other row.
        let (distance, sorted) = if direct_only || direct < PERMUTED_DISTANCE {
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
            return true;
        }
        if token != self.token && distance < self.runner_up {
            self.runner_up = distance;
        }
        false
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
    fn distances_and_orders() {
        assert_eq!(relative_distance(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_distance(&[0.0, 0.0], &[3.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(descending(&[0.1, 0.3, 0.2]), vec![1, 2, 0]);
    }
}
