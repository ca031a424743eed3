//! Subscriptions: a cursor over one stream that reads stored events first
//! and then follows the committed head.
//!
//! There is no separate "catch-up" and "live" mode to switch between, so
//! there is no switch to lose or repeat an event at: the cursor always reads
//! from its own position up to the committed head (from the tail cache when
//! the events are recent, from storage otherwise), and when it reaches the
//! head it waits on the stream's head `watch` channel. Writers never wait
//! for subscribers; a slow subscriber only falls behind.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit};

use super::group::{GroupCursor, GroupUpdate};
use super::read_ahead::{Pending, ReadAheadBudget};
use super::{check_offset, EventFilter, EventSlice, Head, Stream};
use crate::engine::{Chunk, Engine};
use crate::error::Error;

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first retained event.
    Earliest,
    /// The head: only events appended from now on.
    Latest,
    /// A given offset, between the first retained offset and the head.
    Offset(u64),
    /// The first event appended at or after this time (nanoseconds since
    /// the Unix epoch); the head when there is none.
    Time(i64),
}

/// A cursor over one stream.
pub struct Subscription {
    engine: Arc<dyn Engine>,
    stream: Arc<Stream>,
    /// The stream's committed head; waited on at the head.
    head_rx: watch::Receiver<Head>,
    next_offset: u64,
    /// Which events to deliver; the cursor moves past the others.
    filter: EventFilter,
    /// Chunks in memory at and after the cursor, not yet delivered (a
    /// contiguous run): the last one read but not delivered to the end, so
    /// the next poll does not read and decode it again, and those read
    /// ahead (see `read_ahead`).
    ahead: VecDeque<Arc<Chunk>>,
    /// The read ahead running now, if any.
    reading: Option<Pending>,
    /// The budget shares of the chunks read ahead, each with the offset
    /// its chunks end at: given back once the cursor passes it.
    shares: VecDeque<(u64, OwnedSemaphorePermit)>,
    budget: ReadAheadBudget,
    /// As a consumer group member: which slots to deliver, from where.
    group: Option<GroupCursor>,
}

impl Subscription {
    pub(super) fn new(
        engine: Arc<dyn Engine>,
        stream: Arc<Stream>,
        next_offset: u64,
        filter: EventFilter,
        budget: ReadAheadBudget,
    ) -> Result<Subscription, Error> {
        let head_rx = stream.shared.head_tx.subscribe();
        check_offset(&stream.name, next_offset, *head_rx.borrow())?;
        Ok(Subscription {
            engine,
            stream,
            head_rx,
            next_offset,
            filter,
            ahead: VecDeque::new(),
            reading: None,
            shares: VecDeque::new(),
            budget,
            group: None,
        })
    }

    /// As a member of a consumer group: delivers only the events of the
    /// member's slots (see `group`).
    pub(super) fn with_group(mut self, group: GroupCursor) -> Subscription {
        self.group = Some(group);
        self
    }

    /// A group member's change of slots, once, to tell its client.
    pub fn take_group_update(&mut self) -> Option<GroupUpdate> {
        self.group.as_mut().and_then(GroupCursor::take_update)
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream.name
    }

    /// The cursor: the offset of the next event this subscription delivers.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The stream's committed head as last seen.
    pub fn head(&self) -> Head {
        *self.head_rx.borrow()
    }

    /// Takes the events available now that pass the filter, up to the
    /// limits, and advances the cursor past every event examined (so it
    /// moves even when the filter passed none). Empty when the cursor is at
    /// the head. Fails when the stream was deleted or the cursor's events
    /// are no longer retained.
    pub fn poll(&mut self, max_events: usize, max_bytes: usize) -> Result<Vec<EventSlice>, Error> {
        let head = *self.head_rx.borrow_and_update();
        if let Some(group) = &mut self.group {
            if let Some(rewind) = group.refresh(self.next_offset)? {
                self.next_offset = rewind;
                self.ahead.clear();
                self.reading = None;
                self.shares.clear();
            }
        }
        check_offset(&self.stream.name, self.next_offset, head)?;
        if self.next_offset == head.next_offset {
            return Ok(Vec::new());
        }
        let select = self.group.as_ref().map(|group| {
            move |offset: u64, record: &crate::engine::EventRecord| group.selects(offset, record)
        });
        let (slices, examined) = self.stream.read(
            self.engine.as_ref(),
            self.next_offset,
            head.next_offset,
            max_events,
            max_bytes,
            &self.filter,
            select.as_ref().map(|s| s as _),
            &mut self.ahead,
        )?;
        self.next_offset += examined;
        while self
            .shares
            .front()
            .is_some_and(|(end, _)| *end <= self.next_offset)
        {
            self.shares.pop_front();
        }
        if let Some(group) = &self.group {
            group.delivered(self.next_offset);
        }
        Ok(slices)
    }

    /// Before a [`Subscription::poll`]: takes the read ahead started after
    /// the previous poll, if it is still wanted (the cursor did not move
    /// elsewhere). Anything else the poll needs from storage it reads
    /// itself, off the workers. Takes no lock, so a live subscriber at the
    /// head pays nothing for it.
    pub async fn prepare(&mut self) {
        if let Some(pending) = self.reading.take() {
            let from = pending.from;
            if from == self.ahead_end() {
                if let Some((chunks, share)) = pending.finish().await {
                    self.hold(from, chunks, share);
                }
            }
        }
    }

    /// After a [`Subscription::poll`] of a subscription still behind the
    /// head: starts reading the chunks after those in memory on the
    /// blocking pool, so they are there for the next poll while this one's
    /// events are sent. One read ahead at a time, of at most the poll's
    /// limits, and only within the server-wide budget; none for filtered
    /// or group subscriptions, nor where the tail cache takes over.
    pub fn read_ahead(&mut self, max_events: usize, max_bytes: usize) {
        if self.reading.is_some() || !self.plain() {
            return;
        }
        let from = self.ahead_end();
        let head = self.head().next_offset;
        if from >= head || self.stream.in_memory(from) {
            return;
        }
        let Some(share) = self.budget.take(max_bytes) else {
            return;
        };
        self.reading = Some(Pending::start(
            self.engine.clone(),
            self.stream.meta.id,
            (from, head),
            (max_events, max_bytes),
            Some(share),
        ));
    }

    /// Reading ahead is for subscriptions that deliver every event.
    fn plain(&self) -> bool {
        self.filter.is_empty() && self.group.is_none()
    }

    /// Where the chunks held in memory from the cursor on end: the cursor
    /// itself when none are.
    fn ahead_end(&self) -> u64 {
        match self.ahead.back() {
            Some(chunk) if chunk.end_offset() > self.next_offset => chunk.end_offset(),
            _ => self.next_offset,
        }
    }

    /// Holds `chunks`, read from `from`, after those already held (which
    /// end there), or instead of them when they do not.
    fn hold(&mut self, from: u64, chunks: Vec<Arc<Chunk>>, share: Option<OwnedSemaphorePermit>) {
        if self.ahead.back().map(|c| c.end_offset()) != Some(from) {
            self.ahead.clear();
        }
        let end = chunks.last().map(|c| c.end_offset());
        self.ahead.extend(chunks);
        if let (Some(end), Some(share)) = (end, share) {
            self.shares.push_back((end, share));
        }
    }

    /// Waits until [`Subscription::poll`] has something to say: new events,
    /// a deletion, trimmed events, or (for a group member) a rebalance.
    /// Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            let head = *self.head_rx.borrow_and_update();
            if head.deleted
                || head.next_offset != self.next_offset
                || head.first_offset > self.next_offset
            {
                return;
            }
            let group = async {
                match &mut self.group {
                    Some(group) => group.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.head_rx.changed() => if changed.is_err() {
                    // The stream's state is gone; poll reports what it can.
                    return;
                },
                _ = group => return,
            }
        }
    }
}
