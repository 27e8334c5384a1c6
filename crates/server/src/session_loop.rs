//! The session skeleton every model kind's service shares: admission against the session
//! limit, session ids, the count of open sessions, one task per stream, the idle timeout on
//! requests and on replies, and the status a failed session ends with.
//!
//! A model kind supplies only a [`SessionKind`]: its stream's messages and how one request
//! becomes one reply.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use crate::ServerError;
use crate::metrics::Counters;

/// One session of a model kind: what it holds between requests, and its compute.
pub(crate) trait SessionKind: Send + 'static {
    /// A message the device sends on the session stream.
    type Request: Send + 'static;
    /// A message the server answers with.
    type Reply: Send + 'static;

    /// Turns one request into its reply; an error ends the session with that status.
    fn handle(
        &mut self,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Reply, Status>> + Send;
}

/// The replies of one session stream, as tonic serves them.
pub(crate) type ReplyStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// How a model kind's sessions are named in statuses and logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionNames {
    /// One session: `session`, `image session`.
    one: &'static str,
    /// Several: `sessions`, `image sessions`.
    many: &'static str,
    /// What closing an idle session does: `closed and its KV cache freed`.
    closed: &'static str,
}

impl SessionNames {
    pub(crate) const fn new(one: &'static str, many: &'static str, closed: &'static str) -> Self {
        Self { one, many, closed }
    }
}

/// Admission and bookkeeping of every session of one server.
#[derive(Debug)]
pub(crate) struct Sessions {
    names: SessionNames,
    max_sessions: usize,
    idle_timeout: Duration,
    slots: Arc<Semaphore>,
    active: AtomicUsize,
    next_id: AtomicU64,
    counters: Arc<Counters>,
}

impl Sessions {
    /// Room for `max_sessions` sessions at once, each closed after `idle_timeout` without a
    /// request (or without reading a reply), and the server's counters.
    pub(crate) fn new(
        names: SessionNames,
        max_sessions: usize,
        idle_timeout: Duration,
    ) -> Result<Self, ServerError> {
        if max_sessions == 0 {
            return Err(ServerError::Config(
                "--max-sessions must be at least 1".into(),
            ));
        }
        Ok(Self {
            names,
            max_sessions,
            idle_timeout,
            slots: Arc::new(Semaphore::new(max_sessions)),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            counters: Arc::default(),
        })
    }

    /// The server's counters, which sessions' errors are counted in.
    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Sessions open now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Admits the stream `inbound` (or refuses it past the session limit), makes its state with
    /// `open` from the new session's id, and serves it on its own task.
    pub(crate) fn serve<K: SessionKind>(
        self: &Arc<Self>,
        inbound: Streaming<K::Request>,
        open: impl FnOnce(u64) -> K,
    ) -> Result<Response<ReplyStream<K::Reply>>, Status> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the server already serves its limit of {} {}",
                self.max_sessions, self.names.many
            ))
        })?;
        let seat = Seat::new(self.clone(), permit);
        let kind = open(seat.id);
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut kind = kind;
            let result = seat.run(&mut kind, inbound, &tx).await;
            drop(kind);
            let sessions = seat.sessions.clone();
            let id = seat.id;
            drop(seat);
            if let Err(status) = result {
                sessions
                    .counters
                    .errors_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(session = id, kind = sessions.names.one, code = ?status.code(), message = status.message(), "session ended with an error");
                let _ = tokio::time::timeout(sessions.idle_timeout, tx.send(Err(status))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One admitted session's place: its id and its slot, given back on drop.
struct Seat {
    sessions: Arc<Sessions>,
    _permit: OwnedSemaphorePermit,
    id: u64,
}

impl Seat {
    fn new(sessions: Arc<Sessions>, permit: OwnedSemaphorePermit) -> Self {
        sessions.active.fetch_add(1, Ordering::SeqCst);
        let id = sessions.next_id.fetch_add(1, Ordering::SeqCst);
        Self {
            sessions,
            _permit: permit,
            id,
        }
    }

    /// Serves the stream until the device closes it (`Ok`) or a request fails (`Err`).
    async fn run<K: SessionKind>(
        &self,
        kind: &mut K,
        mut inbound: Streaming<K::Request>,
        tx: &mpsc::Sender<Result<K::Reply, Status>>,
    ) -> Result<(), Status> {
        let idle = self.sessions.idle_timeout;
        let names = self.sessions.names;
        let closed = |what: &str| {
            Status::deadline_exceeded(format!(
                "{} {} {what} for {} ms: {}",
                names.one,
                self.id,
                idle.as_millis(),
                names.closed
            ))
        };
        loop {
            let request = match tokio::time::timeout(idle, inbound.message()).await {
                Err(_) => return Err(closed("was idle")),
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(request))) => request,
            };
            let reply = kind.handle(request).await?;
            match tokio::time::timeout(idle, tx.send(Ok(reply))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(()),
                Err(_) => return Err(closed("did not read its replies")),
            }
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.sessions.active.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!(
            session = self.id,
            kind = self.sessions.names.one,
            "session closed"
        );
    }
}
