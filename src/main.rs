//! The `pullstream` binary: parses the command line, sets up logging, and
//! hands over to [`pullstream::cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pullstream::cli::Cli;
use pullstream::storage::segment_buffers::SegmentBuffers;
use tracing_subscriber::EnvFilter;

/// The system allocator, keeping sled's freed log buffers for reuse
/// instead of mapping fresh pages for every segment sled writes.
#[global_allocator]
static ALLOCATOR: SegmentBuffers = SegmentBuffers;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

/// Keeps glibc's allocator to one arena unless `MALLOC_ARENA_MAX` says
/// otherwise. Event buffers are allocated on one thread (a request being
/// decoded, a sled page read) and freed on another, which glibc's
/// per-thread arenas turn into fragmentation: with the default arenas the
/// server held 390 MiB after storing 10,000,000 events and 470 MiB after
/// reading them back; with one arena 230 MiB and 255 MiB, at the same
/// throughput on this 2-core machine (`pullstream bench --workload catchup
/// --events 10000000`). Must run before any thread is started.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning, and no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn run() -> ExitCode {
    // Usage errors (a bad flag or value, in flags or PULLSTREAM_*
    // variables) exit 64 (EX_USAGE), as bad settings do; --help and
    // --version print and exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(64);
        }
    };
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
