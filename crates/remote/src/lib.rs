//! The device's side of a remote trunk, over gRPC and TLS 1.3.
//!
//! [`RemoteTrunk`] implements the split engine's [`lsplit_split::Trunk`] over the protocol of
//! `lsplit-proto`; [`RemoteDiffusionTrunk`] implements `lsplit_diffusion::DiffusionTrunk`
//! over `lsplit_proto::diffusion`. Both are a model kind's messages on one reconnecting client
//! (`link.rs`): it owns a small tokio runtime and blocks at the trait boundary, so the device's
//! loops stay synchronous and unaware of the network; it runs the handshake, which tells the
//! device the server's trunk, fingerprint, codec and limits; and when the connection drops it
//! reconnects with jittered backoff and replays the session, so the output does not change.
//!
//! The device checks the server's fingerprint against its own model ([`RemoteTrunk::verify`],
//! [`RemoteDiffusionTrunk::verify_model`]) before use.

mod backoff;
mod channel;
mod diffusion;
mod error;
mod health;
mod link;
mod options;
mod tls;
mod train;
mod trunk;

pub use diffusion::{DiffusionServerInfo, RemoteDiffusionTrunk};
pub use error::RemoteError;
pub use health::{ServingStatus, TRUNK_SERVICE, check_health};
pub use link::ServerTerms;
pub use options::{CloudFiles, RemoteOptions};
pub use train::{RemoteTrainTrunk, Traffic};
pub use trunk::{RemoteTrunk, ServerInfo};
