//! Both ends of a keyed session: split points drawn per step from the session secret, KV
//! catch-up between parts, tags that turn any disagreement into an error, and the optional
//! permutation of the hidden dimension on the wire.
//!
//! Each step `s` draws `(k1, k2)`. The head runs layers `[0, k1)`, the trunk `[k1, k2)`, the
//! tail `[k2, L)`. A part that is given a layer it skipped at earlier steps first catches it up
//! (see [`crate::staged`]). The uplink carries the rows at layer `k1` from the first position the
//! trunk has not run `k1` at (catch-up rows, then the step's own); the downlink carries the rows
//! at layer `k2` from the first position the tail has not run `k2` at. Both ends know those
//! positions from the draws, check them, and check each message's tag.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use lsplit_model::ModelPart;
use lsplit_wire::Codec;

use crate::policy::{Direction, Schedule};
use crate::staged::{Incoming, StageError, StagedPart};
use crate::{SessionKeys, SplitError, StepRows, TrunkError};

impl From<StageError> for TrunkError {
    fn from(error: StageError) -> Self {
        match error {
            StageError::Model(e) => TrunkError::Model(e),
            StageError::Candle(e) => TrunkError::Model(e.into()),
            StageError::Desync(message) => TrunkError::Desync(message),
        }
    }
}

impl From<StageError> for SplitError {
    fn from(error: StageError) -> Self {
        match error {
            StageError::Model(e) => SplitError::Model(e),
            StageError::Candle(e) => SplitError::Candle(e),
            StageError::Desync(message) => SplitError::Desync(message),
        }
    }
}

/// Positions each layer of a neighbouring part has cached, known from the draws alone.
struct Mirror {
    first: usize,
    lens: Vec<usize>,
}

impl Mirror {
    fn new(layers: std::ops::Range<usize>) -> Self {
        Self {
            first: layers.start,
            lens: vec![0; layers.len()],
        }
    }

    /// Positions `layer` holds; a layer outside the part has nothing to catch up.
    fn len(&self, layer: usize, position: usize) -> usize {
        layer
            .checked_sub(self.first)
            .and_then(|i| self.lens.get(i))
            .copied()
            .unwrap_or(position)
    }

    /// Records that `layers` ran up to position `end`; returns the rows times layers that took.
    fn ran(&mut self, layers: std::ops::Range<usize>, end: usize) -> u64 {
        let mut work = 0;
        for layer in layers {
            if let Some(len) = self.lens.get_mut(layer - self.first) {
                work += (end - *len) as u64;
                *len = end;
            }
        }
        work
    }
}

fn tag_mismatch(direction: &str, step: u64) -> String {
    format!(
        "the {direction} message of step {step} does not carry this session's tag: the two ends \
         do not share the session secret, or disagree on the step's split points or rows"
    )
}

/// The trunk's side of a keyed session, shared by the in-process trunk and the trunk server.
pub struct KeyedTrunk {
    part: StagedPart,
    schedule: Schedule,
    next_step: u64,
    tail: Mirror,
}

impl std::fmt::Debug for KeyedTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedTrunk")
            .field("policy", self.schedule.policy())
            .field("next_step", &self.next_step)
            .finish()
    }
}

impl KeyedTrunk {
    /// A session over `part`, which must hold every layer the policy of `keys` may give the
    /// trunk.
    pub fn new(part: Arc<ModelPart>, keys: &SessionKeys) -> Result<Self, TrunkError> {
        let needed = keys.policy.trunk_layers();
        let held = part.spec().layers.clone();
        if needed.start < held.start || needed.end > held.end {
            return Err(TrunkError::Policy(format!(
                "the policy ({}) needs trunk layers {needed:?} but this trunk holds {held:?}",
                keys.policy
            )));
        }
        let schedule = Schedule::new(keys, part.config().hidden_size, part.device())
            .map_err(|e| TrunkError::Model(e.into()))?;
        Ok(Self {
            part: StagedPart::new(part, keys.policy.k2s()),
            schedule,
            next_step: 0,
            tail: Mirror::new(keys.policy.tail_layers()),
        })
    }

    /// The index of the step expected next.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// Rows times layers the trunk ran, catch-ups included.
    pub fn layer_rows(&self) -> u64 {
        self.part.layer_rows()
    }

    /// Runs one step: checks the message against this session's draw, catches up, runs the
    /// drawn layers and answers with the rows the tail needs.
    pub fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let step = message.step;
        if step != self.next_step {
            return Err(TrunkError::Desync(format!(
                "the trunk expects step {} but the message is for step {step}",
                self.next_step
            )));
        }
        let rows = &message.rows;
        if message.tag != self.schedule.tag(Direction::Up, step, rows) {
            return Err(TrunkError::Desync(tag_mismatch("uplink", step)));
        }
        let draw = self.schedule.draw(step);
        let position = self.part.position();
        let from = self.part.layer_len(draw.k1, position);
        if rows.start != from || rows.start + rows.rows <= position {
            return Err(TrunkError::Desync(format!(
                "step {step} sends rows {}..{} but the trunk needs rows from {from} past {position}",
                rows.start,
                rows.start + rows.rows
            )));
        }
        let hidden = self
            .schedule
            .reveal(&rows.decode(self.part.part().device())?)
            .map_err(|e| TrunkError::Model(e.into()))?;
        let count = rows.start + rows.rows - position;
        let current = hidden
            .narrow(0, position - rows.start, count)
            .map_err(|e| TrunkError::Model(e.into()))?;
        let incoming = Incoming {
            layer: draw.k1,
            from: rows.start,
            rows: &hidden,
        };
        self.part
            .step(position, current, draw.k1..draw.k2, Some(incoming))?;
        let end = position + count;
        let from = self.tail.len(draw.k2, position);
        let reply = self.part.rows_at(draw.k2, from)?;
        self.tail.ran(draw.k2..self.schedule.policy().layers(), end);
        let tail = &self.tail;
        self.part.prune(|layer| tail.len(layer, end));
        let wire = self
            .schedule
            .disguise(&reply)
            .map_err(|e| TrunkError::Model(e.into()))?;
        let rows = rows.codec.encode(&wire, from)?;
        let tag = self.schedule.tag(Direction::Down, step, &rows);
        self.next_step += 1;
        Ok(StepRows { step, rows, tag })
    }
}

/// What one keyed step sent and received, for the session's stats and capture.
pub(crate) struct Exchange {
    pub(crate) up: StepRows,
    pub(crate) down: StepRows,
    /// Rows sent up for positions of earlier steps.
    pub(crate) catch_up_up: usize,
    /// Rows received for positions of earlier steps.
    pub(crate) catch_up_down: usize,
    /// Time in the head (catch-up and encoding included), waiting for the trunk, in the tail.
    pub(crate) times: [Duration; 3],
}

/// The device's side of a keyed session: head and tail, the trunk it talks to, and what it
/// knows of the trunk's caches.
pub(crate) struct KeyedDevice {
    head: StagedPart,
    tail: StagedPart,
    pub(crate) trunk: Box<dyn crate::Trunk>,
    schedule: Schedule,
    next_step: u64,
    trunk_mirror: Mirror,
    trunk_layer_rows: u64,
}

impl KeyedDevice {
    pub(crate) fn new(
        head: Arc<ModelPart>,
        tail: Arc<ModelPart>,
        trunk: Box<dyn crate::Trunk>,
        keys: &SessionKeys,
    ) -> Result<Self, SplitError> {
        let schedule = Schedule::new(keys, head.config().hidden_size, head.device())?;
        Ok(Self {
            head: StagedPart::new(head, keys.policy.k1s()),
            tail: StagedPart::new(tail, &[]),
            trunk,
            schedule,
            next_step: 0,
            trunk_mirror: Mirror::new(keys.policy.trunk_layers()),
            trunk_layer_rows: 0,
        })
    }

    /// Rows times layers run by head, trunk and tail together, catch-ups included.
    pub(crate) fn layer_rows(&self) -> u64 {
        self.head.layer_rows() + self.trunk_layer_rows + self.tail.layer_rows()
    }

    /// One step: head, uplink, trunk, downlink, tail. Returns the last row's logits.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        codec: Codec,
        exchanged: &mut dyn FnMut(&Exchange) -> Result<(), SplitError>,
    ) -> Result<Vec<f32>, SplitError> {
        let t = Instant::now();
        let step = self.next_step;
        let draw = self.schedule.draw(step);
        let count = tokens.len();
        let end = start + count;
        let embedded = self.head.part().embed(tokens)?;
        self.head.step(start, embedded, 0..draw.k1, None)?;
        let from = self.trunk_mirror.len(draw.k1, start);
        let up_rows = codec.encode(
            &self.schedule.disguise(&self.head.rows_at(draw.k1, from)?)?,
            from,
        )?;
        let up = StepRows {
            step,
            tag: self.schedule.tag(Direction::Up, step, &up_rows),
            rows: up_rows,
        };
        let head_time = t.elapsed();
        let t = Instant::now();
        let down = self.trunk.step(&up)?;
        self.next_step += 1;
        let trunk_time = t.elapsed();
        let t = Instant::now();

        let expected_from = self.tail.layer_len(draw.k2, start);
        if down.step != step || down.tag != self.schedule.tag(Direction::Down, step, &down.rows) {
            return Err(SplitError::Desync(tag_mismatch("downlink", step)));
        }
        let rows = &down.rows;
        if rows.start != expected_from || rows.start + rows.rows != end || rows.codec != codec {
            return Err(SplitError::Desync(format!(
                "the downlink of step {step} holds {} rows {}..{} but the tail needs {codec} rows \
                 {expected_from}..{end}",
                rows.codec,
                rows.start,
                rows.start + rows.rows
            )));
        }
        let hidden = self
            .schedule
            .reveal(&rows.decode(self.tail.part().device())?)?;
        let current = hidden.narrow(0, start - rows.start, count)?;
        let incoming = Incoming {
            layer: draw.k2,
            from: rows.start,
            rows: &hidden,
        };
        let out: Tensor = self.tail.step(
            start,
            current,
            draw.k2..self.schedule.policy().layers(),
            Some(incoming),
        )?;
        self.trunk_layer_rows += self.trunk_mirror.ran(draw.k1..draw.k2, end);
        let mirror = &self.trunk_mirror;
        self.head.prune(|layer| mirror.len(layer, end));
        let logits = self.tail.part().logits(&out)?.to_vec1::<f32>()?;
        exchanged(&Exchange {
            catch_up_up: up.rows.rows - count,
            catch_up_down: down.rows.rows - count,
            up,
            down,
            times: [head_time, trunk_time, t.elapsed()],
        })?;
        Ok(logits)
    }
}
