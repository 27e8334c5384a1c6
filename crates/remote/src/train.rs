//! The device's side of split fine-tuning on a server: [`RemoteTrainTrunk`] implements
//! [`TrainTrunk`] over the `TrainTrunk` service of `lsplit-proto` on the reconnecting [`Link`].
//! The latest `Forward` is the one request a new stream replays, so a connection lost between a
//! forward pass and its backward pass rebuilds the server's activations before the backward.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use lsplit_model::TrunkFingerprint;
use lsplit_proto::pb::train_reply::Kind as ReplyKind;
use lsplit_proto::pb::train_request::Kind as RequestKind;
use lsplit_proto::pb::{self, TrainReply, TrainRequest};
use lsplit_proto::{TRAIN_PROTOCOL_VERSION, codec_to_pb, rows_from_pb, rows_to_pb};
use lsplit_train::{TrainError, TrainTrunk};
use lsplit_wire::Codec;

use crate::link::{Link, Protocol, Wire};
use crate::trunk::server_info;
use crate::{RemoteError, RemoteOptions, ServerInfo};

/// The training protocol offering the device's codecs, most preferred first.
#[derive(Debug)]
struct Training {
    codecs: Vec<Codec>,
}

impl Protocol for Training {
    type Service = pb::TrainTrunk;
    type Terms = ServerInfo;
    const WIRE: Wire = Wire::new("training", TRAIN_PROTOCOL_VERSION);

    fn hello(&self) -> pb::HandshakeRequest {
        pb::HandshakeRequest {
            protocol_version: TRAIN_PROTOCOL_VERSION,
            codecs: self.codecs.iter().map(|&c| codec_to_pb(c) as i32).collect(),
        }
    }

    fn agreed(
        &self,
        welcome: pb::HandshakeReply,
        tls: Option<String>,
    ) -> Result<ServerInfo, RemoteError> {
        server_info(welcome, tls)
    }

    fn session_id(reply: &TrainReply) -> Option<u64> {
        match &reply.kind {
            Some(ReplyKind::Opened(opened)) => Some(opened.session_id),
            _ => None,
        }
    }

    fn answers(sent: &TrainRequest, reply: &TrainReply) -> bool {
        matches!(
            (&sent.kind, &reply.kind),
            (Some(RequestKind::Forward(sent)), Some(ReplyKind::Forward(out))) if out.pass == sent.pass
        )
    }
}

/// Payload bytes (encoded rows and gradients, replays included) that a training session sent
/// to its server and received from it: what `lsplit finetune --cloud` reports per token.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Device to server: forward rows and output gradients.
    pub sent: AtomicU64,
    /// Server to device: output rows and input gradients.
    pub received: AtomicU64,
}

/// A trunk on a server computing the forward and backward passes of a device's training.
#[derive(Debug)]
pub struct RemoteTrainTrunk {
    link: Link<Training>,
    traffic: Arc<Traffic>,
    /// The latest forward pass's index, awaiting its backward pass.
    pass: Option<u64>,
    passes: u64,
}

impl RemoteTrainTrunk {
    /// Connects, performs the handshake and begins a training session (opened at the first
    /// pass).
    pub fn connect(options: RemoteOptions) -> Result<Self, RemoteError> {
        let protocol = Training {
            codecs: options.codecs.clone(),
        };
        let mut link = Link::connect(options, protocol)?;
        let info = link.terms();
        let open = pb::TrainOpen {
            protocol_version: TRAIN_PROTOCOL_VERSION,
            codec: codec_to_pb(info.codec) as i32,
            fingerprint_sha256: info.fingerprint.sha256.to_vec(),
        };
        link.begin(TrainRequest {
            kind: Some(RequestKind::Open(open)),
        });
        Ok(Self {
            link,
            traffic: Arc::default(),
            pass: None,
            passes: 0,
        })
    }

    /// What the handshake told: fingerprint, codec and limits.
    pub fn info(&self) -> &ServerInfo {
        self.link.terms()
    }

    /// The session's payload counters, shared (they stay readable once the trunk is boxed).
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }

    /// The model layers the server runs.
    pub fn layers(&self) -> Range<usize> {
        self.info().fingerprint.layers.clone()
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

    /// `t` in the session's codec, as rows from position 0.
    fn encode(&self, t: &Tensor) -> Result<pb::Rows, TrainError> {
        let rows = self
            .info()
            .codec
            .encode(t, 0)
            .map_err(|e| TrainError::Trunk(e.to_string()))?;
        self.traffic
            .sent
            .fetch_add(rows.bytes.len() as u64, Ordering::Relaxed);
        Ok(rows_to_pb(&rows))
    }

    /// Rows of a reply, checked to have `like`'s shape.
    fn decode(&self, rows: Option<pb::Rows>, like: &Tensor) -> Result<Tensor, TrainError> {
        let bad = |e: String| TrainError::Trunk(e);
        let rows = rows_from_pb(rows.ok_or_else(|| bad("a reply without rows".into()))?)
            .map_err(|e| bad(e.to_string()))?;
        self.traffic
            .received
            .fetch_add(rows.bytes.len() as u64, Ordering::Relaxed);
        let t = rows.decode(&Device::Cpu).map_err(|e| bad(e.to_string()))?;
        if t.dims() != like.dims() {
            return Err(bad(format!(
                "the server answered rows of shape {:?} for {:?}",
                t.dims(),
                like.dims()
            )));
        }
        Ok(t)
    }
}

impl TrainTrunk for RemoteTrainTrunk {
    fn forward(&mut self, rows: &Tensor) -> lsplit_train::Result<Tensor> {
        let pass = self.passes;
        self.passes += 1;
        let request = TrainRequest {
            kind: Some(RequestKind::Forward(pb::Forward {
                pass,
                rows: Some(self.encode(rows)?),
            })),
        };
        // Only this pass is replayed on a new stream: it rebuilds the activations its backward
        // pass needs.
        self.link.forget();
        self.pass = None;
        let reply = self.link.call(request, true).map_err(remote)?;
        match reply.kind {
            Some(ReplyKind::Forward(out)) if out.pass == pass => {
                self.pass = Some(pass);
                self.decode(out.rows, rows)
            }
            _ => Err(TrainError::Trunk(
                "the server answered a forward pass with something else".into(),
            )),
        }
    }

    fn backward(&mut self, grad: &Tensor) -> lsplit_train::Result<Tensor> {
        let pass = self
            .pass
            .take()
            .ok_or_else(|| TrainError::Trunk("a backward pass without a forward pass".into()))?;
        let request = TrainRequest {
            kind: Some(RequestKind::Backward(pb::Backward {
                pass,
                grad: Some(self.encode(grad)?),
            })),
        };
        let reply = self.link.call(request, false).map_err(remote)?;
        match reply.kind {
            Some(ReplyKind::Backward(out)) if out.pass == pass => self.decode(out.grad, grad),
            _ => Err(TrainError::Trunk(
                "the server answered a backward pass with something else".into(),
            )),
        }
    }
}

/// A link's failure as a training error.
fn remote(error: RemoteError) -> TrainError {
    TrainError::Trunk(error.to_string())
}
