//! `group`: the members of one key-shared consumer group sharing a
//! stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::watch;

use super::catchup::store_events;
use super::*;
use crate::bench::{BenchContext, Goal, Outcome, Progress};
use crate::proto::{self as pb, subscribe_request::Start};

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
    let progress = Progress::start(name.clone(), Goal::Count(events, "events"));
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
