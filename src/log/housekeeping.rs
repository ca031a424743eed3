//! The log's background turns: each second, sample every stream's append
//! rate and ask the writers of streams with a retention policy to trim;
//! each minute (or idempotency window), ask every writer to forget its
//! expired idempotency keys. Both only send commands: the writers do the
//! work, ordered with appends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::command::WriterCommand;
use super::{Log, HOUSEKEEPING_PERIOD};

/// Every [`HOUSEKEEPING_PERIOD`]: samples each stream's head for its
/// append rate, and asks the writer of each stream with a retention policy
/// to trim. A writer whose queue is full is skipped this turn (appends
/// come first; the next turn catches up).
pub(super) async fn housekeeping(log: Arc<Log>) {
    let mut ticks = tokio::time::interval(HOUSEKEEPING_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = log.closing.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = Instant::now();
        for stream in log.all_streams() {
            stream.shared.sample_rate(now);
            let retention = *stream.shared.retention.lock().expect("retention lock");
            if !retention.keeps_everything() {
                let _ = stream.writer_tx.try_send(WriterCommand::Trim);
            }
        }
    }
}

/// Every minute (or window, when shorter) until the log closes: asks
/// each stream's writer to forget its expired idempotency keys. A writer
/// whose queue is full is skipped this turn (appends come first).
pub(super) async fn expire_idempotency_keys(log: Arc<Log>) {
    let period = Duration::from_secs(60).min(log.config.idempotency_window);
    loop {
        tokio::select! {
            _ = log.closing.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        for stream in log.all_streams() {
            let _ = stream.writer_tx.try_send(WriterCommand::ExpireIdempotency);
        }
    }
}
