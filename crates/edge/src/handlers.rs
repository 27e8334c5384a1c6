//! The HTTP endpoints: OpenAI's chat and text completions (whole or as Server-Sent Events),
//! models and image generations, and for the page `/lsplit/info` and the image stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Path, State as Shared};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{ChatRequest, CompletionRequest, Settings};
use crate::error::ApiError;
use crate::generation::{self, Event, Job, Outcome};
use crate::image_job::{self, ImageDone, ImageEvent, ImageJob};
use crate::image_request::{DEFAULT_GUIDANCE, DEFAULT_STEPS, ImageBody, MAX_STEPS};
use crate::{ImageModel, State, unix_now};

/// Numbers the answers' ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Which API an answer belongs to: the shapes differ.
#[derive(Debug, Clone, Copy)]
enum Api {
    Chat,
    Completion,
}

/// The identity of one answer, repeated in every chunk.
#[derive(Debug, Clone)]
struct Answer {
    api: Api,
    id: String,
    created: u64,
    model: String,
    trace: bool,
}

impl Answer {
    fn new(api: Api, state: &State, trace: bool) -> Self {
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        };
        let created = unix_now();
        Self {
            api,
            id: format!(
                "{prefix}-{created:x}{:06x}",
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            ),
            created,
            model: state.model_id.clone(),
            trace,
        }
    }

    /// A streamed chunk carrying `text` (or, for chat, a `delta`), and `finish` at the end.
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        match self.api {
            Api::Chat => json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Api::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": delta.get("content").cloned().unwrap_or(json!("")),
                    "logprobs": null,
                    "finish_reason": finish,
                }],
            }),
        }
    }

    /// The whole answer.
    fn whole(&self, text: String, outcome: &Outcome) -> Value {
        let choice = match self.api {
            Api::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": outcome.finish.as_str(),
            }),
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": outcome.finish.as_str(),
            }),
        };
        let object = match self.api {
            Api::Chat => "chat.completion",
            Api::Completion => "text_completion",
        };
        let mut answer = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(outcome),
        });
        if self.trace {
            answer["lsplit"] = json!({ "summary": outcome.summary });
        }
        answer
    }
}

fn usage(outcome: &Outcome) -> Value {
    json!({
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    })
}

fn json_response(value: &Value) -> Response {
    ([(CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn content(text: String) -> Value {
    json!({ "content": text })
}

/// Parses a JSON body into `T`, or a 400 in OpenAI's shape.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(&e))
}

/// Refuses a request for a model other than the one served (under its id or an alias).
fn check_model(state: &State, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(name) if !state.serves(name) => {
            let also = match state.aliases.as_slice() {
                [] => String::new(),
                aliases => format!(" (also as `{}`)", aliases.join("`, `")),
            };
            Err(ApiError::model_not_found(format!(
                "The model `{name}` does not exist: this server serves `{}`{also}",
                state.model_id
            )))
        }
        _ => Ok(()),
    }
}

/// The generation a request asks for, checked against the context.
fn job(state: &State, settings: &Settings, prompt: Vec<u32>) -> Result<Job, ApiError> {
    let options = settings.options(
        &state.defaults,
        prompt.len(),
        state.device.model.context_length(),
    )?;
    Ok(Job {
        prompt,
        options,
        stop: settings.stop_sequences()?,
        trace: settings.trace(),
    })
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let answer = async {
        let request: ChatRequest = parse(&body)?;
        check_model(&state, request.settings.model.as_deref())?;
        let conversation = request.conversation()?;
        let tokenizer = state.device.model.tokenizer();
        if tokenizer.chat_template().is_none() {
            return Err(ApiError::invalid(
                Some("messages"),
                "this model has no chat template: use /v1/completions",
            ));
        }
        let text = tokenizer
            .apply_chat_template(&conversation, true)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let prompt = tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let job = job(&state, &request.settings, prompt)?;
        respond(&state, Api::Chat, &request.settings, job).await
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/completions`: the prompt as is, as `lsplit generate --raw` sends it.
pub(crate) async fn completions(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let answer = async {
        let request: CompletionRequest = parse(&body)?;
        check_model(&state, request.settings.model.as_deref())?;
        let prompt = state
            .device
            .model
            .prompt_tokens(request.text()?, true)
            .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
        let job = job(&state, &request.settings, prompt)?;
        respond(&state, Api::Completion, &request.settings, job).await
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// Runs the job and answers whole, or streamed as Server-Sent Events.
async fn respond(
    state: &Arc<State>,
    api: Api,
    settings: &Settings,
    job: Job,
) -> Result<Response, ApiError> {
    let answer = Answer::new(api, state, job.trace);
    let mut events = generation::start(state, job)?;
    if !settings.stream() {
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Token { text: piece, .. } | Event::Tail(piece) => text.push_str(&piece),
                Event::Done(outcome) => return Ok(json_response(&answer.whole(text, &outcome))),
                Event::Failed(error) => return Err(error),
            }
        }
        return Err(ended_early());
    }
    // The first event shows whether the trunk session opened: a failure there is a status.
    let first = match events.recv().await {
        Some(Event::Failed(error)) => return Err(error),
        Some(event) => event,
        None => return Err(ended_early()),
    };
    let (sse, stream) = mpsc::channel::<Result<SseEvent, Infallible>>(8);
    let include_usage = settings.include_usage();
    tokio::spawn(async move {
        let send = |value: &Value| {
            let event = SseEvent::default().data(value.to_string());
            sse.send(Ok(event))
        };
        if matches!(answer.api, Api::Chat)
            && send(&answer.chunk(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
        {
            return;
        }
        let mut next = Some(first);
        while let Some(event) = next.take() {
            let value = match event {
                Event::Token { text, trace } => {
                    let mut chunk = answer.chunk(content(text), None);
                    if let Some(trace) = trace {
                        chunk["lsplit"] = json!(trace);
                    }
                    chunk
                }
                Event::Tail(text) => answer.chunk(content(text), None),
                Event::Done(outcome) => {
                    let mut last = answer.chunk(json!({}), Some(outcome.finish.as_str()));
                    if answer.trace {
                        last["lsplit"] = json!({ "summary": outcome.summary });
                    }
                    if send(&last).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let mut chunk = answer.chunk(json!({}), None);
                        chunk["choices"] = json!([]);
                        chunk["usage"] = usage(&outcome);
                        if send(&chunk).await.is_err() {
                            return;
                        }
                    }
                    let _ = sse.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Event::Failed(error) => {
                    let _ = sse.send(Ok(SseEvent::default().data(error.body()))).await;
                    return;
                }
            };
            if send(&value).await.is_err() {
                return;
            }
            next = events.recv().await;
        }
        let _ = sse
            .send(Ok(SseEvent::default().data(ended_early().body())))
            .await;
    });
    Ok(Sse::new(ReceiverStream::new(stream))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The generation thread stopped without a result (it cannot, short of a crash).
fn ended_early() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        message: "the generation ended without a result".into(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// The text model's `/v1/models` entry under the name `id` (its id or an alias).
fn model_entry(state: &State, id: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": state.started,
        "owned_by": "lsplit",
    })
}

fn image_model_entry(state: &State) -> Option<Value> {
    state.images.as_ref().map(|images| {
        json!({
            "id": images.model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "lsplit",
        })
    })
}

/// `GET /health`: 200 with an empty body while the server runs, without a key, for load
/// balancers and supervisors (as vLLM's).
pub(crate) async fn health() -> StatusCode {
    StatusCode::OK
}

/// `GET /v1/models`: the text model, its aliases, then the image model if one is loaded.
pub(crate) async fn models(Shared(state): Shared<Arc<State>>) -> Response {
    let names = std::iter::once(&state.model_id).chain(&state.aliases);
    let mut data: Vec<Value> = names.map(|name| model_entry(&state, name)).collect();
    data.extend(image_model_entry(&state));
    json_response(&json!({ "object": "list", "data": data }))
}

/// `GET /v1/models/{id}`.
pub(crate) async fn model(Shared(state): Shared<Arc<State>>, Path(id): Path<String>) -> Response {
    if let Some(entry) = image_model_entry(&state).filter(|e| e["id"] == id.as_str()) {
        return json_response(&entry);
    }
    match check_model(&state, Some(&id)) {
        Ok(()) => json_response(&model_entry(&state, &id)),
        Err(e) => e.into_response(),
    }
}

/// Reads an image request and checks it against the loaded diffusion model: 404
/// `model_not_found` when none is loaded or the request names another.
fn image_job(state: &State, body: &Bytes, progress: bool) -> Result<ImageJob, ApiError> {
    let body: ImageBody = parse(body)?;
    if body.prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "prompt must not be empty",
        ));
    }
    let Some(images) = &state.images else {
        let asked = body
            .model
            .as_ref()
            .map_or_else(String::new, |m| format!("`{m}` is not loaded: "));
        return Err(ApiError::model_not_found(format!(
            "{asked}no image model is loaded. This server runs the text model `{}`; start \
             lsplit edge with --image-model DIR (a diffusers Stable Diffusion directory) to \
             generate images",
            state.model_id
        )));
    };
    if let Some(name) = body.model.as_deref().filter(|m| *m != images.model_id) {
        return Err(ApiError::model_not_found(format!(
            "The model `{name}` does not exist: this server draws images with `{}`",
            images.model_id
        )));
    }
    Ok(ImageJob {
        request: body.request(&images.pipeline, images.max_attention_bytes)?,
        progress,
        preview_every: body.preview_every,
    })
}

/// What lsplit adds to a finished image: the seed (drawn when the request left it out), the
/// split and the bytes that crossed.
fn image_summary(images: &ImageModel, done: &ImageDone) -> Value {
    json!({
        "seed": done.seed,
        "width": done.width,
        "height": done.height,
        "steps": done.steps,
        "unet_split": images.split().to_string(),
        "step_codec": images.codec.name(),
        "elapsed_ms": done.elapsed_ms,
        "bytes": done.bytes,
    })
}

/// `POST /v1/images/generations`: OpenAI's image API, answered with one `b64_json` PNG.
pub(crate) async fn images(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let answer = async {
        let job = image_job(&state, &body, false)?;
        let mut events = image_job::start(&state, job)?;
        while let Some(event) = events.recv().await {
            match event {
                ImageEvent::Started | ImageEvent::Step(_) => {}
                ImageEvent::Done(done) => {
                    let Some(images) = &state.images else {
                        break;
                    };
                    return Ok(json_response(&json!({
                        "created": unix_now(),
                        "data": [{"b64_json": done.b64_json}],
                        "lsplit": image_summary(images, &done),
                    })));
                }
                ImageEvent::Failed(error) => return Err(error),
            }
        }
        Err(ended_early())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /lsplit/images/stream`: the same request, answered with Server-Sent Events for the
/// page: `start`, then `step` after every step (bytes so far, the tensor that crossed, a
/// preview every `preview_every` steps), then `done` with the image, or `error`.
pub(crate) async fn images_stream(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let answer = async {
        let job = image_job(&state, &body, true)?;
        let Some(images) = &state.images else {
            return Err(ended_early());
        };
        let start = json!({
            "seed": job.request.seed,
            "width": job.request.width,
            "height": job.request.height,
            "steps": job.request.steps,
            "guidance": job.request.guidance,
            "unet_split": images.split().to_string(),
            "step_codec": images.codec.name(),
            "trunk": images.trunks.location(),
        });
        let mut events = image_job::start(&state, job)?;
        // The first event shows whether the trunk session opened: a failure there is a status.
        match events.recv().await {
            Some(ImageEvent::Started) => {}
            Some(ImageEvent::Failed(error)) => return Err(error),
            _ => return Err(ended_early()),
        }
        let (sse, stream) = mpsc::channel::<Result<SseEvent, Infallible>>(4);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let send = |name: &str, value: &Value| {
                sse.send(Ok(SseEvent::default().event(name).data(value.to_string())))
            };
            if send("start", &start).await.is_err() {
                return;
            }
            while let Some(event) = events.recv().await {
                let sent = match event {
                    ImageEvent::Started => continue,
                    ImageEvent::Step(report) => send("step", &json!(report)).await,
                    ImageEvent::Done(done) => {
                        let Some(images) = &state.images else {
                            return;
                        };
                        let value = json!({
                            "b64_json": done.b64_json,
                            "lsplit": image_summary(images, &done),
                        });
                        let _ = send("done", &value).await;
                        return;
                    }
                    ImageEvent::Failed(error) => {
                        let _ = sse
                            .send(Ok(SseEvent::default().event("error").data(error.body())))
                            .await;
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            let _ = sse
                .send(Ok(SseEvent::default()
                    .event("error")
                    .data(ended_early().body())))
                .await;
        });
        Ok(Sse::new(ReceiverStream::new(stream))
            .keep_alive(KeepAlive::default())
            .into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// The image model as the page shows it.
fn image_info(state: &State) -> Value {
    let Some(images) = &state.images else {
        return Value::Null;
    };
    json!({
        "model": images.model_id,
        "unet_split": images.split().to_string(),
        "unet_levels": images.pipeline.unet_levels(),
        "step_codec": images.codec.name(),
        "trunk": images.trunks.location(),
        "default_size": images.pipeline.default_size(),
        "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        "max_steps": MAX_STEPS,
        "drawn": state.images_drawn.load(Ordering::SeqCst),
        "stopped": state.images_stopped.load(Ordering::SeqCst),
    })
}

/// `GET /lsplit/info`: what the page shows about the model, the split and the defaults.
pub(crate) async fn info(Shared(state): Shared<Arc<State>>) -> Response {
    let parts = state.device.model.parts();
    let config = parts.first().map(|p| p.config());
    let sampling = &state.defaults.sampling;
    json_response(&json!({
        "model": state.model_id,
        "layers": config.map(|c| c.num_layers),
        "hidden_size": config.map(|c| c.hidden_size),
        "context_length": state.device.model.context_length(),
        "split": state.device.model.plan().map(|p| json!({"k1": p.k1, "k2": p.k2})),
        "codec": state.device.model.codec().name(),
        "trunk": state.device.trunk_location(),
        "chat_template": state.device.model.tokenizer().chat_template().is_some(),
        "images": image_info(&state),
        "sessions_open": state.sessions_open(),
        "max_sessions": state.max_sessions,
        "defaults": {
            "max_tokens": state.defaults.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "repeat_penalty": sampling.repetition_penalty,
            "repeat_last_n": sampling.repeat_last_n,
            "seed": sampling.seed,
        },
    }))
}

/// Anything else: 404 in OpenAI's shape.
pub(crate) async fn no_route(method: Method, uri: Uri) -> Response {
    ApiError::no_route(method.as_str(), uri.path()).into_response()
}
