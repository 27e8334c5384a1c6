//! One part of a keyed session: it runs a different range of its layers at each step and
//! catches up the layers it skipped before it runs them again.
//!
//! A layer's KV cache must hold every earlier position before the layer runs a new one. When a
//! step draws split points that give a part a layer another part ran at earlier steps, the part
//! first runs that layer over the rows it missed, step by step (same rows, same positions, same
//! shapes as the first time, so the cache ends up exactly as if it had run them then). The
//! input of such a catch-up is a row the part kept itself (its own boundary output, when it
//! grows towards the middle of the model) or rows its neighbour sent (when it grows away).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use lsplit_model::{KvCache, ModelError, ModelPart};

/// Errors of a keyed part.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StageError {
    /// The layers refused the rows.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The two ends disagree about what was computed where.
    #[error("{0}")]
    Desync(String),
}

/// One step's rows: where they start and how many.
#[derive(Debug)]
struct StepRecord {
    start: usize,
    rows: usize,
    /// The step's rows at each boundary layer the part passed (the input of that layer).
    kept: BTreeMap<usize, Tensor>,
}

/// Rows another part sent for catch-up: hidden states at `layer` for positions `from..`.
pub(crate) struct Incoming<'a> {
    pub(crate) layer: usize,
    pub(crate) from: usize,
    pub(crate) rows: &'a Tensor,
}

/// A part of a keyed session with its KV cache and the rows it keeps for catch-ups.
pub(crate) struct StagedPart {
    part: Arc<ModelPart>,
    cache: KvCache,
    /// Layers at whose input the part keeps the rows of every step: the split points its
    /// neighbour may ask for, or that it may grow from.
    keep_at: Vec<usize>,
    steps: Vec<StepRecord>,
    /// Rows times layers run, catch-ups included.
    layer_rows: u64,
}

impl StagedPart {
    /// A fresh session of `part` that keeps rows at the input of the layers `keep_at`.
    pub(crate) fn new(part: Arc<ModelPart>, keep_at: &[usize]) -> Self {
        let cache = part.new_cache();
        Self {
            part,
            cache,
            keep_at: keep_at.to_vec(),
            steps: Vec::new(),
            layer_rows: 0,
        }
    }

    /// The loaded part.
    pub(crate) fn part(&self) -> &ModelPart {
        &self.part
    }

    /// Runs rows `x` at `position` through `layers` in the cache alone, outside the steps:
    /// a draft, whose positions the caller forgets with `cache_mut().truncate`.
    pub(crate) fn run_draft(
        &mut self,
        x: &Tensor,
        position: usize,
        layers: Range<usize>,
    ) -> Result<Tensor, ModelError> {
        self.part
            .forward_layers(x, position, layers, &mut self.cache)
    }

    /// Rows times layers run so far.
    pub(crate) fn layer_rows(&self) -> u64 {
        self.layer_rows
    }

    /// The position after the last step.
    pub(crate) fn position(&self) -> usize {
        self.steps.last().map_or(0, |s| s.start + s.rows)
    }

    /// Positions layer `layer` (a model layer index) has cached; a layer past the part's end
    /// has nothing to catch up, so it counts as up to date at `position`.
    pub(crate) fn layer_len(&self, layer: usize, position: usize) -> usize {
        let own = &self.part.spec().layers;
        if own.contains(&layer) {
            self.cache.layer_len(layer - own.start)
        } else {
            position
        }
    }

    /// The part's KV cache.
    pub(crate) fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The part's KV cache, for a step its owner runs through the whole part itself.
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Runs a new step of rows `x` starting at `start` through `layers`, after catching up
    /// every layer of `layers` that skipped earlier steps. Returns the rows at `layers.end`.
    pub(crate) fn step(
        &mut self,
        start: usize,
        x: Tensor,
        layers: Range<usize>,
        incoming: Option<Incoming<'_>>,
    ) -> Result<Tensor, StageError> {
        self.begin(start, &x, layers.clone(), incoming)?;
        self.run_last(x, layers)
    }

    /// Starts a new step of rows `x` at `start` that will run `layers`: checks its position
    /// and catches up every layer of `layers` that skipped earlier steps.
    pub(crate) fn begin(
        &mut self,
        start: usize,
        x: &Tensor,
        layers: Range<usize>,
        incoming: Option<Incoming<'_>>,
    ) -> Result<(), StageError> {
        if start != self.position() {
            return Err(StageError::Desync(format!(
                "a step starts at position {start} but the {} part is at {}",
                self.part.spec().kind.name(),
                self.position()
            )));
        }
        self.catch_up(&layers, incoming.as_ref())?;
        self.steps.push(StepRecord {
            start,
            rows: x.dims()[0],
            kept: BTreeMap::new(),
        });
        Ok(())
    }

    /// Runs the rows `x` of the step begun last through `layers`.
    pub(crate) fn run_last(
        &mut self,
        x: Tensor,
        layers: Range<usize>,
    ) -> Result<Tensor, StageError> {
        self.run(self.steps.len() - 1, x, layers)
    }

    /// True when `layers` are all of the part's and keep no rows inside: the step begun last
    /// may run them as one [`ModelPart::forward`] (or in a batch), then [`StagedPart::ran_whole`].
    pub(crate) fn runs_whole(&self, layers: Range<usize>) -> bool {
        layers == self.part.spec().layers
            && !self
                .keep_at
                .iter()
                .any(|&k| k > layers.start && k < layers.end)
    }

    /// Records that the step begun last ran `layers` (see [`StagedPart::runs_whole`]) from
    /// `input` to `output`, keeping its rows where [`StagedPart::run`] would have.
    pub(crate) fn ran_whole(&mut self, input: &Tensor, output: &Tensor, layers: Range<usize>) {
        let Some(step) = self.steps.last_mut() else {
            return;
        };
        for (layer, rows) in [(layers.start, input), (layers.end, output)] {
            if self.keep_at.contains(&layer) {
                step.kept.insert(layer, rows.clone());
            }
        }
        self.layer_rows += (step.rows * layers.len()) as u64;
    }

    /// Runs, step after step, the layers of `layers` that each earlier step skipped.
    fn catch_up(
        &mut self,
        layers: &Range<usize>,
        incoming: Option<&Incoming<'_>>,
    ) -> Result<(), StageError> {
        for index in 0..self.steps.len() {
            let (start, rows) = (self.steps[index].start, self.steps[index].rows);
            let missing: Vec<usize> = layers
                .clone()
                .filter(|&j| self.layer_len(j, start) <= start)
                .collect();
            for run in contiguous(&missing) {
                let input = match self.steps[index].kept.get(&run.start) {
                    Some(kept) => kept.clone(),
                    None => match incoming {
                        Some(i) if i.layer == run.start && i.from <= start => {
                            let offset = start - i.from;
                            if offset + rows > i.rows.dims()[0] {
                                return Err(self.missing_rows(run.start, start));
                            }
                            i.rows.narrow(0, offset, rows)?
                        }
                        _ => return Err(self.missing_rows(run.start, start)),
                    },
                };
                self.run(index, input, run)?;
            }
        }
        Ok(())
    }

    fn missing_rows(&self, layer: usize, position: usize) -> StageError {
        StageError::Desync(format!(
            "the {} part must catch up layer {layer} at position {position} but has no rows for it",
            self.part.spec().kind.name()
        ))
    }

    /// Runs the rows of step `index` through `layers`, keeping them at each boundary layer.
    fn run(
        &mut self,
        index: usize,
        mut x: Tensor,
        layers: Range<usize>,
    ) -> Result<Tensor, StageError> {
        let start = self.steps[index].start;
        let rows = self.steps[index].rows;
        let mut from = layers.start;
        loop {
            if self.keep_at.contains(&from) {
                self.steps[index].kept.insert(from, x.clone());
            }
            if from == layers.end {
                return Ok(x);
            }
            let to = self
                .keep_at
                .iter()
                .copied()
                .find(|&k| k > from && k < layers.end)
                .unwrap_or(layers.end);
            x = self
                .part
                .forward_layers(&x, start, from..to, &mut self.cache)?;
            self.layer_rows += (rows * (to - from)) as u64;
            from = to;
        }
    }

    /// The kept rows at `layer` of every step from position `from` on (this step's included),
    /// as one tensor: what the neighbour needs to catch up and run `layer`.
    pub(crate) fn rows_at(&self, layer: usize, from: usize) -> Result<Tensor, StageError> {
        let mut parts = Vec::new();
        let mut next = from;
        for step in self.steps.iter().filter(|s| s.start + s.rows > from) {
            if step.start != next {
                return Err(StageError::Desync(format!(
                    "position {from} is not where a step of the {} part starts",
                    self.part.spec().kind.name()
                )));
            }
            let rows = step
                .kept
                .get(&layer)
                .ok_or_else(|| self.missing_rows(layer, step.start))?;
            parts.push(rows.clone());
            next += step.rows;
        }
        if parts.is_empty() {
            return Err(self.missing_rows(layer, from));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Forgets every position from `len` on, in the cache and in the rows kept for
    /// neighbours: the rejected tokens of a multi-token step, so that the next step starts at
    /// `len` as if they had never run.
    pub(crate) fn truncate(&mut self, len: usize) -> Result<(), StageError> {
        self.steps.retain(|s| s.start < len);
        if let Some(last) = self.steps.last_mut()
            && last.start + last.rows > len
        {
            last.rows = len - last.start;
            for rows in last.kept.values_mut() {
                *rows = rows.narrow(0, 0, last.rows)?;
            }
        }
        self.cache.truncate(len);
        Ok(())
    }

    /// Drops kept rows no one can need any more: those the neighbour already ran (its layer
    /// holds their positions, per `neighbour_len`), unless the part may still grow from them.
    pub(crate) fn prune(&mut self, neighbour_len: impl Fn(usize) -> usize) {
        let end = self.part.spec().layers.end;
        for step in &mut self.steps {
            let top = step.kept.keys().next_back().copied();
            step.kept.retain(|&layer, _| {
                neighbour_len(layer) <= step.start || (Some(layer) == top && layer < end)
            });
        }
    }
}

/// The maximal runs of consecutive values in ascending `values`.
fn contiguous(values: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &v in values {
        match runs.last_mut() {
            Some(run) if run.end == v => run.end = v + 1,
            _ => runs.push(v..v + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_consecutive_layers() {
        assert_eq!(contiguous(&[]), Vec::<Range<usize>>::new());
        assert_eq!(contiguous(&[1, 2, 3, 7, 8, 10]), vec![1..4, 7..9, 10..11]);
    }
}
