//! One stream's shared state and its reads: the committed head (a `watch`
//! readers wait on), the tail cache, consumers' in-memory state, append
//! rate samples and the damage already reported, all of it written only by
//! the stream's writer (through the group commit's publish) and read by
//! everyone; and the one read path every Read, Subscribe and group member
//! goes through (leftover chunk, then tail cache, then shared reads, then
//! the engine), which reports damage as DATA_LOSS and never as retention.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::error;

use super::cache::{SharedReads, TailCache};
use super::command::WriterCommand;
use super::consumer::ConsumerState;
use super::group;
use super::read_ahead::off_the_workers;
use super::{EventFilter, RATE_WINDOW};
use crate::engine::{
    Chunk, Engine, EventRecord, Retention, StorageError, StoredStream, StreamMeta,
};
use crate::error::Error;
use crate::metrics::{Metrics, StreamMetrics};

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
pub(super) const MAX_SCAN_EVENTS: u64 = 100_000;

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
    pub(super) head_tx: watch::Sender<Head>,
    /// Recently committed chunks, so live readers skip storage.
    pub(super) cache: Mutex<TailCache>,
    /// Approximate stored bytes.
    pub(super) bytes: AtomicU64,
    /// Durable consumers by name. Changed by the writer; held briefly.
    pub(super) consumers: Mutex<BTreeMap<String, ConsumerState>>,
    /// Numbers consumer leases.
    pub(super) leases: AtomicU64,
    /// Consumers whose subscription another server holds (shared engines),
    /// with the claim's revision. Locked after `consumers`.
    pub(super) claimed_elsewhere: Mutex<std::collections::HashMap<String, u64>>,
    /// The retention policy (the writer owns the durable copy).
    pub(super) retention: Mutex<Retention>,
    /// Recent (time, head) samples, oldest first, for the append rate.
    pub(super) rate_samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The stream's counters.
    pub(super) metrics: StreamMetrics,
    /// Consumer groups by name. Changed by the writer (committed offsets)
    /// and by members joining and leaving; held briefly.
    pub(super) groups: Mutex<BTreeMap<String, group::GroupState>>,
    /// Set when the engine is shared by several servers: how the groups
    /// are coordinated with theirs (`group.rs`).
    pub(super) coordination: std::sync::OnceLock<group::Coordination>,
    /// Chunks read from storage lately, shared by group members.
    pub(super) shared_reads: Mutex<SharedReads>,
    /// The server's metrics (for data loss).
    pub(super) server_metrics: Arc<Metrics>,
    /// Damaged ranges found by reads (first offset → end, when known),
    /// each logged and counted once.
    pub(super) damage_seen: Mutex<BTreeMap<u64, Option<u64>>>,
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
            claimed_elsewhere: Mutex::new(Default::default()),
            retention: Mutex::new(stored.meta.retention),
            rate_samples: Mutex::new(VecDeque::from([(Instant::now(), stored.next_offset)])),
            metrics: metrics.stream(&stored.name),
            server_metrics: metrics.clone(),
            shared_reads: Mutex::new(shared_reads),
            damage_seen: Mutex::new(Default::default()),
            coordination: std::sync::OnceLock::new(),
            groups: Mutex::new(
                stored
                    .groups
                    .iter()
                    .map(|(name, record)| (name.clone(), group::GroupState::new(record.clone())))
                    .collect(),
            ),
        }
    }

    pub(super) fn publish(&self, chunks: Vec<(Arc<Chunk>, usize)>, next_offset: u64) {
        if !chunks.is_empty() {
            let mut cache = self.cache.lock().expect("tail cache lock");
            for (chunk, size) in chunks {
                self.metrics.appended_bytes.inc_by(size as u64);
                cache.push(chunk, size);
            }
        }
        // The head only moves forward (a head another server's append
        // moved can be published after an older one of this server's).
        self.head_tx.send_if_modified(|head| {
            let moved = next_offset > head.next_offset;
            if !moved {
                return false;
            }
            self.metrics
                .appended_events
                .inc_by(next_offset.saturating_sub(head.next_offset));
            head.next_offset = next_offset;
            moved
        });
    }

    pub(super) fn mark_deleted(&self) {
        self.head_tx.send_modify(|head| head.deleted = true);
        // The consumers go with the stream. Their subscriptions end through
        // the head (NOT_FOUND, as for any subscriber), not through their
        // leases (which would say ABORTED).
        self.consumers.lock().expect("consumers lock").clear();
    }

    /// Whether any consumer group of the stream has a member connected.
    pub(super) fn has_group_members(&self) -> bool {
        self.groups
            .lock()
            .expect("groups lock")
            .values()
            .any(group::GroupState::has_members)
    }

    /// Publishes a trim: readers below `first_offset` now get OUT_OF_RANGE.
    pub(super) fn trim_to(&self, first_offset: u64) {
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
    pub(super) fn sample_rate(&self, now: Instant) {
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
    pub(super) fn append_rate(&self) -> f64 {
        let head = self.head().next_offset;
        let samples = self.rate_samples.lock().expect("rate lock");
        match samples.front() {
            Some((t0, h0)) if t0.elapsed() > Duration::from_millis(10) => {
                head.saturating_sub(*h0) as f64 / t0.elapsed().as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub(super) fn set_bytes(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    pub(super) fn head(&self) -> Head {
        *self.head_tx.borrow()
    }
}

/// A stream in the registry.
pub(crate) struct Stream {
    pub(super) name: String,
    pub(super) meta: StreamMeta,
    /// The queue to the stream's single writer.
    pub(super) writer_tx: mpsc::Sender<WriterCommand>,
    pub(super) shared: Arc<StreamShared>,
}

impl Stream {
    /// The error for events lost in storage from `first` on: logged and
    /// counted the first time each range is found.
    pub(super) fn lost(&self, first: u64, end: Option<u64>) -> Error {
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

    pub(super) fn info(&self) -> StreamInfo {
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

    /// Whether the event at `offset` is in the tail cache, so reading it
    /// touches no storage.
    pub(super) fn in_memory(&self, offset: u64) -> bool {
        self.shared
            .cache
            .lock()
            .expect("tail cache lock")
            .holds(offset)
    }

    /// Reads committed events from `offset` up to `end`: at most
    /// `max_events` passing `filter` and about `max_bytes` of them (always
    /// at least one when any is available), examining at most
    /// [`MAX_SCAN_EVENTS`]. Returns the slices and how many events were
    /// examined (the cursor's advance). Serves from `ahead` (chunks the
    /// caller holds: what its previous read did not finish, or read ahead
    /// of it), then the tail cache, then storage; leaves in `ahead` what
    /// this read did not finish, so a reader decodes each stored chunk
    /// once. `ahead` is a contiguous run of chunks; those wholly behind
    /// `offset` are dropped, and a run not holding `offset` is stale.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        &self,
        engine: &dyn Engine,
        offset: u64,
        end: u64,
        max_events: usize,
        max_bytes: usize,
        filter: &EventFilter,
        select: Option<Select<'_>>,
        ahead: &mut VecDeque<Arc<Chunk>>,
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
        // Set when the next event would pass `max_bytes`.
        let mut full = false;
        let more = |position: u64, events: usize, bytes: usize| {
            position < end
                && events < max_events
                && bytes < max_bytes
                && position - offset < MAX_SCAN_EVENTS
        };
        while !full && more(position, events, bytes) {
            while ahead.front().is_some_and(|c| c.end_offset() <= position) {
                ahead.pop_front();
            }
            if ahead.front().is_some_and(|c| !c.contains(position)) {
                ahead.clear();
            }
            let held = !ahead.is_empty();
            let cached = match held {
                true => Some(ahead.iter().cloned().collect()),
                false => self
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
                    // Storage may wait on the disk: not on an async worker.
                    let read = off_the_workers(|| {
                        engine.read_chunks(
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
                    })
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
                    let offset = chunk.first_offset + stop as u64;
                    let pass = picked.is_none()
                        || (filter.matches(record)
                            && select.is_none_or(|select| select(offset, record)));
                    if pass {
                        let size = record.encoded_len() + EVENT_OVERHEAD_BYTES + self.name.len();
                        // A page never passes `max_bytes` (so it fits the
                        // client's receive limit), except that one event
                        // always fits.
                        if events > 0 && bytes + size > max_bytes {
                            full = true;
                            break;
                        }
                        if let Some(picked) = &mut picked {
                            picked.push(stop as u32);
                        }
                        bytes += size;
                        events += 1;
                    }
                    stop += 1;
                    position += 1;
                }
                if stop < chunk.records.len() && !held {
                    ahead.push_back(chunk.clone());
                }
                if picked.as_ref().map_or(stop > start, |p| !p.is_empty()) {
                    slices.push(EventSlice {
                        chunk,
                        start,
                        end: stop,
                        picked,
                    });
                }
                if full || !more(position, events, bytes) {
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

/// What an event adds to a response beyond its record's encoding and its
/// stream's name, at most: its offset, time, field tags and length prefix
/// (counted so a page's limit holds for the encoded response).
pub(crate) const EVENT_OVERHEAD_BYTES: usize = 32;

/// How many bytes of chunks one storage read takes when a filter is on
/// (without one, the read stops at the events wanted).
pub(super) const MAX_SCAN_BYTES: usize = 1 << 20;
