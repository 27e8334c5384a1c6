use std::ops::Range;
use std::sync::Arc;

use lsplit_model::{ModelError, ModelPart};
use lsplit_wire::{HiddenRows, WireError};

use crate::{SessionKeys, TrunkState};

/// Errors a trunk reports back to the device.
#[derive(Debug, thiserror::Error)]
pub enum TrunkError {
    /// The trunk's layers refused the rows (wrong position, shape, context overflow...).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The rows could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The transport to a remote trunk failed.
    #[error("{0}")]
    Transport(String),
    /// Device and trunk disagree on a session's steps: refused, never computed.
    #[error("desync: {0}")]
    Desync(String),
    /// The trunk cannot serve the session's policy.
    #[error("{0}")]
    Policy(String),
}

/// One message of a split session, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRows {
    /// The step's index in the session: 0 for the first forward pass, then one per pass.
    pub step: u64,
    /// Rows at the step's boundary layer (K1 up, K2 down): rows of earlier positions the
    /// receiver must catch up at that layer, then the step's own rows.
    pub rows: HiddenRows,
    /// Positions of the earlier steps that the receiver forgets before running this one: the
    /// drafted tokens the device rejected after a multi-token step. Zero on downlinks and
    /// whenever every drafted token was kept.
    pub rewind: usize,
    /// HMAC-SHA256 under the session secret, cut to 16 bytes, of the direction, the step, its
    /// drawn split points, the rewind and the rows' position, count, width and codec: a
    /// receiver whose draw, step or position differs refuses the message instead of computing
    /// garbage.
    pub tag: [u8; 16],
}

/// The cloud's side of the split, as the device sees it: one generation session of the trunk,
/// opened with the session's [`SessionKeys`].
///
/// Each step's layer range comes from the keys' schedule, and the rows carry the catch-up the
/// trunk needs (none for a fixed split). Implementations keep the session's KV cache; the
/// device never sees the trunk's weights.
pub trait Trunk: Send {
    /// The decoder layers the trunk holds: at least the union of every draw's.
    fn layers(&self) -> Range<usize>;

    /// Runs one step and returns the rows the tail needs.
    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError>;

    /// True when the trunk computes in this process and never waits on a network, so a whole
    /// device step (head, trunk, tail) can run as one task of the compute pool.
    fn in_process(&self) -> bool {
        false
    }
}

/// A trunk that runs in the same process: the "cloud" of `lsplit generate` without `--cloud`.
#[derive(Debug)]
pub struct LocalTrunk {
    part: Arc<ModelPart>,
    state: TrunkState,
}

impl LocalTrunk {
    /// A session over a loaded trunk part (shareable between sessions) that holds every layer
    /// `keys` may draw; `keys` stand for what the device sends when a session opens.
    pub fn new(part: Arc<ModelPart>, keys: &SessionKeys) -> Result<Self, TrunkError> {
        let state = TrunkState::new(part.clone(), keys)?;
        Ok(Self { part, state })
    }

    /// Bytes held by this session's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.state.cache_bytes()
    }
}

impl Trunk for LocalTrunk {
    fn layers(&self) -> Range<usize> {
        self.part.spec().layers.clone()
    }

    fn in_process(&self) -> bool {
        true
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        self.state.step(message)
    }
}
