//! `lsplit edge`: the device side of a split model as a local server, so that any
//! OpenAI-style client (and a person, through the built-in page) can use it unchanged.
//!
//! One process holds the head and tail and serves an OpenAI-compatible HTTP API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/v1/images/generations`) and a
//! web page that shows what each token cost and what crossed the wire. Every request gets its
//! own generation thread and its own trunk session, with fresh keys, opened through the
//! [`Device`] that `lsplit generate` uses too; the device loop sees the trunk only through the
//! `Trunk` trait, in-process or remote alike. With a diffusion model ([`ImageModel`]) it draws
//! images too, one at a time on a blocking thread, each with its own diffusion trunk session
//! from [`DiffusionTrunks`].

mod api;
mod auth;
mod error;
mod generation;
mod guard;
mod handlers;
mod image_job;
mod image_request;
mod page;
mod step_view;
mod stop;
mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::routing::{get, post};
use lsplit_device::{Device, DiffusionTrunks};
use lsplit_diffusion::{DevicePipeline, UnetSplit};
use lsplit_split::GenerateOptions;
use lsplit_wire::StepCodec;
use tokio::sync::Semaphore;

pub use api::{BodyKind, check_body};
pub use error::{ApiError, EdgeError};
pub use guard::EdgeGuard;
pub use image_request::{DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_STEPS};

/// The diffusion model behind `/v1/images/generations` and the page's image tab.
pub struct ImageModel {
    /// The device's share: text encoders, scheduler, VAE and the UNet's ends (or all of it).
    pub pipeline: DevicePipeline,
    /// The model's name in the API.
    pub model_id: String,
    /// Where diffusion trunk sessions come from, one per image.
    pub trunks: DiffusionTrunks,
    /// How step tensors are encoded on the wire.
    pub codec: StepCodec,
    /// Most bytes an image's attention may allocate at once on this device: images larger
    /// than that are refused (400).
    pub max_attention_bytes: u64,
}

impl ImageModel {
    /// How the UNet is divided.
    pub fn split(&self) -> UnetSplit {
        self.pipeline.split()
    }
}

/// What the edge server serves.
pub struct EdgeConfig {
    /// The device's share of the model (tokenizer, head and tail, or the whole model) and
    /// where its trunk sessions come from.
    pub device: Device,
    /// The model's name in the API (`model` of requests, `/v1/models`).
    pub model_id: String,
    /// More names the `model` field of requests accepts for the same model (`lsplit edge
    /// --served-model-name`, as in vLLM); `/v1/models` lists them after `model_id`.
    pub aliases: Vec<String>,
    /// Settings of requests that leave them out: `lsplit edge`'s flags.
    pub defaults: GenerateOptions,
    /// The key clients must send as `Authorization: Bearer KEY`; `None` lets every local client in.
    pub api_key: Option<String>,
    /// Generations and images running or waiting at once; more get 429.
    pub max_sessions: usize,
    /// The diffusion model, if one is loaded.
    pub images: Option<ImageModel>,
}

/// Shared by every request.
pub(crate) struct State {
    device: Device,
    model_id: String,
    aliases: Vec<String>,
    defaults: GenerateOptions,
    api_key: Option<String>,
    /// Which hosts, origins and content types are answered.
    guard: EdgeGuard,
    max_sessions: usize,
    /// One permit per generation or image (and so trunk session) open or waiting.
    slots: Arc<Semaphore>,
    images: Option<ImageModel>,
    /// Held by the image being drawn: images are drawn one at a time.
    image_turn: Arc<Semaphore>,
    /// Images drawn to the end, and stopped because their client went away.
    images_drawn: AtomicU64,
    images_stopped: AtomicU64,
    /// When the server started, in Unix seconds (`created` of the model).
    started: u64,
}

/// The edge server: the API and the page over one loaded model.
#[derive(Clone)]
pub struct EdgeServer {
    state: Arc<State>,
}

/// Refuses to expose the API beyond this machine without a key: a loopback address may go
/// without one, any other address needs one.
pub fn check_listen(addr: SocketAddr, api_key: Option<&str>) -> Result<(), EdgeError> {
    match api_key {
        Some(key) if key.trim().is_empty() => Err(EdgeError::EmptyApiKey),
        Some(_) => Ok(()),
        None if addr.ip().is_loopback() => Ok(()),
        None => Err(EdgeError::ApiKeyRequired(addr)),
    }
}

impl State {
    /// Generations and images (and so trunk sessions) open or waiting now.
    pub(crate) fn sessions_open(&self) -> usize {
        self.max_sessions - self.slots.available_permits()
    }

    /// Whether `name` names the text model: its id or one of its aliases.
    pub(crate) fn serves(&self, name: &str) -> bool {
        name == self.model_id || self.aliases.iter().any(|alias| alias == name)
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl EdgeServer {
    /// A server over `config`, answering its own page and loopback names only.
    pub fn new(config: EdgeConfig) -> Self {
        Self::guarded(config, EdgeGuard::default())
    }

    /// A server over `config` that answers the hosts and origins `guard` allows.
    pub fn guarded(config: EdgeConfig, guard: EdgeGuard) -> Self {
        Self {
            state: Arc::new(State {
                device: config.device,
                model_id: config.model_id,
                aliases: config.aliases,
                defaults: config.defaults,
                api_key: config.api_key,
                guard,
                max_sessions: config.max_sessions.max(1),
                slots: Arc::new(Semaphore::new(config.max_sessions.max(1))),
                images: config.images,
                image_turn: Arc::new(Semaphore::new(1)),
                images_drawn: AtomicU64::new(0),
                images_stopped: AtomicU64::new(0),
                started: unix_now(),
            }),
        }
    }

    /// Generations, and so trunk sessions, open now.
    pub fn sessions_open(&self) -> usize {
        self.state.sessions_open()
    }

    /// The routes: the API (behind the key, if any) and the page, all behind the checks of
    /// `Host`, `Origin` and `Content-Type` (see [`EdgeGuard`]).
    pub fn router(&self) -> Router {
        let api = Router::new()
            .route("/v1/chat/completions", post(handlers::chat_completions))
            .route("/v1/completions", post(handlers::completions))
            .route("/v1/models", get(handlers::models))
            .route("/v1/models/{id}", get(handlers::model))
            .route("/v1/images/generations", post(handlers::images))
            .route("/lsplit/images/stream", post(handlers::images_stream))
            .route("/lsplit/info", get(handlers::info))
            .route_layer(axum::middleware::from_fn_with_state(
                Arc::clone(&self.state),
                auth::require_key,
            ));
        Router::new()
            .route("/health", get(handlers::health))
            .merge(api)
            .merge(page::routes())
            .fallback(handlers::no_route)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&self.state),
                guard::check,
            ))
            .with_state(Arc::clone(&self.state))
    }

    /// Serves on `listener` until `shutdown` completes, then lets open requests finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), EdgeError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}
