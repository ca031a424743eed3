//! The write-ahead log that makes `fsync` appends cheap.
//!
//! Making sled itself durable costs two device round trips per commit:
//! sled's `flush` (which ends in `sync_file_range` and waits for the write)
//! and then the `fdatasync` that sled's flush does not do. Measured here that
//! was about 1 ms per group commit against about 0.3 ms for one appending
//! write plus `fdatasync`. So in `fsync` mode every group commit is also
//! appended to this log and made durable with a single `fdatasync`; sled is
//! written first (in memory) and flushed to disk lazily.
//!
//! A checkpoint (sled flush + `fdatasync` of sled's file) runs in the
//! background whenever the current log file grows past the checkpoint size
//! (default [`DEFAULT_CHECKPOINT_BYTES`]): the log first rotates to a new file, and once sled
//! is durable every older file is deleted, since everything in them was
//! applied to sled before it was logged. On open, the log files left over
//! are replayed into sled (records are idempotent key writes), sled is
//! made durable, and the files are deleted.
//!
//! File `wal-<seq>.log`: a sequence of records
//! `len:u32 crc32:u32 payload`, where the payload is a list of operations
//! `1 key value` (insert) or `2 key` (remove), each part length-prefixed.
//! A torn or corrupt record ends the replay of its file: it was never
//! acknowledged, because acknowledgement follows the `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut};

/// By default, when the current log file passes this size, a checkpoint
/// starts. Larger means fewer sled flushes, but a longer replay after a crash.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;

/// One key operation, as logged and as applied to sled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Insert(Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Remove(Vec<u8>),
}

/// Encodes operations as one log record (header included).
pub fn encode_record(ops: &[Op]) -> Vec<u8> {
    let payload_len: usize = ops
        .iter()
        .map(|op| match op {
            Op::Insert(k, v) => 1 + 8 + k.len() + v.len(),
            Op::Remove(k) => 1 + 4 + k.len(),
        })
        .sum::<usize>()
        + 4;
    let mut out = Vec::with_capacity(8 + payload_len);
    out.put_u32_le(0);
    out.put_u32_le(0);
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
        }
    }
    let len = (out.len() - 8) as u32;
    let crc = crc32fast::hash(&out[8..]);
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the records of a log file, stopping at the first torn or
/// corrupt one. Returns the operations of each good record and whether the
/// file ended cleanly.
pub fn decode_records(mut data: &[u8]) -> (Vec<Vec<Op>>, bool) {
    let mut records = Vec::new();
    while !data.is_empty() {
        let Some(ops) = decode_one(&mut data) else {
            return (records, false);
        };
        records.push(ops);
    }
    (records, true)
}

fn decode_one(data: &mut &[u8]) -> Option<Vec<Op>> {
    if data.len() < 8 {
        return None;
    }
    let len = (&data[0..4]).get_u32_le() as usize;
    let crc = (&data[4..8]).get_u32_le();
    if data.len() < 8 + len || crc32fast::hash(&data[8..8 + len]) != crc {
        return None;
    }
    let mut payload = &data[8..8 + len];
    *data = &data[8 + len..];
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
    let mut ops = Vec::with_capacity(count.min(len));
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
            _ => return None,
        }
    }
    Some(ops)
}

/// The open log: the current file. The store keeps it behind a lock
/// (group-commit leaders and stream creation append to it).
pub struct Wal {
    dir: PathBuf,
    file: File,
    seq: u64,
    written: u64,
    checkpoint_bytes: u64,
}

impl Wal {
    /// Lists the log files in `dir`, oldest first.
    pub fn files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
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

    /// Reads a log file whole.
    pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        Ok(data)
    }

    /// Starts a new, empty log file numbered `seq`, due for a checkpoint
    /// once it holds `checkpoint_bytes`.
    pub fn create(dir: &Path, seq: u64, checkpoint_bytes: u64) -> std::io::Result<Wal> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(dir.join(format!("wal-{seq:016}.log")))?;
        // Make the new file's directory entry durable.
        File::open(dir)?.sync_all()?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            file,
            seq,
            written: 0,
            checkpoint_bytes,
        })
    }

    /// Appends records and makes them durable with one `fdatasync`.
    pub fn append(&mut self, records: &[u8]) -> std::io::Result<()> {
        self.file.write_all(records)?;
        self.file.sync_data()?;
        self.written += records.len() as u64;
        Ok(())
    }

    /// Whether the current file is due for a checkpoint.
    pub fn wants_checkpoint(&self) -> bool {
        self.written >= self.checkpoint_bytes
    }

    /// Switches to a new file; returns the number of the new file (every
    /// file below it can be deleted once sled is durable).
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        let next = Wal::create(&self.dir, self.seq + 1, self.checkpoint_bytes)?;
        *self = next;
        Ok(self.seq)
    }

    /// Deletes the log files numbered below `seq`.
    pub fn delete_before(dir: &Path, seq: u64) -> std::io::Result<()> {
        for (file_seq, path) in Wal::files(dir)? {
            if file_seq < seq {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Insert(b"k1".to_vec(), b"v1".to_vec()),
            Op::Remove(b"k2".to_vec()),
            Op::Insert(b"".to_vec(), vec![7; 1000]),
        ]
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let mut data = encode_record(&ops());
        data.extend(encode_record(&[Op::Remove(b"x".to_vec())]));
        let (records, clean) = decode_records(&data);
        assert!(clean);
        assert_eq!(records, vec![ops(), vec![Op::Remove(b"x".to_vec())]]);
        // Every truncation keeps exactly the whole records before the cut.
        let first_len = encode_record(&ops()).len();
        for cut in 0..data.len() {
            let (records, clean) = decode_records(&data[..cut]);
            assert_eq!(records.len(), usize::from(cut >= first_len), "cut {cut}");
            assert_eq!(clean, cut == 0 || cut == first_len);
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_replay() {
        let mut data = encode_record(&ops());
        data.extend(encode_record(&ops()));
        let last = data.len() - 1;
        data[last] ^= 1;
        let (records, clean) = decode_records(&data);
        assert_eq!(records.len(), 1);
        assert!(!clean);
    }

    #[test]
    fn files_rotate_and_old_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1, 1).unwrap();
        assert!(!wal.wants_checkpoint());
        wal.append(&encode_record(&ops())).unwrap();
        assert!(wal.wants_checkpoint());
        assert_eq!(wal.rotate().unwrap(), 2);
        assert!(!wal.wants_checkpoint());
        wal.append(&encode_record(&ops())).unwrap();
        let seqs: Vec<u64> = Wal::files(dir.path())
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(seqs, [1, 2]);
        Wal::delete_before(dir.path(), 2).unwrap();
        let files = Wal::files(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        let (records, clean) = decode_records(&Wal::read(&files[0].1).unwrap());
        assert_eq!((records.len(), clean), (1, true));
    }
}
