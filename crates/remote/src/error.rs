//! The errors of the remote trunk clients, and which of them a reconnection may cure.

use std::time::Duration;

use lsplit_model::TrunkFingerprint;
use lsplit_split::TrunkError;
use tonic::{Code, Status};

/// Errors of the remote trunk client.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The options are contradictory or unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or the TLS handshake failed.
    #[error("could not connect to the trunk server at {url}: {reason}")]
    Connect {
        /// The server's address.
        url: String,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("the trunk server refused: {message} ({code:?})")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The server runs different weights than the device's model.
    #[error(
        "the trunk server runs a different model: server trunk {server}, this device's model {local}"
    )]
    FingerprintMismatch {
        /// The server's fingerprint.
        server: Box<TrunkFingerprint>,
        /// The device's fingerprint of the same layers.
        local: Box<TrunkFingerprint>,
    },
    /// The diffusion server runs a different trunk than the device's model.
    #[error(
        "the diffusion trunk server runs a different model: server {server}, this device's model \
         {local}"
    )]
    DiffusionFingerprintMismatch {
        /// The server's fingerprint.
        server: lsplit_diffusion::TrunkFingerprint,
        /// The device's fingerprint of the same split.
        local: lsplit_diffusion::TrunkFingerprint,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("the trunk server did not answer within {0:?}")]
    Timeout(Duration),
    /// The server stayed unreachable through every retry.
    #[error(
        "the trunk server at {url} stayed unreachable for {waited:?} ({attempts} attempts): {last}"
    )]
    GaveUp {
        /// The server's address.
        url: String,
        /// Time spent retrying.
        waited: Duration,
        /// Connection attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl From<lsplit_proto::PemError> for RemoteError {
    fn from(error: lsplit_proto::PemError) -> Self {
        RemoteError::Config(format!("TLS setup failed: {error}"))
    }
}

impl From<RemoteError> for TrunkError {
    fn from(error: RemoteError) -> Self {
        TrunkError::Transport(error.to_string())
    }
}

/// Errors that a new connection and a replay may cure.
pub(crate) fn retryable(error: &RemoteError) -> bool {
    match error {
        RemoteError::Connect { .. } | RemoteError::Timeout(_) => true,
        RemoteError::Refused { code, .. } => matches!(
            code,
            Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::Aborted
                | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// Whether the server refused for lack of room (sessions, budget), which may pass.
pub(crate) fn at_capacity(error: &RemoteError) -> bool {
    matches!(
        error,
        RemoteError::Refused {
            code: Code::ResourceExhausted,
            ..
        }
    )
}

/// The error for a status the server answered with.
pub(crate) fn refused(status: Status) -> RemoteError {
    let message = status.message().to_string();
    let message = if message.is_empty() {
        format!("{status}")
    } else {
        message
    };
    RemoteError::Refused {
        code: status.code(),
        message,
    }
}
