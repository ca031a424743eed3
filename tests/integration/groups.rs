//! Key-shared consumer groups: members share a stream by key slot, each
//! key in order at one member; rebalances on join and leave; per-slot
//! commits; redelivery of what a lost member never committed.

use std::collections::{BTreeMap, BTreeSet};

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::{Code, Streaming};

use crate::common::*;

/// A connected member: its subscription and what it has received.
pub(crate) struct Member {
    pub(crate) id: String,
    pub(crate) sub: Streaming<pb::SubscribeResponse>,
    pub(crate) client: Client,
    /// (offset, key) in arrival order.
    pub(crate) events: Vec<(u64, String)>,
    pub(crate) generation: u64,
    pub(crate) slots: Vec<u32>,
    pub(crate) revoked: Vec<u32>,
    pub(crate) next_offset: u64,
}

impl Member {
    pub(crate) async fn join(server: &TestServer, stream: &str, group: &str, id: &str) -> Member {
        let mut client = server.client().await;
        let sub = client
            .subscribe(pb::SubscribeRequest {
                stream: stream.into(),
                group: group.into(),
                member: id.into(),
                start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
                ..Default::default()
            })
            .await
            .expect("join")
            .into_inner();
        Member::new(id, sub, client)
    }

    /// Reads one message, recording events and assignment.
    pub(crate) async fn read_one(&mut self) {
        let message = next(&mut self.sub).await.expect("member message");
        for e in message.events {
            self.events.push((e.offset, e.key));
        }
        if let Some(a) = message.assignment {
            self.generation = a.generation;
            self.slots = a.slots;
            self.revoked.extend(a.revoked_slots);
        }
        self.next_offset = message.next_offset;
    }

    /// Reads until the member has been told of `generation`.
    pub(crate) async fn until_generation(&mut self, generation: u64) {
        while self.generation < generation {
            self.read_one().await;
        }
    }

    /// Reads until it has received `count` events in all.
    pub(crate) async fn until_events(&mut self, count: usize) {
        while self.events.len() < count {
            self.read_one().await;
        }
    }

    /// Joins through small HTTP/2 windows, so when it stops reading its
    /// stream stalls at once and the server cannot tell it anything.
    pub(crate) async fn join_stalling(
        server: &TestServer,
        stream: &str,
        group: &str,
        id: &str,
    ) -> Member {
        let channel = server.stalling_channel().await;
        let sub = pb::event_log_client::EventLogClient::new(channel.clone())
            .subscribe(pb::SubscribeRequest {
                stream: stream.into(),
                group: group.into(),
                member: id.into(),
                ..Default::default()
            })
            .await
            .expect("join")
            .into_inner();
        Member::new(id, sub, client_on(channel))
    }

    /// A member that has received nothing yet.
    fn new(id: &str, sub: Streaming<pb::SubscribeResponse>, client: Client) -> Member {
        Member {
            id: id.into(),
            sub,
            client,
            events: Vec::new(),
            generation: 0,
            slots: Vec::new(),
            revoked: Vec::new(),
            next_offset: 0,
        }
    }

    pub(crate) async fn commit(
        &mut self,
        stream: &str,
        group: &str,
        next_offset: u64,
    ) -> pb::GroupInfo {
        self.client
            .commit_group(pb::CommitGroupRequest {
                stream: stream.into(),
                group: group.into(),
                member: self.id.clone(),
                next_offset,
            })
            .await
            .expect("commit")
            .into_inner()
            .group
            .expect("group info")
    }
}

/// Appends 2,000 events of about 1 KiB, keys `k0`..`k63` in turn (event
/// `o` has key `k{o % 64}`): more than a member joined with
/// [`Member::join_stalling`] takes in without reading, so it stalls.
pub(crate) async fn fill_stalling(client: &mut Client, stream: &str) {
    let big = "x".repeat(1000);
    for batch in 0..40u64 {
        let events = (0..50u64)
            .map(|i| pb::NewEvent {
                key: format!("k{}", (batch * 50 + i) % 64).into(),
                ..event("order.updated", &format!("\"{big}\""))
            })
            .collect();
        append(client, stream, events).await;
    }
}

/// A server with stream `s` and group `g` of members `a` and `b`, both
/// told of the rebalance that brought `b` in.
async fn two_members() -> (TestServer, Client, Member, Member) {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "s").await;
    let mut a = Member::join(&server, "s", "g", "a").await;
    let mut b = Member::join(&server, "s", "g", "b").await;
    a.until_generation(2).await;
    b.until_generation(2).await;
    (server, client, a, b)
}

/// Reads a member's subscription to its end; returns how it ended.
pub(crate) async fn end_status(member: &mut Member) -> tonic::Status {
    within(async {
        loop {
            if let Err(status) = next(&mut member.sub).await {
                return status;
            }
        }
    })
    .await
}

pub(crate) async fn create(client: &mut Client, stream: &str) {
    client
        .create_stream(pb::CreateStreamRequest {
            stream: stream.into(),
            ..Default::default()
        })
        .await
        .expect("create stream");
}

fn keyed(key: &str, n: u64) -> pb::NewEvent {
    pb::NewEvent {
        key: key.into(),
        ..event("order.updated", &n.to_string())
    }
}

/// Appends `n` events over `keys` keys (round robin), in batches of 50.
pub(crate) async fn append_keyed(client: &mut Client, stream: &str, n: u64, keys: u64) {
    let events: Vec<_> = (0..n)
        .map(|i| keyed(&format!("k{}", i % keys), i))
        .collect();
    for batch in events.chunks(50) {
        append(client, stream, batch.to_vec()).await;
    }
}

/// Per key, offsets strictly increase in arrival order.
pub(crate) fn assert_key_order(member: &Member) {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (offset, key) in &member.events {
        if let Some(previous) = last.insert(key, *offset) {
            assert!(
                *offset > previous,
                "member {}: key {key} went from {previous} to {offset}",
                member.id
            );
        }
    }
}

pub(crate) async fn group_info(
    client: &mut Client,
    stream: &str,
    group: &str,
) -> Result<pb::GroupInfo, tonic::Status> {
    client
        .get_group(pb::GetGroupRequest {
            stream: stream.into(),
            group: group.into(),
        })
        .await
        .map(|r| r.into_inner().group.expect("group info"))
}

#[tokio::test]
async fn members_together_receive_every_event_exactly_once_in_key_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "orders").await;
    let mut members = Vec::new();
    for id in ["a", "b", "c"] {
        members.push(Member::join(&server, "orders", "shippers", id).await);
    }
    for m in &mut members {
        m.until_generation(3).await;
    }
    let slots: Vec<usize> = members.iter().map(|m| m.slots.len()).collect();
    assert_eq!(slots.iter().sum::<usize>(), 256);
    assert!(slots.iter().all(|&n| n == 85 || n == 86), "{slots:?}");

    append_keyed(&mut client, "orders", 900, 40).await;
    let info = within(async {
        loop {
            let received: usize = members.iter().map(|m| m.events.len()).sum();
            if received >= 900 {
                break;
            }
            for m in &mut members {
                if m.next_offset < 900 {
                    m.read_one().await;
                }
            }
        }
        group_info(&mut client, "orders", "shippers").await.unwrap()
    })
    .await;
    let mut all: Vec<u64> = members
        .iter()
        .flat_map(|m| m.events.iter().map(|(o, _)| *o))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..900).collect::<Vec<_>>(), "each event exactly once");
    let mut owner_of_key: BTreeMap<String, String> = BTreeMap::new();
    for m in &members {
        assert!(!m.events.is_empty(), "member {} got a share", m.id);
        assert_key_order(m);
        for (_, key) in &m.events {
            let owner = owner_of_key.entry(key.clone()).or_insert(m.id.clone());
            assert_eq!(owner, &m.id, "key {key} went to one member");
        }
    }
    assert_eq!(info.members.len(), 3);
    assert_eq!(info.generation, 3);
    assert_eq!(info.low_watermark, 0, "nothing committed yet");
}

#[tokio::test]
async fn a_new_member_takes_slots_at_their_committed_offsets_and_nothing_is_skipped() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append_keyed(&mut client, "s", 500, 20).await;
    let mut a = Member::join(&server, "s", "g", "a").await;
    a.until_events(500).await;
    let info = a.commit("s", "g", 300).await;
    assert_eq!(info.low_watermark, 300);

    let mut b = Member::join(&server, "s", "g", "b").await;
    a.until_generation(2).await;
    b.until_generation(2).await;
    assert_eq!(a.slots.len() + b.slots.len(), 256);
    assert_eq!(
        a.revoked.len(),
        b.slots.len(),
        "a was told which slots it lost"
    );
    append_keyed(&mut client, "s", 500, 20).await;

    // b redelivers its slots' events from 300 (a never committed them
    // further), and both follow the new events.
    let slot_of = |key: &str| pullstream::log::slot_of(key.as_bytes(), 0) as u32;
    let b_slots: BTreeSet<u32> = b.slots.iter().copied().collect();
    let expected_b = (300..1000u64)
        .filter(|i| b_slots.contains(&slot_of(&format!("k{}", i % 20))))
        .count();
    within(b.until_events(expected_b)).await;
    let a_new_expected = (500..1000u64)
        .filter(|i| !b_slots.contains(&slot_of(&format!("k{}", i % 20))))
        .count();
    within(a.until_events(500 + a_new_expected)).await;

    let mut seen: BTreeSet<u64> = a.events.iter().map(|(o, _)| *o).collect();
    seen.extend(b.events.iter().map(|(o, _)| *o));
    assert_eq!(seen, (0..1000).collect(), "no event skipped");
    assert!(b.events.iter().all(|(o, _)| *o >= 300));
    for (offset, key) in &a.events[500..] {
        assert!(
            !b_slots.contains(&slot_of(key)),
            "a got {offset} of a revoked slot"
        );
    }
    assert_key_order(&a);
    assert_key_order(&b);
}

#[tokio::test]
async fn a_member_lost_before_its_commit_has_its_events_redelivered_in_key_order() {
    let (_server, mut client, mut a, mut b) = two_members().await;
    append_keyed(&mut client, "s", 400, 16).await;
    let slot_of = |key: &str| pullstream::log::slot_of(key.as_bytes(), 0) as u32;
    let a_slots: BTreeSet<u32> = a.slots.iter().copied().collect();
    let of_a = |o: &u64| a_slots.contains(&slot_of(&format!("k{}", o % 16)));
    let a_total = (0..400u64).filter(|o| of_a(o)).count();
    within(a.until_events(a_total)).await;
    // a handled (and committed) what lies below 200, then dies.
    a.commit("s", "g", 200).await;
    drop(a);

    within(b.until_generation(3)).await;
    assert_eq!(b.slots.len(), 256, "b owns every slot now");
    let b_first = (0..400u64).filter(|o| !of_a(o)).count();
    let redelivered = (200..400u64).filter(|o| of_a(o)).count();
    within(b.until_events(b_first + redelivered)).await;
    let again: Vec<u64> = b
        .events
        .iter()
        .map(|(o, _)| *o)
        .filter(|o| of_a(o))
        .collect();
    assert_eq!(
        again,
        (200..400u64).filter(|o| of_a(o)).collect::<Vec<_>>(),
        "a's uncommitted events, once each, in order"
    );
    assert_key_order(&b);
}

#[tokio::test]
async fn keyless_events_spread_over_members() {
    let (_server, mut client, mut a, mut b) = two_members().await;
    append(
        &mut client,
        "s",
        (0..100).map(|i| event("tick", &i.to_string())).collect(),
    )
    .await;
    within(async {
        while a.events.len() + b.events.len() < 100 {
            if a.next_offset < 100 {
                a.read_one().await;
            }
            if b.next_offset < 100 {
                b.read_one().await;
            }
        }
    })
    .await;
    assert!(!a.events.is_empty() && !b.events.is_empty());
    let mut all: Vec<u64> = a.events.iter().chain(&b.events).map(|(o, _)| *o).collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_group_of_one_resumes_like_a_durable_consumer() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append_keyed(&mut client, "s", 50, 5).await;
    let mut solo = Member::join(&server, "s", "g", "solo").await;
    solo.until_events(50).await;
    assert_eq!(solo.slots.len(), 256);
    solo.commit("s", "g", 30).await;
    drop(solo);

    let server = server.restart().await;
    let mut client = server.client().await;
    append_keyed(&mut client, "s", 10, 5).await;
    let mut again = Member::join(&server, "s", "g", "solo").await;
    again.until_events(30).await;
    let offsets: Vec<u64> = again.events.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (30..60).collect::<Vec<_>>());
    let info = group_info(&mut client, "s", "g").await.unwrap();
    assert_eq!(info.low_watermark, 30);
    assert_eq!(info.members[0].member, "solo");
    assert_eq!(info.members[0].lag, 30);
}

#[tokio::test]
async fn bad_group_input_is_refused_and_a_duplicate_member_takes_over() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append_keyed(&mut client, "s", 10, 2).await;
    let refused = |request: pb::SubscribeRequest| {
        let mut client = client.clone();
        async move { client.subscribe(request).await.map(|_| ()).unwrap_err() }
    };
    let base = pb::SubscribeRequest {
        stream: "s".into(),
        ..Default::default()
    };
    for (request, says) in [
        (
            pb::SubscribeRequest {
                group: "g".into(),
                ..base.clone()
            },
            "member",
        ),
        (
            pb::SubscribeRequest {
                group: "g".into(),
                member: "m".into(),
                consumer: "c".into(),
                ..base.clone()
            },
            "not both",
        ),
        (
            pb::SubscribeRequest {
                member: "m".into(),
                ..base.clone()
            },
            "only meaningful with group",
        ),
        (
            pb::SubscribeRequest {
                group: "bad name".into(),
                member: "m".into(),
                ..base.clone()
            },
            "group name",
        ),
        (
            pb::SubscribeRequest {
                group: "g".into(),
                member: "".into(),
                ..base.clone()
            },
            "member",
        ),
    ] {
        let status = refused(request).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{says}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    assert_eq!(
        group_info(&mut client, "s", "g").await.unwrap_err().code(),
        Code::NotFound,
        "refused joins created no group"
    );

    let mut first = Member::join(&server, "s", "g", "m").await;
    first.until_events(10).await;
    let mut second = Member::join(&server, "s", "g", "m").await;
    let ended = end_status(&mut first).await;
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    second.until_events(10).await;

    let unknown = client
        .commit_group(pb::CommitGroupRequest {
            stream: "s".into(),
            group: "nope".into(),
            member: "m".into(),
            next_offset: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let stranger = client
        .commit_group(pb::CommitGroupRequest {
            stream: "s".into(),
            group: "g".into(),
            member: "stranger".into(),
            next_offset: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    assert!(stranger.message().contains("stranger"));
}

#[tokio::test]
async fn deleting_a_group_ends_its_members_and_a_new_join_starts_it_afresh() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append_keyed(&mut client, "s", 20, 4).await;
    let mut member = Member::join(&server, "s", "g", "m").await;
    member.until_events(20).await;
    member.commit("s", "g", 20).await;

    client
        .delete_group(pb::DeleteGroupRequest {
            stream: "s".into(),
            group: "g".into(),
        })
        .await
        .expect("delete");
    let ended = end_status(&mut member).await;
    assert_eq!(ended.code(), Code::Aborted);
    assert!(ended.message().contains("deleted"), "{}", ended.message());
    assert_eq!(
        group_info(&mut client, "s", "g").await.unwrap_err().code(),
        Code::NotFound
    );
    let again = client
        .delete_group(pb::DeleteGroupRequest {
            stream: "s".into(),
            group: "g".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // Joining again creates it at the start position: everything again.
    let mut fresh = Member::join(&server, "s", "g", "m").await;
    fresh.until_events(20).await;
    assert_eq!(fresh.events[0].0, 0);
    let server = server.restart().await;
    let mut client = server.client().await;
    assert_eq!(
        group_info(&mut client, "s", "g")
            .await
            .unwrap()
            .low_watermark,
        0,
        "the deleted group's commits did not come back"
    );
}

#[tokio::test]
async fn a_moved_slot_waits_until_its_old_owner_has_been_told() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "s").await;
    let mut a = Member::join_stalling(&server, "s", "g", "a").await;
    a.until_generation(1).await;
    fill_stalling(&mut client, "s").await;

    let mut b = Member::join(&server, "s", "g", "b").await;
    b.until_generation(2).await;
    assert_eq!(b.slots.len(), 128);
    // Every slot of b comes from the stalled a, which has not been told:
    // b delivers none of them (the handover deadline is 5 s away).
    let waited = tokio::time::timeout(std::time::Duration::from_secs(1), b.read_one()).await;
    assert!(
        waited.is_err() || b.events.is_empty(),
        "b delivered a moved slot before its old owner was told: {:?}",
        &b.events[..b.events.len().min(3)]
    );

    // a reads on and is told; then b starts its slots, from their committed
    // offset (0: nothing was committed).
    within(async {
        while a.revoked.is_empty() {
            a.read_one().await;
        }
    })
    .await;
    within(b.until_events(1)).await;
    let b_slots: BTreeSet<u32> = b.slots.iter().copied().collect();
    let slot_of = |key: &str| pullstream::log::slot_of(key.as_bytes(), 0) as u32;
    let first_of_b = (0..2000u64)
        .find(|o| b_slots.contains(&slot_of(&format!("k{}", o % 64))))
        .unwrap();
    assert_eq!(b.events[0].0, first_of_b);
}

async fn get_group(client: &mut Client, stream: &str, group: &str) -> pb::GroupInfo {
    client
        .get_group(pb::GetGroupRequest {
            stream: stream.into(),
            group: group.into(),
        })
        .await
        .expect("get group")
        .into_inner()
        .group
        .expect("group info")
}

async fn reset(
    client: &mut Client,
    stream: &str,
    group: &str,
    to: pb::reset_group_request::To,
) -> Result<pb::GroupInfo, tonic::Status> {
    client
        .reset_group(pb::ResetGroupRequest {
            stream: stream.into(),
            group: group.into(),
            to: Some(to),
        })
        .await
        .map(|r| r.into_inner().group.expect("group info"))
}

#[tokio::test]
async fn groups_are_listed_a_page_at_a_time_and_reset_only_while_idle() {
    use pb::reset_group_request::To;
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        let events: Vec<pb::NewEvent> = (0..6)
            .map(|i| event("t", &format!("{{\"i\":{i}}}")))
            .collect();
        append(&mut client, "s", events).await;
        // Three groups, created by a member joining each.
        for group in ["g1", "g2", "g3"] {
            let mut member = Member::join(&server, "s", group, "m").await;
            member.until_events(6).await;
            if group == "g1" {
                member.commit("s", group, 6).await;
            }
        }

        // Pages of two, in name order.
        let page = |token: &str| pb::ListGroupsRequest {
            stream: "s".into(),
            page_size: 2,
            page_token: token.into(),
        };
        let first = client.list_groups(page("")).await.unwrap().into_inner();
        let names: Vec<_> = first.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["g1", "g2"]);
        assert_eq!(first.next_page_token, "g2");
        assert_eq!(first.groups[0].low_watermark, 6);
        let second = client
            .list_groups(page(&first.next_page_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.groups.len(), 1);
        assert_eq!(second.groups[0].name, "g3");
        assert!(second.next_page_token.is_empty());
        let too_big = pb::ListGroupsRequest {
            page_size: 1001,
            ..page("")
        };
        assert_eq!(
            client.list_groups(too_big).await.unwrap_err().code(),
            Code::InvalidArgument
        );

        // A connected member blocks a reset, and is named.
        let mut member = Member::join(&server, "s", "g1", "worker-7").await;
        member.until_generation(1).await;
        let refused = reset(&mut client, "s", "g1", To::Offset(2))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains("worker-7"),
            "{}",
            refused.message()
        );
        assert_eq!(get_group(&mut client, "s", "g1").await.low_watermark, 6);
        drop(member);
        // The member leaves once its subscription is gone.
        while !get_group(&mut client, "s", "g1").await.members.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        // Rewind g1 to offset 2: a member joining again resumes there.
        let info = reset(&mut client, "s", "g1", To::Offset(2)).await.unwrap();
        assert_eq!(info.low_watermark, 2);
        let mut member = Member::join(&server, "s", "g1", "m").await;
        member.until_events(4).await;
        let offsets: Vec<u64> = member.events.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, [2, 3, 4, 5]);
        drop(member);
        while !get_group(&mut client, "s", "g1").await.members.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        // To the head, to the earliest event, and by time.
        let latest = To::Position(pb::StartPosition::Latest as i32);
        assert_eq!(
            reset(&mut client, "s", "g2", latest)
                .await
                .unwrap()
                .low_watermark,
            6
        );
        let earliest = To::Position(pb::StartPosition::Earliest as i32);
        assert_eq!(
            reset(&mut client, "s", "g2", earliest)
                .await
                .unwrap()
                .low_watermark,
            0
        );
        let future = prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        };
        assert_eq!(
            reset(&mut client, "s", "g2", To::Time(future))
                .await
                .unwrap()
                .low_watermark,
            6
        );
        let past = prost_types::Timestamp {
            seconds: 0,
            nanos: 0,
        };
        assert_eq!(
            reset(&mut client, "s", "g2", To::Time(past))
                .await
                .unwrap()
                .low_watermark,
            0
        );

        // Bad targets change nothing.
        let past_head = reset(&mut client, "s", "g3", To::Offset(7))
            .await
            .unwrap_err();
        assert_eq!(past_head.code(), Code::OutOfRange);
        assert_eq!(get_group(&mut client, "s", "g3").await.low_watermark, 0);
        let missing = reset(&mut client, "s", "nope", To::Offset(0))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        let unset = client
            .reset_group(pb::ResetGroupRequest {
                stream: "s".into(),
                group: "g3".into(),
                to: None,
            })
            .await
            .unwrap_err();
        assert_eq!(unset.code(), Code::InvalidArgument);

        // The reset is durable.
        let server = server.restart().await;
        let mut client = server.client().await;
        assert_eq!(get_group(&mut client, "s", "g1").await.low_watermark, 2);
    })
    .await;
}
