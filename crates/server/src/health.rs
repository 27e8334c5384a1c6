//! The standard gRPC health service, with its `Watch` streams bounded: they need no token, and
//! each one is held open for as long as the client likes.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// tonic's health service, answering at most `max_watches` `Watch` streams at once.
pub(crate) struct BoundedHealth {
    inner: HealthService,
    watches: Arc<Semaphore>,
    max_watches: usize,
}

impl BoundedHealth {
    /// The health service of `reporter`'s statuses, as a gRPC service.
    pub(crate) fn server(reporter: HealthReporter, max_watches: usize) -> HealthServer<Self> {
        HealthServer::new(Self {
            inner: HealthService::from_health_reporter(reporter),
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
        })
    }
}

/// A `Watch` stream holding its place until the client drops it.
type WatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Health for BoundedHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let permit: OwnedSemaphorePermit =
            self.watches.clone().try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(format!(
                    "the server already answers its limit of {} health watches",
                    self.max_watches
                ))
            })?;
        let stream = self.inner.watch(request).await?.into_inner();
        let held = stream.map(move |item| {
            let _held = &permit;
            item
        });
        Ok(Response::new(Box::pin(held)))
    }
}
