//! The one `serve()` setup of every model kind's service: bearer-token check, health service,
//! HTTP/2 keepalive, TLS 1.3 (or plaintext) and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use lsplit_proto::error_chain;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::auth::TokenCheck;
use crate::{ServerError, TlsFiles, tls};

/// Serves `service` (a generated gRPC server, its message limits set) on `listener` until
/// `shutdown` completes, then stops accepting, lets open requests finish and returns. With
/// `token`, every request must carry it as a bearer token; with `tls`, only TLS 1.3
/// handshakes are accepted.
///
/// The standard gRPC health service (`grpc.health.v1.Health`) answers for the service without
/// a token, so load balancers can probe it; it turns `NOT_SERVING` as soon as shutdown begins.
pub(crate) async fn serve_service<S>(
    service: S,
    token: Option<String>,
    tls: Option<&TlsFiles>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let name = S::NAME;
    let service = InterceptedService::new(service, TokenCheck::new(token));
    let (reporter, health) = tonic_health::server::health_reporter();
    let routes = Routes::new(health).add_service(service);
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let tls = tls.map(tls::server_config).transpose()?;
    reporter
        .set_service_status(name, tonic_health::ServingStatus::Serving)
        .await;
    let shutdown = async move {
        shutdown.await;
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    };
    tracing::info!(addr = ?local, tls = tls.is_some(), service = name, "serving");
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes);
    let served = match tls {
        Some(config) => {
            router
                .serve_with_incoming_shutdown(tls::TlsIncoming::new(listener, config), shutdown)
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    served.map_err(|e| ServerError::Transport(error_chain(&e)))
}
