//! The standard `grpc.health.v1.Health` service, so load balancers,
//! Kubernetes gRPC probes and `grpc-health-probe` can see whether the
//! server takes traffic.
//!
//! tonic-health keeps the statuses; this wrapper adds one thing: a `Watch`
//! stream ends once the server shuts down (after telling the watcher
//! NOT_SERVING). tonic's graceful shutdown waits for every open call, and a
//! watch never ends on its own, so a connected watcher would otherwise hold
//! shutdown up for the whole grace period.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{health_check_response, HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// The service names the server reports: the whole server (`""`), each
/// of its own services, and [`WRITES`].
pub const SERVICES: [&str; 4] = [
    "",
    "pullstream.v1.EventLog",
    "pullstream.v1.ApiKeys",
    WRITES,
];

/// NOT_SERVING while appends and stream creation are refused (the disk is
/// below the free-space floor, or storage failed) though reads still work:
/// the degraded state, for probes that route writes.
pub const WRITES: &str = "pullstream.writes";

/// The health service with its reporter.
#[derive(Clone)]
pub struct HealthCheck {
    reporter: HealthReporter,
    shutdown: CancellationToken,
}

impl HealthCheck {
    /// Statuses start as SERVING (storage is open by the time the server
    /// serves). Watches end when `shutdown` is cancelled.
    pub async fn new(shutdown: CancellationToken) -> HealthCheck {
        let reporter = HealthReporter::new();
        for service in SERVICES {
            reporter
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        HealthCheck { reporter, shutdown }
    }

    /// Reports whether writes are accepted (see [`WRITES`]).
    pub async fn set_writes(&self, accepted: bool) {
        let status = if accepted {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(WRITES, status).await;
    }

    /// Reports NOT_SERVING for every service (call as shutdown begins).
    pub async fn not_serving(&self) {
        for service in SERVICES {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }

    /// The gRPC service.
    pub fn service(&self) -> HealthServer<Watched> {
        HealthServer::new(Watched {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            shutdown: self.shutdown.clone(),
        })
    }
}

/// tonic-health's service, with watches that end on shutdown.
pub struct Watched {
    inner: HealthService,
    shutdown: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Watched {
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
    ) -> Result<Response<WatchStream>, Status> {
        let mut updates = self.inner.watch(request).await?.into_inner();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // Forwards status changes until shutdown, then says NOT_SERVING and
        // ends; ends early when the watcher goes away.
        tokio::spawn(async move {
            loop {
                let update = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => return,
                    update = updates.next() => update,
                };
                let Some(update) = update else { return };
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            let last = HealthCheckResponse {
                status: health_check_response::ServingStatus::NotServing as i32,
            };
            let _ = tx.send(Ok(last)).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}
