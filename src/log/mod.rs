//! The log: named, ordered, durable streams on top of an
//! [`Engine`](crate::engine::Engine), with live tail for subscribers.
//!
//! Each stream has one `writer` task (the only place offsets are
//! assigned: the stream's actor, the one mutator of its appends, consumers,
//! groups, retention, expiry and deletion), its `stream` state shared
//! with readers (a committed-head `watch` channel subscribers wait on, and
//! a `cache` of recently committed chunks), and the consumer and group
//! state machines the writer applies (`consumer`, `group`). Appends
//! flow writer → engine → `commit` (one sync for many appends) →
//! publish: the head moves, the cache fills, callers are acknowledged.
//! Readers never see past the committed head, so they never see an event
//! that is not yet durable under the durability mode.
//!
//! This file holds the [`Log`]'s calls (what `api` uses); the set of
//! streams is `registry`'s, the background turns `housekeeping`'s, the
//! request rules `validate`'s, the settings `settings`'.

mod cache;
mod command;
mod commit;
mod consumer;
mod filter;
mod group;
mod housekeeping;
mod read_ahead;
mod registry;
mod settings;
mod stream;
mod subscription;
mod validate;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use command::{ClearSettings, ConsumerSettings};
pub use commit::PipelineGate;
pub use consumer::{validate_consumer_name, validate_version_label, ConsumerInfo, ConsumerLease};
pub use filter::{EventFilter, TypePattern};
pub use group::{slot_of, GroupCursor, GroupInfo, GroupMemberInfo, GroupUpdate, SLOT_COUNT};
pub use settings::{Limits, LogConfig};
pub use stream::{EventSlice, Head, ReadPage, StreamInfo};
use stream::{Stream, StreamShared};
pub use subscription::{StartAt, Subscription};

pub use crate::engine::Retention;
use crate::engine::{Chunk, Engine, EventRecord};
use crate::error::Error;
use crate::metrics::{ConsumerLag, Metrics, StreamMetrics, StreamSnapshot, WriteRefusal};
use cache::CacheBudget;
use command::{AppendJob, WriterCommand};
use commit::Committer;
use validate::{check_offset, validate_event_fields, validate_retention};
pub use validate::{
    validate_stream_name, MAX_EVENT_FIELD_LEN, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE_LEN,
};

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

/// The longest fencing token, in bytes.
pub const MAX_FENCING_TOKEN_LEN: usize = 200;

/// A batch to append.
#[derive(Debug, Clone, Default)]
pub struct AppendBatch {
    /// The events, in order.
    pub events: Vec<EventRecord>,
    /// Optimistic concurrency check.
    pub expected_next_offset: Option<u64>,
    /// Makes retries safe; empty means none.
    pub idempotency_key: String,
    /// Fences off older producers: when set, the batch is written only if
    /// it is the stream's current fencing token.
    pub fencing_token: String,
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

/// A queued batch of an append pipeline, waiting for its outcome.
pub struct PendingAppend {
    reply: oneshot::Receiver<Result<AppendOutcome, Error>>,
    /// What to answer if the writer goes away before answering.
    gone: Error,
    started: Instant,
    /// Where a pipelined batch's latency is observed.
    metrics: Option<Arc<Metrics>>,
}

impl PendingAppend {
    /// The batch's outcome, once durable under the durability mode (as
    /// [`Log::append`] answers).
    pub async fn outcome(self) -> Result<AppendOutcome, Error> {
        self.await
    }
}

/// Polling by reference keeps the outcome across `select!` turns that end
/// in another branch.
impl std::future::Future for PendingAppend {
    type Output = Result<AppendOutcome, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        let outcome = match std::future::Future::poll(std::pin::Pin::new(&mut this.reply), cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(Ok(outcome)) => outcome,
            std::task::Poll::Ready(Err(_)) => {
                Err(std::mem::replace(&mut this.gone, Error::ShuttingDown))
            }
        };
        if let Some(metrics) = &this.metrics {
            metrics.observe_append(this.started.elapsed());
        }
        std::task::Poll::Ready(outcome)
    }
}

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
    /// What every subscription's reads ahead draw on.
    read_ahead: read_ahead::ReadAheadBudget,
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
    /// Groups whose assignment to look at (engines several servers share).
    assign_queue: Arc<group::AssignQueue>,
}

impl Log {
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
        let outcome = match self.enqueue(stream, batch, None).await {
            Ok(pending) => pending.outcome().await,
            Err(e) => Err(e),
        };
        self.metrics.observe_append(started.elapsed());
        outcome
    }

    /// Queues one batch of an append pipeline behind the pipeline's
    /// earlier ones and returns at once (after waiting for room in the
    /// stream's writer queue, the pipeline's backpressure); the batch's
    /// outcome comes from [`PendingAppend::outcome`]. The same checks and
    /// semantics as [`Log::append`]; once a batch of `pipeline` fails, no
    /// later one is written.
    pub async fn append_pipelined(
        &self,
        stream: &str,
        batch: AppendBatch,
        pipeline: &Arc<PipelineGate>,
    ) -> Result<PendingAppend, Error> {
        if pipeline.failed() {
            return Err(Error::PipelineStopped);
        }
        self.enqueue(stream, batch, Some(pipeline.clone())).await
    }

    /// Checks a batch and queues it to its stream's writer.
    async fn enqueue(
        &self,
        stream: &str,
        batch: AppendBatch,
        pipeline: Option<Arc<PipelineGate>>,
    ) -> Result<PendingAppend, Error> {
        let started = Instant::now();
        self.validate_batch(&batch)?;
        self.check_free_space()?;
        if self.config.auto_create_streams && self.get(stream).is_err() {
            // A batch a new stream would refuse must not create it: a new
            // stream is at offset 0 and has no fencing token.
            refused_by_a_new_stream(stream, &batch)?;
        }
        let (stream, _) = self.get_or_create(
            stream,
            self.config.auto_create_streams,
            Retention::default(),
        )?;
        let idempotency = (!batch.idempotency_key.is_empty())
            .then(|| (batch.idempotency_key.clone(), fingerprint(&batch)));
        let (reply, reply_rx) = oneshot::channel();
        let is_pipelined = pipeline.is_some();
        let job = AppendJob {
            events: batch.events,
            expected_next_offset: batch.expected_next_offset,
            idempotency,
            fencing_token: batch.fencing_token,
            pipeline,
            reply,
        };
        if stream
            .writer_tx
            .send(WriterCommand::Append(job))
            .await
            .is_err()
        {
            return Err(self.writer_gone(&stream));
        }
        Ok(PendingAppend {
            reply: reply_rx,
            gone: self.writer_gone(&stream),
            started,
            // A unary Append is timed by `append`, failures included.
            metrics: is_pipelined.then(|| self.metrics.clone()),
        })
    }

    /// The error for a stream whose writer is gone: the log is closing, or
    /// the stream was deleted.
    fn writer_gone(&self, stream: &Stream) -> Error {
        if self.closing.is_cancelled() {
            Error::ShuttingDown
        } else {
            Error::StreamNotFound(stream.name.clone())
        }
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
        let gone = || self.writer_gone(stream);
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
        if batch.fencing_token.len() > MAX_FENCING_TOKEN_LEN {
            return invalid(format!(
                "the fencing token is {} bytes; the most allowed is {MAX_FENCING_TOKEN_LEN}",
                batch.fencing_token.len()
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
            &mut VecDeque::new(),
        )?;
        Ok(ReadPage {
            slices,
            next_offset: offset + examined,
            head_offset: head.next_offset,
        })
    }

    /// The append time of the event at `offset` (nanoseconds since the
    /// Unix epoch): for lag in time, the age of the oldest event a consumer
    /// has not passed. `None` at or past the head, before the first
    /// retained offset, or when storage cannot give the event (reads of it
    /// report the damage).
    pub(crate) fn append_time_at(&self, stream: &Stream, offset: u64) -> Option<i64> {
        let head = stream.shared.head();
        if offset < head.first_offset || offset >= head.next_offset {
            return None;
        }
        let (slices, _) = stream
            .read(
                self.engine.as_ref(),
                offset,
                head.next_offset,
                1,
                usize::MAX,
                &EventFilter::default(),
                None,
                &mut VecDeque::new(),
            )
            .ok()?;
        slices.first().map(|slice| slice.chunk.time_unix_nanos)
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
        Subscription::new(
            self.engine.clone(),
            stream,
            next_offset,
            filter,
            self.read_ahead.clone(),
        )
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

    /// Sets the stream's fencing token (empty clears it): from then on, an
    /// append carrying another token gets FAILED_PRECONDITION. With
    /// `expected`, only if that is the current token. Creates the stream
    /// when missing and auto-create is on (a producer may fence first).
    pub async fn set_fence(
        &self,
        name: &str,
        token: String,
        expected: Option<String>,
    ) -> Result<(), Error> {
        for t in std::iter::once(&token).chain(&expected) {
            if t.len() > MAX_FENCING_TOKEN_LEN {
                return Err(Error::InvalidArgument(format!(
                    "the fencing token is {} bytes; the most allowed is {MAX_FENCING_TOKEN_LEN}",
                    t.len()
                )));
            }
        }
        let (stream, _) =
            self.get_or_create(name, self.config.auto_create_streams, Retention::default())?;
        let (reply, reply_rx) = oneshot::channel();
        self.ask_writer(
            &stream,
            WriterCommand::SetFence {
                token,
                expected,
                reply,
            },
            reply_rx,
        )
        .await
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
                    .map(|(name, c)| (name.clone(), c.record.next_offset))
                    .collect::<Vec<_>>();
                // Ages are read after the lock is let go (a chunk read each).
                let now = self.now();
                let consumers = consumers
                    .into_iter()
                    .map(|(name, cursor)| ConsumerLag {
                        name,
                        events: head.next_offset.saturating_sub(cursor),
                        seconds: self
                            .append_time_at(s, cursor)
                            .map_or(0.0, |t| now.saturating_sub(t).max(0) as f64 / 1e9),
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
        self.metrics.encode(
            &snapshots,
            // Nothing of a shared engine's is under the data dir.
            (!self.engine.shared()).then_some(self.config.data_dir.as_path()),
            &self.write_refusal(),
        )
    }

    /// The settings the log runs with (its limits, for GetServerStatus).
    pub fn config(&self) -> &LogConfig {
        &self.config
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

/// Whether a new, empty stream would refuse `batch` (its precondition or
/// fencing token), so appending it to a missing stream creates nothing.
fn refused_by_a_new_stream(stream: &str, batch: &AppendBatch) -> Result<(), Error> {
    if !batch.fencing_token.is_empty() {
        return Err(Error::Fenced {
            stream: stream.to_string(),
            given: batch.fencing_token.clone(),
            current: String::new(),
        });
    }
    match batch.expected_next_offset {
        Some(expected) if expected != 0 => Err(Error::WrongExpectedOffset {
            stream: stream.to_string(),
            expected,
            actual: 0,
        }),
        _ => Ok(()),
    }
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
