//! Append: dense ordered offsets, atomic batches, idempotency, optimistic
//! concurrency, durability across restarts.

use std::collections::HashMap;

use pullstream::proto as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_dense_and_ordered_under_many_concurrent_producers() {
    let server = TestServer::start().await;
    let producers = 32;
    let appends_per_producer = 40;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..appends_per_producer {
                // Batches of 1 to 3 events, each naming its producer and sequence.
                let size = 1 + (i % 3);
                let events = (0..size)
                    .map(|j| event("t", &format!(r#"{{"p":{p},"i":{i},"j":{j}}}"#)))
                    .collect();
                acks.push((i, append(&mut client, "orders", events).await));
            }
            (p, acks)
        }));
    }
    let mut ranges = Vec::new();
    let mut expected_data = HashMap::new();
    for task in tasks {
        let (p, acks) = within(task).await.unwrap();
        let mut last_first = None;
        for (i, ack) in acks {
            assert_eq!(ack.count, 1 + (i % 3));
            // One producer's appends are acknowledged in its own order.
            assert!(last_first < Some(ack.first_offset));
            last_first = Some(ack.first_offset);
            ranges.push((ack.first_offset, ack.count as u64));
            for j in 0..ack.count {
                expected_data.insert(
                    ack.first_offset + j as u64,
                    format!(r#"{{"p":{p},"i":{i},"j":{j}}}"#),
                );
            }
        }
    }
    // The acknowledged ranges tile 0..total with no gap and no overlap.
    ranges.sort();
    let mut next = 0;
    for (first, count) in &ranges {
        assert_eq!(*first, next, "gap or overlap at {first}");
        next += count;
    }
    let mut client = server.client().await;
    let events = read_all(&mut client, "orders").await;
    assert_eq!(events.len() as u64, next);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.offset, i as u64);
        assert_eq!(e.stream, "orders");
        assert_eq!(
            std::str::from_utf8(&e.data).unwrap(),
            expected_data[&e.offset]
        );
    }
    // Times never go backwards.
    for pair in events.windows(2) {
        let t = |e: &pb::Event| e.time.map(|t| (t.seconds, t.nanos)).unwrap();
        assert!(t(&pair[0]) <= t(&pair[1]));
    }
}

#[tokio::test]
async fn a_batch_gets_consecutive_offsets_and_one_time_or_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("first", "1")]).await;

    // One bad event rejects the whole batch: nothing is written.
    let mut bad = vec![event("ok", "1"), event("ok", "2"), event("", "3")];
    let status = client
        .append(pb::AppendRequest {
            stream: "s".into(),
            events: bad.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("event 2"), "{}", status.message());
    assert_eq!(read_all(&mut client, "s").await.len(), 1);

    bad[2].r#type = "ok".into();
    let ack = append(&mut client, "s", bad).await;
    assert_eq!((ack.first_offset, ack.count), (1, 3));
    let events = read_all(&mut client, "s").await;
    assert_eq!(events.len(), 4);
    for e in &events[1..] {
        assert_eq!(e.time, ack.time);
    }
    let data: Vec<_> = events.iter().map(|e| e.data.to_vec()).collect();
    assert_eq!(
        data,
        [b"1".to_vec(), b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]
    );
}

#[tokio::test]
async fn every_field_round_trips() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let sent = pb::NewEvent {
        r#type: "invoice.paid".into(),
        key: "in_123".into(),
        data: vec![0, 1, 2, 255].into(),
        content_type: "application/octet-stream".into(),
        metadata: [
            ("trace".to_string(), "abc".to_string()),
            ("b".into(), "".into()),
        ]
        .into(),
        ..Default::default()
    };
    append(&mut client, "s", vec![sent.clone()]).await;
    let got = &read_all(&mut client, "s").await[0];
    assert_eq!(got.r#type, sent.r#type);
    assert_eq!(got.key, sent.key);
    assert_eq!(got.data.to_vec(), sent.data);
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.metadata, sent.metadata);
    assert!(got.time.is_some());
}

#[tokio::test]
async fn idempotent_retry_returns_the_original_and_writes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("before", "0")]).await;
    let request = pb::AppendRequest {
        stream: "s".into(),
        events: vec![event("a", "1"), event("b", "2")],
        idempotency_key: "order-42".into(),
        ..Default::default()
    };
    let first = client.append(request.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let retry = client.append(request.clone()).await.unwrap().into_inner();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.first_offset, retry.count, retry.time),
        (first.first_offset, first.count, first.time)
    );
    assert_eq!(read_all(&mut client, "s").await.len(), 3);

    // The same key with a different batch is refused and writes nothing.
    let mut different = request.clone();
    different.events[1].data = b"changed".to_vec().into();
    let status = client.append(different).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("order-42"));

    // Concurrent retries of one new key: exactly one writes.
    let mut racing = request.clone();
    racing.idempotency_key = "race".into();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let mut c = server.client().await;
        let r = racing.clone();
        handles.push(tokio::spawn(async move {
            c.append(r).await.unwrap().into_inner()
        }));
    }
    let mut originals = 0;
    let mut firsts = Vec::new();
    for h in handles {
        let ack = h.await.unwrap();
        originals += usize::from(!ack.duplicate);
        firsts.push(ack.first_offset);
    }
    assert_eq!(originals, 1);
    assert!(firsts.iter().all(|f| *f == firsts[0]));
    assert_eq!(read_all(&mut client, "s").await.len(), 5);

    // Keys survive a restart.
    let server = server.restart().await;
    let mut client = server.client().await;
    let again = client.append(request).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.first_offset, first.first_offset);
    assert_eq!(read_all(&mut client, "s").await.len(), 5);
}

#[tokio::test]
async fn idempotency_keys_are_forgotten_after_the_window() {
    let server =
        TestServer::start_with(|c| c.idempotency_window = std::time::Duration::from_secs(3600))
            .await;
    let mut client = server.client().await;
    let request = pb::AppendRequest {
        stream: "s".into(),
        events: vec![event("a", "1")],
        idempotency_key: "k".into(),
        ..Default::default()
    };
    client.append(request.clone()).await.unwrap();
    let retry = client.append(request.clone()).await.unwrap().into_inner();
    assert!(retry.duplicate, "within the window a retry is a duplicate");
    // Two hours later (by the server's clock) the key is forgotten.
    server
        .config
        .clock
        .advance(std::time::Duration::from_secs(2 * 3600));
    let later = client.append(request).await.unwrap().into_inner();
    assert!(!later.duplicate);
    assert_eq!(later.first_offset, 1);
}

#[tokio::test]
async fn expected_next_offset_conflict_names_the_head_and_writes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let with_expected = |n: u64| pb::AppendRequest {
        stream: "s".into(),
        events: vec![event("a", "1")],
        expected_next_offset: Some(n),
        ..Default::default()
    };
    // 0 matches a stream that does not exist yet.
    client.append(with_expected(0)).await.unwrap();
    client.append(with_expected(1)).await.unwrap();
    let status = client.append(with_expected(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("next offset 2"),
        "{}",
        status.message()
    );
    let status = client.append(with_expected(7)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(read_all(&mut client, "s").await.len(), 2);
    assert_eq!(
        client
            .append(with_expected(2))
            .await
            .unwrap()
            .into_inner()
            .first_offset,
        2
    );
}

#[tokio::test]
async fn restart_keeps_every_event_and_continues_the_offsets() {
    for durability in [
        pullstream::config::Durability::Fsync,
        pullstream::config::Durability::Buffered,
    ] {
        let server = TestServer::start_with(|c| c.durability = durability).await;
        let mut client = server.client().await;
        for i in 0..10 {
            append(
                &mut client,
                "s",
                vec![event("a", &i.to_string()), event("b", "x")],
            )
            .await;
        }
        append(&mut client, "other", vec![event("a", "1")]).await;
        drop(client);
        let server = server.restart().await;
        let mut client = server.client().await;
        let ack = append(&mut client, "s", vec![event("after", "1")]).await;
        assert_eq!(ack.first_offset, 20, "{durability:?}");
        let events = read_all(&mut client, "s").await;
        assert_eq!(events.len(), 21);
        assert_eq!(std::str::from_utf8(&events[18].data).unwrap(), "9");
        assert_eq!(read_all(&mut client, "other").await.len(), 1);
    }
}

#[tokio::test]
async fn large_groups_are_split_into_chunks_and_read_back_whole() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // 1000 events of 1 KiB in one batch: far over one chunk.
    let payload = format!("\"{}\"", "x".repeat(1022));
    let events: Vec<_> = (0..1000).map(|_| event("big", &payload)).collect();
    append(&mut client, "s", events).await;
    // One event close to the maximum size.
    let huge = format!("\"{}\"", "y".repeat(1_000_000));
    append(&mut client, "s", vec![event("huge", &huge)]).await;
    let server = server.restart().await;
    let mut client = server.client().await;
    let events = read_all(&mut client, "s").await;
    assert_eq!(events.len(), 1001);
    assert!(events[..1000].iter().all(|e| e.data.len() == 1024));
    assert_eq!(events[1000].data.len(), 1_000_002);
}

/// An append a new stream would refuse (a precondition past 0, a fencing
/// token) does not create the stream it is refused on.
#[tokio::test]
async fn a_refused_append_to_a_missing_stream_creates_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let refused = [
        pb::AppendRequest {
            stream: "new".into(),
            events: vec![event("a", "{}")],
            expected_next_offset: Some(5),
            ..Default::default()
        },
        pb::AppendRequest {
            stream: "new".into(),
            events: vec![event("a", "{}")],
            fencing_token: "producer-2".into(),
            ..Default::default()
        },
    ];
    for request in refused {
        let status = client.append(request).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("nothing was written"),
            "{status:?}"
        );
        let missing = client
            .get_stream(pb::GetStreamRequest {
                stream: "new".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "the stream was not created");
    }
    // Expecting 0 matches a new stream: it is created and appended to.
    let ack = client
        .append(pb::AppendRequest {
            stream: "new".into(),
            events: vec![event("a", "{}")],
            expected_next_offset: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.first_offset, 0);
}
