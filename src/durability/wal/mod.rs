//! The write-ahead log: record format, log files, the scan that tells a
//! crash from damage, and the checkpoint marker.
//!
//! Making sled itself durable costs two device round trips per commit
//! (sled's `flush`, which ends in `sync_file_range`, then an `fdatasync`),
//! so in `fsync` mode every change is appended here and made durable with a
//! single `fdatasync`; sled is flushed lazily by checkpoints.
//!
//! # Format (version 2)
//! ```text
//! file   = header record*            named wal-<first seq, 20 digits>.log
//! header = "PSTRMWAL" version:u32 (=2) first_seq:u64 crc32:u32   (24 bytes)
//! record = len:u32 crc32:u32 seq:u64 payload                       (crc over seq and payload)
//! payload = count:u32 op*            op = 1 key value | 2 key | 3 prefix   (insert, remove,
//!                                    remove by prefix; each part len:u32-prefixed)
//! ```
//! Integers are little-endian. Sequence numbers start at 1, grow by one per
//! record across files and restarts, and are never reused: the checkpoint
//! marker (`wal/checkpoint`) records the last one sled holds durably, so a
//! restart knows exactly which records to replay and where numbering goes on.
//!
//! # Crash or damage
//! Acknowledgement follows the `fdatasync`, so a crash can only leave an
//! incomplete record at the very end of the newest file (a torn tail, or
//! zeros where the file system extended it). That is dropped with a warning
//! naming the file, offset and size, and a copy of the bytes is kept beside
//! the log. Anything else (a checksum mismatch before the end, a gap or a
//! repeat in the sequence, a header that does not match its name) may have
//! acknowledged records after it, so the scan reports it as [`Damage`] and
//! the server refuses to start until `pullstream repair` has shown what is
//! lost and truncated the log there. Like PostgreSQL and neon's safekeeper,
//! the log never guesses past damage.
//!
//! # Write failures
//! A failed write is rolled back (the file is truncated to the end of the
//! last good record and synced) so no later record can follow a torn one.
//! When the disk was full (ENOSPC) and the rollback succeeded, nothing of
//! the write remains and the log is as it was before it: the append fails
//! with [`WalError::OutOfSpace`] and the next append may succeed once
//! space returns (the log above moves on without a restart). Any other
//! failed write (EIO), a rollback that fails, and a failed `fdatasync`
//! (which leaves the page cache in an unknown state, the "fsyncgate"
//! lesson) poison the log: it refuses every later append until the
//! process restarts and recovers from what is on disk. The store applies a
//! change to sled only after its record is durable, so a change whose
//! write failed never reaches sled.
//!
//! Files written by version 1 (no header, no sequence numbers) are still
//! replayed once, on the first start after an upgrade.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, BufMut};

mod scan;
#[cfg(test)]
mod tests;

pub use scan::{scan, scan_file, FileEnd, FileScan, LogScan, Record};

use super::fault::{Faults, Target, WriteFault};
use super::prealloc::Preallocator;

/// By default, when the current log file passes this size, a checkpoint
/// starts. Larger means fewer sled flushes, but a longer replay after a crash.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;

const MAGIC: [u8; 8] = *b"PSTRMWAL";
const FORMAT_VERSION: u32 = 2;
/// The size of a file header.
pub const FILE_HEADER_LEN: u64 = 24;
const RECORD_HEADER_LEN: usize = 16;
const CHECKPOINT_MAGIC: [u8; 8] = *b"PSTRMCKP";
const CHECKPOINT_FILE: &str = "checkpoint";

/// One key operation, as logged and as applied to sled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Insert(Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Remove(Vec<u8>),
    /// Remove every key starting with the prefix (a stream's deletion).
    RemovePrefix(Vec<u8>),
}

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O error outside the append path (opening, scanning, rotating).
    #[error("write-ahead log {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An append's write failed; the file was rolled back to its last good
    /// record (when `rolled_back`) and the log is poisoned.
    #[error("writing the write-ahead log {} failed: {source}", path.display())]
    WriteFailed {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The disk was full: the write was rolled back, nothing of it is in
    /// the log, and the log takes later appends (they succeed once space
    /// returns).
    #[error("no space left under {} for the write-ahead log ({} bytes free): the write was rolled back and nothing of it was written", dir.display(), free.map_or_else(|| "unknown".to_string(), |f| f.to_string()))]
    OutOfSpace {
        /// The data dir (the log's parent).
        dir: PathBuf,
        /// Free bytes on its volume after the rollback, when known.
        free: Option<u64>,
    },
    /// An `fdatasync` of the log failed; the log is poisoned.
    #[error("fdatasync of the write-ahead log {} failed: {source}", path.display())]
    SyncFailed {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The log refuses writes since an earlier failure.
    #[error("the write-ahead log refuses writes since an earlier failure ({0}); restart the server once the cause is fixed")]
    Poisoned(String),
    /// Damage that is not a torn tail: the server must not start on it.
    #[error("{damage}; acknowledged changes may lie past it, so the server will not start: run `pullstream repair --data-dir {}` to see what would be lost and truncate the log there", data_dir.display())]
    Damaged {
        /// Where and what.
        damage: Damage,
        /// The data dir, for the message.
        data_dir: PathBuf,
    },
    /// The checkpoint marker cannot be read.
    #[error("the checkpoint marker {} is damaged ({reason}); run `pullstream repair --data-dir {}`", path.display(), data_dir.display())]
    CheckpointDamaged {
        /// The marker file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// The data dir, for the message.
        data_dir: PathBuf,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Damage found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The damaged file.
    pub file: PathBuf,
    /// The byte offset of the damage in it.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write-ahead log file {} is damaged at byte {}: {}",
            self.file.display(),
            self.offset,
            self.reason
        )
    }
}

/// Encodes operations as a record payload.
pub fn encode_payload(ops: &[Op]) -> Vec<u8> {
    let len: usize = ops
        .iter()
        .map(|op| match op {
            Op::Insert(k, v) => 1 + 8 + k.len() + v.len(),
            Op::Remove(k) | Op::RemovePrefix(k) => 1 + 4 + k.len(),
        })
        .sum::<usize>()
        + 4;
    let mut out = Vec::with_capacity(len);
    out.put_u32_le(ops.len() as u32);
    for op in ops {
        match op {
            Op::Insert(k, v) => {
                out.put_u8(1);
                out.put_u32_le(k.len() as u32);
                out.put_slice(k);
                out.put_u32_le(v.len() as u32);
                out.put_slice(v);
            }
            Op::Remove(k) => {
                out.put_u8(2);
                out.put_u32_le(k.len() as u32);
                out.put_slice(k);
            }
            Op::RemovePrefix(k) => {
                out.put_u8(3);
                out.put_u32_le(k.len() as u32);
                out.put_slice(k);
            }
        }
    }
    out
}

/// Decodes a record payload; `None` when it is malformed.
pub fn decode_payload(mut payload: &[u8]) -> Option<Vec<Op>> {
    let take = |p: &mut &[u8]| -> Option<Vec<u8>> {
        if p.len() < 4 {
            return None;
        }
        let n = p.get_u32_le() as usize;
        if p.len() < n {
            return None;
        }
        let (head, tail) = p.split_at(n);
        *p = tail;
        Some(head.to_vec())
    };
    if payload.len() < 4 {
        return None;
    }
    let count = payload.get_u32_le() as usize;
    let mut ops = Vec::with_capacity(count.min(payload.len()));
    for _ in 0..count {
        if payload.is_empty() {
            return None;
        }
        match payload.get_u8() {
            1 => {
                let key = take(&mut payload)?;
                ops.push(Op::Insert(key, take(&mut payload)?));
            }
            2 => ops.push(Op::Remove(take(&mut payload)?)),
            3 => ops.push(Op::RemovePrefix(take(&mut payload)?)),
            _ => return None,
        }
    }
    payload.is_empty().then_some(ops)
}

fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record to `out`.
fn frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(record_crc(seq, payload));
    out.put_u64_le(seq);
    out.put_slice(payload);
}

fn file_header(first_seq: u64) -> [u8; FILE_HEADER_LEN as usize] {
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&header[..20]);
    header[20..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The name of the log file whose first record is `first_seq`.
pub fn file_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

/// Lists the log files in `dir` with the number in their names, in order.
pub fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let path = entry.map_err(io_at(dir))?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("wal-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            files.push((seq, path));
        }
    }
    files.sort();
    Ok(files)
}

pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Reads the checkpoint marker in the log directory `dir`: the last
/// sequence number sled holds durably. `None` when there is none yet.
pub fn read_checkpoint(dir: &Path) -> Result<Option<u64>, WalError> {
    let path = dir.join(CHECKPOINT_FILE);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let reason = if data.len() != 24 || data[..8] != CHECKPOINT_MAGIC {
        format!("{} bytes, not a checkpoint marker", data.len())
    } else if crc32fast::hash(&data[..20]).to_le_bytes() != data[20..24] {
        "checksum mismatch".to_string()
    } else {
        return Ok(Some((&data[12..20]).get_u64_le()));
    };
    Err(WalError::CheckpointDamaged {
        data_dir: dir.parent().unwrap_or(dir).to_path_buf(),
        path,
        reason,
    })
}

/// Writes the checkpoint marker durably (a new file renamed over the old).
pub fn write_checkpoint(dir: &Path, covered: u64) -> Result<(), WalError> {
    let mut data = Vec::with_capacity(24);
    data.put_slice(&CHECKPOINT_MAGIC);
    data.put_u32_le(FORMAT_VERSION);
    data.put_u64_le(covered);
    let crc = crc32fast::hash(&data);
    data.put_u32_le(crc);
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&data)?;
        file.sync_data()?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))
    })()
    .map_err(io_at(&tmp))?;
    sync_dir(dir)
}

/// Deletes the log files whose every record is at or below `covered`
/// (never the newest file), then syncs the directory. Returns how many.
pub fn delete_covered(dir: &Path, covered: u64) -> Result<usize, WalError> {
    let listed = files(dir)?;
    let mut removed = 0;
    for pair in listed.windows(2) {
        // A file's records end just before the next file's first one.
        if pair[1].0 <= covered.saturating_add(1) {
            std::fs::remove_file(&pair[0].1).map_err(io_at(&pair[0].1))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// The open log: the file being appended to. The store keeps it behind a
/// lock, and every durable change goes through [`Wal::append`].
pub struct Wal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// The sequence number the next record gets.
    next_seq: u64,
    /// The end of the last good record in the current file.
    len: u64,
    checkpoint_bytes: u64,
    faults: Option<Arc<Faults>>,
    /// Why the log refuses appends, after a failed write or sync.
    poisoned: Option<String>,
    /// Keeps the file zero-filled ahead of `len`.
    prealloc: Option<Preallocator>,
    /// Whether new files get a preallocator.
    preallocate: bool,
}

impl Wal {
    /// Starts a new log file whose first record will be `first_seq`, due
    /// for a checkpoint once it holds `checkpoint_bytes`, zero-filled ahead
    /// of its writes when `preallocate` (see [`super::prealloc`]). The
    /// header and the directory entry are durable when it returns.
    pub fn create(
        dir: &Path,
        first_seq: u64,
        checkpoint_bytes: u64,
        faults: Option<Arc<Faults>>,
        preallocate: bool,
    ) -> Result<Wal, WalError> {
        let path = dir.join(file_name(first_seq));
        // Not append mode: records are written at `len`, over the zeros
        // the preallocator put ahead of it.
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            path,
            file,
            next_seq: first_seq,
            len: 0,
            checkpoint_bytes,
            faults,
            poisoned: None,
            prealloc: None,
            preallocate,
        };
        let created = wal
            .file
            .write_all_at(&file_header(first_seq), 0)
            .and_then(|()| wal.file.sync_data())
            .map_err(io_at(&wal.path))
            .and_then(|()| sync_dir(dir));
        if let Err(e) = created {
            // Leave no half-made file behind for the next scan.
            let _ = std::fs::remove_file(&wal.path);
            return Err(e);
        }
        wal.len = FILE_HEADER_LEN;
        if preallocate {
            if let Ok(clone) = wal.file.try_clone() {
                wal.prealloc = Some(Preallocator::start(clone, FILE_HEADER_LEN));
            }
        }
        Ok(wal)
    }

    /// Writes `buf` at the end of the last good record.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let end = self.len + buf.len() as u64;
        let _past_prepared = self.prealloc.as_ref().and_then(|p| p.claim(end));
        let written = match self.faults.as_ref().and_then(|f| f.on_write(buf.len())) {
            Some(WriteFault::Partial(written, error)) => {
                let _ = self.file.write_all_at(&buf[..written], self.len);
                Err(error)
            }
            None => self.file.write_all_at(buf, self.len),
        };
        if written.is_ok() {
            if let Some(prealloc) = &self.prealloc {
                prealloc.wrote_to(end);
            }
        }
        written
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if let Some(faults) = &self.faults {
            faults.on_sync(Target::WalSync)?;
        }
        self.file.sync_data()
    }

    /// Appends one record per payload, numbered on from the last, and makes
    /// them durable with one write and one `fdatasync`. Returns the last
    /// record's sequence number. On failure the log is poisoned (see the
    /// module docs) and nothing of this call counts as written.
    pub fn append(&mut self, payloads: &[impl AsRef<[u8]>]) -> Result<u64, WalError> {
        if let Some(reason) = &self.poisoned {
            return Err(WalError::Poisoned(reason.clone()));
        }
        let bytes: usize = payloads
            .iter()
            .map(|p| p.as_ref().len() + RECORD_HEADER_LEN)
            .sum();
        let mut buf = Vec::with_capacity(bytes);
        for (i, payload) in payloads.iter().enumerate() {
            frame(&mut buf, self.next_seq + i as u64, payload.as_ref());
        }
        if let Err(source) = self.write(&buf) {
            // Roll the torn bytes back so no later record can follow them.
            let rollback = self.roll_back();
            if rollback.is_ok() && source.raw_os_error() == Some(libc::ENOSPC) {
                // The log is exactly as before this call: not poisoned.
                let dir = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
                let free = super::space::free_bytes(&dir);
                tracing::warn!(file = %self.path.display(), bytes = buf.len(), ?free, "the disk is full: a write-ahead log write failed and was rolled back; its changes are refused, later ones are tried again");
                return Err(WalError::OutOfSpace { dir, free });
            }
            self.poisoned = Some(match &rollback {
                Ok(()) => format!("a write to {} failed: {source}", self.path.display()),
                Err(e) => format!(
                    "a write to {} failed ({source}) and could not be rolled back ({e})",
                    self.path.display()
                ),
            });
            return Err(WalError::WriteFailed {
                path: self.path.clone(),
                source,
            });
        }
        if let Err(source) = self.sync() {
            // Best effort: the records may have reached the disk anyway,
            // which is why the caller is told the outcome is unknown.
            let _ = self.roll_back();
            self.poisoned = Some(format!(
                "fdatasync of {} failed: {source}",
                self.path.display()
            ));
            return Err(WalError::SyncFailed {
                path: self.path.clone(),
                source,
            });
        }
        self.len += buf.len() as u64;
        self.next_seq += payloads.len() as u64;
        Ok(self.next_seq - 1)
    }

    /// Truncates the file to the end of its last good record, and stops
    /// zero-filling this file (a poisoned log writes nothing more; after a
    /// full disk, later writes extend the file until the next one, which
    /// is zero-filled again).
    fn roll_back(&mut self) -> std::io::Result<()> {
        self.prealloc = None;
        self.file.set_len(self.len)?;
        self.file.sync_data()
    }

    /// The sequence number of the last record appended (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Why the log refuses appends, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Whether the current file is due for a checkpoint.
    pub fn wants_checkpoint(&self) -> bool {
        self.len >= self.checkpoint_bytes
    }

    /// Switches to a new file. Returns the last sequence number of the
    /// closed file: a checkpoint covering it may delete the file.
    pub fn rotate(&mut self) -> Result<u64, WalError> {
        let next = Wal::create(
            &self.dir,
            self.next_seq,
            self.checkpoint_bytes,
            self.faults.clone(),
            self.preallocate,
        )?;
        *self = next;
        Ok(self.next_seq - 1)
    }
}
