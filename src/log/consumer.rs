//! Durable consumers: named, server-side cursors on a stream.
//!
//! A consumer's cursor moves only when the client commits it (after
//! handling events), which gives at-least-once processing without the
//! client storing anything. Cursor writes go through the stream's writer,
//! like appends, so they are ordered with the stream's deletion and share
//! its group commits: many consumers committing at once cost one sync.
//!
//! At most one subscription per consumer runs at a time. Each one holds a
//! [`ConsumerLease`]; a newer subscription cancels the older lease, whose
//! subscription then ends with ABORTED, so a restarted worker never runs
//! side by side with its stale twin. Leases live in memory only: after a
//! restart no subscription is open anyway.
//!
//! With an engine several servers share (cluster mode), the consumer's
//! record may change through another server at any time, and its one
//! subscription may be open there. So the writer reads the stored record
//! before it changes one, descriptions are built from the stored record,
//! and each lease also holds a cluster-wide *claim*
//! ([`Engine::claim_consumer`]): claims are ordered, and a newer claim
//! made elsewhere ([`Engine::remote_claims`], through
//! [`StreamShared::remote_claim`]) ends the lease here, as a newer local
//! lease would.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::command::{ClearSettings, ConsumerChange, ConsumerSettings, WriterCommand};
use super::filter::EventFilter;
use super::{Head, Log, StartAt, StreamShared};
use crate::engine::{ClaimChange, ConsumerRecord, Engine, RemoteClaim};
use crate::error::Error;

/// The longest consumer name.
pub const MAX_CONSUMER_NAME_LEN: usize = 200;
/// The longest payload version label.
pub const MAX_VERSION_LABEL_LEN: usize = 64;

/// A durable consumer as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// The stream.
    pub stream: String,
    /// The consumer's name.
    pub name: String,
    /// The committed cursor.
    pub next_offset: u64,
    /// The stream's head minus the cursor.
    pub lag: u64,
    /// Last commit time (nanoseconds since the Unix epoch); 0 when never.
    pub last_commit_unix_nanos: i64,
    /// Creation time.
    pub created_unix_nanos: i64,
    /// The saved filter's type patterns.
    pub types: Vec<String>,
    /// The saved filter's keys.
    pub keys: Vec<String>,
    /// The saved payload version.
    pub version: String,
    /// Whether a subscription of it is open.
    pub active: bool,
    /// Whether retention trimmed events at or past its cursor.
    pub cursor_trimmed: bool,
    /// The append time of the event at the cursor (the oldest one the
    /// consumer has not passed), nanoseconds since the Unix epoch; `None`
    /// when it has no lag, or that event cannot be read.
    pub pending_since_unix_nanos: Option<i64>,
    /// How long ago that was, by the server's clock.
    pub pending_age: Option<std::time::Duration>,
}

/// Which consumers [`Log::describe`] describes.
#[derive(Clone, Copy)]
enum Which<'a> {
    /// The one of this name.
    One(&'a str),
    /// Up to this many whose names sort after this one.
    After(&'a str, usize),
}

/// A consumer in memory: its stored record and its open subscription.
pub(crate) struct ConsumerState {
    pub(crate) record: ConsumerRecord,
    /// The lease of the open subscription, if any.
    lease: Option<Lease>,
}

/// An open subscription's hold on its consumer.
struct Lease {
    /// Numbers it within the stream.
    id: u64,
    /// Cancelled to end it.
    token: CancellationToken,
    /// Its claim's revision (0 where the engine has no claims).
    claim: u64,
}

impl ConsumerState {
    pub(crate) fn new(record: ConsumerRecord) -> ConsumerState {
        ConsumerState {
            record,
            lease: None,
        }
    }

    /// Ends the open subscription, if any (it sees its token cancelled).
    pub(crate) fn end_lease(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.token.cancel();
        }
    }
}

/// Held by a consumer's open subscription. Cancelled when a newer
/// subscription of the consumer takes over or the consumer is deleted;
/// gives the consumer free again when dropped.
pub struct ConsumerLease {
    shared: Arc<StreamShared>,
    stream: String,
    name: String,
    id: u64,
    token: CancellationToken,
    /// The claim to give up when it ends: the engine, stream id and revision.
    claim: Option<(Arc<dyn Engine>, u64, u64)>,
}

impl ConsumerLease {
    /// Resolves when the lease is lost, with the error to end the
    /// subscription with.
    pub async fn lost(&self) -> Error {
        self.token.cancelled().await;
        let deleted = !self
            .shared
            .consumers
            .lock()
            .expect("consumers lock")
            .contains_key(&self.name);
        Error::ConsumerSessionEnded {
            stream: self.stream.clone(),
            consumer: self.name.clone(),
            reason: if deleted {
                "was deleted"
            } else {
                "was taken over by a newer subscription"
            },
        }
    }
}

impl Drop for ConsumerLease {
    fn drop(&mut self) {
        let mut consumers = self.shared.consumers.lock().expect("consumers lock");
        if let Some(state) = consumers.get_mut(&self.name) {
            if state
                .lease
                .as_ref()
                .is_some_and(|lease| lease.id == self.id)
            {
                state.lease = None;
            }
        }
        drop(consumers);
        if let Some((engine, stream_id, claim)) = self.claim.take() {
            engine.release_consumer(stream_id, &self.name, claim);
        }
    }
}

impl StreamShared {
    /// Takes in another server's claim on one of this stream's consumers
    /// (see the module docs): a newer claim ends the subscription open
    /// here; a deletion also forgets the consumer.
    pub(crate) fn remote_claim(&self, claim: &RemoteClaim) {
        let mut consumers = self.consumers.lock().expect("consumers lock");
        let mut elsewhere = self.claimed_elsewhere.lock().expect("claims lock");
        let name = &claim.consumer;
        match claim.change {
            ClaimChange::Taken => {
                let state = consumers.get_mut(name);
                let newer_here = state
                    .as_ref()
                    .and_then(|s| s.lease.as_ref())
                    .is_some_and(|lease| lease.claim > claim.revision);
                if newer_here {
                    return;
                }
                if let Some(state) = state {
                    state.end_lease();
                }
                elsewhere.insert(name.clone(), claim.revision);
            }
            ClaimChange::Released | ClaimChange::Deleted => {
                if elsewhere.get(name).is_some_and(|&r| r <= claim.revision) {
                    elsewhere.remove(name);
                }
                if claim.change == ClaimChange::Deleted {
                    if let Some(mut state) = consumers.remove(name) {
                        state.end_lease();
                    }
                }
            }
        }
    }
}

/// Checks a consumer name: 1 to 200 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_consumer_name(name: &str) -> Result<(), Error> {
    validate_label("consumer name", name)
}

/// Checks a name of the consumer kind (`what`: "group name", "member id"):
/// the consumer-name rule, named as the caller knows it.
pub(crate) fn validate_label(what: &str, name: &str) -> Result<(), Error> {
    check_label(what, name, MAX_CONSUMER_NAME_LEN)
}

/// Checks a payload version label: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_version_label(label: &str) -> Result<(), Error> {
    check_label("payload version label", label, MAX_VERSION_LABEL_LEN)
}

fn check_label(what: &str, value: &str, max: usize) -> Result<(), Error> {
    match crate::names::name_problem(value, max) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidArgument(format!(
            "invalid {what} {}: {reason}",
            crate::error::shown(value)
        ))),
    }
}

/// A consumer's description from its record, whether a subscription of
/// it is open (here or, with a shared engine, elsewhere), and the head.
fn info(stream: &str, name: &str, r: &ConsumerRecord, active: bool, head: Head) -> ConsumerInfo {
    ConsumerInfo {
        stream: stream.to_string(),
        name: name.to_string(),
        next_offset: r.next_offset,
        lag: head.next_offset.saturating_sub(r.next_offset),
        last_commit_unix_nanos: r.last_commit_unix_nanos,
        created_unix_nanos: r.created_unix_nanos,
        types: r.types.clone(),
        keys: r.keys.clone(),
        version: r.version.clone(),
        active,
        cursor_trimmed: r.next_offset < head.first_offset,
        pending_since_unix_nanos: None,
        pending_age: None,
    }
}

/// Applies a consumer change to a stored record (`None`: no consumer yet).
/// Returns the record to store, or `None` when nothing changes.
pub(crate) fn apply_change(
    current: Option<&ConsumerRecord>,
    change: &ConsumerChange,
    now: i64,
) -> Option<ConsumerRecord> {
    match change {
        ConsumerChange::Commit {
            offset,
            clear_filter,
            clear_version,
        } => {
            let mut record = current.cloned().unwrap_or(ConsumerRecord {
                created_unix_nanos: now,
                ..Default::default()
            });
            record.next_offset = *offset;
            record.last_commit_unix_nanos = now;
            if *clear_filter {
                record.types.clear();
                record.keys.clear();
            }
            if *clear_version {
                record.version.clear();
            }
            Some(record)
        }
        ConsumerChange::Open { start, settings } => {
            let mut record = match current {
                Some(_) if settings.filter.is_none() && settings.version.is_none() => return None,
                Some(record) => record.clone(),
                None => ConsumerRecord {
                    next_offset: *start,
                    created_unix_nanos: now,
                    ..Default::default()
                },
            };
            if let Some(filter) = &settings.filter {
                record.types = filter.types().to_vec();
                record.keys = filter.keys();
            }
            if let Some(version) = &settings.version {
                record.version = version.clone();
            }
            Some(record)
        }
        ConsumerChange::Delete => None,
    }
}

impl Log {
    async fn change_consumer(
        &self,
        stream: &str,
        name: &str,
        change: ConsumerChange,
    ) -> Result<(), Error> {
        validate_consumer_name(name)?;
        let stream = self.get(stream)?;
        let (reply, reply_rx) = oneshot::channel();
        let command = WriterCommand::Consumer {
            name: name.to_string(),
            change,
            reply,
        };
        self.ask_writer(&stream, command, reply_rx).await
    }

    /// Saves a consumer's cursor at `to` (creating the consumer when
    /// missing), clearing its saved settings as `clear` says; returns once
    /// durable.
    pub async fn commit_cursor(
        &self,
        stream: &str,
        name: &str,
        to: StartAt,
        clear: ClearSettings,
    ) -> Result<ConsumerInfo, Error> {
        validate_consumer_name(name)?;
        let offset = self.resolve_start(stream, to)?;
        let change = ConsumerChange::Commit {
            offset,
            clear_filter: clear.filter,
            clear_version: clear.version,
        };
        self.change_consumer(stream, name, change).await?;
        self.consumer_info(stream, name)
    }

    /// Describes a consumer.
    pub fn consumer_info(&self, stream: &str, name: &str) -> Result<ConsumerInfo, Error> {
        validate_consumer_name(name)?;
        let stream = self.get(stream)?;
        self.describe(&stream, Which::One(name))?
            .pop()
            .ok_or_else(|| Error::ConsumerNotFound {
                stream: stream.name.clone(),
                consumer: name.to_string(),
            })
    }

    /// Lists a stream's consumers in name order: at most `limit` of them,
    /// those whose names sort after `after` (empty: from the first).
    pub fn list_consumers(
        &self,
        stream: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ConsumerInfo>, Error> {
        let stream = self.get(stream)?;
        self.describe(&stream, Which::After(after, limit))
    }

    /// Describes consumers from their records: the stored ones where the
    /// engine is shared (another server may have changed them), else the
    /// ones in memory (the writer keeps them as stored).
    fn describe(
        &self,
        stream: &super::Stream,
        which: Which<'_>,
    ) -> Result<Vec<ConsumerInfo>, Error> {
        let stored = match (self.engine.shared(), which) {
            (false, _) => None,
            (true, Which::One(name)) => Some(
                self.engine
                    .stored_consumer(stream.meta.id, name)?
                    .map(|record| (name.to_string(), record))
                    .into_iter()
                    .collect::<Vec<_>>(),
            ),
            (true, Which::After(after, limit)) => Some(
                self.engine
                    .stored_consumers(stream.meta.id)?
                    .into_iter()
                    .filter(|(name, _)| name.as_str() > after)
                    .take(limit)
                    .collect(),
            ),
        };
        let head = stream.shared.head();
        let consumers = stream.shared.consumers.lock().expect("consumers lock");
        let elsewhere = stream.shared.claimed_elsewhere.lock().expect("claims lock");
        let active = |name: &str| {
            consumers.get(name).is_some_and(|s| s.lease.is_some()) || elsewhere.contains_key(name)
        };
        let describe = |name: &str, record: &ConsumerRecord| {
            info(&stream.name, name, record, active(name), head)
        };
        let mut infos: Vec<ConsumerInfo> = match (stored, which) {
            (Some(stored), _) => stored.iter().map(|(n, r)| describe(n, r)).collect(),
            (None, Which::One(name)) => consumers
                .get(name)
                .map(|state| describe(name, &state.record))
                .into_iter()
                .collect(),
            (None, Which::After(after, limit)) => consumers
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(limit)
                .map(|(name, state)| describe(name, &state.record))
                .collect(),
        };
        drop(elsewhere);
        drop(consumers);
        for info in &mut infos {
            self.add_lag_time(stream, info);
        }
        Ok(infos)
    }

    /// Fills in a consumer's lag in time (a chunk read: called without
    /// the consumers lock held).
    fn add_lag_time(&self, stream: &super::Stream, info: &mut ConsumerInfo) {
        let since = self.append_time_at(stream, info.next_offset);
        info.pending_since_unix_nanos = since;
        info.pending_age = since
            .map(|t| std::time::Duration::from_nanos(self.now().saturating_sub(t).max(0) as u64));
    }

    /// Deletes a consumer; its open subscription ends.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), Error> {
        self.change_consumer(stream, name, ConsumerChange::Delete)
            .await
    }

    /// Opens a subscription's hold on a consumer: creates the consumer at
    /// `start` when missing, saves the settings given, and takes over
    /// from any open subscription of it. Returns the lease, the cursor to
    /// start at, and the consumer's filter and version.
    pub async fn open_consumer(
        &self,
        stream_name: &str,
        name: &str,
        start: StartAt,
        settings: ConsumerSettings,
    ) -> Result<(ConsumerLease, u64, EventFilter, String), Error> {
        // The start position matters only to a consumer that does not
        // exist yet (an existing one resumes at its cursor).
        let exists = self.consumer_info(stream_name, name).is_ok();
        let start = match self.resolve_start(stream_name, start) {
            Ok(start) => start,
            Err(_) if exists => 0,
            Err(e) => return Err(e),
        };
        self.change_consumer(stream_name, name, ConsumerChange::Open { start, settings })
            .await?;
        let stream = self.get(stream_name)?;
        // Cluster-wide, before it counts here (0 where nothing is shared).
        let claim = self.engine.claim_consumer(stream.meta.id, name)?;
        let mut consumers = stream.shared.consumers.lock().expect("consumers lock");
        let state = consumers
            .get_mut(name)
            .ok_or_else(|| Error::ConsumerNotFound {
                stream: stream.name.clone(),
                consumer: name.to_string(),
            })?;
        state.end_lease();
        let id = stream.shared.leases.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        {
            let mut elsewhere = stream.shared.claimed_elsewhere.lock().expect("claims lock");
            match elsewhere.get(name) {
                // A newer subscription opened elsewhere while this one was
                // claiming: this one has lost already.
                Some(&newer) if newer > claim => token.cancel(),
                _ => {
                    elsewhere.remove(name);
                }
            }
        }
        state.lease = Some(Lease {
            id,
            token: token.clone(),
            claim,
        });
        let record = state.record.clone();
        drop(consumers);
        let filter = EventFilter::new(record.types, record.keys)?;
        Ok((
            ConsumerLease {
                shared: stream.shared.clone(),
                stream: stream.name.clone(),
                name: name.to_string(),
                id,
                token,
                claim: (claim != 0).then(|| (self.engine.clone(), stream.meta.id, claim)),
            },
            record.next_offset,
            filter,
            record.version,
        ))
    }
}
