//! `pullstream tail`: print a stream's events as JSON lines and follow it
//! live. Survives server restarts: on a lost connection it reconnects with
//! backoff and resumes from its cursor, so no event is missed or repeated.

use std::io::Write;
use std::time::Duration;

use tonic::Code;

use super::{connect, json, status_error, ClientArgs};
use crate::proto::{self as pb, subscribe_request::Start};

/// Arguments of `pullstream tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The stream to follow
    stream: String,
    /// Where to start: earliest, latest, or an offset
    #[arg(long, default_value = "earliest", value_parser = parse_from)]
    from: Start,
    /// Stop after this many events
    #[arg(long)]
    limit: Option<u64>,
}

fn parse_from(s: &str) -> Result<Start, String> {
    match s {
        "earliest" => Ok(Start::Position(pb::StartPosition::Earliest as i32)),
        "latest" => Ok(Start::Position(pb::StartPosition::Latest as i32)),
        n => n
            .parse()
            .map(Start::Offset)
            .map_err(|_| format!("{s:?} is not earliest, latest or an offset")),
    }
}

/// Runs `pullstream tail`.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let mut start = args.from;
    let mut remaining = args.limit;
    let mut backoff = Duration::from_millis(100);
    let stdout = std::io::stdout();
    loop {
        if remaining == Some(0) {
            return Ok(());
        }
        let result = follow(&args, &mut start, &mut remaining, &stdout, &mut backoff).await;
        match result {
            Ok(()) => return Ok(()),
            Err(Interruption::Fatal(e)) => return Err(e),
            Err(Interruption::Retry(reason)) => {
                eprintln!("connection lost ({reason}); reconnecting in {backoff:?} and resuming from {start:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum Interruption {
    /// Worth reconnecting: the server went away or is restarting.
    Retry(String),
    /// Not worth retrying: bad arguments, unknown stream, trimmed cursor.
    Fatal(anyhow::Error),
}

async fn follow(
    args: &TailArgs,
    start: &mut Start,
    remaining: &mut Option<u64>,
    stdout: &std::io::Stdout,
    backoff: &mut Duration,
) -> Result<(), Interruption> {
    let mut client = connect(&args.client)
        .await
        .map_err(|e| Interruption::Retry(e.to_string()))?;
    let request = pb::SubscribeRequest {
        stream: args.stream.clone(),
        start: Some(*start),
        max_batch_events: 0,
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(classify)?
        .into_inner();
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                return Err(Interruption::Retry(
                    "the server ended the subscription".into(),
                ))
            }
            Err(status) => return Err(classify(status)),
        };
        *backoff = Duration::from_millis(100);
        let mut out = stdout.lock();
        for event in &response.events {
            if remaining.is_some_and(|n| n == 0) {
                break;
            }
            let line = json::event(event);
            if writeln!(out, "{line}").is_err() {
                // stdout closed (e.g. piped into `head`): a normal end.
                return Ok(());
            }
            *start = Start::Offset(event.offset + 1);
            if let Some(n) = remaining.as_mut() {
                *n -= 1;
            }
        }
        let _ = out.flush();
        if remaining.is_some_and(|n| n == 0) {
            return Ok(());
        }
        *start = Start::Offset(response.next_offset);
    }
}

fn classify(status: tonic::Status) -> Interruption {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => {
            Interruption::Retry(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => Interruption::Fatal(status_error(status)),
    }
}
