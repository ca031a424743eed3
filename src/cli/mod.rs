//! The `pullstream` command line: the server (`serve`) and the client
//! commands (`publish`, `tail`, `streams`, `consumers`) in one binary. Client commands
//! talk to a server over gRPC with the same generated client an SDK uses.

mod certs;
mod committer;
mod consumers;
mod events;
mod groups;
mod json;
mod keys;
mod listen;
mod output;
mod publish;
mod repair;
mod status;
mod streams;
mod tail;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::ConnectOptions;
use crate::config::{ServeSettings, ServerConfig};
use crate::server::{shutdown_signal, Server};

/// Ordered, durable event streams that consumers pull over gRPC.
#[derive(Debug, Parser)]
#[command(name = "pullstream", version, propagate_version = true, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Connection settings shared by the client commands (listed after each
/// command's own options, under their own heading).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Connection")]
pub struct ClientArgs {
    /// Server URL: http://HOST:PORT, https://HOST:PORT for TLS (HOST:PORT alone means http://)
    #[arg(
        long,
        global = true,
        env = "PULLSTREAM_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_parser = parse_server
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

/// A `--server` value as a URL (a bad scheme is a usage error).
fn parse_server(s: &str) -> Result<String, String> {
    ConnectOptions {
        server: s.to_string(),
        ..Default::default()
    }
    .url()
    .map_err(|e| e.to_string())
}

/// The client the commands use.
pub use crate::client::Client;

impl ClientArgs {
    /// The connection settings these flags describe.
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            server: self.server.clone(),
            api_key: self.api_key.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}

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
    /// Deliver a stream to a local webhook handler (POST per event, signed, retried, in order) as a durable consumer
    Listen(listen::ListenArgs),
    /// List, inspect, create and delete streams
    Streams(streams::StreamsArgs),
    /// List, inspect, commit and delete a stream's durable consumers
    Consumers(consumers::ConsumersArgs),
    /// Create, list and revoke API keys (offline on a data dir, or over gRPC)
    Keys(keys::KeysArgs),
    /// The server at a glance: uptime, streams with rates and sizes, consumer lag
    Status(status::StatusArgs),
    /// List, inspect, reset and delete key-shared consumer groups: members, slots, lag
    Groups(groups::GroupsArgs),
    /// Look up one stored event by offset
    Events(events::EventsArgs),
    /// Print a shell completion script: `pullstream completions bash > /etc/bash_completion.d/pullstream`
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Measure throughput, latency and memory (starts its own server unless --server)
    Bench(crate::bench::BenchArgs),
    /// Report what damage in the write-ahead log loses, and truncate it there with --yes (server stopped)
    Repair(repair::RepairArgs),
    /// Make a development CA with server and client certificates for TLS and mutual TLS
    Certs(certs::CertsArgs),
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
            Command::Listen(args) => listen::run(args).await,
            Command::Streams(args) => streams::run(args).await,
            Command::Consumers(args) => consumers::run(args).await,
            Command::Keys(args) => keys::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Groups(args) => groups::run(args).await,
            Command::Events(args) => events::run(args).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                // Into a buffer first: clap_complete panics on a write
                // error, and `| head` closes the pipe early.
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "pullstream", &mut script);
                match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                    _ => Ok(()),
                }
            }
            Command::Bench(args) => crate::bench::run(args).await,
            Command::Repair(args) => repair::run(args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Certs(args) => certs::run(args).await,
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
    // Bind first: a busy port fails before the data dir is created.
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e} (is another server running there? pass --listen)");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::open(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
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
    args.options().event_log().await
}

/// Connects to the server's `ApiKeys` service.
async fn connect_keys(args: &ClientArgs) -> anyhow::Result<crate::client::KeysClient> {
    args.options().api_keys().await
}

/// The endpoint the client settings describe; fails on settings that no
/// retry can fix (a bad URL, missing or unreadable TLS files).
fn endpoint(args: &ClientArgs) -> anyhow::Result<tonic::transport::Endpoint> {
    args.options().endpoint()
}

/// Every item of a paged list call: `fetch` gets a page token ("" for the
/// first page) and answers the page's items and the next token ("" at
/// the end).
async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token).await.map_err(status_error)?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        token = next;
    }
}

/// Describes a gRPC error for a person: the code and the server's message.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(crate::client::describe_status(&status, None))
}
