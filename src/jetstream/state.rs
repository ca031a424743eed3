//! Replicated records with compare-and-set, on one JetStream stream.
//!
//! Cluster mode keeps everything that is not an event (the stream
//! registry, consumer cursors, group slots, fencing tokens, idempotency
//! records, API keys) as small records that any gateway may read and
//! change. They live in one stream (`PS_STATE` unless told otherwise)
//! with `max_msgs_per_subject = 1` and one subject per record, so the
//! record's revision is the JetStream sequence of its last write, and a
//! write that names the revision it expects
//! (`Nats-Expected-Last-Subject-Sequence`) is a compare-and-set the
//! stream's Raft group decides: two gateways can never both win.
//!
//! Not async-nats's key-value helper: on nats-server 2.9.10 its
//! `create_key_value` fails (`data did not match any variant of untagged
//! enum Response`), while these semantics over a plain stream work
//! (ARCHITECTURE.md, "Cluster mode on JetStream"). A deletion is a
//! tombstone (an empty message with `Ps-Deleted: 1`), so a deleted
//! record keeps a revision and "create only if absent" stays a
//! compare-and-set after a delete.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

/// The header that marks a tombstone.
const DELETED: &str = "Ps-Deleted";

/// What a write expects of the record's current revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (a plain overwrite).
    Any,
    /// That the record does not exist (never written, or deleted).
    Absent,
    /// That the record's revision is this one.
    Revision(u64),
}

/// A record as read: its value and its revision (the sequence of its last
/// write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value.
    pub value: Bytes,
    /// Its revision; pass it back in [`Expect::Revision`] to update it.
    pub revision: u64,
}

/// Why a record operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The record was not at the expected revision: another gateway (or an
    /// earlier write) changed it. Read it again and decide.
    #[error("record {key} was changed concurrently (expected {expected:?})")]
    Conflict {
        /// The record's key.
        key: String,
        /// What the write expected.
        expected: Expect,
    },
    /// The key is not a valid record key.
    #[error("invalid record key {0:?}: keys are dot-separated tokens of [A-Za-z0-9_-]")]
    InvalidKey(String),
    /// JetStream did not answer, or answered with an error.
    #[error("JetStream failed while {op}: {source}")]
    JetStream {
        /// What the store was doing.
        op: &'static str,
        /// What async-nats said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn failed(op: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> StateError {
    move |source| StateError::JetStream { op, source }
}

/// The records: see the module docs.
#[derive(Clone)]
pub struct StateStore {
    js: jetstream::Context,
    stream: stream::Stream,
    /// Subjects are `<prefix>.<key>`.
    prefix: String,
}

impl StateStore {
    /// Opens (creating it if needed) the record stream `name`, with
    /// subjects under `prefix` and `replicas` copies.
    pub async fn open(
        js: jetstream::Context,
        name: &str,
        prefix: &str,
        replicas: usize,
    ) -> Result<StateStore, StateError> {
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: replicas,
            max_messages_per_subject: 1,
            allow_direct: true,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // A cluster that has just started may still be electing its
        // JetStream leaders (two gateways started with a fresh cluster:
        // one timed out here), so a timeout is tried again, for up to 30 s.
        let started = tokio::time::Instant::now();
        let stream = loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(stream) => break stream,
                Err(e)
                    if e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut
                        && started.elapsed() < Duration::from_secs(30) =>
                {
                    tracing::info!(error = %e, "the NATS cluster did not answer yet; asking again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(failed("opening the record stream")(Box::new(e))),
            }
        };
        Ok(StateStore {
            js,
            stream,
            prefix: prefix.to_string(),
        })
    }

    fn subject(&self, key: &str) -> Result<String, StateError> {
        let valid = !key.is_empty()
            && key.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !valid {
            return Err(StateError::InvalidKey(key.to_string()));
        }
        Ok(format!("{}.{key}", self.prefix))
    }

    /// The record at `key`, if it exists, as the record stream's leader
    /// has it: every write acknowledged before the read began is seen. (A
    /// direct get may be answered by a replica that lags the quorum, and
    /// then shows an older revision: a consumer read right after its
    /// commit through a 3-node cluster did, in the test suite.)
    pub async fn get(&self, key: &str) -> Result<Option<Record>, StateError> {
        let subject = self.subject(key)?;
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) if is_tombstone(&message.headers) => Ok(None),
            Ok(message) => Ok(Some(Record {
                value: message.payload,
                revision: message.sequence,
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(failed("reading a record")(Box::new(e))),
        }
    }

    /// Writes `value` at `key` if the record is as `expect` says; returns
    /// the new revision.
    pub async fn put(&self, key: &str, value: Bytes, expect: Expect) -> Result<u64, StateError> {
        self.write(key, value, expect, false).await
    }

    /// Deletes the record at `key` if it is as `expect` says (deleting a
    /// record that does not exist succeeds with [`Expect::Any`]).
    pub async fn delete(&self, key: &str, expect: Expect) -> Result<u64, StateError> {
        self.write(key, Bytes::new(), expect, true).await
    }

    async fn write(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        tombstone: bool,
    ) -> Result<u64, StateError> {
        let subject = self.subject(key)?;
        let mut headers = HeaderMap::new();
        if tombstone {
            headers.insert(DELETED, "1");
        }
        match expect {
            Expect::Any => {}
            Expect::Revision(revision) => {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    revision.to_string().as_str(),
                );
            }
            Expect::Absent => {
                // Never written: expect sequence 0. Deleted: expect the
                // tombstone's own revision. Asked of the leader, as in
                // `get`: a lagging replica could still show the record a
                // deletion just removed, and the create would be refused.
                let revision = match self.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(message) if is_tombstone(&message.headers) => message.sequence,
                    Ok(_) => {
                        return Err(StateError::Conflict {
                            key: key.to_string(),
                            expected: expect,
                        })
                    }
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                    Err(e) => return Err(failed("reading a record")(Box::new(e))),
                };
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    revision.to_string().as_str(),
                );
            }
        }
        // A plain overwrite is safe to repeat while the cluster elects a
        // leader; a compare-and-set is not (a repeat of one that landed
        // would look like a conflict), so it is tried once.
        let ack = if expect == Expect::Any {
            super::publish_retrying(&self.js, subject, headers, value).await
        } else {
            match self.js.publish_with_headers(subject, headers, value).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            }
        };
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(StateError::Conflict {
                    key: key.to_string(),
                    expected: expect,
                })
            }
            Err(e) => Err(failed("writing a record")(Box::new(e))),
        }
    }

    /// Every record whose key starts with `prefix.` (or every record, for
    /// an empty prefix), in key order, tombstones left out, as the record
    /// stream's leader has them: every write acknowledged before the
    /// listing began is seen. Retried while the cluster does not answer (a
    /// read is safe to repeat), for up to 30 s.
    ///
    /// The listing reads through an ordered consumer, and JetStream may
    /// place it on a replica that has not yet applied the newest writes
    /// (a consumer list right after its commit came back empty once in a
    /// loaded test run). So the leader is asked first for the newest
    /// record under the prefix, and a listing that did not reach its
    /// sequence is thrown away and read again.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Record)>, StateError> {
        let started = tokio::time::Instant::now();
        let mut stale = 0u32;
        loop {
            match self.list_once(prefix).await {
                Err(StateError::JetStream { op, source })
                    if started.elapsed() < Duration::from_secs(30) =>
                {
                    tracing::debug!(op, error = %source, "listing records failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(Listing::Behind { seen, newest }) => {
                    if started.elapsed() >= Duration::from_secs(30) {
                        return Err(failed("listing records")(
                            format!(
                                "the replica that answered stayed behind the leader for 30 s \
                                 (it had sequence {seen}, the leader {newest})"
                            )
                            .into(),
                        ));
                    }
                    stale += 1;
                    tracing::debug!(
                        seen,
                        newest,
                        stale,
                        "a lagging replica listed the records; reading again"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Listing::Complete(records)) => return Ok(records),
                Err(e) => return Err(e),
            }
        }
    }

    /// The sequence of the newest write (tombstones included) of any
    /// record under `filter`, as the leader has it; 0 if there is none.
    async fn newest(&self, filter: &str) -> Result<u64, StateError> {
        match self.stream.get_last_raw_message_by_subject(filter).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(failed("listing records")(Box::new(e))),
        }
    }

    async fn list_once(&self, prefix: &str) -> Result<Listing, StateError> {
        let filter = if prefix.is_empty() {
            format!("{}.>", self.prefix)
        } else {
            format!("{}.>", self.subject(prefix)?)
        };
        // STREAM.MSG.GET (not a direct get) is answered by the leader, and
        // accepts a wildcard: the newest message under the filter.
        let newest = self.newest(&filter).await?;
        let mut consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| failed("listing records")(Box::new(e)))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| failed("listing records")(Box::new(e)))?
            .num_pending;
        let mut records = Vec::new();
        // The newest write this listing saw, tombstones included. The
        // newest write under the filter is its subject's last one, so a
        // replica that has it delivers it.
        let mut seen = 0;
        if pending > 0 {
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| failed("listing records")(Box::new(e)))?;
            loop {
                let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
                    .await
                    .map_err(|e| failed("listing records")(Box::new(e)))?
                    .ok_or_else(|| failed("listing records")("the listing ended early".into()))?
                    .map_err(|e| failed("listing records")(Box::new(e)))?;
                let info = message.info().map_err(|e| failed("listing records")(e))?;
                let (revision, left) = (info.stream_sequence, info.pending);
                seen = seen.max(revision);
                if !message.headers.as_ref().is_some_and(is_tombstone) {
                    let key = message
                        .subject
                        .as_str()
                        .strip_prefix(&format!("{}.", self.prefix))
                        .unwrap_or(message.subject.as_str())
                        .to_string();
                    records.push((
                        key,
                        Record {
                            value: message.payload.clone(),
                            revision,
                        },
                    ));
                }
                if left == 0 {
                    break;
                }
            }
        }
        if seen < newest {
            return Ok(Listing::Behind { seen, newest });
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Listing::Complete(records))
    }
}

/// What one pass of [`StateStore::list`] read.
enum Listing {
    /// Every record, sorted by key.
    Complete(Vec<(String, Record)>),
    /// The replica that answered had not applied the leader's newest
    /// write under the prefix: `seen` is the newest sequence it listed,
    /// `newest` the leader's.
    Behind { seen: u64, newest: u64 },
}

/// A record write as [`StateStore::watch`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The record's key.
    pub key: String,
    /// What was written (empty for a deletion).
    pub value: Bytes,
    /// The write's revision.
    pub revision: u64,
    /// Whether the write deleted the record.
    pub deleted: bool,
}

impl StateStore {
    /// Every write of the records whose keys start with `prefix.`, in
    /// revision order, from now on (with `current_first`, each such
    /// record's current write first, deletions included). Through an
    /// ordered consumer, which the client makes again where a node died:
    /// nothing is skipped, and a write may be seen again only after the
    /// stream ends with an error (then watch again).
    pub async fn watch(
        &self,
        prefix: &str,
        current_first: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<Watched, StateError>>, StateError>
    {
        let filter = format!("{}.>", self.subject(prefix)?);
        let messages = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: if current_first {
                    jetstream::consumer::DeliverPolicy::LastPerSubject
                } else {
                    jetstream::consumer::DeliverPolicy::New
                },
                ..Default::default()
            })
            .await
            .map_err(|e| failed("watching records")(Box::new(e)))?
            .messages()
            .await
            .map_err(|e| failed("watching records")(Box::new(e)))?;
        let own = format!("{}.", self.prefix);
        Ok(messages
            .map(move |message| {
                let message = message.map_err(|e| failed("watching records")(Box::new(e)))?;
                let revision = message
                    .info()
                    .map_err(|e| failed("watching records")(e))?
                    .stream_sequence;
                let subject = message.subject.as_str();
                Ok(Watched {
                    key: subject.strip_prefix(&own).unwrap_or(subject).to_string(),
                    deleted: message.headers.as_ref().is_some_and(is_tombstone),
                    value: message.payload.clone(),
                    revision,
                })
            })
            .boxed())
    }
}

fn is_tombstone(headers: &HeaderMap) -> bool {
    headers.get(DELETED).is_some()
}
