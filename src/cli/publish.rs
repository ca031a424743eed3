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
    or \"data_base64\" with \"content_type\", \"metadata\" (string to string), and \"versions\":\n\
    extra renderings of the payload by version label, each {\"data\": ...} or\n\
    {\"data_base64\": ..., \"content_type\": ...}, e.g.\n\
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
    /// Events per batch when reading stdin
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
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
    data_base64: Option<String>,
    content_type: Option<String>,
}

/// The payload bytes and their default content type.
fn payload(
    data: Option<serde_json::Value>,
    data_base64: Option<String>,
) -> anyhow::Result<(Vec<u8>, &'static str)> {
    Ok(match (data, data_base64) {
        (Some(_), Some(_)) => bail!("give \"data\" or \"data_base64\", not both"),
        (Some(value), None) => (serde_json::to_vec(&value)?, "application/json"),
        (None, Some(b64)) => (
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .context("\"data_base64\" is not valid base64")?,
            "",
        ),
        (None, None) => (Vec::new(), ""),
    })
}

impl InputEvent {
    fn into_proto(self) -> anyhow::Result<pb::NewEvent> {
        let mut versions = HashMap::new();
        for (label, rendering) in self.versions {
            let (data, default_type) = payload(rendering.data, rendering.data_base64)
                .with_context(|| format!("version {label:?}"))?;
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
        let (data, default_type) = payload(self.data, self.data_base64)?;
        Ok(pb::NewEvent {
            r#type: self.event_type,
            key: self.key,
            data: data.into(),
            content_type: self
                .content_type
                .unwrap_or_else(|| default_type.to_string()),
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
        r#type: event_type,
        key: args.key.clone().unwrap_or_default(),
        data: data.into(),
        content_type: args.content_type.clone(),
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

async fn publish_stdin(client: &mut super::Client, args: &PublishArgs) -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        eprintln!("reading NDJSON events from stdin (one per line; Ctrl-D to finish; --help for the format)");
    }
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
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::new();
    let mut line_number = 0;
    let mut sequence = 0;
    let mut input_done = false;
    // With --expected-next-offset, each batch expects the end of the one
    // before it: nobody else may append in between.
    let mut expected = args.expected_next_offset;
    loop {
        if input_done && batch.is_empty() {
            if line_number == 0 {
                bail!("no events on stdin: pass --type (and --data), or pipe NDJSON events in");
            }
            pipeline.finish();
            while print_ack(&mut pipeline, &args.stream).await? {}
            return Ok(());
        }
        let full = batch.len() >= args.batch as usize || (input_done && !batch.is_empty());
        if full && pipeline.has_room() {
            sequence += 1;
            let events = std::mem::take(&mut batch);
            let count = events.len() as u64;
            let sent = pipeline
                .send(pb::PipelineBatch {
                    sequence,
                    events,
                    expected_next_offset: expected,
                    idempotency_key: String::new(),
                })
                .await;
            if sent.is_err() {
                // The server ended the call: print what it acknowledged,
                // then fail with its status.
                while print_ack(&mut pipeline, &args.stream).await? {}
                bail!("the server ended the append pipeline without a status");
            }
            expected = expected.map(|e| e + count);
            continue;
        }
        // Acknowledgements are printed as they come, while reading on.
        let turn = tokio::select! {
            biased;
            acked = print_ack(&mut pipeline, &args.stream), if pipeline.in_flight() > 0 => {
                if !acked? {
                    bail!("the server ended the append pipeline with batches unacknowledged: they may or may not be written");
                }
                continue;
            }
            line = lines.next_line(), if !input_done && !full => line.context("reading stdin")?,
        };
        match turn {
            None => input_done = true,
            Some(line) => {
                line_number += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let event = serde_json::from_str::<InputEvent>(&line)
                    .map_err(anyhow::Error::from)
                    .and_then(InputEvent::into_proto)
                    .with_context(|| format!("stdin line {line_number}"))?;
                batch.push(event);
            }
        }
    }
}

/// Prints the pipeline's next acknowledgement as a JSON line (as a unary
/// Append's); false once the pipeline has ended.
async fn print_ack(pipeline: &mut AppendPipeline, stream: &str) -> anyhow::Result<bool> {
    match pipeline.ack().await.map_err(pipeline_error)? {
        None => Ok(false),
        Some(ack) => {
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
