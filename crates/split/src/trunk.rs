use std::ops::Range;
use std::sync::Arc;

use lsplit_model::{KvCache, ModelError, ModelPart};
use lsplit_wire::{HiddenRows, WireError};

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
}

/// The cloud's side of the split, as the device sees it: one generation session of the trunk.
///
/// Each call sends encoded hidden rows that start at the next position of the session and gets
/// back the trunk's output rows, same shape and codec. Implementations keep the session's KV
/// cache; the device never sees the trunk's weights.
pub trait Trunk: Send {
    /// The decoder layers the trunk runs, `[k1, k2)`.
    fn layers(&self) -> Range<usize>;

    /// Runs the trunk over `rows` and returns its output rows.
    fn forward(&mut self, rows: &HiddenRows) -> Result<HiddenRows, TrunkError>;
}

/// A trunk that runs in the same process: the "cloud" of `lsplit generate` without `--cloud`.
#[derive(Debug)]
pub struct LocalTrunk {
    part: Arc<ModelPart>,
    cache: KvCache,
}

impl LocalTrunk {
    /// A new session over a loaded trunk part (shareable between sessions).
    pub fn new(part: Arc<ModelPart>) -> Self {
        let cache = part.new_cache();
        Self { part, cache }
    }

    /// Bytes held by this session's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

impl Trunk for LocalTrunk {
    fn layers(&self) -> Range<usize> {
        self.part.spec().layers.clone()
    }

    fn forward(&mut self, rows: &HiddenRows) -> Result<HiddenRows, TrunkError> {
        let hidden = rows.decode(self.part.device())?;
        let out = self.part.forward(&hidden, rows.start, &mut self.cache)?;
        Ok(rows.codec.encode(&out, rows.start)?)
    }
}
