//! The one gRPC service every model kind is served through: it routes a [`Service`]'s
//! `Handshake` to the kind's [`Served::welcome`] and its session stream to the session loop,
//! with the server's message-size limit both ways.
//!
//! tonic generates one server type per .proto service, identical but for its paths and message
//! types; [`Service`] (generated from the .proto by lsplit-proto) names those, so one generic
//! type serves both kinds, as lsplit-remote's one generic client calls them.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use lsplit_proto::Service;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::session_loop::{ReplyStream, SessionKind, Sessions};

/// The handshake's request of `S`'s service.
pub(crate) type Hello<S> = <<S as Served>::Service as Service>::Hello;
/// The handshake's reply of `S`'s service.
pub(crate) type Welcome<S> = <<S as Served>::Service as Service>::Welcome;
/// A session request of `S`'s service.
pub(crate) type RequestOf<S> = <<S as Served>::Service as Service>::Request;
/// A session reply of `S`'s service.
pub(crate) type ReplyOf<S> = <<S as Served>::Service as Service>::Reply;

/// A model kind as served: what its sessions share, answering the handshake.
pub(crate) trait Served: Send + Sync + Sized + 'static {
    /// The kind's gRPC service.
    type Service: Service;
    /// One session stream of the kind.
    type Session: SessionKind<Shared = Self>;

    /// The handshake's reply to `hello`: the agreed version and codec, the trunk's
    /// fingerprint and the server's limits, or why this device cannot be served.
    fn welcome(&self, hello: Hello<Self>) -> Result<Welcome<Self>, Status>;
}

/// The gRPC service of the model kind `S`.
pub(crate) struct GrpcServer<S> {
    shared: Arc<S>,
    sessions: Arc<Sessions>,
    max_message_bytes: usize,
}

impl<S> Clone for GrpcServer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            sessions: self.sessions.clone(),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<S: Served> GrpcServer<S> {
    /// Serves `shared`'s kind, admitting sessions through `sessions`, refusing messages
    /// larger than `max_message_bytes` either way.
    pub(crate) fn new(shared: Arc<S>, sessions: Arc<Sessions>, max_message_bytes: usize) -> Self {
        Self {
            shared,
            sessions,
            max_message_bytes,
        }
    }

    /// tonic's call machinery with the message-size limit both ways.
    fn grpc<Q: prost::Message + Default + Send + 'static, R: prost::Message + Send + 'static>(
        &self,
    ) -> Grpc<ProstCodec<R, Q>> {
        let limit = Some(self.max_message_bytes);
        Grpc::new(ProstCodec::default()).apply_max_message_size_config(limit, limit)
    }
}

impl<S: Served> NamedService for GrpcServer<S> {
    const NAME: &'static str = S::Service::NAME;
}

/// The handshake call.
struct Handshake<S>(Arc<S>);

impl<S: Served> UnaryService<Hello<S>> for Handshake<S> {
    type Response = Welcome<S>;
    type Future = BoxFuture<Response<Welcome<S>>, Status>;

    fn call(&mut self, request: Request<Hello<S>>) -> Self::Future {
        let reply = self.0.welcome(request.into_inner()).map(Response::new);
        Box::pin(std::future::ready(reply))
    }
}

/// The session stream call.
struct Session<S>(GrpcServer<S>);

impl<S: Served> StreamingService<RequestOf<S>> for Session<S> {
    type Response = ReplyOf<S>;
    type ResponseStream = ReplyStream<ReplyOf<S>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<RequestOf<S>>>) -> Self::Future {
        let GrpcServer {
            shared, sessions, ..
        } = &self.0;
        let stream = sessions.serve::<S::Session>(request, shared);
        Box::pin(std::future::ready(stream))
    }
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for GrpcServer<S>
where
    S: Served,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|path| path.strip_prefix(S::Service::NAME))
            .and_then(|path| path.strip_prefix('/'));
        match method {
            Some("Handshake") => {
                let (mut grpc, call) = (self.grpc(), Handshake(self.shared.clone()));
                Box::pin(async move { Ok(grpc.unary(call, request).await) })
            }
            Some(method) if method == S::Service::SESSION => {
                let (mut grpc, call) = (self.grpc(), Session(self.clone()));
                Box::pin(async move { Ok(grpc.streaming(call, request).await) })
            }
            _ => {
                let status = Status::unimplemented(format!(
                    "{} has no method {}",
                    S::Service::NAME,
                    request.uri().path()
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
