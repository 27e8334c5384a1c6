//! Wire codecs for the hidden-state rows that cross the split.
//!
//! The head sends the trunk rows of shape `(rows, hidden)` starting at a sequence position; the
//! trunk answers with rows of the same shape. [`HiddenRows`] is that message: codec, shape,
//! starting position and the encoded bytes, independent of any transport. The [`step`] module
//! holds the codecs for the arbitrary-shape tensors a split diffusion model sends each step.

pub mod step;

pub use step::{Grouping, IntBits, StepCodec, StepTensor};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// Errors while encoding or decoding hidden rows and step tensors.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The payload length does not match the declared shape and codec.
    #[error(
        "{codec} payload of {got} bytes does not match {rows} x {width} rows ({expected} bytes expected)"
    )]
    PayloadSize {
        /// Codec of the message.
        codec: Codec,
        /// Declared number of rows.
        rows: usize,
        /// Declared row width.
        width: usize,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A decoded value is NaN or infinite: hidden states never are, so the message is corrupt.
    #[error("hidden rows contain a non-finite value (row {row}, column {column})")]
    NonFinite {
        /// Row of the first bad value.
        row: usize,
        /// Column of the first bad value.
        column: usize,
    },
    /// The tensor to encode is not a 2-D `(rows, hidden)` matrix.
    #[error("expected hidden rows of shape (rows, hidden), got {0:?}")]
    Shape(Vec<usize>),
    /// An unknown codec name.
    #[error("unknown codec `{0}`: expected one of f32, f16, bf16, int8")]
    UnknownCodec(String),
    /// An unknown step codec name.
    #[error("unknown step codec `{0}`: expected one of {names}", names = step::codec_names())]
    UnknownStepCodec(String),
    /// An unknown step codec protocol id.
    #[error("unknown step codec id {0}")]
    UnknownStepCodecId(u8),
    /// A step tensor shape with no elements.
    #[error("step tensor of shape {0:?} has no elements")]
    EmptyStepTensor(Vec<usize>),
    /// A step tensor shape whose element or byte count does not fit in `usize`.
    #[error("step tensor of shape {0:?} is too large")]
    StepShapeOverflow(Vec<usize>),
    /// A step payload whose length does not match its shape and codec.
    #[error(
        "{codec} payload of {got} bytes does not match shape {shape:?} ({expected} bytes expected)"
    )]
    StepPayloadSize {
        /// Codec of the message.
        codec: step::StepCodec,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A tensor to encode holds NaN or an infinity, which no codec carries.
    #[error("cannot encode step tensor: non-finite value {value} at index {index:?}")]
    NonFiniteStepInput {
        /// The first bad value.
        value: f32,
        /// Its position in the tensor.
        index: Vec<usize>,
    },
    /// A received step payload decodes to NaN or an infinity: the message is corrupt.
    #[error("{codec} payload decodes to non-finite value {value} at index {index:?}")]
    NonFiniteStepValue {
        /// Codec of the message.
        codec: step::StepCodec,
        /// The first bad value.
        value: f32,
        /// Its position in the tensor.
        index: Vec<usize>,
    },
    /// An affine group's minimum or scale is not finite, or the scale is negative.
    #[error(
        "{codec} group {group} has minimum {min} and scale {scale}: both must be finite and the scale >= 0"
    )]
    InvalidAffineGroup {
        /// Codec of the message.
        codec: step::StepCodec,
        /// Index of the bad group (the channel for per-channel codecs).
        group: usize,
        /// The group's minimum.
        min: f32,
        /// The group's scale.
        scale: f32,
    },
    /// The padding bits after the last packed value are not zero: the message is corrupt.
    #[error("{0} payload has non-zero padding bits in its last byte")]
    NonZeroPadding(step::StepCodec),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How hidden-state values are written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// 32-bit floats, little-endian: lossless, the default.
    #[default]
    F32,
    /// IEEE half precision, little-endian.
    F16,
    /// bfloat16, little-endian.
    Bf16,
    /// Symmetric int8 with one f32 scale per row (`value = scale * q`).
    Int8,
}

impl Codec {
    /// Every codec, in the order they are offered during negotiation.
    pub const ALL: [Codec; 4] = [Codec::F32, Codec::F16, Codec::Bf16, Codec::Int8];

    /// The codec's name on the command line and in the protocol.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }

    /// Encoded size of `rows` rows of `width` values, scales included. Shapes read from the
    /// network may be absurd: the size saturates at `usize::MAX`, which no payload matches.
    pub fn payload_len(self, rows: usize, width: usize) -> usize {
        let values = rows.saturating_mul(width);
        match self {
            Self::F32 => values.saturating_mul(4),
            Self::F16 | Self::Bf16 => values.saturating_mul(2),
            Self::Int8 => values.saturating_add(rows.saturating_mul(4)),
        }
    }

    /// Encodes a `(rows, width)` tensor that starts at sequence position `start`.
    pub fn encode(self, hidden: &Tensor, start: usize) -> Result<HiddenRows, WireError> {
        let (rows, width) = match hidden.dims() {
            &[rows, width] => (rows, width),
            dims => return Err(WireError::Shape(dims.to_vec())),
        };
        let values: Vec<f32> = hidden
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut bytes = Vec::with_capacity(self.payload_len(rows, width));
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            Self::Int8 => {
                for row in values.chunks(width.max(1)) {
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    bytes.extend_from_slice(&scale.to_le_bytes());
                    bytes.extend(
                        row.iter()
                            .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
            }
        }
        Ok(HiddenRows {
            codec: self,
            rows,
            width,
            start,
            bytes,
        })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| WireError::UnknownCodec(s.to_string()))
    }
}

/// One message across the split: encoded hidden rows with their shape and first position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenRows {
    /// How `bytes` encodes the values.
    pub codec: Codec,
    /// Number of rows (sequence positions).
    pub rows: usize,
    /// Values per row (the model's hidden size).
    pub width: usize,
    /// Sequence position of the first row.
    pub start: usize,
    /// The encoded values.
    pub bytes: Vec<u8>,
}

impl HiddenRows {
    /// The position after the last row. Positions read from the network may be absurd: the
    /// end saturates at `usize::MAX`, past any context, instead of overflowing.
    pub fn end(&self) -> usize {
        self.start.saturating_add(self.rows)
    }

    /// Decodes into an f32 tensor `(rows, width)` on `device`, checking the payload size and
    /// that every value is finite.
    pub fn decode(&self, device: &Device) -> Result<Tensor, WireError> {
        let expected = self.codec.payload_len(self.rows, self.width);
        if self.bytes.len() != expected || self.rows == 0 || self.width == 0 {
            return Err(WireError::PayloadSize {
                codec: self.codec,
                rows: self.rows,
                width: self.width,
                expected,
                got: self.bytes.len(),
            });
        }
        let values: Vec<f32> = match self.codec {
            Codec::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Codec::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Codec::Bf16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Codec::Int8 => self
                .bytes
                .chunks_exact(self.width + 4)
                .flat_map(|row| {
                    let scale = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
                    row[4..].iter().map(move |&q| scale * f32::from(q as i8))
                })
                .collect(),
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(WireError::NonFinite {
                row: i / self.width,
                column: i % self.width,
            });
        }
        Ok(Tensor::from_vec(values, (self.rows, self.width), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tensor {
        let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.37).collect();
        Tensor::from_vec(values, (3, 8), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn f32_round_trip_is_bit_exact() -> Result<(), WireError> {
        let t = sample();
        let rows = Codec::F32.encode(&t, 5)?;
        assert_eq!((rows.rows, rows.width, rows.start), (3, 8, 5));
        assert_eq!(rows.bytes.len(), 3 * 8 * 4);
        let back: Vec<f32> = rows.decode(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let orig: Vec<f32> = t.flatten_all()?.to_vec1()?;
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            orig.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        Ok(())
    }

    #[test]
    fn lossy_codecs_stay_within_their_precision() -> Result<(), WireError> {
        let t = sample();
        let orig: Vec<f32> = t.flatten_all()?.to_vec1()?;
        for (codec, bytes, tolerance) in [
            (Codec::F16, 48, 2e-3),
            (Codec::Bf16, 48, 1.6e-2),
            (Codec::Int8, 24 + 12, 1.0 / 127.0),
        ] {
            let rows = codec.encode(&t, 0)?;
            assert_eq!(rows.bytes.len(), bytes, "{codec}");
            let back: Vec<f32> = rows.decode(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for (a, b) in orig.iter().zip(&back) {
                let max = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!((a - b).abs() <= tolerance * max, "{codec}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn wrong_payload_size_is_rejected() {
        let mut rows = Codec::F16.encode(&sample(), 0).expect("encode");
        rows.bytes.pop();
        let err = rows.decode(&Device::Cpu).expect_err("short payload");
        assert_eq!(
            err.to_string(),
            "f16 payload of 47 bytes does not match 3 x 8 rows (48 bytes expected)"
        );
    }

    #[test]
    fn non_finite_values_are_rejected() {
        let mut rows = Codec::F32.encode(&sample(), 0).expect("encode");
        rows.bytes[8 * 4 + 12..8 * 4 + 16].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = rows.decode(&Device::Cpu).expect_err("NaN");
        assert_eq!(
            err.to_string(),
            "hidden rows contain a non-finite value (row 1, column 3)"
        );
    }

    #[test]
    fn codec_names_parse() {
        assert_eq!("BF16".parse::<Codec>().expect("bf16"), Codec::Bf16);
        assert_eq!(
            "int4".parse::<Codec>().expect_err("int4").to_string(),
            "unknown codec `int4`: expected one of f32, f16, bf16, int8"
        );
    }
}
