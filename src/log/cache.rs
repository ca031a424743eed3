//! The tail cache: each stream keeps its most recently committed chunks in
//! memory, decoded, so subscribers following the head read new events from
//! here instead of each going to storage for every event. Bounded in bytes;
//! the oldest chunks fall out first, and readers behind it fall back to
//! storage.
//!
//! Both caches of every stream also draw on one server-wide
//! [`CacheBudget`] (`--stream-cache-budget-bytes`): a cache that grows while
//! the budget is spent evicts its own oldest chunks, down to none, so ten
//! thousand streams cost at most the budget, not ten thousand times the
//! per-stream size. Correctness never depends on a cache: a reader that
//! misses reads storage.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::Chunk;

/// Bytes of cached chunks, all streams together, and the most allowed.
#[derive(Debug, Clone)]
pub(crate) struct CacheBudget {
    used: Arc<AtomicUsize>,
    capacity: usize,
}

impl CacheBudget {
    pub(crate) fn new(capacity: usize) -> CacheBudget {
        CacheBudget {
            used: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }

    fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.capacity
    }

    /// Bytes cached now, all streams together.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Recently committed chunks of one stream, contiguous in offset order.
#[derive(Debug)]
pub(crate) struct TailCache {
    chunks: VecDeque<(Arc<Chunk>, usize)>,
    bytes: usize,
    capacity: usize,
    budget: CacheBudget,
}

impl TailCache {
    /// An empty cache holding about `capacity` bytes of chunks (at least
    /// the newest chunk while the server-wide budget allows).
    pub(crate) fn new(capacity: usize, budget: CacheBudget) -> TailCache {
        TailCache {
            chunks: VecDeque::new(),
            bytes: 0,
            capacity,
            budget,
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, size)) = self.chunks.pop_front() {
            self.bytes -= size;
            self.budget.release(size);
        }
    }

    /// Adds a newly committed chunk. Chunks must arrive in offset order
    /// with no gap; a gap (which a caller bug would cause) empties the
    /// cache rather than let it serve a hole.
    pub(crate) fn push(&mut self, chunk: Arc<Chunk>, size: usize) {
        if let Some((last, _)) = self.chunks.back() {
            if last.end_offset() != chunk.first_offset {
                while !self.chunks.is_empty() {
                    self.pop_oldest();
                }
            }
        }
        self.bytes += size;
        self.budget.charge(size);
        self.chunks.push_back((chunk, size));
        while (self.bytes > self.capacity && self.chunks.len() > 1)
            || (self.budget.spent() && !self.chunks.is_empty())
        {
            self.pop_oldest();
        }
    }

    /// Whether a cached chunk holds `offset`.
    pub(crate) fn holds(&self, offset: u64) -> bool {
        self.chunks
            .front()
            .is_some_and(|(c, _)| c.first_offset <= offset)
            && self
                .chunks
                .back()
                .is_some_and(|(c, _)| offset < c.end_offset())
    }

    /// The cached chunks from the one holding `offset` on, at most
    /// `max_chunks` of them; `None` when no cached chunk holds `offset`:
    /// it is older than the cache, or newer (a head another server's
    /// append moved has no chunks here).
    pub(crate) fn chunks_from(&self, offset: u64, max_chunks: usize) -> Option<Vec<Arc<Chunk>>> {
        if !self.holds(offset) {
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

/// Chunks recently read from storage for consumer-group members, so the
/// members of a group, reading the same stretch of a stream at about the
/// same time, read and decode each chunk once between them instead of once
/// each. Bounded in bytes; the chunks read longest ago go first.
#[derive(Debug)]
pub(crate) struct SharedReads {
    chunks: BTreeMap<u64, (Arc<Chunk>, usize)>,
    /// First offsets in insertion order, for eviction.
    order: VecDeque<u64>,
    bytes: usize,
    capacity: usize,
    budget: CacheBudget,
}

impl Drop for TailCache {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Drop for SharedReads {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl SharedReads {
    pub(crate) fn new(capacity: usize, budget: CacheBudget) -> SharedReads {
        SharedReads {
            chunks: BTreeMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            capacity,
            budget,
        }
    }

    /// Remembers chunks just read from storage.
    pub(crate) fn insert(&mut self, chunks: &[Arc<Chunk>]) {
        for chunk in chunks {
            if self.chunks.contains_key(&chunk.first_offset) {
                continue;
            }
            let size = chunk.encoded_len();
            self.chunks
                .insert(chunk.first_offset, (chunk.clone(), size));
            self.order.push_back(chunk.first_offset);
            self.bytes += size;
            self.budget.charge(size);
        }
        while self.bytes > self.capacity || (self.budget.spent() && self.bytes > 0) {
            let Some(first) = self.order.pop_front() else {
                break;
            };
            if let Some((_, size)) = self.chunks.remove(&first) {
                self.bytes -= size;
                self.budget.release(size);
            }
        }
    }

    /// The remembered chunks from the one holding `offset` on, as long as
    /// they are contiguous, at most `max_chunks`; `None` when the chunk
    /// holding `offset` is not remembered.
    pub(crate) fn chunks_from(&self, offset: u64, max_chunks: usize) -> Option<Vec<Arc<Chunk>>> {
        let (_, (first, _)) = self.chunks.range(..=offset).next_back()?;
        if !first.contains(offset) {
            return None;
        }
        let mut run = vec![first.clone()];
        let mut next = first.end_offset();
        while run.len() < max_chunks {
            match self.chunks.get(&next) {
                Some((chunk, _)) => {
                    next = chunk.end_offset();
                    run.push(chunk.clone());
                }
                None => break,
            }
        }
        Some(run)
    }

    /// Forgets chunks below `offset` (trimmed by retention).
    pub(crate) fn forget_below(&mut self, offset: u64) {
        let keep = self.chunks.split_off(&offset);
        for (_, (_, size)) in std::mem::replace(&mut self.chunks, keep) {
            self.bytes -= size;
            self.budget.release(size);
        }
        self.order.retain(|first| *first >= offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventRecord;

    fn unlimited() -> CacheBudget {
        CacheBudget::new(usize::MAX)
    }

    #[test]
    fn every_cache_gives_way_when_the_server_wide_budget_is_spent() {
        let budget = CacheBudget::new(250);
        let mut quiet = TailCache::new(1000, budget.clone());
        quiet.push(chunk(0, 1), 200);
        let mut busy = TailCache::new(1000, budget.clone());
        busy.push(chunk(0, 1), 40);
        assert_eq!(budget.used(), 240);
        // Past the budget the growing cache evicts its own, down to none.
        busy.push(chunk(1, 1), 100);
        assert!(budget.used() <= 250, "{}", budget.used());
        assert!(busy.chunks_from(0, 10).is_none());
        let mut reads = SharedReads::new(1000, budget.clone());
        reads.insert(&[chunk(0, 1)]);
        assert!(budget.used() <= 250);
        drop(quiet);
        drop(reads);
        drop(busy);
        assert_eq!(budget.used(), 0);
    }

    fn chunk(first: u64, n: usize) -> Arc<Chunk> {
        Arc::new(Chunk {
            first_offset: first,
            time_unix_nanos: 0,
            records: vec![EventRecord::default(); n],
        })
    }

    #[test]
    fn serves_from_the_chunk_holding_the_offset_and_evicts_oldest() {
        let mut cache = TailCache::new(250, unlimited());
        cache.push(chunk(0, 2), 100);
        cache.push(chunk(2, 3), 100);
        assert_eq!(cache.chunks_from(3, 10).unwrap()[0].first_offset, 2);
        assert_eq!(cache.chunks_from(0, 10).unwrap().len(), 2);
        // Past the cache's end (a head another server moved): not here.
        assert!(cache.chunks_from(5, 10).is_none());
        cache.push(chunk(5, 1), 100);
        // 300 bytes > 250: the oldest chunk is gone.
        assert!(cache.chunks_from(1, 10).is_none());
        assert_eq!(cache.chunks_from(2, 1).unwrap().len(), 1);
    }

    #[test]
    fn shared_reads_serve_contiguous_runs_and_evict_the_oldest_reads() {
        let mut reads = SharedReads::new(1000, unlimited());
        let (a, b, c) = (chunk(0, 2), chunk(2, 3), chunk(10, 1));
        let size = a.encoded_len();
        reads.insert(&[a, b, c]);
        let run = reads.chunks_from(1, 10).unwrap();
        assert_eq!(
            run.iter().map(|c| c.first_offset).collect::<Vec<_>>(),
            [0, 2]
        );
        assert!(reads.chunks_from(5, 10).is_none(), "nothing holds offset 5");
        assert_eq!(reads.chunks_from(10, 10).unwrap().len(), 1);
        reads.forget_below(2);
        assert!(reads.chunks_from(0, 10).is_none());
        let mut small = SharedReads::new(size, unlimited());
        small.insert(&[chunk(0, 2)]);
        small.insert(&[chunk(2, 2)]);
        assert!(small.chunks_from(0, 1).is_none(), "the oldest read went");
        assert!(small.chunks_from(2, 1).is_some());
    }

    #[test]
    fn a_gap_resets_the_cache() {
        let mut cache = TailCache::new(1000, unlimited());
        cache.push(chunk(0, 2), 10);
        cache.push(chunk(7, 1), 10);
        assert!(cache.chunks_from(0, 10).is_none());
        assert_eq!(cache.chunks_from(7, 10).unwrap().len(), 1);
    }

    #[test]
    fn keeps_the_newest_chunk_even_when_over_capacity() {
        let mut cache = TailCache::new(10, unlimited());
        cache.push(chunk(0, 1), 100);
        assert_eq!(cache.chunks_from(0, 10).unwrap().len(), 1);
    }
}
