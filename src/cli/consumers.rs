//! `pullstream consumers`: list, inspect, commit and delete a stream's
//! durable consumers, with their lag.

use super::output::OutputArgs;
use super::{all_pages, connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream consumers`.
#[derive(Debug, clap::Args)]
pub struct ConsumersArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: ConsumersCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConsumersCommand {
    /// List a stream's consumers with cursor and lag (a table; --json for a JSON array)
    List {
        /// The stream
        stream: String,
    },
    /// Describe one consumer (JSON when piped or with --json)
    Info {
        /// The stream
        stream: String,
        /// The consumer
        consumer: String,
    },
    /// Set a consumer's cursor (creating the consumer): where its next subscription starts
    #[command(group(clap::ArgGroup::new("to").required(true).args(["next_offset", "time"])))]
    Commit {
        /// The stream
        stream: String,
        /// The consumer
        consumer: String,
        /// The offset its next subscription starts at (rewinds are allowed)
        next_offset: Option<u64>,
        /// Instead of an offset: the first event appended at or after this time (RFC 3339, or a duration ago such as 1h)
        #[arg(long, value_parser = super::tail::parse_time)]
        time: Option<prost_types::Timestamp>,
        /// Also remove the consumer's saved filter (its next subscription gets every event)
        #[arg(long)]
        clear_filter: bool,
        /// Also remove the consumer's saved payload version
        #[arg(long)]
        clear_version: bool,
    },
    /// Delete a consumer; its open subscription ends
    Delete {
        /// The stream
        stream: String,
        /// The consumer
        consumer: String,
    },
}

/// Runs `pullstream consumers`.
pub async fn run(args: ConsumersArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let output = args.output;
    match args.command {
        ConsumersCommand::List { stream } => {
            let consumers = all_pages(|page_token| {
                let (mut client, stream) = (client.clone(), stream.clone());
                async move {
                    let page = client
                        .list_consumers(pb::ListConsumersRequest {
                            stream,
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.consumers, page.next_page_token))
                }
            })
            .await?;
            output.list(consumers.iter().map(json::consumer_info), || {
                print_table(&stream, &consumers)
            });
        }
        ConsumersCommand::Info { stream, consumer } => {
            let info = client
                .get_consumer(pb::GetConsumerRequest { stream, consumer })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(output, info.consumer);
        }
        ConsumersCommand::Commit {
            stream,
            consumer,
            next_offset,
            time,
            clear_filter,
            clear_version,
        } => {
            let info = client
                .commit_cursor(pb::CommitCursorRequest {
                    stream,
                    consumer,
                    next_offset: next_offset.unwrap_or_default(),
                    clear_filter,
                    clear_version,
                    time,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(output, info.consumer);
        }
        ConsumersCommand::Delete { stream, consumer } => {
            client
                .delete_consumer(pb::DeleteConsumerRequest {
                    stream: stream.clone(),
                    consumer: consumer.clone(),
                })
                .await
                .map_err(status_error)?;
            eprintln!("deleted consumer {consumer} of stream {stream}");
        }
    }
    Ok(())
}

fn print_info(output: OutputArgs, info: Option<pb::ConsumerInfo>) {
    output.object(&json::consumer_info(&info.unwrap_or_default()));
}

fn print_table(stream: &str, consumers: &[pb::ConsumerInfo]) {
    for c in consumers.iter().filter(|c| c.cursor_trimmed) {
        eprintln!(
            "warning: retention removed events consumer {} never committed; its subscriptions fail with OUT_OF_RANGE until it commits the stream's first offset (`pullstream consumers commit {stream} {} OFFSET`)",
            c.name, c.name
        );
    }
    if consumers.is_empty() {
        eprintln!(
            "stream {stream} has no consumers yet: `pullstream tail {stream} --consumer NAME --commit` creates one"
        );
        return;
    }
    let width = consumers
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(8);
    println!(
        "{:<width$}  {:>12}  {:>12}  {:>10}  {:<6}  {:<16}  FILTER / VERSION",
        "CONSUMER", "NEXT", "LAG", "LAG TIME", "ACTIVE", "LAST COMMIT"
    );
    let now = std::time::SystemTime::now();
    for c in consumers {
        let mut settings = c
            .filter
            .as_ref()
            .map(|f| {
                let mut parts = f.types.clone();
                parts.extend(f.keys.iter().map(|k| format!("key={k}")));
                parts.join(",")
            })
            .unwrap_or_default();
        if !c.version.is_empty() {
            if !settings.is_empty() {
                settings.push(' ');
            }
            settings.push_str(&format!("version={}", c.version));
        }
        println!(
            "{:<width$}  {:>12}  {:>12}  {:>10}  {:<6}  {:<16}  {}",
            c.name,
            c.next_offset,
            c.lag,
            json::lag_time_text(c),
            if c.active { "yes" } else { "no" },
            json::ago_text(c.last_commit_time.as_ref(), now),
            if settings.is_empty() { "-" } else { &settings }
        );
    }
}
