//! Cluster mode on NATS JetStream (issue 19): the pieces built so far.
//!
//! The design is in ARCHITECTURE.md ("Cluster mode on JetStream"): a
//! second engine behind the seam in `engine/`, with events in one
//! JetStream stream per Pullstream stream and every other record in one
//! replicated record stream. Built so far: the record store ([`state`])
//! and the engine for one gateway per cluster ([`engine`], chosen by
//! `serve --engine jetstream`); several gateways on one cluster are the
//! next slices (ARCHITECTURE.md lists them and today's gaps).

pub mod engine;
pub mod feed;
pub mod message;
pub mod state;

pub use engine::{JetStreamEngine, JetStreamOptions};
pub use state::{Expect, Record, StateError, StateStore, Watched};

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;

/// A name as a record key or subject token: its bytes in hex (names may
/// hold `.`, which NATS subjects split on).
pub(crate) fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// [`hex`] undone (`None` for anything it did not make).
pub(crate) fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// How long a publish whose outcome is unknown is retried (a leader
/// election takes a few seconds: 2.0 s when a 3-node cluster lost its
/// stream leader, ARCHITECTURE.md).
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Publishes and waits for the acknowledgement, retrying while the
/// cluster cannot answer (no responders during a leader election, a
/// timeout, a broken connection). Only for publishes that are safe to
/// repeat: a `Nats-Msg-Id` header, which makes a repeat of a publish that
/// did land answer `duplicate` with its sequence (checked on 2.9.10 even
/// when the repeat's `Nats-Expected-Last-Sequence` is stale), or a plain
/// overwrite.
pub(crate) async fn publish_retrying(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Result<PublishAck, PublishError> {
    publish_retrying_unless(js, subject, headers, payload, || async { false }).await
}

/// [`publish_retrying`], except that when the cluster answers that no
/// stream takes the subject, `gone` is asked whether that is for good (the
/// stream was deleted, not a leader election) and the publish is not tried
/// again when it says so.
pub(crate) async fn publish_retrying_unless<F, Fut>(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
    gone: F,
) -> Result<PublishAck, PublishError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let attempt = async {
            js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .await
        };
        match attempt.await {
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound && gone().await => {
                return Err(e)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::TimedOut
                        | PublishErrorKind::StreamNotFound
                        | PublishErrorKind::BrokenPipe
                ) && started.elapsed() < RETRY_FOR =>
            {
                tracing::debug!(error = %e, %subject, "JetStream publish not answered; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            result => return result,
        }
    }
}
