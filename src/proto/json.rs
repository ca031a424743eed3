//! The JSON form of the messages people read: events, streams, consumers
//! and the server's status. One rendering, shared by the HTTP API (its
//! responses) and the CLI (its output), so `curl` and `pullstream` print
//! the same thing.
//!
//! Payloads: `data` holds the payload as JSON when its content type is
//! JSON (`application/json`, `…+json`) and it parses; `data_text` holds it
//! as a string when its content type is `text/*` and it is UTF-8;
//! otherwise `data_base64` holds its bytes. Empty optional fields (key, version,
//! content type, metadata, limits a retention policy does not set) are
//! left out. Times are RFC 3339 in UTC with nanoseconds; durations are
//! written as humantime text (`7days`).

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::proto as pb;

/// RFC 3339 text for a protobuf timestamp (`null` when absent).
pub fn time_text(time: Option<&prost_types::Timestamp>) -> Value {
    let Some(t) = time else { return Value::Null };
    let since_epoch = Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    Value::String(humantime::format_rfc3339_nanos(UNIX_EPOCH + since_epoch).to_string())
}

/// Whether a content type is JSON (`application/json`, `application/x+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Whether a content type is text (`text/plain`, `text/csv; charset=utf-8`).
pub fn is_text(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..5)
        .is_some_and(|t| t.eq_ignore_ascii_case("text/"))
}

/// An event as one JSON object.
pub fn event(event: &pb::Event) -> Value {
    let mut out = Map::new();
    out.insert("stream".into(), json!(event.stream));
    out.insert("offset".into(), json!(event.offset));
    out.insert("type".into(), json!(event.r#type));
    if !event.key.is_empty() {
        out.insert("key".into(), json!(event.key));
    }
    out.insert("time".into(), time_text(event.time.as_ref()));
    if !event.version.is_empty() {
        out.insert("version".into(), json!(event.version));
    }
    if !event.content_type.is_empty() {
        out.insert("content_type".into(), json!(event.content_type));
    }
    if !event.metadata.is_empty() {
        let sorted: BTreeMap<_, _> = event.metadata.iter().collect();
        out.insert("metadata".into(), json!(sorted));
    }
    let inline = is_json(&event.content_type)
        .then(|| serde_json::from_slice::<Value>(&event.data).ok())
        .flatten();
    let text = || {
        is_text(&event.content_type)
            .then(|| std::str::from_utf8(&event.data).ok())
            .flatten()
    };
    match (inline, text()) {
        (Some(data), _) => out.insert("data".into(), data),
        (None, Some(text)) => out.insert("data_text".into(), json!(text)),
        (None, None) => out.insert(
            "data_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&event.data)),
        ),
    };
    Value::Object(out)
}

/// A retention policy as one JSON object (absent limits left out).
pub fn retention(policy: &pb::RetentionPolicy) -> Value {
    let mut out = Map::new();
    if let Some(age) = &policy.max_age {
        let age = Duration::new(age.seconds.max(0) as u64, age.nanos.max(0) as u32);
        out.insert(
            "max_age".into(),
            json!(humantime::format_duration(age).to_string()),
        );
    }
    if policy.max_events > 0 {
        out.insert("max_events".into(), json!(policy.max_events));
    }
    if policy.max_bytes > 0 {
        out.insert("max_bytes".into(), json!(policy.max_bytes));
    }
    Value::Object(out)
}

/// A stream description as one JSON object (`retention` is `null` when the
/// stream keeps everything).
pub fn stream_info(info: &pb::StreamInfo) -> Value {
    json!({
        "name": info.name,
        "first_offset": info.first_offset,
        "next_offset": info.next_offset,
        "event_count": info.event_count,
        "approximate_bytes": info.approximate_bytes,
        "created_time": time_text(info.created_time.as_ref()),
        "retention": info.retention.as_ref().map(retention),
    })
}

/// A durable consumer description as one JSON object.
pub fn consumer_info(info: &pb::ConsumerInfo) -> Value {
    let mut out = json!({
        "stream": info.stream,
        "name": info.name,
        "next_offset": info.next_offset,
        "lag": info.lag,
        "last_commit_time": time_text(info.last_commit_time.as_ref()),
        "created_time": time_text(info.created_time.as_ref()),
        "active": info.active,
        "cursor_trimmed": info.cursor_trimmed,
        "oldest_pending_time": time_text(info.oldest_pending_time.as_ref()),
        "lag_seconds": info.lag_time.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9),
    });
    if let Some(filter) = &info.filter {
        out["filter"] = json!({ "types": filter.types, "keys": filter.keys });
    }
    if !info.version.is_empty() {
        out["version"] = json!(info.version);
    }
    out
}

/// An Append acknowledgement as one JSON object (`duplicate` only when
/// true).
pub fn ack(response: &pb::AppendResponse) -> Value {
    let mut out = json!({
        "stream": response.stream,
        "first_offset": response.first_offset,
        "count": response.count,
        "time": time_text(response.time.as_ref()),
    });
    if response.duplicate {
        out["duplicate"] = json!(true);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_are_inlined_text_is_text_and_others_are_base64() {
        let mut e = pb::Event {
            data: bytes::Bytes::from_static(br#"{"a":1}"#),
            content_type: "application/json".into(),
            ..Default::default()
        };
        assert_eq!(event(&e)["data"], json!({"a": 1}));
        e.content_type = "Application/vnd.x+json; charset=utf-8".into();
        assert_eq!(event(&e)["data"], json!({"a": 1}));
        e.content_type = "text/plain".into();
        assert_eq!(event(&e)["data_text"], json!(r#"{"a":1}"#));
        assert!(event(&e).get("data_base64").is_none());
        e.content_type = "application/octet-stream".into();
        assert_eq!(event(&e)["data_base64"], json!("eyJhIjoxfQ=="));
        e.content_type = "TEXT/csv; charset=utf-8".into();
        e.data = bytes::Bytes::from_static(b"\xe9t\xe9");
        assert!(event(&e).get("data_text").is_none(), "not UTF-8: bytes");
        assert_eq!(event(&e)["data_base64"], json!("6XTp"));
        e.content_type = "application/json".into();
        e.data = bytes::Bytes::from_static(b"\xff not json");
        assert!(event(&e).get("data").is_none());
        assert!(event(&e).get("key").is_none(), "empty fields are left out");
    }
}

/// A scope's name as the CLI and the README write it (`publish`).
pub fn scope_name(scope: i32) -> &'static str {
    match pb::Scope::try_from(scope) {
        Ok(pb::Scope::Publish) => "publish",
        Ok(pb::Scope::Subscribe) => "subscribe",
        Ok(pb::Scope::Admin) => "admin",
        _ => "unknown",
    }
}

/// The server's status, as `GET /v1/status` and `pullstream status --json`
/// write it.
pub fn status(status: &pb::GetServerStatusResponse) -> Value {
    json!({
        "server_version": status.server_version,
        "start_time": time_text(status.start_time.as_ref()),
        "uptime_seconds": status.uptime.map_or(0, |u| u.seconds),
        "write_refusal": status.write_refusal,
        "tenant": status.tenant,
        "scopes": status.scopes.iter().map(|&s| scope_name(s)).collect::<Vec<_>>(),
        "api_key_id": (!status.api_key_id.is_empty()).then_some(&status.api_key_id),
        "limits": status.limits.as_ref().map(|l| json!({
            "max_event_bytes": l.max_event_bytes,
            "max_batch_events": l.max_batch_events,
            "max_batch_bytes": l.max_batch_bytes,
            "heartbeat_interval_seconds": l.heartbeat_interval.map(duration_seconds),
            "idempotency_window_seconds": l.idempotency_window.map(duration_seconds),
            "max_pipeline_batches": l.max_pipeline_batches,
            "max_pipeline_bytes": l.max_pipeline_bytes,
        })),
        "streams": status.streams.iter().map(|s| json!({
            "stream": s.stream.as_ref().map(stream_info),
            "append_rate": s.append_rate,
            "consumers": s.consumers.iter().map(consumer_info).collect::<Vec<_>>(),
            "damaged": s.damaged.iter().map(|d| json!({
                "first_offset": d.first_offset,
                "end_offset": d.end_offset,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A protobuf duration in (fractional) seconds.
fn duration_seconds(d: prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}
