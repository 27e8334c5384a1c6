//! The session skeleton every model kind's service shares: admission against the session
//! limits (in total and per peer), session ids, the count of open sessions, one task per
//! stream, the handshake timeout on the first request, the idle timeout on later requests and
//! on replies, and the status a failed session ends with.
//!
//! A stream takes a session slot only when its first request (the `Open` or `Setup`) arrives,
//! so streams that stay silent cannot lock devices out; they are closed after the handshake
//! timeout.
//!
//! A model kind supplies only a [`SessionKind`]: how one request becomes one reply (its
//! stream's messages are its [`Served`] service's).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::{ReplyOf, RequestOf, Served};
use crate::metrics::Counters;
use crate::peers::{Full, PeerCounts, PeerHold};
use crate::terms::Protocol;
use crate::{ServerError, TransportLimits};

/// One session of a model kind: what it holds between requests, and its compute.
pub(crate) trait SessionKind: Send + 'static {
    /// What every session of the server shares: the trunk, its terms and limits; it names the
    /// kind's service, and so the stream's messages.
    type Shared: Served<Session = Self>;

    /// A new session numbered `id`.
    fn open(shared: Arc<Self::Shared>, id: u64) -> Self;

    /// Turns one request into its reply; an error ends the session with that status.
    fn handle(
        &mut self,
        request: RequestOf<Self::Shared>,
    ) -> impl Future<Output = Result<ReplyOf<Self::Shared>, Status>> + Send;
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
    idle_timeout: Duration,
    handshake_timeout: Duration,
    slots: Arc<PeerCounts>,
    /// Streams that have not sent their first request yet.
    waiting: Arc<PeerCounts>,
    next_id: AtomicU64,
    counters: Arc<Counters>,
}

impl Sessions {
    /// Room for `max_sessions` sessions of `protocol` at once (and as many per peer as
    /// `transport` allows), each closed after `idle_timeout` without a request (or without
    /// reading a reply), and the server's counters.
    pub(crate) fn new(
        protocol: Protocol,
        max_sessions: usize,
        idle_timeout: Duration,
        transport: &TransportLimits,
    ) -> Result<Self, ServerError> {
        if max_sessions == 0 {
            return Err(ServerError::Config(
                "--max-sessions must be at least 1".into(),
            ));
        }
        for (value, flag) in [
            (transport.max_sessions_per_peer, "--max-sessions-per-peer"),
            (transport.max_waiting_streams, "--max-waiting-streams"),
            (
                transport.max_waiting_streams_per_peer,
                "--max-waiting-streams-per-peer",
            ),
        ] {
            if value == 0 {
                return Err(ServerError::Config(format!("{flag} must be at least 1")));
            }
        }
        Ok(Self {
            names: protocol.sessions,
            idle_timeout,
            handshake_timeout: transport.handshake_timeout,
            slots: PeerCounts::new(max_sessions, transport.max_sessions_per_peer),
            waiting: PeerCounts::new(
                transport.max_waiting_streams,
                transport.max_waiting_streams_per_peer,
            ),
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
        self.slots.total()
    }

    /// The status refusing a session when `full`.
    fn refusal(&self, full: Full) -> Status {
        Status::resource_exhausted(match full {
            Full::Total(limit) => format!(
                "the server already serves its limit of {limit} {}",
                self.names.many
            ),
            Full::Peer(limit) => format!(
                "this address already holds its limit of {limit} {}",
                self.names.many
            ),
        })
    }

    /// The status refusing a new stream when the streams waiting for their first request are
    /// `full`.
    fn waiting_refusal(full: Full) -> Status {
        Status::resource_exhausted(match full {
            Full::Total(limit) => format!(
                "the server already holds its limit of {limit} streams waiting for their first request"
            ),
            Full::Peer(limit) => format!(
                "this address already holds its limit of {limit} streams waiting for their first request"
            ),
        })
    }

    /// Serves the stream of `request` on its own task: refused at once when no slot is free
    /// for its peer or too many streams wait for their first request, it takes a slot when its
    /// first request arrives (within the handshake timeout) and opens a session of kind `K` over `shared` with the new session's id.
    pub(crate) fn serve<K: SessionKind>(
        self: &Arc<Self>,
        request: Request<Streaming<RequestOf<K::Shared>>>,
        shared: &Arc<K::Shared>,
    ) -> Result<Response<ReplyStream<ReplyOf<K::Shared>>>, Status> {
        let shared = shared.clone();
        let peer: Option<IpAddr> = request.remote_addr().map(|a| a.ip());
        let mut inbound = request.into_inner();
        self.slots.room(peer).map_err(|full| self.refusal(full))?;
        let waiting = self.waiting.take(peer).map_err(Self::waiting_refusal)?;
        let (tx, rx) = mpsc::channel(2);
        let sessions = self.clone();
        tokio::spawn(async move {
            let wait = sessions.handshake_timeout;
            let first = tokio::time::timeout(wait, inbound.message()).await;
            drop(waiting);
            let first = match first {
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no request within {} ms of opening the stream: it is closed",
                    wait.as_millis()
                ))),
                Ok(Err(status)) => Err(status),
                Ok(Ok(None)) => return,
                Ok(Ok(Some(first))) => Ok(first),
            };
            let seat = first.and_then(|first| {
                let place = sessions.slots.take(peer).map_err(|f| sessions.refusal(f))?;
                Ok((first, Seat::new(sessions.clone(), place)))
            });
            let (id, result) = match seat {
                Ok((first, seat)) => {
                    let mut kind = K::open(shared, seat.id);
                    let result = seat.run(&mut kind, first, inbound, &tx).await;
                    // The session's state (its share of the budgets) goes before its slot.
                    drop(kind);
                    (Some(seat.id), result)
                }
                Err(status) => (None, Err(status)),
            };
            if let Err(status) = result {
                let status = bounded(status);
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

/// Longest status message a session ends with, in bytes: messages may quote what a client
/// sent, and neither the reply nor the log repeats more than this of it.
pub(crate) const MAX_STATUS_BYTES: usize = 512;

/// `status` with its message cut to [`MAX_STATUS_BYTES`] (at a character boundary, marked
/// with `…`).
fn bounded(status: Status) -> Status {
    let message = status.message();
    if message.len() <= MAX_STATUS_BYTES {
        return status;
    }
    let mut end = MAX_STATUS_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Status::new(status.code(), format!("{}…", &message[..end]))
}

/// One admitted session's place: its id and its slot, given back on drop.
struct Seat {
    sessions: Arc<Sessions>,
    _place: PeerHold,
    id: u64,
}

impl Seat {
    fn new(sessions: Arc<Sessions>, place: PeerHold) -> Self {
        let id = sessions.next_id.fetch_add(1, Ordering::SeqCst);
        Self {
            sessions,
            _place: place,
            id,
        }
    }

    /// Serves the stream, starting with its `first` request, until the device closes it (`Ok`)
    /// or a request fails (`Err`).
    async fn run<K: SessionKind>(
        &self,
        kind: &mut K,
        first: RequestOf<K::Shared>,
        mut inbound: Streaming<RequestOf<K::Shared>>,
        tx: &mpsc::Sender<Result<ReplyOf<K::Shared>, Status>>,
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
        let mut next = Some(first);
        loop {
            let request = match next.take() {
                Some(request) => request,
                None => match tokio::time::timeout(idle, inbound.message()).await {
                    Err(_) => return Err(closed("was idle")),
                    Ok(Err(status)) => return Err(status),
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(request))) => request,
                },
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
        tracing::debug!(
            session = self.id,
            kind = self.sessions.names.one,
            "session closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_status_messages_are_cut_at_a_character_boundary() {
        let long = Status::invalid_argument("é".repeat(400));
        let cut = bounded(long);
        assert_eq!(cut.code(), tonic::Code::InvalidArgument);
        assert_eq!(cut.message(), format!("{}…", "é".repeat(256)));
        let short = bounded(Status::internal("short"));
        assert_eq!(short.message(), "short");
    }
}
