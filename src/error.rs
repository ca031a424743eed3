//! The domain error type. Every failure a client can cause or observe is a
//! variant here; the service layer maps each to a gRPC status in one place
//! (`service::status`), and nothing below it builds a `tonic::Status`.

use crate::durability::wal::WalError;
use crate::storage::StorageError;

/// Errors from the log and its operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stream name that breaks the naming rule.
    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStreamName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A malformed request; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// The stream does not exist (or was deleted).
    #[error("stream {0:?} not found")]
    StreamNotFound(String),
    /// A durable consumer that does not exist.
    #[error("consumer {consumer:?} of stream {stream:?} not found")]
    ConsumerNotFound {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
    },
    /// A newer subscription of the same durable consumer took over, or the
    /// consumer was deleted.
    #[error("consumer {consumer:?} of stream {stream:?} {reason}")]
    ConsumerSessionEnded {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// What happened.
        reason: &'static str,
    },
    /// A consumer group, or a member of it, that does not exist (or is not
    /// connected).
    #[error("{what} of stream {stream:?} does not exist{hint}")]
    GroupNotFound {
        /// The stream.
        stream: String,
        /// `consumer group "g"` or `member "m" of consumer group "g"`.
        what: String,
        /// What to do next.
        hint: &'static str,
    },
    /// CreateStream on a stream that exists.
    #[error("stream {0:?} already exists")]
    StreamExists(String),
    /// A start or read offset beyond the stream's head.
    #[error("offset {offset} is past the head of stream {stream:?}: its next offset is {head}")]
    OffsetPastHead {
        /// The stream.
        stream: String,
        /// The requested offset.
        offset: u64,
        /// The stream's next offset.
        head: u64,
    },
    /// A start or read offset below the first retained event.
    #[error("offset {offset} of stream {stream:?} is no longer retained: the first retained offset is {first}")]
    OffsetTrimmed {
        /// The stream.
        stream: String,
        /// The requested offset.
        offset: u64,
        /// The stream's first retained offset.
        first: u64,
    },
    /// Events inside the retained range are missing or damaged in storage.
    #[error("events of stream {stream:?} from offset {first}{} are damaged or missing in storage (data loss, not retention): reads cannot pass them. Stop the server and run `pullstream verify --data-dir DATA_DIR`, then restore from a backup", end.map_or(String::new(), |e| format!(" to {}", e - 1)))]
    DataLoss {
        /// The stream.
        stream: String,
        /// The first lost offset.
        first: u64,
        /// One past the last lost offset, when known.
        end: Option<u64>,
    },
    /// `expected_next_offset` did not match.
    #[error("expected next offset {expected} but stream {stream:?} is at next offset {actual}; nothing was written")]
    WrongExpectedOffset {
        /// The stream.
        stream: String,
        /// What the client expected.
        expected: u64,
        /// The stream's actual next offset.
        actual: u64,
    },
    /// An idempotency key reused for a different batch.
    #[error("idempotency key {key:?} was already used on stream {stream:?} for a different batch; nothing was written")]
    IdempotencyConflict {
        /// The stream.
        stream: String,
        /// The key.
        key: String,
    },
    /// No usable API key: missing, malformed, unknown, expired or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid key without the right to this call.
    #[error("{0}")]
    PermissionDenied(String),
    /// A per-key limit was reached (rate or concurrent subscriptions).
    #[error("{0}")]
    ResourceExhausted(String),
    /// An API key id that does not exist (for the caller's tenant).
    #[error("API key {0:?} not found")]
    KeyNotFound(String),
    /// The server is shutting down.
    #[error("server shutting down: reconnect and resume from your cursor")]
    ShuttingDown,
    /// A write failed, or an earlier failure made the log stop accepting
    /// writes. The change may or may not have been applied.
    #[error("storage failed ({0}): the server refuses writes until it is restarted; this call's change may or may not have been applied, so retry it once the server is back (Append with the same idempotency key is safe to retry)")]
    StorageFailed(String),
    /// The free space under the data dir is below the floor; nothing was
    /// written.
    #[error("disk full: {free} bytes free under {dir}, below the floor of {floor} (--min-free-bytes); nothing was written. Delete streams or tighten retention to free space; writes resume by themselves")]
    DiskFull {
        /// The data dir.
        dir: String,
        /// Free bytes.
        free: u64,
        /// The floor.
        floor: u64,
    },
    /// `--verify-on-start` found damage (the server does not start).
    #[error("--verify-on-start found damaged or missing events: {0}. Restore the data dir from a backup, or start without --verify-on-start to serve the rest (reads of the damage get DATA_LOSS)")]
    VerifyFailed(String),
    /// A storage error.
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for Error {
    /// A failed write or sync of the log (or a log refusing writes since
    /// one) is the one storage failure a client sees as such: the change
    /// may or may not have been applied, and writes stop until a restart.
    fn from(error: StorageError) -> Error {
        match error {
            StorageError::Wal(
                WalError::WriteFailed { .. } | WalError::SyncFailed { .. } | WalError::Poisoned(_),
            ) => Error::StorageFailed(error.to_string()),
            other => Error::Storage(other),
        }
    }
}
