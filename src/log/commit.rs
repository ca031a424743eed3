//! Group commit: the step between "written to the store" and "acknowledged
//! and visible to subscribers".
//!
//! Writers hand each written group to the [`Committer`]. In `fsync` mode a
//! single flusher task makes everything written so far durable with one
//! [`Store::sync`] (sled flush + `fdatasync`), then publishes every group
//! that sync covered: the stream's head moves, its tail cache gets the new
//! chunks, and the callers get their acknowledgements. Groups arriving
//! while a sync runs wait for the next one, so under load one sync covers
//! many appends on many streams. Publishing only after the sync means a
//! subscriber never sees an event that a crash could take back, so an
//! offset a consumer has seen is never reused.
//!
//! In `buffered` mode groups are published as soon as they are written.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use super::{AppendOutcome, StreamShared};
use crate::config::Durability;
use crate::error::Error;
use crate::storage::{Chunk, Store};

/// How many written groups may wait for a sync before writers pause.
const COMMIT_QUEUE: usize = 4096;

/// The acknowledgement a caller waits for.
pub(crate) type Reply = oneshot::Sender<Result<AppendOutcome, Error>>;

/// One written group, waiting to be made durable and published.
pub(crate) struct Commit {
    pub(crate) stream: Arc<StreamShared>,
    /// The stream's next offset once this group is published.
    pub(crate) next_offset: u64,
    /// The group's chunks with their encoded sizes, for the tail cache.
    pub(crate) chunks: Vec<(Arc<Chunk>, usize)>,
    /// Every caller of the group with its answer.
    pub(crate) replies: Vec<(Reply, Result<AppendOutcome, Error>)>,
}

impl Commit {
    fn publish(self) {
        self.stream.publish(self.chunks, self.next_offset);
        for (reply, result) in self.replies {
            let _ = reply.send(result);
        }
    }

    fn fail(self, reason: &str) {
        for (reply, _) in self.replies {
            let _ = reply.send(Err(Error::StorageFailed(reason.to_string())));
        }
    }
}

/// Hands written groups to durability and publication.
#[derive(Clone)]
pub(crate) struct Committer {
    /// The flusher's queue (`fsync` mode only).
    flush_tx: Option<mpsc::Sender<Commit>>,
    /// Set after a failed sync: the store's state is unknown, so the log
    /// refuses further writes until a restart.
    failed: Arc<OnceLock<String>>,
}

impl Committer {
    /// Starts the committer (and in `fsync` mode its flusher task).
    pub(crate) fn start(
        store: Arc<Store>,
        durability: Durability,
        tasks: &TaskTracker,
        closing: CancellationToken,
    ) -> Committer {
        let failed = Arc::new(OnceLock::new());
        let flush_tx = match durability {
            Durability::Buffered => None,
            Durability::Fsync => {
                let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
                tasks.spawn(run_flusher(store, rx, failed.clone(), closing));
                Some(tx)
            }
        };
        Committer { flush_tx, failed }
    }

    /// The reason writes are refused, after a failed sync.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
    }

    /// Publishes `commit` once it is durable under the durability mode.
    pub(crate) async fn commit(&self, commit: Commit) {
        match &self.flush_tx {
            None => commit.publish(),
            Some(tx) => {
                if let Err(mpsc::error::SendError(commit)) = tx.send(commit).await {
                    commit.fail("the flusher has stopped");
                }
            }
        }
    }
}

async fn run_flusher(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Commit>,
    failed: Arc<OnceLock<String>>,
    closing: CancellationToken,
) {
    let mut group = Vec::new();
    loop {
        tokio::select! {
            biased;
            received = rx.recv_many(&mut group, COMMIT_QUEUE) => if received == 0 { return },
            _ = closing.cancelled() => {
                // Writers stop between groups: sync what they handed over, then stop.
                while let Ok(commit) = rx.try_recv() {
                    group.push(commit);
                }
                if group.is_empty() {
                    return;
                }
            }
        }
        let sync_store = store.clone();
        let result = tokio::task::spawn_blocking(move || sync_store.sync())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match result {
            Ok(()) => group.drain(..).for_each(Commit::publish),
            Err(reason) => {
                error!(%reason, "storage sync failed: refusing further appends until restart");
                let _ = failed.set(reason.clone());
                group.drain(..).for_each(|c| c.fail(&reason));
            }
        }
    }
}
