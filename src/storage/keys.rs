//! The key layout of the one sled tree (see the table in `storage`'s
//! module docs): big-endian ids and offsets, so sled's key order is offset
//! order within a stream.

pub(super) const STREAM_PREFIX: u8 = b's';
pub(super) const CHUNK_PREFIX: u8 = b'c';
pub(super) const IDEMPOTENCY_PREFIX: u8 = b'i';
pub(super) const CONSUMER_PREFIX: u8 = b'u';
pub(super) const API_KEY_PREFIX: u8 = b'a';
pub(super) const GROUP_PREFIX: u8 = b'g';
pub(super) const FENCE_PREFIX: u8 = b'f';
/// The last write-ahead log sequence number a checkpoint made durable in
/// sled, written by the checkpoint itself just before sled's flush (so
/// sled's prefix recovery keeps it only with everything before it).
pub(super) const CHECKPOINT_KEY: &[u8] = b"m/checkpoint";

pub(super) fn stream_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(STREAM_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key
}

pub(super) fn chunk_key(stream_id: u64, first_offset: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = CHUNK_PREFIX;
    key[1..9].copy_from_slice(&stream_id.to_be_bytes());
    key[9..].copy_from_slice(&first_offset.to_be_bytes());
    key
}

pub(super) fn offset_of_chunk_key(key: &[u8]) -> u64 {
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&key[9..17]);
    u64::from_be_bytes(offset)
}

pub(super) fn consumer_key(stream_id: u64, name: &str) -> Vec<u8> {
    named_key(CONSUMER_PREFIX, stream_id, name)
}

/// `prefix stream_id name`: a per-stream named record.
pub(super) fn named_key(prefix: u8, stream_id: u64, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + name.len());
    key.push(prefix);
    key.extend_from_slice(&stream_id.to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

pub(super) fn idempotency_prefix(stream_id: u64) -> [u8; 9] {
    let mut prefix = [0u8; 9];
    prefix[0] = IDEMPOTENCY_PREFIX;
    prefix[1..].copy_from_slice(&stream_id.to_be_bytes());
    prefix
}

pub(super) fn idempotency_key(stream_id: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.push(IDEMPOTENCY_PREFIX);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}
