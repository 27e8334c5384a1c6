//! `lsplit edge` as clients use it, on the real default model: the real `openai` Python client
//! and Debian's headless Chromium (through chromedriver) against the server, raw HTTP for bad
//! requests, and trunk sessions freed when clients leave mid-stream, in-process and on a
//! trunk server over TLS.
//!
//! The Python packages come from `tests/edge/requirements.txt`, installed by `scripts/test.sh`
//! into `$LSPLIT_CACHE_DIR/edge-test-venv` (override with `LSPLIT_TEST_PYTHON`).

mod common;

use common::python;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const CHAT_PROMPT: &str = "Write one sentence about the sea.";
const RAW_PROMPT: &str = "The three primary colors are";
/// Sampled (not greedy), so that the seed and sampling settings must reach the sampler.
const SAMPLING: [&str; 8] = [
    "--max-tokens",
    "24",
    "--temperature",
    "0.8",
    "--top-p",
    "0.9",
    "--seed",
    "7",
];
const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn lsplit() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lsplit"));
    command.env("LSPLIT_LOG", "warn");
    command
}

fn model() -> PathBuf {
    lsplit_fetch::ensure_default_model().expect("default model")
}

/// Fails, saying how to get them, when the browser scripts' Chromium or chromedriver is
/// missing (the paths browser.py and image_browser.py use: $CHROMIUM, $CHROMEDRIVER).
fn require_browser() {
    for (variable, default, package) in [
        ("CHROMIUM", "/usr/bin/chromium", "chromium"),
        ("CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver"),
    ] {
        let path = std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from);
        assert!(
            path.is_file(),
            "{} is missing: run scripts/test.sh, which installs it (apt-get install {package}), \
             or set {variable}",
            path.display()
        );
    }
}

/// Runs a script of `tests/edge` with `args`; returns the JSON object it prints.
fn run_script(name: &str, args: &[&str]) -> Value {
    if name.ends_with("browser.py") {
        require_browser();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/edge")
        .join(name);
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("SE_OFFLINE", "true")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{name} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What `lsplit generate` prints for `prompt`: the text, and its token counts and stop reason
/// from `--stats`.
struct Generated {
    text: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    finish: &'static str,
}

fn generate(prompt: &str, extra: &[&str]) -> Generated {
    let out = lsplit()
        .args(["generate", prompt, "--stats", "--model"])
        .arg(model())
        .args(extra)
        .output()
        .expect("run lsplit generate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let text = text
        .strip_suffix('\n')
        .expect("a final newline")
        .to_string();
    let tokens = stderr
        .lines()
        .find_map(|l| l.strip_prefix("tokens: "))
        .unwrap_or_else(|| panic!("no token counts in {stderr}"));
    let numbers: Vec<u64> = tokens
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let finish = if stderr.contains("stop: Eos") {
        "stop"
    } else {
        "length"
    };
    Generated {
        text,
        prompt_tokens: numbers[0],
        completion_tokens: numbers[1],
        finish,
    }
}

/// Reads the first `lines` lines a child prints, or fails after two minutes.
fn first_lines(child: &mut Child, lines: usize, what: &str) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut text = String::new();
        for _ in 0..lines {
            let _ = reader.read_line(&mut text);
        }
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what} announced no address"))
}

/// The address in `http://ADDR` or `https://localhost:PORT` at the start of `text` after `prefix`.
fn address_after(text: &str, prefix: &str) -> SocketAddr {
    let rest = text
        .split(prefix)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{prefix}` in {text:?}"));
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/')
        .collect();
    addr.replace("localhost", "127.0.0.1")
        .parse()
        .unwrap_or_else(|_| panic!("no address in {text:?}"))
}

/// A running `lsplit edge`; killed when dropped.
struct Edge {
    child: Child,
    addr: SocketAddr,
}

impl Edge {
    fn start(extra: &[&str]) -> Self {
        let mut child = lsplit()
            .args(["edge", "--listen", "127.0.0.1:0", "--model"])
            .arg(model())
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lsplit edge");
        let line = first_lines(&mut child, 1, "lsplit edge");
        assert!(line.starts_with("lsplit edge: http://127.0.0.1:"), "{line}");
        let addr = address_after(&line, "http://");
        Self { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn sessions_open(&self) -> u64 {
        let (status, body) = http(self.addr, "GET", "/lsplit/info", &[], "");
        assert_eq!(status, 200, "{body}");
        parse(&body)["sessions_open"]
            .as_u64()
            .expect("sessions_open")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The request text of one HTTP/1.1 request that closes its connection.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.push_str(body);
    text
}

/// One request over a fresh connection: the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    stream
        .write_all(request(addr, method, path, headers, body).as_bytes())
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// The `error` object of an OpenAI error body.
fn error_of(body: &str) -> Value {
    let value = parse(body);
    let error = value["error"].clone();
    assert!(error.is_object(), "not an OpenAI error: {body}");
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "no `{key}` in {body}");
    }
    error
}

#[test]
fn the_openai_client_gets_the_text_lsplit_generate_prints() {
    let chat = generate(CHAT_PROMPT, &SAMPLING);
    let mut raw_args = SAMPLING.to_vec();
    raw_args.push("--raw");
    let raw = generate(RAW_PROMPT, &raw_args);
    assert!(chat.text.len() > 20, "{:?}", chat.text);
    // A stop sequence from the middle of the expected text: everything before it comes back.
    let stop = chat
        .text
        .split_whitespace()
        .nth(4)
        .expect("five words")
        .to_string();
    let before_stop = &chat.text[..chat.text.find(&stop).expect("stop in text")];

    let edge = Edge::start(&[]);
    let got = run_script(
        "openai_client.py",
        &[&edge.url(), CHAT_PROMPT, RAW_PROMPT, &stop],
    );

    assert_eq!(got["models"], json!([MODEL_ID]));
    let usage = json!({
        "prompt_tokens": chat.prompt_tokens,
        "completion_tokens": chat.completion_tokens,
        "total_tokens": chat.prompt_tokens + chat.completion_tokens,
    });
    assert_eq!(got["chat"]["text"], json!(chat.text));
    assert_eq!(got["chat"]["role"], json!("assistant"));
    assert_eq!(got["chat"]["object"], json!("chat.completion"));
    assert_eq!(got["chat"]["finish_reason"], json!(chat.finish));
    assert_eq!(
        got["chat"]["usage"]["prompt_tokens"],
        usage["prompt_tokens"]
    );
    assert_eq!(
        got["chat"]["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );

    let stream = &got["chat_stream"];
    let pieces: Vec<&str> = stream["pieces"]
        .as_array()
        .expect("pieces")
        .iter()
        .map(|p| p.as_str().expect("text"))
        .collect();
    assert!(pieces.len() > 5, "streamed in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), chat.text);
    assert_eq!(stream["roles"], json!(["assistant"]));
    assert_eq!(stream["finish_reason"], json!(chat.finish));
    assert_eq!(stream["usage"]["total_tokens"], usage["total_tokens"]);

    assert_eq!(
        got["chat_stop"]["text"],
        json!(before_stop),
        "stop {stop:?}"
    );
    assert_eq!(got["chat_stop"]["finish_reason"], json!("stop"));
    assert_eq!(got["chat_stop_stream"], json!(before_stop));

    assert_eq!(got["completion"]["text"], json!(raw.text));
    assert_eq!(got["completion"]["finish_reason"], json!(raw.finish));
    assert_eq!(
        got["completion"]["usage"]["prompt_tokens"],
        json!(raw.prompt_tokens)
    );
    assert_eq!(got["completion_stream"], json!(raw.text));

    let errors = &got["errors"];
    let body = |name: &str| {
        let body = &errors[name]["body"];
        body.get("error").unwrap_or(body).clone()
    };
    assert_eq!(errors["unknown_model"]["status"], json!(404));
    assert_eq!(body("unknown_model")["code"], json!("model_not_found"));
    assert_eq!(
        body("unknown_model")["message"],
        json!(format!(
            "The model `no-such-model` does not exist: this server serves `{MODEL_ID}`"
        ))
    );
    assert_eq!(errors["too_long"]["status"], json!(400));
    assert_eq!(body("too_long")["code"], json!("context_length_exceeded"));
    assert_eq!(errors["images"]["status"], json!(404));
    assert_eq!(body("images")["code"], json!("model_not_found"));
}

/// `lsplit edge` takes the split policy and obfuscation flags of `lsplit generate`: with random
/// split points and the permutation, a sampled chat request gets the text `lsplit generate`
/// prints for the same settings (each session draws its own secret; the text does not change).
#[test]
fn random_split_points_on_the_edge_give_generate_s_text() {
    const POLICY: [&str; 8] = [
        "--split-policy",
        "random",
        "--k1",
        "1,2,3",
        "--k2",
        "27,28,29",
        "--obfuscate",
        "permute",
    ];
    let mut args = SAMPLING.to_vec();
    args.extend(POLICY);
    let expected = generate(CHAT_PROMPT, &args);
    assert!(expected.text.len() > 20, "{:?}", expected.text);

    let mut child = lsplit()
        .args(["edge", "--listen", "127.0.0.1:0", "--model"])
        .arg(model())
        .args(POLICY)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lsplit edge");
    let line = first_lines(&mut child, 1, "lsplit edge");
    let edge = Edge {
        addr: address_after(&line, "http://"),
        child,
    };
    assert!(
        line.contains("split random K1 {1,2,3} K2 {27,28,29}, obfuscation permute"),
        "{line}"
    );
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": 24,
        "temperature": 0.8,
        "top_p": 0.9,
        "seed": 7,
    });
    let (status, reply) = http(
        edge.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let reply = parse(&reply);
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        json!(expected.text)
    );
    assert_eq!(
        reply["usage"]["completion_tokens"],
        json!(expected.completion_tokens)
    );
}

#[test]
fn bad_requests_get_their_status_and_an_openai_error_body() {
    let out = lsplit()
        .args(["edge", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("listening on 0.0.0.0:0 exposes the API beyond this machine: pass --api-key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let edge = Edge::start(&["--api-key", "s3cret"]);
    let key = "Authorization: Bearer s3cret";
    let chat = |body: &str| http(edge.addr, "POST", "/v1/chat/completions", &[key], body);

    let (status, body) = http(edge.addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 401);
    assert_eq!(
        parse(&body),
        json!({"error": {
            "message": "You didn't provide an API key. You need to provide your API key in an \
                        Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "type": "invalid_request_error", "param": null, "code": null}})
    );
    let (status, body) = http(
        edge.addr,
        "GET",
        "/v1/models",
        &["Authorization: Bearer nope"],
        "",
    );
    assert_eq!(status, 401);
    assert_eq!(error_of(&body)["code"], json!("invalid_api_key"));
    let (status, body) = http(edge.addr, "GET", "/v1/models", &[key], "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse(&body)["data"][0]["id"], json!(MODEL_ID));

    // The page itself is public; only the API needs the key.
    let (status, body) = http(edge.addr, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(body.contains("<title>lsplit edge</title>"), "{body}");

    let (status, body) = chat(r#"{"messages": [{"role": "user", "content": "hi"}"#);
    assert_eq!(status, 400);
    let error = error_of(&body);
    assert_eq!(error["type"], json!("invalid_request_error"));
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .starts_with("could not parse the JSON body of the request: EOF while parsing"),
        "{body}"
    );

    let (status, body) = chat(r#"{"messages": "hi"}"#);
    assert_eq!(status, 400);
    assert!(
        error_of(&body)["message"]
            .as_str()
            .expect("message")
            .starts_with("invalid request body: invalid type: string \"hi\", expected a sequence"),
        "{body}"
    );

    let (status, body) =
        chat(r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}"#);
    assert_eq!(status, 404);
    assert_eq!(
        parse(&body),
        json!({"error": {
            "message": format!("The model `gpt-4o` does not exist: this server serves `{MODEL_ID}`"),
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
    );

    let (status, body) =
        chat(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}"#);
    assert_eq!(status, 400);
    let error = error_of(&body);
    assert_eq!(error["code"], json!("context_length_exceeded"));
    let message = error["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "This model's maximum context length is 8192 tokens. However, you requested "
        ) && message.contains(" in the messages, 9000 in the completion)"),
        "{message}"
    );

    let (status, body) = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#);
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], json!("n"));

    let (status, body) = http(
        edge.addr,
        "POST",
        "/v1/completions",
        &[key],
        r#"{"prompt": ""}"#,
    );
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["message"], json!("the prompt is empty"));

    let (status, body) = http(edge.addr, "POST", "/v1/images/generations", &[key], "{}");
    assert_eq!(status, 400);
    assert!(
        error_of(&body)["message"]
            .as_str()
            .expect("message")
            .contains("missing field `prompt`"),
        "{body}"
    );
    let (status, body) = http(
        edge.addr,
        "POST",
        "/v1/images/generations",
        &[key],
        r#"{"prompt": "a red kite", "response_format": "b64_json"}"#,
    );
    assert_eq!(status, 404);
    let error = error_of(&body);
    assert_eq!(error["code"], json!("model_not_found"));
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .starts_with("no image model is loaded."),
        "{body}"
    );

    let (status, body) = http(edge.addr, "GET", "/v1/embeddings", &[key], "");
    assert_eq!(status, 404);
    assert_eq!(
        error_of(&body)["message"],
        json!("no such endpoint: GET /v1/embeddings")
    );
}

/// A development PKI and a trunk server with metrics; killed when dropped.
struct TrunkServer {
    dir: tempfile::TempDir,
    child: Child,
    trunk: SocketAddr,
    metrics: SocketAddr,
}

impl TrunkServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = dir.path().join("pki");
        let out = lsplit()
            .args(["cert", "--out"])
            .arg(&pki)
            .output()
            .expect("cert");
        assert!(out.status.success());
        std::fs::write(dir.path().join("token"), "tr0mb0ne\n").expect("token");
        let mut child = lsplit()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .arg("--model")
            .arg(model())
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lsplit serve");
        let lines = first_lines(&mut child, 2, "lsplit serve");
        let trunk = address_after(&lines, "https://");
        let metrics = address_after(&lines, "metrics on http://");
        Self {
            dir,
            child,
            trunk,
            metrics,
        }
    }

    fn edge_args(&self) -> Vec<String> {
        let pki = self.dir.path().join("pki");
        vec![
            "--cloud".into(),
            format!("https://localhost:{}", self.trunk.port()),
            "--ca".into(),
            pki.join("ca.pem").display().to_string(),
            "--token-file".into(),
            self.dir.path().join("token").display().to_string(),
        ]
    }

    fn sessions_open(&self) -> u64 {
        let (status, body) = http(self.metrics, "GET", "/metrics", &[], "");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix("lsplit_sessions_open "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no lsplit_sessions_open in {body}"))
    }
}

impl Drop for TrunkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a long streamed chat and returns its connection once three chunks have arrived.
fn streaming_client(addr: SocketAddr) -> TcpStream {
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me a very long story about a robot."}],
        "max_tokens": 4000,
        "stream": true,
    })
    .to_string();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    stream
        .write_all(request(addr, "POST", "/v1/chat/completions", &[], &body).as_bytes())
        .expect("send");
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while seen.matches("data: ").count() < 3 {
        let n = stream.read(&mut buffer).expect("read");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200 OK"), "{seen}");
    assert!(seen.contains("content-type: text/event-stream"), "{seen}");
    stream
}

/// Waits until `check` holds, for at most three minutes (a loaded 2-core machine runs these
/// tests' servers, browsers and clients side by side).
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clients_leaving_mid_stream_free_their_trunk_sessions() {
    let server = TrunkServer::start();
    let args = server.edge_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let remote = Edge::start(&args);
    let local = Edge::start(&[]);

    let first = streaming_client(remote.addr);
    let second = streaming_client(remote.addr);
    assert_eq!(remote.sessions_open(), 2);
    assert_eq!(server.sessions_open(), 2, "one trunk session per client");
    drop(first);
    eventually("the first client's trunk session is closed", || {
        remote.sessions_open() == 1 && server.sessions_open() == 1
    });
    drop(second);
    eventually("every trunk session is closed", || {
        remote.sessions_open() == 0 && server.sessions_open() == 0
    });

    let client = streaming_client(local.addr);
    assert_eq!(local.sessions_open(), 1);
    drop(client);
    eventually("the in-process session is freed", || {
        local.sessions_open() == 0
    });

    // Two clients at once over the trunk server each get what they would get alone.
    let ask = |prompt: &'static str| {
        let addr = remote.addr;
        std::thread::spawn(move || {
            let body = json!({
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 12,
            });
            let (status, body) = http(addr, "POST", "/v1/chat/completions", &[], &body.to_string());
            assert_eq!(status, 200, "{body}");
            parse(&body)["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        })
    };
    let (a, b) = (
        ask("Name three colors."),
        ask("What is the capital of France?"),
    );
    let (a, b) = (a.join().expect("client a"), b.join().expect("client b"));
    assert_eq!(
        a,
        generate("Name three colors.", &["--max-tokens", "12"]).text
    );
    assert_eq!(
        b,
        generate("What is the capital of France?", &["--max-tokens", "12"]).text
    );
}

#[test]
fn the_page_streams_a_reply_in_headless_chromium() {
    let expected = generate(CHAT_PROMPT, &["--max-tokens", "24"]);
    let edge = Edge::start(&[]);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("edge-screenshots");
    let got = run_script(
        "browser.py",
        &[&edge.url(), CHAT_PROMPT, &shots.display().to_string()],
    );
    for shot in got["screenshots"].as_array().expect("screenshots") {
        let path = shot.as_str().expect("path");
        assert!(
            std::fs::metadata(path).expect("screenshot").len() > 10_000,
            "{path}"
        );
        println!("screenshot: {path}");
    }
    let chips = got["chips"].as_str().expect("chips");
    assert!(chips.contains("split 2:28 of 30"), "{chips}");
    assert!(chips.contains("trunk in-process"), "{chips}");
    assert_eq!(got["split_layers"], json!(30));
    assert_eq!(got["trunk_layers"], json!(26));
    // Token counts the page showed while still running: one per streamed token.
    let seen = got["streaming_seen"].as_array().expect("streaming_seen");
    assert!(
        seen.len() as u64 >= expected.completion_tokens - 1,
        "tokens shown while running: {seen:?}"
    );
    assert_eq!(got["status"], json!(format!("done ({})", expected.finish)));
    assert_eq!(
        got["reply"],
        json!(expected.text),
        "the page's defaults are generate's"
    );
    assert_eq!(got["tokens"], json!(expected.completion_tokens));
    for (key, value) in got["totals"].as_object().expect("totals") {
        let value = value.as_str().expect("text");
        assert!(
            value.ends_with(" ms") || value.ends_with("KiB"),
            "{key}: {value}"
        );
    }
    let rows = got["heat_rows"]["up"].as_u64().expect("rows");
    assert!((1..=48).contains(&rows), "{rows}");
    assert_eq!(got["heat_rows"]["down"], json!(rows));
    assert!(
        got["heat_up_label"]
            .as_str()
            .expect("label")
            .contains("f32, 2.3 KiB for 1 row of 576"),
        "{}",
        got["heat_up_label"]
    );
    assert!(
        got["narrow_overflow"].as_i64().expect("overflow") <= 0,
        "the page is wider than a phone: {}",
        got["narrow_overflow"]
    );
    assert_eq!(got["image_state"], json!("error"));
    assert!(
        got["image_status"]
            .as_str()
            .expect("status")
            .starts_with("404: no image model is loaded."),
        "{}",
        got["image_status"]
    );
    assert_eq!(got["images_shown"], json!(0));
    assert_eq!(got["console_errors"], json!([]));
}

// ---- Images: the tiny random-weight SD 1.5-like model of the diffusion crate's fixtures ------

const IMAGE_PROMPT: &str = "a lighthouse at dawn";
const IMAGE_NEGATIVE: &str = "fog";
const IMAGE_SIZE: &str = "64x64";
const IMAGE_STEPS: &str = "3";
const IMAGE_SEED: &str = "42";

fn tiny_sd15() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures/tiny-sd15")
        .display()
        .to_string()
}

/// Bytes that crossed for one image, as `lsplit image --stats` prints them.
#[derive(Debug, PartialEq, Eq)]
struct ImageBytes {
    setup: u64,
    up: u64,
    down: u64,
}

/// What `lsplit image` writes for the test prompt with `extra` flags: the PNG and its bytes.
fn lsplit_image(extra: &[&str]) -> (Vec<u8>, ImageBytes) {
    let dir = tempfile::tempdir().expect("temp dir");
    let png = dir.path().join("image.png");
    let (width, height) = IMAGE_SIZE.split_once('x').expect("WxH");
    let out = lsplit()
        .args(["image", IMAGE_PROMPT, "--negative", IMAGE_NEGATIVE, "-m"])
        .arg(tiny_sd15())
        .args(["--width", width, "--height", height, "--steps", IMAGE_STEPS])
        .args(["--seed", IMAGE_SEED, "--stats", "-o"])
        .arg(&png)
        .args(extra)
        .output()
        .expect("run lsplit image");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bytes: "))
        .unwrap_or_else(|| panic!("no byte counts in {stderr}"));
    // "setup S once, up U (u per step), down D (d per step)"
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let bytes = ImageBytes {
        setup: numbers[0],
        up: numbers[1],
        down: numbers[3],
    };
    (std::fs::read(&png).expect("png"), bytes)
}

fn bytes_of(value: &Value) -> ImageBytes {
    let n = |key: &str| {
        value[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {value}"))
    };
    ImageBytes {
        setup: n("setup"),
        up: n("up"),
        down: n("down"),
    }
}

fn b64_decode(text: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("base64 -d");
    assert!(out.status.success());
    out.stdout
}

/// The page's way of showing a byte count (`bytes()` of app.js: `toFixed(1)` rounds halves up).
fn page_bytes(n: u64) -> String {
    let tenths = |unit: f64| (n as f64 / unit * 10.0).round() / 10.0;
    if n >= 1 << 20 {
        format!("{:.1} MiB", tenths(f64::from(1 << 20)))
    } else if n >= 1024 {
        format!("{:.1} KiB", tenths(1024.0))
    } else {
        format!("{n} B")
    }
}

#[test]
fn the_openai_client_gets_the_png_lsplit_image_writes() {
    let (expected, expected_bytes) = lsplit_image(&[]);
    let model = tiny_sd15();
    let edge = Edge::start(&["--image-model", &model]);
    let got = run_script(
        "openai_images.py",
        &[
            &edge.url(),
            "tiny-sd15",
            IMAGE_PROMPT,
            IMAGE_NEGATIVE,
            IMAGE_SIZE,
            IMAGE_STEPS,
            IMAGE_SEED,
        ],
    );
    assert_eq!(got["models"], json!([MODEL_ID, "tiny-sd15"]));
    let image = &got["image"];
    assert_eq!(image["count"], json!(1));
    assert_eq!(image["url"], Value::Null);
    let png = b64_decode(image["b64_json"].as_str().expect("b64_json"));
    assert_eq!(png, expected, "the PNG of lsplit image, byte for byte");
    let lsplit = &image["lsplit"];
    assert_eq!(bytes_of(&lsplit["bytes"]), expected_bytes);
    assert_eq!(lsplit["seed"], json!(42));
    assert_eq!(lsplit["unet_split"], json!("lambda:1"));
    assert_eq!(lsplit["step_codec"], json!("f32"));

    let errors = &got["errors"];
    let error = |name: &str| {
        let body = &errors[name]["body"];
        body.get("error").unwrap_or(body).clone()
    };
    for (name, status, param, message) in [
        (
            "n",
            400,
            json!("n"),
            "n must be 1: lsplit edge generates one image per request",
        ),
        (
            "size",
            400,
            json!("size"),
            "image size 65x64: width and height must be multiples of 16 (at most 8192) for this \
             model",
        ),
        (
            "size_text",
            400,
            json!("size"),
            "size `large` is not WIDTHxHEIGHT (e.g. 512x512) or `auto`",
        ),
        (
            "url",
            400,
            json!("response_format"),
            "response_format `url` is not supported: lsplit edge keeps images on this device and \
             returns them inline; use `b64_json`",
        ),
        (
            "steps",
            400,
            json!("steps"),
            "steps must be 1 to 1000, got 5000",
        ),
        (
            "model",
            404,
            json!("model"),
            "The model `dall-e-3` does not exist: this server draws images with `tiny-sd15`",
        ),
    ] {
        assert_eq!(errors[name]["status"], json!(status), "{name}: {errors}");
        assert_eq!(error(name)["param"], param, "{name}");
        assert_eq!(error(name)["message"], json!(message), "{name}");
        assert_eq!(
            error(name)["type"],
            json!("invalid_request_error"),
            "{name}"
        );
    }

    let (status, body) = http(
        edge.addr,
        "POST",
        "/v1/images/generations",
        &[],
        r#"{"prompt": "a red kite", "steps": 3"#,
    );
    assert_eq!(status, 400);
    assert!(
        error_of(&body)["message"]
            .as_str()
            .expect("message")
            .starts_with("could not parse the JSON body of the request: EOF while parsing"),
        "{body}"
    );
    let (status, body) = http(
        edge.addr,
        "POST",
        "/v1/images/generations",
        &[],
        r#"{"prompt": "a red kite", "scheduler": "pndm"}"#,
    );
    assert_eq!(status, 400);
    assert_eq!(
        error_of(&body)["message"],
        json!("unknown scheduler `pndm`: valid names are euler, euler-a, ddim")
    );
}

#[test]
fn the_unet_split_and_step_codec_flags_reach_the_image() {
    let (expected, expected_bytes) = lsplit_image(&["--unet-split", "component", "--codec", "f16"]);
    let (lossless, _) = lsplit_image(&["--unet-split", "component"]);
    assert_ne!(expected, lossless, "f16 on the wire changes this image");
    let model = tiny_sd15();
    let edge = Edge::start(&[
        "--image-model",
        &model,
        "--unet-split",
        "component",
        "--step-codec",
        "f16",
    ]);
    let body = json!({
        "prompt": IMAGE_PROMPT,
        "negative_prompt": IMAGE_NEGATIVE,
        "size": IMAGE_SIZE,
        "steps": 3,
        "seed": 42,
    });
    let (status, body) = http(
        edge.addr,
        "POST",
        "/v1/images/generations",
        &[],
        &body.to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let answer = parse(&body);
    let png = b64_decode(answer["data"][0]["b64_json"].as_str().expect("b64_json"));
    assert_eq!(png, expected);
    assert_eq!(bytes_of(&answer["lsplit"]["bytes"]), expected_bytes);
    assert_eq!(answer["lsplit"]["unet_split"], json!("component"));
    assert_eq!(answer["lsplit"]["step_codec"], json!("f16"));

    let out = lsplit()
        .args([
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--unet-split",
            "component",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--image-model <DIR>"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a long image on `path` and returns its connection once three step events arrived.
fn image_client(addr: SocketAddr, path: &str, events: usize) -> TcpStream {
    let body =
        json!({"prompt": "a very slow lighthouse", "size": "64x64", "steps": 900}).to_string();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    stream
        .write_all(request(addr, "POST", path, &[], &body).as_bytes())
        .expect("send");
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while seen.matches("event: step").count() < events {
        let n = stream.read(&mut buffer).expect("read");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    stream
}

fn image_counts(edge: &Edge) -> (u64, u64, u64) {
    let (status, body) = http(edge.addr, "GET", "/lsplit/info", &[], "");
    assert_eq!(status, 200, "{body}");
    let info = parse(&body);
    let n = |v: &Value| v.as_u64().expect("count");
    (
        n(&info["images"]["drawn"]),
        n(&info["images"]["stopped"]),
        n(&info["sessions_open"]),
    )
}

#[test]
fn clients_leaving_mid_image_stop_it() {
    let model = tiny_sd15();
    let edge = Edge::start(&["--image-model", &model]);
    let stream = image_client(edge.addr, "/lsplit/images/stream", 3);
    assert_eq!(image_counts(&edge), (0, 0, 1));
    drop(stream);
    eventually("the streamed image stops", || {
        image_counts(&edge) == (0, 1, 0)
    });

    // Images are drawn one at a time: a second waits its turn, without an answer, until the
    // first is done (here: stopped), then is drawn.
    let first = image_client(edge.addr, "/lsplit/images/stream", 1);
    let mut second = TcpStream::connect(edge.addr).expect("connect");
    let body = json!({"prompt": IMAGE_PROMPT, "size": "64x64", "steps": 3, "seed": 5}).to_string();
    second
        .write_all(request(edge.addr, "POST", "/v1/images/generations", &[], &body).as_bytes())
        .expect("send");
    eventually("the second image waits", || image_counts(&edge).2 == 2);
    second
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let waited = second.read(&mut byte);
    assert!(
        waited.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "the second image was answered while the first was drawn: {waited:?}"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut answer = String::new();
    second.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\"seed\":5"), "{answer}");
    eventually("the second image's session is freed", || {
        image_counts(&edge) == (1, 2, 0)
    });
}

#[test]
fn the_page_draws_an_image_in_headless_chromium() {
    let (expected, expected_bytes) = lsplit_image(&[]);
    let model = tiny_sd15();
    let edge = Edge::start(&["--image-model", &model]);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("edge-screenshots");
    let got = run_script(
        "image_browser.py",
        &[
            &edge.url(),
            IMAGE_PROMPT,
            IMAGE_NEGATIVE,
            IMAGE_SIZE,
            IMAGE_STEPS,
            IMAGE_SEED,
            &shots.display().to_string(),
        ],
    );
    for shot in got["screenshots"].as_array().expect("screenshots") {
        let path = shot.as_str().expect("path");
        assert!(
            std::fs::metadata(path).expect("screenshot").len() > 10_000,
            "{path}"
        );
        println!("screenshot: {path}");
    }
    assert_eq!(got["notice_hidden"], json!(true));
    let chips = got["chips"].as_str().expect("chips");
    for part in [
        "image model tiny-sd15",
        "UNet split lambda:1",
        "step codec f32",
        "trunk in-process",
    ] {
        assert!(chips.contains(part), "{part} in {chips}");
    }
    assert_eq!(got["default_size"], json!("64x64"));
    assert_eq!(got["default_steps"], json!("30"));
    assert_eq!(got["default_guidance"], json!("7.5"));

    assert_eq!(got["state"], json!("done"), "{}", got["status"]);
    assert_eq!(
        got["steps_seen"],
        json!([0, 1, 2, 3]),
        "the page showed every step"
    );
    assert_eq!(got["step_text"], json!("3 / 3"));
    assert_eq!(got["previews"], json!(2), "a preview after steps 1 and 2");
    assert_eq!(got["final"], json!("1"));
    let src = got["final_src"].as_str().expect("src");
    let png = b64_decode(src.strip_prefix("data:image/png;base64,").expect("a PNG"));
    assert_eq!(png, expected, "the page shows lsplit image's PNG");
    assert_eq!(got["seed_used"], json!(IMAGE_SEED));
    assert_eq!(
        got["bytes"],
        json!({
            "setup": page_bytes(expected_bytes.setup),
            "up": page_bytes(expected_bytes.up),
            "down": page_bytes(expected_bytes.down),
        })
    );

    let maps = got["tensor_maps"].as_array().expect("maps");
    assert_eq!(maps.len(), 5, "channel mean and four channels: {maps:?}");
    for map in maps {
        assert_eq!(map["step"], json!("3"), "{map}");
        assert!(map["colours"].as_u64().expect("colours") > 4, "{map}");
        assert!(map["shown_width"].as_u64().expect("width") > 20, "{map}");
    }
    assert_eq!(got["map_captions"][0], json!("channel mean"));
    let label = got["wire_label"].as_str().expect("label");
    assert!(
        label.starts_with("· [2, ") && label.contains("row 1 shown"),
        "{label}"
    );
    assert!(
        label.ends_with(&format!(
            "{} up per step",
            page_bytes(expected_bytes.up / 3)
        )),
        "{label}"
    );
    assert!(
        got["narrow_overflow"].as_i64().expect("overflow") <= 0,
        "the page is wider than a phone: {}",
        got["narrow_overflow"]
    );
    assert_eq!(got["chat_visible"], json!(true));
    assert_eq!(got["image_hidden"], json!(true));
    assert_eq!(got["console_errors"], json!([]));
}

#[test]
fn the_api_key_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "  s3cret \nignored second line\n").expect("key file");
    let edge = Edge::start(&["--api-key-file", &key_file.display().to_string()]);
    let (status, _) = http(edge.addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 401);
    let (status, body) = http(
        edge.addr,
        "GET",
        "/v1/models",
        &["Authorization: Bearer s3cret"],
        "",
    );
    assert_eq!(status, 200, "{body}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("empty key file");
    let out = lsplit()
        .args(["edge", "--listen", "127.0.0.1:0", "--api-key-file"])
        .arg(&empty)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the API key is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lsplit()
        .args(["edge", "--api-key", "a", "--api-key-file"])
        .arg(&key_file)
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the argument '--api-key <KEY>' cannot be used with '--api-key-file <FILE>'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_ctrl_c_stops_edge_at_once() {
    let mut child = lsplit()
        .env("LSPLIT_LOG", "info")
        .args(["edge", "--listen", "127.0.0.1:0", "--model"])
        .arg(model())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lsplit edge");
    let line = first_lines(&mut child, 1, "lsplit edge");
    let addr = address_after(&line, "http://");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // An open stream keeps a gracefully stopping server running.
    let _stream = streaming_client(addr);
    let pid = child.id().to_string();
    let signal = || {
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("lsplit edge logs that it is shutting down");
        if line.contains("shutting down: open requests finish; a second Ctrl-C stops at once") {
            break;
        }
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "exited with a stream open"
    );
    signal();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{status}");
}
