//! Storage: the only module that knows sled.
//!
//! One sled database lives in the data dir, with one tree holding three
//! kinds of keys, so that every append is a single atomic `apply_batch`:
//!
//! ```text
//! 's' name                    -> StreamMeta           (one per stream)
//! 'c' stream_id:u64 first:u64 -> Chunk                (big-endian: sled order = offset order)
//! 'i' stream_id:u64 key       -> IdempotencyRecord    (remembered idempotency keys)
//! ```
//!
//! A stream's head is never stored: it is derived from its last chunk when
//! the store opens (one source of truth), so metadata and events cannot
//! disagree after a crash.
//!
//! Durability: sled's `flush` ends in `sync_file_range` on Linux, which
//! persists neither file metadata nor the drive's write cache. [`Store::sync`]
//! therefore follows it with a real `fdatasync` on sled's data file.
//! Values larger than a quarter of sled's segment size become separate blob
//! files that sled never syncs, so the store uses 8 MiB segments (2 MiB
//! inline limit) and the server caps events well below that; the log splits
//! large groups into chunks of about [`TARGET_CHUNK_BYTES`].

pub mod codec;

use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;
pub use codec::{Chunk, CodecError, EventRecord, IdempotencyRecord, StreamMeta};

/// sled's segment size. Fixed at creation of a data dir (sled refuses to
/// open one written with another size).
const SEGMENT_SIZE: usize = 8 << 20;

/// The largest value sled keeps inline in its log (larger ones become blob
/// files, which sled does not fsync).
pub const MAX_INLINE_VALUE: usize = SEGMENT_SIZE / 4;

/// The size the log aims for when it cuts a group commit into chunks.
pub const TARGET_CHUNK_BYTES: usize = 64 << 10;

const STREAM_PREFIX: u8 = b's';
const CHUNK_PREFIX: u8 = b'c';
const IDEMPOTENCY_PREFIX: u8 = b'i';

/// How the store was asked to keep data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory.
    pub path: PathBuf,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// How often sled's own background flusher writes buffered data to the
    /// OS, in milliseconds.
    pub background_flush_ms: u64,
}

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another process holds the data dir's lock.
    #[error("data dir {path} is in use by another process: stop it, or pass another --data-dir")]
    Locked {
        /// The data dir.
        path: PathBuf,
    },
    /// The data dir could not be opened.
    #[error("cannot open data dir {path}: {source}")]
    Open {
        /// The data dir.
        path: PathBuf,
        /// What sled or the OS said.
        #[source]
        source: sled::Error,
    },
    /// An I/O error while reading or writing.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// sled reported an error.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value could not be decoded.
    #[error("corrupt {what} in the data dir: {source}")]
    Corrupt {
        /// Which value.
        what: String,
        /// Why it could not be decoded.
        #[source]
        source: CodecError,
    },
}

/// A stream as found when the store opens.
#[derive(Debug, Clone)]
pub struct StoredStream {
    /// The stream's name.
    pub name: String,
    /// Its durable metadata.
    pub meta: StreamMeta,
    /// Its first retained offset.
    pub first_offset: u64,
    /// Its head: the offset the next event gets.
    pub next_offset: u64,
    /// The append time of its last event, if any (appends never go back in
    /// time, even if the clock does).
    pub last_time_unix_nanos: Option<i64>,
}

/// One chunk to write, already encoded.
pub struct EncodedChunk {
    /// The chunk's first offset.
    pub first_offset: u64,
    /// The encoded value.
    pub value: Vec<u8>,
}

/// The event store. Cheap to share behind an `Arc`; every method is
/// synchronous and short except [`Store::sync`].
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// A second handle on sled's data file: `fdatasync` on it makes sled's
    /// written pages durable (sync is per inode, not per descriptor).
    data_file: File,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `options.path`.
    pub fn open(options: &StoreOptions) -> Result<Store, StorageError> {
        let path = options.path.clone();
        std::fs::create_dir_all(&path)?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(Some(options.background_flush_ms.max(1)))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                    StorageError::Locked { path: path.clone() }
                }
                _ => StorageError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let tree = db.open_tree("pullstream")?;
        let data_file = File::open(path.join("db"))?;
        Ok(Store {
            db,
            tree,
            data_file,
            path,
        })
    }

    /// The data dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads every stream with its first offset and head.
    pub fn load_streams(&self) -> Result<Vec<StoredStream>, StorageError> {
        let mut streams = Vec::new();
        for item in self.tree.scan_prefix([STREAM_PREFIX]) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let meta = StreamMeta::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("metadata of stream {name}"),
                source,
            })?;
            let first_chunk = self.first_chunk_offset(meta.id)?;
            let last_chunk = self.last_chunk(meta.id)?;
            let next_offset = last_chunk
                .as_ref()
                .map_or(meta.offset_floor, |c| c.end_offset().max(meta.offset_floor));
            let first_offset = first_chunk.map_or(next_offset, |f| f.max(meta.offset_floor));
            streams.push(StoredStream {
                name,
                meta,
                first_offset,
                next_offset,
                last_time_unix_nanos: last_chunk.map(|c| c.time_unix_nanos),
            });
        }
        Ok(streams)
    }

    /// A new stream id, never handed out before in this data dir.
    pub fn new_stream_id(&self) -> Result<u64, StorageError> {
        Ok(self.db.generate_id()?)
    }

    /// Writes a stream's metadata (creating the stream when new).
    pub fn put_stream(&self, name: &str, meta: &StreamMeta) -> Result<(), StorageError> {
        self.tree.insert(stream_key(name), meta.encode())?;
        Ok(())
    }

    /// Atomically writes chunks, idempotency records and the stream's
    /// updated metadata: after a crash either all of them exist or none.
    pub fn write_group(
        &self,
        name: &str,
        meta: &StreamMeta,
        chunks: &[EncodedChunk],
        idempotency: &[(&str, IdempotencyRecord)],
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for chunk in chunks {
            batch.insert(
                &chunk_key(meta.id, chunk.first_offset)[..],
                &chunk.value[..],
            );
        }
        for (key, record) in idempotency {
            batch.insert(idempotency_key(meta.id, key), record.encode());
        }
        batch.insert(stream_key(name), meta.encode());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Reads chunks of a stream in order, starting with the one holding
    /// `offset`, until `end` (exclusive) or until about `max_bytes` have
    /// been read (at least one chunk).
    pub fn read_chunks(
        &self,
        stream_id: u64,
        offset: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<Vec<Chunk>, StorageError> {
        let mut chunks = Vec::new();
        if offset >= end {
            return Ok(chunks);
        }
        // The chunk holding `offset` is the last one starting at or before it.
        let start = match self
            .tree
            .range(chunk_key(stream_id, 0)..=chunk_key(stream_id, offset))
            .next_back()
        {
            Some(item) => item?.0,
            None => sled::IVec::from(&chunk_key(stream_id, offset)[..]),
        };
        let end_key = sled::IVec::from(&chunk_key(stream_id, end)[..]);
        let mut bytes = 0;
        for item in self.tree.range(start..end_key) {
            let (key, value) = item?;
            bytes += value.len();
            let chunk = self.decode_chunk(stream_id, &key, &value)?;
            if chunk.end_offset() <= offset {
                continue;
            }
            chunks.push(chunk);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(chunks)
    }

    /// Looks up a remembered idempotency key.
    pub fn get_idempotency(
        &self,
        stream_id: u64,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StorageError> {
        match self.tree.get(idempotency_key(stream_id, key))? {
            None => Ok(None),
            Some(value) => IdempotencyRecord::decode(&value)
                .map(Some)
                .map_err(|source| StorageError::Corrupt {
                    what: format!("idempotency record {key:?}"),
                    source,
                }),
        }
    }

    /// Forgets idempotency keys appended before `cutoff_unix_nanos`, across
    /// all streams. Returns how many were removed.
    pub fn expire_idempotency(&self, cutoff_unix_nanos: i64) -> Result<usize, StorageError> {
        let mut expired = sled::Batch::default();
        let mut count = 0;
        for item in self.tree.scan_prefix([IDEMPOTENCY_PREFIX]) {
            let (key, value) = item?;
            let stale = IdempotencyRecord::decode(&value)
                .map(|r| r.time_unix_nanos < cutoff_unix_nanos)
                .unwrap_or(true);
            if stale {
                expired.remove(key);
                count += 1;
            }
        }
        if count > 0 {
            self.tree.apply_batch(expired)?;
        }
        Ok(count)
    }

    /// Removes a stream with all its chunks and idempotency keys, in one
    /// atomic batch.
    pub fn delete_stream(&self, name: &str, stream_id: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for prefix in [CHUNK_PREFIX, IDEMPOTENCY_PREFIX] {
            let mut start = vec![prefix];
            start.extend_from_slice(&stream_id.to_be_bytes());
            for key in self.tree.scan_prefix(&start).keys() {
                batch.remove(key?);
            }
        }
        batch.remove(stream_key(name));
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes everything written so far durable: sled's flush (which writes
    /// its buffers and calls `sync_file_range`), then `fdatasync` on the
    /// data file so the drive's cache and the file size are persisted too.
    /// Blocks: call it from a blocking thread.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }

    /// Writes buffered data to the OS without waiting for the disk.
    pub fn flush_buffers(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    /// The size of the data dir's files, in bytes (sled's estimate).
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.db.size_on_disk()?)
    }

    fn first_chunk_offset(&self, stream_id: u64) -> Result<Option<u64>, StorageError> {
        match self
            .tree
            .range(chunk_key(stream_id, 0)..=chunk_key(stream_id, u64::MAX))
            .next()
        {
            None => Ok(None),
            Some(item) => Ok(Some(offset_of_chunk_key(&item?.0))),
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
                let (key, value) = item?;
                self.decode_chunk(stream_id, &key, &value).map(Some)
            }
        }
    }

    fn decode_chunk(
        &self,
        stream_id: u64,
        key: &[u8],
        value: &sled::IVec,
    ) -> Result<Chunk, StorageError> {
        let corrupt = |source| StorageError::Corrupt {
            what: format!(
                "chunk at offset {} of stream id {stream_id}",
                offset_of_chunk_key(key)
            ),
            source,
        };
        let chunk = Chunk::decode(Bytes::copy_from_slice(value)).map_err(corrupt)?;
        if chunk.first_offset != offset_of_chunk_key(key) || chunk.records.is_empty() {
            return Err(corrupt(CodecError::Truncated));
        }
        Ok(chunk)
    }
}

fn stream_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(STREAM_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key
}

fn chunk_key(stream_id: u64, first_offset: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = CHUNK_PREFIX;
    key[1..9].copy_from_slice(&stream_id.to_be_bytes());
    key[9..].copy_from_slice(&first_offset.to_be_bytes());
    key
}

fn offset_of_chunk_key(key: &[u8]) -> u64 {
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&key[9..17]);
    u64::from_be_bytes(offset)
}

fn idempotency_key(stream_id: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.push(IDEMPOTENCY_PREFIX);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(&StoreOptions {
            path: dir.to_path_buf(),
            cache_bytes: 8 << 20,
            background_flush_ms: 500,
        })
        .unwrap()
    }

    fn chunk(first: u64, n: usize) -> EncodedChunk {
        let chunk = Chunk {
            first_offset: first,
            time_unix_nanos: first as i64,
            records: (0..n)
                .map(|i| EventRecord {
                    event_type: format!("t{}", first + i as u64),
                    ..Default::default()
                })
                .collect(),
        };
        EncodedChunk {
            first_offset: first,
            value: chunk.encode(),
        }
    }

    #[test]
    fn offset_lookup_finds_the_chunk_holding_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let meta = StreamMeta {
            id: 5,
            created_unix_nanos: 0,
            offset_floor: 0,
            bytes: 0,
        };
        // Chunks [0,3) [3,4) [4,10); a neighbouring stream id must not leak in.
        store
            .write_group("a", &meta, &[chunk(0, 3), chunk(3, 1), chunk(4, 6)], &[])
            .unwrap();
        let other = StreamMeta { id: 6, ..meta };
        store.write_group("b", &other, &[chunk(0, 2)], &[]).unwrap();

        for offset in 0..10u64 {
            let chunks = store.read_chunks(5, offset, 10, usize::MAX).unwrap();
            assert!(chunks[0].contains(offset), "offset {offset}");
            assert_eq!(chunks.last().unwrap().end_offset(), 10);
        }
        // `end` bounds the read; `max_bytes` stops after at least one chunk.
        assert_eq!(store.read_chunks(5, 0, 4, usize::MAX).unwrap().len(), 2);
        assert_eq!(store.read_chunks(5, 0, 10, 1).unwrap().len(), 1);
        assert!(store.read_chunks(5, 10, 10, usize::MAX).unwrap().is_empty());

        let loaded = store.load_streams().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!((loaded[0].first_offset, loaded[0].next_offset), (0, 10));
        assert_eq!((loaded[1].first_offset, loaded[1].next_offset), (0, 2));
    }

    #[test]
    fn delete_removes_only_that_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = StreamMeta {
            id: 1,
            created_unix_nanos: 0,
            offset_floor: 0,
            bytes: 0,
        };
        let b = StreamMeta { id: 2, ..a };
        let rec = IdempotencyRecord {
            first_offset: 0,
            count: 1,
            time_unix_nanos: 0,
            fingerprint: 1,
        };
        store
            .write_group("a", &a, &[chunk(0, 1)], &[("k", rec)])
            .unwrap();
        store
            .write_group("b", &b, &[chunk(0, 1)], &[("k", rec)])
            .unwrap();
        store.delete_stream("a", 1).unwrap();
        assert!(store.read_chunks(1, 0, 1, usize::MAX).unwrap().is_empty());
        assert_eq!(store.get_idempotency(1, "k").unwrap(), None);
        assert_eq!(store.get_idempotency(2, "k").unwrap(), Some(rec));
        let names: Vec<_> = store
            .load_streams()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn idempotency_keys_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let meta = StreamMeta {
            id: 1,
            created_unix_nanos: 0,
            offset_floor: 0,
            bytes: 0,
        };
        let old = IdempotencyRecord {
            first_offset: 0,
            count: 1,
            time_unix_nanos: 100,
            fingerprint: 1,
        };
        let new = IdempotencyRecord {
            time_unix_nanos: 300,
            ..old
        };
        store
            .write_group("a", &meta, &[chunk(0, 1)], &[("old", old), ("new", new)])
            .unwrap();
        assert_eq!(store.expire_idempotency(200).unwrap(), 1);
        assert_eq!(store.get_idempotency(1, "old").unwrap(), None);
        assert_eq!(store.get_idempotency(1, "new").unwrap(), Some(new));
    }

    #[test]
    fn reopen_keeps_data_and_second_open_reports_lock() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let meta = StreamMeta {
                id: 1,
                created_unix_nanos: 0,
                offset_floor: 0,
                bytes: 0,
            };
            store.write_group("a", &meta, &[chunk(0, 4)], &[]).unwrap();
            store.sync().unwrap();
            let second = Store::open(&StoreOptions {
                path: dir.path().to_path_buf(),
                cache_bytes: 1 << 20,
                background_flush_ms: 500,
            });
            assert!(matches!(second, Err(StorageError::Locked { .. })));
        }
        let store = open(dir.path());
        assert_eq!(store.load_streams().unwrap()[0].next_offset, 4);
    }
}
