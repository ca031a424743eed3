//! A global allocator that keeps sled's log buffers for reuse.
//!
//! sled 0.34 writes its log through an in-memory buffer the size of one
//! segment ([`SEGMENT_SIZE`], 8 KiB-aligned; `pagecache/iobuf.rs`),
//! allocated when a segment is started and freed once it has been written
//! out. glibc serves a block that large with a fresh `mmap` and gives it
//! back with `munmap`, so every byte sled logs (values, and the leaf pages
//! its consolidations, splits and segment cleaning rewrite: several times
//! the events appended) first takes a page fault on a zeroed page. A
//! `perf` profile of pipelined appends put almost all of the server's page
//! faults there (a quarter of its CPU). Raising glibc's mmap threshold
//! instead kept those blocks on the heap but left holes that tripled the
//! server's memory; another allocator (mimalloc) got the speed by keeping
//! every freed page, at 30–50% more memory (README, Performance).
//!
//! So this allocator keeps up to [`SLOTS`] freed blocks of exactly sled's
//! buffer layout and hands them back, already mapped, to the next request
//! for one: at most 16 MiB held, which sled had in use a moment before.
//! Every other allocation goes to the system allocator, unchanged. The
//! slots are atomic pointers (an allocator cannot take a lock that
//! allocates), and a block is owned by exactly one side of a swap.
//!
//! Kept buffers are given back once sled has asked for none for a second
//! ([`start_trimming`], started when a store opens), so a server that has
//! stopped writing holds nothing extra: with them kept for good, RSS after
//! a catch-up of 10,000,000 events was 319 MiB against 301 MiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

use super::SEGMENT_SIZE;

/// The alignment sled 0.34 asks for its log buffers (`AlignedBuf::new`).
const SLED_BUFFER_ALIGN: usize = 8192;

/// How many freed buffers are kept. sled has one buffer being filled and
/// one or two being written at any moment; two slots took the server's
/// page faults under pipelined appends from ~550,000 to ~58,000 in 5 s,
/// and four did no better.
pub const SLOTS: usize = 2;

/// The system allocator, with up to [`SLOTS`] of sled's freed log buffers
/// kept for reuse. The process's one pool is [`POOL`], which the
/// `pullstream` binary installs through [`SegmentBuffers`]; tests make
/// their own.
pub struct SegmentBufferPool {
    slots: [AtomicPtr<u8>; SLOTS],
    /// Requests for a buffer of sled's layout so far (served or not).
    requests: AtomicU64,
}

/// The pool behind [`SegmentBuffers`].
pub static POOL: SegmentBufferPool = SegmentBufferPool::new();

/// The global allocator the `pullstream` binary installs: [`POOL`].
pub struct SegmentBuffers;

/// How long sled must have asked for no buffer before the kept ones are
/// given back.
const IDLE: Duration = Duration::from_secs(1);

/// Starts (once per process) the thread that gives [`POOL`]'s buffers
/// back while sled is idle. Only a process that installed
/// [`SegmentBuffers`] ever has any kept.
pub fn start_trimming() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let started = std::thread::Builder::new()
            .name("buffer-trim".into())
            .spawn(|| {
                let mut seen = POOL.requests();
                loop {
                    std::thread::sleep(IDLE);
                    seen = POOL.release_if_idle(seen);
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the thread that gives sled's idle log buffers back; they stay kept (at most 16 MiB)");
        }
    });
}

impl SegmentBufferPool {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            slots: [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS],
            requests: AtomicU64::new(0),
        }
    }

    /// How many buffers of sled's layout have been asked for.
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Gives every kept buffer back to the system if none was asked for
    /// since the count `seen`; returns the count now.
    pub fn release_if_idle(&self, seen: u64) -> u64 {
        let now = self.requests();
        if now == seen {
            while let Some(block) = self.take() {
                // SAFETY: kept blocks came from `System` with this layout.
                unsafe { System.dealloc(block, sled_buffer_layout()) };
            }
        }
        now
    }

    fn pooled(layout: Layout) -> bool {
        layout.size() == SEGMENT_SIZE && layout.align() == SLED_BUFFER_ALIGN
    }

    /// A kept buffer for a request of sled's layout, counting the request.
    fn serve(&self) -> Option<*mut u8> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.take()
    }

    /// A kept buffer, if there is one; the caller owns it.
    fn take(&self) -> Option<*mut u8> {
        self.slots.iter().find_map(|slot| {
            let block = slot.swap(ptr::null_mut(), Ordering::AcqRel);
            (!block.is_null()).then_some(block)
        })
    }

    /// Keeps `block`; false (and the caller still owns it) when every
    /// slot is taken.
    fn keep(&self, block: *mut u8) -> bool {
        self.slots.iter().any(|slot| {
            slot.compare_exchange(ptr::null_mut(), block, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// How many buffers are kept now.
    pub fn kept(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| !slot.load(Ordering::Acquire).is_null())
            .count()
    }
}

impl Default for SegmentBufferPool {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block handed out is either fresh from `System` for the same
// layout or one that `dealloc` received for exactly that layout (so it is
// live, large enough and aligned), and a kept block is handed to one caller
// only: `take` swaps it out of its slot.
unsafe impl GlobalAlloc for SegmentBufferPool {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::pooled(layout) {
            if let Some(block) = self.serve() {
                return block;
            }
        }
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::pooled(layout) {
            if let Some(block) = self.serve() {
                // SAFETY: the block is ours and `layout.size()` bytes long.
                unsafe { ptr::write_bytes(block, 0, layout.size()) };
                return block;
            }
        }
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if Self::pooled(layout) && self.keep(block) {
            return;
        }
        // SAFETY: `block` came from `System` with this layout (pooled
        // blocks all did, and were never resized).
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `new_size` is valid for the layout's alignment (the
        // caller's contract for `realloc`).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !Self::pooled(layout) && !Self::pooled(new_layout) {
            // SAFETY: the caller's contract for `realloc`, passed on.
            return unsafe { System.realloc(block, layout, new_size) };
        }
        // A pooled block is only ever moved, never resized in place, so
        // every pooled block keeps exactly the pooled layout.
        // SAFETY: as in `alloc` and `dealloc`; the copy is within both.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            moved
        }
    }
}

fn sled_buffer_layout() -> Layout {
    Layout::from_size_align(SEGMENT_SIZE, SLED_BUFFER_ALIGN).expect("a valid layout")
}

// SAFETY: every call goes to `POOL`, whose contract is above.
unsafe impl GlobalAlloc for SegmentBuffers {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { POOL.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { POOL.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { POOL.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { POOL.realloc(block, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sled_buffer() -> Layout {
        sled_buffer_layout()
    }

    #[test]
    fn kept_buffers_are_given_back_only_when_none_was_asked_for() {
        let pool = SegmentBufferPool::new();
        unsafe {
            let block = pool.alloc(sled_buffer());
            pool.dealloc(block, sled_buffer());
            let seen = pool.requests();
            assert_eq!(seen, 1);
            // Asked for again since `seen - 1`: kept.
            let next = pool.release_if_idle(seen - 1);
            assert_eq!((next, pool.kept()), (1, 1));
            // Nothing asked since `seen`: given back.
            assert_eq!(pool.release_if_idle(seen), 1);
            assert_eq!(pool.kept(), 0);
        }
    }

    #[test]
    fn a_freed_sled_buffer_is_handed_back_to_the_next_request() {
        let pool = SegmentBufferPool::new();
        unsafe {
            let first = pool.alloc(sled_buffer());
            assert!(!first.is_null());
            assert_eq!(first as usize % SLED_BUFFER_ALIGN, 0);
            first.write_bytes(7, SEGMENT_SIZE);
            pool.dealloc(first, sled_buffer());
            assert_eq!(pool.kept(), 1);
            let again = pool.alloc(sled_buffer());
            assert_eq!(again, first, "the kept buffer is reused");
            assert_eq!(pool.kept(), 0);
            pool.dealloc(again, sled_buffer());
            // Zeroed requests get a zeroed block even from the pool.
            let zeroed = pool.alloc_zeroed(sled_buffer());
            assert_eq!(zeroed, first);
            assert!(std::slice::from_raw_parts(zeroed, SEGMENT_SIZE)
                .iter()
                .all(|&b| b == 0));
            pool.dealloc(zeroed, sled_buffer());
            drain(&pool);
        }
    }

    #[test]
    fn the_pool_keeps_at_most_its_slots_and_nothing_of_other_layouts() {
        let pool = SegmentBufferPool::new();
        unsafe {
            let blocks: Vec<_> = (0..SLOTS + 2).map(|_| pool.alloc(sled_buffer())).collect();
            assert!(blocks.iter().all(|b| !b.is_null()));
            for &block in &blocks {
                pool.dealloc(block, sled_buffer());
            }
            assert_eq!(pool.kept(), SLOTS, "the extra two went back to the system");

            // Same size, other alignment; other size, same alignment.
            for layout in [
                Layout::from_size_align(SEGMENT_SIZE, 8).unwrap(),
                Layout::from_size_align(SEGMENT_SIZE / 2, SLED_BUFFER_ALIGN).unwrap(),
            ] {
                let block = pool.alloc(layout);
                assert!(!block.is_null());
                assert_eq!(pool.kept(), SLOTS, "not served from the pool");
                pool.dealloc(block, layout);
                assert_eq!(pool.kept(), SLOTS, "not kept either");
            }
            drain(&pool);
        }
    }

    #[test]
    fn a_pooled_buffer_moved_by_realloc_keeps_its_bytes() {
        let pool = SegmentBufferPool::new();
        unsafe {
            let block = pool.alloc(sled_buffer());
            block.write_bytes(3, SEGMENT_SIZE);
            let grown = pool.realloc(block, sled_buffer(), SEGMENT_SIZE * 2);
            assert!(!grown.is_null());
            let bytes = std::slice::from_raw_parts(grown, SEGMENT_SIZE);
            assert!(bytes.iter().all(|&b| b == 3));
            assert_eq!(pool.kept(), 1, "the old block went to the pool");
            let big = Layout::from_size_align(SEGMENT_SIZE * 2, SLED_BUFFER_ALIGN).unwrap();
            pool.dealloc(grown, big);
            drain(&pool);
        }
    }

    /// Gives the kept blocks back to the system, as a test ends.
    unsafe fn drain(pool: &SegmentBufferPool) {
        while let Some(block) = pool.take() {
            unsafe { System.dealloc(block, sled_buffer()) };
        }
    }
}
