//! Durable consumers: server-side cursors, at-least-once resume, takeover,
//! commit bounds, lag, and deletion.

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;
use tonic::Streaming;

use crate::common::*;

pub(crate) fn events(n: usize, prefix: &str) -> Vec<pb::NewEvent> {
    (0..n)
        .map(|i| event("order.created", &format!("{{\"{prefix}\":{i}}}")))
        .collect()
}

pub(crate) async fn subscribe_as(
    client: &mut Client,
    stream: &str,
    consumer: &str,
    start: Option<Start>,
) -> Result<Streaming<pb::SubscribeResponse>, tonic::Status> {
    client
        .subscribe(pb::SubscribeRequest {
            stream: stream.into(),
            consumer: consumer.into(),
            start,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn commit(
    client: &mut Client,
    stream: &str,
    consumer: &str,
    next_offset: u64,
) -> Result<pb::ConsumerInfo, tonic::Status> {
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: stream.into(),
            consumer: consumer.into(),
            next_offset,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().consumer.expect("consumer info"))
}

/// Reads a subscription to its end and returns the status it ended with.
pub(crate) async fn end_status(sub: &mut Streaming<pb::SubscribeResponse>) -> tonic::Status {
    loop {
        if let Err(status) = next(sub).await {
            return status;
        }
    }
}

pub(crate) async fn list_consumers(client: &mut Client, stream: &str) -> Vec<pb::ConsumerInfo> {
    client
        .list_consumers(pb::ListConsumersRequest {
            stream: stream.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .consumers
}

pub(crate) async fn get_consumer(
    client: &mut Client,
    stream: &str,
    consumer: &str,
) -> Result<pb::ConsumerInfo, tonic::Status> {
    client
        .get_consumer(pb::GetConsumerRequest {
            stream: stream.into(),
            consumer: consumer.into(),
        })
        .await
        .map(|r| r.into_inner().consumer.expect("consumer info"))
}

#[tokio::test]
async fn a_consumer_resumes_from_its_committed_cursor_across_restarts() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "orders", events(10, "a")).await;

        // A new consumer starts at the requested start position (offset 3).
        let mut sub = subscribe_as(&mut client, "orders", "billing", Some(Start::Offset(3)))
            .await
            .unwrap();
        let got = collect(&mut sub, 7).await;
        assert_eq!(got[0].offset, 3);
        // Handle the first four, commit after them, then "crash".
        commit(&mut client, "orders", "billing", 7).await.unwrap();
        drop(sub);

        let server = server.restart().await;
        let mut client = server.client().await;
        append(&mut client, "orders", events(2, "b")).await;
        // The start position is ignored for an existing consumer (even one
        // past the head): it resumes at its cursor, and the uncommitted
        // 7..10 come again.
        let mut sub = subscribe_as(&mut client, "orders", "billing", Some(Start::Offset(999)))
            .await
            .unwrap();
        let got = collect(&mut sub, 5).await;
        let offsets: Vec<u64> = got.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![7, 8, 9, 10, 11]);

        let info = get_consumer(&mut client, "orders", "billing")
            .await
            .unwrap();
        assert_eq!(info.next_offset, 7);
        assert_eq!(info.lag, 5);
        assert!(info.active, "a subscription is open");
        assert!(info.last_commit_time.is_some());
        drop(sub);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_new_subscription_of_the_same_consumer_takes_over() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(3, "x")).await;
        let mut old = subscribe_as(&mut client, "s", "worker", None)
            .await
            .unwrap();
        collect(&mut old, 3).await;
        let mut new = subscribe_as(&mut client, "s", "worker", None)
            .await
            .unwrap();
        collect(&mut new, 3).await;
        // The older one ends with ABORTED (after any message in flight).
        let status = end_status(&mut old).await;
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(
            status.message().contains("taken over"),
            "{}",
            status.message()
        );
        // The newer one keeps working.
        append(&mut client, "s", events(1, "y")).await;
        let got = collect(&mut new, 1).await;
        assert_eq!(got[0].offset, 3);
        // Another consumer on the same stream is unaffected by both.
        let mut other = subscribe_as(&mut client, "s", "other", None).await.unwrap();
        assert_eq!(collect(&mut other, 4).await.len(), 4);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn commits_may_rewind_but_not_leave_the_retained_range() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(5, "x")).await;
        assert_eq!(commit(&mut client, "s", "c", 5).await.unwrap().lag, 0);
        // A deliberate rewind.
        let info = commit(&mut client, "s", "c", 1).await.unwrap();
        assert_eq!((info.next_offset, info.lag), (1, 4));
        // Past the head: OUT_OF_RANGE, and nothing changes.
        let status = commit(&mut client, "s", "c", 6).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(
            status.message().contains("next offset is 5"),
            "{}",
            status.message()
        );
        assert_eq!(
            get_consumer(&mut client, "s", "c")
                .await
                .unwrap()
                .next_offset,
            1
        );
        // Bad names and unknown streams.
        let status = commit(&mut client, "s", "bad name!", 0).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = commit(&mut client, "s", &"x".repeat(201), 0)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = commit(&mut client, "nope", "c", 0).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = get_consumer(&mut client, "s", "missing").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn list_consumers_reports_cursors_and_lag_and_delete_ends_the_subscription() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(10, "x")).await;
        commit(&mut client, "s", "b", 4).await.unwrap();
        commit(&mut client, "s", "a", 10).await.unwrap();
        let mut sub = subscribe_as(&mut client, "s", "b", None).await.unwrap();
        collect(&mut sub, 6).await;

        let list = list_consumers(&mut client, "s").await;
        let summary: Vec<(String, u64, u64)> = list
            .iter()
            .map(|c| (c.name.clone(), c.next_offset, c.lag))
            .collect();
        assert_eq!(summary, vec![("a".into(), 10, 0), ("b".into(), 4, 6)]);

        client
            .delete_consumer(pb::DeleteConsumerRequest {
                stream: "s".into(),
                consumer: "b".into(),
            })
            .await
            .unwrap();
        let status = end_status(&mut sub).await;
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.message().contains("deleted"), "{}", status.message());
        let status = client
            .delete_consumer(pb::DeleteConsumerRequest {
                stream: "s".into(),
                consumer: "b".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);

        // Consumers survive a restart; deleting the stream removes them.
        let server = server.restart().await;
        let mut client = server.client().await;
        assert_eq!(
            get_consumer(&mut client, "s", "a")
                .await
                .unwrap()
                .next_offset,
            10
        );
        let mut sub = subscribe_as(&mut client, "s", "a", None).await.unwrap();
        next(&mut sub).await.unwrap();
        client
            .delete_stream(pb::DeleteStreamRequest { stream: "s".into() })
            .await
            .unwrap();
        // Its subscriptions end as any subscriber's do: NOT_FOUND.
        assert_eq!(end_status(&mut sub).await.code(), Code::NotFound);
        append(&mut client, "s", events(1, "new")).await;
        let status = get_consumer(&mut client, "s", "a").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_commits_all_land_and_the_last_one_wins() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(100, "x")).await;
        let mut tasks = Vec::new();
        for c in 0..20 {
            let mut client = server.client().await;
            tasks.push(tokio::spawn(async move {
                for offset in 0..=50u64 {
                    commit(&mut client, "s", &format!("c{c}"), offset * 2)
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let server = server.restart().await;
        let mut client = server.client().await;
        let list = list_consumers(&mut client, "s").await;
        assert_eq!(list.len(), 20);
        assert!(list.iter().all(|c| c.next_offset == 100 && c.lag == 0));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_start_creates_no_consumer() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(3, "x")).await;
        let status = subscribe_as(&mut client, "s", "c", Some(Start::Offset(4)))
            .await
            .expect_err("a start past the head is refused");
        assert_eq!(status.code(), Code::OutOfRange);
        let status = client
            .get_consumer(pb::GetConsumerRequest {
                stream: "s".into(),
                consumer: "c".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "a refused start creates nothing"
        );
        server.stop().await;
    })
    .await;
}

/// A stalled subscriber that is taken over still learns why its stream
/// ended: the final status has a slot of its own in the response buffer,
/// so it arrives after what was already queued, never as a clean end.
#[tokio::test]
async fn a_stalled_subscriber_taken_over_still_gets_its_final_status() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        let big = "x".repeat(1000);
        for _ in 0..4 {
            append(&mut client, "s", events(100, &big)).await;
        }
        let mut stalled_client =
            pb::event_log_client::EventLogClient::new(server.stalling_channel().await);
        let mut old = stalled_client
            .subscribe(pb::SubscribeRequest {
                stream: "s".into(),
                consumer: "worker".into(),
                max_batch_events: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        next(&mut old).await.unwrap();
        // Let the server side fill the windows and its buffer and block.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut new = subscribe_as(&mut client, "s", "worker", None)
            .await
            .unwrap();
        next(&mut new).await.unwrap();
        let status = loop {
            match old.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended cleanly: the final status was lost"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
    })
    .await;
}

#[tokio::test]
async fn lag_in_time_is_the_age_of_the_oldest_event_not_passed() {
    within(async {
        let server = TestServer::start_with(|c| {
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            c.metrics_stream_labels = true;
        })
        .await;
        let mut client = server.client().await;
        append(&mut client, "s", events(3, "old")).await;
        let appended = pullstream::clock::system_now_unix_nanos();
        // Two hours later (by the server's clock) three more arrive.
        server
            .config
            .clock
            .advance(std::time::Duration::from_secs(2 * 3600));
        append(&mut client, "s", events(3, "new")).await;
        commit(&mut client, "s", "behind", 1).await.unwrap();
        commit(&mut client, "s", "recent", 3).await.unwrap();
        commit(&mut client, "s", "done", 6).await.unwrap();

        let list = list_consumers(&mut client, "s").await;
        let by_name = |name: &str| list.iter().find(|c| c.name == name).unwrap().clone();
        // The event at offset 1 was appended two hours before "now".
        let behind = by_name("behind");
        let age = behind.lag_time.unwrap();
        assert!((2 * 3600..2 * 3600 + 60).contains(&age.seconds), "{age:?}");
        let since = behind.oldest_pending_time.unwrap();
        assert!((since.seconds - appended / 1_000_000_000).abs() <= 60);
        // The event at offset 3 is new: seconds old, not hours.
        let recent = by_name("recent");
        assert!(recent.lag_time.unwrap().seconds < 60);
        // No lag: no lag in time.
        let done = by_name("done");
        assert_eq!(done.lag, 0);
        assert!(done.lag_time.is_none() && done.oldest_pending_time.is_none());
        // GetConsumer and the status say the same.
        let got = get_consumer(&mut client, "s", "behind").await.unwrap();
        assert!(got.lag_time.unwrap().seconds >= 2 * 3600);
        let status = client
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let in_status = &status.streams[0].consumers;
        assert!(in_status
            .iter()
            .any(|c| c.name == "behind" && c.lag_time.unwrap().seconds >= 2 * 3600));

        // The metrics carry it in seconds.
        let (_, text) =
            crate::operability::http_get(server.metrics_addr.unwrap(), "/metrics").await;
        let seconds: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("pullstream_consumer_lag_seconds{stream=\"s\",consumer=\"behind\"} ")
            })
            .unwrap_or_else(|| panic!("no lag seconds in:\n{text}"))
            .parse()
            .unwrap();
        assert!(seconds >= 7200.0, "{seconds}");
        assert!(text.contains("pullstream_consumer_lag_seconds{stream=\"s\",consumer=\"done\"} 0"));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn consumers_are_listed_a_page_at_a_time() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(2, "x")).await;
        for name in ["e", "a", "d", "b", "c"] {
            commit(&mut client, "s", name, 1).await.unwrap();
        }
        let page = |token: &str| pb::ListConsumersRequest {
            stream: "s".into(),
            page_size: 2,
            page_token: token.into(),
        };
        let mut names = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let response = client
                .list_consumers(page(&token))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(response.consumers.len() <= 2);
            names.extend(response.consumers.into_iter().map(|c| c.name));
            if response.next_page_token.is_empty() {
                break;
            }
            token = response.next_page_token;
        }
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        assert_eq!(pages, 3);
        // The default page holds them all; an oversized page is refused.
        assert_eq!(list_consumers(&mut client, "s").await.len(), 5);
        let too_big = pb::ListConsumersRequest {
            page_size: 1001,
            ..page("")
        };
        let status = client.list_consumers(too_big).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn a_commit_can_clear_saved_settings_and_rewind_by_time() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", events(3, "old")).await;
        let old = pullstream::clock::system_now_unix_nanos();
        // Two hours later (by the server's clock), three more.
        server
            .config
            .clock
            .advance(std::time::Duration::from_secs(2 * 3600));
        append(&mut client, "s", events(3, "new")).await;

        // A subscription saves a filter and a version.
        let sub = client
            .subscribe(pb::SubscribeRequest {
                stream: "s".into(),
                consumer: "c".into(),
                filter: Some(pb::EventFilter {
                    types: vec!["order.*".into()],
                    keys: vec![],
                }),
                version: "v2".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        drop(sub);
        let saved = get_consumer(&mut client, "s", "c").await.unwrap();
        assert_eq!(saved.filter.unwrap().types, ["order.*"]);
        assert_eq!(saved.version, "v2");

        let commit_with = |request: pb::CommitCursorRequest| {
            let mut client = client.clone();
            async move {
                client
                    .commit_cursor(request)
                    .await
                    .map(|r| r.into_inner().consumer.unwrap())
            }
        };
        let base = pb::CommitCursorRequest {
            stream: "s".into(),
            consumer: "c".into(),
            ..Default::default()
        };
        // An hour after the first three: the cursor lands on the first new one.
        let hour_later = prost_types::Timestamp {
            seconds: old / 1_000_000_000 + 3600,
            nanos: 0,
        };
        let at_time = commit_with(pb::CommitCursorRequest {
            time: Some(hour_later),
            next_offset: 5, // ignored with a time
            clear_filter: true,
            ..base.clone()
        })
        .await
        .unwrap();
        assert_eq!(at_time.next_offset, 3);
        assert!(at_time.filter.is_none(), "{:?}", at_time.filter);
        assert_eq!(at_time.version, "v2", "only the filter was cleared");
        // Before everything: the first event; after everything: the head.
        let epoch = prost_types::Timestamp {
            seconds: 0,
            nanos: 0,
        };
        let first = commit_with(pb::CommitCursorRequest {
            time: Some(epoch),
            ..base.clone()
        })
        .await
        .unwrap();
        assert_eq!(first.next_offset, 0);
        let future = prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        };
        let head = commit_with(pb::CommitCursorRequest {
            time: Some(future),
            clear_version: true,
            ..base.clone()
        })
        .await
        .unwrap();
        assert_eq!(head.next_offset, 6);
        assert!(head.version.is_empty());

        // A bad time changes nothing.
        let bad = commit_with(pb::CommitCursorRequest {
            time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            }),
            ..base.clone()
        })
        .await
        .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(
            get_consumer(&mut client, "s", "c")
                .await
                .unwrap()
                .next_offset,
            6
        );

        // Cleared settings stay cleared after a restart.
        let server = server.restart().await;
        let mut client = server.client().await;
        let after = get_consumer(&mut client, "s", "c").await.unwrap();
        assert!(after.filter.is_none() && after.version.is_empty());
        assert_eq!(after.next_offset, 6);
    })
    .await;
}

#[tokio::test]
async fn an_open_subscription_keeps_its_filter_when_the_saved_one_is_cleared() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", vec![event("order.created", "1")]).await;
        let mut open = client
            .subscribe(pb::SubscribeRequest {
                stream: "s".into(),
                consumer: "c".into(),
                filter: Some(pb::EventFilter {
                    types: vec!["order.*".into()],
                    keys: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(collect(&mut open, 1).await[0].offset, 0);
        // Cleared while the subscription is open, with the cursor after 0.
        let cleared = client
            .commit_cursor(pb::CommitCursorRequest {
                stream: "s".into(),
                consumer: "c".into(),
                next_offset: 1,
                clear_filter: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .consumer
            .unwrap();
        assert!(cleared.filter.is_none());
        append(
            &mut client,
            "s",
            vec![event("user.created", "2"), event("order.paid", "3")],
        )
        .await;
        // The open subscription still filters: user.created is skipped.
        let delivered = collect(&mut open, 1).await;
        assert_eq!(delivered[0].offset, 2, "{delivered:?}");
        assert_eq!(delivered[0].r#type, "order.paid");
        drop(open);
        // The next one, without a filter, gets every event from its cursor.
        let mut again = subscribe_as(&mut client, "s", "c", None).await.unwrap();
        let all = collect(&mut again, 2).await;
        let types: Vec<_> = all.iter().map(|e| e.r#type.as_str()).collect();
        assert_eq!(types, ["user.created", "order.paid"]);
    })
    .await;
}
