//! `pullstream repair`: what to do when the write-ahead log is damaged.
//!
//! The server refuses to start on damage that is not a torn tail, because
//! acknowledged changes may lie past it. Repair makes the loss explicit:
//! it scans the log, decodes every record past the damage that can still
//! be read, compares them with what sled and the good part of the log
//! hold, and names each stream's lost offsets and each lost consumer or
//! group commit. With `--yes` it moves everything from the damage on into
//! `wal/damaged-<unix seconds>/` (evidence, never deleted) and truncates
//! the damaged file there, so the server starts on the good prefix.
//! The server must be stopped (sled's lock says so).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{
    offset_of_chunk_key, ChunkHeader, ConsumerRecord, During, StorageError, StreamMeta,
    CHUNK_PREFIX, CONSUMER_PREFIX, GROUP_PREFIX, STREAM_PREFIX,
};
use crate::durability::wal::{self, Damage, FileEnd, Op};

/// One lost change, as repair reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// Events `[first, end)` of a stream.
    Events {
        /// The stream.
        stream: String,
        /// The first lost offset.
        first: u64,
        /// One past the last lost offset.
        end: u64,
    },
    /// A durable consumer's commit.
    ConsumerCommit {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// The committed next offset that is lost.
        next_offset: u64,
        /// What the consumer keeps after the repair (`None`: it is gone).
        kept: Option<u64>,
    },
    /// Another change (stream settings, a group commit, a key, ...).
    Other(String),
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Events { stream, first, end } => write!(
                f,
                "stream {stream:?}: events at offsets {first}..{} ({} events)",
                end - 1,
                end - first
            ),
            Loss::ConsumerCommit {
                stream,
                consumer,
                next_offset,
                kept,
            } => write!(
                f,
                "consumer {consumer:?} of stream {stream:?}: its commit to offset {next_offset} ({})",
                kept.map_or("the consumer will not exist".to_string(), |k| format!(
                    "it keeps offset {k}"
                ))
            ),
            Loss::Other(what) => f.write_str(what),
        }
    }
}

/// What repair found and would do.
#[derive(Debug)]
pub struct RepairPlan {
    /// The damage, if any (nothing to do without).
    pub damage: Option<Damage>,
    /// Readable records past the damage.
    pub lost_records: usize,
    /// Bytes past the damage that could not be read at all.
    pub unreadable_bytes: u64,
    /// Records that could not be read (their changes are counted in the
    /// losses from the offsets around them).
    pub unreadable_records: usize,
    /// The lost changes.
    pub losses: Vec<Loss>,
    /// Files (from the damaged one on) and where each is cut.
    cuts: Vec<(PathBuf, u64)>,
    wal_dir: PathBuf,
}

/// Scans the data dir's log and works out what a repair would lose.
pub fn plan(data_dir: &Path) -> Result<RepairPlan, StorageError> {
    let wal_dir = data_dir.join("wal");
    let scan = wal::scan(&wal_dir)?;
    let mut plan = RepairPlan {
        damage: scan.damage.clone(),
        lost_records: 0,
        unreadable_bytes: 0,
        unreadable_records: 0,
        losses: Vec::new(),
        cuts: Vec::new(),
        wal_dir,
    };
    let Some(damage) = &scan.damage else {
        return Ok(plan);
    };
    // Good records before the damage; readable records after it.
    let mut kept = Vec::new();
    let mut lost = Vec::new();
    let mut past = false;
    for file in &scan.files {
        if file.path == damage.file {
            past = true;
            let cut = damage.offset;
            plan.cuts.push((file.path.clone(), cut));
            for record in &file.records {
                if record.offset < cut {
                    kept.push(&record.ops);
                } else {
                    lost.push(&record.ops);
                }
            }
            lost.extend(file.salvaged.iter().map(|r| &r.ops));
            plan.unreadable_bytes += unreadable(file);
            continue;
        }
        if past {
            plan.cuts.push((file.path.clone(), 0));
            lost.extend(file.records.iter().map(|r| &r.ops));
            lost.extend(file.salvaged.iter().map(|r| &r.ops));
            plan.unreadable_bytes += unreadable(file);
        } else {
            kept.extend(file.records.iter().map(|r| &r.ops));
        }
    }
    plan.lost_records = lost.len();
    plan.unreadable_records = 1;
    plan.losses = losses(data_dir, &kept, &lost)?;
    Ok(plan)
}

/// Bytes of a damaged file that neither its good records nor the salvaged
/// ones cover.
fn unreadable(file: &wal::FileScan) -> u64 {
    let FileEnd::Damaged(damage) = &file.end else {
        return 0;
    };
    let salvaged: u64 = match (file.salvaged.first(), file.salvaged.last()) {
        (Some(_), Some(last)) => {
            let last_len = wal::encode_payload(&last.ops).len() as u64 + 16;
            file.len.min(last.offset + last_len) - file.salvaged[0].offset
        }
        _ => 0,
    };
    file.len - damage.offset - salvaged
}

impl RepairPlan {
    /// Moves everything from the damage on into `wal/damaged-<secs>/` and
    /// truncates the damaged file there. Returns the evidence directory.
    pub fn apply(&self) -> Result<Option<PathBuf>, StorageError> {
        if self.damage.is_none() {
            return Ok(None);
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let evidence = self.wal_dir.join(format!("damaged-{secs}"));
        let keeping = "keeping the damaged log's evidence";
        std::fs::create_dir_all(&evidence).during(&evidence, keeping)?;
        for (path, cut) in &self.cuts {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
            if *cut <= wal::FILE_HEADER_LEN {
                std::fs::rename(path, evidence.join(name)).during(path, keeping)?;
                continue;
            }
            let data = std::fs::read(path).during(path, keeping)?;
            let copy = evidence.join(format!("{name}-from-{cut}.bin"));
            std::fs::write(&copy, &data[*cut as usize..]).during(&copy, keeping)?;
            let cutting = "cutting the log at the damage";
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .during(path, cutting)?;
            file.set_len(*cut).during(path, cutting)?;
            file.sync_all().during(path, cutting)?;
        }
        wal::sync_dir(&evidence)?;
        wal::sync_dir(&self.wal_dir)?;
        Ok(Some(evidence))
    }
}

/// Compares the lost records with what is kept (sled, then the good
/// records) and lists what goes.
fn losses(
    data_dir: &Path,
    kept: &[&Vec<Op>],
    lost: &[&Vec<Op>],
) -> Result<Vec<Loss>, StorageError> {
    // What sled holds durably: stream heads and consumer cursors.
    let db = sled::Config::new()
        .path(data_dir.join("sled"))
        .segment_size(super::SEGMENT_SIZE)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StorageError::Locked {
                    path: data_dir.to_path_buf(),
                }
            }
            source => StorageError::Open {
                path: data_dir.to_path_buf(),
                source: Box::new(source),
            },
        })?;
    let tree = db
        .open_tree("pullstream")
        .during(data_dir, "opening the store's tree")?;
    let mut heads: BTreeMap<String, StreamMeta> = BTreeMap::new();
    let mut cursors: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for item in tree.scan_prefix([STREAM_PREFIX]) {
        let (key, value) = item.during(data_dir, "reading stream heads")?;
        if let Ok(meta) = StreamMeta::decode(&value) {
            heads.insert(String::from_utf8_lossy(&key[1..]).into_owned(), meta);
        }
    }
    for item in tree.scan_prefix([CONSUMER_PREFIX]) {
        let (key, value) = item.during(data_dir, "reading consumer cursors")?;
        if let Ok(record) = ConsumerRecord::decode(&value) {
            cursors.insert(key.to_vec(), record.next_offset);
        }
    }
    let mut apply = |ops: &Vec<Op>, heads: &mut BTreeMap<String, StreamMeta>| {
        for op in ops {
            match op {
                Op::Insert(key, value) if key.first() == Some(&STREAM_PREFIX) => {
                    if let Ok(meta) = StreamMeta::decode(value) {
                        let name = String::from_utf8_lossy(&key[1..]).into_owned();
                        let newer = heads
                            .get(&name)
                            .is_none_or(|m| m.id != meta.id || m.next_offset <= meta.next_offset);
                        if newer {
                            heads.insert(name, meta);
                        }
                    }
                }
                Op::Insert(key, value) if key.first() == Some(&CONSUMER_PREFIX) => {
                    if let Ok(record) = ConsumerRecord::decode(value) {
                        cursors.insert(key.clone(), record.next_offset);
                    }
                }
                _ => {}
            }
        }
    };
    for ops in kept {
        apply(ops, &mut heads);
    }
    let name_of = |id: u64, heads: &BTreeMap<String, StreamMeta>| {
        heads
            .iter()
            .find(|(_, m)| m.id == id)
            .map_or(format!("(id {id})"), |(n, _)| n.clone())
    };
    // Stream ids named only by lost records.
    let mut lost_names: BTreeMap<u64, String> = BTreeMap::new();
    for ops in lost {
        for op in ops.iter() {
            if let Op::Insert(key, value) = op {
                if key.first() == Some(&STREAM_PREFIX) {
                    if let Ok(meta) = StreamMeta::decode(value) {
                        lost_names.insert(meta.id, String::from_utf8_lossy(&key[1..]).into_owned());
                    }
                }
            }
        }
    }
    let stream_of = |id: u64, heads: &BTreeMap<String, StreamMeta>| {
        lost_names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| name_of(id, heads))
    };
    let mut events: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut losses = Vec::new();
    for ops in lost {
        for op in ops.iter() {
            let (key, value) = match op {
                Op::Insert(key, value) => (key, Some(value)),
                Op::Remove(key) | Op::RemovePrefix(key) => (key, None),
            };
            let id = || {
                key.get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_be_bytes)
            };
            match (key.first().copied(), value) {
                (Some(CHUNK_PREFIX), Some(value)) if key.len() == 17 => {
                    let stream = stream_of(id(), &heads);
                    let first = offset_of_chunk_key(key);
                    let end = ChunkHeader::decode(value).map_or(first + 1, |h| h.end_offset());
                    let kept_head = heads.get(&stream).map_or(0, |m| m.next_offset);
                    // Offsets are dense: everything from the kept head up
                    // to what the lost records reach is lost, including
                    // what unreadable records held.
                    if end > kept_head {
                        let range = events.entry(stream).or_insert((kept_head, end));
                        range.1 = range.1.max(end);
                    }
                }
                (Some(CONSUMER_PREFIX), Some(value)) if key.len() >= 9 => {
                    if let Ok(record) = ConsumerRecord::decode(value) {
                        let kept = cursors.get(key).copied();
                        if kept != Some(record.next_offset) {
                            losses.push(Loss::ConsumerCommit {
                                stream: stream_of(id(), &heads),
                                consumer: String::from_utf8_lossy(&key[9..]).into_owned(),
                                next_offset: record.next_offset,
                                kept,
                            });
                        }
                    }
                }
                (Some(STREAM_PREFIX), None) => losses.push(Loss::Other(format!(
                    "the deletion of stream {:?} (it comes back)",
                    String::from_utf8_lossy(&key[1..])
                ))),
                (Some(STREAM_PREFIX), Some(value)) => {
                    let name = String::from_utf8_lossy(&key[1..]).into_owned();
                    if !heads.contains_key(&name) {
                        if let Ok(meta) = StreamMeta::decode(value) {
                            if meta.next_offset == 0 {
                                losses
                                    .push(Loss::Other(format!("the creation of stream {name:?}")));
                            }
                        }
                    }
                }
                (Some(GROUP_PREFIX), Some(_)) if key.len() >= 9 => {
                    losses.push(Loss::Other(format!(
                        "a commit of consumer group {:?} of stream {:?}",
                        String::from_utf8_lossy(&key[9..]),
                        stream_of(id(), &heads)
                    )))
                }
                (Some(b'a'), Some(_)) => losses.push(Loss::Other(format!(
                    "API key {}",
                    String::from_utf8_lossy(&key[1..])
                ))),
                _ => {}
            }
        }
    }
    let mut all: Vec<Loss> = events
        .into_iter()
        .map(|(stream, (first, end))| Loss::Events { stream, first, end })
        .collect();
    all.extend(losses);
    all.dedup();
    Ok(all)
}
