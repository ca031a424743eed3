//! Storage: the only module that knows sled.
//!
//! One sled database lives in the data dir, with one tree holding these
//! kinds of keys:
//!
//! ```text
//! 's' name                    -> StreamMeta           (one per stream)
//! 'c' stream_id:u64 first:u64 -> Chunk                (big-endian: sled order = offset order)
//! 'i' stream_id:u64 key       -> IdempotencyRecord    (remembered idempotency keys)
//! 'u' stream_id:u64 name      -> ConsumerRecord       (durable consumers)
//! 'g' stream_id:u64 name      -> GroupRecord          (consumer groups)
//! 'a' id                      -> API key record       (opaque: auth encodes it)
//! "m/checkpoint"              -> u64                  (the last log record a checkpoint made durable)
//! ```
//!
//! A group commit writes its chunks and idempotency records first and the
//! stream's metadata (holding the new head) last. sled recovers a prefix of
//! its log, so after a crash the head never points past stored chunks, and
//! whatever lies past the head (a group cut short, never acknowledged) is
//! removed when the store opens: groups are all or nothing.
//!
//! Durability: every change goes through [`Store::commit`]. With the
//! write-ahead log on (`fsync` mode) it is appended to the log
//! ([`crate::durability::wal`]) and synced, one `fdatasync` per group
//! commit, and only then applied to sled, which background checkpoints
//! make durable. sled's `flush` ends in `sync_file_range` on Linux, which
//! persists neither file metadata nor the drive's write cache, so
//! [`Store::sync`] follows it with a real `fdatasync` on sled's data file.
//! Opening the store recovers: it replays the records past the last
//! checkpoint, or refuses to open on damage ([`repair`] is the way out).
//! Layout: `DATA_DIR/sled/` (sled) and `DATA_DIR/wal/` (log files and the
//! checkpoint marker).
//! Values larger than a quarter of sled's segment size become separate blob
//! files that sled never syncs, so the store uses 8 MiB segments (2 MiB
//! inline limit) and the server caps events well below that; the log splits
//! large groups into chunks of about [`TARGET_CHUNK_BYTES`].

pub mod codec;
mod recovery;
pub mod repair;
mod verify;

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::durability::fault::{Faults, Target};
use crate::durability::wal::{self, FileEnd, Op, Wal, WalError};
use bytes::Bytes;
pub use codec::{
    Chunk, ChunkHeader, CodecError, ConsumerRecord, EventRecord, GroupRecord, IdempotencyRecord,
    Keep, Rendering, Retention, StreamMeta,
};

/// sled's segment size. Fixed at creation of a data dir (sled refuses to
/// open one written with another size).
const SEGMENT_SIZE: usize = 8 << 20;

/// The largest value sled keeps inline in its log (larger ones become blob
/// files, which sled does not fsync).
pub const MAX_INLINE_VALUE: usize = SEGMENT_SIZE / 4;

/// How long opening waits for a locked data dir to be let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The size the log aims for when it cuts a group commit into chunks.
///
/// Small on purpose: sled 0.34 splits a leaf at 16 entries, so a leaf holds
/// up to 16 chunks, and its page cache keeps every leaf touched by the
/// last few thousand page accesses whatever `cache_capacity` says. Memory
/// therefore scales with the chunk size. Measured with `pullstream bench
/// --workload catchup --events 10000000`: 64 KiB chunks left the server at
/// 1.3 GiB after the catch-up read, 16 KiB at 0.9 GiB, 8 KiB at 0.47 GiB;
/// 4 KiB saved little more and read slower.
pub const TARGET_CHUNK_BYTES: usize = 8 << 10;

const STREAM_PREFIX: u8 = b's';
const CHUNK_PREFIX: u8 = b'c';
const IDEMPOTENCY_PREFIX: u8 = b'i';
const CONSUMER_PREFIX: u8 = b'u';
const API_KEY_PREFIX: u8 = b'a';
const GROUP_PREFIX: u8 = b'g';
/// The last write-ahead log sequence number a checkpoint made durable in
/// sled, written by the checkpoint itself just before sled's flush (so
/// sled's prefix recovery keeps it only with everything before it).
const CHECKPOINT_KEY: &[u8] = b"m/checkpoint";

/// How the store was asked to keep data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory.
    pub path: PathBuf,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// How often sled's own background flusher writes buffered data to the
    /// OS, in milliseconds; `None` turns it off (the write-ahead log and
    /// checkpoints take care of durability then).
    pub background_flush_ms: Option<u64>,
    /// Log every write to the write-ahead log (`fsync` mode).
    pub write_ahead_log: bool,
    /// The write-ahead log size that triggers a checkpoint.
    pub checkpoint_bytes: u64,
    /// Faults to inject under the log and the checkpoint (tests only).
    pub faults: Option<Arc<Faults>>,
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
    /// The write-ahead log failed, is damaged, or refuses writes.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// sled's recovered state is older than the last checkpoint made it.
    #[error("sled in {} recovered only up to write-ahead log record {sled}, but the checkpoint marker says record {checkpoint} was made durable in it: sled lost data it had synced, so the server will not start. Restore the data dir from a backup, or run `pullstream verify --data-dir {}` to see what is left", path.display(), path.display())]
    SledBehindCheckpoint {
        /// The data dir.
        path: PathBuf,
        /// The sequence number sled recovered.
        sled: u64,
        /// The sequence number the checkpoint marker records.
        checkpoint: u64,
    },
    /// sled failed during an operation (named, for the operator).
    #[error("storage error while {op} in {path}: {source}")]
    Sled {
        /// What the store was doing.
        op: &'static str,
        /// The data dir.
        path: PathBuf,
        /// What sled said.
        #[source]
        source: sled::Error,
    },
    /// A stored chunk of events is damaged (checksum mismatch or bad
    /// layout): its events are lost.
    #[error("the chunk at offset {offset} of stream id {stream_id} is damaged in the data dir: {source}")]
    CorruptChunk {
        /// The stream's id.
        stream_id: u64,
        /// The chunk's first offset (from its key).
        offset: u64,
        /// What is wrong.
        #[source]
        source: CodecError,
    },
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
    /// Its durable consumers, in name order.
    pub consumers: Vec<(String, ConsumerRecord)>,
    /// Its consumer groups, in name order.
    pub groups: Vec<(String, GroupRecord)>,
}

/// A change prepared by the store's write methods: what
/// [`Store::commit`] logs and then applies. Nothing of it is written
/// before the commit.
#[derive(Debug)]
pub struct Pending {
    ops: Vec<Op>,
    /// The encoded log record payload (with the log on), encoded by the
    /// caller (a stream's writer) rather than in the serial commit.
    payload: Option<Vec<u8>>,
}

impl Pending {
    /// About how many bytes the change holds in memory until committed.
    pub fn size(&self) -> usize {
        let ops: usize = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Insert(key, value) => key.len() + value.len(),
                Op::Remove(key) | Op::RemovePrefix(key) => key.len(),
            })
            .sum();
        ops + self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// Names what the store was doing when sled failed.
pub(crate) trait During<T> {
    fn during(self, path: &Path, op: &'static str) -> Result<T, StorageError>;
}

impl<T> During<T> for Result<T, sled::Error> {
    fn during(self, path: &Path, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::Sled {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// What [`Store::verify`] found in one stream.
#[derive(Debug, Clone)]
pub struct StreamCheck {
    /// The stream (as stored, with its tenant).
    pub name: String,
    /// Its first retained offset.
    pub first_offset: u64,
    /// Its head.
    pub next_offset: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Damaged or missing ranges, in offset order.
    pub damage: Vec<Damaged>,
}

/// A damaged or missing range of a stream.
#[derive(Debug, Clone)]
pub struct Damaged {
    /// The first offset affected.
    pub first: u64,
    /// One past the last, when known.
    pub end: Option<u64>,
    /// Why.
    pub reason: String,
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
    wal_dir: PathBuf,
    /// The write-ahead log, when on. Appended to by the group-commit leader,
    /// and by stream creation and API keys.
    wal: Option<Mutex<Wal>>,
    /// Why writes are refused, once the log is poisoned (read without the
    /// log's lock on every write).
    poisoned: OnceLock<String>,
    faults: Option<Arc<Faults>>,
}

impl Store {
    /// Opens (or creates) the store in `options.path`.
    pub fn open(options: &StoreOptions) -> Result<Store, StorageError> {
        let path = options.path.clone();
        let sled_dir = path.join("sled");
        let wal_dir = path.join("wal");
        // Events and key digests are private: directories created here are
        // 0700 and files 0600.
        for dir in [&path, &sled_dir, &wal_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(options.cache_bytes)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(options.background_flush_ms.map(|ms| ms.max(1)))
            .mode(sled::Mode::HighThroughput);
        // sled's IO threads let go of the data dir's lock a moment after the
        // last handle drops, so a reopen in the same process (a restart of an
        // embedded server) can find it still taken: wait a little before
        // calling it held by someone else.
        let waited_since = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if waited_since.elapsed() >= LOCK_WAIT {
                        return Err(StorageError::Locked { path });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => return Err(StorageError::Open { path, source }),
            }
        };
        let tree = db
            .open_tree("pullstream")
            .during(&options.path, "opening the store's tree")?;
        let data_file = File::open(sled_dir.join("db"))?;
        // sled creates its files with the process umask.
        for entry in std::fs::read_dir(&sled_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
            }
        }
        let mut store = Store {
            db,
            tree,
            data_file,
            path,
            wal_dir,
            wal: None,
            poisoned: OnceLock::new(),
            faults: options.faults.clone(),
        };
        let (next_seq, covered) = store.recover()?;
        if options.write_ahead_log {
            store.wal = Some(Mutex::new(Wal::create(
                &store.wal_dir,
                next_seq,
                options.checkpoint_bytes,
                options.faults.clone(),
                true,
            )?));
        }
        // Only now, with a newer file in place, may covered files go.
        wal::delete_covered(&store.wal_dir, covered)?;
        Ok(store)
    }

    /// Why writes are refused, if the log is poisoned.
    pub fn failure(&self) -> Option<String> {
        self.poisoned.get().cloned()
    }

    fn refuse_if_poisoned(&self) -> Result<(), StorageError> {
        match self.poisoned.get() {
            Some(reason) => Err(WalError::Poisoned(reason.clone()).into()),
            None => Ok(()),
        }
    }

    /// Refuses every later write: the state of the disk is unknown.
    fn poison(&self, reason: String) {
        if self.poisoned.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "storage failed: refusing every write until the server restarts (reads go on)");
        }
    }

    /// Applies `ops` in order, one key at a time. Not a sled batch: sled's
    /// `apply_batch` writes its IO buffer out twice (with
    /// `sync_file_range`) per call, which dominated append cost. Atomicity
    /// comes from the order instead: a group's stream metadata (holding the
    /// head) is its last write, sled recovers a prefix of its log, and
    /// [`Store::load_streams`] drops anything past the head.
    fn apply_to_sled(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        for op in ops {
            match op {
                Op::Insert(key, value) => {
                    self.tree
                        .insert(key, value)
                        .during(self.path(), "applying a logged change")?;
                }
                Op::Remove(key) => {
                    self.tree
                        .remove(key)
                        .during(self.path(), "applying a logged change")?;
                }
                Op::RemovePrefix(prefix) => {
                    for key in self.tree.scan_prefix(&prefix).keys() {
                        self.tree
                            .remove(key.during(self.path(), "applying a logged change")?)
                            .during(self.path(), "applying a logged change")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Prepares `ops` as one change for [`Store::commit`]; nothing is
    /// written yet. Refused once the log is poisoned.
    fn prepare(&self, ops: Vec<Op>) -> Result<Pending, StorageError> {
        self.refuse_if_poisoned()?;
        let payload = self.wal.as_ref().map(|_| wal::encode_payload(&ops));
        Ok(Pending { ops, payload })
    }

    /// Makes changes durable and applies them, in order: with the
    /// write-ahead log on, one record per change is appended and synced
    /// first (one `fdatasync` for all), and only then is sled touched, so
    /// a change whose write or sync failed is never applied. Without the
    /// log, applies them (sled flushes in the background). Returns the
    /// sequence number a checkpoint may now cover, when one is due.
    ///
    /// The log's lock is held until the changes are applied, so a
    /// checkpoint covering a record always finds it in sled.
    pub fn commit(&self, changes: Vec<Pending>) -> Result<Option<u64>, StorageError> {
        self.refuse_if_poisoned()?;
        let Some(wal) = &self.wal else {
            for change in changes {
                self.apply_to_sled(change.ops)?;
            }
            return Ok(None);
        };
        let mut wal = wal.lock().expect("wal lock");
        let payloads: Vec<&[u8]> = changes
            .iter()
            .filter_map(|c| c.payload.as_deref())
            .collect();
        if let Err(e) = wal.append(&payloads) {
            if let Some(reason) = wal.poisoned() {
                self.poison(reason.to_string());
            }
            return Err(e.into());
        }
        for change in changes {
            if let Err(e) = self.apply_to_sled(change.ops) {
                // Logged but not applied: only a restart (which replays
                // the log) brings sled back in line.
                self.poison(format!("applying a logged change to sled failed: {e}"));
                return Err(e);
            }
        }
        if wal.wants_checkpoint() {
            match wal.rotate() {
                Ok(covered) => return Ok(Some(covered)),
                // The old file goes on; the next commit tries again.
                Err(e) => tracing::warn!(error = %e, "cannot start a new write-ahead log file"),
            }
        }
        Ok(None)
    }

    /// Makes what sled holds durable up to record `covered`, records that
    /// in the checkpoint marker, and deletes the log files it covers.
    /// Blocks for a while: run it in the background. A failed sync poisons
    /// the store (sled's state on disk is unknown from then on).
    pub fn checkpoint(&self, covered: u64) -> Result<(), StorageError> {
        self.refuse_if_poisoned()?;
        self.tree
            .insert(CHECKPOINT_KEY, &covered.to_be_bytes())
            .during(self.path(), "writing the checkpoint key")?;
        let synced = match &self.faults {
            Some(faults) => faults
                .on_sync(Target::CheckpointSync)
                .map_err(StorageError::from)
                .and_then(|()| self.sync()),
            None => self.sync(),
        };
        if let Err(e) = synced {
            self.poison(format!("a checkpoint's sync of sled failed: {e}"));
            return Err(e);
        }
        wal::write_checkpoint(&self.wal_dir, covered)?;
        wal::delete_covered(&self.wal_dir, covered)?;
        Ok(())
    }

    /// The last checkpoint on close: sled made durable up to the last
    /// logged record, so the next start has nothing to replay. Skipped
    /// once poisoned (a flush would make unlogged changes durable).
    pub fn close(&self) -> Result<(), StorageError> {
        if self.poisoned.get().is_some() {
            tracing::warn!("storage failed earlier: closing without a checkpoint; the next start replays the write-ahead log");
            return Ok(());
        }
        match &self.wal {
            Some(wal) => {
                let last = wal.lock().expect("wal lock").last_seq();
                if let Err(e) = self.checkpoint(last) {
                    // Every acknowledged change is in the synced log since
                    // the last checkpoint, whose files are kept: nothing is
                    // lost, the next start replays them. (A full disk at
                    // shutdown is the usual cause.)
                    tracing::warn!(error = %e, "the closing checkpoint failed; the write-ahead log keeps every change since the last one, and the next start replays it");
                }
                Ok(())
            }
            None => self.sync(),
        }
    }

    /// The data dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every stream's name and metadata, in name order.
    fn stream_metas(
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

    /// Loads every stream with its first offset and head, removing what
    /// an unfinished group left past the head (never acknowledged).
    pub fn load_streams(&self) -> Result<Vec<StoredStream>, StorageError> {
        let mut streams = Vec::new();
        for item in self.stream_metas() {
            let (name, meta) = item?;
            let next_offset = meta.next_offset.max(meta.offset_floor);
            self.remove_past_head(&name, meta.id, next_offset)?;
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
            streams.push(StoredStream {
                name,
                meta: StreamMeta {
                    next_offset,
                    ..meta
                },
                first_offset,
                next_offset,
                last_time_unix_nanos: last_chunk.map(|c| c.time_unix_nanos),
                consumers: self.load_consumers(meta.id)?,
                groups: self.load_groups(meta.id)?,
            });
        }
        Ok(streams)
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

    /// A new stream id, never handed out before in this data dir.
    pub fn new_stream_id(&self) -> Result<u64, StorageError> {
        self.db
            .generate_id()
            .during(self.path(), "allocating a stream id")
    }

    /// Writes a stream's metadata (creating the stream when new).
    /// Durable when it returns: logged to the write-ahead log when it is
    /// on, otherwise synced (creating a stream is rare).
    pub fn put_stream(&self, name: &str, meta: &StreamMeta) -> Result<(), StorageError> {
        self.write_durably(vec![Op::Insert(stream_key(name), meta.encode())])
    }

    /// Rewrites a stream's metadata (a settings change). Returns the
    /// write-ahead log record, when the log is on.
    pub fn write_meta(&self, name: &str, meta: &StreamMeta) -> Result<Pending, StorageError> {
        self.prepare(vec![Op::Insert(stream_key(name), meta.encode())])
    }

    /// Saves an API key record (opaque to storage: the auth module encodes
    /// it). Durable when it returns, like [`Store::put_stream`].
    pub fn put_api_key(&self, id: &str, record: Vec<u8>) -> Result<(), StorageError> {
        let mut key = vec![API_KEY_PREFIX];
        key.extend_from_slice(id.as_bytes());
        self.write_durably(vec![Op::Insert(key, record)])
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

    /// Every stored API key record, by id.
    pub fn api_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
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

    /// Writes chunks, idempotency records and then the stream's updated
    /// metadata (with the new head): after a crash the group is either
    /// whole or, past the head, removed on open.
    /// Returns the write-ahead log record, when the log is on; the write is
    /// durable only once the record is logged.
    pub fn write_group(
        &self,
        name: &str,
        meta: &StreamMeta,
        chunks: Vec<EncodedChunk>,
        idempotency: &[(&str, IdempotencyRecord)],
    ) -> Result<Pending, StorageError> {
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

    /// Reads chunks of a stream in order, starting with the one holding
    /// `offset`, until `end` (exclusive), until they hold `max_events`
    /// events from `offset` on, or until about `max_bytes` have been read
    /// (at least one chunk). With `keep`, only the records it selects are
    /// decoded (see [`Chunk::decode_where`]).
    pub fn read_chunks(
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
    pub fn offset_at_time(
        &self,
        stream_id: u64,
        first: u64,
        end: u64,
        time_unix_nanos: i64,
    ) -> Result<u64, StorageError> {
        let (mut low, mut high) = (first, end);
        // Invariant: every event below `low` is older than the time, and
        // the answer is at most `high`.
        while low < high {
            let middle = low + (high - low) / 2;
            let Some(chunk) = self.chunk_holding(stream_id, middle)? else {
                // Nothing stored there (trimmed under us): search above.
                low = middle + 1;
                continue;
            };
            if chunk.time_unix_nanos >= time_unix_nanos {
                high = chunk.first_offset.max(low);
            } else {
                low = chunk.end_offset();
            }
        }
        Ok(low.min(end))
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

    /// Saves a durable consumer. Returns the write-ahead log record, when
    /// the log is on; the write is durable only once the record is logged.
    pub fn put_consumer(
        &self,
        stream_id: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<Pending, StorageError> {
        self.prepare(vec![Op::Insert(
            consumer_key(stream_id, name),
            record.encode(),
        )])
    }

    /// Saves a consumer group's slot offsets. Returns the write-ahead log
    /// record, when the log is on.
    pub fn put_group(
        &self,
        stream_id: u64,
        name: &str,
        record: &GroupRecord,
    ) -> Result<Pending, StorageError> {
        self.prepare(vec![Op::Insert(
            named_key(GROUP_PREFIX, stream_id, name),
            record.encode(),
        )])
    }

    /// Removes a consumer group; returns the write-ahead log record.
    pub fn delete_group(&self, stream_id: u64, name: &str) -> Result<Pending, StorageError> {
        self.prepare(vec![Op::Remove(named_key(GROUP_PREFIX, stream_id, name))])
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

    /// Removes a durable consumer; returns the write-ahead log record.
    pub fn delete_consumer(&self, stream_id: u64, name: &str) -> Result<Pending, StorageError> {
        self.prepare(vec![Op::Remove(consumer_key(stream_id, name))])
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

    /// Looks up a remembered idempotency key.
    pub fn get_idempotency(
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
    pub fn expired_idempotency(
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
    pub fn forget_idempotency(
        &self,
        stream_id: u64,
        keys: &[String],
    ) -> Result<Pending, StorageError> {
        self.prepare(
            keys.iter()
                .map(|k| Op::Remove(idempotency_key(stream_id, k)))
                .collect(),
        )
    }

    /// Removes a stream with all its chunks, idempotency keys, consumers
    /// and groups. The metadata goes first: a deletion cut short by a
    /// crash leaves unreachable records (keyed by the old id), never a
    /// stream with holes. The other records go by prefix, evaluated when
    /// the change is applied, so records of changes still on their way
    /// to sled go too.
    pub fn delete_stream(&self, name: &str, stream_id: u64) -> Result<Pending, StorageError> {
        let mut ops = vec![Op::Remove(stream_key(name))];
        for prefix in [
            CHUNK_PREFIX,
            IDEMPOTENCY_PREFIX,
            CONSUMER_PREFIX,
            GROUP_PREFIX,
        ] {
            let mut start = vec![prefix];
            start.extend_from_slice(&stream_id.to_be_bytes());
            ops.push(Op::RemovePrefix(start));
        }
        self.prepare(ops)
    }

    /// Shows `visit` the header and encoded size of a stream's chunks from
    /// the oldest on, until it returns false or `limit` were shown (what
    /// retention decides on: usually only the first chunk is read).
    pub fn visit_oldest_chunks(
        &self,
        stream_id: u64,
        limit: usize,
        mut visit: impl FnMut(ChunkHeader, u64) -> bool,
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

    /// Removes a stream's chunks below offset `below` (retention) and
    /// writes its metadata, whose `offset_floor` should be `below`. Returns
    /// the write-ahead log record, when the log is on. A trim cut short by
    /// a crash leaves a prefix of it done, which is consistent: the first
    /// retained offset is the first stored chunk's.
    pub fn trim(&self, name: &str, meta: &StreamMeta, below: u64) -> Result<Pending, StorageError> {
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

    /// Makes everything written so far durable: sled's flush (which writes
    /// its buffers and calls `sync_file_range`), then `fdatasync` on the
    /// data file so the drive's cache and the file size are persisted too.
    /// Blocks: call it from a blocking thread.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush().during(self.path(), "flushing storage")?;
        self.data_file.sync_data()?;
        Ok(())
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

    fn decode_chunk(
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

fn consumer_key(stream_id: u64, name: &str) -> Vec<u8> {
    named_key(CONSUMER_PREFIX, stream_id, name)
}

/// `prefix stream_id name`: a per-stream named record.
fn named_key(prefix: u8, stream_id: u64, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + name.len());
    key.push(prefix);
    key.extend_from_slice(&stream_id.to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

fn idempotency_prefix(stream_id: u64) -> [u8; 9] {
    let mut prefix = [0u8; 9];
    prefix[0] = IDEMPOTENCY_PREFIX;
    prefix[1..].copy_from_slice(&stream_id.to_be_bytes());
    prefix
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

    fn options(dir: &Path) -> StoreOptions {
        StoreOptions {
            path: dir.to_path_buf(),
            cache_bytes: 8 << 20,
            background_flush_ms: None,
            write_ahead_log: true,
            checkpoint_bytes: wal::DEFAULT_CHECKPOINT_BYTES,
            faults: None,
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(&options(dir)).unwrap()
    }

    fn chunk(first: u64, n: usize) -> EncodedChunk {
        let chunk = Chunk {
            first_offset: first,
            time_unix_nanos: first as i64,
            records: (0..n)
                .map(|i| EventRecord {
                    event_type: format!("t{}", first + i as u64).into(),
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
            next_offset: 10,
            bytes: 0,
            retention: Retention::default(),
        };
        // Chunks [0,3) [3,4) [4,10); a neighbouring stream id must not leak in.
        store
            .commit(vec![store
                .write_group("a", &meta, vec![chunk(0, 3), chunk(3, 1), chunk(4, 6)], &[])
                .unwrap()])
            .unwrap();
        let other = StreamMeta {
            id: 6,
            next_offset: 2,
            ..meta
        };
        store
            .commit(vec![store
                .write_group("b", &other, vec![chunk(0, 2)], &[])
                .unwrap()])
            .unwrap();

        for offset in 0..10u64 {
            let chunks = store
                .read_chunks(5, offset, 10, usize::MAX, usize::MAX, None)
                .unwrap();
            assert!(chunks[0].contains(offset), "offset {offset}");
            assert_eq!(chunks.last().unwrap().end_offset(), 10);
        }
        // `end` bounds the read; `max_bytes` stops after at least one chunk.
        assert_eq!(
            store
                .read_chunks(5, 0, 4, usize::MAX, usize::MAX, None)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            store
                .read_chunks(5, 0, 10, usize::MAX, 1, None)
                .unwrap()
                .len(),
            1
        );
        // Enough chunks to cover max_events, no more.
        assert_eq!(
            store
                .read_chunks(5, 1, 10, 2, usize::MAX, None)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store
                .read_chunks(5, 1, 10, 3, usize::MAX, None)
                .unwrap()
                .len(),
            2
        );
        assert!(store
            .read_chunks(5, 10, 10, usize::MAX, usize::MAX, None)
            .unwrap()
            .is_empty());

        let loaded = store.load_streams().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!((loaded[0].first_offset, loaded[0].next_offset), (0, 10));
        assert_eq!((loaded[1].first_offset, loaded[1].next_offset), (0, 2));
    }

    #[test]
    fn a_read_below_the_first_chunk_starts_at_it_and_never_strays_into_a_neighbour() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let meta = |id, next_offset| StreamMeta {
            id,
            created_unix_nanos: 0,
            offset_floor: 0,
            next_offset,
            bytes: 0,
            retention: Retention::default(),
        };
        store
            .commit(vec![store
                .write_group("low", &meta(4, 8), vec![chunk(0, 8)], &[])
                .unwrap()])
            .unwrap();
        // Stream 5 holds only [6,9): as if its front had been trimmed.
        store
            .commit(vec![store
                .write_group("mid", &meta(5, 9), vec![chunk(6, 3)], &[])
                .unwrap()])
            .unwrap();
        store
            .commit(vec![store
                .write_group("high", &meta(6, 2), vec![chunk(0, 2)], &[])
                .unwrap()])
            .unwrap();
        let chunks = store
            .read_chunks(5, 2, 9, usize::MAX, usize::MAX, None)
            .unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!((chunks[0].first_offset, chunks[0].end_offset()), (6, 9));
        // A stream with no chunks at all reads nothing, not its neighbour's.
        assert!(store
            .read_chunks(7, 0, 5, usize::MAX, usize::MAX, None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn chunks_past_the_head_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let meta = StreamMeta {
            id: 3,
            created_unix_nanos: 0,
            offset_floor: 0,
            next_offset: 2,
            bytes: 0,
            retention: Retention::default(),
        };
        let rec = |first_offset| IdempotencyRecord {
            first_offset,
            count: 1,
            time_unix_nanos: 0,
            fingerprint: 1,
        };
        {
            let store = open(dir.path());
            store
                .commit(vec![store
                    .write_group("s", &meta, vec![chunk(0, 2)], &[("kept", rec(0))])
                    .unwrap()])
                .unwrap();
            // A group cut short before its metadata write: chunks and a key
            // past the head, head unchanged.
            store
                .tree
                .insert(chunk_key(3, 2), chunk(2, 3).value)
                .unwrap();
            store
                .tree
                .insert(idempotency_key(3, "lost"), rec(2).encode())
                .unwrap();
        }
        let store = open(dir.path());
        let streams = store.load_streams().unwrap();
        assert_eq!((streams[0].first_offset, streams[0].next_offset), (0, 2));
        assert!(store
            .read_chunks(3, 2, 10, usize::MAX, usize::MAX, None)
            .unwrap()
            .is_empty());
        assert_eq!(store.get_idempotency(3, "kept").unwrap(), Some(rec(0)));
        assert_eq!(store.get_idempotency(3, "lost").unwrap(), None);
    }

    #[test]
    fn delete_removes_only_that_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = StreamMeta {
            id: 1,
            created_unix_nanos: 0,
            offset_floor: 0,
            next_offset: 1,
            bytes: 0,
            retention: Retention::default(),
        };
        let b = StreamMeta { id: 2, ..a };
        let rec = IdempotencyRecord {
            first_offset: 0,
            count: 1,
            time_unix_nanos: 0,
            fingerprint: 1,
        };
        store
            .commit(vec![store
                .write_group("a", &a, vec![chunk(0, 1)], &[("k", rec)])
                .unwrap()])
            .unwrap();
        store
            .commit(vec![store
                .write_group("b", &b, vec![chunk(0, 1)], &[("k", rec)])
                .unwrap()])
            .unwrap();
        store
            .commit(vec![store.delete_stream("a", 1).unwrap()])
            .unwrap();
        assert!(store
            .read_chunks(1, 0, 1, usize::MAX, usize::MAX, None)
            .unwrap()
            .is_empty());
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
            next_offset: 1,
            bytes: 0,
            retention: Retention::default(),
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
            .commit(vec![store
                .write_group("a", &meta, vec![chunk(0, 1)], &[("old", old), ("new", new)])
                .unwrap()])
            .unwrap();
        assert_eq!(store.expired_idempotency(1, 200).unwrap(), ["old"]);
        assert!(store.expired_idempotency(2, 200).unwrap().is_empty());
        store
            .commit(vec![store
                .forget_idempotency(1, &["old".to_string()])
                .unwrap()])
            .unwrap();
        assert_eq!(store.get_idempotency(1, "old").unwrap(), None);
        assert_eq!(store.get_idempotency(1, "new").unwrap(), Some(new));
    }

    fn meta(id: u64, next_offset: u64) -> StreamMeta {
        StreamMeta {
            id,
            created_unix_nanos: 1,
            offset_floor: 0,
            next_offset,
            bytes: 0,
            retention: Retention::default(),
        }
    }

    fn wal_files(dir: &Path) -> Vec<u64> {
        wal::files(&dir.join("wal"))
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect()
    }

    /// Writes log records as a crashed run would have left them.
    fn crashed_log(dir: &Path, records: &[Vec<Op>]) -> PathBuf {
        std::fs::create_dir_all(dir.join("wal")).unwrap();
        let mut log = Wal::create(&dir.join("wal"), 1, 1 << 30, None, false).unwrap();
        for ops in records {
            log.append(&[wal::encode_payload(ops)]).unwrap();
        }
        dir.join("wal").join(wal::file_name(1))
    }

    #[test]
    fn records_left_in_the_write_ahead_log_are_replayed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        // What a crashed run acknowledged but never checkpointed into sled,
        // followed by a torn record it never acknowledged.
        let file = crashed_log(
            dir.path(),
            &[vec![
                Op::Insert(chunk_key(9, 0).to_vec(), chunk(0, 3).value),
                Op::Insert(stream_key("s"), meta(9, 3).encode()),
            ]],
        );
        let mut torn = std::fs::read(&file).unwrap();
        torn.extend_from_slice(&[5, 0, 0, 0, 1, 2]);
        std::fs::write(&file, torn).unwrap();

        let store = open(dir.path());
        let streams = store.load_streams().unwrap();
        assert_eq!((streams[0].name.as_str(), streams[0].next_offset), ("s", 3));
        assert_eq!(
            wal_files(dir.path()),
            [2],
            "replayed files are deleted once checkpointed; numbering continues"
        );
        let kept = std::fs::read(dir.path().join("wal").join(format!(
            "torn-{}-at-{}.bin",
            wal::file_name(1),
            24 + 16 + {
                wal::encode_payload(&[
                    Op::Insert(chunk_key(9, 0).to_vec(), chunk(0, 3).value),
                    Op::Insert(stream_key("s"), meta(9, 3).encode()),
                ])
                .len()
            }
        )))
        .unwrap();
        assert_eq!(kept, [5, 0, 0, 0, 1, 2], "a copy of the torn tail is kept");

        // Deletion is logged too, so a replay cannot bring a stream back.
        let record = store.delete_stream("s", 9).unwrap();
        store.commit(vec![record]).unwrap();
        drop(store);
        let store = open(dir.path());
        assert!(store.load_streams().unwrap().is_empty());
    }

    #[test]
    fn a_version_1_log_is_replayed_once_after_an_upgrade() {
        use bytes::BufMut;
        let dir = tempfile::tempdir().unwrap();
        let payload = wal::encode_payload(&[
            Op::Insert(chunk_key(4, 0).to_vec(), chunk(0, 2).value),
            Op::Insert(stream_key("old"), meta(4, 2).encode()),
        ]);
        let mut v1 = Vec::new();
        v1.put_u32_le(payload.len() as u32);
        v1.put_u32_le(crc32fast::hash(&payload));
        v1.put_slice(&payload);
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        std::fs::write(dir.path().join("wal/wal-0000000000000007.log"), v1).unwrap();
        let store = open(dir.path());
        let streams = store.load_streams().unwrap();
        assert_eq!(
            (streams[0].name.as_str(), streams[0].next_offset),
            ("old", 2)
        );
        assert_eq!(
            wal_files(dir.path()),
            [1],
            "the v1 file is gone; numbering starts"
        );
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.load_streams().unwrap()[0].next_offset, 2);
    }

    #[test]
    fn damage_before_the_end_of_the_log_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Vec<Op>> = (0..3)
            .map(|i| {
                vec![
                    Op::Insert(chunk_key(1, i).to_vec(), chunk(i, 1).value),
                    Op::Insert(stream_key("s"), meta(1, i + 1).encode()),
                ]
            })
            .collect();
        let file = crashed_log(dir.path(), &records);
        let mut data = std::fs::read(&file).unwrap();
        let record_len = (data.len() - 24) / 3;
        data[24 + record_len + 20] ^= 0x40;
        std::fs::write(&file, &data).unwrap();
        let Err(e) = Store::open(&options(dir.path())) else {
            panic!("a store with a damaged log must not open");
        };
        let message = e.to_string();
        assert!(matches!(e, StorageError::Wal(WalError::Damaged { .. })));
        assert!(
            message.contains(&format!("damaged at byte {}", 24 + record_len))
                && message.contains("pullstream repair"),
            "{message}"
        );
        // Nothing was replayed or deleted.
        assert_eq!(std::fs::read(&file).unwrap(), data);
    }

    #[test]
    fn a_checkpoint_sled_does_not_hold_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        wal::write_checkpoint(&dir.path().join("wal"), 1000).unwrap();
        let Err(e) = Store::open(&options(dir.path())) else {
            panic!("sled behind its checkpoint must not open");
        };
        assert!(
            matches!(
                e,
                StorageError::SledBehindCheckpoint {
                    sled: 0,
                    checkpoint: 1000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn replay_never_moves_a_head_back_behind_what_sled_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            // sled wrote out a newer group (head 5) than the last logged one.
            let store = open(dir.path());
            store
                .commit(vec![store
                    .write_group("s", &meta(1, 5), vec![chunk(0, 5)], &[])
                    .unwrap()])
                .unwrap();
            store.sync().unwrap();
        }
        for file in wal_files(dir.path()) {
            std::fs::remove_file(dir.path().join("wal").join(wal::file_name(file))).unwrap();
        }
        wal::write_checkpoint(&dir.path().join("wal"), 0).unwrap();
        crashed_log(
            dir.path(),
            &[vec![
                Op::Insert(chunk_key(1, 0).to_vec(), chunk(0, 3).value),
                Op::Insert(stream_key("s"), meta(1, 3).encode()),
            ]],
        );
        let store = open(dir.path());
        let streams = store.load_streams().unwrap();
        assert_eq!(streams[0].next_offset, 5);
        assert_eq!(
            store
                .read_chunks(1, 0, 5, usize::MAX, usize::MAX, None)
                .unwrap()
                .last()
                .unwrap()
                .end_offset(),
            5
        );
    }

    #[test]
    fn a_failed_log_write_refuses_every_later_write_and_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::new());
        let store = Store::open(&StoreOptions {
            faults: Some(faults.clone()),
            ..options(dir.path())
        })
        .unwrap();
        let record = store
            .write_group("s", &meta(1, 2), vec![chunk(0, 2)], &[])
            .unwrap();
        store.commit(vec![record]).unwrap();
        faults.fail_nth(
            Target::WalWrite,
            0,
            crate::durability::fault::Failure::NoSpace,
            7,
        );
        let record = store
            .write_group("s", &meta(1, 3), vec![chunk(2, 1)], &[])
            .unwrap();
        let e = store.commit(vec![record]).unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(store.failure().is_some());
        assert!(matches!(
            store.put_stream("t", &meta(2, 0)),
            Err(StorageError::Wal(WalError::Poisoned(_)))
        ));
        assert!(store.delete_stream("s", 1).is_err());
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        let streams = store.load_streams().unwrap();
        assert_eq!(streams.len(), 1);
        // The acknowledged group survives; the failed one never reached
        // sled (changes are applied only once logged), so it is gone.
        assert_eq!(streams[0].next_offset, 2);
        let chunks = store
            .read_chunks(1, 0, 10, usize::MAX, usize::MAX, None)
            .unwrap();
        assert_eq!(chunks.len(), 1, "the failed group never reached sled");
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
                next_offset: 4,
                bytes: 0,
                retention: Retention::default(),
            };
            store
                .commit(vec![store
                    .write_group("a", &meta, vec![chunk(0, 4)], &[])
                    .unwrap()])
                .unwrap();
            store.sync().unwrap();
            let second = Store::open(&StoreOptions {
                path: dir.path().to_path_buf(),
                cache_bytes: 1 << 20,
                background_flush_ms: None,
                write_ahead_log: true,
                checkpoint_bytes: wal::DEFAULT_CHECKPOINT_BYTES,
                faults: None,
            });
            assert!(matches!(second, Err(StorageError::Locked { .. })));
        }
        let store = open(dir.path());
        assert_eq!(store.load_streams().unwrap()[0].next_offset, 4);
    }
}
