use std::ops::Range;
use std::sync::Arc;

use lsplit_model::{KvCache, ModelError, ModelPart};
use lsplit_wire::{HiddenRows, WireError};

use crate::{KeyedTrunk, SessionKeys};

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
    /// Device and trunk disagree on a keyed session's steps: refused, never computed.
    #[error("desync: {0}")]
    Desync(String),
    /// The session was opened for another kind of split, or the trunk cannot serve its policy.
    #[error("{0}")]
    Policy(String),
}

/// One message of a keyed session (random split points or obfuscation), either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRows {
    /// The step's index in the session: 0 for the first forward pass, then one per pass.
    pub step: u64,
    /// Rows at the step's boundary layer (K1 up, K2 down): rows of earlier positions the
    /// receiver must catch up at that layer, then the step's own rows.
    pub rows: HiddenRows,
    /// HMAC-SHA256 under the session secret, cut to 16 bytes, of the direction, the step, its
    /// drawn split points and the rows' position, count, width and codec: a receiver whose
    /// draw or step differs refuses the message instead of computing garbage.
    pub tag: [u8; 16],
}

/// The cloud's side of the split, as the device sees it: one generation session of the trunk.
///
/// A plain session (a fixed split without keys) takes [`Trunk::forward`]: encoded hidden rows
/// that start at the next position, answered by the trunk's output rows, same shape and codec.
/// A keyed session (random split points, obfuscation) takes [`Trunk::step`]: each step's layer
/// range comes from the session's secret schedule, and the rows carry the catch-up the trunk
/// needs. Implementations keep the session's KV cache; the device never sees the trunk's
/// weights.
pub trait Trunk: Send {
    /// The decoder layers the trunk holds: `[k1, k2)` of a fixed split, the union of every
    /// draw's for a keyed session.
    fn layers(&self) -> Range<usize>;

    /// Runs the trunk over `rows` of a plain session and returns its output rows.
    fn forward(&mut self, rows: &HiddenRows) -> Result<HiddenRows, TrunkError>;

    /// Runs one step of a keyed session and returns the rows the tail needs.
    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError>;

    /// True when the trunk computes in this process and never waits on a network, so a whole
    /// device step (head, trunk, tail) can run as one task of the compute pool.
    fn in_process(&self) -> bool {
        false
    }
}

#[derive(Debug)]
enum Mode {
    Plain(KvCache),
    Keyed(Box<KeyedTrunk>),
}

/// A trunk that runs in the same process: the "cloud" of `lsplit generate` without `--cloud`.
#[derive(Debug)]
pub struct LocalTrunk {
    part: Arc<ModelPart>,
    mode: Mode,
}

impl LocalTrunk {
    /// A plain session over a loaded trunk part (shareable between sessions).
    pub fn new(part: Arc<ModelPart>) -> Self {
        let cache = part.new_cache();
        Self {
            part,
            mode: Mode::Plain(cache),
        }
    }

    /// A keyed session over a loaded trunk part that holds every layer `keys` may draw; `keys`
    /// stand for what the device sends in the session handshake.
    pub fn keyed(part: Arc<ModelPart>, keys: &SessionKeys) -> Result<Self, TrunkError> {
        let keyed = KeyedTrunk::new(part.clone(), keys)?;
        Ok(Self {
            part,
            mode: Mode::Keyed(Box::new(keyed)),
        })
    }

    /// Bytes held by this session's KV cache (a plain session's).
    pub fn cache_bytes(&self) -> usize {
        match &self.mode {
            Mode::Plain(cache) => cache.bytes(),
            Mode::Keyed(_) => 0,
        }
    }
}

impl Trunk for LocalTrunk {
    fn layers(&self) -> Range<usize> {
        self.part.spec().layers.clone()
    }

    fn in_process(&self) -> bool {
        true
    }

    fn forward(&mut self, rows: &HiddenRows) -> Result<HiddenRows, TrunkError> {
        let Mode::Plain(cache) = &mut self.mode else {
            return Err(TrunkError::Policy(
                "this trunk session is keyed: it takes steps, not bare rows".into(),
            ));
        };
        let hidden = rows.decode(self.part.device())?;
        let out = self.part.forward(&hidden, rows.start, cache)?;
        Ok(rows.codec.encode(&out, rows.start)?)
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        match &mut self.mode {
            Mode::Keyed(keyed) => keyed.step(message),
            Mode::Plain(_) => Err(TrunkError::Policy(
                "this trunk session was opened without keys: it takes bare rows, not steps".into(),
            )),
        }
    }
}
