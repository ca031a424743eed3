//! `pullstream streams`: list, inspect, create, update and delete streams.

use std::io::IsTerminal;
use std::time::Duration;

use super::output::OutputArgs;
use super::{all_pages, connect, json, status_error, ClientArgs};
use crate::proto as pb;

/// Arguments of `pullstream streams`.
#[derive(Debug, clap::Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: StreamsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StreamsCommand {
    /// List every stream (a table; --json for a JSON array)
    List,
    /// Describe one stream (JSON when piped or with --json)
    Info {
        /// The stream
        stream: String,
    },
    /// Create an empty stream, optionally with a retention policy
    Create {
        /// The stream
        stream: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Change a stream's retention policy (limits not given stay as they are)
    Update {
        /// The stream
        stream: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Delete a stream and all its events (asks first on a terminal)
    Delete {
        /// The stream
        stream: String,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Set the stream's fencing token: appends carrying another token are refused from then on (fences off older producers)
    Fence {
        /// The stream
        stream: String,
        /// The new token ("" removes it)
        token: String,
        /// Only if this is the current token ("" for none)
        #[arg(long)]
        expected: Option<String>,
    },
}

/// Runs `pullstream streams`.
pub async fn run(args: StreamsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let output = args.output;
    match args.command {
        StreamsCommand::List => {
            let streams = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_streams(pb::ListStreamsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.streams, page.next_page_token))
                }
            })
            .await?;
            output.list(streams.iter().map(json::stream_info), || {
                print_table(&streams)
            });
        }
        StreamsCommand::Fence {
            stream,
            token,
            expected,
        } => {
            let set = client
                .set_fence(pb::SetFenceRequest {
                    stream,
                    token,
                    expected_token: expected,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output.object(&serde_json::json!({ "stream": set.stream, "fencing_token": set.token }));
        }
        StreamsCommand::Info { stream } => {
            let info = client
                .get_stream(pb::GetStreamRequest { stream })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(output, info.stream);
        }
        StreamsCommand::Create { stream, retention } => {
            let retention = retention.apply(None);
            let info = client
                .create_stream(pb::CreateStreamRequest { stream, retention })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(output, info.stream);
        }
        StreamsCommand::Update { stream, retention } => {
            if retention.is_empty() {
                anyhow::bail!(
                    "nothing to change: give --max-age, --max-events or --max-bytes (`none` removes a limit)"
                );
            }
            let current = client
                .get_stream(pb::GetStreamRequest {
                    stream: stream.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .stream
                .and_then(|s| s.retention);
            let info = client
                .update_stream(pb::UpdateStreamRequest {
                    stream,
                    retention: retention.apply(current),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_info(output, info.stream);
        }
        StreamsCommand::Delete { stream, yes } => {
            if !yes && std::io::stdin().is_terminal() {
                let info = client
                    .get_stream(pb::GetStreamRequest {
                        stream: stream.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .stream
                    .unwrap_or_default();
                let events = info.next_offset - info.first_offset.min(info.next_offset);
                eprint!(
                    "delete stream {stream} with its {events} retained events and every consumer and group on it? This cannot be undone. [y/N] "
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
                    anyhow::bail!("not deleted (pass --yes to skip this question)");
                }
            }
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

/// Retention limits on the command line. `none` (or 0) removes a limit.
#[derive(Debug, clap::Args)]
struct RetentionArgs {
    /// Trim events older than this, e.g. `7d`, `12h`, `90s` (`none`: no age limit)
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    max_age: Option<Duration>,
    /// Keep (at least) this many newest events (`none`: no count limit)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    max_events: Option<u64>,
    /// Keep (at least) this many bytes of newest events, e.g. `500MiB`,
    /// `10GiB` (`none`: no size limit; at least 1MiB)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_bytes: Option<u64>,
}

impl RetentionArgs {
    fn is_empty(&self) -> bool {
        self.max_age.is_none() && self.max_events.is_none() && self.max_bytes.is_none()
    }

    /// The policy `current` becomes with the limits given here.
    fn apply(&self, current: Option<pb::RetentionPolicy>) -> Option<pb::RetentionPolicy> {
        let mut policy = current.unwrap_or_default();
        if let Some(age) = self.max_age {
            policy.max_age = (!age.is_zero()).then(|| age.try_into().ok()).flatten();
        }
        if let Some(n) = self.max_events {
            policy.max_events = n;
        }
        if let Some(n) = self.max_bytes {
            policy.max_bytes = n;
        }
        (policy != pb::RetentionPolicy::default()).then_some(policy)
    }
}

fn is_none(s: &str) -> bool {
    s.eq_ignore_ascii_case("none") || s == "0"
}

fn parse_age(s: &str) -> Result<Duration, String> {
    if is_none(s) {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e}: write an age such as 7d, 12h or 90s"))
}

fn parse_count(s: &str) -> Result<u64, String> {
    if is_none(s) {
        return Ok(0);
    }
    s.replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?} is not a count: write a whole number such as 1000000"))
}

/// A size in bytes: a whole number with an optional binary suffix
/// (`KiB`, `MiB`, `GiB`, `TiB`; `K`, `M`, `G`, `T` mean the same).
fn parse_size(s: &str) -> Result<u64, String> {
    if is_none(s) {
        return Ok(0);
    }
    let bad = || format!("{s:?} is not a size: write e.g. 1048576, 500MiB or 10GiB");
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let shift = match unit.to_ascii_lowercase().trim_end_matches('b') {
        "" => 0,
        "k" | "ki" => 10,
        "m" | "mi" => 20,
        "g" | "gi" => 30,
        "t" | "ti" => 40,
        _ => return Err(bad()),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

fn print_info(output: OutputArgs, info: Option<pb::StreamInfo>) {
    output.object(&json::stream_info(&info.unwrap_or_default()));
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
        let created = match (&created, s.retention.as_ref()) {
            (_, Some(r)) => format!(
                "{}  (retention: {})",
                created.as_str().unwrap_or("-"),
                json::retention_text(r)
            ),
            _ => created.as_str().unwrap_or("-").to_string(),
        };
        println!(
            "{:<width$}  {:>12}  {:>12}  {:>12}  {:>12}  {}",
            s.name, s.first_offset, s.next_offset, s.event_count, s.approximate_bytes, created
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_ages_and_counts_parse() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert_eq!(parse_size("none"), Ok(0));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_age("none"), Ok(Duration::ZERO));
        assert!(parse_age("soon").is_err());
        assert_eq!(parse_count("1_000_000"), Ok(1_000_000));
        assert!(parse_count("-1").is_err());
    }

    #[test]
    fn update_changes_only_the_limits_given() {
        let args = RetentionArgs {
            max_age: None,
            max_events: Some(5),
            max_bytes: Some(0),
        };
        let current = pb::RetentionPolicy {
            max_age: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            max_events: 1,
            max_bytes: 1 << 30,
        };
        let updated = args.apply(Some(current)).unwrap();
        assert_eq!(updated.max_age, current.max_age);
        assert_eq!(updated.max_events, 5);
        assert_eq!(updated.max_bytes, 0);
        let clear = RetentionArgs {
            max_age: Some(Duration::ZERO),
            max_events: Some(0),
            max_bytes: None,
        };
        assert_eq!(clear.apply(Some(updated)), None);
    }
}
