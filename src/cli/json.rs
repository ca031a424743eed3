//! JSON and text renderings for the client commands: the JSON form of
//! events, streams and consumers is the one the HTTP API writes
//! (`proto::json`), re-exported here; a retention policy in words is the
//! CLI's own.

use std::time::Duration;

use crate::proto as pb;
pub use crate::proto::json::{ack, consumer_info, event, is_json, stream_info, time_text};

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
