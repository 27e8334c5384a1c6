//! `LSPLIT_CACHE_DIR` and `LSPLIT_PYTHON` steer the default-model functions. Alone in its
//! test binary because it sets environment variables.

use lsplit_fetch::{
    DEFAULT_MODEL, FetchError, cache_dir, default_model_path, ensure_default_model,
    ensure_default_model_with_progress,
};

#[test]
fn default_model_functions_honour_cache_dir_and_python_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing_python = dir.path().join("no-such-python3");
    // SAFETY: this is the only test in this binary, so no other thread reads the environment.
    unsafe {
        std::env::set_var("LSPLIT_CACHE_DIR", dir.path());
        std::env::set_var("LSPLIT_PYTHON", &missing_python);
    }

    assert_eq!(cache_dir().expect("cache dir"), dir.path());
    let expected = dir.path().join("models").join(DEFAULT_MODEL.file_name);
    assert_eq!(default_model_path().expect("model path"), expected);

    // Nothing cached: the fetch must use LSPLIT_PYTHON, which does not exist.
    let err = ensure_default_model().expect_err("must fail without python");
    assert!(matches!(err, FetchError::PythonMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&*missing_python.to_string_lossy()), "{msg}");
    assert!(msg.contains(&*expected.to_string_lossy()), "{msg}");

    // A file of the right size in the cache is returned as is, without pip.
    std::fs::File::create(&expected)
        .and_then(|f| f.set_len(DEFAULT_MODEL.size))
        .expect("create placeholder");
    assert_eq!(ensure_default_model().expect("cached"), expected);
    assert_eq!(
        ensure_default_model_with_progress().expect("cached"),
        expected
    );
}
