//! Stream management: create, get, list with pages, delete.

use pullstream::proto as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn create_get_list_delete() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = client
        .create_stream(pb::CreateStreamRequest {
            stream: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .stream
        .unwrap();
    assert_eq!(
        (
            created.name.as_str(),
            created.first_offset,
            created.next_offset,
            created.event_count
        ),
        ("a", 0, 0, 0)
    );
    assert!(created.created_time.is_some());
    let status = client
        .create_stream(pb::CreateStreamRequest {
            stream: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    append(&mut client, "a", vec![event("t", "1"), event("t", "2")]).await;
    let info = client
        .get_stream(pb::GetStreamRequest { stream: "a".into() })
        .await
        .unwrap()
        .into_inner()
        .stream
        .unwrap();
    assert_eq!(
        (info.first_offset, info.next_offset, info.event_count),
        (0, 2, 2)
    );
    assert!(info.approximate_bytes > 0);
    assert_eq!(info.created_time, created.created_time);

    for name in ["c", "b", "e", "d"] {
        append(&mut client, name, vec![event("t", "1")]).await;
    }
    let mut names = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_streams(pb::ListStreamsRequest {
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.streams.len() <= 2);
        names.extend(page.streams.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);

    client
        .delete_stream(pb::DeleteStreamRequest { stream: "c".into() })
        .await
        .unwrap();
    for call in [
        client
            .get_stream(pb::GetStreamRequest { stream: "c".into() })
            .await
            .map(|_| ()),
        client
            .delete_stream(pb::DeleteStreamRequest { stream: "c".into() })
            .await
            .map(|_| ()),
        client
            .read(pb::ReadRequest {
                stream: "c".into(),
                offset: 0,
                limit: 1,
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(call.unwrap_err().code(), Code::NotFound);
    }
    // Deletion and creation survive a restart.
    let server = server.restart().await;
    let mut client = server.client().await;
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "d", "e"]);
    assert_eq!(listed.streams[0].next_offset, 2);
}

#[tokio::test]
async fn read_pages_follow_next_offset() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let events: Vec<_> = (0..250).map(|i| event("t", &i.to_string())).collect();
    append(&mut client, "s", events).await;
    let page = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 0,
            limit: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 100, "default limit");
    assert_eq!((page.next_offset, page.head_offset), (100, 250));
    let page = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 240,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 10);
    assert_eq!(page.events[0].offset, 240);
    assert_eq!(page.next_offset, 250);
    let empty = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 250,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.events.is_empty());
    assert_eq!(empty.next_offset, 250);
}
