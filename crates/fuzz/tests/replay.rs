//! Every committed corpus input and crash reproducer of `fuzz/`, fed to its target on stable:
//! what the fuzzer found stays fixed.

use std::path::{Path, PathBuf};

/// The files under `fuzz/corpus/NAME` and `fuzz/artifacts/NAME`.
fn inputs(name: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "artifacts"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(name)).ok())
        .flatten()
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_crash_file_replays_without_a_panic() {
    for (name, target) in lsplit_fuzz::TARGETS {
        let files = inputs(name);
        assert!(!files.is_empty(), "no corpus for the fuzz target {name}");
        for file in files {
            let data = std::fs::read(&file).expect("read a corpus file");
            let replayed = std::panic::catch_unwind(|| target(&data));
            assert!(replayed.is_ok(), "{name} panicked on {}", file.display());
        }
    }
}
