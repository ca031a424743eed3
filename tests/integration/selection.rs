//! Choosing what a subscriber gets: server-side filters (with a cursor that
//! still advances), starting from a time, and pinned payload versions.

use std::collections::HashMap;
use std::time::Duration;

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;

use crate::common::*;

fn typed(event_type: &str, key: &str) -> pb::NewEvent {
    pb::NewEvent {
        key: key.into(),
        ..event(event_type, "{}")
    }
}

fn filter(types: &[&str], keys: &[&str]) -> Option<pb::EventFilter> {
    Some(pb::EventFilter {
        types: types.iter().map(|s| s.to_string()).collect(),
        keys: keys.iter().map(|s| s.to_string()).collect(),
    })
}

async fn subscribe_with(
    client: &mut Client,
    request: pb::SubscribeRequest,
) -> Result<tonic::Streaming<pb::SubscribeResponse>, tonic::Status> {
    client.subscribe(request).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn filters_select_by_exact_type_wildcard_prefix_and_key() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        let batch = vec![
            typed("invoice.paid", "c1"),           // 0
            typed("invoice.payment.failed", "c2"), // 1
            typed("customer.deleted", "c1"),       // 2
            typed("customer.created", "c3"),       // 3
            typed("invoice", "c1"),                // 4
        ];
        append(&mut client, "s", batch).await;
        let cases: Vec<(Option<pb::EventFilter>, Vec<u64>)> = vec![
            (filter(&["invoice.paid"], &[]), vec![0]),
            (filter(&["invoice.*"], &[]), vec![0]),
            (filter(&["invoice.>"], &[]), vec![0, 1]),
            (filter(&["*.deleted"], &[]), vec![2]),
            (filter(&[">"], &[]), vec![0, 1, 2, 3, 4]),
            (
                filter(&["invoice.>", "customer.created"], &[]),
                vec![0, 1, 3],
            ),
            (filter(&[], &["c1"]), vec![0, 2, 4]),
            (filter(&["invoice.>"], &["c1", "c3"]), vec![0]),
        ];
        for (f, want) in cases {
            // Read and Subscribe apply the same filter.
            let page = client
                .read(pb::ReadRequest {
                    stream: "s".into(),
                    offset: 0,
                    limit: 100,
                    filter: f.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let got: Vec<u64> = page.events.iter().map(|e| e.offset).collect();
            assert_eq!(got, want, "read with {f:?}");
            assert_eq!(page.next_offset, 5, "the cursor passes skipped events");

            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    filter: f.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let mut got = Vec::new();
            let mut cursor = 0;
            while cursor < 5 {
                let response = next(&mut sub).await.unwrap();
                got.extend(response.events.iter().map(|e| e.offset));
                cursor = response.next_offset;
            }
            assert_eq!(got, want, "subscribe with {f:?}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn malformed_filters_are_invalid_argument() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        append(&mut client, "s", vec![typed("a.b", "")]).await;
        for bad in [
            filter(&["a..b"], &[]),
            filter(&["in*"], &[]),
            filter(&["a.>.b"], &[]),
            filter(&[""], &[]),
            filter(&["a"], &[""]),
        ] {
            let status = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    filter: bad.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
            let status = client
                .read(pb::ReadRequest {
                    stream: "s".into(),
                    filter: bad.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_filter_matching_nothing_still_advances_the_cursor_in_heartbeats() {
    within(async {
        let server =
            TestServer::start_with(|c| c.heartbeat_interval = Duration::from_millis(200)).await;
        let mut client = server.client().await;
        for _ in 0..30 {
            let batch = (0..100).map(|_| typed("noise.tick", "")).collect();
            append(&mut client, "s", batch).await;
        }
        let mut sub = subscribe_with(
            &mut client,
            pb::SubscribeRequest {
                stream: "s".into(),
                consumer: "rare".into(),
                filter: filter(&["rare.event"], &[]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // No event matches, yet a heartbeat carries the cursor to the head.
        loop {
            let response = next(&mut sub).await.unwrap();
            assert!(response.events.is_empty());
            if response.next_offset == 3000 {
                assert!(response.caught_up);
                break;
            }
        }
        // Live: more noise moves the cursor too, then the rare event arrives.
        append(&mut client, "s", vec![typed("noise.tick", "")]).await;
        append(&mut client, "s", vec![typed("rare.event", "k")]).await;
        let got = collect(&mut sub, 1).await;
        assert_eq!(got[0].offset, 3001);
        assert_eq!(got[0].r#type, "rare.event");
        // The consumer saved its filter: a plain resubscribe uses it.
        drop(sub);
        client
            .commit_cursor(pb::CommitCursorRequest {
                stream: "s".into(),
                consumer: "rare".into(),
                next_offset: 0,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut sub = subscribe_with(
            &mut client,
            pb::SubscribeRequest {
                stream: "s".into(),
                consumer: "rare".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let got = collect(&mut sub, 1).await;
        assert_eq!(got[0].offset, 3001);
        let info = client
            .get_consumer(pb::GetConsumerRequest {
                stream: "s".into(),
                consumer: "rare".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .consumer
            .unwrap();
        assert_eq!(info.filter.unwrap().types, vec!["rare.event".to_string()]);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn from_time_starts_at_the_first_event_at_or_after_it() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        // Many groups (so many chunks), each with its own append time.
        let mut times = Vec::new();
        let mut head = 0;
        for i in 0..200u64 {
            let n = 1 + (i % 3) as usize;
            let batch = (0..n).map(|_| typed("t", "")).collect();
            let response = append(&mut client, "s", batch).await;
            times.push((response.first_offset, response.time.unwrap()));
            head = response.first_offset + u64::from(response.count);
        }
        for &(offset, ref time) in times.iter().step_by(17) {
            // Exactly a batch's time: that batch's first event (events of
            // one batch share its time).
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    start: Some(Start::Time(*time)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let first = collect(&mut sub, 1).await[0].clone();
            assert_eq!(first.offset, offset, "time {time:?}");
            assert_eq!(first.time.as_ref(), Some(time));
            // One nanosecond later: the next batch.
            let mut later = *time;
            later.nanos += 1;
            if later.nanos == 1_000_000_000 {
                later.nanos = 0;
                later.seconds += 1;
            }
            let expected = times
                .iter()
                .find(|(_, t)| (t.seconds, t.nanos) >= (later.seconds, later.nanos))
                .map(|(o, _)| *o);
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    start: Some(Start::Time(later)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let response = next(&mut sub).await.unwrap();
            match expected {
                Some(o) => assert_eq!(response.events[0].offset, o),
                None => assert_eq!(response.next_offset, head),
            }
        }
        // Before everything: offset 0. Far in the future: the head.
        for (seconds, want) in [(0, 0), (i64::MAX / 2_000_000_000, head)] {
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    start: Some(Start::Time(prost_types::Timestamp { seconds, nanos: 0 })),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let response = next(&mut sub).await.unwrap();
            let first = response
                .events
                .first()
                .map_or(response.next_offset, |e| e.offset);
            assert_eq!(first, want, "seconds {seconds}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_pinned_version_gets_the_newest_rendering_at_or_below_it() {
    within(async {
        let server = TestServer::start().await;
        let mut client = server.client().await;
        let rendering = |data: &str| pb::PayloadVersion {
            data: data.as_bytes().to_vec().into(),
            content_type: String::new(),
        };
        let versions: HashMap<String, pb::PayloadVersion> = [
            ("2023-01-01".to_string(), rendering("{\"v\":2023}")),
            ("2024-06-01".to_string(), rendering("{\"v\":2024}")),
        ]
        .into();
        let with_versions = pb::NewEvent {
            versions,
            ..event("invoice.paid", "{\"v\":\"default\"}")
        };
        let without = event("invoice.paid", "{\"v\":\"only\"}");
        append(&mut client, "s", vec![with_versions, without]).await;

        let cases = [
            ("", "{\"v\":\"default\"}", ""),
            ("2022-12-31", "{\"v\":\"default\"}", ""),
            ("2023-01-01", "{\"v\":2023}", "2023-01-01"),
            ("2024-01-15", "{\"v\":2023}", "2023-01-01"),
            ("2024-06-01", "{\"v\":2024}", "2024-06-01"),
            ("2030-01-01", "{\"v\":2024}", "2024-06-01"),
        ];
        for (pin, data, label) in cases {
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    version: pin.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let got = collect(&mut sub, 2).await;
            assert_eq!(String::from_utf8_lossy(&got[0].data), data, "pin {pin:?}");
            assert_eq!(got[0].version, label, "pin {pin:?}");
            assert_eq!(got[0].content_type, "application/json");
            // An event without renderings always carries its default.
            assert_eq!(String::from_utf8_lossy(&got[1].data), "{\"v\":\"only\"}");
            assert_eq!(got[1].version, "");
        }

        // A consumer's pin is saved; changing it affects only that consumer.
        for (consumer, pin) in [("old", "2023-06-01"), ("new", "2024-07-01")] {
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    consumer: consumer.into(),
                    version: pin.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            collect(&mut sub, 2).await;
        }
        for (consumer, label) in [("old", "2023-01-01"), ("new", "2024-06-01")] {
            let mut sub = subscribe_with(
                &mut client,
                pb::SubscribeRequest {
                    stream: "s".into(),
                    consumer: consumer.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(collect(&mut sub, 2).await[0].version, label, "{consumer}");
        }

        // Bad labels: in a pin and in an appended event.
        let status = subscribe_with(
            &mut client,
            pb::SubscribeRequest {
                stream: "s".into(),
                version: "not a label".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = pb::NewEvent {
            versions: [("bad label".to_string(), rendering("{}"))].into(),
            ..event("t", "{}")
        };
        let status = client
            .append(pb::AppendRequest {
                stream: "s".into(),
                events: vec![bad],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(read_all(&mut client, "s").await.len(), 2, "nothing written");
        server.stop().await;
    })
    .await;
}
