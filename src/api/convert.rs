//! Conversions between the proto's messages and the log's types, with
//! the request checks that belong to the wire form (timestamps, page
//! sizes, durations).

use std::time::Duration;

use bytes::Bytes;
use prost_types::Timestamp;

use super::{DEFAULT_PAGE, MAX_PAGE};
use crate::engine::{EventRecord, Rendering};
use crate::error::Error;
use crate::log::{self, EventFilter};
use crate::proto as pb;
pub use crate::proto::encode::timestamp;

/// A filter from the request; `None` when absent or empty.
pub(super) fn filter_from_proto(
    filter: Option<pb::EventFilter>,
) -> Result<Option<EventFilter>, Error> {
    match filter {
        Some(f) if !f.types.is_empty() || !f.keys.is_empty() => {
            Ok(Some(EventFilter::new(f.types, f.keys)?))
        }
        _ => Ok(None),
    }
}

/// A payload version pin from the request; `None` when empty.
pub(super) fn version_from_proto(version: String) -> Result<Option<String>, Error> {
    if version.is_empty() {
        return Ok(None);
    }
    log::validate_version_label(&version)?;
    Ok(Some(version))
}

/// Nanoseconds since the Unix epoch from a protobuf timestamp.
pub(super) fn unix_nanos(t: &Timestamp) -> Result<i64, Error> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::InvalidArgument(format!(
            "invalid time: nanos {} must be within 0..1e9",
            t.nanos
        )));
    }
    Ok(t.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(t.nanos)))
}

pub(super) fn consumer_info_to_proto(info: log::ConsumerInfo, stream: String) -> pb::ConsumerInfo {
    let filter = (!info.types.is_empty() || !info.keys.is_empty()).then_some(pb::EventFilter {
        types: info.types,
        keys: info.keys,
    });
    pb::ConsumerInfo {
        stream,
        name: info.name,
        next_offset: info.next_offset,
        lag: info.lag,
        last_commit_time: (info.last_commit_unix_nanos != 0)
            .then(|| timestamp(info.last_commit_unix_nanos)),
        created_time: Some(timestamp(info.created_unix_nanos)),
        filter,
        version: info.version,
        active: info.active,
        cursor_trimmed: info.cursor_trimmed,
        oldest_pending_time: info.pending_since_unix_nanos.map(timestamp),
        lag_time: info
            .pending_age
            .and_then(|age| prost_types::Duration::try_from(age).ok()),
    }
}

pub(super) fn group_info_to_proto(info: log::GroupInfo, stream: String) -> pb::GroupInfo {
    let head = info.head;
    pb::GroupInfo {
        stream,
        name: info.name,
        members: info
            .members
            .into_iter()
            .map(|m| pb::GroupMember {
                member: m.member,
                slots: m.slots,
                committed_offset: m.committed,
                lag: head.saturating_sub(m.committed),
                delivered_offset: m.delivered,
            })
            .collect(),
        low_watermark: info.low_watermark,
        head_offset: head,
        slot_count: log::SLOT_COUNT as u32,
        created_time: Some(timestamp(info.created_unix_nanos)),
        generation: info.generation,
    }
}

/// A retention policy from its protobuf form (unset keeps everything).
pub(super) fn retention_from_proto(
    policy: Option<pb::RetentionPolicy>,
) -> Result<log::Retention, Error> {
    let Some(policy) = policy else {
        return Ok(log::Retention::default());
    };
    let max_age_nanos = match policy.max_age {
        None => 0,
        Some(age) => Duration::try_from(age)
            .map_err(|_| {
                Error::InvalidArgument(
                    "retention max_age must be a positive duration (or unset for no age limit)"
                        .into(),
                )
            })?
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    Ok(log::Retention {
        max_age_nanos,
        max_events: policy.max_events,
        max_bytes: policy.max_bytes,
    })
}

/// The protobuf form of a retention policy (unset when it keeps everything).
fn retention_to_proto(retention: log::Retention) -> Option<pb::RetentionPolicy> {
    (!retention.keeps_everything()).then(|| pb::RetentionPolicy {
        max_age: (retention.max_age_nanos > 0)
            .then(|| {
                Duration::from_nanos(retention.max_age_nanos)
                    .try_into()
                    .ok()
            })
            .flatten(),
        max_events: retention.max_events,
        max_bytes: retention.max_bytes,
    })
}

pub(super) fn page_size(requested: u32, field: &str) -> Result<usize, Error> {
    match requested {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        n => Err(Error::InvalidArgument(format!(
            "{field} {n} is too large: the most is {MAX_PAGE}"
        ))),
    }
}

pub(super) fn record_from_proto(event: pb::NewEvent) -> EventRecord {
    // Sorted, so equal maps give equal records (and idempotency fingerprints).
    let mut metadata: Vec<(Bytes, Bytes)> = event
        .metadata
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    metadata.sort_unstable();
    let mut renderings: Vec<Rendering> = event
        .versions
        .into_iter()
        .map(|(label, v)| Rendering {
            label: label.into(),
            content_type: v.content_type.into(),
            data: v.data,
        })
        .collect();
    renderings.sort_unstable();
    EventRecord {
        event_type: event.r#type.into_bytes(),
        key: event.key.into_bytes(),
        content_type: event.content_type.into_bytes(),
        data: event.data,
        metadata,
        renderings,
    }
}

/// A stream description, under the caller's name for the stream.
pub(super) fn stream_info_to_proto(info: log::StreamInfo, name: String) -> pb::StreamInfo {
    pb::StreamInfo {
        event_count: info.next_offset - info.first_offset,
        name,
        first_offset: info.first_offset,
        next_offset: info.next_offset,
        approximate_bytes: info.approximate_bytes,
        created_time: Some(timestamp(info.created_unix_nanos)),
        retention: retention_to_proto(info.retention),
    }
}
