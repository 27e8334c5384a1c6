//! Running the `lsplit` binary from the integration tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// Runs `lsplit` with `args`, logging only warnings.
pub fn lsplit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .args(args)
        .env("LSPLIT_LOG", "warn")
        .output()
        .expect("run lsplit")
}

/// The process's standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// The process's standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// Path of the default model, fetched on first use.
pub fn model() -> String {
    lsplit_fetch::ensure_default_model()
        .expect("default model")
        .display()
        .to_string()
}

/// The first line a spawned `lsplit serve` prints on its piped stdout: the banner that names
/// its trunk and address, waited for up to a minute. (Only the files that start servers use it.)
#[allow(dead_code)]
pub fn banner(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("a piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("lsplit serve announces its address")
}
