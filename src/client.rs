//! Connecting to a Pullstream server: the endpoint (with TLS), the API-key
//! header, and the typed gRPC clients.
//!
//! The CLI's client commands and the benchmark both talk to a server, and
//! neither should depend on the other to do it: this module is the one
//! place that knows how a program reaches a server. It also holds the
//! [`ResumingSubscription`], which a Rust consumer uses to follow a stream
//! across disconnects and server restarts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::api_keys_client::ApiKeysClient;
use crate::proto::event_log_client::EventLogClient;

/// A client of the `EventLog` service.
pub type Client = EventLogClient<InterceptedService<Channel, ApiKeyHeader>>;

/// A client of the `ApiKeys` service.
pub type KeysClient = ApiKeysClient<InterceptedService<Channel, ApiKeyHeader>>;

/// Where the server is and how to authenticate to it. The error messages
/// name the CLI's flags, which carry the same names as these fields.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The server URL (`http://` or `https://`).
    pub server: String,
    /// The API key, if the server needs one.
    pub api_key: Option<String>,
    /// PEM CA to verify the server's certificate with (`https://`).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// Adds `authorization: Bearer <key>` to every call, when a key is given.
#[derive(Clone)]
pub struct ApiKeyHeader(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for ApiKeyHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ApiKeyHeader {
    /// The header for `key` (none when `None`).
    pub fn new(key: Option<&str>) -> anyhow::Result<ApiKeyHeader> {
        Ok(ApiKeyHeader(match key {
            None => None,
            Some(key) => Some(format!("Bearer {}", key.trim()).parse().map_err(|_| {
                anyhow::anyhow!("the API key has characters a header cannot carry")
            })?),
        }))
    }
}

/// Why a connection failed, with its whole cause (tonic's own message is
/// just "transport error") and what to check: TLS problems are named as
/// such, not reported as a server that is not running.
fn unreachable(server: &str, error: &tonic::transport::Error) -> anyhow::Error {
    let cause = error_chain(error);
    let hint = transport_hint(&cause, server.starts_with("http://"))
        .unwrap_or("is `pullstream serve` running? set --server or PULLSTREAM_SERVER");
    anyhow::anyhow!("cannot reach the server at {server}: {cause} ({hint})")
}

/// An error with all its causes, each said once (layers often repeat
/// their inner error's text).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut cause = error.to_string();
    let mut last = cause.clone();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !last.contains(&text) {
            cause.push_str(&format!(": {text}"));
        }
        last = text;
        source = s.source();
    }
    cause
}

/// What to check for a transport failure, when its causes say.
fn transport_hint(cause: &str, plaintext: bool) -> Option<&'static str> {
    let lower = cause.to_ascii_lowercase();
    if lower.contains("certificaterequired") || lower.contains("certificate required") {
        Some("the server requires a client certificate: pass --tls-cert and --tls-key (signed by the CA the server's --tls-client-ca names)")
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        Some("a TLS problem: check that --tls-ca is the CA that signed the server's certificate, that the certificate names this host (subjectAltName), and that a server requiring client certificates gets --tls-cert and --tls-key")
    } else if plaintext
        && (lower.contains("connection reset")
            || lower.contains("broken pipe")
            || lower.contains("connection closed")
            || lower.contains("unexpected eof")
            || lower.contains("frame with invalid size"))
    {
        Some("the server closed the connection: if it serves TLS, use an https:// URL with --tls-ca; over https://, a server that requires client certificates closes connections without a valid --tls-cert and --tls-key; the server's log says why")
    } else {
        None
    }
}

/// A gRPC status for a person: the code as the proto names it and the
/// server's message; a status the transport made up ("transport error")
/// also gets its causes and what to check.
/// `server` is the URL when known (the hint for a closed connection is
/// not given for `https://` ones unless unknown).
pub fn describe_status(status: &tonic::Status, server: Option<&str>) -> String {
    let code = crate::proto::code_name(status.code());
    match std::error::Error::source(status) {
        Some(source) => {
            let cause = error_chain(source);
            let plaintext = server.is_none_or(|s| s.starts_with("http://"));
            match transport_hint(&cause, plaintext) {
                Some(hint) => format!("{code}: {cause} ({hint})"),
                None => format!("{code}: {}: {cause}", status.message()),
            }
        }
        None => format!("{code}: {}", status.message()),
    }
}

impl ConnectOptions {
    /// The server's URL: `server` as given, with `http://` when it names no
    /// scheme (`localhost:50051`, as `grpcurl` and `nats` take it).
    pub fn url(&self) -> anyhow::Result<String> {
        match self.server.split_once("://") {
            None => Ok(format!("http://{}", self.server)),
            Some(("http" | "https", _)) => Ok(self.server.clone()),
            Some((scheme, rest)) => anyhow::bail!(
                "--server {:?}: the scheme must be http:// or https:// (for a TLS server), not {scheme}:// (e.g. http://{rest})",
                self.server
            ),
        }
    }

    /// The endpoint these options describe; fails on settings that no
    /// retry can fix (a bad URL, missing or unreadable TLS files).
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let server = self.url()?;
        let mut endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| anyhow::anyhow!("invalid --server URL {:?}: {e}", self.server))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if server.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls()?)
                .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
        } else if self.tls_ca.is_some() || self.tls_cert.is_some() {
            anyhow::bail!("--tls-ca/--tls-cert need an https:// server URL");
        }
        Ok(endpoint)
    }

    /// The TLS settings from `tls_ca`, `tls_cert` and `tls_key`.
    fn tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let Some(ca) = &self.tls_ca else {
            anyhow::bail!(
                "an https:// server needs --tls-ca (the PEM CA that signed its certificate)"
            );
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        Ok(tls)
    }

    /// A connection with the header to send on it, with an error that
    /// says what to check.
    pub async fn channel(&self) -> anyhow::Result<(Channel, ApiKeyHeader)> {
        let header = ApiKeyHeader::new(self.api_key.as_deref())?;
        let server = self.url()?;
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|e| unreachable(&server, &e))?;
        Ok((channel, header))
    }

    /// A connected `EventLog` client (responses of any size accepted).
    pub async fn event_log(&self) -> anyhow::Result<Client> {
        let (channel, header) = self.channel().await?;
        Ok(EventLogClient::with_interceptor(channel, header).max_decoding_message_size(usize::MAX))
    }

    /// A connected `ApiKeys` client.
    pub async fn api_keys(&self) -> anyhow::Result<KeysClient> {
        let (channel, header) = self.channel().await?;
        Ok(ApiKeysClient::with_interceptor(channel, header))
    }
}

/// A subscription that outlives disconnects: when the server goes away
/// (UNAVAILABLE, a transport error, or the stream simply ending) it
/// reconnects, with backoff from 100 ms to 5 s, and resumes from the cursor
/// of the last response it handed out, so the caller sees every event
/// once, in order, across server restarts. A durable consumer or a group
/// member resumes at its saved cursor on the server instead. Statuses no
/// reconnect can fix (NOT_FOUND, INVALID_ARGUMENT, OUT_OF_RANGE,
/// PERMISSION_DENIED, UNAUTHENTICATED, DATA_LOSS, ABORTED, ...) end it.
pub struct ResumingSubscription {
    options: ConnectOptions,
    request: crate::proto::SubscribeRequest,
    stream: Option<tonic::Streaming<crate::proto::SubscribeResponse>>,
    backoff: Duration,
    /// How many times it has reconnected (for callers that report it).
    pub reconnects: u64,
    on_reconnect: Option<ReconnectHook>,
}

/// A caller's hook told about each reconnect.
type ReconnectHook = Box<dyn FnMut(&Reconnecting<'_>) + Send>;

/// What a [`ResumingSubscription`] tells its reconnect hook
/// ([`ResumingSubscription::on_reconnect`]) before each wait.
#[derive(Debug)]
pub struct Reconnecting<'a> {
    /// What went wrong.
    pub reason: &'a str,
    /// How long it waits before reconnecting.
    pub delay: Duration,
    /// The offset it asks to resume from (`None` before the first
    /// response: the request's own start). A durable consumer or a group
    /// member resumes at its cursor saved on the server instead.
    pub resume_from: Option<u64>,
}

/// Statuses worth reconnecting for: the server is away or restarting. A
/// connection reset mid-stream reaches tonic as INTERNAL (an HTTP/2
/// error), so INTERNAL is retried too.
pub fn worth_retrying(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    )
}

impl ConnectOptions {
    /// Subscribes with `request`, reconnecting and resuming as
    /// [`ResumingSubscription`] describes. Nothing is sent until the first
    /// [`ResumingSubscription::next`].
    pub fn subscribe_resuming(
        &self,
        request: crate::proto::SubscribeRequest,
    ) -> ResumingSubscription {
        ResumingSubscription {
            options: self.clone(),
            request,
            stream: None,
            backoff: Duration::from_millis(100),
            reconnects: 0,
            on_reconnect: None,
        }
    }
}

impl ResumingSubscription {
    /// Calls `hook` before each reconnect (to tell a user what happens).
    pub fn on_reconnect(mut self, hook: impl FnMut(&Reconnecting<'_>) + Send + 'static) -> Self {
        self.on_reconnect = Some(Box::new(hook));
        self
    }

    /// The next response (events, or a heartbeat with the cursor); an error
    /// only for a status no reconnect can fix. Connection problems are
    /// retried here, for as long as it takes.
    pub async fn next(&mut self) -> Result<crate::proto::SubscribeResponse, tonic::Status> {
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    // Could not connect, or the server is away: retry.
                    Err(Opening::Unreachable(reason)) => {
                        self.wait(&reason).await;
                        continue;
                    }
                    Err(Opening::Refused(status)) if worth_retrying(&status) => {
                        self.wait(&describe(&status)).await;
                        continue;
                    }
                    Err(Opening::Refused(status)) => return Err(status),
                }
            }
            let stream = self.stream.as_mut().expect("opened above");
            match stream.message().await {
                Ok(Some(response)) => {
                    self.backoff = Duration::from_millis(100);
                    // Resume after what the caller has now seen.
                    self.request.start = Some(crate::proto::subscribe_request::Start::Offset(
                        response.next_offset,
                    ));
                    return Ok(response);
                }
                Ok(None) => {
                    self.stream = None;
                    self.wait("the server ended the subscription").await;
                }
                Err(status) if worth_retrying(&status) => {
                    self.stream = None;
                    self.wait(&describe(&status)).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// The subscription's stream.
    async fn open(&mut self) -> Result<tonic::Streaming<crate::proto::SubscribeResponse>, Opening> {
        let mut client = self
            .options
            .event_log()
            .await
            .map_err(|e| Opening::Unreachable(e.to_string()))?;
        Ok(client
            .subscribe(self.request.clone())
            .await
            .map_err(Opening::Refused)?
            .into_inner())
    }

    async fn wait(&mut self, reason: &str) {
        self.reconnects += 1;
        if let Some(hook) = &mut self.on_reconnect {
            let resume_from = match self.request.start {
                Some(crate::proto::subscribe_request::Start::Offset(offset)) => Some(offset),
                _ => None,
            };
            hook(&Reconnecting {
                reason,
                delay: self.backoff,
                resume_from,
            });
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a subscription could not be opened.
enum Opening {
    /// No connection (the server is down or unreachable).
    Unreachable(String),
    /// The server answered the call with a status.
    Refused(tonic::Status),
}

fn describe(status: &tonic::Status) -> String {
    describe_status(status, None)
}

/// An open append pipeline (the proto's `AppendPipeline`): batches go out
/// without waiting for each one's acknowledgement, and acknowledgements
/// come back in the order the batches were sent.
///
/// The server stops reading while the agreed number of batches or bytes is
/// unacknowledged, so a producer alternates: [`AppendPipeline::send`] while
/// [`AppendPipeline::has_room`], [`AppendPipeline::ack`] otherwise (and
/// after [`AppendPipeline::finish`] until it returns `None`). A failed
/// batch ends the pipeline: `ack` returns its status (a `tonic::Status`
/// inside the error, whose message starts with `batch <sequence>:`), and
/// no later batch was written.
pub struct AppendPipeline {
    requests: Option<tokio::sync::mpsc::Sender<crate::proto::AppendPipelineRequest>>,
    responses: tonic::Streaming<crate::proto::AppendPipelineResponse>,
    /// The limits the server agreed to.
    pub opened: crate::proto::PipelineOpened,
    /// Bytes of each unacknowledged batch, oldest first.
    in_flight: std::collections::VecDeque<u64>,
    bytes_in_flight: u64,
}

impl AppendPipeline {
    /// Opens a pipeline on `open.stream` over `client`.
    pub async fn open(
        client: &mut Client,
        open: crate::proto::PipelineOpen,
    ) -> anyhow::Result<AppendPipeline> {
        use crate::proto::append_pipeline_request::Request;
        use crate::proto::append_pipeline_response::Response;
        let asked = open.max_in_flight_batches;
        // Room for every batch the server may let us have in flight, plus
        // the opening message: sends never wait on the channel.
        let room = if asked == 0 { 1024 } else { asked as usize };
        let (tx, rx) = tokio::sync::mpsc::channel(room + 1);
        tx.try_send(crate::proto::AppendPipelineRequest {
            request: Some(Request::Open(open)),
        })
        .expect("an empty channel has room");
        let mut responses = client
            .append_pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let opened = match responses.message().await? {
            Some(crate::proto::AppendPipelineResponse {
                response: Some(Response::Opened(opened)),
            }) => opened,
            _ => anyhow::bail!("the server did not open the append pipeline"),
        };
        Ok(AppendPipeline {
            requests: Some(tx),
            responses,
            opened,
            in_flight: std::collections::VecDeque::new(),
            bytes_in_flight: 0,
        })
    }

    /// Whether the server will read another batch now (the rule it
    /// applies: fewer batches in flight than agreed, and fewer bytes, or
    /// none at all).
    pub fn has_room(&self) -> bool {
        self.requests.is_some()
            && self.in_flight.len() < self.opened.max_in_flight_batches as usize
            && (self.in_flight.is_empty() || self.bytes_in_flight < self.opened.max_in_flight_bytes)
    }

    /// How many batches are sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends a batch. Check [`AppendPipeline::has_room`] first: a batch
    /// past the agreed limits waits in the connection until acks make room.
    /// Fails once the server has ended the call; [`AppendPipeline::ack`]
    /// then returns the acknowledgements still unread and the status.
    pub async fn send(&mut self, batch: crate::proto::PipelineBatch) -> anyhow::Result<()> {
        use prost::Message;
        let bytes = batch.encoded_len() as u64;
        let Some(requests) = &self.requests else {
            anyhow::bail!("the pipeline was finished: open a new one");
        };
        let request = crate::proto::AppendPipelineRequest {
            request: Some(crate::proto::append_pipeline_request::Request::Batch(batch)),
        };
        if requests.send(request).await.is_err() {
            // The server ended the call. Its acknowledgements still to be
            // read, then its status, come from `ack`.
            self.requests = None;
            anyhow::bail!("the append pipeline has ended: read what `ack` returns for why");
        }
        self.in_flight.push_back(bytes);
        self.bytes_in_flight += bytes;
        Ok(())
    }

    /// Ends the client's side: the server acknowledges what is in flight,
    /// then ends the call.
    pub fn finish(&mut self) {
        self.requests = None;
    }

    /// The next acknowledgement, in the order the batches were sent;
    /// `None` once the server ended the call after [`AppendPipeline::finish`].
    pub async fn ack(&mut self) -> anyhow::Result<Option<crate::proto::PipelineAck>> {
        use crate::proto::append_pipeline_response::Response;
        match self.responses.message().await? {
            None => Ok(None),
            Some(crate::proto::AppendPipelineResponse {
                response: Some(Response::Ack(ack)),
            }) => {
                if let Some(bytes) = self.in_flight.pop_front() {
                    self.bytes_in_flight -= bytes;
                }
                Ok(Some(ack))
            }
            Some(_) => anyhow::bail!("the server sent something other than an acknowledgement"),
        }
    }
}
