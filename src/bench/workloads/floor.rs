//! `floor`: what a single-event Append costs above the cost of any call.
//!
//! One caller sends the standard gRPC health check back to back on its own
//! connection: no key, no storage, nothing of ours but a map lookup, so
//! its latency is tonic, h2, loopback TCP and two wake-ups, the floor every
//! unary call pays here. Then single-event Appends the same way. The
//! difference of the two p50s is what the append itself costs (validation,
//! the writer, the store and, in `fsync` mode, the disk sync).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::*;
use crate::bench::{histogram, latency, BenchContext, Goal, Outcome, Progress};
use crate::client::ConnectOptions;
use crate::proto as pb;

/// `floor`: `duration` of health checks, then `duration` of single-event
/// Appends, one at a time each.
pub(crate) async fn floor(ctx: &BenchContext, duration: Duration) -> anyhow::Result<Outcome> {
    let name = "floor: health check vs Append batch=1".to_string();
    let progress = Progress::start(name.clone(), Goal::Time(2 * duration));
    let counter = progress.counter();

    let (channel, _) = ConnectOptions {
        server: ctx.url.clone(),
        ..Default::default()
    }
    .channel()
    .await?;
    let mut health = HealthClient::new(channel);
    let mut checks = histogram();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let sent = Instant::now();
        health
            .check(HealthCheckRequest::default())
            .await
            .context("health check failed")?;
        checks.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        counter.fetch_add(1, Ordering::Relaxed);
    }

    let stream = fresh_stream("floor");
    let mut client = ctx.client().await?;
    let events = vec![event(ctx.event_bytes, 0, 0)];
    let mut appends = histogram();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let request = pb::AppendRequest {
            stream: stream.clone(),
            events: events.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        client.append(request).await.context("append failed")?;
        appends.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        counter.fetch_add(1, Ordering::Relaxed);
    }
    progress.finish().await;

    let mut failures = Vec::new();
    let head = head_of(ctx, &stream).await?;
    if head != appends.len() {
        failures.push(format!(
            "{} appends acknowledged but the stream holds {head} events",
            appends.len()
        ));
    }
    let (check_json, check_text) = latency(&checks);
    let (append_json, append_text) = latency(&appends);
    let above_us = appends.value_at_quantile(0.5) as i64 - checks.value_at_quantile(0.5) as i64;
    Ok(Outcome {
        summary: format!(
            "health check {check_text}\n{:>45}append {append_text}\n{:>45}append p50 is {above_us} µs above the no-op call",
            "", ""
        ),
        figures: json!({
            "workload": "floor",
            "health_check_latency": check_json,
            "append_latency": append_json,
            "append_p50_above_floor_us": above_us,
        }),
        name,
        failures,
    })
}
