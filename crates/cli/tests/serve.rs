//! `lsplit cert`, `lsplit serve` and `lsplit generate --cloud` as separate processes over
//! loopback TLS, including a server killed and restarted mid-generation.

mod served;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsplit_model::{ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::{RemoteOptions, RemoteTrunk, ServingStatus, TRUNK_SERVICE};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SplitPolicy, StepRows, Trunk,
    TrunkError, load_tokenizer,
};
use lsplit_wire::Codec;
use served::{Pki, Server, file, lsplit, model, run};

fn generate_cli(extra: &[&str], model: &Path) -> String {
    let out = run(lsplit()
        .args([
            "generate",
            "Name three colors.",
            "--max-tokens",
            "16",
            "--model",
        ])
        .arg(model)
        .args(extra));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn generate_against_a_served_trunk_prints_the_in_process_text() {
    let pki = Pki::new();
    let server = Server::start(&pki.dir(), "3:27", 0);
    let model = model();
    let ca = file(&pki.dir(), "ca.pem").display().to_string();
    let token = file(&pki.dir(), "token").display().to_string();
    let remote = generate_cli(
        &[
            "--cloud",
            &server.url(),
            "--ca",
            &ca,
            "--token-file",
            &token,
            "--codec",
            "f16",
        ],
        &model,
    );
    let local = generate_cli(&["--split", "3:27", "--codec", "f16"], &model);
    assert!(remote.trim().len() > 10, "{remote}");
    assert_eq!(remote, local);

    // One generation connects once: the connection that learned the split serves the session.
    let out = lsplit()
        .env("LSPLIT_LOG", "lsplit_remote=info")
        .args(["generate", "hi", "--max-tokens", "2", "--model"])
        .arg(&model)
        .args([
            "--cloud",
            &server.url(),
            "--ca",
            &ca,
            "--token-file",
            &token,
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("connected to the trunk server").count(),
        1,
        "{stderr}"
    );

    let out = lsplit()
        .args(["generate", "hi", "--max-tokens", "2", "--model"])
        .arg(&model)
        .args(["--cloud", &server.url(), "--ca", &ca])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "the trunk server refused: this server requires a bearer token (Unauthenticated)"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pid = server.child.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            assert!(status.success(), "lsplit serve exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "lsplit serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn generate_through_a_trunk_divided_over_two_servers_prints_the_single_trunks_text() {
    // Each server has its own CA and token: the device names both, in the order of --cloud.
    let (first, second) = (Pki::new(), Pki::new());
    std::fs::write(file(&second.dir(), "token"), "s3cond-h0p\n").expect("second token");
    let front = Server::start(&first.dir(), "3:15", 0);
    let back = Server::start(&second.dir(), "15:27", 0);
    let model = model();
    let both = |name| {
        let paths = [file(&first.dir(), name), file(&second.dir(), name)];
        paths.map(|p| p.display().to_string()).join(",")
    };
    let cloud = format!("{},{}", front.url(), back.url());
    let (ca, token) = (both("ca.pem"), both("token"));
    let divided = generate_cli(
        &["--cloud", &cloud, "--ca", &ca, "--token-file", &token],
        &model,
    );
    let local = generate_cli(&["--split", "3:27"], &model);
    assert!(local.trim().len() > 10, "{local}");
    assert_eq!(divided, local);

    let refused = |args: &[&str]| {
        let out = lsplit()
            .args(["generate", "hi", "--max-tokens", "2", "--model"])
            .arg(&model)
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let three = format!("{ca},{}", file(&first.dir(), "ca.pem").display());
    let stderr = refused(&["--cloud", &cloud, "--ca", &three, "--token-file", &token]);
    assert!(
        stderr.contains(
            "--ca names 3 files for 2 trunk servers: give one for all of them or one per server, \
             in the order of --cloud"
        ),
        "{stderr}"
    );
    let reversed = format!("{},{}", back.url(), front.url());
    let stderr = refused(&[
        "--cloud",
        &reversed,
        "--ca",
        &format!(
            "{},{}",
            file(&second.dir(), "ca.pem").display(),
            file(&first.dir(), "ca.pem").display()
        ),
        "--token-file",
        &format!(
            "{},{}",
            file(&second.dir(), "token").display(),
            file(&first.dir(), "token").display()
        ),
    ]);
    assert!(
        stderr.contains(&format!(
            "the servers of --cloud must run consecutive layers, in order: {} runs 15..27 and {} \
             runs 3..15",
            back.url(),
            front.url()
        )),
        "{stderr}"
    );
}

/// The real remote trunk, with the server process killed before step `kill_at` and started
/// again on the same port after a pause.
struct KilledMidway {
    inner: RemoteTrunk,
    pki: PathBuf,
    split: &'static str,
    server: Option<Server>,
    restarted: Option<std::thread::JoinHandle<Server>>,
    steps: usize,
    kill_at: usize,
    killed: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for KilledMidway {
    fn drop(&mut self) {
        if let Some(restarted) = self.restarted.take() {
            drop(restarted.join());
        }
    }
}

impl Trunk for KilledMidway {
    fn layers(&self) -> std::ops::Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        self.kill_on_time();
        self.inner.step(message)
    }
}

impl KilledMidway {
    /// Kills the server at step `kill_at` and restarts it on its port after a pause.
    fn kill_on_time(&mut self) {
        if self.steps == self.kill_at {
            self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
            let server = self.server.take().expect("the server runs");
            let port = server.port;
            drop(server);
            let (pki, split) = (self.pki.clone(), self.split);
            self.restarted = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                Server::start(&pki, split, port)
            }));
        }
        self.steps += 1;
    }
}

fn device(model: &Path, plan: SplitPlan) -> DeviceModel {
    let source = ModelSource::open(model).expect("model");
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    DeviceModel::split(
        &source,
        SplitPolicy::fixed(plan),
        tokenizer,
        Codec::F32,
        &candle_core::Device::Cpu,
    )
    .expect("device model")
}

fn options(pki: &Path, url: String) -> RemoteOptions {
    let mut options = RemoteOptions::new(url, Codec::F32);
    options.ca_pem = Some(std::fs::read(file(pki, "ca.pem")).expect("ca.pem"));
    options.token = Some("tr0mb0ne".into());
    options.retry_for = Duration::from_secs(60);
    options
}

#[test]
fn a_server_killed_and_restarted_mid_generation_leaves_the_text_unchanged() {
    let pki = Pki::new();
    let model = model();
    let source = ModelSource::open(&model).expect("model");
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("plan");
    let generate_options = GenerateOptions {
        max_tokens: 16,
        ..GenerateOptions::default()
    };
    let device = device(&model, plan);
    let prompt = device
        .prompt_tokens("Name three colors.", false)
        .expect("prompt");

    let part = Arc::new(
        source
            .load_part(&plan.trunk(), &candle_core::Device::Cpu)
            .expect("trunk"),
    );
    let keys = device.new_keys(Obfuscation::None).expect("keys");
    let expected = device
        .session(
            Box::new(LocalTrunk::new(part, &keys).expect("trunk")),
            &keys,
        )
        .expect("session")
        .generate(&prompt, &generate_options, &mut |_| {})
        .expect("in-process generation");
    assert!(expected.tokens.len() > 6, "{expected:?}");

    let server = Server::start(&pki.dir(), "2:28", 0);
    let inner = RemoteTrunk::connect(options(&pki.dir(), server.url()))
        .expect("connect")
        .with_keys(keys.clone());
    inner
        .verify(&TrunkFingerprint::compute(&source, 2..28).expect("fingerprint"))
        .expect("same model");
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trunk = KilledMidway {
        inner,
        pki: pki.dir(),
        split: "2:28",
        server: Some(server),
        restarted: None,
        steps: 0,
        kill_at: 4,
        killed: killed.clone(),
    };
    let got = device
        .session(Box::new(trunk), &keys)
        .expect("session")
        .generate(&prompt, &generate_options, &mut |_| {})
        .expect("generation survives the restart");
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(got.tokens, expected.tokens);
    assert_eq!(got.text, expected.text);
}

#[test]
fn a_server_that_stays_down_gives_a_clear_error_in_bounded_time() {
    let pki = Pki::new();
    let model = model();
    let source = ModelSource::open(&model).expect("model");
    let server = Server::start(&pki.dir(), "2:28", 0);
    let url = server.url();
    let mut opts = options(&pki.dir(), url.clone());
    opts.retry_for = Duration::from_secs(2);
    opts.connect_timeout = Duration::from_secs(1);
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("plan");
    let device = device(&model, plan);
    let keys = device.new_keys(Obfuscation::None).expect("keys");
    let trunk = RemoteTrunk::connect(opts)
        .expect("connect")
        .with_keys(keys.clone());
    let mut session = device.session(Box::new(trunk), &keys).expect("session");
    session
        .forward(&[1, 2, 3])
        .expect("a step while the server is up");
    drop(server);
    let started = Instant::now();
    let error = session
        .forward(&[4])
        .expect_err("the server is gone")
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        error.starts_with(&format!(
            "trunk: the trunk server at {url} stayed unreachable for"
        )),
        "{error}"
    );
}

#[test]
fn cert_never_overwrites_and_keeps_keys_private() {
    let pki = Pki::new();
    let out = lsplit()
        .args(["cert", "--out"])
        .arg(pki.dir().join("pki"))
        .output()
        .expect("run lsplit cert");
    assert!(!out.status.success());
    let expected = format!(
        "{} already exists: choose another --out directory or remove the old files",
        file(&pki.dir(), "ca.pem").display()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&expected),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["server.key", "client.key"] {
            let mode = std::fs::metadata(file(&pki.dir(), key))
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
}

#[test]
fn plaintext_needs_insecure_on_both_sides_and_warns() {
    let stderr_file = tempfile::NamedTempFile::new().expect("stderr file");
    let mut command = lsplit();
    command.stderr(stderr_file.reopen().expect("reopen"));
    let server = Server::spawn(command, "2:28", 0, &["--insecure".into()]);
    let url = format!("http://127.0.0.1:{}", server.port);
    let model = model();

    let out = lsplit()
        .args(["generate", "hi", "--max-tokens", "2", "--model"])
        .arg(&model)
        .args(["--cloud", &url])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "`{url}` is plaintext; use https:// or pass --insecure to send hidden states unencrypted"
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(lsplit()
        .args(["generate", "hi", "--max-tokens", "2", "--model"])
        .arg(&model)
        .args(["--cloud", &url, "--insecure"]));
    assert!(!out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting WITHOUT TLS (--insecure)"));
    let server_log = std::fs::read_to_string(stderr_file.path()).expect("server log");
    assert!(
        server_log.contains("serving WITHOUT TLS (--insecure)"),
        "{server_log}"
    );
}

#[test]
fn zero_network_threads_are_refused() {
    let out = lsplit()
        .args(["serve", "--insecure", "--io-threads", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value '0' for '--io-threads <IO_THREADS>': 0 is not in 1..=1024"),
        "{stderr}"
    );
}

#[test]
fn batch_wait_outside_zero_to_a_second_is_refused() {
    for value in ["-1", "1500", "soon", "NaN"] {
        let out = lsplit()
            .args(["serve", "--insecure", &format!("--batch-wait-ms={value}")])
            .output()
            .expect("run");
        assert!(
            !out.status.success(),
            "--batch-wait-ms={value} was accepted"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "expected milliseconds from 0 to 1000, got \"{value}\""
            )),
            "{stderr}"
        );
    }
}

/// The gRPC health status of the trunk service at `addr`, over a fresh plaintext connection.
fn health(addr: &str) -> ServingStatus {
    let mut options = RemoteOptions::new(format!("http://{addr}"), Codec::F32);
    options.insecure = true;
    lsplit_remote::check_health(&options, TRUNK_SERVICE).expect("health check")
}

/// The first JSON log line of `lines` whose message is `message`, or fails after a minute.
fn json_event(lines: &std::sync::mpsc::Receiver<String>, message: &str) -> serde_json::Value {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no `{message}` event on stderr"));
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        if event["fields"]["message"] == message {
            return event;
        }
    }
}

#[test]
fn drain_reports_not_serving_while_still_accepting_and_rust_log_is_honoured_in_json() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .env_remove("LSPLIT_LOG")
        .env("RUST_LOG", "lsplit_server=info,warn")
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--model"])
        .arg(model())
        .args(["--drain-secs", "600", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lsplit serve");
    let lines = lsplit_testkit::process::lines(child.stderr.take().expect("stderr"));
    let banner = lsplit_testkit::process::announced(&mut child, false).banner;
    let addr = banner
        .trim()
        .rsplit("http://")
        .next()
        .expect("address")
        .to_string();
    let serving = json_event(&lines, "serving");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["target"], "lsplit_server::serve");
    assert_eq!(serving["fields"]["service"], "lsplit.trunk.v1.Trunk");
    assert_eq!(health(&addr), ServingStatus::Serving);

    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let draining = json_event(
        &lines,
        "draining: health says NOT_SERVING, sessions still accepted",
    );
    assert_eq!(draining["fields"]["seconds"], 600.0);
    // A new connection is still accepted, and its health check says NOT_SERVING.
    assert_eq!(health(&addr), ServingStatus::NotServing);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "exited while draining"
    );
    let _ = child.kill();
    let _ = child.wait();
}
