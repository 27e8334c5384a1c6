//! One generation per request, on its own thread with its own trunk session, reporting tokens
//! through a channel. When the receiver goes away (the client disconnected) the generation
//! stops at the next token and its session, trunk session included, is dropped.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use lsplit_split::{GenerateOptions, Stats, StopReason};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::State;
use crate::error::ApiError;
use crate::stop::StopFilter;
use crate::trace::{ExchangeSlot, ObservedTrunk, Summary, TokenTrace};

/// Events buffered between the generation thread and the HTTP response.
const CHANNEL_DEPTH: usize = 32;

/// What to generate.
#[derive(Debug)]
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    pub stop: Vec<String>,
    pub trace: bool,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishReason {
    /// End of sequence or a stop sequence.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The end of a generation.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub summary: Summary,
}

/// What the generation thread reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// A token: the text it makes safe to send (may be empty) and, if asked, its trace.
    Token {
        text: String,
        trace: Option<TokenTrace>,
    },
    /// Text held back until the end (an incomplete character, a false stop-sequence start).
    Tail(String),
    /// The generation ended normally.
    Done(Outcome),
    /// The generation failed.
    Failed(ApiError),
}

/// A taken session slot (a generation or an image, each with its own trunk session): a permit
/// of the server's semaphore, given back when dropped.
pub(crate) struct Slot {
    state: Arc<State>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// Takes a slot, or answers 429 when all `max_sessions` are taken.
    pub fn take(state: &Arc<State>) -> Result<Self, ApiError> {
        let permit = Arc::clone(&state.slots)
            .try_acquire_owned()
            .map_err(|_| ApiError::busy(state.max_sessions))?;
        Ok(Self {
            state: Arc::clone(state),
            _permit: permit,
        })
    }

    /// The server's state.
    pub fn state(&self) -> &State {
        &self.state
    }
}

/// Takes a session slot and starts `job` on its own thread.
pub(crate) fn start(state: &Arc<State>, job: Job) -> Result<mpsc::Receiver<Event>, ApiError> {
    let slot = Slot::take(state)?;
    let (events, receiver) = mpsc::channel(CHANNEL_DEPTH);
    std::thread::Builder::new()
        .name("lsplit-edge-generation".into())
        .spawn(move || {
            let slot = slot;
            run(slot.state(), job, &events);
        })
        .map_err(|e| ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            message: format!("cannot start a generation thread: {e}"),
            kind: "server_error",
            param: None,
            code: None,
        })?;
    Ok(receiver)
}

/// Runs `job` to the end, or until nobody listens.
fn run(state: &State, job: Job, events: &mpsc::Sender<Event>) {
    let exchanges: ExchangeSlot = Arc::new(Mutex::new(None));
    let session = state.device.session_with(|trunk| {
        if job.trace {
            Box::new(ObservedTrunk::new(trunk, Arc::clone(&exchanges)))
        } else {
            trunk
        }
    });
    let mut session = match session {
        Ok(session) => session,
        Err(e) => {
            let _ = events.blocking_send(Event::Failed(e.into()));
            return;
        }
    };
    let mut filter = StopFilter::new(job.stop);
    let mut before = Stats::default();
    let mut index = 0;
    let mut streamed = 0;
    let mut listening = true;
    let result = session.generate_steps(&job.prompt, &job.options, &mut |step| {
        let trace = job.trace.then(|| {
            let exchange = exchanges
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            TokenTrace::new(index, step, &before, exchange)
        });
        before = step.stats.clone();
        index += 1;
        streamed += step.text.len();
        let text = filter.push(step.text);
        if (!text.is_empty() || trace.is_some())
            && events.blocking_send(Event::Token { text, trace }).is_err()
        {
            listening = false;
            return ControlFlow::Break(());
        }
        if filter.stopped() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if !listening {
        tracing::info!("client went away; generation stopped and its session freed");
        return;
    }
    let generation = match result {
        Ok(generation) => generation,
        Err(e) => {
            let _ = events.blocking_send(Event::Failed(e.into()));
            return;
        }
    };
    let mut tail = filter.push(generation.text.get(streamed..).unwrap_or_default());
    tail.push_str(&filter.finish());
    if !tail.is_empty() && events.blocking_send(Event::Tail(tail)).is_err() {
        return;
    }
    let finish = match generation.stop {
        StopReason::Eos | StopReason::Stopped => FinishReason::Stop,
        StopReason::MaxTokens | StopReason::ContextFull => FinishReason::Length,
    };
    let _ = events.blocking_send(Event::Done(Outcome {
        finish,
        prompt_tokens: job.prompt.len(),
        completion_tokens: generation.tokens.len(),
        summary: Summary::of(&generation.stats),
    }));
}
