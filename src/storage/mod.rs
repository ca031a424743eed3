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
//! 'f' stream_id:u64           -> fencing token        (UTF-8; absent: none)
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
//! Durability: every change goes through [`Engine::commit`] (`Store`'s one commit path). With the
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

mod engine;
mod flusher;
mod keys;
mod recovery;
pub mod repair;
pub mod segment_buffers;
#[cfg(test)]
mod tests;
mod verify;

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::durability::fault::{Faults, Target};
use crate::durability::wal::{self, FileEnd, Op, Wal, WalError};
use crate::engine::Prepared;
pub use crate::engine::{
    Chunk, ChunkHeader, CodecError, ConsumerRecord, EncodedChunk, EventRecord, GroupRecord,
    IdempotencyRecord, Keep, Rendering, Retention, StorageError, StoredStream, StreamMeta,
};
use keys::*;

/// sled's segment size. Fixed at creation of a data dir (sled refuses to
/// open one written with another size).
const SEGMENT_SIZE: usize = 8 << 20;

/// The largest value sled keeps inline in its log (larger ones become blob
/// files, which sled does not fsync).
pub const MAX_INLINE_VALUE: usize = SEGMENT_SIZE / 4;

/// How long opening waits for a locked data dir to be let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How the store was asked to keep data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory.
    pub path: PathBuf,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// How sled's changed pages are written out between checkpoints.
    pub background_flush: BackgroundFlush,
    /// Log every write to the write-ahead log (`fsync` mode).
    pub write_ahead_log: bool,
    /// The write-ahead log size that triggers a checkpoint.
    pub checkpoint_bytes: u64,
    /// Faults to inject under the log and the checkpoint (tests only).
    pub faults: Option<Arc<Faults>>,
}

/// The default step of [`BackgroundFlush::AfterBytes`] (`--storage-flush-bytes`).
pub const DEFAULT_FLUSH_BYTES: u64 = 32 << 10;

/// How sled's changed pages are written out in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundFlush {
    /// Only by checkpoints (with the write-ahead log) or on close.
    Off,
    /// By sled's own flusher, this often (without the write-ahead log,
    /// this is what makes changes durable).
    Every(std::time::Duration),
    /// Each time this many more bytes of keys and values have been
    /// applied (see `flusher`; with the write-ahead log).
    AfterBytes(u64),
}

/// A change prepared by the store's write methods (inside a
/// [`Prepared`]): what the commit logs and then applies. Nothing of it is
/// written before the commit.
#[derive(Debug)]
struct Pending {
    ops: Vec<Op>,
    /// The encoded log record payload (with the log on), encoded by the
    /// caller (a stream's writer) rather than in the serial commit.
    payload: Option<Vec<u8>>,
}

impl Pending {
    /// About how many bytes the change holds in memory until committed.
    fn size(&self) -> usize {
        self.ops_bytes() + self.payload.as_ref().map_or(0, Vec::len)
    }

    /// The bytes of keys and values the change gives sled.
    fn ops_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Insert(key, value) => key.len() + value.len(),
                Op::Remove(key) | Op::RemovePrefix(key) => key.len(),
            })
            .sum()
    }
}

/// Names what the store was doing when sled failed.
pub(crate) trait During<T> {
    fn during(self, path: &Path, op: &'static str) -> Result<T, StorageError>;
}

impl<T> During<T> for Result<T, sled::Error> {
    /// sled's I/O errors become [`StorageError::Io`], so the operator reads
    /// "No space left on device (os error 28)", not sled's Debug form.
    fn during(self, path: &Path, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|source| match source {
            sled::Error::Io(source) => StorageError::Io {
                op,
                path: path.to_path_buf(),
                // sled re-wraps the OS error as text in its Debug form.
                source: match source.kind() {
                    std::io::ErrorKind::StorageFull if source.raw_os_error().is_none() => {
                        std::io::Error::from_raw_os_error(libc::ENOSPC)
                    }
                    _ => source,
                },
            },
            source => StorageError::Engine {
                op,
                path: path.to_path_buf(),
                source: Box::new(source),
            },
        })
    }
}

impl<T> During<T> for std::io::Result<T> {
    fn during(self, path: &Path, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::Io {
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
    /// log's lock on every write). Shared with the background flush, which
    /// poisons it when a flush fails.
    poisoned: Arc<OnceLock<String>>,
    faults: Option<Arc<Faults>>,
    /// Writes sled's changed pages out a step of bytes at a time
    /// ([`BackgroundFlush::AfterBytes`]).
    flusher: Option<flusher::Flusher>,
}

/// Marks a store poisoned (its `poisoned` flag), so it refuses every later
/// write: the state of the disk is unknown. The first reason stays, and is
/// logged once.
fn poison(poisoned: &OnceLock<String>, reason: String) {
    if poisoned.set(reason.clone()).is_ok() {
        tracing::error!(%reason, "storage failed: refusing every write until the server restarts (reads go on)");
    }
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
                .create(dir)
                .during(dir, "creating the data dir")?;
        }
        // sled's log buffers, kept for reuse by the binary's allocator,
        // are given back while it is idle.
        segment_buffers::start_trimming();
        let config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(options.cache_bytes)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(match options.background_flush {
                BackgroundFlush::Every(period) => Some((period.as_millis() as u64).max(1)),
                BackgroundFlush::Off | BackgroundFlush::AfterBytes(_) => None,
            })
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
                Err(source) => {
                    return Err(StorageError::Open {
                        path,
                        source: Box::new(source),
                    })
                }
            }
        };
        let tree = db
            .open_tree("pullstream")
            .during(&options.path, "opening the store's tree")?;
        let data_file =
            File::open(sled_dir.join("db")).during(&sled_dir, "opening sled's data file")?;
        // sled creates its files with the process umask.
        let private = "making sled's files private (0600)";
        for entry in std::fs::read_dir(&sled_dir).during(&sled_dir, private)? {
            let entry = entry.during(&sled_dir, private)?;
            if entry.file_type().during(&sled_dir, private)?.is_file() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                    .during(&entry.path(), private)?;
            }
        }
        let mut store = Store {
            db,
            tree,
            data_file,
            path,
            wal_dir,
            wal: None,
            poisoned: Arc::default(),
            faults: options.faults.clone(),
            flusher: None,
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
        if let BackgroundFlush::AfterBytes(step) = options.background_flush {
            let poisoned = store.poisoned.clone();
            store.flusher = Some(
                flusher::Flusher::start(
                    store.db.clone(),
                    step.max(1),
                    options.faults.clone(),
                    move |reason| poison(&poisoned, reason),
                )
                .during(&store.path, "starting storage's background flush")?,
            );
        }
        Ok(store)
    }

    fn refuse_if_poisoned(&self) -> Result<(), StorageError> {
        match self.poisoned.get() {
            Some(reason) => Err(WalError::Poisoned(reason.clone()).into()),
            None => Ok(()),
        }
    }

    /// Refuses every later write: the state of the disk is unknown.
    fn poison(&self, reason: String) {
        poison(&self.poisoned, reason);
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

    /// Prepares `ops` as one change for [`Engine::commit`]; nothing is
    /// written yet. Refused once the log is poisoned.
    fn prepare(&self, ops: Vec<Op>) -> Result<Prepared, StorageError> {
        self.refuse_if_poisoned()?;
        let payload = self.wal.as_ref().map(|_| wal::encode_payload(&ops));
        let pending = Pending { ops, payload };
        let size = pending.size();
        Ok(Prepared::new(pending, size))
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
    fn commit_changes(&self, changes: Vec<Prepared>) -> Result<Option<u64>, StorageError> {
        self.refuse_if_poisoned()?;
        let changes = changes
            .into_iter()
            .map(|c| {
                c.into_inner::<Pending>()
                    .expect("a change prepared by this store")
            })
            .collect::<Vec<_>>();
        // Counted only when a background flush wants them.
        let bytes: usize = match self.flusher {
            Some(_) => changes.iter().map(Pending::ops_bytes).sum(),
            None => 0,
        };
        let Some(wal) = &self.wal else {
            for change in changes {
                self.apply_to_sled(change.ops)?;
            }
            self.count_applied(bytes);
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
        self.count_applied(bytes);
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
    fn checkpoint_to(&self, covered: u64) -> Result<(), StorageError> {
        self.refuse_if_poisoned()?;
        self.tree
            .insert(CHECKPOINT_KEY, &covered.to_be_bytes())
            .during(self.path(), "writing the checkpoint key")?;
        let synced = match &self.faults {
            Some(faults) => faults
                .on_sync(Target::CheckpointSync)
                .during(self.path(), "syncing sled for a checkpoint")
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
    fn close_store(&self) -> Result<(), StorageError> {
        if self.poisoned.get().is_some() {
            tracing::warn!("storage failed earlier: closing without a checkpoint; the next start replays the write-ahead log");
            return Ok(());
        }
        match &self.wal {
            Some(wal) => {
                let last = wal.lock().expect("wal lock").last_seq();
                if let Err(e) = self.checkpoint_to(last) {
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

    /// Counts `bytes` of changes applied to sled towards the background
    /// flush's next step.
    fn count_applied(&self, bytes: usize) {
        if let Some(flusher) = &self.flusher {
            flusher.applied(bytes as u64);
        }
    }

    /// Background flushes finished so far ([`BackgroundFlush::AfterBytes`]).
    #[cfg(test)]
    fn background_flushes(&self) -> u64 {
        self.flusher.as_ref().map_or(0, flusher::Flusher::flushes)
    }

    /// The data dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes everything written so far durable: sled's flush (which writes
    /// its buffers and calls `sync_file_range`), then `fdatasync` on the
    /// data file so the drive's cache and the file size are persisted too.
    /// Blocks: call it from a blocking thread.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush().during(self.path(), "flushing storage")?;
        self.data_file
            .sync_data()
            .during(self.path(), "syncing sled's data file")?;
        Ok(())
    }
}
