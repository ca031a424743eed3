//! `pullstream repair`: report what damage in the write-ahead log costs,
//! and with `--yes` truncate the log there so the server can start.
//! (The server refuses to start on such damage and names this command.)

use std::path::PathBuf;

use crate::storage::repair;

/// `pullstream repair` arguments.
#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// The server's data dir (stop the server first)
    #[arg(long, env = "PULLSTREAM_DATA_DIR")]
    data_dir: PathBuf,
    /// Truncate the log at the damage; without it, only report what would be lost
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    output: super::output::OutputArgs,
}

/// Runs the command.
pub async fn run(args: RepairArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.clone();
    let plan = tokio::task::spawn_blocking(move || repair::plan(&dir)).await??;
    let Some(damage) = &plan.damage else {
        if args.output.json {
            println!("{}", serde_json::json!({ "damage": null, "losses": [] }));
        } else {
            println!(
                "the write-ahead log in {} is undamaged: nothing to repair",
                args.data_dir.display()
            );
        }
        return Ok(());
    };
    let evidence = if args.yes { plan.apply()? } else { None };
    if args.output.json {
        println!(
            "{}",
            serde_json::json!({
                "damage": damage.to_string(),
                "lost_records": plan.lost_records,
                "unreadable_bytes": plan.unreadable_bytes,
                "losses": plan.losses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "repaired": evidence.is_some(),
                "evidence": evidence.as_ref().map(|p| p.display().to_string()),
            })
        );
    } else {
        println!("{damage}");
        println!(
            "Everything from there on is lost: {} unreadable record(s) ({} bytes) and {} readable records after it.",
            plan.unreadable_records, plan.unreadable_bytes, plan.lost_records
        );
        if plan.losses.is_empty() {
            println!("None of it changes what the streams hold (sled already has it).");
        } else {
            println!("Lost:");
            for loss in &plan.losses {
                println!("  - {loss}");
            }
        }
        match &evidence {
            Some(dir) => println!(
                "Repaired: the log now ends at the damage; what followed is kept in {}. Start the server.",
                dir.display()
            ),
            None => println!("Nothing was changed. Run again with --yes to truncate the log there."),
        }
    }
    if evidence.is_none() {
        anyhow::bail!("the write-ahead log is damaged and was not repaired (pass --yes)");
    }
    Ok(())
}
