//! `pullstream streams`: list, inspect, create and delete streams.

use super::{connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream streams`.
#[derive(Debug, clap::Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: StreamsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StreamsCommand {
    /// List every stream (a table; --json for scripts)
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Describe one stream as JSON
    Info {
        /// The stream
        stream: String,
    },
    /// Create an empty stream
    Create {
        /// The stream
        stream: String,
    },
    /// Delete a stream and all its events
    Delete {
        /// The stream
        stream: String,
    },
}

/// Runs `pullstream streams`.
pub async fn run(args: StreamsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    match args.command {
        StreamsCommand::List { json } => {
            let mut streams = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_streams(pb::ListStreamsRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                streams.extend(page.streams);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json {
                let list: Vec<_> = streams.iter().map(json::stream_info).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&streams);
            }
        }
        StreamsCommand::Info { stream } => {
            let info = client
                .get_stream(pb::GetStreamRequest { stream })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(info.stream)?;
        }
        StreamsCommand::Create { stream } => {
            let info = client
                .create_stream(pb::CreateStreamRequest { stream })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(info.stream)?;
        }
        StreamsCommand::Delete { stream } => {
            client
                .delete_stream(pb::DeleteStreamRequest {
                    stream: stream.clone(),
                })
                .await
                .map_err(status_error)?;
            eprintln!("deleted stream {stream}");
        }
    }
    Ok(())
}

fn print_info(info: Option<pb::StreamInfo>) -> anyhow::Result<()> {
    let info = info.unwrap_or_default();
    println!(
        "{}",
        serde_json::to_string_pretty(&json::stream_info(&info))?
    );
    Ok(())
}

fn print_table(streams: &[pb::StreamInfo]) {
    if streams.is_empty() {
        eprintln!("no streams yet: `pullstream publish STREAM --type T` creates one");
        return;
    }
    let width = streams
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "{:<width$}  {:>12}  {:>12}  {:>12}  {:>12}  CREATED",
        "STREAM", "FIRST", "NEXT", "EVENTS", "BYTES"
    );
    for s in streams {
        let created = json::time_text(s.created_time.as_ref());
        println!(
            "{:<width$}  {:>12}  {:>12}  {:>12}  {:>12}  {}",
            s.name,
            s.first_offset,
            s.next_offset,
            s.event_count,
            s.approximate_bytes,
            created.as_str().unwrap_or("-")
        );
    }
}
