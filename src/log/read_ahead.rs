//! Storage reads off the async workers, and reading ahead of a
//! subscriber that is catching up.
//!
//! A read that misses the tail cache goes to storage, and a storage read
//! can wait on the disk (sled faults pages in from its file). On an async
//! worker that wait stalls every task queued behind it there: other
//! subscribers' events and heartbeats, appends' acknowledgements. So such
//! reads run where blocking is allowed: [`off_the_workers`] around every
//! storage read of the one read path (the tokio worker hands its other
//! tasks to another thread first; reads served from memory pay nothing),
//! and [`Pending`] for the chunks a catching-up subscriber
//! needs next, read on the blocking pool while its current response is
//! encoded and sent, so the disk and the network overlap instead of
//! taking turns.
//!
//! Chunks read ahead are held until they are delivered, by a subscriber
//! that may be slow to take them; so the bytes held ahead by all
//! subscriptions together draw on one server-wide [`ReadAheadBudget`]. A
//! subscriber that finds it spent reads when it needs to, as it would
//! without reading ahead: the budget bounds memory, never correctness.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::engine::{Chunk, Engine};

/// Runs `read`, which may block on storage, without stalling the async
/// worker it is called on: through `block_in_place` on the server's
/// multi-threaded runtime, directly anywhere else (a test's
/// single-threaded runtime, or no runtime).
pub(super) fn off_the_workers<T>(read: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(read)
        }
        _ => read(),
    }
}

/// How many bytes of chunks all subscriptions together may hold read
/// ahead: 256 catching-up subscribers with a full response each (a
/// response is at most 256 KiB).
pub(crate) const READ_AHEAD_BUDGET_BYTES: usize = 64 << 20;

/// The bytes of chunks that all subscriptions together may hold read
/// ahead of their cursors.
#[derive(Debug, Clone)]
pub(crate) struct ReadAheadBudget(Arc<Semaphore>);

/// Budget units are KiB, so a semaphore's permit count covers any budget.
const UNIT: usize = 1024;

impl ReadAheadBudget {
    pub(crate) fn new(bytes: usize) -> ReadAheadBudget {
        ReadAheadBudget(Arc::new(Semaphore::new(
            (bytes / UNIT).min(Semaphore::MAX_PERMITS),
        )))
    }

    /// A share of `bytes` of the budget, or `None` when it is spent.
    pub(super) fn take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        self.0.clone().try_acquire_many_owned(units).ok()
    }
}

/// A storage read running on the blocking pool: the chunks from the one
/// holding `from`, with the budget share they are held under.
pub(super) struct Pending {
    pub(super) from: u64,
    task: JoinHandle<Option<Vec<Chunk>>>,
    share: Option<OwnedSemaphorePermit>,
}

impl Pending {
    /// Starts reading `[from, end)`, up to `max_events` events or about
    /// `max_bytes`.
    pub(super) fn start(
        engine: Arc<dyn Engine>,
        stream_id: u64,
        (from, end): (u64, u64),
        (max_events, max_bytes): (usize, usize),
        share: Option<OwnedSemaphorePermit>,
    ) -> Pending {
        let task = tokio::task::spawn_blocking(move || {
            // A failed read is dropped here: the poll that needs these
            // events reads them again and reports the error as such.
            engine
                .read_chunks(stream_id, from, end, max_events, max_bytes, None)
                .ok()
        });
        Pending { from, task, share }
    }

    /// The chunks read and their budget share; `None` if the read failed.
    pub(super) async fn finish(self) -> Option<(Vec<Arc<Chunk>>, Option<OwnedSemaphorePermit>)> {
        let chunks = self.task.await.ok().flatten()?;
        Some((chunks.into_iter().map(Arc::new).collect(), self.share))
    }
}
