//! The wall clock the server reads: real time, plus an offset that tests
//! can move forward.
//!
//! Retention by age, the idempotency window and key expiry all compare
//! stored times with "now". Reading the system clock in each place made
//! their tests sleep through real windows; one [`Clock`] handed down from
//! the config lets a test say "two hours later" instead
//! ([`Clock::advance`]). Time still flows as usual in between, so nothing
//! that also waits on timers (housekeeping ticks) changes behaviour, and
//! in production the offset is zero and never moves.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// See the module docs. Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_nanos: Arc<AtomicI64>,
}

impl Clock {
    /// The current time in nanoseconds since the Unix epoch.
    pub fn now_unix_nanos(&self) -> i64 {
        system_now_unix_nanos().saturating_add(self.offset_nanos.load(Ordering::Relaxed))
    }

    /// Moves this clock (and its clones) forward by `by` (tests).
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.offset_nanos.fetch_add(by, Ordering::Relaxed);
    }
}

/// The system clock in nanoseconds since the Unix epoch (0 before it).
pub fn system_now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_every_clone() {
        let clock = Clock::default();
        let other = clock.clone();
        let before = other.now_unix_nanos();
        clock.advance(Duration::from_secs(3600));
        let after = other.now_unix_nanos();
        assert!(after - before >= 3600 * 1_000_000_000, "{}", after - before);
    }
}
