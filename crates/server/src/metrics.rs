//! The server's Prometheus metrics: lock-free counters, their text exposition (names carry
//! their units, as Prometheus's naming guide asks) and the `/metrics` endpoint.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::ServerStats;
use crate::incoming::AcceptBackoff;

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

    /// The Prometheus text exposition of split fine-tuning's counters (`lsplit serve
    /// --training`), `sessions` open now, under names of their own.
    pub(crate) fn render_training(&self, sessions: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        metric(
            &mut out,
            "lsplit_training_sessions_open",
            "gauge",
            "Training sessions open now.",
            sessions as u64,
        );
        metric(
            &mut out,
            "lsplit_training_sessions_total",
            "counter",
            "Training sessions opened.",
            get(&self.sessions_total),
        );
        metric(
            &mut out,
            "lsplit_training_forward_passes_total",
            "counter",
            "Forward passes run for training sessions.",
            get(&self.steps_total),
        );
        self.render_payload(
            &mut out,
            "lsplit_training_payload_bytes_total",
            "Training payload bytes received (in: rows and gradients) and sent (out).",
        );
        out
    }

    /// The payload bytes received and sent, as the counter `name` with a `direction` label.
    fn render_payload(&self, out: &mut String, name: &str, help: &str) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(
            out,
            "{name}{{direction=\"in\"}} {}",
            get(&self.bytes_in_total)
        );
        let _ = writeln!(
            out,
            "{name}{{direction=\"out\"}} {}",
            get(&self.bytes_out_total)
        );
    }

    /// The sessions (`sessions` open now; `noun` in the help texts), a kind's `own` metrics
    /// (name, type, help, value), then the traffic both kinds share.
    fn render_kind(&self, noun: &str, sessions: usize, own: &[(&str, &str, &str, u64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lsplit_build_info The server's version.\n# TYPE lsplit_build_info gauge\n\
             lsplit_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
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
        self.render_payload(
            out,
            "lsplit_payload_bytes_total",
            "Payload bytes received (in) and sent (out).",
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

/// Longest one metrics connection may stay open. Each carries one request and a scrape takes
/// milliseconds, so a client that sends its request slowly, or never, is cut off instead of
/// holding a socket.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Most metrics connections open at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;

/// Serves `GET /metrics` in the Prometheus text format on `listener` until `shutdown`; any
/// other path is a 404. Every response closes its connection (one request per connection), so
/// that no idle keep-alive connection holds a socket open between scrapes; a connection lives
/// at most [`CONNECTION_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are open at once.
pub async fn serve_metrics(
    listener: TcpListener,
    stats: ServerStats,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(stats): State<ServerStats>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    stats.prometheus(),
                )
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
        .layer(axum::middleware::map_response(close_connection))
        .with_state(stats);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    stream
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the metrics endpoint could not accept a connection");
                    tokio::time::sleep(backoff.failed()).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::info!("closed a metrics connection past {MAX_CONNECTIONS} open at once");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| app.clone().oneshot(request));
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .is_err()
            {
                tracing::debug!("a metrics connection ran past its time limit and was closed");
            }
        });
    }
}

/// Marks a response as the last on its connection.
async fn close_connection(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_units_and_build_info_names_the_version() {
        let counters = Counters::default();
        counters.bytes_in_total.store(7, Ordering::Relaxed);
        counters.bytes_out_total.store(9, Ordering::Relaxed);
        for text in [counters.render(0, 0, 0), counters.render_diffusion(0)] {
            let build = format!(
                "\nlsplit_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            );
            assert!(text.contains(&build), "{text}");
            assert!(
                text.contains(
                    "# TYPE lsplit_payload_bytes_total counter\n\
                     lsplit_payload_bytes_total{direction=\"in\"} 7\n\
                     lsplit_payload_bytes_total{direction=\"out\"} 9\n"
                ),
                "{text}"
            );
            assert!(!text.contains("lsplit_bytes_in_total"), "{text}");
        }
    }
}
