//! The log's background turns: each second, sample every stream's append
//! rate and ask the writers of streams with a retention policy to trim;
//! each minute (or idempotency window), ask every writer to forget its
//! expired idempotency keys. Both only send commands: the writers do the
//! work, ordered with appends. With an engine that several servers
//! share, a third task hands each stream's writer the heads other servers'
//! appends left, and a fourth takes in their claims on durable consumers
//! (`consumer.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::command::WriterCommand;
use super::{Log, HOUSEKEEPING_PERIOD};
use crate::engine::RemoteChange;

/// Every [`HOUSEKEEPING_PERIOD`]: samples each stream's head for its
/// append rate, and asks the writer of each stream with a retention policy
/// to trim. A writer whose queue is full is skipped this turn (appends
/// come first; the next turn catches up).
pub(super) async fn housekeeping(log: Arc<Log>) {
    let mut ticks = tokio::time::interval(HOUSEKEEPING_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = log.closing.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = Instant::now();
        for stream in log.all_streams() {
            stream.shared.sample_rate(now);
            let retention = *stream.shared.retention.lock().expect("retention lock");
            if !retention.keeps_everything() {
                let _ = stream.writer_tx.try_send(WriterCommand::Trim);
            }
        }
    }
}

/// Every minute (or window, when shorter) until the log closes: asks
/// each stream's writer to forget its expired idempotency keys. A writer
/// whose queue is full is skipped this turn (appends come first).
pub(super) async fn expire_idempotency_keys(log: Arc<Log>) {
    let period = Duration::from_secs(60).min(log.config.idempotency_window);
    loop {
        tokio::select! {
            _ = log.closing.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        for stream in log.all_streams() {
            let _ = stream.writer_tx.try_send(WriterCommand::ExpireIdempotency);
        }
    }
}

/// Until the log closes: moves each stream's head where another server's
/// append left it, as the engine reports (engines shared by several
/// servers). Through the stream's writer, so the head is published in
/// order with this server's own appends; waits when a writer's queue is
/// full (the engine's report channel then fills and it waits too: nothing
/// is dropped). A stream this server does not know (made through another
/// server since it started) is skipped.
pub(super) async fn follow_remote_heads(
    log: Arc<Log>,
    mut heads: tokio::sync::mpsc::Receiver<crate::engine::RemoteHead>,
) {
    loop {
        let head = tokio::select! {
            _ = log.closing.cancelled() => return,
            head = heads.recv() => match head {
                Some(head) => head,
                None => return,
            },
        };
        let Ok(stream) = log.get(&head.name) else {
            continue;
        };
        if stream.meta.id != head.stream_id {
            continue;
        }
        let moved = WriterCommand::Moved {
            next_offset: head.next_offset,
            last_time_unix_nanos: head.last_time_unix_nanos,
            chunks: head.chunks,
        };
        tokio::select! {
            _ = log.closing.cancelled() => return,
            _ = stream.writer_tx.send(moved) => {}
        }
    }
}

/// Until the log closes: takes in what other servers change in durable
/// consumers' claims and groups' membership, as the engine reports it
/// (engines shared by several servers): a newer claim ends the
/// subscription of that consumer open here (`consumer.rs`); members and
/// assignments go to the stream's groups (`group.rs`). Changes on streams
/// this server does not serve are skipped: nothing of theirs is open here.
pub(super) async fn follow_remote_changes(
    log: Arc<Log>,
    mut changes: tokio::sync::mpsc::Receiver<RemoteChange>,
) {
    loop {
        let change = tokio::select! {
            _ = log.closing.cancelled() => return,
            change = changes.recv() => match change {
                Some(change) => change,
                None => return,
            },
        };
        let (name, id) = match &change {
            RemoteChange::Claim(claim) => (&claim.stream, claim.stream_id),
            RemoteChange::Member {
                stream, stream_id, ..
            }
            | RemoteChange::Assignment {
                stream, stream_id, ..
            }
            | RemoteChange::GroupDeleted {
                stream, stream_id, ..
            }
            | RemoteChange::StreamDeleted { stream, stream_id }
            | RemoteChange::StreamRetention {
                stream, stream_id, ..
            } => (stream, *stream_id),
        };
        let Ok(stream) = log.get(name) else {
            continue;
        };
        if stream.meta.id != id {
            continue;
        }
        let shared = &stream.shared;
        match &change {
            RemoteChange::Claim(claim) => shared.remote_claim(claim),
            RemoteChange::Member {
                group,
                member,
                revision,
                joined,
                ..
            } => shared.remote_member(group, member, *revision, *joined),
            RemoteChange::Assignment {
                group,
                assignment,
                revision,
                ..
            } => shared.remote_assignment(group, assignment, *revision),
            RemoteChange::GroupDeleted { group, .. } => shared.remote_group_deleted(group),
            RemoteChange::StreamRetention { retention, .. } => {
                let _ = stream
                    .writer_tx
                    .send(WriterCommand::RetentionElsewhere(*retention))
                    .await;
            }
            RemoteChange::StreamDeleted { .. } => {
                // Not waited for here: the writer may first finish an
                // append (which then finds the stream gone).
                let log = log.clone();
                let stream = stream.clone();
                tokio::spawn(async move { log.forget_stream(&stream).await });
            }
        }
    }
}
