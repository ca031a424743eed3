//! Server configuration: raw settings from flags, `PULLSTREAM_*` environment
//! variables and an optional TOML file become one validated [`ServerConfig`]
//! in a single step, before any port is bound or file opened.
//!
//! Precedence: command-line flag, then environment variable (clap handles
//! both), then the config file, then the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::storage::MAX_INLINE_VALUE;

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge only once the batch is on stable storage (fdatasync).
    Fsync,
    /// Acknowledge once the batch is written to the store's memory; it is
    /// handed to the OS within a few milliseconds.
    Buffered,
}

/// Where events and state are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The embedded sled store in --data-dir (the default).
    Sled,
    /// A NATS JetStream cluster (--nats-url); work in progress, one
    /// gateway per cluster for now (see ARCHITECTURE.md).
    Jetstream,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Fsync => "fsync",
            Durability::Buffered => "buffered",
        })
    }
}

/// A listen address: `IP:PORT`, or `HOST:PORT` resolved now (its first
/// address, so `localhost:50051` listens on loopback).
fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    use std::net::ToSocketAddrs;
    let mut addresses = value.to_socket_addrs().map_err(|e| {
        format!("{value:?} is not an address to listen on ({e}): write IP:PORT or HOST:PORT, like 127.0.0.1:50051 or localhost:50051")
    })?;
    // Prefer IPv4 loopback for `localhost`, where both resolve.
    let all: Vec<SocketAddr> = addresses.by_ref().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{value:?} resolves to no address"))
}

/// A duration written as `10s`, `500ms`, `24h` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("{e} (write durations like 500ms, 10s, 5m, 24h)"))
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// `pullstream serve` settings as given: every field optional so the three
/// sources can be layered. The same struct is the TOML file's schema.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeSettings {
    /// Directory holding the event store [default: ./pullstream-data]
    #[arg(long, env = "PULLSTREAM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on for gRPC, gRPC-Web and the HTTP API, as IP:PORT or HOST:PORT (e.g. localhost:50051) [default: 127.0.0.1:50051]
    #[arg(long, env = "PULLSTREAM_LISTEN", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// When appends are acknowledged: after fdatasync, or after the write [default: fsync]
    #[arg(long, env = "PULLSTREAM_DURABILITY")]
    pub durability: Option<Durability>,
    /// Heartbeat period on idle subscriptions [default: 10s]
    #[arg(long, env = "PULLSTREAM_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<HumanDuration>,
    /// Largest event accepted, in bytes, all fields counted [default: 1048576]
    #[arg(long, env = "PULLSTREAM_MAX_EVENT_BYTES")]
    pub max_event_bytes: Option<usize>,
    /// Most events accepted in one Append [default: 1000]
    #[arg(long, env = "PULLSTREAM_MAX_BATCH_EVENTS")]
    pub max_batch_events: Option<usize>,
    /// Largest Append accepted, in bytes [default: 16777216]
    #[arg(long, env = "PULLSTREAM_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// Storage page cache size in bytes [default: 268435456]
    #[arg(long, env = "PULLSTREAM_CACHE_BYTES")]
    pub cache_bytes: Option<u64>,
    /// Per-stream cache of recently appended events for live subscribers, in bytes [default: 8388608]
    #[arg(long, env = "PULLSTREAM_TAIL_CACHE_BYTES")]
    pub tail_cache_bytes: Option<usize>,
    /// Memory for all streams' caches together (tail caches and shared group reads), in bytes; past it caches give way and readers read storage [default: 268435456]
    #[arg(long, env = "PULLSTREAM_STREAM_CACHE_BUDGET_BYTES")]
    pub stream_cache_budget_bytes: Option<usize>,
    /// How long idempotency keys are remembered [default: 24h]
    #[arg(long, env = "PULLSTREAM_IDEMPOTENCY_WINDOW")]
    pub idempotency_window: Option<HumanDuration>,
    /// Create streams on first Append [default: true]
    #[arg(long, env = "PULLSTREAM_AUTO_CREATE_STREAMS")]
    pub auto_create_streams: Option<bool>,
    /// HTTP/2 keepalive ping period; 0s turns pings off [default: 30s]
    #[arg(long, env = "PULLSTREAM_KEEPALIVE_INTERVAL")]
    pub keepalive_interval: Option<HumanDuration>,
    /// How long to wait for a keepalive ping's answer before closing the connection [default: 20s]
    #[arg(long, env = "PULLSTREAM_KEEPALIVE_TIMEOUT")]
    pub keepalive_timeout: Option<HumanDuration>,
    /// On shutdown, how long to wait for open calls to finish [default: 5s]
    #[arg(long, env = "PULLSTREAM_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<HumanDuration>,
    /// fsync mode: storage writes its changed pages out in the background each time this many more bytes of keys and values have been applied to it, so a checkpoint has little left to flush and sled's writes reach the disk in small steps rather than bursts the log's syncs queue behind; an idle server writes nothing. 0 flushes only at checkpoints [default: 32768]
    #[arg(long, env = "PULLSTREAM_STORAGE_FLUSH_BYTES")]
    pub storage_flush_bytes: Option<u64>,
    /// fsync mode: write-ahead log bytes between checkpoints; larger means fewer storage flushes but a longer replay after a crash [default: 67108864]
    #[arg(long, env = "PULLSTREAM_CHECKPOINT_BYTES")]
    pub checkpoint_bytes: Option<u64>,
    /// Refuse appends and stream creation (RESOURCE_EXHAUSTED) while less than this many bytes are free under the data dir; deletions, trims and consumer commits still work, so space can be freed. 0 turns the floor off [default: 1 GiB or 5% of the volume, whichever is smaller]
    #[arg(long, env = "PULLSTREAM_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// Before serving, check every stored event (checksums, gaps, heads) as `pullstream verify` does, and refuse to start on damage; slow on big data dirs [default: false]
    #[arg(long, env = "PULLSTREAM_VERIFY_ON_START", num_args = 0..=1, default_missing_value = "true")]
    pub verify_on_start: Option<bool>,
    /// Where events are stored: the embedded store in --data-dir, or a NATS JetStream cluster (--nats-url; any number of servers can share one as gateways; see the README's Cluster mode) [default: sled]
    #[arg(long, env = "PULLSTREAM_ENGINE")]
    pub engine: Option<EngineKind>,
    /// With --engine jetstream: the cluster's client URLs, comma-separated (e.g. nats://h1:4222,nats://h2:4222)
    #[arg(long, env = "PULLSTREAM_NATS_URL")]
    pub nats_url: Option<String>,
    /// With --engine jetstream: copies of every stream and record kept by the cluster (1, 3 or 5) [default: 3]
    #[arg(long, env = "PULLSTREAM_REPLICAS")]
    pub replicas: Option<usize>,
    /// With --engine jetstream: the prefix of every JetStream stream and subject this deployment uses, so several can share a cluster (letters, digits, - and _) [default: ps]
    #[arg(long, env = "PULLSTREAM_NATS_NAMESPACE")]
    pub nats_namespace: Option<String>,
    /// With --engine jetstream: connect to the cluster over TLS, trusting the CA certificates in this PEM file (its URLs may then be nats:// or tls://)
    #[arg(long, env = "PULLSTREAM_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// With --engine jetstream: authenticate to the cluster with this NATS credentials file (a user JWT and its nkey seed, as `nsc generate creds` writes; for clusters with decentralized JWT auth)
    #[arg(long, env = "PULLSTREAM_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Serve without API keys on a non-loopback address (anyone who can
    /// reach the port can read and write everything) [default: false]
    #[arg(long, env = "PULLSTREAM_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Serve TLS with this PEM certificate chain (with --tls-key)
    #[arg(long, env = "PULLSTREAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, env = "PULLSTREAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mutual TLS)
    #[arg(long, env = "PULLSTREAM_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Most subscriptions one API key may have open at once; 0 for no limit [default: 64]
    #[arg(long, env = "PULLSTREAM_MAX_SUBSCRIPTIONS_PER_KEY")]
    pub max_subscriptions_per_key: Option<usize>,
    /// Close a connection whose client has not started HTTP/2 (or TLS) within this long [default: 10s]
    #[arg(long, env = "PULLSTREAM_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<HumanDuration>,
    /// Calls per second one API key may make (token bucket, bursts of one second's worth); 0 for no limit [default: 1000]
    #[arg(long, env = "PULLSTREAM_KEY_RATE_LIMIT")]
    pub key_rate_limit: Option<u32>,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics, e.g. 127.0.0.1:9090 [default: off]
    #[arg(long, env = "PULLSTREAM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Most client connections open at once; past it new connections are closed at once [default: 1024]
    #[arg(long, env = "PULLSTREAM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most calls (HTTP/2 streams) one connection may have open at once, subscriptions included; the server advertises it and refuses streams past it [default: 256]
    #[arg(long, env = "PULLSTREAM_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Bytes of request messages the server holds at once, all clients together; calls past it get RESOURCE_EXHAUSTED [default: 268435456]
    #[arg(long, env = "PULLSTREAM_MAX_REQUEST_BYTES_IN_FLIGHT")]
    pub max_request_bytes_in_flight: Option<usize>,
    /// How long a call's request message may take to arrive; slower calls get DEADLINE_EXCEEDED [default: 30s]
    #[arg(long, env = "PULLSTREAM_REQUEST_BODY_TIMEOUT")]
    pub request_body_timeout: Option<HumanDuration>,
    /// Most batches an append pipeline may have unacknowledged; clients asking for more get this [default: 64]
    #[arg(long, env = "PULLSTREAM_MAX_PIPELINE_BATCHES")]
    pub max_pipeline_batches: Option<u32>,
    /// Most bytes of batches an append pipeline may have unacknowledged (one batch is always allowed) [default: 16777216]
    #[arg(long, env = "PULLSTREAM_MAX_PIPELINE_BYTES")]
    pub max_pipeline_bytes: Option<u64>,
    /// Label metrics by stream, consumer and group names (`acme/orders`); off, series add up under stream="_all" and lag is the largest, so the unauthenticated endpoint names nothing a tenant chose [default: false]
    #[arg(long, env = "PULLSTREAM_METRICS_STREAM_LABELS", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_stream_labels: Option<bool>,
    /// Allow --metrics-listen on an address that is not loopback (the endpoint has no authentication) [default: false]
    #[arg(long, env = "PULLSTREAM_METRICS_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_insecure: Option<bool>,
    /// Most streams one tenant may have; creation past it (explicit or by Append) gets RESOURCE_EXHAUSTED [default: 10000]
    #[arg(long, env = "PULLSTREAM_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Most durable consumers one stream may have [default: 1000]
    #[arg(long, env = "PULLSTREAM_MAX_CONSUMERS_PER_STREAM")]
    pub max_consumers_per_stream: Option<usize>,
    /// Most consumer groups one stream may have [default: 100]
    #[arg(long, env = "PULLSTREAM_MAX_GROUPS_PER_STREAM")]
    pub max_groups_per_stream: Option<usize>,
    /// Most members one consumer group may have at once [default: 1000]
    #[arg(long, env = "PULLSTREAM_MAX_MEMBERS_PER_GROUP")]
    pub max_members_per_group: Option<usize>,
    /// Let browser pages from these origins call the HTTP API and gRPC-Web (CORS), comma-separated, e.g. https://app.example.com; `*` for any origin [default: off]
    #[arg(long, env = "PULLSTREAM_HTTP_CORS_ORIGIN")]
    pub http_cors_origin: Option<String>,
    /// How long the server keeps one Server-Sent Events response open before ending it, so buffering proxies deliver what they hold; browsers reconnect and resume by themselves [default: 60s]
    #[arg(long, env = "PULLSTREAM_SSE_MAX_DURATION")]
    pub sse_max_duration: Option<HumanDuration>,
}

impl ServeSettings {
    /// Reads a TOML config file with the same keys as the flags
    /// (`data-dir = "..."`, `durability = "fsync"`, `heartbeat-interval = "10s"`).
    pub fn from_file(path: &Path) -> Result<ServeSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Fills every unset field from `fallback`.
    pub fn or(self, fallback: ServeSettings) -> ServeSettings {
        ServeSettings {
            data_dir: self.data_dir.or(fallback.data_dir),
            listen: self.listen.or(fallback.listen),
            durability: self.durability.or(fallback.durability),
            heartbeat_interval: self.heartbeat_interval.or(fallback.heartbeat_interval),
            max_event_bytes: self.max_event_bytes.or(fallback.max_event_bytes),
            max_batch_events: self.max_batch_events.or(fallback.max_batch_events),
            max_batch_bytes: self.max_batch_bytes.or(fallback.max_batch_bytes),
            cache_bytes: self.cache_bytes.or(fallback.cache_bytes),
            tail_cache_bytes: self.tail_cache_bytes.or(fallback.tail_cache_bytes),
            stream_cache_budget_bytes: self
                .stream_cache_budget_bytes
                .or(fallback.stream_cache_budget_bytes),
            idempotency_window: self.idempotency_window.or(fallback.idempotency_window),
            auto_create_streams: self.auto_create_streams.or(fallback.auto_create_streams),
            keepalive_interval: self.keepalive_interval.or(fallback.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout.or(fallback.keepalive_timeout),
            shutdown_grace: self.shutdown_grace.or(fallback.shutdown_grace),
            checkpoint_bytes: self.checkpoint_bytes.or(fallback.checkpoint_bytes),
            storage_flush_bytes: self.storage_flush_bytes.or(fallback.storage_flush_bytes),
            min_free_bytes: self.min_free_bytes.or(fallback.min_free_bytes),
            insecure: self.insecure.or(fallback.insecure),
            verify_on_start: self.verify_on_start.or(fallback.verify_on_start),
            engine: self.engine.or(fallback.engine),
            nats_url: self.nats_url.or(fallback.nats_url),
            replicas: self.replicas.or(fallback.replicas),
            nats_namespace: self.nats_namespace.or(fallback.nats_namespace),
            nats_tls_ca: self.nats_tls_ca.or(fallback.nats_tls_ca),
            nats_creds: self.nats_creds.or(fallback.nats_creds),
            tls_cert: self.tls_cert.or(fallback.tls_cert),
            tls_key: self.tls_key.or(fallback.tls_key),
            tls_client_ca: self.tls_client_ca.or(fallback.tls_client_ca),
            max_subscriptions_per_key: self
                .max_subscriptions_per_key
                .or(fallback.max_subscriptions_per_key),
            key_rate_limit: self.key_rate_limit.or(fallback.key_rate_limit),
            handshake_timeout: self.handshake_timeout.or(fallback.handshake_timeout),
            metrics_listen: self.metrics_listen.or(fallback.metrics_listen),
            max_connections: self.max_connections.or(fallback.max_connections),
            max_concurrent_streams: self
                .max_concurrent_streams
                .or(fallback.max_concurrent_streams),
            max_request_bytes_in_flight: self
                .max_request_bytes_in_flight
                .or(fallback.max_request_bytes_in_flight),
            request_body_timeout: self.request_body_timeout.or(fallback.request_body_timeout),
            max_pipeline_batches: self.max_pipeline_batches.or(fallback.max_pipeline_batches),
            max_pipeline_bytes: self.max_pipeline_bytes.or(fallback.max_pipeline_bytes),
            metrics_stream_labels: self
                .metrics_stream_labels
                .or(fallback.metrics_stream_labels),
            metrics_insecure: self.metrics_insecure.or(fallback.metrics_insecure),
            max_streams: self.max_streams.or(fallback.max_streams),
            max_consumers_per_stream: self
                .max_consumers_per_stream
                .or(fallback.max_consumers_per_stream),
            max_groups_per_stream: self
                .max_groups_per_stream
                .or(fallback.max_groups_per_stream),
            max_members_per_group: self
                .max_members_per_group
                .or(fallback.max_members_per_group),
            http_cors_origin: self.http_cors_origin.or(fallback.http_cors_origin),
            sse_max_duration: self.sse_max_duration.or(fallback.sse_max_duration),
        }
    }
}

/// The largest event the storage layout allows (a single event must fit in
/// one inline sled value; see `storage`).
pub const MAX_EVENT_BYTES_LIMIT: usize = MAX_INLINE_VALUE - (64 << 10);

/// Bytes of written changes that may wait for the write-ahead log's sync
/// at once, by default (writers wait past it).
pub const DEFAULT_COMMIT_QUEUE_BYTES: usize = 64 << 20;

/// Room above the largest batch for a request's own fields and framing.
pub const REQUEST_OVERHEAD_BYTES: usize = 64 << 10;

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory holding the event store.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Heartbeat period on idle subscriptions.
    pub heartbeat_interval: Duration,
    /// Largest event accepted, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one Append.
    pub max_batch_events: usize,
    /// Largest Append in bytes.
    pub max_batch_bytes: usize,
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    /// Per-stream tail cache size in bytes.
    pub tail_cache_bytes: usize,
    /// Memory for all streams' caches together.
    pub stream_cache_budget_bytes: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// Whether Append creates missing streams.
    pub auto_create_streams: bool,
    /// HTTP/2 keepalive ping period (None: off).
    pub keepalive_interval: Option<Duration>,
    /// HTTP/2 keepalive ping timeout.
    pub keepalive_timeout: Duration,
    /// Grace period for open calls on shutdown.
    pub shutdown_grace: Duration,
    /// Write-ahead log bytes between checkpoints.
    pub checkpoint_bytes: u64,
    /// fsync mode: the bytes of applied changes between storage's
    /// background flushes (`None`: only at checkpoints).
    pub storage_flush_bytes: Option<u64>,
    /// The free-space floor under the data dir; `None` for the default
    /// (1 GiB or 5% of the volume, whichever is smaller), 0 for none.
    pub min_free_bytes: Option<u64>,
    /// Check every stored event before serving (`--verify-on-start`).
    pub verify_on_start: bool,
    /// Where events are stored (`--engine`, `--nats-url`, `--replicas`).
    pub engine: EngineConfig,
    /// Bytes of written changes that may wait for a sync at once (not a
    /// flag: the default suits every disk; tests make it small).
    pub commit_queue_bytes: usize,
    /// Faults to inject under the write-ahead log and checkpoints (tests
    /// of storage failures only; never set by flags).
    pub faults: Option<std::sync::Arc<crate::durability::fault::Faults>>,
    /// The wall clock (real time; tests move it forward).
    pub clock: crate::clock::Clock,
    /// Whether to serve without keys on a non-loopback address.
    pub insecure: bool,
    /// TLS, when set.
    pub tls: Option<TlsFiles>,
    /// Most open subscriptions per API key (0: no limit).
    pub max_subscriptions_per_key: usize,
    /// Calls per second per API key (0: no limit).
    pub key_rate_limit: u32,
    /// How long a new connection may take to start HTTP/2 (or TLS).
    pub handshake_timeout: Duration,
    /// Where to serve Prometheus metrics; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most open HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Bytes of request messages held at once, server-wide.
    pub max_request_bytes_in_flight: usize,
    /// How long a request's body may take to arrive (for an append
    /// pipeline: each of its messages, once begun).
    pub request_body_timeout: Duration,
    /// Most unacknowledged batches per append pipeline.
    pub max_pipeline_batches: u32,
    /// Most unacknowledged bytes of batches per append pipeline.
    pub max_pipeline_bytes: u64,
    /// Label metrics by stream, consumer and group names.
    pub metrics_stream_labels: bool,
    /// Allow the metrics endpoint off loopback.
    pub metrics_insecure: bool,
    /// Most streams per tenant.
    pub max_streams: usize,
    /// Most durable consumers per stream.
    pub max_consumers_per_stream: usize,
    /// Most consumer groups per stream.
    pub max_groups_per_stream: usize,
    /// Most members per consumer group.
    pub max_members_per_group: usize,
    /// Origins allowed to call the HTTP API and gRPC-Web from a browser
    /// (empty: CORS off; `*`: any).
    pub http_cors_origins: Vec<String>,
    /// How long one Server-Sent Events response stays open.
    pub sse_max_duration: Duration,
}

/// The PEM files of the server's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA that client certificates must be signed by (mutual TLS), if any.
    pub client_ca: Option<PathBuf>,
}

impl ServerConfig {
    /// Defaults suited to tests: the given data dir, an ephemeral loopback
    /// port, short heartbeats and grace.
    pub fn for_tests(data_dir: &Path) -> ServerConfig {
        let settings = ServeSettings {
            data_dir: Some(data_dir.to_path_buf()),
            listen: Some("127.0.0.1:0".parse().expect("valid address")),
            cache_bytes: Some(16 << 20),
            // Tests must not depend on how full the machine's disk is.
            min_free_bytes: Some(0),
            shutdown_grace: Some(HumanDuration(Duration::from_secs(2))),
            ..ServeSettings::default()
        };
        ServerConfig::try_from(settings).expect("test defaults are valid")
    }
}

impl TryFrom<ServeSettings> for ServerConfig {
    type Error = ConfigError;

    fn try_from(s: ServeSettings) -> Result<ServerConfig, ConfigError> {
        let secs = |d: Option<HumanDuration>, default: u64| {
            d.map_or(Duration::from_secs(default), |d| d.0)
        };
        let config = ServerConfig {
            data_dir: s
                .data_dir
                .unwrap_or_else(|| PathBuf::from("pullstream-data")),
            listen: s
                .listen
                .unwrap_or_else(|| "127.0.0.1:50051".parse().expect("valid address")),
            durability: s.durability.unwrap_or(Durability::Fsync),
            heartbeat_interval: secs(s.heartbeat_interval, 10),
            max_event_bytes: s.max_event_bytes.unwrap_or(1 << 20),
            max_batch_events: s.max_batch_events.unwrap_or(1000),
            max_batch_bytes: s.max_batch_bytes.unwrap_or(16 << 20),
            cache_bytes: s.cache_bytes.unwrap_or(256 << 20),
            tail_cache_bytes: s.tail_cache_bytes.unwrap_or(8 << 20),
            stream_cache_budget_bytes: s.stream_cache_budget_bytes.unwrap_or(256 << 20),
            idempotency_window: secs(s.idempotency_window, 24 * 3600),
            auto_create_streams: s.auto_create_streams.unwrap_or(true),
            keepalive_interval: Some(secs(s.keepalive_interval, 30)).filter(|d| !d.is_zero()),
            keepalive_timeout: secs(s.keepalive_timeout, 20),
            shutdown_grace: secs(s.shutdown_grace, 5),
            storage_flush_bytes: Some(
                s.storage_flush_bytes
                    .unwrap_or(crate::storage::DEFAULT_FLUSH_BYTES),
            )
            .filter(|&bytes| bytes > 0),
            checkpoint_bytes: s
                .checkpoint_bytes
                .unwrap_or(crate::durability::wal::DEFAULT_CHECKPOINT_BYTES),
            min_free_bytes: s.min_free_bytes,
            verify_on_start: s.verify_on_start.unwrap_or(false),
            engine: EngineConfig::from_settings(
                s.engine,
                s.nats_url.as_deref(),
                s.replicas,
                s.nats_namespace.as_deref(),
                s.nats_tls_ca.as_deref(),
                s.nats_creds.as_deref(),
            )?,
            commit_queue_bytes: DEFAULT_COMMIT_QUEUE_BYTES,
            faults: None,
            clock: crate::clock::Clock::default(),
            insecure: s.insecure.unwrap_or(false),
            max_subscriptions_per_key: s.max_subscriptions_per_key.unwrap_or(64),
            key_rate_limit: s.key_rate_limit.unwrap_or(1000),
            handshake_timeout: secs(s.handshake_timeout, 10),
            metrics_listen: s.metrics_listen,
            max_connections: s.max_connections.unwrap_or(1024),
            max_concurrent_streams: s.max_concurrent_streams.unwrap_or(256),
            max_request_bytes_in_flight: s.max_request_bytes_in_flight.unwrap_or(256 << 20),
            request_body_timeout: secs(s.request_body_timeout, 30),
            max_pipeline_batches: s.max_pipeline_batches.unwrap_or(64),
            max_pipeline_bytes: s.max_pipeline_bytes.unwrap_or(16 << 20),
            metrics_stream_labels: s.metrics_stream_labels.unwrap_or(false),
            metrics_insecure: s.metrics_insecure.unwrap_or(false),
            max_streams: s.max_streams.unwrap_or(10_000),
            max_consumers_per_stream: s.max_consumers_per_stream.unwrap_or(1000),
            max_groups_per_stream: s.max_groups_per_stream.unwrap_or(100),
            max_members_per_group: s.max_members_per_group.unwrap_or(1000),
            http_cors_origins: s
                .http_cors_origin
                .iter()
                .flat_map(|list| list.split(','))
                .map(|origin| origin.trim().trim_end_matches('/').to_string())
                .filter(|origin| !origin.is_empty())
                .collect(),
            sse_max_duration: secs(s.sse_max_duration, 60),
            tls: match (s.tls_cert, s.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: s.tls_client_ca,
                }),
                (None, None) if s.tls_client_ca.is_none() => None,
                _ => {
                    return Err(ConfigError::Invalid {
                        setting: "tls-cert",
                        message: "give --tls-cert and --tls-key together (and --tls-client-ca only with them)".into(),
                    })
                }
            },
        };
        let invalid =
            |setting: &'static str, message: String| Err(ConfigError::Invalid { setting, message });
        if config.max_event_bytes == 0 || config.max_event_bytes > MAX_EVENT_BYTES_LIMIT {
            return invalid(
                "max-event-bytes",
                format!("must be between 1 and {MAX_EVENT_BYTES_LIMIT}"),
            );
        }
        if config.max_batch_events == 0 || config.max_batch_events > 100_000 {
            return invalid("max-batch-events", "must be between 1 and 100000".into());
        }
        if config.max_batch_bytes < config.max_event_bytes || config.max_batch_bytes > 256 << 20 {
            return invalid(
                "max-batch-bytes",
                "must be at least max-event-bytes and at most 268435456".into(),
            );
        }
        if config.heartbeat_interval < Duration::from_millis(100) {
            return invalid("heartbeat-interval", "must be at least 100ms".into());
        }
        if config.cache_bytes < 1 << 20 {
            return invalid("cache-bytes", "must be at least 1048576 (1 MiB)".into());
        }
        if config.checkpoint_bytes < 4096 {
            return invalid("checkpoint-bytes", "must be at least 4096".into());
        }
        for (setting, value) in [
            ("max-streams", config.max_streams),
            ("max-consumers-per-stream", config.max_consumers_per_stream),
            ("max-groups-per-stream", config.max_groups_per_stream),
            ("max-members-per-group", config.max_members_per_group),
        ] {
            if value == 0 {
                return invalid(setting, "must be at least 1".into());
            }
        }
        if let Some(address) = config.metrics_listen {
            if !address.ip().is_loopback() && !config.metrics_insecure {
                return invalid(
                    "metrics-listen",
                    format!("{address} is not a loopback address and the metrics endpoint has no authentication: listen on 127.0.0.1, or pass --metrics-insecure to serve it to anyone who can reach the port"),
                );
            }
        }
        if config.max_connections == 0 {
            return invalid("max-connections", "must be at least 1".into());
        }
        if config.max_concurrent_streams == 0 {
            return invalid("max-concurrent-streams", "must be at least 1".into());
        }
        if config.max_pipeline_batches == 0 || config.max_pipeline_batches > 1024 {
            return invalid("max-pipeline-batches", "must be 1 to 1024".into());
        }
        if config.max_pipeline_bytes == 0 {
            return invalid("max-pipeline-bytes", "must be at least 1".into());
        }
        if config.max_request_bytes_in_flight < config.max_batch_bytes + REQUEST_OVERHEAD_BYTES
            || config.max_request_bytes_in_flight > u32::MAX as usize
        {
            return invalid(
                "max-request-bytes-in-flight",
                format!(
                    "must hold at least one largest batch (max-batch-bytes + {REQUEST_OVERHEAD_BYTES}) and at most {}",
                    u32::MAX
                ),
            );
        }
        if config.request_body_timeout < Duration::from_millis(100) {
            return invalid("request-body-timeout", "must be at least 100ms".into());
        }
        for origin in &config.http_cors_origins {
            let valid = origin == "*"
                || (matches!(origin.split_once("://"),
                        Some(("http" | "https", host)) if !host.is_empty() && !host.contains('/'))
                    && http::HeaderValue::from_str(origin).is_ok());
            if !valid {
                return invalid(
                    "http-cors-origin",
                    format!("{origin:?} is not an origin: write scheme://host[:port], like https://app.example.com, or * for any"),
                );
            }
        }
        if config.sse_max_duration < Duration::from_secs(1) {
            return invalid("sse-max-duration", "must be at least 1s".into());
        }
        if config.idempotency_window.is_zero() {
            return invalid("idempotency-window", "must be more than 0s".into());
        }
        Ok(config)
    }
}

/// Why the configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting has an unusable value.
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        /// The setting's flag name.
        setting: &'static str,
        /// What is allowed.
        message: String,
    },
}

/// The storage engine and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineConfig {
    /// The embedded sled store in the data dir.
    Sled,
    /// A NATS JetStream cluster.
    JetStream {
        /// Its client URLs.
        urls: Vec<String>,
        /// Copies of everything.
        replicas: usize,
        /// The prefix of its streams and subjects.
        namespace: String,
        /// Connect over TLS, trusting these CA certificates (PEM).
        tls_ca: Option<PathBuf>,
        /// Authenticate with this NATS credentials file (user JWT and seed).
        creds: Option<PathBuf>,
    },
}

impl EngineConfig {
    fn from_settings(
        engine: Option<EngineKind>,
        nats_url: Option<&str>,
        replicas: Option<usize>,
        namespace: Option<&str>,
        tls_ca: Option<&Path>,
        creds: Option<&Path>,
    ) -> Result<EngineConfig, ConfigError> {
        match engine.unwrap_or(EngineKind::Sled) {
            EngineKind::Sled => {
                if nats_url.is_some()
                    || replicas.is_some()
                    || namespace.is_some()
                    || tls_ca.is_some()
                    || creds.is_some()
                {
                    return Err(ConfigError::Invalid {
                        setting: "--nats-url",
                        message:
                            "--nats-url, --replicas, --nats-namespace, --nats-tls-ca and --nats-creds need --engine jetstream"
                                .into(),
                    });
                }
                Ok(EngineConfig::Sled)
            }
            EngineKind::Jetstream => {
                let urls: Vec<String> = nats_url
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_string)
                    .collect();
                if urls.is_empty() {
                    return Err(ConfigError::Invalid {
                        setting: "--nats-url",
                        message: "--engine jetstream needs the cluster's URLs, e.g. --nats-url nats://127.0.0.1:4222".into(),
                    });
                }
                if let Some(bad) = urls
                    .iter()
                    .find(|u| !u.starts_with("nats://") && !u.starts_with("tls://"))
                {
                    return Err(ConfigError::Invalid {
                        setting: "--nats-url",
                        message: format!("{bad:?} is not a nats:// or tls:// URL"),
                    });
                }
                let replicas = replicas.unwrap_or(3);
                if ![1, 3, 5].contains(&replicas) {
                    return Err(ConfigError::Invalid {
                        setting: "--replicas",
                        message: format!(
                            "{replicas}: use 1, 3 or 5 (a Raft group wants an odd size)"
                        ),
                    });
                }
                let namespace = namespace.unwrap_or("ps").to_string();
                if namespace.is_empty()
                    || !namespace
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(ConfigError::Invalid {
                        setting: "--nats-namespace",
                        message: format!("{namespace:?}: use letters, digits, - and _"),
                    });
                }
                if let Some(ca) = tls_ca {
                    if let Err(e) = std::fs::File::open(ca) {
                        return Err(ConfigError::Invalid {
                            setting: "--nats-tls-ca",
                            message: format!("cannot read {}: {e}", ca.display()),
                        });
                    }
                }
                if let Some(file) = creds {
                    // Read and parsed here, so a wrong file is a clear
                    // startup error rather than a failed connection.
                    let checked = std::fs::read_to_string(file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))
                        .and_then(|text| {
                            async_nats::ConnectOptions::new()
                                .credentials(&text)
                                .map(drop)
                                .map_err(|e| {
                                    format!(
                                        "{} is not a NATS credentials file (a user JWT and \
                                         its nkey seed, as `nsc generate creds` writes): {e}",
                                        file.display()
                                    )
                                })
                        });
                    if let Err(message) = checked {
                        return Err(ConfigError::Invalid {
                            setting: "--nats-creds",
                            message,
                        });
                    }
                }
                Ok(EngineConfig::JetStream {
                    urls,
                    replicas,
                    namespace,
                    tls_ca: tls_ca.map(Path::to_path_buf),
                    creds: creds.map(Path::to_path_buf),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config in the repository is valid as shipped, its set
    /// values are the defaults it claims, and every key it shows commented
    /// out is a real key with a valid value.
    #[test]
    fn the_engine_settings_are_checked() {
        let engine = |kind, url: Option<&str>, replicas| {
            EngineConfig::from_settings(kind, url, replicas, None, None, None)
                .map_err(|e| e.to_string())
        };
        assert_eq!(engine(None, None, None), Ok(EngineConfig::Sled));
        assert_eq!(
            engine(
                Some(EngineKind::Jetstream),
                Some("nats://a:4222, nats://b:4222"),
                None
            ),
            Ok(EngineConfig::JetStream {
                urls: vec!["nats://a:4222".into(), "nats://b:4222".into()],
                replicas: 3,
                namespace: "ps".into(),
                tls_ca: None,
                creds: None,
            })
        );
        let namespace = |ns| {
            EngineConfig::from_settings(
                Some(EngineKind::Jetstream),
                Some("nats://a:4222"),
                None,
                Some(ns),
                None,
                None,
            )
            .map_err(|e| e.to_string())
        };
        assert!(namespace("tenant-a_1").is_ok());
        assert!(namespace("a.b").unwrap_err().contains("--nats-namespace"));
        assert!(namespace("").unwrap_err().contains("--nats-namespace"));
        // A CA file must be readable, and only the cluster engine takes one.
        let ca = |kind, path: &str| {
            EngineConfig::from_settings(
                kind,
                Some("tls://a:4222"),
                None,
                None,
                Some(Path::new(path)),
                None,
            )
            .map_err(|e| e.to_string())
        };
        let here = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert!(ca(Some(EngineKind::Jetstream), here).is_ok());
        let missing = ca(Some(EngineKind::Jetstream), "/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing.contains("--nats-tls-ca") && missing.contains("cannot read"),
            "{missing}"
        );
        assert!(ca(None, here)
            .unwrap_err()
            .contains("need --engine jetstream"));
        // A credentials file must be readable and hold a user JWT and a
        // seed; only the cluster engine takes one.
        let creds = |kind, path: &Path| {
            EngineConfig::from_settings(kind, Some("nats://a:4222"), None, None, None, Some(path))
                .map_err(|e| e.to_string())
        };
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.creds");
        // (A seed as `nsc` prints one; the JWT is not checked until the
        // cluster sees it.)
        std::fs::write(
            &good,
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n\
             ------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n\
             SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM\n------END USER NKEY SEED------\n",
        )
        .unwrap();
        let config = creds(Some(EngineKind::Jetstream), &good).unwrap();
        assert!(matches!(config, EngineConfig::JetStream { creds: Some(ref c), .. } if *c == good));
        let missing = creds(
            Some(EngineKind::Jetstream),
            Path::new("/nonexistent/x.creds"),
        )
        .unwrap_err();
        assert!(
            missing.contains("--nats-creds") && missing.contains("cannot read"),
            "{missing}"
        );
        let not_creds = creds(Some(EngineKind::Jetstream), Path::new(here)).unwrap_err();
        assert!(
            not_creds.contains("--nats-creds")
                && not_creds.contains("is not a NATS credentials file"),
            "{not_creds}"
        );
        assert!(creds(None, &good)
            .unwrap_err()
            .contains("need --engine jetstream"));
        for (kind, url, replicas, needle) in [
            (Some(EngineKind::Jetstream), None, None, "--nats-url"),
            (
                Some(EngineKind::Jetstream),
                Some("http://a:4222"),
                None,
                "not a nats://",
            ),
            (
                Some(EngineKind::Jetstream),
                Some("nats://a:4222"),
                Some(2),
                "--replicas",
            ),
            (None, Some("nats://a:4222"), None, "need --engine jetstream"),
        ] {
            let refused = engine(kind, url, replicas).unwrap_err();
            assert!(refused.contains(needle), "{refused}");
        }
    }

    #[test]
    fn the_example_config_loads_and_every_key_it_shows_is_real() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pullstream.example.toml");
        let settings = ServeSettings::from_file(&path).unwrap();
        let config = ServerConfig::try_from(settings).unwrap();
        let defaults = ServerConfig::try_from(ServeSettings::default()).unwrap();
        assert_eq!(config.data_dir, defaults.data_dir);
        assert_eq!(config.listen, defaults.listen);
        assert_eq!(config.durability, defaults.durability);
        assert_eq!(config.heartbeat_interval, defaults.heartbeat_interval);
        assert_eq!(config.max_event_bytes, defaults.max_event_bytes);
        assert_eq!(config.max_batch_events, defaults.max_batch_events);
        assert_eq!(config.max_batch_bytes, defaults.max_batch_bytes);
        assert_eq!(config.idempotency_window, defaults.idempotency_window);

        // Uncomment every `# key = value` line: still a valid file.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut shown = 0;
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.split_whitespace().nth(1) == Some("=") => {
                    shown += 1;
                    rest.to_string()
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(shown > 20, "only {shown} commented keys found");
        let all: ServeSettings = toml::from_str(&uncommented).unwrap();
        assert!(all.metrics_listen.is_some() && all.tls_cert.is_some());
    }

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let file: ServeSettings = toml::from_str(
            "data-dir = \"/from/file\"\ndurability = \"buffered\"\nheartbeat-interval = \"2s\"",
        )
        .unwrap();
        let flags = ServeSettings {
            durability: Some(Durability::Fsync),
            ..Default::default()
        };
        let config = ServerConfig::try_from(flags.or(file)).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.durability, Durability::Fsync);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(config.max_event_bytes, 1 << 20);
        assert_eq!(config.listen.port(), 50051);
        // HTTP/2 keepalive pings are on unless turned off with 0s.
        assert_eq!(config.keepalive_interval, Some(Duration::from_secs(30)));
        let off = ServeSettings {
            keepalive_interval: Some(HumanDuration(Duration::ZERO)),
            ..Default::default()
        };
        assert_eq!(
            ServerConfig::try_from(off).unwrap().keepalive_interval,
            None
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(toml::from_str::<ServeSettings>("no-such-key = 1").is_err());
        assert!(toml::from_str::<ServeSettings>("heartbeat-interval = \"soon\"").is_err());
        let too_big = ServeSettings {
            max_event_bytes: Some(MAX_EVENT_BYTES_LIMIT + 1),
            ..Default::default()
        };
        let err = ServerConfig::try_from(too_big).unwrap_err().to_string();
        assert!(err.contains("max-event-bytes"), "{err}");
    }

    #[test]
    fn metrics_off_loopback_need_metrics_insecure() {
        let settings = |insecure| ServeSettings {
            metrics_listen: Some("0.0.0.0:9090".parse().unwrap()),
            metrics_insecure: insecure,
            ..Default::default()
        };
        let refused = ServerConfig::try_from(settings(None)).unwrap_err();
        assert!(
            refused.to_string().contains("--metrics-insecure"),
            "{refused}"
        );
        assert!(ServerConfig::try_from(settings(Some(true))).is_ok());
    }
}
