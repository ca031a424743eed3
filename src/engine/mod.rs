//! The engine seam: everything the stream layer (`log`) and the key ring
//! (`auth`) ask of storage, as one trait, so a second storage engine (a
//! distributed one, such as NATS JetStream) can be added without touching
//! `api/`, `auth` or the stream logic.
//!
//! The default engine is the embedded sled store ([`crate::storage::Store`],
//! with its write-ahead log); nothing above this module names it except
//! `Log::open`, which chooses it, and the offline tools (`verify`,
//! `repair`, `keys`) that work on a sled data dir.
//!
//! # Shape
//! A change is prepared first and written later: a stream's writer asks the
//! engine to *prepare* a change ([`Engine::write_group`],
//! [`Engine::put_consumer`], [`Engine::trim`] …), which builds everything
//! that does not need the serial section (keys, encoded records, the
//! write-ahead log payload) and writes nothing. The prepared changes of
//! many writers are then made durable together by [`Engine::commit`] (one
//! group commit, `log/commit.rs`), and only then published to readers. A
//! [`Prepared`] change is opaque above the seam: only the engine that made
//! it can commit it.
//!
//! Reads ([`Engine::read_chunks`], [`Engine::offset_at_time`]) see only what
//! was committed; the stream layer never reads past the published head, so
//! it never shows an event a crash could take back.
//!
//! # The head belongs to whoever commits
//! With sled, only our own writer appends, so the published head moves
//! when a group commit returns (`StreamShared::publish`). With a
//! distributed engine the head can also move because another server
//! appended: such an engine drives the same `publish` from what it
//! observes (its own follower of the stream), and the writer learns the new
//! head from the engine's answer to a conditional append (the engine, not
//! the writer, is then the one place that enforces dense offsets). Readers
//! and subscriptions are unchanged either way: they follow the published
//! head, whoever moved it.
//!
//! # Records
//! The records that cross the seam (chunks of events, stream metadata,
//! consumer and group state, idempotency records) and their binary codec
//! (`records`) are engine-neutral: a distributed engine stores the same
//! encoded chunk as one message. So are the errors ([`StorageError`]).
//! Engines sit below this module and import it; it imports no engine.

use std::any::Any;
use std::path::Path;

mod error;
mod records;

pub use error::StorageError;
pub use records::{
    Chunk, ChunkHeader, CodecError, ConsumerRecord, EventRecord, GroupRecord, IdempotencyRecord,
    Keep, Rendering, Retention, StreamMeta,
};

/// The size the log aims for when it cuts a group commit into chunks.
///
/// Small on purpose: sled 0.34 splits a leaf at 16 entries, so a leaf holds
/// up to 16 chunks, and its page cache keeps every leaf touched by the
/// last few thousand page accesses whatever `cache_capacity` says. Memory
/// therefore scales with the chunk size. Measured with `pullstream bench
/// --workload catchup --events 10000000`: 64 KiB chunks left the server at
/// 1.3 GiB after the catch-up read, 16 KiB at 0.9 GiB, 8 KiB at 0.47 GiB;
/// 4 KiB saved little more and read slower.
pub const TARGET_CHUNK_BYTES: usize = 8 << 10;

/// A stream as found when the store opens.
#[derive(Debug, Clone)]
pub struct StoredStream {
    /// The stream's name.
    pub name: String,
    /// Its durable metadata.
    pub meta: StreamMeta,
    /// Its first retained offset.
    pub first_offset: u64,
    /// Its head: the offset the next event gets.
    pub next_offset: u64,
    /// The append time of its last event, if any (appends never go back in
    /// time, even if the clock does).
    pub last_time_unix_nanos: Option<i64>,
    /// Its durable consumers, in name order.
    pub consumers: Vec<(String, ConsumerRecord)>,
    /// Its consumer groups, in name order.
    pub groups: Vec<(String, GroupRecord)>,
    /// Its producers' fencing token (empty: none set).
    pub fence: String,
}

/// [`Engine::offset_at_time`] for any engine: the first offset in
/// `[first, end)` appended at or after the time (`end` when none), by a
/// binary search over offsets, with `chunk_holding` the engine's lookup of
/// the chunk holding an offset (`None` where nothing is stored).
pub fn search_time(
    first: u64,
    end: u64,
    time_unix_nanos: i64,
    mut chunk_holding: impl FnMut(u64) -> Result<Option<Chunk>, StorageError>,
) -> Result<u64, StorageError> {
    let (mut low, mut high) = (first, end);
    // Invariant: every event below `low` is older than the time, and the
    // answer is at most `high`.
    while low < high {
        let middle = low + (high - low) / 2;
        let Some(chunk) = chunk_holding(middle)? else {
            // Nothing stored there (trimmed under us): search above.
            low = middle + 1;
            continue;
        };
        if chunk.time_unix_nanos >= time_unix_nanos {
            high = chunk.first_offset.max(low);
        } else {
            low = chunk.end_offset();
        }
    }
    Ok(low.min(end))
}

/// What [`Engine::max_group_bytes`] counts per event beyond its record:
/// room for the chunk it may need alone (header, checksum and framing).
pub const GROUP_EVENT_OVERHEAD: usize = 64;

/// A stream's head as another server left it (see
/// [`Engine::remote_heads`]).
#[derive(Debug, Clone)]
pub struct RemoteHead {
    /// The stream's name.
    pub name: String,
    /// The stream's id (a stream deleted and made again has a new one).
    pub stream_id: u64,
    /// The offset the next event gets.
    pub next_offset: u64,
    /// The append time of the last event.
    pub last_time_unix_nanos: i64,
    /// The events of the append that moved the head there, when the
    /// engine has them (the chunks holding offsets up to `next_offset`,
    /// in order); empty otherwise, and readers read them from storage.
    pub chunks: Vec<Chunk>,
}

/// What another server did to a durable consumer's subscription (see
/// [`Engine::remote_claims`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimChange {
    /// A subscription of the consumer opened there: one open here with an
    /// older claim must end.
    Taken,
    /// Its subscription there ended (or that server stopped answering).
    Released,
    /// The consumer was deleted there.
    Deleted,
}

/// A change of a durable consumer's claim made by another server.
#[derive(Debug, Clone)]
pub struct RemoteClaim {
    /// The stream's name.
    pub stream: String,
    /// The stream's id.
    pub stream_id: u64,
    /// The consumer's name.
    pub consumer: String,
    /// The claim's revision: claims are ordered by it, cluster-wide.
    pub revision: u64,
    /// What happened.
    pub change: ClaimChange,
}

/// A consumer group's slot assignment, as an engine several servers
/// share stores it, so members on every server follow one assignment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Counts the assignment's changes (what members are told).
    pub generation: u64,
    /// The members it was made for, each with the revision of its join.
    pub members: Vec<(String, u64)>,
    /// Slot → owning member id.
    pub owners: Vec<Option<String>>,
    /// Members the previous assignment held that its maker knew had left,
    /// with the revision of the join that ended: so a server that has not
    /// heard of the leave yet does not put them back.
    pub left: Vec<(String, u64)>,
}

/// What another server changed that this one must take in (see
/// [`Engine::remote_changes`]).
#[derive(Debug, Clone)]
pub enum RemoteChange {
    /// A stream this server serves was deleted.
    StreamDeleted {
        /// The stream's name.
        stream: String,
        /// The deleted stream's id.
        stream_id: u64,
    },
    /// A stream's retention policy changed.
    StreamRetention {
        /// The stream's name.
        stream: String,
        /// The stream's id.
        stream_id: u64,
        /// The policy now.
        retention: Retention,
    },
    /// A durable consumer's claim.
    Claim(RemoteClaim),
    /// A group member joined there (`joined`), or left (or its server
    /// stopped answering).
    Member {
        /// The stream's name.
        stream: String,
        /// The stream's id.
        stream_id: u64,
        /// The group.
        group: String,
        /// The member id.
        member: String,
        /// The join's revision (joins are ordered by it; a leave names
        /// the join it ends).
        revision: u64,
        /// Joined, or left.
        joined: bool,
    },
    /// A group's assignment changed (by any server, this one included).
    Assignment {
        /// The stream's name.
        stream: String,
        /// The stream's id.
        stream_id: u64,
        /// The group.
        group: String,
        /// The new assignment.
        assignment: Assignment,
        /// Its revision.
        revision: u64,
    },
    /// A group was deleted.
    GroupDeleted {
        /// The stream's name.
        stream: String,
        /// The stream's id.
        stream_id: u64,
        /// The group.
        group: String,
    },
}

/// A group member's commit another server forwarded here (see
/// [`Engine::forward_group_commit`]).
#[derive(Debug)]
pub struct ForwardedCommit {
    /// The stream's name, as this server knows it.
    pub stream: String,
    /// The stream's id.
    pub stream_id: u64,
    /// The group.
    pub group: String,
    /// The member.
    pub member: String,
    /// What it has handled, as in `CommitGroup`.
    pub next_offset: u64,
    /// Where the answer goes.
    pub reply: tokio::sync::oneshot::Sender<ForwardedAnswer>,
}

/// A call another server forwarded here, about a group member connected
/// here.
#[derive(Debug)]
pub enum Forwarded {
    /// Commit its progress.
    Commit(ForwardedCommit),
    /// Say which generation its client has been told of.
    Told(ToldQuestion),
}

/// Which generation of its group's assignment a member's client has been
/// told of (see [`Engine::ask_told`]).
#[derive(Debug)]
pub struct ToldQuestion {
    /// The stream's name, as this server knows it.
    pub stream: String,
    /// The stream's id.
    pub stream_id: u64,
    /// The group.
    pub group: String,
    /// The member.
    pub member: String,
    /// The generation; `None` when the member is not connected here.
    pub reply: tokio::sync::oneshot::Sender<Option<u64>>,
}

/// How the server a member is connected to answered a forwarded commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedAnswer {
    /// Committed (or nothing to move).
    Committed,
    /// It does not serve the stream (any more).
    NoStream,
    /// It does not know the group (any more).
    NoGroup,
    /// The member is not connected there (any more).
    NoMember,
    /// It could not commit; why.
    Failed(String),
}

impl ForwardedAnswer {
    /// As sent between servers.
    pub fn encode(&self) -> String {
        match self {
            ForwardedAnswer::Committed => "committed".into(),
            ForwardedAnswer::NoStream => "no-stream".into(),
            ForwardedAnswer::NoGroup => "no-group".into(),
            ForwardedAnswer::NoMember => "no-member".into(),
            ForwardedAnswer::Failed(why) => format!("failed {why}"),
        }
    }

    /// The inverse of [`ForwardedAnswer::encode`] (anything else: failed).
    pub fn decode(text: &str) -> ForwardedAnswer {
        match text {
            "committed" => ForwardedAnswer::Committed,
            "no-stream" => ForwardedAnswer::NoStream,
            "no-group" => ForwardedAnswer::NoGroup,
            "no-member" => ForwardedAnswer::NoMember,
            other => {
                ForwardedAnswer::Failed(other.strip_prefix("failed ").unwrap_or(other).to_string())
            }
        }
    }
}

/// Runs blocking work (an engine call that waits on a disk or a network)
/// from async code without stalling the runtime's other tasks, where the
/// runtime allows it (a multi-threaded one); elsewhere just runs it.
pub fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One chunk to write, already encoded.
pub struct EncodedChunk {
    /// The chunk's first offset.
    pub first_offset: u64,
    /// The encoded value.
    pub value: Vec<u8>,
}

/// A change an engine has prepared and not yet written. Opaque above the
/// seam; [`Engine::commit`] of the engine that prepared it writes it.
pub struct Prepared {
    size: usize,
    inner: Box<dyn Any + Send>,
}

impl Prepared {
    /// Wraps an engine's own change, holding about `size` bytes.
    pub fn new<T: Any + Send>(inner: T, size: usize) -> Prepared {
        Prepared {
            size,
            inner: Box::new(inner),
        }
    }

    /// About how many bytes the change holds in memory until committed
    /// (what the commit queue's byte bound counts).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The engine's own change back, or `None` when another engine
    /// prepared it (a programming error the engine reports).
    pub fn into_inner<T: Any>(self) -> Option<T> {
        self.inner.downcast::<T>().ok().map(|b| *b)
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What the stream layer needs from storage. Every method is synchronous
/// and short except [`Engine::commit`] (a write and a sync),
/// [`Engine::checkpoint`] and [`Engine::close`]; callers run those off the
/// async executor's hot path.
pub trait Engine: Send + Sync + 'static {
    // ---- streams ----

    /// Every stream, with its first offset, head, consumers and groups,
    /// after recovery (what an unfinished append left past a head is gone).
    fn load_streams(&self) -> Result<Vec<StoredStream>, StorageError>;

    /// A stream id never handed out before by this engine.
    fn new_stream_id(&self) -> Result<u64, StorageError>;

    /// A stream the server did not load: one another server sharing the
    /// engine created since (`None`: there is none). Engines that only
    /// this server writes keep the default, as the streams they loaded are
    /// all there are.
    fn find_stream(&self, _name: &str) -> Result<Option<StoredStream>, StorageError> {
        Ok(None)
    }

    /// A stream as stored now (`None`: not stored), to bring its writer
    /// back in line after a write the engine rolled back. By default what
    /// [`Engine::find_stream`] finds.
    fn stored_stream(&self, name: &str) -> Result<Option<StoredStream>, StorageError> {
        self.find_stream(name)
    }

    /// The names of every stream as stored now, in name order, for an
    /// engine several servers share (this server may not serve them all
    /// yet); asked only when [`Engine::shared`].
    fn stored_stream_names(&self) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }

    /// Creates a stream, durably before it returns (creating a stream is
    /// rare; it is not group-committed). An engine shared by several
    /// servers answers [`StorageError::AlreadyCreated`] when another one
    /// created it first.
    fn put_stream(&self, name: &str, meta: &StreamMeta) -> Result<(), StorageError>;

    /// Prepares a settings change of a stream's metadata.
    fn write_meta(&self, name: &str, meta: &StreamMeta) -> Result<Prepared, StorageError>;

    /// Prepares an appended group: its chunks, the idempotency keys it
    /// remembers, and the stream's metadata with the new head, all or
    /// nothing once committed.
    ///
    /// An engine that several servers append to (its appends are
    /// conditional on the stream's head) writes the group's events here,
    /// atomically, and leaves only what follows from them to
    /// [`Engine::commit`]; when another server appended first it writes
    /// nothing and answers [`StorageError::HeadMoved`] with the head it
    /// found, and the writer decides the group again from there.
    fn write_group(
        &self,
        name: &str,
        meta: &StreamMeta,
        chunks: Vec<EncodedChunk>,
        idempotency: &[(&str, IdempotencyRecord)],
    ) -> Result<Prepared, StorageError>;

    /// Prepares retention: removes the chunks below `below` and writes the
    /// metadata (whose `offset_floor` is `below`).
    fn trim(&self, name: &str, meta: &StreamMeta, below: u64) -> Result<Prepared, StorageError>;

    /// Prepares setting the stream's fencing token (empty clears it).
    fn put_fence(&self, stream_id: u64, token: &str) -> Result<Prepared, StorageError>;

    /// The producers' fencing token in force as the engine last saw it
    /// (shared engines: set through any server, ordered with appends);
    /// `None` where only this server sets it (the writer's copy is the
    /// truth). The writer asks before it decides each group.
    fn fence_in_force(&self, _stream_id: u64) -> Option<String> {
        None
    }

    /// Prepares a stream's deletion with everything it holds.
    fn delete_stream(&self, name: &str, stream_id: u64) -> Result<Prepared, StorageError>;

    /// Whether several servers use this engine at once, so what one
    /// changes the others must read back (API keys; streams and heads come
    /// through [`Engine::find_stream`] and [`Engine::remote_heads`]).
    fn shared(&self) -> bool {
        false
    }

    /// The most bytes one group may hold, counted as
    /// [`EventRecord::encoded_len`] plus [`GROUP_EVENT_OVERHEAD`] per
    /// event, or `None` for no bound (sled). The writer cuts its groups to
    /// fit, and refuses a single batch that cannot.
    fn max_group_bytes(&self) -> Option<usize> {
        None
    }

    /// Appends made by other servers, as the engine observes them (once
    /// each, in order per stream), for an engine that several servers share;
    /// `None` (the default) where this server is the only writer. Taken
    /// once, by the log, which moves each stream's head with them.
    fn remote_heads(&self) -> Option<tokio::sync::mpsc::Receiver<RemoteHead>> {
        None
    }

    // ---- events ----

    /// The chunks holding `[offset, end)` in order, from the one holding
    /// `offset`, until they hold `max_events` events from `offset` on or
    /// about `max_bytes` were read (at least one chunk). With `keep`, only
    /// the records it selects are decoded. Damage is an error, never a gap.
    fn read_chunks(
        &self,
        stream_id: u64,
        offset: u64,
        end: u64,
        max_events: usize,
        max_bytes: usize,
        keep: Option<Keep<'_>>,
    ) -> Result<Vec<Chunk>, StorageError>;

    /// The first offset in `[first, end)` appended at or after the time
    /// (`end` when none): O(log n) chunk lookups.
    fn offset_at_time(
        &self,
        stream_id: u64,
        first: u64,
        end: u64,
        time_unix_nanos: i64,
    ) -> Result<u64, StorageError>;

    /// Shows `visit` the header and encoded size of the oldest chunks, in
    /// order, until it returns false or `limit` were shown (retention's
    /// question).
    fn visit_oldest_chunks(
        &self,
        stream_id: u64,
        limit: usize,
        visit: &mut dyn FnMut(ChunkHeader, u64) -> bool,
    ) -> Result<(), StorageError>;

    // ---- idempotency ----

    /// A remembered idempotency key of a stream.
    fn get_idempotency(
        &self,
        stream_id: u64,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StorageError>;

    /// The keys remembered before the cutoff (and any undecodable).
    fn expired_idempotency(
        &self,
        stream_id: u64,
        cutoff_unix_nanos: i64,
    ) -> Result<Vec<String>, StorageError>;

    /// Prepares forgetting idempotency keys (expiry).
    fn forget_idempotency(&self, stream_id: u64, keys: &[String])
        -> Result<Prepared, StorageError>;

    // ---- consumers and groups ----

    /// Prepares saving a durable consumer.
    fn put_consumer(
        &self,
        stream_id: u64,
        name: &str,
        record: &ConsumerRecord,
    ) -> Result<Prepared, StorageError>;

    /// Prepares removing a durable consumer.
    fn delete_consumer(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError>;

    /// A durable consumer as stored now, for an engine that several
    /// servers share (another one may have committed it since this server
    /// loaded it); `None` when there is none. Asked only when
    /// [`Engine::shared`].
    fn stored_consumer(
        &self,
        _stream_id: u64,
        _name: &str,
    ) -> Result<Option<ConsumerRecord>, StorageError> {
        Ok(None)
    }

    /// Every durable consumer of a stream as stored now, in name order
    /// (shared engines; see [`Engine::stored_consumer`]).
    fn stored_consumers(
        &self,
        _stream_id: u64,
    ) -> Result<Vec<(String, ConsumerRecord)>, StorageError> {
        Ok(Vec::new())
    }

    /// Claims a consumer's one subscription for this server, cluster-wide,
    /// durably before it returns; returns the claim's revision (claims are
    /// ordered by it). Other servers hear of it through
    /// [`Engine::remote_claims`] and end their older subscription. Engines
    /// only this server uses return 0 (leases in memory suffice).
    fn claim_consumer(&self, _stream_id: u64, _name: &str) -> Result<u64, StorageError> {
        Ok(0)
    }

    /// Gives up a claim made by [`Engine::claim_consumer`] (its
    /// subscription ended), unless a newer claim replaced it. In the
    /// background: it returns at once, and a release that fails leaves the
    /// claim to expire with its server.
    fn release_consumer(&self, _stream_id: u64, _name: &str, _claim: u64) {}

    /// What other servers change in consumers' claims and groups'
    /// membership, in the order the engine decided it, for an engine that
    /// several servers share; `None` (the default) otherwise. Taken once,
    /// by the log.
    fn remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<RemoteChange>> {
        None
    }

    /// Prepares saving a consumer group's slot offsets: the whole record,
    /// or (`slots`) only those slots of it, which an engine several
    /// servers share merges into what others stored meanwhile.
    fn put_group(
        &self,
        stream_id: u64,
        name: &str,
        record: &GroupRecord,
        slots: Option<&[usize]>,
    ) -> Result<Prepared, StorageError>;

    /// A group's record as stored now (shared engines: members on other
    /// servers commit their slots); `None` when there is none. Asked only
    /// when [`Engine::shared`].
    fn stored_group(
        &self,
        _stream_id: u64,
        _name: &str,
    ) -> Result<Option<GroupRecord>, StorageError> {
        Ok(None)
    }

    /// The names of a stream's groups as stored now (shared engines:
    /// groups made through other servers count against
    /// `--max-groups-per-stream` too). Asked only when [`Engine::shared`].
    fn stored_group_names(&self, _stream_id: u64) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }

    /// Makes a group member known to every server, durably before it
    /// returns; returns the join's revision (0 for engines only this
    /// server uses: membership in memory suffices). A newer join of the
    /// same member elsewhere ends this one ([`RemoteChange::Member`]).
    fn join_member(
        &self,
        _stream_id: u64,
        _group: &str,
        _member: &str,
    ) -> Result<u64, StorageError> {
        Ok(0)
    }

    /// The revision of a group member's join as stored, if it is joined
    /// (shared engines).
    fn stored_member(
        &self,
        _stream_id: u64,
        _group: &str,
        _member: &str,
    ) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }

    /// Ends the join made at `revision`, unless a newer one replaced it (in
    /// the background; a leave that fails expires with its server).
    fn leave_member(&self, _stream_id: u64, _group: &str, _member: &str, _revision: u64) {}

    /// Forwards a group member's commit to the server it is connected to
    /// (shared engines: `CommitGroup` may reach any of them), which
    /// answers as its own `CommitGroup` would; `None` when no other server
    /// has the member joined (or the one that had is gone).
    fn forward_group_commit(
        &self,
        _stream_id: u64,
        _group: &str,
        _member: &str,
        _next_offset: u64,
    ) -> Result<Option<ForwardedAnswer>, StorageError> {
        Ok(None)
    }

    /// Asks the server a group member is connected to which generation
    /// of its group's assignment the member's client has been told of
    /// (shared engines: a slot moving from it starts elsewhere once it
    /// was told); `None` when the member is connected nowhere (gone: its
    /// slots move at once).
    fn ask_told(
        &self,
        _stream_id: u64,
        _group: &str,
        _member: &str,
    ) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }

    /// The calls other servers forward to members connected here
    /// ([`Engine::forward_group_commit`], [`Engine::ask_told`]), for an
    /// engine several servers share; `None` (the default) otherwise.
    /// Taken once, by the log.
    fn forwarded(&self) -> Option<tokio::sync::mpsc::Receiver<Forwarded>> {
        None
    }

    /// A group's assignment and its revision, as stored (shared engines).
    fn stored_assignment(
        &self,
        _stream_id: u64,
        _group: &str,
    ) -> Result<Option<(Assignment, u64)>, StorageError> {
        Ok(None)
    }

    /// Stores a group's assignment if the stored one is still at
    /// `expected` (0: none stored); false when another server changed it
    /// first (read it again and decide).
    fn put_assignment(
        &self,
        _stream_id: u64,
        _group: &str,
        _assignment: &Assignment,
        _expected: u64,
    ) -> Result<bool, StorageError> {
        Ok(true)
    }

    /// Prepares removing a consumer group.
    fn delete_group(&self, stream_id: u64, name: &str) -> Result<Prepared, StorageError>;

    // ---- API keys (opaque records: `auth` encodes them) ----

    /// Every stored API key record, by id.
    fn api_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError>;

    /// Saves an API key record, durably before it returns.
    fn put_api_key(&self, id: &str, record: Vec<u8>) -> Result<(), StorageError>;

    // ---- durability ----

    /// Makes prepared changes durable and visible to reads, in order, all
    /// with one sync where the engine can. A change whose write failed is
    /// never applied. Returns what a checkpoint may now cover, when one is
    /// due (engines without checkpoints return `None`).
    fn commit(&self, changes: Vec<Prepared>) -> Result<Option<u64>, StorageError>;

    /// Makes the engine's state durable up to what `covered` names (from
    /// [`Engine::commit`]) so the records it covers can go. Slow: run it in
    /// the background.
    fn checkpoint(&self, covered: u64) -> Result<(), StorageError>;

    /// Why writes are refused, once a write or sync failed (until restart).
    fn failure(&self) -> Option<String>;

    /// Why the engine could not take a write right now, found by a cheap
    /// write of its own (a cluster that lost its quorum), or `None`. The
    /// server asks every second and reports the answer in health. Engines
    /// that can only fail on a real write (sled) keep the default.
    fn probe(&self) -> Option<String> {
        None
    }

    /// The last checkpoint on shutdown (nothing to replay on the next
    /// start).
    fn close(&self) -> Result<(), StorageError>;

    /// Where the engine keeps its files (for logs and disk metrics).
    fn path(&self) -> &Path;
}
