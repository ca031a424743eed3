//! The benchmark workloads. Each returns an [`Outcome`] with its figures
//! and any correctness failure it detected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use super::{histogram, latency, mib, BenchContext, Outcome, Progress};
use crate::proto::{self as pb, subscribe_request::Start};

/// A stream name no earlier run used.
fn fresh_stream(workload: &str) -> String {
    format!("bench-{workload}-{}", crate::clock::system_now_unix_nanos())
}

/// An event of `bytes` payload bytes; the first 8 carry `stamp`.
fn event(bytes: usize, seq: u64, stamp: u64) -> pb::NewEvent {
    let mut data = vec![b'x'; bytes];
    data[..8].copy_from_slice(&stamp.to_le_bytes());
    pb::NewEvent {
        r#type: "bench.event".into(),
        key: format!("k{}", seq % 1024),
        data,
        content_type: "application/octet-stream".into(),
        metadata: Default::default(),
        versions: Default::default(),
    }
}

fn stamp_of(data: &[u8]) -> u64 {
    let mut stamp = [0u8; 8];
    stamp.copy_from_slice(&data[..8]);
    u64::from_le_bytes(stamp)
}

async fn create_stream(ctx: &BenchContext, stream: &str) -> anyhow::Result<()> {
    ctx.client()
        .await?
        .create_stream(pb::CreateStreamRequest {
            stream: stream.to_string(),
            retention: None,
        })
        .await?;
    Ok(())
}

async fn head_of(ctx: &BenchContext, stream: &str) -> anyhow::Result<u64> {
    Ok(stream_info(&mut ctx.client().await?, stream)
        .await?
        .next_offset)
}

/// A stream's description (GetStream).
async fn stream_info(
    client: &mut crate::client::Client,
    stream: &str,
) -> anyhow::Result<pb::StreamInfo> {
    Ok(client
        .get_stream(pb::GetStreamRequest {
            stream: stream.to_string(),
        })
        .await?
        .into_inner()
        .stream
        .unwrap_or_default())
}

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

/// `catchup`: stores `events` events, then one subscriber reads them all
/// from offset 0. Also reports the data dir size against the raw bytes.
/// Stores `events` events with a few concurrent producers in batches of
/// 1,000 (not measured). With `rare_every = Some(n)`, every n-th event
/// (offsets 0, n, 2n, ...) has type `bench.rare`; `n` must divide 1,000.
async fn store_events(
    ctx: &BenchContext,
    stream: &str,
    events: u64,
    rare_every: Option<u64>,
) -> anyhow::Result<()> {
    let load = Progress::start(format!("storing {events} events"));
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
    let mut client = ctx.client().await?;
    let progress = Progress::start(label);
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
    let progress = Progress::start(name.clone());
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

/// `tail`: `subscribers` follow a stream live while one producer appends
/// `rate` single-event Appends per second (pipelined, so acknowledgements
/// do not limit the rate). Measures append-call-to-receipt latency and
/// checks that every subscriber got every event once, in order.
pub(crate) async fn tail(
    ctx: &BenchContext,
    subscribers: usize,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let name = format!("tail subscribers={subscribers} rate={rate}/s");
    let stream = fresh_stream("tail");
    create_stream(ctx, &stream).await?;
    let base = Instant::now();
    let (target_tx, target_rx) = watch::channel(None::<u64>);
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let mut client = ctx.client().await?;
        let mut subscription = client
            .subscribe(pb::SubscribeRequest {
                stream: stream.clone(),
                start: Some(Start::Position(pb::StartPosition::Latest as i32)),
                max_batch_events: 0,
                ..Default::default()
            })
            .await?
            .into_inner();
        let hello = subscription.message().await?.context("no first response")?;
        let start = hello.next_offset;
        let target_rx = target_rx.clone();
        readers.push(tokio::spawn(async move {
            let _client = client;
            let mut latencies = histogram();
            let mut expected = start;
            let mut failures = Vec::new();
            loop {
                if let Some(target) = *target_rx.borrow() {
                    if expected >= start + target {
                        break;
                    }
                }
                let message =
                    tokio::time::timeout(Duration::from_secs(30), subscription.message()).await;
                let response = match message {
                    Ok(Ok(Some(response))) => response,
                    Ok(Ok(None)) => {
                        failures.push("subscription ended early".to_string());
                        break;
                    }
                    Ok(Err(status)) => {
                        failures.push(format!("subscription failed: {status}"));
                        break;
                    }
                    Err(_) => {
                        failures.push(format!("no message for 30 s at offset {expected}"));
                        break;
                    }
                };
                let now = base.elapsed().as_micros() as u64;
                for e in &response.events {
                    if e.offset != expected && failures.len() < 10 {
                        let kind = if e.offset < expected {
                            "duplicate"
                        } else {
                            "gap"
                        };
                        failures.push(format!(
                            "{kind}: expected offset {expected}, got {}",
                            e.offset
                        ));
                    }
                    expected = e.offset + 1;
                    latencies.saturating_record(now.saturating_sub(stamp_of(&e.data)).max(1));
                }
            }
            (latencies, expected - start, failures)
        }));
    }

    let progress = Progress::start(name.clone());
    let counter = progress.counter();
    let producer = ctx.client().await?;
    let in_flight = Arc::new(Semaphore::new(1024));
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let mut sent = 0u64;
    while started.elapsed() < duration {
        ticks.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let stamp = base.elapsed().as_micros() as u64;
        let request = pb::AppendRequest {
            stream: stream.clone(),
            events: vec![event(ctx.event_bytes, sent, stamp)],
            ..Default::default()
        };
        let (mut client, counter, errors) = (producer.clone(), counter.clone(), errors.clone());
        tokio::spawn(async move {
            match client.append(request).await {
                Ok(_) => counter.fetch_add(1, Ordering::Relaxed),
                Err(_) => errors.fetch_add(1, Ordering::Relaxed),
            };
            drop(permit);
        });
        sent += 1;
    }
    let _all = in_flight.acquire_many(1024).await?;
    let seconds = started.elapsed().as_secs_f64();
    progress.finish().await;
    let appended = counter.load(Ordering::Relaxed);
    let _ = target_tx.send(Some(appended));

    let mut latencies = histogram();
    let mut failures = Vec::new();
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        failures.push(format!("{errors} appends failed"));
    }
    for (i, reader) in readers.into_iter().enumerate() {
        let (h, received, reader_failures) = reader.await?;
        latencies.add(h).context("merging histograms")?;
        if received != appended {
            failures.push(format!(
                "subscriber {i} received {received} of {appended} events"
            ));
        }
        failures.extend(
            reader_failures
                .into_iter()
                .map(|f| format!("subscriber {i}: {f}")),
        );
    }
    let (latency_json, latency_text) = latency(&latencies);
    let achieved = appended as f64 / seconds;
    Ok(Outcome {
        summary: format!(
            "{achieved:>10.0} events/s to {subscribers} subscribers ({} deliveries), end-to-end {latency_text}",
            latencies.len()
        ),
        figures: json!({
            "workload": "tail", "subscribers": subscribers, "target_rate": rate,
            "events": appended, "seconds": seconds, "events_per_sec": achieved,
            "end_to_end_latency": latency_json,
        }),
        name,
        failures,
    })
}

/// `fanout`: opens `count` idle subscriptions (100 per connection), holds
/// them for a few heartbeats, and reports the server's memory per
/// subscription.
pub(crate) async fn fanout(ctx: &BenchContext, count: usize) -> anyhow::Result<Outcome> {
    const PER_CONNECTION: usize = 100;
    const HOLD: Duration = Duration::from_secs(3);
    let name = format!("fanout subscriptions={count}");
    let stream = fresh_stream("fanout");
    create_stream(ctx, &stream).await?;
    let rss_before = ctx.server_rss();
    let progress = Progress::start(name.clone());
    let opened = progress.counter();
    let opening = Instant::now();
    let heartbeats = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut openers = Vec::new();
    for c in 0..count.div_ceil(PER_CONNECTION) {
        let n = PER_CONNECTION.min(count - c * PER_CONNECTION);
        let client = ctx.client().await?;
        let (stream, opened, heartbeats, stop_rx) = (
            stream.clone(),
            opened.clone(),
            heartbeats.clone(),
            stop_rx.clone(),
        );
        openers.push(tokio::spawn(async move {
            let mut holders = Vec::with_capacity(n);
            for _ in 0..n {
                let mut subscription = client
                    .clone()
                    .subscribe(pb::SubscribeRequest {
                        stream: stream.clone(),
                        start: Some(Start::Position(pb::StartPosition::Latest as i32)),
                        max_batch_events: 0,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                subscription.message().await?.context("no first response")?;
                opened.fetch_add(1, Ordering::Relaxed);
                let (heartbeats, mut stop_rx) = (heartbeats.clone(), stop_rx.clone());
                holders.push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop_rx.changed() => return,
                            message = subscription.message() => match message {
                                Ok(Some(_)) => heartbeats.fetch_add(1, Ordering::Relaxed),
                                _ => return,
                            },
                        };
                    }
                }));
            }
            Ok::<_, anyhow::Error>(holders)
        }));
    }
    let mut holders = Vec::new();
    for opener in openers {
        holders.extend(opener.await??);
    }
    let open_seconds = opening.elapsed().as_secs_f64();
    heartbeats.store(0, Ordering::Relaxed);
    tokio::time::sleep(HOLD).await;
    let rss_after = ctx.server_rss();
    let beats = heartbeats.load(Ordering::Relaxed);
    progress.finish().await;
    let _ = stop_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }

    let mut failures = Vec::new();
    // The embedded server sends a heartbeat every second.
    if ctx.embedded.is_some() && beats < count as u64 {
        failures.push(format!(
            "only {beats} heartbeats reached {count} idle subscriptions in {HOLD:?}"
        ));
    }
    let per_subscription = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) / count.max(1) as u64),
        _ => None,
    };
    let summary = match (rss_before, rss_after, per_subscription) {
        (Some(before), Some(after), Some(per)) => format!(
            "server RSS {} -> {}  = {:.1} KiB per subscription; {beats} heartbeats in {HOLD:?}",
            mib(before),
            mib(after),
            per as f64 / 1024.0
        ),
        _ => format!("{count} subscriptions open; {beats} heartbeats in {HOLD:?} (server memory unknown: not embedded)"),
    };
    Ok(Outcome {
        summary,
        figures: json!({
            "workload": "fanout", "subscriptions": count, "open_seconds": open_seconds,
            "server_rss_before_bytes": rss_before, "server_rss_after_bytes": rss_after,
            "server_bytes_per_subscription": per_subscription, "heartbeats": beats,
        }),
        name,
        failures,
    })
}

/// Settings of the `soak` workload.
pub(crate) struct SoakSettings {
    /// How long to append.
    pub(crate) duration: Duration,
    /// Events per second, in total.
    pub(crate) rate: u64,
    /// The stream's `max_events` retention.
    pub(crate) retention_events: u64,
    /// How often to sample the data dir and memory.
    pub(crate) sample_every: Duration,
}

/// One soak sample.
struct SoakSample {
    seconds: f64,
    appended: u64,
    first_offset: u64,
    data_dir: Option<u64>,
    rss: Option<u64>,
}

/// `soak`: appends at a fixed rate for a long time to a stream with
/// `max_events` retention, sampling the data dir size and server memory.
/// Both should level off once retention starts trimming: the figures are
/// each one's final value against its value when trimming began.
pub(crate) async fn soak(ctx: &BenchContext, settings: &SoakSettings) -> anyhow::Result<Outcome> {
    const PRODUCERS: u64 = 4;
    const BATCH: u64 = 100;
    let name = format!(
        "soak rate={} retention_events={} duration={}",
        settings.rate,
        settings.retention_events,
        humantime::format_duration(settings.duration)
    );
    let stream = fresh_stream("soak");
    ctx.client()
        .await?
        .create_stream(pb::CreateStreamRequest {
            stream: stream.clone(),
            retention: Some(pb::RetentionPolicy {
                max_events: settings.retention_events,
                ..Default::default()
            }),
        })
        .await?;
    eprintln!("running {name}");
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + settings.duration;
    // Each producer sends a batch every PRODUCERS * BATCH / rate seconds.
    let period = Duration::from_secs_f64((PRODUCERS * BATCH) as f64 / settings.rate.max(1) as f64);
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let mut client = ctx.client().await?;
        let (stream, appended) = (stream.clone(), appended.clone());
        let events: Vec<_> = (0..BATCH)
            .map(|i| event(ctx.event_bytes, p * BATCH + i, 0))
            .collect();
        // Trimming runs once the head passes max_events (plus a second of
        // appends): acks before and after, to see what trimming costs them.
        let trimming_from = settings.retention_events + settings.rate;
        producers.push(tokio::spawn(async move {
            let (mut before, mut after) = (histogram(), histogram());
            let mut ticks = tokio::time::interval(period);
            // Behind schedule (a slow sync), catch up at once: the rate is
            // a total over the run.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                ticks.tick().await;
                let sent = Instant::now();
                let ack = client
                    .append(pb::AppendRequest {
                        stream: stream.clone(),
                        events: events.clone(),
                        ..Default::default()
                    })
                    .await
                    .context("append failed")?
                    .into_inner();
                let micros = sent.elapsed().as_micros().max(1) as u64;
                if ack.first_offset < trimming_from {
                    before.saturating_record(micros);
                } else {
                    after.saturating_record(micros);
                }
                appended.fetch_add(BATCH, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>((before, after))
        }));
    }

    let mut samples = Vec::new();
    let mut client = ctx.client().await?;
    let mut next_sample = started;
    eprintln!(
        "  {:>7}  {:>12}  {:>12}  {:>10}  {:>10}",
        "time", "appended", "first", "data dir", "server RSS"
    );
    loop {
        let now = Instant::now();
        let done = now >= deadline;
        if now >= next_sample || done {
            let info = stream_info(&mut client, &stream).await?;
            let sample = SoakSample {
                seconds: started.elapsed().as_secs_f64(),
                appended: info.next_offset,
                first_offset: info.first_offset,
                data_dir: ctx.data_dir_bytes(),
                rss: ctx.server_rss(),
            };
            eprintln!(
                "  {:>6.0}s  {:>12}  {:>12}  {:>10}  {:>10}",
                sample.seconds,
                sample.appended,
                sample.first_offset,
                sample.data_dir.map_or("-".into(), mib),
                sample.rss.map_or("-".into(), mib),
            );
            samples.push(sample);
            next_sample += settings.sample_every;
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100).min(settings.sample_every)).await;
    }
    let (mut acks_before, mut acks_after) = (histogram(), histogram());
    for producer in producers {
        let (before, after) = producer.await??;
        acks_before.add(before).context("merging histograms")?;
        acks_after.add(after).context("merging histograms")?;
    }
    let (before_json, before_text) = latency(&acks_before);
    let (after_json, after_text) = latency(&acks_after);
    let seconds = started.elapsed().as_secs_f64();
    let total = appended.load(Ordering::Relaxed);
    let info = stream_info(&mut client, &stream).await?;

    let mut failures = Vec::new();
    if info.next_offset != total {
        failures.push(format!(
            "{total} events acknowledged but the stream's head is {}",
            info.next_offset
        ));
    }
    if info.event_count < settings.retention_events.min(info.next_offset) {
        failures.push(format!(
            "retention kept {} events, fewer than max_events {}",
            info.event_count, settings.retention_events
        ));
    }
    let kicked_in = samples.iter().find(|s| s.first_offset > 0);
    let last = samples.last();
    let ratio = |f: fn(&SoakSample) -> Option<u64>| {
        let (Some(base), Some(end)) = (kicked_in.and_then(f), last.and_then(f)) else {
            return None;
        };
        Some(end as f64 / base.max(1) as f64)
    };
    let dir_ratio = ratio(|s| s.data_dir);
    let rss_ratio = ratio(|s| s.rss);
    let rss_max = samples
        .iter()
        .skip_while(|s| s.first_offset == 0)
        .filter_map(|s| s.rss)
        .max();
    let rate = total as f64 / seconds;
    let summary = match (kicked_in, dir_ratio) {
        (Some(k), Some(dir)) => format!(
            "{rate:>10.0} events/s  data dir {} -> {} ({dir:.2}x since trimming began at {:.0}s)  RSS {} -> {} (max {})",
            k.data_dir.map_or("-".into(), mib),
            last.and_then(|s| s.data_dir).map_or("-".into(), mib),
            k.seconds,
            k.rss.map_or("-".into(), mib),
            last.and_then(|s| s.rss).map_or("-".into(), mib),
            rss_max.map_or("-".into(), mib),
        ),
        _ => format!(
            "{rate:>10.0} events/s  retention never trimmed: run longer or lower --retention-events"
        ),
    };
    let summary = format!(
        "{summary}\n{:>40}   ack before trimming: {before_text}\n{:>40}   ack while trimming:  {after_text}",
        "", ""
    );
    Ok(Outcome {
        summary,
        figures: json!({
            "workload": "soak",
            "target_rate": settings.rate,
            "retention_events": settings.retention_events,
            "events": total,
            "seconds": seconds,
            "events_per_sec": rate,
            "trimming_began_s": kicked_in.map(|s| s.seconds),
            "data_dir_ratio": dir_ratio,
            "rss_ratio": rss_ratio,
            "rss_max_bytes": rss_max,
            "ack_latency_before_trimming": before_json,
            "ack_latency_while_trimming": after_json,
            "samples": samples.iter().map(|s| json!({
                "seconds": s.seconds,
                "appended": s.appended,
                "first_offset": s.first_offset,
                "data_dir_bytes": s.data_dir,
                "rss_bytes": s.rss,
            })).collect::<Vec<_>>(),
        }),
        name,
        failures,
    })
}

/// `group`: `members` workers of one key-shared consumer group read
/// `events` stored events, each spending `work` per event (waiting, as a
/// worker calling another service would), committing every 10 responses.
/// Reports the group's throughput and the server CPU per event, which
/// should not grow with the number of members (they share chunk reads).
pub(crate) async fn group(
    ctx: &BenchContext,
    members: usize,
    events: u64,
    work: Duration,
) -> anyhow::Result<Outcome> {
    let name = format!("group members={members} work={}us", work.as_micros());
    let stream = fresh_stream("group");
    create_stream(ctx, &stream).await?;
    store_events(ctx, &stream, events, None).await?;
    ctx.settle().await;
    let progress = Progress::start(name.clone());
    let seen: Arc<Vec<std::sync::atomic::AtomicBool>> =
        Arc::new((0..events).map(|_| Default::default()).collect());
    let unique = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let cpu_before = ctx.server_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for m in 0..members {
        let mut client = ctx.client().await?;
        let stream = stream.clone();
        let (seen, unique, duplicates) = (seen.clone(), unique.clone(), duplicates.clone());
        let (counter, done_tx, mut done_rx) =
            (progress.counter(), done_tx.clone(), done_rx.clone());
        tasks.push(tokio::spawn(async move {
            let member = format!("m{m}");
            let mut sub = client
                .subscribe(pb::SubscribeRequest {
                    stream: stream.clone(),
                    group: "bench".into(),
                    member: member.clone(),
                    start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
                    max_batch_events: 100,
                    ..Default::default()
                })
                .await
                .context("joining the group")?
                .into_inner();
            // Work is a virtual clock: each event moves it by `work`, and
            // the worker waits whenever it runs ahead of real time.
            let mut due = tokio::time::Instant::now();
            let mut responses = 0u64;
            loop {
                let message = tokio::select! {
                    message = sub.message() => message.context("group subscription")?,
                    _ = done_rx.changed() => return Ok::<_, anyhow::Error>(()),
                };
                let Some(message) = message else {
                    anyhow::bail!("the server ended member {member}'s subscription");
                };
                for event in &message.events {
                    due += work;
                    let first = !seen[event.offset as usize].swap(true, Ordering::Relaxed);
                    if first {
                        counter.fetch_add(1, Ordering::Relaxed);
                        if unique.fetch_add(1, Ordering::Relaxed) + 1 == events {
                            let _ = done_tx.send(true);
                        }
                    } else {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                } else {
                    due = tokio::time::Instant::now();
                }
                responses += 1;
                if responses.is_multiple_of(10) && !message.events.is_empty() {
                    client
                        .commit_group(pb::CommitGroupRequest {
                            stream: stream.clone(),
                            group: "bench".into(),
                            member: member.clone(),
                            next_offset: message.next_offset,
                        })
                        .await
                        .context("commit")?;
                }
            }
        }));
    }
    let mut done = done_rx.clone();
    tokio::time::timeout(Duration::from_secs(600), done.wait_for(|d| *d))
        .await
        .context("the group did not handle every event within 10 minutes")??;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, ctx.server_cpu()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let _ = done_tx.send(true);
    for task in tasks {
        task.await??;
    }
    progress.finish().await;
    let rate = events as f64 / seconds;
    let cpu_per_event = cpu.map(|c| c.as_secs_f64() * 1e6 / events as f64);
    let duplicates = duplicates.load(Ordering::Relaxed);
    Ok(Outcome {
        summary: format!(
            "{rate:>10.0} events/s handled  server CPU {}/event  {duplicates} redelivered (initial rebalances)",
            cpu_per_event.map_or("-".into(), |us| format!("{us:.1} us")),
        ),
        figures: json!({
            "workload": "group", "members": members, "work_us": work.as_micros() as u64,
            "events": events, "seconds": seconds, "events_per_sec": rate,
            "server_cpu_us_per_event": cpu_per_event, "redelivered": duplicates,
        }),
        name,
        failures: Vec::new(),
    })
}
