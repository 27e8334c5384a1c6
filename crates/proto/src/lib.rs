//! The trunk protocol between a device and `lsplit serve`.
//!
//! `proto/trunk.proto` is the documented source of truth; [`pb`] is the Rust generated from it
//! (messages, client stubs and the [`Service`] description that the generic client and server
//! use). This crate adds what both ends share: conversions between the wire crate's
//! [`HiddenRows`] and the protocol's `Rows`, and between the model crate's
//! [`TrunkFingerprint`](lsplit_model::TrunkFingerprint) and the handshake's `Fingerprint`.
//!
//! `proto/diffusion.proto` is the protocol of a split diffusion model's trunk; [`diffusion`]
//! holds its generated code and the checked conversion of its tensors.
//!
//! Both ends read their TLS certificates with [`certificates`].

pub mod diffusion;
mod fingerprint;
mod pem;
mod service;

pub use fingerprint::{fingerprint_from_pb, fingerprint_to_pb};
pub use pem::{PemError, certificates};
pub use service::Service;

use lsplit_split::{Obfuscation, SessionKeys, SessionSecret, SplitPolicy, StepRows};
use lsplit_wire::{Codec, HiddenRows};

/// Generated protobuf messages, gRPC client and [`Service`] of package `lsplit.trunk.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("lsplit.trunk.v1");
}

/// The protocol version this build speaks; both ends must agree exactly. Version 3: steps of
/// several positions and their `rewind` (see `proto/trunk.proto`).
pub const PROTOCOL_VERSION: u32 = 3;

/// The version of the `TrainTrunk` service (split fine-tuning) this build speaks; both ends must
/// agree exactly. Version 1: `Forward` and `Backward` passes (see `proto/trunk.proto`).
pub const TRAIN_PROTOCOL_VERSION: u32 = 1;

/// Errors turning protocol messages into the crate's types.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A codec value that names no codec.
    #[error("unknown codec value {0} (expected f32, f16, bf16 or int8)")]
    UnknownCodec(i32),
    /// A field that does not fit this machine's integers.
    #[error("{field} = {value} is out of range")]
    OutOfRange {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A required message field is absent.
    #[error("the {0} field is missing")]
    Missing(&'static str),
    /// Session keys that describe no valid policy.
    #[error("session keys: {0}")]
    Keys(String),
}

/// The protocol's codec value for a wire codec.
pub fn codec_to_pb(codec: Codec) -> pb::Codec {
    match codec {
        Codec::F32 => pb::Codec::F32,
        Codec::F16 => pb::Codec::F16,
        Codec::Bf16 => pb::Codec::Bf16,
        Codec::Int8 => pb::Codec::Int8,
    }
}

/// The wire codec a protocol codec value names.
pub fn codec_from_pb(value: i32) -> Result<Codec, ProtoError> {
    match pb::Codec::try_from(value) {
        Ok(pb::Codec::F32) => Ok(Codec::F32),
        Ok(pb::Codec::F16) => Ok(Codec::F16),
        Ok(pb::Codec::Bf16) => Ok(Codec::Bf16),
        Ok(pb::Codec::Int8) => Ok(Codec::Int8),
        Ok(pb::Codec::Unspecified) | Err(_) => Err(ProtoError::UnknownCodec(value)),
    }
}

/// The protocol message for hidden rows (the payload is copied).
pub fn rows_to_pb(rows: &HiddenRows) -> pb::Rows {
    pb::Rows {
        start: rows.start as u64,
        rows: rows.rows as u32,
        width: rows.width as u32,
        codec: codec_to_pb(rows.codec) as i32,
        payload: rows.bytes.clone(),
    }
}

/// Hidden rows from their protocol message; the payload is checked later, by `decode`.
pub fn rows_from_pb(rows: pb::Rows) -> Result<HiddenRows, ProtoError> {
    let start = usize::try_from(rows.start).map_err(|_| ProtoError::OutOfRange {
        field: "start",
        value: rows.start,
    })?;
    Ok(HiddenRows {
        codec: codec_from_pb(rows.codec)?,
        rows: rows.rows as usize,
        width: rows.width as usize,
        start,
        bytes: rows.payload,
    })
}

/// The protocol message for a step (the payload is copied).
pub fn step_to_pb(step: &StepRows) -> pb::Step {
    pb::Step {
        step: step.step,
        rows: Some(rows_to_pb(&step.rows)),
        tag: step.tag.to_vec(),
        rewind: step.rewind as u64,
    }
}

/// A step from its protocol message.
pub fn step_from_pb(step: pb::Step) -> Result<StepRows, ProtoError> {
    let tag = <[u8; 16]>::try_from(step.tag.as_slice()).map_err(|_| ProtoError::OutOfRange {
        field: "tag length",
        value: step.tag.len() as u64,
    })?;
    let rewind = usize::try_from(step.rewind).map_err(|_| ProtoError::OutOfRange {
        field: "rewind",
        value: step.rewind,
    })?;
    Ok(StepRows {
        step: step.step,
        rows: rows_from_pb(step.rows.ok_or(ProtoError::Missing("rows"))?)?,
        rewind,
        tag,
    })
}

/// The protocol message for session keys; it holds the secret, so it only travels inside TLS.
pub fn keys_to_pb(keys: &SessionKeys) -> pb::SessionKeys {
    let list = |v: &[usize]| v.iter().map(|&k| k as u32).collect();
    pb::SessionKeys {
        k1: list(keys.policy.k1s()),
        k2: list(keys.policy.k2s()),
        obfuscation: match keys.obfuscation {
            Obfuscation::None => pb::Obfuscation::None,
            Obfuscation::Permute => pb::Obfuscation::Permute,
        } as i32,
        secret: keys.secret.as_bytes().to_vec(),
    }
}

/// Session keys from their protocol message, for a model of `layers` layers. Each list of
/// split points holds at most `layers + 1` values (every point there is), so a hostile list
/// is refused before it is widened and sorted.
pub fn keys_from_pb(keys: &pb::SessionKeys, layers: usize) -> Result<SessionKeys, ProtoError> {
    let list = |v: &[u32]| v.iter().map(|&k| k as usize).collect::<Vec<_>>();
    for (name, list) in [("k1", &keys.k1), ("k2", &keys.k2)] {
        if list.len() > layers.saturating_add(1) {
            return Err(ProtoError::Keys(format!(
                "the {name} list has {} values but a model of {layers} layers has only {} split \
                 points",
                list.len(),
                layers.saturating_add(1)
            )));
        }
    }
    let policy = SplitPolicy::random(&list(&keys.k1), &list(&keys.k2), layers)
        .map_err(|e| ProtoError::Keys(e.to_string()))?;
    let obfuscation = match pb::Obfuscation::try_from(keys.obfuscation) {
        Ok(pb::Obfuscation::None) => Obfuscation::None,
        Ok(pb::Obfuscation::Permute) => Obfuscation::Permute,
        Err(_) => {
            return Err(ProtoError::Keys(format!(
                "unknown obfuscation value {}",
                keys.obfuscation
            )));
        }
    };
    let secret = <[u8; 32]>::try_from(keys.secret.as_slice()).map_err(|_| {
        ProtoError::Keys(format!("the secret is {} bytes, not 32", keys.secret.len()))
    })?;
    Ok(SessionKeys {
        policy,
        obfuscation,
        secret: SessionSecret::from_bytes(secret),
    })
}

/// An error and its sources, joined into one line: transport errors hide the useful part
/// (the TLS or connection failure) in the chain, and both ends report them to people.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_protocol() {
        let rows = HiddenRows {
            codec: Codec::Int8,
            rows: 2,
            width: 3,
            start: 17,
            bytes: (0..14).collect(),
        };
        assert_eq!(rows_from_pb(rows_to_pb(&rows)), Ok(rows));
    }

    #[test]
    fn a_decode_step_costs_its_payload_plus_a_few_bytes_of_protobuf() {
        use prost::Message;
        for (codec, payload) in [
            (Codec::F32, 2304),
            (Codec::F16, 1152),
            (Codec::Bf16, 1152),
            (Codec::Int8, 580),
        ] {
            let step = StepRows {
                step: 1000,
                rows: HiddenRows {
                    codec,
                    rows: 1,
                    width: 576,
                    start: 1000,
                    bytes: vec![0; payload],
                },
                rewind: 0,
                tag: [7; 16],
            };
            let request = pb::SessionRequest {
                kind: Some(pb::session_request::Kind::Step(step_to_pb(&step))),
            };
            let reply = pb::SessionReply {
                kind: Some(pb::session_reply::Kind::Step(step_to_pb(&step))),
            };

            assert_eq!(request.encoded_len(), payload + 40, "{codec}");
            assert_eq!(reply.encoded_len(), payload + 40, "{codec}");
        }
    }

    #[test]
    fn keyed_messages_round_trip_and_bad_keys_are_refused() {
        let keys = SessionKeys {
            policy: SplitPolicy::random(&[1, 2], &[28, 29], 30).expect("policy"),
            obfuscation: Obfuscation::Permute,
            secret: SessionSecret::from_bytes([3; 32]),
        };
        assert_eq!(keys_from_pb(&keys_to_pb(&keys), 30), Ok(keys.clone()));
        let mut short = keys_to_pb(&keys);
        short.secret.pop();
        assert_eq!(
            keys_from_pb(&short, 30).unwrap_err().to_string(),
            "session keys: the secret is 31 bytes, not 32"
        );
        let mut long = keys_to_pb(&keys);
        long.k2 = vec![29; 32];
        assert_eq!(
            keys_from_pb(&long, 30).unwrap_err().to_string(),
            "session keys: the k2 list has 32 values but a model of 30 layers has only 31 split \
             points"
        );
        assert_eq!(
            keys_from_pb(&keys_to_pb(&keys), 20)
                .unwrap_err()
                .to_string(),
            "session keys: --k2 29 is past this model's L = 20 layers"
        );
        let step = StepRows {
            step: 9,
            rows: HiddenRows {
                codec: Codec::F32,
                rows: 1,
                width: 1,
                start: 4,
                bytes: vec![0; 4],
            },
            rewind: 3,
            tag: [5; 16],
        };
        assert_eq!(step_from_pb(step_to_pb(&step)), Ok(step.clone()));
        let mut untagged = step_to_pb(&step);
        untagged.tag.clear();
        assert_eq!(
            step_from_pb(untagged).unwrap_err().to_string(),
            "tag length = 0 is out of range"
        );
    }

    #[test]
    fn unknown_codec_values_are_refused() {
        let mut rows = rows_to_pb(&HiddenRows {
            codec: Codec::F32,
            rows: 1,
            width: 1,
            start: 0,
            bytes: vec![0; 4],
        });
        rows.codec = 9;
        assert_eq!(
            rows_from_pb(rows.clone()).unwrap_err().to_string(),
            "unknown codec value 9 (expected f32, f16, bf16 or int8)"
        );
        rows.codec = 0;
        assert_eq!(rows_from_pb(rows), Err(ProtoError::UnknownCodec(0)));
    }
}
