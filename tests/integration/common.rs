//! Test harness: the real server in-process on an ephemeral loopback port
//! with a temp data dir, and the generated tonic client.

use std::net::SocketAddr;
use std::time::Duration;

use pullstream::config::ServerConfig;
use pullstream::proto::{self as pb, subscribe_request::Start};
use pullstream::server::{ServeError, Server};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Streaming;

/// The client library's `EventLog` client, as a Rust user of Pullstream
/// connects.
pub type Client = pullstream::client::Client;

/// A client of the server at `url`, connected through the client library.
pub async fn connect(url: &str) -> Client {
    pullstream::client::ConnectOptions {
        server: url.to_string(),
        ..Default::default()
    }
    .event_log()
    .await
    .expect("connect")
}

/// A client on an existing channel (no key), typed as the library's.
pub fn client_on(channel: Channel) -> Client {
    pullstream::proto::event_log_client::EventLogClient::with_interceptor(
        channel,
        pullstream::client::ApiKeyHeader::new(None).unwrap(),
    )
}

/// A running server. Dropping it without `stop` aborts the server task.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The metrics endpoint, when the config asks for one.
    pub metrics_addr: Option<SocketAddr>,
    pub dir: TempDir,
    pub config: ServerConfig,
    shutdown_tx: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
}

/// The engine every [`TestServer`] uses: sled, or with
/// `PULLSTREAM_TEST_ENGINE=jetstream` the JetStream engine on one 3-node
/// cluster shared by the whole test process, each server in a namespace
/// of its own (`cargo test` runs the suite on sled; this runs the same
/// tests on the cluster engine).
fn engine_for_tests() -> Option<pullstream::config::EngineConfig> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    if std::env::var("PULLSTREAM_TEST_ENGINE").ok().as_deref() != Some("jetstream") {
        return None;
    }
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let urls = URLS
        .get_or_init(|| {
            let (started, urls) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let cluster = runtime.block_on(crate::cluster::NatsCluster::start());
                started.send(cluster.urls.clone()).expect("waiting");
                // This thread is the nodes' parent (they die with it, and
                // so with the test process): it keeps them for good.
                loop {
                    std::thread::park();
                }
            });
            urls.recv().expect("the cluster started")
        })
        .clone();
    Some(pullstream::config::EngineConfig::JetStream {
        urls,
        replicas: 3,
        namespace: format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        tls_ca: None,
        creds: None,
    })
}

/// Whether this test must be skipped because the suite runs on the
/// JetStream engine (`PULLSTREAM_TEST_ENGINE=jetstream`); says why when
/// it is. For tests of the sled engine's own files and fault seams.
pub fn sled_only(why: &str) -> bool {
    let skip = std::env::var("PULLSTREAM_TEST_ENGINE").ok().as_deref() == Some("jetstream");
    if skip {
        eprintln!("skipped on the JetStream engine: {why}");
    }
    skip
}

impl TestServer {
    /// A server with test defaults on a fresh temp dir.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh temp dir, with `tweak` applied to the config.
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::for_tests(dir.path());
        if let Some(engine) = engine_for_tests() {
            config.engine = engine;
        }
        tweak(&mut config);
        Self::start_in(dir, config).await
    }

    /// A server on an existing dir (for restarts).
    pub async fn start_in(dir: TempDir, config: ServerConfig) -> TestServer {
        Self::start_at(dir, config, "127.0.0.1:0".parse().expect("address")).await
    }

    /// A server on an existing dir, listening on `address` (a restart on
    /// the same port retries while the old socket is released).
    pub async fn start_at(dir: TempDir, config: ServerConfig, address: SocketAddr) -> TestServer {
        let mut server = Server::open(config.clone())
            .await
            .unwrap_or_else(|e| panic!("open server: {e}"));
        let metrics_addr = server.bind_metrics().await.expect("bind metrics");
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => break listener,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {address}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("local addr");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.serve(listener, async {
            let _ = shutdown_rx.await;
        }));
        TestServer {
            addr,
            metrics_addr,
            dir,
            config,
            shutdown_tx: Some(shutdown_tx),
            handle: Some(handle),
        }
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        self.options().event_log().await.expect("connect")
    }

    /// How the client library reaches this server (no key, no TLS).
    pub fn options(&self) -> pullstream::client::ConnectOptions {
        pullstream::client::ConnectOptions {
            server: format!("http://{}", self.addr),
            ..Default::default()
        }
    }

    /// A connected channel, for other services' clients.
    pub async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("connect")
    }

    /// A channel with small HTTP/2 windows (64 KiB): a subscriber on it
    /// that stops reading stalls its server side after a few dozen KiB.
    pub async fn stalling_channel(&self) -> Channel {
        self.endpoint()
            .initial_stream_window_size(Some(64 << 10))
            .initial_connection_window_size(Some(64 << 10))
            .connect()
            .await
            .expect("connect")
    }

    fn endpoint(&self) -> tonic::transport::Endpoint {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint")
    }

    /// Shuts down gracefully and waits; returns the data dir and config
    /// for a restart.
    pub async fn stop(mut self) -> (TempDir, ServerConfig) {
        self.shutdown_tx.take().expect("running").send(()).ok();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("server stops within 30s")
            .expect("server task")
            .expect("clean shutdown");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        (dir, self.config.clone())
    }

    /// Stops and starts again on the same data dir.
    pub async fn restart(self) -> TestServer {
        let (dir, config) = self.stop().await;
        TestServer::start_in(dir, config).await
    }

    /// Stops and starts again on the same data dir and port, so clients
    /// reconnecting to the old address find it.
    pub async fn restart_on_same_port(self) -> TestServer {
        let address = self.addr;
        let (dir, config) = self.stop().await;
        TestServer::start_at(dir, config, address).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// A JSON event of `event_type` with `data`.
pub fn event(event_type: &str, data: &str) -> pb::NewEvent {
    pb::NewEvent {
        r#type: event_type.into(),
        key: Default::default(),
        data: data.as_bytes().to_vec().into(),
        content_type: "application/json".into(),
        metadata: Default::default(),
        versions: Default::default(),
    }
}

/// Appends `events` to `stream`, panicking on error.
pub async fn append(
    client: &mut Client,
    stream: &str,
    events: Vec<pb::NewEvent>,
) -> pb::AppendResponse {
    client
        .append(pb::AppendRequest {
            stream: stream.to_string(),
            events,
            ..Default::default()
        })
        .await
        .expect("append")
        .into_inner()
}

/// Reads every event of `stream` with Read pages.
pub async fn read_all(client: &mut Client, stream: &str) -> Vec<pb::Event> {
    let mut events = Vec::new();
    let mut offset = 0;
    loop {
        let page = client
            .read(pb::ReadRequest {
                stream: stream.to_string(),
                offset,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("read")
            .into_inner();
        events.extend(page.events);
        offset = page.next_offset;
        if offset == page.head_offset {
            return events;
        }
    }
}

/// Opens a subscription.
pub async fn subscribe(
    client: &mut Client,
    stream: &str,
    start: Option<Start>,
) -> Streaming<pb::SubscribeResponse> {
    client
        .subscribe(pb::SubscribeRequest {
            stream: stream.to_string(),
            start,
            max_batch_events: 0,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next subscription message, failing the test if none comes in 30 s
/// (a deadlock guard, not a timing assertion).
pub async fn next(
    stream: &mut Streaming<pb::SubscribeResponse>,
) -> Result<pb::SubscribeResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("a subscription message within 30s")
        .map(|m| m.expect("stream still open"))
}

/// Collects events from a subscription until `count` have arrived.
pub async fn collect(
    stream: &mut Streaming<pb::SubscribeResponse>,
    count: usize,
) -> Vec<pb::Event> {
    let mut events = Vec::new();
    while events.len() < count {
        let response = next(stream).await.expect("subscription message");
        events.extend(response.events);
    }
    events
}

/// Runs `future` with a generous deadlock guard.
pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("finished within 60s")
}
