//! A bounded hostile load on loopback: 240 connections from one peer (127.0.0.2) holding silent
//! session streams, flooding health `Watch`es, sending oversized frames and bad rows, while
//! honest devices on another peer (127.0.0.1) generate. Honest outputs must stay bit-identical
//! to a solo run, health must answer throughout, and resident memory must stay bounded.
//!
//! It takes minutes of CPU, so it is ignored by default:
//! `cargo test -p lsplit-server --test load -- --ignored --nocapture`
//! (SECURITY.md records its figures).

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use lsplit_proto::pb;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_server::{DevCertificates, Limits, TransportLimits};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Hostile connections, all from one address.
const CONNECTIONS: usize = 240;
/// Honest devices generating at once.
const HONEST: usize = 3;
/// How often each oversized-frame or bad-rows connection sends (the test is bounded: 60 of
/// each kind, so 60 MiB of refused frames a second).
const PACE: Duration = Duration::from_secs(1);

/// Resident memory of this process (server and clients), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the hostile clients saw, counted.
#[derive(Default)]
struct Tally {
    connected: AtomicU64,
    refused_connections: AtomicU64,
    silent_closed: AtomicU64,
    watches_held: AtomicU64,
    watches_refused: AtomicU64,
    oversized_refused: AtomicU64,
    bad_rows_refused: AtomicU64,
    health_ok: AtomicU64,
    health_failed: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A step whose rows are `width` values wide and `bytes` long.
fn step(width: u32, bytes: usize) -> pb::SessionRequest {
    pb::SessionRequest {
        kind: Some(RequestKind::Step(pb::Step {
            step: 0,
            rows: Some(pb::Rows {
                start: 0,
                rows: 1,
                width,
                codec: pb::Codec::F32 as i32,
                payload: vec![0; bytes],
            }),
            tag: vec![0; 16],
            rewind: 0,
        })),
    }
}

/// Sends `requests` on a new session stream and returns the status it ends with.
async fn session_status(
    client: &mut pb::trunk_client::TrunkClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    >,
    requests: Vec<pb::SessionRequest>,
) -> Option<Code> {
    let (tx, rx) = mpsc::channel(4);
    for request in requests {
        tx.send(request).await.ok()?;
    }
    let mut replies = match client.session(ReceiverStream::new(rx)).await {
        Ok(replies) => replies.into_inner(),
        Err(status) => return Some(status.code()),
    };
    loop {
        match replies.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(status) => return Some(status.code()),
        }
    }
}

/// One hostile connection of kind `i % 4`, until `stop`.
async fn hostile(
    i: usize,
    server: &lsplit_testkit::RunningServer,
    certs: &DevCertificates,
    tally: &Tally,
    stop: &AtomicBool,
) {
    let from: IpAddr = [127, 0, 0, 2].into();
    let Ok(channel) = channel_from(server, certs, Some(from)).await else {
        count(&tally.refused_connections);
        return;
    };
    count(&tally.connected);
    let mut trunk = client(channel.clone());
    let mut watches = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match i % 4 {
            // Two silent streams at a time, each closed by the server's handshake timeout.
            0 => {
                let a = RawStream::silent(&mut trunk).await;
                let b = RawStream::silent(&mut trunk).await;
                for stream in [a, b].into_iter().flatten() {
                    let mut stream = stream;
                    if matches!(stream.next().await, Err(s) if s.code() == Code::DeadlineExceeded) {
                        count(&tally.silent_closed);
                    }
                }
            }
            // Watches held open, past the server's limit.
            1 => {
                let mut health = HealthClient::new(channel.clone());
                let request = HealthCheckRequest {
                    service: "lsplit.trunk.v1.Trunk".into(),
                };
                match health.watch(request).await {
                    Ok(watch) => {
                        count(&tally.watches_held);
                        watches.push(watch.into_inner());
                    }
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        count(&tally.watches_refused);
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // A frame just past the message limit, once a second.
            2 => {
                let code = session_status(&mut trunk, vec![step(576, (1 << 20) + 1024)]).await;
                if code == Some(Code::OutOfRange) || code == Some(Code::ResourceExhausted) {
                    count(&tally.oversized_refused);
                }
                tokio::time::sleep(PACE).await;
            }
            // An open session, then rows of the wrong width, once a second.
            _ => {
                let code = session_status(&mut trunk, vec![open_request(), step(3, 12)]).await;
                if code == Some(Code::InvalidArgument) || code == Some(Code::ResourceExhausted) {
                    count(&tally.bad_rows_refused);
                }
                tokio::time::sleep(PACE).await;
            }
        }
    }
}

#[test]
#[ignore = "a load test: minutes of CPU; run it with --ignored --nocapture"]
fn honest_sessions_stay_exact_under_hostile_load() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let limits = Limits {
        max_sessions: 16,
        max_message_bytes: 1 << 20,
        kv_budget_bytes: 256 << 20,
        ..Limits::default()
    };
    let transport = TransportLimits {
        handshake_timeout: Duration::from_secs(2),
        max_sessions_per_peer: 8,
        max_connections: 512,
        max_connections_per_peer: 256,
        max_health_watches: 64,
        ..TransportLimits::default()
    };
    let server = server(&certs, limits, transport);
    let model = device_model();
    let solo = remote_tokens(&model, &server, &certs, Duration::ZERO);
    assert_eq!(solo, local_tokens(&model), "the solo run is exact");
    let baseline = rss();

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let peak = AtomicU64::new(baseline);
    let started = Instant::now();
    let outputs: Vec<Vec<u32>> = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        scope.spawn(|| {
            let runtime = runtime();
            runtime.block_on(async {
                let mut health = HealthClient::new(channel(&server, &certs).await.expect("probe"));
                while !stop.load(Ordering::Relaxed) {
                    let request = HealthCheckRequest {
                        service: "lsplit.trunk.v1.Trunk".into(),
                    };
                    match health.check(request).await {
                        Ok(reply) if reply.get_ref().status == 1 => count(&tally.health_ok),
                        _ => count(&tally.health_failed),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        });
        scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let tasks = (0..CONNECTIONS).map(|i| hostile(i, &server, &certs, &tally, &stop));
                futures_util::future::join_all(tasks).await;
            });
        });
        // The hostile connections settle in before the honest devices start.
        std::thread::sleep(Duration::from_secs(3));
        let honest: Vec<_> = (0..HONEST)
            .map(|_| {
                scope.spawn(|| remote_tokens(&model, &server, &certs, Duration::from_secs(30)))
            })
            .collect();
        let outputs = honest
            .into_iter()
            .map(|h| h.join().expect("an honest device"))
            .collect();
        // Let the silent streams meet their timeout at least once.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        outputs
    });
    let elapsed = started.elapsed();
    let peak = peak.load(Ordering::Relaxed);
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "load: {elapsed:.1?}; hostile connections {} accepted, {} refused; silent streams closed \
         {}; watches held {}, refused {}; oversized frames refused {}; bad rows refused {}; \
         health checks {} SERVING, {} failed; RSS {} MiB before, {} MiB peak",
        n(&tally.connected),
        n(&tally.refused_connections),
        n(&tally.silent_closed),
        n(&tally.watches_held),
        n(&tally.watches_refused),
        n(&tally.oversized_refused),
        n(&tally.bad_rows_refused),
        n(&tally.health_ok),
        n(&tally.health_failed),
        baseline >> 20,
        peak >> 20,
    );
    for output in &outputs {
        assert_eq!(output, &solo, "an honest device's tokens under load");
    }
    assert!(
        n(&tally.connected) >= 200,
        "at least 200 hostile connections"
    );
    assert_eq!(n(&tally.health_failed), 0, "health answered throughout");
    assert!(n(&tally.health_ok) > 0);
    assert!(n(&tally.silent_closed) > 0 && n(&tally.oversized_refused) > 0);
    assert!(n(&tally.bad_rows_refused) > 0 && n(&tally.watches_refused) > 0);
    // The KV budget (256 MiB) and 240 connections' buffers bound the growth.
    assert!(
        peak - baseline < 768 << 20,
        "RSS grew by {} MiB",
        (peak - baseline) >> 20
    );
}
