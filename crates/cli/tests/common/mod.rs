//! Running the `lsplit` binary from the integration tests, and the test venv's Python.

// Each test file that includes this module uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `lsplit` with `args`, logging only warnings.
pub fn lsplit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .args(args)
        .env("LSPLIT_LOG", "warn")
        .output()
        .expect("run lsplit")
}

/// The process's standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// The process's standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// Path of the default model, fetched on first use.
pub fn model() -> String {
    lsplit_fetch::ensure_default_model()
        .expect("default model")
        .display()
        .to_string()
}

/// The Python interpreter of the test venv: the `edge` tests' clients and the `deploy` tests'
/// validators.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("LSPLIT_TEST_PYTHON") {
        return python.into();
    }
    let python = lsplit_fetch::cache_dir()
        .expect("cache dir")
        .join("edge-test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which creates it (or python3 -m venv DIR && \
         DIR/bin/pip install -r crates/cli/tests/edge/requirements.txt -r \
         crates/cli/tests/deploy/requirements.txt), or set LSPLIT_TEST_PYTHON",
        python.display()
    );
    python
}

/// The tiny Hugging Face model of `crates/model/tests`.
pub fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf")
}

/// An `lsplit serve` of the tiny model over TLS; killed when dropped.
pub struct TinyServer {
    child: std::process::Child,
    /// What it printed first: `lsplit serve: trunk ... on https://ADDR`.
    pub banner: String,
    port: u16,
}

impl TinyServer {
    /// Serves layers `split` with the certificate and key of `pki/pki` (as `lsplit cert`
    /// writes them) and the token in `pki/token`, with `extra` flags.
    pub fn start(pki: &std::path::Path, split: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lsplit"))
            .env("LSPLIT_LOG", "warn")
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--split",
                split,
                "--model",
            ])
            .arg(tiny_model())
            .arg("--cert")
            .arg(pki.join("pki/server.pem"))
            .arg("--key")
            .arg(pki.join("pki/server.key"))
            .arg("--token-file")
            .arg(pki.join("token"))
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lsplit serve");
        let announced = lsplit_testkit::process::announced(&mut child, false);
        Self {
            child,
            banner: announced.banner,
            port: announced.port,
        }
    }

    /// Its address.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
