//! Reading the log back: the scan that tells a torn tail (a crash mid-append,
//! dropped with a warning) from damage (anything else, which may have
//! acknowledged records after it, so the server refuses to start), file by
//! file and across files (sequence numbering), and version 1 files.

use std::path::{Path, PathBuf};

use bytes::Buf;

use super::*;

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
