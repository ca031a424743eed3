//! AppendPipeline: ordered, dense, pipelined appends with backpressure;
//! a failed batch ends the pipeline and nothing after it is written;
//! idempotent resends after a reconnect; the limits and bad inputs of
//! Append, through the pipeline.

use std::collections::HashMap;

use pullstream::auth::Scope;
use pullstream::client::{AppendPipeline, ConnectOptions};
use pullstream::config::ServerConfig;
use pullstream::proto::{self as pb, append_pipeline_request::Request as Inbound};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::auth::offline_keys;
use crate::common::*;

fn open(stream: &str, batches: u32) -> pb::PipelineOpen {
    pb::PipelineOpen {
        stream: stream.into(),
        max_in_flight_batches: batches,
        ..Default::default()
    }
}

fn batch(sequence: u64, events: Vec<pb::NewEvent>) -> pb::PipelineBatch {
    pb::PipelineBatch {
        sequence,
        events,
        ..Default::default()
    }
}

/// `n` events whose data is `"<producer>/<i>"`.
fn tagged(producer: &str, from: usize, n: usize) -> Vec<pb::NewEvent> {
    (from..from + n)
        .map(|i| event("t", &format!("\"{producer}/{i}\"")))
        .collect()
}

/// Sends every batch through `pipeline` while it has room, reading
/// acknowledgements otherwise; returns the acknowledgements in order, or
/// the status that ended the pipeline (with those acknowledged before it).
async fn run(
    pipeline: &mut AppendPipeline,
    batches: Vec<pb::PipelineBatch>,
) -> (Vec<pb::PipelineAck>, Option<tonic::Status>) {
    let mut acks = Vec::new();
    let status = |e: anyhow::Error| e.downcast::<tonic::Status>().expect("a status");
    for b in batches {
        while !pipeline.has_room() {
            match pipeline.ack().await {
                Ok(Some(ack)) => acks.push(ack),
                Ok(None) => panic!("the pipeline ended early"),
                Err(e) => return (acks, Some(status(e))),
            }
        }
        if pipeline.send(b).await.is_err() {
            // The call ended: what was acknowledged, then why.
            loop {
                match pipeline.ack().await {
                    Ok(Some(ack)) => acks.push(ack),
                    Ok(None) => panic!("the pipeline ended without a status"),
                    Err(e) => return (acks, Some(status(e))),
                }
            }
        }
    }
    pipeline.finish();
    loop {
        match pipeline.ack().await {
            Ok(Some(ack)) => acks.push(ack),
            Ok(None) => return (acks, None),
            Err(e) => return (acks, Some(status(e))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_appended_in_order_and_acknowledged_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut pipeline = AppendPipeline::open(&mut client, open("s", 4))
        .await
        .unwrap();
    assert_eq!(pipeline.opened.stream, "s");
    assert_eq!(pipeline.opened.max_in_flight_batches, 4);
    let batches = (0..25)
        .map(|b| batch(100 + b as u64, tagged("p", b * 10, 10)))
        .collect();
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(acks.len(), 25);
    for (b, ack) in acks.iter().enumerate() {
        assert_eq!(ack.sequence, 100 + b as u64, "in the order sent");
        assert_eq!(ack.first_offset, b as u64 * 10, "dense");
        assert_eq!(ack.count, 10);
        assert!(!ack.duplicate);
        assert!(ack.time.is_some());
    }
    let stored = read_all(&mut client, "s").await;
    assert_eq!(stored.len(), 250);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.offset, i as u64);
        assert_eq!(e.data, format!("\"p/{i}\"").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_lowers_limits_past_its_maxima_and_zero_asks_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::for_tests(dir.path());
    config.max_pipeline_batches = 5;
    config.max_pipeline_bytes = 4096;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let asked_for_more = pb::PipelineOpen {
        stream: "s".into(),
        max_in_flight_batches: 1000,
        max_in_flight_bytes: 1 << 30,
        ..Default::default()
    };
    let pipeline = AppendPipeline::open(&mut client, asked_for_more)
        .await
        .unwrap();
    assert_eq!(pipeline.opened.max_in_flight_batches, 5);
    assert_eq!(pipeline.opened.max_in_flight_bytes, 4096);
    let pipeline = AppendPipeline::open(&mut client, open("s", 0))
        .await
        .unwrap();
    assert_eq!(pipeline.opened.max_in_flight_batches, 5);
    let pipeline = AppendPipeline::open(&mut client, open("s", 2))
        .await
        .unwrap();
    assert_eq!(pipeline.opened.max_in_flight_batches, 2);
}

/// Several pipelines and unary appends racing on one stream: offsets stay
/// dense, each producer's events keep its order, every ack names exactly
/// the events stored at its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_and_unary_appends_racing_keep_offsets_dense_and_each_producer_in_order() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for p in 0..3 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let name = format!("pipe{p}");
            let mut pipeline = AppendPipeline::open(&mut client, open("s", 8))
                .await
                .unwrap();
            let batches = (0..40)
                .map(|b| batch(b as u64, tagged(&name, b * 5, 5)))
                .collect();
            let (acks, status) = run(&mut pipeline, batches).await;
            assert!(status.is_none(), "{status:?}");
            acks.into_iter()
                .enumerate()
                .map(|(b, a)| (name.clone(), b * 5, a.first_offset, a.count))
                .collect::<Vec<_>>()
        }));
    }
    for u in 0..2 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let name = format!("unary{u}");
            let mut acks = Vec::new();
            for b in 0..40 {
                let ack = append(&mut client, "s", tagged(&name, b * 3, 3)).await;
                acks.push((name.clone(), b * 3, ack.first_offset, ack.count));
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(within(task).await.unwrap());
    }
    let mut client = server.client().await;
    let stored = read_all(&mut client, "s").await;
    assert_eq!(stored.len(), 3 * 200 + 2 * 120);
    let data: Vec<String> = stored
        .iter()
        .enumerate()
        .map(|(i, e)| {
            assert_eq!(e.offset, i as u64, "dense");
            String::from_utf8(e.data.to_vec()).unwrap()
        })
        .collect();
    for (name, first_index, first_offset, count) in &acked {
        for k in 0..*count as usize {
            assert_eq!(
                data[*first_offset as usize + k],
                format!("\"{name}/{}\"", first_index + k),
                "the ack names the events stored at its offsets"
            );
        }
    }
    let mut last: HashMap<String, usize> = HashMap::new();
    for d in &data {
        let (name, i) = d.trim_matches('"').split_once('/').unwrap();
        let i: usize = i.parse().unwrap();
        if let Some(previous) = last.insert(name.to_string(), i) {
            assert_eq!(i, previous + 1, "{name} keeps its order");
        }
    }
}

/// A batch failing in the middle ends the pipeline with its status, named;
/// the batches before it stay written and none after it is written, even
/// those already sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_ends_the_pipeline_and_nothing_after_it_is_written() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // A precondition that fails in the stream's writer...
    let mut pipeline = AppendPipeline::open(&mut client, open("a", 16))
        .await
        .unwrap();
    let mut batches: Vec<_> = (0..12)
        .map(|b| batch(b, tagged("a", b as usize, 1)))
        .collect();
    batches[5].expected_next_offset = Some(0);
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    let status = status.expect("the pipeline failed");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with("batch 5:"),
        "{}",
        status.message()
    );
    assert_eq!(acks.len(), 5);
    let stored = read_all(&mut client, "a").await;
    assert_eq!(stored.len(), 5, "nothing after the failed batch");

    // ...and a batch the checks before the writer reject.
    let mut pipeline = AppendPipeline::open(&mut client, open("b", 16))
        .await
        .unwrap();
    let mut batches: Vec<_> = (0..12)
        .map(|b| batch(b, tagged("b", b as usize, 1)))
        .collect();
    batches[7].events[0].r#type = String::new().into();
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    let status = status.expect("the pipeline failed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("batch 7:"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("empty type"),
        "{}",
        status.message()
    );
    assert_eq!(acks.len(), 7);
    assert_eq!(read_all(&mut client, "b").await.len(), 7);

    // An idempotency key reused with another batch: ALREADY_EXISTS, named.
    let mut pipeline = AppendPipeline::open(&mut client, open("c", 16))
        .await
        .unwrap();
    let mut batches: Vec<_> = (0..6)
        .map(|b| batch(b, tagged("c", b as usize, 1)))
        .collect();
    batches[1].idempotency_key = "k".into();
    batches[3].idempotency_key = "k".into();
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    let status = status.expect("the pipeline failed");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().starts_with("batch 3:"),
        "{}",
        status.message()
    );
    assert_eq!(acks.len(), 3);
    assert_eq!(read_all(&mut client, "c").await.len(), 3);
}

/// A client that stops reading its acknowledgements stalls its own
/// pipeline (the server stops reading it) and nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_acks_stalls_only_its_own_pipeline() {
    let server = TestServer::start().await;
    // A tiny HTTP/2 stream window: the acknowledgements it does not read
    // fill it after a few dozen (its own flood protection against small
    // buffered frames would end the connection after a hundred or so).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut stalled = client_on(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::AppendPipelineRequest {
        request: Some(Inbound::Open(open("s", 2))),
    })
    .await
    .unwrap();
    // 4 KiB batches, 400 MB in all: far more than any window buffers.
    let payload = format!("\"{}\"", "x".repeat(4 << 10));
    let sender = tokio::spawn(async move {
        for b in 0..100_000u64 {
            let request = pb::AppendPipelineRequest {
                request: Some(Inbound::Batch(batch(b, vec![event("t", &payload)]))),
            };
            if tx.send(request).await.is_err() {
                return b;
            }
        }
        100_000
    });
    // The call is open, and its acknowledgements are never read.
    let responses = stalled
        .append_pipeline(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Wait until the server has stopped taking its batches.
    let mut client = server.client().await;
    let mut written = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = stream_head(&mut client, "s").await;
        if now > 0 && now == written {
            break;
        }
        written = now;
    }
    assert!(
        written < 100_000,
        "the server stopped reading ({written} written)"
    );
    if sender.is_finished() {
        let sent = sender.await.unwrap();
        let mut responses = responses;
        let mut n = 0;
        let end = loop {
            match responses.message().await {
                Ok(Some(_)) => n += 1,
                other => break other,
            }
        };
        panic!("the client's sends are held back: sent {sent}, {n} acks, then {end:?}");
    }
    // Others go on: a unary Append, and another pipeline, on the same stream.
    let ack = within(async { append(&mut client, "s", tagged("unary", 0, 1)).await }).await;
    assert_eq!(ack.first_offset, written);
    let mut other = server.client().await;
    let mut pipeline = AppendPipeline::open(&mut other, open("s", 4))
        .await
        .unwrap();
    let batches = (0..10)
        .map(|b| batch(b, tagged("other", b as usize, 1)))
        .collect();
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(acks.len(), 10);
    assert_eq!(stream_head(&mut client, "s").await, written + 11);
    drop(responses);
    sender.abort();
}

async fn stream_head(client: &mut Client, stream: &str) -> u64 {
    client
        .get_stream(pb::GetStreamRequest {
            stream: stream.into(),
        })
        .await
        .map(|r| r.into_inner().stream.unwrap().next_offset)
        .unwrap_or(0)
}

/// After a broken connection, resending the unacknowledged batches with
/// their idempotency keys writes each batch once: those already written
/// are acknowledged as duplicates with their original offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_with_idempotency_keys_after_a_reconnect_write_each_batch_once() {
    let server = TestServer::start().await;
    let keyed = |b: u64| pb::PipelineBatch {
        idempotency_key: format!("k{b}"),
        ..batch(b, tagged("p", b as usize * 2, 2))
    };
    let mut client = server.client().await;
    let mut pipeline = AppendPipeline::open(&mut client, open("s", 8))
        .await
        .unwrap();
    for b in 0..6 {
        pipeline.send(keyed(b)).await.unwrap();
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(within(pipeline.ack()).await.unwrap().unwrap());
    }
    // The connection breaks with three batches unacknowledged.
    drop(pipeline);
    drop(client);
    let mut client = server.client().await;
    let mut pipeline = AppendPipeline::open(&mut client, open("s", 8))
        .await
        .unwrap();
    let (acks, status) = within(run(&mut pipeline, (0..8).map(keyed).collect())).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(acks.len(), 8);
    for (ack, earlier) in acks.iter().zip(&first) {
        assert!(ack.duplicate, "batch {} was written before", ack.sequence);
        assert_eq!(ack.first_offset, earlier.first_offset);
    }
    assert!(!acks[6].duplicate && !acks[7].duplicate, "new batches");
    let stored = read_all(&mut client, "s").await;
    assert_eq!(stored.len(), 16, "each of the 8 batches once");
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(
            e.data,
            format!("\"p/{i}\"").into_bytes(),
            "in order, no repeat"
        );
    }
}

/// The first message must open the pipeline, and only the first; the
/// stream name, the batch limits and message sizes are Append's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pipelines_get_invalid_argument_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::for_tests(dir.path());
    config.max_batch_bytes = 64 << 10;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let call = |messages: Vec<pb::AppendPipelineRequest>| {
        let mut client = client.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
            for m in messages {
                tx.send(m).await.unwrap();
            }
            drop(tx);
            let mut responses = client
                .append_pipeline(ReceiverStream::new(rx))
                .await?
                .into_inner();
            loop {
                if responses.message().await?.is_none() {
                    return Ok::<_, tonic::Status>(());
                }
            }
        }
    };
    let opening = |stream: &str| pb::AppendPipelineRequest {
        request: Some(Inbound::Open(open(stream, 4))),
    };
    let batch_message = |b: pb::PipelineBatch| pb::AppendPipelineRequest {
        request: Some(Inbound::Batch(b)),
    };
    let cases: Vec<(&str, Vec<pb::AppendPipelineRequest>, &str)> = vec![
        (
            "a batch first",
            vec![batch_message(batch(1, tagged("x", 0, 1)))],
            "first message",
        ),
        ("nothing at all", vec![], "before its `open`"),
        (
            "an empty message",
            vec![pb::AppendPipelineRequest { request: None }],
            "first message",
        ),
        (
            "open twice",
            vec![opening("s"), opening("s")],
            "already open",
        ),
        (
            "a bad stream name",
            vec![opening("no/slash")],
            "invalid stream name",
        ),
        (
            "an empty batch",
            vec![opening("s"), batch_message(batch(9, vec![]))],
            "batch 9: the batch is empty",
        ),
        (
            "a batch past --max-batch-bytes",
            vec![
                opening("s"),
                batch_message(batch(
                    1,
                    vec![event("t", &format!("\"{}\"", "x".repeat(70 << 10)))],
                )),
            ],
            "batch 1: the batch is",
        ),
        (
            "a message past what the server reads",
            vec![
                opening("s"),
                batch_message(batch(
                    1,
                    vec![event("t", &format!("\"{}\"", "x".repeat(1 << 20)))],
                )),
            ],
            "--max-batch-bytes",
        ),
    ];
    for (what, messages, says) in cases {
        let status = within(call(messages)).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(says),
            "{what}: {}",
            status.message()
        );
    }
    let listed = client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.streams.is_empty(), "nothing was written: {listed:?}");
}

/// The pipeline needs the publish scope and a key, as Append does; with
/// auto-create off, a missing stream is NOT_FOUND, named by the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_needs_a_key_with_the_publish_scope() {
    let dir = tempfile::tempdir().unwrap();
    let keys = offline_keys(
        dir.path(),
        &[
            ("default", &[Scope::Publish]),
            ("default", &[Scope::Subscribe]),
        ],
    );
    let mut config = ServerConfig::for_tests(dir.path());
    config.auto_create_streams = false;
    let server = TestServer::start_in(dir, config).await;
    let options = |key: Option<&str>| ConnectOptions {
        api_key: key.map(str::to_string),
        ..server.options()
    };
    let status_of = |e: anyhow::Error| e.downcast::<tonic::Status>().expect("a status");
    let mut anonymous = options(None).event_log().await.unwrap();
    let status = AppendPipeline::open(&mut anonymous, open("s", 4))
        .await
        .map(|_| ())
        .map_err(status_of)
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut reader = options(Some(&keys[1])).event_log().await.unwrap();
    let status = AppendPipeline::open(&mut reader, open("s", 4))
        .await
        .map(|_| ())
        .map_err(status_of)
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut writer = options(Some(&keys[0])).event_log().await.unwrap();
    let mut pipeline = AppendPipeline::open(&mut writer, open("s", 4))
        .await
        .unwrap();
    let (acks, status) = within(run(&mut pipeline, vec![batch(1, tagged("w", 0, 1))])).await;
    assert!(acks.is_empty());
    let status = status.expect("no such stream");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().starts_with("batch 1:"),
        "{}",
        status.message()
    );
}

/// A unary Append of one tagged event carrying `token`.
pub(crate) async fn fenced_append(
    client: &mut Client,
    producer: &str,
    token: &str,
) -> Result<pb::AppendResponse, tonic::Status> {
    client
        .append(pb::AppendRequest {
            stream: "s".into(),
            events: tagged(producer, 0, 1),
            fencing_token: token.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn set_fence(
    client: &mut Client,
    stream: &str,
    token: &str,
    expected: Option<&str>,
) -> Result<pb::SetFenceResponse, tonic::Status> {
    client
        .set_fence(pb::SetFenceRequest {
            stream: stream.into(),
            token: token.into(),
            expected_token: expected.map(str::to_string),
        })
        .await
        .map(|r| r.into_inner())
}

/// Two producers racing: the successor fences the first off, and from
/// that point none of the first's batches is written; the stream holds the
/// first's events, then only the successor's. The fence is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_off_producer_never_interleaves_with_its_successor() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    set_fence(&mut client, "s", "a", None).await.unwrap();
    // The first producer pipelines batches for as long as it may.
    let mut first_client = server.client().await;
    let first = tokio::spawn(async move {
        let mut pipeline = AppendPipeline::open(
            &mut first_client,
            pb::PipelineOpen {
                fencing_token: "a".into(),
                ..open("s", 8)
            },
        )
        .await
        .unwrap();
        let batches = (0..100_000)
            .map(|b| batch(b, tagged("a", b as usize, 1)))
            .collect();
        run(&mut pipeline, batches).await
    });
    // Once it has written some, its successor takes over.
    while stream_head(&mut client, "s").await < 50 {
        tokio::task::yield_now().await;
    }
    set_fence(&mut client, "s", "b", Some("a")).await.unwrap();
    let mut successor = server.client().await;
    let mut pipeline = AppendPipeline::open(
        &mut successor,
        pb::PipelineOpen {
            fencing_token: "b".into(),
            ..open("s", 8)
        },
    )
    .await
    .unwrap();
    let (acks, status) = within(run(
        &mut pipeline,
        (0..20)
            .map(|b| batch(b, tagged("b", b as usize, 1)))
            .collect(),
    ))
    .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(acks.len(), 20);
    let (first_acks, first_status) = within(first).await.unwrap();
    let status = first_status.expect("the first producer is fenced off");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("current token \"b\""),
        "{}",
        status.message()
    );
    let stored = read_all(&mut client, "s").await;
    let owners: Vec<char> = stored.iter().map(|e| e.data[1] as char).collect();
    let switch = owners
        .iter()
        .position(|&o| o == 'b')
        .expect("the successor wrote");
    assert!(owners[..switch].iter().all(|&o| o == 'a'));
    assert!(
        owners[switch..].iter().all(|&o| o == 'b'),
        "no interleaving"
    );
    assert_eq!(
        switch,
        first_acks.len(),
        "every acknowledged batch of the first, and no other"
    );
    assert_eq!(owners.len() - switch, 20);

    // Unary appends are fenced the same way; unfenced ones are not checked.
    let fenced = fenced_append(&mut client, "a", "a").await.unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
    append(&mut client, "s", tagged("x", 0, 1)).await;
    // A replacement that expects the wrong current token is refused.
    let refused = set_fence(&mut client, "s", "c", Some("a"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let too_long = set_fence(&mut client, "s", &"t".repeat(201), None)
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument, "{too_long:?}");

    // The fence survives a restart.
    let server = server.restart().await;
    let mut client = server.client().await;
    let fenced = fenced_append(&mut client, "a", "a").await.unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
    let ok = fenced_append(&mut client, "b", "b").await;
    assert!(ok.is_ok(), "{ok:?}");
    // Cleared: a token no longer matches anything; unfenced appends pass.
    set_fence(&mut client, "s", "", Some("b")).await.unwrap();
    append(&mut client, "s", tagged("x", 1, 1)).await;
    let ok = fenced_append(&mut client, "a", "a").await;
    assert_eq!(
        ok.expect_err("a token on an unfenced stream does not match")
            .code(),
        Code::FailedPrecondition
    );
}

/// A failed sync under a pipeline: the batches of the failed group and
/// every later one fail (the first failure is named), and after a restart
/// the stream holds exactly the acknowledged batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_under_a_pipeline_loses_nothing_acknowledged_and_writes_nothing_after() {
    if sled_only("it injects faults into the sled write-ahead log") {
        return;
    }
    use pullstream::durability::fault::{Failure, Faults, Target};
    let faults = std::sync::Arc::new(Faults::new());
    let server = TestServer::start_with(|c| c.faults = Some(faults.clone())).await;
    let mut client = server.client().await;
    faults.fail_nth(Target::WalSync, 5, Failure::Io, 0);
    let mut pipeline = AppendPipeline::open(&mut client, open("s", 8))
        .await
        .unwrap();
    let batches = (0..200)
        .map(|b| batch(b, tagged("p", b as usize * 10, 10)))
        .collect();
    let (acks, status) = within(run(&mut pipeline, batches)).await;
    let status = status.expect("the sync failed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let named = format!("batch {}:", acks.len());
    assert!(status.message().starts_with(&named), "{}", status.message());
    let (dir, mut config) = server.stop().await;
    config.faults = None;
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let stored = read_all(&mut client, "s").await;
    assert_eq!(
        stored.len(),
        acks.len() * 10,
        "exactly the acknowledged batches"
    );
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.data, format!("\"p/{i}\"").into_bytes());
    }
}

/// Shutdown ends an open pipeline with UNAVAILABLE, after what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_pipeline_with_unavailable() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut pipeline = AppendPipeline::open(&mut client, open("s", 4))
        .await
        .unwrap();
    pipeline.send(batch(1, tagged("p", 0, 1))).await.unwrap();
    assert_eq!(within(pipeline.ack()).await.unwrap().unwrap().sequence, 1);
    let stopping = tokio::spawn(server.stop());
    let error = within(pipeline.ack()).await.expect_err("the call ends");
    let status = error.downcast::<tonic::Status>().expect("a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    within(stopping).await.unwrap();
}
