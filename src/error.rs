//! The domain error type. Every failure a client can cause or observe is a
//! variant here; the API layer (`api`) maps each to a gRPC status in one place
//! (`api`, `impl From<Error> for Status`), and nothing below it builds a `tonic::Status`.

use crate::durability::wal::WalError;
use crate::engine::StorageError;

/// Errors from the log and its operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stream name that breaks the naming rule.
    #[error("invalid stream name {}: {reason}", shown(name))]
    InvalidStreamName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A malformed request; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request (message or HTTP body) larger than the server accepts;
    /// the message names the limit and the flag that raises it.
    #[error("{0}")]
    TooLarge(String),
    /// The stream does not exist (or was deleted).
    #[error("stream {} not found", shown(.0))]
    StreamNotFound(String),
    /// A durable consumer that does not exist.
    #[error("consumer {} of stream {} not found", shown(consumer), shown(stream))]
    ConsumerNotFound {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
    },
    /// A newer subscription of the same durable consumer took over, or the
    /// consumer was deleted.
    #[error("consumer {} of stream {} {reason}", shown(consumer), shown(stream))]
    ConsumerSessionEnded {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// What happened.
        reason: &'static str,
    },
    /// A consumer group that does not exist.
    #[error(
        "consumer group {} of stream {} does not exist: subscribe with `group` and `member` to create it",
        shown(group),
        shown(stream)
    )]
    GroupNotFound {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
    },
    /// A member of a consumer group that does not exist or is not connected.
    #[error(
        "member {} of consumer group {} of stream {} does not exist (or is not connected): commit from the member's open subscription",
        shown(member),
        shown(group),
        shown(stream)
    )]
    MemberNotFound {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// The member id.
        member: String,
    },
    /// ResetGroup while members are connected.
    #[error(
        "consumer group {} of stream {} has connected members ({}): stop them before resetting its offsets",
        shown(group),
        shown(stream),
        members.iter().map(|m| shown(m).to_string()).collect::<Vec<_>>().join(", ")
    )]
    GroupActive {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// Its connected members.
        members: Vec<String>,
    },
    /// CreateStream on a stream that exists.
    #[error("stream {} already exists", shown(.0))]
    StreamExists(String),
    /// A start or read offset beyond the stream's head.
    #[error(
        "offset {offset} is past the head of stream {}: its next offset is {head}",
        shown(stream)
    )]
    OffsetPastHead {
        /// The stream.
        stream: String,
        /// The requested offset.
        offset: u64,
        /// The stream's next offset.
        head: u64,
    },
    /// A start or read offset below the first retained event.
    #[error(
        "offset {offset} of stream {} is no longer retained: the first retained offset is {first}",
        shown(stream)
    )]
    OffsetTrimmed {
        /// The stream.
        stream: String,
        /// The requested offset.
        offset: u64,
        /// The stream's first retained offset.
        first: u64,
    },
    /// Events inside the retained range are missing or damaged in storage.
    #[error("events of stream {} from offset {first}{} are damaged or missing in storage (data loss, not retention): reads cannot pass them. Stop the server and run `pullstream verify --data-dir DATA_DIR`, then restore from a backup", shown(stream), end.map_or(String::new(), |e| format!(" to {}", e - 1)))]
    DataLoss {
        /// The stream.
        stream: String,
        /// The first lost offset.
        first: u64,
        /// One past the last lost offset, when known.
        end: Option<u64>,
    },
    /// `expected_next_offset` did not match.
    #[error("expected next offset {expected} but stream {} is at next offset {actual}; nothing was written", shown(stream))]
    WrongExpectedOffset {
        /// The stream.
        stream: String,
        /// What the client expected.
        expected: u64,
        /// The stream's actual next offset.
        actual: u64,
    },
    /// An idempotency key reused for a different batch.
    #[error("idempotency key {} was already used on stream {} for a different batch; nothing was written", shown(key), shown(stream))]
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
    /// A limit was reached: per key (rate, concurrent subscriptions), per
    /// tenant or stream (how many streams, consumers, groups, members), or
    /// server-wide (request bytes in flight).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A client took longer than the server allows to send its request.
    #[error("{0}")]
    RequestTimeout(String),
    /// A batch of an append pipeline failed: the batch's own error, named
    /// by the client's sequence number (its status code is the inner
    /// error's).
    #[error("batch {sequence}: {source}")]
    InBatch {
        /// The batch's sequence number, as the client sent it.
        sequence: u64,
        /// Why it failed.
        source: Box<Error>,
    },
    /// An append whose fencing token is not the stream's current one: a
    /// newer producer has fenced this one off.
    #[error("fencing token {} does not match stream {}'s current token {}: another producer has taken over; nothing was written", shown(given), shown(stream), shown(current))]
    Fenced {
        /// The stream.
        stream: String,
        /// The token the append carried.
        given: String,
        /// The stream's current token (empty: none set).
        current: String,
    },
    /// A pipelined batch not written because an earlier batch of its
    /// pipeline failed.
    #[error("not written: an earlier batch of this append pipeline failed")]
    PipelineStopped,
    /// Other servers kept appending to the stream while this server tried
    /// to (cluster mode): nothing of the batch was written.
    #[error("stream {} is being appended to through other servers, and this append lost the race {attempts} times in a row; nothing of it was written: retry it (with an idempotency key it is safe to)", shown(stream))]
    Contended {
        /// The stream.
        stream: String,
        /// How many times the append was decided again.
        attempts: u32,
    },
    /// An API key id that does not exist (for the caller's tenant).
    #[error("API key {} not found", shown(.0))]
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
    /// A write met a full disk (ENOSPC) and was rolled back: nothing of
    /// the change was written, and later writes are tried again.
    #[error("disk full: {} bytes free under {dir}; the write failed and was rolled back, so nothing of this change was written. Delete streams or tighten retention to free space; writes resume by themselves, and retrying is safe", free.map_or_else(|| "no".to_string(), |f| f.to_string()))]
    NoSpaceLeft {
        /// The data dir.
        dir: String,
        /// Free bytes right after the failure, when known.
        free: Option<u64>,
    },
    /// `--verify-on-start` found damage (the server does not start).
    #[error("--verify-on-start found damaged or missing events: {0}. Restore the data dir from a backup, or start without --verify-on-start to serve the rest (reads of the damage get DATA_LOSS)")]
    VerifyFailed(String),
    /// A storage error.
    #[error(transparent)]
    Storage(StorageError),
}

impl Error {
    /// The same error with every stream name passed through `name`: the API
    /// shows a tenant's caller its own names (`orders`), not the stored
    /// ones (`acme/orders`).
    pub fn with_stream_names(self, name: &dyn Fn(String) -> String) -> Error {
        match self {
            Error::InvalidStreamName { name: n, reason } => Error::InvalidStreamName {
                name: name(n),
                reason,
            },
            Error::StreamNotFound(s) => Error::StreamNotFound(name(s)),
            Error::StreamExists(s) => Error::StreamExists(name(s)),
            Error::ConsumerNotFound { stream, consumer } => Error::ConsumerNotFound {
                stream: name(stream),
                consumer,
            },
            Error::ConsumerSessionEnded {
                stream,
                consumer,
                reason,
            } => Error::ConsumerSessionEnded {
                stream: name(stream),
                consumer,
                reason,
            },
            Error::GroupNotFound { stream, group } => Error::GroupNotFound {
                stream: name(stream),
                group,
            },
            Error::MemberNotFound {
                stream,
                group,
                member,
            } => Error::MemberNotFound {
                stream: name(stream),
                group,
                member,
            },
            Error::OffsetPastHead {
                stream,
                offset,
                head,
            } => Error::OffsetPastHead {
                stream: name(stream),
                offset,
                head,
            },
            Error::OffsetTrimmed {
                stream,
                offset,
                first,
            } => Error::OffsetTrimmed {
                stream: name(stream),
                offset,
                first,
            },
            Error::DataLoss { stream, first, end } => Error::DataLoss {
                stream: name(stream),
                first,
                end,
            },
            Error::WrongExpectedOffset {
                stream,
                expected,
                actual,
            } => Error::WrongExpectedOffset {
                stream: name(stream),
                expected,
                actual,
            },
            Error::IdempotencyConflict { stream, key } => Error::IdempotencyConflict {
                stream: name(stream),
                key,
            },
            Error::GroupActive {
                stream,
                group,
                members,
            } => Error::GroupActive {
                stream: name(stream),
                group,
                members,
            },
            Error::Fenced {
                stream,
                given,
                current,
            } => Error::Fenced {
                stream: name(stream),
                given,
                current,
            },
            Error::Contended { stream, attempts } => Error::Contended {
                stream: name(stream),
                attempts,
            },
            Error::InBatch { sequence, source } => Error::InBatch {
                sequence,
                source: Box::new(source.with_stream_names(name)),
            },
            other => other,
        }
    }
}

impl From<StorageError> for Error {
    /// A failed write or sync of the log (or a log refusing writes since
    /// one) is the one storage failure a client sees as such: the change
    /// may or may not have been applied, and writes stop until a restart.
    /// A write rolled back on a full disk is not: nothing was written.
    fn from(error: StorageError) -> Error {
        match error {
            StorageError::Wal(WalError::OutOfSpace { dir, free }) => Error::NoSpaceLeft {
                dir: dir.display().to_string(),
                free,
            },
            StorageError::Wal(
                WalError::WriteFailed { .. } | WalError::SyncFailed { .. } | WalError::Poisoned(_),
            ) => Error::StorageFailed(error.to_string()),
            StorageError::StreamGone { name } => Error::StreamNotFound(name),
            other => Error::Storage(other),
        }
    }
}

/// How a client's input appears in an error message: quoted, and cut to
/// its first 100 characters (then `…`), so a huge name cannot make a huge
/// status message (clients reject oversized `grpc-message` headers).
pub fn shown(input: &str) -> String {
    const MAX_CHARS: usize = 100;
    match input.char_indices().nth(MAX_CHARS) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}…", &input[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_cut_to_100_characters() {
        assert_eq!(shown("orders"), "\"orders\"");
        let long = "é".repeat(1000);
        let message = Error::StreamNotFound(long).to_string();
        assert!(message.chars().count() < 130, "{message}");
        assert!(message.contains("…"));
    }
}
