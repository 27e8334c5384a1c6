//! Wire codecs for the tensors that cross a split diffusion model every step.
//!
//! A UNet split sends arbitrary-shape f32 tensors (boundary activations `[2, 320, 64, 64]`, time
//! embeddings `[2, 1280]`, text conditioning `[2, 77, 2048]`). [`StepCodec`] chooses how their
//! values are written; [`StepTensor`] is one encoded tensor, independent of any transport.
//!
//! Payload layouts (all little-endian; the shape travels beside the payload and is not counted):
//! - `f32`: 4 bytes per value; `f16`, `bf16`: 2 bytes per value; `fp8-e4m3`, `fp8-e5m2`: 1 byte
//!   per value (OCP FP8, round to nearest even). The narrow float codecs saturate finite values
//!   beyond their range to their largest finite value.
//! - `intN` / `intN-ch` (affine, N = 2..=8): for each group an f32 minimum and an f32 scale
//!   (`(max - min) / (2^N - 1)`, 0 for a constant group), then every value's
//!   `q = round((x - min) / scale)` packed densely in N bits, in tensor order, least significant
//!   bit first, the last byte padded with zero bits. `intN` has one group; `intN-ch` one group
//!   per channel (dimension 1; tensors of rank 0 or 1 have a single group). Payload bytes:
//!   `groups * 8 + ceil(numel * N / 8)`.

mod fp8;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::WireError;
use fp8::Fp8Format;

/// Bits per value of an affine integer codec, 2 to 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntBits(u8);

impl IntBits {
    /// `bits` if it is in 2..=8, the widths the affine codecs support.
    pub const fn new(bits: u8) -> Option<Self> {
        if bits >= 2 && bits <= 8 {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// The number of bits.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The largest quantized value, `2^bits - 1`.
    fn max_level(self) -> u32 {
        (1 << self.0) - 1
    }
}

/// Which values share one affine minimum and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grouping {
    /// One minimum and scale for the whole tensor.
    PerTensor,
    /// One minimum and scale per channel (dimension 1), for activations whose channels have very
    /// different ranges. Tensors of rank 0 or 1 have no channel dimension and use one group.
    PerChannel,
}

/// How the values of a step tensor are written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StepCodec {
    /// 32-bit floats: lossless, the default.
    #[default]
    F32,
    /// IEEE half precision, saturating at ±65504.
    F16,
    /// bfloat16, saturating at its largest finite value.
    Bf16,
    /// OCP FP8 E4M3 ("fn": no infinities), saturating at ±448.
    Fp8E4M3,
    /// OCP FP8 E5M2, saturating at ±57344.
    Fp8E5M2,
    /// Affine integers of `bits` bits with an f32 minimum and scale per group.
    Int {
        /// Bits per value.
        bits: IntBits,
        /// Which values share a minimum and scale.
        grouping: Grouping,
    },
}

/// Shorthand for the affine codec table.
const fn int(bits: u8, grouping: Grouping) -> StepCodec {
    StepCodec::Int {
        bits: IntBits(bits),
        grouping,
    }
}

/// Every codec with its name and protocol id, in the order benchmark tables list them.
const CODECS: [(StepCodec, &str, u8); 19] = [
    (StepCodec::F32, "f32", 0),
    (StepCodec::F16, "f16", 1),
    (StepCodec::Bf16, "bf16", 2),
    (StepCodec::Fp8E4M3, "fp8-e4m3", 3),
    (StepCodec::Fp8E5M2, "fp8-e5m2", 4),
    (int(8, Grouping::PerTensor), "int8", 0x18),
    (int(7, Grouping::PerTensor), "int7", 0x17),
    (int(6, Grouping::PerTensor), "int6", 0x16),
    (int(5, Grouping::PerTensor), "int5", 0x15),
    (int(4, Grouping::PerTensor), "int4", 0x14),
    (int(3, Grouping::PerTensor), "int3", 0x13),
    (int(2, Grouping::PerTensor), "int2", 0x12),
    (int(8, Grouping::PerChannel), "int8-ch", 0x28),
    (int(7, Grouping::PerChannel), "int7-ch", 0x27),
    (int(6, Grouping::PerChannel), "int6-ch", 0x26),
    (int(5, Grouping::PerChannel), "int5-ch", 0x25),
    (int(4, Grouping::PerChannel), "int4-ch", 0x24),
    (int(3, Grouping::PerChannel), "int3-ch", 0x23),
    (int(2, Grouping::PerChannel), "int2-ch", 0x22),
];

/// Every codec name, comma-separated, for error messages.
pub(crate) fn codec_names() -> String {
    CODECS.map(|(_, name, _)| name).join(", ")
}

/// The number of elements of `shape`, or an error if it is empty or does not fit in `usize`.
fn element_count(shape: &[usize]) -> Result<usize, WireError> {
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| WireError::StepShapeOverflow(shape.to_vec()))?;
    if count == 0 {
        return Err(WireError::EmptyStepTensor(shape.to_vec()));
    }
    Ok(count)
}

/// Affine groups of a tensor: how many, and how many consecutive values each block holds. Block
/// `k` (values `k * block .. (k + 1) * block` in tensor order) belongs to group `k % groups`.
fn group_layout(grouping: Grouping, shape: &[usize], count: usize) -> (usize, usize) {
    match (grouping, shape) {
        (Grouping::PerChannel, [_, channels, inner @ ..]) => {
            (*channels, inner.iter().product::<usize>())
        }
        _ => (1, count),
    }
}

/// The multi-dimensional index of flat position `flat` in a row-major `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        *slot = flat % dim;
        flat /= dim;
    }
    index
}

impl StepCodec {
    /// Every codec: f32, f16, bf16, the two fp8 formats, then int8..int2 per tensor and per
    /// channel.
    pub fn all() -> [StepCodec; 19] {
        CODECS.map(|(codec, _, _)| codec)
    }

    /// The codec's name on the command line (`--codec`) and in the protocol.
    pub fn name(self) -> &'static str {
        CODECS
            .iter()
            .find(|(codec, _, _)| *codec == self)
            .map_or("f32", |(_, name, _)| name)
    }

    /// A stable one-byte id for the protocol: 0..=4 for the float codecs, `0x10 + bits` per
    /// tensor and `0x20 + bits` per channel for the affine ones.
    pub fn id(self) -> u8 {
        CODECS
            .iter()
            .find(|(codec, _, _)| *codec == self)
            .map_or(0, |(_, _, id)| *id)
    }

    /// The codec with protocol id `id`.
    pub fn from_id(id: u8) -> Result<Self, WireError> {
        CODECS
            .iter()
            .find(|(_, _, known)| *known == id)
            .map(|(codec, _, _)| *codec)
            .ok_or(WireError::UnknownStepCodecId(id))
    }

    /// Payload bytes for a tensor of `shape`: values plus, for the affine codecs, 8 bytes of
    /// minimum and scale per group. Errors for empty shapes and sizes that overflow `usize`.
    pub fn payload_len(self, shape: &[usize]) -> Result<usize, WireError> {
        let count = element_count(shape)?;
        let overflow = || WireError::StepShapeOverflow(shape.to_vec());
        match self {
            Self::F32 => count.checked_mul(4).ok_or_else(overflow),
            Self::F16 | Self::Bf16 => count.checked_mul(2).ok_or_else(overflow),
            Self::Fp8E4M3 | Self::Fp8E5M2 => Ok(count),
            Self::Int { bits, grouping } => {
                let (groups, _) = group_layout(grouping, shape, count);
                let packed = count
                    .checked_mul(usize::from(bits.get()))
                    .ok_or_else(overflow)?
                    .div_ceil(8);
                groups
                    .checked_mul(8)
                    .and_then(|params| params.checked_add(packed))
                    .ok_or_else(overflow)
            }
        }
    }

    /// Encodes `tensor` (any shape with at least one element, any float dtype, any device).
    /// Non-finite values are rejected: a diffusion step never produces them on purpose.
    pub fn encode(self, tensor: &Tensor) -> Result<StepTensor, WireError> {
        let shape = tensor.dims().to_vec();
        let count = element_count(&shape)?;
        let values: Vec<f32> = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(WireError::NonFiniteStepInput {
                value: values[i],
                index: unravel(i, &shape),
            });
        }
        let mut payload = Vec::with_capacity(self.payload_len(&shape)?);
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| payload.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|&v| payload.extend_from_slice(&saturating_f16(v).to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|&v| payload.extend_from_slice(&saturating_bf16(v).to_le_bytes())),
            Self::Fp8E4M3 => payload.extend(values.iter().map(|&v| fp8::E4M3.encode(v))),
            Self::Fp8E5M2 => payload.extend(values.iter().map(|&v| fp8::E5M2.encode(v))),
            Self::Int { bits, grouping } => {
                let (groups, block) = group_layout(grouping, &shape, count);
                encode_affine(&values, bits, groups, block, &mut payload);
            }
        }
        Ok(StepTensor {
            codec: self,
            shape,
            payload,
        })
    }
}

/// `value` as f16, finite values beyond ±65504 clamped to it instead of becoming infinite.
fn saturating_f16(value: f32) -> f16 {
    f16::from_f32(value).clamp(f16::MIN, f16::MAX)
}

/// `value` as bf16, finite values that would round to infinity clamped to the largest finite.
fn saturating_bf16(value: f32) -> bf16 {
    bf16::from_f32(value).clamp(bf16::MIN, bf16::MAX)
}

/// Appends per-group minimum and scale, then the bit-packed quantized values.
fn encode_affine(values: &[f32], bits: IntBits, groups: usize, block: usize, out: &mut Vec<u8>) {
    let mut ranges = vec![(f32::INFINITY, f32::NEG_INFINITY); groups];
    for (k, chunk) in values.chunks(block).enumerate() {
        let (min, max) = &mut ranges[k % groups];
        for &v in chunk {
            *min = min.min(v);
            *max = max.max(v);
        }
    }
    let levels = f64::from(bits.max_level());
    // The range is computed in f64 so that `max - min` cannot overflow for extreme inputs.
    let params: Vec<(f64, f64)> = ranges
        .iter()
        .map(|&(min, max)| {
            let scale = ((f64::from(max) - f64::from(min)) / levels) as f32;
            out.extend_from_slice(&min.to_le_bytes());
            out.extend_from_slice(&scale.to_le_bytes());
            (f64::from(min), f64::from(scale))
        })
        .collect();
    let mut packer = BitPacker::new(bits, out);
    for (k, chunk) in values.chunks(block).enumerate() {
        let (min, scale) = params[k % groups];
        for &v in chunk {
            let q = if scale > 0.0 {
                ((f64::from(v) - min) / scale).round().clamp(0.0, levels) as u32
            } else {
                0
            };
            packer.push(q);
        }
    }
    packer.finish();
}

/// Writes N-bit values densely, least significant bit first.
struct BitPacker<'a> {
    bits: u32,
    pending: u64,
    pending_bits: u32,
    out: &'a mut Vec<u8>,
}

impl<'a> BitPacker<'a> {
    fn new(bits: IntBits, out: &'a mut Vec<u8>) -> Self {
        Self {
            bits: u32::from(bits.get()),
            pending: 0,
            pending_bits: 0,
            out,
        }
    }

    fn push(&mut self, q: u32) {
        self.pending |= u64::from(q) << self.pending_bits;
        self.pending_bits += self.bits;
        while self.pending_bits >= 8 {
            self.out.push(self.pending as u8);
            self.pending >>= 8;
            self.pending_bits -= 8;
        }
    }

    /// Flushes the last, zero-padded byte.
    fn finish(self) {
        if self.pending_bits > 0 {
            self.out.push(self.pending as u8);
        }
    }
}

impl fmt::Display for StepCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StepCodec {
    type Err = WireError;

    /// Parses a codec name, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CODECS
            .iter()
            .find(|(_, name, _)| name.eq_ignore_ascii_case(s))
            .map(|(codec, _, _)| *codec)
            .ok_or_else(|| WireError::UnknownStepCodec(s.to_string()))
    }
}

/// One encoded step tensor: codec, shape and payload. Built by [`StepCodec::encode`] or from a
/// received message; [`StepTensor::decode`] validates everything before trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTensor {
    /// How `payload` encodes the values.
    pub codec: StepCodec,
    /// The tensor's dimensions.
    pub shape: Vec<usize>,
    /// The encoded values (with per-group minimum and scale for the affine codecs).
    pub payload: Vec<u8>,
}

impl StepTensor {
    /// Bytes that cross the wire for the tensor data: the payload, including the affine codecs'
    /// per-group minimum and scale; not the shape or codec id, which the message carries beside.
    pub fn byte_len(&self) -> usize {
        self.payload.len()
    }

    /// Decodes into an f32 tensor of `shape` on `device`. Checks the shape, that the payload has
    /// exactly the codec's length for it, that affine minimums are finite and scales finite and
    /// non-negative, that padding bits are zero and that every value is finite, so a hostile
    /// message gets an error, never a panic or an allocation beyond 16 times its payload.
    pub fn decode(&self, device: &Device) -> Result<Tensor, WireError> {
        let expected = self.codec.payload_len(&self.shape)?;
        if self.payload.len() != expected {
            return Err(WireError::StepPayloadSize {
                codec: self.codec,
                shape: self.shape.clone(),
                expected,
                got: self.payload.len(),
            });
        }
        let count = element_count(&self.shape)?;
        let values: Vec<f32> = match self.codec {
            StepCodec::F32 => self
                .payload
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StepCodec::F16 => self
                .payload
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StepCodec::Bf16 => self
                .payload
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StepCodec::Fp8E4M3 => decode_fp8(fp8::E4M3, &self.payload),
            StepCodec::Fp8E5M2 => decode_fp8(fp8::E5M2, &self.payload),
            StepCodec::Int { bits, grouping } => {
                let (groups, block) = group_layout(grouping, &self.shape, count);
                self.decode_affine(bits, groups, block, count)?
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(WireError::NonFiniteStepValue {
                codec: self.codec,
                value: values[i],
                index: unravel(i, &self.shape),
            });
        }
        Ok(Tensor::from_vec(values, self.shape.as_slice(), device)?)
    }

    /// Unpacks an affine payload whose length has been checked.
    fn decode_affine(
        &self,
        bits: IntBits,
        groups: usize,
        block: usize,
        count: usize,
    ) -> Result<Vec<f32>, WireError> {
        let (params, packed) = self.payload.split_at(groups * 8);
        let params = params
            .chunks_exact(8)
            .enumerate()
            .map(|(group, p)| {
                let min = f32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                let scale = f32::from_le_bytes([p[4], p[5], p[6], p[7]]);
                if min.is_finite() && scale.is_finite() && scale >= 0.0 {
                    Ok((f64::from(min), f64::from(scale)))
                } else {
                    Err(WireError::InvalidAffineGroup {
                        codec: self.codec,
                        group,
                        min,
                        scale,
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let width = u32::from(bits.get());
        let used_bits = (count * width as usize) % 8;
        if used_bits != 0 && packed.last().is_some_and(|&last| last >> used_bits != 0) {
            return Err(WireError::NonZeroPadding(self.codec));
        }
        let mask = u64::from(bits.max_level());
        let mut bytes = packed.iter();
        let (mut pending, mut pending_bits) = (0u64, 0u32);
        let mut values = Vec::with_capacity(count);
        for k in 0..count.div_ceil(block) {
            let (min, scale) = params[k % groups];
            for _ in 0..block.min(count - k * block) {
                while pending_bits < width {
                    // The payload length was checked, so the bytes never run out here.
                    let byte = bytes.next().copied().unwrap_or(0);
                    pending |= u64::from(byte) << pending_bits;
                    pending_bits += 8;
                }
                let q = (pending & mask) as f64;
                pending >>= width;
                pending_bits -= width;
                values.push((min + scale * q) as f32);
            }
        }
        Ok(values)
    }
}

/// Decodes one byte per value through the format's table.
fn decode_fp8(format: Fp8Format, payload: &[u8]) -> Vec<f32> {
    let table = format.table();
    payload.iter().map(|&b| table[usize::from(b)]).collect()
}
