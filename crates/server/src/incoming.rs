//! The connections the server accepts: at most so many at once and from one peer address, TLS
//! handshakes bounded in number and in time, and a growing pause after an accept error (such
//! as running out of file descriptors) instead of a busy loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::TransportLimits;
use crate::peers::{PeerCounts, PeerHold};
use crate::tls::version_name;

/// A TLS handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first pause after an accept error; it doubles with each error in a row.
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause after accept errors.
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Byte streams a [`Connection`] may carry: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted connection (its TLS handshake done when TLS is on), holding its place among the
/// server's connections until it closes.
pub(crate) struct Connection {
    io: Box<dyn Io>,
    info: TcpConnectInfo,
    _place: PeerHold,
}

/// The listening socket, shared with the server's shutdown so that it can close it (`None`)
/// when the server stops accepting: a connection then meets a refusal, which a load balancer
/// retries elsewhere, instead of a handshake nobody answers.
pub(crate) type SharedListener = Arc<Mutex<Option<TcpListener>>>;

/// The shared listener, its lock never poisoned (it only holds the socket).
pub(crate) fn lock(listener: &SharedListener) -> MutexGuard<'_, Option<TcpListener>> {
    listener.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connections accepted on a listener, within [`TransportLimits`].
///
/// Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent
/// client never holds up the next one; while `max_tls_handshakes` are in flight, no more
/// connections are accepted (the kernel's backlog holds them). A connection past the caps is
/// closed at once; a failed handshake (a client offering only TLS 1.2, a client certificate
/// from the wrong CA, plaintext) is logged and skipped.
pub(crate) struct Incoming {
    listener: SharedListener,
    tls: Option<TlsAcceptor>,
    places: Arc<PeerCounts>,
    max_handshakes: usize,
    handshakes: JoinSet<Option<Connection>>,
    /// Set after an accept error: no accepting until it elapses.
    pause: Option<Pin<Box<Sleep>>>,
    /// The pause after the next accept error.
    backoff: AcceptBackoff,
}

/// The pause after an accept error (EMFILE and the like), doubling from
/// [`FIRST_ACCEPT_PAUSE`] to [`MAX_ACCEPT_PAUSE`] while errors repeat, so that a listener out
/// of file descriptors does not spin.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            next: FIRST_ACCEPT_PAUSE,
        }
    }
}

impl AcceptBackoff {
    /// An accept succeeded: the next error pauses briefly again.
    pub(crate) fn reset(&mut self) {
        self.next = FIRST_ACCEPT_PAUSE;
    }

    /// An accept failed: how long to pause before the next.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(MAX_ACCEPT_PAUSE);
        wait
    }
}

impl Incoming {
    /// Connections on `listener`, over TLS with `tls` (plaintext when `None`), within `limits`.
    pub(crate) fn new(
        listener: SharedListener,
        tls: Option<Arc<ServerConfig>>,
        limits: &TransportLimits,
    ) -> Self {
        Self {
            listener,
            tls: tls.map(TlsAcceptor::from),
            places: PeerCounts::new(limits.max_connections, limits.max_connections_per_peer),
            max_handshakes: limits.max_tls_handshakes.max(1),
            handshakes: JoinSet::new(),
            pause: None,
            backoff: AcceptBackoff::default(),
        }
    }

    /// Gives `stream` its place, or closes it when the peer or the server has none left.
    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, PeerHold)> {
        match self.places.take(Some(peer.ip())) {
            Ok(place) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                Some((stream, place))
            }
            Err(full) => {
                tracing::info!(%peer, ?full, "refused a connection past the connection limits");
                None
            }
        }
    }

    fn start_handshake(&mut self, acceptor: TlsAcceptor, stream: TcpStream, place: PeerHold) {
        let info = stream.connect_info();
        let accept = acceptor.accept(stream);
        self.handshakes.spawn(async move {
            let peer = info.remote_addr;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(stream)) => {
                    let version = version_name(stream.get_ref().1.protocol_version());
                    tracing::debug!(?peer, %version, "TLS handshake done");
                    Some(Connection {
                        io: Box::new(stream),
                        info,
                        _place: place,
                    })
                }
                Ok(Err(e)) => {
                    tracing::info!(?peer, error = %e, "refused a TLS handshake");
                    None
                }
                Err(_) => {
                    tracing::info!(?peer, "no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                    None
                }
            }
        });
    }

    /// Accepts what the listener has, within the caps: a plaintext connection is returned at
    /// once, a TLS one starts its handshake.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Connection> {
        if let Some(pause) = &mut self.pause {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        while self.handshakes.len() < self.max_handshakes {
            let accepted = match &*lock(&self.listener) {
                Some(listener) => listener.poll_accept(cx),
                None => return Poll::Pending,
            };
            match accepted {
                Poll::Ready(Ok((stream, peer))) => {
                    self.backoff.reset();
                    let Some((stream, place)) = self.admit(stream, peer) else {
                        continue;
                    };
                    match self.tls.clone() {
                        Some(acceptor) => self.start_handshake(acceptor, stream, place),
                        None => {
                            let info = stream.connect_info();
                            return Poll::Ready(Connection {
                                io: Box::new(stream),
                                info,
                                _place: place,
                            });
                        }
                    }
                }
                Poll::Ready(Err(e)) => {
                    let wait = self.backoff.failed();
                    tracing::warn!(error = %e, pause = ?wait, "accepting a connection failed");
                    let mut pause = Box::pin(tokio::time::sleep(wait));
                    // Registers the waker; a fresh sleep of a positive duration is pending.
                    let _ = pause.as_mut().poll(cx);
                    self.pause = Some(pause);
                    return Poll::Pending;
                }
                Poll::Pending => break,
            }
        }
        Poll::Pending
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(connection) = this.poll_accept(cx) {
                return Poll::Ready(Some(Ok(connection)));
            }
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(connection)))) => {
                    return Poll::Ready(Some(Ok(connection)));
                }
                // A failed handshake frees its place: accept again.
                Poll::Ready(Some(Ok(None))) => {}
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "a TLS handshake task failed");
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}
