use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use lsplit_model::{KvCache, ModelPart};
use lsplit_split::{PreparedStep, StepRows, TrunkError, TrunkState};
use tokio::sync::{oneshot, watch};
use tonic::Status;

use crate::metrics::Counters;

/// One step of one session: its trunk state (KV cache included) travels to the worker and
/// back.
pub(crate) struct Step {
    pub(crate) trunk: Box<TrunkState>,
    pub(crate) message: StepRows,
    pub(crate) reply: oneshot::Sender<Done>,
    /// The ticket of the session's previous step, when it had one: the engine is waiting for
    /// this step.
    pub(crate) ticket: Option<Ticket>,
}

/// A finished step: the session's trunk state (advanced on success) and its answer.
pub(crate) struct Done {
    pub(crate) trunk: Box<TrunkState>,
    pub(crate) output: Result<StepRows, Status>,
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
/// Steps that are waiting at the same time and whose drawn layers are the whole trunk (every
/// step of a fixed split, the steps of a random one whose draw allows it) run as one batch
/// ([`ModelPart::forward_batch`]), so each weight is read once for all of them; the others run
/// alone on this thread. Each step is prepared and finished by the split crate's
/// [`TrunkState`], so the server holds no split logic of its own. While some sessions the engine answered have
/// not sent their next step yet (their [`Ticket`]s are out), it holds a batch open for a short
/// while (a quarter of the previous batch's time, at most `batch_wait`) for them to come back.
/// Without that, the sessions split into groups that run one after the other, each a smaller
/// batch. Sessions only wait on it asynchronously, so the gRPC runtime never blocks on model
/// compute.
///
/// A panic anywhere in a batch fails only that batch's steps. If the thread itself dies,
/// [`Engine::failure`] completes, so the server can report `NOT_SERVING` and exit.
pub(crate) struct Engine {
    queue: Mutex<mpsc::Sender<Step>>,
    out: Arc<AtomicUsize>,
    failed: watch::Receiver<Option<String>>,
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
        let (failure, failed) = watch::channel(None);
        std::thread::Builder::new()
            .name("lsplit-trunk".into())
            .spawn(move || {
                let worked = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    work(&part, &steps, &counters, &outstanding, batch_wait)
                }));
                if worked.is_err() {
                    tracing::error!("the trunk worker thread died");
                    failure.send_replace(Some("the trunk worker thread died".into()));
                }
            })?;
        Ok(Self {
            queue: Mutex::new(queue),
            out,
            failed,
        })
    }

    /// Completes with the reason if the worker thread dies; never while it runs.
    pub(crate) fn failure(&self) -> impl Future<Output = String> + Send + 'static {
        let mut failed = self.failed.clone();
        async move {
            let reason = match failed.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone(),
                Err(_) => None,
            };
            match reason {
                Some(reason) => reason,
                // The worker ended without failing: the server is shutting down.
                None => std::future::pending().await,
            }
        }
    }

    /// The status of a step whose answer never came: its batch panicked, or the worker is
    /// gone.
    pub(crate) fn lost(&self) -> Status {
        if self.failed.borrow().is_some() {
            Status::unavailable("the trunk worker died: the server is shutting down")
        } else {
            Status::internal("the trunk failed on this step's batch")
        }
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

/// The worker thread's loop: gathers each batch from `steps` and runs it, until the engine is
/// dropped.
fn work(
    part: &ModelPart,
    steps: &mpsc::Receiver<Step>,
    counters: &Counters,
    outstanding: &Arc<AtomicUsize>,
    batch_wait: Duration,
) {
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
        #[cfg(feature = "fault-injection")]
        crate::fault::in_worker();
        let t = Instant::now();
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            crate::fault::in_batch();
            run_batch(part, batch, counters, outstanding)
        }));
        if ran.is_err() {
            // The batch's steps went with the panic: their sessions see their answers lost.
            tracing::error!("a trunk batch panicked; its sessions fail");
        }
        last = t.elapsed();
    }
}

/// `step` as it joins a batch: its session is no longer out.
fn arrived(mut step: Step) -> Step {
    step.ticket = None;
    step
}

/// The status a refused step answers with.
fn refused(error: TrunkError) -> Status {
    match error {
        TrunkError::Desync(_) | TrunkError::Policy(_) => {
            Status::failed_precondition(error.to_string())
        }
        _ => Status::invalid_argument(error.to_string()),
    }
}

/// Prepares every step, runs the layers of the batchable ones together and the others alone,
/// and answers each; a panic becomes an internal error of the steps it may have touched only.
/// The batch is counted before any step is answered, so a device never sees its step missing
/// from the metrics. A step answered with rows carries a new [`Ticket`].
fn run_batch(part: &ModelPart, batch: Vec<Step>, counters: &Counters, out: &Arc<AtomicUsize>) {
    let t = Instant::now();
    let mut together: Vec<(Step, PreparedStep)> = Vec::new();
    let mut alone: Vec<(Step, PreparedStep)> = Vec::new();
    let mut answered: Vec<(Step, Result<StepRows, Status>)> = Vec::new();
    for mut step in batch {
        let message = &step.message;
        let trunk = &mut step.trunk;
        match guarded(|| trunk.prepare(message).map_err(refused)) {
            Ok(prepared) if step.trunk.batchable(&prepared) => together.push((step, prepared)),
            Ok(prepared) => alone.push((step, prepared)),
            Err(status) => answered.push((step, Err(status))),
        }
    }
    if together.len() == 1 {
        alone.append(&mut together);
    }
    let shared = together.len();
    if shared > 1 {
        // Sessions check positions, widths and context before queueing, so a batch only fails
        // on an internal error, which may have touched every cache: all its steps fail.
        let result = guarded(|| {
            let mut items: Vec<(&Tensor, usize, &mut KvCache)> = together
                .iter_mut()
                .map(|(step, prepared)| step.trunk.batch_input(prepared))
                .collect();
            part.forward_batch(&mut items)
                .map_err(|e| Status::internal(e.to_string()))
        });
        match result {
            Ok(outputs) => {
                for ((mut step, prepared), output) in together.into_iter().zip(outputs) {
                    let trunk = &mut step.trunk;
                    let answer =
                        guarded(|| trunk.finish_batched(prepared, output).map_err(refused));
                    answered.push((step, answer));
                }
            }
            Err(status) => {
                answered.extend(
                    together
                        .into_iter()
                        .map(|(step, _)| (step, Err(status.clone()))),
                );
            }
        }
        counters.batch(shared, t.elapsed());
    }
    for (mut step, prepared) in alone {
        let started = Instant::now();
        let trunk = &mut step.trunk;
        let answer = guarded(|| {
            trunk.compute(&prepared).map_err(refused)?;
            trunk.finish(prepared).map_err(refused)
        });
        counters.batch(1, started.elapsed());
        answered.push((step, answer));
    }
    for (step, output) in answered {
        let ticket = output.is_ok().then(|| Ticket::new(out));
        let _ = step.reply.send(Done {
            trunk: step.trunk,
            output,
            ticket,
        });
    }
    tracing::debug!(
        batched = shared,
        micros = t.elapsed().as_micros() as u64,
        "trunk batch"
    );
}

/// Runs `f`, turning a panic into an internal error.
fn guarded<T>(f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Status::internal("the trunk failed on this step")))
}
