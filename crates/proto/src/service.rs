//! What a gRPC service of this crate's .proto files is, as both ends call it: a unary
//! `Handshake`, then one session stream of requests and replies. build.rs implements
//! [`Service`] for each service from its .proto ([`crate::pb::Trunk`],
//! [`crate::diffusion::pb::DiffusionTrunk`]); both handshake messages of every service begin
//! with `uint32 protocol_version = 1`, which the generic ends check.

/// A service's gRPC paths and messages.
pub trait Service: Send + Sync + 'static {
    /// The service's full name in gRPC paths: `lsplit.trunk.v1.Trunk`.
    const NAME: &'static str;
    /// The bidirectional session method: `Session`, `Image`.
    const SESSION: &'static str;
    /// The handshake's request.
    type Hello: prost::Message + Default + Send + Sync + 'static;
    /// The handshake's reply.
    type Welcome: prost::Message + Default + Send + Sync + 'static;
    /// A message the device sends on the session stream.
    type Request: prost::Message + Default + Clone + Send + Sync + 'static;
    /// A message the server answers with on the session stream.
    type Reply: prost::Message + Default + Send + Sync + 'static;

    /// The protocol version a device's handshake offers.
    fn hello_version(hello: &Self::Hello) -> u32;
    /// The protocol version a server's handshake reply speaks.
    fn welcome_version(welcome: &Self::Welcome) -> u32;
}
