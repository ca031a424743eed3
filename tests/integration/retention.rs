//! Retention: trimming by count, age and size; the first retained offset
//! moving up without reusing offsets; readers, subscribers and consumer
//! cursors below it getting OUT_OF_RANGE (never a silent skip); UpdateStream
//! and its bad input.

use std::time::Duration;

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;

use crate::common::*;

fn policy(max_age: Option<Duration>, max_events: u64, max_bytes: u64) -> pb::RetentionPolicy {
    pb::RetentionPolicy {
        max_age: max_age.map(|d| d.try_into().expect("duration")),
        max_events,
        max_bytes,
    }
}

async fn create(client: &mut Client, stream: &str, retention: Option<pb::RetentionPolicy>) {
    client
        .create_stream(pb::CreateStreamRequest {
            stream: stream.into(),
            retention,
        })
        .await
        .expect("create stream");
}

async fn update(
    client: &mut Client,
    stream: &str,
    retention: Option<pb::RetentionPolicy>,
) -> Result<pb::StreamInfo, tonic::Status> {
    client
        .update_stream(pb::UpdateStreamRequest {
            stream: stream.into(),
            retention,
        })
        .await
        .map(|r| r.into_inner().stream.expect("stream info"))
}

async fn info(client: &mut Client, stream: &str) -> pb::StreamInfo {
    client
        .get_stream(pb::GetStreamRequest {
            stream: stream.into(),
        })
        .await
        .expect("get stream")
        .into_inner()
        .stream
        .expect("stream info")
}

/// Appends `batches` batches of `per_batch` events of about `size` bytes,
/// one Append each (so each batch is a chunk of its own when small).
async fn fill(client: &mut Client, stream: &str, batches: usize, per_batch: usize, size: usize) {
    let data = format!("\"{}\"", "x".repeat(size));
    for _ in 0..batches {
        append(
            client,
            stream,
            (0..per_batch).map(|_| event("tick", &data)).collect(),
        )
        .await;
    }
}

/// Polls GetStream until `done` holds (the housekeeping task runs every
/// second); fails after 30 s (a deadlock guard, not a timing assertion).
async fn wait_for(
    client: &mut Client,
    stream: &str,
    done: impl Fn(&pb::StreamInfo) -> bool,
) -> pb::StreamInfo {
    for _ in 0..300 {
        let info = info(client, stream).await;
        if done(&info) {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "retention did not act within 30s: {:?}",
        info(client, stream).await
    );
}

async fn read_from(
    client: &mut Client,
    stream: &str,
    offset: u64,
) -> Result<pb::ReadResponse, tonic::Status> {
    client
        .read(pb::ReadRequest {
            stream: stream.into(),
            offset,
            limit: 1000,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn count_retention_keeps_the_newest_events_and_never_reuses_offsets() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "s", Some(policy(None, 100, 0))).await;
    // 100 appends of 10 events: 100 chunks of 10.
    fill(&mut client, "s", 100, 10, 20).await;

    let trimmed = wait_for(&mut client, "s", |i| i.first_offset >= 900).await;
    // Whole chunks only, and never below the promised 100 events.
    assert_eq!(trimmed.first_offset, 900, "{trimmed:?}");
    assert_eq!(trimmed.event_count, 100);
    assert_eq!(trimmed.retention, Some(policy(None, 100, 0)));

    let below = read_from(&mut client, "s", 899).await.unwrap_err();
    assert_eq!(below.code(), Code::OutOfRange);
    assert!(
        below.message().contains("first retained offset is 900"),
        "{}",
        below.message()
    );
    let page = read_from(&mut client, "s", 900).await.unwrap();
    let offsets: Vec<u64> = page.events.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (900..1000).collect::<Vec<_>>());

    // Offsets continue from the head, and the trim survives a restart.
    let ack = append(&mut client, "s", vec![event("tick", "1")]).await;
    assert_eq!(ack.first_offset, 1000);
    let server = server.restart().await;
    let mut client = server.client().await;
    let after = info(&mut client, "s").await;
    assert!(after.first_offset >= 900, "{after:?}");
    assert_eq!(after.next_offset, 1001);
    assert_eq!(after.retention, Some(policy(None, 100, 0)));
    let mut sub = subscribe(
        &mut client,
        "s",
        Some(Start::Position(pb::StartPosition::Earliest as i32)),
    )
    .await;
    let events = collect(&mut sub, (1001 - after.first_offset) as usize).await;
    assert_eq!(events[0].offset, after.first_offset);
    assert_eq!(events.last().unwrap().offset, 1000);
}

#[tokio::test]
async fn age_retention_trims_old_events_and_a_new_event_continues_the_offsets() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(
        &mut client,
        "aged",
        Some(policy(Some(Duration::from_secs(3600)), 0, 0)),
    )
    .await;
    fill(&mut client, "aged", 5, 4, 10).await;
    // Two hours later by the server's clock, every event is past the age.
    server.config.clock.advance(Duration::from_secs(2 * 3600));
    let empty = wait_for(&mut client, "aged", |i| i.first_offset == 20).await;
    assert_eq!(empty.event_count, 0);
    assert_eq!(empty.next_offset, 20);
    let ack = append(&mut client, "aged", vec![event("tick", "2")]).await;
    assert_eq!(ack.first_offset, 20);
    let mut sub = subscribe(
        &mut client,
        "aged",
        Some(Start::Position(pb::StartPosition::Earliest as i32)),
    )
    .await;
    let events = collect(&mut sub, 1).await;
    assert_eq!(events[0].offset, 20);
}

#[tokio::test]
async fn size_retention_keeps_at_least_the_limit_in_bytes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let limit = 1 << 20;
    create(&mut client, "sized", Some(policy(None, 0, limit))).await;
    // About 3 MiB in 1 KiB events.
    fill(&mut client, "sized", 30, 100, 1000).await;
    let before = info(&mut client, "sized").await;
    // About 3 MiB stored, unless retention already began trimming while
    // the stream filled (a slower engine gives it the time).
    assert!(
        before.approximate_bytes > 3 * limit - limit / 4 || before.first_offset > 0,
        "{before:?}"
    );
    // Each chunk holds at most about 8 KiB: it stops within a chunk of the
    // limit (in one pass, or in several when trimming began while the
    // stream filled), and never below it.
    let trimmed = wait_for(&mut client, "sized", |i| {
        i.approximate_bytes <= limit + (16 << 10)
    })
    .await;
    assert!(trimmed.approximate_bytes >= limit, "{trimmed:?}");
    assert!(trimmed.first_offset > 0);
    let page = read_from(&mut client, "sized", trimmed.first_offset)
        .await
        .unwrap();
    assert_eq!(page.events[0].offset, trimmed.first_offset);
}

#[tokio::test]
async fn update_stream_tightens_and_clears_the_policy_and_rejects_bad_limits() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    fill(&mut client, "u", 20, 5, 10).await;
    assert_eq!(info(&mut client, "u").await.retention, None);

    // Bad input: a clear status and no change.
    for (bad, what) in [
        (policy(Some(Duration::from_millis(500)), 0, 0), "max_age"),
        (policy(None, 0, 1000), "max_bytes"),
    ] {
        let status = update(&mut client, "u", Some(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        assert!(status.message().contains(what), "{}", status.message());
    }
    let negative = pb::RetentionPolicy {
        max_age: Some(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        }),
        ..Default::default()
    };
    let status = update(&mut client, "u", Some(negative)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .create_stream(pb::CreateStreamRequest {
            stream: "bad".into(),
            retention: Some(policy(None, 0, 10)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = update(&mut client, "missing", Some(policy(None, 5, 0)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["u"], "rejected calls created nothing");
    let unchanged = info(&mut client, "u").await;
    assert_eq!((unchanged.first_offset, unchanged.retention), (0, None));

    let updated = update(&mut client, "u", Some(policy(None, 10, 0)))
        .await
        .unwrap();
    assert_eq!(updated.retention, Some(policy(None, 10, 0)));
    let trimmed = wait_for(&mut client, "u", |i| i.first_offset == 90).await;
    assert_eq!(trimmed.event_count, 10);

    // Clearing keeps everything from now on; trimmed events stay gone.
    let cleared = update(&mut client, "u", None).await.unwrap();
    assert_eq!(cleared.retention, None);
    fill(&mut client, "u", 10, 5, 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = info(&mut client, "u").await;
    assert_eq!((kept.first_offset, kept.next_offset), (90, 150));
}

#[tokio::test]
async fn a_subscriber_overtaken_by_trimming_gets_out_of_range_after_a_gapless_prefix() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // 400 chunks of 5 events of about 1 KiB.
    fill(&mut client, "race", 400, 5, 1000).await;
    // Its own connection, with small HTTP/2 windows: a stalled reader
    // holds only a few dozen events in flight, so trimming overtakes it.
    let mut reader = pb::event_log_client::EventLogClient::new(server.stalling_channel().await);
    let mut sub = reader
        .subscribe(pb::SubscribeRequest {
            stream: "race".into(),
            start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
            max_batch_events: 1,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = next(&mut sub).await.expect("first message");
    let mut expected = 0;
    for e in &first.events {
        assert_eq!(e.offset, expected);
        expected += 1;
    }
    // The subscriber stalls while retention trims all but the last 50.
    update(&mut client, "race", Some(policy(None, 50, 0)))
        .await
        .unwrap();
    wait_for(&mut client, "race", |i| i.first_offset >= 1950).await;
    let status = loop {
        match next(&mut sub).await {
            Ok(message) => {
                assert!(
                    message.next_offset < 2000,
                    "the subscriber read to the head: it was never overtaken"
                );
                for e in &message.events {
                    assert_eq!(e.offset, expected, "a gap in delivery");
                    expected += 1;
                }
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("first retained offset is 1950"),
        "{}",
        status.message()
    );
    assert!(expected < 1950, "the stalled subscriber was overtaken");
}

#[tokio::test]
async fn a_consumer_cursor_overtaken_by_trimming_is_reported_and_can_move_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    fill(&mut client, "c", 50, 2, 10).await;
    for (name, cursor) in [("behind", 4), ("current", 100)] {
        client
            .commit_cursor(pb::CommitCursorRequest {
                stream: "c".into(),
                consumer: name.into(),
                next_offset: cursor,
                ..Default::default()
            })
            .await
            .expect("commit");
    }
    update(&mut client, "c", Some(policy(None, 10, 0)))
        .await
        .unwrap();
    let trimmed = wait_for(&mut client, "c", |i| i.first_offset == 90).await;
    let consumers = client
        .list_consumers(pb::ListConsumersRequest {
            stream: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    let flags: Vec<_> = consumers
        .iter()
        .map(|c| (c.name.as_str(), c.cursor_trimmed, c.lag))
        .collect();
    assert_eq!(flags, [("behind", true, 96), ("current", false, 0)]);

    let status = client
        .subscribe(pb::SubscribeRequest {
            stream: "c".into(),
            consumer: "behind".into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("first retained offset is 90"),
        "{}",
        status.message()
    );

    // Accepting the loss: commit the first retained offset, then resume.
    let moved = client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "c".into(),
            consumer: "behind".into(),
            next_offset: trimmed.first_offset,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .consumer
        .unwrap();
    assert!(!moved.cursor_trimmed);
    let mut sub = client
        .subscribe(pb::SubscribeRequest {
            stream: "c".into(),
            consumer: "behind".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let events = collect(&mut sub, 10).await;
    assert_eq!(events[0].offset, 90);
}
