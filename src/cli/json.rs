//! JSON renderings of events and acknowledgements for the client commands.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::proto as pb;

/// RFC 3339 text for a protobuf timestamp.
pub fn time_text(time: Option<&prost_types::Timestamp>) -> Value {
    let Some(t) = time else { return Value::Null };
    let since_epoch = Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    Value::String(humantime::format_rfc3339_nanos(UNIX_EPOCH + since_epoch).to_string())
}

/// Whether a content type is JSON (`application/json`, `application/x+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence.ends_with("+json")
}

/// An event as one JSON object: `data` inlined when the content type is
/// JSON and the payload parses, otherwise `data_base64`.
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
    match inline {
        Some(data) => out.insert("data".into(), data),
        None => out.insert(
            "data_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&event.data)),
        ),
    };
    Value::Object(out)
}

/// An Append acknowledgement as one JSON object.
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

/// A stream description as one JSON object.
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

/// A retention policy as one JSON object (absent limits left out).
pub fn retention(policy: &pb::RetentionPolicy) -> Value {
    let mut out = Map::new();
    if let Some(age) = &policy.max_age {
        out.insert("max_age_seconds".into(), json!(age.seconds));
    }
    if policy.max_events > 0 {
        out.insert("max_events".into(), json!(policy.max_events));
    }
    if policy.max_bytes > 0 {
        out.insert("max_bytes".into(), json!(policy.max_bytes));
    }
    Value::Object(out)
}

/// A retention policy in a few words, e.g. `max age 7days, max events 1000`.
pub fn retention_text(policy: &pb::RetentionPolicy) -> String {
    let mut parts = Vec::new();
    if let Some(age) = &policy.max_age {
        let age = Duration::new(age.seconds.max(0) as u64, age.nanos.max(0) as u32);
        parts.push(format!("max age {}", humantime::format_duration(age)));
    }
    if policy.max_events > 0 {
        parts.push(format!("max events {}", policy.max_events));
    }
    if policy.max_bytes > 0 {
        parts.push(format!("max bytes {}", policy.max_bytes));
    }
    parts.join(", ")
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
    });
    if let Some(filter) = &info.filter {
        out["filter"] = json!({ "types": filter.types, "keys": filter.keys });
    }
    if !info.version.is_empty() {
        out["version"] = json!(info.version);
    }
    out
}
