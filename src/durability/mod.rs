//! Durability: the one path by which a change reaches the disk for good.
//!
//! Every change that must survive a crash (appends, stream creation,
//! deletion and settings, consumer and group commits, API keys, retention
//! trims, idempotency expiry, the cleanup on open) is applied by
//! `storage` and then appended to the [`wal`] as one record; in `fsync`
//! mode it is acknowledged only once that record is synced. Checkpoints
//! flush sled and write the [`wal`] checkpoint marker; only then may log
//! files be deleted. Recovery scans the log, tells a torn tail (a crash)
//! from damage (refuse to start), and replays exactly the records the last
//! checkpoint does not cover.
//!
//! - [`wal`]: record and file format, the scan, the open log, the marker.
//! - [`fault`]: the seam that lets tests fail a write or a sync for real.
//! - [`prealloc`]: zero-fills the log ahead of its writes (cheaper syncs).
//! - [`space`]: free space under the data dir, for the free-space floor.

pub mod fault;
pub mod prealloc;
pub mod space;
pub mod wal;
