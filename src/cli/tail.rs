//! `pullstream tail`: print a stream's events as JSON lines and follow it
//! live (or, with `--no-follow`, up to the head). Survives server
//! restarts: it reads through the client library's
//! [`ResumingSubscription`](crate::client::ResumingSubscription), which
//! reconnects with backoff and resumes from its cursor, so no event is
//! missed or repeated; a server it cannot reach is reported once, and the
//! reconnect when it comes.
//!
//! As a durable consumer (`--consumer`) with `--commit`, the cursor lives
//! on the server and is committed after each printed batch, so the next
//! run continues where this one stopped. Without `--commit` it only looks:
//! it reads from the consumer's cursor with its saved filter and version,
//! and changes nothing on the server.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::committer::{CommitTo, Committer};
use super::{check_client_args, json, status_error, ClientArgs};
use crate::client::{ConnectOptions, Reconnecting};
use crate::proto::{self as pb, subscribe_request::Start};

/// Arguments of `pullstream tail`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream tail orders --no-follow                 everything so far, then exit\n  \
    pullstream tail orders --from -10                  the last 10 events, then follow\n  \
    pullstream tail orders --since 1h --type 'order.>'\n  \
    pullstream tail orders --consumer billing --commit --payload-version 2024-06-01\n  \
    pullstream tail orders --group shippers --member worker-1 --commit\n\n\
    Type patterns: segments separated by '.'; '*' matches one segment, '>' as the\n\
    last segment matches the rest (\"order.*\", \"order.>\", \"*.deleted\").")]
pub struct TailArgs {
    /// The stream to follow
    stream: String,
    /// Where to start: earliest (the default), latest, an offset, -N for the
    /// last N events, or an RFC 3339 time (the first event at or after it).
    /// With --consumer, only where a new consumer starts
    #[arg(long, value_parser = parse_start, allow_hyphen_values = true, conflicts_with = "since")]
    from: Option<From>,
    /// Start at the first event of the last DURATION (e.g. 90s, 15m, 1h, 2d)
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    since: Option<Duration>,
    /// Print what the stream holds now and exit at its head, instead of following it
    #[arg(long)]
    no_follow: bool,
    /// Accepted like every command's --json: tail prints JSON Lines either way
    #[arg(long = "json")]
    _json: bool,
    /// Stop after this many events
    #[arg(long, visible_alias = "count", value_name = "N")]
    limit: Option<u64>,
    /// Read as this durable consumer, from its cursor (with --commit: save progress)
    #[arg(long, conflicts_with = "group")]
    consumer: Option<String>,
    /// Read as a member of this key-shared consumer group (with --member):
    /// only the events of the member's slots, each slot from its committed offset
    #[arg(long, requires = "member")]
    group: Option<String>,
    /// This worker's member id in --group (stable across restarts)
    #[arg(long, requires = "group")]
    member: Option<String>,
    /// Commit after each printed batch (the consumer's cursor, or the group
    /// member's progress); creates a new consumer, and saves --type, --key
    /// and --payload-version as its settings
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
    payload_version: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Where `--from` starts.
#[derive(Debug, Clone, Copy)]
pub enum From {
    /// A start the server resolves.
    At(Start),
    /// The last N events (resolved against the stream's head).
    Last(u64),
}

fn parse_start(s: &str) -> Result<From, String> {
    if let Some(n) = s.strip_prefix('-') {
        return n
            .parse()
            .map(From::Last)
            .map_err(|_| format!("{s:?}: -N is the last N events (e.g. -10)"));
    }
    parse_from(s).map(From::At)
}

fn parse_since(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 90s, 15m, 1h or 2d ({e})"))
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
                format!("{s:?} is not earliest, latest, an offset, -N or an RFC 3339 time (e.g. 2026-11-27T08:00:00Z)")
            })?;
            Ok(Start::Time(
                timestamp(time).ok_or_else(|| format!("{s:?} is before 1970"))?,
            ))
        }
    }
}

/// A time given on the command line: an RFC 3339 time, or a duration
/// meaning that long ago (`1h`, `2d`).
pub(super) fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let time = match humantime::parse_rfc3339_weak(s) {
        Ok(time) => time,
        Err(_) => {
            let ago = humantime::parse_duration(s).map_err(|_| {
                format!("{s:?} is neither an RFC 3339 time (e.g. 2026-11-27T08:00:00Z) nor a duration ago (e.g. 90s, 15m, 1h, 2d)")
            })?;
            SystemTime::now()
                .checked_sub(ago)
                .ok_or_else(|| format!("{s:?} reaches before 1970"))?
        }
    };
    timestamp(time).ok_or_else(|| format!("{s:?} is before 1970"))
}

fn timestamp(time: SystemTime) -> Option<prost_types::Timestamp> {
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    })
}

/// A start as a person reads it.
fn describe(start: &Start) -> String {
    match start {
        Start::Offset(offset) => format!("offset {offset}"),
        Start::Position(p) if *p == pb::StartPosition::Latest as i32 => "the head".into(),
        Start::Position(_) => "the earliest event".into(),
        Start::Time(t) => {
            let time = std::time::UNIX_EPOCH
                + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
            format!(
                "the first event at or after {}",
                humantime::format_rfc3339_seconds(time)
            )
        }
    }
}

/// The start `--from` / `--since` ask for (`None`: not given).
async fn requested_start(
    args: &TailArgs,
    options: &ConnectOptions,
) -> anyhow::Result<Option<Start>> {
    if let Some(since) = args.since {
        let time = SystemTime::now() - since;
        return Ok(Some(Start::Time(
            timestamp(time).ok_or_else(|| anyhow::anyhow!("--since reaches before 1970"))?,
        )));
    }
    Ok(match args.from {
        None => None,
        Some(From::At(start)) => Some(start),
        Some(From::Last(n)) => {
            let info = options
                .event_log()
                .await?
                .get_stream(pb::GetStreamRequest {
                    stream: args.stream.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .stream
                .unwrap_or_default();
            Some(Start::Offset(
                info.next_offset.saturating_sub(n).max(info.first_offset),
            ))
        }
    })
}

/// Who the subscription reads as, and from where, after asking the server
/// about the consumer: `--from` only places a new consumer, and a read
/// without `--commit` uses no consumer at all (it starts at the
/// consumer's cursor with its saved settings, and saves nothing).
async fn plan(args: &TailArgs, options: &ConnectOptions) -> anyhow::Result<pb::SubscribeRequest> {
    let start = requested_start(args, options).await?;
    let filter = (!args.types.is_empty() || !args.keys.is_empty()).then(|| pb::EventFilter {
        types: args.types.clone(),
        keys: args.keys.clone(),
    });
    let mut request = pb::SubscribeRequest {
        group: args.group.clone().unwrap_or_default(),
        member: args.member.clone().unwrap_or_default(),
        stream: args.stream.clone(),
        start: Some(start.unwrap_or(Start::Position(pb::StartPosition::Earliest as i32))),
        max_batch_events: 0,
        consumer: String::new(),
        filter,
        version: args.payload_version.clone().unwrap_or_default(),
    };
    let Some(consumer) = &args.consumer else {
        return Ok(request);
    };
    let existing = options
        .event_log()
        .await?
        .get_consumer(pb::GetConsumerRequest {
            stream: args.stream.clone(),
            consumer: consumer.clone(),
        })
        .await;
    let existing = match existing {
        Ok(response) => response.into_inner().consumer,
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => return Err(status_error(status)),
    };
    match (existing, args.commit) {
        (Some(info), _) if start.is_some() => anyhow::bail!(
            "consumer {consumer:?} of {:?} already exists, at offset {}: --from and --since only place a new consumer. \
             To move its cursor: pullstream consumers commit {} {consumer} OFFSET",
            args.stream,
            info.next_offset,
            args.stream
        ),
        (Some(info), false) => {
            // Look without touching: the consumer's cursor and settings,
            // read as a plain subscription.
            eprintln!(
                "reading as consumer {consumer:?} from its cursor (offset {}) without committing; add --commit to save progress",
                info.next_offset
            );
            request.start = Some(Start::Offset(info.next_offset));
            if request.filter.is_none() {
                request.filter = info.filter;
            }
            if request.version.is_empty() {
                request.version = info.version;
            }
        }
        (None, false) => anyhow::bail!(
            "consumer {consumer:?} of {:?} does not exist: add --commit to create it (it starts at --from, \
             earliest by default) and save its progress, or drop --consumer to just read",
            args.stream
        ),
        (existing, true) => {
            if existing.is_some() && (request.filter.is_some() || !request.version.is_empty()) {
                eprintln!(
                    "consumer {consumer:?}: saving the given --type/--key/--payload-version as its new settings"
                );
            }
            request.consumer = consumer.clone();
        }
    }
    Ok(request)
}

/// What the reconnect messages have said so far.
#[derive(Default)]
struct Connection {
    /// A response has arrived since the subscription started.
    connected: bool,
    /// The problem last reported, while it lasts.
    reported: Option<String>,
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
    let request = plan(&args, &options).await?;
    let first_start = request.start.expect("planned");
    let durable = !request.consumer.is_empty();
    let server = options.url()?;
    // The library reconnects with backoff and resumes from the cursor of
    // the last response; this says so once per problem, not per attempt.
    let connection = Arc::new(Mutex::new(Connection::default()));
    let told = connection.clone();
    let mut subscription =
        options
            .subscribe_resuming(request)
            .on_reconnect(move |r: &Reconnecting<'_>| {
                let mut told = told.lock().expect("connection state");
                if told.reported.as_deref() == Some(r.reason) {
                    return;
                }
                told.reported = Some(r.reason.to_string());
                let resume = match (r.resume_from, durable) {
                    (_, true) => "the consumer's cursor".to_string(),
                    (Some(offset), false) => format!("offset {offset}"),
                    (None, false) => describe(&first_start),
                };
                if told.connected {
                    eprintln!(
                        "connection lost ({}); reconnecting (backoff up to 5s) and resuming from {resume}",
                        r.reason
                    );
                } else {
                    let reason = match r.reason.starts_with("cannot reach") {
                        true => r.reason.to_string(),
                        false => format!("cannot reach the server at {server}: {}", r.reason),
                    };
                    eprintln!(
                        "{reason}; retrying (backoff up to 5s), then starting from {resume}"
                    );
                }
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
        {
            let mut connection = connection.lock().expect("connection state");
            if connection.reported.take().is_some() {
                eprintln!(
                    "{}",
                    match connection.connected {
                        true => "reconnected; resumed where it stopped",
                        false => "connected",
                    }
                );
            }
            connection.connected = true;
        }
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
        if remaining == Some(0) || (args.no_follow && response.caught_up) {
            return Ok(());
        }
    }
}
