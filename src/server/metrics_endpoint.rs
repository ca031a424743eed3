//! The Prometheus scrape endpoint: `GET /metrics` on its own HTTP/1
//! listener (`--metrics-listen`), apart from the gRPC port so it can be
//! exposed to a monitoring network only. No authentication: bind it where
//! only the scraper can reach it.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::log::Log;

/// The exposition format's content type (Prometheus text, version 0.0.4,
/// which prometheus-client writes when no exemplars are used).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, log: Arc<Log>, stop: CancellationToken) {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let log = log.clone();
                async move {
                    // Reads the data dir's size: off the async threads.
                    let body = tokio::task::spawn_blocking(move || log.encode_metrics())
                        .await
                        .unwrap_or_default();
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
                }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "pullstream serves Prometheus metrics at /metrics\n",
            )
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        warn!(error = %e, "the metrics endpoint stopped");
    }
}
