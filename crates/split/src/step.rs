//! Both ends of one step of a split session: split points drawn per step from the session
//! secret, KV catch-up between parts, tags that turn any disagreement into an error, and the
//! optional permutation of the hidden dimension on the wire.
//!
//! Every split session runs this one path. A fixed split is the policy with one draw: it never
//! catches up and never keeps rows past its step, so it costs what a bare forward pass costs
//! plus two tags. Each session gets fresh [`SessionKeys`], fixed or random, so tags, capture
//! and protocol are the same for both, and a fixed session's tags still catch a device and a
//! trunk that disagree on the step or the rows.
//!
//! Each step `s` draws `(k1, k2)`. The head runs layers `[0, k1)`, the trunk `[k1, k2)`, the
//! tail `[k2, L)`. A part that is given a layer it skipped at earlier steps first catches it up
//! (see [`crate::staged`]). The uplink carries the rows at layer `k1` from the first position the
//! trunk has not run `k1` at (catch-up rows, then the step's own); the downlink carries the rows
//! at layer `k2` from the first position the tail has not run `k2` at. Both ends know those
//! positions from the draws, check them, and check each message's tag.
//!
//! A new kind of step (several tokens checked at once, a backward pass) is a new pair of
//! methods here: [`DeviceState`] builds and reads the messages, [`TrunkState`] answers them in
//! the same three stages the server's engine drives (prepare, layers, finish).

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use lsplit_model::{KvCache, ModelPart};
use lsplit_wire::Codec;

use crate::noise::NoiseStream;
use crate::policy::{Direction, Draw, Schedule};
use crate::sampler::argmax;
use crate::staged::{Incoming, StageError, StagedPart};
use crate::{SessionKeys, SplitError, StepRows, Trunk, TrunkError};

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

    /// Forgets every position from `len` on, as the part itself does on a rewind.
    fn truncate(&mut self, len: usize) {
        self.lens.iter_mut().for_each(|l| *l = (*l).min(len));
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

fn candle(error: candle_core::Error) -> TrunkError {
    TrunkError::Model(error.into())
}

/// The trunk's side of a split session, shared by the in-process trunk and the trunk server.
///
/// [`TrunkState::step`] answers one message. The server's engine runs the same step in three
/// stages so that steps of many sessions can share their layers' products:
/// [`TrunkState::prepare`] (checks, tag, decode, catch-up), the drawn layers (alone with
/// [`TrunkState::compute`], or in a batch through [`TrunkState::batch_input`]), then
/// [`TrunkState::finish`] or [`TrunkState::finish_batched`] (the rows the tail needs,
/// disguised, encoded and tagged).
pub struct TrunkState {
    part: StagedPart,
    schedule: Schedule,
    next_step: u64,
    tail: Mirror,
}

impl std::fmt::Debug for TrunkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrunkState")
            .field("policy", self.schedule.policy())
            .field("next_step", &self.next_step)
            .finish()
    }
}

/// A step whose message passed its checks and whose catch-up ran: its own rows wait for the
/// drawn layers.
#[derive(Debug)]
pub struct PreparedStep {
    step: u64,
    draw: Draw,
    /// Where the step's own rows start.
    position: usize,
    /// The step's own rows at layer `draw.k1`.
    input: Tensor,
    codec: Codec,
}

impl TrunkState {
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
        let schedule =
            Schedule::new(keys, part.config().hidden_size, part.device()).map_err(candle)?;
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

    /// Where the next step's uplink rows must start when it rewinds `rewind` positions: the
    /// first position the trunk has not run that step's K1 at (the session's position after
    /// the rewind, unless the trunk catches up). `None` when the session holds fewer positions
    /// than the rewind.
    pub fn expected_start(&self, rewind: usize) -> Option<usize> {
        let draw = self.schedule.draw(self.next_step);
        let position = self.part.position();
        let keep = position.checked_sub(rewind)?;
        Some(self.part.layer_len(draw.k1, position).min(keep))
    }

    /// Positions the session holds.
    pub fn position(&self) -> usize {
        self.part.position()
    }

    /// Bytes held by this session's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.part.cache().bytes()
    }

    /// Runs one step: checks the message against this session's draw, catches up, runs the
    /// drawn layers and answers with the rows the tail needs.
    pub fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let prepared = self.prepare(message)?;
        self.compute(&prepared)?;
        self.finish(prepared)
    }

    /// The first stage of [`TrunkState::step`]: checks the message's step, tag and rows,
    /// decodes and reveals them, and catches up the drawn layers.
    pub fn prepare(&mut self, message: &StepRows) -> Result<PreparedStep, TrunkError> {
        let step = message.step;
        if step != self.next_step {
            return Err(TrunkError::Desync(format!(
                "the trunk expects step {} but the message is for step {step}",
                self.next_step
            )));
        }
        let rows = &message.rows;
        if !self
            .schedule
            .verify(Direction::Up, step, message.rewind, rows, &message.tag)
        {
            return Err(TrunkError::Desync(tag_mismatch("uplink", step)));
        }
        if message.rewind > 0 {
            self.rewind(step, message.rewind)?;
        }
        let draw = self.schedule.draw(step);
        let position = self.part.position();
        let from = self.part.layer_len(draw.k1, position);
        if rows.start != from || rows.end() <= position {
            return Err(TrunkError::Desync(format!(
                "step {step} sends rows {}..{} but the trunk needs rows from {from} past {position}",
                rows.start,
                rows.end()
            )));
        }
        let hidden = self
            .schedule
            .reveal(&rows.decode(self.part.part().device())?)
            .map_err(candle)?;
        let input = hidden
            .narrow(0, position - rows.start, rows.end() - position)
            .map_err(candle)?;
        let incoming = Incoming {
            layer: draw.k1,
            from: rows.start,
            rows: &hidden,
        };
        self.part
            .begin(position, &input, draw.k1..draw.k2, Some(incoming))?;
        Ok(PreparedStep {
            step,
            draw,
            position,
            input,
            codec: rows.codec,
        })
    }

    /// Forgets the last `rewind` positions (drafted tokens the device rejected), on the trunk
    /// and in what it knows of the tail, before step `step` runs.
    fn rewind(&mut self, step: u64, rewind: usize) -> Result<(), TrunkError> {
        let position = self.part.position();
        let keep = position.checked_sub(rewind).ok_or_else(|| {
            TrunkError::Desync(format!(
                "step {step} rewinds {rewind} positions but the session holds {position}"
            ))
        })?;
        self.part.truncate(keep)?;
        self.tail.truncate(keep);
        Ok(())
    }

    /// True when a prepared step's drawn layers are the whole trunk part in one run, so
    /// [`ModelPart::forward_batch`] may run it with other sessions' steps
    /// ([`TrunkState::batch_input`]); otherwise it runs alone ([`TrunkState::compute`]).
    pub fn batchable(&self, prepared: &PreparedStep) -> bool {
        self.part.runs_whole(prepared.draw.k1..prepared.draw.k2)
    }

    /// The rows, position and KV cache of a [`TrunkState::batchable`] step, for
    /// [`ModelPart::forward_batch`].
    pub fn batch_input<'a>(
        &'a mut self,
        prepared: &'a PreparedStep,
    ) -> (&'a Tensor, usize, &'a mut KvCache) {
        (&prepared.input, prepared.position, self.part.cache_mut())
    }

    /// The last stage of a step whose layers ran in a batch ([`TrunkState::batch_input`]):
    /// records their `output`, then [`TrunkState::finish`].
    pub fn finish_batched(
        &mut self,
        prepared: PreparedStep,
        output: Tensor,
    ) -> Result<StepRows, TrunkError> {
        let draw = prepared.draw;
        self.part
            .ran_whole(&prepared.input, &output, draw.k1..draw.k2);
        self.finish(prepared)
    }

    /// Runs the drawn layers over a prepared step's rows on their own; the part keeps what
    /// [`TrunkState::finish`] sends.
    pub fn compute(&mut self, prepared: &PreparedStep) -> Result<(), TrunkError> {
        let draw = prepared.draw;
        self.part
            .run_last(prepared.input.clone(), draw.k1..draw.k2)?;
        Ok(())
    }

    /// The last stage of [`TrunkState::step`], after [`TrunkState::compute`]: answers with the
    /// rows the tail needs.
    pub fn finish(&mut self, prepared: PreparedStep) -> Result<StepRows, TrunkError> {
        let PreparedStep {
            step,
            draw,
            position,
            input,
            codec,
        } = prepared;
        let end = position + input.dims()[0];
        let from = self.tail.len(draw.k2, position);
        let reply = self.part.rows_at(draw.k2, from)?;
        self.tail.ran(draw.k2..self.schedule.policy().layers(), end);
        let tail = &self.tail;
        self.part.prune(|layer| tail.len(layer, end));
        let wire = self.schedule.disguise(&reply).map_err(candle)?;
        let rows = codec.encode(&wire, from)?;
        let tag = self.schedule.tag(Direction::Down, step, 0, &rows);
        self.next_step += 1;
        Ok(StepRows {
            step,
            rows,
            rewind: 0,
            tag,
        })
    }
}

/// What one step sent and received, for the session's stats and capture.
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

/// The device's side of a split session: head and tail, the trunk it talks to, and what it
/// knows of the trunk's caches.
pub(crate) struct DeviceState {
    head: StagedPart,
    tail: StagedPart,
    pub(crate) trunk: Box<dyn Trunk>,
    schedule: Schedule,
    next_step: u64,
    trunk_mirror: Mirror,
    trunk_layer_rows: u64,
    /// Positions the trunk must forget before the next step.
    rewind: usize,
    /// The noise added to the uplink rows before they are disguised and encoded.
    noise: Option<NoiseStream>,
}

impl DeviceState {
    pub(crate) fn new(
        head: Arc<ModelPart>,
        tail: Arc<ModelPart>,
        trunk: Box<dyn Trunk>,
        keys: &SessionKeys,
        noise: Option<NoiseStream>,
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
            rewind: 0,
            noise,
        })
    }

    /// Forgets positions `to..from` (drafted tokens that were rejected) in head and tail now,
    /// and on the trunk with the next step's message.
    pub(crate) fn rewind(&mut self, from: usize, to: usize) -> Result<(), SplitError> {
        self.head.truncate(to)?;
        self.tail.truncate(to)?;
        self.trunk_mirror.truncate(to);
        self.rewind += from - to;
        Ok(())
    }

    /// Early exit: up to `count` tokens drafted greedily after `next` (the token at position
    /// `start`, not yet run) by the head's output going straight into the tail, skipping the
    /// trunk. It runs the head's layers and the tail's that hold every position before
    /// `start`, then forgets the drafted positions in both caches, which end as they began.
    pub(crate) fn draft_early_exit(
        &mut self,
        next: u32,
        start: usize,
        count: usize,
    ) -> Result<Vec<u32>, SplitError> {
        let layers = self.schedule.policy().layers();
        let held = |part: &StagedPart, layer: usize| part.layer_len(layer, start) == start;
        let head_end = self.head.part().spec().layers.end;
        let exit = (0..head_end)
            .find(|&j| !held(&self.head, j))
            .unwrap_or(head_end);
        let tail_start = self.tail.part().spec().layers.start;
        let entry = (tail_start..layers)
            .rev()
            .find(|&j| !held(&self.tail, j))
            .map_or(tail_start, |j| j + 1);
        let drafted = self.exit_early(next, start, count, 0..exit, entry..layers);
        self.head.cache_mut().truncate(start);
        self.tail.cache_mut().truncate(start);
        drafted
    }

    /// The greedy chain of [`DeviceState::draft_early_exit`] through the head's layers `head`
    /// and the tail's layers `tail`, leaving the drafted positions in both caches.
    fn exit_early(
        &mut self,
        mut token: u32,
        start: usize,
        count: usize,
        head: std::ops::Range<usize>,
        tail: std::ops::Range<usize>,
    ) -> Result<Vec<u32>, SplitError> {
        let mut drafted = Vec::with_capacity(count);
        for position in start..start + count {
            let x = self.head.part().embed(&[token])?;
            let x = self.head.run_draft(&x, position, head.clone())?;
            let x = self.tail.run_draft(&x, position, tail.clone())?;
            token = argmax(&self.tail.part().logits(&x)?.to_vec1::<f32>()?);
            drafted.push(token);
        }
        Ok(drafted)
    }

    /// Rows times layers run by head, trunk and tail together, catch-ups included.
    pub(crate) fn layer_rows(&self) -> u64 {
        self.head.layer_rows() + self.trunk_layer_rows + self.tail.layer_rows()
    }

    /// One step: head, uplink, trunk, downlink, tail. Returns the logits after every token
    /// with `every_row`, else after the last one only.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        codec: Codec,
        every_row: bool,
        exchanged: &mut dyn FnMut(&Exchange) -> Result<(), SplitError>,
    ) -> Result<Vec<Vec<f32>>, SplitError> {
        let t = Instant::now();
        let step = self.next_step;
        let draw = self.schedule.draw(step);
        let count = tokens.len();
        let end = start + count;
        let embedded = self.head.part().embed(tokens)?;
        self.head.step(start, embedded, 0..draw.k1, None)?;
        let from = self.trunk_mirror.len(draw.k1, start);
        let mut sent = self.head.rows_at(draw.k1, from)?;
        if let Some(noise) = &mut self.noise {
            sent = noise.apply(&sent)?;
        }
        let up_rows = codec.encode(&self.schedule.disguise(&sent)?, from)?;
        let rewind = std::mem::take(&mut self.rewind);
        let up = StepRows {
            step,
            rewind,
            tag: self.schedule.tag(Direction::Up, step, rewind, &up_rows),
            rows: up_rows,
        };
        let head_time = t.elapsed();
        let t = Instant::now();
        let down = self.trunk.step(&up)?;
        self.next_step += 1;
        let trunk_time = t.elapsed();
        let t = Instant::now();

        let expected_from = self.tail.layer_len(draw.k2, start);
        if down.step != step
            || down.rewind != 0
            || !self
                .schedule
                .verify(Direction::Down, step, 0, &down.rows, &down.tag)
        {
            return Err(SplitError::Desync(tag_mismatch("downlink", step)));
        }
        let rows = &down.rows;
        if rows.start != expected_from || rows.end() != end || rows.codec != codec {
            return Err(SplitError::Desync(format!(
                "the downlink of step {step} holds {} rows {}..{} but the tail needs {codec} rows \
                 {expected_from}..{end}",
                rows.codec,
                rows.start,
                rows.end()
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
        let tail = self.tail.part();
        let logits = if every_row {
            tail.row_logits(&out)?.to_vec2::<f32>()?
        } else {
            vec![tail.logits(&out)?.to_vec1::<f32>()?]
        };
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
