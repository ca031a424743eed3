//! Prometheus metrics: what operators graph and alert on.
//!
//! One [`Metrics`] per log (not a process-wide global), so servers embedded
//! side by side, as in the tests, keep their own numbers. Hot paths hold
//! cheap clones of their counters ([`StreamMetrics`]) and never look a
//! label up per event. Values that already live in the log (heads, bytes,
//! consumer lag) and process facts (RSS, data dir size) are read when
//! Prometheus scrapes, by [`Metrics::encode`].
//!
//! The endpoint has no authentication, so by default it names nothing a
//! tenant chose: per-stream series add up under `stream="_all"` and lag is
//! reported as the largest lag (`consumer="_max"`, `group="_max"`). With
//! `--metrics-stream-labels` streams, consumers and groups are labelled by
//! their stored names (`acme/orders`), for an operator who scrapes from a
//! trusted network.
//!
//! Label cardinality stays bounded either way: with names, each tenant's
//! first [`MAX_STREAM_LABELS`] streams get a label of their own and the
//! rest of that tenant's share `<tenant>/_other` (so one tenant cannot take
//! every label), and at most [`MAX_CONSUMER_SERIES`] lag series are
//! reported. Nothing is labelled by key or event.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Streams per tenant that get a label of their own (with stream labels
/// on); the rest of the tenant's are counted under [`OTHER_STREAMS`].
pub const MAX_STREAM_LABELS: usize = 100;

/// The stream label (after the tenant's `tenant/`) shared by a tenant's
/// streams past the cap.
pub const OTHER_STREAMS: &str = "_other";

/// The stream label of every series when stream labels are off.
pub const ALL_STREAMS: &str = "_all";

/// The consumer and group label of the largest lag when stream labels are
/// off.
pub const MAX_LAG: &str = "_max";

/// The most consumer- and group-lag series one scrape reports.
pub const MAX_CONSUMER_SERIES: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    stream: String,
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    stream: String,
    group: String,
}

/// A stream's counters (clones share the values).
#[derive(Clone, Debug, Default)]
pub struct StreamMetrics {
    /// Events acknowledged to producers.
    pub appended_events: Counter,
    /// Encoded bytes of those events.
    pub appended_bytes: Counter,
    /// Events sent to subscribers.
    pub delivered_events: Counter,
    /// Events removed by retention.
    pub trimmed_events: Counter,
}

/// Counts one open subscription while alive.
#[derive(Debug)]
pub struct ActiveSubscription(Gauge);

/// Whether writes are refused, for the scrape.
#[derive(Debug, Clone, Default)]
pub struct WriteRefusal {
    /// Why, when they are.
    pub reason: Option<String>,
    /// Whether the cause is a storage failure (only a restart ends it).
    pub storage_failed: bool,
}

impl ActiveSubscription {
    /// Counts a subscription in.
    pub fn new(metrics: &Metrics) -> ActiveSubscription {
        metrics.active_subscriptions.inc();
        ActiveSubscription(metrics.active_subscriptions.clone())
    }
}

impl Drop for ActiveSubscription {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a scrape reads from the log.
#[derive(Debug, Clone, Default)]
pub struct StreamSnapshot {
    /// The stored stream name.
    pub name: String,
    /// The head.
    pub next_offset: u64,
    /// The first retained offset.
    pub first_offset: u64,
    /// Approximate stored bytes.
    pub bytes: u64,
    /// Durable consumers with their lag.
    pub consumers: Vec<ConsumerLag>,
    /// Consumer groups with their lag (head minus low watermark).
    pub groups: Vec<(String, u64)>,
}

/// A durable consumer's lag, in events and in time.
#[derive(Debug, Clone, Default)]
pub struct ConsumerLag {
    /// The consumer's name.
    pub name: String,
    /// The head minus the cursor.
    pub events: u64,
    /// The age of the event at the cursor (the oldest one not passed), in
    /// seconds; 0 when the consumer has no lag.
    pub seconds: f64,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    appended_events: Family<StreamLabel, Counter>,
    appended_bytes: Family<StreamLabel, Counter>,
    delivered_events: Family<StreamLabel, Counter>,
    trimmed_events: Family<StreamLabel, Counter>,
    /// Append calls, from arrival to acknowledgement.
    pub append_latency: Histogram,
    /// Write-ahead log syncs (`fsync` mode).
    pub flush_latency: Histogram,
    /// Events made durable by one sync (`fsync`) or one write (`buffered`).
    pub group_commit_events: Histogram,
    /// Damaged or missing ranges of events found by reads (each counted
    /// once per stream and first offset).
    pub data_loss: Counter,
    /// Log writes that met a full disk and were rolled back (their
    /// changes refused with RESOURCE_EXHAUSTED, the log still usable).
    pub writes_rolled_back: Counter,
    /// Open subscriptions.
    pub active_subscriptions: Gauge,
    /// Bytes held by every stream's caches together (set at scrape).
    pub stream_caches: Gauge,
    /// Bytes of written changes waiting for a sync (set at scrape).
    pub commit_queue: Gauge,
    stream_head: Family<StreamLabel, Gauge>,
    stream_first: Family<StreamLabel, Gauge>,
    stream_bytes: Family<StreamLabel, Gauge>,
    consumer_lag: Family<ConsumerLabels, Gauge>,
    consumer_lag_seconds: Family<ConsumerLabels, Gauge<f64, AtomicU64>>,
    group_lag: Family<GroupLabels, Gauge>,
    data_dir_bytes: Gauge,
    data_dir_free_bytes: Gauge,
    writes_refused: Gauge,
    storage_failed: Gauge,
    rss_bytes: Gauge,
    /// Whether series are labelled by stream, consumer and group names.
    stream_labels: bool,
    /// Streams with a label of their own, and how many each tenant has.
    labelled: Mutex<Labelled>,
    /// Held through a scrape: scrape-time gauges are cleared and refilled,
    /// and two scrapes at once must not see each other's half-filled state.
    scrape: Mutex<()>,
}

#[derive(Debug, Default)]
struct Labelled {
    streams: HashSet<String>,
    per_tenant: HashMap<String, usize>,
}

use crate::names::tenant_of;

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new(false)
    }
}

impl Metrics {
    /// Registers every series; `stream_labels` as `--metrics-stream-labels`
    /// (see the module docs).
    pub fn new(stream_labels: bool) -> Metrics {
        let mut registry = Registry::with_prefix("pullstream");
        let m = Metrics {
            appended_events: Family::default(),
            appended_bytes: Family::default(),
            delivered_events: Family::default(),
            trimmed_events: Family::default(),
            // 50 µs to about 1.6 s.
            append_latency: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            flush_latency: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            // 1 to 32768 events.
            group_commit_events: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            data_loss: Counter::default(),
            writes_rolled_back: Counter::default(),
            active_subscriptions: Gauge::default(),
            stream_caches: Gauge::default(),
            commit_queue: Gauge::default(),
            stream_head: Family::default(),
            stream_first: Family::default(),
            stream_bytes: Family::default(),
            consumer_lag: Family::default(),
            consumer_lag_seconds: Family::default(),
            group_lag: Family::default(),
            data_dir_bytes: Gauge::default(),
            data_dir_free_bytes: Gauge::default(),
            writes_refused: Gauge::default(),
            storage_failed: Gauge::default(),
            rss_bytes: Gauge::default(),
            stream_labels,
            labelled: Mutex::new(Labelled::default()),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "appended_events",
            "Events appended (acknowledged), by stream",
            m.appended_events.clone(),
        );
        registry.register_with_unit(
            "appended",
            "Encoded bytes of appended events, by stream",
            Unit::Bytes,
            m.appended_bytes.clone(),
        );
        registry.register(
            "delivered_events",
            "Events sent to subscribers, by stream",
            m.delivered_events.clone(),
        );
        registry.register(
            "trimmed_events",
            "Events removed by retention, by stream",
            m.trimmed_events.clone(),
        );
        registry.register_with_unit(
            "append_latency",
            "Append calls from arrival to acknowledgement",
            Unit::Seconds,
            m.append_latency.clone(),
        );
        registry.register_with_unit(
            "flush_latency",
            "Write-ahead log writes with fdatasync (fsync durability)",
            Unit::Seconds,
            m.flush_latency.clone(),
        );
        registry.register(
            "data_loss_ranges",
            "Ranges of retained events found damaged or missing in storage (reads get DATA_LOSS)",
            m.data_loss.clone(),
        );
        registry.register(
            "log_writes_rolled_back",
            "Write-ahead log writes that met a full disk and were rolled back: their changes got RESOURCE_EXHAUSTED and nothing of them was written; writes go on without a restart",
            m.writes_rolled_back.clone(),
        );
        registry.register(
            "group_commit_events",
            "Events made durable together by one sync",
            m.group_commit_events.clone(),
        );
        registry.register(
            "active_subscriptions",
            "Open Subscribe calls",
            m.active_subscriptions.clone(),
        );
        registry.register_with_unit(
            "stream_caches",
            "Bytes in every stream's tail cache and shared reads together (at most --stream-cache-budget-bytes)",
            Unit::Bytes,
            m.stream_caches.clone(),
        );
        registry.register_with_unit(
            "commit_queue",
            "Bytes of written changes waiting for the write-ahead log's sync (at most 64 MiB; writers wait past it)",
            Unit::Bytes,
            m.commit_queue.clone(),
        );
        registry.register(
            "stream_next_offset",
            "The offset the next event gets (the head), by stream",
            m.stream_head.clone(),
        );
        registry.register(
            "stream_first_offset",
            "The first retained offset, by stream",
            m.stream_first.clone(),
        );
        registry.register_with_unit(
            "stream_stored",
            "Approximate stored bytes, by stream",
            Unit::Bytes,
            m.stream_bytes.clone(),
        );
        registry.register(
            "consumer_lag_events",
            "Events between a durable consumer's cursor and the head",
            m.consumer_lag.clone(),
        );
        registry.register_with_unit(
            "consumer_lag",
            "Age of the oldest event a durable consumer has not passed (0 when it has no lag)",
            Unit::Seconds,
            m.consumer_lag_seconds.clone(),
        );
        registry.register(
            "group_lag_events",
            "Events between a consumer group's low watermark and the head",
            m.group_lag.clone(),
        );
        registry.register_with_unit(
            "data_dir",
            "Bytes of files in the data dir (-1 in cluster mode: the engine keeps none there)",
            Unit::Bytes,
            m.data_dir_bytes.clone(),
        );
        registry.register_with_unit(
            "data_dir_free",
            "Bytes free under the data dir (appends and creations stop below --min-free-bytes; -1 when unknown or in cluster mode)",
            Unit::Bytes,
            m.data_dir_free_bytes.clone(),
        );
        registry.register(
            "writes_refused",
            "1 while appends and creations are refused (disk below the free-space floor, or storage failed), else 0",
            m.writes_refused.clone(),
        );
        registry.register(
            "storage_failed",
            "1 after a failed write or sync of the write-ahead log or a checkpoint: every write is refused until a restart",
            m.storage_failed.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident set size of the server process",
            Unit::Bytes,
            m.rss_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The label a stream's series get: `_all` with stream labels off,
    /// else its name while its tenant is under the cap.
    fn label(&self, stream: &str) -> StreamLabel {
        if !self.stream_labels {
            return StreamLabel {
                stream: ALL_STREAMS.to_string(),
            };
        }
        let mut labelled = self.labelled.lock().expect("metrics lock");
        if labelled.streams.contains(stream) {
            return StreamLabel {
                stream: stream.to_string(),
            };
        }
        let tenant = tenant_of(stream);
        let count = labelled.per_tenant.entry(tenant.to_string()).or_default();
        let stream = if *count < MAX_STREAM_LABELS {
            *count += 1;
            labelled.streams.insert(stream.to_string());
            stream.to_string()
        } else if tenant.is_empty() {
            OTHER_STREAMS.to_string()
        } else {
            format!("{tenant}/{OTHER_STREAMS}")
        };
        StreamLabel { stream }
    }

    /// The counters of a stream (created at zero).
    pub fn stream(&self, name: &str) -> StreamMetrics {
        let label = self.label(name);
        StreamMetrics {
            appended_events: self.appended_events.get_or_create_owned(&label),
            appended_bytes: self.appended_bytes.get_or_create_owned(&label),
            delivered_events: self.delivered_events.get_or_create_owned(&label),
            trimmed_events: self.trimmed_events.get_or_create_owned(&label),
        }
    }

    /// Forgets a deleted stream's series, freeing its label.
    pub fn remove_stream(&self, name: &str) {
        let removed = {
            let mut labelled = self.labelled.lock().expect("metrics lock");
            let removed = labelled.streams.remove(name);
            if removed {
                if let Some(count) = labelled.per_tenant.get_mut(tenant_of(name)) {
                    *count -= 1;
                }
            }
            removed
        };
        if removed {
            let label = StreamLabel {
                stream: name.to_string(),
            };
            for family in [
                &self.appended_events,
                &self.appended_bytes,
                &self.delivered_events,
                &self.trimmed_events,
            ] {
                family.remove(&label);
            }
        }
    }

    /// Records an Append call's latency.
    pub fn observe_append(&self, elapsed: Duration) {
        self.append_latency.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every series, with the scrape-time
    /// values read from `streams` and the data dir (`None`: the engine
    /// keeps nothing there).
    pub fn encode(
        &self,
        streams: &[StreamSnapshot],
        data_dir: Option<&Path>,
        refusal: &WriteRefusal,
    ) -> String {
        let _scraping = self.scrape.lock().expect("scrape lock");
        for family in [&self.stream_head, &self.stream_first, &self.stream_bytes] {
            family.clear();
        }
        self.consumer_lag.clear();
        self.consumer_lag_seconds.clear();
        self.group_lag.clear();
        let mut lag_series = 0;
        let (mut max_consumer_lag, mut max_group_lag) = (None::<u64>, None::<u64>);
        let mut max_lag_seconds = None::<f64>;
        for s in streams {
            let label = self.label(&s.name);
            // Streams past the cap add up under one label.
            self.stream_head
                .get_or_create(&label)
                .inc_by(s.next_offset as i64);
            self.stream_first
                .get_or_create(&label)
                .inc_by(s.first_offset as i64);
            self.stream_bytes
                .get_or_create(&label)
                .inc_by(s.bytes as i64);
            if !self.stream_labels {
                for lag in &s.consumers {
                    max_consumer_lag = max_consumer_lag.max(Some(lag.events));
                    max_lag_seconds = Some(max_lag_seconds.unwrap_or(0.0).max(lag.seconds));
                }
                for (_, lag) in &s.groups {
                    max_group_lag = max_group_lag.max(Some(*lag));
                }
                continue;
            }
            // Past its tenant's cap the stream shares a label: no lag
            // series of its own.
            if label.stream != s.name {
                continue;
            }
            for lag in &s.consumers {
                if lag_series == MAX_CONSUMER_SERIES {
                    break;
                }
                lag_series += 1;
                let labels = ConsumerLabels {
                    stream: s.name.clone(),
                    consumer: lag.name.clone(),
                };
                self.consumer_lag
                    .get_or_create(&labels)
                    .set(lag.events as i64);
                self.consumer_lag_seconds
                    .get_or_create(&labels)
                    .set(lag.seconds);
            }
            for (group, lag) in &s.groups {
                if lag_series == MAX_CONSUMER_SERIES {
                    break;
                }
                lag_series += 1;
                self.group_lag
                    .get_or_create(&GroupLabels {
                        stream: s.name.clone(),
                        group: group.clone(),
                    })
                    .set(*lag as i64);
            }
        }
        let max_labels = ConsumerLabels {
            stream: ALL_STREAMS.to_string(),
            consumer: MAX_LAG.to_string(),
        };
        if let Some(lag) = max_consumer_lag {
            self.consumer_lag.get_or_create(&max_labels).set(lag as i64);
        }
        if let Some(seconds) = max_lag_seconds {
            self.consumer_lag_seconds
                .get_or_create(&max_labels)
                .set(seconds);
        }
        if let Some(lag) = max_group_lag {
            self.group_lag
                .get_or_create(&GroupLabels {
                    stream: ALL_STREAMS.to_string(),
                    group: MAX_LAG.to_string(),
                })
                .set(lag as i64);
        }
        // -1: no data dir (cluster mode), or its free space is unknown.
        self.data_dir_bytes
            .set(data_dir.map_or(-1, |dir| dir_size(dir) as i64));
        self.data_dir_free_bytes.set(
            data_dir
                .and_then(crate::durability::space::free_bytes)
                .map_or(-1, |b| b as i64),
        );
        self.writes_refused.set(i64::from(refusal.reason.is_some()));
        self.storage_failed.set(i64::from(refusal.storage_failed));
        self.rss_bytes.set(resident_bytes() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The bytes of every file under `dir` (0 for what cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_size(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The process's resident set size, from `/proc/self/statm` (0 where
/// there is none).
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(name: &str, events: u64, seconds: f64) -> ConsumerLag {
        ConsumerLag {
            name: name.into(),
            events,
            seconds,
        }
    }

    #[test]
    fn streams_past_the_cap_share_one_label_and_deleted_ones_free_theirs() {
        let metrics = Metrics::new(true);
        for i in 0..MAX_STREAM_LABELS {
            metrics.stream(&format!("s{i}")).appended_events.inc();
        }
        let late = metrics.stream("late");
        late.appended_events.inc_by(5);
        metrics.stream("later").appended_events.inc_by(2);
        let text = metrics.encode(
            &[],
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        assert!(
            text.contains("pullstream_appended_events_total{stream=\"_other\"} 7"),
            "{text}"
        );
        assert!(text.contains("pullstream_appended_events_total{stream=\"s0\"} 1"));
        assert!(!text.contains("stream=\"late\""));

        metrics.remove_stream("s0");
        metrics.stream("newcomer").appended_events.inc();
        let text = metrics.encode(
            &[],
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        assert!(!text.contains("stream=\"s0\""));
        assert!(text.contains("pullstream_appended_events_total{stream=\"newcomer\"} 1"));
    }

    #[test]
    fn scrape_values_come_from_the_snapshot() {
        let metrics = Metrics::new(true);
        let snapshot = StreamSnapshot {
            name: "orders".into(),
            next_offset: 42,
            first_offset: 7,
            bytes: 1000,
            consumers: vec![lag("billing", 12, 2.5)],
            groups: vec![("shippers".into(), 30)],
        };
        let text = metrics.encode(
            &[snapshot],
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        assert!(
            text.contains("pullstream_stream_next_offset{stream=\"orders\"} 42"),
            "{text}"
        );
        assert!(text.contains("pullstream_stream_first_offset{stream=\"orders\"} 7"));
        assert!(text
            .contains("pullstream_consumer_lag_events{stream=\"orders\",consumer=\"billing\"} 12"));
        assert!(
            text.contains(
                "pullstream_consumer_lag_seconds{stream=\"orders\",consumer=\"billing\"} 2.5"
            ),
            "{text}"
        );
        assert!(
            text.contains("pullstream_group_lag_events{stream=\"orders\",group=\"shippers\"} 30")
        );
        // Gone from the next snapshot, gone from the scrape.
        let text = metrics.encode(
            &[],
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        assert!(!text.contains("stream=\"orders\""));
        assert!(resident_bytes() > 0);
    }

    #[test]
    fn each_tenant_has_its_own_label_cap() {
        let metrics = Metrics::new(true);
        for i in 0..MAX_STREAM_LABELS + 3 {
            metrics
                .stream(&format!("greedy/s{i}"))
                .appended_events
                .inc();
        }
        metrics.stream("other/orders").appended_events.inc();
        let text = metrics.encode(
            &[],
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        assert!(
            text.contains("pullstream_appended_events_total{stream=\"greedy/_other\"} 3"),
            "{text}"
        );
        assert!(text.contains("pullstream_appended_events_total{stream=\"other/orders\"} 1"));
    }

    #[test]
    fn without_stream_labels_no_name_a_tenant_chose_is_shown() {
        let metrics = Metrics::default();
        metrics
            .stream("acme/payroll.2026")
            .appended_events
            .inc_by(4);
        metrics.stream("plain").appended_events.inc_by(1);
        let snapshots = [
            StreamSnapshot {
                name: "acme/payroll.2026".into(),
                next_offset: 4,
                first_offset: 0,
                bytes: 10,
                consumers: vec![lag("salaries", 3, 1.0), lag("audit", 1, 7.0)],
                groups: vec![("workers".into(), 2)],
            },
            StreamSnapshot {
                name: "plain".into(),
                next_offset: 1,
                first_offset: 0,
                bytes: 10,
                consumers: vec![lag("c", 0, 0.0)],
                groups: Vec::new(),
            },
        ];
        let text = metrics.encode(
            &snapshots,
            Some(Path::new("/nonexistent")),
            &WriteRefusal::default(),
        );
        for name in ["acme", "payroll", "salaries", "audit", "workers", "plain"] {
            assert!(!text.contains(name), "{name} shown in:\n{text}");
        }
        assert!(text.contains("pullstream_appended_events_total{stream=\"_all\"} 5"));
        assert!(text.contains("pullstream_stream_next_offset{stream=\"_all\"} 5"));
        assert!(
            text.contains("pullstream_consumer_lag_events{stream=\"_all\",consumer=\"_max\"} 3")
        );
        assert!(
            text.contains("pullstream_consumer_lag_seconds{stream=\"_all\",consumer=\"_max\"} 7.0"),
            "{text}"
        );
        assert!(text.contains("pullstream_group_lag_events{stream=\"_all\",group=\"_max\"} 2"));
    }
}
