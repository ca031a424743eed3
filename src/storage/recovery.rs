//! Recovery on open: what the write-ahead log holds past the last
//! checkpoint is replayed into sled, after the scan has told a torn tail
//! (the end of the newest file, cut by a crash: dropped with a warning
//! and a copy kept) from damage anywhere else (refused, with a message
//! that names `pullstream repair`).

use std::path::Path;

use super::{
    wal, During, FileEnd, Op, StorageError, Store, StreamMeta, WalError, CHECKPOINT_KEY,
    STREAM_PREFIX,
};

impl Store {
    /// Replays what the log holds past the last checkpoint, after telling
    /// a torn tail (dropped, with a warning and a copy kept) from damage
    /// (refused). Then makes sled durable and checkpoints it. Returns the
    /// next sequence number and the last one sled now holds durably.
    pub(super) fn recover(&self) -> Result<(u64, u64), StorageError> {
        let scan = wal::scan(&self.wal_dir)?;
        if let Some(damage) = scan.damage.clone() {
            return Err(WalError::Damaged {
                damage,
                data_dir: self.path.clone(),
            }
            .into());
        }
        let checkpoint = wal::read_checkpoint(&self.wal_dir)?;
        let in_sled = self
            .tree
            .get(CHECKPOINT_KEY)
            .during(self.path(), "reading the checkpoint key")?
            .map_or(0, |v| {
                let mut n = [0u8; 8];
                n.copy_from_slice(&v[..8.min(v.len())]);
                u64::from_be_bytes(n)
            });
        let covered = checkpoint.unwrap_or(0);
        if in_sled < covered {
            return Err(StorageError::SledBehindCheckpoint {
                path: self.path.clone(),
                sled: in_sled,
                checkpoint: covered,
            });
        }
        if let Some(first) = scan
            .files
            .iter()
            .find(|f| !f.legacy)
            .filter(|f| f.first_seq > covered + 1)
        {
            return Err(WalError::Damaged {
                damage: wal::Damage {
                    file: first.path.clone(),
                    offset: 0,
                    reason: format!(
                        "it starts at record {} but the last checkpoint covers only up to {covered}: records {}..={} are missing",
                        first.first_seq,
                        covered + 1,
                        first.first_seq - 1
                    ),
                },
                data_dir: self.path.clone(),
            }
            .into());
        }
        for file in &scan.files {
            if let FileEnd::Torn { offset, bytes } = file.end {
                if bytes > 0 {
                    self.keep_torn_tail(&file.path, offset, bytes)?;
                }
            }
            // A file without records (a restart right after a rotation)
            // would share its number with the next file: it holds nothing.
            if !file.legacy && file.records.is_empty() {
                std::fs::remove_file(&file.path)
                    .during(&file.path, "removing an empty log file")?;
            }
        }
        let mut replayed = 0;
        let mut legacy = Vec::new();
        for file in &scan.files {
            if file.legacy {
                legacy.push(file.path.clone());
            }
            for record in &file.records {
                if !file.legacy && record.seq <= covered {
                    continue;
                }
                self.replay(&record.ops)?;
                replayed += 1;
            }
        }
        let last = scan.next_seq().max(covered + 1) - 1;
        if replayed > 0 || !legacy.is_empty() {
            self.checkpoint_to(last)?;
            for path in &legacy {
                std::fs::remove_file(path).during(path, "removing a replayed version-1 log")?;
            }
            wal::sync_dir(&self.wal_dir)?;
            tracing::info!(
                records = replayed,
                up_to = last,
                "replayed the write-ahead log past the last checkpoint"
            );
        }
        Ok((last + 1, last))
    }

    /// Keeps a copy of a torn tail beside the log and says so.
    pub(super) fn keep_torn_tail(
        &self,
        file: &Path,
        offset: u64,
        bytes: u64,
    ) -> Result<(), StorageError> {
        let data = std::fs::read(file).during(file, "keeping a torn tail")?;
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
        let copy = self.wal_dir.join(format!("torn-{name}-at-{offset}.bin"));
        let start = (offset as usize).min(data.len());
        let end = (start + bytes as usize).min(data.len());
        std::fs::write(&copy, &data[start..end]).during(&copy, "keeping a torn tail")?;
        tracing::warn!(
            file = %file.display(),
            offset,
            bytes,
            copy = %copy.display(),
            "dropped a torn record at the end of the write-ahead log (a write cut short by a crash, never acknowledged)"
        );
        Ok(())
    }

    /// Applies one replayed record. A stream whose metadata in sled is
    /// already newer than the record's (same stream id, a later head or
    /// first offset: sled wrote it out before the crash) keeps it, and
    /// the record is skipped whole, so replay never moves a head back.
    pub(super) fn replay(&self, ops: &[Op]) -> Result<(), StorageError> {
        for op in ops {
            if let Op::Insert(key, value) = op {
                if key.first() == Some(&STREAM_PREFIX) {
                    if let (Some(current), Ok(incoming)) = (
                        self.tree
                            .get(key)
                            .during(self.path(), "replaying the write-ahead log")?,
                        StreamMeta::decode(value),
                    ) {
                        if let Ok(current) = StreamMeta::decode(&current) {
                            if current.id == incoming.id
                                && (current.next_offset, current.offset_floor)
                                    > (incoming.next_offset, incoming.offset_floor)
                            {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        self.apply_to_sled(ops.to_vec())
    }
}
