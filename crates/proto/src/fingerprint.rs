//! The trunk fingerprint's protocol message: the server sends its trunk's
//! [`TrunkFingerprint`] in the handshake and the device checks it against its own.

use lsplit_model::TrunkFingerprint;

use crate::{ProtoError, pb};

/// The protocol message for a trunk fingerprint.
pub fn fingerprint_to_pb(fingerprint: &TrunkFingerprint) -> pb::Fingerprint {
    pb::Fingerprint {
        first_layer: fingerprint.layers.start as u32,
        end_layer: fingerprint.layers.end as u32,
        model_layers: fingerprint.model_layers as u32,
        hidden_size: fingerprint.hidden_size as u32,
        sha256: fingerprint.sha256.to_vec(),
    }
}

/// A trunk fingerprint from its protocol message, checking that it describes a trunk of a model.
pub fn fingerprint_from_pb(message: &pb::Fingerprint) -> Result<TrunkFingerprint, ProtoError> {
    let sha256 =
        <[u8; 32]>::try_from(message.sha256.as_slice()).map_err(|_| ProtoError::OutOfRange {
            field: "fingerprint sha256 length",
            value: message.sha256.len() as u64,
        })?;
    if message.first_layer > message.end_layer || message.end_layer > message.model_layers {
        return Err(ProtoError::OutOfRange {
            field: "fingerprint end_layer",
            value: u64::from(message.end_layer),
        });
    }
    Ok(TrunkFingerprint {
        layers: message.first_layer as usize..message.end_layer as usize,
        model_layers: message.model_layers as usize,
        hidden_size: message.hidden_size as usize,
        sha256,
    })
}
