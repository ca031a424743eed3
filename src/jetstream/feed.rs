//! What other gateways change in durable consumers' subscriptions and in
//! consumer groups' membership, watched by every gateway.
//!
//! **Claims.** A consumer has at most one open subscription, cluster-wide,
//! like on one server (`log/consumer.rs`): the newest one wins and the
//! older one ends with ABORTED. Within a gateway that is a lease in
//! memory; across gateways it is a *claim* record (`claim.<stream
//! id>.<name in hex>`), which the gateway opening a subscription
//! overwrites with its id. The record stream orders every write, so a
//! claim's revision says which subscription is newer, and every gateway
//! watches the claim records (an ordered consumer: none skipped) and ends
//! its own subscription when another gateway's newer claim arrives. A
//! subscription that ends releases its claim (unless a newer one replaced
//! it), and deleting a consumer writes a "deleted" claim, so subscriptions
//! elsewhere end too.
//!
//! **Groups.** Each connected member of a group is a record
//! (`member.<stream id>.<group in hex>.<member in hex>`, written when it
//! joins, deleted when it leaves), and the group's slot assignment is
//! one more (`assign.<stream id>.<group in hex>`), changed only by
//! compare-and-set (`log/group.rs` decides it). Every gateway watches
//! both, so all of them see one membership and follow one assignment; a
//! deleted group record (`group.…`) ends the group's members everywhere.
//!
//! **Streams.** A stream's registry record (`stream.<name in hex>`) is
//! watched too: its deletion through another gateway ends the stream
//! here (after reading the record again: a stream made again under the
//! name since is not the one deleted), and a change of its retention
//! policy is taken in.
//!
//! A gateway killed with kill -9 cannot release or leave: its claims and
//! members are taken to be gone once its probe record (written every
//! second by the health check) has not been seen for [`GONE_AFTER`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::state::{StateError, StateStore, Watched};
use super::{hex, unhex};
use crate::engine::{Assignment, ClaimChange, RemoteChange, RemoteClaim, StreamMeta};

/// How long a gateway may go without writing its probe record before its
/// claims and group members count as gone.
pub const GONE_AFTER: Duration = Duration::from_secs(5);

/// The record key of a consumer's claim.
pub fn claim_key(stream_id: u64, consumer_hex: &str) -> String {
    format!("claim.{stream_id}.{consumer_hex}")
}

/// The record key of a group member.
pub fn member_key(stream_id: u64, group_hex: &str, member_hex: &str) -> String {
    format!("member.{stream_id}.{group_hex}.{member_hex}")
}

/// The record key of a group's assignment.
pub fn assignment_key(stream_id: u64, group_hex: &str) -> String {
    format!("assign.{stream_id}.{group_hex}")
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

/// A member record's value: the gateway it is connected to.
pub fn member_value(gateway_id: u64) -> Vec<u8> {
    format!("{gateway_id:016x} joined").into_bytes()
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

/// The gateway a member record says the member joined at.
pub(super) fn parse_member(value: &[u8]) -> Option<u64> {
    let gateway = std::str::from_utf8(value).ok()?.strip_suffix(" joined")?;
    u64::from_str_radix(gateway, 16).ok()
}

/// Encodes an assignment: its generation, its members (`hex@revision`,
/// space-separated) and each slot's owner (an index into the members, or
/// `-`), one line each.
pub fn encode_assignment(assignment: &Assignment) -> Vec<u8> {
    let members: Vec<String> = assignment
        .members
        .iter()
        .map(|(id, revision)| format!("{}@{revision}", hex(id)))
        .collect();
    let owners: Vec<String> = assignment
        .owners
        .iter()
        .map(|owner| {
            owner
                .as_ref()
                .and_then(|id| assignment.members.iter().position(|(m, _)| m == id))
                .map_or("-".to_string(), |i| i.to_string())
        })
        .collect();
    let left: Vec<String> = assignment
        .left
        .iter()
        .map(|(id, revision)| format!("{}@{revision}", hex(id)))
        .collect();
    format!(
        "{}\n{}\n{}\n{}",
        assignment.generation,
        members.join(" "),
        owners.join(","),
        left.join(" ")
    )
    .into_bytes()
}

/// Decodes [`encode_assignment`]'s output.
pub fn decode_assignment(value: &[u8]) -> Option<Assignment> {
    let text = std::str::from_utf8(value).ok()?;
    let mut lines = text.split('\n');
    let generation = lines.next()?.parse().ok()?;
    let named = |line: &str| -> Option<Vec<(String, u64)>> {
        line.split(' ')
            .filter(|m| !m.is_empty())
            .map(|m| {
                let (id, revision) = m.split_once('@')?;
                Some((unhex(id)?, revision.parse().ok()?))
            })
            .collect()
    };
    let members = named(lines.next()?)?;
    let owners = lines
        .next()?
        .split(',')
        .map(|o| match o {
            "-" => Some(None),
            i => Some(Some(members.get(i.parse::<usize>().ok()?)?.0.clone())),
        })
        .collect::<Option<_>>()?;
    let left = named(lines.next().unwrap_or_default())?;
    Some(Assignment {
        generation,
        members,
        owners,
        left,
    })
}

/// The stream name of a stream id, where this gateway knows the stream.
pub type NameOf = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// The id of the stream of a name this gateway serves.
pub type IdOf = Arc<dyn Fn(&str) -> Option<u64> + Send + Sync>;

/// Forgets a deleted stream's id (the engine's index of its messages).
pub type Forget = Arc<dyn Fn(u64) + Send + Sync>;

/// Watches the claim, member, assignment, group and probe records and
/// reports other gateways' changes (see the module docs) to
/// [`crate::engine::Engine::remote_changes`].
pub struct RecordFeed {
    /// The record store.
    pub state: StateStore,
    /// This gateway (its own claims and members are not reported).
    pub gateway_id: u64,
    /// Stream names by id.
    pub name_of: NameOf,
    /// Stream ids by name.
    pub id_of: IdOf,
    /// Called for a stream deleted through another gateway.
    pub forget: Forget,
    /// Where the changes go.
    pub found: mpsc::Sender<RemoteChange>,
}

/// A claim or member another gateway holds, as last seen.
struct Held {
    gateway: u64,
    revision: u64,
    /// Whether the log was told (not while this gateway did not know the
    /// stream: it is told once it does).
    reported: bool,
}

type Watch = futures_util::stream::BoxStream<'static, Result<Watched, StateError>>;

/// The record kinds watched, by key prefix, and whether each watch starts
/// with every record's current write.
const WATCHED: [(&str, bool); 6] = [
    ("stream", true),
    ("claim", true),
    ("member", true),
    ("assign", true),
    ("group", true),
    ("probe", false),
];

impl RecordFeed {
    /// Runs until the log stops taking changes.
    pub async fn run(self) {
        let started = Instant::now();
        // By record key.
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut alive: HashMap<u64, Instant> = HashMap::new();
        let mut watches: Vec<Option<Watch>> = WATCHED.iter().map(|_| None).collect();
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut report = Vec::new();
            tokio::select! {
                (i, watched) = next_of(&mut watches) => match watched {
                    Some(Ok(watched)) if WATCHED[i].0 == "probe" => {
                        if let Some(gateway) = watched.key.strip_prefix("probe.").and_then(|g| g.parse().ok()) {
                            alive.insert(gateway, Instant::now());
                        }
                    }
                    Some(Ok(watched)) if WATCHED[i].0 == "stream" => report.extend(self.stream_changed(&watched).await),
                    Some(Ok(watched)) => report.extend(self.seen(&watched, &mut held)),
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::debug!(error = %e, records = WATCHED[i].0, "watching records failed; watching again");
                        }
                        watches[i] = None;
                    }
                },
                _ = ticks.tick() => {
                    // (Re)start the watches that are not running.
                    for (i, (prefix, current_first)) in WATCHED.iter().enumerate() {
                        if watches[i].is_none() {
                            watches[i] = self.state.watch(prefix, *current_first).await.ok();
                        }
                    }
                    let now = Instant::now();
                    let live = |gateway: &u64| match alive.get(gateway) {
                        Some(seen) => now.duration_since(*seen) < GONE_AFTER,
                        None => now.duration_since(started) < GONE_AFTER,
                    };
                    held.retain(|key, h| {
                        if !live(&h.gateway) {
                            if h.reported {
                                report.extend(self.change(key, h.revision, false));
                            }
                            return false;
                        }
                        if !h.reported {
                            let told = self.change(key, h.revision, true);
                            h.reported = told.is_some();
                            report.extend(told);
                        }
                        true
                    });
                }
            }
            for change in report {
                if self.found.send(change).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A stream record's write: a deletion of a stream this gateway
    /// serves (checked by reading the record again), or its retention.
    async fn stream_changed(&self, watched: &Watched) -> Option<RemoteChange> {
        let name = unhex(watched.key.strip_prefix("stream.")?)?;
        let served = (self.id_of)(&name)?;
        if !watched.deleted {
            let meta = StreamMeta::decode(&watched.value).ok()?;
            return (meta.id == served).then_some(RemoteChange::StreamRetention {
                stream: name,
                stream_id: served,
                retention: meta.retention,
            });
        }
        // A name deleted and made again: only the stream it no longer names
        // is gone. (Unanswered: it is gone for now, as the write said.)
        if let Ok(Some(now)) = self.state.get(&watched.key).await {
            if StreamMeta::decode(&now.value).is_ok_and(|meta| meta.id == served) {
                return None;
            }
        }
        (self.forget)(served);
        Some(RemoteChange::StreamDeleted {
            stream: name,
            stream_id: served,
        })
    }

    /// A watched write: the change to report, if there is one.
    fn seen(&self, watched: &Watched, held: &mut HashMap<String, Held>) -> Option<RemoteChange> {
        let kind = watched.key.split('.').next()?;
        match kind {
            "claim" | "member" => {
                let (gateway, taken) = if watched.deleted {
                    (0, false)
                } else if kind == "claim" {
                    let (gateway, change) = parse_claim(&watched.value)?;
                    if change == ClaimChange::Deleted && gateway != self.gateway_id {
                        held.remove(&watched.key);
                        return self.claim(&watched.key, watched.revision, ClaimChange::Deleted);
                    }
                    (gateway, change == ClaimChange::Taken)
                } else {
                    (parse_member(&watched.value)?, true)
                };
                if gateway == self.gateway_id {
                    // This gateway's own write: its leases already know.
                    held.remove(&watched.key);
                    return None;
                }
                let report = self.change(&watched.key, watched.revision, taken);
                if taken {
                    held.insert(
                        watched.key.clone(),
                        Held {
                            gateway,
                            revision: watched.revision,
                            reported: report.is_some(),
                        },
                    );
                } else {
                    held.remove(&watched.key);
                }
                report
            }
            "assign" if !watched.deleted => {
                let (stream_id, stream, group) = self.group_of(&watched.key)?;
                Some(RemoteChange::Assignment {
                    stream,
                    stream_id,
                    group,
                    assignment: decode_assignment(&watched.value)?,
                    revision: watched.revision,
                })
            }
            "group" if watched.deleted => {
                let (stream_id, stream, group) = self.group_of(&watched.key)?;
                Some(RemoteChange::GroupDeleted {
                    stream,
                    stream_id,
                    group,
                })
            }
            _ => None,
        }
    }

    /// `<kind>.<stream id>.<group in hex>…`: the stream and the group.
    fn group_of(&self, key: &str) -> Option<(u64, String, String)> {
        let mut parts = key.split('.');
        let (_, stream_id, group) = (parts.next()?, parts.next()?, parts.next()?);
        let stream_id: u64 = stream_id.parse().ok()?;
        Some((stream_id, (self.name_of)(stream_id)?, unhex(group)?))
    }

    /// A claim taken or given up, or a member joined or gone, by key.
    fn change(&self, key: &str, revision: u64, taken: bool) -> Option<RemoteChange> {
        if key.starts_with("claim.") {
            let change = if taken {
                ClaimChange::Taken
            } else {
                ClaimChange::Released
            };
            return self.claim(key, revision, change);
        }
        let (stream_id, stream, group) = self.group_of(key)?;
        let member = unhex(key.rsplit('.').next()?)?;
        Some(RemoteChange::Member {
            stream,
            stream_id,
            group,
            member,
            revision,
            joined: taken,
        })
    }

    fn claim(&self, key: &str, revision: u64, change: ClaimChange) -> Option<RemoteChange> {
        let mut parts = key.splitn(3, '.');
        let (_, stream_id, consumer) = (parts.next()?, parts.next()?, parts.next()?);
        let stream_id: u64 = stream_id.parse().ok()?;
        Some(RemoteChange::Claim(RemoteClaim {
            stream: (self.name_of)(stream_id)?,
            stream_id,
            consumer: unhex(consumer)?,
            revision,
            change,
        }))
    }
}

/// The next write any running watch sees, with the watch's index (pends
/// while none runs).
async fn next_of(watches: &mut [Option<Watch>]) -> (usize, Option<Result<Watched, StateError>>) {
    let running: Vec<_> = watches
        .iter_mut()
        .enumerate()
        .filter_map(|(i, w)| {
            w.as_mut()
                .map(|w| Box::pin(async move { (i, w.next().await) }))
        })
        .collect();
    if running.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(running).await.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_and_member_values_read_back() {
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
        assert_eq!(parse_member(&member_value(0xbeef)), Some(0xbeef));
        assert_eq!(parse_member(b"00ff left"), None);
    }

    #[test]
    fn assignments_read_back() {
        let assignment = Assignment {
            generation: 7,
            members: vec![("a.b".into(), 3), ("c".into(), 9)],
            left: vec![("gone".into(), 2)],
            owners: (0..256)
                .map(|s| match s % 3 {
                    0 => Some("a.b".to_string()),
                    1 => Some("c".to_string()),
                    _ => None,
                })
                .collect(),
        };
        let encoded = encode_assignment(&assignment);
        assert_eq!(decode_assignment(&encoded), Some(assignment));
        let empty = Assignment {
            generation: 1,
            members: vec![],
            owners: vec![None; 256],
            left: vec![],
        };
        assert_eq!(decode_assignment(&encode_assignment(&empty)), Some(empty));
        assert_eq!(decode_assignment(b"1\nzz@1\n0"), None);
        assert_eq!(decode_assignment(b"1\n\n5"), None);
    }
}
