//! The device's side of a remote trunk: [`RemoteTrunk`] implements the split engine's
//! [`Trunk`] over the gRPC protocol of `lsplit-proto`.
//!
//! It owns a small tokio runtime and blocks at the trait boundary, so the device's generation
//! loop stays synchronous and unaware of the network. Connecting performs the handshake, which
//! tells the device which layers the server runs and the fingerprint of its weights; the device
//! checks that fingerprint against its own model with [`RemoteTrunk::verify`] before use.
//!
//! A session ([`RemoteTrunk::with_keys`]) sends its keys, secret included, in the session's
//! `Open` message, inside TLS; its steps are tagged `Step` messages.
//!
//! If the connection drops mid-generation, the next step reconnects with backoff, opens a new
//! session with the same keys and replays this session's steps to rebuild the server's state
//! (KV cache, catch-up rows, step count), so the generated text does not change.
//!
//! [`RemoteDiffusionTrunk`] is the same for the trunk of a split diffusion UNet: one stream per
//! image, the image's setup sent again after a reconnection.

mod backoff;
mod channel;
mod diffusion;
mod error;
mod link;
mod options;
mod tls;

pub use diffusion::{DiffusionServerInfo, RemoteDiffusionTrunk};
pub use error::RemoteError;
pub use link::ServerTerms;
pub use options::{CloudFiles, RemoteOptions};

use std::ops::Range;
use std::time::Duration;

use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::trunk_client::TrunkClient;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, TrunkFingerprint, codec_from_pb, codec_to_pb};
use lsplit_split::{SessionKeys, StepRows, Trunk, TrunkError};
use lsplit_wire::Codec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::channel::{Bearer, bearer, connect, connect_failure, status_chain};
use crate::error::{refused, retryable};

type Client = TrunkClient<InterceptedService<Channel, Bearer>>;

/// What the handshake told the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The trunk the server runs.
    pub fingerprint: TrunkFingerprint,
    /// The codec agreed for this device's rows.
    pub codec: Codec,
    /// The server's limits.
    pub limits: pb::Limits,
    /// The TLS version of the connection (always `TLS 1.3`); `None` over plaintext.
    pub tls_version: Option<String>,
}

/// An open session stream.
struct Stream {
    id: u64,
    requests: mpsc::Sender<SessionRequest>,
    replies: Streaming<SessionReply>,
}

/// A trunk running on a server, for one generation session.
pub struct RemoteTrunk {
    runtime: tokio::runtime::Runtime,
    options: RemoteOptions,
    bearer: Bearer,
    client: Client,
    info: ServerInfo,
    stream: Option<Stream>,
    /// The session's keys, sent in its `Open`; set by [`RemoteTrunk::with_keys`].
    keys: Option<SessionKeys>,
    /// Every request of this session so far, kept to replay on a new server session.
    sent: Vec<RequestKind>,
}

impl std::fmt::Debug for RemoteTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTrunk")
            .field("url", &self.options.url)
            .field("info", &self.info)
            .finish()
    }
}

impl RemoteTrunk {
    /// Connects to the server and performs the handshake; opens no session yet.
    pub fn connect(options: RemoteOptions) -> Result<Self, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lsplit-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Config(format!("starting the network runtime: {e}")))?;
        let bearer = bearer(&options)?;
        let (client, info) = runtime.block_on(handshake(&options, &bearer))?;
        tracing::info!(
            url = %options.url,
            trunk = %info.fingerprint,
            codec = %info.codec,
            tls = info.tls_version.as_deref().unwrap_or("none"),
            "connected to the trunk server"
        );
        Ok(Self {
            runtime,
            options,
            bearer,
            client,
            info,
            stream: None,
            keys: None,
            sent: Vec::new(),
        })
    }

    /// Gives the session its keys: they go to the server when the session opens (inside TLS).
    /// A session opens at its first step, so call this before it.
    pub fn with_keys(mut self, keys: SessionKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    /// What the handshake told: fingerprint, codec and limits.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// Refuses a server whose trunk differs from `local`, the device's fingerprint of the same
    /// layers of its own model.
    pub fn verify(&self, local: &TrunkFingerprint) -> Result<(), RemoteError> {
        if *local == self.info.fingerprint {
            Ok(())
        } else {
            Err(RemoteError::FingerprintMismatch {
                server: Box::new(self.info.fingerprint.clone()),
                local: Box::new(local.clone()),
            })
        }
    }

    /// Runs one step, reconnecting and replaying the session's requests when the link fails.
    fn call(&mut self, request: RequestKind) -> Result<ReplyKind, RemoteError> {
        let started = std::time::Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(100);
        loop {
            let runtime = self.runtime.handle().clone();
            let result = runtime.block_on(self.try_step(&request));
            match result {
                Ok(out) => {
                    self.sent.push(request);
                    return Ok(out);
                }
                Err(e) if retryable(&e) => {
                    self.stream = None;
                    attempts += 1;
                    let waited = started.elapsed();
                    if waited + backoff > self.options.retry_for {
                        return Err(RemoteError::GaveUp {
                            url: self.options.url.clone(),
                            waited,
                            attempts,
                            last: e.to_string(),
                        });
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "lost the trunk server; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: (re)opens the session if needed, replaying kept requests, then sends
    /// `request`.
    async fn try_step(&mut self, request: &RequestKind) -> Result<ReplyKind, RemoteError> {
        if self.stream.is_none() {
            let fresh = !self.sent.is_empty();
            if fresh {
                let (client, info) = handshake(&self.options, &self.bearer).await?;
                if info.fingerprint != self.info.fingerprint || info.codec != self.info.codec {
                    return Err(RemoteError::Protocol(format!(
                        "the server came back with trunk {} and codec {}, not trunk {} and codec {}",
                        info.fingerprint, info.codec, self.info.fingerprint, self.info.codec
                    )));
                }
                self.client = client;
            }
            let mut stream = self.open().await?;
            replay(&mut stream, &self.sent, self.options.step_timeout).await?;
            if fresh {
                tracing::info!(
                    session = stream.id,
                    rows = self.sent.len(),
                    "session rebuilt on the server"
                );
            }
            self.stream = Some(stream);
        }
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| RemoteError::Protocol("no open session".into()))?;
        exchange(stream, request.clone(), self.options.step_timeout).await
    }

    async fn open(&mut self) -> Result<Stream, RemoteError> {
        let keys = self.keys.as_ref().ok_or_else(|| {
            RemoteError::Config("a trunk session needs its keys: give them with_keys".into())
        })?;
        let (requests, outbound) = mpsc::channel(4);
        let open = SessionRequest {
            kind: Some(RequestKind::Open(pb::Open {
                protocol_version: PROTOCOL_VERSION,
                codec: codec_to_pb(self.info.codec) as i32,
                fingerprint_sha256: self.info.fingerprint.sha256.to_vec(),
                keys: Some(lsplit_proto::keys_to_pb(keys)),
            })),
        };
        requests
            .send(open)
            .await
            .map_err(|_| RemoteError::Protocol("the session stream closed".into()))?;
        let timeout = self.options.step_timeout;
        let call = self.client.session(ReceiverStream::new(outbound));
        let mut replies = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| RemoteError::Timeout(timeout))?
            .map_err(refused)?
            .into_inner();
        match next_reply(&mut replies, timeout).await? {
            ReplyKind::Opened(opened) => Ok(Stream {
                id: opened.session_id,
                requests,
                replies,
            }),
            ReplyKind::Step(_) => Err(RemoteError::Protocol(
                "the server sent rows before opening the session".into(),
            )),
        }
    }
}

impl Trunk for RemoteTrunk {
    fn layers(&self) -> Range<usize> {
        self.info.fingerprint.layers.clone()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let request = RequestKind::Step(lsplit_proto::step_to_pb(message));
        match self.call(request)? {
            ReplyKind::Step(out) => Ok(lsplit_proto::step_from_pb(out)
                .map_err(|e| RemoteError::Protocol(e.to_string()))?),
            ReplyKind::Opened(_) => {
                Err(RemoteError::Protocol("the server answered a step without rows".into()).into())
            }
        }
    }
}

/// Sends the kept `steps` again, exactly as they were first sent, to rebuild the session's KV
/// cache on a new server session. The requests are pipelined: one round trip, not one per step.
async fn replay(
    stream: &mut Stream,
    steps: &[RequestKind],
    timeout: Duration,
) -> Result<(), RemoteError> {
    let requests: Vec<SessionRequest> = steps
        .iter()
        .map(|kind| SessionRequest {
            kind: Some(kind.clone()),
        })
        .collect();
    let sender = stream.requests.clone();
    let feeding = tokio::spawn(async move {
        for request in requests {
            if sender.send(request).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        for (i, sent) in steps.iter().enumerate() {
            let answered = match (sent, next_reply(&mut stream.replies, timeout).await?) {
                (RequestKind::Step(sent), ReplyKind::Step(out)) => out.step == sent.step,
                _ => false,
            };
            if !answered {
                return Err(RemoteError::Protocol(format!(
                    "replaying step {i}: the server answered out of order"
                )));
            }
        }
        Ok(())
    }
    .await;
    feeding.abort();
    result
}

/// Sends `request` on an open session and waits for the answer.
async fn exchange(
    stream: &mut Stream,
    request: RequestKind,
    timeout: Duration,
) -> Result<ReplyKind, RemoteError> {
    let request = SessionRequest {
        kind: Some(request),
    };
    if stream.requests.send(request).await.is_err() {
        return Err(RemoteError::Refused {
            code: Code::Unavailable,
            message: "the session stream closed".into(),
        });
    }
    match next_reply(&mut stream.replies, timeout).await? {
        ReplyKind::Opened(_) => Err(RemoteError::Protocol(
            "the server opened the session twice".into(),
        )),
        reply => Ok(reply),
    }
}

async fn next_reply(
    replies: &mut Streaming<SessionReply>,
    timeout: Duration,
) -> Result<ReplyKind, RemoteError> {
    let reply = tokio::time::timeout(timeout, replies.message())
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(refused)?;
    match reply {
        Some(SessionReply { kind: Some(kind) }) => Ok(kind),
        Some(SessionReply { kind: None }) => Err(RemoteError::Protocol(
            "the server sent an empty reply".into(),
        )),
        None => Err(RemoteError::Refused {
            code: Code::Unavailable,
            message: "the server closed the session".into(),
        }),
    }
}

/// Connects, then negotiates the protocol and codec.
async fn handshake(
    options: &RemoteOptions,
    bearer: &Bearer,
) -> Result<(Client, ServerInfo), RemoteError> {
    let (channel, tls_version) = connect(options).await?;
    let mut client = TrunkClient::with_interceptor(channel, bearer.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let request = pb::HandshakeRequest {
        protocol_version: PROTOCOL_VERSION,
        codecs: options
            .codecs
            .iter()
            .map(|&c| codec_to_pb(c) as i32)
            .collect(),
    };
    let timeout = options.connect_timeout;
    let reply = tokio::time::timeout(timeout, client.handshake(request))
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(|status| {
            if status.code() == Code::Unavailable || status.code() == Code::Unknown {
                connect_failure(options, status_chain(&status))
            } else {
                refused(status)
            }
        })?
        .into_inner();
    if reply.protocol_version != PROTOCOL_VERSION {
        return Err(RemoteError::Protocol(format!(
            "the server speaks trunk protocol version {} but this device speaks {PROTOCOL_VERSION}",
            reply.protocol_version
        )));
    }
    let protocol = |e: lsplit_proto::ProtoError| RemoteError::Protocol(e.to_string());
    let fingerprint = reply
        .fingerprint
        .as_ref()
        .ok_or(lsplit_proto::ProtoError::Missing("fingerprint"))
        .and_then(TrunkFingerprint::from_pb)
        .map_err(protocol)?;
    let codec = codec_from_pb(reply.codec).map_err(protocol)?;
    let limits = reply
        .limits
        .ok_or(lsplit_proto::ProtoError::Missing("limits"))
        .map_err(protocol)?;
    Ok((
        client,
        ServerInfo {
            fingerprint,
            codec,
            limits,
            tls_version,
        },
    ))
}
