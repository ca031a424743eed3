//! `append`: producers appending batches back to back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::*;
use crate::bench::{histogram, latency, BenchContext, Goal, Outcome, Progress};
use crate::client::AppendPipeline;
use crate::proto::{self as pb};

/// How long an append run lasts: a time, or a number of events in all
/// (`--events`), claimed a batch at a time by the producers.
#[derive(Clone)]
pub(crate) enum Until {
    Deadline(Instant),
    Events {
        claimed: std::sync::Arc<std::sync::atomic::AtomicU64>,
        total: u64,
    },
}

impl Until {
    /// For `duration`, or for `events` in all when given.
    pub(crate) fn new(duration: Duration, events: Option<u64>) -> Until {
        match events {
            Some(total) => Until::Events {
                claimed: Default::default(),
                total,
            },
            None => Until::Deadline(Instant::now() + duration),
        }
    }

    /// Whether a producer may send another batch of `n` events.
    fn claim(&self, n: usize) -> bool {
        match self {
            Until::Deadline(deadline) => Instant::now() < *deadline,
            Until::Events { claimed, total } => {
                claimed.fetch_add(n as u64, Ordering::Relaxed) < *total
            }
        }
    }
}

/// `append`: producers append batches back to back for `duration`, each
/// waiting for its acknowledgement before sending the next; or, with
/// `in_flight`, each through one append pipeline keeping that many
/// batches in flight (ack latency is then send to acknowledgement).
pub(crate) async fn append(
    ctx: &BenchContext,
    batch: usize,
    producers: usize,
    in_flight: Option<u32>,
    until: Until,
) -> anyhow::Result<Outcome> {
    let name = match in_flight {
        None => format!("append batch={batch} producers={producers}"),
        Some(n) => format!("append batch={batch} producers={producers} pipeline in-flight={n}"),
    };
    let stream = fresh_stream("append");
    let mut clients = Vec::with_capacity(producers);
    for _ in 0..producers {
        clients.push(ctx.client().await?);
    }
    let goal = match &until {
        Until::Events { total, .. } => Goal::Count(*total, "events"),
        Until::Deadline(deadline) => Goal::Time(deadline.saturating_duration_since(Instant::now())),
    };
    let progress = Progress::start(name.clone(), goal);
    let started = Instant::now();
    // A deadline counts from here, after the clients connected.
    let until = match until {
        Until::Deadline(deadline) => Until::Deadline(deadline.max(started)),
        events => events,
    };
    let mut tasks = Vec::new();
    for (p, mut client) in clients.into_iter().enumerate() {
        let counter = progress.counter();
        let stream = stream.clone();
        let until = until.clone();
        let events: Vec<_> = (0..batch)
            .map(|i| event(ctx.event_bytes, (p * batch + i) as u64, 0))
            .collect();
        if let Some(in_flight) = in_flight {
            tasks.push(tokio::spawn(async move {
                pipelined(client, stream, events, in_flight, until, counter).await
            }));
            continue;
        }
        tasks.push(tokio::spawn(async move {
            let mut acks = histogram();
            let mut acked = 0u64;
            while until.claim(batch) {
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
            "pipeline_in_flight": in_flight,
            "events": total, "seconds": seconds, "events_per_sec": rate, "mb_per_sec": mb,
            "ack_latency": ack_json,
        }),
        name,
        failures,
    })
}

/// One producer through an append pipeline: sends while the pipeline has
/// room, reads acknowledgements otherwise, `until` it is done; then drains.
async fn pipelined(
    mut client: crate::client::Client,
    stream: String,
    events: Vec<pb::NewEvent>,
    in_flight: u32,
    until: Until,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, u64)> {
    let mut pipeline = AppendPipeline::open(
        &mut client,
        pb::PipelineOpen {
            stream,
            max_in_flight_batches: in_flight,
            ..Default::default()
        },
    )
    .await
    .context("opening an append pipeline")?;
    let mut acks = histogram();
    let mut acked = 0u64;
    let mut sent_at = std::collections::VecDeque::new();
    let mut sequence = 0;
    let mut finished = false;
    loop {
        if !finished && pipeline.has_room() {
            if !until.claim(events.len()) {
                pipeline.finish();
                finished = true;
                continue;
            }
            sequence += 1;
            sent_at.push_back(Instant::now());
            let sent = pipeline
                .send(pb::PipelineBatch {
                    sequence,
                    events: events.clone(),
                    ..Default::default()
                })
                .await;
            if sent.is_err() {
                // The server ended the call: its status comes with the acks.
                sent_at.pop_back();
                finished = true;
            }
            continue;
        }
        match pipeline.ack().await.context("pipelined append failed")? {
            None => return Ok((acks, acked)),
            Some(ack) => {
                let sent: Instant = sent_at.pop_front().context("an ack for no batch")?;
                acks.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                acked += u64::from(ack.count);
                counter.fetch_add(u64::from(ack.count), Ordering::Relaxed);
            }
        }
    }
}
