//! Writing sled's changed pages out between checkpoints, a step of bytes
//! at a time (`fsync` mode).
//!
//! With the write-ahead log on, a change is durable once its log record is
//! synced; sled need only be made durable by checkpoints. Left alone, sled
//! keeps every page changed since the last checkpoint in its buffers, and
//! the checkpoint writes them all at once: a burst of writes the log's
//! `fdatasync`s queue behind (batch-100 append p99 7.5 ms, README
//! Performance). sled's own flusher spreads them out by the clock
//! (`flush_every_ms`), and the interval had to be short (2 ms) to keep the
//! burst small under load; at a low append rate that is still a flush, and
//! a write to the same disk, every 2 ms for a handful of changes, and an
//! idle server woke 500 times a second for nothing (2.5% of a core).
//!
//! So the store counts the bytes of the changes it applies, and this thread
//! has sled write out what it holds each time another step of them
//! (`--storage-flush-bytes`) has been applied: back to back, a step at a
//! time, under load; seldom at a low rate; never when idle. sled's flush
//! writes its buffers with `sync_file_range`; only checkpoints add the
//! `fdatasync` that makes them durable, so a failed flush here loses
//! nothing acknowledged (the log holds every change). But sled's files are
//! in an unknown state from then on (and sled keeps a failed write of its
//! own as an error for everything after it), so a failed flush poisons
//! the store at once, as a failed log sync does: writes are refused with
//! UNAVAILABLE until a restart, which replays the log, and the reason
//! names this flush. The thread stops there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::durability::fault::{Faults, Target};

struct Shared {
    /// Bytes of changes applied since the last flush started.
    pending: AtomicU64,
    /// Set when the store closes. Also the lock a wake-up is sent under,
    /// so one sent between the thread's check and its wait is not lost.
    stopped: Mutex<bool>,
    woken: Condvar,
    /// Flushes finished so far.
    flushes: AtomicU64,
}

/// The background flusher (see the module docs). Stops, and lets go of
/// sled, when dropped.
pub(super) struct Flusher {
    shared: Arc<Shared>,
    step: u64,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts flushing `db` after every `step` bytes of applied changes;
    /// a failed flush (or one `faults` fails) is handed to `failed`, once.
    pub(super) fn start(
        db: sled::Db,
        step: u64,
        faults: Option<Arc<Faults>>,
        failed: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<Flusher> {
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(0),
            stopped: Mutex::new(false),
            woken: Condvar::new(),
            flushes: AtomicU64::new(0),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pullstream-flush".into())
                .spawn(move || run(&shared, &db, step, faults.as_deref(), failed))?
        };
        Ok(Flusher {
            shared,
            step,
            thread: Some(thread),
        })
    }

    /// Counts `bytes` more of applied changes; wakes the thread when they
    /// complete a step.
    pub(super) fn applied(&self, bytes: u64) {
        let before = self.shared.pending.fetch_add(bytes, Ordering::Relaxed);
        if before < self.step && before + bytes >= self.step {
            let _stopped = self.shared.stopped.lock().expect("flusher lock");
            self.shared.woken.notify_one();
        }
    }

    /// Flushes finished so far.
    #[cfg(test)]
    pub(super) fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        *self.shared.stopped.lock().expect("flusher lock") = true;
        self.shared.woken.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    shared: &Shared,
    db: &sled::Db,
    step: u64,
    faults: Option<&Faults>,
    failed: impl FnOnce(String),
) {
    loop {
        {
            let mut stopped = shared.stopped.lock().expect("flusher lock");
            while !*stopped && shared.pending.load(Ordering::Relaxed) < step {
                stopped = shared.woken.wait(stopped).expect("flusher lock");
            }
            if *stopped {
                return;
            }
        }
        // What is applied from here on counts towards the next step.
        shared.pending.store(0, Ordering::Relaxed);
        let flushed = faults
            .map_or(Ok(()), |f| f.on_sync(Target::BackgroundFlush))
            .and_then(|()| db.flush().map(drop).map_err(std::io::Error::other));
        if let Err(e) = flushed {
            failed(format!(
                "storage's background flush failed ({e}); nothing acknowledged is lost: the write-ahead log holds every change, and a restart replays it"
            ));
            return;
        }
        shared.flushes.fetch_add(1, Ordering::Relaxed);
    }
}
