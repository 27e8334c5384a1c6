//! Wire captures: exactly what crossed between the device and the trunk, message by message.
//!
//! A capture is a directory of three files:
//! - `messages.jsonl`: one JSON object per message, in the order they crossed: `direction`
//!   (`"up"`, device to trunk, or `"down"`), `step` (the forward pass it belongs to), `start`
//!   (sequence position of its first row), `rows`, `width` (values per row), `codec` (`f32`,
//!   `f16`, `bf16` or `int8`, as in `lsplit-wire`), `tag` (the message's 16-byte tag in hex;
//!   `null` in captures of untagged sessions, before every split was keyed), `offset` and `bytes` (where its payload lies in
//!   the direction's payload file);
//! - `up.bin` and `down.bin`: the payloads of the uplink and downlink messages, back to back,
//!   exactly as encoded on the wire.
//!
//! It holds nothing that did not cross: no split points, no permutation, no session secret.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lsplit_wire::{Codec, HiddenRows};
use serde::{Deserialize, Serialize};

/// Errors writing or reading a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A capture file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of `messages.jsonl` is not a message, or points outside its payload file.
    #[error("{path}:{line}: {reason}")]
    Format {
        /// The index file.
        path: PathBuf,
        /// Its line (from 1).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Which way a captured message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// Device to trunk: rows leaving the head.
    Up,
    /// Trunk to device: rows entering the tail.
    Down,
}

/// One line of `messages.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Line {
    direction: Way,
    step: u64,
    start: usize,
    rows: usize,
    width: usize,
    codec: String,
    tag: Option<String>,
    /// Positions the step forgot first (rejected drafts); absent in older captures.
    #[serde(default)]
    rewind: usize,
    offset: u64,
    bytes: u64,
}

/// One message of a capture: its direction, step, tag and rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedMessage {
    /// Which way it went.
    pub direction: Way,
    /// The forward pass it belongs to.
    pub step: u64,
    /// The tag of a keyed session's message.
    pub tag: Option<[u8; 16]>,
    /// Positions the receiver forgot before the step (drafted tokens the device rejected).
    pub rewind: usize,
    /// The rows, as encoded on the wire.
    pub rows: HiddenRows,
}

const INDEX: &str = "messages.jsonl";

fn payload_file(way: Way) -> &'static str {
    match way {
        Way::Up => "up.bin",
        Way::Down => "down.bin",
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a capture as messages cross.
#[derive(Debug)]
pub struct CaptureWriter {
    dir: PathBuf,
    index: File,
    up: File,
    down: File,
    up_len: u64,
    down_len: u64,
}

impl CaptureWriter {
    /// Creates `dir` if needed and starts an empty capture in it (replacing an earlier one).
    pub fn create(dir: &Path) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path).map_err(|source| CaptureError::Io { path, source })
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            index: open(INDEX)?,
            up: open(payload_file(Way::Up))?,
            down: open(payload_file(Way::Down))?,
            up_len: 0,
            down_len: 0,
        })
    }

    /// Appends one message; written through at once, so a failed run leaves what crossed.
    pub fn record(
        &mut self,
        direction: Way,
        step: u64,
        tag: Option<&[u8; 16]>,
        rewind: usize,
        rows: &HiddenRows,
    ) -> Result<(), CaptureError> {
        let (file, len) = match direction {
            Way::Up => (&mut self.up, &mut self.up_len),
            Way::Down => (&mut self.down, &mut self.down_len),
        };
        let path = self.dir.join(payload_file(direction));
        file.write_all(&rows.bytes).map_err(io(&path))?;
        let line = Line {
            direction,
            step,
            start: rows.start,
            rows: rows.rows,
            width: rows.width,
            codec: rows.codec.name().to_string(),
            tag: tag.map(|t| t.iter().map(|b| format!("{b:02x}")).collect()),
            rewind,
            offset: *len,
            bytes: rows.bytes.len() as u64,
        };
        *len += rows.bytes.len() as u64;
        let mut text = serde_json::to_string(&line).map_err(|e| CaptureError::Format {
            path: self.dir.join(INDEX),
            line: 0,
            reason: e.to_string(),
        })?;
        text.push('\n');
        let index = self.dir.join(INDEX);
        self.index.write_all(text.as_bytes()).map_err(io(&index))
    }
}

/// Reads every message of the capture in `dir`.
pub fn read_capture(dir: &Path) -> Result<Vec<CapturedMessage>, CaptureError> {
    let index_path = dir.join(INDEX);
    let index = File::open(&index_path).map_err(io(&index_path))?;
    let mut payloads = Vec::new();
    for way in [Way::Up, Way::Down] {
        let path = dir.join(payload_file(way));
        let file = File::open(&path).map_err(io(&path))?;
        payloads.push((way, path, file));
    }
    let mut messages = Vec::new();
    for (number, line) in BufReader::new(index).lines().enumerate() {
        let line = line.map_err(io(&index_path))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| CaptureError::Format {
            path: index_path.clone(),
            line: number + 1,
            reason,
        };
        let entry: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let codec: Codec = entry
            .codec
            .parse()
            .map_err(|e: lsplit_wire::WireError| bad(e.to_string()))?;
        if entry.bytes != codec.payload_len(entry.rows, entry.width) as u64 {
            return Err(bad(format!(
                "{} bytes do not hold {} x {} {codec} values",
                entry.bytes, entry.rows, entry.width
            )));
        }
        let tag = entry
            .tag
            .as_deref()
            .map(|hex| {
                parse_tag(hex).ok_or_else(|| bad(format!("tag `{hex}` is not 32 hex digits")))
            })
            .transpose()?;
        let (_, path, file) = payloads
            .iter_mut()
            .find(|(way, _, _)| *way == entry.direction)
            .expect("both directions are open");
        let mut bytes = vec![0; entry.bytes as usize];
        file.seek(SeekFrom::Start(entry.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| {
                bad(format!(
                    "payload at {} in {}: {e}",
                    entry.offset,
                    path.display()
                ))
            })?;
        messages.push(CapturedMessage {
            direction: entry.direction,
            step: entry.step,
            tag,
            rewind: entry.rewind,
            rows: HiddenRows {
                codec,
                rows: entry.rows,
                width: entry.width,
                start: entry.start,
                bytes,
            },
        });
    }
    Ok(messages)
}

fn parse_tag(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut tag = [0u8; 16];
    for (i, byte) in tag.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_reads_back_what_was_recorded() -> Result<(), CaptureError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = CaptureWriter::create(dir.path())?;
        let up = HiddenRows {
            codec: Codec::F16,
            rows: 2,
            width: 3,
            start: 4,
            bytes: (0..12).collect(),
        };
        let down = HiddenRows {
            codec: Codec::F16,
            rows: 1,
            width: 3,
            start: 5,
            bytes: (20..26).collect(),
        };
        writer.record(Way::Up, 1, Some(&[0xab; 16]), 0, &up)?;
        writer.record(Way::Down, 1, None, 0, &down)?;
        writer.record(Way::Up, 2, None, 2, &down)?;
        drop(writer);
        let read = read_capture(dir.path())?;
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].rows, up);
        assert_eq!(read[0].tag, Some([0xab; 16]));
        assert_eq!((read[1].direction, read[1].step), (Way::Down, 1));
        assert_eq!(read[1].rows, down);
        assert_eq!(read[2].rows, down);
        assert_eq!((read[0].rewind, read[2].rewind), (0, 2));
        assert_eq!(
            std::fs::metadata(dir.path().join("up.bin"))
                .expect("up")
                .len(),
            18
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("down.bin"))
                .expect("down")
                .len(),
            6
        );

        std::fs::write(dir.path().join("down.bin"), [1, 2]).expect("truncate");
        let err = read_capture(dir.path()).expect_err("truncated payload");
        assert!(
            err.to_string().contains("messages.jsonl:2: payload at 0"),
            "{err}"
        );
        Ok(())
    }
}
