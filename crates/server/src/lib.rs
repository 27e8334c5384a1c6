//! The trunk server behind `lsplit serve`.
//!
//! It holds only the trunk layers of a split model and serves them over gRPC (the protocol of
//! `lsplit-proto`), TLS by default, to many devices at once. Each device session is one
//! bidirectional stream whose KV cache lives here; every request past a [`Limits`] or malformed
//! is answered with a gRPC status and ends only that session.
//!
//! [`DiffusionServer`] serves the trunk of a split diffusion UNet the same way (protocol
//! `lsplit.diffusion.v1`): one stream per image, holding only that image's conditioning.

mod auth;
mod certs;
mod diffusion;
mod engine;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod grpc;
mod health;
mod incoming;
mod metrics;
mod peers;
mod serve;
mod service;
mod session_loop;
mod terms;
mod tls;
mod train;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lsplit_model::{ModelPart, ModelSource, TrunkFingerprint};
use lsplit_wire::Codec;

pub use crate::certs::DevCertificates;
pub use crate::diffusion::{DiffusionLimits, DiffusionOptions, DiffusionServer};
use crate::grpc::GrpcServer;
pub use crate::metrics::serve_metrics;
use crate::serve::Endpoint;
pub use crate::serve::Server;
use crate::service::Shared;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The trunk part is not a trunk, or the options contradict each other.
    #[error("{0}")]
    Config(String),
    /// TLS could not be set up from the given certificate and key.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The listener or the gRPC transport failed.
    #[error("the server failed: {0}")]
    Transport(String),
    /// The server stopped serving: its trunk worker died.
    #[error("the server stopped: {0}")]
    Failed(String),
}

impl From<lsplit_proto::PemError> for ServerError {
    fn from(error: lsplit_proto::PemError) -> Self {
        ServerError::Tls(error.to_string())
    }
}

/// What the server accepts; announced to devices in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sessions open at the same time.
    pub max_sessions: usize,
    /// Positions one session may reach (at most the model's context length).
    pub max_context: usize,
    /// Largest gRPC message the server decodes, in bytes.
    pub max_message_bytes: usize,
    /// A session with no request for this long is closed and its KV cache freed.
    pub idle_timeout: Duration,
    /// Bytes all sessions' cached positions may hold together.
    pub kv_budget_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_context: usize::MAX,
            max_message_bytes: 16 << 20,
            idle_timeout: Duration::from_secs(300),
            kv_budget_bytes: 2 << 30,
        }
    }
}

/// What split fine-tuning (`lsplit serve --training`) may hold and compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingLimits {
    /// Bytes of layer inputs one training session keeps between its forward and backward
    /// passes; the rest are recomputed.
    pub activation_bytes: usize,
    /// Bytes of the trunk's layers kept dequantized (f32) for all training sessions; layers
    /// past it are dequantized at each pass.
    pub weight_bytes: usize,
    /// Most positions of one training sequence: the training pass attends over a whole
    /// sequence at once, so its memory grows with the square of this.
    pub max_rows: usize,
}

impl Default for TrainingLimits {
    fn default() -> Self {
        Self {
            activation_bytes: 64 << 20,
            weight_bytes: 1 << 30,
            max_rows: 1024,
        }
    }
}

/// What one client may hold of the server's connections and streams: limits of the transport,
/// the same for every model kind, and not announced to devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// A session stream that sends no message in this long is closed. A stream holds a session
    /// slot only from its first message, so silent streams never lock devices out.
    pub handshake_timeout: Duration,
    /// Sessions one peer address may hold at once (at most `max_sessions`).
    pub max_sessions_per_peer: usize,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections one peer address may hold at once.
    pub max_connections_per_peer: usize,
    /// TLS handshakes in progress at once; past it, new connections wait in the backlog.
    pub max_tls_handshakes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// HTTP/2 streams one connection may make the server reset for its errors before the
    /// connection is closed.
    pub max_local_error_resets: usize,
    /// Health `Watch` streams open at once (they need no token).
    pub max_health_watches: usize,
    /// Session streams open at once that have not sent their first request (they hold no
    /// session slot yet, so without this only connections × streams bound them).
    pub max_waiting_streams: usize,
    /// Of those, the streams one peer address may hold.
    pub max_waiting_streams_per_peer: usize,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_sessions_per_peer: usize::MAX,
            max_connections: 512,
            max_connections_per_peer: 64,
            max_tls_handshakes: 64,
            max_streams_per_connection: 32,
            max_local_error_resets: 32,
            max_health_watches: 64,
            max_waiting_streams: 256,
            max_waiting_streams_per_peer: 32,
        }
    }
}

/// PEM files of the server's TLS identity and, for mutual TLS, the CA of client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

/// Who may connect to a server and how, the same for every kind of trunk: the bearer token,
/// the TLS identity and the transport's caps.
#[derive(Debug, Clone)]
pub struct Access {
    /// When set, every request must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// TLS identity; `None` serves plaintext (only with an explicit `--insecure`).
    pub tls: Option<TlsFiles>,
    /// Caps on connections and streams.
    pub transport: TransportLimits,
}

/// Threads a server's network runtime gets by default: a quarter of the cores, at least one.
/// The trunk's compute pool needs the rest, and a step passes through fewer threads on its way
/// (on 2 cores, one network thread instead of two took loopback decode from 0.88–0.93 to
/// 0.91–0.96 of in-process).
pub fn default_io_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / 4).max(1)
}

/// The default of [`ServerOptions::batch_wait`]: longer than a loopback round trip, shorter
/// than one step of a small trunk.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(2);

/// How the server runs: limits, codecs, authentication and transport security.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The server's limits.
    pub limits: Limits,
    /// Codecs offered to devices, in the server's order of support.
    pub codecs: Vec<Codec>,
    /// Who may connect, and how.
    pub access: Access,
    /// Longest a batch is held open for answered sessions to send their next step (and at most
    /// a quarter of the previous batch's time); zero runs whatever is waiting at once.
    pub batch_wait: Duration,
}

/// Live counters of a running server, shared with its handle.
#[derive(Clone)]
pub struct ServerStats {
    source: StatsSource,
    /// Split fine-tuning's service, when the server also answers it (`--training`).
    training: Option<Arc<train::TrainShared>>,
}

impl std::fmt::Debug for ServerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStats")
            .field("sessions", &self.sessions())
            .finish()
    }
}

/// Which kind of server the counters belong to.
#[derive(Clone)]
enum StatsSource {
    Trunk(Arc<Shared>),
    Diffusion(Arc<diffusion::DiffusionShared>),
}

impl ServerStats {
    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        match &self.source {
            StatsSource::Trunk(shared) => shared.sessions.active(),
            StatsSource::Diffusion(shared) => shared.sessions.active(),
        }
    }

    /// Bytes of cached positions held by every open session (none for a diffusion trunk).
    pub fn kv_bytes(&self) -> u64 {
        match &self.source {
            StatsSource::Trunk(shared) => shared.kv_reserved.load(Ordering::SeqCst),
            StatsSource::Diffusion(_) => 0,
        }
    }

    /// Steps that ran through the trunk in a batch with another session's steps.
    pub fn batched_steps(&self) -> u64 {
        self.counters().batched_steps_total.load(Ordering::Relaxed)
    }

    /// Sessions the trunk answered whose next step has not reached it yet (none for a
    /// diffusion trunk): the ones a batch may be held open for.
    pub fn awaited(&self) -> usize {
        match &self.source {
            StatsSource::Trunk(shared) => shared.engine.awaited(),
            StatsSource::Diffusion(_) => 0,
        }
    }

    /// Batches the trunk ran (a lone step counts as a batch of one).
    pub fn batches(&self) -> u64 {
        self.counters().batches_total.load(Ordering::Relaxed)
    }

    /// Steps run through the trunk.
    pub fn steps(&self) -> u64 {
        self.counters().steps_total.load(Ordering::Relaxed)
    }

    fn counters(&self) -> &metrics::Counters {
        match &self.source {
            StatsSource::Trunk(shared) => &shared.counters,
            StatsSource::Diffusion(shared) => &shared.counters,
        }
    }

    /// Training sessions open now (none without `--training`).
    pub fn training_sessions(&self) -> usize {
        self.training.as_ref().map_or(0, |t| t.sessions.active())
    }

    /// Every metric in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = match &self.source {
            StatsSource::Trunk(_) => {
                self.counters()
                    .render(self.sessions(), self.kv_bytes(), self.awaited())
            }
            StatsSource::Diffusion(_) => self.counters().render_diffusion(self.sessions()),
        };
        if let Some(training) = &self.training {
            out.push_str(
                &training
                    .sessions
                    .counters()
                    .render_training(self.training_sessions()),
            );
        }
        out
    }
}

/// The language-model trunk server: a loaded trunk part and its fingerprint, served with
/// [`ServerOptions`]; its [`Server::limits`] cap the context limit by the model's.
pub type TrunkServer = Server<Limits>;

impl Server<Limits> {
    /// A server for `part`, which must be a trunk whose fingerprint is `fingerprint`.
    pub fn new(
        part: ModelPart,
        fingerprint: TrunkFingerprint,
        mut options: ServerOptions,
    ) -> Result<Self, ServerError> {
        if fingerprint.layers != part.spec().layers {
            return Err(ServerError::Config(format!(
                "the fingerprint is of layers {:?} but the part runs {:?}",
                fingerprint.layers,
                part.spec().layers
            )));
        }
        options.limits.max_context = options.limits.max_context.min(part.config().context_length);
        let shared = Arc::new(Shared::new(part, fingerprint, &options)?);
        let service = GrpcServer::new(
            shared.clone(),
            shared.sessions.clone(),
            options.limits.max_message_bytes,
        );
        let endpoint = Endpoint::new(service, options.access).failing_on(shared.engine.failure());
        let stats = ServerStats {
            source: StatsSource::Trunk(shared),
            training: None,
        };
        Ok(Self::with(options.limits, stats, endpoint))
    }

    /// The same server also answering split fine-tuning (`TrainTrunk`, `lsplit serve
    /// --training`): the forward and backward passes of its layers of `source`, which must be
    /// the model the trunk was loaded from, within `training`'s bounds, under the same codecs,
    /// limits, token and TLS.
    pub fn with_training(
        self,
        source: Arc<ModelSource>,
        training: TrainingLimits,
    ) -> Result<Self, ServerError> {
        let (limits, mut stats, endpoint) = self.into_parts();
        let StatsSource::Trunk(shared) = &stats.source else {
            return Err(ServerError::Config(
                "training is served for language models only".into(),
            ));
        };
        let train = Arc::new(train::TrainShared::new(
            source,
            shared.fingerprint.clone(),
            training,
            shared.terms.codecs(),
            (&limits, shared.limits_pb()),
            endpoint.transport(),
        )?);
        let service = GrpcServer::new(
            train.clone(),
            train.sessions.clone(),
            limits.max_message_bytes,
        );
        let endpoint = endpoint.also(service);
        stats.training = Some(train);
        Ok(Self::with(limits, stats, endpoint))
    }
}
