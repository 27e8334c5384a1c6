use std::fmt;
use std::ops::Range;

use lsplit_model::{ModelError, ModelSource, PartKind, PartSpec};
use sha2::{Digest, Sha256};

use crate::{ProtoError, pb};

/// Identity of a trunk: its layers within the model and a SHA-256 over the model's
/// configuration and the trunk tensors' names, shapes, types and stored bytes.
///
/// The server sends its trunk's fingerprint in the handshake; the device computes one from its
/// own model file and refuses to run against different weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkFingerprint {
    /// The trunk's layers, `[k1, k2)`.
    pub layers: Range<usize>,
    /// Layers of the whole model.
    pub model_layers: usize,
    /// Width of a hidden row.
    pub hidden_size: usize,
    /// The digest.
    pub sha256: [u8; 32],
}

impl TrunkFingerprint {
    /// Fingerprints layers `layers` of `source`, reading the bytes of every trunk tensor.
    pub fn compute(source: &ModelSource, layers: Range<usize>) -> Result<Self, ModelError> {
        let spec = PartSpec {
            kind: PartKind::Trunk,
            layers: layers.clone(),
        };
        let config = source.config();
        let mut hash = Sha256::new();
        hash.update(format!(
            "lsplit trunk\nlayers {layers:?}\nconfig {config:?}\n"
        ));
        for record in source.part_tensors(&spec)? {
            hash.update(format!(
                "tensor {} {:?} {}\n",
                record.name, record.shape, record.dtype
            ));
            hash.update(source.stored_bytes(&record.name)?);
        }
        Ok(Self {
            layers,
            model_layers: config.num_layers,
            hidden_size: config.hidden_size,
            sha256: hash.finalize().into(),
        })
    }

    /// The digest in hexadecimal.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The protocol message.
    pub fn to_pb(&self) -> pb::Fingerprint {
        pb::Fingerprint {
            first_layer: self.layers.start as u32,
            end_layer: self.layers.end as u32,
            model_layers: self.model_layers as u32,
            hidden_size: self.hidden_size as u32,
            sha256: self.sha256.to_vec(),
        }
    }

    /// From the protocol message, checking that it describes a trunk of a model.
    pub fn from_pb(message: &pb::Fingerprint) -> Result<Self, ProtoError> {
        let sha256 = <[u8; 32]>::try_from(message.sha256.as_slice()).map_err(|_| {
            ProtoError::OutOfRange {
                field: "fingerprint sha256 length",
                value: message.sha256.len() as u64,
            }
        })?;
        if message.first_layer > message.end_layer || message.end_layer > message.model_layers {
            return Err(ProtoError::OutOfRange {
                field: "fingerprint end_layer",
                value: u64::from(message.end_layer),
            });
        }
        Ok(Self {
            layers: message.first_layer as usize..message.end_layer as usize,
            model_layers: message.model_layers as usize,
            hidden_size: message.hidden_size as usize,
            sha256,
        })
    }
}

impl fmt::Display for TrunkFingerprint {
    /// `layers 2..28 of 30, sha256 1a2b3c4d5e6f…`: enough to tell two trunks apart in a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layers {}..{} of {}, sha256 {}",
            self.layers.start,
            self.layers.end,
            self.model_layers,
            &self.hex()[..16]
        )
    }
}
