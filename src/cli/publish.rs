//! `pullstream publish`: append one event given by flags, or NDJSON events
//! read from stdin (one object per line, sent in batches through one append
//! pipeline, several in flight), and print each acknowledgement as a JSON
//! line.

use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::{bail, Context};
use base64::Engine;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{connect, json, status_error, ClientArgs};
use crate::client::AppendPipeline;
use crate::proto as pb;

/// Arguments of `pullstream publish`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream publish orders --type order.created --key ord_1 --data '{\"total\":42}'\n  \
    printf '%s\\n' '{\"type\":\"order.paid\",\"key\":\"ord_1\",\"data\":{\"total\":42}}' | pullstream publish orders\n\n\
    Each stdin line is an object with \"type\" (required), \"key\", \"data\" (any JSON value),\n\
    \"data_text\" (a string, stored as text/plain) or \"data_base64\" (bytes) with \"content_type\",\n\
    \"metadata\" (string to string), and \"versions\": extra renderings of the payload by\n\
    version label, each {\"data\": ...}, {\"data_text\": ...} or {\"data_base64\": ..., \"content_type\": ...}, e.g.\n\
    {\"type\":\"order.paid\",\"data\":{\"total\":42},\"versions\":{\"2024-06-01\":{\"data\":{\"amount\":{\"value\":42}}}}}")]
pub struct PublishArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The stream to append to
    stream: String,
    /// The event type (e.g. invoice.paid); without it, events are read from stdin as NDJSON
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// The entity the event is about (e.g. in_123)
    #[arg(long, requires = "event_type")]
    key: Option<String>,
    /// The payload; `@FILE` reads it from a file and `-` from stdin; checked to be JSON when the content type is JSON
    #[arg(long, requires = "event_type", default_value = "{}")]
    data: String,
    /// The payload's media type
    #[arg(long, requires = "event_type", default_value = "application/json")]
    content_type: String,
    /// Metadata as KEY=VALUE (repeatable)
    #[arg(long = "meta", value_name = "KEY=VALUE", requires = "event_type")]
    metadata: Vec<String>,
    /// An extra rendering of the payload for consumers pinned to a version,
    /// as LABEL=DATA (repeatable; same content type as --data)
    #[arg(
        long = "version-data",
        value_name = "LABEL=DATA",
        requires = "event_type"
    )]
    versions: Vec<String>,
    /// Append only if the stream's next offset is this (optimistic concurrency)
    #[arg(long)]
    expected_next_offset: Option<u64>,
    /// Makes a retry of this command safe: the server appends the batch once
    #[arg(long, requires = "event_type")]
    idempotency_key: Option<String>,
    /// Write only while this is the stream's fencing token (see `pullstream streams fence`)
    #[arg(long)]
    fencing_token: Option<String>,
    /// Events per batch when reading stdin [default: 100, lowered to the
    /// server's limits; batches are also cut to stay under its byte limit]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: Option<u32>,
    /// Accepted like every command's --json: acknowledgements are JSON Lines either way
    #[arg(long = "json")]
    _json: bool,
    /// Batches sent ahead of their acknowledgements when reading stdin (one
    /// append pipeline; the server may lower it)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    in_flight: u32,
}

/// One NDJSON input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    key: String,
    data: Option<serde_json::Value>,
    data_text: Option<String>,
    data_base64: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default)]
    versions: HashMap<String, InputPayload>,
}

/// One rendering of a payload in an NDJSON input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputPayload {
    data: Option<serde_json::Value>,
    data_text: Option<String>,
    data_base64: Option<String>,
    content_type: Option<String>,
}

/// The payload bytes and their default content type, from at most one of
/// `data`, `data_text` and `data_base64`; `field` names where they are
/// (`versions."v2".`) for the error.
fn payload(
    data: Option<serde_json::Value>,
    data_text: Option<String>,
    data_base64: Option<String>,
    field: &str,
) -> anyhow::Result<(Vec<u8>, &'static str)> {
    Ok(match (data, data_text, data_base64) {
        (Some(value), None, None) => (serde_json::to_vec(&value)?, "application/json"),
        (None, Some(text), None) => (text.into_bytes(), "text/plain; charset=utf-8"),
        (None, None, Some(b64)) => (
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .with_context(|| format!("field \"{field}data_base64\" is not valid base64"))?,
            "",
        ),
        (None, None, None) => (Vec::new(), ""),
        _ => bail!(
            "give one of \"{field}data\", \"{field}data_text\" and \"{field}data_base64\", not several"
        ),
    })
}

impl InputEvent {
    fn into_proto(self) -> anyhow::Result<pb::NewEvent> {
        let mut versions = HashMap::new();
        for (label, rendering) in self.versions {
            let (data, default_type) = payload(
                rendering.data,
                rendering.data_text,
                rendering.data_base64,
                &format!("versions.{label}."),
            )?;
            let content_type = rendering
                .content_type
                .unwrap_or_else(|| default_type.to_string());
            versions.insert(
                label,
                pb::PayloadVersion {
                    data: data.into(),
                    content_type,
                },
            );
        }
        let (data, default_type) = payload(self.data, self.data_text, self.data_base64, "")?;
        Ok(pb::NewEvent {
            r#type: self.event_type.into(),
            key: self.key.into(),
            data: data.into(),
            content_type: self
                .content_type
                .unwrap_or_else(|| default_type.to_string())
                .into(),
            metadata: self.metadata,
            versions,
        })
    }
}

/// The payload `--data` stands for: the text itself, a file's bytes
/// (`@FILE`), or stdin's (`-`).
fn data_arg(data: &str) -> anyhow::Result<Vec<u8>> {
    if data == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .context("--data -: reading the payload from stdin")?;
        return Ok(bytes);
    }
    match data.strip_prefix('@') {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("--data @{path}: cannot read the file"))
        }
        None => Ok(data.as_bytes().to_vec()),
    }
}

/// Runs `pullstream publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let Some(event_type) = args.event_type.clone() else {
        return publish_stdin(&mut client, &args).await;
    };
    let data = data_arg(&args.data)?;
    if json::is_json(&args.content_type) {
        serde_json::from_slice::<serde_json::Value>(&data).with_context(|| {
            format!(
                "--data is not valid JSON ({}); pass --content-type for other payloads",
                args.content_type
            )
        })?;
    }
    let metadata = args
        .metadata
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--meta {pair:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let versions = args
        .versions
        .iter()
        .map(|pair| {
            let (label, data) = pair
                .split_once('=')
                .with_context(|| format!("--version-data {pair:?} is not LABEL=DATA"))?;
            if json::is_json(&args.content_type) {
                serde_json::from_str::<serde_json::Value>(data).with_context(|| {
                    format!("--version-data {label}: the payload is not valid JSON")
                })?;
            }
            Ok((
                label.to_string(),
                pb::PayloadVersion {
                    data: data.as_bytes().to_vec().into(),
                    content_type: String::new(),
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let event = pb::NewEvent {
        r#type: event_type.into(),
        key: args.key.clone().unwrap_or_default().into(),
        data: data.into(),
        content_type: args.content_type.clone().into(),
        metadata,
        versions,
    };
    let request = pb::AppendRequest {
        stream: args.stream.clone(),
        events: vec![event],
        expected_next_offset: args.expected_next_offset,
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        fencing_token: args.fencing_token.clone().unwrap_or_default(),
    };
    let response = client.append(request).await.map_err(status_error)?;
    println!("{}", json::ack(response.get_ref()));
    Ok(())
}

/// The most bytes a batch may take on the server, as it counts them.
///
/// The server checks the batch's stored size: 24 bytes per event plus
/// its strings, 8 per metadata pair, 12 per extra rendering. The protobuf
/// size already counts every string once, so this is an upper bound.
fn stored_size(event: &pb::NewEvent) -> u64 {
    (prost::Message::encoded_len(event) + 24 + 8 * event.metadata.len() + 12 * event.versions.len())
        as u64
}

/// How stdin's events are cut into batches: at most `events` each, and at
/// most `bytes` (the server's limits, learned from `GetServerStatus`).
struct BatchLimits {
    events: usize,
    bytes: u64,
}

impl BatchLimits {
    /// `--batch` (default 100), lowered to the server's limits (with a
    /// note when the lowered value was given).
    async fn for_server(client: &mut super::Client, given: Option<u32>) -> BatchLimits {
        let requested = given.unwrap_or(DEFAULT_BATCH);
        let limits = client
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .ok()
            .and_then(|status| status.into_inner().limits);
        let Some(limits) = limits else {
            // An older server: it refuses a batch past its limits itself.
            return BatchLimits {
                events: requested as usize,
                bytes: u64::MAX,
            };
        };
        let mut events = requested as usize;
        if limits.max_batch_events > 0 && requested > limits.max_batch_events {
            if given.is_some() {
                eprintln!(
                "note: --batch {requested} is more than the server takes in one batch; sending batches of {}",
                limits.max_batch_events
            );
            }
            events = limits.max_batch_events as usize;
        }
        BatchLimits {
            events,
            bytes: if limits.max_batch_bytes > 0 {
                limits.max_batch_bytes
            } else {
                u64::MAX
            },
        }
    }
}

/// Events per batch unless `--batch` says otherwise.
const DEFAULT_BATCH: u32 = 100;

/// A batch being filled from stdin, with the line each event came from.
#[derive(Default)]
struct Batch {
    events: Vec<pb::NewEvent>,
    lines: Vec<u64>,
    bytes: u64,
}

async fn publish_stdin(client: &mut super::Client, args: &PublishArgs) -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        eprintln!("reading NDJSON events from stdin (one per line; Ctrl-D to finish; --help for the format)");
    }
    let mut limits = BatchLimits::for_server(client, args.batch).await;
    // One pipeline for the whole input: batches go out back to back and
    // their acknowledgements come back in order.
    let mut pipeline = AppendPipeline::open(
        client,
        pb::PipelineOpen {
            stream: args.stream.clone(),
            max_in_flight_batches: args.in_flight,
            max_in_flight_bytes: 0,
            fencing_token: args.fencing_token.clone().unwrap_or_default(),
        },
    )
    .await
    .map_err(pipeline_error)?;
    // A batch must also fit the pipeline's window on its own.
    if pipeline.opened.max_in_flight_bytes > 0 {
        limits.bytes = limits.bytes.min(pipeline.opened.max_in_flight_bytes);
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Batch::default();
    // Batches cut and not yet sent, oldest first (at most two: reading
    // pauses while the pipeline has no room).
    let mut ready: std::collections::VecDeque<Batch> = Default::default();
    // The stdin lines of each batch in flight, by sequence, oldest first.
    let mut sent = InFlightLines::default();
    let mut line_number = 0;
    let mut events_read = 0u64;
    let mut sequence = 0;
    let mut input_done = false;
    // With --expected-next-offset, each batch expects the end of the one
    // before it: nobody else may append in between.
    let mut expected = args.expected_next_offset;
    loop {
        if input_done && !batch.events.is_empty() {
            ready.push_back(std::mem::take(&mut batch));
        }
        if input_done && ready.is_empty() {
            if events_read == 0 {
                bail!("no events on stdin: pass --type (and --data), or pipe NDJSON events in");
            }
            pipeline.finish();
            while print_ack(&mut pipeline, &args.stream, &mut sent).await? {}
            return Ok(());
        }
        if !ready.is_empty() && pipeline.has_room() {
            let next = ready.pop_front().expect("not empty");
            sequence += 1;
            let count = next.events.len() as u64;
            sent.push(sequence, next.lines);
            let result = pipeline
                .send(pb::PipelineBatch {
                    sequence,
                    events: next.events,
                    expected_next_offset: expected,
                    idempotency_key: String::new(),
                })
                .await;
            if result.is_err() {
                // The server ended the call: print what it acknowledged,
                // then fail with its status.
                while print_ack(&mut pipeline, &args.stream, &mut sent).await? {}
                bail!("the server ended the append pipeline without a status");
            }
            expected = expected.map(|e| e + count);
            continue;
        }
        let reading = !input_done && ready.len() < 2;
        // Acknowledgements are printed as they come, while reading on.
        let turn = tokio::select! {
            biased;
            acked = print_ack(&mut pipeline, &args.stream, &mut sent), if pipeline.in_flight() > 0 => {
                if !acked? {
                    bail!("the server ended the append pipeline with batches unacknowledged: they may or may not be written");
                }
                continue;
            }
            line = lines.next_line(), if reading => line.context("reading stdin")?,
        };
        let Some(line) = turn else {
            input_done = true;
            continue;
        };
        line_number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let event = parse_line(&line).with_context(|| format!("stdin line {line_number}"))?;
        events_read += 1;
        let size = stored_size(&event);
        if !batch.events.is_empty() && batch.bytes + size > limits.bytes {
            ready.push_back(std::mem::take(&mut batch));
        }
        batch.events.push(event);
        batch.lines.push(line_number);
        batch.bytes += size;
        if batch.events.len() >= limits.events {
            ready.push_back(std::mem::take(&mut batch));
        }
    }
}

/// One NDJSON line as an event; an error names the field at fault and
/// the column (`field "key": invalid type: integer `5`, expected a string
/// (column 16)`).
fn parse_line(line: &str) -> anyhow::Result<pb::NewEvent> {
    let mut reader = serde_json::Deserializer::from_str(line);
    let input: InputEvent = match serde_path_to_error::deserialize(&mut reader) {
        Ok(input) => input,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // serde_json ends its message with the position; say it once.
            let message = inner.to_string();
            let message = message
                .strip_suffix(&format!(
                    " at line {} column {}",
                    inner.line(),
                    inner.column()
                ))
                .unwrap_or(&message)
                .to_string();
            let column = inner.column();
            if path == "." || path.is_empty() || inner.is_syntax() || inner.is_eof() {
                bail!("not a JSON event object: {message} (column {column})");
            }
            bail!("field \"{path}\": {message} (column {column})");
        }
    };
    input.into_proto()
}

/// The stdin lines of the batches in flight, to name the line of an event
/// the server refused.
#[derive(Default)]
struct InFlightLines(std::collections::VecDeque<(u64, Vec<u64>)>);

impl InFlightLines {
    fn push(&mut self, sequence: u64, lines: Vec<u64>) {
        self.0.push_back((sequence, lines));
    }

    /// The batch `sequence` was acknowledged: forget its lines.
    fn acked(&mut self, sequence: u64) {
        while self.0.front().is_some_and(|(s, _)| *s <= sequence) {
            self.0.pop_front();
        }
    }

    /// The stdin line of event `index` of batch `sequence`.
    fn line(&self, sequence: u64, index: usize) -> Option<u64> {
        let (_, lines) = self.0.iter().find(|(s, _)| *s == sequence)?;
        lines.get(index).copied()
    }

    /// The stdin lines a refused batch's status points at, from its
    /// message (`batch 3: event 5 is …`).
    fn describe(&self, status: &tonic::Status) -> Option<String> {
        let rest = status.message().strip_prefix("batch ")?;
        let (sequence, rest) = rest.split_once(": ")?;
        let sequence: u64 = sequence.parse().ok()?;
        let lines = &self.0.iter().find(|(s, _)| *s == sequence)?.1;
        let index = rest
            .strip_prefix("event ")
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|i| i.parse::<usize>().ok());
        Some(match index.and_then(|i| self.line(sequence, i)) {
            Some(line) => format!("stdin line {line}"),
            None => match (lines.first(), lines.last()) {
                (Some(first), Some(last)) => format!("stdin lines {first}-{last}"),
                _ => return None,
            },
        })
    }
}

/// Prints the pipeline's next acknowledgement as a JSON line (as a unary
/// Append's); false once the pipeline has ended. A refused batch's error
/// names the stdin line of the event at fault.
async fn print_ack(
    pipeline: &mut AppendPipeline,
    stream: &str,
    sent: &mut InFlightLines,
) -> anyhow::Result<bool> {
    let ack = match pipeline.ack().await {
        Ok(ack) => ack,
        Err(error) => {
            return Err(match error.downcast::<tonic::Status>() {
                Ok(status) => match sent.describe(&status) {
                    Some(lines) => status_error(status).context(lines),
                    None => status_error(status),
                },
                Err(other) => other,
            })
        }
    };
    match ack {
        None => Ok(false),
        Some(ack) => {
            sent.acked(ack.sequence);
            println!(
                "{}",
                json::ack(&pb::AppendResponse {
                    stream: stream.to_string(),
                    first_offset: ack.first_offset,
                    count: ack.count,
                    time: ack.time,
                    duplicate: ack.duplicate,
                })
            );
            Ok(true)
        }
    }
}

/// A pipeline's error as the other commands show a status.
fn pipeline_error(error: anyhow::Error) -> anyhow::Error {
    match error.downcast::<tonic::Status>() {
        Ok(status) => status_error(status),
        Err(other) => other,
    }
}
