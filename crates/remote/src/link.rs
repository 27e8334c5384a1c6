//! The reconnecting client every model kind's remote trunk is built on.
//!
//! A [`Link`] owns a small tokio runtime and blocks at its boundary, so the device's loops stay
//! synchronous. It connects and runs the handshake, opens the session's stream with the
//! session's opening request, and sends requests one at a time. When the link fails it
//! reconnects with jittered backoff, checks that the server came back with the same trunk and
//! codec, opens a new stream and replays the session's kept requests before sending the
//! pending one, within [`RemoteOptions::retry_for`].
//!
//! A model kind supplies only a [`Protocol`]: its gRPC service (whose paths and messages
//! lsplit-proto generates from the .proto), its handshake's offer and terms, and how its
//! replies name a session and answer a replayed request. Both kinds are called through one
//! generic gRPC client, [`Client`].

use std::fmt::Display;
use std::time::{Duration, Instant};

use lsplit_proto::Service;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::backoff::Backoff;
use crate::channel::{Bearer, bearer, connect, connect_failure, status_chain};
use crate::error::{at_capacity, refused, retryable};
use crate::{RemoteError, RemoteOptions};

/// The channel every call goes over: the bearer token on every request.
pub(crate) type BearerChannel = InterceptedService<Channel, Bearer>;

/// The gRPC client of every protocol: the generated clients differ only in their paths and
/// message types, which a [`Protocol`] names, so one generic client serves both kinds.
type Client = Grpc<BearerChannel>;

/// The handshake's request of `P`'s service.
pub(crate) type Hello<P> = <<P as Protocol>::Service as Service>::Hello;
/// The handshake's reply of `P`'s service.
pub(crate) type Welcome<P> = <<P as Protocol>::Service as Service>::Welcome;
/// A session request of `P`'s service; a kept one is sent again on a new stream.
pub(crate) type RequestOf<P> = <<P as Protocol>::Service as Service>::Request;
/// A session reply of `P`'s service.
pub(crate) type ReplyOf<P> = <<P as Protocol>::Service as Service>::Reply;

/// How a protocol is named in messages, and the version of it this build speaks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire {
    /// The protocol in messages: `trunk`, `diffusion`.
    name: &'static str,
    /// The protocol version this build speaks.
    version: u32,
}

impl Wire {
    pub(crate) const fn new(name: &'static str, version: u32) -> Self {
        Self { name, version }
    }
}

/// The gRPC path of `P`'s `method`.
fn path<P: Protocol>(method: &str) -> Result<PathAndQuery, RemoteError> {
    PathAndQuery::try_from(format!("/{}/{method}", P::Service::NAME))
        .map_err(|e| RemoteError::Config(format!("the gRPC path of {method}: {e}")))
}

/// `P`'s session stream in messages: `session stream`, `image stream`.
fn stream_name<P: Protocol>() -> String {
    format!("{} stream", P::Service::SESSION.to_lowercase())
}

/// A model kind's protocol offering the codecs of type `C`, most preferred first.
#[derive(Debug)]
pub(crate) struct Offering<C> {
    pub(crate) codecs: Vec<C>,
}

/// One model kind's protocol, as the client speaks it.
pub(crate) trait Protocol {
    /// The gRPC service: its paths and messages.
    type Service: Service;
    /// What the handshake agrees: a [`ServerTerms`].
    type Terms: Agreed + std::fmt::Debug;
    /// The protocol's name and version.
    const WIRE: Wire;

    /// The handshake request offering this device's codecs.
    fn hello(&self) -> Hello<Self>;
    /// The terms of the server's handshake reply (of this build's version) over a connection
    /// of `tls`, or what makes it unusable.
    fn agreed(
        &self,
        welcome: Welcome<Self>,
        tls: Option<String>,
    ) -> Result<Self::Terms, RemoteError>;
    /// The session id when `reply` accepts the opening request; `None` for any other reply.
    fn session_id(reply: &ReplyOf<Self>) -> Option<u64>;
    /// Whether `reply` is the answer to the replayed request `sent`.
    fn answers(sent: &RequestOf<Self>, reply: &ReplyOf<Self>) -> bool;
}

/// What the handshake told the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTerms<F, C, L> {
    /// The trunk the server runs.
    pub fingerprint: F,
    /// The codec agreed for everything this device sends and receives.
    pub codec: C,
    /// The server's limits.
    pub limits: L,
    /// The TLS version of the connection (always `TLS 1.3`); `None` over plaintext.
    pub tls_version: Option<String>,
}

impl<F, C, L> ServerTerms<F, C, L> {
    /// The terms of a handshake reply of the trunk `fingerprint`, choosing `codec`, with the
    /// server's `limits` (a reply without them is refused).
    pub(crate) fn new(
        fingerprint: F,
        codec: C,
        limits: Option<L>,
        tls_version: Option<String>,
    ) -> Result<Self, RemoteError> {
        let limits =
            limits.ok_or_else(|| RemoteError::Protocol("the limits field is missing".into()))?;
        Ok(Self {
            fingerprint,
            codec,
            limits,
            tls_version,
        })
    }
}

/// Terms logged on connecting and compared when the server comes back after a failure.
pub(crate) trait Agreed {
    /// The trunk, codec and TLS version, for the log.
    fn summary(&self) -> String;
    /// How these terms differ from `before` in trunk or codec, if they do.
    fn changed_from(&self, before: &Self) -> Option<String>;
    /// The size of message the device holds both directions to: what the server announced,
    /// within [`MAX_MESSAGE_BYTES`].
    fn message_limit(&self) -> usize;
}

/// What the device reads of a server's announced limits.
pub(crate) trait Announced {
    /// What of them a session depends on, for messages: a server that comes back with another
    /// is refused, as one with another trunk is. `None` when nothing binds a session.
    fn binding(&self) -> Option<String>;
    /// The largest message the server sends or accepts.
    fn max_message_bytes(&self) -> u64;
}

impl<F: PartialEq + Display, C: PartialEq + Display, L: Announced> Agreed for ServerTerms<F, C, L> {
    fn message_limit(&self) -> usize {
        self.limits.max_message_bytes().min(MAX_MESSAGE_BYTES) as usize
    }

    fn summary(&self) -> String {
        let tls = self.tls_version.as_deref().unwrap_or("no TLS");
        format!("{}, codec {}, {tls}", self.fingerprint, self.codec)
    }

    fn changed_from(&self, before: &Self) -> Option<String> {
        if self.fingerprint != before.fingerprint || self.codec != before.codec {
            return Some(format!(
                "the server came back with {} and codec {}, not {} and codec {}",
                self.fingerprint, self.codec, before.fingerprint, before.codec
            ));
        }
        let (now, then) = (self.limits.binding(), before.limits.binding());
        (now != then).then(|| {
            format!(
                "the server came back with {}, not {}: the session's replay would compute \
                 other text",
                now.unwrap_or_default(),
                then.unwrap_or_default()
            )
        })
    }
}

/// Refuses a handshake answer in another version of `P` than this build's.
fn check_version<P: Protocol>(version: u32) -> Result<(), RemoteError> {
    let wire = P::WIRE;
    if version == wire.version {
        Ok(())
    } else {
        Err(RemoteError::Protocol(format!(
            "the server speaks {} protocol version {version} but this device speaks {}",
            wire.name, wire.version
        )))
    }
}

/// Largest handshake reply a device decodes (a real one is a few hundred bytes).
const MAX_HANDSHAKE_REPLY_BYTES: usize = 64 << 10;

/// Largest message a device sends or decodes, whatever a server announces.
const MAX_MESSAGE_BYTES: u64 = 256 << 20;

/// How long closing a stream waits for the server to finish it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// An open session stream.
struct Stream<P: Protocol> {
    id: u64,
    requests: mpsc::Sender<RequestOf<P>>,
    replies: Streaming<ReplyOf<P>>,
}

impl<P: Protocol> Stream<P> {
    /// Ends the stream cleanly: the server sees the end of the session, not a broken
    /// connection.
    async fn close(mut self) {
        drop(self.requests);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.replies.message()).await;
    }
}

/// A reconnecting session with a server speaking `P`.
pub(crate) struct Link<P: Protocol> {
    runtime: tokio::runtime::Runtime,
    options: RemoteOptions,
    bearer: Bearer,
    protocol: P,
    client: Client,
    terms: P::Terms,
    stream: Option<Stream<P>>,
    /// The request that opens every stream of this session.
    opening: Option<RequestOf<P>>,
    /// The session's requests so far that a new stream must see again.
    kept: Vec<RequestOf<P>>,
    /// Whether the link failed since the last handshake.
    lost: bool,
}

/// The server's address and terms: what a remote trunk shows of itself.
impl<P: Protocol> std::fmt::Debug for Link<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.url())
            .field("terms", &self.terms)
            .finish()
    }
}

impl<P: Protocol> Link<P> {
    /// Connects with `options` and runs `protocol`'s handshake; opens no session yet.
    pub(crate) fn connect(options: RemoteOptions, protocol: P) -> Result<Self, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lsplit-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Config(format!("starting the network runtime: {e}")))?;
        let bearer = bearer(&options)?;
        let (client, terms) = runtime.block_on(handshake(&protocol, &options, &bearer))?;
        tracing::info!(
            url = %options.url,
            protocol = P::WIRE.name,
            server = %terms.summary(),
            "connected to the trunk server"
        );
        Ok(Self {
            runtime,
            options,
            bearer,
            protocol,
            client,
            terms,
            stream: None,
            opening: None,
            kept: Vec::new(),
            lost: false,
        })
    }

    /// What the handshake told.
    pub(crate) fn terms(&self) -> &P::Terms {
        &self.terms
    }

    /// The server's address.
    pub(crate) fn url(&self) -> &str {
        &self.options.url
    }

    /// Whether a session was begun.
    pub(crate) fn begun(&self) -> bool {
        self.opening.is_some()
    }

    /// Starts a new session whose streams open with `opening`, closing the current one.
    pub(crate) fn begin(&mut self, opening: RequestOf<P>) {
        self.close();
        self.opening = Some(opening);
        self.kept.clear();
    }

    /// Stops replaying the session's kept requests on later streams (a training session keeps
    /// only its latest forward pass).
    pub(crate) fn forget(&mut self) {
        self.kept.clear();
    }

    /// Opens the session's stream now, unless one is open.
    pub(crate) fn open(&mut self) -> Result<(), RemoteError> {
        self.retrying(None).map(|_| ())
    }

    /// Sends `request` and returns its reply; a `kept` request is sent again on every later
    /// stream of the session, before anything new.
    pub(crate) fn call(
        &mut self,
        request: RequestOf<P>,
        kept: bool,
    ) -> Result<ReplyOf<P>, RemoteError> {
        let reply = self
            .retrying(Some(&request))?
            .ok_or_else(|| RemoteError::Protocol("nothing was sent".into()))?;
        if kept {
            self.kept.push(request);
        }
        Ok(reply)
    }

    /// Closes the session's stream, if one is open. Dropped inside another runtime, where it
    /// cannot block, the stream is dropped instead (the server sees a broken stream).
    fn close(&mut self) {
        let stream = self.stream.take();
        if let Some(stream) = stream.filter(|_| tokio::runtime::Handle::try_current().is_err()) {
            self.runtime.block_on(stream.close());
        }
    }

    /// Runs [`Self::attempt`] until it succeeds, fails for good, or the retry bound passes.
    fn retrying(
        &mut self,
        request: Option<&RequestOf<P>>,
    ) -> Result<Option<ReplyOf<P>>, RemoteError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Backoff::new();
        loop {
            let runtime = self.runtime.handle().clone();
            // A session rebuilt after a failure may be refused for capacity while the server
            // still holds the broken stream's slot: that passes, so it is retried too.
            let rebuilding = self.lost && !self.kept.is_empty();
            match runtime.block_on(self.attempt(request)) {
                Ok(reply) => return Ok(reply),
                Err(e) if retryable(&e) || (rebuilding && at_capacity(&e)) => {
                    self.stream = None;
                    self.lost = true;
                    attempts += 1;
                    let waited = started.elapsed();
                    let wait = backoff.next_wait();
                    if waited + wait > self.options.retry_for {
                        return Err(RemoteError::GaveUp {
                            url: self.options.url.clone(),
                            waited,
                            attempts,
                            last: e.to_string(),
                        });
                    }
                    tracing::warn!(error = %e, protocol = P::WIRE.name, retry_in = ?wait, "lost the trunk server; retrying");
                    std::thread::sleep(wait);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: after a failure, a new handshake with the same terms; then a stream if
    /// none is open, with the kept requests replayed; then `request`.
    async fn attempt(
        &mut self,
        request: Option<&RequestOf<P>>,
    ) -> Result<Option<ReplyOf<P>>, RemoteError> {
        if self.lost {
            let (client, terms) = handshake(&self.protocol, &self.options, &self.bearer).await?;
            if let Some(change) = terms.changed_from(&self.terms) {
                return Err(RemoteError::Protocol(change));
            }
            self.client = client;
            self.lost = false;
        }
        let timeout = self.options.step_timeout;
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let opening = self
                    .opening
                    .clone()
                    .ok_or_else(|| RemoteError::Protocol("no session was begun".into()))?;
                let mut stream = open::<P>(&mut self.client, opening, timeout).await?;
                replay(&mut stream, &self.kept, timeout).await?;
                if self.kept.is_empty() {
                    tracing::debug!(session = stream.id, "session opened on the server");
                } else {
                    tracing::info!(
                        session = stream.id,
                        requests = self.kept.len(),
                        "session rebuilt on the server"
                    );
                }
                self.stream.insert(stream)
            }
        };
        match request {
            Some(request) => exchange(stream, request.clone(), timeout).await.map(Some),
            None => Ok(None),
        }
    }
}

impl<P: Protocol> Drop for Link<P> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connects, then runs the handshake and checks the server's answer.
async fn handshake<P: Protocol>(
    protocol: &P,
    options: &RemoteOptions,
    bearer: &Bearer,
) -> Result<(Client, P::Terms), RemoteError> {
    let (channel, tls_version) = connect(options).await?;
    let channel = InterceptedService::new(channel, bearer.clone());
    let timeout = options.connect_timeout;
    let mut client = grpc_client(channel.clone(), MAX_HANDSHAKE_REPLY_BYTES, usize::MAX);
    let path = path::<P>("Handshake")?;
    let call = async {
        ready(&mut client).await?;
        let welcome = client
            .unary(Request::new(protocol.hello()), path, ProstCodec::default())
            .await?;
        let welcome = welcome.into_inner();
        let version = check_version::<P>(P::Service::welcome_version(&welcome));
        Ok::<_, Status>(version.and_then(|()| protocol.agreed(welcome, tls_version)))
    };
    let terms = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(|status| {
            if status.code() == Code::Unavailable || status.code() == Code::Unknown {
                connect_failure(options, status_chain(&status))
            } else {
                refused(status)
            }
        })?;
    let terms = terms?;
    // From here on, both directions are held to the message limit the server announced.
    let limit = terms.message_limit();
    Ok((grpc_client(channel, limit, limit), terms))
}

/// A client over `channel`, decoding messages of at most `decode` bytes and sending at most
/// `encode`.
fn grpc_client(channel: BearerChannel, decode: usize, encode: usize) -> Client {
    Grpc::new(channel)
        .max_decoding_message_size(decode)
        .max_encoding_message_size(encode)
}

/// Waits until `client`'s channel can take a call, as the generated clients do first.
async fn ready(client: &mut Client) -> Result<(), Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("the channel is not ready: {e}")))
}

/// Opens a stream with `opening` and waits for the server to accept it.
async fn open<P: Protocol>(
    client: &mut Client,
    opening: RequestOf<P>,
    timeout: Duration,
) -> Result<Stream<P>, RemoteError> {
    let (requests, outbound) = mpsc::channel(4);
    requests
        .send(opening)
        .await
        .map_err(|_| RemoteError::Protocol(format!("the {} closed", stream_name::<P>())))?;
    let path = path::<P>(P::Service::SESSION)?;
    let call = async {
        ready(client).await?;
        let requests = Request::new(ReceiverStream::new(outbound));
        client
            .streaming(requests, path, ProstCodec::default())
            .await
    };
    let mut replies = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(refused)?
        .into_inner();
    let id = P::session_id(&next_reply::<P>(&mut replies, timeout).await?).ok_or_else(|| {
        RemoteError::Protocol(format!(
            "the server answered the opening of the {} with something other than accepting it",
            stream_name::<P>()
        ))
    })?;
    Ok(Stream {
        id,
        requests,
        replies,
    })
}

/// Sends the `kept` requests again, exactly as they were first sent, to rebuild the session's
/// state on a new stream. They are pipelined: one round trip, not one per request.
async fn replay<P: Protocol>(
    stream: &mut Stream<P>,
    kept: &[RequestOf<P>],
    timeout: Duration,
) -> Result<(), RemoteError> {
    let requests = kept.to_vec();
    let sender = stream.requests.clone();
    let feeding = tokio::spawn(async move {
        for request in requests {
            if sender.send(request).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        for (i, sent) in kept.iter().enumerate() {
            let reply = next_reply::<P>(&mut stream.replies, timeout).await?;
            if !P::answers(sent, &reply) {
                return Err(RemoteError::Protocol(format!(
                    "replaying request {i}: the server answered out of order"
                )));
            }
        }
        Ok(())
    }
    .await;
    feeding.abort();
    result
}

/// Sends `request` on an open stream and waits for the answer.
async fn exchange<P: Protocol>(
    stream: &mut Stream<P>,
    request: RequestOf<P>,
    timeout: Duration,
) -> Result<ReplyOf<P>, RemoteError> {
    if stream.requests.send(request).await.is_err() {
        return Err(RemoteError::Refused {
            code: Code::Unavailable,
            message: format!("the {} closed", stream_name::<P>()),
        });
    }
    next_reply::<P>(&mut stream.replies, timeout).await
}

/// The next reply on a stream, within `timeout`.
async fn next_reply<P: Protocol>(
    replies: &mut Streaming<ReplyOf<P>>,
    timeout: Duration,
) -> Result<ReplyOf<P>, RemoteError> {
    let reply = tokio::time::timeout(timeout, replies.message())
        .await
        .map_err(|_| RemoteError::Timeout(timeout))?
        .map_err(refused)?;
    match reply {
        Some(reply) => Ok(reply),
        None => Err(RemoteError::Refused {
            code: Code::Unavailable,
            message: format!("the server closed the {}", stream_name::<P>()),
        }),
    }
}
