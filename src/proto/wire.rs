//! Hand-written message types for the two responses that carry events
//! (`SubscribeResponse`, `ReadResponse`), so the server can send events it
//! encoded straight from stored chunks, without building an `Event` struct
//! (and its strings) per event per subscriber.
//!
//! On the wire they are exactly the messages `pullstream.proto` declares;
//! `build.rs` maps the proto types here with `extern_path`. Clients decode
//! into `events` as usual; the server fills `encoded_events` with ready
//! `events` entries (field 1, length-delimited `Event` messages), which are
//! written after `events`.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{bool, message, skip_field, uint64, DecodeContext, WireType};
use prost::DecodeError;
use prost_types::Timestamp;

use super::{Event, GroupAssignment};

/// `pullstream.v1.SubscribeResponse`: see the proto for each field.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct SubscribeResponse {
    /// The next events, in offset order (decoded form).
    pub events: Vec<Event>,
    /// Server side: more events, already encoded as field-1 entries.
    pub encoded_events: Bytes,
    /// The cursor to resume from.
    pub next_offset: u64,
    /// The stream's head when sent.
    pub head_offset: u64,
    /// Whether this response brings the subscriber up to the head.
    pub caught_up: bool,
    /// The server's clock when sent.
    pub server_time: Option<Timestamp>,
    /// A group member's slots, when they changed.
    pub assignment: Option<GroupAssignment>,
}

/// `pullstream.v1.ReadResponse`: see the proto for each field.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ReadResponse {
    /// The events, in offset order (decoded form).
    pub events: Vec<Event>,
    /// Server side: more events, already encoded as field-1 entries.
    pub encoded_events: Bytes,
    /// The offset to read from next.
    pub next_offset: u64,
    /// The stream's head when read.
    pub head_offset: u64,
}

fn encode_events(events: &[Event], encoded: &Bytes, buf: &mut impl BufMut) {
    for event in events {
        message::encode(1, event, buf);
    }
    buf.put_slice(encoded);
}

fn events_len(events: &[Event], encoded: &Bytes) -> usize {
    message::encoded_len_repeated(1, events) + encoded.len()
}

fn put_u64(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        uint64::encode(tag, &value, buf);
    }
}

fn u64_len(tag: u32, value: u64) -> usize {
    if value != 0 {
        uint64::encoded_len(tag, &value)
    } else {
        0
    }
}

impl prost::Message for SubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_events(&self.events, &self.encoded_events, buf);
        put_u64(2, self.next_offset, buf);
        put_u64(3, self.head_offset, buf);
        if self.caught_up {
            bool::encode(4, &self.caught_up, buf);
        }
        if let Some(time) = &self.server_time {
            message::encode(5, time, buf);
        }
        if let Some(assignment) = &self.assignment {
            message::encode(6, assignment, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => message::merge_repeated(wire_type, &mut self.events, buf, ctx),
            2 => uint64::merge(wire_type, &mut self.next_offset, buf, ctx),
            3 => uint64::merge(wire_type, &mut self.head_offset, buf, ctx),
            4 => bool::merge(wire_type, &mut self.caught_up, buf, ctx),
            5 => message::merge(
                wire_type,
                self.server_time.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            6 => message::merge(
                wire_type,
                self.assignment.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        events_len(&self.events, &self.encoded_events)
            + u64_len(2, self.next_offset)
            + u64_len(3, self.head_offset)
            + if self.caught_up {
                bool::encoded_len(4, &true)
            } else {
                0
            }
            + self
                .server_time
                .as_ref()
                .map_or(0, |t| message::encoded_len(5, t))
            + self
                .assignment
                .as_ref()
                .map_or(0, |a| message::encoded_len(6, a))
    }

    fn clear(&mut self) {
        *self = SubscribeResponse::default();
    }
}

impl prost::Message for ReadResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_events(&self.events, &self.encoded_events, buf);
        put_u64(2, self.next_offset, buf);
        put_u64(3, self.head_offset, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => message::merge_repeated(wire_type, &mut self.events, buf, ctx),
            2 => uint64::merge(wire_type, &mut self.next_offset, buf, ctx),
            3 => uint64::merge(wire_type, &mut self.head_offset, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        events_len(&self.events, &self.encoded_events)
            + u64_len(2, self.next_offset)
            + u64_len(3, self.head_offset)
    }

    fn clear(&mut self) {
        *self = ReadResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn event(offset: u64) -> Event {
        Event {
            stream: "s".into(),
            offset,
            r#type: "t".into(),
            data: Bytes::from_static(b"{}"),
            time: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pre_encoded_events_decode_like_ordinary_ones() {
        let mut encoded = Vec::new();
        message::encode(1, &event(1), &mut encoded);
        message::encode(1, &event(2), &mut encoded);
        let response = SubscribeResponse {
            events: vec![event(0)],
            encoded_events: Bytes::from(encoded),
            next_offset: 3,
            head_offset: 9,
            caught_up: true,
            server_time: Some(Timestamp::default()),
            assignment: Some(GroupAssignment {
                generation: 2,
                slots: vec![1, 5],
                revoked_slots: vec![3],
                slot_count: 256,
            }),
        };
        let bytes = response.encode_to_vec();
        assert_eq!(bytes.len(), response.encoded_len());
        let decoded = SubscribeResponse::decode(&bytes[..]).unwrap();
        assert_eq!(decoded.events, vec![event(0), event(1), event(2)]);
        assert_eq!(
            (decoded.next_offset, decoded.head_offset, decoded.caught_up),
            (3, 9, true)
        );
        assert_eq!(decoded.assignment, response.assignment);

        let read = ReadResponse {
            encoded_events: response.encoded_events.clone(),
            next_offset: 3,
            ..Default::default()
        };
        let decoded = ReadResponse::decode(&read.encode_to_vec()[..]).unwrap();
        assert_eq!(decoded.events, vec![event(1), event(2)]);
        assert_eq!(decoded.next_offset, 3);
    }
}
