//! One image per request, drawn on a blocking thread (diffusion is CPU-heavy and synchronous),
//! one image at a time: later requests wait their turn without holding the async runtime. Each
//! image gets its own trunk session from [`OpenDiffusionTrunk`](crate::OpenDiffusionTrunk) and
//! reports its steps through a channel; when the receiver goes away (the client disconnected)
//! the image stops at the next step.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine;
use lsplit_diffusion::{
    DiffusionError, DiffusionTrunk, ImageRequest, ImageSetup, StepProgress, StepRequest, WireBytes,
};
use lsplit_wire::StepTensor;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::generation::Slot;
use crate::step_view::{TensorView, preview_png};
use crate::{ImageModel, State};

/// Events buffered between the image thread and the HTTP response.
const CHANNEL_DEPTH: usize = 8;

/// What to draw and what to report on the way.
#[derive(Debug)]
pub(crate) struct ImageJob {
    pub request: ImageRequest,
    /// Report each step with the tensor that crossed (for the page's stream).
    pub progress: bool,
    /// Every this many steps, a preview of the latents (with `progress`).
    pub preview_every: Option<usize>,
}

/// Bytes that crossed so far, as the page shows them.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct BytesSoFar {
    pub setup: usize,
    pub up: usize,
    pub down: usize,
}

impl From<WireBytes> for BytesSoFar {
    fn from(b: WireBytes) -> Self {
        Self {
            setup: b.setup,
            up: b.up,
            down: b.down,
        }
    }
}

/// One step of an image, for the page.
#[derive(Debug, Serialize)]
pub(crate) struct StepReport {
    pub step: usize,
    pub total: usize,
    pub elapsed_ms: f64,
    pub bytes: BytesSoFar,
    /// A small PNG of the latents so far, base64, every `preview_every` steps.
    pub preview_png: Option<String>,
    /// The tensor that crossed to the trunk this step; `None` unsplit.
    pub uplink: Option<TensorView>,
}

/// A finished image.
#[derive(Debug, Serialize)]
pub(crate) struct ImageDone {
    /// The PNG, base64: OpenAI's `b64_json`.
    pub b64_json: String,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub elapsed_ms: f64,
    pub bytes: BytesSoFar,
}

/// What the image thread reports.
#[derive(Debug)]
pub(crate) enum ImageEvent {
    /// Its turn came and the trunk session opened.
    Started,
    Step(StepReport),
    Done(ImageDone),
    Failed(ApiError),
}

/// A trunk session that counts the encoded bytes of what crosses it: the pipeline's own
/// [`WireBytes`], known after every step rather than at the end.
struct MeteredTrunk<'a> {
    inner: Box<dyn DiffusionTrunk>,
    bytes: &'a Cell<WireBytes>,
}

fn byte_len(tensors: &[StepTensor]) -> usize {
    tensors.iter().map(StepTensor::byte_len).sum()
}

impl DiffusionTrunk for MeteredTrunk<'_> {
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError> {
        let sent = byte_len(&setup.conditioning);
        self.inner.begin_image(setup)?;
        let mut bytes = self.bytes.get();
        bytes.setup += sent;
        self.bytes.set(bytes);
        Ok(())
    }

    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError> {
        let sent = byte_len(&request.inputs);
        let back = self.inner.step(request)?;
        let mut bytes = self.bytes.get();
        bytes.up += sent;
        bytes.down += byte_len(&back);
        bytes.steps += 1;
        self.bytes.set(bytes);
        Ok(back)
    }
}

/// Takes a session slot and queues `job` for the image thread; events arrive on the receiver.
pub(crate) fn start(
    state: &Arc<State>,
    job: ImageJob,
) -> Result<mpsc::Receiver<ImageEvent>, ApiError> {
    let slot = Slot::take(state)?;
    let (events, receiver) = mpsc::channel(CHANNEL_DEPTH);
    let turn = Arc::clone(&state.image_turn);
    tokio::spawn(async move {
        let Ok(permit) = turn.acquire_owned().await else {
            return;
        };
        if events.is_closed() {
            tracing::info!("client went away before its image started");
            return;
        }
        let drawing = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            run(&slot, job, &events);
        });
        if let Err(e) = drawing.await {
            tracing::error!(error = %e, "the image thread failed");
        }
    });
    Ok(receiver)
}

/// The error a step returns when nobody listens any more.
fn went_away() -> DiffusionError {
    DiffusionError::Request("the client went away".into())
}

/// An error of the pipeline as the API reports it: a request the model cannot honour (say, more
/// steps than its scheduler allows) is a 400, the trunk failing a bad gateway, the rest a 500.
fn api_error(error: &DiffusionError) -> ApiError {
    let message = format!("image generation failed: {error}");
    let status = match error {
        DiffusionError::Request(_)
        | DiffusionError::InvalidConfig(_)
        | DiffusionError::InvalidInput(_)
        | DiffusionError::UnsupportedScheduler(_) => return ApiError::invalid(None, message),
        DiffusionError::Trunk(_) => axum::http::StatusCode::BAD_GATEWAY,
        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError {
        status,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Draws `job`'s image to the end, or until nobody listens.
fn run(slot: &Slot, job: ImageJob, events: &mpsc::Sender<ImageEvent>) {
    let state = slot.state();
    let Some(images) = &state.images else {
        return;
    };
    let started = Instant::now();
    let bytes = Cell::new(WireBytes::default());
    let mut trunk = match images.trunks.open() {
        Ok(trunk) => trunk.map(|inner| MeteredTrunk {
            inner,
            bytes: &bytes,
        }),
        Err(e) => {
            let _ = events.blocking_send(ImageEvent::Failed(api_error(&e)));
            return;
        }
    };
    if events.blocking_send(ImageEvent::Started).is_err() {
        return;
    }
    let result = draw(images, &job, trunk.as_mut(), &bytes, events, started);
    let done = match result {
        Ok(done) => done,
        Err(_) if events.is_closed() => {
            state.images_stopped.fetch_add(1, Ordering::SeqCst);
            tracing::info!("client went away; image stopped and its trunk session closed");
            return;
        }
        Err(e) => {
            let _ = events.blocking_send(ImageEvent::Failed(api_error(&e)));
            return;
        }
    };
    state.images_drawn.fetch_add(1, Ordering::SeqCst);
    let _ = events.blocking_send(ImageEvent::Done(done));
}

/// Runs the pipeline, reporting each step when asked, stopping when nobody listens.
fn draw(
    images: &ImageModel,
    job: &ImageJob,
    trunk: Option<&mut MeteredTrunk<'_>>,
    bytes: &Cell<WireBytes>,
    events: &mpsc::Sender<ImageEvent>,
    started: Instant,
) -> Result<ImageDone, DiffusionError> {
    let pipeline = &images.pipeline;
    let mut on_step = |p: &StepProgress<'_>| {
        if events.is_closed() {
            return Err(went_away());
        }
        if !job.progress {
            return Ok(());
        }
        let preview = job.preview_every.filter(|every| *every > 0);
        let preview_png = match preview {
            Some(every) if p.step.is_multiple_of(every) && p.step < p.total => {
                Some(preview_png(&pipeline.decode(p.latents)?)?)
            }
            _ => None,
        };
        let report = StepReport {
            step: p.step,
            total: p.total,
            elapsed_ms: ms(started),
            bytes: bytes.get().into(),
            preview_png,
            uplink: p.uplink.map(TensorView::of).transpose()?,
        };
        events
            .blocking_send(ImageEvent::Step(report))
            .map_err(|_| went_away())
    };
    let generated = pipeline.generate(
        &job.request,
        trunk.map(|t| t as &mut dyn DiffusionTrunk),
        &mut on_step,
    )?;
    debug_assert_eq!(generated.bytes, bytes.get());
    let png = generated.image.to_png()?;
    Ok(ImageDone {
        b64_json: base64::engine::general_purpose::STANDARD.encode(png),
        seed: job.request.seed,
        width: generated.image.width,
        height: generated.image.height,
        steps: job.request.steps,
        elapsed_ms: ms(started),
        bytes: generated.bytes.into(),
    })
}
