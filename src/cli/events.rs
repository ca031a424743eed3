//! `pullstream events`: one stored event by offset, for a look at what a
//! consumer choked on without tailing the stream.

use super::{connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    output: super::output::OutputArgs,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum EventsCommand {
    /// Print the event at an offset (JSON, as `tail` prints it, when piped or with --json)
    Get {
        /// The stream
        stream: String,
        /// The event's offset
        offset: u64,
        /// The payload version to render (a version label)
        #[arg(long, value_name = "LABEL")]
        payload_version: Option<String>,
    },
}

/// Runs `pullstream events`.
pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    match args.command {
        EventsCommand::Get {
            stream,
            offset,
            payload_version,
        } => {
            let page = client
                .read(pb::ReadRequest {
                    stream: stream.clone(),
                    offset,
                    limit: 1,
                    filter: None,
                    version: payload_version.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match page.events.first() {
                Some(event) if event.offset == offset => args.output.object(&json::event(event)),
                // Reading at the head answers an empty page.
                _ => anyhow::bail!(
                    "stream {stream} has no event at offset {offset} yet: its next offset is {}",
                    page.head_offset
                ),
            }
        }
    }
    Ok(())
}
