//! The diffusion trunk server: the trunk of a split Stable Diffusion UNet (the whole UNet with
//! guidance for `component`, its middle for `lambda:N`) served over the protocol of
//! `lsplit_proto::diffusion`, with the same TLS, authentication, health, metrics, shutdown and
//! limits as the language-model trunk server.
//!
//! The loaded trunk is shared by every session; each session holds only its image's
//! conditioning. Steps run on blocking threads, so sessions never wait on each other's compute
//! beyond the machine's cores.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Device;
use lsplit_diffusion::{
    DiffusionError, ImageSetup, ImageState, StepRequest, TrunkFingerprint, TrunkModel,
};
use lsplit_proto::diffusion::pb::image_reply::Kind as ReplyKind;
use lsplit_proto::diffusion::pb::image_request::Kind as RequestKind;
use lsplit_proto::diffusion::pb::{self, ImageReply, ImageRequest};
use lsplit_proto::diffusion::{
    DIFFUSION_PROTOCOL_VERSION, TensorError, tensor_to_pb, tensors_from_pb,
};
use lsplit_wire::{StepCodec, StepTensor};
use tonic::Status;

use crate::grpc::{GrpcServer, Served};
use crate::metrics::Counters;
use crate::serve::{Endpoint, Server};
use crate::session_loop::{SessionKind, SessionNames, Sessions};
use crate::terms::{Protocol, Terms};
use crate::{Access, ServerError, ServerStats, StatsSource};

/// What a diffusion trunk server accepts; announced to devices in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusionLimits {
    /// Image sessions open at the same time.
    pub max_sessions: usize,
    /// Largest gRPC message the server decodes, in bytes.
    pub max_message_bytes: usize,
    /// A session with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Most tensor elements one setup or step may declare, all its tensors together: bounds
    /// what a message can make the server allocate and compute.
    pub max_step_elements: u64,
    /// Most bytes a step's full attention may allocate at once (batch x heads x positions²
    /// floats at the trunk's largest attention level): attention grows with the square of the
    /// image area, so this bounds the server's memory per step.
    pub max_attention_bytes: u64,
}

impl Default for DiffusionLimits {
    /// Room for SDXL at 1024x1024 in every split with the f32 codec (a `lambda:1` step is
    /// 2 x 320 x 128 x 128 activations, 42 MB).
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_message_bytes: 128 << 20,
            idle_timeout: Duration::from_secs(300),
            max_step_elements: 32 << 20,
            max_attention_bytes: 4 << 30,
        }
    }
}

/// How a diffusion trunk server runs: limits, step codecs, authentication and transport.
#[derive(Debug, Clone)]
pub struct DiffusionOptions {
    /// The server's limits.
    pub limits: DiffusionLimits,
    /// Step codecs offered to devices.
    pub codecs: Vec<StepCodec>,
    /// Who may connect, and how.
    pub access: Access,
}

/// State every session and the handle share.
pub(crate) struct DiffusionShared {
    model: Arc<TrunkModel>,
    fingerprint: TrunkFingerprint,
    terms: Terms<StepCodec>,
    limits: DiffusionLimits,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) counters: Arc<Counters>,
}

/// The diffusion protocol, as statuses name it.
const DIFFUSION: Protocol = Protocol::new(
    "diffusion",
    DIFFUSION_PROTOCOL_VERSION,
    "step codec",
    IMAGE_SESSIONS,
);

/// The diffusion trunk server: a loaded trunk and its fingerprint, served with
/// [`DiffusionOptions`].
pub type DiffusionServer = Server<DiffusionLimits>;

impl Server<DiffusionLimits> {
    /// A server for `model`, whose fingerprint (computed from the same files) is `fingerprint`.
    pub fn new(
        model: TrunkModel,
        fingerprint: TrunkFingerprint,
        options: DiffusionOptions,
    ) -> Result<Self, ServerError> {
        if fingerprint.split != model.split() {
            return Err(ServerError::Config(format!(
                "the fingerprint is of the {} trunk but the model is the {} trunk",
                fingerprint.split,
                model.split()
            )));
        }
        let terms = Terms::new(DIFFUSION, &options.codecs, fingerprint.sha256, &fingerprint)?;
        let (limits, transport) = (&options.limits, &options.access.transport);
        let sessions = Sessions::new(
            DIFFUSION,
            limits.max_sessions,
            limits.idle_timeout,
            transport,
        )?;
        if options.limits.max_step_elements == 0 {
            return Err(ServerError::Config(
                "--max-step-elements must be at least 1".into(),
            ));
        }
        let shared = DiffusionShared {
            model: Arc::new(model),
            fingerprint,
            terms,
            limits: options.limits.clone(),
            counters: sessions.counters().clone(),
            sessions: Arc::new(sessions),
        };
        let shared = Arc::new(shared);
        let service = GrpcServer::new(
            shared.clone(),
            shared.sessions.clone(),
            options.limits.max_message_bytes,
        );
        let stats = ServerStats {
            source: StatsSource::Diffusion(shared),
            training: None,
        };
        let endpoint = Endpoint::new(service, options.access);
        Ok(Self::with(options.limits, stats, endpoint))
    }
}

/// The status for a tensor refused before decoding.
fn tensor_status(error: TensorError) -> Status {
    match error {
        TensorError::TooManyElements { .. } => Status::resource_exhausted(error.to_string()),
        _ => Status::invalid_argument(error.to_string()),
    }
}

/// The status for a request the trunk refused.
fn trunk_status(error: DiffusionError) -> Status {
    match error {
        DiffusionError::Request(_) | DiffusionError::Wire(_) => {
            Status::invalid_argument(error.to_string())
        }
        DiffusionError::Candle(_) => {
            Status::invalid_argument(format!("the request does not fit this trunk: {error}"))
        }
        _ => Status::internal(error.to_string()),
    }
}

/// Runs `work` on a blocking thread; a panic in it fails only this request.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DiffusionError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Status::internal("the trunk failed on this request"))?
        .map_err(trunk_status)
}

/// The tensors of a message, checked against `limits` and converted on a blocking thread:
/// their bytes may be many megabytes, which the network threads should not spend time on.
async fn decoded(
    tensors: Vec<pb::Tensor>,
    codec: StepCodec,
    limits: &DiffusionLimits,
) -> Result<Vec<StepTensor>, Status> {
    let max = limits.max_step_elements;
    tokio::task::spawn_blocking(move || tensors_from_pb(tensors, codec, max))
        .await
        .map_err(|_| Status::internal("the trunk failed on this request"))?
        .map_err(tensor_status)
}

/// The step codec a protocol codec id names, if any.
fn step_codec(id: u32) -> Option<StepCodec> {
    u8::try_from(id)
        .ok()
        .and_then(|id| StepCodec::from_id(id).ok())
}

fn payload_bytes(tensors: &[StepTensor]) -> u64 {
    tensors.iter().map(|t| t.byte_len() as u64).sum()
}

impl Served for DiffusionShared {
    type Service = pb::DiffusionTrunk;
    type Session = ImageSession;

    fn welcome(&self, hello: pb::HandshakeRequest) -> Result<pb::HandshakeReply, Status> {
        let codec = self
            .terms
            .agree(hello.protocol_version, &hello.codecs, step_codec)?;
        let (fingerprint, limits) = (&self.fingerprint, &self.limits);
        Ok(pb::HandshakeReply {
            protocol_version: self.terms.version(),
            codec: u32::from(codec.id()),
            fingerprint: Some(pb::Fingerprint {
                split: fingerprint.split.to_string(),
                sha256: fingerprint.sha256.to_vec(),
            }),
            limits: Some(pb::Limits {
                max_sessions: limits.max_sessions as u32,
                max_message_bytes: limits.max_message_bytes as u64,
                idle_timeout_ms: limits.idle_timeout.as_millis() as u64,
                max_step_elements: limits.max_step_elements,
            }),
        })
    }
}

/// How statuses name image sessions.
const IMAGE_SESSIONS: SessionNames = SessionNames::new("image session", "image sessions", "closed");

/// One image stream: the codec and the current image's conditioning.
pub(crate) struct ImageSession {
    shared: Arc<DiffusionShared>,
    id: u64,
    codec: Option<StepCodec>,
    image: Option<Arc<ImageState>>,
}

impl SessionKind for ImageSession {
    type Shared = DiffusionShared;

    fn open(shared: Arc<DiffusionShared>, id: u64) -> Self {
        Self {
            codec: None,
            image: None,
            shared,
            id,
        }
    }

    async fn handle(&mut self, request: ImageRequest) -> Result<ImageReply, Status> {
        let reply = match request.kind {
            Some(RequestKind::Setup(setup)) => self.setup(setup).await?,
            Some(RequestKind::Step(step)) => self.step(step).await?,
            None => return Err(Status::invalid_argument("empty image request")),
        };
        Ok(ImageReply { kind: Some(reply) })
    }
}

impl ImageSession {
    /// Starts an image (a new one when the stream already had one).
    async fn setup(&mut self, setup: pb::Setup) -> Result<ReplyKind, Status> {
        self.image = None;
        let codec =
            step_codec(setup.codec).ok_or_else(|| format!("unknown step codec id {}", setup.codec));
        let codec =
            self.shared
                .terms
                .open(setup.protocol_version, codec, &setup.fingerprint_sha256)?;
        let conditioning = decoded(setup.conditioning, codec, &self.shared.limits).await?;
        let counters = &self.shared.counters;
        counters
            .bytes_in_total
            .fetch_add(payload_bytes(&conditioning), Ordering::Relaxed);
        let model = self.shared.model.clone();
        let setup = ImageSetup {
            conditioning,
            guidance: setup.guidance,
        };
        let image = blocking(move || model.begin_image(&setup, &Device::Cpu)).await?;
        if self.codec.is_none() {
            counters.sessions_total.fetch_add(1, Ordering::Relaxed);
        }
        counters.images_total.fetch_add(1, Ordering::Relaxed);
        self.codec = Some(codec);
        self.image = Some(Arc::new(image));
        tracing::info!(session = self.id, %codec, "image set up");
        Ok(ReplyKind::Ready(pb::Ready {
            session_id: self.id,
        }))
    }

    /// Runs one denoising step of the current image.
    async fn step(&mut self, step: pb::Step) -> Result<ReplyKind, Status> {
        let (Some(codec), Some(image)) = (self.codec, self.image.clone()) else {
            return Err(Status::failed_precondition(
                "a step arrived before the image's setup",
            ));
        };
        let inputs = decoded(step.inputs, codec, &self.shared.limits).await?;
        let counters = &self.shared.counters;
        counters
            .bytes_in_total
            .fetch_add(payload_bytes(&inputs), Ordering::Relaxed);
        self.shared
            .model
            .check_attention_budget(&inputs, self.shared.limits.max_attention_bytes)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let model = self.shared.model.clone();
        let request = StepRequest {
            inputs,
            timestep: step.timestep,
        };
        let started = Instant::now();
        let outputs = blocking(move || model.step(&image, &request, codec, &Device::Cpu)).await?;
        counters.latency(1, started.elapsed());
        counters.steps_total.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_out_total
            .fetch_add(payload_bytes(&outputs), Ordering::Relaxed);
        Ok(ReplyKind::Output(pb::StepOutput {
            outputs: outputs.iter().map(tensor_to_pb).collect(),
        }))
    }
}
