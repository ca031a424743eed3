//! Durable consumers' subscriptions across gateways: claims.
//!
//! A consumer has at most one open subscription, cluster-wide, like on one
//! server (`log/consumer.rs`): the newest one wins and the older one ends
//! with ABORTED. Within a gateway that is a lease in memory; across
//! gateways it is a *claim* record (`claim.<stream id>.<name in hex>`),
//! which the gateway opening a subscription overwrites with its id. The
//! record stream orders every write, so a claim's revision says which
//! subscription is newer, and every gateway watches the claim records
//! (an ordered consumer: none skipped) and ends its own subscription when
//! another gateway's newer claim arrives. A subscription that ends
//! releases its claim (unless a newer one replaced it), and deleting a
//! consumer writes a "deleted" claim, so subscriptions elsewhere end too.
//!
//! A gateway killed with kill -9 cannot release: its claims are taken to
//! be released once its probe record (written every second by the health
//! check) has not been seen for [`CLAIM_EXPIRY`], so a consumer does not
//! stay "active" forever. That only changes what `active` reports; a new
//! subscription takes over a claim whoever holds it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::state::{StateStore, Watched};
use crate::engine::{ClaimChange, RemoteClaim};

/// How long a gateway may go without writing its probe record before its
/// claims count as released.
pub const CLAIM_EXPIRY: Duration = Duration::from_secs(5);

/// The record key of a consumer's claim.
pub fn claim_key(stream_id: u64, consumer_hex: &str) -> String {
    format!("claim.{stream_id}.{consumer_hex}")
}

/// The record key of a gateway's probe.
pub fn probe_key(gateway_id: u64) -> String {
    format!("probe.{gateway_id}")
}

/// A claim record's value: the gateway that wrote it and what it did.
pub fn claim_value(gateway_id: u64, change: ClaimChange) -> Vec<u8> {
    let what = match change {
        ClaimChange::Taken => "taken",
        ClaimChange::Released => "released",
        ClaimChange::Deleted => "deleted",
    };
    format!("{gateway_id:016x} {what}").into_bytes()
}

fn parse_claim(value: &[u8]) -> Option<(u64, ClaimChange)> {
    let text = std::str::from_utf8(value).ok()?;
    let (gateway, what) = text.split_once(' ')?;
    let change = match what {
        "taken" => ClaimChange::Taken,
        "released" => ClaimChange::Released,
        "deleted" => ClaimChange::Deleted,
        _ => return None,
    };
    Some((u64::from_str_radix(gateway, 16).ok()?, change))
}

/// The stream name of a stream id, where this gateway knows the stream.
pub type NameOf = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Watches the claim and probe records and reports other gateways'
/// claims (see the module docs) to [`crate::engine::Engine::remote_claims`].
pub struct ClaimFeed {
    /// The record store.
    pub state: StateStore,
    /// This gateway (its own claims are not reported).
    pub gateway_id: u64,
    /// Stream names by id.
    pub name_of: NameOf,
    /// Where the claims go.
    pub found: mpsc::Sender<RemoteClaim>,
    /// Turns `consumer name in hex` back into the name.
    pub unhex: fn(&str) -> Option<String>,
}

/// A claim held by another gateway, as last seen.
struct Held {
    gateway: u64,
    revision: u64,
    /// Whether the log was told (not while this gateway did not know the
    /// stream: it is told once it does).
    reported: bool,
}

impl ClaimFeed {
    /// Runs until the log stops taking claims.
    pub async fn run(self) {
        let started = Instant::now();
        let mut held: HashMap<(u64, String), Held> = HashMap::new();
        let mut alive: HashMap<u64, Instant> = HashMap::new();
        let mut claims = None;
        let mut probes = None;
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut report = Vec::new();
            tokio::select! {
                watched = next(&mut claims), if claims.is_some() => match watched {
                    Some(Ok(watched)) => report.extend(self.claimed(&watched, &mut held)),
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::debug!(error = %e, "watching consumer claims failed; watching again");
                        }
                        claims = None;
                    }
                },
                watched = next(&mut probes), if probes.is_some() => match watched {
                    Some(Ok(watched)) => {
                        if let Some(gateway) = watched.key.strip_prefix("probe.").and_then(|g| g.parse().ok()) {
                            alive.insert(gateway, Instant::now());
                        }
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::debug!(error = %e, "watching gateway probes failed; watching again");
                        }
                        probes = None;
                    }
                },
                _ = ticks.tick() => {
                    // (Re)start the watches that are not running.
                    if claims.is_none() {
                        claims = self.state.watch("claim", true).await.ok();
                    }
                    if probes.is_none() {
                        probes = self.state.watch("probe", false).await.ok();
                    }
                    let now = Instant::now();
                    let live = |gateway: &u64| match alive.get(gateway) {
                        Some(seen) => now.duration_since(*seen) < CLAIM_EXPIRY,
                        None => now.duration_since(started) < CLAIM_EXPIRY,
                    };
                    held.retain(|(stream_id, consumer), claim| {
                        if !live(&claim.gateway) {
                            if claim.reported {
                                report.extend(self.report(*stream_id, consumer, claim.revision, ClaimChange::Released));
                            }
                            return false;
                        }
                        if !claim.reported {
                            let told = self.report(*stream_id, consumer, claim.revision, ClaimChange::Taken);
                            claim.reported = told.is_some();
                            report.extend(told);
                        }
                        true
                    });
                }
            }
            for claim in report {
                if self.found.send(claim).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A claim record's write: the claim to report, if another gateway
    /// made it.
    fn claimed(
        &self,
        watched: &Watched,
        held: &mut HashMap<(u64, String), Held>,
    ) -> Option<RemoteClaim> {
        let mut parts = watched.key.splitn(3, '.');
        let (_, stream_id, consumer) = (parts.next()?, parts.next()?, parts.next()?);
        let stream_id: u64 = stream_id.parse().ok()?;
        let consumer = (self.unhex)(consumer)?;
        let (gateway, change) = if watched.deleted {
            (0, ClaimChange::Released)
        } else {
            parse_claim(&watched.value)?
        };
        let key = (stream_id, consumer);
        if gateway == self.gateway_id {
            // This gateway's own claim: its leases already know.
            held.remove(&key);
            return None;
        }
        let report = self.report(key.0, &key.1, watched.revision, change);
        match change {
            ClaimChange::Taken => {
                held.insert(
                    key,
                    Held {
                        gateway,
                        revision: watched.revision,
                        reported: report.is_some(),
                    },
                );
            }
            ClaimChange::Released | ClaimChange::Deleted => {
                held.remove(&key);
            }
        }
        report
    }

    fn report(
        &self,
        stream_id: u64,
        consumer: &str,
        revision: u64,
        change: ClaimChange,
    ) -> Option<RemoteClaim> {
        Some(RemoteClaim {
            stream: (self.name_of)(stream_id)?,
            stream_id,
            consumer: consumer.to_string(),
            revision,
            change,
        })
    }
}

async fn next(
    watch: &mut Option<
        futures_util::stream::BoxStream<'static, Result<Watched, super::state::StateError>>,
    >,
) -> Option<Result<Watched, super::state::StateError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_values_read_back() {
        for change in [
            ClaimChange::Taken,
            ClaimChange::Released,
            ClaimChange::Deleted,
        ] {
            assert_eq!(
                parse_claim(&claim_value(0xfeed, change)),
                Some((0xfeed, change))
            );
        }
        assert_eq!(parse_claim(b"nonsense"), None);
        assert_eq!(parse_claim(b"00ff grabbed"), None);
    }
}
