//! The log's settings: the part of the server's configuration the stream
//! layer reads, and the caps on what clients can create.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Durability, ServerConfig};

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
    /// fsync mode: the bytes of applied changes between storage's
    /// background flushes, if any.
    pub storage_flush_bytes: Option<u64>,
    /// The free-space floor (`None`: the default for the volume).
    pub min_free_bytes: Option<u64>,
    /// Check every stored event before opening (`--verify-on-start`).
    pub verify_on_start: bool,
    /// Which engine stores the events.
    pub engine: crate::config::EngineConfig,
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
            storage_flush_bytes: c.storage_flush_bytes,
            min_free_bytes: c.min_free_bytes,
            verify_on_start: c.verify_on_start,
            engine: c.engine.clone(),
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
