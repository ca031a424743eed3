//! Admission before the body (issue 14, finding 1 and 8): calls without a
//! valid key are answered from their headers, messages are checked against
//! the limit from their frame header, and the server caps connections,
//! streams per connection, request bytes in flight and slow bodies. These
//! tests speak raw HTTP/2 (the `h2` crate), as an attacker would, since a
//! well-behaved gRPC client cannot send a frame that lies about its size.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pullstream::auth::Scope;
use pullstream::config::ServerConfig;
use pullstream::proto as pb;
use tokio::net::TcpStream;
use tonic::Code;

use crate::auth::{client_with, offline_keys};
use crate::common::*;

const APPEND: &str = "/pullstream.v1.EventLog/Append";

/// An HTTP/2 connection with nothing on top.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// The headers of a gRPC call to `path`, with `key` if given.
fn call_headers(path: &str, key: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.body(()).unwrap()
}

/// A gRPC message frame claiming `claimed` bytes, followed by `payload`.
fn frame(claimed: u32, payload: &[u8]) -> Bytes {
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&claimed.to_be_bytes());
    bytes.extend_from_slice(payload);
    Bytes::from(bytes)
}

/// The call's gRPC status and message, from a trailers-only response or
/// from the trailers after the body.
async fn status_of(response: h2::client::ResponseFuture) -> (Code, String) {
    let response = response.await.expect("a response");
    let from = |headers: &http::HeaderMap| {
        headers.get("grpc-status").map(|code| {
            let code: i32 = code.to_str().unwrap().parse().unwrap();
            let message = headers
                .get("grpc-message")
                .map(|m| percent_decode(m.to_str().unwrap()))
                .unwrap_or_default();
            (Code::from_i32(code), message)
        })
    };
    if let Some(status) = from(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.expect("body");
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers present");
    from(&trailers).expect("grpc-status in trailers")
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A server whose data dir holds one publish+subscribe key.
async fn keyed_server(tweak: impl FnOnce(&mut ServerConfig)) -> (TestServer, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = offline_keys(dir.path(), &[("acme", &[Scope::Publish, Scope::Subscribe])])
        .pop()
        .unwrap();
    let mut config = ServerConfig::for_tests(dir.path());
    tweak(&mut config);
    (TestServer::start_in(dir, config).await, key)
}

/// A valid Append of one event with `size` bytes of data, encoded as the
/// request body's message.
fn append_message(stream: &str, size: usize) -> Vec<u8> {
    use prost::Message;
    let data = format!("\"{}\"", "x".repeat(size));
    pb::AppendRequest {
        stream: stream.into(),
        events: vec![event("t", &data)],
        ..Default::default()
    }
    .encode_to_vec()
}

/// The refused call wrote nothing: the tenant still has no stream.
async fn assert_nothing_written(server: &TestServer, key: &str) {
    let mut client = client_with(server, key).await;
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap();
    assert!(listed.into_inner().streams.is_empty());
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// The attack: 4 connections x 32 streams, each sending 2 MiB of a
/// message whose frame claims 16 MiB, with no key. Every stream is answered
/// UNAUTHENTICATED promptly and the server's memory stays within the
/// 64 MiB budget (before: it buffered everything it was sent, 1 MiB of RSS
/// per MiB, and answered nothing within 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_key_are_refused_before_their_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = offline_keys(dir.path(), &[("acme", &[Scope::Publish])])
        .pop()
        .unwrap();
    let (mut child, url) = crate::process::spawn_server(dir.path(), &[]);
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let pid = child.id();
    let before = rss(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let payload = vec![0u8; 2 << 20];
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut send = h2_connect(addr).await;
        for _ in 0..32 {
            send = send.ready().await.expect("stream capacity");
            let (response, mut body) = send
                .send_request(call_headers(APPEND, None), false)
                .unwrap_or_else(|e| panic!("open a stream: {e}"));
            // Fails once the server has answered and reset the stream.
            let _ = body.send_data(frame(16 << 20, &payload), false);
            calls.push(tokio::spawn(async move {
                let _keep_sending = body;
                status_of(response).await
            }));
        }
    }
    let started = Instant::now();
    for call in calls {
        let (code, message) = within(call).await.unwrap();
        assert_eq!(code, Code::Unauthenticated, "{message}");
        assert!(message.contains("requires an API key"), "{message}");
    }
    sampling.abort();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "the server grew by {} MiB under the attack",
        grew >> 20
    );
    eprintln!(
        "128 unauthenticated 16 MiB calls answered in {:?}; server RSS grew {} KiB",
        started.elapsed(),
        grew >> 10
    );
    // The server is unhurt: a call with the key works.
    let server_key_client = {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::event_log_client::EventLogClient::with_interceptor(
            channel,
            crate::auth::Bearer(Some(format!("Bearer {key}"))),
        )
    };
    let mut client = server_key_client;
    client
        .append(pb::AppendRequest {
            stream: "s".into(),
            events: vec![event("t", "{}")],
            ..Default::default()
        })
        .await
        .expect("an append with the key");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn each_connection_may_open_at_most_max_concurrent_streams() {
    let (server, _key) = keyed_server(|c| c.max_concurrent_streams = 7).await;
    let send = h2_connect(server.addr).await;
    // The server's SETTINGS arrive with the first exchange.
    let mut send = send.ready().await.unwrap();
    let (response, _) = send.send_request(call_headers(APPEND, None), true).unwrap();
    let _ = status_of(response).await;
    assert_eq!(send.current_max_send_streams(), 7);
}

#[tokio::test]
async fn an_oversized_message_is_invalid_argument_from_its_frame_header() {
    let (server, key) = keyed_server(|c| {
        c.max_event_bytes = 1024;
        c.max_batch_bytes = 4096;
    })
    .await;
    let send = h2_connect(server.addr).await;
    let mut send = send.ready().await.unwrap();
    // Only the frame header is sent: the answer cannot depend on the body.
    let (response, mut body) = send
        .send_request(call_headers(APPEND, Some(&key)), false)
        .unwrap();
    body.send_data(frame(200_000, &[]), false).unwrap();
    let (code, message) = within(status_of(response)).await;
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("200000 bytes"), "{message}");
    assert!(message.contains("--max-batch-bytes"), "{message}");
    assert_nothing_written(&server, &key).await;
}

/// Sends `message` as one whole Append call on a new HTTP/2 connection;
/// returns the call's status.
async fn raw_append(server: &TestServer, key: &str, message: &[u8]) -> (Code, String) {
    let send = h2_connect(server.addr).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send
        .send_request(call_headers(APPEND, Some(key)), false)
        .unwrap();
    body.send_data(frame(message.len() as u32, message), true)
        .unwrap();
    within(status_of(response)).await
}

#[tokio::test]
async fn a_malformed_message_is_invalid_argument() {
    let (server, key) = keyed_server(|_| {}).await;
    // Field 1 (stream) as a string whose length runs past the message.
    let (code, message) = raw_append(&server, &key, &[0x0a, 0x7f, b'x']).await;
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("not valid protobuf"), "{message}");
    assert_nothing_written(&server, &key).await;
}

/// An event's text fields are decoded as slices of the request and
/// checked: bytes that are not UTF-8 in `type`, `key` or `content_type`
/// are a malformed message, refused whole.
#[tokio::test]
async fn an_event_text_field_that_is_not_utf8_is_invalid_argument() {
    use prost::Message;
    let (server, key) = keyed_server(|_| {}).await;
    for field in ["type", "key", "content_type"] {
        let mut bad = event("t", "1");
        match field {
            "type" => bad.r#type = "QQQQ".into(),
            "key" => bad.key = "QQQQ".into(),
            _ => bad.content_type = "QQQQ".into(),
        }
        let mut message = pb::AppendRequest {
            stream: "s".into(),
            events: vec![event("t", "0"), bad],
            ..Default::default()
        }
        .encode_to_vec();
        let at = message.windows(4).position(|w| w == b"QQQQ").unwrap();
        message[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        let (code, text) = raw_append(&server, &key, &message).await;
        assert_eq!(code, Code::InvalidArgument, "{field}: {text}");
        assert!(text.contains("not valid protobuf"), "{field}: {text}");
        assert!(text.contains("UTF-8"), "{field}: {text}");
        assert_nothing_written(&server, &key).await;
    }
}

#[tokio::test]
async fn request_bytes_in_flight_are_budgeted_server_wide() {
    let (server, key) = keyed_server(|c| {
        c.max_event_bytes = 512 << 10;
        c.max_batch_bytes = 1 << 20;
        c.max_request_bytes_in_flight = (1 << 20) + (64 << 10) + 1000;
    })
    .await;
    let send = h2_connect(server.addr).await;
    // A slow sender reserves the largest message and sends a little of it,
    // leaving 1000 bytes of the budget.
    let mut send = send.ready().await.unwrap();
    let (slow, mut slow_body) = send
        .send_request(call_headers(APPEND, Some(&key)), false)
        .unwrap();
    slow_body
        .send_data(frame((1 << 20) + (64 << 10), &[0u8; 10]), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another call no longer fits in the budget.
    let message = append_message("s", 2000);
    let mut send = send.ready().await.unwrap();
    let (refused, mut body) = send
        .send_request(call_headers(APPEND, Some(&key)), false)
        .unwrap();
    body.send_data(frame(message.len() as u32, &message), true)
        .unwrap();
    let (code, text) = within(status_of(refused)).await;
    assert_eq!(code, Code::ResourceExhausted, "{text}");
    assert!(text.contains("--max-request-bytes-in-flight"), "{text}");
    // Once the slow call is gone, its reservation is returned.
    drop(slow_body);
    drop(slow);
    let mut client = client_with(&server, &key).await;
    within(async {
        loop {
            let result = client
                .append(pb::AppendRequest {
                    stream: "s".into(),
                    events: vec![event("t", "{}")],
                    ..Default::default()
                })
                .await;
            match result {
                Ok(_) => break,
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_body_slower_than_the_request_body_timeout_is_deadline_exceeded() {
    let (server, key) = keyed_server(|c| c.request_body_timeout = Duration::from_millis(300)).await;
    let send = h2_connect(server.addr).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send
        .send_request(call_headers(APPEND, Some(&key)), false)
        .unwrap();
    body.send_data(frame(1000, &[0u8; 10]), false).unwrap();
    let (code, message) = within(status_of(response)).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("--request-body-timeout"), "{message}");
    drop(body);
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_and_others_unaffected() {
    let (server, key) = keyed_server(|c| c.max_connections = 2).await;
    let mut first = client_with(&server, &key).await;
    let mut second = client_with(&server, &key).await;
    for client in [&mut first, &mut second] {
        client
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap();
    }
    // A third connection is closed at once.
    let third = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match third {
        Err(_) => true,
        Ok(channel) => pb::event_log_client::EventLogClient::new(channel)
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a third connection was served");
    // The first two still work.
    first
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap();
    // Closing one frees its place.
    drop(second);
    within(async {
        loop {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
                    .unwrap()
                    .connect()
                    .await;
            if let Ok(channel) = channel {
                let mut client = pb::event_log_client::EventLogClient::with_interceptor(
                    channel,
                    crate::auth::Bearer(Some(format!("Bearer {key}"))),
                );
                if client
                    .list_streams(pb::ListStreamsRequest::default())
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_oversized_key_management_message_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let key = offline_keys(dir.path(), &[("acme", &[Scope::Admin])])
        .pop()
        .unwrap();
    let config = ServerConfig::for_tests(dir.path());
    let server = TestServer::start_in(dir, config).await;
    let mut keys = pb::api_keys_client::ApiKeysClient::with_interceptor(
        server.channel().await,
        crate::auth::Bearer(Some(format!("Bearer {key}"))),
    );
    let status = keys
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: vec![pb::Scope::Publish as i32],
            streams: (0..2000)
                .map(|i| format!("orders.{i}.{}", "x".repeat(50)))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("65536 bytes"), "{status:?}");
    let listed = keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
}

/// Health needs no key even once the server has keys (load balancers and
/// probes call it bare), and its requests are capped small.
#[tokio::test]
async fn health_needs_no_key_and_takes_only_small_requests() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let (server, _key) = keyed_server(|_| {}).await;
    let mut health = HealthClient::new(server.channel().await);
    let answer = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("no key needed")
        .into_inner();
    assert_eq!(answer.status, ServingStatus::Serving as i32);
    health
        .check(HealthCheckRequest {
            service: "x".repeat(100 << 10),
        })
        .await
        .expect_err("a 100 KiB health request is refused");
    // The server is unhurt.
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}
