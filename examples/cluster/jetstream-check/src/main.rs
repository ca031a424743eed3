//! Checks, against a real 3-node nats-server cluster, the JetStream
//! behaviours Pullstream's cluster mode is designed on (ARCHITECTURE.md,
//! "Cluster mode on JetStream"), and prints what the server did:
//!
//!   dir=$(mktemp -d)
//!   urls=$(examples/cluster/nats-cluster.sh up "$dir")
//!   cargo run --manifest-path examples/cluster/jetstream-check/Cargo.toml -- "$urls" "$dir"
//!   examples/cluster/nats-cluster.sh down "$dir"
//!
//! The last step kills two of the three nodes (kill -9), so run it on a
//! cluster made for it.
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let urls = std::env::args().nth(1).expect("usage: jetstream-check URLS DIR");
    let dir = std::env::args().nth(2).expect("usage: jetstream-check URLS DIR");
    let client = async_nats::connect(urls.split(',').collect::<Vec<_>>()).await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("PS_1").await;
    let s = js
        .create_stream(stream::Config {
            name: "PS_1".into(),
            subjects: vec!["ps.1.chunks".into()],
            num_replicas: 3,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    println!("created R3: {:?}", s.cached_info().config.num_replicas);

    // 1. Conditional append: expected last sequence.
    let publish = |last: u64, id: Option<&str>, body: &'static str| {
        let js = js.clone();
        let id = id.map(str::to_string);
        async move {
            let mut h = HeaderMap::new();
            h.insert("Nats-Expected-Last-Sequence", last.to_string().as_str());
            if let Some(id) = id {
                h.insert("Nats-Msg-Id", id.as_str());
            }
            h.insert("Ps-First-Offset", "0");
            js.publish_with_headers("ps.1.chunks", h, Bytes::from_static(body.as_bytes()))
                .await?
                .await
        }
    };
    let a = publish(0, None, "chunk0").await?;
    println!("first publish seq {} dup {}", a.sequence, a.duplicate);
    match publish(0, None, "conflict").await {
        Err(e) => println!("conflict: kind {:?}: {e}", e.kind()),
        Ok(ack) => println!("UNEXPECTED conflict accepted: {ack:?}"),
    }
    // 2. Msg-Id dedupe answers duplicate with the original sequence?
    let b = publish(1, Some("idem-1"), "chunk1").await?;
    let dup = publish(2, Some("idem-1"), "chunk1 again").await;
    println!("idem first {:?}; again (expected 2): {:?}", b.sequence, dup.as_ref().map(|a| (a.sequence, a.duplicate)).map_err(|e| format!("{:?} {e}", e.kind())));
    let dup_stale = publish(1, Some("idem-1"), "chunk1 again").await;
    println!("again with the stale expected seq 1: {:?}", dup_stale.as_ref().map(|a| (a.sequence, a.duplicate)).map_err(|e| format!("{:?} {e}", e.kind())));

    // 3. Direct get by sequence, with headers.
    let m = s.direct_get(2).await?;
    println!("direct get 2: {:?} headers {:?}", m.payload, m.headers.get("Ps-First-Offset"));
    // 4. Purge below a sequence keeps sequences (no reuse).
    for i in 0..5 {
        publish(2 + i, None, "more").await?;
    }
    let p = s.purge().sequence(4).await?;
    let info = js.get_stream("PS_1").await?.info().await?.state.clone();
    println!("purged {} -> first_seq {} last_seq {}", p.purged, info.first_sequence, info.last_sequence);
    match s.direct_get(2).await {
        Err(e) => println!("get purged 2: {:?} {e}", e.kind()),
        Ok(_) => println!("UNEXPECTED purged message readable"),
    }

    // 5. Compare-and-set state without the KV helper: one stream, one
    // subject per key, Nats-Expected-Last-Subject-Sequence.
    let _ = js.delete_stream("PS_STATE").await;
    let st = js
        .create_stream(stream::Config {
            name: "PS_STATE".into(),
            subjects: vec!["ps.state.>".into()],
            num_replicas: 3,
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    let cas = |subject: &'static str, expected: u64, body: &'static str| {
        let js = js.clone();
        async move {
            let mut h = HeaderMap::new();
            h.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string().as_str());
            js.publish_with_headers(subject, h, Bytes::from_static(body.as_bytes())).await?.await
        }
    };
    let r1 = cas("ps.state.cursor.c", 0, "10").await?.sequence;
    let again = cas("ps.state.cursor.c", 0, "11").await;
    println!("cas create {r1}; create again: {:?}", again.map(|a| a.sequence).map_err(|e| format!("{:?} {e}", e.kind())));
    let r2 = cas("ps.state.cursor.c", r1, "12").await?.sequence;
    let stale = cas("ps.state.cursor.c", r1, "13").await;
    println!("cas update {r2}; stale: {:?}", stale.map(|a| a.sequence).map_err(|e| format!("{:?} {e}", e.kind())));
    let last = st.direct_get_last_for_subject("ps.state.cursor.c").await?;
    println!("last for subject: {:?} seq {}", last.payload, last.sequence);
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "ps_test".into(),
            num_replicas: 3,
            history: 1,
            ..Default::default()
        })
        .await;
    println!("kv helper on this server: {:?}", kv.map(|_| ()).map_err(|e| format!("{e:?}")));

    // 6. Ack latency R3 on loopback (500 publishes, one at a time).
    let mut lat = Vec::new();
    let mut last = info.last_sequence;
    for _ in 0..500 {
        let t = Instant::now();
        let ack = publish(last, None, "x").await?;
        lat.push(t.elapsed());
        last = ack.sequence;
    }
    lat.sort();
    println!("R3 ack p50 {:?} p99 {:?}", lat[250], lat[495]);

    // 7. Losing nodes: one of three (still a quorum), then two.
    for node in ["n1", "n2"] {
        let pid = std::fs::read_to_string(format!("{dir}/{node}.pid"))?;
        std::process::Command::new("kill").args(["-9", pid.trim()]).status()?;
        let t = Instant::now();
        let mut outcome = String::new();
        // Retry for up to 10 s (a leader election may be under way).
        while t.elapsed() < Duration::from_secs(10) {
            match tokio::time::timeout(Duration::from_secs(2), publish(last, None, "after")).await {
                Ok(Ok(ack)) => { last = ack.sequence; outcome = format!("acked seq {} after {:?}", ack.sequence, t.elapsed()); break; }
                Ok(Err(e)) => outcome = format!("{:?} {e} (after {:?})", e.kind(), t.elapsed()),
                Err(_) => outcome = format!("no answer within 2 s (after {:?})", t.elapsed()),
            }
        }
        println!("killed {node}: {outcome}");
        let info = tokio::time::timeout(Duration::from_secs(3), js.get_stream("PS_1")).await;
        println!("  stream info: {:?}", info.map(|r| r.map(|s| s.cached_info().cluster.clone().map(|c| c.leader))).map_err(|_| "timeout"));
    }
    Ok(())
}
