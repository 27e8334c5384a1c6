//! What both ends of the diffusion trunk protocol share: its generated code and the checked
//! conversion between the protocol's `Tensor` and the wire crate's [`StepTensor`].

use lsplit_wire::{StepCodec, StepTensor};

/// Generated protobuf messages, gRPC client and [`crate::Service`] of package
/// `lsplit.diffusion.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("lsplit.diffusion.v1");
}

/// The diffusion protocol version this build speaks; both ends must agree exactly.
pub const DIFFUSION_PROTOCOL_VERSION: u32 = 1;

/// Most dimensions a step tensor may have (UNet tensors have at most 4).
pub const MAX_TENSOR_RANK: usize = 8;

/// A protocol tensor that cannot be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// A codec id that names no step codec.
    #[error("tensor {index}: unknown step codec id {id}")]
    UnknownCodec {
        /// The tensor's position in its message.
        index: usize,
        /// The id received.
        id: u32,
    },
    /// A codec other than the session's.
    #[error("tensor {index} is encoded in {got} but the session's codec is {expected}")]
    WrongCodec {
        /// The tensor's position in its message.
        index: usize,
        /// The codec received.
        got: StepCodec,
        /// The session's codec.
        expected: StepCodec,
    },
    /// A shape with too many dimensions, a zero dimension or no dimension at all.
    #[error(
        "tensor {index} has shape {shape:?}: expected 1 to {MAX_TENSOR_RANK} dimensions, none of \
         them 0"
    )]
    Shape {
        /// The tensor's position in its message.
        index: usize,
        /// The declared shape (up to its first 16 dimensions).
        shape: Vec<u64>,
    },
    /// The message declares more elements than the limit allows.
    #[error(
        "the message's tensors declare more than {limit} elements (this server's limit per \
         message); tensor {index} has shape {shape:?}"
    )]
    TooManyElements {
        /// The tensor that went past the limit.
        index: usize,
        /// Its declared shape.
        shape: Vec<u64>,
        /// The limit.
        limit: u64,
    },
    /// A payload whose length is not the codec's for the shape.
    #[error(
        "tensor {index}: {codec} payload of {got} bytes does not match shape {shape:?} \
         ({expected} bytes expected)"
    )]
    PayloadSize {
        /// The tensor's position in its message.
        index: usize,
        /// Its codec.
        codec: StepCodec,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
}

/// The protocol message for an encoded tensor (the payload is copied).
pub fn tensor_to_pb(tensor: &StepTensor) -> pb::Tensor {
    pb::Tensor {
        codec: u32::from(tensor.codec.id()),
        shape: tensor.shape.iter().map(|&d| d as u64).collect(),
        payload: tensor.payload.clone(),
    }
}

/// Encoded tensors from a message, checked before anything is allocated for them: each must be
/// in `codec`, have 1 to [`MAX_TENSOR_RANK`] non-zero dimensions and a payload of exactly the
/// codec's length, and all together must declare at most `max_elements` elements. The values
/// themselves are checked by [`StepTensor::decode`].
pub fn tensors_from_pb(
    tensors: Vec<pb::Tensor>,
    codec: StepCodec,
    max_elements: u64,
) -> Result<Vec<StepTensor>, TensorError> {
    let mut declared = 0u64;
    tensors
        .into_iter()
        .enumerate()
        .map(|(index, tensor)| {
            let got = u8::try_from(tensor.codec)
                .ok()
                .and_then(|id| StepCodec::from_id(id).ok())
                .ok_or(TensorError::UnknownCodec {
                    index,
                    id: tensor.codec,
                })?;
            if got != codec {
                return Err(TensorError::WrongCodec {
                    index,
                    got,
                    expected: codec,
                });
            }
            let rank = tensor.shape.len();
            if rank == 0 || rank > MAX_TENSOR_RANK || tensor.shape.contains(&0) {
                return Err(TensorError::Shape {
                    index,
                    shape: tensor.shape.iter().take(16).copied().collect(),
                });
            }
            let too_many = || TensorError::TooManyElements {
                index,
                shape: tensor.shape.clone(),
                limit: max_elements,
            };
            let elements = tensor
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(too_many)?;
            declared = declared.checked_add(elements).ok_or_else(too_many)?;
            if declared > max_elements {
                return Err(too_many());
            }
            let shape: Vec<usize> = tensor
                .shape
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| too_many()))
                .collect::<Result<_, _>>()?;
            let expected = codec.payload_len(&shape).map_err(|_| too_many())?;
            if tensor.payload.len() != expected {
                return Err(TensorError::PayloadSize {
                    index,
                    codec,
                    shape,
                    expected,
                    got: tensor.payload.len(),
                });
            }
            Ok(StepTensor {
                codec,
                shape,
                payload: tensor.payload,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(codec: u32, shape: &[u64], payload: usize) -> pb::Tensor {
        pb::Tensor {
            codec,
            shape: shape.to_vec(),
            payload: vec![0; payload],
        }
    }

    #[test]
    fn tensors_round_trip_through_the_protocol() {
        let int4 = StepCodec::Int {
            bits: lsplit_wire::IntBits::new(4).unwrap(),
            grouping: lsplit_wire::Grouping::PerChannel,
        };
        let encoded = StepTensor {
            codec: int4,
            shape: vec![1, 2, 3],
            payload: (0..19).collect(),
        };
        let back = tensors_from_pb(vec![tensor_to_pb(&encoded)], int4, 6).unwrap();
        assert_eq!(back, vec![encoded]);
    }

    #[test]
    fn hostile_tensors_are_refused_before_allocation() {
        let f32 = StepCodec::F32;
        let check =
            |tensors: Vec<pb::Tensor>| tensors_from_pb(tensors, f32, 1000).unwrap_err().to_string();
        assert_eq!(
            check(vec![tensor(0, &[2], 8), tensor(0x99, &[2], 8)]),
            "tensor 1: unknown step codec id 153"
        );
        assert_eq!(
            check(vec![tensor(1 << 20, &[2], 8)]),
            "tensor 0: unknown step codec id 1048576"
        );
        assert_eq!(
            check(vec![tensor(1, &[2], 4)]),
            "tensor 0 is encoded in f16 but the session's codec is f32"
        );
        assert_eq!(
            check(vec![tensor(0, &[], 4)]),
            "tensor 0 has shape []: expected 1 to 8 dimensions, none of them 0"
        );
        assert_eq!(
            check(vec![tensor(0, &[2, 0], 0)]),
            "tensor 0 has shape [2, 0]: expected 1 to 8 dimensions, none of them 0"
        );
        assert_eq!(
            check(vec![tensor(0, &[1; 9], 4)]),
            "tensor 0 has shape [1, 1, 1, 1, 1, 1, 1, 1, 1]: expected 1 to 8 dimensions, none \
             of them 0"
        );
        assert_eq!(
            check(vec![tensor(0, &[600], 2400), tensor(0, &[401], 1604)]),
            "the message's tensors declare more than 1000 elements (this server's limit per \
             message); tensor 1 has shape [401]"
        );
        assert_eq!(
            check(vec![tensor(0, &[u64::MAX, u64::MAX], 0)]),
            format!(
                "the message's tensors declare more than 1000 elements (this server's limit per \
                 message); tensor 0 has shape [{0}, {0}]",
                u64::MAX
            )
        );
        assert_eq!(
            check(vec![tensor(0, &[2, 3], 23)]),
            "tensor 0: f32 payload of 23 bytes does not match shape [2, 3] (24 bytes expected)"
        );
    }
}
