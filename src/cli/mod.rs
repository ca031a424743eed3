//! The `pullstream` command line: the server (`serve`) and the client
//! commands (`publish`, `tail`, `streams`, `consumers`) in one binary. Client commands
//! talk to a server over gRPC with the same generated client an SDK uses.

mod consumers;
mod groups;
mod json;
mod keys;
mod publish;
mod repair;
mod status;
mod streams;
mod tail;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::config::{ServeSettings, ServerConfig};
use crate::proto::api_keys_client::ApiKeysClient;
use crate::proto::event_log_client::EventLogClient;
use crate::server::{shutdown_signal, Server};

/// Ordered, durable event streams that consumers pull over gRPC.
#[derive(Debug, Parser)]
#[command(name = "pullstream", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Connection settings shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server URL
    #[arg(
        long,
        global = true,
        env = "PULLSTREAM_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// API key (`ps_...`), needed once the server has keys
    #[arg(
        long,
        global = true,
        env = "PULLSTREAM_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// PEM CA to verify the server's TLS certificate with (https:// URLs)
    #[arg(long, global = true, env = "PULLSTREAM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS (with --tls-key)
    #[arg(long, global = true, env = "PULLSTREAM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, global = true, env = "PULLSTREAM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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

/// The client the commands use.
pub type Client = EventLogClient<InterceptedService<Channel, ApiKeyHeader>>;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server
    Serve {
        /// TOML file with the same settings as the flags (e.g. `durability = "fsync"`)
        #[arg(long, env = "PULLSTREAM_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<ServeSettings>,
    },
    /// Append events: one from flags, or NDJSON events from stdin
    Publish(publish::PublishArgs),
    /// Print a stream's events as JSON lines, following new ones live
    Tail(tail::TailArgs),
    /// List, inspect, create and delete streams
    Streams(streams::StreamsArgs),
    /// List, inspect, commit and delete a stream's durable consumers
    Consumers(consumers::ConsumersArgs),
    /// Create, list and revoke API keys (offline on a data dir, or over gRPC)
    Keys(keys::KeysArgs),
    /// The server at a glance: uptime, streams with rates and sizes, consumer lag
    Status(status::StatusArgs),
    /// Inspect key-shared consumer groups: members, slots, lag
    Groups(groups::GroupsArgs),
    /// Measure throughput, latency and memory (starts its own server unless --server)
    Bench(crate::bench::BenchArgs),
    /// Report what damage in the write-ahead log loses, and truncate it there with --yes (server stopped)
    Repair(repair::RepairArgs),
    /// Check every stored event offline (server stopped): checksums, gaps, heads; non-zero exit on damage
    Verify(verify::VerifyArgs),
}

impl Cli {
    /// Runs the command; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Serve { config, settings } => return serve(config, *settings).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Streams(args) => streams::run(args).await,
            Command::Consumers(args) => consumers::run(args).await,
            Command::Keys(args) => keys::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Groups(args) => groups::run(args).await,
            Command::Bench(args) => crate::bench::run(args).await,
            Command::Repair(args) => repair::run(args).await,
            Command::Verify(args) => verify::run(args).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// Whether the command is the server (which logs at info by default).
    pub fn is_server(&self) -> bool {
        matches!(self.command, Command::Serve { .. })
    }
}

async fn serve(config_file: Option<PathBuf>, settings: ServeSettings) -> ExitCode {
    // Exit code 64 (EX_USAGE) for bad configuration, 1 for runtime failures.
    let usage = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(64)
    };
    let settings = match config_file.as_deref().map(ServeSettings::from_file) {
        None => settings,
        Some(Ok(file)) => settings.or(file),
        Some(Err(e)) => return usage(e.to_string()),
    };
    let config = match ServerConfig::try_from(settings) {
        Ok(config) => config,
        Err(e) => return usage(e.to_string()),
    };
    let listen = config.listen;
    let server = match Server::open(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e} (is another server running there? pass --listen)");
            return ExitCode::FAILURE;
        }
    };
    match server.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to the server, with an error that says what to check.
/// Checks the client settings without connecting (for commands that
/// retry connections and must not retry a mistake).
fn check_client_args(args: &ClientArgs) -> anyhow::Result<()> {
    endpoint(args).map(|_| ())
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let (channel, header) = connect_channel(args).await?;
    Ok(EventLogClient::with_interceptor(channel, header).max_decoding_message_size(usize::MAX))
}

/// Connects to the server's `ApiKeys` service.
async fn connect_keys(
    args: &ClientArgs,
) -> anyhow::Result<ApiKeysClient<InterceptedService<Channel, ApiKeyHeader>>> {
    let (channel, header) = connect_channel(args).await?;
    Ok(ApiKeysClient::with_interceptor(channel, header))
}

/// The client's TLS settings from --tls-ca, --tls-cert and --tls-key.
fn client_tls(args: &ClientArgs) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use anyhow::Context;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let Some(ca) = &args.tls_ca else {
        anyhow::bail!("an https:// server needs --tls-ca (the PEM CA that signed its certificate)");
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    Ok(tls)
}

async fn connect_channel(args: &ClientArgs) -> anyhow::Result<(Channel, ApiKeyHeader)> {
    let header = ApiKeyHeader::new(args.api_key.as_deref())?;
    let channel = endpoint(args)?.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the server at {}: {e} (is `pullstream serve` running? set --server or PULLSTREAM_SERVER)",
            args.server
        )
    })?;
    Ok((channel, header))
}

/// The endpoint the client settings describe; fails on settings that no
/// retry can fix (a bad URL, missing or unreadable TLS files).
fn endpoint(args: &ClientArgs) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|e| anyhow::anyhow!("invalid --server URL {:?}: {e}", args.server))?
        .connect_timeout(Duration::from_secs(5));
    if args.server.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(args)?)
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    } else if args.tls_ca.is_some() || args.tls_cert.is_some() {
        anyhow::bail!("--tls-ca/--tls-cert need an https:// server URL");
    }
    Ok(endpoint)
}

/// Describes a gRPC error for a person: the code and the server's message.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
