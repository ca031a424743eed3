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
//! last good record and synced) so no later record can follow a torn one;
//! a failed `fdatasync` leaves the page cache in an unknown state (the
//! "fsyncgate" lesson). Either way the log is poisoned: it refuses every
//! later append until the process restarts and recovers from what is on
//! disk. The store applies a change to sled only after its record is
//! durable, so a change whose write failed never reaches sled.
//!
//! Files written by version 1 (no header, no sequence numbers) are still
//! replayed once, on the first start after an upgrade.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, BufMut};

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

/// One record found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number (0 in a version 1 file).
    pub seq: u64,
    /// Its byte offset in its file.
    pub offset: u64,
    /// Its operations.
    pub ops: Vec<Op>,
}

/// How a scanned file ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEnd {
    /// After its last record.
    Clean,
    /// In an incomplete record (the newest file only): `bytes` from
    /// `offset` on are not a record.
    Torn {
        /// Where the torn part starts.
        offset: u64,
        /// How many bytes it has.
        bytes: u64,
    },
    /// In damage: nothing from the damage on was read.
    Damaged(Damage),
}

/// One scanned log file.
#[derive(Debug, Clone)]
pub struct FileScan {
    /// The file.
    pub path: PathBuf,
    /// The sequence number its name gives.
    pub first_seq: u64,
    /// A version 1 file (no header, no sequence numbers).
    pub legacy: bool,
    /// Its good records, in order.
    pub records: Vec<Record>,
    /// How it ends.
    pub end: FileEnd,
    /// Its size in bytes.
    pub len: u64,
    /// Records still readable after a damaged one whose length was intact
    /// (never replayed; `pullstream repair` reports them as lost).
    pub salvaged: Vec<Record>,
}

impl FileScan {
    /// The sequence number the record after this file's last one has.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.records.len() as u64
    }
}

/// Scans one file's bytes. `newest` says whether it is the last file (the
/// only one that may end in a torn record).
pub fn scan_file(path: &Path, named_first_seq: u64, data: &[u8], newest: bool) -> FileScan {
    let mut scan = FileScan {
        path: path.to_path_buf(),
        first_seq: named_first_seq,
        legacy: false,
        records: Vec::new(),
        end: FileEnd::Clean,
        len: data.len() as u64,
        salvaged: Vec::new(),
    };
    let damage = |offset: usize, reason: String| {
        FileEnd::Damaged(Damage {
            file: path.to_path_buf(),
            offset: offset as u64,
            reason,
        })
    };
    let header = file_header(named_first_seq);
    let zeros = data.iter().all(|b| *b == 0);
    if data.is_empty() || (data.len() >= 8 && data[..8] != MAGIC && !zeros) {
        return scan_legacy(scan, data);
    }
    if data.len() < header.len() || data[..header.len()] != header {
        // A file cut short while its header was written (only the newest,
        // only before anything was appended) is torn, not damaged.
        let cut_short = data.len() < header.len() && header.starts_with(data);
        scan.end = if newest && (zeros || cut_short) {
            FileEnd::Torn {
                offset: 0,
                bytes: data.len() as u64,
            }
        } else if cut_short {
            damage(0, "the file header is cut short".into())
        } else {
            damage(
                0,
                format!(
                    "the file header does not match its name (format version {FORMAT_VERSION} and first sequence number {named_first_seq} expected)"
                ),
            )
        };
        return scan;
    }
    let mut pos = header.len();
    let mut expected = named_first_seq;
    let zeros_from = |i: usize| data[i.min(data.len())..].iter().all(|b| *b == 0);
    // Where the last non-zero byte ends: a torn part is counted up to it.
    let used = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    while pos < data.len() {
        let rest = &data[pos..];
        // Zeros where a record header would be, to the end: the end of the
        // log (the zero-filled region ahead of the writes, or where the
        // file system extended the file), in any file. Records lost in
        // between would show as a gap in the numbering of the next file.
        if rest[..rest.len().min(RECORD_HEADER_LEN)]
            .iter()
            .all(|b| *b == 0)
            && zeros_from(pos)
        {
            return scan;
        }
        // A bad record is a torn write only in the newest file, with
        // nothing but zeros after it.
        let torn_or = |record_end: usize, reason: String| {
            if newest && zeros_from(record_end) {
                FileEnd::Torn {
                    offset: pos as u64,
                    bytes: (used.max(pos) - pos) as u64,
                }
            } else {
                damage(pos, reason)
            }
        };
        if rest.len() < RECORD_HEADER_LEN {
            scan.end = torn_or(data.len(), "a record header is cut short".into());
            return scan;
        }
        let len = (&rest[0..4]).get_u32_le() as usize;
        let crc = (&rest[4..8]).get_u32_le();
        let seq = (&rest[8..16]).get_u64_le();
        if rest.len() - RECORD_HEADER_LEN < len {
            scan.end = torn_or(data.len(), "a record runs past the end of the file".into());
            return scan;
        }
        let payload = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
        let end = pos + RECORD_HEADER_LEN + len;
        if record_crc(seq, payload) != crc {
            scan.end = torn_or(
                end,
                format!(
                    "checksum mismatch in the record that should have sequence number {expected}"
                ),
            );
            if matches!(scan.end, FileEnd::Damaged(_)) {
                scan.salvaged = salvage(&data[end..], end);
            }
            return scan;
        }
        if seq != expected {
            scan.end = damage(
                pos,
                format!("sequence number {seq} where {expected} was expected"),
            );
            return scan;
        }
        let Some(ops) = decode_payload(payload) else {
            scan.end = damage(
                pos,
                format!("record {seq} has a valid checksum but cannot be decoded"),
            );
            return scan;
        };
        scan.records.push(Record {
            seq,
            offset: pos as u64,
            ops,
        });
        expected += 1;
        pos = end;
    }
    scan
}

/// The records that still check out after a damaged one (`base`: the
/// offset of `data` in its file), up to the first that does not.
fn salvage(mut data: &[u8], mut base: usize) -> Vec<Record> {
    let mut records = Vec::new();
    while data.len() >= RECORD_HEADER_LEN {
        let len = (&data[0..4]).get_u32_le() as usize;
        let crc = (&data[4..8]).get_u32_le();
        let seq = (&data[8..16]).get_u64_le();
        let Some(payload) = data.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
            break;
        };
        let Some(ops) = (record_crc(seq, payload) == crc)
            .then(|| decode_payload(payload))
            .flatten()
        else {
            break;
        };
        records.push(Record {
            seq,
            offset: base as u64,
            ops,
        });
        base += RECORD_HEADER_LEN + len;
        data = &data[RECORD_HEADER_LEN + len..];
    }
    records
}

/// A version 1 file: `len:u32 crc32:u32 payload` records, replayed up to
/// the first bad one (version 1's own rule).
fn scan_legacy(mut scan: FileScan, data: &[u8]) -> FileScan {
    scan.legacy = true;
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = (&data[pos..pos + 4]).get_u32_le() as usize;
        let crc = (&data[pos + 4..pos + 8]).get_u32_le();
        let Some(payload) = data.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(ops) = decode_payload(payload) else {
            break;
        };
        scan.records.push(Record {
            seq: 0,
            offset: pos as u64,
            ops,
        });
        pos += 8 + len;
    }
    if pos < data.len() {
        scan.end = FileEnd::Torn {
            offset: pos as u64,
            bytes: (data.len() - pos) as u64,
        };
    }
    scan
}

/// The whole log as found on disk.
#[derive(Debug, Clone)]
pub struct LogScan {
    /// Every file, oldest first.
    pub files: Vec<FileScan>,
    /// The first damage, if any (in a file, or a gap between files).
    pub damage: Option<Damage>,
}

impl LogScan {
    /// The sequence number after the last good record (1 for an empty log).
    pub fn next_seq(&self) -> u64 {
        self.files
            .iter()
            .rev()
            .find(|f| !f.legacy)
            .map_or(1, FileScan::next_seq)
    }
}

/// Reads and checks every log file in `dir`: each file on its own, and
/// that each one's sequence numbers go on from the one before.
pub fn scan(dir: &Path) -> Result<LogScan, WalError> {
    let listed = files(dir)?;
    let mut scan = LogScan {
        files: Vec::with_capacity(listed.len()),
        damage: None,
    };
    for (i, (seq, path)) in listed.iter().enumerate() {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_at(path))?;
        let file = scan_file(path, *seq, &data, i + 1 == listed.len());
        if scan.damage.is_none() {
            if let FileEnd::Damaged(damage) = &file.end {
                scan.damage = Some(damage.clone());
            }
        }
        if let Some(previous) = scan.files.last().filter(|p| !p.legacy) {
            if !file.legacy && scan.damage.is_none() && previous.next_seq() != file.first_seq {
                scan.damage = Some(Damage {
                    file: path.clone(),
                    offset: 0,
                    reason: format!(
                        "it starts at sequence number {} but the file before it ends at {}",
                        file.first_seq,
                        previous.next_seq() - 1
                    ),
                });
            }
        }
        scan.files.push(file);
    }
    Ok(scan)
}

/// Makes `dir`'s entries (created, renamed or removed files) durable.
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

    /// Truncates the file to the end of its last good record (and stops
    /// zero-filling: nothing more is written to a poisoned log).
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

#[cfg(test)]
mod tests {
    use super::super::fault::Failure;
    use super::*;

    fn ops(n: u8) -> Vec<Op> {
        vec![
            Op::Insert(b"k1".to_vec(), vec![n; 3]),
            Op::Remove(b"k2".to_vec()),
            Op::RemovePrefix(b"k".to_vec()),
            Op::Insert(b"".to_vec(), vec![7; 1000]),
        ]
    }

    fn write_log(dir: &Path, first_seq: u64, records: u8) -> PathBuf {
        let mut wal = Wal::create(dir, first_seq, 1 << 20, None, false).unwrap();
        for n in 0..records {
            wal.append(&[encode_payload(&ops(n))]).unwrap();
        }
        dir.join(file_name(first_seq))
    }

    #[test]
    fn payloads_round_trip() {
        assert_eq!(decode_payload(&encode_payload(&ops(1))), Some(ops(1)));
        assert_eq!(decode_payload(&encode_payload(&[])), Some(vec![]));
        assert_eq!(decode_payload(&[1, 0, 0]), None);
    }

    #[test]
    fn every_cut_of_the_newest_file_is_a_torn_tail_keeping_the_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 7, 2);
        let data = std::fs::read(&path).unwrap();
        let second = scan_file(&path, 7, &data, true).records[1].offset as usize;
        for cut in 0..data.len() {
            let scan = scan_file(&path, 7, &data[..cut], true);
            let whole = usize::from(cut >= second) + usize::from(cut == data.len());
            assert_eq!(scan.records.len(), whole, "cut {cut}");
            if cut == 0 {
                // An empty file holds nothing, whatever its version.
                assert_eq!(scan.end, FileEnd::Clean);
                continue;
            }
            assert!(
                matches!(scan.end, FileEnd::Torn { .. })
                    || (scan.end == FileEnd::Clean
                        && (cut == FILE_HEADER_LEN as usize || cut == second)),
                "cut {cut}: {:?}",
                scan.end
            );
            // The same cut in an older file is damage, not a crash.
            let older = scan_file(&path, 7, &data[..cut], false);
            if let FileEnd::Torn { .. } = scan.end {
                assert!(matches!(older.end, FileEnd::Damaged(_)), "cut {cut}");
            }
        }
        let scan = scan_file(&path, 7, &data, true);
        assert_eq!(scan.end, FileEnd::Clean);
        assert_eq!(
            scan.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [7, 8]
        );
        // Zeros after the records (zero-filled ahead of the writes, or
        // where the file system extended the file) end the log cleanly, in
        // any file; a torn record before them is still torn, counted up to
        // its last non-zero byte.
        let mut zeros = data.clone();
        zeros.extend([0u8; 100]);
        for newest in [true, false] {
            let scan = scan_file(&path, 7, &zeros, newest);
            assert_eq!((scan.records.len(), scan.end), (2, FileEnd::Clean));
        }
        let mut torn = data.clone();
        torn.extend([9u8; 20]);
        torn.extend([0u8; 100]);
        let scan = scan_file(&path, 7, &torn, true);
        assert_eq!(scan.records.len(), 2);
        assert_eq!(
            scan.end,
            FileEnd::Torn {
                offset: data.len() as u64,
                bytes: 20
            }
        );
        assert!(matches!(
            scan_file(&path, 7, &torn, false).end,
            FileEnd::Damaged(_)
        ));
    }

    #[test]
    fn a_flipped_byte_before_the_end_is_damage_naming_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 3);
        let mut data = std::fs::read(&path).unwrap();
        let offsets: Vec<u64> = scan_file(&path, 1, &data, true)
            .records
            .iter()
            .map(|r| r.offset)
            .collect();
        data[offsets[1] as usize + 30] ^= 1;
        let scan = scan_file(&path, 1, &data, true);
        assert_eq!(scan.records.len(), 1);
        let FileEnd::Damaged(damage) = scan.end else {
            panic!("damage expected: {:?}", scan.end);
        };
        assert_eq!(damage.offset, offsets[1]);
        assert!(damage.reason.contains("checksum"), "{}", damage.reason);
        // A flip in the last record of the newest file cannot be told from
        // a torn write: it is dropped as torn.
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        let scan = scan_file(&path, 1, &data, true);
        assert_eq!(scan.records.len(), 2);
        assert!(matches!(scan.end, FileEnd::Torn { offset, .. } if offset == offsets[2]));
        // A header that does not match the name is damage.
        let scan = scan_file(&path, 2, &std::fs::read(&path).unwrap(), true);
        assert!(matches!(scan.end, FileEnd::Damaged(_)));
    }

    #[test]
    fn the_scan_checks_numbering_across_files_and_files_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1, 1, None, false).unwrap();
        assert!(wal.wants_checkpoint(), "the header alone passes 1 byte");
        wal.append(&[encode_payload(&ops(0)), encode_payload(&ops(1))])
            .unwrap();
        assert_eq!(wal.rotate().unwrap(), 2);
        assert_eq!(wal.append(&[encode_payload(&ops(2))]).unwrap(), 3);
        let found = super::scan(dir.path()).unwrap();
        assert_eq!(found.damage, None);
        assert_eq!(found.next_seq(), 4);
        assert_eq!(found.files.len(), 2);
        assert_eq!(found.files[1].records[0].ops, ops(2));

        // A missing file in the middle is a gap.
        write_log(dir.path(), 10, 1);
        let found = super::scan(dir.path()).unwrap();
        let damage = found.damage.unwrap();
        assert!(damage.reason.contains("ends at 3"), "{}", damage.reason);

        // Only files wholly covered by a checkpoint go, never the newest.
        assert_eq!(delete_covered(dir.path(), 2).unwrap(), 1);
        assert_eq!(delete_covered(dir.path(), 100).unwrap(), 1);
        let left: Vec<u64> = files(dir.path()).unwrap().iter().map(|f| f.0).collect();
        assert_eq!(left, [10]);
    }

    #[test]
    fn a_failed_write_is_rolled_back_and_poisons_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::new());
        let mut wal = Wal::create(dir.path(), 1, 1 << 20, Some(faults.clone()), true).unwrap();
        wal.append(&[encode_payload(&ops(0))]).unwrap();
        faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
        let e = wal.append(&[encode_payload(&ops(1))]).unwrap_err();
        assert!(
            matches!(&e, WalError::WriteFailed { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{e}"
        );
        assert!(matches!(
            wal.append(&[encode_payload(&ops(2))]),
            Err(WalError::Poisoned(_))
        ));
        // The torn 10 bytes are gone: the file ends cleanly after record 1.
        let found = super::scan(dir.path()).unwrap();
        assert_eq!(found.files[0].end, FileEnd::Clean);
        assert_eq!(found.next_seq(), 2);

        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1, 1 << 20, Some(faults.clone()), true).unwrap();
        faults.fail_nth(Target::WalSync, 0, Failure::Io, 0);
        assert!(matches!(
            wal.append(&[encode_payload(&ops(0))]),
            Err(WalError::SyncFailed { .. })
        ));
        assert!(wal.poisoned().unwrap().contains("fdatasync"));
    }

    #[test]
    fn the_checkpoint_marker_round_trips_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
        write_checkpoint(dir.path(), 42).unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), Some(42));
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut data = std::fs::read(&path).unwrap();
        data[13] ^= 1;
        std::fs::write(&path, data).unwrap();
        assert!(matches!(
            read_checkpoint(dir.path()),
            Err(WalError::CheckpointDamaged { .. })
        ));
    }

    #[test]
    fn version_1_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        for n in 0..2 {
            let payload = encode_payload(&ops(n));
            data.put_u32_le(payload.len() as u32);
            data.put_u32_le(crc32fast::hash(&payload));
            data.put_slice(&payload);
        }
        data.extend([1, 2, 3]);
        let path = dir.path().join("wal-0000000000000005.log");
        let scan = scan_file(&path, 5, &data, true);
        assert!(scan.legacy);
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.records[1].ops, ops(1));
        assert!(matches!(scan.end, FileEnd::Torn { bytes: 3, .. }));
    }
}
