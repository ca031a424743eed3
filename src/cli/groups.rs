//! `pullstream groups`: list, inspect, reset and delete a stream's
//! key-shared consumer groups.

use serde_json::json;

use super::output::OutputArgs;
use super::{all_pages, connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream groups`.
#[derive(Debug, clap::Args)]
pub struct GroupsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: GroupsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GroupsCommand {
    /// A stream's groups with their members and lag (a table; --json for a JSON array)
    List {
        /// The stream
        stream: String,
    },
    /// Move every slot of a group to an offset or a time (no member may be connected)
    #[command(group(clap::ArgGroup::new("to").required(true).args(["to_offset", "to_time", "to_earliest", "to_latest"])))]
    Reset {
        /// The stream
        stream: String,
        /// The group
        group: String,
        /// Members resume at this offset
        #[arg(long)]
        to_offset: Option<u64>,
        /// Members resume at the first event appended at or after this time (RFC 3339, or a duration ago such as 1h)
        #[arg(long, value_parser = super::tail::parse_time)]
        to_time: Option<prost_types::Timestamp>,
        /// Members resume at the first retained event
        #[arg(long)]
        to_earliest: bool,
        /// Members resume at the head (skipping everything stored)
        #[arg(long)]
        to_latest: bool,
    },
    /// Members of a group with their slots and lag, and the group's low watermark (a table; --json for JSON)
    Info {
        /// The stream
        stream: String,
        /// The group
        group: String,
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
    let output = args.output;
    match args.command {
        GroupsCommand::List { stream } => {
            let groups = all_pages(|page_token| {
                let (mut client, stream) = (client.clone(), stream.clone());
                async move {
                    let page = client
                        .list_groups(pb::ListGroupsRequest {
                            stream,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.groups, page.next_page_token))
                }
            })
            .await?;
            output.list(groups.iter().map(to_json), || print_list(&stream, &groups));
        }
        GroupsCommand::Reset {
            stream,
            group,
            to_offset,
            to_time,
            to_earliest,
            to_latest,
        } => {
            use pb::reset_group_request::To;
            let to = match (to_offset, to_time) {
                (Some(offset), _) => To::Offset(offset),
                (_, Some(time)) => To::Time(time),
                _ if to_latest => To::Position(pb::StartPosition::Latest as i32),
                _ => {
                    debug_assert!(to_earliest);
                    To::Position(pb::StartPosition::Earliest as i32)
                }
            };
            let info = client
                .reset_group(pb::ResetGroupRequest {
                    stream,
                    group,
                    to: Some(to),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .group
                .unwrap_or_default();
            if output.json {
                output.object(&to_json(&info));
            } else {
                eprintln!(
                    "reset group {} of stream {}: its members resume at offset {}",
                    info.name, info.stream, info.low_watermark
                );
            }
        }
        GroupsCommand::Info { stream, group } => {
            let info = client
                .get_group(pb::GetGroupRequest { stream, group })
                .await
                .map_err(status_error)?
                .into_inner()
                .group
                .unwrap_or_default();
            if output.json {
                output.object(&to_json(&info));
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

fn print_list(stream: &str, groups: &[pb::GroupInfo]) {
    if groups.is_empty() {
        eprintln!(
            "stream {stream} has no consumer groups yet: `pullstream tail {stream} --group NAME --member ID --commit` creates one"
        );
        return;
    }
    let width = groups
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:<width$}  {:>7}  {:>13}  {:>12}  {:>10}",
        "GROUP", "MEMBERS", "LOW WATERMARK", "LAG", "GENERATION"
    );
    for g in groups {
        println!(
            "{:<width$}  {:>7}  {:>13}  {:>12}  {:>10}",
            g.name,
            g.members.len(),
            g.low_watermark,
            g.head_offset.saturating_sub(g.low_watermark),
            g.generation
        );
    }
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
