//! The JetStream message of one appended group: every chunk of the group
//! and the idempotency records it made, in one message, so a group is
//! written all or nothing (JetStream 2.9 has no multi-message atomic
//! publish) and the records travel with the events they describe.
//!
//! The records are also written to the record store after the message
//! (that is where lookups find them), but the message is the truth: a
//! server that finds a message its writer did not finish (it crashed
//! between the two, or another server wrote it) writes the message's
//! records again before it appends after it ("rolling forward"), so a
//! retry of an acknowledged batch is always found.
//!
//! Layout, big-endian: the magic `PSG1`; a u32 chunk count, then per
//! chunk a u32 length and the chunk as the sled engine stores it; a u32
//! record count, then per record a u16 key length, the key (UTF-8) and the
//! encoded [`IdempotencyRecord`]. The message's headers repeat what a
//! lookup needs without the payload: the first offset, the end offset and
//! the time of the last event.

use bytes::{Buf, BufMut, Bytes};

use crate::engine::{CodecError, IdempotencyRecord};

/// The header holding the group's first offset.
pub const FIRST_OFFSET: &str = "Ps-First-Offset";
/// The header holding the offset after the group's last event.
pub const END_OFFSET: &str = "Ps-End-Offset";
/// The header holding the append time of the group's events.
pub const TIME: &str = "Ps-Time";
/// The header holding the stream's fencing token when the message was
/// written, after `=` (`=` alone: none), so the message that moved a head
/// also says which token is in force. A fencing token's change is a
/// message holding no events.
pub const FENCE: &str = "Ps-Fence";

const MAGIC: &[u8; 4] = b"PSG1";

/// A decoded group message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GroupMessage {
    /// The encoded chunks, in offset order (slices of the payload).
    pub chunks: Vec<Bytes>,
    /// The idempotency keys the group's batches carried, with their records.
    pub keys: Vec<(String, IdempotencyRecord)>,
}

/// The bytes [`encode`] adds to the chunks and records it frames.
pub const FRAMING_BYTES: usize = 4 + 4 + 4;

/// Encodes a group's chunks and records as one message payload.
pub fn encode<'a>(
    chunks: impl ExactSizeIterator<Item = &'a [u8]>,
    keys: &[(String, IdempotencyRecord)],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_slice(MAGIC);
    out.put_u32(chunks.len() as u32);
    for chunk in chunks {
        out.put_u32(chunk.len() as u32);
        out.put_slice(chunk);
    }
    out.put_u32(keys.len() as u32);
    for (key, record) in keys {
        out.put_u16(key.len() as u16);
        out.put_slice(key.as_bytes());
        out.put_slice(&record.encode());
    }
    out
}

/// Decodes a message payload made by [`encode`].
pub fn decode(mut payload: Bytes) -> Result<GroupMessage, CodecError> {
    fn need(buf: &Bytes, n: usize) -> Result<(), CodecError> {
        if buf.remaining() < n {
            Err(CodecError::Truncated)
        } else {
            Ok(())
        }
    }
    need(&payload, 8)?;
    if &payload[..4] != MAGIC {
        return Err(CodecError::Inconsistent(
            "not a Pullstream group message (bad magic)".into(),
        ));
    }
    payload.advance(4);
    let count = payload.get_u32() as usize;
    let mut message = GroupMessage::default();
    for _ in 0..count {
        need(&payload, 4)?;
        let len = payload.get_u32() as usize;
        need(&payload, len)?;
        message.chunks.push(payload.split_to(len));
    }
    need(&payload, 4)?;
    let keys = payload.get_u32() as usize;
    for _ in 0..keys {
        need(&payload, 2)?;
        let len = payload.get_u16() as usize;
        need(&payload, len)?;
        let key = String::from_utf8(payload.split_to(len).to_vec())
            .map_err(|_| CodecError::InvalidUtf8)?;
        need(&payload, IdempotencyRecord::ENCODED_LEN)?;
        let record = IdempotencyRecord::decode(&payload.split_to(IdempotencyRecord::ENCODED_LEN))?;
        message.keys.push((key, record));
    }
    if payload.has_remaining() {
        return Err(CodecError::TrailingBytes(payload.remaining()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(first_offset: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            first_offset,
            count: 3,
            time_unix_nanos: 42,
            fingerprint: 7,
        }
    }

    #[test]
    fn a_group_message_round_trips() {
        let chunks: Vec<Vec<u8>> = vec![b"first chunk".to_vec(), Vec::new(), vec![9; 300]];
        let keys = vec![("k1".to_string(), record(0)), ("é".to_string(), record(3))];
        let payload = encode(chunks.iter().map(Vec::as_slice), &keys);
        assert_eq!(
            payload.len(),
            FRAMING_BYTES
                + chunks.iter().map(|c| 4 + c.len()).sum::<usize>()
                + keys
                    .iter()
                    .map(|(k, _)| 2 + k.len() + IdempotencyRecord::ENCODED_LEN)
                    .sum::<usize>()
        );
        let decoded = decode(payload.into()).unwrap();
        assert_eq!(decoded.chunks, chunks);
        assert_eq!(decoded.keys, keys);
    }

    #[test]
    fn a_damaged_group_message_is_an_error_never_a_shorter_group() {
        let payload = encode([b"abc".as_slice()].into_iter(), &[("k".into(), record(0))]);
        for cut in 0..payload.len() {
            assert!(
                decode(Bytes::copy_from_slice(&payload[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert_eq!(decode(longer.into()), Err(CodecError::TrailingBytes(1)));
        let mut other = payload;
        other[0] = b'X';
        assert!(decode(other.into()).is_err());
    }
}
