//! The tail cache: each stream keeps its most recently committed chunks in
//! memory, decoded, so subscribers following the head read new events from
//! here instead of each going to storage for every event. Bounded in bytes;
//! the oldest chunks fall out first, and readers behind it fall back to
//! storage.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::storage::Chunk;

/// Recently committed chunks of one stream, contiguous in offset order.
#[derive(Debug)]
pub(crate) struct TailCache {
    chunks: VecDeque<(Arc<Chunk>, usize)>,
    bytes: usize,
    capacity: usize,
}

impl TailCache {
    /// An empty cache holding about `capacity` bytes of chunks (always at
    /// least the newest chunk).
    pub(crate) fn new(capacity: usize) -> TailCache {
        TailCache {
            chunks: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    /// Adds a newly committed chunk. Chunks must arrive in offset order
    /// with no gap; a gap (which a caller bug would cause) empties the
    /// cache rather than let it serve a hole.
    pub(crate) fn push(&mut self, chunk: Arc<Chunk>, size: usize) {
        if let Some((last, _)) = self.chunks.back() {
            if last.end_offset() != chunk.first_offset {
                self.chunks.clear();
                self.bytes = 0;
            }
        }
        self.bytes += size;
        self.chunks.push_back((chunk, size));
        while self.bytes > self.capacity && self.chunks.len() > 1 {
            if let Some((_, size)) = self.chunks.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The cached chunks from the one holding `offset` on, at most
    /// `max_chunks` of them; `None` when `offset` is older than the cache.
    pub(crate) fn chunks_from(&self, offset: u64, max_chunks: usize) -> Option<Vec<Arc<Chunk>>> {
        let (front, _) = self.chunks.front()?;
        if offset < front.first_offset {
            return None;
        }
        let start = self
            .chunks
            .partition_point(|(c, _)| c.end_offset() <= offset);
        Some(
            self.chunks
                .range(start..)
                .take(max_chunks)
                .map(|(c, _)| c.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::EventRecord;

    fn chunk(first: u64, n: usize) -> Arc<Chunk> {
        Arc::new(Chunk {
            first_offset: first,
            time_unix_nanos: 0,
            records: vec![EventRecord::default(); n],
        })
    }

    #[test]
    fn serves_from_the_chunk_holding_the_offset_and_evicts_oldest() {
        let mut cache = TailCache::new(250);
        cache.push(chunk(0, 2), 100);
        cache.push(chunk(2, 3), 100);
        assert_eq!(cache.chunks_from(3, 10).unwrap()[0].first_offset, 2);
        assert_eq!(cache.chunks_from(0, 10).unwrap().len(), 2);
        assert_eq!(cache.chunks_from(5, 10).unwrap().len(), 0);
        cache.push(chunk(5, 1), 100);
        // 300 bytes > 250: the oldest chunk is gone.
        assert!(cache.chunks_from(1, 10).is_none());
        assert_eq!(cache.chunks_from(2, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_gap_resets_the_cache() {
        let mut cache = TailCache::new(1000);
        cache.push(chunk(0, 2), 10);
        cache.push(chunk(7, 1), 10);
        assert!(cache.chunks_from(0, 10).is_none());
        assert_eq!(cache.chunks_from(7, 10).unwrap().len(), 1);
    }

    #[test]
    fn keeps_the_newest_chunk_even_when_over_capacity() {
        let mut cache = TailCache::new(10);
        cache.push(chunk(0, 1), 100);
        assert_eq!(cache.chunks_from(0, 10).unwrap().len(), 1);
    }
}
