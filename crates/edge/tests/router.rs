//! The edge router in-process (`tower::ServiceExt::oneshot`, no socket), on the real default
//! model with random split points (K1 from 1..=3, K2 from 27..=29) and an in-process trunk: the exact status and body of the page, the model
//! list, a greedy chat completion (the text `lsplit generate` prints, computed here unsplit),
//! and every error the API answers in OpenAI's shape.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use lsplit_device::{Device, DeviceOptions, PolicyChoice};
use lsplit_edge::{EdgeConfig, EdgeServer};
use lsplit_model::{ModelSource, SplitPlan};
use lsplit_split::{DeviceModel, GenerateOptions, Obfuscation, load_tokenizer};
use lsplit_wire::Codec;
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL_ID: &str = "smol";
const KEY: &str = "s3cret";
const CHAT_PROMPT: &str = "Write one sentence about the sea.";
const CONTEXT: usize = 8192;

fn source() -> ModelSource {
    let path = lsplit_fetch::ensure_default_model().expect("default model");
    ModelSource::open(&path).expect("open the default model")
}

/// The edge server over the default model with random split points and an in-process trunk,
/// greedy by default, with `api_key` if given.
fn server(api_key: Option<&str>) -> EdgeServer {
    EdgeServer::new(config(api_key, &[]))
}

/// [`server`], whose model also answers to `aliases` (`--served-model-name`).
fn server_named(api_key: Option<&str>, aliases: &[&str]) -> EdgeServer {
    EdgeServer::new(config(api_key, aliases))
}

/// The configuration of [`server_named`].
fn config(api_key: Option<&str>, aliases: &[&str]) -> EdgeConfig {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let device = Device::load(DeviceOptions {
        path: source.path().to_path_buf(),
        split: Some(SplitPlan::new(3, 27, source.config().num_layers).expect("plan")),
        source,
        tokenizer,
        cloud: Vec::new(),
        trunk_adapter: None,
        policy: PolicyChoice::Random {
            k1: "1,2,3".into(),
            k2: "27,28,29".into(),
        },
        obfuscation: Obfuscation::None,
        codec: Codec::F32,
    })
    .expect("device");
    EdgeConfig {
        device,
        model_id: MODEL_ID.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        defaults: GenerateOptions::default(),
        api_key: api_key.map(str::to_string),
        max_sessions: 2,
        images: None,
    }
}

/// What the router answers: status, content type and body.
struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request through the router, without a socket.
async fn send(
    server: &EdgeServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Reply {
    read(respond(server, method, path, key, body).await).await
}

/// Sends `request` through the router as it is, without a socket.
async fn exchange(server: &EdgeServer, request: Request<Body>) -> Reply {
    read(server.router().oneshot(request).await.expect("infallible")).await
}

/// The router's response to one request, its body unread.
async fn respond(
    server: &EdgeServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Response {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if !body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Body::from(body.to_string())).expect("request");
    server.router().oneshot(request).await.expect("infallible")
}

/// Reads a whole response: status, content type and body.
async fn read(response: Response) -> Reply {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        content_type,
        body: String::from_utf8(bytes.to_vec()).expect("utf-8"),
    }
}

/// A chat completion request.
async fn chat(server: &EdgeServer, key: Option<&str>, body: &str) -> Reply {
    send(server, "POST", "/v1/chat/completions", key, body).await
}

/// Asserts that `reply` is `status` with OpenAI's error body of an invalid request.
fn assert_error(
    reply: &Reply,
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.content_type, "application/json");
    assert_eq!(
        reply.json(),
        json!({"error": {
            "message": message, "type": "invalid_request_error", "param": param, "code": code
        }})
    );
}

/// The default model unsplit, as `lsplit generate --no-split` runs it.
fn unsplit() -> DeviceModel {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    DeviceModel::unsplit(&source, tokenizer, &candle_core::Device::Cpu).expect("model")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_is_served_at_the_root_without_a_key() {
    let server = server(Some(KEY));
    let reply = send(&server, "GET", "/", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "text/html; charset=utf-8");
    assert!(
        reply.body.contains("<title>lsplit edge</title>"),
        "{}",
        reply.body
    );
    let reply = send(&server, "GET", "/app.js", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "text/javascript; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn models_list_the_served_model() {
    let server = server(None);
    let reply = send(&server, "GET", "/v1/models", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/json");
    let list = reply.json();
    let created = list["data"][0]["created"].as_u64().expect("created");
    let entry =
        json!({"id": MODEL_ID, "object": "model", "created": created, "owned_by": "lsplit"});
    assert_eq!(list, json!({"object": "list", "data": [entry]}));
    let reply = send(&server, "GET", "/v1/models/smol", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), entry);
    let reply = send(&server, "GET", "/v1/models/gpt-4o", None, "").await;
    assert_error(
        &reply,
        StatusCode::NOT_FOUND,
        "The model `gpt-4o` does not exist: this server serves `smol`",
        Some("model"),
        Some("model_not_found"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greedy_chat_completion_answers_what_generate_prints() {
    const MAX_TOKENS: usize = 12;
    // What `lsplit generate PROMPT --max-tokens 12 --no-split` prints, greedy: split and
    // unsplit give the same text, bit for bit.
    let model = unsplit();
    let prompt = model.prompt_tokens(CHAT_PROMPT, false).expect("prompt");
    let expected = {
        let options = GenerateOptions {
            max_tokens: MAX_TOKENS,
            ..GenerateOptions::default()
        };
        model
            .unsplit_session()
            .expect("session")
            .generate(&prompt, &options, &mut |_| {})
            .expect("generate")
    };
    assert_eq!(expected.tokens.len(), MAX_TOKENS, "{:?}", expected.text);
    assert!(!expected.text.is_empty());

    let server = server(None);
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": MAX_TOKENS,
    });
    let reply = chat(&server, None, &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.content_type, "application/json");
    let answer = reply.json();
    let id = answer["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-"), "{id}");
    assert_eq!(
        answer,
        json!({
            "id": id,
            "object": "chat.completion",
            "created": answer["created"].as_u64().expect("created"),
            "model": MODEL_ID,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": expected.text},
                "logprobs": null,
                "finish_reason": "length",
            }],
            "usage": {
                "prompt_tokens": prompt.len(),
                "completion_tokens": MAX_TOKENS,
                "total_tokens": prompt.len() + MAX_TOKENS,
            },
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_json_and_bad_shapes_get_400() {
    let server = server(None);
    let reply = chat(
        &server,
        None,
        r#"{"messages": [{"role": "user", "content": "hi"}"#,
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "could not parse the JSON body of the request: EOF while parsing a list at line 1 \
         column 47",
        None,
        None,
    );
    let reply = chat(&server, None, r#"{"messages": "hi"}"#).await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid request body: invalid type: string \"hi\", expected a sequence at line 1 \
         column 17",
        None,
        None,
    );
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#;
    assert_error(
        &chat(&server, None, body).await,
        StatusCode::BAD_REQUEST,
        "n must be 1: lsplit edge generates one choice per request",
        Some("n"),
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_model_gets_404() {
    let server = server(None);
    let body = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}"#;
    assert_error(
        &chat(&server, None, body).await,
        StatusCode::NOT_FOUND,
        "The model `gpt-4o` does not exist: this server serves `smol`",
        Some("model"),
        Some("model_not_found"),
    );
    let body = r#"{"prompt": "a red kite"}"#;
    assert_error(
        &send(&server, "POST", "/v1/images/generations", None, body).await,
        StatusCode::NOT_FOUND,
        "no image model is loaded. This server runs the text model `smol`; start lsplit edge \
         with --image-model DIR (a diffusers Stable Diffusion directory) to generate images",
        Some("model"),
        Some("model_not_found"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_needs_the_key_when_one_is_set() {
    let server = server(Some(KEY));
    assert_error(
        &send(&server, "GET", "/v1/models", None, "").await,
        StatusCode::UNAUTHORIZED,
        "You didn't provide an API key. You need to provide your API key in an Authorization \
         header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        None,
        None,
    );
    let hi = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
    for reply in [
        send(&server, "GET", "/v1/models", Some("nope"), "").await,
        send(&server, "GET", "/lsplit/info", Some("nope"), "").await,
        chat(&server, Some("nope"), hi).await,
    ] {
        assert_error(
            &reply,
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            None,
            Some("invalid_api_key"),
        );
    }
    let reply = send(&server, "GET", "/v1/models", Some(KEY), "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["data"][0]["id"], json!(MODEL_ID));
}

/// OpenAI's message for a prompt plus completion longer than the context.
fn too_long(prompt: usize, completion: usize) -> String {
    format!(
        "This model's maximum context length is {CONTEXT} tokens. However, you requested {} \
         tokens ({prompt} in the messages, {completion} in the completion). Please reduce the \
         length of the messages or completion.",
        prompt + completion
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_the_context_gets_400() {
    let server = server(None);
    let model = unsplit();
    let prompt = model.prompt_tokens("hi", false).expect("prompt").len();
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}"#;
    assert_error(
        &chat(&server, None, body).await,
        StatusCode::BAD_REQUEST,
        &too_long(prompt, 9000),
        Some("messages"),
        Some("context_length_exceeded"),
    );
    // A prompt that fills the whole context leaves no room for one token.
    let words = "sea ".repeat(CONTEXT);
    let prompt = model.prompt_tokens(&words, true).expect("prompt").len();
    assert!(prompt >= CONTEXT, "{prompt}");
    let body = json!({"prompt": words}).to_string();
    assert_error(
        &send(&server, "POST", "/v1/completions", None, &body).await,
        StatusCode::BAD_REQUEST,
        &too_long(prompt, 1),
        Some("messages"),
        Some("context_length_exceeded"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_route_gets_404() {
    let server = server(None);
    for (method, path) in [("GET", "/v1/nothing"), ("POST", "/v2/chat/completions")] {
        assert_error(
            &send(&server, method, path, None, "").await,
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {method} {path}"),
            None,
            Some("unknown_url"),
        );
    }
}

/// A chat request with `headers` (and no others) whose body asks for `max_tokens`.
fn raw_chat(headers: &[(&str, &str)], max_tokens: &str) -> Request<Body> {
    let mut request = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = format!(
        r#"{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {max_tokens}}}"#
    );
    request.body(Body::from(body)).expect("request")
}

/// Asserts that `reply` is `status` with OpenAI's error body of `message` and `code`.
fn assert_refused(reply: &Reply, status: StatusCode, message: &str, code: &str) {
    assert_error(reply, status, message, None, Some(code));
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_cross_site_page_can_send_is_refused() {
    let server = server(None);
    let json = ("content-type", "application/json");
    // A form or a no-preflight fetch can only send text/plain and form types.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        assert_refused(
            &exchange(&server, raw_chat(&[("content-type", content_type)], "1")).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!(
                "the request body must be JSON sent as Content-Type: application/json (got \
                 `{content_type}`)"
            ),
            "unsupported_media_type",
        );
    }
    assert_refused(
        &exchange(&server, raw_chat(&[], "1")).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "the request body must be JSON sent as Content-Type: application/json (got no \
         Content-Type)",
        "unsupported_media_type",
    );
    // DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    assert_refused(
        &exchange(&server, raw_chat(&[json, ("host", "evil.example")], "1")).await,
        StatusCode::FORBIDDEN,
        "the Host header `evil.example` does not name this server; start lsplit edge with \
         --allowed-host NAME to answer to another name",
        "host_not_allowed",
    );
    let page = exchange(
        &server,
        Request::builder()
            .uri("/")
            .header("host", "evil.example:8080")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "the page too");
    // Another site's page, from the browser of someone using this server.
    let foreign = [
        json,
        ("host", "127.0.0.1:8080"),
        ("origin", "http://evil.example"),
    ];
    assert_refused(
        &exchange(&server, raw_chat(&foreign, "1")).await,
        StatusCode::FORBIDDEN,
        "requests from pages of `http://evil.example` are refused; start lsplit edge with \
         --cors-origin ORIGIN to allow that site",
        "origin_not_allowed",
    );
    // A count that would wrap past the context check.
    let model = unsplit();
    let prompt = model.prompt_tokens("hi", false).expect("prompt").len();
    assert_error(
        &exchange(&server, raw_chat(&[json], "18446744073709551615")).await,
        StatusCode::BAD_REQUEST,
        &format!(
            "This model's maximum context length is {CONTEXT} tokens. However, you requested {} \
             tokens ({prompt} in the messages, 18446744073709551615 in the completion). Please \
             reduce the length of the messages or completion.",
            prompt as u128 + 18446744073709551615
        ),
        Some("messages"),
        Some("context_length_exceeded"),
    );
    assert_error(
        &exchange(&server, raw_chat(&[json], "18446744073709551616")).await,
        StatusCode::BAD_REQUEST,
        "invalid request body: invalid type: floating point `1.8446744073709552e+19`, expected \
         usize at line 1 column 85",
        None,
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_itself_and_allowed_sites_are_answered() {
    let guard = lsplit_edge::EdgeGuard {
        listen: Some("127.0.0.1:8080".parse().expect("addr")),
        allowed_hosts: vec!["edge.lan".into()],
        cors_origins: vec!["http://localhost:3000".into()],
    };
    let server = EdgeServer::guarded(config(None, &[]), guard);
    let models = |headers: &[(&str, &str)]| {
        let mut request = Request::builder().uri("/v1/models");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::empty()).expect("request")
    };
    for headers in [
        &[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ][..],
        &[("host", "localhost:8080")],
        &[
            ("host", "edge.lan:8080"),
            ("origin", "http://edge.lan:8080"),
        ],
    ] {
        let reply = exchange(&server, models(headers)).await;
        assert_eq!(reply.status, StatusCode::OK, "{headers:?}: {}", reply.body);
    }
    let response = server
        .router()
        .oneshot(models(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://localhost:3000"),
        ]))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri("/v1/chat/completions")
        .header("host", "127.0.0.1:8080")
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .expect("request");
    let response = server
        .router()
        .oneshot(preflight)
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        response.headers()["access-control-allow-methods"],
        "GET, POST"
    );
    assert_eq!(
        response.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_200_without_a_key() {
    let server = server(Some(KEY));
    let reply = send(&server, "GET", "/health", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn served_model_names_are_accepted_and_listed() {
    let server = server_named(None, &["gpt-4o-mini", "local"]);
    let list = send(&server, "GET", "/v1/models", None, "").await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["smol", "gpt-4o-mini", "local"]);
    let reply = send(&server, "GET", "/v1/models/local", None, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["id"], "local");
    let body = r#"{"model": "gpt-4o-mini", "prompt": "The sea is", "max_tokens": 2}"#;
    let reply = send(&server, "POST", "/v1/completions", None, body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["model"], MODEL_ID);
    let body = r#"{"model": "gpt-4o", "prompt": "The sea is", "max_tokens": 2}"#;
    assert_error(
        &send(&server, "POST", "/v1/completions", None, body).await,
        StatusCode::NOT_FOUND,
        "The model `gpt-4o` does not exist: this server serves `smol` (also as `gpt-4o-mini`, \
         `local`)",
        Some("model"),
        Some("model_not_found"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_past_max_sessions_gets_429_with_retry_after() {
    let server = server(None);
    // Streams whose bodies are never read: each generation fills its channel and waits,
    // holding its slot, until its response is dropped.
    let body = r#"{"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 256, "stream": true}"#;
    let mut held = Vec::new();
    for _ in 0..2 {
        let response = respond(&server, "POST", "/v1/completions", None, body).await;
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    assert_eq!(server.sessions_open(), 2);
    let response = respond(&server, "POST", "/v1/completions", None, body).await;
    assert_eq!(
        response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let reply = read(response).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        reply.json(),
        json!({"error": {
            "message": "all 2 generation sessions are busy; retry when one finishes",
            "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"
        }})
    );
}
