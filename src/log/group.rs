//! Key-shared consumer groups (after Apache Pulsar's Key_Shared
//! subscriptions): one ordered stream, many workers, each key handled by
//! one worker at a time, in offset order.
//!
//! A stream's events fall into [`SLOT_COUNT`] slots by a hash of their key
//! (keyless events by a hash of their offset). Each slot belongs to one connected member;
//! membership changes rebalance the slots (stickily: a slot stays with its
//! member when it can). Progress is durable per slot: `committed[s]` is the
//! offset below which slot `s`'s events are handled, and a member given a
//! slot resumes it exactly there, so nothing is skipped, and what was
//! delivered but not committed is delivered again, in key order.
//!
//! Handover: a rebalance first tells the old owner (its subscription stream
//! gets the revoked slots) and the new owner waits until the old owner's
//! stream has sent that message, or [`HANDOVER_WAIT`], before it reads the
//! slot's committed offset and starts delivering it. A worker that stops
//! handling a revoked slot's events when told, and commits, therefore
//! hands its keys over without overlap; one that does not may still be
//! handling a key when the new owner starts it (at-least-once either way).
//!
//! Each member reads the stream from its own position and keeps only its
//! slots' events. Invariant, per member and per slot it has adopted: every
//! event of the slot in `[committed[s], delivered)` was delivered to it.
//! A commit therefore moves each adopted slot to `min(next_offset,
//! delivered)`; slots assigned but not yet adopted are left alone. The
//! group state lives with the stream (changed under one lock) and its
//! committed offsets are written by the stream's writer, like consumer
//! cursors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use super::command::{GroupChange, WriterCommand};
use super::consumer::validate_label;
use super::{Log, StartAt, StreamShared};
use crate::engine::{EventRecord, GroupRecord};
use crate::error::Error;

/// The number of slots a stream is split into.
pub const SLOT_COUNT: usize = 256;

/// How long a new owner waits for the old owner to be told a slot moved.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// The slot of an event: its key's hash, or its offset's hash when
/// keyless (hashed, so consecutive keyless events spread over members
/// rather than going in runs to whoever owns a range of slots).
pub fn slot_of(key: &[u8], offset: u64) -> usize {
    let hash = if key.is_empty() {
        xxh3_64(&offset.to_le_bytes())
    } else {
        xxh3_64(key)
    };
    (hash % SLOT_COUNT as u64) as usize
}

/// A group in memory.
pub(crate) struct GroupState {
    /// The durable part: committed offset per slot.
    pub(crate) record: GroupRecord,
    /// Slot → owning member id.
    owner: Vec<Option<String>>,
    members: BTreeMap<String, MemberState>,
    generation: u64,
    /// Per slot: the "told" generation of the member that delivered it
    /// last, while the slot moves away from it.
    handover: Vec<Option<Arc<AtomicU64>>>,
}

struct MemberState {
    lease: u64,
    /// Cancelled when a newer subscription of the same member takes over.
    token: CancellationToken,
    /// Nudged with the generation at every rebalance.
    nudge: watch::Sender<u64>,
    /// The offset below which every event of its adopted slots was
    /// delivered.
    delivered: Arc<AtomicU64>,
    /// The last generation its client was told about.
    told: Arc<AtomicU64>,
    /// Slots it has started delivering (see the module docs).
    adopted: Vec<bool>,
}

impl GroupState {
    pub(crate) fn new(record: GroupRecord) -> GroupState {
        GroupState {
            record,
            owner: vec![None; SLOT_COUNT],
            members: BTreeMap::new(),
            generation: 0,
            handover: vec![None; SLOT_COUNT],
        }
    }

    /// Spreads the slots over the members as evenly as possible, keeping
    /// each slot with its owner when the owner's share allows, and tells
    /// every member.
    fn rebalance(&mut self) {
        let ids: Vec<String> = self.members.keys().cloned().collect();
        let n = ids.len();
        let mut counts: BTreeMap<&str, usize> = ids.iter().map(|m| (m.as_str(), 0)).collect();
        let quota = |i: usize| {
            SLOT_COUNT
                .checked_div(n)
                .map_or(0, |base| base + usize::from(i < SLOT_COUNT % n))
        };
        let quota_of = |id: &str| ids.iter().position(|m| m == id).map_or(0, quota);
        for owner in self.owner.iter_mut() {
            let keep = owner
                .as_deref()
                .is_some_and(|id| counts.get(id).is_some_and(|&count| count < quota_of(id)));
            if keep {
                *counts
                    .get_mut(owner.as_deref().unwrap_or_default())
                    .expect("member") += 1;
            } else {
                *owner = None;
            }
        }
        for owner in self.owner.iter_mut().filter(|o| o.is_none()) {
            if let Some((_, id)) = ids
                .iter()
                .enumerate()
                .find(|(i, id)| counts[id.as_str()] < quota(*i))
            {
                *counts.get_mut(id.as_str()).expect("member") += 1;
                *owner = Some(id.clone());
            }
        }
        // A slot leaving a member that delivered it waits, at its new owner,
        // until that member's client has been told.
        for (id, member) in &mut self.members {
            for (slot, adopted) in member.adopted.iter_mut().enumerate() {
                if *adopted && self.owner[slot].as_deref() != Some(id) {
                    *adopted = false;
                    self.handover[slot] = Some(member.told.clone());
                }
            }
        }
        self.generation += 1;
        for member in self.members.values() {
            let _ = member.nudge.send(self.generation);
        }
    }

    /// The lowest committed offset over all slots.
    pub(crate) fn low_watermark(&self) -> u64 {
        self.record.committed.iter().copied().min().unwrap_or(0)
    }

    pub(crate) fn has_members(&self) -> bool {
        !self.members.is_empty()
    }

    fn slots_of(&self, member: &str) -> Vec<u32> {
        (0..SLOT_COUNT)
            .filter(|&s| self.owner[s].as_deref() == Some(member))
            .map(|s| s as u32)
            .collect()
    }
}

/// What a group change writes.
pub(crate) enum GroupWrite {
    /// The group's new record.
    Put(GroupRecord),
    /// The group's removal.
    Remove,
}

/// A description of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Connected members in id order: id, slots, committed offset
    /// (lowest of its slots), delivered offset.
    pub members: Vec<GroupMemberInfo>,
    /// The lowest committed offset over all slots.
    pub low_watermark: u64,
    /// The stream's head.
    pub head: u64,
    /// Creation time.
    pub created_unix_nanos: i64,
    /// Rebalance generation.
    pub generation: u64,
}

/// A connected member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMemberInfo {
    /// Its id.
    pub member: String,
    /// Its slots, ascending.
    pub slots: Vec<u32>,
    /// The lowest committed offset of its slots (the head when it has none).
    pub committed: u64,
    /// Where its delivery stands.
    pub delivered: u64,
}

/// Applies a group change to the stream's groups. Returns what to write,
/// or `None` when nothing changes.
pub(crate) fn apply_change(
    shared: &StreamShared,
    stream: &str,
    name: &str,
    change: &GroupChange,
    now_unix_nanos: i64,
    max_groups: usize,
) -> Result<Option<GroupWrite>, Error> {
    let mut groups = shared.groups.lock().expect("groups lock");
    match change {
        GroupChange::Create { start } => {
            if groups.contains_key(name) {
                return Ok(None);
            }
            if groups.len() >= max_groups {
                return Err(Error::ResourceExhausted(format!(
                    "stream {} already has {} consumer groups, the most allowed (--max-groups-per-stream {max_groups}): delete groups it no longer needs",
                    crate::error::shown(stream),
                    groups.len()
                )));
            }
            let record = GroupRecord {
                created_unix_nanos: now_unix_nanos,
                committed: vec![*start; SLOT_COUNT],
            };
            groups.insert(name.to_string(), GroupState::new(record.clone()));
            Ok(Some(GroupWrite::Put(record)))
        }
        GroupChange::Reset { offset } => {
            let group = groups
                .get_mut(name)
                .ok_or_else(|| group_not_found(stream, name))?;
            if group.has_members() {
                return Err(Error::GroupActive {
                    stream: stream.to_string(),
                    group: name.to_string(),
                    members: group.members.keys().cloned().collect(),
                });
            }
            group.record.committed = vec![*offset; SLOT_COUNT];
            Ok(Some(GroupWrite::Put(group.record.clone())))
        }
        GroupChange::Delete => {
            let group = groups
                .remove(name)
                .ok_or_else(|| group_not_found(stream, name))?;
            for member in group.members.values() {
                member.token.cancel();
            }
            Ok(Some(GroupWrite::Remove))
        }
        GroupChange::Commit {
            member,
            next_offset,
        } => {
            let group = groups
                .get_mut(name)
                .ok_or_else(|| group_not_found(stream, name))?;
            let state = group
                .members
                .get(member)
                .ok_or_else(|| member_not_found(stream, name, member))?;
            let limit = (*next_offset).min(state.delivered.load(Ordering::Acquire));
            let mut changed = false;
            for slot in 0..SLOT_COUNT {
                if state.adopted[slot] && group.record.committed[slot] < limit {
                    group.record.committed[slot] = limit;
                    changed = true;
                }
            }
            Ok(changed.then(|| GroupWrite::Put(group.record.clone())))
        }
    }
}

fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_string(),
        group: group.to_string(),
    }
}

fn member_not_found(stream: &str, group: &str, member: &str) -> Error {
    Error::MemberNotFound {
        stream: stream.to_string(),
        group: group.to_string(),
        member: member.to_string(),
    }
}

/// What a member's client is told when its slots change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupUpdate {
    /// The rebalance generation.
    pub generation: u64,
    /// The slots it owns now.
    pub slots: Vec<u32>,
    /// The slots it lost.
    pub revoked: Vec<u32>,
}

/// A slot assigned to this member but not started yet: it waits for the
/// previous owner to be told (or for the handover deadline).
struct Pending {
    slot: usize,
    generation: u64,
    /// The previous owner's "told" generation, when it is connected.
    previous: Option<Arc<AtomicU64>>,
    deadline: Instant,
}

/// A member's view of its group, kept by its subscription: which slots it
/// delivers, and from where.
pub struct GroupCursor {
    shared: Arc<StreamShared>,
    stream: String,
    group: String,
    member: String,
    lease: u64,
    token: CancellationToken,
    nudges: watch::Receiver<u64>,
    delivered: Arc<AtomicU64>,
    told: Arc<AtomicU64>,
    generation: u64,
    /// Per slot: delivering it, from this offset on.
    from: Vec<Option<u64>>,
    pending: Vec<Pending>,
    /// Not yet sent to the client.
    update: Option<GroupUpdate>,
}

impl GroupCursor {
    /// The error ending this member's subscription: its group was deleted,
    /// or a newer subscription of the member took over. (Takes `deleted`
    /// rather than looking, as callers may hold the groups lock.)
    fn session_ended(&self, deleted: bool) -> Error {
        Error::ConsumerSessionEnded {
            stream: self.stream.clone(),
            consumer: format!("{}/{}", self.group, self.member),
            reason: if deleted {
                "ended: the group was deleted"
            } else {
                "was taken over by a newer subscription of the same group member"
            },
        }
    }

    /// Takes in a rebalance, if one happened, and starts the pending slots
    /// whose handover is done. Returns the offset to rewind to when a
    /// started slot's committed offset lies below `position`.
    pub(crate) fn refresh(&mut self, position: u64) -> Result<Option<u64>, Error> {
        let mut groups = self.shared.groups.lock().expect("groups lock");
        let Some(group) = groups.get_mut(&self.group) else {
            return Err(self.session_ended(true));
        };
        if self.token.is_cancelled() {
            return Err(self.session_ended(false));
        }
        if group.generation != self.generation {
            self.generation = group.generation;
            let owned = group.slots_of(&self.member);
            let mut revoked = Vec::new();
            for slot in 0..SLOT_COUNT {
                let mine = group.owner[slot].as_deref() == Some(&self.member);
                let had = self.from[slot].is_some() || self.pending.iter().any(|p| p.slot == slot);
                if had && !mine {
                    self.from[slot] = None;
                    self.pending.retain(|p| p.slot != slot);
                    revoked.push(slot as u32);
                }
                if mine && !had {
                    self.pending.push(Pending {
                        slot,
                        generation: self.generation,
                        previous: group.handover[slot].clone(),
                        deadline: Instant::now() + HANDOVER_WAIT,
                    });
                }
            }
            self.update = Some(GroupUpdate {
                generation: self.generation,
                slots: owned,
                revoked,
            });
        }
        let Some(me) = group.members.get_mut(&self.member) else {
            return Err(self.session_ended(false));
        };
        if me.lease != self.lease {
            return Err(self.session_ended(false));
        }
        let now = Instant::now();
        let mut rewind: Option<u64> = None;
        let mut started = Vec::new();
        self.pending.retain(|p| {
            let handed_over = p
                .previous
                .as_ref()
                .is_none_or(|told| told.load(Ordering::Acquire) >= p.generation);
            if handed_over || now >= p.deadline {
                started.push(p.slot);
                false
            } else {
                true
            }
        });
        for &slot in &started {
            group.handover[slot] = None;
            let committed = group.record.committed[slot];
            self.from[slot] = Some(committed);
            me.adopted[slot] = true;
            if committed < position {
                rewind = Some(rewind.map_or(committed, |r| r.min(committed)));
            }
        }
        if let Some(to) = rewind {
            // Slots delivered before the rewind keep their progress.
            for slot in 0..SLOT_COUNT {
                if let Some(from) = &mut self.from[slot] {
                    if !started.contains(&slot) {
                        *from = (*from).max(position);
                    }
                }
            }
            me.delivered.fetch_min(to, Ordering::AcqRel);
        }
        Ok(rewind)
    }

    /// Whether the event at `offset` is this member's to deliver: its slot
    /// is started here, and the offset is at or past the slot's start.
    pub(crate) fn selects(&self, offset: u64, record: &EventRecord) -> bool {
        let slot = slot_of(&record.key, offset);
        self.from[slot].is_some_and(|from| offset >= from)
    }

    /// Records that every event of its started slots below `position` was
    /// delivered.
    pub(crate) fn delivered(&self, position: u64) {
        self.delivered.store(position, Ordering::Release);
    }

    /// The change of slots to tell the client, once; marks it told.
    pub fn take_update(&mut self) -> Option<GroupUpdate> {
        let update = self.update.take()?;
        self.told.store(update.generation, Ordering::Release);
        Some(update)
    }

    /// Resolves when [`GroupCursor::refresh`] has something to do: a
    /// rebalance, a takeover, or a pending handover to check on.
    pub(crate) async fn changed(&mut self) {
        if !self.pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        tokio::select! {
            _ = self.token.cancelled() => {}
            changed = self.nudges.changed() => {
                if changed.is_err() {
                    // The member was replaced, and its token is (being)
                    // cancelled: refresh reports it then.
                    self.token.cancelled().await;
                }
            }
        }
    }
}

impl Drop for GroupCursor {
    fn drop(&mut self) {
        // Gone: nothing to wait for before its slots move on.
        self.told.store(u64::MAX, Ordering::Release);
        let mut groups = self.shared.groups.lock().expect("groups lock");
        if let Some(group) = groups.get_mut(&self.group) {
            if group
                .members
                .get(&self.member)
                .is_some_and(|m| m.lease == self.lease)
            {
                group.members.remove(&self.member);
                group.rebalance();
            }
        }
    }
}

impl Log {
    /// Joins `member` to `group` on a stream, creating the group (every
    /// slot at `start`) when missing. A connected member of the same id is
    /// taken over. The cursor starts with no slot; its first refresh takes
    /// in its assignment.
    pub(crate) async fn join_group(
        &self,
        stream_name: &str,
        group: &str,
        member: &str,
        start: StartAt,
    ) -> Result<GroupCursor, Error> {
        validate_label("group name", group)?;
        validate_label("member id", member)?;
        let stream = self.get(stream_name)?;
        let exists = stream
            .shared
            .groups
            .lock()
            .expect("groups lock")
            .contains_key(group);
        if !exists {
            let start = self.resolve_start(stream_name, start)?;
            self.change_group(stream_name, group, GroupChange::Create { start })
                .await?;
        }
        let mut groups = stream.shared.groups.lock().expect("groups lock");
        let state = groups
            .get_mut(group)
            .ok_or_else(|| group_not_found(&stream.name, group))?;
        let max = self.config.limits.max_members_per_group;
        if !state.members.contains_key(member) && state.members.len() >= max {
            return Err(Error::ResourceExhausted(format!(
                "group {} of stream {} already has {} members, the most allowed (--max-members-per-group {max})",
                crate::error::shown(group),
                crate::error::shown(&stream.name),
                state.members.len()
            )));
        }
        if let Some(old) = state.members.get(member) {
            old.token.cancel();
        }
        let lease = stream.shared.leases.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let (nudge, nudges) = watch::channel(0);
        let delivered = Arc::new(AtomicU64::new(0));
        let told = Arc::new(AtomicU64::new(0));
        state.members.insert(
            member.to_string(),
            MemberState {
                lease,
                token: token.clone(),
                nudge,
                delivered: delivered.clone(),
                told: told.clone(),
                adopted: vec![false; SLOT_COUNT],
            },
        );
        state.rebalance();
        drop(groups);
        Ok(GroupCursor {
            shared: stream.shared.clone(),
            stream: stream.name.clone(),
            group: group.to_string(),
            member: member.to_string(),
            lease,
            token,
            nudges,
            delivered,
            told,
            generation: 0,
            from: vec![None; SLOT_COUNT],
            pending: Vec::new(),
            update: None,
        })
    }

    /// Commits a member's progress (see [`GroupChange::Commit`]).
    pub async fn commit_group(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        next_offset: u64,
    ) -> Result<GroupInfo, Error> {
        self.change_group(
            stream,
            group,
            GroupChange::Commit {
                member: member.to_string(),
                next_offset,
            },
        )
        .await?;
        self.group_info(stream, group)
    }

    async fn change_group(
        &self,
        stream: &str,
        group: &str,
        change: GroupChange,
    ) -> Result<(), Error> {
        let stream = self.get(stream)?;
        let (reply, reply_rx) = oneshot::channel();
        self.ask_writer(
            &stream,
            WriterCommand::Group {
                name: group.to_string(),
                change,
                reply,
            },
            reply_rx,
        )
        .await
    }

    /// Moves every slot of a group without connected members to `to`.
    pub async fn reset_group(
        &self,
        stream: &str,
        group: &str,
        to: StartAt,
    ) -> Result<GroupInfo, Error> {
        validate_label("group name", group)?;
        let offset = self.resolve_start(stream, to)?;
        self.change_group(stream, group, GroupChange::Reset { offset })
            .await?;
        self.group_info(stream, group)
    }

    /// Lists a stream's groups in name order: at most `limit`, those
    /// whose names sort after `after` (empty: from the first).
    pub fn list_groups(
        &self,
        stream: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<GroupInfo>, Error> {
        let names: Vec<String> = {
            let shared = &self.get(stream)?.shared;
            let groups = shared.groups.lock().expect("groups lock");
            groups
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(limit)
                .map(|(name, _)| name.clone())
                .collect()
        };
        Ok(names
            .iter()
            // A group deleted in between is left out.
            .filter_map(|name| self.group_info(stream, name).ok())
            .collect())
    }

    /// Deletes a group: its committed offsets go, and its members'
    /// subscriptions end with ABORTED.
    pub async fn delete_group(&self, stream: &str, group: &str) -> Result<(), Error> {
        validate_label("group name", group)?;
        self.change_group(stream, group, GroupChange::Delete).await
    }

    /// Describes a group.
    pub fn group_info(&self, stream: &str, group: &str) -> Result<GroupInfo, Error> {
        validate_label("group name", group)?;
        let stream = self.get(stream)?;
        let head = stream.shared.head().next_offset;
        let groups = stream.shared.groups.lock().expect("groups lock");
        let state = groups
            .get(group)
            .ok_or_else(|| group_not_found(&stream.name, group))?;
        let members = state
            .members
            .iter()
            .map(|(id, m)| {
                let slots = state.slots_of(id);
                let committed = slots
                    .iter()
                    .map(|&s| state.record.committed[s as usize])
                    .min()
                    .unwrap_or(head);
                GroupMemberInfo {
                    member: id.clone(),
                    slots,
                    committed,
                    delivered: m.delivered.load(Ordering::Acquire),
                }
            })
            .collect();
        Ok(GroupInfo {
            name: group.to_string(),
            members,
            low_watermark: state.low_watermark(),
            head,
            created_unix_nanos: state.record.created_unix_nanos,
            generation: state.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> MemberState {
        MemberState {
            lease: 0,
            token: CancellationToken::new(),
            nudge: watch::channel(0).0,
            delivered: Arc::new(AtomicU64::new(0)),
            told: Arc::new(AtomicU64::new(0)),
            adopted: vec![false; SLOT_COUNT],
        }
    }

    fn counts(state: &GroupState) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for owner in state.owner.iter().flatten() {
            *counts.entry(owner.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn slots_spread_evenly_and_stay_put_when_they_can() {
        let mut state = GroupState::new(GroupRecord {
            created_unix_nanos: 0,
            committed: vec![0; SLOT_COUNT],
        });
        state.members.insert("a".into(), member());
        state.rebalance();
        assert_eq!(counts(&state)["a"], SLOT_COUNT);

        state.members.insert("b".into(), member());
        state.members.insert("c".into(), member());
        state.rebalance();
        let c = counts(&state);
        assert_eq!(c.values().sum::<usize>(), SLOT_COUNT);
        assert!(c.values().all(|&n| n == 85 || n == 86), "{c:?}");
        let before = state.owner.clone();

        // A fourth member takes slots only from the others: nothing moves
        // between the first three.
        state.members.insert("d".into(), member());
        state.rebalance();
        let c = counts(&state);
        assert!(c.values().all(|&n| n == 64), "{c:?}");
        for (slot, owner) in state.owner.iter().enumerate() {
            if owner.as_deref() != Some("d") {
                assert_eq!(owner, &before[slot]);
            }
        }

        state.members.clear();
        state.rebalance();
        assert!(state.owner.iter().all(Option::is_none));
    }

    #[test]
    fn keys_hash_to_stable_slots_and_keyless_events_spread_by_offset() {
        assert_eq!(slot_of(b"cus_1", 0), slot_of(b"cus_1", 999));
        let keyless: std::collections::HashSet<_> = (0..100).map(|o| slot_of(b"", o)).collect();
        assert!(keyless.len() > 60, "{}", keyless.len());
        let distinct: std::collections::HashSet<_> = (0..1000)
            .map(|i| slot_of(format!("k{i}").as_bytes(), 0))
            .collect();
        assert!(distinct.len() > 200, "{}", distinct.len());
    }
}
