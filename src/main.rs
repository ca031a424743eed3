//! The `pullstream` binary: parses the command line, sets up logging, and
//! hands over to [`pullstream::cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pullstream::cli::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs at info by default; client commands keep stderr quiet
    // (warnings only) so their stdout is clean for scripts. RUST_LOG overrides.
    let default_level = if cli.is_server() { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    cli.run().await
}
