//! The storage engine on NATS JetStream (cluster mode; ARCHITECTURE.md,
//! "Cluster mode on JetStream").
//!
//! Events: one JetStream stream per Pullstream stream (`PS_<id>`, subject
//! `ps.ev.<id>`), one message per appended group ([`super::message`]: its
//! chunks, encoded as the sled engine stores them, and the idempotency
//! records it made), so a group is written all or nothing. Each message is
//! published with `Nats-Expected-Last-Sequence` = the stream's last
//! sequence as this engine knows it, so two gateways can never interleave
//! messages: the second one's publish is refused, the engine reads the
//! message that won, writes its idempotency records again (they may not
//! be written yet), and answers [`StorageError::HeadMoved`]; the writer
//! then decides its group again from the new head. Everything else is a
//! record of the [`StateStore`].
//!
//! Other gateways' appends: after each append the gateway announces it,
//! with its events, on `ps.head.<id>` (core NATS, at most once), and
//! every second it also compares the cluster's last sequences with its
//! own; both feed [`Engine::remote_heads`], which moves the heads its
//! subscribers follow (and fills their tail cache with the announced
//! events, so they do not each read them back).
//!
//! The seam is synchronous, and the engine owns a small runtime for the
//! NATS client: each operation runs there while the calling thread waits
//! (outside the server's async workers, [`crate::engine::run_blocking`]).
//!
//! A change is acknowledged once JetStream acknowledged it, i.e. once a
//! quorum of the stream's replicas has it (nats-server 2.9 fsyncs in the
//! background; see the README's durability notes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::feed::{self, RecordFeed};
use super::message::{self, END_OFFSET, FENCE, FIRST_OFFSET, TIME};
use super::state::{Expect, StateError, StateStore};
use super::{hex, unhex};
use crate::engine::{
    Assignment, Chunk, ChunkHeader, ClaimChange, ConsumerRecord, EncodedChunk, Engine, Forwarded,
    ForwardedAnswer, ForwardedCommit, GroupRecord, IdempotencyRecord, Keep, Prepared, RemoteChange,
    RemoteHead, StorageError, StoredStream, StreamMeta, GROUP_EVENT_OVERHEAD,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How to reach the cluster, and how many copies to keep.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Client URLs of the cluster's nodes.
    pub urls: Vec<String>,
    /// Replicas of every stream and of the records (1, 3 or 5).
    pub replicas: usize,
    /// How long a publish or a read may wait for the cluster.
    pub timeout: Duration,
    /// The prefix of every stream (upper case) and subject (as given)
    /// this deployment uses.
    pub namespace: String,
    /// Shown in errors and logs as the engine's "path".
    pub label: PathBuf,
    /// Connect over TLS, trusting the CA certificates in this PEM file.
    pub tls_ca: Option<PathBuf>,
    /// Authenticate with this NATS credentials file (user JWT and seed).
    pub creds: Option<PathBuf>,
}

/// One change, prepared; see [`Engine`].
enum Change {
    /// An appended group: already written by [`Engine::write_group`].
    Appended,
    Meta {
        name: String,
        meta: StreamMeta,
    },
    Trim {
        name: String,
        meta: StreamMeta,
        below: u64,
    },
    Record {
        key: String,
        /// `None` deletes.
        value: Option<Vec<u8>>,
    },
    Forget {
        keys: Vec<String>,
    },
    DeleteStream {
        name: String,
        stream_id: u64,
    },
    /// A group's record: all of it (`slots: None`), or those slots merged
    /// into what is stored (compare-and-set, retried).
    Group {
        key: String,
        record: GroupRecord,
        slots: Option<Vec<usize>>,
        ticket: u64,
    },
    /// A group goes, with its assignment.
    DeleteGroup {
        stream_id: u64,
        name: String,
    },
    /// A consumer's record is written (`Some`), or goes and its claim
    /// says so (`None`); `ticket` names it in [`JetStreamEngine::pending`].
    Consumer {
        stream_id: u64,
        name: String,
        value: Option<Vec<u8>>,
        ticket: u64,
    },
}

/// What the engine knows of one stream's messages.
#[derive(Debug, Clone)]
struct StreamIndex {
    /// The stream's name.
    name: String,
    /// The sequence of the stream's last message (0: none yet).
    last_seq: u64,
    /// The head after that message.
    next_offset: u64,
    /// The append time of the stream's last event (`i64::MIN`: none).
    last_time: i64,
    /// The first retained offset: a message holding events on both sides
    /// of it stays until all of its events are trimmed.
    floor: u64,
    /// The sequences of messages seen, by their first offset (a cache: a
    /// miss is a binary search by direct gets).
    seq_of: BTreeMap<u64, u64>,
    /// The fencing token the last message says is in force (`None`: not
    /// known from a message).
    fence: Option<String>,
}

impl StreamIndex {
    fn new(name: &str) -> StreamIndex {
        StreamIndex {
            name: name.to_string(),
            last_seq: 0,
            next_offset: 0,
            last_time: i64::MIN,
            floor: 0,
            seq_of: BTreeMap::new(),
            fence: None,
        }
    }

    /// Records that the message at `seq` holds `[first, end)`, and moves
    /// the last message there if it is newer. Returns whether it moved.
    fn saw(&mut self, seq: u64, located: &Located) -> bool {
        if located.end > located.first {
            self.seq_of.insert(located.first, seq);
            while self.seq_of.len() > INDEX_ENTRIES {
                self.seq_of.pop_first();
            }
        }
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        self.next_offset = self.next_offset.max(located.end);
        self.last_time = self.last_time.max(located.time);
        if located.fence.is_some() {
            self.fence = located.fence.clone();
        }
        true
    }

    /// The stream's head as the index has it (without events).
    fn head(&self, stream_id: u64) -> RemoteHead {
        RemoteHead {
            name: self.name.clone(),
            stream_id,
            next_offset: self.next_offset,
            last_time_unix_nanos: self.last_time,
            chunks: Vec::new(),
        }
    }
}

/// What every index shares: the engine, its follower task.
type Indexes = Arc<Mutex<BTreeMap<u64, StreamIndex>>>;

/// A consumer record's write not applied yet: its ticket and value
/// (`None`: a deletion).
type PendingWrite = (u64, Option<Vec<u8>>);

/// A group record's writes not applied yet: the ticket of the latest, the
/// whole record when one of them wrote it all, and the slots written.
#[derive(Default)]
struct PendingGroup {
    ticket: u64,
    whole: Option<GroupRecord>,
    slots: BTreeMap<usize, u64>,
}

/// A group message as found: the offsets it holds, its time, its payload.
#[derive(Debug, Clone)]
struct Located {
    first: u64,
    end: u64,
    time: i64,
    payload: Bytes,
    /// The fencing token in force, when the message says.
    fence: Option<String>,
}

/// The `Ps-Fence` header's value for a token.
fn fence_header(token: &str) -> String {
    format!("={token}")
}

/// A token from a `Ps-Fence` header's value.
fn fence_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(FENCE)?.as_str();
    value.strip_prefix('=').map(str::to_string)
}

/// A gateway's announcement of an append, on `<ns>.head.<stream id>`:
/// the group message's payload (so other gateways serve the new events
/// to their subscribers without reading them back), with a
/// `Ps-Announce` header: `<gateway id in hex> <sequence> <first offset>
/// <next offset> <time> <stream name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Announcement {
    gateway_id: u64,
    seq: u64,
    first: u64,
    next_offset: u64,
    time: i64,
    name: String,
}

/// The header of an announcement.
const ANNOUNCE: &str = "Ps-Announce";

impl Announcement {
    fn encode(&self) -> String {
        format!(
            "{:016x} {} {} {} {} {}",
            self.gateway_id, self.seq, self.first, self.next_offset, self.time, self.name
        )
    }

    fn decode(text: &str) -> Option<Announcement> {
        let mut parts = text.splitn(6, ' ');
        Some(Announcement {
            gateway_id: u64::from_str_radix(parts.next()?, 16).ok()?,
            seq: parts.next()?.parse().ok()?,
            first: parts.next()?.parse().ok()?,
            next_offset: parts.next()?.parse().ok()?,
            time: parts.next()?.parse().ok()?,
            name: parts.next()?.to_string(),
        })
    }
}

/// The chunks of a group message's payload, or nothing when it does not
/// decode (the reader then reads them from the cluster and reports the
/// damage there).
fn chunks_of(payload: &Bytes) -> Vec<Chunk> {
    message::decode(payload.clone())
        .ok()
        .and_then(|group| {
            group
                .chunks
                .into_iter()
                .map(|c| Chunk::decode(c).ok())
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or_default()
}

/// At most this many messages missed by announcements are read by the
/// follower itself to hand their events on (see [`Follower::check`]).
const SKIPPED_READ_MAX: u64 = 32;

/// An announcement this long after its append's time is worth a debug
/// log line (once per [`FOLLOW_PERIOD`]).
const LATE_ANNOUNCEMENT: Duration = Duration::from_millis(50);

/// How often the follower compares the cluster's last sequences with its
/// own (announcements of new heads are at most once; this catches what
/// they missed).
const FOLLOW_PERIOD: Duration = Duration::from_secs(1);

/// How many other gateways' heads wait for the log at most.
const REMOTE_HEADS_QUEUE: usize = 1024;

/// How long the health probe's write may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most chunk positions remembered per stream.
const INDEX_ENTRIES: usize = 4096;

/// The engine; see the module docs.
pub struct JetStreamEngine {
    runtime: Option<tokio::runtime::Runtime>,
    client: async_nats::Client,
    js: jetstream::Context,
    state: StateStore,
    options: JetStreamOptions,
    names: Names,
    /// Names this gateway: its probe record, its announcements and the
    /// ids of its messages.
    gateway_id: u64,
    index: Indexes,
    failed: Mutex<Option<String>>,
    /// What the follower found other gateways did, until the log takes it.
    remote_heads: Mutex<Option<mpsc::Receiver<RemoteHead>>>,
    /// Other gateways' consumer claims and group members, until the log
    /// takes them.
    remote_changes: Mutex<Option<mpsc::Receiver<RemoteChange>>>,
    /// Taken by the log ([`Engine::forwarded`]).
    forwarded: Mutex<Option<mpsc::Receiver<Forwarded>>>,
    /// Group records this gateway prepared and has not applied yet, by
    /// record key (as `pending`, for groups).
    pending_groups: Mutex<HashMap<String, PendingGroup>>,
    /// Consumer records this gateway prepared and has not applied yet, by
    /// record key: the ticket of the latest, and its value (`None`: a
    /// deletion). Applied in order, they overwrite what is stored.
    pending: Mutex<HashMap<String, PendingWrite>>,
    /// Numbers pending consumer writes.
    tickets: std::sync::atomic::AtomicU64,
}

impl Drop for JetStreamEngine {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Names of the JetStream streams and subjects of one deployment, and the
/// handles of the events streams already looked up (so a read does not
/// ask the cluster for the stream again).
#[derive(Clone)]
struct Names {
    /// Stream-name prefix (upper case).
    streams: String,
    /// Subject prefix.
    subjects: String,
    /// Events stream handles by stream id.
    handles: std::sync::Arc<Mutex<HashMap<u64, stream::Stream>>>,
}

impl Names {
    fn new(namespace: &str) -> Names {
        Names {
            streams: namespace.to_ascii_uppercase(),
            subjects: namespace.to_string(),
            handles: Default::default(),
        }
    }

    fn events_stream(&self, stream_id: u64) -> String {
        format!("{}_{stream_id}", self.streams)
    }

    /// Where a gateway takes the calls others forward to it (`what`:
    /// `commit` or `told`; `*` for all).
    fn forward_subject(&self, gateway_id: u64, what: &str) -> String {
        format!("{}.gw.{gateway_id:016x}.{what}", self.subjects)
    }

    fn events_subject(&self, stream_id: u64) -> String {
        format!("{}.ev.{stream_id}", self.subjects)
    }

    /// Where a gateway announces a stream's new head.
    fn head_subject(&self, stream_id: u64) -> String {
        format!("{}.head.{stream_id}", self.subjects)
    }

    /// The stream id of an events stream's name, if it is one of ours.
    fn stream_id_of(&self, stream_name: &str) -> Option<u64> {
        stream_name
            .strip_prefix(&self.streams)?
            .strip_prefix('_')?
            .parse()
            .ok()
    }
}

impl JetStreamEngine {
    /// Connects to the cluster, opens (creating) the record stream, and
    /// starts following other gateways' appends.
    pub fn open(options: JetStreamOptions) -> Result<JetStreamEngine, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("jetstream")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Open {
                path: options.label.clone(),
                source: Box::new(e),
            })?;
        let (urls, replicas, timeout) = (options.urls.clone(), options.replicas, options.timeout);
        let (tls_ca, creds) = (options.tls_ca.clone(), options.creds.clone());
        let names = Names::new(&options.namespace);
        let opened = run_on(&runtime, {
            let names = names.clone();
            async move {
                let mut connect = async_nats::ConnectOptions::new().request_timeout(Some(timeout));
                if let Some(ca) = tls_ca {
                    connect = connect.add_root_certificates(ca).require_tls(true);
                }
                if let Some(file) = creds {
                    connect = connect
                        .credentials_file(file)
                        .await
                        .map_err(|e| Box::new(e) as BoxError)?;
                }
                let client = connect
                    .connect(urls)
                    .await
                    .map_err(|e| Box::new(e) as BoxError)?;
                let mut js = jetstream::new(client.clone());
                js.set_timeout(timeout);
                let state = StateStore::open(
                    js.clone(),
                    &format!("{}_STATE", names.streams),
                    &format!("{}.state", names.subjects),
                    replicas,
                )
                .await
                .map_err(|e| Box::new(e) as BoxError)?;
                let heads = client
                    .subscribe(format!("{}.head.>", names.subjects))
                    .await
                    .map_err(|e| Box::new(e) as BoxError)?;
                Ok::<_, BoxError>((client, js, state, heads))
            }
        });
        let (client, js, state, heads) = opened.map_err(|source| StorageError::Engine {
            op: "connecting to the NATS cluster (is it running, with JetStream on? check --nats-url)",
            path: options.label.clone(),
            source,
        })?;
        let gateway_id = {
            let mut bytes = [0u8; 8];
            let _ = getrandom::fill(&mut bytes);
            u64::from_le_bytes(bytes)
        };
        let index: Indexes = Default::default();
        let commits = run_on(&runtime, {
            let (client, subject) = (client.clone(), names.forward_subject(gateway_id, "*"));
            async move { client.subscribe(subject).await }
        })
        .map_err(|e| StorageError::Engine {
            op: "listening for calls forwarded by other gateways",
            path: options.label.clone(),
            source: Box::new(e),
        })?;
        let (forward, forwarded) = mpsc::channel(REMOTE_HEADS_QUEUE);
        runtime.spawn(serve_forwarded(
            client.clone(),
            commits,
            index.clone(),
            forward,
        ));
        let (found, remote_heads) = mpsc::channel(REMOTE_HEADS_QUEUE);
        runtime.spawn(
            Follower {
                js: js.clone(),
                state: state.clone(),
                names: names.clone(),
                replicas,
                gateway_id,
                index: index.clone(),
                found,
                listed: Default::default(),
            }
            .run(heads),
        );
        let (found_changes, remote_changes) = mpsc::channel(REMOTE_HEADS_QUEUE);
        runtime.spawn(
            RecordFeed {
                state: state.clone(),
                gateway_id,
                name_of: {
                    let index = index.clone();
                    Arc::new(move |id| {
                        let index = index.lock().expect("not poisoned");
                        index.get(&id).map(|entry| entry.name.clone())
                    })
                },
                id_of: {
                    let index = index.clone();
                    Arc::new(move |name| {
                        let index = index.lock().expect("not poisoned");
                        // The newest id under the name (a name made again).
                        index
                            .iter()
                            .rev()
                            .find(|(_, entry)| entry.name == name)
                            .map(|(id, _)| *id)
                    })
                },
                forget: {
                    let (index, handles) = (index.clone(), names.handles.clone());
                    Arc::new(move |id| {
                        index.lock().expect("not poisoned").remove(&id);
                        handles.lock().expect("not poisoned").remove(&id);
                    })
                },
                found: found_changes,
            }
            .run(),
        );
        Ok(JetStreamEngine {
            runtime: Some(runtime),
            client,
            js,
            state,
            names,
            gateway_id,
            options,
            index,
            failed: Mutex::new(None),
            remote_heads: Mutex::new(Some(remote_heads)),
            remote_changes: Mutex::new(Some(remote_changes)),
            forwarded: Mutex::new(Some(forwarded)),
            pending_groups: Mutex::new(Default::default()),
            pending: Mutex::new(Default::default()),
            tickets: Default::default(),
        })
    }

    /// Runs `f` on the engine's runtime and waits for it (off the
    /// caller's async workers, when it has any).
    /// Sends `request` to the gateway a group member joined at (`what`:
    /// `commit` or `told`) and returns its answer; `None` when the member
    /// is joined nowhere else (its record is gone, names this gateway, or
    /// its gateway is gone: no responders).
    fn ask_member_gateway(
        &self,
        stream_id: u64,
        group: &str,
        member: &str,
        what: &'static str,
        request: String,
    ) -> Result<Option<Bytes>, BoxError> {
        let (state, client, key) = (
            self.state.clone(),
            self.client.clone(),
            feed::member_key(stream_id, &hex(group), &hex(member)),
        );
        let (names, this_gateway) = (self.names.clone(), self.gateway_id);
        self.block(async move {
            let Some(record) = state.get(&key).await.map_err(|e| Box::new(e) as BoxError)? else {
                return Ok(None);
            };
            let Some(gateway) = feed::parse_member(&record.value) else {
                return Ok(None);
            };
            if gateway == this_gateway {
                return Ok(None);
            }
            match client
                .request(names.forward_subject(gateway, what), request.into())
                .await
            {
                Ok(answer) => Ok(Some(answer.payload)),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(None),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }

    fn block<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let runtime = self.runtime.as_ref().expect("open until dropped");
        crate::engine::run_blocking(|| run_on(runtime, f))
    }

    fn error(
        &self,
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StorageError {
        StorageError::Engine {
            op,
            path: self.options.label.clone(),
            source: Box::new(source),
        }
    }

    fn state_get(&self, key: String, op: &'static str) -> Result<Option<Bytes>, StorageError> {
        let state = self.state.clone();
        self.block(async move { state.get(&key).await })
            .map(|r| r.map(|r| r.value))
            .map_err(|e| self.error(op, e))
    }

    fn state_list(
        &self,
        prefix: String,
        op: &'static str,
    ) -> Result<Vec<(String, Bytes)>, StorageError> {
        let state = self.state.clone();
        self.block(async move { state.list(&prefix).await })
            .map(|records| records.into_iter().map(|(k, r)| (k, r.value)).collect())
            .map_err(|e| self.error(op, e))
    }

    fn state_put(&self, key: String, value: Vec<u8>, op: &'static str) -> Result<(), StorageError> {
        let state = self.state.clone();
        self.block(async move { state.put(&key, value.into(), Expect::Any).await })
            .map(drop)
            .map_err(|e| self.error(op, e))
    }

    /// The events stream of `stream_id`, created if missing.
    async fn events(
        js: jetstream::Context,
        names: &Names,
        stream_id: u64,
        replicas: usize,
    ) -> Result<stream::Stream, BoxError> {
        if let Some(handle) = names.handles.lock().expect("not poisoned").get(&stream_id) {
            return Ok(handle.clone());
        }
        let handle = js
            .get_or_create_stream(stream::Config {
                name: names.events_stream(stream_id),
                subjects: vec![names.events_subject(stream_id)],
                num_replicas: replicas,
                allow_direct: true,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        names
            .handles
            .lock()
            .expect("not poisoned")
            .insert(stream_id, handle.clone());
        Ok(handle)
    }

    /// The group message at `seq` (`None` when there is none, e.g.
    /// purged). A direct get, which any replica answers; a replica that
    /// does not have the message yet (it lags the quorum that acknowledged
    /// it) says "not found", so that answer is checked with the stream's
    /// leader before it counts as a hole.
    async fn message_at(stream: &stream::Stream, seq: u64) -> Result<Option<Located>, BoxError> {
        let message = match stream.direct_get(seq).await {
            Ok(message) => message,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                match stream.get_raw_message(seq).await {
                    Ok(message) => message,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                        return Ok(None)
                    }
                    Err(e) => return Err(Box::new(e)),
                }
            }
            Err(e) => return Err(Box::new(e)),
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .and_then(|v| v.as_str().parse::<i64>().ok())
                .ok_or_else(|| format!("the message at sequence {seq} has no valid {name} header"))
        };
        let (first, end, time) = (header(FIRST_OFFSET)?, header(END_OFFSET)?, header(TIME)?);
        if first < 0 || end < first {
            return Err(
                format!("the message at sequence {seq} holds offsets {first}..{end}").into(),
            );
        }
        Ok(Some(Located {
            first: first as u64,
            end: end as u64,
            time,
            fence: fence_of(&message.headers),
            payload: message.payload,
        }))
    }

    /// The sequence of the message holding `offset` (the last message
    /// starting at or before it) among sequences `1..=last_seq`, if any: a
    /// binary search by direct gets, O(log n). Purged messages (a prefix)
    /// read as holes below everything.
    async fn seq_holding(
        stream: &stream::Stream,
        last_seq: u64,
        offset: u64,
    ) -> Result<Option<u64>, BoxError> {
        let (mut low, mut high) = (1, last_seq);
        let mut found = None;
        while low <= high {
            let middle = low + (high - low) / 2;
            match Self::message_at(stream, middle).await? {
                Some(m) if m.first <= offset => {
                    found = Some(middle);
                    low = middle + 1;
                }
                Some(_) => high = middle - 1,
                // A hole (purged): search above it.
                None => low = middle + 1,
            }
        }
        Ok(found)
    }

    /// The stream's last message with its sequence, if any.
    async fn last_message(stream: &stream::Stream) -> Result<Option<(u64, Located)>, BoxError> {
        let info = stream.get_info().await?;
        if info.state.messages == 0 {
            return Ok(None);
        }
        let seq = info.state.last_sequence;
        Ok(Self::message_at(stream, seq).await?.map(|m| (seq, m)))
    }

    /// Writes the idempotency records a group message carries (again):
    /// the gateway that appended it may have stopped before it wrote them.
    async fn roll_forward(
        state: &StateStore,
        stream_id: u64,
        located: &Located,
    ) -> Result<(), BoxError> {
        let group = message::decode(located.payload.clone())?;
        put_idempotency(state, stream_id, &group.keys).await?;
        Ok(())
    }

    /// The last sequence of a stream's events as this engine knows it.
    fn last_seq(&self, stream_id: u64) -> u64 {
        self.index
            .lock()
            .expect("not poisoned")
            .get(&stream_id)
            .map_or(0, |i| i.last_seq)
    }

    /// Refuses every write from now on (until a restart reloads the
    /// truth from the cluster), as a failed disk write does.
    fn poison(&self, error: &StorageError) {
        *self.failed.lock().expect("not poisoned") = Some(error.to_string());
        // What was prepared and not applied never will be: the stored
        // records are the truth again.
        self.pending.lock().expect("not poisoned").clear();
        self.pending_groups.lock().expect("not poisoned").clear();
    }

    /// Publishes a group as one message after the last one this engine
    /// knows (`Nats-Expected-Last-Sequence`), writes the idempotency
    /// records it carries, and announces the new head. Answers
    /// [`StorageError::HeadMoved`] when another gateway appended first.
    ///
    /// Every message carries the fencing token in force (`new_fence`, for
    /// the message holding no events that changes it; else the one the
    /// index knows), so a gateway that lost the race learns the token with
    /// the head, and an append decided with a stale token is refused by
    /// the same conditional publish that refuses a stale head.
    fn append_group(
        &self,
        name: &str,
        stream_id: u64,
        chunks: Vec<EncodedChunk>,
        keys: Vec<(String, IdempotencyRecord)>,
        end: u64,
        new_fence: Option<&str>,
    ) -> Result<(), StorageError> {
        let first = chunks.first().map_or(end, |c| c.first_offset);
        let (last_seq, known_next, known_time, known_fence) = {
            let index = self.index.lock().expect("not poisoned");
            let entry = index.get(&stream_id);
            (
                entry.map_or(0, |i| i.last_seq),
                entry.map_or(0, |i| i.next_offset),
                entry.map_or(i64::MIN, |i| i.last_time),
                entry.and_then(|i| i.fence.clone()),
            )
        };
        let fence = new_fence.map(str::to_string).or(known_fence);
        if known_next != first {
            // Another gateway's append reached this engine first (its
            // announcement, or the follower's check).
            return self.refresh_head(name, stream_id);
        }
        let time = match chunks.last() {
            Some(chunk) => {
                ChunkHeader::decode(&chunk.value)
                    .map_err(|source| StorageError::CorruptChunk {
                        stream_id,
                        offset: chunk.first_offset,
                        source,
                    })?
                    .time_unix_nanos
            }
            // No events (a fencing token's change): the last event's time
            // stays the stream's.
            None => known_time,
        };
        let payload = message::encode(chunks.iter().map(|c| c.value.as_slice()), &keys);
        let mut headers = HeaderMap::new();
        headers.insert(FIRST_OFFSET, first.to_string().as_str());
        headers.insert(END_OFFSET, end.to_string().as_str());
        headers.insert(TIME, time.to_string().as_str());
        headers.insert("Nats-Expected-Last-Sequence", last_seq.to_string().as_str());
        if let Some(fence) = &fence {
            headers.insert(FENCE, fence_header(fence).as_str());
        }
        // Unique to this gateway's attempt: a repeat of this publish that
        // did land is answered `duplicate` with its sequence, and another
        // gateway's message for the same offsets never is. (A message
        // holding no events shares its first offset with the next one:
        // its id also names the sequence it follows.)
        let id = if chunks.is_empty() {
            format!(
                "{:016x}-{stream_id}-{first}-after-{last_seq}",
                self.gateway_id
            )
        } else {
            format!("{:016x}-{stream_id}-{first}", self.gateway_id)
        };
        headers.insert("Nats-Msg-Id", id.as_str());
        let (js, state, names, client) = (
            self.js.clone(),
            self.state.clone(),
            self.names.clone(),
            self.client.clone(),
        );
        let payload = Bytes::from(payload);
        let announced_fence = fence.clone();
        let announce = Announcement {
            gateway_id: self.gateway_id,
            seq: 0,
            first,
            next_offset: end,
            time,
            name: name.to_string(),
        };
        let exists = {
            let (state, key) = (self.state.clone(), format!("stream.{}", hex(name)));
            move || {
                let (state, key) = (state.clone(), key.clone());
                async move { stream_is_there(&state, &key, stream_id).await }
            }
        };
        let published = self.block(async move {
            let ack = super::publish_retrying_unless(
                &js,
                names.events_subject(stream_id),
                headers,
                payload.clone(),
                || {
                    let exists = exists.clone();
                    async move { !exists().await }
                },
            )
            .await?;
            // The records before anything else can append after this
            // message (see `message`); then the announcement.
            put_idempotency(&state, stream_id, &keys)
                .await
                .map_err(|e| Box::new(e) as BoxError)?;
            let announce = Announcement {
                seq: ack.sequence,
                ..announce
            };
            let mut headers = HeaderMap::new();
            headers.insert(ANNOUNCE, announce.encode().as_str());
            if let Some(fence) = &announced_fence {
                headers.insert(FENCE, fence_header(fence).as_str());
            }
            let _ = client
                .publish_with_headers(names.head_subject(stream_id), headers, payload)
                .await;
            Ok::<_, BoxError>(ack.sequence)
        });
        match published {
            Ok(seq) => {
                let mut index = self.index.lock().expect("not poisoned");
                let entry = index
                    .entry(stream_id)
                    .or_insert_with(|| StreamIndex::new(name));
                entry.saw(
                    seq,
                    &Located {
                        first,
                        end,
                        time,
                        fence,
                        payload: Bytes::new(),
                    },
                );
                Ok(())
            }
            Err(e)
                if e.downcast_ref::<async_nats::jetstream::context::PublishError>()
                    .is_some_and(|e| e.kind() == PublishErrorKind::WrongLastSequence) =>
            {
                self.refresh_head(name, stream_id)
            }
            Err(e)
                if e.downcast_ref::<async_nats::jetstream::context::PublishError>()
                    .is_some_and(|e| e.kind() == PublishErrorKind::StreamNotFound)
                    && !self.block({
                        let (state, key) = (self.state.clone(), format!("stream.{}", hex(name)));
                        async move { stream_is_there(&state, &key, stream_id).await }
                    }) =>
            {
                // Deleted through another gateway: nothing was written, and
                // nothing is wrong with this gateway.
                Err(StorageError::StreamGone {
                    name: name.to_string(),
                })
            }
            Err(e) => {
                let error = self.error("appending events", std::io::Error::other(e.to_string()));
                self.poison(&error);
                Err(error)
            }
        }
    }

    /// Learns a stream's head from its last message (writing that
    /// message's idempotency records again, as its gateway may not have),
    /// and answers [`StorageError::HeadMoved`] with it.
    fn refresh_head(&self, name: &str, stream_id: u64) -> Result<(), StorageError> {
        let names = self.names.clone();
        let (js, state, replicas) = (self.js.clone(), self.state.clone(), self.options.replicas);
        let found = self.block(async move {
            let stream = Self::events(js, &names, stream_id, replicas).await?;
            let last = Self::last_message(&stream).await?;
            if let Some((_, located)) = &last {
                Self::roll_forward(&state, stream_id, located).await?;
            }
            Ok::<_, BoxError>(last)
        });
        let found = found.map_err(|e| {
            self.error(
                "reading the stream's head after another gateway's append",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut index = self.index.lock().expect("not poisoned");
        let entry = index
            .entry(stream_id)
            .or_insert_with(|| StreamIndex::new(name));
        if let Some((seq, located)) = found {
            entry.saw(seq, &located);
        }
        Err(StorageError::HeadMoved {
            stream_id,
            next_offset: entry.next_offset,
            last_time_unix_nanos: entry.last_time,
        })
    }

    /// A stream from its metadata record: its head and first offset from
    /// its messages, its consumers, groups and fencing token from their
    /// records. Rolls its last message forward and indexes it.
    fn load_stream(&self, name: String, value: &[u8]) -> Result<StoredStream, StorageError> {
        let mut meta = StreamMeta::decode(value).map_err(|source| StorageError::Corrupt {
            what: format!("metadata of stream {name:?}"),
            source,
        })?;
        let names = self.names.clone();
        let (js, state, replicas, id) = (
            self.js.clone(),
            self.state.clone(),
            self.options.replicas,
            meta.id,
        );
        let found = self.block(async move {
            let stream = Self::events(js, &names, id, replicas).await?;
            let info = stream.get_info().await?;
            if info.state.messages == 0 {
                return Ok::<_, BoxError>((info.state.last_sequence, info.state.bytes, None));
            }
            let first = Self::message_at(&stream, info.state.first_sequence).await?;
            let last = Self::message_at(&stream, info.state.last_sequence).await?;
            if let Some(last) = &last {
                // Its gateway may have stopped before writing them.
                Self::roll_forward(&state, id, last).await?;
            }
            Ok((info.state.last_sequence, info.state.bytes, first.zip(last)))
        });
        let (last_seq, bytes, ends) = found
            .map_err(|e| self.error("loading streams", std::io::Error::other(e.to_string())))?;
        // The messages are the truth for the head (appends do not
        // rewrite the stream's metadata record).
        let next_offset = ends
            .as_ref()
            .map_or(meta.next_offset, |(_, last)| last.end)
            .max(meta.next_offset);
        let first_offset = ends
            .as_ref()
            .map_or(next_offset, |(first, _)| first.first)
            .max(meta.offset_floor)
            .min(next_offset);
        let last_time = ends
            .as_ref()
            .map(|(_, last)| last.time)
            .filter(|&t| t != i64::MIN);
        let last_fence = ends.as_ref().and_then(|(_, last)| last.fence.clone());
        meta.next_offset = next_offset;
        meta.bytes = bytes;
        let mut entry = StreamIndex::new(&name);
        entry.last_seq = last_seq;
        entry.next_offset = next_offset;
        entry.last_time = last_time.unwrap_or(i64::MIN);
        entry.floor = first_offset;
        self.index.lock().expect("not poisoned").insert(id, entry);
        // Records keyed `<kind>.<stream id>.<name in hex>`.
        let named = |kind: &str| {
            self.state_list(format!("{kind}.{id}"), "loading consumers and groups")
                .map(|records| {
                    records
                        .into_iter()
                        .filter_map(|(key, value)| Some((unhex(key.rsplit('.').next()?)?, value)))
                        .collect::<Vec<_>>()
                })
        };
        let mut consumers = Vec::new();
        for (consumer, value) in named("consumer")? {
            let record =
                ConsumerRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                    what: format!("consumer {consumer:?} of stream {name:?}"),
                    source,
                })?;
            consumers.push((consumer, record));
        }
        let mut groups = Vec::new();
        for (group, value) in named("group")? {
            let record = GroupRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("group {group:?} of stream {name:?}"),
                source,
            })?;
            groups.push((group, record));
        }
        // The last message says which token is in force; the record, for
        // streams whose messages do not.
        let fence = match last_fence {
            Some(fence) => fence,
            None => self
                .state_get(format!("fence.{id}"), "loading a fencing token")?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default(),
        };
        if let Some(entry) = self.index.lock().expect("not poisoned").get_mut(&id) {
            entry.fence = Some(fence.clone());
        }
        Ok(StoredStream {
            name,
            meta,
            first_offset,
            next_offset,
            last_time_unix_nanos: last_time,
            consumers,
            groups,
            fence,
        })
    }

    /// Prepares a consumer record's write (`None`: its deletion), and
    /// remembers it as pending until applied (see `stored_consumer`).
    fn consumer_change(&self, stream_id: u64, name: &str, value: Option<Vec<u8>>) -> Prepared {
        let key = format!("consumer.{stream_id}.{}", hex(name));
        let ticket = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let size = 128 + key.len() + value.as_ref().map_or(0, Vec::len);
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(key, (ticket, value.clone()));
        Prepared::new(
            Change::Consumer {
                stream_id,
                name: name.to_string(),
                value,
                ticket,
            },
            size,
        )
    }

    fn poisoned(&self) -> Result<(), StorageError> {
        match self.failed.lock().expect("not poisoned").clone() {
            Some(reason) => Err(self.error(
                "committing",
                std::io::Error::other(format!(
                    "writes are refused after an earlier failure: {reason}"
                )),
            )),
            None => Ok(()),
        }
    }

    /// Applies one change; see [`Engine::commit`].
    fn apply(&self, change: Change) -> Result<(), StorageError> {
        let names = self.names.clone();
        let (js, state, replicas) = (self.js.clone(), self.state.clone(), self.options.replicas);
        match change {
            Change::Appended => Ok(()),
            Change::Meta { name, meta } => self.state_put(
                format!("stream.{}", hex(&name)),
                meta.encode(),
                "writing stream metadata",
            ),
            Change::Trim { name, meta, below } => {
                let stream_id = meta.id;
                let last_seq = self.last_seq(stream_id);
                let trimmed = self.block(async move {
                    let stream = Self::events(js, &names, stream_id, replicas).await?;
                    // Remove every message wholly below `below`: purge up to
                    // the one holding it (a message holding events on both
                    // sides stays; reads below the floor are refused
                    // above the seam anyway).
                    if let Some(seq) = Self::seq_holding(&stream, last_seq, below).await? {
                        let keep_from = match Self::message_at(&stream, seq).await? {
                            Some(m) if m.end > below => seq,
                            _ => seq + 1,
                        };
                        stream.purge().sequence(keep_from).await?;
                    }
                    state
                        .put(
                            &format!("stream.{}", hex(&name)),
                            meta.encode().into(),
                            Expect::Any,
                        )
                        .await?;
                    Ok::<_, BoxError>(())
                });
                if let Some(entry) = self.index.lock().expect("not poisoned").get_mut(&stream_id) {
                    entry.seq_of.retain(|first, _| *first >= below);
                    entry.floor = entry.floor.max(below);
                }
                trimmed.map_err(|e| self.error("trimming", std::io::Error::other(e.to_string())))
            }
            Change::Record { key, value } => {
                let done = self.block(async move {
                    match value {
                        Some(value) => state.put(&key, value.into(), Expect::Any).await,
                        None => state.delete(&key, Expect::Any).await,
                    }
                });
                done.map(drop)
                    .map_err(|e| self.error("writing a record", e))
            }
            Change::Group {
                key,
                record,
                slots,
                ticket,
            } => {
                let done = self.block({
                    let key = key.clone();
                    async move { write_group_record(&state, &key, record, slots).await }
                });
                let mut pending = self.pending_groups.lock().expect("not poisoned");
                if pending.get(&key).is_some_and(|p| p.ticket == ticket) {
                    pending.remove(&key);
                }
                drop(pending);
                done.map_err(|e| self.error("writing a consumer group", e))
            }
            Change::DeleteGroup { stream_id, name } => {
                let done = self.block(async move {
                    state
                        .delete(&format!("group.{stream_id}.{}", hex(&name)), Expect::Any)
                        .await?;
                    state
                        .delete(&feed::assignment_key(stream_id, &hex(&name)), Expect::Any)
                        .await
                });
                done.map(drop)
                    .map_err(|e| self.error("deleting a consumer group", e))
            }
            Change::Consumer {
                stream_id,
                name,
                value,
                ticket,
            } => {
                let gateway_id = self.gateway_id;
                let key = format!("consumer.{stream_id}.{}", hex(&name));
                let done = self.block({
                    let key = key.clone();
                    async move {
                        let Some(value) = value else {
                            state.delete(&key, Expect::Any).await?;
                            return state
                                .put(
                                    &feed::claim_key(stream_id, &hex(&name)),
                                    feed::claim_value(gateway_id, ClaimChange::Deleted).into(),
                                    Expect::Any,
                                )
                                .await;
                        };
                        state.put(&key, value.into(), Expect::Any).await
                    }
                });
                let mut pending = self.pending.lock().expect("not poisoned");
                if pending.get(&key).is_some_and(|(t, _)| *t == ticket) {
                    pending.remove(&key);
                }
                drop(pending);
                done.map(drop)
                    .map_err(|e| self.error("writing a consumer", e))
            }
            Change::Forget { keys } => {
                let done = self.block(async move {
                    for key in keys {
                        state.delete(&key, Expect::Any).await?;
                    }
                    Ok::<_, StateError>(())
                });
                done.map_err(|e| self.error("forgetting idempotency keys", e))
            }
            Change::DeleteStream { name, stream_id } => {
                let done = self.block(async move {
                    // The registry entry first: a deletion cut short leaves
                    // unreachable records, never a stream with holes.
                    state
                        .delete(&format!("stream.{}", hex(&name)), Expect::Any)
                        .await?;
                    for kind in ["idem", "consumer", "claim", "group"] {
                        for (key, _) in state.list(&format!("{kind}.{stream_id}")).await? {
                            state.delete(&key, Expect::Any).await?;
                        }
                    }
                    state
                        .delete(&format!("fence.{stream_id}"), Expect::Any)
                        .await?;
                    match js.delete_stream(names.events_stream(stream_id)).await {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                            ) => {}
                        Err(e) => return Err(Box::new(e) as BoxError),
                    }
                    Ok(())
                });
                self.index.lock().expect("not poisoned").remove(&stream_id);
                self.names
                    .handles
                    .lock()
                    .expect("not poisoned")
                    .remove(&stream_id);
                done.map_err(|e| {
                    self.error("deleting a stream", std::io::Error::other(e.to_string()))
                })
            }
        }
    }
}

/// Follows other gateways' appends for the engine (on its runtime): each
/// announcement of a newer head moves the stream's index, and every
/// [`FOLLOW_PERIOD`] the cluster's last sequences are compared with the
/// index to catch what announcements missed (they are at most once).
/// Each move is reported once, in order, to [`Engine::remote_heads`].
struct Follower {
    js: jetstream::Context,
    state: StateStore,
    names: Names,
    replicas: usize,
    gateway_id: u64,
    index: Indexes,
    found: mpsc::Sender<RemoteHead>,
    /// Each stream's last sequence in the cluster at the previous check.
    listed: Mutex<HashMap<u64, u64>>,
}

/// One page of `$JS.API.STREAM.LIST`, with only what the follower reads.
#[derive(Debug, serde::Deserialize)]
struct StreamPage {
    total: usize,
    #[serde(default)]
    streams: Vec<ListedStream>,
}

#[derive(Debug, serde::Deserialize)]
struct ListedStream {
    config: ListedConfig,
    state: ListedState,
}

#[derive(Debug, serde::Deserialize)]
struct ListedConfig {
    name: String,
}

#[derive(Debug, serde::Deserialize)]
struct ListedState {
    last_seq: u64,
}

impl Follower {
    /// Takes in announcements until they end, while a task of its own
    /// compares heads every [`FOLLOW_PERIOD`]: a comparison waits on the
    /// cluster (listing streams can take seconds while it is busy making
    /// one), and announcements must not queue behind it, or the check
    /// finds the heads it holds up and sends subscribers to the cluster.
    async fn run(self, mut announcements: async_nats::Subscriber) {
        let follower = Arc::new(self);
        let checking = tokio::spawn({
            let follower = follower.clone();
            async move {
                let mut ticks = tokio::time::interval(FOLLOW_PERIOD);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let started = Instant::now();
                    let moved = match follower.check().await {
                        Ok(moved) => moved,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot compare the cluster's heads with this gateway's");
                            Vec::new()
                        }
                    };
                    if started.elapsed() > FOLLOW_PERIOD {
                        tracing::debug!(
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "comparing the cluster's heads with this gateway's was slow"
                        );
                    }
                    for head in moved {
                        if follower.found.send(head).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        // How late announcements come (after their append's time), logged
        // at most once a period when it is worth a look.
        let mut logged = Instant::now();
        while let Some(message) = announcements.next().await {
            let Some(head) = follower.announced(&message) else {
                continue;
            };
            let late =
                crate::clock::system_now_unix_nanos().saturating_sub(head.last_time_unix_nanos);
            let late = Duration::from_nanos(late.max(0) as u64);
            if late > LATE_ANNOUNCEMENT && logged.elapsed() > FOLLOW_PERIOD {
                tracing::debug!(
                    late_ms = late.as_millis() as u64,
                    "an announcement of another gateway's append came late"
                );
                logged = Instant::now();
            }
            if follower.found.send(head).await.is_err() {
                checking.abort();
                return;
            }
        }
        // (Announcements end with the connection; the checks go on, and
        // find what the cluster has when it is back.)
        let _ = checking.await;
    }

    /// Another gateway's announcement: the head it moves, if newer.
    fn announced(&self, message: &async_nats::Message) -> Option<RemoteHead> {
        let stream_id: u64 = message.subject.rsplit('.').next()?.parse().ok()?;
        let announced = Announcement::decode(message.headers.as_ref()?.get(ANNOUNCE)?.as_str())?;
        if announced.gateway_id == self.gateway_id {
            return None;
        }
        let located = Located {
            first: announced.first,
            end: announced.next_offset,
            time: announced.time,
            fence: message.headers.as_ref().and_then(fence_of),
            payload: message.payload.clone(),
        };
        let head = {
            let mut index = self.index.lock().expect("not poisoned");
            let Some(entry) = index.get_mut(&stream_id) else {
                tracing::debug!(
                    stream_id,
                    seq = announced.seq,
                    "an announcement for a stream this gateway does not serve"
                );
                return None;
            };
            if !entry.saw(announced.seq, &located) {
                tracing::debug!(
                    stream_id,
                    seq = announced.seq,
                    last_seq = entry.last_seq,
                    "an announcement of a message already seen"
                );
                return None;
            }
            entry.head(stream_id)
        };
        Some(RemoteHead {
            chunks: chunks_of(&located.payload),
            ..head
        })
    }

    /// The heads the cluster has beyond this gateway's index, counting
    /// only what it already had at the previous check: an append made a
    /// moment ago has its announcement on the way, and moving the head
    /// ahead of it (with the events of the last message only) would send
    /// every subscriber to the cluster for the events in between, and
    /// throw away the announcements that carry them.
    async fn check(&self) -> Result<Vec<RemoteHead>, BoxError> {
        let previous = std::mem::take(&mut *self.listed.lock().expect("not poisoned"));
        let mut listed = HashMap::new();
        let mut behind = Vec::new();
        let mut offset = 0;
        loop {
            let page: jetstream::response::Response<StreamPage> = self
                .js
                .request(
                    "STREAM.LIST",
                    &serde_json::json!({
                        "offset": offset,
                        "subject": format!("{}.ev.*", self.names.subjects),
                    }),
                )
                .await?;
            let page = match page {
                jetstream::response::Response::Ok(page) => page,
                jetstream::response::Response::Err { error } => return Err(Box::new(error)),
            };
            let index = self.index.lock().expect("not poisoned");
            for listed_stream in &page.streams {
                let Some(id) = self.names.stream_id_of(&listed_stream.config.name) else {
                    continue;
                };
                listed.insert(id, listed_stream.state.last_seq);
                if let (Some(entry), Some(&before)) = (index.get(&id), previous.get(&id)) {
                    if before > entry.last_seq {
                        behind.push((id, entry.last_seq));
                    }
                }
            }
            offset += page.streams.len();
            if page.streams.is_empty() || offset >= page.total {
                break;
            }
        }
        *self.listed.lock().expect("not poisoned") = listed;
        let mut moved = Vec::new();
        for (id, known) in behind {
            let stream =
                JetStreamEngine::events(self.js.clone(), &self.names, id, self.replicas).await?;
            let Some((seq, located)) = JetStreamEngine::last_message(&stream).await? else {
                continue;
            };
            tracing::debug!(
                stream_id = id,
                known,
                last_seq = seq,
                "announcements missed: the head moves to the cluster's"
            );
            JetStreamEngine::roll_forward(&self.state, id, &located).await?;
            // A few missed messages are read here, once, so the writer can
            // hand their events to the tail cache; beyond that, readers
            // read them from the cluster.
            let mut chunks = Vec::new();
            if seq - known <= SKIPPED_READ_MAX {
                for skipped in known + 1..seq {
                    match JetStreamEngine::message_at(&stream, skipped).await? {
                        Some(message) => chunks.extend(chunks_of(&message.payload)),
                        None => {
                            chunks.clear();
                            break;
                        }
                    }
                }
            }
            chunks.extend(chunks_of(&located.payload));
            let mut index = self.index.lock().expect("not poisoned");
            if let Some(entry) = index.get_mut(&id) {
                if entry.saw(seq, &located) {
                    moved.push(RemoteHead {
                        chunks,
                        ..entry.head(id)
                    });
                }
            }
        }
        Ok(moved)
    }
}

/// A forwarded group commit as sent between gateways.
fn encode_forwarded(stream_id: u64, group: &str, member: &str, next_offset: u64) -> String {
    format!("{stream_id} {next_offset} {} {}", hex(group), hex(member))
}

/// The inverse of [`encode_forwarded`]: stream id, group, member, offset.
fn decode_forwarded(text: &[u8]) -> Option<(u64, String, String, u64)> {
    let mut parts = std::str::from_utf8(text).ok()?.split(' ');
    let stream_id = parts.next()?.parse().ok()?;
    let next_offset = parts.next()?.parse().ok()?;
    let group = unhex(parts.next()?)?;
    let member = unhex(parts.next()?)?;
    Some((stream_id, group, member, next_offset))
}

/// Answers the calls other gateways forward about members connected here
/// (commits, and which generation a member was told of): each goes to
/// the log, which answers as for its own member, and the answer goes back
/// to the asking gateway. Concurrently, so one slow commit does not hold
/// up the others.
async fn serve_forwarded(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    index: Indexes,
    log: mpsc::Sender<Forwarded>,
) {
    while let Some(request) = requests.next().await {
        let Some(reply_to) = request.reply.clone() else {
            continue;
        };
        let (client, index, log) = (client.clone(), index.clone(), log.clone());
        tokio::spawn(async move {
            let asking_told = request.subject.ends_with(".told");
            let closing =
                || ForwardedAnswer::Failed("the member's gateway is shutting down".into());
            let decoded = decode_forwarded(&request.payload);
            let name = decoded.as_ref().and_then(|(stream_id, ..)| {
                let index = index.lock().expect("not poisoned");
                index.get(stream_id).map(|entry| entry.name.clone())
            });
            let answer = match (decoded, name) {
                (None, _) => ForwardedAnswer::Failed("a malformed forwarded call".into()).encode(),
                (Some(_), None) if asking_told => "no-member".to_string(),
                (Some(_), None) => ForwardedAnswer::NoStream.encode(),
                (Some((stream_id, group, member, next_offset)), Some(stream)) if !asking_told => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let commit = ForwardedCommit {
                        stream,
                        stream_id,
                        group,
                        member,
                        next_offset,
                        reply,
                    };
                    match log.send(Forwarded::Commit(commit)).await {
                        Ok(()) => answer.await.unwrap_or_else(|_| closing()),
                        Err(_) => closing(),
                    }
                    .encode()
                }
                (Some((stream_id, group, member, _)), Some(stream)) => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let question = crate::engine::ToldQuestion {
                        stream,
                        stream_id,
                        group,
                        member,
                        reply,
                    };
                    let told = match log.send(Forwarded::Told(question)).await {
                        Ok(()) => answer.await.ok().flatten(),
                        Err(_) => None,
                    };
                    told.map_or("no-member".to_string(), |g| format!("told {g}"))
                }
            };
            if let Err(e) = client.publish(reply_to, answer.into()).await {
                tracing::debug!(error = %e, "a forwarded call's answer was not sent");
            }
        });
    }
}

/// A prepared write (`Some`) or deletion (`None`) of one record.
fn record_change(key: String, value: Option<Vec<u8>>) -> Prepared {
    let size = 64 + key.len() + value.as_ref().map_or(0, Vec::len);
    Prepared::new(Change::Record { key, value }, size)
}

/// The record key of an idempotency key of a stream.
fn idempotency_key(stream_id: u64, key: &str) -> String {
    format!("idem.{stream_id}.{}", hex(key))
}

/// Writes idempotency records, all at once (each retried while the
/// cluster cannot answer).
async fn put_idempotency(
    state: &StateStore,
    stream_id: u64,
    keys: &[(String, IdempotencyRecord)],
) -> Result<(), StateError> {
    let mut writes = tokio::task::JoinSet::new();
    for (key, record) in keys {
        let (state, key, value) = (
            state.clone(),
            idempotency_key(stream_id, key),
            Bytes::from(record.encode()),
        );
        writes.spawn(async move { state.put(&key, value, Expect::Any).await });
    }
    while let Some(done) = writes.join_next().await {
        done.map_err(|e| StateError::JetStream {
            op: "writing idempotency records",
            source: Box::new(e),
        })??;
    }
    Ok(())
}

/// Writes a group's record: all of it, or (`slots`) those slots merged
/// into what is stored, by compare-and-set, read again after each lost
/// race (members on other gateways commit their own slots meanwhile). A
/// group deleted meanwhile stays deleted.
async fn write_group_record(
    state: &StateStore,
    key: &str,
    record: GroupRecord,
    slots: Option<Vec<usize>>,
) -> Result<(), StateError> {
    let Some(slots) = slots else {
        return state
            .put(key, record.encode().into(), Expect::Any)
            .await
            .map(drop);
    };
    loop {
        let Some(stored) = state.get(key).await? else {
            return Ok(());
        };
        let mut merged = GroupRecord::decode(&stored.value).map_err(|e| StateError::JetStream {
            op: "reading a consumer group",
            source: Box::new(e),
        })?;
        for &slot in &slots {
            if let (Some(to), Some(&from)) =
                (merged.committed.get_mut(slot), record.committed.get(slot))
            {
                *to = from;
            }
        }
        match state
            .put(
                key,
                merged.encode().into(),
                Expect::Revision(stored.revision),
            )
            .await
        {
            Err(StateError::Conflict { .. }) => continue,
            done => return done.map(drop),
        }
    }
}

/// Whether the stream of id `stream_id` is still registered under its
/// record `key` (a read that fails says yes: only a sure answer counts).
async fn stream_is_there(state: &StateStore, key: &str, stream_id: u64) -> bool {
    match state.get(key).await {
        Ok(Some(record)) => StreamMeta::decode(&record.value).map_or(true, |m| m.id == stream_id),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Runs `f` on `runtime` and waits for it on this thread.
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    let (done, result) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = done.send(f.await);
    });
    result
        .recv()
        .expect("the engine's runtime runs until the engine is dropped")
}

impl Engine for JetStreamEngine {
    fn load_streams(&self) -> Result<Vec<StoredStream>, StorageError> {
        let mut streams = Vec::new();
        for (key, value) in self.state_list("stream".into(), "loading streams")? {
            let name = key.strip_prefix("stream.").and_then(unhex).ok_or_else(|| {
                self.error(
                    "loading streams",
                    std::io::Error::other(format!("bad stream record key {key}")),
                )
            })?;
            streams.push(self.load_stream(name, &value)?);
        }
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(streams)
    }

    fn new_stream_id(&self) -> Result<u64, StorageError> {
        let state = self.state.clone();
        let id = self.block(async move {
            // A compare-and-set loop on the counter record.
            loop {
                let current = state.get("counter.stream-id").await?;
                let (next, expect) = match &current {
                    None => (1u64, Expect::Absent),
                    Some(r) => {
                        let bytes: [u8; 8] = r.value[..].try_into().unwrap_or([0; 8]);
                        (u64::from_be_bytes(bytes) + 1, Expect::Revision(r.revision))
                    }
                };
                match state
                    .put(
                        "counter.stream-id",
                        next.to_be_bytes().to_vec().into(),
                        expect,
                    )
                    .await
                {
                    Ok(_) => return Ok(next),
                    Err(StateError::Conflict { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
        });
        id.map_err(|e| self.error("allocating a stream id", e))
    }

    fn put_stream(&self, name: &str, meta: &StreamMeta) -> Result<(), StorageError> {
        self.poisoned()?;
        let names = self.names.clone();
        let (js, state, replicas, id) = (
            self.js.clone(),
            self.state.clone(),
            self.options.replicas,
            meta.id,
        );
        let (key, value) = (format!("stream.{}", hex(name)), meta.encode());
        let done = self.block(async move {
            let stream = Self::events(js.clone(), &names, id, replicas).await?;
            let info = stream.get_info().await?;
            // Only if no other gateway created the stream meanwhile.
            match state.put(&key, value.into(), Expect::Absent).await {
                Ok(_) => Ok(Some(info.state.last_sequence)),
                Err(StateError::Conflict { .. }) => {
                    let _ = js.delete_stream(names.events_stream(id)).await;
                    Ok(None)
                }
                Err(e) => Err(Box::new(e) as BoxError),
            }
        });
        let last_seq = done
            .map_err(|e| self.error("creating a stream", std::io::Error::other(e.to_string())))?
            .ok_or_else(|| StorageError::AlreadyCreated {
                name: name.to_string(),
            })?;
        self.index
            .lock()
            .expect("not poisoned")
            .entry(id)
            .or_insert_with(|| {
                let mut entry = StreamIndex::new(name);
                entry.last_seq = last_seq;
                entry.next_offset = meta.next_offset;
                entry
            });
        Ok(())
    }

    fn stored_stream_names(&self) -> Result<Vec<String>, StorageError> {
        let mut names: Vec<String> = self
            .state_list("stream".into(), "listing streams")?
            .into_iter()
            .filter_map(|(key, _)| unhex(key.strip_prefix("stream.")?))
            .collect();
        names.sort();
        Ok(names)
    }

    fn find_stream(&self, name: &str) -> Result<Option<StoredStream>, StorageError> {
        self.state_get(format!("stream.{}", hex(name)), "looking up a stream")?
            .map(|value| self.load_stream(name.to_string(), &value))
            .transpose()
    }

    fn write_meta(&self, name: &str, meta: &StreamMeta) -> Result<Prepared, StorageError> {
        Ok(Prepared::new(
            Change::Meta {
                name: name.to_string(),
                meta: *meta,
            },
            64,
        ))
    }

    fn write_group(
        &self,
        name: &str,
        meta: &StreamMeta,
        chunks: Vec<EncodedChunk>,
        idempotency: &[(&str, IdempotencyRecord)],
    ) -> Result<Prepared, StorageError> {
        self.poisoned()?;
        let keys = idempotency
            .iter()
            .map(|(k, r)| (k.to_string(), *r))
            .collect();
        // Written here, not in `commit`: the append is conditional, and a
        // writer that lost the race must decide its group again.
        self.append_group(name, meta.id, chunks, keys, meta.next_offset, None)?;
        Ok(Prepared::new(Change::Appended, 0))
    }

    fn trim(&self, name: &str, meta: &StreamMeta, below: u64) -> Result<Prepared, StorageError> {
        Ok(Prepared::new(
            Change::Trim {
                name: name.to_string(),
                meta: *meta,
                below,
            },
            64,
        ))
    }

    /// Written here, like an append: a message holding no events that
    /// carries the new token, published after the last message this
    /// gateway knows, so every append decided with the old token through
    /// another gateway loses its race and is decided again with the new
    /// one. The record (read when a stream is loaded and its last message
    /// says nothing) follows in `commit`.
    fn put_fence(&self, stream_id: u64, token: &str) -> Result<Prepared, StorageError> {
        self.poisoned()?;
        let (name, head) = {
            let index = self.index.lock().expect("not poisoned");
            let entry = index.get(&stream_id);
            (
                entry.map(|i| i.name.clone()).unwrap_or_default(),
                entry.map_or(0, |i| i.next_offset),
            )
        };
        self.append_group(&name, stream_id, Vec::new(), Vec::new(), head, Some(token))?;
        Ok(record_change(
            format!("fence.{stream_id}"),
            (!token.is_empty()).then(|| token.as_bytes().to_vec()),
        ))
    }

    fn fence_in_force(&self, stream_id: u64) -> Option<String> {
        let index = self.index.lock().expect("not poisoned");
        index.get(&stream_id).and_then(|entry| entry.fence.clone())
    }

    fn delete_stream(&self, name: &str, stream_id: u64) -> Result<Prepared, StorageError> {
        Ok(Prepared::new(
            Change::DeleteStream {
                name: name.to_string(),
                stream_id,
            },
            64,
        ))
    }

    fn read_chunks(
        &self,
        stream_id: u64,
        offset: u64,
        end: u64,
        max_events: usize,
        max_bytes: usize,
        keep: Option<Keep<'_>>,
    ) -> Result<Vec<Chunk>, StorageError> {
        if offset >= end {
            return Ok(Vec::new());
        }
        // Readers never read past the published head, and the index
        // knows every message up to it: its last sequence bounds the read
        // (no request for the stream's state).
        let (cached, last_seq) = {
            let index = self.index.lock().expect("not poisoned");
            let entry = index.get(&stream_id);
            (
                entry.and_then(|i| i.seq_of.range(..=offset).next_back().map(|(_, s)| *s)),
                entry.map_or(0, |i| i.last_seq),
            )
        };
        let names = self.names.clone();
        let (js, replicas) = (self.js.clone(), self.options.replicas);
        // The raw messages first (on the engine's runtime); cutting them
        // into chunks and decoding, which borrows `keep`, on this thread.
        let raw = self.block(async move {
            let stream = Self::events(js, &names, stream_id, replicas).await?;
            let start = match cached {
                Some(seq) => Some(seq),
                None => Self::seq_holding(&stream, last_seq, offset).await?,
            };
            let Some(mut seq) = start else {
                return Ok(Vec::new());
            };
            let (mut events, mut bytes, mut raw) = (0usize, 0usize, Vec::new());
            // The cache can point at a message well before `offset` (only
            // some are remembered): messages that end at or before it are
            // skipped, and after a few, a search takes over.
            let mut skipped = 0;
            while seq <= last_seq {
                let Some(located) = Self::message_at(&stream, seq).await? else {
                    seq += 1;
                    continue;
                };
                if located.first >= end {
                    break;
                }
                if located.end <= offset {
                    skipped += 1;
                    seq = if skipped > 4 {
                        skipped = 0;
                        match Self::seq_holding(&stream, last_seq, offset).await? {
                            Some(found) if found > seq => found,
                            _ => seq + 1,
                        }
                    } else {
                        seq + 1
                    };
                    continue;
                }
                bytes += located.payload.len();
                events += located
                    .end
                    .min(end)
                    .saturating_sub(offset.max(located.first)) as usize;
                raw.push((seq, located));
                seq += 1;
                if events >= max_events || bytes >= max_bytes {
                    break;
                }
            }
            Ok::<_, BoxError>(raw)
        });
        let raw =
            raw.map_err(|e| self.error("reading chunks", std::io::Error::other(e.to_string())))?;
        {
            let mut index = self.index.lock().expect("not poisoned");
            if let Some(entry) = index.get_mut(&stream_id) {
                for (seq, located) in &raw {
                    entry.saw(*seq, located);
                }
            }
        }
        let mut chunks = Vec::new();
        for (_, located) in raw {
            let damaged = |source| StorageError::CorruptChunk {
                stream_id,
                offset: located.first,
                source,
            };
            let group = message::decode(located.payload.clone()).map_err(damaged)?;
            let mut expected = located.first;
            for value in group.chunks {
                let chunk = Chunk::decode_where(value, keep).map_err(damaged)?;
                if chunk.first_offset != expected {
                    return Err(damaged(crate::engine::CodecError::Inconsistent(format!(
                        "the message for offsets {}..{} has a chunk at {} where {expected} was due",
                        located.first, located.end, chunk.first_offset
                    ))));
                }
                expected = chunk.end_offset();
                if chunk.end_offset() > offset {
                    chunks.push(chunk);
                }
            }
            if expected != located.end {
                return Err(damaged(crate::engine::CodecError::Inconsistent(format!(
                    "the message for offsets {}..{} ends at {expected}",
                    located.first, located.end
                ))));
            }
        }
        Ok(chunks)
    }

    fn offset_at_time(
        &self,
        stream_id: u64,
        first: u64,
        end: u64,
        time_unix_nanos: i64,
    ) -> Result<u64, StorageError> {
        crate::engine::search_time(first, end, time_unix_nanos, |offset| {
            Ok(self
                .read_chunks(stream_id, offset, end, 1, 1, None)?
                .into_iter()
                .find(|c| c.contains(offset)))
        })
    }

    fn visit_oldest_chunks(
        &self,
        stream_id: u64,
        limit: usize,
        visit: &mut dyn FnMut(ChunkHeader, u64) -> bool,
    ) -> Result<(), StorageError> {
        let names = self.names.clone();
        let (js, replicas) = (self.js.clone(), self.options.replicas);
        // Chunks below the floor are trimmed already (kept only because
        // their message holds newer ones too).
        let floor = self
            .index
            .lock()
            .expect("not poisoned")
            .get(&stream_id)
            .map_or(0, |i| i.floor);
        let mut after = None;
        let mut shown = 0;
        while shown < limit {
            let (js, names) = (js.clone(), names.clone());
            let next = self.block(async move {
                let stream = Self::events(js, &names, stream_id, replicas).await?;
                let info = stream.get_info().await?;
                let mut at = after.map_or(info.state.first_sequence, |s: u64| s + 1);
                while at <= info.state.last_sequence && info.state.messages > 0 {
                    if let Some(found) = Self::message_at(&stream, at).await? {
                        return Ok(Some((at, found)));
                    }
                    at += 1;
                }
                Ok::<_, BoxError>(None)
            });
            let next = next.map_err(|e| {
                self.error(
                    "visiting the oldest chunks",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let Some((at, located)) = next else {
                return Ok(());
            };
            after = Some(at);
            let damaged = |source| StorageError::CorruptChunk {
                stream_id,
                offset: located.first,
                source,
            };
            for value in message::decode(located.payload.clone())
                .map_err(damaged)?
                .chunks
            {
                let header = ChunkHeader::decode(&value).map_err(damaged)?;
                if header.end_offset() <= floor {
                    continue;
                }
                shown += 1;
                if !visit(header, value.len() as u64) || shown >= limit {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn get_idempotency(
        &self,
        stream_id: u64,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StorageError> {
        self.state_get(
            idempotency_key(stream_id, key),
            "looking up an idempotency key",
        )?
        .map(|value| {
            IdempotencyRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("idempotency record {key:?}"),
                source,
            })
        })
        .transpose()
    }

    fn expired_idempotency(
        &self,
        stream_id: u64,
        cutoff_unix_nanos: i64,
    ) -> Result<Vec<String>, StorageError> {
        Ok(self
            .state_list(
                format!("idem.{stream_id}"),
                "scanning expired idempotency keys",
            )?
            .into_iter()
            .filter(|(_, value)| {
                IdempotencyRecord::decode(value)
                    .map_or(true, |r| r.time_unix_nanos < cutoff_unix_nanos)
            })
            .filter_map(|(key, _)| unhex(key.rsplit('.').next()?))
            .collect())
    }

    fn forget_idempotency(
        &self,
        stream_id: u64,
        keys: &[String],
    ) -> Result<Prepared, StorageError> {
        Ok(Prepared::new(
            Change::Forget {
                keys: keys.iter().map(|k| idempotency_key(stream_id, k)).collect(),
            },
            64 * keys.len(),
        ))
    }

    fn put_consumer(
        &self,
        stream_id: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<Prepared, StorageError> {
        Ok(self.consumer_change(stream_id, name, Some(record.encode())))
    }

    fn delete_consumer(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        Ok(self.consumer_change(stream_id, name, None))
    }

    fn stored_consumer(
        &self,
        stream_id: u64,
        name: &str,
    ) -> Result<Option<ConsumerRecord>, StorageError> {
        let key = format!("consumer.{stream_id}.{}", hex(name));
        // This gateway's own write, prepared and not yet applied, will
        // overwrite what is stored: it is the record.
        let pending = self
            .pending
            .lock()
            .expect("not poisoned")
            .get(&key)
            .map(|(_, value)| value.clone());
        let value = match pending {
            Some(value) => value.map(Bytes::from),
            None => self.state_get(key, "reading a consumer")?,
        };
        let Some(value) = value else {
            return Ok(None);
        };
        ConsumerRecord::decode(&value)
            .map(Some)
            .map_err(|source| StorageError::Corrupt {
                what: format!("consumer {name:?} of stream id {stream_id}"),
                source,
            })
    }

    fn stored_consumers(
        &self,
        stream_id: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StorageError> {
        let mut stored: BTreeMap<String, Option<Bytes>> = self
            .state_list(format!("consumer.{stream_id}"), "listing consumers")?
            .into_iter()
            .map(|(key, value)| (key, Some(value)))
            .collect();
        // As in `stored_consumer`: this gateway's unapplied writes win.
        let prefix = format!("consumer.{stream_id}.");
        for (key, (_, value)) in self.pending.lock().expect("not poisoned").iter() {
            if key.starts_with(&prefix) {
                stored.insert(key.clone(), value.clone().map(Bytes::from));
            }
        }
        let mut consumers = Vec::new();
        for (key, value) in stored {
            let (Some(name), Some(value)) = (key.rsplit('.').next().and_then(unhex), value) else {
                continue;
            };
            let record =
                ConsumerRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                    what: format!("consumer {name:?} of stream id {stream_id}"),
                    source,
                })?;
            consumers.push((name, record));
        }
        consumers.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(consumers)
    }

    fn claim_consumer(&self, stream_id: u64, name: &str) -> Result<u64, StorageError> {
        self.poisoned()?;
        let (state, key, value) = (
            self.state.clone(),
            feed::claim_key(stream_id, &hex(name)),
            feed::claim_value(self.gateway_id, ClaimChange::Taken),
        );
        self.block(async move { state.put(&key, value.into(), Expect::Any).await })
            .map_err(|e| self.error("claiming a consumer's subscription", e))
    }

    fn release_consumer(&self, stream_id: u64, name: &str, claim: u64) {
        let (state, key, value) = (
            self.state.clone(),
            feed::claim_key(stream_id, &hex(name)),
            feed::claim_value(self.gateway_id, ClaimChange::Released),
        );
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                // Only this claim: a newer one (a subscription elsewhere)
                // stays.
                if let Err(e) = state.put(&key, value.into(), Expect::Revision(claim)).await {
                    tracing::debug!(error = %e, %key, "a consumer claim was not released");
                }
            });
        }
    }

    fn remote_changes(&self) -> Option<mpsc::Receiver<RemoteChange>> {
        self.remote_changes.lock().expect("not poisoned").take()
    }

    fn stored_group_names(&self, stream_id: u64) -> Result<Vec<String>, StorageError> {
        let prefix = format!("group.{stream_id}.");
        let mut names: BTreeSet<String> = self
            .state_list(format!("group.{stream_id}"), "listing consumer groups")?
            .into_iter()
            .filter_map(|(key, _)| unhex(key.rsplit('.').next()?))
            .collect();
        // This gateway's writes not applied yet count too.
        for key in self.pending_groups.lock().expect("not poisoned").keys() {
            if let Some(name) = key.strip_prefix(&prefix).and_then(unhex) {
                names.insert(name);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn put_group(
        &self,
        stream_id: u64,
        name: &str,
        record: &GroupRecord,
        slots: Option<&[usize]>,
    ) -> Result<Prepared, StorageError> {
        let key = format!("group.{stream_id}.{}", hex(name));
        let ticket = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        {
            let mut pending = self.pending_groups.lock().expect("not poisoned");
            let entry = pending.entry(key.clone()).or_default();
            entry.ticket = ticket;
            match slots {
                None => {
                    entry.whole = Some(record.clone());
                    entry.slots.clear();
                }
                Some(slots) => {
                    for &slot in slots {
                        if let Some(&offset) = record.committed.get(slot) {
                            entry.slots.insert(slot, offset);
                        }
                    }
                }
            }
        }
        let size = 128 + key.len() + record.committed.len() * 8;
        Ok(Prepared::new(
            Change::Group {
                key,
                record: record.clone(),
                slots: slots.map(<[usize]>::to_vec),
                ticket,
            },
            size,
        ))
    }

    fn delete_group(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        Ok(Prepared::new(
            Change::DeleteGroup {
                stream_id,
                name: name.to_string(),
            },
            128 + name.len(),
        ))
    }

    fn stored_group(
        &self,
        stream_id: u64,
        name: &str,
    ) -> Result<Option<GroupRecord>, StorageError> {
        let key = format!("group.{stream_id}.{}", hex(name));
        let stored = match self.state_get(key.clone(), "reading a consumer group")? {
            Some(value) => {
                Some(
                    GroupRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                        what: format!("group {name:?} of stream id {stream_id}"),
                        source,
                    })?,
                )
            }
            None => None,
        };
        // This gateway's unapplied writes will land over what is stored.
        let pending = self.pending_groups.lock().expect("not poisoned");
        let Some(p) = pending.get(&key) else {
            return Ok(stored);
        };
        let mut record = match (&p.whole, stored) {
            (Some(whole), _) => whole.clone(),
            (None, Some(stored)) => stored,
            (None, None) => return Ok(None),
        };
        for (&slot, &offset) in &p.slots {
            if let Some(committed) = record.committed.get_mut(slot) {
                *committed = offset;
            }
        }
        Ok(Some(record))
    }

    fn join_member(&self, stream_id: u64, group: &str, member: &str) -> Result<u64, StorageError> {
        self.poisoned()?;
        let (state, key, value) = (
            self.state.clone(),
            feed::member_key(stream_id, &hex(group), &hex(member)),
            feed::member_value(self.gateway_id),
        );
        self.block(async move { state.put(&key, value.into(), Expect::Any).await })
            .map_err(|e| self.error("joining a consumer group", e))
    }

    fn stored_member(
        &self,
        stream_id: u64,
        group: &str,
        member: &str,
    ) -> Result<Option<u64>, StorageError> {
        let (state, key) = (
            self.state.clone(),
            feed::member_key(stream_id, &hex(group), &hex(member)),
        );
        self.block(async move { state.get(&key).await })
            .map(|record| record.map(|r| r.revision))
            .map_err(|e| self.error("reading a group member", e))
    }

    fn leave_member(&self, stream_id: u64, group: &str, member: &str, revision: u64) {
        let (state, key) = (
            self.state.clone(),
            feed::member_key(stream_id, &hex(group), &hex(member)),
        );
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                // Only this join: a newer one (elsewhere) stays.
                if let Err(e) = state.delete(&key, Expect::Revision(revision)).await {
                    tracing::debug!(error = %e, %key, "a group member's record was not removed");
                }
            });
        }
    }

    fn forward_group_commit(
        &self,
        stream_id: u64,
        group: &str,
        member: &str,
        next_offset: u64,
    ) -> Result<Option<ForwardedAnswer>, StorageError> {
        let request = encode_forwarded(stream_id, group, member, next_offset);
        let answer = self
            .ask_member_gateway(stream_id, group, member, "commit", request)
            .map_err(|e| StorageError::Engine {
                op: "forwarding a group commit to the member's gateway",
                path: self.options.label.clone(),
                source: e,
            })?;
        Ok(answer.map(|a| ForwardedAnswer::decode(&String::from_utf8_lossy(&a))))
    }

    fn ask_told(
        &self,
        stream_id: u64,
        group: &str,
        member: &str,
    ) -> Result<Option<u64>, StorageError> {
        let request = encode_forwarded(stream_id, group, member, 0);
        let error = |source| StorageError::Engine {
            op: "asking a member's gateway what its client was told",
            path: self.options.label.clone(),
            source,
        };
        let answer = self
            .ask_member_gateway(stream_id, group, member, "told", request)
            .map_err(error)?;
        match answer.as_deref().map(std::str::from_utf8) {
            None | Some(Ok("no-member")) => Ok(None),
            Some(Ok(told)) => told
                .strip_prefix("told ")
                .and_then(|g| g.parse().ok())
                .map(Some)
                .ok_or_else(|| error(format!("an unexpected answer: {told:?}").into())),
            Some(Err(e)) => Err(error(Box::new(e))),
        }
    }

    fn forwarded(&self) -> Option<mpsc::Receiver<Forwarded>> {
        self.forwarded.lock().expect("not poisoned").take()
    }

    fn stored_assignment(
        &self,
        stream_id: u64,
        group: &str,
    ) -> Result<Option<(Assignment, u64)>, StorageError> {
        let (state, key) = (
            self.state.clone(),
            feed::assignment_key(stream_id, &hex(group)),
        );
        let record = self
            .block(async move { state.get(&key).await })
            .map_err(|e| self.error("reading a group's assignment", e))?;
        let Some(record) = record else {
            return Ok(None);
        };
        let assignment = feed::decode_assignment(&record.value).ok_or_else(|| {
            self.error(
                "reading a group's assignment",
                std::io::Error::other(format!("the assignment of group {group:?} is unreadable")),
            )
        })?;
        Ok(Some((assignment, record.revision)))
    }

    fn put_assignment(
        &self,
        stream_id: u64,
        group: &str,
        assignment: &Assignment,
        expected: u64,
    ) -> Result<bool, StorageError> {
        self.poisoned()?;
        let (state, key, value) = (
            self.state.clone(),
            feed::assignment_key(stream_id, &hex(group)),
            feed::encode_assignment(assignment),
        );
        let expect = if expected == 0 {
            Expect::Absent
        } else {
            Expect::Revision(expected)
        };
        match self.block(async move { state.put(&key, value.into(), expect).await }) {
            Ok(_) => Ok(true),
            Err(StateError::Conflict { .. }) => Ok(false),
            Err(e) => Err(self.error("writing a group's assignment", e)),
        }
    }

    fn api_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self
            .state_list("key".into(), "loading API keys")?
            .into_iter()
            .filter_map(|(key, value)| Some((unhex(key.strip_prefix("key.")?)?, value.to_vec())))
            .collect())
    }

    fn put_api_key(&self, id: &str, record: Vec<u8>) -> Result<(), StorageError> {
        self.poisoned()?;
        self.state_put(format!("key.{}", hex(id)), record, "saving an API key")
    }

    fn commit(&self, changes: Vec<Prepared>) -> Result<Option<u64>, StorageError> {
        self.poisoned()?;
        for change in changes {
            let change = change.into_inner::<Change>().ok_or_else(|| {
                self.error(
                    "committing",
                    std::io::Error::other("a change prepared by another engine"),
                )
            })?;
            if let Err(e) = self.apply(change) {
                // As with a failed disk write: what follows may depend on
                // what failed, so nothing more is acknowledged until a
                // restart reloads the truth from the cluster.
                self.poison(&e);
                return Err(e);
            }
        }
        Ok(None)
    }

    fn checkpoint(&self, _covered: u64) -> Result<(), StorageError> {
        Ok(())
    }

    /// One group is one message: the cluster's `max_payload`, less room
    /// for the headers and the message's framing.
    fn max_group_bytes(&self) -> Option<usize> {
        // An atomic read: this runs for every group and batch.
        let payload = self.client.max_payload();
        Some(
            payload
                .saturating_sub(4096 + message::FRAMING_BYTES)
                .max(GROUP_EVENT_OVERHEAD),
        )
    }

    fn shared(&self) -> bool {
        true
    }

    fn remote_heads(&self) -> Option<mpsc::Receiver<RemoteHead>> {
        self.remote_heads.lock().expect("not poisoned").take()
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().expect("not poisoned").clone()
    }

    /// Writes this gateway's probe record once, without retrying: while the
    /// record stream's Raft group has no quorum the write is not answered.
    fn probe(&self) -> Option<String> {
        let js = self.js.clone();
        let subject = format!(
            "{}.state.{}",
            self.names.subjects,
            feed::probe_key(self.gateway_id)
        );
        let answered = self.block(async move {
            let write = async {
                js.publish_with_headers(subject, HeaderMap::new(), Bytes::new())
                    .await?
                    .await
            };
            tokio::time::timeout(PROBE_TIMEOUT, write).await
        });
        match answered {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the NATS cluster refused a probe write: {e}")),
            Err(_) => Some(format!(
                "the NATS cluster did not answer a probe write within {PROBE_TIMEOUT:?} (no quorum?)"
            )),
        }
    }

    fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.options.label
    }
}
