//! The single writer of a stream: the only place that assigns offsets.
//!
//! Every Append on a stream becomes a job on the writer's queue. The writer
//! takes whatever jobs are waiting (up to a cap) as one group, checks each
//! job's preconditions in order (idempotency key, expected next offset),
//! gives the accepted ones consecutive offsets, and writes them with their
//! idempotency records and the stream's metadata in one atomic store batch.
//! The group then goes to the [`Committer`] for one shared sync. Offsets are
//! therefore dense and ordered however many producers race, and a rejected
//! job writes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::command::{AppendJob, ConsumerChange, WriterCommand};
use super::commit::{Change, Commit, Committer, PipelineGate};
use super::consumer::{apply_change, ConsumerState};
use super::{AppendOutcome, StreamShared};
use crate::engine::{
    Chunk, EncodedChunk, Engine, EventRecord, IdempotencyRecord, Prepared, Retention, StorageError,
    StreamMeta, GROUP_EVENT_OVERHEAD, TARGET_CHUNK_BYTES,
};
use crate::error::Error;

/// The most events one group commit takes from the queue; later jobs wait
/// for the next group.
const MAX_GROUP_EVENTS: usize = 20_000;

/// The most chunks one trim removes (about 32 MiB of 8 KiB chunks): a
/// big backlog is trimmed over several turns, with appends in between.
const MAX_TRIM_CHUNKS: usize = 4096;

/// How many times a group is decided again because other servers
/// appended first (cluster mode) before its callers get ABORTED.
const MAX_HEAD_MOVES: u32 = 16;

/// The writer's state. Owns the stream's authoritative next offset.
pub(crate) struct Writer {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) committer: Committer,
    pub(crate) shared: Arc<StreamShared>,
    pub(crate) name: String,
    pub(crate) meta: StreamMeta,
    /// The offset the next accepted event gets (written, maybe not yet durable).
    pub(crate) next_offset: u64,
    /// The last append time, so times never go backwards.
    pub(crate) last_time_unix_nanos: i64,
    pub(crate) idempotency_window: Duration,
    /// Caps on consumers and groups per stream.
    pub(crate) limits: super::Limits,
    /// The wall clock (append times, ages, the idempotency window).
    pub(crate) clock: crate::clock::Clock,
    /// Idempotency keys of groups handed to the committer but not yet
    /// published: sled gets them only once they are durable, so a retry
    /// arriving meanwhile is found here.
    pub(crate) unpublished_keys: Vec<(String, IdempotencyRecord)>,
    /// The producers' fencing token (empty: none).
    pub(crate) fence: String,
    /// Cancelled when the log closes: the writer stops between groups.
    pub(crate) closing: CancellationToken,
    /// The committer's epoch this state was loaded or last reloaded at
    /// (see [`Committer`]): every change carries it.
    pub(crate) epoch: u64,
    /// The committer's epoch as it moves.
    pub(crate) epochs: watch::Receiver<u64>,
}

/// What wakes the writer.
enum Wake {
    Command(WriterCommand),
    EpochMoved,
}

impl Writer {
    /// Runs until the stream is deleted, the log closes, or every sender is gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<WriterCommand>) {
        loop {
            let wake = tokio::select! {
                biased;
                _ = self.closing.cancelled() => return,
                Ok(()) = self.epochs.changed() => Wake::EpochMoved,
                command = rx.recv() => match command {
                    Some(command) => Wake::Command(command),
                    None => return,
                },
            };
            let command = match wake {
                Wake::EpochMoved => {
                    self.resync();
                    continue;
                }
                Wake::Command(command) => command,
            };
            // Appends waiting together form one group; another command
            // ends the group and runs after it, keeping queue order.
            let mut next = Some(command);
            while let Some(command) = next.take() {
                if *self.epochs.borrow() != self.epoch {
                    self.resync();
                }
                match command {
                    WriterCommand::Append(job) => {
                        // A group fits the engine's bound on one group's
                        // bytes, when it has one (a bigger batch alone is
                        // refused by `accept`).
                        let room = self.engine.max_group_bytes();
                        let mut events = job.events.len();
                        let mut bytes = room.map_or(0, |_| group_bytes(&job.events));
                        let mut jobs = vec![job];
                        while events < MAX_GROUP_EVENTS {
                            match rx.try_recv() {
                                Ok(WriterCommand::Append(job)) => {
                                    if let Some(room) = room {
                                        let more = group_bytes(&job.events);
                                        if bytes + more > room {
                                            next = Some(WriterCommand::Append(job));
                                            break;
                                        }
                                        bytes += more;
                                    }
                                    events += job.events.len();
                                    jobs.push(job);
                                }
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.write_group(jobs).await;
                    }
                    WriterCommand::Delete(reply) => {
                        if self.delete(reply).await {
                            return;
                        }
                    }
                    WriterCommand::DeletedElsewhere(reply) => {
                        let (done, outcome) = oneshot::channel();
                        self.committer
                            .commit(Commit {
                                stream: self.shared.clone(),
                                epoch: self.epoch,
                                record: None,
                                change: Change::Deleted(done),
                            })
                            .await;
                        let _ = reply.send(outcome.await.unwrap_or(Err(Error::ShuttingDown)));
                        return;
                    }
                    WriterCommand::RetentionElsewhere(retention) => {
                        self.meta.retention = retention;
                        *self.shared.retention.lock().expect("retention lock") = retention;
                    }
                    WriterCommand::Consumer {
                        name,
                        change,
                        reply,
                    } => self.change_consumer(name, change, reply).await,
                    WriterCommand::Trim => self.trim().await,
                    WriterCommand::ExpireIdempotency => self.expire_idempotency().await,
                    WriterCommand::Group {
                        name,
                        change,
                        reply,
                    } => self.change_group(name, change, reply).await,
                    WriterCommand::SetRetention { retention, reply } => {
                        self.set_retention(retention, reply).await
                    }
                    WriterCommand::SetFence {
                        token,
                        expected,
                        reply,
                    } => self.set_fence(token, expected, reply).await,
                    WriterCommand::Moved {
                        next_offset,
                        last_time_unix_nanos,
                        chunks,
                    } => {
                        self.follow_head(next_offset, last_time_unix_nanos, chunks)
                            .await
                    }
                }
            }
        }
    }

    /// Brings the writer's state back to what the engine holds, after a
    /// write rolled back on a full disk moved the committer's epoch on
    /// (see [`Committer`]): the head, the stream's metadata and fencing
    /// token, its consumers' and groups' records. Every change this writer
    /// made before is failed unwritten by the committer, so the engine's
    /// state is all there is. Append times never go backwards. When the
    /// engine cannot be read, the writer keeps its old epoch (its changes
    /// keep failing unwritten) and tries again at its next command.
    fn resync(&mut self) {
        let epoch = *self.epochs.borrow_and_update();
        if epoch == self.epoch {
            return;
        }
        let stored = match self.engine.stored_stream(&self.name) {
            Ok(Some(stored)) if stored.meta.id == self.meta.id => stored,
            Ok(_) => {
                // Only a durable deletion removes it, and that ends the
                // writer: nothing to reload.
                error!(stream = %self.name, "the stream is not stored: nothing to reload after the failed write");
                self.epoch = epoch;
                return;
            }
            Err(e) => {
                error!(stream = %self.name, error = %e, "cannot reload the stream after a failed write; its changes are refused until it can");
                return;
            }
        };
        if stored.next_offset != self.next_offset {
            info!(stream = %self.name, from = self.next_offset, to = stored.next_offset, "a write failed on a full disk: the stream's next offset is handed out again");
        }
        self.meta = stored.meta;
        self.next_offset = stored.next_offset;
        if let Some(time) = stored.last_time_unix_nanos {
            self.last_time_unix_nanos = self.last_time_unix_nanos.max(time);
        }
        self.fence = stored.fence;
        self.unpublished_keys.clear();
        *self.shared.retention.lock().expect("retention lock") = stored.meta.retention;
        self.shared.set_bytes(stored.meta.bytes);
        {
            let mut consumers = self.shared.consumers.lock().expect("consumers lock");
            consumers.retain(|name, state| {
                let kept = stored.consumers.iter().any(|(n, _)| n == name);
                if !kept {
                    state.end_lease();
                }
                kept
            });
            for (name, record) in stored.consumers {
                match consumers.get_mut(&name) {
                    Some(state) => state.record = record,
                    None => {
                        consumers.insert(name, ConsumerState::new(record));
                    }
                }
            }
        }
        super::group::resync(&self.shared, stored.groups);
        self.epoch = epoch;
    }

    /// Checks and writes a consumer change, then hands it to the
    /// committer. The in-memory state changes at once (readers may see a
    /// commit a moment before it is durable; if the sync fails the server
    /// refuses all further writes).
    async fn change_consumer(
        &mut self,
        name: String,
        change: ConsumerChange,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if let Some(reason) = self.committer.failure() {
            let _ = reply.send(Err(Error::StorageFailed(reason)));
            return;
        }
        if let ConsumerChange::Commit { offset, .. } = change {
            let head = self.shared.head();
            if let Err(e) = super::check_offset(&self.name, offset, head) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        let stored_count = match self.refresh_consumer(&name, &change) {
            Ok(count) => count,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let written = {
            let mut consumers = self.shared.consumers.lock().expect("consumers lock");
            let count = stored_count.unwrap_or(consumers.len());
            let current = consumers.get(&name);
            if let ConsumerChange::Delete = change {
                match current {
                    None => Err(Error::ConsumerNotFound {
                        stream: self.name.clone(),
                        consumer: name.clone(),
                    }),
                    Some(_) => self
                        .engine
                        .delete_consumer(self.meta.id, &name)
                        .map_err(Error::from)
                        .map(|record| {
                            if let Some(mut state) = consumers.remove(&name) {
                                state.end_lease();
                            }
                            Some(record)
                        }),
                }
            } else if current.is_none() && count >= self.limits.max_consumers_per_stream {
                Err(Error::ResourceExhausted(format!(
                    "stream {} already has {} durable consumers, the most allowed (--max-consumers-per-stream {}): delete consumers it no longer needs",
                    crate::error::shown(&self.name),
                    count,
                    self.limits.max_consumers_per_stream
                )))
            } else {
                match apply_change(
                    current.map(|s| &s.record),
                    &change,
                    self.clock.now_unix_nanos(),
                ) {
                    None => Ok(None),
                    Some(record) => self
                        .engine
                        .put_consumer(self.meta.id, &name, &record)
                        .map_err(Error::from)
                        .map(|logged| {
                            match consumers.get_mut(&name) {
                                Some(state) => state.record = record,
                                None => {
                                    consumers.insert(name.clone(), ConsumerState::new(record));
                                }
                            }
                            Some(logged)
                        }),
                }
            }
        };
        self.commit_change(written, reply).await;
    }

    /// With an engine several servers share: brings the consumer's record
    /// in memory up to what is stored (another server may have changed or
    /// deleted it), and, when the change would create it, returns how many
    /// consumers the stream has, stored (the bound is cluster-wide). `None`
    /// otherwise: memory is the stored state.
    fn refresh_consumer(
        &mut self,
        name: &str,
        change: &ConsumerChange,
    ) -> Result<Option<usize>, Error> {
        if !self.engine.shared() {
            return Ok(None);
        }
        let stored = self.engine.stored_consumer(self.meta.id, name)?;
        let count = match (&stored, change) {
            (None, ConsumerChange::Commit { .. } | ConsumerChange::Open { .. }) => {
                Some(self.engine.stored_consumers(self.meta.id)?.len())
            }
            _ => None,
        };
        let mut consumers = self.shared.consumers.lock().expect("consumers lock");
        match stored {
            Some(record) => match consumers.get_mut(name) {
                Some(state) => state.record = record,
                None => {
                    consumers.insert(name.to_string(), ConsumerState::new(record));
                }
            },
            None => {
                if let Some(mut state) = consumers.remove(name) {
                    state.end_lease();
                }
            }
        }
        Ok(count)
    }

    /// Hands a written change (its write-ahead log record, if any) to the
    /// committer, or answers at once when it failed or wrote nothing.
    async fn commit_change(
        &mut self,
        written: Result<Option<Prepared>, Error>,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        match written {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            // Nothing to write.
            Ok(None) => {
                let _ = reply.send(Ok(()));
            }
            Ok(Some(record)) => {
                self.committer
                    .commit(Commit {
                        stream: self.shared.clone(),
                        epoch: self.epoch,
                        record: Some(record),
                        change: Change::Other(reply),
                    })
                    .await
            }
        }
    }

    /// Removes the oldest chunks the retention policy no longer keeps:
    /// whole chunks from the front, never past the published head, and
    /// for `max_events` and `max_bytes` never below the limit (a stream
    /// keeps at least what its policy promises).
    async fn trim(&mut self) {
        let retention = self.meta.retention;
        if retention.keeps_everything() || self.committer.failure().is_some() {
            return;
        }
        let head = self.shared.head();
        // Cheap checks first: most turns have nothing to trim.
        let stored = head.next_offset - head.first_offset;
        if retention.max_age_nanos == 0
            && (retention.max_events == 0 || stored <= retention.max_events)
            && (retention.max_bytes == 0 || self.meta.bytes <= retention.max_bytes)
        {
            return;
        }
        let max_age = i64::try_from(retention.max_age_nanos).unwrap_or(i64::MAX);
        let cutoff = self.clock.now_unix_nanos().saturating_sub(max_age);
        let mut below = head.first_offset;
        let mut bytes = self.meta.bytes;
        let visited =
            self.engine
                .visit_oldest_chunks(self.meta.id, MAX_TRIM_CHUNKS, &mut |chunk, size| {
                    if chunk.end_offset() > head.next_offset {
                        return false;
                    }
                    let too_old = retention.max_age_nanos > 0 && chunk.time_unix_nanos < cutoff;
                    let too_many = retention.max_events > 0
                        && head.next_offset - chunk.end_offset() >= retention.max_events;
                    let too_big = retention.max_bytes > 0
                        && bytes.saturating_sub(size) >= retention.max_bytes;
                    if too_old || too_many || too_big {
                        below = chunk.end_offset();
                        bytes = bytes.saturating_sub(size);
                        true
                    } else {
                        false
                    }
                });
        if let Err(e) = visited {
            error!(stream = %self.name, error = %e, "retention could not read the stream");
            return;
        }
        if below <= head.first_offset {
            return;
        }
        let mut meta = self.meta;
        meta.offset_floor = below;
        meta.bytes = bytes;
        let record = match self.engine.trim(&self.name, &meta, below) {
            Ok(record) => record,
            Err(e) => {
                error!(stream = %self.name, error = %e, "retention could not trim the stream");
                return;
            }
        };
        self.meta = meta;
        self.shared.set_bytes(bytes);
        self.committer
            .commit(Commit {
                stream: self.shared.clone(),
                epoch: self.epoch,
                record: Some(record),
                change: Change::Trimmed {
                    first_offset: below,
                },
            })
            .await;
    }

    /// Forgets this stream's idempotency keys older than the window,
    /// through the log like any change. Keys of groups not yet published
    /// are kept: sled still holds their older records, which the scan
    /// would otherwise remove after the newer ones were applied.
    async fn expire_idempotency(&mut self) {
        if self.committer.failure().is_some() {
            return;
        }
        let window = i64::try_from(self.idempotency_window.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = self.clock.now_unix_nanos().saturating_sub(window);
        let expired = match self.engine.expired_idempotency(self.meta.id, cutoff) {
            Ok(keys) => keys,
            Err(e) => {
                error!(stream = %self.name, error = %e, "cannot scan idempotency keys");
                return;
            }
        };
        let expired: Vec<String> = expired
            .into_iter()
            .filter(|k| !self.unpublished_keys.iter().any(|(u, _)| u == k))
            .collect();
        if expired.is_empty() {
            return;
        }
        let count = expired.len();
        match self.engine.forget_idempotency(self.meta.id, &expired) {
            Ok(record) => {
                tracing::debug!(stream = %self.name, count, "forgetting expired idempotency keys");
                self.committer
                    .commit(Commit {
                        stream: self.shared.clone(),
                        epoch: self.epoch,
                        record: Some(record),
                        change: Change::Expired,
                    })
                    .await
            }
            Err(e) => error!(stream = %self.name, error = %e, "cannot expire idempotency keys"),
        }
    }

    /// Applies a group change and writes the group's committed offsets.
    async fn change_group(
        &mut self,
        name: String,
        change: super::command::GroupChange,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if let Some(reason) = self.committer.failure() {
            let _ = reply.send(Err(Error::StorageFailed(reason)));
            return;
        }
        if let super::command::GroupChange::Reset { offset } = change {
            if let Err(e) = super::check_offset(&self.name, offset, self.shared.head()) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        use super::group::GroupWrite;
        // Shared engines: start from the stored record (a group made, or
        // slots committed, through another server).
        let mut stored_groups = None;
        if self.engine.shared() {
            match self.engine.stored_group(self.meta.id, &name) {
                Ok(stored) => super::group::take_stored(&self.shared, &name, stored),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
            // A new group counts against the limit with every stored one,
            // wherever it was made.
            let known = self
                .shared
                .groups
                .lock()
                .expect("groups lock")
                .contains_key(&name);
            if matches!(change, super::command::GroupChange::Create { .. }) && !known {
                match self.engine.stored_group_names(self.meta.id) {
                    Ok(names) => stored_groups = Some(names.len()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                }
            }
        }
        let written = super::group::apply_change(
            &self.shared,
            &self.name,
            &name,
            &change,
            self.clock.now_unix_nanos(),
            self.limits.max_groups_per_stream,
            stored_groups,
        )
        .and_then(|write| {
            let logged = match write {
                None => return Ok(None),
                Some(GroupWrite::Put(record, slots)) => {
                    self.engine
                        .put_group(self.meta.id, &name, &record, slots.as_deref())
                }
                Some(GroupWrite::Remove) => self.engine.delete_group(self.meta.id, &name),
            };
            logged.map(Some).map_err(Error::from)
        });
        self.commit_change(written, reply).await;
    }

    /// Saves a new retention policy; trimming follows on the retention
    /// task's next turn.
    async fn set_retention(
        &mut self,
        retention: Retention,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if let Some(reason) = self.committer.failure() {
            let _ = reply.send(Err(Error::StorageFailed(reason)));
            return;
        }
        let meta = StreamMeta {
            retention,
            ..self.meta
        };
        let written = self
            .engine
            .write_meta(&self.name, &meta)
            .map_err(Error::from);
        if written.is_ok() {
            self.meta = meta;
            *self.shared.retention.lock().expect("retention lock") = retention;
        }
        self.commit_change(written.map(Some), reply).await;
    }

    /// Takes the fencing token the engine says is in force (one set
    /// through another server sharing it), if it says.
    fn take_fence_in_force(&mut self) {
        if let Some(fence) = self.engine.fence_in_force(self.meta.id) {
            self.fence = fence;
        }
    }

    /// Sets the fencing token. Appends queued before it are decided with
    /// the old token, those after it with the new one.
    async fn set_fence(
        &mut self,
        token: String,
        expected: Option<String>,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if let Some(reason) = self.committer.failure() {
            let _ = reply.send(Err(Error::StorageFailed(reason)));
            return;
        }
        self.take_fence_in_force();
        if let Some(expected) = &expected {
            if *expected != self.fence {
                let _ = reply.send(Err(Error::Fenced {
                    stream: self.name.clone(),
                    given: expected.clone(),
                    current: self.fence.clone(),
                }));
                return;
            }
        }
        // An engine several servers share writes the change at once, after
        // the head it knows: when another server appended (or set a token)
        // first, follow it and check the expected token again.
        let mut moves = 0;
        let written = loop {
            match self.engine.put_fence(self.meta.id, &token) {
                Err(StorageError::HeadMoved {
                    next_offset,
                    last_time_unix_nanos,
                    ..
                }) if moves < MAX_HEAD_MOVES => {
                    moves += 1;
                    self.follow_head(next_offset, last_time_unix_nanos, Vec::new())
                        .await;
                    self.take_fence_in_force();
                    if let Some(expected) = &expected {
                        if *expected != self.fence {
                            break Err(Error::Fenced {
                                stream: self.name.clone(),
                                given: expected.clone(),
                                current: self.fence.clone(),
                            });
                        }
                    }
                }
                Err(StorageError::HeadMoved { .. }) => {
                    break Err(Error::Contended {
                        stream: self.name.clone(),
                        attempts: moves,
                    })
                }
                done => break done.map_err(Error::from),
            }
        };
        if written.is_ok() {
            self.fence = token;
        }
        self.commit_change(written.map(Some), reply).await;
    }

    /// Writes a group of appends, deciding it again from the new head each
    /// time the engine finds that another server appended first (cluster
    /// mode), at most [`MAX_HEAD_MOVES`] times.
    async fn write_group(&mut self, mut jobs: Vec<AppendJob>) {
        let mut moves = 0;
        while let Some((back, next_offset, last_time)) = self.try_write_group(jobs).await {
            moves += 1;
            self.follow_head(next_offset, last_time, Vec::new()).await;
            if moves >= MAX_HEAD_MOVES {
                for job in back {
                    if let Some(gate) = &job.pipeline {
                        gate.fail();
                    }
                    let _ = job.reply.send(Err(Error::Contended {
                        stream: self.name.clone(),
                        attempts: moves,
                    }));
                }
                return;
            }
            jobs = back;
        }
    }

    /// Moves the stream's head to where another server left it (an
    /// engine shared by several servers), publishing it after whatever
    /// this writer handed to the committer before.
    async fn follow_head(
        &mut self,
        next_offset: u64,
        last_time_unix_nanos: i64,
        chunks: Vec<Chunk>,
    ) {
        self.last_time_unix_nanos = self.last_time_unix_nanos.max(last_time_unix_nanos);
        if next_offset <= self.next_offset {
            return;
        }
        // The new events, when the engine has them, go to the tail cache
        // (subscribers following the head then share them instead of each
        // reading storage), if they are exactly the events from our head.
        let from = self.next_offset;
        let chunks = if chunks.first().is_some_and(|c| c.first_offset <= from)
            && chunks.last().is_some_and(|c| c.end_offset() == next_offset)
            && chunks
                .windows(2)
                .all(|w| w[0].end_offset() == w[1].first_offset)
        {
            chunks
                .into_iter()
                .filter(|c| c.end_offset() > from)
                .map(|chunk| {
                    let size = chunk.encoded_len();
                    (Arc::new(chunk), size)
                })
                .collect()
        } else {
            tracing::debug!(
                stream = %self.name,
                from,
                next_offset,
                first = chunks.first().map(|c| c.first_offset),
                "another server's append is not in the tail cache: readers read it from storage"
            );
            Vec::new()
        };
        self.next_offset = next_offset;
        self.meta.next_offset = next_offset;
        self.committer
            .commit(Commit {
                stream: self.shared.clone(),
                epoch: self.epoch,
                record: None,
                change: Change::Appended {
                    events: 0,
                    next_offset,
                    chunks,
                    replies: Vec::new(),
                    pipelines: Vec::new(),
                },
            })
            .await;
    }

    /// Decides and writes one group. Returns the jobs with the head the
    /// engine found when another server appended first: nothing was
    /// written and nobody was answered, so the group can be decided again.
    async fn try_write_group(
        &mut self,
        jobs: Vec<AppendJob>,
    ) -> Option<(Vec<AppendJob>, u64, i64)> {
        if let Some(reason) = self.committer.failure() {
            for job in jobs {
                if let Some(gate) = &job.pipeline {
                    gate.fail();
                }
                let _ = job.reply.send(Err(Error::StorageFailed(reason.clone())));
            }
            return None;
        }
        self.take_fence_in_force();
        let published = self.shared.head().next_offset;
        self.unpublished_keys
            .retain(|(_, r)| r.first_offset + u64::from(r.count) > published);
        let time = self.clock.now_unix_nanos().max(self.last_time_unix_nanos);
        let group_first = self.next_offset;
        let mut records = Vec::new();
        let mut decided = Vec::with_capacity(jobs.len());
        let mut new_keys: Vec<(String, IdempotencyRecord)> = Vec::new();
        let mut pipelines = Vec::new();
        // Pipelines a batch of this group failed: their later batches are
        // not written. Their gates are closed only once the group is
        // written (a group decided again starts from scratch).
        let mut stopped: Vec<Arc<PipelineGate>> = Vec::new();
        for mut job in jobs {
            if let Some(gate) = &job.pipeline {
                if gate.failed() || stopped.iter().any(|g| Arc::ptr_eq(g, gate)) {
                    decided.push((job, Err(Error::PipelineStopped)));
                    continue;
                }
                pipelines.push(gate.clone());
            }
            let result = self.accept(&job, time, &new_keys);
            if let (Err(_), Some(gate)) = (&result, &job.pipeline) {
                // Nothing after a failed batch of a pipeline is written.
                stopped.push(gate.clone());
            }
            if let Ok(outcome) = &result {
                if !outcome.duplicate {
                    if let Some((key, fingerprint)) = &job.idempotency {
                        new_keys.push((
                            key.clone(),
                            IdempotencyRecord {
                                first_offset: outcome.first_offset,
                                count: outcome.count,
                                time_unix_nanos: time,
                                fingerprint: *fingerprint,
                            },
                        ));
                    }
                    self.next_offset += u64::from(outcome.count);
                    records.extend(std::mem::take(&mut job.events));
                }
            }
            decided.push((job, result));
        }

        let chunks = cut_into_chunks(group_first, time, records);
        let mut meta = self.meta;
        meta.next_offset = self.next_offset;
        let mut encoded = Vec::with_capacity(chunks.len());
        let mut cached = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let value = chunk.encode();
            let size = value.len();
            meta.bytes += size as u64;
            encoded.push(EncodedChunk {
                first_offset: chunk.first_offset,
                value,
            });
            cached.push((Arc::new(chunk), size));
        }
        let mut record = None;
        if !encoded.is_empty() || !new_keys.is_empty() {
            let keys: Vec<(&str, IdempotencyRecord)> =
                new_keys.iter().map(|(k, r)| (k.as_str(), *r)).collect();
            match self.engine.write_group(&self.name, &meta, encoded, &keys) {
                Ok(logged) => {
                    record = Some(logged);
                    self.unpublished_keys.extend(new_keys);
                }
                Err(StorageError::HeadMoved {
                    next_offset,
                    last_time_unix_nanos,
                    ..
                }) => {
                    // Nothing was written: the accepted jobs get their
                    // events back, in order, to be decided again.
                    self.next_offset = group_first;
                    let mut events = cached
                        .iter()
                        .flat_map(|(chunk, _)| chunk.records.iter().cloned());
                    let jobs = decided
                        .into_iter()
                        .map(|(mut job, result)| {
                            if let Ok(outcome) = &result {
                                if !outcome.duplicate {
                                    job.events =
                                        events.by_ref().take(outcome.count as usize).collect();
                                }
                            }
                            job
                        })
                        .collect();
                    return Some((jobs, next_offset, last_time_unix_nanos));
                }
                Err(e) => {
                    // The batch is atomic: nothing of it was written.
                    if matches!(e, StorageError::StreamGone { .. }) {
                        tracing::info!(stream = %self.name, "an append found the stream deleted through another server");
                    } else {
                        error!(stream = %self.name, error = %e, "append failed");
                    }
                    self.next_offset = group_first;
                    for gate in pipelines.into_iter().chain(stopped) {
                        gate.fail();
                    }
                    let reason = e.to_string();
                    let gone = match &e {
                        StorageError::StreamGone { name } => Some(name.clone()),
                        _ => None,
                    };
                    for (job, result) in decided {
                        let error = match &gone {
                            Some(name) => Error::StreamNotFound(name.clone()),
                            None => Error::StorageFailed(reason.clone()),
                        };
                        let _ = job.reply.send(result.and(Err(error)));
                    }
                    return None;
                }
            }
            self.meta = meta;
            self.last_time_unix_nanos = time;
            self.shared.set_bytes(meta.bytes);
        }
        for gate in stopped {
            gate.fail();
        }
        let replies = decided
            .into_iter()
            .map(|(job, result)| (job.reply, result))
            .collect();
        self.committer
            .commit(Commit {
                stream: self.shared.clone(),
                epoch: self.epoch,
                record,
                change: Change::Appended {
                    events: self.next_offset - group_first,
                    next_offset: self.next_offset,
                    chunks: cached,
                    replies,
                    pipelines,
                },
            })
            .await;
        None
    }

    /// Decides one job against the stream as it stands after the jobs
    /// before it in this group.
    fn accept(
        &self,
        job: &AppendJob,
        time: i64,
        new_keys: &[(String, IdempotencyRecord)],
    ) -> Result<AppendOutcome, Error> {
        if let Some((key, fingerprint)) = &job.idempotency {
            let earlier = match new_keys
                .iter()
                .chain(&self.unpublished_keys)
                .find(|(k, _)| k == key)
            {
                Some((_, record)) => Some(*record),
                None => self
                    .engine
                    .get_idempotency(self.meta.id, key)?
                    .filter(|r| !self.expired(r)),
            };
            if let Some(record) = earlier {
                if record.fingerprint != *fingerprint {
                    return Err(Error::IdempotencyConflict {
                        stream: self.name.clone(),
                        key: key.clone(),
                    });
                }
                return Ok(AppendOutcome {
                    first_offset: record.first_offset,
                    count: record.count,
                    time_unix_nanos: record.time_unix_nanos,
                    duplicate: true,
                });
            }
        }
        if let Some(room) = self.engine.max_group_bytes() {
            let bytes = group_bytes(&job.events);
            if bytes > room {
                return Err(Error::InvalidArgument(format!(
                    "the batch takes {bytes} bytes as the storage engine stores it, and one write holds at most {room} (the NATS cluster's max_payload, less framing): split it"
                )));
            }
        }
        if !job.fencing_token.is_empty() && job.fencing_token != self.fence {
            return Err(Error::Fenced {
                stream: self.name.clone(),
                given: job.fencing_token.clone(),
                current: self.fence.clone(),
            });
        }
        if let Some(expected) = job.expected_next_offset {
            if expected != self.next_offset {
                return Err(Error::WrongExpectedOffset {
                    stream: self.name.clone(),
                    expected,
                    actual: self.next_offset,
                });
            }
        }
        Ok(AppendOutcome {
            first_offset: self.next_offset,
            count: job.events.len() as u32,
            time_unix_nanos: time,
            duplicate: false,
        })
    }

    fn expired(&self, record: &IdempotencyRecord) -> bool {
        let window = i64::try_from(self.idempotency_window.as_nanos()).unwrap_or(i64::MAX);
        record.time_unix_nanos.saturating_add(window) < self.clock.now_unix_nanos()
    }

    /// Deletes the stream's data; the caller is answered once the
    /// deletion is durable, and subscriptions end when it is published.
    /// Returns whether the stream is gone (the writer stops then); after
    /// a failed deletion the stream and its writer stay.
    async fn delete(&mut self, reply: oneshot::Sender<Result<(), Error>>) -> bool {
        let record = match self.engine.delete_stream(&self.name, self.meta.id) {
            Ok(record) => record,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return false;
            }
        };
        let (done, outcome) = oneshot::channel();
        self.committer
            .commit(Commit {
                stream: self.shared.clone(),
                epoch: self.epoch,
                record: Some(record),
                change: Change::Deleted(done),
            })
            .await;
        let outcome = outcome.await.unwrap_or(Err(Error::ShuttingDown));
        let deleted = outcome.is_ok();
        let _ = reply.send(outcome);
        deleted
    }
}

/// The bytes `events` take as [`Engine::max_group_bytes`] counts them.
fn group_bytes(events: &[EventRecord]) -> usize {
    events
        .iter()
        .map(|e| e.encoded_len() + GROUP_EVENT_OVERHEAD)
        .sum()
}

/// Splits a group's records into chunks of about [`TARGET_CHUNK_BYTES`]
/// (a single larger event gets a chunk of its own), keeping every chunk
/// well under sled's inline value limit.
fn cut_into_chunks(first_offset: u64, time: i64, records: Vec<EventRecord>) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut current = Chunk {
        first_offset,
        time_unix_nanos: time,
        records: Vec::new(),
    };
    let mut bytes = 0;
    for record in records {
        let len = record.encoded_len();
        if !current.records.is_empty() && bytes + len > TARGET_CHUNK_BYTES {
            let next_first = current.end_offset();
            chunks.push(std::mem::replace(
                &mut current,
                Chunk {
                    first_offset: next_first,
                    time_unix_nanos: time,
                    records: Vec::new(),
                },
            ));
            bytes = 0;
        }
        bytes += len;
        current.records.push(record);
    }
    if !current.records.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn chunks_are_contiguous_and_bounded() {
        let record = |n: usize| EventRecord {
            event_type: "t".into(),
            data: Bytes::from(vec![0u8; n]),
            ..Default::default()
        };
        let mut records: Vec<_> = (0..1000).map(|_| record(256)).collect();
        records.insert(500, record(TARGET_CHUNK_BYTES * 3));
        let chunks = cut_into_chunks(10, 5, records);
        assert_eq!(chunks[0].first_offset, 10);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].end_offset(), pair[1].first_offset);
        }
        assert_eq!(chunks.last().unwrap().end_offset(), 1011);
        for chunk in &chunks {
            assert!(chunk.records.len() == 1 || chunk.encoded_len() <= TARGET_CHUNK_BYTES + 64);
        }
        assert!(cut_into_chunks(0, 0, Vec::new()).is_empty());
    }
}
