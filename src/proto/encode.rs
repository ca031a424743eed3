//! The server's event encoder: stored records straight to `Event`
//! entries of a response (field 1), without building `Event` structs. It
//! sits next to the hand-written response types that carry them
//! (`wire.rs`), and `tests/integration/wire.rs` checks both against the
//! proto: an `Event` field added to the proto but not encoded here fails it.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{
    encode_key, encode_varint, encoded_len_varint, key_len, message, uint64, WireType,
};
use prost_types::Timestamp;

use crate::engine::EventRecord;

/// A protobuf timestamp from nanoseconds since the Unix epoch.
pub fn timestamp(unix_nanos: i64) -> Timestamp {
    Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        nanos: unix_nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// Encodes events as `events` entries (field 1) of a response, straight
/// from stored records: no `Event` struct, no per-event strings. `chunks`
/// gives each stored chunk's append time with its events and their
/// offsets. With a `version` pin, each event carries its rendering for
/// that version.
pub fn encode_events<'a, E>(
    stream: &str,
    chunks: impl IntoIterator<Item = (i64, E)>,
    version: &[u8],
) -> Bytes
where
    E: Iterator<Item = (u64, &'a EventRecord)>,
{
    let mut buf = BytesMut::new();
    for (time_unix_nanos, events) in chunks {
        let time = timestamp(time_unix_nanos);
        for (offset, record) in events {
            let (data, content_type, label): (&[u8], &[u8], &[u8]) =
                match record.rendering_for(version) {
                    Some(r) if !r.content_type.is_empty() => (&r.data, &r.content_type, &r.label),
                    Some(r) => (&r.data, &record.content_type, &r.label),
                    None => (&record.data, &record.content_type, b""),
                };
            let metadata_len: usize = record
                .metadata
                .iter()
                .map(|(k, v)| {
                    let entry = str_len(1, k) + str_len(2, v);
                    key_len(7) + encoded_len_varint(entry as u64) + entry
                })
                .sum();
            let body = str_len(1, stream)
                + if offset != 0 {
                    uint64::encoded_len(2, &offset)
                } else {
                    0
                }
                + str_len(3, &record.event_type)
                + str_len(4, &record.key)
                + str_len(5, data)
                + str_len(6, content_type)
                + metadata_len
                + message::encoded_len(8, &time)
                + str_len(9, label);
            buf.reserve(key_len(1) + encoded_len_varint(body as u64) + body);
            encode_key(1, WireType::LengthDelimited, &mut buf);
            encode_varint(body as u64, &mut buf);
            put_str(1, stream, &mut buf);
            if offset != 0 {
                uint64::encode(2, &offset, &mut buf);
            }
            put_str(3, &record.event_type, &mut buf);
            put_str(4, &record.key, &mut buf);
            put_str(5, data, &mut buf);
            put_str(6, content_type, &mut buf);
            for (k, v) in &record.metadata {
                encode_key(7, WireType::LengthDelimited, &mut buf);
                encode_varint((str_len(1, k) + str_len(2, v)) as u64, &mut buf);
                put_str(1, k, &mut buf);
                put_str(2, v, &mut buf);
            }
            message::encode(8, &time, &mut buf);
            put_str(9, label, &mut buf);
        }
    }
    buf.freeze()
}

/// The size of a length-delimited field (omitted when empty, as proto3 does).
fn str_len(tag: u32, value: impl AsRef<[u8]>) -> usize {
    let len = value.as_ref().len();
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn put_str(tag: u32, value: impl AsRef<[u8]>, buf: &mut BytesMut) {
    let value = value.as_ref();
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}
