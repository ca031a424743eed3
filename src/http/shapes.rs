//! The JSON bodies the HTTP API takes (appends, stream settings, commits),
//! and its status page; events, streams and consumers are written in the
//! one JSON form (`proto::json`) the CLI prints too.
//!
//! An appended event gives its payload as `data` (any JSON value, stored
//! as its JSON text with content type `application/json` unless another
//! is named), `data_text` (a string, stored as UTF-8 with content type
//! `text/plain; charset=utf-8` unless another is named) or `data_base64`
//! (bytes): at most one of them.

use std::collections::HashMap;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::proto as pb;

/// The body of `POST /v1/streams/{stream}/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// The batch, appended atomically.
    pub events: Vec<NewEventBody>,
    /// Append only if the stream's next offset is this (else 412).
    #[serde(default)]
    pub expected_next_offset: Option<u64>,
    /// The producer's fencing token, if the stream is fenced.
    #[serde(default)]
    pub fencing_token: String,
}

/// One event of an append.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEventBody {
    /// What happened, e.g. `invoice.paid`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The entity it is about.
    #[serde(default)]
    pub key: String,
    /// The payload as any JSON value.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// The payload as text (UTF-8).
    #[serde(default)]
    pub data_text: Option<String>,
    /// The payload as base64 bytes (standard alphabet, padded).
    #[serde(default)]
    pub data_base64: Option<String>,
    /// The payload's media type.
    #[serde(default)]
    pub content_type: String,
    /// Free-form string attributes.
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    /// Extra renderings by version label.
    #[serde(default)]
    pub versions: HashMap<String, VersionBody>,
}

/// One rendering of a payload, in an append.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionBody {
    /// The payload as any JSON value.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// The payload as text (UTF-8).
    #[serde(default)]
    pub data_text: Option<String>,
    /// The payload as base64 bytes.
    #[serde(default)]
    pub data_base64: Option<String>,
    /// Its media type; empty means the event's.
    #[serde(default)]
    pub content_type: String,
}

/// A payload from one of `data`, `data_text` and `data_base64`, and the
/// content type to store with it.
fn payload(
    data: Option<Box<RawValue>>,
    data_text: Option<String>,
    data_base64: Option<String>,
    content_type: String,
    what: &str,
) -> Result<(bytes::Bytes, String), Error> {
    let or_default = |default: &str| {
        if content_type.is_empty() {
            default.to_string()
        } else {
            content_type.clone()
        }
    };
    match (data, data_text, data_base64) {
        (Some(raw), None, None) => {
            let text: Box<str> = raw.into();
            Ok((
                bytes::Bytes::from(text.into_boxed_bytes()),
                or_default("application/json"),
            ))
        }
        (None, Some(text), None) => Ok((
            bytes::Bytes::from(text.into_bytes()),
            or_default("text/plain; charset=utf-8"),
        )),
        (None, None, Some(encoded)) => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{what}: `data_base64` is not valid base64 ({e})"
                    ))
                })?;
            Ok((data.into(), content_type))
        }
        (None, None, None) => Ok((bytes::Bytes::new(), content_type)),
        _ => Err(Error::InvalidArgument(format!(
            "{what} gives more than one of `data`, `data_text` and `data_base64`: give one"
        ))),
    }
}

impl AppendBody {
    /// The Append request this body stands for.
    pub fn into_request(
        self,
        stream: String,
        idempotency_key: String,
    ) -> Result<pb::AppendRequest, Error> {
        let mut events = Vec::with_capacity(self.events.len());
        for (i, event) in self.events.into_iter().enumerate() {
            let what = format!("event {i}");
            let (data, content_type) = payload(
                event.data,
                event.data_text,
                event.data_base64,
                event.content_type,
                &what,
            )?;
            let mut versions = HashMap::with_capacity(event.versions.len());
            for (label, version) in event.versions {
                let (data, content_type) = payload(
                    version.data,
                    version.data_text,
                    version.data_base64,
                    version.content_type,
                    &format!("{what}, version {label:?}"),
                )?;
                versions.insert(label, pb::PayloadVersion { data, content_type });
            }
            events.push(pb::NewEvent {
                r#type: event.event_type.into(),
                key: event.key.into(),
                data,
                content_type: content_type.into(),
                metadata: event.metadata,
                versions,
            });
        }
        Ok(pb::AppendRequest {
            stream,
            events,
            expected_next_offset: self.expected_next_offset,
            idempotency_key,
            fencing_token: self.fencing_token,
        })
    }
}

/// A retention policy from `PUT /v1/streams/{stream}`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionBody {
    /// Events older than this are trimmed (`7d`, `12h`).
    #[serde(default)]
    pub max_age: Option<String>,
    /// At most this many events are kept.
    #[serde(default)]
    pub max_events: u64,
    /// At most about this many bytes are kept.
    #[serde(default)]
    pub max_bytes: u64,
}

/// The body of `PUT /v1/streams/{stream}` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamBody {
    /// The stream's retention; absent keeps everything.
    #[serde(default)]
    pub retention: Option<RetentionBody>,
}

impl RetentionBody {
    /// The proto form.
    pub fn into_proto(self) -> Result<pb::RetentionPolicy, Error> {
        let max_age = match self.max_age {
            None => None,
            Some(text) => {
                let age = humantime::parse_duration(&text).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "retention max_age {text:?}: {e} (write durations like 12h or 7d)"
                    ))
                })?;
                Some(prost_types::Duration::try_from(age).map_err(|_| {
                    Error::InvalidArgument(format!("retention max_age {text:?} is too long"))
                })?)
            }
        };
        Ok(pb::RetentionPolicy {
            max_age,
            max_events: self.max_events,
            max_bytes: self.max_bytes,
        })
    }
}

/// The body of `POST .../consumers/{name}/commit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    /// The offset the consumer resumes from: one past the last event it
    /// processed (a page's `next_offset`).
    pub next_offset: Option<u64>,
    /// Instead of an offset: the first event appended at or after this
    /// RFC 3339 time.
    pub time: Option<String>,
    /// Also remove the consumer's saved filter.
    #[serde(default)]
    pub clear_filter: bool,
    /// Also remove the consumer's saved payload version.
    #[serde(default)]
    pub clear_version: bool,
}

impl CommitBody {
    /// The CommitCursor request this body stands for.
    pub fn into_request(
        self,
        stream: String,
        consumer: String,
    ) -> Result<pb::CommitCursorRequest, Error> {
        let time = match (self.next_offset, self.time) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "give next_offset or time, not both".into(),
                ))
            }
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "give next_offset (one past the last event processed) or time".into(),
                ))
            }
            (_, None) => None,
            (_, Some(text)) => {
                let time = humantime::parse_rfc3339_weak(&text).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "time {text:?} is not an RFC 3339 time (e.g. 2026-11-27T08:00:00Z)"
                    ))
                })?;
                let since = time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| Error::InvalidArgument(format!("time {text:?} is before 1970")))?;
                Some(prost_types::Timestamp {
                    seconds: since.as_secs() as i64,
                    nanos: since.subsec_nanos() as i32,
                })
            }
        };
        Ok(pb::CommitCursorRequest {
            stream,
            consumer,
            next_offset: self.next_offset.unwrap_or_default(),
            clear_filter: self.clear_filter,
            clear_version: self.clear_version,
            time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appended_payload_is_one_of_data_and_data_base64() {
        let body: AppendBody = serde_json::from_str(
            r#"{"events":[{"type":"a","data":{"x": [1, 2]}},{"type":"b","data_base64":"AAE=","content_type":"application/octet-stream"}]}"#,
        )
        .unwrap();
        let request = body.into_request("s".into(), String::new()).unwrap();
        assert_eq!(&request.events[0].data[..], br#"{"x": [1, 2]}"#);
        assert_eq!(request.events[0].content_type, "application/json");
        assert_eq!(&request.events[1].data[..], &[0, 1]);
        let both: AppendBody =
            serde_json::from_str(r#"{"events":[{"type":"a","data":1,"data_base64":"AA=="}]}"#)
                .unwrap();
        assert!(both.into_request("s".into(), String::new()).is_err());
    }
}
