//! What operators and tools see: the standard health service (through
//! shutdown), server reflection, the metrics endpoint and server status.

use std::time::Duration;

use pullstream::proto as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::common::*;

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn health_is_serving_then_not_serving_during_shutdown() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "pullstream.v1.EventLog", "pullstream.v1.ApiKeys"] {
        let status = health.check(check(service)).await.expect("check");
        assert_eq!(
            status.into_inner().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let unknown = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut watch = health.watch(check("")).await.expect("watch").into_inner();
    let first = within(watch.message()).await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let stopping = tokio::spawn(server.stop());
    let mut seen = Vec::new();
    while let Some(update) = within(watch.message()).await.expect("watch message") {
        seen.push(update.status);
    }
    assert_eq!(
        seen.last(),
        Some(&(ServingStatus::NotServing as i32)),
        "{seen:?}"
    );
    // The open watch did not hold shutdown up for the grace period.
    within(stopping).await.expect("stopped");
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_them() {
    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("pullstream.v1.EventLog".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();

    let listed = within(responses.message()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("not a service list: {listed:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "pullstream.v1.ApiKeys",
        "pullstream.v1.EventLog",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    let file = within(responses.message()).await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("not a file descriptor: {file:?}");
    };
    let descriptor = files.file_descriptor_proto.concat();
    let text = String::from_utf8_lossy(&descriptor);
    for rpc in ["Append", "Subscribe", "UpdateStream", "GetServerStatus"] {
        assert!(text.contains(rpc), "{rpc} described");
    }
}

#[tokio::test]
async fn server_status_shows_streams_rates_and_consumer_lag() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let empty = client
        .get_server_status(pb::GetServerStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(empty.server_version, env!("CARGO_PKG_VERSION"));
    assert!(empty.streams.is_empty());
    assert!(empty.start_time.is_some());

    client
        .create_stream(pb::CreateStreamRequest {
            stream: "orders".into(),
            retention: Some(pb::RetentionPolicy {
                max_events: 1000,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for _ in 0..5 {
        append(
            &mut client,
            "orders",
            (0..10)
                .map(|i| event("order.created", &i.to_string()))
                .collect(),
        )
        .await;
        // Two housekeeping samples at least, so a rate exists.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    append(&mut client, "audit", vec![event("login", "1")]).await;
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "orders".into(),
            consumer: "billing".into(),
            next_offset: 20,
            ..Default::default()
        })
        .await
        .unwrap();

    let status = client
        .get_server_status(pb::GetServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = status
        .streams
        .iter()
        .map(|s| s.stream.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["audit", "orders"]);
    let orders = &status.streams[1];
    let info = orders.stream.as_ref().unwrap();
    assert_eq!((info.first_offset, info.next_offset), (0, 50));
    assert_eq!(info.retention.as_ref().unwrap().max_events, 1000);
    assert!(
        orders.append_rate > 0.0 && orders.append_rate.is_finite(),
        "{}",
        orders.append_rate
    );
    let consumers: Vec<_> = orders
        .consumers
        .iter()
        .map(|c| (c.name.as_str(), c.next_offset, c.lag))
        .collect();
    assert_eq!(consumers, [("billing", 20, 30)]);
    assert!(status.uptime.is_some());
}

/// GETs `path` from an HTTP/1 server; returns the status line and body.
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    within(socket.read_to_string(&mut response)).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of one series (`name{labels}` exactly as exposed).
pub(crate) fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().expect("a number"))
        })
        .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
}

#[tokio::test]
async fn the_metrics_endpoint_serves_the_named_series_after_traffic() {
    let server = TestServer::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.metrics_stream_labels = true;
    })
    .await;
    let metrics = server.metrics_addr.expect("metrics address");
    let mut client = server.client().await;
    for _ in 0..3 {
        append(
            &mut client,
            "m",
            (0..10)
                .map(|i| event("order.created", &i.to_string()))
                .collect(),
        )
        .await;
    }
    let mut reader = server.client().await;
    let mut sub = subscribe(&mut reader, "m", None).await;
    collect(&mut sub, 30).await;
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "m".into(),
            consumer: "c".into(),
            next_offset: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .update_stream(pb::UpdateStreamRequest {
            stream: "m".into(),
            retention: Some(pb::RetentionPolicy {
                max_events: 10,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for _ in 0..300 {
        let info = client
            .get_stream(pb::GetStreamRequest { stream: "m".into() })
            .await
            .unwrap()
            .into_inner()
            .stream
            .unwrap();
        if info.first_offset > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, text) = http_get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let m = "{stream=\"m\"}";
    assert_eq!(
        series(&text, &format!("pullstream_appended_events_total{m}")),
        30.0
    );
    assert!(series(&text, &format!("pullstream_appended_bytes_total{m}")) > 30.0 * 10.0);
    assert_eq!(
        series(&text, &format!("pullstream_delivered_events_total{m}")),
        30.0
    );
    assert_eq!(
        series(&text, &format!("pullstream_trimmed_events_total{m}")),
        20.0
    );
    assert_eq!(
        series(&text, &format!("pullstream_stream_next_offset{m}")),
        30.0
    );
    assert_eq!(
        series(&text, &format!("pullstream_stream_first_offset{m}")),
        20.0
    );
    assert_eq!(
        series(
            &text,
            "pullstream_consumer_lag_events{stream=\"m\",consumer=\"c\"}"
        ),
        20.0
    );
    assert_eq!(
        series(&text, "pullstream_append_latency_seconds_count"),
        3.0
    );
    assert!(series(&text, "pullstream_append_latency_seconds_sum") > 0.0);
    // Durable mode: every append was synced; the three appends (and the
    // commit, the settings change and the trim) took at least one sync each
    // unless they shared one.
    assert!(series(&text, "pullstream_flush_latency_seconds_count") >= 1.0);
    assert_eq!(series(&text, "pullstream_group_commit_events_sum"), 30.0);
    assert_eq!(series(&text, "pullstream_active_subscriptions"), 1.0);
    if !sled_only("the check of pullstream_data_dir_bytes, the sled data dir's size") {
        assert!(series(&text, "pullstream_data_dir_bytes") > 0.0);
    }
    assert!(series(&text, "pullstream_process_resident_memory_bytes") > 1e6);

    // The gauge follows subscriptions down (the server notices the client
    // left at its next heartbeat).
    drop(sub);
    drop(reader);
    let mut active = 1.0;
    for _ in 0..300 {
        let (_, text) = http_get(metrics, "/metrics").await;
        active = series(&text, "pullstream_active_subscriptions");
        if active == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(active, 0.0);
    let (status, _) = http_get(metrics, "/nothing").await;
    assert!(status.contains("404"), "{status}");
}

/// Issue 14, finding 10: by default the unauthenticated endpoint names no
/// tenant, stream, consumer or group (before: `acme/payroll.2026` and its
/// consumers were labels); totals and the largest lag are still there.
#[tokio::test]
async fn by_default_metrics_name_nothing_a_tenant_chose() {
    use pullstream::auth::Scope;
    let dir = tempfile::tempdir().unwrap();
    let key =
        crate::auth::offline_keys(dir.path(), &[("acme", &[Scope::Publish, Scope::Subscribe])])
            .pop()
            .unwrap();
    let mut config = pullstream::config::ServerConfig::for_tests(dir.path());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start_in(dir, config).await;
    let mut client = crate::auth::client_with(&server, &key).await;
    client
        .append(pb::AppendRequest {
            stream: "payroll.2026".into(),
            events: (0..5).map(|_| event("salary.paid", "{}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "payroll.2026".into(),
            consumer: "ledger".into(),
            next_offset: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, text) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    for name in ["acme", "payroll", "ledger"] {
        assert!(!text.contains(name), "{name} in:\n{text}");
    }
    assert_eq!(
        series(&text, "pullstream_appended_events_total{stream=\"_all\"}"),
        5.0
    );
    assert_eq!(
        series(
            &text,
            "pullstream_consumer_lag_events{stream=\"_all\",consumer=\"_max\"}"
        ),
        4.0
    );
}
