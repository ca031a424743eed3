//! `pullstream tail`: print a stream's events as JSON lines and follow it
//! live. Survives server restarts: it reads through the client library's
//! [`ResumingSubscription`](crate::client::ResumingSubscription), which
//! reconnects with backoff and resumes from its cursor, so no event is
//! missed or repeated.
//! As a durable consumer (`--consumer`) the cursor lives on the server:
//! with `--commit` it is committed after each printed batch, so the next
//! run continues where this one stopped.

use std::io::Write;

use super::committer::{CommitTo, Committer};
use super::{check_client_args, json, status_error, ClientArgs};
use crate::client::Reconnecting;
use crate::proto::{self as pb, subscribe_request::Start};

/// Arguments of `pullstream tail`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream tail orders --from 2026-11-27T08:00:00Z --type 'order.>'\n  \
    pullstream tail orders --consumer billing --commit --version 2024-06-01\n  \
    pullstream tail orders --group shippers --member worker-1 --commit\n\n\
    Type patterns: segments separated by '.'; '*' matches one segment, '>' as the\n\
    last segment matches the rest (\"order.*\", \"order.>\", \"*.deleted\").")]
pub struct TailArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The stream to follow
    stream: String,
    /// Where to start: earliest, latest, an offset, or an RFC 3339 time
    /// (the first event at or after it). With --consumer, only for a new consumer
    #[arg(long, default_value = "earliest", value_parser = parse_from)]
    from: Start,
    /// Stop after this many events
    #[arg(long)]
    limit: Option<u64>,
    /// Read as this durable consumer: start at its committed cursor
    #[arg(long, conflicts_with = "group")]
    consumer: Option<String>,
    /// Read as a member of this key-shared consumer group (with --member):
    /// only the events of the member's slots, each slot from its committed offset
    #[arg(long, requires = "member")]
    group: Option<String>,
    /// This worker's member id in --group (stable across restarts)
    #[arg(long, requires = "group")]
    member: Option<String>,
    /// Commit after each printed batch (the consumer's cursor, or the group member's progress)
    #[arg(long)]
    commit: bool,
    /// Only events whose type matches this pattern (repeatable)
    #[arg(long = "type", value_name = "PATTERN")]
    types: Vec<String>,
    /// Only events with this key (repeatable)
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    /// Deliver each event's payload rendering for this version label
    #[arg(long, value_name = "LABEL")]
    version: Option<String>,
}

pub(super) fn parse_from(s: &str) -> Result<Start, String> {
    match s {
        "earliest" => Ok(Start::Position(pb::StartPosition::Earliest as i32)),
        "latest" => Ok(Start::Position(pb::StartPosition::Latest as i32)),
        n => {
            if let Ok(offset) = n.parse() {
                return Ok(Start::Offset(offset));
            }
            let time = humantime::parse_rfc3339_weak(n).map_err(|_| {
                format!("{s:?} is not earliest, latest, an offset or an RFC 3339 time (e.g. 2026-11-27T08:00:00Z)")
            })?;
            let since = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("{s:?} is before 1970"))?;
            Ok(Start::Time(prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }))
        }
    }
}

/// Runs `pullstream tail`.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    // Settings no reconnect can fix fail now, not in the retry loop.
    check_client_args(&args.client)?;
    if args.commit && args.consumer.is_none() && args.group.is_none() {
        anyhow::bail!("--commit needs --consumer NAME or --group NAME --member ID: there is nothing to commit to");
    }
    if args.limit == Some(0) {
        return Ok(());
    }
    let options = args.client.options();
    let filter = (!args.types.is_empty() || !args.keys.is_empty()).then(|| pb::EventFilter {
        types: args.types.clone(),
        keys: args.keys.clone(),
    });
    let request = pb::SubscribeRequest {
        group: args.group.clone().unwrap_or_default(),
        member: args.member.clone().unwrap_or_default(),
        stream: args.stream.clone(),
        start: Some(args.from),
        max_batch_events: 0,
        consumer: args.consumer.clone().unwrap_or_default(),
        filter,
        version: args.version.clone().unwrap_or_default(),
    };
    let from = args.from;
    // The library reconnects with backoff and resumes from the cursor of
    // the last response; this only says so.
    let mut subscription =
        options
            .subscribe_resuming(request)
            .on_reconnect(move |r: &Reconnecting<'_>| {
                let resume = match r.resume_from {
                    Some(offset) => format!("offset {offset}"),
                    None => format!("{from:?}"),
                };
                eprintln!(
                    "connection lost ({}); reconnecting in {:?} and resuming from {resume}",
                    r.reason, r.delay
                );
            });
    let mut committer = match (&args.consumer, &args.group, &args.member) {
        (_, Some(group), Some(member)) => Some(CommitTo::Group {
            group: group.clone(),
            member: member.clone(),
        }),
        (Some(consumer), _, _) => Some(CommitTo::Consumer(consumer.clone())),
        _ => None,
    }
    .map(|to| Committer::new(options, args.stream.clone(), to));
    let mut remaining = args.limit;
    let stdout = std::io::stdout();
    loop {
        let response = subscription.next().await.map_err(status_error)?;
        if let Some(a) = &response.assignment {
            eprintln!(
                "group {}: generation {}, {} of {} slots{}",
                args.group.as_deref().unwrap_or_default(),
                a.generation,
                a.slots.len(),
                a.slot_count,
                if a.revoked_slots.is_empty() {
                    String::new()
                } else {
                    format!(", {} revoked", a.revoked_slots.len())
                }
            );
        }
        // Events of slots this response revokes were read just before the
        // rebalance: their new owner delivers them, so they are not printed.
        let revoked: Vec<u32> = response
            .assignment
            .as_ref()
            .map(|a| a.revoked_slots.clone())
            .unwrap_or_default();
        let mut cursor = response.next_offset;
        {
            let mut out = stdout.lock();
            for event in &response.events {
                let slot = crate::log::slot_of(event.key.as_bytes(), event.offset) as u32;
                if revoked.contains(&slot) {
                    continue;
                }
                if remaining == Some(0) {
                    // Stopped early (--limit): the cursor is after the
                    // last printed event.
                    break;
                }
                let line = json::event(event);
                if writeln!(out, "{line}").is_err() {
                    // stdout closed (e.g. piped into `head`): a normal end.
                    return Ok(());
                }
                cursor = event.offset + 1;
                if let Some(n) = remaining.as_mut() {
                    *n -= 1;
                }
            }
            if remaining != Some(0) {
                // Every event of the response was printed: its cursor holds
                // (with a filter it may be past the last event).
                cursor = response.next_offset;
            }
            let _ = out.flush();
        }
        if let (true, false, Some(committer)) =
            (args.commit, response.events.is_empty(), committer.as_mut())
        {
            committer.commit(cursor).await?;
        }
        if remaining == Some(0) {
            return Ok(());
        }
    }
}
