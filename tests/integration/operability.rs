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
