//! `pullstream verify`: walks every stored chunk of every stream offline
//! (the server stopped) and reports damage; exits non-zero when it finds
//! any. `serve --verify-on-start` runs the same walk before serving.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;

use crate::storage::{Store, StoreOptions, StreamCheck};

/// `pullstream verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The server's data dir (stop the server first)
    #[arg(long, env = "PULLSTREAM_DATA_DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    output: super::output::OutputArgs,
}

/// Runs the command.
pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let store = Store::open(&StoreOptions {
            path: dir.clone(),
            cache_bytes: 64 << 20,
            background_flush: crate::storage::BackgroundFlush::Off,
            write_ahead_log: true,
            checkpoint_bytes: crate::durability::wal::DEFAULT_CHECKPOINT_BYTES,
            faults: None,
        })
        .with_context(|| format!("opening {} (stop the server first)", dir.display()))?;
        let terminal = std::io::stderr().is_terminal();
        let checks = store.verify(|chunks| {
            if terminal {
                eprint!("\rchecked {chunks} chunks");
            }
        })?;
        if terminal {
            eprintln!();
        }
        Ok::<_, anyhow::Error>(checks)
    })
    .await??;
    let damaged: usize = checks.iter().map(|c| c.damage.len()).sum();
    if args.output.json {
        println!("{}", to_json(&checks));
    } else {
        print!("{}", render(&checks));
    }
    if damaged > 0 {
        anyhow::bail!(
            "{damaged} damaged or missing range(s) in {}: restore the data dir from a backup",
            args.data_dir.display()
        );
    }
    Ok(())
}

/// The report as text, one line per stream and per damaged range.
pub fn render(checks: &[StreamCheck]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for check in checks {
        let _ = writeln!(
            out,
            "{} {}: offsets {}..{}, {} chunks",
            if check.damage.is_empty() {
                "ok     "
            } else {
                "DAMAGED"
            },
            check.name,
            check.first_offset,
            check.next_offset,
            check.chunks
        );
        for d in &check.damage {
            let _ = writeln!(
                out,
                "        offsets {}..{}: {}",
                d.first,
                d.end.map_or("?".to_string(), |e| e.to_string()),
                d.reason
            );
        }
    }
    if checks.is_empty() {
        out.push_str("no streams\n");
    }
    out
}

fn to_json(checks: &[StreamCheck]) -> serde_json::Value {
    checks
        .iter()
        .map(|c| {
            serde_json::json!({
                "stream": c.name,
                "first_offset": c.first_offset,
                "next_offset": c.next_offset,
                "chunks": c.chunks,
                "damage": c.damage.iter().map(|d| serde_json::json!({
                    "first": d.first, "end": d.end, "reason": d.reason,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}
