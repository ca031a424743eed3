//! The sled store as the [`Engine`] the stream layer talks to: how each
//! change is laid out in sled's keys (prepared here, written by
//! [`Store`]'s one commit path), and how events, consumers, groups and
//! idempotency keys are read back. The helpers below the trait are the
//! scans recovery and loading share.

use bytes::Bytes;

use super::keys::*;
use super::{During, Op, StorageError, Store, StoredStream};
use crate::engine::{
    Chunk, ChunkHeader, CodecError, ConsumerRecord, EncodedChunk, Engine, GroupRecord,
    IdempotencyRecord, Keep, Prepared, StreamMeta,
};

impl Engine for Store {
    /// Loads every stream with its first offset and head, removing what
    /// an unfinished group left past the head (never acknowledged).
    fn load_streams(&self) -> Result<Vec<StoredStream>, StorageError> {
        let mut streams = Vec::new();
        for item in self.stream_metas() {
            let (name, meta) = item?;
            let next_offset = meta.next_offset.max(meta.offset_floor);
            self.remove_past_head(&name, meta.id, next_offset)?;
            streams.push(self.stored(name, meta)?);
        }
        Ok(streams)
    }

    /// The stream as sled holds it now. Reads only: with the log on, a
    /// change reaches sled only once durable, and one that failed never
    /// does, so there is nothing past the head to remove.
    fn stored_stream(&self, name: &str) -> Result<Option<StoredStream>, StorageError> {
        let Some(value) = self
            .tree
            .get(stream_key(name))
            .during(self.path(), "reading a stream's metadata")?
        else {
            return Ok(None);
        };
        let meta = StreamMeta::decode(&value).map_err(|source| StorageError::Corrupt {
            what: format!("metadata of stream {name}"),
            source,
        })?;
        self.stored(name.to_string(), meta).map(Some)
    }

    /// A new stream id, never handed out before in this data dir.
    fn new_stream_id(&self) -> Result<u64, StorageError> {
        self.db
            .generate_id()
            .during(self.path(), "allocating a stream id")
    }

    /// Writes a stream's metadata (creating the stream when new).
    /// Durable when it returns: logged to the write-ahead log when it is
    /// on, otherwise synced (creating a stream is rare).
    fn put_stream(&self, name: &str, meta: &StreamMeta) -> Result<(), StorageError> {
        self.write_durably(vec![Op::Insert(stream_key(name), meta.encode())])
    }

    /// Rewrites a stream's metadata (a settings change). Returns the
    /// write-ahead log record, when the log is on.
    fn write_meta(&self, name: &str, meta: &StreamMeta) -> Result<Prepared, StorageError> {
        self.prepare(vec![Op::Insert(stream_key(name), meta.encode())])
    }

    /// Writes chunks, idempotency records and then the stream's updated
    /// metadata (with the new head): after a crash the group is either
    /// whole or, past the head, removed on open.
    /// Returns the write-ahead log record, when the log is on; the write is
    /// durable only once the record is logged.
    fn write_group(
        &self,
        name: &str,
        meta: &StreamMeta,
        chunks: Vec<EncodedChunk>,
        idempotency: &[(&str, IdempotencyRecord)],
    ) -> Result<Prepared, StorageError> {
        let mut ops = Vec::with_capacity(chunks.len() + idempotency.len() + 1);
        for chunk in chunks {
            ops.push(Op::Insert(
                chunk_key(meta.id, chunk.first_offset).to_vec(),
                chunk.value,
            ));
        }
        for (key, record) in idempotency {
            ops.push(Op::Insert(idempotency_key(meta.id, key), record.encode()));
        }
        ops.push(Op::Insert(stream_key(name), meta.encode()));
        self.prepare(ops)
    }

    /// Removes a stream's chunks below offset `below` (retention) and
    /// writes its metadata, whose `offset_floor` should be `below`. Returns
    /// the write-ahead log record, when the log is on. A trim cut short by
    /// a crash leaves a prefix of it done, which is consistent: the first
    /// retained offset is the first stored chunk's.
    fn trim(&self, name: &str, meta: &StreamMeta, below: u64) -> Result<Prepared, StorageError> {
        let mut ops = Vec::new();
        for key in self
            .tree
            .range(chunk_key(meta.id, 0)..chunk_key(meta.id, below))
            .keys()
        {
            ops.push(Op::Remove(
                key.during(self.path(), "listing chunks to trim")?.to_vec(),
            ));
        }
        ops.push(Op::Insert(stream_key(name), meta.encode()));
        self.prepare(ops)
    }

    fn put_fence(&self, stream_id: u64, token: &str) -> Result<Prepared, StorageError> {
        let key = named_key(FENCE_PREFIX, stream_id, "");
        self.prepare(vec![if token.is_empty() {
            Op::Remove(key)
        } else {
            Op::Insert(key, token.as_bytes().to_vec())
        }])
    }

    /// Removes a stream with all its chunks, idempotency keys, consumers
    /// and groups. The metadata goes first: a deletion cut short by a
    /// crash leaves unreachable records (keyed by the old id), never a
    /// stream with holes. The other records go by prefix, evaluated when
    /// the change is applied, so records of changes still on their way
    /// to sled go too.
    fn delete_stream(&self, name: &str, stream_id: u64) -> Result<Prepared, StorageError> {
        let mut ops = vec![Op::Remove(stream_key(name))];
        for prefix in [
            CHUNK_PREFIX,
            IDEMPOTENCY_PREFIX,
            CONSUMER_PREFIX,
            GROUP_PREFIX,
            FENCE_PREFIX,
        ] {
            let mut start = vec![prefix];
            start.extend_from_slice(&stream_id.to_be_bytes());
            ops.push(Op::RemovePrefix(start));
        }
        self.prepare(ops)
    }

    /// Reads chunks of a stream in order, starting with the one holding
    /// `offset`, until `end` (exclusive), until they hold `max_events`
    /// events from `offset` on, or until about `max_bytes` have been read
    /// (at least one chunk). With `keep`, only the records it selects are
    /// decoded (see [`Chunk::decode_where`]).
    fn read_chunks(
        &self,
        stream_id: u64,
        offset: u64,
        end: u64,
        max_events: usize,
        max_bytes: usize,
        keep: Option<Keep<'_>>,
    ) -> Result<Vec<Chunk>, StorageError> {
        let mut chunks = Vec::new();
        if offset >= end {
            return Ok(chunks);
        }
        // sled 0.34's page cache only evicts once enough page accesses have
        // queued up, and a range iterator records one access per leaf (it
        // keeps a copy of the leaf between steps): a long catch-up read then
        // kept every leaf it touched in memory (RSS grew by about the bytes
        // read). So each chunk the iterator yields is also looked up with
        // `get` (one access per chunk, no copy of the leaf), which keeps
        // memory flat. `get_gt` per chunk would do the same but copies the
        // whole leaf each time (several times slower).
        let first_key = chunk_key(stream_id, 0);
        let end_key = chunk_key(stream_id, end);
        // The chunk holding `offset` is the last one starting at or before it.
        let start = match self
            .tree
            .get_lt(chunk_key(stream_id, offset + 1))
            .during(self.path(), "reading chunks")?
        {
            Some((key, _)) if key[..] >= first_key[..] => key,
            _ => sled::IVec::from(&chunk_key(stream_id, offset)[..]),
        };
        let mut bytes = 0;
        for item in self.tree.range(start..sled::IVec::from(&end_key[..])) {
            let (key, value) = item.during(self.path(), "reading chunks")?;
            // For the page cache's accounting only (see above).
            let _ = self.tree.get(&key).during(self.path(), "reading chunks")?;
            bytes += value.len();
            let chunk = match self.decode_chunk(stream_id, &key, &value, keep) {
                Ok(chunk) => chunk,
                // Serve what precedes a damaged chunk; the next read,
                // starting at it, gets the error.
                Err(_) if !chunks.is_empty() => break,
                Err(e) => return Err(e),
            };
            if chunk.end_offset() > offset {
                let covered = chunk.end_offset() - offset;
                chunks.push(chunk);
                if bytes >= max_bytes || covered >= max_events as u64 {
                    break;
                }
            }
        }
        Ok(chunks)
    }

    /// The offset of the first event appended at or after `time_unix_nanos`,
    /// among the stream's offsets `[first, end)`; `end` when there is none.
    /// A binary search over chunks (every event of a chunk has the chunk's
    /// time, and times never decrease along a stream): O(log n) lookups.
    fn offset_at_time(
        &self,
        stream_id: u64,
        first: u64,
        end: u64,
        time_unix_nanos: i64,
    ) -> Result<u64, StorageError> {
        crate::engine::search_time(first, end, time_unix_nanos, |offset| {
            self.chunk_holding(stream_id, offset)
        })
    }

    /// Shows `visit` the header and encoded size of a stream's chunks from
    /// the oldest on, until it returns false or `limit` were shown (what
    /// retention decides on: usually only the first chunk is read).
    fn visit_oldest_chunks(
        &self,
        stream_id: u64,
        limit: usize,
        visit: &mut dyn FnMut(ChunkHeader, u64) -> bool,
    ) -> Result<(), StorageError> {
        for item in self
            .tree
            .range(chunk_key(stream_id, 0)..=chunk_key(stream_id, u64::MAX))
            .take(limit)
        {
            let (key, value) = item.during(self.path(), "visiting the oldest chunks")?;
            let header = ChunkHeader::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!(
                    "chunk at offset {} of stream id {stream_id}",
                    offset_of_chunk_key(&key)
                ),
                source,
            })?;
            if !visit(header, value.len() as u64) {
                break;
            }
        }
        Ok(())
    }

    /// Looks up a remembered idempotency key.
    fn get_idempotency(
        &self,
        stream_id: u64,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StorageError> {
        match self
            .tree
            .get(idempotency_key(stream_id, key))
            .during(self.path(), "looking up an idempotency key")?
        {
            None => Ok(None),
            Some(value) => IdempotencyRecord::decode(&value)
                .map(Some)
                .map_err(|source| StorageError::Corrupt {
                    what: format!("idempotency record {key:?}"),
                    source,
                }),
        }
    }

    /// The idempotency keys of a stream appended before
    /// `cutoff_unix_nanos` (and any that cannot be decoded).
    fn expired_idempotency(
        &self,
        stream_id: u64,
        cutoff_unix_nanos: i64,
    ) -> Result<Vec<String>, StorageError> {
        let prefix = idempotency_prefix(stream_id);
        let mut keys = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (key, value) = item.during(self.path(), "scanning expired idempotency keys")?;
            let stale = IdempotencyRecord::decode(&value)
                .map(|r| r.time_unix_nanos < cutoff_unix_nanos)
                .unwrap_or(true);
            if stale {
                keys.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
            }
        }
        Ok(keys)
    }

    /// Removes idempotency keys of a stream (expiry), as one change.
    fn forget_idempotency(
        &self,
        stream_id: u64,
        keys: &[String],
    ) -> Result<Prepared, StorageError> {
        self.prepare(
            keys.iter()
                .map(|k| Op::Remove(idempotency_key(stream_id, k)))
                .collect(),
        )
    }

    /// Saves a durable consumer. Returns the write-ahead log record, when
    /// the log is on; the write is durable only once the record is logged.
    fn put_consumer(
        &self,
        stream_id: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<Prepared, StorageError> {
        self.prepare(vec![Op::Insert(
            consumer_key(stream_id, name),
            record.encode(),
        )])
    }

    /// Removes a durable consumer; returns the write-ahead log record.
    fn delete_consumer(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        self.prepare(vec![Op::Remove(consumer_key(stream_id, name))])
    }

    /// Saves a consumer group's slot offsets (the whole record: only this
    /// server writes it). Returns the write-ahead log record, when the log
    /// is on.
    fn put_group(
        &self,
        stream_id: u64,
        name: &str,
        record: &GroupRecord,
        _slots: Option<&[usize]>,
    ) -> Result<Prepared, StorageError> {
        self.prepare(vec![Op::Insert(
            named_key(GROUP_PREFIX, stream_id, name),
            record.encode(),
        )])
    }

    /// Removes a consumer group; returns the write-ahead log record.
    fn delete_group(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        self.prepare(vec![Op::Remove(named_key(GROUP_PREFIX, stream_id, name))])
    }

    /// Every stored API key record, by id.
    fn api_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut keys = Vec::new();
        for item in self.tree.scan_prefix([API_KEY_PREFIX]) {
            let (key, value) = item.during(self.path(), "loading API keys")?;
            keys.push((
                String::from_utf8_lossy(&key[1..]).into_owned(),
                value.to_vec(),
            ));
        }
        Ok(keys)
    }

    /// Saves an API key record (opaque to storage: the auth module encodes
    /// it). Durable when it returns, like [`Store::put_stream`].
    fn put_api_key(&self, id: &str, record: Vec<u8>) -> Result<(), StorageError> {
        let mut key = vec![API_KEY_PREFIX];
        key.extend_from_slice(id.as_bytes());
        self.write_durably(vec![Op::Insert(key, record)])
    }

    fn commit(&self, changes: Vec<Prepared>) -> Result<Option<u64>, StorageError> {
        self.commit_changes(changes)
    }

    fn checkpoint(&self, covered: u64) -> Result<(), StorageError> {
        self.checkpoint_to(covered)
    }

    fn failure(&self) -> Option<String> {
        self.poisoned.get().cloned()
    }

    fn close(&self) -> Result<(), StorageError> {
        self.close_store()
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Store {
    /// A stream's stored state from its metadata: its first offset and
    /// head, checked against its last chunk, and its consumers, groups
    /// and fencing token.
    fn stored(&self, name: String, meta: StreamMeta) -> Result<StoredStream, StorageError> {
        let next_offset = meta.next_offset.max(meta.offset_floor);
        let first_chunk = self.first_chunk_offset(meta.id)?;
        let last_chunk = self.last_chunk(meta.id)?;
        // With the log on, a trim reaches sled whole (replay finishes
        // one a crash cut short), so chunks missing above the floor
        // are damage: the first retained offset stays at the floor and
        // reads there get DATA_LOSS. Without the log, sled may have
        // kept only the removals of a trim: the first chunk is then
        // the first retained offset.
        let first_offset = match first_chunk {
            None => next_offset,
            Some(_) if self.wal.is_some() => meta.offset_floor.min(next_offset),
            Some(first) => first.max(meta.offset_floor),
        };
        if let Some(last) = &last_chunk {
            if last.end_offset() != next_offset {
                return Err(StorageError::Corrupt {
                    what: format!("stream {name}"),
                    source: CodecError::Inconsistent(format!(
                        "its head is {next_offset} but its last stored event is {}",
                        last.end_offset() as i128 - 1
                    )),
                });
            }
        }
        Ok(StoredStream {
            name,
            meta: StreamMeta {
                next_offset,
                ..meta
            },
            first_offset,
            next_offset,
            last_time_unix_nanos: last_chunk.map(|c| c.time_unix_nanos),
            consumers: self.load_consumers(meta.id)?,
            fence: self.load_fence(meta.id)?,
            groups: self.load_groups(meta.id)?,
        })
    }

    /// Every stream's name and metadata, in name order.
    pub(super) fn stream_metas(
        &self,
    ) -> impl Iterator<Item = Result<(String, StreamMeta), StorageError>> + '_ {
        self.tree.scan_prefix([STREAM_PREFIX]).map(|item| {
            let (key, value) = item.during(self.path(), "listing streams")?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let meta = StreamMeta::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("metadata of stream {name}"),
                source,
            })?;
            Ok((name, meta))
        })
    }

    /// Removes chunks and idempotency records at or past `head`: the
    /// remains of a group cut short before its metadata write (never
    /// acknowledged: acknowledgement follows the whole group's log record,
    /// and replay never moves a head back). Logged like any change.
    fn remove_past_head(&self, name: &str, stream_id: u64, head: u64) -> Result<(), StorageError> {
        let mut ops = Vec::new();
        let mut end = head;
        for item in self
            .tree
            .range(chunk_key(stream_id, head)..=chunk_key(stream_id, u64::MAX))
        {
            let (key, value) = item.during(self.path(), "removing chunks past a head")?;
            if let Ok(header) = ChunkHeader::decode(&value) {
                end = end.max(header.end_offset());
            }
            ops.push(Op::Remove(key.to_vec()));
        }
        let chunks = ops.len();
        for item in self.tree.scan_prefix(idempotency_prefix(stream_id)) {
            let (key, value) = item.during(self.path(), "removing chunks past a head")?;
            if IdempotencyRecord::decode(&value).map_or(true, |r| r.first_offset >= head) {
                ops.push(Op::Remove(key.to_vec()));
            }
        }
        if !ops.is_empty() {
            tracing::info!(
                stream = name,
                offsets = %format!("{head}..{end}"),
                chunks,
                idempotency_keys = ops.len() - chunks,
                "removed the remains of an append cut short by a crash (never acknowledged)"
            );
            self.write_durably(ops)?;
        }
        Ok(())
    }

    /// Commits `ops` at once (rare changes outside a stream's writer);
    /// without the log, also syncs sled, so they are durable either way.
    fn write_durably(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let pending = self.prepare(ops)?;
        self.commit(vec![pending])?;
        if self.wal.is_none() {
            self.sync()?;
        }
        Ok(())
    }

    /// The chunk holding `offset`, if stored.
    fn chunk_holding(&self, stream_id: u64, offset: u64) -> Result<Option<Chunk>, StorageError> {
        match self
            .tree
            .get_lt(chunk_key(stream_id, offset + 1))
            .during(self.path(), "finding the chunk holding an offset")?
        {
            Some((key, value)) if key[..9] == chunk_key(stream_id, 0)[..9] => {
                let chunk = self.decode_chunk(stream_id, &key, &value, None)?;
                Ok(chunk.contains(offset).then_some(chunk))
            }
            _ => Ok(None),
        }
    }

    fn load_groups(&self, stream_id: u64) -> Result<Vec<(String, GroupRecord)>, StorageError> {
        let mut groups = Vec::new();
        let prefix = named_key(GROUP_PREFIX, stream_id, "");
        for item in self.tree.scan_prefix(&prefix) {
            let (key, value) = item.during(self.path(), "loading consumer groups")?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let record = GroupRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("consumer group {name} of stream id {stream_id}"),
                source,
            })?;
            groups.push((name, record));
        }
        Ok(groups)
    }

    fn load_fence(&self, stream_id: u64) -> Result<String, StorageError> {
        let value = self
            .tree
            .get(named_key(FENCE_PREFIX, stream_id, ""))
            .during(self.path(), "loading a fencing token")?;
        Ok(value.map_or_else(String::new, |v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn load_consumers(
        &self,
        stream_id: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StorageError> {
        let mut consumers = Vec::new();
        let prefix = consumer_key(stream_id, "");
        for item in self.tree.scan_prefix(&prefix) {
            let (key, value) = item.during(self.path(), "loading consumers")?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let record =
                ConsumerRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                    what: format!("consumer {name} of stream id {stream_id}"),
                    source,
                })?;
            consumers.push((name, record));
        }
        Ok(consumers)
    }

    fn first_chunk_offset(&self, stream_id: u64) -> Result<Option<u64>, StorageError> {
        match self
            .tree
            .range(chunk_key(stream_id, 0)..=chunk_key(stream_id, u64::MAX))
            .next()
        {
            None => Ok(None),
            Some(item) => Ok(Some(offset_of_chunk_key(
                &item.during(self.path(), "finding the first chunk")?.0,
            ))),
        }
    }

    fn last_chunk(&self, stream_id: u64) -> Result<Option<Chunk>, StorageError> {
        match self
            .tree
            .range(chunk_key(stream_id, 0)..=chunk_key(stream_id, u64::MAX))
            .next_back()
        {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.during(self.path(), "finding the last chunk")?;
                self.decode_chunk(stream_id, &key, &value, None).map(Some)
            }
        }
    }

    pub(super) fn decode_chunk(
        &self,
        stream_id: u64,
        key: &[u8],
        value: &sled::IVec,
        keep: Option<Keep<'_>>,
    ) -> Result<Chunk, StorageError> {
        let corrupt = |source| StorageError::CorruptChunk {
            stream_id,
            offset: offset_of_chunk_key(key),
            source,
        };
        // Payloads stay slices of sled's buffer: no copy.
        let chunk = Chunk::decode_where(Bytes::from_owner(value.clone()), keep).map_err(corrupt)?;
        if chunk.first_offset != offset_of_chunk_key(key) || chunk.records.is_empty() {
            return Err(corrupt(CodecError::Truncated));
        }
        Ok(chunk)
    }
}
