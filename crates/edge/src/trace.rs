//! What one token cost and what crossed the wire for it: time in head, trunk (network
//! included) and tail, bytes each way, and the hidden rows sent to and received from the trunk.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use candle_core::Device;
use lsplit_split::{Stats, Step, StepRows, Trunk, TrunkError};
use lsplit_wire::HiddenRows;
use serde::Serialize;

/// Rows of a prompt block shown at most: its last ones (a decode step sends one row).
pub(crate) const MAX_SHOWN_ROWS: usize = 32;

/// The rows of one trunk round trip, as they crossed the wire.
#[derive(Debug)]
pub(crate) struct Exchange {
    up: HiddenRows,
    down: HiddenRows,
}

/// The slot an [`ObservedTrunk`] leaves its latest exchange in.
pub(crate) type ExchangeSlot = Arc<Mutex<Option<Exchange>>>;

/// A trunk session that keeps a copy of the rows of its latest round trip for the trace.
pub(crate) struct ObservedTrunk {
    inner: Box<dyn Trunk>,
    last: ExchangeSlot,
}

impl ObservedTrunk {
    /// Wraps `inner`; exchanges land in `last`.
    pub fn new(inner: Box<dyn Trunk>, last: ExchangeSlot) -> Self {
        Self { inner, last }
    }
}

impl Trunk for ObservedTrunk {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn in_process(&self) -> bool {
        self.inner.in_process()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let down = self.inner.step(message)?;
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Exchange {
            up: message.rows.clone(),
            down: down.rows.clone(),
        });
        Ok(down)
    }
}

/// The cost of one token and the rows that crossed for it (the `lsplit` field of a chunk).
#[derive(Debug, Serialize)]
pub(crate) struct TokenTrace {
    /// 0 for the first token, whose cost is the prompt pass.
    pub index: usize,
    /// The token id (it never leaves the device).
    pub token: u32,
    /// Positions that crossed for this token: the prompt's length, then 1.
    pub positions: usize,
    pub head_ms: f64,
    /// Waiting for the trunk: its compute, plus the network when it is remote.
    pub trunk_ms: f64,
    pub tail_ms: f64,
    pub sampling_ms: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The rows sent to the trunk (absent for the unsplit baseline).
    pub up: Option<RowsView>,
    /// The rows the trunk sent back.
    pub down: Option<RowsView>,
}

/// Some rows of a block that crossed the wire, decoded as the receiver decoded them.
#[derive(Debug, Serialize)]
pub(crate) struct RowsView {
    /// The wire codec.
    pub codec: &'static str,
    /// Position of the block's first row, and its row count and width.
    pub start: usize,
    pub rows: usize,
    pub width: usize,
    /// Encoded bytes of the whole block on the wire.
    pub wire_bytes: usize,
    /// Position of the first row shown; the block's last rows are shown.
    pub shown_start: usize,
    pub shown_rows: usize,
    /// The shown rows' values, row-major, little-endian f32, base64.
    pub f32_base64: String,
}

impl RowsView {
    fn of(rows: &HiddenRows) -> Option<Self> {
        let values = rows
            .decode(&Device::Cpu)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?));
        let values = match values {
            Ok(values) => values,
            Err(e) => {
                tracing::warn!(error = %e, "cannot decode rows for the trace");
                return None;
            }
        };
        let shown_rows = rows.rows.min(MAX_SHOWN_ROWS);
        let skipped = rows.rows - shown_rows;
        let bytes: Vec<u8> = values[skipped * rows.width..]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        Some(Self {
            codec: rows.codec.name(),
            start: rows.start,
            rows: rows.rows,
            width: rows.width,
            wire_bytes: rows.bytes.len(),
            shown_start: rows.start + skipped,
            shown_rows,
            f32_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        })
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl TokenTrace {
    /// The trace of `step`, given the stats at the previous step and the latest exchange.
    pub fn new(index: usize, step: &Step<'_>, before: &Stats, exchange: Option<Exchange>) -> Self {
        let now = step.stats;
        let (up, down) = match &exchange {
            Some(e) => (RowsView::of(&e.up), RowsView::of(&e.down)),
            None => (None, None),
        };
        Self {
            index,
            token: step.token,
            positions: now.positions() - before.positions(),
            head_ms: ms(now.head - before.head),
            trunk_ms: ms(now.trunk - before.trunk),
            tail_ms: ms(now.tail - before.tail),
            sampling_ms: ms(now.sampling - before.sampling),
            bytes_up: now.bytes_up - before.bytes_up,
            bytes_down: now.bytes_down - before.bytes_down,
            up,
            down,
        }
    }
}

/// Totals of a generation (the `lsplit` field of a finished answer).
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub head_ms: f64,
    pub trunk_ms: f64,
    pub tail_ms: f64,
    pub sampling_ms: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}

impl Summary {
    /// The totals of `stats`.
    pub fn of(stats: &Stats) -> Self {
        Self {
            head_ms: ms(stats.head),
            trunk_ms: ms(stats.trunk),
            tail_ms: ms(stats.tail),
            sampling_ms: ms(stats.sampling),
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            prefill_tokens_per_second: stats.prefill_tokens_per_second(),
            decode_tokens_per_second: stats.decode_tokens_per_second(),
        }
    }
}
