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
//! reused. The flusher is a thread of its own (the sync blocks). When the
//! log asks for a checkpoint, the flusher starts one in the background (at
//! most one at a time).
//!
//! In `buffered` mode groups are published as soon as they are written.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
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
    /// Starts the committer, and in `fsync` mode its flusher thread, which
    /// runs until every `Committer` clone is dropped; join the returned
    /// handle to wait for it.
    pub(crate) fn start(
        store: Arc<Store>,
        durability: Durability,
    ) -> std::io::Result<(Committer, Option<std::thread::JoinHandle<()>>)> {
        let failed = Arc::new(OnceLock::new());
        let (flush_tx, flusher) = match durability {
            Durability::Buffered => (None, None),
            Durability::Fsync => {
                let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
                let failed = failed.clone();
                // A dedicated thread, not a task: the sync blocks, and a
                // thread of its own saves a hand-off per group commit.
                let flusher = std::thread::Builder::new()
                    .name("pullstream-flusher".into())
                    .spawn(move || run_flusher(&store, rx, &failed))?;
                (Some(tx), Some(flusher))
            }
        };
        Ok((Committer { flush_tx, failed }, flusher))
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

fn run_flusher(store: &Arc<Store>, mut rx: mpsc::Receiver<Commit>, failed: &OnceLock<String>) {
    let mut group = Vec::new();
    let mut records = Vec::new();
    let mut checkpoint: Option<std::thread::JoinHandle<()>> = None;
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < COMMIT_QUEUE {
            match rx.try_recv() {
                Ok(commit) => group.push(commit),
                Err(_) => break,
            }
        }
        records.clear();
        for commit in &mut group {
            if let Some(record) = commit.record.take() {
                records.extend_from_slice(&record);
            }
        }
        let started = std::time::Instant::now();
        // Nothing new to log: everything earlier is already durable.
        let result = if records.is_empty() {
            Ok(None)
        } else {
            store.log_records(&records)
        };
        debug!(
            groups = group.len(),
            bytes = records.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "group commit"
        );
        match result {
            Ok(due) => {
                group.drain(..).for_each(Commit::publish);
                if let Some(below) = due {
                    if checkpoint.as_ref().is_none_or(|c| c.is_finished()) {
                        let store = store.clone();
                        checkpoint = std::thread::Builder::new()
                            .name("pullstream-checkpoint".into())
                            .spawn(move || {
                                if let Err(e) = store.checkpoint(below) {
                                    warn!(error = %e, "checkpoint failed; the write-ahead log grows until one succeeds");
                                }
                            })
                            .map_err(|e| warn!(error = %e, "cannot start a checkpoint"))
                            .ok();
                    }
                }
            }
            Err(e) => {
                let reason = e.to_string();
                error!(%reason, "storage sync failed: refusing further appends until restart");
                let _ = failed.set(reason.clone());
                group.drain(..).for_each(|c| c.fail(&reason));
            }
        }
    }
    if let Some(checkpoint) = checkpoint {
        let _ = checkpoint.join();
    }
}
