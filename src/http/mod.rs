//! The HTTP JSON API (`/v1`), for consumers that cannot speak gRPC: shell
//! scripts with curl, browser pages, and networks whose proxies speak only
//! HTTP/1.1 or buffer streamed responses.
//!
//! It is served on the gRPC listener (`server::split` routes by content
//! type) and is a shell over [`Calls`], exactly as the gRPC service is:
//! each handler authenticates from its headers before reading any body,
//! turns its path, query and JSON into the request message, calls the one
//! implementation, and writes the answer as JSON ([`json`]). Errors go
//! through the one mapping (`api::http_status`) as
//! `{"code":"NOT_FOUND","message":"…"}`.
//!
//! Reads (`GET /v1/streams/{stream}/events`) are subscriptions underneath
//! ([`read`]): a page is the first response of one, a long-poll waits for
//! the first response with events, and Server-Sent Events follow it until
//! the response's time is up.

mod read;

pub mod shapes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::{error_message, http_status, Calls};
use crate::auth::Principal;
use crate::error::Error;
use crate::proto as pb;

/// The OpenAPI 3.1 document describing this API, served at
/// `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Response headers carrying a page's cursor.
pub const NEXT_OFFSET_HEADER: &str = "pullstream-next-offset";
/// The stream's head when the page was read.
pub const HEAD_OFFSET_HEADER: &str = "pullstream-head-offset";

/// What the HTTP API needs beyond the calls.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The largest request body accepted (413 past it).
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (408 past it).
    pub body_timeout: Duration,
    /// How long one Server-Sent Events response stays open.
    pub sse_max_duration: Duration,
    /// Origins allowed to call from a browser (empty: CORS off).
    pub cors_origins: Vec<String>,
}

/// The router's state.
#[derive(Clone)]
struct Api {
    calls: Arc<Calls>,
    settings: Arc<HttpSettings>,
}

/// The `/v1` routes, `/healthz` and `/v1/openapi.json`.
pub fn router(calls: Arc<Calls>, settings: HttpSettings) -> Router {
    let cors = cors_layer(&settings.cors_origins);
    let api = Api {
        calls,
        settings: Arc::new(settings),
    };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/streams", get(list_streams))
        .route(
            "/v1/streams/{stream}",
            get(get_stream).put(put_stream).delete(delete_stream),
        )
        .route(
            "/v1/streams/{stream}/events",
            post(append).get(read::events),
        )
        .route("/v1/streams/{stream}/consumers", get(list_consumers))
        .route(
            "/v1/streams/{stream}/consumers/{consumer}",
            get(get_consumer).delete(delete_consumer),
        )
        .route(
            "/v1/streams/{stream}/consumers/{consumer}/commit",
            post(commit_consumer),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The CORS policy for `origins` (`None`: CORS off, browsers refuse
/// cross-origin calls). Shared with gRPC-Web by `server::split`.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    let headers = [
        "authorization",
        "content-type",
        "idempotency-key",
        "last-event-id",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ];
    let exposed = [
        NEXT_OFFSET_HEADER,
        HEAD_OFFSET_HEADER,
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
    ];
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers(headers.map(header::HeaderName::from_static))
            .expose_headers(exposed.map(header::HeaderName::from_static))
            .max_age(Duration::from_secs(600)),
    )
}

/// An error answered as JSON with its HTTP status.
pub struct HttpError(Error);

impl From<Error> for HttpError {
    fn from(error: Error) -> HttpError {
        HttpError(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, code) = http_status(&self.0);
        let mut response = (
            status,
            axum::Json(json!({ "code": code, "message": error_message(&self.0) })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type Answer = Result<Response, HttpError>;

/// A JSON answer.
fn ok(status: StatusCode, body: Value) -> Answer {
    Ok((status, axum::Json(body)).into_response())
}

/// Who is calling, from `Authorization: Bearer <key>`, or (for browser
/// `EventSource`, which cannot send headers) an `access_token` query
/// parameter of a read.
fn principal(
    api: &Api,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<Principal, Error> {
    let from_query = access_token.map(|token| format!("Bearer {token}"));
    let authorization = match headers.get(header::AUTHORIZATION) {
        Some(value) => Some(value.to_str().unwrap_or("(not text)")),
        None => from_query.as_deref(),
    };
    api.calls.keys().authenticate(authorization)
}

/// Reads a JSON body within the body limit and timeout, holding its bytes
/// in the server-wide request budget (as admission does for gRPC) until the
/// returned permit is dropped. An empty body reads as `T::default()` when
/// `empty` is given.
async fn body<T: DeserializeOwned>(
    api: &Api,
    request: Request,
    empty: Option<T>,
) -> Result<(T, OwnedSemaphorePermit), Error> {
    let limit = api.settings.max_body_bytes;
    let too_large = |size: String| {
        Error::TooLarge(format!(
            "the request body is {size} bytes; the largest accepted is {limit} bytes (about twice --max-batch-bytes): split the batch"
        ))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = declared.filter(|&l| l > limit) {
        return Err(too_large(length.to_string()));
    }
    let reserve = declared.unwrap_or(limit).max(1);
    let budget = api.calls.config().request_budget.clone();
    let permit = budget
        .try_acquire_many_owned(reserve.min(u32::MAX as usize) as u32)
        .map_err(|_| {
            Error::ResourceExhausted(
                "the server is already holding its most bytes of requests \
                 (--max-request-bytes-in-flight); retry with backoff"
                    .into(),
            )
        })?;
    let timeout = api.settings.body_timeout;
    let bytes: Bytes =
        tokio::time::timeout(timeout, axum::body::to_bytes(request.into_body(), limit))
            .await
            .map_err(|_| {
                Error::RequestTimeout(format!(
                    "the request's body did not arrive within {} (--request-body-timeout)",
                    humantime::format_duration(timeout)
                ))
            })?
            .map_err(|e| {
                let inner = e.into_inner();
                if inner.is::<http_body_util::LengthLimitError>() {
                    too_large(format!("more than {limit}"))
                } else {
                    Error::InvalidArgument(format!("could not read the request body: {inner}"))
                }
            })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if let Some(value) = empty {
            return Ok((value, permit));
        }
        return Err(Error::InvalidArgument(
            "the request body is empty: send a JSON object".into(),
        ));
    }
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidArgument(format!(
            "the request body is not the JSON this call takes: {e}"
        ))
    })?;
    Ok((value, permit))
}

/// A path no route serves: 404, in the API's error form.
async fn not_found(request: Request) -> Response {
    let message = format!(
        "no such route: {} {} (the API is under /v1; see /v1/openapi.json)",
        request.method(),
        request.uri().path()
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "code": "NOT_FOUND", "message": message })),
    )
        .into_response()
}

/// A route that does not take this method: 405, in the API's error form.
async fn method_not_allowed(request: Request) -> Response {
    let message = format!(
        "{} does not take {} (see /v1/openapi.json)",
        request.uri().path(),
        request.method()
    );
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(json!({ "code": "UNIMPLEMENTED", "message": message })),
    )
        .into_response()
}

async fn healthz(State(api): State<Api>) -> Response {
    let serving = !api.calls.shutdown().is_cancelled();
    let refusal = api.calls.log().write_refusal().reason;
    let body = json!({
        "status": if serving { "SERVING" } else { "NOT_SERVING" },
        "writes": if serving && refusal.is_none() { "SERVING" } else { "NOT_SERVING" },
        "write_refusal": refusal.unwrap_or_default(),
    });
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status(State(api): State<Api>, headers: HeaderMap) -> Answer {
    let caller = principal(&api, &headers, None)?;
    let status = api
        .calls
        .get_server_status(caller, pb::GetServerStatusRequest {})
        .await?;
    ok(StatusCode::OK, crate::proto::json::status(&status))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

async fn list_streams(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    let Query(query) = query.map_err(|e| Error::InvalidArgument(e.body_text()))?;
    let page = api
        .calls
        .list_streams(
            caller,
            pb::ListStreamsRequest {
                page_size: query.page_size,
                page_token: query.page_token,
            },
        )
        .await?;
    ok(
        StatusCode::OK,
        json!({
            "streams": page.streams.iter().map(crate::proto::json::stream_info).collect::<Vec<_>>(),
            "next_page_token": page.next_page_token,
        }),
    )
}

async fn get_stream(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(stream): Path<String>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    let info = api
        .calls
        .get_stream(caller, pb::GetStreamRequest { stream })
        .await?;
    ok(
        StatusCode::OK,
        info.stream
            .as_ref()
            .map(crate::proto::json::stream_info)
            .into(),
    )
}

/// Creates the stream (201), or, when it exists, sets the retention the
/// body gives (200; without a body, the stream is left as it is).
async fn put_stream(
    State(api): State<Api>,
    Path(stream): Path<String>,
    request: Request,
) -> Answer {
    let caller = principal(&api, request.headers(), None)?;
    let (body, _held) = body::<shapes::StreamBody>(&api, request, Some(Default::default())).await?;
    let given = body.retention.is_some();
    let retention = body.retention.map(|r| r.into_proto()).transpose()?;
    let created = api
        .calls
        .create_stream(
            caller.clone(),
            pb::CreateStreamRequest {
                stream: stream.clone(),
                retention,
            },
        )
        .await;
    let (status, info) = match created {
        Ok(created) => (StatusCode::CREATED, created.stream),
        Err(Error::StreamExists(_)) if given => {
            let updated = api
                .calls
                .update_stream(caller, pb::UpdateStreamRequest { stream, retention })
                .await?;
            (StatusCode::OK, updated.stream)
        }
        Err(Error::StreamExists(_)) => {
            let info = api
                .calls
                .get_stream(caller, pb::GetStreamRequest { stream })
                .await?;
            (StatusCode::OK, info.stream)
        }
        Err(e) => return Err(e.into()),
    };
    ok(
        status,
        info.as_ref().map(crate::proto::json::stream_info).into(),
    )
}

async fn delete_stream(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(stream): Path<String>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    api.calls
        .delete_stream(caller, pb::DeleteStreamRequest { stream })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Appends the body's batch; `Idempotency-Key` makes a retry safe.
async fn append(State(api): State<Api>, Path(stream): Path<String>, request: Request) -> Answer {
    let caller = principal(&api, request.headers(), None)?;
    let idempotency_key = match request.headers().get("idempotency-key") {
        None => String::new(),
        Some(value) => value
            .to_str()
            .map_err(|_| Error::InvalidArgument("the Idempotency-Key header is not text".into()))?
            .to_string(),
    };
    let (body, _held) = body::<shapes::AppendBody>(&api, request, None).await?;
    let request = body.into_request(stream, idempotency_key)?;
    let appended = api.calls.append(caller, request).await?;
    ok(
        StatusCode::OK,
        json!({
            "stream": appended.stream,
            "first_offset": appended.first_offset,
            "count": appended.count,
            "time": crate::proto::json::time_text(appended.time.as_ref()),
            "duplicate": appended.duplicate,
        }),
    )
}

async fn list_consumers(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    let Query(query) = query.map_err(|e| Error::InvalidArgument(e.body_text()))?;
    let list = api
        .calls
        .list_consumers(
            caller,
            pb::ListConsumersRequest {
                stream,
                page_size: query.page_size,
                page_token: query.page_token,
            },
        )
        .await?;
    ok(
        StatusCode::OK,
        json!({
            "consumers": list.consumers.iter().map(crate::proto::json::consumer_info).collect::<Vec<_>>(),
            "next_page_token": list.next_page_token,
        }),
    )
}

async fn get_consumer(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((stream, consumer)): Path<(String, String)>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    let info = api
        .calls
        .get_consumer(caller, pb::GetConsumerRequest { stream, consumer })
        .await?;
    ok(
        StatusCode::OK,
        info.consumer
            .as_ref()
            .map(crate::proto::json::consumer_info)
            .into(),
    )
}

async fn delete_consumer(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((stream, consumer)): Path<(String, String)>,
) -> Answer {
    let caller = principal(&api, &headers, None)?;
    api.calls
        .delete_consumer(caller, pb::DeleteConsumerRequest { stream, consumer })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn commit_consumer(
    State(api): State<Api>,
    Path((stream, consumer)): Path<(String, String)>,
    request: Request,
) -> Answer {
    let caller = principal(&api, request.headers(), None)?;
    let (body, _held) = body::<shapes::CommitBody>(&api, request, None).await?;
    let info = api
        .calls
        .commit_cursor(caller, body.into_request(stream, consumer)?)
        .await?;
    ok(
        StatusCode::OK,
        info.consumer
            .as_ref()
            .map(crate::proto::json::consumer_info)
            .into(),
    )
}
