//! Bad input gets a clear status and changes nothing.

use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::Code;

use crate::common::*;

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn invalid_stream_names_are_rejected_everywhere() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let long = "x".repeat(201);
    for name in ["", "has space", "slash/", "ünïcode", long.as_str()] {
        let append = client
            .append(pb::AppendRequest {
                stream: name.into(),
                events: vec![event("t", "1")],
                ..Default::default()
            })
            .await;
        assert_status(append, Code::InvalidArgument, "invalid stream name");
        let create = client
            .create_stream(pb::CreateStreamRequest {
                stream: name.into(),
                ..Default::default()
            })
            .await;
        assert_status(create, Code::InvalidArgument, "invalid stream name");
        let get = client
            .get_stream(pb::GetStreamRequest {
                stream: name.into(),
            })
            .await;
        assert_status(get, Code::InvalidArgument, "invalid stream name");
    }
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap();
    assert!(
        listed.into_inner().streams.is_empty(),
        "nothing was created"
    );
}

#[tokio::test]
async fn bad_batches_write_nothing() {
    let server = TestServer::start_with(|c| {
        c.max_event_bytes = 1024;
        c.max_batch_events = 10;
        c.max_batch_bytes = 4096;
    })
    .await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1")]).await;
    let request = |events: Vec<pb::NewEvent>, key: &str| pb::AppendRequest {
        stream: "s".into(),
        events,
        idempotency_key: key.into(),
        ..Default::default()
    };
    let big = format!("\"{}\"", "x".repeat(1100));
    let cases = [
        (request(vec![], ""), "empty"),
        (request(vec![event("", "1")], ""), "empty type"),
        (
            request(vec![event("t", "1"), event("t", &big)], ""),
            "event 1 is",
        ),
        (
            request((0..11).map(|_| event("t", "1")).collect(), ""),
            "11 events",
        ),
        (
            request((0..6).map(|_| event("t", &"y".repeat(900))).collect(), ""),
            "the batch is",
        ),
        (
            request(vec![event("t", "1")], &"k".repeat(201)),
            "idempotency key",
        ),
    ];
    for (request, needle) in cases {
        assert_status(client.append(request).await, Code::InvalidArgument, needle);
    }
    // Nothing was written, and the stream still works.
    assert_eq!(read_all(&mut client, "s").await.len(), 1);
    assert_eq!(
        append(&mut client, "s", vec![event("t", "2")])
            .await
            .first_offset,
        1
    );
}

#[tokio::test]
async fn unknown_streams_are_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let read = client
        .read(pb::ReadRequest {
            stream: "nope".into(),
            offset: 0,
            limit: 1,
            ..Default::default()
        })
        .await;
    assert_status(read, Code::NotFound, "nope");
    let sub = client
        .subscribe(pb::SubscribeRequest {
            stream: "nope".into(),
            ..Default::default()
        })
        .await;
    assert_status(sub.map(|_| ()), Code::NotFound, "nope");
    let del = client
        .delete_stream(pb::DeleteStreamRequest {
            stream: "nope".into(),
        })
        .await;
    assert_status(del, Code::NotFound, "nope");
}

#[tokio::test]
async fn offsets_past_the_head_are_out_of_range_naming_the_head() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1"), event("t", "2")]).await;
    let read = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 3,
            limit: 1,
            ..Default::default()
        })
        .await;
    assert_status(read, Code::OutOfRange, "next offset is 2");
    let sub = client
        .subscribe(pb::SubscribeRequest {
            stream: "s".into(),
            start: Some(Start::Offset(99)),
            max_batch_events: 0,
            ..Default::default()
        })
        .await;
    assert_status(sub.map(|_| ()), Code::OutOfRange, "next offset is 2");
}

#[tokio::test]
async fn bad_limits_and_positions_are_invalid() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1")]).await;
    let read = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 0,
            limit: 1001,
            ..Default::default()
        })
        .await;
    assert_status(read, Code::InvalidArgument, "limit");
    let list = client
        .list_streams(pb::ListStreamsRequest {
            page_size: 5000,
            page_token: String::new(),
        })
        .await;
    assert_status(list, Code::InvalidArgument, "page_size");
    let sub = client
        .subscribe(pb::SubscribeRequest {
            stream: "s".into(),
            start: Some(Start::Position(42)),
            max_batch_events: 0,
            ..Default::default()
        })
        .await;
    assert_status(sub.map(|_| ()), Code::InvalidArgument, "start position");
}

#[tokio::test]
async fn append_to_a_missing_stream_is_not_found_when_auto_create_is_off() {
    let server = TestServer::start_with(|c| c.auto_create_streams = false).await;
    let mut client = server.client().await;
    let result = client
        .append(pb::AppendRequest {
            stream: "s".into(),
            events: vec![event("t", "1")],
            ..Default::default()
        })
        .await;
    assert_status(result, Code::NotFound, "\"s\"");
    client
        .create_stream(pb::CreateStreamRequest {
            stream: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        append(&mut client, "s", vec![event("t", "1")])
            .await
            .first_offset,
        0
    );
}

#[tokio::test]
async fn a_huge_request_is_invalid_argument_naming_the_flag() {
    let server = TestServer::start_with(|c| {
        c.max_event_bytes = 1024;
        c.max_batch_bytes = 4096;
    })
    .await;
    let mut client = server.client().await;
    let huge = format!("\"{}\"", "x".repeat(1 << 20));
    let result = client
        .append(pb::AppendRequest {
            stream: "s".into(),
            events: vec![event("t", &huge)],
            ..Default::default()
        })
        .await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("--max-batch-bytes"), "{status:?}");
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap();
    assert!(listed.into_inner().streams.is_empty());
}

#[tokio::test]
async fn a_connection_that_never_starts_http2_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(async {
        let server =
            TestServer::start_with(|c| c.handshake_timeout = std::time::Duration::from_millis(300))
                .await;
        // Silent, and a few bytes short of the HTTP/2 preface: both closed.
        for sent in [&b""[..], b"PRI * HTTP"] {
            let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            socket.write_all(sent).await.unwrap();
            let mut buf = [0u8; 64];
            // The server closes: end of stream or a reset, not a hang.
            let closed = loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => continue,
                }
            };
            assert!(closed);
        }
        // A real client is unaffected.
        let mut client = server.client().await;
        client
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap();
        server.stop().await;
    })
    .await;
}

/// A huge name is answered INVALID_ARGUMENT with a short message: echoed
/// input is cut, so the status header stays small (clients turn a huge
/// `grpc-message` into RESOURCE_EXHAUSTED).
#[tokio::test]
async fn a_huge_name_gets_a_short_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let status = client
        .append(pb::AppendRequest {
            stream: "x".repeat(1 << 20),
            events: vec![event("t", "1")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().len() < 400,
        "{} bytes",
        status.message().len()
    );
    assert!(status.message().contains('…'));
}

/// Event fields beyond the total size: each violation is INVALID_ARGUMENT
/// naming the event and the rule, and nothing of the batch is written.
#[tokio::test]
async fn event_fields_are_bounded_and_types_follow_the_filter_grammar() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("ok.type", "1")]).await;
    let with = |tweak: &dyn Fn(&mut pb::NewEvent)| {
        let mut e = event("t", "1");
        tweak(&mut e);
        e
    };
    let cases: Vec<(pb::NewEvent, &str)> = vec![
        (
            with(&|e| e.r#type = "a".repeat(201).into()),
            "type is 201 bytes",
        ),
        (with(&|e| e.r#type = "a..b".into()), "empty segment"),
        (with(&|e| e.r#type = ".a".into()), "empty segment"),
        (with(&|e| e.r#type = "a b".into()), "whitespace"),
        (with(&|e| e.r#type = "a\0b".into()), "control"),
        (with(&|e| e.r#type = "a.*".into()), "wildcard"),
        (
            with(&|e| e.key = "k".repeat(201).into()),
            "key is 201 bytes",
        ),
        (
            with(&|e| e.content_type = "c".repeat(201).into()),
            "content type is 201 bytes",
        ),
        (
            with(&|e| e.metadata = (0..65).map(|i| (format!("m{i}"), "v".into())).collect()),
            "65 metadata entries",
        ),
        (
            with(&|e| e.metadata = [("m".into(), "v".repeat(4097))].into()),
            "metadata \"m\" is too long",
        ),
    ];
    for (bad, why) in cases {
        let status = client
            .append(pb::AppendRequest {
                stream: "s".into(),
                events: vec![event("fine", "1"), bad],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
        assert!(
            status.message().starts_with("event 1:") && status.message().contains(why),
            "{why}: {}",
            status.message()
        );
    }
    assert_eq!(
        read_all(&mut client, "s").await.len(),
        1,
        "nothing was written"
    );
    // At the limits, all is accepted.
    let at_limits = with(&|e| {
        e.r#type = "a".repeat(200).into();
        e.key = "k".repeat(200).into();
        e.metadata = [("m".repeat(200), "v".repeat(4096))].into();
    });
    append(&mut client, "s", vec![at_limits]).await;
}
