use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use lsplit_model::{KvCache, ModelPart};
use lsplit_wire::HiddenRows;
use tokio::sync::oneshot;
use tonic::Status;

use crate::metrics::Counters;

/// One forward step of one session: its cache travels to the worker and back.
pub(crate) struct Step {
    pub(crate) cache: KvCache,
    pub(crate) rows: HiddenRows,
    pub(crate) reply: oneshot::Sender<Done>,
    /// The ticket of the session's previous step, when it had one: the engine is waiting for
    /// this step.
    pub(crate) ticket: Option<Ticket>,
}

/// A finished step: the session's cache (advanced on success) and the output rows.
pub(crate) struct Done {
    pub(crate) cache: KvCache,
    pub(crate) output: Result<HiddenRows, Status>,
    /// Present when the step succeeded: the session hands it back with its next step.
    pub(crate) ticket: Option<Ticket>,
}

/// Stands for a session the engine answered and expects a next step from. It counts itself
/// out while it lives, so whatever ends it (the next step reaching the engine, the session
/// closing, a reply nobody read) tells the engine to stop waiting for that session.
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    fn new(out: &Arc<AtomicUsize>) -> Self {
        out.fetch_add(1, Ordering::SeqCst);
        Self(out.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Most steps run through the layers together.
const MAX_BATCH: usize = 64;

/// The thread that runs the trunk's layers for every session.
///
/// Steps that are waiting at the same time run as one batch ([`ModelPart::forward_batch`]),
/// so each weight is read once for all of them. While some sessions the engine answered have
/// not sent their next step yet (their [`Ticket`]s are out), it holds a batch open for a short
/// while (a quarter of the previous batch's time, at most `batch_wait`) for them to come back.
/// Without that, the sessions split into groups that run one after the other, each a smaller
/// batch. Sessions only wait on it asynchronously, so the gRPC runtime never blocks on model
/// compute.
pub(crate) struct Engine {
    queue: Mutex<mpsc::Sender<Step>>,
    out: Arc<AtomicUsize>,
}

impl Engine {
    pub(crate) fn start(
        part: Arc<ModelPart>,
        counters: Arc<Counters>,
        batch_wait: Duration,
    ) -> std::io::Result<Self> {
        let (queue, steps) = mpsc::channel::<Step>();
        let out = Arc::new(AtomicUsize::new(0));
        let outstanding = out.clone();
        std::thread::Builder::new()
            .name("lsplit-trunk".into())
            .spawn(move || {
                let mut last = Duration::ZERO;
                while let Ok(first) = steps.recv() {
                    let deadline = Instant::now() + batch_wait.min(last / 4);
                    let mut batch = vec![arrived(first)];
                    while batch.len() < MAX_BATCH {
                        match steps.try_recv() {
                            Ok(step) => batch.push(arrived(step)),
                            Err(mpsc::TryRecvError::Disconnected) => break,
                            Err(mpsc::TryRecvError::Empty) => {
                                let left = deadline.saturating_duration_since(Instant::now());
                                if outstanding.load(Ordering::SeqCst) == 0 || left.is_zero() {
                                    break;
                                }
                                match steps.recv_timeout(left) {
                                    Ok(step) => batch.push(arrived(step)),
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    let t = Instant::now();
                    run_batch(&part, batch, &counters, &outstanding);
                    last = t.elapsed();
                }
            })?;
        Ok(Self {
            queue: Mutex::new(queue),
            out,
        })
    }

    /// Sessions answered whose next step has not arrived (their tickets alive).
    pub(crate) fn awaited(&self) -> usize {
        self.out.load(Ordering::SeqCst)
    }

    /// Queues `step`; its result arrives on the step's reply channel.
    pub(crate) fn submit(&self, step: Step) -> Result<(), Status> {
        self.queue
            .lock()
            .map_err(|_| Status::internal("the trunk worker is gone"))?
            .send(step)
            .map_err(|_| Status::unavailable("the server is shutting down"))
    }
}

/// `step` as it joins a batch: its session is no longer out.
fn arrived(mut step: Step) -> Step {
    step.ticket = None;
    step
}

/// Decodes every step, runs the decodable ones together and answers each; a panic in the
/// model becomes an internal error of the steps of this batch only. The batch is counted
/// before any step is answered, so a device never sees its step missing from the metrics.
/// A step answered with rows carries a new [`Ticket`].
fn run_batch(part: &ModelPart, batch: Vec<Step>, counters: &Counters, out: &Arc<AtomicUsize>) {
    let t = Instant::now();
    let size = batch.len();
    let mut ready = Vec::with_capacity(size);
    for step in batch {
        match step.rows.decode(part.device()) {
            Ok(hidden) => ready.push((step, hidden)),
            Err(e) => {
                let _ = step.reply.send(Done {
                    cache: step.cache,
                    output: Err(Status::invalid_argument(e.to_string())),
                    ticket: None,
                });
            }
        }
    }
    let outputs: Vec<Result<Tensor, Status>> = if ready.len() == 1 {
        let (step, hidden) = &mut ready[0];
        vec![guarded(|| {
            part.forward(hidden, step.rows.start, &mut step.cache)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })]
    } else {
        // Sessions check positions, widths and context before queueing, so a batch only fails
        // on an internal error, which may have touched every cache: all its steps fail.
        let result = guarded(|| {
            let mut items: Vec<(&Tensor, usize, &mut KvCache)> = ready
                .iter_mut()
                .map(|(step, hidden)| (&*hidden, step.rows.start, &mut step.cache))
                .collect();
            part.forward_batch(&mut items)
                .map_err(|e| Status::internal(e.to_string()))
        });
        match result {
            Ok(outputs) => outputs.into_iter().map(Ok).collect(),
            Err(status) => ready.iter().map(|_| Err(status.clone())).collect(),
        }
    };
    let encoded: Vec<_> = ready
        .into_iter()
        .zip(outputs)
        .map(|((step, _), output)| {
            let output = output.and_then(|out| {
                step.rows
                    .codec
                    .encode(&out, step.rows.start)
                    .map_err(|e| Status::internal(e.to_string()))
            });
            (step, output)
        })
        .collect();
    counters.batch(size, t.elapsed());
    for (step, output) in encoded {
        let ticket = output.is_ok().then(|| Ticket::new(out));
        let _ = step.reply.send(Done {
            cache: step.cache,
            output,
            ticket,
        });
    }
    tracing::debug!(
        steps = size,
        micros = t.elapsed().as_micros() as u64,
        "trunk batch"
    );
}

/// Runs `f`, turning a panic into an internal error.
fn guarded<T>(f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Status::internal("the trunk failed on this step")))
}
