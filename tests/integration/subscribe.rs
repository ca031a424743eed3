//! Subscribe: catch-up to live with no gap or duplicate, resume from the
//! cursor, heartbeats, slow subscribers, shutdown, deletion.

use std::time::Duration;

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;

use crate::common::*;

fn earliest() -> Option<Start> {
    Some(Start::Position(pb::StartPosition::Earliest as i32))
}

fn latest() -> Option<Start> {
    Some(Start::Position(pb::StartPosition::Latest as i32))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_switches_to_live_with_no_gap_or_duplicate() {
    let server = TestServer::start_with(|c| c.tail_cache_bytes = 16 << 10).await;
    let mut client = server.client().await;
    let total = 3000u64;
    // 500 stored before the subscriber starts; the rest while it catches up.
    for i in 0..50 {
        let events = (0..10)
            .map(|j| event("t", &(i * 10 + j).to_string()))
            .collect();
        append(&mut client, "s", events).await;
    }
    let mut producer = server.client().await;
    let writer = tokio::spawn(async move {
        for i in 50..(total / 10) {
            let events = (0..10)
                .map(|j| event("t", &(i * 10 + j).to_string()))
                .collect();
            append(&mut producer, "s", events).await;
        }
    });
    let mut stream = subscribe(&mut client, "s", None).await;
    let mut received = Vec::new();
    let mut last_next = 0;
    let mut saw_caught_up_at_end = false;
    while (received.len() as u64) < total {
        let r = next(&mut stream).await.unwrap();
        // The cursor always points right after what was delivered.
        let expected_next = last_next + r.events.len() as u64;
        assert_eq!(r.next_offset, expected_next);
        assert!(r.head_offset >= r.next_offset);
        assert_eq!(r.caught_up, r.next_offset == r.head_offset);
        last_next = r.next_offset;
        received.extend(r.events);
        saw_caught_up_at_end = r.caught_up;
    }
    within(writer).await.unwrap();
    for (i, e) in received.iter().enumerate() {
        assert_eq!(e.offset, i as u64, "gap or duplicate");
        assert_eq!(std::str::from_utf8(&e.data).unwrap(), i.to_string());
    }
    assert!(saw_caught_up_at_end);
}

/// Subscribers behind the tail cache read from storage off the async
/// workers and read the next chunks ahead while a response is sent: with
/// small responses (many reads ahead per subscriber, most of them starting
/// inside a chunk) and several subscribers at once from different offsets,
/// each still gets exactly its range, in order, with the right payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_reading_ahead_from_storage_get_every_event_once() {
    let server = TestServer::start_with(|c| c.tail_cache_bytes = 16 << 10).await;
    let mut client = server.client().await;
    let total = 6000u64;
    for i in 0..(total / 100) {
        let events = (0..100)
            .map(|j| event("t", &(i * 100 + j).to_string()))
            .collect();
        append(&mut client, "s", events).await;
    }
    let mut readers = Vec::new();
    for (from, batch) in [(0u64, 37u32), (1234, 100), (4999, 1), (5990, 1000)] {
        let mut client = server.client().await;
        readers.push(tokio::spawn(async move {
            let mut stream = client
                .subscribe(pb::SubscribeRequest {
                    stream: "s".into(),
                    start: Some(Start::Offset(from)),
                    max_batch_events: batch,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let events = collect(&mut stream, (total - from) as usize).await;
            (from, events)
        }));
    }
    for reader in readers {
        let (from, events) = within(reader).await.unwrap();
        assert_eq!(events.len() as u64, total - from);
        for (i, e) in events.iter().enumerate() {
            let offset = from + i as u64;
            assert_eq!(e.offset, offset, "gap or duplicate reading from {from}");
            assert_eq!(std::str::from_utf8(&e.data).unwrap(), offset.to_string());
        }
    }
}

#[tokio::test]
async fn resume_from_next_offset_after_dropping_a_subscription() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..20 {
        append(&mut client, "s", vec![event("t", &i.to_string())]).await;
    }
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            stream: "s".into(),
            start: earliest(),
            max_batch_events: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.events.len(), 7);
    assert_eq!(first.next_offset, 7);
    drop(stream);
    append(&mut client, "s", vec![event("t", "20")]).await;
    let mut stream = subscribe(&mut client, "s", Some(Start::Offset(first.next_offset))).await;
    let rest = collect(&mut stream, 14).await;
    let offsets: Vec<u64> = rest.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (7..21).collect::<Vec<_>>());

    // Resuming exactly at the head waits for new events.
    let mut at_head = subscribe(&mut client, "s", Some(Start::Offset(21))).await;
    let hello = next(&mut at_head).await.unwrap();
    assert!(hello.events.is_empty() && hello.caught_up);
    append(&mut client, "s", vec![event("t", "21")]).await;
    assert_eq!(collect(&mut at_head, 1).await[0].offset, 21);
}

#[tokio::test]
async fn latest_starts_at_the_head_and_earliest_at_the_start() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("old", "1"), event("old", "2")]).await;
    let mut live = subscribe(&mut client, "s", latest()).await;
    let hello = next(&mut live).await.unwrap();
    assert_eq!((hello.next_offset, hello.head_offset), (2, 2));
    append(&mut client, "s", vec![event("new", "3")]).await;
    let got = collect(&mut live, 1).await;
    assert_eq!((got[0].offset, got[0].r#type.as_str()), (2, "new"));
    let mut all = subscribe(&mut client, "s", earliest()).await;
    assert_eq!(collect(&mut all, 3).await[0].offset, 0);
}

#[tokio::test]
async fn first_response_is_immediate_and_idle_streams_get_heartbeats() {
    let server =
        TestServer::start_with(|c| c.heartbeat_interval = Duration::from_millis(200)).await;
    let mut client = server.client().await;
    append(&mut client, "idle", vec![event("t", "1")]).await;
    let mut stream = subscribe(&mut client, "idle", latest()).await;
    let hello = next(&mut stream).await.unwrap();
    assert!(hello.events.is_empty());
    assert!(hello.caught_up);
    for _ in 0..3 {
        let beat = next(&mut stream).await.unwrap();
        assert!(beat.events.is_empty(), "heartbeat carries no events");
        assert_eq!((beat.next_offset, beat.head_offset), (1, 1));
        assert!(beat.caught_up);
        assert!(beat.server_time.unwrap().seconds > 1_700_000_000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_delays_neither_writers_nor_other_subscribers() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "0")]).await;
    // This subscriber never reads after its first message: HTTP/2 flow
    // control and the bounded buffer must hold it back on its own.
    let mut stalled_client = server.client().await;
    let mut stalled = subscribe(&mut stalled_client, "s", earliest()).await;
    next(&mut stalled).await.unwrap();

    let mut healthy = subscribe(&mut client, "s", earliest()).await;
    let payload = format!("\"{}\"", "z".repeat(16 << 10));
    let appends = 400u64; // 400 x 4 x 16 KiB = 25 MiB: far beyond any window
    let mut producer = server.client().await;
    let writer = tokio::spawn(async move {
        for _ in 0..appends {
            let events = (0..4).map(|_| event("t", &payload)).collect();
            append(&mut producer, "s", events).await;
        }
    });
    let received = collect(&mut healthy, (1 + appends * 4) as usize).await;
    assert_eq!(received.last().unwrap().offset, appends * 4);
    within(writer).await.unwrap();
    drop(stalled);
}

#[tokio::test]
async fn graceful_shutdown_ends_subscriptions_with_unavailable() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1")]).await;
    let mut stream = subscribe(&mut client, "s", earliest()).await;
    collect(&mut stream, 1).await;
    let stopping = tokio::spawn(server.stop());
    let status = ending_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("shutting down"));
    within(stopping).await.unwrap();
}

/// Reads a subscription until it ends, returning the status it ended with.
async fn ending_status(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> tonic::Status {
    loop {
        match within(stream.message()).await {
            Ok(Some(_)) => continue,
            Err(status) => return status,
            Ok(None) => panic!("subscription ended without a status"),
        }
    }
}

#[tokio::test]
async fn deleting_a_stream_ends_its_subscriptions_with_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1")]).await;
    let mut stream = subscribe(&mut client, "s", earliest()).await;
    collect(&mut stream, 1).await;
    client
        .delete_stream(pb::DeleteStreamRequest { stream: "s".into() })
        .await
        .unwrap();
    let status = ending_status(&mut stream).await;
    assert_eq!(status.code(), Code::NotFound);
    // A new stream of the same name starts again at 0, without old events.
    let ack = append(&mut client, "s", vec![event("t", "new")]).await;
    assert_eq!(ack.first_offset, 0);
    let events = read_all(&mut client, "s").await;
    assert_eq!(events.len(), 1);
    assert_eq!(&events[0].data[..], b"new");
}

/// The Rust client's resuming subscription: across a server restart it
/// reconnects and resumes from its cursor, so every event arrives exactly
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_subscription_sees_every_event_once_across_a_restart() {
    use pullstream::client::ConnectOptions;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(
        &mut client,
        "s",
        (0..5).map(|i| event("t", &i.to_string())).collect(),
    )
    .await;
    let options = ConnectOptions {
        server: format!("http://{}", server.addr),
        ..Default::default()
    };
    let mut sub = options.subscribe_resuming(pb::SubscribeRequest {
        stream: "s".into(),
        start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
        ..Default::default()
    });
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let response = within(sub.next()).await.unwrap();
        seen.extend(response.events.iter().map(|e| e.offset));
    }
    let server = server.restart_on_same_port().await;
    let mut client = server.client().await;
    append(
        &mut client,
        "s",
        (5..10).map(|i| event("t", &i.to_string())).collect(),
    )
    .await;
    while seen.len() < 10 {
        let response = within(sub.next()).await.unwrap();
        seen.extend(response.events.iter().map(|e| e.offset));
    }
    assert_eq!(seen, (0..10).collect::<Vec<u64>>());
    assert!(sub.reconnects >= 1, "it reconnected");
}

/// A status no reconnect can fix ends a resuming subscription at once.
#[tokio::test]
async fn a_resuming_subscription_ends_on_a_status_no_reconnect_fixes() {
    use pullstream::client::ConnectOptions;
    let server = TestServer::start().await;
    let options = ConnectOptions {
        server: format!("http://{}", server.addr),
        ..Default::default()
    };
    let mut sub = options.subscribe_resuming(pb::SubscribeRequest {
        stream: "missing".into(),
        ..Default::default()
    });
    let status = within(sub.next()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(sub.reconnects, 0);
}
