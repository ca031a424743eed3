//! Unit tests of the sled store: layout, reads, recovery and replay.

use super::*;
use crate::engine::Engine;

fn options(dir: &Path) -> StoreOptions {
    StoreOptions {
        path: dir.to_path_buf(),
        cache_bytes: 8 << 20,
        background_flush: crate::storage::BackgroundFlush::Off,
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

/// A store in `dir` whose log and checkpoints fail where `Faults` says.
fn with_faults(dir: &std::path::Path) -> (Store, Arc<Faults>) {
    with_faults_and(options(dir))
}

/// A store opened with `options` and a fault plan (replacing theirs).
fn with_faults_and(options: StoreOptions) -> (Store, Arc<Faults>) {
    let faults = Arc::new(Faults::new());
    let store = Store::open(&StoreOptions {
        faults: Some(faults.clone()),
        ..options
    })
    .unwrap();
    (store, faults)
}

#[test]
fn a_failed_log_write_refuses_every_later_write_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = with_faults(dir.path());
    let record = store
        .write_group("s", &meta(1, 2), vec![chunk(0, 2)], &[])
        .unwrap();
    store.commit(vec![record]).unwrap();
    faults.fail_nth(
        Target::WalWrite,
        0,
        crate::durability::fault::Failure::Io,
        7,
    );
    let record = store
        .write_group("s", &meta(1, 3), vec![chunk(2, 1)], &[])
        .unwrap();
    let e = store.commit(vec![record]).unwrap_err();
    assert!(e.to_string().contains("Input/output error"), "{e}");
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

/// A log write on a full disk is rolled back without poisoning the
/// store: the failed change never reaches sled, and the same change
/// written again once space is back is there after a reopen.
#[test]
fn a_log_write_on_a_full_disk_fails_alone_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = with_faults(dir.path());
    let group = |next, first, count| {
        store
            .write_group("s", &meta(1, next), vec![chunk(first, count)], &[])
            .unwrap()
    };
    store.commit(vec![group(2, 0, 2)]).unwrap();
    faults.fail_nth(
        Target::WalWrite,
        0,
        crate::durability::fault::Failure::NoSpace,
        7,
    );
    let e = store.commit(vec![group(3, 2, 1)]).unwrap_err();
    assert!(
        matches!(e, StorageError::Wal(WalError::OutOfSpace { .. })),
        "{e}"
    );
    assert_eq!(store.failure(), None);
    assert_eq!(
        store.stored_stream("s").unwrap().unwrap().next_offset,
        2,
        "the failed group never reached sled"
    );
    store.commit(vec![group(4, 2, 2)]).unwrap();
    store.close().unwrap();
    drop(store);
    let store = open(dir.path());
    let streams = store.load_streams().unwrap();
    assert_eq!(streams[0].next_offset, 4);
    let chunks = store
        .read_chunks(1, 0, 10, usize::MAX, usize::MAX, None)
        .unwrap();
    let counts: Vec<usize> = chunks.iter().map(|c| c.records.len()).collect();
    assert_eq!(counts, [2, 2]);
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
            background_flush: crate::storage::BackgroundFlush::Off,
            write_ahead_log: true,
            checkpoint_bytes: wal::DEFAULT_CHECKPOINT_BYTES,
            faults: None,
        });
        assert!(matches!(second, Err(StorageError::Locked { .. })));
    }
    let store = open(dir.path());
    assert_eq!(store.load_streams().unwrap()[0].next_offset, 4);
}

/// sled hands back a full disk as text in the OS error's Debug form; the
/// operator reads the OS's own words.
#[test]
fn a_full_disk_from_sled_reads_as_the_os_says_it() {
    let from_sled: Result<(), sled::Error> = Err(sled::Error::Io(std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        "Os { code: 28, kind: StorageFull, message: \"No space left on device\" }",
    )));
    let e = from_sled
        .during(Path::new("/data"), "applying a logged change")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "storage I/O error while applying a logged change in /data: No space left on device (os error 28)"
    );
}

/// The background flush runs once a step of applied change bytes has
/// built up, and not by the clock: nothing while fewer have been applied,
/// nothing while idle. Dropping the store stops its thread, which lets go
/// of sled, so the data dir opens again at once.
#[test]
fn the_background_flush_runs_per_step_of_applied_bytes_and_never_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let step = 16 << 10;
    let store = Store::open(&StoreOptions {
        background_flush: BackgroundFlush::AfterBytes(step),
        ..options(dir.path())
    })
    .unwrap();
    let mut meta = StreamMeta {
        id: 1,
        created_unix_nanos: 0,
        offset_floor: 0,
        next_offset: 0,
        bytes: 0,
        retention: Retention::default(),
    };
    // A change's size counts its keys and values and its log record, so
    // it is more than what the flusher counts (keys and values only).
    let mut sizes = 0u64;
    let mut append = |store: &Store, events: usize| {
        let first = meta.next_offset;
        meta.next_offset += events as u64;
        let change = store
            .write_group("a", &meta, vec![chunk(first, events)], &[])
            .unwrap();
        sizes += change.size() as u64;
        store.commit(vec![change]).unwrap();
        sizes
    };
    while append(&store, 4) < step / 2 {}
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(store.background_flushes(), 0, "under half a step applied");

    // Keys and values are about half of each change's size (the log
    // record holds them again): three steps of sizes are over one of them.
    while append(&store, 4) < 3 * step {}
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.background_flushes() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush after a step"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let flushed = store.background_flushes();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(store.background_flushes(), flushed, "idle: no more flushes");

    // A thread still holding sled would make this open fail as locked.
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.load_streams().unwrap()[0].next_offset,
        meta.next_offset
    );
}

/// A failed background flush leaves sled's files in an unknown state: it
/// poisons the store at once, naming the flush, and loses nothing
/// acknowledged (a restart replays the log).
#[test]
fn a_failed_background_flush_poisons_the_store_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = with_faults_and(StoreOptions {
        background_flush: BackgroundFlush::AfterBytes(1),
        ..options(dir.path())
    });
    faults.fail_nth(
        Target::BackgroundFlush,
        0,
        crate::durability::fault::Failure::Io,
        0,
    );
    // Acknowledged: logged and synced before the flush that fails.
    let record = store
        .write_group("s", &meta(1, 2), vec![chunk(0, 2)], &[])
        .unwrap();
    store.commit(vec![record]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reason = loop {
        if let Some(reason) = store.failure() {
            break reason;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failed flush did not poison the store"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(
        reason.contains("background flush failed") && reason.contains("Input/output error"),
        "{reason}"
    );
    assert_eq!(
        store.background_flushes(),
        0,
        "a failed flush is not counted"
    );
    let refused = store
        .write_group("s", &meta(1, 3), vec![chunk(2, 1)], &[])
        .and_then(|record| store.commit(vec![record]));
    assert!(
        matches!(refused, Err(StorageError::Wal(WalError::Poisoned(_)))),
        "{refused:?}"
    );
    store.close().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.load_streams().unwrap()[0].next_offset, 2);
    let chunks = store
        .read_chunks(1, 0, 10, usize::MAX, usize::MAX, None)
        .unwrap();
    assert_eq!(chunks.len(), 1);
}
