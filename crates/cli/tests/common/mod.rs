//! Running the `lsplit` binary from the integration tests.

// Each test file uses the helpers it needs (`adapter.rs` runs its own tiny model, not `model`).
#![allow(dead_code)]

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
