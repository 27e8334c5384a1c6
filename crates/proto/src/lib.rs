//! The trunk protocol between a device and `lsplit serve`.
//!
//! `proto/trunk.proto` is the documented source of truth; [`pb`] is the Rust generated from it
//! (messages, client and server stubs). This crate adds what both ends share: conversions
//! between the wire crate's [`HiddenRows`] and the protocol's `Rows`, and the
//! [`TrunkFingerprint`] each side computes from its own copy of the model.

mod fingerprint;

pub use fingerprint::TrunkFingerprint;

use lsplit_wire::{Codec, HiddenRows};

/// Generated protobuf messages and gRPC stubs of package `lsplit.trunk.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("lsplit.trunk.v1");
}

/// The protocol version this build speaks; both ends must agree exactly.
pub const PROTOCOL_VERSION: u32 = 1;

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
            let rows = HiddenRows {
                codec,
                rows: 1,
                width: 576,
                start: 1000,
                bytes: vec![0; payload],
            };
            let request = pb::SessionRequest {
                kind: Some(pb::session_request::Kind::Rows(rows_to_pb(&rows))),
            };
            let reply = pb::SessionReply {
                kind: Some(pb::session_reply::Kind::Rows(rows_to_pb(&rows))),
            };
            assert_eq!(request.encoded_len(), payload + 16, "{codec}");
            assert_eq!(reply.encoded_len(), payload + 16, "{codec}");
        }
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
