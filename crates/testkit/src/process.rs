//! `lsplit serve` run as a process: what it announces on stdout.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// What an `lsplit serve` process printed at start.
pub struct Announced {
    /// Its first line: `lsplit serve: trunk ... on https://ADDR`.
    pub banner: String,
    /// The port it listens on.
    pub port: u16,
    /// Its metrics endpoint, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
}

/// Waits (a minute at most) for `child`, an `lsplit serve` with its stdout piped, to announce
/// its address and, if `metrics`, its metrics address.
pub fn announced(child: &mut Child, metrics: bool) -> Announced {
    let lines = lines(child.stdout.take().expect("a piped stdout"));
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("lsplit serve announces its {what}"))
    };
    let banner = next("address");
    let port = banner
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in `{banner}`"));
    let metrics = metrics.then(|| {
        let line = next("metrics address");
        line.trim()
            .strip_prefix("metrics on http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in `{line}`"))
    });
    Announced {
        banner,
        port,
        metrics,
    }
}

/// Lines of a child's output `stream`, as they come; the pipe stays read until the child
/// closes it, so that a late line never meets a closed pipe.
pub fn lines(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
