//! The log: named, ordered, durable streams on top of [`Store`], with live
//! tail for subscribers.
//!
//! Each stream has one [`writer`] task (the only place offsets are
//! assigned), a committed-head `watch` channel that subscribers wait on,
//! and a [`cache`] of recently committed chunks. Appends flow
//! writer → store → [`commit`] (one sync for many appends) → publish: the
//! head moves, the cache fills, callers are acknowledged. Readers never see
//! past the committed head, so they never see an event that is not yet
//! durable under the durability mode.

mod cache;
mod command;
mod commit;
mod consumer;
mod filter;
mod group;
mod housekeeping;
mod subscription;
mod validate;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use command::ConsumerSettings;
pub use consumer::{validate_consumer_name, validate_version_label, ConsumerInfo, ConsumerLease};
pub use filter::{EventFilter, TypePattern};
pub use group::{slot_of, GroupCursor, GroupInfo, GroupMemberInfo, GroupUpdate, SLOT_COUNT};
pub use subscription::{StartAt, Subscription};

use crate::config::{Durability, ServerConfig};
pub use crate::engine::Retention;
use crate::engine::{Chunk, Engine, EventRecord, StorageError, StoredStream, StreamMeta};
use crate::error::Error;
use crate::metrics::{Metrics, StreamMetrics, StreamSnapshot, WriteRefusal};
use crate::storage::{Store, StoreOptions};
use cache::{CacheBudget, SharedReads, TailCache};
use command::{AppendJob, WriterCommand};
use commit::Committer;
use consumer::ConsumerState;
use housekeeping::{expire_idempotency_keys, housekeeping};
use validate::{check_offset, validate_event_fields, validate_retention, validate_stored_name};
pub use validate::{
    validate_stream_name, MAX_EVENT_FIELD_LEN, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE_LEN,
};
use writer::Writer;

/// How many Append calls may queue for one stream's writer before callers
/// wait (backpressure on producers, bounded memory).
const WRITER_QUEUE: usize = 1024;

/// How many bytes of decoded chunks a stream keeps for its consumer-group
/// members to share (see `cache::SharedReads`).
const SHARED_READS_BYTES: usize = 4 << 20;

/// How often the housekeeping task trims streams to their retention
/// policies and samples append rates.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

/// The window append rates are averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The shortest `max_age` a retention policy may have.
pub const MIN_RETENTION_AGE: Duration = Duration::from_secs(1);

/// The smallest `max_bytes` a retention policy may have (a stream keeps at
/// least its newest chunk anyway).
pub const MIN_RETENTION_BYTES: u64 = 1 << 20;

/// The longest stream name.
pub const MAX_STREAM_NAME_LEN: usize = 200;

/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// The log's settings (a subset of the server's).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The data dir.
    pub data_dir: PathBuf,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// Per-stream tail cache size in bytes.
    pub tail_cache_bytes: usize,
    /// Memory for every stream's caches together.
    pub stream_cache_budget_bytes: usize,
    /// Largest event in bytes (all fields).
    pub max_event_bytes: usize,
    /// Most events in one Append.
    pub max_batch_events: usize,
    /// Largest Append in bytes.
    pub max_batch_bytes: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// Whether Append creates missing streams.
    pub auto_create_streams: bool,
    /// The write-ahead log size that triggers a checkpoint.
    pub checkpoint_bytes: u64,
    /// fsync mode: storage's background flush period, if any.
    pub storage_flush_interval: Option<Duration>,
    /// The free-space floor (`None`: the default for the volume).
    pub min_free_bytes: Option<u64>,
    /// Check every stored event before opening (`--verify-on-start`).
    pub verify_on_start: bool,
    /// Faults to inject under the log (tests only).
    pub faults: Option<Arc<crate::durability::fault::Faults>>,
    /// The wall clock.
    pub clock: crate::clock::Clock,
    /// Caps on what clients can create.
    pub limits: Limits,
    /// Bytes of written changes that may wait for a sync at once.
    pub commit_queue_bytes: usize,
    /// Label metrics by stream, consumer and group names.
    pub metrics_stream_labels: bool,
}

/// Caps on what clients can create, each answered RESOURCE_EXHAUSTED when
/// reached (and nothing changed).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams per tenant (`--max-streams`).
    pub max_streams: usize,
    /// Durable consumers per stream (`--max-consumers-per-stream`).
    pub max_consumers_per_stream: usize,
    /// Consumer groups per stream (`--max-groups-per-stream`).
    pub max_groups_per_stream: usize,
    /// Members connected to one group at once (`--max-members-per-group`).
    pub max_members_per_group: usize,
}

impl From<&ServerConfig> for LogConfig {
    fn from(c: &ServerConfig) -> LogConfig {
        LogConfig {
            data_dir: c.data_dir.clone(),
            durability: c.durability,
            cache_bytes: c.cache_bytes,
            tail_cache_bytes: c.tail_cache_bytes,
            stream_cache_budget_bytes: c.stream_cache_budget_bytes,
            max_event_bytes: c.max_event_bytes,
            max_batch_events: c.max_batch_events,
            max_batch_bytes: c.max_batch_bytes,
            idempotency_window: c.idempotency_window,
            auto_create_streams: c.auto_create_streams,
            checkpoint_bytes: c.checkpoint_bytes,
            storage_flush_interval: c.storage_flush_interval,
            min_free_bytes: c.min_free_bytes,
            verify_on_start: c.verify_on_start,
            faults: c.faults.clone(),
            clock: c.clock.clone(),
            limits: Limits {
                max_streams: c.max_streams,
                max_consumers_per_stream: c.max_consumers_per_stream,
                max_groups_per_stream: c.max_groups_per_stream,
                max_members_per_group: c.max_members_per_group,
            },
            metrics_stream_labels: c.metrics_stream_labels,
            commit_queue_bytes: c.commit_queue_bytes,
        }
    }
}

/// A batch to append.
#[derive(Debug, Clone, Default)]
pub struct AppendBatch {
    /// The events, in order.
    pub events: Vec<EventRecord>,
    /// Optimistic concurrency check.
    pub expected_next_offset: Option<u64>,
    /// Makes retries safe; empty means none.
    pub idempotency_key: String,
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The batch's first offset.
    pub first_offset: u64,
    /// How many events it holds.
    pub count: u32,
    /// Its append time, nanoseconds since the Unix epoch.
    pub time_unix_nanos: i64,
    /// True when this repeats an earlier append with the same key.
    pub duplicate: bool,
}

/// A stream's committed bounds, as subscribers see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The first retained offset.
    pub first_offset: u64,
    /// The offset the next committed event gets.
    pub next_offset: u64,
    /// Set once the stream is deleted.
    pub deleted: bool,
}

/// A description of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The name.
    pub name: String,
    /// The first retained offset.
    pub first_offset: u64,
    /// The head.
    pub next_offset: u64,
    /// Approximate stored bytes.
    pub approximate_bytes: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// How long the stream keeps events.
    pub retention: Retention,
}

/// Events read from one chunk: `chunk.records[start..end]`, or with a
/// filter only the `picked` ones among them.
#[derive(Debug, Clone)]
pub struct EventSlice {
    /// The chunk holding the events (shared with the cache: no copy).
    pub chunk: Arc<Chunk>,
    /// Index of the first event examined in the chunk.
    pub start: usize,
    /// Index after the last event examined.
    pub end: usize,
    /// With a filter: the indexes of the events that passed it.
    pub picked: Option<Vec<u32>>,
}

impl EventSlice {
    /// The delivered events with their offsets.
    pub fn events(&self) -> Box<dyn Iterator<Item = (u64, &EventRecord)> + '_> {
        let first = self.chunk.first_offset;
        let records = &self.chunk.records;
        match &self.picked {
            None => Box::new((self.start..self.end).map(move |i| (first + i as u64, &records[i]))),
            Some(picked) => Box::new(
                picked
                    .iter()
                    .map(move |&i| (first + u64::from(i), &records[i as usize])),
            ),
        }
    }

    /// The number of delivered events.
    pub fn len(&self) -> usize {
        match &self.picked {
            None => self.end - self.start,
            Some(picked) => picked.len(),
        }
    }

    /// Whether it delivers no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most events one read examines when a filter skips them, so a poll
/// over a long stretch of non-matching events still returns promptly (with
/// the cursor moved).
const MAX_SCAN_EVENTS: u64 = 100_000;

/// A page of events read from a stream.
#[derive(Debug, Clone)]
pub struct ReadPage {
    /// The events, as slices of chunks, in offset order.
    pub slices: Vec<EventSlice>,
    /// The offset to read from next.
    pub next_offset: u64,
    /// The stream's committed head when read.
    pub head_offset: u64,
}

/// State of a stream shared by its writer, the committer and readers.
pub(crate) struct StreamShared {
    /// The committed head; subscribers at the head wait for it to change.
    head_tx: watch::Sender<Head>,
    /// Recently committed chunks, so live readers skip storage.
    cache: Mutex<TailCache>,
    /// Approximate stored bytes.
    bytes: AtomicU64,
    /// Durable consumers by name. Changed by the writer; held briefly.
    consumers: Mutex<BTreeMap<String, ConsumerState>>,
    /// Numbers consumer leases.
    leases: AtomicU64,
    /// The retention policy (the writer owns the durable copy).
    retention: Mutex<Retention>,
    /// Recent (time, head) samples, oldest first, for the append rate.
    rate_samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The stream's counters.
    metrics: StreamMetrics,
    /// Consumer groups by name. Changed by the writer (committed offsets)
    /// and by members joining and leaving; held briefly.
    groups: Mutex<BTreeMap<String, group::GroupState>>,
    /// Chunks read from storage lately, shared by group members.
    shared_reads: Mutex<SharedReads>,
    /// The server's metrics (for data loss).
    server_metrics: Arc<Metrics>,
    /// Damaged ranges found by reads (first offset → end, when known),
    /// each logged and counted once.
    damage_seen: Mutex<BTreeMap<u64, Option<u64>>>,
}

impl StreamShared {
    /// The shared state of a stream as storage holds it: its head in
    /// `head_tx`, its consumers and groups from `stored`.
    pub(crate) fn new(
        head_tx: watch::Sender<Head>,
        stored: &StoredStream,
        cache: TailCache,
        shared_reads: SharedReads,
        metrics: &Arc<Metrics>,
    ) -> StreamShared {
        StreamShared {
            head_tx,
            cache: Mutex::new(cache),
            bytes: AtomicU64::new(stored.meta.bytes),
            consumers: Mutex::new(
                stored
                    .consumers
                    .iter()
                    .map(|(name, record)| (name.clone(), ConsumerState::new(record.clone())))
                    .collect(),
            ),
            leases: AtomicU64::new(0),
            retention: Mutex::new(stored.meta.retention),
            rate_samples: Mutex::new(VecDeque::from([(Instant::now(), stored.next_offset)])),
            metrics: metrics.stream(&stored.name),
            server_metrics: metrics.clone(),
            shared_reads: Mutex::new(shared_reads),
            damage_seen: Mutex::new(Default::default()),
            groups: Mutex::new(
                stored
                    .groups
                    .iter()
                    .map(|(name, record)| (name.clone(), group::GroupState::new(record.clone())))
                    .collect(),
            ),
        }
    }

    fn publish(&self, chunks: Vec<(Arc<Chunk>, usize)>, next_offset: u64) {
        if !chunks.is_empty() {
            let mut cache = self.cache.lock().expect("tail cache lock");
            for (chunk, size) in chunks {
                self.metrics.appended_bytes.inc_by(size as u64);
                cache.push(chunk, size);
            }
        }
        self.head_tx.send_if_modified(|head| {
            let moved = head.next_offset != next_offset;
            self.metrics
                .appended_events
                .inc_by(next_offset.saturating_sub(head.next_offset));
            head.next_offset = next_offset;
            moved
        });
    }

    fn mark_deleted(&self) {
        self.head_tx.send_modify(|head| head.deleted = true);
        // The consumers go with the stream. Their subscriptions end through
        // the head (NOT_FOUND, as for any subscriber), not through their
        // leases (which would say ABORTED).
        self.consumers.lock().expect("consumers lock").clear();
    }

    /// Whether any consumer group of the stream has a member connected.
    fn has_group_members(&self) -> bool {
        self.groups
            .lock()
            .expect("groups lock")
            .values()
            .any(group::GroupState::has_members)
    }

    /// Publishes a trim: readers below `first_offset` now get OUT_OF_RANGE.
    fn trim_to(&self, first_offset: u64) {
        self.shared_reads
            .lock()
            .expect("shared reads lock")
            .forget_below(first_offset);
        self.head_tx.send_if_modified(|head| {
            let moved = first_offset > head.first_offset;
            self.metrics
                .trimmed_events
                .inc_by(first_offset.saturating_sub(head.first_offset));
            head.first_offset = head.first_offset.max(first_offset);
            moved
        });
    }

    /// Records the head for the append rate, forgetting samples older than
    /// the window.
    fn sample_rate(&self, now: Instant) {
        let head = self.head().next_offset;
        let mut samples = self.rate_samples.lock().expect("rate lock");
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
        samples.push_back((now, head));
    }

    /// Events appended per second from the oldest sample in the window
    /// (about a minute ago, or the stream's start) until now.
    fn append_rate(&self) -> f64 {
        let head = self.head().next_offset;
        let samples = self.rate_samples.lock().expect("rate lock");
        match samples.front() {
            Some((t0, h0)) if t0.elapsed() > Duration::from_millis(10) => {
                head.saturating_sub(*h0) as f64 / t0.elapsed().as_secs_f64()
            }
            _ => 0.0,
        }
    }

    fn set_bytes(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    fn head(&self) -> Head {
        *self.head_tx.borrow()
    }
}

/// A stream in the registry.
pub(crate) struct Stream {
    name: String,
    meta: StreamMeta,
    /// The queue to the stream's single writer.
    writer_tx: mpsc::Sender<WriterCommand>,
    shared: Arc<StreamShared>,
}

impl Stream {
    /// The error for events lost in storage from `first` on: logged and
    /// counted the first time each range is found.
    fn lost(&self, first: u64, end: Option<u64>) -> Error {
        let error = Error::DataLoss {
            stream: self.name.clone(),
            first,
            end,
        };
        let new = self
            .shared
            .damage_seen
            .lock()
            .expect("damage lock")
            .insert(first, end)
            .is_none();
        if new {
            self.shared.server_metrics.data_loss.inc();
            error!(stream = %self.name, first, ?end, "data loss: retained events are damaged or missing in storage");
        }
        error
    }

    fn info(&self) -> StreamInfo {
        let head = self.shared.head();
        StreamInfo {
            name: self.name.clone(),
            first_offset: head.first_offset,
            next_offset: head.next_offset,
            approximate_bytes: self.shared.bytes.load(Ordering::Relaxed),
            created_unix_nanos: self.meta.created_unix_nanos,
            retention: *self.shared.retention.lock().expect("retention lock"),
        }
    }

    /// Reads committed events from `offset` up to `end`: at most
    /// `max_events` passing `filter` and about `max_bytes` of them (always
    /// at least one when any is available), examining at most
    /// [`MAX_SCAN_EVENTS`]. Returns the slices and how many events were
    /// examined (the cursor's advance). Serves from `leftover` (a chunk the
    /// caller's previous read did not finish), then the tail cache, then
    /// storage; leaves in `leftover` the last chunk if this read did not
    /// finish it, so a reader decodes each stored chunk once.
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        engine: &dyn Engine,
        offset: u64,
        end: u64,
        max_events: usize,
        max_bytes: usize,
        filter: &EventFilter,
        select: Option<Select<'_>>,
        leftover: &mut Option<Arc<Chunk>>,
    ) -> Result<(Vec<EventSlice>, u64), Error> {
        let type_filtered = !filter.is_empty();
        // Events pass a filter or a group member's selection: count only
        // those towards the limits, and scan further for them.
        let filtered = type_filtered || select.is_some();
        // Group members read the same stretches at about the same time:
        // they share what one of them read from storage (whole chunks only,
        // so not with a type filter, which decodes chunks partly). Asked
        // only when the tail cache misses, off the live-tail path.
        let share = || !type_filtered && self.shared.has_group_members();
        let matches = |t: &[u8], k: &[u8]| filter.matches_parts(t, k);
        let keep: crate::engine::Keep<'_> = &matches;
        let mut slices = Vec::new();
        let mut position = offset;
        let mut events = 0;
        let mut bytes = 0;
        let more = |position: u64, events: usize, bytes: usize| {
            position < end
                && events < max_events
                && bytes < max_bytes
                && position - offset < MAX_SCAN_EVENTS
        };
        while more(position, events, bytes) {
            let unfinished = leftover.take().filter(|c| c.contains(position));
            let cached = match unfinished {
                Some(chunk) => Some(vec![chunk]),
                None => self
                    .shared
                    .cache
                    .lock()
                    .expect("tail cache lock")
                    .chunks_from(position, 64),
            };
            let sharing = cached.is_none() && share();
            let cached = match cached {
                None if sharing => self
                    .shared
                    .shared_reads
                    .lock()
                    .expect("shared reads lock")
                    .chunks_from(position, 64),
                other => other,
            };
            let chunks = match cached {
                Some(chunks) => chunks,
                None => {
                    let read = engine
                        .read_chunks(
                            self.meta.id,
                            position,
                            end,
                            if filtered {
                                usize::MAX
                            } else {
                                max_events - events
                            },
                            if filtered {
                                MAX_SCAN_BYTES
                            } else {
                                max_bytes.saturating_sub(bytes)
                            },
                            // Decode only what the filter passes.
                            type_filtered.then_some(keep),
                        )
                        .map_err(|e| match e {
                            // The damage starts where the chunk does.
                            StorageError::CorruptChunk { offset, .. } => self.lost(offset, None),
                            other => other.into(),
                        });
                    let chunks: Vec<Arc<Chunk>> = match read {
                        Ok(chunks) => chunks.into_iter().map(Arc::new).collect(),
                        // Serve what came before; the next read gets it.
                        Err(_) if !slices.is_empty() => break,
                        Err(e) => return Err(e),
                    };
                    if sharing {
                        self.shared
                            .shared_reads
                            .lock()
                            .expect("shared reads lock")
                            .insert(&chunks);
                    }
                    chunks
                }
            };
            let before = position;
            let mut hole_end = None;
            for chunk in chunks {
                if !chunk.contains(position) {
                    // A hole where committed events should be: retention
                    // removed them under us, or storage lost them. Never
                    // skip silently.
                    hole_end = Some(chunk.first_offset);
                    break;
                }
                let start = (position - chunk.first_offset) as usize;
                let mut stop = start;
                let mut picked = filtered.then(Vec::new);
                while stop < chunk.records.len() && more(position, events, bytes) {
                    let record = &chunk.records[stop];
                    let pass = match &mut picked {
                        None => true,
                        Some(picked) => {
                            let offset = chunk.first_offset + stop as u64;
                            let pass = filter.matches(record)
                                && select.is_none_or(|select| select(offset, record));
                            if pass {
                                picked.push(stop as u32);
                            }
                            pass
                        }
                    };
                    if pass {
                        bytes += record.encoded_len();
                        events += 1;
                    }
                    stop += 1;
                    position += 1;
                }
                if stop < chunk.records.len() {
                    *leftover = Some(chunk.clone());
                }
                if picked.as_ref().is_none_or(|p| !p.is_empty()) {
                    slices.push(EventSlice {
                        chunk,
                        start,
                        end: stop,
                        picked,
                    });
                }
                if !more(position, events, bytes) {
                    break;
                }
            }
            if position == before && !slices.is_empty() {
                // Serve what came before the hole; the next read, starting
                // at it, gets the error.
                break;
            }
            if position == before {
                let first = self.shared.head().first_offset;
                if position >= first {
                    // Retention did not remove it: it is lost.
                    return Err(self.lost(position, Some(hole_end.unwrap_or(end))));
                }
                return Err(Error::OffsetTrimmed {
                    stream: self.name.clone(),
                    offset: position,
                    first,
                });
            }
        }
        Ok((slices, position - offset))
    }
}

/// A group member's choice of events: by offset and record.
pub(crate) type Select<'a> = &'a dyn Fn(u64, &EventRecord) -> bool;

/// How many bytes of chunks one storage read takes when a filter is on
/// (without one, the read stops at the events wanted).
const MAX_SCAN_BYTES: usize = 1 << 20;

/// The set of streams.
pub struct Log {
    engine: Arc<dyn Engine>,
    config: LogConfig,
    /// Taken on close, so no stream can start after it.
    committer: Mutex<Option<Committer>>,
    /// The registry, in name order (for paginated listing). Held briefly;
    /// never across an await or a disk sync.
    streams: RwLock<BTreeMap<String, Arc<Stream>>>,
    /// Serializes stream creation (whose metadata write waits for a disk
    /// sync) without holding the registry lock every call takes.
    creating: Mutex<()>,
    /// What every stream's tail cache and shared reads draw on.
    cache_budget: CacheBudget,
    /// Appends and creations are refused below this many free bytes under
    /// the data dir (0: no floor). Read on every Append: one `statvfs`
    /// (about a microsecond) against an append's ~0.5 ms, and never stale,
    /// so refusal and resumption follow the disk at once.
    min_free_bytes: u64,
    /// Writers and housekeeping, awaited on close.
    tasks: TaskTracker,
    /// Stops housekeeping on close.
    closing: CancellationToken,
    /// When the log opened (the server's start), for uptime.
    opened: (Instant, i64),
    metrics: Arc<Metrics>,
}

impl Log {
    /// Opens the store and starts a writer per stream.
    pub async fn open(config: LogConfig) -> Result<Arc<Log>, Error> {
        let options = StoreOptions {
            path: config.data_dir.clone(),
            cache_bytes: config.cache_bytes,
            // In fsync mode the write-ahead log makes appends durable, and
            // sled's own flush only keeps checkpoints small: flushing all
            // of a checkpoint's pages at once competes with the log's
            // fdatasync for the disk (append p99 7.5 ms against 4.7-5.2 ms
            // with a 20 ms background flush, README Performance).
            background_flush_ms: match config.durability {
                Durability::Fsync => config
                    .storage_flush_interval
                    .map(|d| d.as_millis().max(1) as u64),
                Durability::Buffered => Some(5),
            },
            write_ahead_log: config.durability == Durability::Fsync,
            checkpoint_bytes: config.checkpoint_bytes,
            faults: config.faults.clone(),
        };
        let verify = config.verify_on_start;
        let (store, stored) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&options)?;
            let stored = store.load_streams()?;
            if verify {
                let started = Instant::now();
                let checks = store.verify(|_| {})?;
                let damage: Vec<String> = checks
                    .iter()
                    .flat_map(|c| {
                        c.damage.iter().map(move |d| {
                            format!(
                                "stream {:?} offsets {}..{}: {}",
                                c.name,
                                d.first,
                                d.end.map_or("?".into(), |e| e.to_string()),
                                d.reason
                            )
                        })
                    })
                    .collect();
                if !damage.is_empty() {
                    return Err(Error::VerifyFailed(damage.join("; ")));
                }
                info!(
                    streams = checks.len(),
                    chunks = checks.iter().map(|c| c.chunks).sum::<u64>(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "verified every stored event"
                );
            }
            Ok::<_, Error>((store, stored))
        })
        .await
        .map_err(|e| Error::StorageFailed(e.to_string()))??;
        let engine: Arc<dyn Engine> = Arc::new(store);
        let tasks = TaskTracker::new();
        let closing = CancellationToken::new();
        let metrics = Arc::new(Metrics::new(config.metrics_stream_labels));
        let cache_budget = CacheBudget::new(config.stream_cache_budget_bytes);
        let opened = (Instant::now(), config.clock.now_unix_nanos());
        let committer = Committer::start(
            engine.clone(),
            config.durability,
            config.commit_queue_bytes,
            metrics.clone(),
        );
        let min_free_bytes = config
            .min_free_bytes
            .unwrap_or_else(|| crate::durability::space::default_floor(&config.data_dir));
        let log = Arc::new(Log {
            engine,
            config,
            committer: Mutex::new(Some(committer)),
            streams: RwLock::new(BTreeMap::new()),
            creating: Mutex::new(()),
            cache_budget,
            min_free_bytes,
            tasks,
            closing,
            opened,
            metrics,
        });
        {
            let mut streams = log.streams.write().expect("registry lock");
            for s in stored {
                let stream = log.start_stream(s)?;
                streams.insert(stream.name.clone(), stream);
            }
        }
        log.tasks.spawn(expire_idempotency_keys(log.clone()));
        log.tasks.spawn(housekeeping(log.clone()));
        info!(path = %log.engine.path().display(), streams = log.streams.read().expect("registry lock").len(), "storage open");
        Ok(log)
    }

    fn start_stream(&self, stored: StoredStream) -> Result<Arc<Stream>, Error> {
        let committer = self
            .committer
            .lock()
            .expect("committer lock")
            .clone()
            .ok_or(Error::ShuttingDown)?;
        let (head_tx, _) = watch::channel(Head {
            first_offset: stored.first_offset,
            next_offset: stored.next_offset,
            deleted: false,
        });
        let shared = Arc::new(StreamShared::new(
            head_tx,
            &stored,
            TailCache::new(self.config.tail_cache_bytes, self.cache_budget.clone()),
            SharedReads::new(SHARED_READS_BYTES, self.cache_budget.clone()),
            &self.metrics,
        ));
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
        let writer = Writer {
            engine: self.engine.clone(),
            committer,
            shared: shared.clone(),
            name: stored.name.clone(),
            meta: stored.meta,
            next_offset: stored.next_offset,
            last_time_unix_nanos: stored.last_time_unix_nanos.unwrap_or(i64::MIN),
            idempotency_window: self.config.idempotency_window,
            limits: self.config.limits,
            clock: self.config.clock.clone(),
            unpublished_keys: Vec::new(),
            closing: self.closing.clone(),
        };
        self.tasks.spawn(writer.run(writer_rx));
        Ok(Arc::new(Stream {
            name: stored.name,
            meta: stored.meta,
            writer_tx,
            shared,
        }))
    }

    fn get(&self, name: &str) -> Result<Arc<Stream>, Error> {
        validate_stored_name(name)?;
        self.streams
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::StreamNotFound(name.to_string()))
    }

    /// Returns the stream, creating it when `create` is set and it is missing.
    /// The second value says whether it was created.
    fn get_or_create(
        &self,
        name: &str,
        create: bool,
        retention: Retention,
    ) -> Result<(Arc<Stream>, bool), Error> {
        validate_stored_name(name)?;
        if let Ok(stream) = self.get(name) {
            return Ok((stream, false));
        }
        if !create {
            return Err(Error::StreamNotFound(name.to_string()));
        }
        let _creating = self.creating.lock().expect("creation lock");
        if let Some(stream) = self.streams.read().expect("registry lock").get(name) {
            return Ok((stream.clone(), false));
        }
        self.check_free_space()?;
        self.check_stream_count(name)?;
        let meta = StreamMeta {
            id: self.engine.new_stream_id()?,
            created_unix_nanos: self.now(),
            offset_floor: 0,
            next_offset: 0,
            bytes: 0,
            retention,
        };
        self.engine.put_stream(name, &meta)?;
        let stream = self.start_stream(StoredStream {
            name: name.to_string(),
            meta,
            first_offset: 0,
            next_offset: 0,
            last_time_unix_nanos: None,
            consumers: Vec::new(),
            groups: Vec::new(),
        })?;
        self.streams
            .write()
            .expect("registry lock")
            .insert(name.to_string(), stream.clone());
        Ok((stream, true))
    }

    /// Refuses a new stream when its tenant has `--max-streams` already.
    /// Called under the creation lock, so two creations cannot both pass.
    fn check_stream_count(&self, name: &str) -> Result<(), Error> {
        let tenant = crate::names::tenant_of(name);
        let max = self.config.limits.max_streams;
        let count = self
            .streams
            .read()
            .expect("registry lock")
            .keys()
            .filter(|n| crate::names::tenant_of(n) == tenant)
            .count();
        if count >= max {
            return Err(Error::ResourceExhausted(format!(
                "the tenant already has {count} streams, the most allowed (--max-streams {max}): delete streams it no longer needs"
            )));
        }
        Ok(())
    }

    /// Refuses a write that would grow the data dir while the free space
    /// under it is below the floor (see [`crate::durability::space`]).
    fn check_free_space(&self) -> Result<(), Error> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        match crate::durability::space::free_bytes(&self.config.data_dir) {
            Some(free) if free < self.min_free_bytes => Err(Error::DiskFull {
                dir: self.config.data_dir.display().to_string(),
                free,
                floor: self.min_free_bytes,
            }),
            _ => Ok(()),
        }
    }

    /// The time now by the configured clock, in nanoseconds since the Unix
    /// epoch.
    pub fn now(&self) -> i64 {
        self.config.clock.now_unix_nanos()
    }

    /// Whether writes are refused right now, and why: a failed write or
    /// sync (until a restart), or the free space below the floor.
    pub fn write_refusal(&self) -> WriteRefusal {
        match self.engine.failure() {
            Some(reason) => WriteRefusal {
                reason: Some(format!(
                    "storage failed ({reason}): every write is refused until the server is restarted"
                )),
                storage_failed: true,
            },
            None => WriteRefusal {
                reason: self.check_free_space().err().map(|e| e.to_string()),
                storage_failed: false,
            },
        }
    }

    /// Appends a batch atomically; returns once it is durable under the
    /// durability mode.
    pub async fn append(&self, stream: &str, batch: AppendBatch) -> Result<AppendOutcome, Error> {
        let started = Instant::now();
        let outcome = self.append_timed(stream, batch).await;
        self.metrics.observe_append(started.elapsed());
        outcome
    }

    async fn append_timed(&self, stream: &str, batch: AppendBatch) -> Result<AppendOutcome, Error> {
        self.validate_batch(&batch)?;
        self.check_free_space()?;
        let (stream, _) = self.get_or_create(
            stream,
            self.config.auto_create_streams,
            Retention::default(),
        )?;
        let idempotency = (!batch.idempotency_key.is_empty())
            .then(|| (batch.idempotency_key.clone(), fingerprint(&batch)));
        let (reply, reply_rx) = oneshot::channel();
        let job = AppendJob {
            events: batch.events,
            expected_next_offset: batch.expected_next_offset,
            idempotency,
            reply,
        };
        self.ask_writer(&stream, WriterCommand::Append(job), reply_rx)
            .await
    }

    /// Sends a command to a stream's writer and waits for its answer. A
    /// writer that is gone means the log is closing or the stream was
    /// deleted.
    async fn ask_writer<T>(
        &self,
        stream: &Stream,
        command: WriterCommand,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let gone = || {
            if self.closing.is_cancelled() {
                Error::ShuttingDown
            } else {
                Error::StreamNotFound(stream.name.clone())
            }
        };
        stream.writer_tx.send(command).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    fn validate_batch(&self, batch: &AppendBatch) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::InvalidArgument(m));
        if batch.events.is_empty() {
            return invalid("the batch is empty: send at least one event".into());
        }
        if batch.events.len() > self.config.max_batch_events {
            return invalid(format!(
                "the batch has {} events; the most allowed is {}: split it",
                batch.events.len(),
                self.config.max_batch_events
            ));
        }
        if batch.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return invalid(format!(
                "the idempotency key is {} bytes; the most allowed is {MAX_IDEMPOTENCY_KEY_LEN}",
                batch.idempotency_key.len()
            ));
        }
        let mut total = 0;
        for (i, event) in batch.events.iter().enumerate() {
            if event.event_type.is_empty() {
                return invalid(format!("event {i} has an empty type: every event needs a type such as \"invoice.paid\""));
            }
            validate_event_fields(event)
                .map_err(|why| Error::InvalidArgument(format!("event {i}: {why}")))?;
            for rendering in &event.renderings {
                let label = std::str::from_utf8(&rendering.label).unwrap_or("");
                validate_version_label(label)
                    .map_err(|e| Error::InvalidArgument(format!("event {i}: {e}")))?;
            }
            let size = event.encoded_len();
            if size > self.config.max_event_bytes {
                return invalid(format!(
                    "event {i} is {size} bytes; the largest allowed is {} bytes",
                    self.config.max_event_bytes
                ));
            }
            total += size;
        }
        if total > self.config.max_batch_bytes {
            return invalid(format!(
                "the batch is {total} bytes; the largest allowed is {} bytes: split it",
                self.config.max_batch_bytes
            ));
        }
        Ok(())
    }

    /// Reads one page of committed events from `offset`.
    pub fn read(
        &self,
        stream: &str,
        offset: u64,
        max_events: usize,
        max_bytes: usize,
        filter: &EventFilter,
    ) -> Result<ReadPage, Error> {
        let stream = self.get(stream)?;
        let head = stream.shared.head();
        check_offset(&stream.name, offset, head)?;
        let (slices, examined) = stream.read(
            self.engine.as_ref(),
            offset,
            head.next_offset,
            max_events,
            max_bytes,
            filter,
            None,
            &mut None,
        )?;
        Ok(ReadPage {
            slices,
            next_offset: offset + examined,
            head_offset: head.next_offset,
        })
    }

    /// Opens a subscription at `start`, delivering the events that pass
    /// `filter`.
    pub fn subscribe(
        &self,
        stream: &str,
        start: StartAt,
        filter: EventFilter,
    ) -> Result<Subscription, Error> {
        let next_offset = self.resolve_start(stream, start)?;
        let stream = self.get(stream)?;
        Subscription::new(self.engine.clone(), stream, next_offset, filter)
    }

    /// Joins `member` to consumer `group` and opens its subscription,
    /// delivering the events of the member's slots that pass `filter`.
    pub async fn subscribe_group(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        start: StartAt,
        filter: EventFilter,
    ) -> Result<Subscription, Error> {
        let cursor = self.join_group(stream, group, member, start).await?;
        // Slots start where they were committed; the first refresh rewinds
        // to the lowest of them, so start at the head.
        let head = self.get(stream)?.shared.head().next_offset;
        Ok(self
            .subscribe(stream, StartAt::Offset(head), filter)?
            .with_group(cursor))
    }

    /// The offset a start position stands for now.
    fn resolve_start(&self, stream: &str, start: StartAt) -> Result<u64, Error> {
        let stream = self.get(stream)?;
        let head = stream.shared.head();
        check_offset(&stream.name, head.first_offset, head)?;
        Ok(match start {
            StartAt::Earliest => head.first_offset,
            StartAt::Latest => head.next_offset,
            StartAt::Offset(offset) => {
                check_offset(&stream.name, offset, head)?;
                offset
            }
            StartAt::Time(time_unix_nanos) => self.engine.offset_at_time(
                stream.meta.id,
                head.first_offset,
                head.next_offset,
                time_unix_nanos,
            )?,
        })
    }

    /// Creates an empty stream; durable before it returns (the store makes
    /// a new stream's metadata durable as it writes it).
    pub async fn create_stream(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<StreamInfo, Error> {
        validate_retention(&retention)?;
        let (stream, created) = self.get_or_create(name, true, retention)?;
        if !created {
            return Err(Error::StreamExists(name.to_string()));
        }
        Ok(stream.info())
    }

    /// The storage engine (for other owners of data in it, e.g. API keys).
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Describes a stream.
    pub fn stream_info(&self, name: &str) -> Result<StreamInfo, Error> {
        Ok(self.get(name)?.info())
    }

    /// Lists up to `limit` streams whose names sort after `after` and
    /// pass `visible`.
    pub fn list_streams(
        &self,
        after: &str,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Vec<StreamInfo> {
        let streams = self.streams.read().expect("registry lock");
        let lower = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after)
        };
        streams
            .range::<str, _>((lower, Bound::Unbounded))
            .filter(|(name, _)| visible(name))
            .take(limit)
            .map(|(_, s)| s.info())
            .collect()
    }

    /// Replaces a stream's retention policy; durable before it returns.
    /// Trimming to a tighter policy follows within about a second.
    pub async fn update_stream(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<StreamInfo, Error> {
        validate_retention(&retention)?;
        let stream = self.get(name)?;
        let (reply, reply_rx) = oneshot::channel();
        self.ask_writer(
            &stream,
            WriterCommand::SetRetention { retention, reply },
            reply_rx,
        )
        .await?;
        Ok(stream.info())
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A stream's counters (for the service's delivery counts).
    pub fn stream_metrics(&self, name: &str) -> Result<StreamMetrics, Error> {
        Ok(self.get(name)?.shared.metrics.clone())
    }

    /// The Prometheus exposition: the counters, plus each stream's bounds
    /// and consumer lag as they are now.
    pub fn encode_metrics(&self) -> String {
        let snapshots: Vec<StreamSnapshot> = self
            .all_streams()
            .iter()
            .map(|s| {
                let head = s.shared.head();
                let consumers = s
                    .shared
                    .consumers
                    .lock()
                    .expect("consumers lock")
                    .iter()
                    .map(|(name, c)| {
                        (
                            name.clone(),
                            head.next_offset.saturating_sub(c.record.next_offset),
                        )
                    })
                    .collect();
                let groups = s
                    .shared
                    .groups
                    .lock()
                    .expect("groups lock")
                    .iter()
                    .map(|(name, g)| {
                        (
                            name.clone(),
                            head.next_offset.saturating_sub(g.low_watermark()),
                        )
                    })
                    .collect();
                StreamSnapshot {
                    groups,
                    name: s.name.clone(),
                    next_offset: head.next_offset,
                    first_offset: head.first_offset,
                    bytes: s.shared.bytes.load(Ordering::Relaxed),
                    consumers,
                }
            })
            .collect();
        self.metrics
            .stream_caches
            .set(self.cache_budget.used() as i64);
        let queued = self
            .committer
            .lock()
            .expect("committer lock")
            .as_ref()
            .map_or(0, Committer::queued_bytes);
        self.metrics.commit_queue.set(queued as i64);
        self.metrics
            .encode(&snapshots, &self.config.data_dir, &self.write_refusal())
    }

    /// Every stream, as the registry holds them now (the lock is not held
    /// afterwards).
    fn all_streams(&self) -> Vec<Arc<Stream>> {
        self.streams
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// When the log opened (nanoseconds since the Unix epoch), and how
    /// long ago.
    pub fn opened(&self) -> (i64, Duration) {
        (self.opened.1, self.opened.0.elapsed())
    }

    /// A stream's events appended per second over the last minute.
    pub fn append_rate(&self, name: &str) -> Result<f64, Error> {
        Ok(self.get(name)?.shared.append_rate())
    }

    /// The ranges of a stream that reads found damaged or missing in
    /// storage since the server started: (first offset, end when known).
    pub fn damaged_ranges(&self, name: &str) -> Result<Vec<(u64, Option<u64>)>, Error> {
        let stream = self.get(name)?;
        let damage = stream.shared.damage_seen.lock().expect("damage lock");
        Ok(damage.iter().map(|(f, e)| (*f, *e)).collect())
    }

    /// Deletes a stream with all its events; its subscriptions end.
    ///
    /// The stream stays in the registry until its writer has deleted it, so
    /// a stream of the same name cannot be created in between (its
    /// metadata would share the name's key with the deletion).
    pub async fn delete_stream(&self, name: &str) -> Result<(), Error> {
        let stream = self.get(name)?;
        let (reply, reply_rx) = oneshot::channel();
        let gone = || Error::StreamNotFound(name.to_string());
        stream
            .writer_tx
            .send(WriterCommand::Delete(reply))
            .await
            .map_err(|_| gone())?;
        // No answer means another DeleteStream got there first.
        reply_rx.await.map_err(|_| gone())??;
        let mut streams = self.streams.write().expect("registry lock");
        if streams.get(name).is_some_and(|s| Arc::ptr_eq(s, &stream)) {
            streams.remove(name);
            self.metrics.remove_stream(name);
        }
        Ok(())
    }

    /// Stops the writers and housekeeping, waits for them, and makes
    /// everything durable. Call once no Append is in flight.
    pub async fn close(&self) -> Result<(), Error> {
        self.closing.cancel();
        // Writers stop between groups; each syncs what it wrote.
        let committer = self.committer.lock().expect("committer lock").take();
        self.streams.write().expect("registry lock").clear();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("log tasks did not stop within 10s");
        }
        if let Some(committer) = committer {
            let _ = tokio::task::spawn_blocking(move || committer.finish()).await;
        }
        let store = self.engine.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| Error::StorageFailed(e.to_string()))??;
        Ok(())
    }
}

/// A 128-bit hash of a batch's events, to tell a retry (same events) from a
/// different batch reusing an idempotency key. Hashes the storage encoding,
/// which is stable across versions (xxh3 is a fixed algorithm).
fn fingerprint(batch: &AppendBatch) -> u128 {
    let chunk = Chunk {
        first_offset: 0,
        time_unix_nanos: 0,
        records: batch.events.clone(),
    };
    xxhash_rust::xxh3::xxh3_128(&chunk.encode_unchecked())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_outside_the_stream_are_out_of_range_naming_the_bound() {
        let head = Head {
            first_offset: 10,
            next_offset: 20,
            deleted: false,
        };
        for ok in [10, 15, 20] {
            assert!(check_offset("s", ok, head).is_ok(), "{ok}");
        }
        let below = check_offset("s", 9, head).unwrap_err();
        assert!(
            matches!(below, Error::OffsetTrimmed { first: 10, .. }),
            "{below}"
        );
        assert!(below.to_string().contains("first retained offset is 10"));
        let past = check_offset("s", 21, head).unwrap_err();
        assert!(
            matches!(past, Error::OffsetPastHead { head: 20, .. }),
            "{past}"
        );
        let deleted = Head {
            deleted: true,
            ..head
        };
        assert!(matches!(
            check_offset("s", 15, deleted),
            Err(Error::StreamNotFound(_))
        ));
    }

    #[test]
    fn stream_names() {
        for ok in ["a", "orders", "Orders.v2_x-y", &"x".repeat(200)] {
            assert!(validate_stream_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(201)] {
            assert!(validate_stream_name(bad).is_err(), "{bad}");
        }
    }
}
