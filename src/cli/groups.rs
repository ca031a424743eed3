//! `pullstream groups`: inspect and delete a stream's key-shared consumer
//! groups.

use serde_json::json;

use super::{connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream groups`.
#[derive(Debug, clap::Args)]
pub struct GroupsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: GroupsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GroupsCommand {
    /// Members of a group with their slots and lag, and the group's low watermark
    Info {
        /// The stream
        stream: String,
        /// The group
        group: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete a group and its committed offsets; its members' subscriptions end
    Delete {
        /// The stream
        stream: String,
        /// The group
        group: String,
    },
}

/// Runs `pullstream groups`.
pub async fn run(args: GroupsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    match args.command {
        GroupsCommand::Info {
            stream,
            group,
            json,
        } => {
            let info = client
                .get_group(pb::GetGroupRequest { stream, group })
                .await
                .map_err(status_error)?
                .into_inner()
                .group
                .unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&info))?);
            } else {
                print_table(&info);
            }
        }
        GroupsCommand::Delete { stream, group } => {
            client
                .delete_group(pb::DeleteGroupRequest {
                    stream: stream.clone(),
                    group: group.clone(),
                })
                .await
                .map_err(status_error)?;
            eprintln!("deleted group {group} of stream {stream}");
        }
    }
    Ok(())
}

fn to_json(info: &pb::GroupInfo) -> serde_json::Value {
    json!({
        "stream": info.stream,
        "name": info.name,
        "generation": info.generation,
        "slot_count": info.slot_count,
        "head_offset": info.head_offset,
        "low_watermark": info.low_watermark,
        "created_time": json::time_text(info.created_time.as_ref()),
        "members": info.members.iter().map(|m| json!({
            "member": m.member,
            "slots": m.slots,
            "committed_offset": m.committed_offset,
            "delivered_offset": m.delivered_offset,
            "lag": m.lag,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(info: &pb::GroupInfo) {
    println!(
        "group {} of stream {}: generation {}, head {}, low watermark {} (lag {})",
        info.name,
        info.stream,
        info.generation,
        info.head_offset,
        info.low_watermark,
        info.head_offset.saturating_sub(info.low_watermark)
    );
    if info.members.is_empty() {
        println!(
            "no member connected: `pullstream tail {} --group {} --member ID --commit` joins one",
            info.stream, info.name
        );
        return;
    }
    let width = info
        .members
        .iter()
        .map(|m| m.member.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "{:<width$}  {:>6}  {:>12}  {:>12}  {:>12}",
        "MEMBER", "SLOTS", "COMMITTED", "DELIVERED", "LAG"
    );
    for m in &info.members {
        println!(
            "{:<width$}  {:>6}  {:>12}  {:>12}  {:>12}",
            m.member,
            m.slots.len(),
            m.committed_offset,
            m.delivered_offset,
            m.lag
        );
    }
}
