//! The server handle of every model kind, and its one `serve()` setup: bearer-token check,
//! health service, HTTP/2 keepalive, TLS 1.3 (or plaintext) and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lsplit_proto::error_chain;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server as Transport;
use tonic_health::server::HealthReporter;

use crate::auth::TokenCheck;
use crate::grpc::{GrpcServer, Served};
use crate::health::BoundedHealth;
use crate::incoming::{self, Incoming, SharedListener};
use crate::{Access, ServerError, ServerStats, TlsFiles, TransportLimits, tls};

/// A trunk server of one model kind, ready to serve: [`crate::TrunkServer`] (`L` is
/// [`crate::Limits`]) or [`crate::DiffusionServer`] (`L` is [`crate::DiffusionLimits`]).
pub struct Server<L> {
    limits: L,
    stats: ServerStats,
    endpoint: Endpoint,
}

impl<L> Server<L> {
    /// A server with `limits` in force, counting in `stats`, answering on `endpoint`.
    pub(crate) fn with(limits: L, stats: ServerStats, endpoint: Endpoint) -> Self {
        Self {
            limits,
            stats,
            endpoint,
        }
    }

    /// Its limits, counters and endpoint, to build on.
    pub(crate) fn into_parts(self) -> (L, ServerStats, Endpoint) {
        (self.limits, self.stats, self.endpoint)
    }

    /// Counters that stay readable while the server runs.
    pub fn stats(&self) -> ServerStats {
        self.stats.clone()
    }

    /// The limits in force.
    pub fn limits(&self) -> &L {
        &self.limits
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, lets open
    /// requests finish and returns. With TLS, only TLS 1.3 handshakes are accepted.
    ///
    /// The standard gRPC health service (`grpc.health.v1.Health`) answers for the trunk
    /// service without a token, so load balancers can probe it; it turns `NOT_SERVING` as
    /// soon as shutdown begins.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        self.serve_draining(listener, shutdown, Duration::ZERO)
            .await
    }

    /// [`Server::serve`], but when `shutdown` completes health turns `NOT_SERVING` for `drain`
    /// while the server still accepts sessions (`lsplit serve --drain-secs`), so that a load
    /// balancer moves new sessions elsewhere before this one stops accepting.
    pub async fn serve_draining(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
        drain: Duration,
    ) -> Result<(), ServerError> {
        self.endpoint.serve(listener, shutdown, drain).await
    }
}

/// A model kind's gRPC service behind the token check, with the health service beside it.
pub(crate) struct Endpoint {
    routes: Routes,
    reporter: HealthReporter,
    name: &'static str,
    /// The bearer token every service of the endpoint requires.
    token: Option<String>,
    tls: Option<TlsFiles>,
    transport: TransportLimits,
    /// Completes, with the reason, if the server can no longer serve (its worker died).
    fatal: Option<Fatal>,
}

/// A future that completes if the server can no longer serve, with the reason.
pub(crate) type Fatal = std::pin::Pin<Box<dyn Future<Output = String> + Send>>;

impl Endpoint {
    /// A model kind's `service`, served as `access` says: its bearer token required when
    /// given, over its TLS (plaintext when `None`), within its transport caps.
    pub(crate) fn new<S: Served>(service: GrpcServer<S>, access: Access) -> Self {
        let Access {
            token,
            tls,
            transport,
        } = access;
        let service = InterceptedService::new(service, TokenCheck::new(token.clone()));
        let reporter = HealthReporter::new();
        let health = BoundedHealth::server(reporter.clone(), transport.max_health_watches);
        Self {
            routes: Routes::new(health).add_service(service),
            reporter,
            name: GrpcServer::<S>::NAME,
            token,
            tls,
            transport,
            fatal: None,
        }
    }

    /// The endpoint serving `service` too, behind the same token, TLS and transport caps.
    pub(crate) fn also<S: Served>(mut self, service: GrpcServer<S>) -> Self {
        let service = InterceptedService::new(service, TokenCheck::new(self.token.clone()));
        self.routes = self.routes.add_service(service);
        self
    }

    /// The transport caps it serves within.
    pub(crate) fn transport(&self) -> &TransportLimits {
        &self.transport
    }

    /// Ends serving with an error, health turned `NOT_SERVING`, when `fatal` completes.
    pub(crate) fn failing_on(
        mut self,
        fatal: impl Future<Output = String> + Send + 'static,
    ) -> Self {
        self.fatal = Some(Box::pin(fatal));
        self
    }

    async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
        drain: Duration,
    ) -> Result<(), ServerError> {
        let Self {
            routes,
            reporter,
            name,
            token: _,
            tls,
            transport,
            fatal,
        } = self;
        let local: Option<SocketAddr> = listener.local_addr().ok();
        let tls = tls.as_ref().map(tls::server_config).transpose()?;
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
        let failed = reporter.clone();
        let listener: SharedListener = Arc::new(Mutex::new(Some(listener)));
        let closing = listener.clone();
        let shutdown = async move {
            shutdown.await;
            reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
            if !drain.is_zero() {
                tracing::info!(
                    seconds = drain.as_secs_f64(),
                    "draining: health says NOT_SERVING, sessions still accepted"
                );
                tokio::time::sleep(drain).await;
            }
            // New connections are refused from here on; open sessions finish.
            drop(incoming::lock(&closing).take());
            tracing::info!("stopped accepting: the listening socket is closed");
        };
        let fatal = async move {
            let reason = match fatal {
                Some(fatal) => fatal.await,
                None => std::future::pending().await,
            };
            failed
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
            tracing::error!(%reason, "the server cannot serve any more");
            reason
        };
        tracing::info!(addr = ?local, tls = tls.is_some(), service = name, "serving");
        let served = Transport::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(transport.max_streams_per_connection)
            .http2_max_local_error_reset_streams(Some(transport.max_local_error_resets))
            .add_routes(routes)
            .serve_with_incoming_shutdown(Incoming::new(listener, tls, &transport), shutdown);
        let served = tokio::select! {
            served = served => served,
            reason = fatal => return Err(ServerError::Failed(reason)),
        };
        served.map_err(|e| ServerError::Transport(error_chain(&e)))
    }
}
