//! `pullstream verify` and `--verify-on-start`: every chunk of every
//! stream checked (checksums, contiguity, the last chunk ending at the
//! head), and the test-only hook that damages a chunk for the DATA_LOSS
//! tests.

use super::{
    chunk_key, offset_of_chunk_key, stream_key, ChunkHeader, Damaged, During, StorageError, Store,
    StreamCheck, StreamMeta,
};

impl Store {
    /// Walks every chunk of every stream: each must decode with a valid
    /// checksum, follow the one before it without a gap, and the last
    /// must end at the stream's head. `progress` sees the number of
    /// chunks checked so far, now and then. Reads everything: slow on big
    /// data dirs, meant for `pullstream verify` and `--verify-on-start`.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<Vec<StreamCheck>, StorageError> {
        let mut checks = Vec::new();
        let mut chunks_seen = 0u64;
        for item in self.stream_metas() {
            let (name, meta) = item?;
            let head = meta.next_offset.max(meta.offset_floor);
            let mut check = StreamCheck {
                name,
                first_offset: head,
                next_offset: head,
                chunks: 0,
                damage: Vec::new(),
            };
            let mut expected: Option<u64> = None;
            for item in self
                .tree
                .range(chunk_key(meta.id, 0)..=chunk_key(meta.id, u64::MAX))
            {
                let (key, value) = item.during(self.path(), "verifying stored chunks")?;
                let first = offset_of_chunk_key(&key);
                chunks_seen += 1;
                if chunks_seen.is_multiple_of(4096) {
                    progress(chunks_seen);
                }
                check.chunks += 1;
                let from = *expected.get_or_insert_with(|| {
                    check.first_offset = meta.offset_floor.min(head);
                    meta.offset_floor.min(first)
                });
                if first > from && first > meta.offset_floor {
                    check.damage.push(Damaged {
                        first: from.max(meta.offset_floor),
                        end: Some(first),
                        reason: "missing".into(),
                    });
                }
                match self.decode_chunk(meta.id, &key, &value, None) {
                    Ok(chunk) => expected = Some(chunk.end_offset()),
                    Err(e) => {
                        let end = ChunkHeader::decode(&value).ok().map(|h| h.end_offset());
                        check.damage.push(Damaged {
                            first,
                            end,
                            reason: e.to_string(),
                        });
                        expected = Some(end.unwrap_or(first + 1));
                    }
                }
            }
            if let Some(end) = expected {
                if end < head {
                    check.damage.push(Damaged {
                        first: end,
                        end: Some(head),
                        reason: "missing at the end".into(),
                    });
                }
            }
            checks.push(check);
        }
        progress(chunks_seen);
        Ok(checks)
    }

    /// Damages the stored chunk holding `offset` of stream `name` for
    /// real, as a bad disk would: removes it, or flips a byte of it, then
    /// syncs. For tests of damage handling only.
    #[doc(hidden)]
    pub fn damage_chunk_for_tests(
        &self,
        name: &str,
        offset: u64,
        remove: bool,
    ) -> Result<(), StorageError> {
        let meta = self
            .tree
            .get(stream_key(name))
            .during(self.path(), "damaging a chunk (tests)")?
            .map(|v| StreamMeta::decode(&v))
            .transpose()
            .map_err(|source| StorageError::Corrupt {
                what: name.to_string(),
                source,
            })?
            .ok_or_else(|| std::io::Error::other("no such stream"))
            .during(self.path(), "damaging a chunk (tests)")?;
        let (key, value) = self
            .tree
            .get_lt(chunk_key(meta.id, offset + 1))
            .during(self.path(), "damaging a chunk (tests)")?
            .ok_or_else(|| std::io::Error::other("no such chunk"))
            .during(self.path(), "damaging a chunk (tests)")?;
        if remove {
            self.tree
                .remove(key)
                .during(self.path(), "damaging a chunk (tests)")?;
        } else {
            let mut bytes = value.to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x20;
            self.tree
                .insert(key, bytes)
                .during(self.path(), "damaging a chunk (tests)")?;
        }
        self.sync()
    }
}
