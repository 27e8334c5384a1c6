use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

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
}

/// A finished step: the session's cache (advanced on success) and the output rows.
pub(crate) struct Done {
    pub(crate) cache: KvCache,
    pub(crate) output: Result<HiddenRows, Status>,
}

/// Most steps run through the layers together.
const MAX_BATCH: usize = 64;

/// The thread that runs the trunk's layers for every session.
///
/// Steps that are waiting at the same time run as one batch ([`ModelPart::forward_batch`]),
/// so each weight is read once for all of them. Sessions only wait on it asynchronously, so
/// the gRPC runtime never blocks on model compute.
pub(crate) struct Engine {
    queue: Mutex<mpsc::Sender<Step>>,
}

impl Engine {
    pub(crate) fn start(part: Arc<ModelPart>, counters: Arc<Counters>) -> std::io::Result<Self> {
        let (queue, steps) = mpsc::channel::<Step>();
        std::thread::Builder::new()
            .name("lsplit-trunk".into())
            .spawn(move || {
                while let Ok(first) = steps.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match steps.try_recv() {
                            Ok(step) => batch.push(step),
                            Err(_) => break,
                        }
                    }
                    run_batch(&part, batch, &counters);
                }
            })?;
        Ok(Self {
            queue: Mutex::new(queue),
        })
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

/// Decodes every step, runs the decodable ones together and answers each; a panic in the
/// model becomes an internal error of the steps of this batch only. The batch is counted
/// before any step is answered, so a device never sees its step missing from the metrics.
fn run_batch(part: &ModelPart, batch: Vec<Step>, counters: &Counters) {
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
        let _ = step.reply.send(Done {
            cache: step.cache,
            output,
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
