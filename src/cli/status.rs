//! `pullstream status`: the server at a glance. Version and uptime, each
//! stream with its head, first retained offset, append rate over the last
//! minute, size and retention, and each durable consumer with its lag.
//! One GetServerStatus call; `--json` prints the response for scripts.

use std::time::Duration;

use super::{connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    output: super::output::OutputArgs,
}

/// Runs `pullstream status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let status = client
        .get_server_status(pb::GetServerStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.output.json {
        args.output.object(&json::status(&status));
    } else {
        print!("{}", render(&args.client.server, &status));
    }
    Ok(())
}

fn uptime(status: &pb::GetServerStatusResponse) -> Duration {
    status.uptime.map_or(Duration::ZERO, |u| {
        // Whole seconds read better in a table.
        Duration::from_secs(u.seconds.max(0) as u64)
    })
}

/// The tables, as text.
fn render(server: &str, status: &pb::GetServerStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let started = json::time_text(status.start_time.as_ref());
    let _ = writeln!(
        out,
        "pullstream {} at {server}, up {} (since {})",
        status.server_version,
        humantime::format_duration(uptime(status)),
        started.as_str().unwrap_or("-")
    );
    let scopes: Vec<&str> = status.scopes.iter().map(|&s| json::scope_name(s)).collect();
    let _ = writeln!(
        out,
        "tenant {}, {}",
        status.tenant,
        if status.api_key_id.is_empty() {
            "open server (no API keys): every scope".to_string()
        } else {
            format!(
                "key {} with scopes {}",
                status.api_key_id,
                scopes.join(", ")
            )
        }
    );
    if !status.write_refusal.is_empty() {
        let _ = writeln!(
            out,
            "\nWRITES REFUSED (reads go on): {}",
            status.write_refusal
        );
    }
    if status.streams.is_empty() {
        let _ = writeln!(
            out,
            "\nno streams yet: `pullstream publish STREAM --type T` creates one"
        );
        return out;
    }
    let width = status
        .streams
        .iter()
        .filter_map(|s| s.stream.as_ref().map(|i| i.name.len()))
        .max()
        .unwrap_or(0)
        .max(6);
    let _ = writeln!(
        out,
        "\n{:<width$}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  RETENTION",
        "STREAM", "FIRST", "NEXT", "EVENTS", "EVENTS/S", "SIZE"
    );
    for s in &status.streams {
        let info = s.stream.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<width$}  {:>12}  {:>12}  {:>12}  {:>10.1}  {:>10}  {}",
            info.name,
            info.first_offset,
            info.next_offset,
            info.event_count,
            s.append_rate,
            super::output::bytes_text(info.approximate_bytes),
            info.retention
                .as_ref()
                .map_or("keep everything".to_string(), json::retention_text)
        );
    }
    for s in &status.streams {
        let name = s.stream.as_ref().map_or("", |i| i.name.as_str());
        for d in &s.damaged {
            let _ = writeln!(
                out,
                "DATA LOSS: stream {name} offsets {}..{} are damaged or missing in storage (reads get DATA_LOSS; stop the server and run `pullstream verify`)",
                d.first_offset,
                d.end_offset.map_or("?".to_string(), |e| (e - 1).to_string())
            );
        }
    }
    let consumers: Vec<_> = status
        .streams
        .iter()
        .flat_map(|s| s.consumers.iter())
        .collect();
    if consumers.is_empty() {
        return out;
    }
    let consumer_width = consumers
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let _ = writeln!(
        out,
        "\n{:<width$}  {:<consumer_width$}  {:>12}  {:>12}  {:>10}  {:<6}  LAST COMMIT",
        "STREAM", "CONSUMER", "NEXT", "LAG", "LAG TIME", "ACTIVE"
    );
    let now = std::time::SystemTime::now();
    for c in &consumers {
        let _ = writeln!(
            out,
            "{:<width$}  {:<consumer_width$}  {:>12}  {:>12}  {:>10}  {:<6}  {}",
            c.stream,
            c.name,
            c.next_offset,
            c.lag,
            json::lag_time_text(c),
            if c.active { "yes" } else { "no" },
            json::ago_text(c.last_commit_time.as_ref(), now),
        );
    }
    for c in consumers.iter().filter(|c| c.cursor_trimmed) {
        let _ = writeln!(
            out,
            "\nwarning: retention removed events consumer {} of stream {} never committed; \
             its subscriptions fail with OUT_OF_RANGE until it commits the stream's first \
             offset (`pullstream consumers commit {} {} OFFSET`)",
            c.name, c.stream, c.stream, c.name
        );
    }
    out
}
