//! Caps on what clients can create (issue 14, finding 12): each reached
//! cap is RESOURCE_EXHAUSTED, changes nothing, and leaves others alone.

use std::time::Duration;

use pullstream::auth::Scope;
use pullstream::config::ServerConfig;
use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;

use crate::auth::{client_with, offline_keys};
use crate::common::*;

/// The status a Subscribe ends with, whether the call itself is refused or
/// its stream ends.
async fn subscribe_outcome(
    client: &mut Client,
    request: pb::SubscribeRequest,
) -> Option<tonic::Status> {
    match client.subscribe(request).await {
        Err(status) => Some(status),
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                Ok(Err(status)) => Some(status),
                _ => None,
            }
        }
    }
}

fn create(stream: &str) -> pb::CreateStreamRequest {
    pb::CreateStreamRequest {
        stream: stream.into(),
        ..Default::default()
    }
}

fn assert_exhausted(result: Result<impl std::fmt::Debug, tonic::Status>, flag: &str) {
    let status = result.expect_err("the cap was reached");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(flag), "{status:?}");
}

#[tokio::test]
async fn each_tenant_may_have_at_most_max_streams() {
    let dir = tempfile::tempdir().unwrap();
    let keys = offline_keys(
        dir.path(),
        &[
            ("acme", &[Scope::Publish, Scope::Admin]),
            ("other", &[Scope::Publish]),
        ],
    );
    let mut config = ServerConfig::for_tests(dir.path());
    config.max_streams = 2;
    let server = TestServer::start_in(dir, config).await;
    let mut acme = client_with(&server, &keys[0]).await;
    acme.create_stream(create("a")).await.unwrap();
    acme.create_stream(create("b")).await.unwrap();
    assert_exhausted(acme.create_stream(create("c")).await, "--max-streams");
    // Creation by Append is capped too, and writes nothing.
    let append = acme
        .append(pb::AppendRequest {
            stream: "d".into(),
            events: vec![event("t", "{}")],
            ..Default::default()
        })
        .await;
    assert_exhausted(append, "--max-streams");
    let listed = acme
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert_eq!(listed.len(), 2);
    // Another tenant has its own allowance.
    let mut other = client_with(&server, &keys[1]).await;
    other.create_stream(create("a")).await.unwrap();
    other.create_stream(create("b")).await.unwrap();
    // A deleted stream frees its place.
    acme.delete_stream(pb::DeleteStreamRequest { stream: "a".into() })
        .await
        .unwrap();
    acme.create_stream(create("c")).await.unwrap();
}

#[tokio::test]
async fn a_stream_may_have_at_most_max_consumers_per_stream() {
    let server = TestServer::start_with(|c| c.max_consumers_per_stream = 2).await;
    let mut client = server.client().await;
    for stream in ["s", "t"] {
        append(&mut client, stream, vec![event("t", "{}")]).await;
    }
    let commit = |consumer: &str, stream: &str| pb::CommitCursorRequest {
        stream: stream.into(),
        consumer: consumer.into(),
        next_offset: 1,
        ..Default::default()
    };
    client.commit_cursor(commit("c1", "s")).await.unwrap();
    client.commit_cursor(commit("c2", "s")).await.unwrap();
    assert_exhausted(
        client.commit_cursor(commit("c3", "s")).await,
        "--max-consumers-per-stream",
    );
    // A subscription that would create a third is refused too.
    let refused = subscribe_outcome(
        &mut client,
        pb::SubscribeRequest {
            stream: "s".into(),
            consumer: "c4".into(),
            start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
            ..Default::default()
        },
    )
    .await
    .expect("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Existing consumers go on; other streams are unaffected.
    client.commit_cursor(commit("c1", "s")).await.unwrap();
    client.commit_cursor(commit("c3", "t")).await.unwrap();
    let listed = client
        .list_consumers(pb::ListConsumersRequest {
            stream: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    assert_eq!(listed.len(), 2);
}

#[tokio::test]
async fn groups_and_their_members_are_capped() {
    let server = TestServer::start_with(|c| {
        c.max_groups_per_stream = 1;
        c.max_members_per_group = 1;
    })
    .await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "{}")]).await;
    let join = |group: &str, member: &str| pb::SubscribeRequest {
        stream: "s".into(),
        group: group.into(),
        member: member.into(),
        start: Some(Start::Position(pb::StartPosition::Earliest as i32)),
        ..Default::default()
    };
    let mut first = server.client().await;
    let mut held = first.subscribe(join("g1", "a")).await.unwrap().into_inner();
    within(held.message()).await.unwrap();
    let second_group = subscribe_outcome(&mut client, join("g2", "a"))
        .await
        .expect("refused");
    assert_eq!(
        second_group.code(),
        Code::ResourceExhausted,
        "{second_group:?}"
    );
    assert!(second_group.message().contains("--max-groups-per-stream"));
    let second_member = subscribe_outcome(&mut client, join("g1", "b"))
        .await
        .expect("refused");
    assert_eq!(
        second_member.code(),
        Code::ResourceExhausted,
        "{second_member:?}"
    );
    assert!(second_member.message().contains("--max-members-per-group"));
    // The member itself may reconnect (taking over its own place).
    let mut again = server.client().await;
    let mut retaken = again.subscribe(join("g1", "a")).await.unwrap().into_inner();
    within(retaken.message()).await.unwrap();
}

#[tokio::test]
async fn every_streams_caches_together_stay_within_the_budget() {
    let server = TestServer::start_with(|c| {
        c.stream_cache_budget_bytes = 64 << 10;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut client = server.client().await;
    let data = format!("\"{}\"", "x".repeat(8 << 10));
    for s in 0..20 {
        append(
            &mut client,
            &format!("s{s}"),
            vec![event("t", &data), event("t", &data)],
        )
        .await;
    }
    let (_, text) = crate::operability::http_get(server.metrics_addr.unwrap(), "/metrics").await;
    let cached = crate::operability::series(&text, "pullstream_stream_caches_bytes");
    assert!(cached > 0.0 && cached <= (64 << 10) as f64, "{cached}");
    // Readers are served all the same (from storage where caches gave way).
    for s in 0..20 {
        let mut sub = subscribe(&mut client, &format!("s{s}"), None).await;
        assert_eq!(collect(&mut sub, 2).await.len(), 2);
    }
}

#[tokio::test]
async fn a_subscription_response_holds_at_most_256_kib() {
    use prost::Message;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let data = format!("\"{}\"", "x".repeat(16 << 10));
    for _ in 0..8 {
        append(
            &mut client,
            "s",
            (0..16).map(|_| event("t", &data)).collect(),
        )
        .await;
    }
    let mut sub = subscribe(&mut client, "s", None).await;
    let mut events = 0;
    while events < 128 {
        let response = within(sub.message()).await.unwrap().unwrap();
        let n = response.events.len();
        assert!(
            response.encoded_len() <= (256 << 10) + (17 << 10),
            "a response of {} bytes",
            response.encoded_len()
        );
        events += n;
    }
}

/// A client with gRPC's default 4 MiB receive limit reads and follows a
/// stream of large events: no page or subscription response passes it
/// (five 1 MB events, then a thousand of 16 KB).
#[tokio::test]
async fn every_response_fits_a_default_grpc_clients_4_mib_limit() {
    use prost::Message;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let big = format!("\"{}\"", "b".repeat(1_000_000));
    for _ in 0..5 {
        append(&mut client, "big", vec![event("t", &big)]).await;
    }
    let small = format!("\"{}\"", "s".repeat(16_000));
    for _ in 0..20 {
        append(
            &mut client,
            "big",
            (0..50).map(|_| event("t", &small)).collect(),
        )
        .await;
    }
    // tonic's own default: 4 MiB, as in grpcio, grpc-go and grpc-java.
    let mut default_client =
        pb::event_log_client::EventLogClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let mut offset = 0;
    let mut pages = 0;
    while offset < 1005 {
        let page = default_client
            .read(pb::ReadRequest {
                stream: "big".into(),
                offset,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("a page within the default limit")
            .into_inner();
        assert!(!page.events.is_empty());
        assert!(page.encoded_len() < 4 << 20, "{}", page.encoded_len());
        assert_eq!(page.events[0].offset, offset);
        offset = page.next_offset;
        pages += 1;
    }
    assert_eq!(offset, 1005);
    assert!(pages >= 6, "{pages} pages");
    let mut sub = default_client
        .subscribe(pb::SubscribeRequest {
            stream: "big".into(),
            start: Some(Start::Offset(0)),
            max_batch_events: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_offset = 0;
    while next_offset < 1005 {
        let response = within(sub.message())
            .await
            .expect("a response within the default limit")
            .unwrap();
        assert!(response.encoded_len() < 4 << 20);
        for event in &response.events {
            assert_eq!(event.offset, next_offset);
            next_offset += 1;
        }
    }
}

/// The commit queue is bounded in bytes: with the disk stalled, writers
/// wait instead of piling their changes up, and once it moves again every
/// append lands (no deadlock, nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_waiting_for_a_stalled_disk_are_bounded_and_all_land() {
    if sled_only("the commit queue holds written sled changes; the JetStream engine writes an append before it is queued, and its writers wait for the cluster") {
        return;
    }
    use pullstream::durability::fault::Faults;
    let faults = std::sync::Arc::new(Faults::new());
    let server = TestServer::start_with(|c| {
        c.faults = Some(faults.clone());
        c.commit_queue_bytes = 32 << 10;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = server.metrics_addr.unwrap();
    let mut client = server.client().await;
    for s in 0..40 {
        client
            .create_stream(create(&format!("s{s}")))
            .await
            .unwrap();
    }
    /// Lets the disk move again however the test ends (a failed assertion
    /// must not leave the server's leader blocked forever).
    struct Release(std::sync::Arc<Faults>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    faults.hold_syncs();
    let release = Release(faults.clone());
    let data = format!("\"{}\"", "x".repeat(4 << 10));
    let mut appends = Vec::new();
    for s in 0..40 {
        let mut client = client.clone();
        let data = data.clone();
        appends.push(tokio::spawn(async move {
            client
                .append(pb::AppendRequest {
                    stream: format!("s{s}"),
                    events: vec![event("t", &data)],
                    ..Default::default()
                })
                .await
        }));
    }
    // 40 changes of about 8 KiB each are written; at most 32 KiB of them
    // may wait for the stalled sync.
    let queued = within(async {
        loop {
            let (_, text) = crate::operability::http_get(metrics, "/metrics").await;
            let queued = crate::operability::series(&text, "pullstream_commit_queue_bytes");
            if queued >= (16 << 10) as f64 {
                return queued;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, text) = crate::operability::http_get(metrics, "/metrics").await;
    let later = crate::operability::series(&text, "pullstream_commit_queue_bytes");
    assert!(
        queued <= (32 << 10) as f64 && later <= (32 << 10) as f64,
        "{queued} then {later} bytes queued"
    );
    drop(release);
    for append in appends {
        within(append)
            .await
            .unwrap()
            .expect("acknowledged once the disk moved");
    }
    for s in 0..40 {
        assert_eq!(read_all(&mut client, &format!("s{s}")).await.len(), 1);
    }
}

#[tokio::test]
async fn status_tells_clients_the_limits_they_must_keep_to() {
    within(async {
        let server = TestServer::start_with(|c| {
            c.max_event_bytes = 1000;
            c.max_batch_events = 7;
            c.max_batch_bytes = 5000;
            c.heartbeat_interval = Duration::from_millis(1500);
            c.idempotency_window = Duration::from_secs(3600);
            c.max_pipeline_batches = 3;
            c.max_pipeline_bytes = 9000;
        })
        .await;
        let mut client = server.client().await;
        let limits = client
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .limits
            .expect("limits");
        assert_eq!(limits.max_event_bytes, 1000);
        assert_eq!(limits.max_batch_events, 7);
        assert_eq!(limits.max_batch_bytes, 5000);
        let heartbeat = limits.heartbeat_interval.unwrap();
        assert_eq!((heartbeat.seconds, heartbeat.nanos), (1, 500_000_000));
        assert_eq!(limits.idempotency_window.unwrap().seconds, 3600);
        assert_eq!(limits.max_pipeline_batches, 3);
        assert_eq!(limits.max_pipeline_bytes, 9000);
        // And they are the limits enforced: one event more than the batch
        // limit is refused.
        let batch: Vec<_> = (0..8).map(|_| event("t", "{}")).collect();
        let refused = client
            .append(pb::AppendRequest {
                stream: "s".into(),
                events: batch,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    })
    .await;
}
