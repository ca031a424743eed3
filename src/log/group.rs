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
//!
//! Across servers (an engine several servers share, cluster mode): each
//! member's join is also a record every server sees ([`Coordination`]),
//! so every server knows the members connected elsewhere; the assignment
//! is a stored record too, changed by compare-and-set by any server whose
//! view of the members differs from it (the same sticky spread, from the
//! stored owners), and applied by every server from the engine's feed
//! ([`StreamShared::remote_assignment`]), so all of them follow one
//! assignment and one generation. Committed offsets are merged slot by
//! slot into the stored record, and a member starting a slot reads the
//! stored offset, whoever committed it. A slot moving from a member on
//! another server waits, where its new owner is connected, until that
//! server says the member's client was told (asked every 20 ms, up to
//! [`HANDOVER_WAIT`]; at once when the member is connected nowhere); a
//! server that never knew a slot's previous owner (it follows the group
//! from a later assignment on) waits for every member elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use super::command::{GroupChange, WriterCommand};
use super::consumer::validate_label;
use super::{Log, StartAt, StreamShared};
use crate::engine::{Assignment, Engine, EventRecord, GroupRecord};
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
    /// Members elsewhere whose slots moved, whose servers are to be asked
    /// when their clients have been told (taken by [`ask_for_handovers`]).
    asks: Vec<HandoverAsk>,
    /// Members connected to other servers (shared engines): id → the
    /// revision of their join.
    remote: BTreeMap<String, u64>,
    /// Members known to have left, by the revision of the join that
    /// ended (so an assignment made for them is not kept alive by them).
    departed: BTreeMap<String, u64>,
    /// The revision of the stored assignment applied (shared engines).
    assigned: u64,
}

struct MemberState {
    lease: u64,
    /// Its join's revision (shared engines; 0 otherwise).
    join: u64,
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
            asks: Vec::new(),
            remote: BTreeMap::new(),
            departed: BTreeMap::new(),
            assigned: 0,
        }
    }

    /// Spreads the slots over the members connected here, and tells every
    /// member (one server: the assignment is this server's own).
    fn rebalance(&mut self) {
        let ids: Vec<String> = self.members.keys().cloned().collect();
        let owners = spread(&self.owner, &ids);
        self.apply_owners(owners, self.generation + 1, false);
    }

    /// Takes in a new assignment at `generation`: slots leaving a member
    /// here that delivered them wait, at their new owner, until that
    /// member's client has been told; slots leaving members connected
    /// elsewhere wait until their servers say so ([`ask_for_handovers`]).
    /// Tells every member here.
    ///
    /// `shared`: the assignment is a stored one (shared engines), so a
    /// previous owner not connected here may be connected elsewhere,
    /// whether or not this server has heard of its join yet.
    fn apply_owners(&mut self, owners: Vec<Option<String>>, generation: u64, shared: bool) {
        // Slots moving from members elsewhere wait, where their new owner
        // is connected, until those members' servers say their clients
        // were told. A slot whose previous owner this server never knew
        // (it follows the group from a later assignment on) may have been
        // delivered by any member elsewhere the assignment names: it
        // waits for all of them.
        let elsewhere: Vec<String> = owners
            .iter()
            .flatten()
            .filter(|o| !self.members.contains_key(*o))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut asked: BTreeMap<Vec<String>, Arc<AtomicU64>> = BTreeMap::new();
        for (slot, owner) in owners.iter().enumerate() {
            let previous = self.owner[slot].clone();
            let waits_here = owner.as_ref().is_some_and(|o| self.members.contains_key(o));
            let candidates = match previous {
                Some(p)
                    if owner.as_ref() != Some(&p)
                        && (self.remote.contains_key(&p)
                            || (shared && !self.members.contains_key(&p))) =>
                {
                    vec![p]
                }
                None if shared && waits_here && generation > 1 && !elsewhere.is_empty() => {
                    elsewhere.clone()
                }
                _ => continue,
            };
            if !waits_here {
                self.handover[slot] = Some(Arc::new(AtomicU64::new(0)));
                continue;
            }
            let told = asked
                .entry(candidates)
                .or_insert_with(|| Arc::new(AtomicU64::new(0)));
            self.handover[slot] = Some(told.clone());
        }
        self.asks
            .extend(asked.into_iter().map(|(members, told)| HandoverAsk {
                members,
                told,
                generation,
            }));
        self.owner = owners;
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
        self.generation = generation;
        for member in self.members.values() {
            let _ = member.nudge.send(self.generation);
        }
    }

    /// The lowest committed offset over all slots.
    pub(crate) fn low_watermark(&self) -> u64 {
        self.record.committed.iter().copied().min().unwrap_or(0)
    }

    /// Whether a member is connected, here or (shared engines) elsewhere.
    pub(crate) fn has_members(&self) -> bool {
        !self.members.is_empty() || !self.remote.is_empty()
    }

    /// The connected members' ids, here and elsewhere.
    fn member_ids(&self) -> BTreeSet<String> {
        self.members
            .keys()
            .chain(self.remote.keys())
            .cloned()
            .collect()
    }

    /// Whether a member here has started delivering the slot.
    fn adopted_here(&self, slot: usize) -> bool {
        self.members.values().any(|m| m.adopted[slot])
    }

    /// Takes in the stored record's offsets for the slots no member here
    /// delivers (members elsewhere commit those).
    fn merge_stored(&mut self, stored: &GroupRecord) {
        self.record.created_unix_nanos = stored.created_unix_nanos;
        for slot in 0..SLOT_COUNT.min(stored.committed.len()) {
            if !self.adopted_here(slot) {
                self.record.committed[slot] = stored.committed[slot];
            }
        }
    }

    /// The assignment this server's view of the members asks for, given
    /// the stored one, or `None` when the stored one already fits. A
    /// member the stored assignment names that this server has not heard
    /// of stays, unless it is known to have left (it will be heard of:
    /// `Log::coordinate` asks the engine about such members first).
    fn desired(&self, current: &Assignment) -> Option<Assignment> {
        let mut members: BTreeMap<String, u64> = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.join))
            .collect();
        for (id, &join) in &self.remote {
            let entry = members.entry(id.clone()).or_insert(join);
            *entry = (*entry).max(join);
        }
        for (id, join) in &current.members {
            if !members.contains_key(id) && self.departed.get(id).is_none_or(|left| left < join) {
                members.insert(id.clone(), *join);
            }
        }
        let ids: Vec<String> = members.keys().cloned().collect();
        let owners = spread(&current.owners, &ids);
        let members: Vec<(String, u64)> = members.into_iter().collect();
        if owners == current.owners && members == current.members {
            return None;
        }
        // One generation per member joined or gone, as on one server
        // (where each is its own rebalance), even when one look takes in
        // several.
        let changed = members
            .iter()
            .filter(|(id, _)| !current.members.iter().any(|(m, _)| m == id))
            .count()
            + current
                .members
                .iter()
                .filter(|(id, _)| !members.iter().any(|(m, _)| m == id))
                .count();
        let left = current
            .members
            .iter()
            .filter(|(id, _)| !members.iter().any(|(m, _)| m == id))
            .filter_map(|(id, _)| Some((id.clone(), *self.departed.get(id)?)))
            .collect();
        Some(Assignment {
            generation: current.generation + changed.max(1) as u64,
            members,
            owners,
            left,
        })
    }

    /// Members the stored assignment names that this server knows
    /// nothing of (see [`GroupState::desired`]).
    fn unheard_of(&self, current: &Assignment) -> Vec<(String, u64)> {
        current
            .members
            .iter()
            .filter(|(id, join)| {
                !self.members.contains_key(id)
                    && !self.remote.contains_key(id)
                    && self.departed.get(id).is_none_or(|left| left < join)
            })
            .cloned()
            .collect()
    }

    /// Applies a stored assignment at `revision`, unless a newer one was.
    fn take_assignment(&mut self, assignment: &Assignment, revision: u64) {
        if revision <= self.assigned || assignment.owners.len() != SLOT_COUNT {
            return;
        }
        self.assigned = revision;
        self.departed
            .retain(|id, _| assignment.members.iter().any(|(m, _)| m == id));
        // Leaves its maker knew of, which this server may not have heard
        // of yet.
        for (id, join) in &assignment.left {
            if self.remote.get(id).is_some_and(|r| r <= join) {
                self.remote.remove(id);
            }
        }
        self.apply_owners(assignment.owners.clone(), assignment.generation, true);
    }

    fn slots_of(&self, member: &str) -> Vec<u32> {
        (0..SLOT_COUNT)
            .filter(|&s| self.owner[s].as_deref() == Some(member))
            .map(|s| s as u32)
            .collect()
    }
}

/// Spreads the slots over the members `ids` as evenly as possible,
/// keeping each slot with its owner in `current` when the owner's share
/// allows (sticky: a join moves slots only to the newcomer).
fn spread(current: &[Option<String>], ids: &[String]) -> Vec<Option<String>> {
    let n = ids.len();
    let mut owner: Vec<Option<String>> = current.to_vec();
    owner.resize(SLOT_COUNT, None);
    let mut counts: BTreeMap<&str, usize> = ids.iter().map(|m| (m.as_str(), 0)).collect();
    let quota = |i: usize| {
        SLOT_COUNT
            .checked_div(n)
            .map_or(0, |base| base + usize::from(i < SLOT_COUNT % n))
    };
    let quota_of = |id: &str| ids.iter().position(|m| m == id).map_or(0, quota);
    for slot_owner in owner.iter_mut() {
        let keep = slot_owner
            .as_deref()
            .is_some_and(|id| counts.get(id).is_some_and(|&count| count < quota_of(id)));
        if keep {
            *counts
                .get_mut(slot_owner.as_deref().unwrap_or_default())
                .expect("member") += 1;
        } else {
            *slot_owner = None;
        }
    }
    for slot_owner in owner.iter_mut().filter(|o| o.is_none()) {
        if let Some((_, id)) = ids
            .iter()
            .enumerate()
            .find(|(i, id)| counts[id.as_str()] < quota(*i))
        {
            *counts.get_mut(id.as_str()).expect("member") += 1;
            *slot_owner = Some(id.clone());
        }
    }
    owner
}

/// The groups whose assignment may need changing, server-wide (shared
/// engines): filled by membership changes, drained by
/// `Log::coordinate_groups`.
#[derive(Default)]
pub(crate) struct AssignQueue {
    dirty: Mutex<BTreeSet<(String, String)>>,
    wake: Notify,
}

impl AssignQueue {
    /// Waits for groups to look at, and takes them.
    pub(crate) async fn next(&self) -> BTreeSet<(String, String)> {
        loop {
            let wake = self.wake.notified();
            let dirty = std::mem::take(&mut *self.dirty.lock().expect("assign queue lock"));
            if !dirty.is_empty() {
                return dirty;
            }
            wake.await;
        }
    }

    /// Asks for a look at a group again (after a failed attempt).
    pub(crate) fn again(&self, stream: &str, group: &str) {
        self.dirty
            .lock()
            .expect("assign queue lock")
            .insert((stream.to_string(), group.to_string()));
        self.wake.notify_one();
    }
}

/// A stream's groups as several servers share them (see the module docs):
/// the engine that holds their records, and where to ask for an
/// assignment to be looked at.
pub(crate) struct Coordination {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) stream: String,
    pub(crate) stream_id: u64,
    pub(crate) queue: Arc<AssignQueue>,
}

impl Coordination {
    fn want(&self, group: &str) {
        self.queue.again(&self.stream, group);
    }
}

impl StreamShared {
    /// Another server's member joined (`joined`) or left: a newer join of
    /// a member connected here ends it here; the assignment is looked at.
    pub(crate) fn remote_member(&self, group: &str, member: &str, revision: u64, joined: bool) {
        let Some(coordination) = self.coordination.get() else {
            return;
        };
        let mut groups = self.groups.lock().expect("groups lock");
        let Some(state) = groups.get_mut(group) else {
            return;
        };
        if joined {
            if let Some(here) = state.members.get(member) {
                if here.join > revision {
                    return;
                }
                here.token.cancel();
            }
            let known = state.remote.entry(member.to_string()).or_insert(revision);
            *known = (*known).max(revision);
        } else {
            if state
                .remote
                .get(member)
                .is_some_and(|&join| join <= revision)
            {
                state.remote.remove(member);
            }
            let left = state.departed.entry(member.to_string()).or_insert(revision);
            *left = (*left).max(revision);
        }
        drop(groups);
        coordination.want(group);
    }

    /// A stored assignment (made by any server) to follow.
    pub(crate) fn remote_assignment(&self, group: &str, assignment: &Assignment, revision: u64) {
        let Some(coordination) = self.coordination.get() else {
            return;
        };
        let mut groups = self.groups.lock().expect("groups lock");
        if let Some(state) = groups.get_mut(group) {
            state.take_assignment(assignment, revision);
            let asks = std::mem::take(&mut state.asks);
            drop(groups);
            ask_for_handovers(coordination, group, asks);
            // This server's view may already differ from it.
            coordination.want(group);
        }
    }

    /// A group deleted through another server: its members here end.
    pub(crate) fn remote_group_deleted(&self, group: &str) {
        let removed = self.groups.lock().expect("groups lock").remove(group);
        if let Some(state) = removed {
            for member in state.members.values() {
                member.token.cancel();
            }
        }
    }
}

/// What a group change writes.
pub(crate) enum GroupWrite {
    /// The group's new record, and the slots that changed (`None`: all).
    Put(GroupRecord, Option<Vec<usize>>),
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

/// A member elsewhere that slots moved away from, at `generation`: its
/// server is asked until its client has been told of that generation
/// (then `told` says so, and the slots start at their new owners here),
/// it is gone (at once), or the handover time is up.
struct HandoverAsk {
    /// The members that may have delivered the slots (one, unless this
    /// server did not know the previous owner).
    members: Vec<String>,
    /// The lowest generation they were all told of.
    told: Arc<AtomicU64>,
    generation: u64,
}

/// How often a member's server is asked whether it was told (the waiting
/// member looks at `told` as often).
const ASK_TOLD_EVERY: Duration = Duration::from_millis(20);

/// Asks, in the background, the servers of members elsewhere whose slots
/// moved when their clients have been told (see [`HandoverAsk`]).
fn ask_for_handovers(coordination: &Coordination, group: &str, asks: Vec<HandoverAsk>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for ask in asks {
        let (engine, stream_id, group) = (
            coordination.engine.clone(),
            coordination.stream_id,
            group.to_string(),
        );
        runtime.spawn(async move {
            let deadline = Instant::now() + HANDOVER_WAIT;
            let mut told = vec![0u64; ask.members.len()];
            while Instant::now() < deadline {
                for (i, member) in ask.members.iter().enumerate() {
                    if told[i] >= ask.generation {
                        continue;
                    }
                    match engine.ask_told(stream_id, &group, member) {
                        Ok(Some(generation)) => told[i] = told[i].max(generation),
                        // Connected nowhere: nothing more to wait for.
                        Ok(None) => told[i] = u64::MAX,
                        Err(e) => {
                            tracing::debug!(error = %e, %member, "cannot ask a member's server whether it was told");
                        }
                    }
                }
                let lowest = told.iter().copied().min().unwrap_or(u64::MAX);
                ask.told.fetch_max(lowest, Ordering::AcqRel);
                if lowest >= ask.generation {
                    return;
                }
                tokio::time::sleep(ASK_TOLD_EVERY).await;
            }
        });
    }
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
    stored_groups: Option<usize>,
) -> Result<Option<GroupWrite>, Error> {
    let mut groups = shared.groups.lock().expect("groups lock");
    match change {
        GroupChange::Create { start } => {
            if groups.contains_key(name) {
                return Ok(None);
            }
            // Shared engines: the stored groups, wherever they were made.
            let count = stored_groups.unwrap_or(groups.len());
            if count >= max_groups {
                return Err(Error::ResourceExhausted(format!(
                    "stream {} already has {count} consumer groups, the most allowed (--max-groups-per-stream {max_groups}): delete groups it no longer needs",
                    crate::error::shown(stream),
                )));
            }
            let record = GroupRecord {
                created_unix_nanos: now_unix_nanos,
                committed: vec![*start; SLOT_COUNT],
            };
            groups.insert(name.to_string(), GroupState::new(record.clone()));
            Ok(Some(GroupWrite::Put(record, None)))
        }
        GroupChange::Reset { offset } => {
            let group = groups
                .get_mut(name)
                .ok_or_else(|| group_not_found(stream, name))?;
            if group.has_members() {
                return Err(Error::GroupActive {
                    stream: stream.to_string(),
                    group: name.to_string(),
                    members: group.member_ids().into_iter().collect(),
                });
            }
            group.record.committed = vec![*offset; SLOT_COUNT];
            Ok(Some(GroupWrite::Put(group.record.clone(), None)))
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
            let mut changed = Vec::new();
            for slot in 0..SLOT_COUNT {
                if state.adopted[slot] && group.record.committed[slot] < limit {
                    group.record.committed[slot] = limit;
                    changed.push(slot);
                }
            }
            Ok((!changed.is_empty()).then(|| GroupWrite::Put(group.record.clone(), Some(changed))))
        }
    }
}

/// Until the log closes: answers what other servers forward about members
/// connected here (shared engines: a member's `CommitGroup` may reach any
/// server, and a slot moving from a member here starts elsewhere once its
/// client has been told): commits as this server's own `CommitGroup`
/// would, and says which generation a member's client was told of.
pub(super) async fn serve_forwarded(
    log: Arc<Log>,
    mut calls: tokio::sync::mpsc::Receiver<crate::engine::Forwarded>,
) {
    use crate::engine::{Forwarded, ForwardedAnswer};
    loop {
        let call = tokio::select! {
            _ = log.closing.cancelled() => return,
            call = calls.recv() => match call {
                Some(call) => call,
                None => return,
            },
        };
        let commit = match call {
            Forwarded::Commit(commit) => commit,
            Forwarded::Told(question) => {
                let told = log
                    .get(&question.stream)
                    .ok()
                    .filter(|s| s.meta.id == question.stream_id)
                    .and_then(|s| {
                        let groups = s.shared.groups.lock().expect("groups lock");
                        let member = groups.get(&question.group)?.members.get(&question.member)?;
                        Some(member.told.load(Ordering::Acquire))
                    });
                let _ = question.reply.send(told);
                continue;
            }
        };
        let log = log.clone();
        tokio::spawn(async move {
            let served = log
                .get(&commit.stream)
                .ok()
                .filter(|s| s.meta.id == commit.stream_id);
            let answer = match served {
                None => ForwardedAnswer::NoStream,
                Some(_) => match log
                    .change_group(
                        &commit.stream,
                        &commit.group,
                        GroupChange::Commit {
                            member: commit.member.clone(),
                            next_offset: commit.next_offset,
                        },
                    )
                    .await
                {
                    Ok(()) => ForwardedAnswer::Committed,
                    Err(Error::MemberNotFound { .. }) => ForwardedAnswer::NoMember,
                    Err(Error::GroupNotFound { .. }) => ForwardedAnswer::NoGroup,
                    Err(Error::StreamNotFound(_)) => ForwardedAnswer::NoStream,
                    Err(e) => ForwardedAnswer::Failed(e.to_string()),
                },
            };
            let _ = commit.reply.send(answer);
        });
    }
}

/// Brings a group in memory up to its stored record (shared engines): a
/// group made elsewhere is taken in; slots no member here delivers take
/// the stored offsets.
pub(crate) fn take_stored(shared: &StreamShared, name: &str, stored: Option<GroupRecord>) {
    let Some(stored) = stored else {
        return;
    };
    let mut groups = shared.groups.lock().expect("groups lock");
    match groups.get_mut(name) {
        Some(group) => group.merge_stored(&stored),
        None => {
            groups.insert(name.to_string(), GroupState::new(stored));
        }
    }
}

/// After a write rolled back on a full disk (`Writer::resync`): every
/// group's record becomes what the engine holds. A group the engine does
/// not hold and that has no member here goes (its creation was not
/// written); one that members still use is written again with their next
/// commit.
pub(crate) fn resync(shared: &StreamShared, stored: Vec<(String, GroupRecord)>) {
    let mut groups = shared.groups.lock().expect("groups lock");
    groups.retain(|name, group| stored.iter().any(|(n, _)| n == name) || !group.members.is_empty());
    for (name, record) in stored {
        match groups.get_mut(&name) {
            Some(group) => group.record = record,
            None => {
                groups.insert(name, GroupState::new(record));
            }
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
    /// Its join's revision (shared engines; 0 otherwise).
    join: u64,
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
            self.read_stored_offsets();
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

impl GroupCursor {
    /// Shared engines: before a pending slot starts, takes in the stored
    /// committed offsets (a member elsewhere may have committed it last).
    fn read_stored_offsets(&self) {
        let Some(c) = self.shared.coordination.get() else {
            return;
        };
        let now = Instant::now();
        let ready = self.pending.iter().any(|p| {
            now >= p.deadline
                || p.previous
                    .as_ref()
                    .is_none_or(|told| told.load(Ordering::Acquire) >= p.generation)
        });
        if !ready {
            return;
        }
        match c.engine.stored_group(c.stream_id, &self.group) {
            Ok(Some(stored)) => {
                let mut groups = self.shared.groups.lock().expect("groups lock");
                if let Some(group) = groups.get_mut(&self.group) {
                    group.merge_stored(&stored);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, group = %self.group, "cannot read a group's committed offsets; starting its slots from what this server knows");
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
                match self.shared.coordination.get() {
                    Some(c) => {
                        // The next assignment tells the others it left.
                        group.departed.insert(self.member.clone(), self.join);
                        c.want(&self.group)
                    }
                    None => group.rebalance(),
                }
            }
        }
        drop(groups);
        if let Some(c) = self.shared.coordination.get() {
            c.engine
                .leave_member(c.stream_id, &self.group, &self.member, self.join);
        }
    }
}

/// Until the log closes (shared engines): looks at the groups whose
/// membership changed, and stores a new assignment where this server's
/// view asks for one. A look that fails (the cluster did not answer) is
/// tried again a second later.
pub(crate) async fn coordinate_groups(log: Arc<Log>) {
    loop {
        let dirty = tokio::select! {
            _ = log.closing.cancelled() => return,
            dirty = log.assign_queue.next() => dirty,
        };
        for (stream, group) in dirty {
            let looked = {
                let log = log.clone();
                let (stream, group) = (stream.clone(), group.clone());
                tokio::task::spawn_blocking(move || log.coordinate(&stream, &group)).await
            };
            match looked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %stream, %group, "cannot store a group's assignment yet; trying again");
                    let (log, stream, group) = (log.clone(), stream.clone(), group.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        log.assign_queue.again(&stream, &group);
                    });
                }
                Err(e) => tracing::error!(error = %e, "a group's assignment look panicked"),
            }
        }
    }
}

impl Log {
    /// One look at a group's stored assignment (shared engines): follows
    /// it if it is newer than the one applied, asks the engine about the
    /// members it names that this server has not heard of, and stores a
    /// new one (compare-and-set) when this server's view of the members
    /// asks for it. Blocking: engine calls.
    fn coordinate(&self, stream: &str, group: &str) -> Result<(), Error> {
        let Ok(stream) = self.get(stream) else {
            return Ok(());
        };
        let Some(c) = stream.shared.coordination.get() else {
            return Ok(());
        };
        // Lost races are retried at once: each one means another server
        // stored a newer assignment, which this look then starts from.
        for _ in 0..16 {
            let (current, revision) = self
                .engine
                .stored_assignment(c.stream_id, group)?
                .unwrap_or_default();
            let unheard = {
                let mut groups = stream.shared.groups.lock().expect("groups lock");
                let Some(state) = groups.get_mut(group) else {
                    return Ok(());
                };
                state.take_assignment(&current, revision);
                ask_for_handovers(c, group, std::mem::take(&mut state.asks));
                state.unheard_of(&current)
            };
            let mut heard = Vec::new();
            for (member, join) in unheard {
                heard.push((
                    member.clone(),
                    join,
                    self.engine.stored_member(c.stream_id, group, &member)?,
                ));
            }
            let desired = {
                let mut groups = stream.shared.groups.lock().expect("groups lock");
                let Some(state) = groups.get_mut(group) else {
                    return Ok(());
                };
                for (member, join, stored) in heard {
                    match stored {
                        Some(now) if !state.members.contains_key(&member) => {
                            state.remote.insert(member, now.max(join));
                        }
                        Some(_) => {}
                        None => {
                            state.departed.insert(member, join);
                        }
                    }
                }
                state.desired(&current)
            };
            let Some(desired) = desired else {
                return Ok(());
            };
            if self
                .engine
                .put_assignment(c.stream_id, group, &desired, revision)?
            {
                return Ok(());
            }
        }
        Ok(())
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
        let coordination = stream.shared.coordination.get();
        let check_room = |state: &GroupState| {
            let max = self.config.limits.max_members_per_group;
            let ids = state.member_ids();
            if !ids.contains(member) && ids.len() >= max {
                return Err(Error::ResourceExhausted(format!(
                    "group {} of stream {} already has {} members, the most allowed (--max-members-per-group {max})",
                    crate::error::shown(group),
                    crate::error::shown(&stream.name),
                    ids.len()
                )));
            }
            Ok(())
        };
        // Shared engines: the join is made known to every server first,
        // so its revision orders it against joins of the same member
        // elsewhere.
        let join = match coordination {
            Some(c) => {
                {
                    let groups = stream.shared.groups.lock().expect("groups lock");
                    let state = groups
                        .get(group)
                        .ok_or_else(|| group_not_found(&stream.name, group))?;
                    check_room(state)?;
                }
                c.engine.join_member(c.stream_id, group, member)?
            }
            None => 0,
        };
        let mut groups = stream.shared.groups.lock().expect("groups lock");
        let state = groups
            .get_mut(group)
            .ok_or_else(|| group_not_found(&stream.name, group))?;
        check_room(state)?;
        if let Some(old) = state.members.get(member) {
            old.token.cancel();
        }
        if state.remote.get(member).is_some_and(|&r| r < join) {
            // This join replaces it (that server ends it when it hears).
            state.remote.remove(member);
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
                join,
                token: token.clone(),
                nudge,
                delivered: delivered.clone(),
                told: told.clone(),
                adopted: vec![false; SLOT_COUNT],
            },
        );
        match coordination {
            Some(c) => c.want(group),
            None => state.rebalance(),
        }
        drop(groups);
        Ok(GroupCursor {
            join,
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
        let committed = self
            .change_group(
                stream,
                group,
                GroupChange::Commit {
                    member: member.to_string(),
                    next_offset,
                },
            )
            .await;
        match committed {
            // Shared engines: the member may be connected to another
            // server, which alone knows what it was delivered.
            Err(Error::MemberNotFound { .. }) if self.engine.shared() => {
                self.forward_commit(stream, group, member, next_offset)
                    .await?
            }
            other => other?,
        }
        self.group_info(stream, group)
    }

    /// Has the server `member` is connected to commit its progress (see
    /// [`Engine::forward_group_commit`](crate::engine::Engine::forward_group_commit)).
    async fn forward_commit(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        next_offset: u64,
    ) -> Result<(), Error> {
        use crate::engine::ForwardedAnswer;
        let stream_id = self.get(stream)?.meta.id;
        let answer = self
            .engine
            .forward_group_commit(stream_id, group, member, next_offset)?;
        match answer {
            Some(ForwardedAnswer::Committed) => Ok(()),
            None | Some(ForwardedAnswer::NoMember) => Err(member_not_found(stream, group, member)),
            Some(ForwardedAnswer::NoGroup) => Err(group_not_found(stream, group)),
            Some(ForwardedAnswer::NoStream) => Err(Error::StreamNotFound(stream.to_string())),
            Some(ForwardedAnswer::Failed(why)) => {
                Err(Error::Storage(crate::engine::StorageError::Engine {
                    op: "committing at the member's server",
                    path: self.engine.path().to_path_buf(),
                    source: why.into(),
                }))
            }
        }
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
        // Shared engines: members elsewhere commit their slots there.
        let stored = match stream.shared.coordination.get() {
            Some(c) => c.engine.stored_group(c.stream_id, group)?,
            None => None,
        };
        let head = stream.shared.head().next_offset;
        let mut groups = stream.shared.groups.lock().expect("groups lock");
        let state = groups
            .get_mut(group)
            .ok_or_else(|| group_not_found(&stream.name, group))?;
        if let Some(stored) = &stored {
            state.merge_stored(stored);
        }
        let members = state
            .member_ids()
            .into_iter()
            .map(|id| {
                let slots = state.slots_of(&id);
                let committed = slots
                    .iter()
                    .map(|&s| state.record.committed[s as usize])
                    .min()
                    .unwrap_or(head);
                // Where a member elsewhere stands is not shared: its
                // committed offset is the best known.
                let delivered = state
                    .members
                    .get(&id)
                    .map_or(committed, |m| m.delivered.load(Ordering::Acquire));
                GroupMemberInfo {
                    member: id,
                    slots,
                    committed,
                    delivered,
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
            join: 0,
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
