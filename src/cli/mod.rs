//! The `pullstream` command line: the server (`serve`) and the client
//! commands (`publish`, `tail`, `streams`, `consumers`) in one binary. Client commands
//! talk to a server over gRPC with the same generated client an SDK uses.

mod consumers;
mod json;
mod publish;
mod streams;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

use crate::config::{ServeSettings, ServerConfig};
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
        env = "PULLSTREAM_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server
    Serve {
        /// TOML file with the same settings as the flags (e.g. `durability = "fsync"`)
        #[arg(long, env = "PULLSTREAM_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: ServeSettings,
    },
    /// Append events: one from flags, or NDJSON events from stdin
    Publish(publish::PublishArgs),
    /// Print a stream's events as JSON lines, following new ones live
    Tail(tail::TailArgs),
    /// List, inspect, create and delete streams
    Streams(streams::StreamsArgs),
    /// List, inspect, commit and delete a stream's durable consumers
    Consumers(consumers::ConsumersArgs),
    /// Measure throughput, latency and memory (starts its own server unless --server)
    Bench(crate::bench::BenchArgs),
}

impl Cli {
    /// Runs the command; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Serve { config, settings } => return serve(config, settings).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Streams(args) => streams::run(args).await,
            Command::Consumers(args) => consumers::run(args).await,
            Command::Bench(args) => crate::bench::run(args).await,
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
async fn connect(args: &ClientArgs) -> anyhow::Result<EventLogClient<Channel>> {
    let endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|e| anyhow::anyhow!("invalid --server URL {:?}: {e}", args.server))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the server at {}: {e} (is `pullstream serve` running? set --server or PULLSTREAM_SERVER)",
            args.server
        )
    })?;
    Ok(EventLogClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// Describes a gRPC error for a person: the code and the server's message.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
