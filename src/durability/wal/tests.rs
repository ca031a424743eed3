//! Tests of the write-ahead log: every cut of a file, flipped bytes,
//! numbering across files, failed writes, the checkpoint marker, version 1.

use super::super::fault::Failure;
use super::scan::*;
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

/// A log in `dir` holding record 1 (`ops(0)`), whose writes and syncs
/// fail where `Faults` says.
fn one_record_with_faults(dir: &std::path::Path) -> (Wal, Arc<Faults>) {
    let faults = Arc::new(Faults::new());
    let mut wal = Wal::create(dir, 1, 1 << 20, Some(faults.clone()), true).unwrap();
    wal.append(&[encode_payload(&ops(0))]).unwrap();
    (wal, faults)
}

/// A full disk: the torn write is rolled back, the log is not poisoned,
/// and the next record follows the last good one with the next sequence
/// number (nothing of the failed write is in the file).
#[test]
fn a_write_on_a_full_disk_is_rolled_back_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, faults) = one_record_with_faults(dir.path());
    faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
    let e = wal.append(&[encode_payload(&ops(1))]).unwrap_err();
    assert!(matches!(&e, WalError::OutOfSpace { .. }), "{e}");
    assert!(wal.poisoned().is_none());
    // The torn 10 bytes are gone: the file ends cleanly after record 1.
    let found = super::scan(dir.path()).unwrap();
    assert_eq!(found.files[0].end, FileEnd::Clean);
    assert_eq!(found.next_seq(), 2);
    // Space is back: the next record is number 2, and it holds ops(2).
    assert_eq!(wal.append(&[encode_payload(&ops(2))]).unwrap(), 2);
    let found = super::scan(dir.path()).unwrap();
    assert_eq!(found.files[0].end, FileEnd::Clean);
    assert_eq!(found.next_seq(), 3);
    let records = &found.files[0].records;
    assert_eq!(records.len(), 2);
    assert_eq!((records[1].seq, &records[1].ops), (2, &ops(2)));
}

/// Any other failed write (EIO) and a failed sync poison the log.
#[test]
fn a_failed_write_or_sync_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, faults) = one_record_with_faults(dir.path());
    faults.fail_nth(Target::WalWrite, 0, Failure::Io, 10);
    let e = wal.append(&[encode_payload(&ops(1))]).unwrap_err();
    assert!(
        matches!(&e, WalError::WriteFailed { source, .. } if source.raw_os_error() == Some(libc::EIO)),
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
