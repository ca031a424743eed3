//! `http`: the HTTP JSON API against gRPC on the same server, so its cost
//! is a measured figure: one producer appending batches of 100 and of 1
//! over `POST /v1/streams/{stream}/events` (JSON, base64 payloads, one
//! HTTP/1.1 keep-alive connection, each batch acknowledged before the
//! next), then one consumer catching up over Server-Sent Events and over
//! pages (`GET …/events?limit=1000`), every offset checked.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::*;
use crate::bench::{histogram, latency, BenchContext, Goal, Outcome, Progress};

/// `http`: `duration` of appends per batch size, then a catch-up of
/// `events` events by SSE and by pages.
pub(crate) async fn http(
    ctx: &BenchContext,
    duration: Duration,
    events: u64,
) -> anyhow::Result<Outcome> {
    let name = "http: JSON appends, SSE and page catch-up".to_string();
    let base = match ctx.url.strip_prefix("http://") {
        Some(rest) => format!("http://{rest}"),
        None => anyhow::bail!(
            "the http workload speaks plain http:// ({} is not)",
            ctx.url
        ),
    };
    let client = reqwest::Client::new();
    let authorized = |builder: reqwest::RequestBuilder| match &ctx.api_key {
        Some(key) => builder.bearer_auth(key),
        None => builder,
    };
    let progress = Progress::start(name.clone(), Goal::Open);
    let counter = progress.counter();
    let payload = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; ctx.event_bytes]);
    let mut figures = Vec::new();
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    for batch in [100usize, 1] {
        let stream = fresh_stream("http-append");
        let body = json!({ "events": (0..batch).map(|i| json!({
            "type": "bench.event", "key": format!("k{i}"), "data_base64": payload,
            "content_type": "application/octet-stream",
        })).collect::<Vec<_>>() })
        .to_string();
        let url = format!("{base}/v1/streams/{stream}/events");
        let mut acks = histogram();
        let started = Instant::now();
        let deadline = started + duration;
        let mut appended = 0u64;
        while Instant::now() < deadline {
            let sent = Instant::now();
            let response = authorized(client.post(&url))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .context("HTTP append")?;
            if !response.status().is_success() {
                anyhow::bail!(
                    "HTTP append answered {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            response.bytes().await?;
            acks.saturating_record(sent.elapsed().as_micros().max(1) as u64);
            appended += batch as u64;
            counter.fetch_add(batch as u64, Ordering::Relaxed);
        }
        let seconds = started.elapsed().as_secs_f64();
        let head = head_of(ctx, &stream).await?;
        if head != appended {
            failures.push(format!(
                "{appended} events acknowledged over HTTP but the stream holds {head}"
            ));
        }
        let (ack_json, ack_text) = latency(&acks);
        let rate = appended as f64 / seconds;
        summary.push(format!(
            "append batch={batch}: {rate:.0} ev/s, ack {ack_text}"
        ));
        figures.push(json!({
            "batch": batch, "events_per_second": rate, "ack_latency": ack_json,
        }));
    }

    let stream = fresh_stream("http-catchup");
    super::catchup::store_events(ctx, &stream, events, None).await?;
    // Server-Sent Events from offset 0 until every event has arrived.
    let started = Instant::now();
    let response = authorized(client.get(format!("{base}/v1/streams/{stream}/events?limit=1000")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("SSE")?;
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut next = 0u64;
    'sse: while next < events {
        let Some(chunk) = body.next().await else {
            failures.push(format!("the SSE response ended at offset {next}"));
            break;
        };
        buffer.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(end) = find(&buffer[start..], b"\n\n") {
            let block = &buffer[start..start + end];
            start += end + 2;
            let Some(data) = block
                .split(|&b| b == b'\n')
                .find_map(|line| line.strip_prefix(b"data: "))
            else {
                continue;
            };
            let event: Value = serde_json::from_slice(data)?;
            if event["offset"].as_u64() != Some(next) {
                failures.push(format!(
                    "SSE gave offset {} where {next} was due",
                    event["offset"]
                ));
                break 'sse;
            }
            next += 1;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        buffer.drain(..start);
    }
    let sse_rate = next as f64 / started.elapsed().as_secs_f64();
    drop(body);
    // Pages of 1,000.
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < events {
        let page: Value = authorized(client.get(format!(
            "{base}/v1/streams/{stream}/events?offset={offset}&limit=1000"
        )))
        .send()
        .await?
        .json()
        .await?;
        let got = page["events"].as_array().map_or(0, Vec::len) as u64;
        if got == 0 || page["events"][0]["offset"].as_u64() != Some(offset) {
            failures.push(format!(
                "the page at offset {offset} was {got} events from {}",
                page["events"][0]["offset"]
            ));
            break;
        }
        offset += got;
        counter.fetch_add(got, Ordering::Relaxed);
    }
    let page_rate = offset as f64 / started.elapsed().as_secs_f64();
    progress.finish().await;
    summary.push(format!(
        "catch-up of {events}: SSE {sse_rate:.0} ev/s, pages of 1000 {page_rate:.0} ev/s"
    ));
    Ok(Outcome {
        summary: summary.join("\n"),
        figures: json!({
            "workload": "http",
            "append": figures,
            "catchup_events": events,
            "sse_events_per_second": sse_rate,
            "pages_events_per_second": page_rate,
        }),
        name,
        failures,
    })
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
