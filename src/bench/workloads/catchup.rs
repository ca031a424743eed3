//! The catch-up workloads: a reader from offset 0 over stored events
//! (`catchup`), with a type filter that skips most of them (`filtered`),
//! and as a durable consumer committing as it reads (`committing`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::bench::{mib, BenchContext, Goal, Outcome, Progress};
use crate::proto::{self as pb, subscribe_request::Start};

/// `catchup`: stores `events` events, then one subscriber reads them all
/// from offset 0. Also reports the data dir size against the raw bytes.
/// Stores `events` events with a few concurrent producers in batches of
/// 1,000 (not measured). With `rare_every = Some(n)`, every n-th event
/// (offsets 0, n, 2n, ...) has type `bench.rare`; `n` must divide 1,000.
pub(super) async fn store_events(
    ctx: &BenchContext,
    stream: &str,
    events: u64,
    rare_every: Option<u64>,
) -> anyhow::Result<()> {
    let load = Progress::start(
        format!("storing {events} events"),
        Goal::Count(events, "events"),
    );
    let next = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let mut client = ctx.client().await?;
        let (stream, next, counter) = (stream.to_string(), next.clone(), load.counter());
        let template: Vec<_> = (0..1000u64)
            .map(|i| {
                let mut e = event(ctx.event_bytes, i, 0);
                if rare_every.is_some_and(|n| i % n == 0) {
                    e.r#type = RARE_TYPE.into();
                }
                e
            })
            .collect();
        loaders.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(1000, Ordering::Relaxed);
                if first >= events {
                    return Ok::<_, anyhow::Error>(());
                }
                let n = (events - first).min(1000) as usize;
                client
                    .append(pb::AppendRequest {
                        stream: stream.clone(),
                        events: template[..n].to_vec(),
                        ..Default::default()
                    })
                    .await
                    .context("loading events")?;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    for loader in loaders {
        loader.await??;
    }
    load.finish().await;
    ctx.settle().await;
    Ok(())
}

/// The type of the events the filtered workload selects.
const RARE_TYPE: &str = "bench.rare";

/// Reads a stream from offset 0 to `events` with one subscription;
/// returns the seconds taken, the offsets delivered, and the number of
/// cursor commits made (committing in the background as `consumer`,
/// latest cursor wins, when given).
async fn read_through(
    ctx: &BenchContext,
    stream: &str,
    events: u64,
    filter: Option<pb::EventFilter>,
    consumer: Option<&str>,
    label: String,
) -> anyhow::Result<(f64, Vec<u64>, u64)> {
    let mut client = ctx.reader().await?;
    let progress = Progress::start(label, Goal::Count(events, "events"));
    let counter = progress.counter();
    let (cursor_tx, mut cursor_rx) = watch::channel(0u64);
    let committer = consumer.map(|name| {
        let (mut client, stream, name) = (client.clone(), stream.to_string(), name.to_string());
        tokio::spawn(async move {
            let mut commits = 0u64;
            while cursor_rx.changed().await.is_ok() {
                let next_offset = *cursor_rx.borrow_and_update();
                client
                    .commit_cursor(pb::CommitCursorRequest {
                        stream: stream.clone(),
                        consumer: name.clone(),
                        next_offset,
                        ..Default::default()
                    })
                    .await
                    .context("committing the cursor")?;
                commits += 1;
                if next_offset >= events {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(commits)
        })
    });
    let started = Instant::now();
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            stream: stream.to_string(),
            start: Some(Start::Offset(0)),
            max_batch_events: 1000,
            consumer: consumer.unwrap_or_default().to_string(),
            filter,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut offsets = Vec::new();
    let mut cursor = 0;
    while cursor < events {
        let response = subscription
            .message()
            .await?
            .context("subscription ended early")?;
        offsets.extend(response.events.iter().map(|e| e.offset));
        cursor = response.next_offset;
        counter.store(cursor, Ordering::Relaxed);
        if !response.events.is_empty() {
            let _ = cursor_tx.send(cursor);
        }
    }
    let commits = match committer {
        Some(task) => {
            let _ = cursor_tx.send(cursor);
            task.await??
        }
        None => 0,
    };
    let seconds = started.elapsed().as_secs_f64();
    progress.finish().await;
    Ok((seconds, offsets, commits))
}

/// `filtered`: a subscriber whose filter selects 1% of `events` stored
/// events reads them all from offset 0. Reports the events examined per
/// second (the server's scan rate) and checks exactly the selected
/// offsets arrive.
pub(crate) async fn filtered_catchup(ctx: &BenchContext, events: u64) -> anyhow::Result<Outcome> {
    let name = format!("filtered catchup events={events} match=1%");
    let stream = fresh_stream("filtered");
    store_events(ctx, &stream, events, Some(100)).await?;
    let filter = pb::EventFilter {
        types: vec![RARE_TYPE.into()],
        keys: Vec::new(),
    };
    let (seconds, offsets, _) =
        read_through(ctx, &stream, events, Some(filter), None, name.clone()).await?;
    let mut failures = Vec::new();
    let expected: Vec<u64> = (0..events).step_by(100).collect();
    if offsets != expected {
        failures.push(format!(
            "expected the {} offsets 0, 100, 200, ...; got {} (first wrong: {:?})",
            expected.len(),
            offsets.len(),
            offsets.iter().zip(&expected).find(|(a, b)| a != b)
        ));
    }
    let rate = events as f64 / seconds;
    Ok(Outcome {
        summary: format!(
            "{rate:>10.0} events examined/s, {} delivered",
            offsets.len()
        ),
        figures: json!({
            "workload": "filtered", "events": events, "seconds": seconds,
            "examined_per_sec": rate, "delivered": offsets.len(),
        }),
        name,
        failures,
    })
}

/// `committing`: the same catch-up read twice on one stream, first plain,
/// then as a durable consumer committing its cursor after every batch (in
/// the background, latest cursor wins, as a worker would). Reports both
/// rates and their ratio, and checks the final committed cursor.
pub(crate) async fn committing_catchup(ctx: &BenchContext, events: u64) -> anyhow::Result<Outcome> {
    let name = format!("committing catchup events={events}");
    let stream = fresh_stream("committing");
    store_events(ctx, &stream, events, None).await?;
    let (plain, offsets, _) =
        read_through(ctx, &stream, events, None, None, "plain catch-up".into()).await?;
    let mut failures = Vec::new();
    if offsets.len() as u64 != events {
        failures.push(format!(
            "plain read got {} of {events} events",
            offsets.len()
        ));
    }
    let (committing, offsets, commits) = read_through(
        ctx,
        &stream,
        events,
        None,
        Some("bench"),
        "catch-up committing after every batch".into(),
    )
    .await?;
    if offsets.len() as u64 != events || offsets.windows(2).any(|w| w[1] != w[0] + 1) {
        failures.push(format!(
            "committing read got {} of {events} events, or out of order",
            offsets.len()
        ));
    }
    let committed = ctx
        .client()
        .await?
        .get_consumer(pb::GetConsumerRequest {
            stream: stream.clone(),
            consumer: "bench".into(),
        })
        .await?
        .into_inner()
        .consumer
        .map_or(0, |c| c.next_offset);
    if committed != events {
        failures.push(format!(
            "the committed cursor is {committed}, expected {events}"
        ));
    }
    let (plain_rate, committing_rate) = (events as f64 / plain, events as f64 / committing);
    Ok(Outcome {
        summary: format!(
            "{committing_rate:>10.0} events/s committing ({commits} commits) vs {plain_rate:.0} plain = {:.0}%",
            100.0 * committing_rate / plain_rate
        ),
        figures: json!({
            "workload": "committing", "events": events,
            "plain_events_per_sec": plain_rate, "committing_events_per_sec": committing_rate,
            "commits": commits, "ratio": committing_rate / plain_rate,
        }),
        name,
        failures,
    })
}

pub(crate) async fn catchup(ctx: &BenchContext, events: u64) -> anyhow::Result<Outcome> {
    let name = format!("catchup events={events}");
    let stream = fresh_stream("catchup");
    store_events(ctx, &stream, events, None).await?;
    let rss_written = ctx.server_rss();

    let mut client = ctx.client().await?;
    let progress = Progress::start(name.clone(), Goal::Count(events, "events"));
    let counter = progress.counter();
    let started = Instant::now();
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            stream: stream.clone(),
            start: Some(Start::Offset(0)),
            max_batch_events: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut expected = 0u64;
    let mut failures = Vec::new();
    while expected < events {
        let response = subscription
            .message()
            .await?
            .context("subscription ended early")?;
        for e in &response.events {
            if e.offset != expected && failures.len() < 10 {
                failures.push(format!("expected offset {expected}, got {}", e.offset));
            }
            expected = e.offset + 1;
        }
        counter.store(expected, Ordering::Relaxed);
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish().await;
    let rate = events as f64 / seconds;
    let raw = events * ctx.event_bytes as u64;
    let disk = ctx.data_dir_bytes();
    let rss = ctx.server_rss();
    let mut summary = format!(
        "{rate:>10.0} events/s {:>7.1} MB/s",
        rate * ctx.event_bytes as f64 / 1e6
    );
    if let Some(disk) = disk {
        summary += &format!(
            "  data dir {} = {:.2}x raw",
            mib(disk),
            disk as f64 / raw as f64
        );
    }
    if let (Some(written), Some(read)) = (rss_written, rss) {
        summary += &format!(
            "  server RSS {} after writing, {} after reading",
            mib(written),
            mib(read)
        );
    }
    Ok(Outcome {
        summary,
        figures: json!({
            "workload": "catchup", "events": events, "seconds": seconds, "events_per_sec": rate,
            "raw_event_bytes": raw, "data_dir_bytes": disk,
            "server_rss_after_writing_bytes": rss_written, "server_rss_bytes": rss,
        }),
        name,
        failures,
    })
}
