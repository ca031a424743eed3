//! `pullstream listen --forward-to`: the real binary delivering a real
//! server's stream to a webhook receiver the test runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use pullstream::proto as pb;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pullstream");
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    offset: u64,
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    received: Vec<Received>,
    /// Answers still to give per offset before 200 (a script of failures).
    failures: std::collections::HashMap<u64, u32>,
}

type Shared = Arc<Mutex<Receiver>>;

async fn hook(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let event: Value = serde_json::from_slice(&body).expect("a JSON event");
    let offset = event["offset"].as_u64().expect("offset");
    let mut receiver = shared.lock().unwrap();
    let failing = receiver.failures.get_mut(&offset).filter(|n| **n > 0);
    let status = match failing {
        Some(n) => {
            *n -= 1;
            StatusCode::INTERNAL_SERVER_ERROR
        }
        None => StatusCode::OK,
    };
    let header = |name: &str| headers[name].to_str().unwrap().to_string();
    receiver.received.push(Received {
        offset,
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: body.to_vec(),
        answered: status.as_u16(),
    });
    status
}

async fn start_receiver(shared: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .with_state(shared);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/hook")
}

fn listen(server: &TestServer, target: &str, extra: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["listen", "s", "--forward-to", target, "--consumer", "hook"])
        .args(["--server", &format!("http://{}", server.addr)])
        .args([
            "--signing-secret",
            SECRET,
            "--json",
            "--max-backoff",
            "200ms",
        ])
        .args(extra)
        .env_remove("PULLSTREAM_SERVER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The offsets delivered with a 2xx, in order.
fn delivered(shared: &Shared) -> Vec<u64> {
    shared
        .lock()
        .unwrap()
        .received
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.offset)
        .collect()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn cursor(client: &mut Client) -> u64 {
    client
        .get_consumer(pb::GetConsumerRequest {
            stream: "s".into(),
            consumer: "hook".into(),
        })
        .await
        .map(|r| r.into_inner().consumer.unwrap().next_offset)
        .unwrap_or(0)
}

fn verify(received: &Received) {
    // The Standard Webhooks scheme, computed here from the spec with the
    // test's own HMAC (CI also verifies with the reference Python library).
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", received.id, received.timestamp).as_bytes());
    mac.update(&received.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(received.signature, expected, "{received:?}");
}

#[tokio::test]
async fn listen_forwards_in_order_retries_and_resumes_after_the_last_delivery() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..5 {
        append(
            &mut client,
            "s",
            vec![event(&format!("t.n{i}"), &format!("{{\"i\":{i}}}"))],
        )
        .await;
    }
    let shared: Shared = Arc::default();
    shared.lock().unwrap().failures.insert(1, 2);
    let target = start_receiver(shared.clone()).await;

    let mut bridge = listen(&server, &target, &[]).spawn().unwrap();
    wait_until("five deliveries", || delivered(&shared).len() >= 5).await;
    let mut polled = 0;
    while cursor(&mut client).await < 5 {
        polled += 1;
        assert!(polled < 300, "the cursor was never committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let receiver = shared.lock().unwrap();
        let attempts: Vec<(u64, u16)> = receiver
            .received
            .iter()
            .map(|r| (r.offset, r.answered))
            .collect();
        // Offset 1 failed twice and was retried before anything after it.
        assert_eq!(
            attempts,
            vec![
                (0, 200),
                (1, 500),
                (1, 500),
                (1, 200),
                (2, 200),
                (3, 200),
                (4, 200)
            ]
        );
        for r in &receiver.received {
            verify(r);
            assert_eq!(r.id, format!("s:{}", r.offset));
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["data"], json!({ "i": r.offset }));
            assert_eq!(body["type"], format!("t.n{}", r.offset));
        }
    }
    // Stop the bridge, append more, start it again: it resumes after the
    // last delivered event.
    bridge.kill().await.unwrap();
    append(
        &mut client,
        "s",
        vec![event("t.n5", "{\"i\":5}"), event("t.n6", "{\"i\":6}")],
    )
    .await;
    let mut bridge = listen(&server, &target, &[]).spawn().unwrap();
    wait_until("two more deliveries", || delivered(&shared).len() >= 7).await;
    assert_eq!(delivered(&shared), (0..7).collect::<Vec<u64>>());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delivered(&shared).len(), 7, "nothing delivered twice");
    bridge.kill().await.unwrap();
    let output = bridge.wait_with_output().await.unwrap();
    let lines = String::from_utf8_lossy(&output.stdout).to_string();
    let first: Value =
        serde_json::from_str(lines.lines().next().expect("a line per attempt")).unwrap();
    assert_eq!(first["offset"], 5);
    assert_eq!(first["status"], 200);
    assert_eq!(first["delivered"], true);
}

#[tokio::test]
async fn listen_gives_up_after_max_attempts_without_skipping() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("a", "{}"), event("b", "{}")]).await;
    let shared: Shared = Arc::default();
    shared.lock().unwrap().failures.insert(0, 100);
    let target = start_receiver(shared.clone()).await;
    let output = within(listen(&server, &target, &["--max-attempts", "3"]).output())
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gave up on offset 0"), "{stderr}");
    assert!(stderr.contains("500"), "{stderr}");
    let attempts: Vec<u64> = shared
        .lock()
        .unwrap()
        .received
        .iter()
        .map(|r| r.offset)
        .collect();
    assert_eq!(
        attempts,
        vec![0, 0, 0],
        "offset 1 was never sent past the failing one"
    );
    assert_eq!(cursor(&mut client).await, 0);

    // Bad settings fail at once with a message.
    for (args, needle) in [
        (vec!["--forward-to", "not a url"], "not a URL"),
        (vec!["--forward-to", "https://x.example/hook"], "http://"),
        (vec!["--signing-secret", "whsec_!!"], "base64"),
    ] {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args([
                "listen",
                "s",
                "--server",
                &format!("http://{}", server.addr),
            ])
            .args(if args[0] == "--forward-to" {
                vec![]
            } else {
                vec!["--forward-to", "http://127.0.0.1:9/hook"]
            })
            .args(&args);
        let output = within(command.output()).await.unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
