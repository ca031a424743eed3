//! The on-disk encoding of chunks and stream metadata.
//!
//! A chunk is one sled value holding a run of consecutive events of one
//! stream, all appended by the same group commit (so they share one append
//! time). The format is a small length-prefixed binary layout, versioned by
//! its first byte, so that the wire contract (protobuf) can evolve without
//! rewriting stored data:
//!
//! ```text
//! chunk   = version:u8 (=3) first_offset:u64 time_unix_nanos:i64 count:u32 record* crc32:u32
//! record  = str(type) str(key) str(content_type) bytes(data) n_meta:u32 (str str)*
//!           n_versions:u32 (str(label) str(content_type) bytes(data))*
//! str     = len:u32 utf8-bytes        bytes = len:u32 raw-bytes
//! ```
//! `crc32` covers every byte before it. Version 2 chunks (written before
//! checksums) have no `crc32`, and version 1 chunks (before payload
//! versions) no `n_versions` part either; both are still read.
//! All integers are big-endian. Decoding never panics on bad input: it
//! returns [`CodecError`], which storage reports as corruption.

use bytes::{Buf, BufMut, Bytes};

/// Chunks as written now: version 2's layout and a CRC-32 of everything
/// before it, checked on every decode, so damage is never served.
const CHUNK_VERSION: u8 = 3;
/// Payload versions, no checksum (still read).
const CHUNK_VERSION_WITHOUT_CHECKSUM: u8 = 2;
const CHUNK_VERSION_WITHOUT_RENDERINGS: u8 = 1;
const CHECKSUM_LEN: usize = 4;
const META_VERSION: u8 = 2;
/// Metadata written before streams had retention limits (still read).
const META_VERSION_WITHOUT_RETENTION: u8 = 1;
const CONSUMER_VERSION: u8 = 1;
const GROUP_VERSION: u8 = 1;
const CHUNK_HEADER_LEN: usize = 1 + 8 + 8 + 4;

/// One event as stored: everything but its offset and time, which the
/// chunk holding it supplies.
///
/// Text fields are UTF-8 held in `Bytes` (checked when decoded), so a
/// decoded chunk's fields are slices of the stored value: reading an event
/// allocates nothing per field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventRecord {
    /// What happened, e.g. `invoice.paid` (UTF-8).
    pub event_type: Bytes,
    /// The entity the event is about; empty when none (UTF-8).
    pub key: Bytes,
    /// The media type of `data`; empty when none (UTF-8).
    pub content_type: Bytes,
    /// The payload.
    pub data: Bytes,
    /// Free-form attributes, sorted by key (UTF-8).
    pub metadata: Vec<(Bytes, Bytes)>,
    /// Extra renderings of the payload, sorted by label.
    pub renderings: Vec<Rendering>,
}

/// One extra rendering of an event's payload, for consumers pinned to a
/// payload version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Rendering {
    /// The version label, e.g. `2024-06-01` (UTF-8).
    pub label: Bytes,
    /// The media type of `data`; empty means the event's (UTF-8).
    pub content_type: Bytes,
    /// The payload in this version.
    pub data: Bytes,
}

impl Rendering {
    fn encoded_len(&self) -> usize {
        12 + self.label.len() + self.content_type.len() + self.data.len()
    }
}

impl EventRecord {
    /// The number of bytes this record takes in an encoded chunk.
    pub fn encoded_len(&self) -> usize {
        4 * 6
            + self.event_type.len()
            + self.key.len()
            + self.content_type.len()
            + self.data.len()
            + self
                .metadata
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>()
            + self
                .renderings
                .iter()
                .map(Rendering::encoded_len)
                .sum::<usize>()
    }

    /// The rendering for a consumer pinned to `version`: the one with the
    /// greatest label at or below it (byte order), or `None` for the
    /// default payload (no pin, or every label is newer).
    pub fn rendering_for(&self, version: &[u8]) -> Option<&Rendering> {
        if version.is_empty() {
            return None;
        }
        // Sorted by label: the last one not above the pin.
        let below = self
            .renderings
            .partition_point(|r| r.label.as_ref() <= version);
        below.checked_sub(1).map(|i| &self.renderings[i])
    }
}

/// A run of consecutive events of one stream, committed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The offset of `records[0]`.
    pub first_offset: u64,
    /// The append time of every event in the chunk, in nanoseconds since
    /// the Unix epoch.
    pub time_unix_nanos: i64,
    /// The events, in offset order.
    pub records: Vec<EventRecord>,
}

impl Chunk {
    /// The offset after the chunk's last event.
    pub fn end_offset(&self) -> u64 {
        self.first_offset + self.records.len() as u64
    }

    /// Whether `offset` falls inside this chunk.
    pub fn contains(&self, offset: u64) -> bool {
        offset >= self.first_offset && offset < self.end_offset()
    }

    /// The number of bytes [`Chunk::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        CHUNK_HEADER_LEN
            + CHECKSUM_LEN
            + self
                .records
                .iter()
                .map(EventRecord::encoded_len)
                .sum::<usize>()
    }

    /// Encodes the chunk for storage, with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_unchecked();
        out[0] = CHUNK_VERSION;
        let crc = crc32fast::hash(&out);
        out.put_u32(crc);
        out
    }

    /// The version 2 encoding (no checksum): stable, so it is what
    /// idempotency fingerprints hash.
    pub fn encode_unchecked(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.put_u8(CHUNK_VERSION_WITHOUT_CHECKSUM);
        out.put_u64(self.first_offset);
        out.put_i64(self.time_unix_nanos);
        out.put_u32(self.records.len() as u32);
        for record in &self.records {
            put_bytes(&mut out, &record.event_type);
            put_bytes(&mut out, &record.key);
            put_bytes(&mut out, &record.content_type);
            put_bytes(&mut out, &record.data);
            out.put_u32(record.metadata.len() as u32);
            for (k, v) in &record.metadata {
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
            out.put_u32(record.renderings.len() as u32);
            for r in &record.renderings {
                put_bytes(&mut out, &r.label);
                put_bytes(&mut out, &r.content_type);
                put_bytes(&mut out, &r.data);
            }
        }
        out
    }

    /// Decodes a chunk. Payloads are slices of `buf`, not copies.
    pub fn decode(buf: Bytes) -> Result<Chunk, CodecError> {
        Chunk::decode_where(buf, None)
    }

    /// Decodes a chunk, but only the records for which `keep(type, key)`
    /// holds; the others become empty placeholders (`EventRecord::default()`,
    /// which has no type) at their positions. Their layout is still
    /// checked, but not their text, and they cost no copy or reference
    /// count: a filtered scan over many non-matching events stays cheap.
    pub fn decode_where(mut buf: Bytes, keep: Option<Keep<'_>>) -> Result<Chunk, CodecError> {
        if buf.remaining() < CHUNK_HEADER_LEN {
            return Err(CodecError::Truncated);
        }
        let version = buf.get_u8();
        if version == CHUNK_VERSION {
            if buf.remaining() < CHUNK_HEADER_LEN - 1 + CHECKSUM_LEN {
                return Err(CodecError::Truncated);
            }
            // `buf` is past the version byte: check the whole value.
            let body = buf.len() - CHECKSUM_LEN;
            let stored = (&buf[body..]).get_u32();
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&[version]);
            hasher.update(&buf[..body]);
            if hasher.finalize() != stored {
                return Err(CodecError::Checksum);
            }
            buf.truncate(body);
        } else if version != CHUNK_VERSION_WITHOUT_CHECKSUM
            && version != CHUNK_VERSION_WITHOUT_RENDERINGS
        {
            return Err(CodecError::UnknownVersion(version));
        }
        let with_renderings = version != CHUNK_VERSION_WITHOUT_RENDERINGS;
        let first_offset = buf.get_u64();
        let time_unix_nanos = buf.get_i64();
        let count = buf.get_u32() as usize;
        // Each record takes at least 20 bytes: a count beyond that is corrupt
        // and must not drive a huge allocation.
        if count > buf.remaining() / 20 + 1 {
            return Err(CodecError::Truncated);
        }
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            if let Some(keep) = keep {
                let (event_type, key) = peek_type_and_key(&buf)?;
                if !keep(event_type, key) {
                    skip_record(&mut buf, with_renderings)?;
                    records.push(EventRecord::default());
                    continue;
                }
            }
            let event_type = get_string(&mut buf)?;
            let key = get_string(&mut buf)?;
            let content_type = get_string(&mut buf)?;
            let data = get_bytes(&mut buf)?;
            let n_meta = get_u32(&mut buf)? as usize;
            if n_meta > buf.remaining() / 8 {
                return Err(CodecError::Truncated);
            }
            let mut metadata = Vec::with_capacity(n_meta);
            for _ in 0..n_meta {
                metadata.push((get_string(&mut buf)?, get_string(&mut buf)?));
            }
            let mut renderings = Vec::new();
            if with_renderings {
                let n = get_u32(&mut buf)? as usize;
                if n > buf.remaining() / 12 {
                    return Err(CodecError::Truncated);
                }
                renderings.reserve_exact(n);
                for _ in 0..n {
                    renderings.push(Rendering {
                        label: get_string(&mut buf)?,
                        content_type: get_string(&mut buf)?,
                        data: get_bytes(&mut buf)?,
                    });
                }
            }
            records.push(EventRecord {
                event_type,
                key,
                content_type,
                data,
                metadata,
                renderings,
            });
        }
        if buf.has_remaining() {
            return Err(CodecError::TrailingBytes(buf.remaining()));
        }
        Ok(Chunk {
            first_offset,
            time_unix_nanos,
            records,
        })
    }
}

/// What a chunk's header says, read without decoding its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The offset of the chunk's first event.
    pub first_offset: u64,
    /// The append time of its events.
    pub time_unix_nanos: i64,
    /// How many events it holds.
    pub count: u32,
}

impl ChunkHeader {
    /// Reads the header of an encoded chunk.
    pub fn decode(mut buf: &[u8]) -> Result<ChunkHeader, CodecError> {
        if buf.len() < CHUNK_HEADER_LEN {
            return Err(CodecError::Truncated);
        }
        let version = buf.get_u8();
        if version != CHUNK_VERSION
            && version != CHUNK_VERSION_WITHOUT_CHECKSUM
            && version != CHUNK_VERSION_WITHOUT_RENDERINGS
        {
            return Err(CodecError::UnknownVersion(version));
        }
        Ok(ChunkHeader {
            first_offset: buf.get_u64(),
            time_unix_nanos: buf.get_i64(),
            count: buf.get_u32(),
        })
    }

    /// The offset after the chunk's last event.
    pub fn end_offset(&self) -> u64 {
        self.first_offset + u64::from(self.count)
    }
}

/// How long a stream keeps its events. Zero means no limit; with several
/// limits an event goes as soon as any says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// The greatest age of an event, in nanoseconds.
    pub max_age_nanos: u64,
    /// The number of newest events kept (at least).
    pub max_events: u64,
    /// The bytes of newest events kept (at least).
    pub max_bytes: u64,
}

impl Retention {
    /// Whether the stream keeps everything.
    pub fn keeps_everything(&self) -> bool {
        *self == Retention::default()
    }
}

/// A stream's durable description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMeta {
    /// Internal id, unique for the life of the data dir: chunk keys use it,
    /// so a stream deleted and created again never sees old chunks.
    pub id: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// Offsets below this are gone (trimmed); the stream's first offset is
    /// the larger of this and its first stored chunk.
    pub offset_floor: u64,
    /// The head: the offset the next event gets. Written after the chunks
    /// of each group, so it never points past what is stored.
    pub next_offset: u64,
    /// Approximate bytes of stored chunks.
    pub bytes: u64,
    /// How long events are kept.
    pub retention: Retention,
}

impl StreamMeta {
    const LEN_WITHOUT_RETENTION: usize = 1 + 8 + 8 + 8 + 8 + 8;
    const LEN: usize = Self::LEN_WITHOUT_RETENTION + 8 + 8 + 8;

    /// Encodes the metadata for storage.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.put_u8(META_VERSION);
        out.put_u64(self.id);
        out.put_i64(self.created_unix_nanos);
        out.put_u64(self.offset_floor);
        out.put_u64(self.next_offset);
        out.put_u64(self.bytes);
        out.put_u64(self.retention.max_age_nanos);
        out.put_u64(self.retention.max_events);
        out.put_u64(self.retention.max_bytes);
        out
    }

    /// Decodes stored metadata.
    pub fn decode(mut buf: &[u8]) -> Result<StreamMeta, CodecError> {
        let Some(&version) = buf.first() else {
            return Err(CodecError::Truncated);
        };
        let len = match version {
            META_VERSION => Self::LEN,
            META_VERSION_WITHOUT_RETENTION => Self::LEN_WITHOUT_RETENTION,
            other => return Err(CodecError::UnknownVersion(other)),
        };
        if buf.len() != len {
            return Err(CodecError::Truncated);
        }
        buf.advance(1);
        let mut meta = StreamMeta {
            id: buf.get_u64(),
            created_unix_nanos: buf.get_i64(),
            offset_floor: buf.get_u64(),
            next_offset: buf.get_u64(),
            bytes: buf.get_u64(),
            retention: Retention::default(),
        };
        if version == META_VERSION {
            meta.retention = Retention {
                max_age_nanos: buf.get_u64(),
                max_events: buf.get_u64(),
                max_bytes: buf.get_u64(),
            };
        }
        Ok(meta)
    }
}

/// What an idempotency key remembers: the original append's outcome and a
/// fingerprint of its batch, to tell a retry from a different batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The original batch's first offset.
    pub first_offset: u64,
    /// The original batch's event count.
    pub count: u32,
    /// The original append time, nanoseconds since the Unix epoch.
    pub time_unix_nanos: i64,
    /// A 128-bit hash of the original batch (see `log::fingerprint`).
    pub fingerprint: u128,
}

impl IdempotencyRecord {
    const LEN: usize = 8 + 4 + 8 + 16;
    /// The length of [`IdempotencyRecord::encode`]'s output.
    pub const ENCODED_LEN: usize = Self::LEN;

    /// Encodes the record for storage.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.put_u64(self.first_offset);
        out.put_u32(self.count);
        out.put_i64(self.time_unix_nanos);
        out.put_u128(self.fingerprint);
        out
    }

    /// Decodes a stored record.
    pub fn decode(mut buf: &[u8]) -> Result<IdempotencyRecord, CodecError> {
        if buf.len() != Self::LEN {
            return Err(CodecError::Truncated);
        }
        Ok(IdempotencyRecord {
            first_offset: buf.get_u64(),
            count: buf.get_u32(),
            time_unix_nanos: buf.get_i64(),
            fingerprint: buf.get_u128(),
        })
    }
}

/// A durable consumer as stored: its cursor and settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerRecord {
    /// The committed cursor.
    pub next_offset: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// Last commit time, nanoseconds since the Unix epoch; 0 when never.
    pub last_commit_unix_nanos: i64,
    /// The saved type patterns of its filter.
    pub types: Vec<String>,
    /// The saved keys of its filter.
    pub keys: Vec<String>,
    /// The saved payload version; empty for the default rendering.
    pub version: String,
}

impl ConsumerRecord {
    /// Encodes the record for storage.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.put_u8(CONSUMER_VERSION);
        out.put_u64(self.next_offset);
        out.put_i64(self.created_unix_nanos);
        out.put_i64(self.last_commit_unix_nanos);
        for list in [&self.types, &self.keys] {
            out.put_u32(list.len() as u32);
            for item in list {
                put_bytes(&mut out, item.as_bytes());
            }
        }
        put_bytes(&mut out, self.version.as_bytes());
        out
    }

    /// Decodes a stored record.
    pub fn decode(value: &[u8]) -> Result<ConsumerRecord, CodecError> {
        let mut buf = Bytes::copy_from_slice(value);
        if buf.remaining() < 1 + 24 {
            return Err(CodecError::Truncated);
        }
        let version = buf.get_u8();
        if version != CONSUMER_VERSION {
            return Err(CodecError::UnknownVersion(version));
        }
        let next_offset = buf.get_u64();
        let created_unix_nanos = buf.get_i64();
        let last_commit_unix_nanos = buf.get_i64();
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = get_u32(&mut buf)? as usize;
            if n > buf.remaining() / 4 {
                return Err(CodecError::Truncated);
            }
            for _ in 0..n {
                list.push(text(get_string(&mut buf)?));
            }
        }
        let version = text(get_string(&mut buf)?);
        if buf.has_remaining() {
            return Err(CodecError::TrailingBytes(buf.remaining()));
        }
        let [types, keys] = lists;
        Ok(ConsumerRecord {
            next_offset,
            created_unix_nanos,
            last_commit_unix_nanos,
            types,
            keys,
            version,
        })
    }
}

/// A consumer group's durable state: the committed offset of each of its
/// key slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// Per slot: the offset below which the slot's events are handled.
    pub committed: Vec<u64>,
}

impl GroupRecord {
    /// Encodes the record for storage.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 4 + 8 * self.committed.len());
        out.put_u8(GROUP_VERSION);
        out.put_i64(self.created_unix_nanos);
        out.put_u32(self.committed.len() as u32);
        for &offset in &self.committed {
            out.put_u64(offset);
        }
        out
    }

    /// Decodes a stored record.
    pub fn decode(mut buf: &[u8]) -> Result<GroupRecord, CodecError> {
        if buf.remaining() < 1 + 8 + 4 {
            return Err(CodecError::Truncated);
        }
        let version = buf.get_u8();
        if version != GROUP_VERSION {
            return Err(CodecError::UnknownVersion(version));
        }
        let created_unix_nanos = buf.get_i64();
        let n = buf.get_u32() as usize;
        if buf.remaining() != n * 8 {
            return Err(CodecError::Truncated);
        }
        let committed = (0..n).map(|_| buf.get_u64()).collect();
        Ok(GroupRecord {
            created_unix_nanos,
            committed,
        })
    }
}

/// A string from bytes `get_string` already checked.
fn text(bytes: Bytes) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The value ends before its declared content.
    #[error("value is truncated")]
    Truncated,
    /// The value was written by an unknown format version.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// The value has bytes after its declared content.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A text field is not UTF-8.
    #[error("text field is not valid UTF-8")]
    InvalidUtf8,
    /// Stored values contradict each other.
    #[error("{0}")]
    Inconsistent(String),
    /// The value's checksum does not match its bytes.
    #[error("checksum mismatch")]
    Checksum,
}

/// A record selector for [`Chunk::decode_where`]: `(type, key) -> keep?`.
pub type Keep<'a> = &'a dyn Fn(&[u8], &[u8]) -> bool;

/// The type and key of the record at the start of `buf`, without consuming.
fn peek_type_and_key(buf: &[u8]) -> Result<(&[u8], &[u8]), CodecError> {
    let field = |at: usize| -> Result<(&[u8], usize), CodecError> {
        let len_bytes = buf.get(at..at + 4).ok_or(CodecError::Truncated)?;
        let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let value = buf.get(at + 4..at + 4 + len).ok_or(CodecError::Truncated)?;
        Ok((value, at + 4 + len))
    };
    let (event_type, next) = field(0)?;
    let (key, _) = field(next)?;
    Ok((event_type, key))
}

/// Moves `buf` past one record, checking only that its lengths fit.
fn skip_record(buf: &mut Bytes, with_renderings: bool) -> Result<(), CodecError> {
    let skip_field = |buf: &mut Bytes| -> Result<(), CodecError> {
        let len = get_u32(buf)? as usize;
        if buf.remaining() < len {
            return Err(CodecError::Truncated);
        }
        buf.advance(len);
        Ok(())
    };
    for _ in 0..4 {
        skip_field(buf)?;
    }
    let n_meta = get_u32(buf)? as usize;
    for _ in 0..n_meta * 2 {
        skip_field(buf)?;
    }
    if with_renderings {
        let n = get_u32(buf)? as usize;
        for _ in 0..n * 3 {
            skip_field(buf)?;
        }
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn get_u32(buf: &mut Bytes) -> Result<u32, CodecError> {
    if buf.remaining() < 4 {
        return Err(CodecError::Truncated);
    }
    Ok(buf.get_u32())
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, CodecError> {
    let len = get_u32(buf)? as usize;
    if buf.remaining() < len {
        return Err(CodecError::Truncated);
    }
    Ok(buf.split_to(len))
}

fn get_string(buf: &mut Bytes) -> Result<Bytes, CodecError> {
    let bytes = get_bytes(buf)?;
    std::str::from_utf8(&bytes).map_err(|_| CodecError::InvalidUtf8)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Chunk {
        Chunk {
            first_offset: 42,
            time_unix_nanos: 1_700_000_000_123_456_789,
            records: vec![
                EventRecord {
                    event_type: "invoice.paid".into(),
                    key: "in_123".into(),
                    content_type: "application/json".into(),
                    data: Bytes::from_static(br#"{"amount":100}"#),
                    metadata: vec![("trace".into(), "abc".into()), ("é".into(), "".into())],
                    renderings: vec![
                        Rendering {
                            label: "2023-01-01".into(),
                            content_type: "".into(),
                            data: Bytes::from_static(b"old"),
                        },
                        Rendering {
                            label: "2024-06-01".into(),
                            content_type: "application/xml".into(),
                            data: Bytes::from_static(b"<new/>"),
                        },
                    ],
                },
                EventRecord {
                    event_type: "x".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn chunk_round_trips() {
        let chunk = sample();
        let encoded = chunk.encode();
        assert_eq!(encoded.len(), chunk.encoded_len());
        let decoded = Chunk::decode(Bytes::from(encoded)).unwrap();
        assert_eq!(decoded, chunk);
        assert_eq!(decoded.end_offset(), 44);
        assert!(decoded.contains(42) && decoded.contains(43));
        assert!(!decoded.contains(41) && !decoded.contains(44));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let encoded = sample().encode();
        for len in 0..encoded.len() {
            let result = Chunk::decode(Bytes::copy_from_slice(&encoded[..len]));
            assert!(result.is_err(), "prefix of {len} bytes decoded");
        }
    }

    #[test]
    fn trailing_bytes_and_unknown_version_are_rejected() {
        // The layout checks, on the unchecksummed version 2 encoding.
        let mut encoded = sample().encode_unchecked();
        encoded.push(0);
        assert_eq!(
            Chunk::decode(Bytes::from(encoded.clone())),
            Err(CodecError::TrailingBytes(1))
        );
        encoded.pop();
        encoded[0] = 9;
        assert_eq!(
            Chunk::decode(Bytes::from(encoded)),
            Err(CodecError::UnknownVersion(9))
        );
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut chunk = sample();
        chunk.records.truncate(1);
        chunk.records[0].metadata.clear();
        let mut encoded = chunk.encode_unchecked();
        // The type's first byte sits right after the header and its length.
        encoded[CHUNK_HEADER_LEN + 4] = 0xff;
        assert_eq!(
            Chunk::decode(Bytes::from(encoded)),
            Err(CodecError::InvalidUtf8)
        );
    }

    #[test]
    fn every_flipped_bit_is_caught_by_the_checksum() {
        let encoded = sample().encode();
        assert_eq!(Chunk::decode(Bytes::from(encoded.clone())), Ok(sample()));
        assert_eq!(
            Chunk::decode(Bytes::from(sample().encode_unchecked())),
            Ok(sample()),
            "version 2 chunks are still read"
        );
        for byte in 1..encoded.len() {
            for bit in 0..8 {
                let mut flipped = encoded.clone();
                flipped[byte] ^= 1 << bit;
                assert!(
                    Chunk::decode(Bytes::from(flipped)).is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn huge_declared_count_does_not_allocate() {
        let mut encoded = sample().encode();
        encoded[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Chunk::decode(Bytes::from(encoded)).is_err());
    }

    #[test]
    fn meta_and_idempotency_round_trip() {
        let meta = StreamMeta {
            id: 7,
            created_unix_nanos: -5,
            offset_floor: 10,
            next_offset: 12,
            bytes: 1 << 40,
            retention: Retention {
                max_age_nanos: 3,
                max_events: 4,
                max_bytes: 5,
            },
        };
        assert_eq!(StreamMeta::decode(&meta.encode()), Ok(meta));
        let group = GroupRecord {
            created_unix_nanos: 9,
            committed: vec![0, 5, u64::MAX],
        };
        assert_eq!(GroupRecord::decode(&group.encode()), Ok(group.clone()));
        assert!(GroupRecord::decode(&group.encode()[..20]).is_err());
        // Metadata from before retention reads as "keep everything".
        let old = &meta.encode()[..StreamMeta::LEN_WITHOUT_RETENTION];
        let mut old = old.to_vec();
        old[0] = META_VERSION_WITHOUT_RETENTION;
        assert_eq!(
            StreamMeta::decode(&old),
            Ok(StreamMeta {
                retention: Retention::default(),
                ..meta
            })
        );
        let chunk = sample();
        let header = ChunkHeader::decode(&chunk.encode()).unwrap();
        assert_eq!(header.first_offset, chunk.first_offset);
        assert_eq!(header.time_unix_nanos, chunk.time_unix_nanos);
        assert_eq!(header.end_offset(), chunk.end_offset());
        let rec = IdempotencyRecord {
            first_offset: 3,
            count: 2,
            time_unix_nanos: 99,
            fingerprint: u128::MAX - 1,
        };
        assert_eq!(IdempotencyRecord::decode(&rec.encode()), Ok(rec));
        assert!(StreamMeta::decode(&[1, 2]).is_err());
        let consumer = ConsumerRecord {
            next_offset: 17,
            created_unix_nanos: 5,
            last_commit_unix_nanos: 6,
            types: vec!["invoice.>".into(), "*.deleted".into()],
            keys: vec!["cus_1".into()],
            version: "2024-06-01".into(),
        };
        let encoded = consumer.encode();
        assert_eq!(ConsumerRecord::decode(&encoded), Ok(consumer));
        for cut in 0..encoded.len() {
            assert!(
                ConsumerRecord::decode(&encoded[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_selective_decode_keeps_positions_and_checks_layout() {
        let chunk = sample();
        let encoded = Bytes::from(chunk.encode());
        let keep_x: Keep = &|t, _| t == b"x";
        let partial = Chunk::decode_where(encoded.clone(), Some(keep_x)).unwrap();
        assert_eq!(partial.records.len(), 2);
        assert_eq!(partial.records[0], EventRecord::default(), "skipped");
        assert_eq!(partial.records[1], chunk.records[1], "kept");
        let keep_all: Keep = &|_, _| true;
        assert_eq!(
            Chunk::decode_where(encoded.clone(), Some(keep_all)).unwrap(),
            chunk
        );
        for cut in 0..encoded.len() {
            assert!(
                Chunk::decode_where(encoded.slice(..cut), Some(keep_x)).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn version_1_chunks_are_still_read() {
        // A chunk as the first format wrote it: no renderings part.
        let mut old = vec![1u8];
        old.extend_from_slice(&7u64.to_be_bytes());
        old.extend_from_slice(&9i64.to_be_bytes());
        old.extend_from_slice(&1u32.to_be_bytes());
        for field in [&b"a.b"[..], b"k", b"", b"data"] {
            old.extend_from_slice(&(field.len() as u32).to_be_bytes());
            old.extend_from_slice(field);
        }
        old.extend_from_slice(&0u32.to_be_bytes());
        let chunk = Chunk::decode(Bytes::from(old)).unwrap();
        assert_eq!(chunk.first_offset, 7);
        assert_eq!(chunk.records[0].event_type, "a.b");
        assert_eq!(chunk.records[0].data, "data");
        assert!(chunk.records[0].renderings.is_empty());
    }

    #[test]
    fn the_pinned_version_picks_the_newest_rendering_at_or_below_it() {
        let record = &sample().records[0];
        let label = |v: &str| record.rendering_for(v.as_bytes()).map(|r| r.label.clone());
        assert_eq!(label(""), None, "no pin: the default payload");
        assert_eq!(label("2022-12-31"), None, "older than every rendering");
        assert_eq!(label("2023-01-01"), Some("2023-01-01".into()), "exact");
        assert_eq!(label("2024-01-01"), Some("2023-01-01".into()), "between");
        assert_eq!(label("2024-06-01"), Some("2024-06-01".into()));
        assert_eq!(label("2099-01-01"), Some("2024-06-01".into()), "newer pin");
        assert_eq!(sample().records[1].rendering_for(b"2024-06-01"), None);
    }
}
