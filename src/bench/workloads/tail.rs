//! The live workloads: subscribers following a stream at the head
//! (`tail`) and many idle subscriptions held open at once (`fanout`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use super::*;
use crate::bench::{histogram, latency, mib, BenchContext, Goal, Outcome, Progress};
use crate::proto::{self as pb, subscribe_request::Start};

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
        let mut client = ctx.reader().await?;
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

    let progress = Progress::start(name.clone(), Goal::Time(duration));
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
    let progress = Progress::start(name.clone(), Goal::Count(count as u64, "subscriptions"));
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
