//! `soak`: a long mixed run that watches the server's memory and latency
//! over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::*;
use crate::bench::{histogram, latency, mib, BenchContext, Outcome};
use crate::proto::{self as pb};

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
    let summary =
        format!("{summary}\nack before trimming: {before_text}\nack while trimming:  {after_text}");
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
