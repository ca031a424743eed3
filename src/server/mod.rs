//! The server: opens the log, serves gRPC on a listener the caller bound,
//! and shuts down gracefully.
//!
//! The caller binds (tests pass `127.0.0.1:0`), so nothing here races for
//! ports. Besides the pullstream services it serves the standard health
//! service ([`health`]) and server reflection (`grpc.reflection.v1` and
//! `v1alpha`, for grpcurl and Postman). Shutdown order: report
//! NOT_SERVING; stop accepting; end every subscription with
//! UNAVAILABLE ("server shutting down") so clients reconnect and resume;
//! let in-flight calls finish for up to the grace period; stop the writers;
//! sync storage.

mod admission;
mod connections;
mod handshake;
mod health;
mod metrics_endpoint;
mod split;
mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tracing::{debug, info, warn};

use crate::api::{ApiKeysService, Calls, EventLogService, ServiceConfig, MAX_RESPONSE_BYTES};
use crate::auth::KeyRing;
use crate::config::{ServerConfig, REQUEST_OVERHEAD_BYTES};
use crate::error::Error;
use crate::log::{Log, LogConfig};
use crate::proto::api_keys_server::ApiKeysServer;
use crate::proto::event_log_server::EventLogServer;

/// The largest message accepted by the services that need no key (health,
/// reflection) and by key management: their requests are small.
const SMALL_REQUEST_BYTES: usize = 64 << 10;

/// An opened server, ready to serve.
pub struct Server {
    config: ServerConfig,
    log: Arc<Log>,
    keys: Arc<KeyRing>,
    tls: Option<tls::TlsAcceptor>,
    /// The metrics listener, once bound.
    metrics_listener: Option<TcpListener>,
}

impl Server {
    /// Opens storage. Fails with a clear message when the data dir is
    /// locked by another process, unreadable or corrupt.
    pub async fn open(config: ServerConfig) -> Result<Server, Error> {
        let tls = config
            .tls
            .as_ref()
            .map(|files| tls::TlsAcceptor::from_files(files, config.handshake_timeout))
            .transpose()?;
        let log = Log::open(LogConfig::from(&config)).await?;
        let keys = Arc::new(
            KeyRing::load(log.engine().clone())?
                .with_limits(config.max_subscriptions_per_key, config.key_rate_limit)
                .with_clock(config.clock.clone()),
        );
        Ok(Server {
            config,
            log,
            keys,
            tls,
            metrics_listener: None,
        })
    }

    /// Binds the metrics listener (`--metrics-listen`), if configured, and
    /// returns its address (useful with port 0). [`Server::serve`] binds it
    /// when this was not called.
    pub async fn bind_metrics(&mut self) -> Result<Option<std::net::SocketAddr>, ServeError> {
        if self.metrics_listener.is_none() {
            if let Some(address) = self.config.metrics_listen {
                let listener = TcpListener::bind(address)
                    .await
                    .map_err(|e| ServeError::MetricsListen(address, e))?;
                self.metrics_listener = Some(listener);
            }
        }
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().map_err(ServeError::Io))
            .transpose()
    }

    /// The API keys, for embedding and tests.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// The log, for embedding (e.g. the benchmark).
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down
    /// gracefully.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let metrics_address = self.bind_metrics().await?;
        let config = &self.config;
        let address = listener.local_addr().map_err(ServeError::Io)?;
        if self.keys.is_open() && !address.ip().is_loopback() {
            if !config.insecure {
                return Err(ServeError::Insecure(address));
            }
            warn!(%address, "SERVING WITHOUT AUTHENTICATION on a non-loopback address (--insecure): anyone who can reach this port can read, write and delete every stream");
        }
        let cancel = CancellationToken::new();
        let subscriptions = TaskTracker::new();
        // Request bytes held at once, server-wide: admission reserves each
        // message as it arrives, append pipelines their unacknowledged
        // batches.
        let request_budget = Arc::new(tokio::sync::Semaphore::new(
            config
                .max_request_bytes_in_flight
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let calls = Arc::new(Calls::new(
            self.log.clone(),
            self.keys.clone(),
            ServiceConfig {
                heartbeat_interval: config.heartbeat_interval,
                max_pipeline_batches: config.max_pipeline_batches,
                max_pipeline_bytes: config.max_pipeline_bytes,
                request_budget: request_budget.clone(),
            },
            cancel.clone(),
            subscriptions.clone(),
        ));
        let service = EventLogServer::new(EventLogService::new(calls.clone()))
            .max_decoding_message_size(config.max_batch_bytes + REQUEST_OVERHEAD_BYTES)
            .max_encoding_message_size(
                MAX_RESPONSE_BYTES + config.max_event_bytes + REQUEST_OVERHEAD_BYTES,
            );
        let http = crate::http::router(
            calls.clone(),
            crate::http::HttpSettings {
                max_body_bytes: 2 * config.max_batch_bytes + REQUEST_OVERHEAD_BYTES,
                body_timeout: config.request_body_timeout,
                sse_max_duration: config.sse_max_duration,
                cors_origins: config.http_cors_origins.clone(),
            },
        );
        let split =
            split::SplitLayer::new(http, crate::http::cors_layer(&config.http_cors_origins));
        let handshake_timeout = config.handshake_timeout;
        let connections = connections::ConnectionLimit::new(config.max_connections);
        let accepted = tokio_stream::StreamExt::filter_map(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            move |conn| match conn {
                Ok(tcp) => connections.admit(tcp).map(|(tcp, slot)| {
                    Ok(handshake::HandshakeDeadline::new(
                        tcp,
                        handshake_timeout,
                        slot,
                    ))
                }),
                Err(e) => Some(Err(e)),
            },
        );
        let tls_enabled = self.tls.is_some();
        let incoming: std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = std::io::Result<tls::ServerConnection>> + Send>,
        > = match self.tls.take() {
            Some(tls) => Box::pin(tls.accept_all(accepted)),
            None => Box::pin(tokio_stream::StreamExt::map(accepted, |conn| {
                conn.map(tls::ServerConnection::Plain)
            })),
        };
        let admission = admission::AdmissionLayer::new(
            self.keys.clone(),
            request_budget,
            admission::Limits {
                max_message_bytes: config.max_batch_bytes + REQUEST_OVERHEAD_BYTES,
                max_message_flag: "--max-batch-bytes",
                small_message_bytes: SMALL_REQUEST_BYTES,
                bytes_in_flight: config.max_request_bytes_in_flight,
                body_timeout: config.request_body_timeout,
            },
        );
        info!(%address, durability = %config.durability, tls = tls_enabled, mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), keys = !self.keys.is_open(), "serving gRPC, gRPC-Web and the HTTP API");

        let metrics_task = self.metrics_listener.take().map(|listener| {
            let metrics_address = metrics_address.expect("bound");
            info!(address = %metrics_address, stream_labels = config.metrics_stream_labels, "serving Prometheus metrics at /metrics");
            if !metrics_address.ip().is_loopback() {
                warn!(address = %metrics_address, "SERVING METRICS WITHOUT AUTHENTICATION on a non-loopback address (--metrics-insecure)");
            }
            tokio::spawn(metrics_endpoint::serve(
                listener,
                self.log.clone(),
                cancel.clone(),
            ))
        });
        if self.log.engine().shared() {
            tokio::spawn(follow_keys(self.keys.clone(), cancel.clone()));
        }
        let health = health::HealthCheck::new(cancel.clone()).await;
        tokio::spawn(watch_writes(
            health.clone(),
            self.log.clone(),
            cancel.clone(),
        ));
        let reflection = reflection().map_err(ServeError::Reflection)?;
        let signalled = cancel.clone();
        let serving = tonic::transport::Server::builder()
            .http2_keepalive_interval(config.keepalive_interval)
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(config.max_concurrent_streams)
            // Windows start at HTTP/2's 64 KiB and grow with the measured
            // bandwidth-delay product only as the server reads: a client
            // whose calls are refused unread can make a connection buffer
            // at most 64 KiB (1024 connections: 64 MiB).
            .http2_adaptive_window(Some(true))
            // HTTP/1.1 for the JSON API, SSE and gRPC-Web (browsers and
            // proxies that strip HTTP/2); gRPC itself stays on HTTP/2.
            .accept_http1(true)
            .layer(split)
            .layer(admission)
            .add_service(service)
            .add_service(
                ApiKeysServer::new(ApiKeysService::new(self.keys.clone()))
                    .max_decoding_message_size(SMALL_REQUEST_BYTES),
            )
            .add_service(
                health
                    .service()
                    .max_decoding_message_size(SMALL_REQUEST_BYTES),
            )
            .add_service(reflection.0.max_decoding_message_size(SMALL_REQUEST_BYTES))
            .add_service(reflection.1.max_decoding_message_size(SMALL_REQUEST_BYTES))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                info!("shutting down: ending subscriptions, finishing open calls");
                health.not_serving().await;
                signalled.cancel();
            });
        let grace = config.shutdown_grace;
        tokio::select! {
            result = serving => result.map_err(ServeError::Transport)?,
            _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(?grace, "open calls did not finish within the grace period; closing them");
            }
        }
        subscriptions.close();
        let _ = tokio::time::timeout(grace, subscriptions.wait()).await;
        if let Some(task) = metrics_task {
            let _ = tokio::time::timeout(grace, task).await;
        }
        self.log.close().await.map_err(ServeError::Close)?;
        // Connection tasks that just ended may still be dropping their
        // clones of the service (and so of the log). Wait for them, so that
        // when `serve` returns the data dir is unlocked and can be opened
        // again in this process (tests, embedding).
        let released_by = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&self.log) > 1 && tokio::time::Instant::now() < released_by {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if Arc::strong_count(&self.log) > 1 {
            warn!("the log is still referenced after shutdown; the data dir stays locked until they end");
        }
        info!("shut down cleanly");
        Ok(())
    }
}

/// Every second until shutdown: reports in health whether writes are
/// accepted, and logs each change.
/// Every second until shutdown, with an engine several servers share:
/// takes in the API keys the other servers created or revoked, so a key
/// made through one gateway works through all within about a second, and
/// a revoked one stops working everywhere (its open subscriptions end).
async fn follow_keys(keys: Arc<KeyRing>, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let ring = keys.clone();
        match tokio::task::spawn_blocking(move || ring.reload()).await {
            Ok(Ok(true)) => info!("took in API keys created or revoked through another server"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "cannot read the API keys back from the storage engine")
            }
            Err(e) => debug!(error = %e, "the API key reload stopped"),
        }
    }
}

async fn watch_writes(health: health::HealthCheck, log: Arc<Log>, cancel: CancellationToken) {
    let mut accepted = true;
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut reason = log.write_refusal().reason;
        if reason.is_none() {
            let engine = log.engine().clone();
            reason = tokio::task::spawn_blocking(move || engine.probe())
                .await
                .unwrap_or_else(|e| Some(format!("the storage probe failed: {e}")));
        }
        if reason.is_none() != accepted {
            accepted = reason.is_none();
            match &reason {
                Some(reason) => warn!(%reason, "refusing appends and stream creation; reads go on"),
                None => info!("accepting appends again"),
            }
            health.set_writes(accepted).await;
        }
    }
}

/// The reflection services (v1, and v1alpha for older grpcurl), describing
/// the pullstream and health services.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
        >,
        tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener failed.
    #[error("listener error: {0}")]
    Io(std::io::Error),
    /// The gRPC transport failed.
    #[error("gRPC transport error: {0}")]
    Transport(tonic::transport::Error),
    /// Open mode (no API keys) on an address others can reach.
    #[error("refusing to serve without API keys on {0}, which is not a loopback address: create a key first (`pullstream keys create --data-dir DIR --tenant T --scope admin`), listen on 127.0.0.1, or pass --insecure")]
    Insecure(std::net::SocketAddr),
    /// The metrics address could not be bound.
    #[error("cannot listen for metrics on {0}: {1} (is another process using the port? pass another --metrics-listen)")]
    MetricsListen(std::net::SocketAddr, std::io::Error),
    /// The reflection service could not read the proto descriptors (a
    /// build problem).
    #[error("server reflection setup failed: {0}")]
    Reflection(tonic_reflection::server::Error),
    /// Storage could not be closed cleanly.
    #[error("closing storage failed: {0}")]
    Close(Error),
}

/// Completes on SIGINT or SIGTERM (what Kubernetes sends), logging which.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c => info!("received SIGINT"),
                _ = term.recv() => info!("received SIGTERM"),
            },
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = ctrl_c.await;
                info!("received SIGINT");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        info!("received SIGINT");
    }
}
