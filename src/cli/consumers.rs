//! `pullstream consumers`: list, inspect, commit and delete a stream's
//! durable consumers, with their lag.

use super::{connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream consumers`.
#[derive(Debug, clap::Args)]
pub struct ConsumersArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: ConsumersCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConsumersCommand {
    /// List a stream's consumers with cursor and lag (a table; --json for scripts)
    List {
        /// The stream
        stream: String,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Describe one consumer as JSON
    Info {
        /// The stream
        stream: String,
        /// The consumer
        consumer: String,
    },
    /// Set a consumer's cursor (creating the consumer): where its next subscription starts
    Commit {
        /// The stream
        stream: String,
        /// The consumer
        consumer: String,
        /// The offset its next subscription starts at (rewinds are allowed)
        next_offset: u64,
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
    match args.command {
        ConsumersCommand::List { stream, json } => {
            let consumers = client
                .list_consumers(pb::ListConsumersRequest {
                    stream: stream.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .consumers;
            if json {
                let list: Vec<_> = consumers.iter().map(json::consumer_info).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&stream, &consumers);
            }
        }
        ConsumersCommand::Info { stream, consumer } => {
            let info = client
                .get_consumer(pb::GetConsumerRequest { stream, consumer })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(info.consumer)?;
        }
        ConsumersCommand::Commit {
            stream,
            consumer,
            next_offset,
        } => {
            let info = client
                .commit_cursor(pb::CommitCursorRequest {
                    stream,
                    consumer,
                    next_offset,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(info.consumer)?;
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

fn print_info(info: Option<pb::ConsumerInfo>) -> anyhow::Result<()> {
    let info = info.unwrap_or_default();
    println!(
        "{}",
        serde_json::to_string_pretty(&json::consumer_info(&info))?
    );
    Ok(())
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
