//! `append`: producers appending batches back to back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::*;
use crate::bench::{histogram, latency, BenchContext, Outcome, Progress};
use crate::proto::{self as pb};

/// `append`: producers append batches back to back for `duration`, each
/// waiting for its acknowledgement before sending the next.
pub(crate) async fn append(
    ctx: &BenchContext,
    batch: usize,
    producers: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let name = format!("append batch={batch} producers={producers}");
    let stream = fresh_stream("append");
    let mut clients = Vec::with_capacity(producers);
    for _ in 0..producers {
        clients.push(ctx.client().await?);
    }
    let progress = Progress::start(name.clone());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (p, mut client) in clients.into_iter().enumerate() {
        let counter = progress.counter();
        let stream = stream.clone();
        let events: Vec<_> = (0..batch)
            .map(|i| event(ctx.event_bytes, (p * batch + i) as u64, 0))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut acks = histogram();
            let mut acked = 0u64;
            while Instant::now() < deadline {
                let request = pb::AppendRequest {
                    stream: stream.clone(),
                    events: events.clone(),
                    ..Default::default()
                };
                let sent = Instant::now();
                client.append(request).await.context("append failed")?;
                acks.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                acked += batch as u64;
                counter.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>((acks, acked))
        }));
    }
    let mut acks = histogram();
    let mut total = 0;
    for task in tasks {
        let (h, n) = task.await??;
        acks.add(h).context("merging histograms")?;
        total += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish().await;

    let mut failures = Vec::new();
    let head = head_of(ctx, &stream).await?;
    if head != total {
        failures.push(format!(
            "{total} events acknowledged but the stream holds {head}"
        ));
    }
    let rate = total as f64 / seconds;
    let mb = rate * ctx.event_bytes as f64 / 1e6;
    let (ack_json, ack_text) = latency(&acks);
    Ok(Outcome {
        summary: format!("{rate:>10.0} events/s {mb:>7.1} MB/s  ack {ack_text}"),
        figures: json!({
            "workload": "append", "batch": batch, "producers": producers,
            "events": total, "seconds": seconds, "events_per_sec": rate, "mb_per_sec": mb,
            "ack_latency": ack_json,
        }),
        name,
        failures,
    })
}
