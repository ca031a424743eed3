//! Storage faults, injected for real: writes and syncs under the
//! write-ahead log and the checkpoint fail through the fault seam
//! (`durability::fault`), a real tmpfs fills up, the log's bytes are torn
//! or flipped on disk. Each test restarts the server and checks exact
//! offsets and contents: nothing acknowledged is lost, nothing failed is
//! half applied, offsets are never reused.

use std::sync::Arc;
use std::time::Duration;

use pullstream::durability::fault::{Failure, Faults, Target};
use pullstream::proto as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::*;

/// The change a test makes while a fault is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Append,
    Create,
    Delete,
    Commit,
    /// ResetGroup of group `g` (committed at 30, idle) to offset 40.
    ResetGroup,
}

async fn try_change(client: &mut Client, change: Change) -> Result<(), tonic::Status> {
    match change {
        Change::Append => client
            .append(pb::AppendRequest {
                stream: "a".into(),
                events: vec![event("t", r#""failed""#)],
                ..Default::default()
            })
            .await
            .map(drop),
        Change::Create => client
            .create_stream(pb::CreateStreamRequest {
                stream: "b".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        Change::Delete => client
            .delete_stream(pb::DeleteStreamRequest { stream: "a".into() })
            .await
            .map(drop),
        Change::Commit => client
            .commit_cursor(pb::CommitCursorRequest {
                stream: "a".into(),
                consumer: "c".into(),
                next_offset: 40,
                ..Default::default()
            })
            .await
            .map(drop),
        Change::ResetGroup => client
            .reset_group(pb::ResetGroupRequest {
                stream: "a".into(),
                group: "g".into(),
                to: Some(pb::reset_group_request::To::Offset(40)),
            })
            .await
            .map(drop),
    }
}

/// Makes group `g` on stream `a` with its offset committed at 30, and
/// waits until it has no member (so it may be reset).
async fn idle_group_at_30(client: &mut Client) {
    let mut member = join_group_of_a(client, "g").await.unwrap().into_inner();
    next(&mut member).await.unwrap();
    client
        .commit_group(pb::CommitGroupRequest {
            stream: "a".into(),
            group: "g".into(),
            member: "m".into(),
            next_offset: 30,
        })
        .await
        .unwrap();
    drop(member);
    within(async {
        while !group_of_a(client).await.members.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Joins `group` of stream `a` as member `m`, from the earliest event
/// (creating the group if it is new).
async fn join_group_of_a(
    client: &mut Client,
    group: &str,
) -> Result<tonic::Response<tonic::Streaming<pb::SubscribeResponse>>, tonic::Status> {
    client
        .subscribe(pb::SubscribeRequest {
            stream: "a".into(),
            group: group.into(),
            member: "m".into(),
            start: Some(pb::subscribe_request::Start::Position(
                pb::StartPosition::Earliest as i32,
            )),
            ..Default::default()
        })
        .await
}

async fn get_group_of_a(client: &mut Client, group: &str) -> Result<pb::GroupInfo, tonic::Status> {
    let info = client
        .get_group(pb::GetGroupRequest {
            stream: "a".into(),
            group: group.into(),
        })
        .await?;
    Ok(info.into_inner().group.expect("a group in the answer"))
}

async fn group_of_a(client: &mut Client) -> pb::GroupInfo {
    get_group_of_a(client, "g").await.unwrap()
}

/// The store of a stopped server's data dir, opened directly (to damage
/// it as a bad disk would).
pub(crate) fn open_store(data_dir: &std::path::Path) -> pullstream::storage::Store {
    pullstream::storage::Store::open(&pullstream::storage::StoreOptions {
        path: data_dir.to_path_buf(),
        cache_bytes: 8 << 20,
        background_flush: pullstream::storage::BackgroundFlush::Off,
        write_ahead_log: true,
        checkpoint_bytes: 1 << 20,
        faults: None,
    })
    .unwrap()
}

fn events(range: std::ops::Range<usize>) -> Vec<pb::NewEvent> {
    range.map(|i| event("t", &format!("{i}"))).collect()
}

async fn cursor(client: &mut Client) -> u64 {
    client
        .get_consumer(pb::GetConsumerRequest {
            stream: "a".into(),
            consumer: "c".into(),
        })
        .await
        .expect("consumer")
        .into_inner()
        .consumer
        .unwrap()
        .next_offset
}

async fn write_refusal(client: &mut Client) -> String {
    client
        .get_server_status(pb::GetServerStatusRequest::default())
        .await
        .expect("status")
        .into_inner()
        .write_refusal
}

async fn writes_health(server: &TestServer) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "pullstream.writes".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status();
    status
}

/// Waits (bounded) for the health watcher's next turn to report `want`.
pub(crate) async fn await_writes_health(server: &TestServer, want: ServingStatus) {
    within(async {
        while writes_health(server).await != want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A server whose log and checkpoints fail where the returned `Faults`
/// says, and a client of it.
async fn with_faults() -> (Arc<Faults>, TestServer, Client) {
    let faults = Arc::new(Faults::new());
    let server = TestServer::start_with(|c| c.faults = Some(faults.clone())).await;
    let client = server.client().await;
    (faults, server, client)
}

/// A server with the fault seam: stream `a` with 50 acknowledged events
/// (data `0`..`49`), consumer `c` at 20, and, for `ResetGroup`, group `g`
/// committed at 30 and idle.
async fn before_the_fault(change: Change) -> (Arc<Faults>, TestServer, Client) {
    let (faults, server, mut client) = with_faults().await;
    for batch in 0..5 {
        append(&mut client, "a", events(batch * 10..batch * 10 + 10)).await;
    }
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "a".into(),
            consumer: "c".into(),
            next_offset: 20,
            ..Default::default()
        })
        .await
        .unwrap();
    if change == Change::ResetGroup {
        idle_group_at_30(&mut client).await;
    }
    (faults, server, client)
}

/// Stream `a` with 50 acknowledged events and consumer `c` at 20; then
/// `change` fails under the armed fault (EIO, not a full disk) with UNAVAILABLE, every later
/// write is refused while reads go on, and after a restart every
/// acknowledged change is there exactly and writes continue after it.
async fn a_failed_write_loses_nothing_acknowledged(change: Change, target: Target) {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let (faults, server, mut client) = before_the_fault(change).await;

    match target {
        // A failing device: the write gets 10 bytes in, then EIO.
        Target::WalWrite => faults.fail_nth(target, 0, Failure::Io, 10),
        _ => faults.fail_nth(target, 0, Failure::Io, 0),
    }
    let status = try_change(&mut client, change).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{change:?}: {status:?}");
    assert!(
        status
            .message()
            .contains("may or may not have been applied"),
        "{}",
        status.message()
    );
    // The fault is gone, but the log stays poisoned: nothing after the
    // failure can be acknowledged out of order.
    for later in [
        Change::Append,
        Change::Create,
        Change::Delete,
        Change::Commit,
    ] {
        let status = try_change(&mut client, later).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{later:?} after {change:?}"
        );
    }
    let stored = read_all(&mut client, "a").await;
    assert_eq!(stored.len(), 50, "reads go on");
    assert!(write_refusal(&mut client).await.contains("storage failed"));
    await_writes_health(&server, ServingStatus::NotServing).await;

    // A graceful stop after the failure succeeds; the restart recovers.
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let after = read_all(&mut client, "a").await;
    let head = after.len() as u64;
    for (i, e) in after.iter().take(50).enumerate() {
        assert_eq!(e.offset, i as u64);
        assert_eq!(
            e.data,
            format!("{i}").into_bytes(),
            "acknowledged event {i}"
        );
    }
    // The failed change was never acknowledged and never applied (sled
    // gets a change only once its log record is durable): it is gone.
    assert_eq!(head, 50, "{change:?}");
    assert_eq!(cursor(&mut client).await, 20, "{change:?}");
    if change == Change::ResetGroup {
        assert_eq!(
            group_of_a(&mut client).await.low_watermark,
            30,
            "the failed reset is gone"
        );
    }
    let missing = client
        .get_stream(pb::GetStreamRequest { stream: "b".into() })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "the failed creation is gone"
    );
    let ack = append(&mut client, "a", events(0..1)).await;
    assert_eq!(ack.first_offset, head, "offsets are never reused");
    assert_eq!(write_refusal(&mut client).await, "");
    await_writes_health(&server, ServingStatus::Serving).await;
}

/// Stream `a` with 50 acknowledged events, consumer `c` at 20 (and group
/// `g` at 30 for a reset); then `change` meets a full disk (the log write
/// gets 10 bytes in, then ENOSPC): RESOURCE_EXHAUSTED naming the disk,
/// nothing of it applied, and, with space back, the same change and later
/// ones succeed without a restart, the append at the offset the failed
/// one would have had (never acknowledged, never seen). After a restart
/// exactly the acknowledged changes are there.
async fn a_write_on_a_full_disk_fails_alone(change: Change) {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let (faults, server, mut client) = before_the_fault(change).await;

    faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
    let status = try_change(&mut client, change).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{change:?}: {status:?}"
    );
    assert!(
        status.message().contains("disk full")
            && status
                .message()
                .contains("nothing of this change was written"),
        "{}",
        status.message()
    );
    // Nothing of it was applied, and the server still takes writes.
    assert_eq!(read_all(&mut client, "a").await.len(), 50);
    assert_eq!(cursor(&mut client).await, 20);
    if change == Change::ResetGroup {
        assert_eq!(group_of_a(&mut client).await.low_watermark, 30);
    }
    assert_eq!(write_refusal(&mut client).await, "");
    await_writes_health(&server, ServingStatus::Serving).await;

    // Space is back: the change succeeds when tried again, and so do others.
    try_change(&mut client, change)
        .await
        .unwrap_or_else(|e| panic!("{change:?} again: {e:?}"));
    let mut head = 50;
    if change == Change::Append {
        head = 51;
    }
    if change != Change::Delete {
        let ack = append(&mut client, "a", events(100..101)).await;
        assert_eq!(ack.first_offset, head, "{change:?}: offsets stay dense");
        head += 1;
    }

    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    if change == Change::Delete {
        let gone = client
            .get_stream(pb::GetStreamRequest { stream: "a".into() })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Code::NotFound, "the retried deletion holds");
        return;
    }
    let after = read_all(&mut client, "a").await;
    let data: Vec<String> = after
        .iter()
        .map(|e| String::from_utf8(e.data.to_vec()).unwrap())
        .collect();
    let mut want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    if change == Change::Append {
        want.push(r#""failed""#.to_string());
    }
    want.push("100".to_string());
    assert_eq!(data, want, "{change:?}");
    assert_eq!(after.last().unwrap().offset, head - 1);
    let cursor_after = if change == Change::Commit { 40 } else { 20 };
    assert_eq!(cursor(&mut client).await, cursor_after, "{change:?}");
    if change == Change::ResetGroup {
        assert_eq!(group_of_a(&mut client).await.low_watermark, 40);
    }
    let created = client
        .get_stream(pb::GetStreamRequest { stream: "b".into() })
        .await;
    assert_eq!(created.is_ok(), change == Change::Create, "{change:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_append_fails_alone_and_appends_go_on() {
    a_write_on_a_full_disk_fails_alone(Change::Append).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_create_fails_alone_and_writes_go_on() {
    a_write_on_a_full_disk_fails_alone(Change::Create).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_delete_fails_alone_and_writes_go_on() {
    a_write_on_a_full_disk_fails_alone(Change::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_consumer_commit_fails_alone_and_writes_go_on() {
    a_write_on_a_full_disk_fails_alone(Change::Commit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_a_group_reset_fails_alone_and_writes_go_on() {
    a_write_on_a_full_disk_fails_alone(Change::ResetGroup).await;
}

/// Over HTTP, a log write that meets a full disk is 507 Insufficient
/// Storage with RESOURCE_EXHAUSTED, nothing of it is written, the metrics
/// count the rolled-back write, and the next append succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_an_http_append_is_507_and_counted() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let faults = Arc::new(Faults::new());
    let server = TestServer::start_with(|c| {
        c.faults = Some(faults.clone());
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut client = server.client().await;
    append(&mut client, "a", events(0..3)).await;
    let rolled_back = || async {
        let (_, text) =
            crate::operability::http_get(server.metrics_addr.unwrap(), "/metrics").await;
        crate::operability::series(&text, "pullstream_log_writes_rolled_back_total")
    };
    assert_eq!(rolled_back().await, 0.0);

    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("http://{}/v1/streams/a/events", server.addr))
            .json(&serde_json::json!({ "events": [{ "type": "t", "data": "over http" }] }))
            .send()
    };
    faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
    let refused = post().await.unwrap();
    assert_eq!(refused.status().as_u16(), 507);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "RESOURCE_EXHAUSTED", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("disk full"),
        "{body}"
    );
    assert_eq!(read_all(&mut client, "a").await.len(), 3, "nothing written");
    assert_eq!(rolled_back().await, 1.0);

    let accepted = post().await.unwrap();
    assert_eq!(accepted.status().as_u16(), 200);
    let body: serde_json::Value = accepted.json().await.unwrap();
    assert_eq!(body["first_offset"], 3, "offsets stay dense: {body}");
    assert_eq!(rolled_back().await, 1.0);
}

/// A consumer group whose creation meets a full disk: the join fails with
/// RESOURCE_EXHAUSTED, the group is not kept (its creation was never
/// written), and joining again creates it, durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_on_a_full_disk_is_not_kept() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let (faults, server, mut client) = with_faults().await;
    append(&mut client, "a", events(0..10)).await;

    faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
    let refused = join_group_of_a(&mut client, "h").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // An append goes through the stream's writer, which has reloaded its
    // state from storage by the time it answers.
    let ack = append(&mut client, "a", events(10..11)).await;
    assert_eq!(ack.first_offset, 10);
    let missing = get_group_of_a(&mut client, "h").await.unwrap_err();
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "the unwritten group is gone"
    );

    let mut member = join_group_of_a(&mut client, "h")
        .await
        .unwrap()
        .into_inner();
    next(&mut member).await.unwrap();
    drop(member);
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    get_group_of_a(&mut client, "h")
        .await
        .expect("the group made on the second join is durable");
}

/// Appends racing a full disk: the group whose write fails, and every
/// change decided after it before the writer reloaded, are refused
/// unwritten; every acknowledged append is at the offsets it was told,
/// densely after the 10 stored events, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_racing_a_full_disk_stay_dense() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let (faults, server, mut client) = with_faults().await;
    append(&mut client, "a", events(0..10)).await;
    // The third log write from now fails: some appends land before it.
    faults.fail_nth(Target::WalWrite, 2, Failure::NoSpace, 10);
    let mut tasks = Vec::new();
    for producer in 0..8 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for batch in 0..5 {
                let first = 1000 * (producer + 1) + batch * 10;
                let request = pb::AppendRequest {
                    stream: "a".into(),
                    events: events(first..first + 5),
                    ..Default::default()
                };
                outcomes.push((first, client.append(request).await));
            }
            outcomes
        }));
    }
    let mut acked = std::collections::BTreeMap::new();
    let mut refused = 0;
    for task in tasks {
        for (first, outcome) in task.await.unwrap() {
            match outcome {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    assert_eq!(ack.count, 5);
                    assert!(acked.insert(ack.first_offset, first).is_none());
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused >= 1, "the failed write refused its group");
    let check = |stored: &[pb::Event]| {
        assert_eq!(stored.len(), 10 + 5 * acked.len(), "only acked events");
        for (&offset, &first) in &acked {
            for i in 0..5 {
                let e = &stored[offset as usize + i];
                assert_eq!(e.offset, offset + i as u64);
                assert_eq!(e.data, format!("{}", first + i).into_bytes());
            }
        }
    };
    check(&read_all(&mut client, "a").await);
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    check(&read_all(&mut client, "a").await);
    let next = append(&mut client, "a", events(0..1)).await.first_offset;
    assert_eq!(next, 10 + 5 * acked.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_during_append_poisons_the_log_and_loses_nothing_acknowledged() {
    a_failed_write_loses_nothing_acknowledged(Change::Append, Target::WalWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_during_delete_poisons_the_log_and_loses_nothing_acknowledged() {
    a_failed_write_loses_nothing_acknowledged(Change::Delete, Target::WalWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_poisons_the_log_and_loses_nothing_acknowledged() {
    a_failed_write_loses_nothing_acknowledged(Change::Append, Target::WalSync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_sync_poisons_the_log_and_loses_nothing_acknowledged() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let faults = Arc::new(Faults::new());
    let server = TestServer::start_with(|c| {
        c.faults = Some(faults.clone());
        c.checkpoint_bytes = 4096;
    })
    .await;
    let mut client = server.client().await;
    faults.fail_nth(Target::CheckpointSync, 0, Failure::Io, 0);
    // The log rotates every 4 KiB; the first checkpoint's sync fails in the
    // background, and from then on every write is refused.
    let mut acked = 0;
    let refused = within(async {
        loop {
            let request = pb::AppendRequest {
                stream: "a".into(),
                events: events(acked..acked + 10),
                ..Default::default()
            };
            match client.append(request).await {
                Ok(ack) => {
                    assert_eq!(ack.into_inner().first_offset, acked as u64);
                    acked += 10;
                }
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("checkpoint"),
        "{}",
        refused.message()
    );
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let after = read_all(&mut client, "a").await;
    assert_eq!(after.len(), acked);
    for (i, e) in after.iter().enumerate() {
        assert_eq!(e.data, format!("{i}").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_floor_appends_and_creates_are_refused_but_space_can_be_freed() {
    if sled_only(
        "cluster mode keeps nothing under the data dir, so the free-space floor does not apply",
    ) {
        return;
    }
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "a", events(0..50)).await;
    append(&mut client, "gone", events(0..10)).await;
    let (dir, mut config) = server.stop().await;
    // More free space than any disk has: the floor is never met.
    config.min_free_bytes = Some(u64::MAX);
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    for change in [Change::Append, Change::Create] {
        let status = try_change(&mut client, change).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{change:?}");
        assert!(
            status.message().starts_with("disk full:")
                && status.message().contains("nothing was written"),
            "{}",
            status.message()
        );
    }
    // What frees space (or costs almost none) still works.
    try_change(&mut client, Change::Commit).await.unwrap();
    client
        .delete_stream(pb::DeleteStreamRequest {
            stream: "gone".into(),
        })
        .await
        .expect("deleting a stream on a full disk frees space");
    assert!(write_refusal(&mut client).await.starts_with("disk full"));
    await_writes_health(&server, ServingStatus::NotServing).await;
    assert_eq!(read_all(&mut client, "a").await.len(), 50, "reads go on");
    let (dir, mut config) = server.stop().await;
    config.min_free_bytes = Some(0);
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    assert_eq!(
        append(&mut client, "a", events(50..51)).await.first_offset,
        50
    );
    assert_eq!(cursor(&mut client).await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_dropped_and_a_copy_kept() {
    if sled_only("it damages the sled data dir's files") {
        return;
    }
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for batch in 0..3 {
        append(&mut client, "a", events(batch * 10..batch * 10 + 10)).await;
    }
    let (dir, config) = server.stop().await;
    let wal = dir.path().join("wal");
    let newest = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    // A crash in the middle of a write leaves part of a record where the
    // next one starts (the zero-filled region after it stays zeros).
    let mut data = std::fs::read(&newest).unwrap();
    let mut good = 24;
    while data.len() >= good + 16 && data[good..good + 16] != [0u8; 16] {
        good += 16 + u32::from_le_bytes(data[good..good + 4].try_into().unwrap()) as usize;
    }
    data.truncate(good);
    data.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5]);
    data.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&newest, &data).unwrap();

    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let after = read_all(&mut client, "a").await;
    assert_eq!(after.len(), 30);
    let name = newest.file_name().unwrap().to_str().unwrap();
    let copy = wal.join(format!("torn-{name}-at-{good}.bin"));
    assert_eq!(
        std::fs::read(&copy).expect("a copy of the torn tail"),
        [200, 0, 0, 0, 1, 2, 3, 4, 5]
    );
    assert_eq!(
        append(&mut client, "a", events(0..1)).await.first_offset,
        30
    );
}

/// A 64 MiB tmpfs on a temp dir, unmounted when dropped; `None` (with the
/// reason printed) where this process cannot mount one (not root, or no
/// CAP_SYS_ADMIN). CI runs as root.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(dir.path())
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            eprintln!("skipped: this root cannot mount a tmpfs here (no CAP_SYS_ADMIN?)");
            return None;
        }
        Some(Tmpfs(dir))
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the volume at `mount` with `filler` until `left` bytes are free.
/// The server may take space between the measure and the write (the log
/// preallocates its next stretch in the background): then measure again.
fn fill_to(mount: &std::path::Path, filler: &std::path::Path, left: u64) {
    for _ in 0..10 {
        let _ = std::fs::remove_file(filler);
        let free = pullstream::durability::space::free_bytes(mount).unwrap();
        match std::fs::write(filler, vec![1u8; free.saturating_sub(left) as usize]) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("filling {}: {e}", mount.display()),
        }
    }
    panic!(
        "could not fill {} (the server kept taking space)",
        mount.display()
    );
}

/// A real full disk: a 64 MiB tmpfs as the data dir (root only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_disk_refuses_writes_until_space_returns() {
    let Some(mount) = Tmpfs::mount() else {
        return;
    };
    let data = mount.path().join("data");
    let mut config = pullstream::config::ServerConfig::for_tests(&data);
    // 2 MiB floor.
    config.min_free_bytes = Some(2 << 20);
    let server = TestServer::start_in(tempfile::tempdir().unwrap(), config).await;
    let mut client = server.client().await;
    append(&mut client, "a", events(0..50)).await;
    // Fill the disk to 1 MiB free, below the floor.
    let filler = mount.path().join("filler");
    fill_to(mount.path(), &filler, 1 << 20);
    let status = try_change(&mut client, Change::Append).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("disk full"),
        "{}",
        status.message()
    );
    try_change(&mut client, Change::Commit).await.unwrap();
    // Space returns: appends resume by themselves, no restart.
    std::fs::remove_file(&filler).unwrap();
    let ack = append(&mut client, "a", events(50..60)).await;
    assert_eq!(ack.first_offset, 50);
    let (dir, config) = server.stop().await;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let after = read_all(&mut client, "a").await;
    assert_eq!(after.len(), 60);
    for (i, e) in after.iter().enumerate() {
        assert_eq!(e.data, format!("{i}").into_bytes());
    }
    assert_eq!(cursor(&mut client).await, 40);
}

/// 62 appends of 2 events and a consumer commit to 120 under `fsync`
/// (with `extra` flags), a kill -9, then one payload byte of the 32nd log
/// record flipped. Returns the data dir, the log file, its damaged bytes
/// and the damaged record's offset in it.
async fn crash_and_flip_record_32(
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--durability", "fsync"];
    args.extend_from_slice(extra);
    let (mut child, url) = crate::process::spawn_server(dir.path(), &args);
    let mut client = connect(&url).await;
    for batch in 0..62 {
        append(&mut client, "s", events(batch * 2..batch * 2 + 2)).await;
    }
    client
        .commit_cursor(pb::CommitCursorRequest {
            stream: "s".into(),
            consumer: "late".into(),
            next_offset: 120,
            ..Default::default()
        })
        .await
        .unwrap();
    // A crash: the log holds every record since the start.
    child.kill().unwrap();
    child.wait().unwrap();

    // Flip one payload byte of the 32nd record (0 is the stream's creation).
    let wal = dir.path().join("wal");
    let file = wal.join(pullstream::durability::wal::file_name(1));
    let mut data = std::fs::read(&file).unwrap();
    let mut offset = 24;
    for _ in 0..32 {
        let len = u32::from_le_bytes(data[offset..offset + 4].try_into().unwrap()) as usize;
        offset += 16 + len;
    }
    data[offset + 16 + 10] ^= 0x01;
    std::fs::write(&file, &data).unwrap();
    (dir, file, data, offset)
}

/// One flipped byte in the middle of the log: the server refuses to start
/// and names `repair`; `repair` reports exactly the lost offsets and
/// consumer commits, and with `--yes` truncates there; the server then
/// starts on the good prefix and offsets go on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_mid_log_refuses_to_start_and_repair_reports_and_truncates() {
    use crate::process::spawn_server;
    const BIN: &str = env!("CARGO_BIN_EXE_pullstream");
    // No background storage flush: sled then holds only what the last
    // checkpoint flushed, so exactly the records past the damage are lost
    // (with it, sled may hold a later prefix and less is lost).
    let (dir, file, data, offset) = crash_and_flip_record_32(&["--storage-flush-bytes", "0"]).await;

    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the server must not start: {stderr}");
    assert!(
        stderr.contains(&format!("damaged at byte {offset}"))
            && stderr.contains("pullstream repair --data-dir"),
        "{stderr}"
    );

    // Records 1..=31 (offsets 0..62) are good; 32.. (offsets 62..124 and
    // the commit) are lost.
    let report = std::process::Command::new(BIN)
        .args(["repair", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !report.status.success(),
        "without --yes nothing is repaired"
    );
    let json: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(json["repaired"], false);
    let losses: Vec<String> = json["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        losses,
        [
            r#"stream "s": events at offsets 62..123 (62 events)"#,
            r#"consumer "late" of stream "s": its commit to offset 120 (the consumer will not exist)"#,
        ],
        "{json}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        data,
        "a report changes nothing"
    );

    let repaired = std::process::Command::new(BIN)
        .args(["repair", "--yes", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&repaired.stdout);
    assert!(repaired.status.success(), "{stdout}");
    assert!(stdout.contains("events at offsets 62..123") && stdout.contains("Repaired"));

    let (mut child, url) = spawn_server(dir.path(), &["--durability", "fsync"]);
    let mut client = connect(&url).await;
    let kept = read_all(&mut client, "s").await;
    assert_eq!(kept.len(), 62);
    for (i, e) in kept.iter().enumerate() {
        assert_eq!(e.data, format!("{i}").into_bytes());
    }
    assert_eq!(
        append(&mut client, "s", events(0..1)).await.first_offset,
        62
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A chunk damaged inside sled (a flipped byte) and one missing: reads and
/// subscriptions get every event before the damage, then DATA_LOSS naming
/// the stream and offsets, never OUT_OF_RANGE and never a silent skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_missing_chunks_are_data_loss_never_retention_or_a_skip() {
    if sled_only("it damages the sled data dir's files") {
        return;
    }
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for batch in 0..10 {
        append(&mut client, "s", events(batch * 10..batch * 10 + 10)).await;
    }
    drop(client);
    let (dir, config) = server.stop().await;
    const BIN: &str = env!("CARGO_BIN_EXE_pullstream");
    let verify = || {
        std::process::Command::new(BIN)
            .args(["verify", "--json", "--data-dir"])
            .arg(&config.data_dir)
            .output()
            .unwrap()
    };
    let clean = verify();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    {
        let store = open_store(&config.data_dir);
        store.damage_chunk_for_tests("s", 35, false).unwrap();
        store.damage_chunk_for_tests("s", 70, true).unwrap();
    }
    // `verify` finds both, and so does `--verify-on-start`.
    let found = verify();
    assert!(!found.status.success(), "verify exits non-zero on damage");
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    let damage = &report[0]["damage"];
    assert_eq!(
        (damage[0]["first"].as_u64(), damage[0]["end"].as_u64()),
        (Some(30), Some(40)),
        "{report}"
    );
    assert!(
        damage[0]["reason"].as_str().unwrap().contains("checksum"),
        "{report}"
    );
    assert_eq!(
        (damage[1]["first"].as_u64(), damage[1]["end"].as_u64()),
        (Some(70), Some(80)),
        "{report}"
    );
    assert_eq!(damage.as_array().unwrap().len(), 2);
    let mut strict = config.clone();
    strict.verify_on_start = true;
    let Err(refused) = pullstream::server::Server::open(strict).await else {
        panic!("--verify-on-start must refuse a damaged data dir");
    };
    assert!(refused.to_string().contains("offsets 30..40"), "{refused}");
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let read = |offset: u64| pb::ReadRequest {
        stream: "s".into(),
        offset,
        limit: 1000,
        ..Default::default()
    };
    let page = client.read(read(0)).await.unwrap().into_inner();
    assert_eq!(page.events.len(), 30, "what precedes the damage is served");
    assert_eq!(page.next_offset, 30);
    for (offset, expected) in [
        (30, "from offset 30"),
        (35, "from offset 30"),
        (70, "from offset 70 to 79"),
    ] {
        let status = client.read(read(offset)).await.unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "offset {offset}: {status:?}");
        assert!(
            status.message().contains(expected) && status.message().contains("\"s\""),
            "{}",
            status.message()
        );
    }
    let page = client.read(read(40)).await.unwrap().into_inner();
    assert_eq!(page.events.first().unwrap().offset, 40);
    assert_eq!(
        page.next_offset, 70,
        "the read stops before the missing chunk"
    );

    let mut subscription = subscribe(
        &mut client,
        "s",
        Some(pb::subscribe_request::Start::Offset(0)),
    )
    .await;
    let mut received = Vec::new();
    let status = loop {
        match next(&mut subscription).await {
            Ok(response) => received.extend(response.events),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(received.len(), 30, "a gap-free prefix, then the error");
    // Status reports what reads found.
    let status = client
        .get_server_status(pb::GetServerStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let damaged: Vec<(u64, Option<u64>)> = status.streams[0]
        .damaged
        .iter()
        .map(|d| (d.first_offset, d.end_offset))
        .collect();
    assert_eq!(damaged, [(30, None), (70, Some(80))]);
    for (i, e) in received.iter().enumerate() {
        assert_eq!(e.offset, i as u64);
    }
}

/// The oldest chunk missing (nothing was trimmed): reads at the first
/// retained offset get DATA_LOSS, not "no longer retained".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_first_chunk_is_data_loss_not_retention() {
    if sled_only("it damages the sled data dir's files") {
        return;
    }
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for batch in 0..3 {
        append(&mut client, "s", events(batch * 10..batch * 10 + 10)).await;
    }
    drop(client);
    let (dir, config) = server.stop().await;
    {
        let store = open_store(&config.data_dir);
        store.damage_chunk_for_tests("s", 0, true).unwrap();
    }
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let info = client
        .get_stream(pb::GetStreamRequest { stream: "s".into() })
        .await
        .unwrap()
        .into_inner()
        .stream
        .unwrap();
    assert_eq!(
        info.first_offset, 0,
        "the loss does not move the first retained offset"
    );
    let status = client
        .read(pb::ReadRequest {
            stream: "s".into(),
            offset: 0,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("from offset 0 to 9"),
        "{}",
        status.message()
    );
}

/// ENOSPC during a consumer group's commit: refused with
/// RESOURCE_EXHAUSTED, nothing of it applied; the next commit succeeds
/// without a restart, and after one the group holds exactly it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_during_a_group_commit_loses_nothing_acknowledged() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    let (faults, server, mut client) = with_faults().await;
    append(&mut client, "a", events(0..50)).await;
    let mut member = client
        .subscribe(pb::SubscribeRequest {
            stream: "a".into(),
            group: "g".into(),
            member: "m".into(),
            start: Some(pb::subscribe_request::Start::Offset(0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut delivered = 0;
    while delivered < 50 {
        delivered += next(&mut member).await.unwrap().events.len();
    }
    let commit = |next_offset| pb::CommitGroupRequest {
        stream: "a".into(),
        group: "g".into(),
        member: "m".into(),
        next_offset,
    };
    client.commit_group(commit(20)).await.unwrap();
    faults.fail_nth(Target::WalWrite, 0, Failure::NoSpace, 10);
    let status = client.commit_group(commit(40)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        group_of_a(&mut client).await.low_watermark,
        20,
        "the failed commit is not applied"
    );
    client.commit_group(commit(30)).await.unwrap();
    drop(member);
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let group = group_of_a(&mut client).await;
    assert_eq!(group.low_watermark, 30, "{group:?}");
}

/// With the background storage flush on (here after every change, so that
/// it runs in so small a test), sled may already hold events past the last
/// checkpoint when the log is damaged: repair then loses less, and what the
/// server serves afterwards is still a gapless prefix that includes every
/// event before the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_with_the_background_flush_keeps_a_gapless_prefix() {
    const BIN: &str = env!("CARGO_BIN_EXE_pullstream");
    let (dir, _, _, _) = crash_and_flip_record_32(&["--storage-flush-bytes", "1"]).await;
    let repaired = std::process::Command::new(BIN)
        .args(["repair", "--yes", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stdout)
    );
    let (mut child, url) = crate::process::spawn_server(dir.path(), &["--durability", "fsync"]);
    let mut client = connect(&url).await;
    let kept = read_all(&mut client, "s").await;
    assert!(kept.len() >= 62 && kept.len() <= 124, "{}", kept.len());
    for (i, e) in kept.iter().enumerate() {
        assert_eq!(e.offset, i as u64);
        assert_eq!(e.data, format!("{i}").into_bytes());
    }
    let next = append(&mut client, "s", events(0..1)).await.first_offset;
    assert_eq!(
        next,
        kept.len() as u64,
        "offsets go on from the kept prefix"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SIGTERM while the disk is completely full: the server exits 0 (the
/// closing checkpoint cannot be written, but the synced log keeps every
/// acknowledged change), and once space is back a restart has them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_full_disk_exits_0_and_loses_nothing() {
    let Some(mount) = Tmpfs::mount() else {
        return;
    };
    let data = mount.path().join("data");
    let flags = ["--durability", "fsync", "--min-free-bytes", "0"];
    let (mut child, url) = crate::process::spawn_server(&data, &flags);
    let mut client = connect(&url).await;
    let mut acked = 0;
    for batch in 0..20 {
        append(&mut client, "s", events(batch * 5..batch * 5 + 5)).await;
        acked += 5;
    }
    // Fill the disk to the last byte.
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![1u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
        let small = [1u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.sync_all();
    }
    crate::process::sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?} on a full disk");

    std::fs::remove_file(&filler).unwrap();
    let (mut child, url) = crate::process::spawn_server(&data, &flags);
    let mut client = connect(&url).await;
    let kept = read_all(&mut client, "s").await;
    assert_eq!(kept.len(), acked);
    for (i, e) in kept.iter().enumerate() {
        assert_eq!(e.data, format!("{i}").into_bytes());
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
