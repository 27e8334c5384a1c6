//! The device's side of a remote diffusion trunk: [`RemoteDiffusionTrunk`] implements
//! [`DiffusionTrunk`] over the protocol of `lsplit_proto::diffusion`, with the same TLS 1.3,
//! bearer token and client certificate settings as [`crate::RemoteTrunk`].
//!
//! Connecting performs the handshake, which tells the device the split the server serves, the
//! fingerprint of its trunk and the step codec; [`RemoteDiffusionTrunk::verify_model`] checks
//! that fingerprint against the device's own copy of the model. Each image is one stream. If
//! the connection drops mid-image, the next call reconnects with backoff, sends the image's
//! setup again (the trunk holds nothing else) and retries the step, within a bounded time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lsplit_diffusion::{
    DiffusionError, DiffusionTrunk, ImageSetup, StepRequest, TrunkFingerprint, UnetSplit,
    trunk_fingerprint,
};
use lsplit_proto::diffusion::pb::diffusion_trunk_client::DiffusionTrunkClient;
use lsplit_proto::diffusion::pb::image_reply::Kind as ReplyKind;
use lsplit_proto::diffusion::pb::image_request::Kind as RequestKind;
use lsplit_proto::diffusion::pb::{self, ImageReply, ImageRequest};
use lsplit_proto::diffusion::{DIFFUSION_PROTOCOL_VERSION, tensor_to_pb, tensors_from_pb};
use lsplit_wire::{StepCodec, StepTensor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::{
    Bearer, RemoteError, RemoteOptions, bearer, connect, connect_failure, refused, retryable,
    status_chain,
};

type Client = DiffusionTrunkClient<InterceptedService<Channel, Bearer>>;

/// What the diffusion handshake told the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusionServerInfo {
    /// The trunk the server runs, with its split.
    pub fingerprint: TrunkFingerprint,
    /// The step codec agreed for every tensor, both ways.
    pub codec: StepCodec,
    /// The server's limits.
    pub limits: pb::Limits,
    /// The TLS version of the connection (always `TLS 1.3`); `None` over plaintext.
    pub tls_version: Option<String>,
}

/// The command line's way to a diffusion trunk server (`--cloud URL --ca --token-file
/// --client-cert --client-key --insecure`): paths, read when connecting.
#[derive(Debug, Clone, Default)]
pub struct CloudFiles {
    /// `https://HOST:PORT`, or `http://HOST:PORT` with `insecure`.
    pub url: String,
    /// CA certificate (PEM) the server must chain to; `None` uses the system's roots.
    pub ca: Option<PathBuf>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Allow a plaintext `http://` URL.
    pub insecure: bool,
}

impl CloudFiles {
    /// Connection options with default timeouts, the files read.
    pub fn options(&self) -> Result<RemoteOptions, RemoteError> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| RemoteError::Config(format!("reading {}: {e}", path.display())))
        };
        let mut options = RemoteOptions::new(self.url.clone(), lsplit_wire::Codec::F32);
        options.codecs.clear();
        options.ca_pem = self.ca.as_deref().map(read).transpose()?;
        options.token = self
            .token_file
            .as_deref()
            .map(|f| read(f).map(|t| String::from_utf8_lossy(&t).trim().to_string()))
            .transpose()?;
        options.identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(RemoteError::Config(
                    "--client-cert and --client-key go together".into(),
                ));
            }
        };
        options.insecure = self.insecure;
        Ok(options)
    }
}

/// An open image stream.
struct ImageStream {
    id: u64,
    requests: mpsc::Sender<ImageRequest>,
    replies: Streaming<ImageReply>,
}

impl ImageStream {
    /// Ends the stream cleanly: the server sees the end of the image, not a broken connection.
    async fn close(mut self) {
        drop(self.requests);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.replies.message()).await;
    }
}

/// How long closing an image waits for the server to finish the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A diffusion trunk running on a server.
pub struct RemoteDiffusionTrunk {
    runtime: tokio::runtime::Runtime,
    options: RemoteOptions,
    codecs: Vec<StepCodec>,
    bearer: Bearer,
    client: Client,
    info: DiffusionServerInfo,
    stream: Option<ImageStream>,
    /// The current image's setup, kept to open it again on a new connection.
    setup: Option<pb::Setup>,
    /// Whether the link failed since the last handshake.
    lost: bool,
}

impl std::fmt::Debug for RemoteDiffusionTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDiffusionTrunk")
            .field("url", &self.options.url)
            .field("info", &self.info)
            .finish()
    }
}

impl RemoteDiffusionTrunk {
    /// Connects with `options` (address, TLS, token, timeouts and retry bound; its hidden-row
    /// `codecs` do not apply) and performs the handshake, offering the step `codecs`, most
    /// preferred first. Opens no image yet and checks no fingerprint: see [`Self::verify_model`].
    pub fn connect(options: RemoteOptions, codecs: &[StepCodec]) -> Result<Self, RemoteError> {
        if codecs.is_empty() {
            return Err(RemoteError::Config(
                "offer the server at least one step codec".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lsplit-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Config(format!("starting the network runtime: {e}")))?;
        let bearer = bearer(&options)?;
        let (client, info) = runtime.block_on(handshake(&options, codecs, &bearer))?;
        tracing::info!(
            url = %options.url,
            trunk = %info.fingerprint,
            codec = %info.codec,
            tls = info.tls_version.as_deref().unwrap_or("none"),
            "connected to the diffusion trunk server"
        );
        Ok(Self {
            runtime,
            options,
            codecs: codecs.to_vec(),
            bearer,
            client,
            info,
            stream: None,
            setup: None,
            lost: false,
        })
    }

    /// Connects as the command line says, offering `codecs`, and checks the server's trunk
    /// against the model at `model_root`: what `lsplit image --cloud` needs in one call.
    pub fn connect_checked(
        files: &CloudFiles,
        codecs: &[StepCodec],
        model_root: &Path,
    ) -> Result<Self, RemoteError> {
        let trunk = Self::connect(files.options()?, codecs)?;
        trunk.verify_model(model_root)?;
        Ok(trunk)
    }

    /// What the handshake told: fingerprint (with the split), codec and limits.
    pub fn info(&self) -> &DiffusionServerInfo {
        &self.info
    }

    /// The split the server serves; the device runs the matching ends.
    pub fn split(&self) -> UnetSplit {
        self.info.fingerprint.split
    }

    /// The step codec agreed for every tensor.
    pub fn codec(&self) -> StepCodec {
        self.info.codec
    }

    /// Refuses a server whose trunk differs from `local`, the device's fingerprint of the same
    /// split of its own model.
    pub fn verify(&self, local: &TrunkFingerprint) -> Result<(), RemoteError> {
        if *local == self.info.fingerprint {
            Ok(())
        } else {
            Err(RemoteError::DiffusionFingerprintMismatch {
                server: self.info.fingerprint,
                local: *local,
            })
        }
    }

    /// Fingerprints the server's split of the model at `root` and [`Self::verify`]s it.
    pub fn verify_model(&self, root: &Path) -> Result<(), RemoteError> {
        let local = trunk_fingerprint(root, self.split()).map_err(|e| {
            RemoteError::Config(format!(
                "fingerprinting this device's copy of the model for the server's split {}: {e}",
                self.split()
            ))
        })?;
        self.verify(&local)
    }

    /// Closes the current image's stream, if one is open.
    fn close_image(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.runtime.block_on(stream.close());
        }
    }

    /// Sends `request` (or only opens the image, for `None`), reconnecting and sending the
    /// image's setup again when the link fails, until the retry bound.
    fn call(&mut self, request: Option<RequestKind>) -> Result<ReplyKind, RemoteError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(100);
        loop {
            let runtime = self.runtime.handle().clone();
            match runtime.block_on(self.try_call(request.as_ref())) {
                Ok(reply) => return Ok(reply),
                Err(e) if retryable(&e) => {
                    self.stream = None;
                    self.lost = true;
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
                    tracing::warn!(error = %e, retry_in = ?backoff, "lost the diffusion trunk server; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: (re)opens the image if needed, then sends `request`.
    async fn try_call(&mut self, request: Option<&RequestKind>) -> Result<ReplyKind, RemoteError> {
        if self.stream.is_none() {
            if self.lost {
                let (client, info) = handshake(&self.options, &self.codecs, &self.bearer).await?;
                if info.fingerprint != self.info.fingerprint || info.codec != self.info.codec {
                    return Err(RemoteError::Protocol(format!(
                        "the server came back with {} and codec {}, not {} and codec {}",
                        info.fingerprint, info.codec, self.info.fingerprint, self.info.codec
                    )));
                }
                self.client = client;
                self.lost = false;
            }
            let setup = self
                .setup
                .clone()
                .ok_or_else(|| RemoteError::Protocol("no image was begun".into()))?;
            let stream = self.open(setup).await?;
            tracing::debug!(session = stream.id, "image opened on the server");
            self.stream = Some(stream);
            if request.is_none() {
                return Ok(ReplyKind::Ready(pb::Ready {
                    session_id: self.stream.as_ref().map_or(0, |s| s.id),
                }));
            }
        }
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| RemoteError::Protocol("no open image".into()))?;
        let request = request.ok_or_else(|| RemoteError::Protocol("nothing to send".into()))?;
        let timeout = self.options.step_timeout;
        let message = ImageRequest {
            kind: Some(request.clone()),
        };
        if stream.requests.send(message).await.is_err() {
            return Err(RemoteError::Refused {
                code: Code::Unavailable,
                message: "the image stream closed".into(),
            });
        }
        next_reply(&mut stream.replies, timeout).await
    }

    /// Opens an image stream with `setup` and waits for the server to accept it.
    async fn open(&mut self, setup: pb::Setup) -> Result<ImageStream, RemoteError> {
        let (requests, outbound) = mpsc::channel(4);
        requests
            .send(ImageRequest {
                kind: Some(RequestKind::Setup(setup)),
            })
            .await
            .map_err(|_| RemoteError::Protocol("the image stream closed".into()))?;
        let timeout = self.options.step_timeout;
        let call = self.client.image(ReceiverStream::new(outbound));
        let mut replies = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| RemoteError::Timeout(timeout))?
            .map_err(refused)?
            .into_inner();
        match next_reply(&mut replies, timeout).await? {
            ReplyKind::Ready(ready) => Ok(ImageStream {
                id: ready.session_id,
                requests,
                replies,
            }),
            ReplyKind::Output(_) => Err(RemoteError::Protocol(
                "the server sent a step's output before accepting the image".into(),
            )),
        }
    }
}

impl Drop for RemoteDiffusionTrunk {
    fn drop(&mut self) {
        self.close_image();
    }
}

impl From<RemoteError> for DiffusionError {
    fn from(error: RemoteError) -> Self {
        DiffusionError::Trunk(error.to_string())
    }
}

impl DiffusionTrunk for RemoteDiffusionTrunk {
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError> {
        self.close_image();
        self.setup = Some(pb::Setup {
            protocol_version: DIFFUSION_PROTOCOL_VERSION,
            codec: u32::from(self.info.codec.id()),
            fingerprint_sha256: self.info.fingerprint.sha256.to_vec(),
            conditioning: setup.conditioning.iter().map(tensor_to_pb).collect(),
            guidance: setup.guidance,
        });
        self.call(None)?;
        Ok(())
    }

    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError> {
        if self.setup.is_none() {
            return Err(DiffusionError::Request(
                "a step before the image's conditioning was sent".into(),
            ));
        }
        let step = RequestKind::Step(pb::Step {
            inputs: request.inputs.iter().map(tensor_to_pb).collect(),
            timestep: request.timestep,
        });
        match self.call(Some(step))? {
            ReplyKind::Output(output) => {
                Ok(tensors_from_pb(output.outputs, self.info.codec, u64::MAX)
                    .map_err(|e| RemoteError::Protocol(e.to_string()))?)
            }
            ReplyKind::Ready(_) => Err(RemoteError::Protocol(
                "the server answered a step by accepting an image".into(),
            )
            .into()),
        }
    }
}

async fn next_reply(
    replies: &mut Streaming<ImageReply>,
    timeout: Duration,
) -> Result<ReplyKind, RemoteError> {
    let reply = tokio::time::timeout(timeout, replies.message())
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(refused)?;
    match reply {
        Some(ImageReply { kind: Some(kind) }) => Ok(kind),
        Some(ImageReply { kind: None }) => Err(RemoteError::Protocol(
            "the server sent an empty reply".into(),
        )),
        None => Err(RemoteError::Refused {
            code: Code::Unavailable,
            message: "the server closed the image stream".into(),
        }),
    }
}

/// Connects, then negotiates the protocol and step codec.
async fn handshake(
    options: &RemoteOptions,
    codecs: &[StepCodec],
    bearer: &Bearer,
) -> Result<(Client, DiffusionServerInfo), RemoteError> {
    let (channel, tls_version) = connect(options).await?;
    let mut client = DiffusionTrunkClient::with_interceptor(channel, bearer.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let request = pb::HandshakeRequest {
        protocol_version: DIFFUSION_PROTOCOL_VERSION,
        codecs: codecs.iter().map(|c| u32::from(c.id())).collect(),
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
    if reply.protocol_version != DIFFUSION_PROTOCOL_VERSION {
        return Err(RemoteError::Protocol(format!(
            "the server speaks diffusion protocol version {} but this device speaks \
             {DIFFUSION_PROTOCOL_VERSION}",
            reply.protocol_version
        )));
    }
    let fingerprint = reply
        .fingerprint
        .ok_or_else(|| RemoteError::Protocol("the fingerprint field is missing".into()))?;
    let split: UnetSplit = fingerprint
        .split
        .parse()
        .map_err(|e| RemoteError::Protocol(format!("the server's split: {e}")))?;
    if split == UnetSplit::None {
        return Err(RemoteError::Protocol(
            "the server announces split none, which has no trunk".into(),
        ));
    }
    let sha256 = <[u8; 32]>::try_from(fingerprint.sha256.as_slice()).map_err(|_| {
        RemoteError::Protocol(format!(
            "the fingerprint's sha256 is {} bytes, not 32",
            fingerprint.sha256.len()
        ))
    })?;
    let codec = u8::try_from(reply.codec)
        .ok()
        .and_then(|id| StepCodec::from_id(id).ok())
        .filter(|codec| codecs.contains(codec))
        .ok_or_else(|| {
            RemoteError::Protocol(format!(
                "the server chose step codec id {}, which this device did not offer",
                reply.codec
            ))
        })?;
    let limits = reply
        .limits
        .ok_or_else(|| RemoteError::Protocol("the limits field is missing".into()))?;
    Ok((
        client,
        DiffusionServerInfo {
            fingerprint: TrunkFingerprint { split, sha256 },
            codec,
            limits,
            tls_version,
        },
    ))
}
