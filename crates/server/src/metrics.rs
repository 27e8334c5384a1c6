use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::ServerStats;

/// Upper bounds of the step latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters of a running server, updated lock-free by sessions and the trunk worker.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sessions_total: AtomicU64,
    pub(crate) steps_total: AtomicU64,
    pub(crate) rows_total: AtomicU64,
    pub(crate) batches_total: AtomicU64,
    pub(crate) batched_steps_total: AtomicU64,
    pub(crate) bytes_in_total: AtomicU64,
    pub(crate) bytes_out_total: AtomicU64,
    pub(crate) errors_total: AtomicU64,
    pub(crate) images_total: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Counters {
    /// Records one batch of `steps` steps that took `elapsed` through the trunk.
    pub(crate) fn batch(&self, steps: usize, elapsed: Duration) {
        self.batches_total.fetch_add(1, Ordering::Relaxed);
        if steps > 1 {
            self.batched_steps_total
                .fetch_add(steps as u64, Ordering::Relaxed);
        }
        self.latency(steps, elapsed);
    }

    /// Records `steps` steps that took `elapsed` through the trunk together.
    pub(crate) fn latency(&self, steps: usize, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(steps as u64, Ordering::Relaxed);
            }
        }
        self.latency_count
            .fetch_add(steps as u64, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64 * steps as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter of a language-model trunk server, plus
    /// the gauges given.
    pub(crate) fn render(&self, sessions: usize, kv_bytes: u64, awaited: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let kv_help = "Bytes of cached positions held by open sessions.";
        let awaited_help = "Sessions answered whose next step has not reached the trunk yet.";
        let batched_help = "Steps that shared a batch with another session's.";
        self.render_kind(
            "Sessions",
            sessions,
            &[
                ("lsplit_kv_bytes", "gauge", kv_help, kv_bytes),
                (
                    "lsplit_sessions_awaited",
                    "gauge",
                    awaited_help,
                    awaited as u64,
                ),
                (
                    "lsplit_steps_total",
                    "counter",
                    "Trunk steps run.",
                    get(&self.steps_total),
                ),
                (
                    "lsplit_rows_total",
                    "counter",
                    "Hidden rows run through the trunk.",
                    get(&self.rows_total),
                ),
                (
                    "lsplit_batches_total",
                    "counter",
                    "Batches run through the trunk.",
                    get(&self.batches_total),
                ),
                (
                    "lsplit_batched_steps_total",
                    "counter",
                    batched_help,
                    get(&self.batched_steps_total),
                ),
            ],
        )
    }

    /// The Prometheus text exposition of every counter of a diffusion trunk server, plus the
    /// sessions open now.
    pub(crate) fn render_diffusion(&self, sessions: usize) -> String {
        let images = self.images_total.load(Ordering::Relaxed);
        let steps = self.steps_total.load(Ordering::Relaxed);
        let images_help = "Images set up (a session may draw several).";
        let own = [
            ("lsplit_images_total", "counter", images_help, images),
            (
                "lsplit_steps_total",
                "counter",
                "Denoising steps run through the trunk.",
                steps,
            ),
        ];
        self.render_kind("Image sessions", sessions, &own)
    }

    /// The sessions (`sessions` open now; `noun` in the help texts), a kind's `own` metrics
    /// (name, type, help, value), then the traffic both kinds share.
    fn render_kind(&self, noun: &str, sessions: usize, own: &[(&str, &str, &str, u64)]) -> String {
        let mut out = String::new();
        let opened = self.sessions_total.load(Ordering::Relaxed);
        let open_help = format!("{noun} open now.");
        metric(
            &mut out,
            "lsplit_sessions_open",
            "gauge",
            &open_help,
            sessions as u64,
        );
        metric(
            &mut out,
            "lsplit_sessions_total",
            "counter",
            &format!("{noun} opened."),
            opened,
        );
        for (name, kind, help, value) in own {
            metric(&mut out, name, kind, help, *value);
        }
        self.render_traffic(&mut out);
        out
    }

    /// Bytes, errors and the step latency histogram, which both kinds of server share.
    fn render_traffic(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metric(
            out,
            "lsplit_bytes_in_total",
            "counter",
            "Payload bytes received.",
            get(&self.bytes_in_total),
        );
        metric(
            out,
            "lsplit_bytes_out_total",
            "counter",
            "Payload bytes sent.",
            get(&self.bytes_out_total),
        );
        metric(
            out,
            "lsplit_session_errors_total",
            "counter",
            "Sessions ended by an error status.",
            get(&self.errors_total),
        );
        let name = "lsplit_step_seconds";
        let _ = writeln!(out, "# HELP {name} Time of a step through the trunk.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.latency_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            get(&self.latency_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Writes one metric with its help and type lines.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Serves `GET /metrics` in the Prometheus text format on `listener` until `shutdown`.
///
/// A deliberately tiny HTTP/1.1 responder: one request per connection, bounded in time.
pub async fn serve_metrics(
    listener: TcpListener,
    stats: ServerStats,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut socket, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener failed to accept");
                    continue;
                }
            },
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            // Read the whole request head: closing a socket with unread bytes resets the
            // connection, and the client may lose the response.
            let mut request = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
            });
            if read.await.is_err() || request.is_empty() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let (status, body) = if line.starts_with("GET /metrics ") {
                ("200 OK", stats.prometheus())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \
                 {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                socket.write_all(response.as_bytes()).await?;
                socket.shutdown().await
            })
            .await;
        });
    }
}
