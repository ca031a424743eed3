//! The fault-injection seam under the write-ahead log, the sled checkpoint
//! and sled's background flush.
//!
//! Storage faults (a full disk, a failing device, a write torn by a crash)
//! are the cases durability exists for, and they cannot be produced on
//! demand with a real disk. So every write and sync the log and the
//! checkpoint make goes through [`Faults`], which a test can arm to fail the
//! Nth one with `ENOSPC` or `EIO`, optionally after writing the first K
//! bytes (a torn write). In production no plan is set and the seam costs one
//! branch on an `Option`.
//!
//! The plan is shared (`Arc`): a test keeps a handle and arms it while the
//! real server runs.

use std::sync::{Condvar, Mutex};

/// The I/O the seam can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A write to a write-ahead log file (appends, file headers).
    WalWrite,
    /// An `fdatasync` of a write-ahead log file.
    WalSync,
    /// The sled flush and sync of a checkpoint.
    CheckpointSync,
    /// sled's background flush between checkpoints (`fsync` mode,
    /// `storage::flusher`).
    BackgroundFlush,
}

/// How an armed fault fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `ENOSPC` (no space left on device).
    NoSpace,
    /// `EIO` (input/output error).
    Io,
}

impl Failure {
    fn error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(match self {
            Failure::NoSpace => libc::ENOSPC,
            Failure::Io => libc::EIO,
        })
    }
}

/// One armed fault.
#[derive(Debug, Clone, Copy)]
struct Armed {
    target: Target,
    /// How many more matching calls pass before this one fails.
    skip: u64,
    failure: Failure,
    /// For writes: how many bytes reach the file before the error.
    written: usize,
    /// Whether it keeps failing every later matching call (a full disk
    /// stays full) until disarmed.
    sticky: bool,
}

/// A plan of faults to inject; empty by default.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<Armed>>,
    /// While set, write-ahead log syncs wait (a slow disk, on demand).
    held: Mutex<bool>,
    released: Condvar,
}

/// What a write should do.
pub(crate) enum WriteFault {
    /// Write only this many bytes, then fail with the error.
    Partial(usize, std::io::Error),
}

impl Faults {
    /// An empty plan.
    pub fn new() -> Faults {
        Faults::default()
    }

    /// Fails the `nth` (0 = the next) call on `target` with `failure`;
    /// for writes, after `written` bytes reached the file.
    pub fn fail_nth(&self, target: Target, nth: u64, failure: Failure, written: usize) {
        self.arm(Armed {
            target,
            skip: nth,
            failure,
            written,
            sticky: false,
        });
    }

    /// Fails every call on `target` from the next on (a full disk, a dead
    /// device) until [`Faults::clear`].
    pub fn fail_all(&self, target: Target, failure: Failure) {
        self.arm(Armed {
            target,
            skip: 0,
            failure,
            written: 0,
            sticky: true,
        });
    }

    /// Disarms every fault.
    /// Makes every write-ahead log sync wait until [`Faults::release`]: a
    /// disk that has stalled, so a test can watch what piles up.
    pub fn hold_syncs(&self) {
        *self.held.lock().expect("faults lock") = true;
    }

    /// Lets held syncs go on.
    pub fn release(&self) {
        *self.held.lock().expect("faults lock") = false;
        self.released.notify_all();
    }

    pub fn clear(&self) {
        self.armed.lock().expect("faults lock").clear();
    }

    fn arm(&self, armed: Armed) {
        self.armed.lock().expect("faults lock").push(armed);
    }

    /// Whether the next call on `target` fails, and how.
    fn take(&self, target: Target) -> Option<Armed> {
        let mut armed = self.armed.lock().expect("faults lock");
        let mut fired = None;
        armed.retain_mut(|a| {
            if a.target != target || fired.is_some() {
                return true;
            }
            if a.skip > 0 {
                a.skip -= 1;
                return true;
            }
            fired = Some(*a);
            a.sticky
        });
        fired
    }

    pub(crate) fn on_write(&self, len: usize) -> Option<WriteFault> {
        self.take(Target::WalWrite)
            .map(|a| WriteFault::Partial(a.written.min(len), a.failure.error()))
    }

    pub(crate) fn on_sync(&self, target: Target) -> std::io::Result<()> {
        if target == Target::WalSync {
            let mut held = self.held.lock().expect("faults lock");
            while *held {
                held = self.released.wait(held).expect("faults lock");
            }
        }
        match self.take(target) {
            Some(a) => Err(a.failure.error()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_call_fails_once_and_sticky_faults_stay() {
        let faults = Faults::new();
        faults.fail_nth(Target::WalSync, 1, Failure::Io, 0);
        assert!(faults.on_sync(Target::WalSync).is_ok());
        assert!(faults.on_sync(Target::CheckpointSync).is_ok());
        let e = faults.on_sync(Target::WalSync).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(faults.on_sync(Target::WalSync).is_ok());

        faults.fail_all(Target::WalWrite, Failure::NoSpace);
        for _ in 0..3 {
            let Some(WriteFault::Partial(0, e)) = faults.on_write(10) else {
                panic!("a full disk stays full");
            };
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        }
        faults.clear();
        assert!(faults.on_write(10).is_none());
    }
}
