//! The device's side of a remote language-model trunk: [`RemoteTrunk`] implements the split
//! engine's [`Trunk`] over the protocol of `lsplit-proto`, on the reconnecting [`Link`].
//!
//! Connecting performs the handshake, which tells the device which layers the server runs and
//! the fingerprint of its weights; the device checks that fingerprint against its own model
//! with [`RemoteTrunk::verify`] before use. A session ([`RemoteTrunk::with_keys`]) sends its
//! keys, secret included, in the session's `Open` message, inside TLS; its steps are tagged
//! `Step` messages. If the connection drops mid-generation, the next step reconnects, opens a
//! new session with the same keys and replays this session's steps to rebuild the server's
//! state (KV cache, catch-up rows, step count), so the generated text does not change.

use std::ops::Range;

use lsplit_model::TrunkFingerprint;
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, ProtoError, codec_from_pb, codec_to_pb, fingerprint_from_pb};
use lsplit_split::{SessionKeys, StepRows, Trunk, TrunkError};
use lsplit_wire::Codec;

use crate::link::{Announced, Link, Offering, Protocol, ServerTerms, Wire};
use crate::{RemoteError, RemoteOptions};

/// What the handshake told the device: the trunk's layers and fingerprint, the codec of this
/// device's rows and the server's limits.
pub type ServerInfo = ServerTerms<TrunkFingerprint, Codec, pb::Limits>;

impl Protocol for Offering<Codec> {
    type Service = pb::Trunk;
    type Terms = ServerInfo;
    const WIRE: Wire = Wire::new("trunk", PROTOCOL_VERSION);

    fn agreed(
        &self,
        welcome: pb::HandshakeReply,
        tls: Option<String>,
    ) -> Result<ServerInfo, RemoteError> {
        server_info(welcome, tls)
    }

    fn hello(&self) -> pb::HandshakeRequest {
        let codecs = self.codecs.iter().map(|&c| codec_to_pb(c) as i32);
        pb::HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            codecs: codecs.collect(),
        }
    }

    fn session_id(reply: &SessionReply) -> Option<u64> {
        match &reply.kind {
            Some(ReplyKind::Opened(opened)) => Some(opened.session_id),
            _ => None,
        }
    }

    fn answers(sent: &SessionRequest, reply: &SessionReply) -> bool {
        matches!(
            (&sent.kind, &reply.kind),
            (Some(RequestKind::Step(sent)), Some(ReplyKind::Step(out))) if out.step == sent.step
        )
    }
}

/// The terms of a language-model trunk's handshake reply (the trunk's and the training
/// service's) over a connection of `tls`.
pub(crate) fn server_info(
    welcome: pb::HandshakeReply,
    tls: Option<String>,
) -> Result<ServerInfo, RemoteError> {
    let protocol = |e: ProtoError| RemoteError::Protocol(e.to_string());
    let fingerprint = welcome
        .fingerprint
        .as_ref()
        .ok_or(ProtoError::Missing("fingerprint"))
        .and_then(fingerprint_from_pb)
        .map_err(protocol)?;
    let codec = codec_from_pb(welcome.codec).map_err(protocol)?;
    ServerTerms::new(fingerprint, codec, welcome.limits, tls)
}

impl Announced for pb::Limits {
    fn binding(&self) -> Option<String> {
        Some(format!("KV cache precision {}", self.kv_precision))
    }

    fn max_message_bytes(&self) -> u64 {
        self.max_message_bytes
    }
}

/// A trunk running on a server, for one generation session.
#[derive(Debug)]
pub struct RemoteTrunk {
    link: Link<Offering<Codec>>,
}

impl RemoteTrunk {
    /// Connects to the server and performs the handshake; opens no session yet.
    pub fn connect(options: RemoteOptions) -> Result<Self, RemoteError> {
        let protocol = Offering {
            codecs: options.codecs.clone(),
        };
        Ok(Self {
            link: Link::connect(options, protocol)?,
        })
    }

    /// Gives the session its keys: they go to the server when the session opens (inside TLS).
    /// A session opens at its first step, so call this before it.
    pub fn with_keys(mut self, keys: SessionKeys) -> Self {
        let info = self.info();
        let open = pb::Open {
            protocol_version: PROTOCOL_VERSION,
            codec: codec_to_pb(info.codec) as i32,
            fingerprint_sha256: info.fingerprint.sha256.to_vec(),
            keys: Some(lsplit_proto::keys_to_pb(&keys)),
        };
        self.link.begin(SessionRequest {
            kind: Some(RequestKind::Open(open)),
        });
        self
    }

    /// What the handshake told: fingerprint, codec and limits.
    pub fn info(&self) -> &ServerInfo {
        self.link.terms()
    }

    /// Refuses a server whose trunk differs from `local`, the device's fingerprint of the same
    /// layers of its own model.
    pub fn verify(&self, local: &TrunkFingerprint) -> Result<(), RemoteError> {
        let server = &self.info().fingerprint;
        if local == server {
            Ok(())
        } else {
            Err(RemoteError::FingerprintMismatch {
                server: Box::new(server.clone()),
                local: Box::new(local.clone()),
            })
        }
    }
}

impl Trunk for RemoteTrunk {
    fn layers(&self) -> Range<usize> {
        self.info().fingerprint.layers.clone()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        if !self.link.begun() {
            return Err(RemoteError::Config(
                "a trunk session needs its keys: give them with_keys".into(),
            )
            .into());
        }
        let request = SessionRequest {
            kind: Some(RequestKind::Step(lsplit_proto::step_to_pb(message))),
        };
        match self.link.call(request, true)?.kind {
            Some(ReplyKind::Step(out)) => Ok(lsplit_proto::step_from_pb(out)
                .map_err(|e| RemoteError::Protocol(e.to_string()))?),
            _ => {
                Err(RemoteError::Protocol("the server answered a step without rows".into()).into())
            }
        }
    }
}
