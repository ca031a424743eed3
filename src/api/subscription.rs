//! The subscription loop: one task per Subscribe call that turns a
//! cursor into responses (events, heartbeats, group assignments) and ends
//! the stream with the status that says why.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::convert::timestamp;
use super::SUBSCRIBE_RESPONSE_BYTES;
use crate::auth::{key_lost, KeyRing, Principal, SubscriptionSlot};
use crate::error::Error;
use crate::log::{self, ConsumerLease, Subscription};
use crate::metrics::ActiveSubscription;
use crate::proto as pb;
use crate::proto::encode::encode_events;

/// What one subscription delivers, and how.
pub(super) struct Delivery {
    /// The stream as the caller names it (events carry this name).
    pub(super) stream: String,
    pub(super) subscription: Subscription,
    /// The key the subscription was opened with (it ends if the key is
    /// revoked or expires), and the key's subscription slot it holds.
    pub(super) key: (Arc<KeyRing>, Principal, SubscriptionSlot),
    /// Held while subscribed as a durable consumer.
    pub(super) lease: Option<ConsumerLease>,
    /// The pinned payload version; empty for the default payload.
    pub(super) version: Bytes,
    pub(super) max_events: usize,
    /// The stream's delivered-events counter, and this subscription's
    /// place in the active count.
    pub(super) metrics: (Counter, ActiveSubscription),
}

/// Resolves when the consumer lease is lost; never without one.
pub(super) async fn lease_lost(lease: &Option<ConsumerLease>) -> Error {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

/// Drives one subscription: sends events as they become available, a
/// heartbeat when idle, and ends on error, client disconnect or shutdown.
///
/// With a filter, a poll may examine events and deliver none: the cursor
/// then moved without a response. Such progress goes out as a heartbeat
/// (no events, the new `next_offset`) when the cursor first reaches the
/// head (so a catching-up client learns at once that it has caught up) and
/// otherwise when the heartbeat interval passes, so a consumer of rare
/// events keeps an up-to-date cursor without a message per skipped event.
pub(super) async fn run_subscription(
    delivery: Delivery,
    tx: mpsc::Sender<Result<pb::SubscribeResponse, Error>>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) {
    let Delivery {
        stream,
        mut subscription,
        key: (keys, principal, _slot),
        lease,
        version,
        max_events,
        metrics: (delivered, _active),
    } = delivery;
    // A slot kept for the final status, so a client that stopped reading
    // still learns why its stream ended once it reads again (a full buffer
    // would otherwise drop it and the client would see a clean end).
    let Ok(last_word) = tx.clone().reserve_owned().await else {
        return;
    };
    // The first response goes out at once, events or not, so the client
    // knows its subscription is live.
    let mut send_now = true;
    let mut last_sent = Instant::now();
    // Whether the last response sent said "caught up".
    let mut sent_caught_up = false;
    loop {
        let before = subscription.next_offset();
        // Storage reads happen off the async workers: the poll's own, and
        // the next response's, read ahead while this one is sent.
        subscription.prepare().await;
        let slices = match subscription.poll(max_events, SUBSCRIBE_RESPONSE_BYTES) {
            Ok(slices) => slices,
            Err(error) => {
                let _ = last_word.send(Err(principal.own_error(error)));
                return;
            }
        };
        subscription.read_ahead(max_events, SUBSCRIBE_RESPONSE_BYTES);
        let moved = subscription.next_offset() != before;
        let at_head = subscription.next_offset() >= subscription.head().next_offset;
        if moved
            && slices.is_empty()
            && (last_sent.elapsed() >= heartbeat || at_head && !sent_caught_up)
        {
            send_now = true;
        }
        // A group member hears of its new slots at once.
        let assignment = subscription
            .take_group_update()
            .map(|u| pb::GroupAssignment {
                generation: u.generation,
                slots: u.slots,
                revoked_slots: u.revoked,
                slot_count: log::SLOT_COUNT as u32,
            });
        if !slices.is_empty() || send_now || assignment.is_some() {
            send_now = false;
            delivered.inc_by(slices.iter().map(|s| s.len() as u64).sum());
            last_sent = Instant::now();
            let head = subscription.head();
            sent_caught_up = subscription.next_offset() >= head.next_offset;
            let response = pb::SubscribeResponse {
                assignment,
                events: Vec::new(),
                encoded_events: encode_events(
                    &stream,
                    slices.iter().map(|s| (s.chunk.time_unix_nanos, s.events())),
                    &version,
                ),
                next_offset: subscription.next_offset(),
                head_offset: head.next_offset,
                caught_up: sent_caught_up,
                server_time: Some(timestamp(keys.now())),
            };
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() { return },
                _ = shutdown.cancelled() => {
                    let _ = last_word.send(Err(Error::ShuttingDown));
                    return;
                }
                error = lease_lost(&lease) => {
                    let _ = last_word.send(Err(principal.own_error(error)));
                    return;
                }
                error = key_lost(&keys, &principal) => {
                    let _ = last_word.send(Err(principal.own_error(error)));
                    return;
                }
            }
            if !slices.is_empty() {
                continue;
            }
        }
        if moved {
            // More to examine right away; let other tasks run between
            // polls of a long filtered scan.
            tokio::task::yield_now().await;
            continue;
        }
        let idle_until = last_sent + heartbeat;
        tokio::select! {
            _ = subscription.changed() => {}
            _ = tokio::time::sleep_until(idle_until) => send_now = true,
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = last_word.send(Err(Error::ShuttingDown));
                return;
            }
            error = lease_lost(&lease) => {
                let _ = last_word.send(Err(principal.own_error(error)));
                return;
            }
            error = key_lost(&keys, &principal) => {
                let _ = last_word.send(Err(principal.own_error(error)));
                return;
            }
        }
    }
}
