//! `lsplit serve` processes for the tests that run it: a development PKI and token, and a
//! server on loopback that announces its address.

// Each test file that includes this module uses a part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use lsplit_testkit::process::announced;

/// `lsplit`, logging only warnings.
pub fn lsplit() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lsplit"));
    command.env("LSPLIT_LOG", "warn");
    command
}

/// The default model's file, fetched on first use.
pub fn model() -> PathBuf {
    lsplit_fetch::ensure_default_model().expect("default model")
}

/// Runs `command`, failing the test with its stderr unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let out = command.output().expect("run lsplit");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A development PKI and token in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        run(lsplit().args(["cert", "--out"]).arg(dir.path().join("pki")));
        std::fs::write(dir.path().join("token"), "tr0mb0ne\n").expect("token file");
        Self { dir }
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// A file `lsplit cert` wrote (or the token) in the PKI directory `dir`.
pub fn file(dir: &Path, name: &str) -> PathBuf {
    match name {
        "token" => dir.join(name),
        _ => dir.join("pki").join(name),
    }
}

/// An `lsplit serve` process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    /// The metrics endpoint's address, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
}

impl Server {
    /// Serves layers `split` on `port` (0: a free one) with the PKI's certificate and token.
    pub fn start(pki: &Path, split: &str, port: u16) -> Self {
        Self::start_with(pki, split, port, &[])
    }

    /// [`Server::start`] with `extra` options of `lsplit serve`.
    pub fn start_with(pki: &Path, split: &str, port: u16, extra: &[&str]) -> Self {
        let mut command = lsplit();
        command.stderr(Stdio::null());
        let mut options: Vec<OsString> = vec![
            "--cert".into(),
            file(pki, "server.pem").into_os_string(),
            "--key".into(),
            file(pki, "server.key").into_os_string(),
            "--token-file".into(),
            file(pki, "token").into_os_string(),
        ];
        options.extend(extra.iter().map(OsString::from));
        Self::spawn(command, split, port, &options)
    }

    /// Runs `command` as `lsplit serve` with `options` and waits for its address (and, with
    /// `--metrics`, its metrics address).
    pub fn spawn(mut command: Command, split: &str, port: u16, options: &[OsString]) -> Self {
        let mut child = command
            .args(["serve", "--split", split, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--model")
            .arg(model())
            .args(options)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lsplit serve");
        let announced = announced(&mut child, options.iter().any(|o| o == "--metrics"));
        assert!(
            announced.banner.starts_with(&format!(
                "lsplit serve: trunk layers {}",
                split.replace(':', "..")
            )),
            "{}",
            announced.banner
        );
        let (port, metrics) = (announced.port, announced.metrics);
        Self {
            child,
            port,
            metrics,
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
