//! Group commit: the step between "written to the store" and "acknowledged
//! and visible to subscribers".
//!
//! Writers hand each written group to the [`Committer`]. In `fsync` mode a
//! single flusher task takes every group waiting, appends their
//! write-ahead log records with one write and one `fdatasync`
//! ([`Store::log_records`]), then publishes them: each stream's head moves,
//! its tail cache gets the new chunks, and the callers get their
//! acknowledgements. Groups arriving while a sync runs wait for the next
//! one, so under load one sync covers many appends on many streams.
//! Publishing only after the sync means a subscriber never sees an event
//! that a crash could take back, so an offset a consumer has seen is never
//! reused. When the log asks for a checkpoint, the flusher starts one in the
//! background (at most one at a time).
//!
//! In `buffered` mode groups are published as soon as they are written.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use super::{AppendOutcome, StreamShared};
use crate::config::Durability;
use crate::error::Error;
use crate::storage::{Chunk, Store};

/// How many written groups may wait for a sync before writers pause.
const COMMIT_QUEUE: usize = 4096;

/// The acknowledgement an Append caller waits for.
pub(crate) type Reply = oneshot::Sender<Result<AppendOutcome, Error>>;

/// One written change, waiting to be made durable and published.
pub(crate) struct Commit {
    pub(crate) stream: Arc<StreamShared>,
    /// The write-ahead log record of the change (`fsync` mode).
    pub(crate) record: Option<Vec<u8>>,
    pub(crate) change: Change,
}

/// What a commit publishes.
pub(crate) enum Change {
    /// A group of appends.
    Appended {
        /// The stream's next offset once published.
        next_offset: u64,
        /// The group's chunks with their encoded sizes, for the tail cache.
        chunks: Vec<(Arc<Chunk>, usize)>,
        /// Every caller of the group with its answer.
        replies: Vec<(Reply, Result<AppendOutcome, Error>)>,
    },
    /// The stream's deletion.
    Deleted(oneshot::Sender<Result<(), Error>>),
}

impl Commit {
    fn publish(self) {
        match self.change {
            Change::Appended {
                next_offset,
                chunks,
                replies,
            } => {
                self.stream.publish(chunks, next_offset);
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            Change::Deleted(reply) => {
                self.stream.mark_deleted();
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn fail(self, reason: &str) {
        let error = || Error::StorageFailed(reason.to_string());
        match self.change {
            Change::Appended { replies, .. } => {
                for (reply, _) in replies {
                    let _ = reply.send(Err(error()));
                }
            }
            Change::Deleted(reply) => {
                let _ = reply.send(Err(error()));
            }
        }
    }
}

/// Hands written changes to durability and publication.
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
                tasks.spawn(run_flusher(
                    store,
                    rx,
                    failed.clone(),
                    closing,
                    tasks.clone(),
                ));
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
    tasks: TaskTracker,
) {
    let mut group = Vec::new();
    let mut checkpoint: Option<tokio::task::JoinHandle<()>> = None;
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
        let mut records = Vec::new();
        for commit in &mut group {
            if let Some(record) = commit.record.take() {
                records.extend_from_slice(&record);
            }
        }
        // Nothing new to log: everything earlier is already durable.
        let result = if records.is_empty() {
            Ok(None)
        } else {
            let store = store.clone();
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || store.log_records(&records))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            debug!(
                groups = group.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
            result
        };
        match result {
            Ok(due) => {
                group.drain(..).for_each(Commit::publish);
                if let Some(below) = due {
                    if checkpoint.as_ref().is_none_or(|c| c.is_finished()) {
                        let store = store.clone();
                        checkpoint = Some(tasks.spawn_blocking(move || {
                            if let Err(e) = store.checkpoint(below) {
                                warn!(error = %e, "checkpoint failed; the write-ahead log keeps growing until one succeeds");
                            }
                        }));
                    }
                }
            }
            Err(reason) => {
                error!(%reason, "storage sync failed: refusing further appends until restart");
                let _ = failed.set(reason.clone());
                group.drain(..).for_each(|c| c.fail(&reason));
            }
        }
    }
}
