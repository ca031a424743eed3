//! The storage engine on NATS JetStream, for one gateway (cluster mode's
//! second slice; ARCHITECTURE.md, "Cluster mode on JetStream").
//!
//! Events: one JetStream stream per Pullstream stream (`PS_<id>`, subject
//! `ps.ev.<id>`), one message per committed chunk, the chunk encoded as the
//! sled engine stores it, its first offset also in a `Ps-First-Offset`
//! header. Each chunk is published with `Nats-Expected-Last-Sequence` =
//! the stream's last sequence as this engine knows it, so a second writer
//! can never interleave chunks: its publish is refused instead. (Taking
//! the new head from such a refusal, for several gateways, is the next
//! slice; today the refusal fails the commit, and the log refuses writes
//! until a restart, like a failed disk write.) Everything else is a record
//! of the [`StateStore`].
//!
//! The seam is synchronous, and its callers already run commits and reads
//! off the async workers (`block_in_place`). The engine owns a small
//! runtime for the NATS client and hands each operation to it, waiting on
//! a channel, so it can be called from any thread.
//!
//! A change is acknowledged once JetStream acknowledged every message of
//! it, i.e. once a quorum of the stream's replicas has it (nats-server 2.9
//! fsyncs in the background; see the README's durability notes).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::state::{Expect, StateError, StateStore};
use crate::engine::{
    Chunk, ChunkHeader, ConsumerRecord, EncodedChunk, Engine, GroupRecord, IdempotencyRecord, Keep,
    Prepared, StorageError, StoredStream, StreamMeta,
};

/// The header holding a chunk message's first offset.
const FIRST_OFFSET: &str = "Ps-First-Offset";

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
}

/// One change, prepared; see [`Engine`].
enum Change {
    Group {
        stream_id: u64,
        name: String,
        meta: StreamMeta,
        chunks: Vec<EncodedChunk>,
        idempotency: Vec<(String, IdempotencyRecord)>,
    },
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
}

/// What the engine knows of one stream's chunk messages.
#[derive(Debug, Default, Clone)]
struct ChunkIndex {
    /// The sequence of the stream's last message (0: none yet).
    last_seq: u64,
    /// First offsets of chunks seen, by sequence order (a cache: a miss
    /// is a binary search by direct gets).
    seq_of: BTreeMap<u64, u64>,
}

/// How long the health probe's write may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most chunk positions remembered per stream.
const INDEX_ENTRIES: usize = 4096;

/// The engine; see the module docs.
pub struct JetStreamEngine {
    runtime: Option<tokio::runtime::Runtime>,
    js: jetstream::Context,
    state: StateStore,
    options: JetStreamOptions,
    names: Names,
    /// Names this gateway's probe record.
    gateway_id: u64,
    index: Mutex<BTreeMap<u64, ChunkIndex>>,
    failed: Mutex<Option<String>>,
}

impl Drop for JetStreamEngine {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
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
    handles: std::sync::Arc<Mutex<std::collections::HashMap<u64, stream::Stream>>>,
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

    fn events_subject(&self, stream_id: u64) -> String {
        format!("{}.ev.{stream_id}", self.subjects)
    }
}

impl JetStreamEngine {
    /// Connects to the cluster and opens (creating) the record stream.
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
        let names = Names::new(&options.namespace);
        let opened = run_on(&runtime, async move {
            let client = async_nats::ConnectOptions::new()
                .request_timeout(Some(timeout))
                .connect(urls)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            let mut js = jetstream::new(client);
            js.set_timeout(timeout);
            let state = StateStore::open(
                js.clone(),
                &format!("{}_STATE", names.streams),
                &format!("{}.state", names.subjects),
                replicas,
            )
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((js, state))
        });
        let (js, state) = opened.map_err(|source| StorageError::Engine {
            op: "connecting to the NATS cluster (is it running, with JetStream on? check --nats-url)",
            path: options.label.clone(),
            source,
        })?;
        Ok(JetStreamEngine {
            runtime: Some(runtime),
            js,
            state,
            names: Names::new(&options.namespace),
            gateway_id: {
                let mut bytes = [0u8; 8];
                let _ = getrandom::fill(&mut bytes);
                u64::from_le_bytes(bytes)
            },
            options,
            index: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(None),
        })
    }

    /// Runs `f` on the engine's runtime and waits for it.
    fn block<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        run_on(self.runtime.as_ref().expect("open until dropped"), f)
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
    ) -> Result<stream::Stream, Box<dyn std::error::Error + Send + Sync>> {
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

    /// The chunk message at `seq`: its first offset and its bytes (`None`
    /// when there is none, e.g. purged).
    async fn message_at(
        stream: &stream::Stream,
        seq: u64,
    ) -> Result<Option<(u64, Bytes)>, Box<dyn std::error::Error + Send + Sync>> {
        match stream.direct_get(seq).await {
            Ok(message) => {
                let first = message
                    .headers
                    .get(FIRST_OFFSET)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .ok_or("a chunk message without a valid Ps-First-Offset header")?;
                Ok(Some((first, message.payload)))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(Box::new(e)),
        }
    }

    /// The sequence of the chunk holding `offset` (the last chunk starting
    /// at or before it), if any: a binary search over the stream's
    /// sequences by direct gets.
    async fn seq_holding(
        stream: &stream::Stream,
        offset: u64,
    ) -> Result<Option<u64>, Box<dyn std::error::Error + Send + Sync>> {
        let info = stream.get_info().await?;
        let (mut low, mut high) = (info.state.first_sequence, info.state.last_sequence);
        if info.state.messages == 0 {
            return Ok(None);
        }
        let mut found = None;
        while low <= high {
            let middle = low + (high - low) / 2;
            match Self::message_at(stream, middle).await? {
                Some((first, _)) if first <= offset => {
                    found = Some(middle);
                    low = middle + 1;
                }
                Some(_) => {
                    if middle == 0 {
                        break;
                    }
                    high = middle - 1;
                }
                // A hole (purged under us): search above it.
                None => low = middle + 1,
            }
        }
        Ok(found)
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
            Change::Group {
                stream_id,
                name,
                meta,
                chunks,
                idempotency,
            } => {
                let mut last_seq = self
                    .index
                    .lock()
                    .expect("not poisoned")
                    .get(&stream_id)
                    .map_or(0, |i| i.last_seq);
                let published = self.block(async move {
                    let mut placed = Vec::new();
                    for chunk in chunks {
                        let mut headers = HeaderMap::new();
                        headers.insert(FIRST_OFFSET, chunk.first_offset.to_string().as_str());
                        headers
                            .insert("Nats-Expected-Last-Sequence", last_seq.to_string().as_str());
                        // Repeating a chunk whose publish did land is
                        // answered `duplicate` with its sequence.
                        headers.insert(
                            "Nats-Msg-Id",
                            format!("ps-{stream_id}-{}", chunk.first_offset).as_str(),
                        );
                        let ack = super::publish_retrying(
                            &js,
                            names.events_subject(stream_id),
                            headers,
                            Bytes::from(chunk.value),
                        )
                        .await?;
                        last_seq = ack.sequence;
                        placed.push((chunk.first_offset, ack.sequence));
                    }
                    for (key, record) in idempotency {
                        state
                            .put(
                                &format!("idem.{stream_id}.{}", hex(&key)),
                                record.encode().into(),
                                Expect::Any,
                            )
                            .await?;
                    }
                    state
                        .put(
                            &format!("stream.{}", hex(&name)),
                            meta.encode().into(),
                            Expect::Any,
                        )
                        .await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(placed)
                });
                let placed = published.map_err(|e| {
                    self.error("appending chunks", std::io::Error::other(e.to_string()))
                })?;
                let mut index = self.index.lock().expect("not poisoned");
                let entry = index.entry(stream_id).or_default();
                for (first, seq) in placed {
                    entry.last_seq = seq;
                    entry.seq_of.insert(first, seq);
                }
                while entry.seq_of.len() > INDEX_ENTRIES {
                    entry.seq_of.pop_first();
                }
                Ok(())
            }
            Change::Meta { name, meta } => self.state_put(
                format!("stream.{}", hex(&name)),
                meta.encode(),
                "writing stream metadata",
            ),
            Change::Trim { name, meta, below } => {
                let stream_id = meta.id;
                let trimmed = self.block(async move {
                    let stream = Self::events(js, &names, stream_id, replicas).await?;
                    // Remove every chunk starting below `below`: purge up
                    // to the first chunk starting at or after it.
                    if let Some(seq) = Self::seq_holding(&stream, below).await? {
                        let keep_from = match Self::message_at(&stream, seq).await? {
                            Some((first, _)) if first >= below => seq,
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
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                });
                self.index
                    .lock()
                    .expect("not poisoned")
                    .entry(stream_id)
                    .or_default()
                    .seq_of
                    .retain(|first, _| *first >= below);
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
                    for kind in ["idem", "consumer", "group"] {
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
                        Err(e) => {
                            return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                        }
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

/// A prepared write (`Some`) or deletion (`None`) of one record.
fn record_change(key: String, value: Option<Vec<u8>>) -> Prepared {
    let size = 64 + key.len() + value.as_ref().map_or(0, Vec::len);
    Prepared::new(Change::Record { key, value }, size)
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
            let meta = StreamMeta::decode(&value).map_err(|source| StorageError::Corrupt {
                what: format!("metadata of stream {name:?}"),
                source,
            })?;
            let names = self.names.clone();
            let (js, replicas, id) = (self.js.clone(), self.options.replicas, meta.id);
            let found = self.block(async move {
                let stream = Self::events(js, &names, id, replicas).await?;
                let info = stream.get_info().await?;
                let (first, last) = if info.state.messages == 0 {
                    (None, None)
                } else {
                    (
                        Self::message_at(&stream, info.state.first_sequence).await?,
                        Self::message_at(&stream, info.state.last_sequence).await?,
                    )
                };
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                    info.state.last_sequence,
                    first,
                    last,
                ))
            });
            let (last_seq, first, last) = found
                .map_err(|e| self.error("loading streams", std::io::Error::other(e.to_string())))?;
            let header =
                |chunk: &Option<(u64, Bytes)>| -> Result<Option<ChunkHeader>, StorageError> {
                    chunk
                        .as_ref()
                        .map(|(offset, bytes)| {
                            ChunkHeader::decode(bytes).map_err(|source| {
                                StorageError::CorruptChunk {
                                    stream_id: id,
                                    offset: *offset,
                                    source,
                                }
                            })
                        })
                        .transpose()
                };
            let (first, last) = (header(&first)?, header(&last)?);
            // The chunks are the truth for the head: a crash between a
            // chunk's publish and the metadata's leaves the metadata behind.
            let next_offset = last
                .map_or(meta.next_offset, |h| h.first_offset + u64::from(h.count))
                .max(meta.next_offset);
            let first_offset = first
                .map_or(next_offset, |h| h.first_offset)
                .max(meta.offset_floor)
                .min(next_offset);
            self.index.lock().expect("not poisoned").insert(
                id,
                ChunkIndex {
                    last_seq,
                    ..Default::default()
                },
            );
            // Records keyed `<kind>.<stream id>.<name in hex>`.
            let named = |kind: &str| {
                self.state_list(format!("{kind}.{id}"), "loading consumers and groups")
                    .map(|records| {
                        records
                            .into_iter()
                            .filter_map(|(key, value)| {
                                Some((unhex(key.rsplit('.').next()?)?, value))
                            })
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
                let record =
                    GroupRecord::decode(&value).map_err(|source| StorageError::Corrupt {
                        what: format!("group {group:?} of stream {name:?}"),
                        source,
                    })?;
                groups.push((group, record));
            }
            let fence = self
                .state_get(format!("fence.{id}"), "loading a fencing token")?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            streams.push(StoredStream {
                name,
                meta,
                first_offset,
                next_offset,
                last_time_unix_nanos: last.map(|h| h.time_unix_nanos),
                consumers,
                groups,
                fence,
            });
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
            let stream = Self::events(js, &names, id, replicas).await?;
            let info = stream.get_info().await?;
            state.put(&key, value.into(), Expect::Any).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(info.state.last_sequence)
        });
        let last_seq = done
            .map_err(|e| self.error("creating a stream", std::io::Error::other(e.to_string())))?;
        self.index
            .lock()
            .expect("not poisoned")
            .entry(id)
            .or_default()
            .last_seq = last_seq;
        Ok(())
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
        let size = chunks.iter().map(|c| c.value.len()).sum::<usize>() + 64;
        Ok(Prepared::new(
            Change::Group {
                stream_id: meta.id,
                name: name.to_string(),
                meta: *meta,
                chunks,
                idempotency: idempotency
                    .iter()
                    .map(|(k, r)| (k.to_string(), *r))
                    .collect(),
            },
            size,
        ))
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

    fn put_fence(&self, stream_id: u64, token: &str) -> Result<Prepared, StorageError> {
        Ok(record_change(
            format!("fence.{stream_id}"),
            (!token.is_empty()).then(|| token.as_bytes().to_vec()),
        ))
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
        let cached = {
            let index = self.index.lock().expect("not poisoned");
            index
                .get(&stream_id)
                .and_then(|i| i.seq_of.range(..=offset).next_back().map(|(_, s)| *s))
        };
        let names = self.names.clone();
        let (js, replicas) = (self.js.clone(), self.options.replicas);
        // The raw chunks first (on the engine's runtime); decoding, which
        // borrows `keep`, on this thread.
        let raw = self.block(async move {
            let stream = Self::events(js, &names, stream_id, replicas).await?;
            let start = match cached {
                Some(seq) => Some(seq),
                None => Self::seq_holding(&stream, offset).await?,
            };
            let Some(mut seq) = start else {
                return Ok(Vec::new());
            };
            let last = stream.get_info().await?.state.last_sequence;
            let (mut events, mut bytes, mut raw) = (0usize, 0usize, Vec::new());
            // The cache can point at a chunk well before `offset` (only
            // some chunks are remembered): chunks that end at or before
            // it are skipped, and after a few, a search takes over.
            let mut skipped = 0;
            while seq <= last {
                let Some((first, value)) = Self::message_at(&stream, seq).await? else {
                    seq += 1;
                    continue;
                };
                if first >= end {
                    break;
                }
                let count = ChunkHeader::decode(&value).map_or(0, |h| h.count as u64);
                if first + count <= offset && count > 0 {
                    skipped += 1;
                    seq = if skipped > 4 {
                        skipped = 0;
                        match Self::seq_holding(&stream, offset).await? {
                            Some(found) if found > seq => found,
                            _ => seq + 1,
                        }
                    } else {
                        seq + 1
                    };
                    continue;
                }
                bytes += value.len();
                events += (first + count).saturating_sub(offset.max(first)) as usize;
                raw.push((first, seq, value));
                seq += 1;
                if events >= max_events || bytes >= max_bytes {
                    break;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(raw)
        });
        let raw =
            raw.map_err(|e| self.error("reading chunks", std::io::Error::other(e.to_string())))?;
        let mut chunks = Vec::with_capacity(raw.len());
        {
            let mut index = self.index.lock().expect("not poisoned");
            let entry = index.entry(stream_id).or_default();
            for (first, seq, _) in &raw {
                entry.seq_of.insert(*first, *seq);
            }
            while entry.seq_of.len() > INDEX_ENTRIES {
                entry.seq_of.pop_first();
            }
        }
        for (first, _, value) in raw {
            let chunk =
                Chunk::decode_where(value, keep).map_err(|source| StorageError::CorruptChunk {
                    stream_id,
                    offset: first,
                    source,
                })?;
            if chunk.first_offset != first {
                return Err(self.error(
                    "reading chunks",
                    std::io::Error::other(format!(
                        "the chunk message for offset {first} holds offset {}",
                        chunk.first_offset
                    )),
                ));
            }
            chunks.push(chunk);
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
        let mut seq = None;
        for _ in 0..limit {
            let (js, from, names) = (js.clone(), seq, names.clone());
            let next = self.block(async move {
                let stream = Self::events(js, &names, stream_id, replicas).await?;
                let info = stream.get_info().await?;
                let mut at = from.map_or(info.state.first_sequence, |s: u64| s + 1);
                while at <= info.state.last_sequence && info.state.messages > 0 {
                    if let Some(found) = Self::message_at(&stream, at).await? {
                        return Ok(Some((at, found)));
                    }
                    at += 1;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(None)
            });
            let next = next.map_err(|e| {
                self.error(
                    "visiting the oldest chunks",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let Some((at, (first, value))) = next else {
                return Ok(());
            };
            seq = Some(at);
            let header =
                ChunkHeader::decode(&value).map_err(|source| StorageError::CorruptChunk {
                    stream_id,
                    offset: first,
                    source,
                })?;
            if !visit(header, value.len() as u64) {
                break;
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
            format!("idem.{stream_id}.{}", hex(key)),
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
                keys: keys
                    .iter()
                    .map(|k| format!("idem.{stream_id}.{}", hex(k)))
                    .collect(),
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
        Ok(record_change(
            format!("consumer.{stream_id}.{}", hex(name)),
            Some(record.encode()),
        ))
    }

    fn delete_consumer(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        Ok(record_change(
            format!("consumer.{stream_id}.{}", hex(name)),
            None,
        ))
    }

    fn put_group(
        &self,
        stream_id: u64,
        name: &str,
        record: &GroupRecord,
    ) -> Result<Prepared, StorageError> {
        Ok(record_change(
            format!("group.{stream_id}.{}", hex(name)),
            Some(record.encode()),
        ))
    }

    fn delete_group(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError> {
        Ok(record_change(
            format!("group.{stream_id}.{}", hex(name)),
            None,
        ))
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
                *self.failed.lock().expect("not poisoned") = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(None)
    }

    fn checkpoint(&self, _covered: u64) -> Result<(), StorageError> {
        Ok(())
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().expect("not poisoned").clone()
    }

    /// Writes this gateway's probe record once, without retrying: while the
    /// record stream's Raft group has no quorum the write is not answered.
    fn probe(&self) -> Option<String> {
        let js = self.js.clone();
        let subject = format!("{}.state.probe.{}", self.names.subjects, self.gateway_id);
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
