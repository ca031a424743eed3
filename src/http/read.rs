//! `GET /v1/streams/{stream}/events`: a page, a long-poll, or Server-Sent
//! Events, all three a subscription underneath (`Calls::subscribe`), so
//! start positions, filters, payload versions, durable consumers, the
//! per-key subscription limit, heartbeats and shutdown behave exactly as
//! in gRPC's Subscribe.
//!
//! - A page is the subscription's first response: the events available
//!   now (up to `limit`), or none with the cursor moved past what a filter
//!   skipped.
//! - With `wait`, responses without events (heartbeats) only move the
//!   cursor; the answer is the first response with events, or, when `wait`
//!   passes, an empty page with the latest cursor.
//! - With `Accept: text/event-stream`, every response is written as it
//!   comes: each event as `id: <offset + 1>` (the offset to resume from;
//!   for a response's last event, the response's cursor, which may be past
//!   events a filter skipped),
//!   `event: <type>`, `data: <event JSON>`; a heartbeat as a comment that
//!   carries the moved cursor in `id:`. The server ends the response after
//!   `--sse-max-duration`, so buffering proxies deliver what they hold,
//!   and a browser's `EventSource` reconnects by itself with
//!   `Last-Event-ID`, which is where the next response starts: no gap, no
//!   duplicate. A subscription that ends in an error writes it as an
//!   `error` event (`{"code","message"}`) before the response ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use prost::Message;
use serde_json::json;
use tokio::time::Instant;

use super::{principal, Answer, Api, HEAD_OFFSET_HEADER, NEXT_OFFSET_HEADER};
use crate::api::{error_message, http_status, SubscriptionResponses, MAX_PAGE};
use crate::error::Error;
use crate::proto::{self as pb, subscribe_request};

/// The longest `wait` a long-poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a browser waits before reconnecting (the `retry:` hint).
const RECONNECT_HINT: Duration = Duration::from_secs(1);

/// The query of a read, every parameter optional.
#[derive(Debug, Default)]
struct ReadQuery {
    offset: Option<String>,
    time: Option<String>,
    limit: u32,
    types: Vec<String>,
    keys: Vec<String>,
    version: String,
    consumer: String,
    wait: Option<Duration>,
    access_token: Option<String>,
}

impl ReadQuery {
    /// From the query's pairs; `type` and `key` may repeat or hold
    /// comma-separated lists. Unknown parameters are refused, so a typo
    /// does not silently read the whole stream.
    fn parse(pairs: Vec<(String, String)>) -> Result<ReadQuery, Error> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let mut query = ReadQuery::default();
        for (name, value) in pairs {
            match name.as_str() {
                "offset" => query.offset = Some(value),
                "time" => query.time = Some(value),
                "limit" => {
                    query.limit = match value.parse::<u32>() {
                        Ok(n) if n <= MAX_PAGE => n,
                        _ => return bad(format!("limit {value:?} must be a number from 1 to {MAX_PAGE} (0 or absent: 100)")),
                    }
                }
                "type" => query.types.extend(list(&value)),
                "key" => query.keys.extend(list(&value)),
                "version" => query.version = value,
                "consumer" => query.consumer = value,
                "wait" => query.wait = Some(wait(&value)?),
                "access_token" => query.access_token = Some(value),
                other => {
                    return bad(format!(
                        "unknown query parameter {}: a read takes offset, time, limit, type, key, version, consumer, wait and access_token",
                        crate::error::shown(other)
                    ))
                }
            }
        }
        Ok(query)
    }

    /// The Subscribe request this read stands for, starting at `resume`
    /// (a `Last-Event-ID`) when given.
    fn request(&self, stream: String, resume: Option<u64>) -> Result<pb::SubscribeRequest, Error> {
        if self.offset.is_some() && self.time.is_some() {
            return Err(Error::InvalidArgument(
                "give offset or time, not both".into(),
            ));
        }
        let start = if let Some(offset) = resume {
            subscribe_request::Start::Offset(offset)
        } else if let Some(time) = &self.time {
            let at = humantime::parse_rfc3339_weak(time).map_err(|e| {
                Error::InvalidArgument(format!(
                    "time {time:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
                ))
            })?;
            let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            subscribe_request::Start::Time(prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            })
        } else {
            match self.offset.as_deref() {
                None | Some("earliest") => {
                    subscribe_request::Start::Position(pb::StartPosition::Earliest as i32)
                }
                Some("latest") => {
                    subscribe_request::Start::Position(pb::StartPosition::Latest as i32)
                }
                Some(n) => subscribe_request::Start::Offset(n.parse().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "offset {n:?} must be a number, `earliest` or `latest`"
                    ))
                })?),
            }
        };
        let filter = (!self.types.is_empty() || !self.keys.is_empty()).then(|| pb::EventFilter {
            types: self.types.clone(),
            keys: self.keys.clone(),
        });
        Ok(pb::SubscribeRequest {
            stream,
            start: Some(start),
            max_batch_events: self.limit,
            consumer: self.consumer.clone(),
            filter,
            version: self.version.clone(),
            group: String::new(),
            member: String::new(),
        })
    }
}

/// The items of a comma-separated list.
fn list(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A `wait`: `30s`, `500ms`, or a number of seconds.
fn wait(value: &str) -> Result<Duration, Error> {
    let parsed = match value.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(value),
    };
    match parsed {
        Ok(d) if d <= MAX_WAIT => Ok(d),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "wait {value:?} is too long: the most is {}",
            humantime::format_duration(MAX_WAIT)
        ))),
        Err(_) => Err(Error::InvalidArgument(format!(
            "wait {value:?} must be a duration like 30s or 500ms, or a number of seconds"
        ))),
    }
}

/// The events of a response, decoded from the bytes the server encoded
/// once for every subscriber.
fn events_of(response: &pb::SubscribeResponse) -> Vec<pb::Event> {
    let mut events = response.events.clone();
    if !response.encoded_events.is_empty() {
        match pb::ReadResponse::decode(response.encoded_events.clone()) {
            Ok(decoded) => events.extend(decoded.events),
            Err(e) => {
                tracing::error!(error = %e, "could not decode the server's own event encoding")
            }
        }
    }
    events
}

/// The handler: a page, a long-poll or SSE (see the module docs).
pub(super) async fn events(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Answer {
    let query = ReadQuery::parse(pairs)?;
    let caller = principal(&api, &headers, query.access_token.as_deref())?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::InvalidArgument(
                        "Last-Event-ID must be an offset this server sent as an event id".into(),
                    )
                })?,
        ),
    };
    if !wants_sse {
        return page(&api, caller, stream, &query).await;
    }
    let mut resume = last_event_id;
    if let (Some(offset), false) = (last_event_id, query.consumer.is_empty()) {
        // A durable consumer's browser has received everything before
        // `offset`: save that, and resume as the consumer from there.
        api.calls
            .commit_cursor(
                caller.clone(),
                pb::CommitCursorRequest {
                    stream: stream.clone(),
                    consumer: query.consumer.clone(),
                    next_offset: offset,
                    ..Default::default()
                },
            )
            .await?;
        resume = None;
    }
    let request = query.request(stream, resume)?;
    let responses = api.calls.subscribe(caller, request).await?;
    let deadline = Instant::now() + api.settings.sse_max_duration;
    let body = axum::body::Body::from_stream(server_sent_events(responses, deadline));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar proxies: do not buffer this response.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One page, or a long-poll's first page with events.
async fn page(
    api: &Api,
    caller: crate::auth::Principal,
    stream: String,
    query: &ReadQuery,
) -> Answer {
    let request = query.request(stream, None)?;
    let mut responses = api.calls.subscribe(caller, request).await?;
    let wait = query.wait.unwrap_or_default();
    let deadline = Instant::now() + wait;
    let mut latest: Option<pb::SubscribeResponse> = None;
    let mut events = Vec::new();
    loop {
        let next = if latest.is_some() && wait.is_zero() {
            break;
        } else if latest.is_none() {
            // The first response comes at once.
            responses.recv().await
        } else {
            match tokio::time::timeout_at(deadline, responses.recv()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        match next {
            Some(Ok(response)) => {
                events = events_of(&response);
                latest = Some(response);
                if !events.is_empty() {
                    break;
                }
            }
            Some(Err(error)) => return Err(error.into()),
            None => break,
        }
    }
    let Some(latest) = latest else {
        return Err(Error::ShuttingDown.into());
    };
    let body = json!({
        "events": events.iter().map(crate::proto::json::event).collect::<Vec<_>>(),
        "next_offset": latest.next_offset,
        "head_offset": latest.head_offset,
        "caught_up": latest.caught_up,
    });
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(NEXT_OFFSET_HEADER, HeaderValue::from(latest.next_offset));
    headers.insert(HEAD_OFFSET_HEADER, HeaderValue::from(latest.head_offset));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// One Server-Sent Event, appended to `out` in the `text/event-stream`
/// format. Every field here is one line by construction: ids are numbers,
/// event types cannot hold whitespace or control characters (the log's
/// type rule), and data is compact JSON (serde escapes newlines).
fn write_event(
    out: &mut String,
    id: Option<u64>,
    event: Option<&str>,
    data: Option<&str>,
    comment: Option<&str>,
) {
    use std::fmt::Write as _;
    if let Some(comment) = comment {
        let _ = writeln!(out, ": {comment}");
    }
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    if let Some(event) = event {
        let _ = writeln!(out, "event: {event}");
    }
    if let Some(data) = data {
        let _ = writeln!(out, "data: {data}");
    }
    out.push('\n');
}

/// The SSE text of one subscription response: its events, or a
/// heartbeat comment carrying the cursor.
fn response_text(response: &pb::SubscribeResponse) -> String {
    let events = events_of(response);
    let mut out = String::with_capacity(64 + response.encoded_events.len() * 2);
    if events.is_empty() {
        write_event(
            &mut out,
            Some(response.next_offset),
            None,
            None,
            Some("heartbeat"),
        );
        return out;
    }
    let last = events.len() - 1;
    for (i, e) in events.iter().enumerate() {
        // The last event of a response carries the response's cursor,
        // past what a filter skipped after it.
        let resume = if i == last {
            response.next_offset
        } else {
            e.offset + 1
        };
        let data = crate::proto::json::event(e).to_string();
        write_event(&mut out, Some(resume), Some(&e.r#type), Some(&data), None);
    }
    out
}

/// The SSE body of a subscription until `deadline`, one chunk per
/// subscription response (written once, not per event: a response of
/// hundreds of events is one write); see the module docs.
fn server_sent_events(
    responses: SubscriptionResponses,
    deadline: Instant,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let mut hint = format!("retry: {}\n", RECONNECT_HINT.as_millis());
    write_event(
        &mut hint,
        None,
        None,
        None,
        Some("pullstream: events follow; reconnect with Last-Event-ID to resume"),
    );
    let followed = stream::unfold(Some(responses), move |state| async move {
        let mut responses = state?;
        let mut out = String::new();
        let next = match tokio::time::timeout_at(deadline, responses.recv()).await {
            Ok(next) => next,
            Err(_) => {
                write_event(&mut out, None, None, None, Some(
                    "pullstream: this response's time is up (--sse-max-duration); reconnect with Last-Event-ID",
                ));
                return Some((out, None));
            }
        };
        match next {
            Some(Ok(response)) => Some((response_text(&response), Some(responses))),
            Some(Err(error)) => {
                let (_, code) = http_status(&error);
                let data = json!({ "code": code, "message": error_message(&error) }).to_string();
                write_event(&mut out, None, Some("error"), Some(&data), None);
                Some((out, None))
            }
            None => None,
        }
    });
    stream::once(async move { hint })
        .chain(followed)
        .map(|text| Ok(Bytes::from(text)))
}
