//! `floor`: what a single-event Append costs above the cost of any call,
//! and, in `fsync` mode, above the disk's own sync.
//!
//! Three measurements, one caller each, taking turns a second at a time so
//! that all three see the same machine (on a shared VM each drifts by tens
//! of microseconds from one minute to the next, more than the differences
//! this workload is for):
//! - the standard gRPC health check, back to back on its own connection:
//!   no key, no storage, nothing of ours but a map lookup, so its latency
//!   is tonic, h2, loopback TCP and the wake-ups, the floor every unary
//!   call pays here;
//! - with the bench's own server in `fsync` mode, the disk's floor: a
//!   4 KiB `pwrite` + `fdatasync` over blocks written and synced before
//!   (as the write-ahead log writes over the region it keeps zero-filled
//!   ahead), in a temp file beside the server's data dir, on the same file
//!   system, while the server is idle;
//! - single-event Appends.
//!
//! The differences of the p50s are what the append itself costs: above the
//! no-op call (validation, the writer, the store and the sync), and above
//! the disk's sync (everything but the disk, the call included).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::*;
use crate::bench::{histogram, latency, BenchContext, Goal, Outcome, Progress};
use crate::client::ConnectOptions;
use crate::proto as pb;

/// How long each measurement runs before the next takes its turn.
const TURN: Duration = Duration::from_secs(1);

/// `floor`: `duration` of each measurement (see the module docs), in turns.
pub(crate) async fn floor(ctx: &BenchContext, duration: Duration) -> anyhow::Result<Outcome> {
    let mut disk = match ctx.sync_floor_dir() {
        Some(dir) => Some(DiskSyncs::prepare(dir.to_path_buf()).await?),
        None => None,
    };
    let name = match disk {
        Some(_) => "floor: health check, disk sync and Append batch=1",
        None => "floor: health check vs Append batch=1",
    }
    .to_string();
    let measurements = if disk.is_some() { 3 } else { 2 };
    let progress = Progress::start(name.clone(), Goal::Time(measurements * duration));
    let counter = progress.counter();

    let (channel, _) = ConnectOptions {
        server: ctx.url.clone(),
        ..Default::default()
    }
    .channel()
    .await?;
    let mut health = HealthClient::new(channel);
    let stream = fresh_stream("floor");
    let mut client = ctx.client().await?;
    let events = vec![event(ctx.event_bytes, 0, 0)];
    // On a task of the runtime, as the append workload's producers and
    // most clients run: from the bench's main thread every answer costs a
    // wake-up of that thread besides (about 80 µs more here).
    let measuring = tokio::spawn(async move {
        let mut checks = histogram();
        let mut appends = histogram();
        let mut left = duration;
        while !left.is_zero() {
            let turn = left.min(TURN);
            left -= turn;

            let deadline = Instant::now() + turn;
            while Instant::now() < deadline {
                let sent = Instant::now();
                health
                    .check(HealthCheckRequest::default())
                    .await
                    .context("health check failed")?;
                checks.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                counter.fetch_add(1, Ordering::Relaxed);
            }

            if let Some(measuring) = disk.take() {
                let counter = counter.clone();
                disk = Some(
                    tokio::task::spawn_blocking(move || measuring.measure(turn, &counter))
                        .await
                        .context("the disk sync measurement panicked")??,
                );
            }

            let deadline = Instant::now() + turn;
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
        }
        Ok::<_, anyhow::Error>((checks, disk, appends, stream))
    });
    let (checks, disk, appends, stream) =
        measuring.await.context("the floor workload panicked")??;
    progress.finish().await;

    let mut failures = Vec::new();
    let head = head_of(ctx, &stream).await?;
    if head != appends.len() {
        failures.push(format!(
            "{} appends acknowledged but the stream holds {head} events",
            appends.len()
        ));
    }
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as i64;
    let (check_json, check_text) = latency(&checks);
    let (append_json, append_text) = latency(&appends);
    let above_call_us = p50(&appends) - p50(&checks);
    let mut summary = format!("health check {check_text}\n");
    let mut sync_json = Value::Null;
    let mut above_sync_us = Value::Null;
    let mut sync_dir = Value::Null;
    if let Some(disk) = &disk {
        let (json, text) = latency(&disk.syncs);
        summary += &format!(
            "disk sync {text} (4 KiB write + fdatasync in {})\n",
            disk.dir.display()
        );
        sync_json = json;
        above_sync_us = json!(p50(&appends) - p50(&disk.syncs));
        sync_dir = json!(disk.dir.display().to_string());
    }
    summary +=
        &format!("append {append_text}\nappend p50 is {above_call_us} µs above the no-op call");
    if let Value::Number(us) = &above_sync_us {
        summary += &format!(" and {us} µs above the disk's sync");
    }
    Ok(Outcome {
        summary,
        figures: json!({
            "workload": "floor",
            "health_check_latency": check_json,
            "disk_sync_latency": sync_json,
            "disk_sync_dir": sync_dir,
            "append_latency": append_json,
            "append_p50_above_floor_us": above_call_us,
            "append_p50_above_disk_sync_us": above_sync_us,
        }),
        name,
        failures,
    })
}

/// The disk's sync floor: 4 KiB writes, each followed by `fdatasync`, going
/// round a file whose blocks were all written and synced first.
struct DiskSyncs {
    dir: PathBuf,
    /// Deleted when dropped.
    file: tempfile::NamedTempFile,
    /// The next block to write.
    next: u64,
    syncs: Histogram<u64>,
}

/// The file's size: 4,096 blocks of 4 KiB.
const SYNC_FILE_BYTES: u64 = 16 << 20;
const SYNC_WRITE_BYTES: usize = 4096;

impl DiskSyncs {
    /// Creates the file in `dir` and writes and syncs all of its blocks.
    async fn prepare(dir: PathBuf) -> anyhow::Result<DiskSyncs> {
        tokio::task::spawn_blocking(move || {
            let file = tempfile::Builder::new()
                .prefix("pullstream-bench-sync-floor-")
                .tempfile_in(&dir)
                .with_context(|| {
                    format!("creating a file in {} to time its syncs", dir.display())
                })?;
            let zeros = vec![0u8; 1 << 20];
            let written = (0..SYNC_FILE_BYTES / zeros.len() as u64)
                .try_for_each(|i| file.as_file().write_all_at(&zeros, i * zeros.len() as u64))
                .and_then(|()| file.as_file().sync_all());
            written.with_context(|| format!("preparing {}", file.path().display()))?;
            Ok(DiskSyncs {
                dir,
                file,
                next: 0,
                syncs: histogram(),
            })
        })
        .await
        .context("preparing the disk sync measurement panicked")?
    }

    /// Writes and syncs block after block for `turn`.
    fn measure(mut self, turn: Duration, counter: &Arc<AtomicU64>) -> anyhow::Result<DiskSyncs> {
        let block = [0xa5u8; SYNC_WRITE_BYTES];
        let file: &File = self.file.as_file();
        let blocks = SYNC_FILE_BYTES / SYNC_WRITE_BYTES as u64;
        let deadline = Instant::now() + turn;
        while Instant::now() < deadline {
            let at = (self.next % blocks) * SYNC_WRITE_BYTES as u64;
            let started = Instant::now();
            file.write_all_at(&block, at)
                .and_then(|()| file.sync_data())
                .with_context(|| format!("timing syncs of {}", self.file.path().display()))?;
            self.syncs
                .saturating_record(started.elapsed().as_micros().max(1) as u64);
            self.next += 1;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self)
    }
}
