//! The requests a stream's writer takes, and the changes they carry.
//!
//! The writer (the only mutator of a stream) applies consumer and group
//! changes with the state machines in `consumer` and `group`; the code that
//! asks for those changes (the `Log`'s consumer and group calls) sends them
//! as these commands. Both sides import this module and neither imports
//! the other's request path, so the writer depends on the state machines
//! and not the other way round.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::commit::{PipelineGate, Reply};
use super::filter::EventFilter;
use crate::engine::{EventRecord, Retention};
use crate::error::Error;

/// A request to the writer.
pub(crate) enum WriterCommand {
    /// Append a batch.
    Append(AppendJob),
    /// Delete the stream, then stop.
    Delete(oneshot::Sender<Result<(), Error>>),
    /// Another server deleted the stream (an engine several servers
    /// share): end it here without writing anything, then stop; answered
    /// once its subscriptions were told.
    DeletedElsewhere(oneshot::Sender<Result<(), Error>>),
    /// Another server changed the stream's retention policy: follow it.
    RetentionElsewhere(Retention),
    /// Trim what the retention policy no longer keeps (sent by the
    /// retention task; nobody waits).
    Trim,
    /// Forget idempotency keys older than the window (sent by the expiry
    /// task; nobody waits). In the writer, so expiry is ordered with the
    /// appends that insert keys.
    ExpireIdempotency,
    /// Change a consumer group; answered once durable.
    Group {
        name: String,
        change: GroupChange,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Set the producers' fencing token (empty clears it), if the current
    /// one is `expected` (when given); answered once durable.
    SetFence {
        token: String,
        expected: Option<String>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Replace the retention policy; answered once durable.
    SetRetention {
        retention: Retention,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Another server appended (an engine shared by several servers):
    /// move the head there (sent by the log as the engine reports it).
    Moved {
        next_offset: u64,
        last_time_unix_nanos: i64,
        /// The appended events, when the engine had them (for the tail
        /// cache).
        chunks: Vec<crate::engine::Chunk>,
    },
    /// Change a durable consumer; answered once durable.
    Consumer {
        name: String,
        change: ConsumerChange,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// One Append call, or one batch of an append pipeline.
pub(crate) struct AppendJob {
    pub(crate) events: Vec<EventRecord>,
    pub(crate) expected_next_offset: Option<u64>,
    /// The idempotency key with the batch's fingerprint.
    pub(crate) idempotency: Option<(String, u128)>,
    /// The fencing token the batch carries (empty: unfenced).
    pub(crate) fencing_token: String,
    /// The pipeline the batch belongs to, if any.
    pub(crate) pipeline: Option<Arc<PipelineGate>>,
    pub(crate) reply: Reply,
}

/// What a subscription asks of its consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerSettings {
    /// A filter to save; `None` keeps the saved one.
    pub filter: Option<EventFilter>,
    /// A payload version to save; `None` keeps the saved one.
    pub version: Option<String>,
}

/// Saved consumer settings a commit removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClearSettings {
    /// Remove the saved filter.
    pub filter: bool,
    /// Remove the saved payload version.
    pub version: bool,
}

/// A change to a consumer, carried out by the stream's writer.
pub(crate) enum ConsumerChange {
    /// Move the cursor (creating the consumer when missing), and clear
    /// the saved filter or version when asked.
    Commit {
        offset: u64,
        clear_filter: bool,
        clear_version: bool,
    },
    /// Create the consumer at `start` when missing; save the settings given.
    Open {
        start: u64,
        settings: ConsumerSettings,
    },
    /// Remove the consumer.
    Delete,
}

/// A group change, carried out by the stream's writer.
pub(crate) enum GroupChange {
    /// Create the group (every slot at `start`) when missing.
    Create { start: u64 },
    /// A member's commit.
    Commit { member: String, next_offset: u64 },
    /// Move every slot to `offset` (only while no member is connected).
    Reset { offset: u64 },
    /// Remove the group; its members' subscriptions end.
    Delete,
}
