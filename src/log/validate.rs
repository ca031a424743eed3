//! What a request must look like before the log acts on it: stream
//! names, event fields, retention policies, and offsets against a
//! stream's bounds. Every rule here is stated once; the API layer only
//! converts, and the error says which rule was broken.

use super::{Head, MAX_STREAM_NAME_LEN, MIN_RETENTION_AGE, MIN_RETENTION_BYTES};
use crate::engine::{EventRecord, Retention};
use crate::error::Error;

/// The longest event key and content type, in bytes (the filter grammar's
/// limit, so every key can be selected).
pub const MAX_EVENT_FIELD_LEN: usize = 200;
/// The most metadata entries per event.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// The longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 4096;

/// Checks an event's fields (beyond its total size): the type follows the
/// filter grammar's segments (non-empty, dot-separated, no whitespace or
/// control characters, at most 200 bytes, no `*` or `>`), key and content
/// type are at most 200 bytes, and metadata has at most 64 entries with
/// keys of at most 200 bytes and values of at most 4 KiB.
pub(crate) fn validate_event_fields(event: &EventRecord) -> Result<(), String> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let event_type = &event.event_type[..];
    if event_type.len() > MAX_EVENT_FIELD_LEN {
        return Err(format!(
            "its type is {} bytes; the most allowed is {MAX_EVENT_FIELD_LEN}",
            event_type.len()
        ));
    }
    let bad_type = |why: &str| {
        Err(format!(
            "its type {} {why}: use dot-separated segments such as \"invoice.paid\"",
            crate::error::shown(&text(event_type))
        ))
    };
    if event_type
        .split(|b| *b == b'.')
        .any(|segment| segment.is_empty())
    {
        return bad_type("has an empty segment");
    }
    if event_type
        .iter()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return bad_type("contains whitespace or a control character");
    }
    if event_type
        .split(|b| *b == b'.')
        .any(|segment| segment == b"*" || segment == b">")
    {
        return bad_type("has a wildcard segment ('*' or '>'), which only patterns may use");
    }
    for (what, value) in [("key", &event.key), ("content type", &event.content_type)] {
        if value.len() > MAX_EVENT_FIELD_LEN {
            return Err(format!(
                "its {what} is {} bytes; the most allowed is {MAX_EVENT_FIELD_LEN}",
                value.len()
            ));
        }
    }
    if event.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "it has {} metadata entries; the most allowed is {MAX_METADATA_ENTRIES}",
            event.metadata.len()
        ));
    }
    for (key, value) in &event.metadata {
        if key.len() > MAX_EVENT_FIELD_LEN || value.len() > MAX_METADATA_VALUE_LEN {
            return Err(format!(
                "metadata {} is too long: keys may have at most {MAX_EVENT_FIELD_LEN} bytes and values {MAX_METADATA_VALUE_LEN}",
                crate::error::shown(&text(key))
            ));
        }
    }
    Ok(())
}

/// Checks a retention policy's limits.
pub(crate) fn validate_retention(retention: &Retention) -> Result<(), Error> {
    let min_age = MIN_RETENTION_AGE.as_nanos() as u64;
    if retention.max_age_nanos > 0 && retention.max_age_nanos < min_age {
        return Err(Error::InvalidArgument(format!(
            "retention max_age must be at least {}s (or unset for no age limit)",
            MIN_RETENTION_AGE.as_secs()
        )));
    }
    if retention.max_bytes > 0 && retention.max_bytes < MIN_RETENTION_BYTES {
        return Err(Error::InvalidArgument(format!(
            "retention max_bytes must be at least {MIN_RETENTION_BYTES} (1 MiB), or 0 for no size limit"
        )));
    }
    Ok(())
}

/// Checks a start or read offset against a stream's bounds.
pub(crate) fn check_offset(stream: &str, offset: u64, head: Head) -> Result<(), Error> {
    if head.deleted {
        return Err(Error::StreamNotFound(stream.to_string()));
    }
    if offset > head.next_offset {
        return Err(Error::OffsetPastHead {
            stream: stream.to_string(),
            offset,
            head: head.next_offset,
        });
    }
    if offset < head.first_offset {
        return Err(Error::OffsetTrimmed {
            stream: stream.to_string(),
            offset,
            first: head.first_offset,
        });
    }
    Ok(())
}

/// Checks a stored stream name: a stream name, optionally after a tenant
/// and `/` (see `auth`).
pub(crate) fn validate_stored_name(name: &str) -> Result<(), Error> {
    match name.split_once('/') {
        Some((tenant, stream)) if !tenant.is_empty() && !tenant.contains('/') => {
            validate_stream_name(stream)
        }
        _ => validate_stream_name(name),
    }
}

/// Checks a stream name: 1 to 200 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_stream_name(name: &str) -> Result<(), Error> {
    match crate::names::name_problem(name, MAX_STREAM_NAME_LEN) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidStreamName {
            name: name.to_string(),
            reason,
        }),
    }
}
