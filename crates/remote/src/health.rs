//! The standard gRPC health check (`grpc.health.v1.Health/Check`) of a trunk server, over the
//! channel a device opens (TLS 1.3, or plaintext when allowed): `lsplit health` runs it for
//! container health checks and Kubernetes probes, whose own gRPC probes speak no TLS.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub use tonic_health::pb::health_check_response::ServingStatus;

use crate::channel::{bearer, connect};
use crate::error::refused;
use crate::{RemoteError, RemoteOptions};

/// What the server `options` names reports for `service` (`""`: the server as a whole), asked
/// once; the answer must come within `options.step_timeout`.
pub fn check_health(options: &RemoteOptions, service: &str) -> Result<ServingStatus, RemoteError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Config(format!("starting the network runtime: {e}")))?;
    runtime.block_on(async {
        let (channel, _) = connect(options).await?;
        let mut client = HealthClient::with_interceptor(channel, bearer(options)?);
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let answer = tokio::time::timeout(options.step_timeout, client.check(request))
            .await
            .map_err(|_| RemoteError::Timeout(options.step_timeout))?
            .map_err(refused)?;
        let status = answer.into_inner().status;
        ServingStatus::try_from(status)
            .map_err(|_| RemoteError::Protocol(format!("unknown health status {status}")))
    })
}

/// The service name a language model's trunk server reports on.
pub const TRUNK_SERVICE: &str = <lsplit_proto::pb::Trunk as lsplit_proto::Service>::NAME;
