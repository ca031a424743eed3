//! JSON and text renderings for the client commands: the JSON form of
//! events, streams and consumers is the one the HTTP API writes
//! (`proto::json`), re-exported here; a retention policy in words is the
//! CLI's own.

use std::time::Duration;

use crate::proto as pb;
pub use crate::proto::json::{
    ack, consumer_info, event, is_json, scope_name, status, stream_info, time_text,
};

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

/// A duration as a person reads an age: its two largest units, e.g.
/// `42s`, `5m 3s`, `2h 10m`, `3days 4h` (`0s` below a second).
pub fn age_text(age: Duration) -> String {
    let text = humantime::format_duration(Duration::from_secs(age.as_secs())).to_string();
    text.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// A consumer's lag in time (`-` when it has none).
pub fn lag_time_text(consumer: &pb::ConsumerInfo) -> String {
    consumer.lag_time.map_or("-".to_string(), |d| {
        age_text(Duration::new(
            d.seconds.max(0) as u64,
            d.nanos.max(0) as u32,
        ))
    })
}

/// How long before `now` a time was, e.g. `3m 5s ago`; `never` when unset.
pub fn ago_text(time: Option<&prost_types::Timestamp>, now: std::time::SystemTime) -> String {
    let Some(t) = time else {
        return "never".to_string();
    };
    let then =
        std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    match now.duration_since(then) {
        Ok(age) => format!("{} ago", age_text(age)),
        Err(_) => "just now".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_their_two_largest_units() {
        assert_eq!(age_text(Duration::from_millis(300)), "0s");
        assert_eq!(age_text(Duration::from_secs(42)), "42s");
        assert_eq!(age_text(Duration::from_secs(303)), "5m 3s");
        assert_eq!(age_text(Duration::from_secs(7_861)), "2h 11m");
        assert_eq!(
            age_text(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)),
            "3days 4h"
        );
    }
}
