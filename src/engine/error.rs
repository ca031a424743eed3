//! The storage errors every engine reports, with the operation and the
//! path an operator needs. Engine-specific causes (sled's errors) travel
//! as their source, so nothing above the seam names an engine's types.

use std::path::PathBuf;

use super::CodecError;
use crate::durability::wal::WalError;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another process holds the data dir's lock.
    #[error("data dir {path} is in use by another process: stop it, or pass another --data-dir")]
    Locked {
        /// The data dir.
        path: PathBuf,
    },
    /// The data dir could not be opened.
    #[error("cannot open data dir {path}: {source}")]
    Open {
        /// The data dir.
        path: PathBuf,
        /// What the engine or the OS said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An I/O error while reading or writing (the operation named).
    #[error("storage I/O error while {op} in {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The write-ahead log failed, is damaged, or refuses writes.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// sled's recovered state is older than the last checkpoint made it.
    #[error("sled in {} recovered only up to write-ahead log record {sled}, but the checkpoint marker says record {checkpoint} was made durable in it: sled lost data it had synced, so the server will not start. Restore the data dir from a backup, or run `pullstream verify --data-dir {}` to see what is left", path.display(), path.display())]
    SledBehindCheckpoint {
        /// The data dir.
        path: PathBuf,
        /// The sequence number sled recovered.
        sled: u64,
        /// The sequence number the checkpoint marker records.
        checkpoint: u64,
    },
    /// The engine failed during an operation (named, for the operator).
    #[error("storage error while {op} in {path}: {source}")]
    Engine {
        /// What the store was doing.
        op: &'static str,
        /// The data dir.
        path: PathBuf,
        /// What the engine said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A conditional append found that another server had appended to
    /// the stream first: nothing was written (engines shared by several
    /// servers only; the writer decides the group again).
    #[error(
        "another server appended to stream id {stream_id} first; its head is now {next_offset}"
    )]
    HeadMoved {
        /// The stream's id.
        stream_id: u64,
        /// The head the engine found.
        next_offset: u64,
        /// The append time of the stream's last event.
        last_time_unix_nanos: i64,
    },
    /// Another server deleted the stream (engines shared by several
    /// servers): nothing was written.
    #[error("stream {name:?} was deleted through another server")]
    StreamGone {
        /// The stream's name.
        name: String,
    },
    /// Another server created the stream first (engines shared by
    /// several servers): nothing was written; look it up instead.
    #[error("another server created stream {name:?} first")]
    AlreadyCreated {
        /// The stream's name.
        name: String,
    },
    /// A stored chunk of events is damaged (checksum mismatch or bad
    /// layout): its events are lost.
    #[error("the chunk at offset {offset} of stream id {stream_id} is damaged in the data dir: {source}")]
    CorruptChunk {
        /// The stream's id.
        stream_id: u64,
        /// The chunk's first offset (from its key).
        offset: u64,
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// A stored value could not be decoded.
    #[error("corrupt {what} in the data dir: {source}")]
    Corrupt {
        /// Which value.
        what: String,
        /// Why it could not be decoded.
        #[source]
        source: CodecError,
    },
}
