//! The HTTP JSON API, Server-Sent Events and gRPC-Web, on the real
//! server's one port, through a real HTTP client (reqwest).

use std::time::Duration;

use futures_util::StreamExt;
use pullstream::auth::Scope;
use serde_json::{json, Value};

use crate::auth::offline_keys;
use crate::common::*;

/// The server's base URL and a client.
struct Http {
    base: String,
    client: reqwest::Client,
    key: Option<String>,
}

impl Http {
    fn new(server: &TestServer) -> Http {
        Http {
            base: format!("http://{}", server.addr),
            client: reqwest::Client::new(),
            key: None,
        }
    }

    fn keyed(server: &TestServer, key: &str) -> Http {
        Http {
            key: Some(key.to_string()),
            ..Http::new(server)
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = builder.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, headers, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, body) = self.send(self.request(reqwest::Method::GET, path)).await;
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, _, body) = self
            .send(self.request(reqwest::Method::POST, path).json(&body))
            .await;
        (status, body)
    }

    async fn append(&self, stream: &str, events: Value) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/streams/{stream}/events"),
                json!({ "events": events }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

fn typed(types: &[&str]) -> Value {
    Value::Array(
        types
            .iter()
            .enumerate()
            .map(|(i, t)| json!({ "type": t, "key": format!("k{i}"), "data": { "n": i } }))
            .collect(),
    )
}

#[tokio::test]
async fn append_and_read_a_page_with_json_and_binary_payloads() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let appended = http
        .append(
            "orders",
            json!([
                { "type": "invoice.paid", "key": "in_1", "data": { "amount": 10, "items": [1, 2] },
                  "metadata": { "trace": "t1" } },
                { "type": "blob.stored", "data_base64": "AAEC/w==", "content_type": "application/octet-stream" },
                { "type": "text.said", "data": "plain string" },
                { "type": "note.written", "data_text": "héllo\nworld" },
                { "type": "csv.row", "data_text": "a,b", "content_type": "text/csv" },
                { "type": "latin1", "data_base64": "6Q==", "content_type": "text/plain; charset=iso-8859-1" },
            ]),
        )
        .await;
    assert_eq!(appended["first_offset"], 0);
    assert_eq!(appended["count"], 6);
    assert_eq!(appended["duplicate"], false);
    assert!(appended["time"].as_str().unwrap().ends_with('Z'));

    let (status, headers, page) = http
        .send(http.request(reqwest::Method::GET, "/v1/streams/orders/events?limit=2"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(headers["pullstream-next-offset"], "2");
    assert_eq!(headers["pullstream-head-offset"], "6");
    assert_eq!(page["next_offset"], 2);
    assert_eq!(page["head_offset"], 6);
    assert_eq!(page["caught_up"], false);
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["offset"], 0);
    assert_eq!(events[0]["data"], json!({ "amount": 10, "items": [1, 2] }));
    assert_eq!(events[0]["content_type"], "application/json");
    assert_eq!(events[0]["metadata"], json!({ "trace": "t1" }));
    assert_eq!(events[1]["data_base64"], "AAEC/w==");
    assert!(events[1].get("data").is_none());

    // The same events over gRPC, byte for byte.
    let mut client = server.client().await;
    let stored = read_all(&mut client, "orders").await;
    assert_eq!(&stored[0].data[..], br#"{"amount":10,"items":[1,2]}"#);
    assert_eq!(&stored[1].data[..], &[0, 1, 2, 255]);
    assert_eq!(&stored[2].data[..], br#""plain string""#);
    // Text payloads are stored as UTF-8 and read back as text, unless
    // they are not UTF-8 (then as bytes).
    assert_eq!(stored[3].data, "héllo\nworld".as_bytes());
    assert_eq!(stored[3].content_type, "text/plain; charset=utf-8");
    assert_eq!(stored[4].content_type, "text/csv");
    let (_, page) = http.get("/v1/streams/orders/events?offset=3").await;
    assert_eq!(page["events"][0]["data_text"], "héllo\nworld");
    assert!(page["events"][0].get("data_base64").is_none());
    assert_eq!(page["events"][1]["data_text"], "a,b");
    assert_eq!(page["events"][2]["data_base64"], "6Q==");
    assert!(page["events"][2].get("data_text").is_none());

    // From the next offset, then from the head: an empty, caught-up page.
    let (_, page) = http.get("/v1/streams/orders/events?offset=2").await;
    assert_eq!(page["events"][0]["data"], "plain string");
    let (_, page) = http.get("/v1/streams/orders/events?offset=latest").await;
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_offset"], 6);
    assert_eq!(page["caught_up"], true);
    // From a time: everything was appended after the epoch.
    let (_, page) = http
        .get("/v1/streams/orders/events?time=2000-01-01T00:00:00Z")
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn idempotency_keys_preconditions_and_filters_behave_as_in_grpc() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let batch = json!({ "events": [{ "type": "a.b", "data": 1 }] });
    let send = |key: &'static str, body: Value| {
        http.send(
            http.request(reqwest::Method::POST, "/v1/streams/s/events")
                .header("Idempotency-Key", key)
                .json(&body),
        )
    };
    let (status, _, first) = send("k-1", batch.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, _, again) = send("k-1", batch.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["first_offset"], first["first_offset"]);
    // The same key for another batch: 409, nothing written.
    let (status, _, conflict) = send("k-1", json!({ "events": [{ "type": "other" }] })).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["code"], "ALREADY_EXISTS");

    let (status, wrong) = http
        .post(
            "/v1/streams/s/events",
            json!({ "events": [{ "type": "a.b" }], "expected_next_offset": 7 }),
        )
        .await;
    assert_eq!(status, 412, "{wrong}");
    assert_eq!(wrong["code"], "FAILED_PRECONDITION");
    let (status, right) = http
        .post(
            "/v1/streams/s/events",
            json!({ "events": [{ "type": "c.d", "key": "x" }], "expected_next_offset": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{right}");
    assert_eq!(right["first_offset"], 1);

    http.append("s", typed(&["a.b", "c.d", "a.z"])).await;
    let (_, page) = http.get("/v1/streams/s/events?type=a.*&key=k0,k2").await;
    let offsets: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![2, 4]);
    assert_eq!(page["next_offset"], 5);
    // Repeated parameters mean the same as a list.
    let (_, page) = http
        .get("/v1/streams/s/events?type=c.d&type=a.b&key=x")
        .await;
    assert_eq!(page["events"][0]["offset"], 1);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_writes_nothing() {
    let server = TestServer::start_with(|c| {
        c.max_batch_bytes = 64 << 10;
        c.max_event_bytes = 32 << 10;
    })
    .await;
    let http = Http::new(&server);
    http.append("s", typed(&["a"])).await;
    let raw = |body: &'static str| {
        http.send(
            http.request(reqwest::Method::POST, "/v1/streams/s/events")
                .header("content-type", "application/json")
                .body(body),
        )
    };
    for (body, code, needle) in [
        ("{not json", 400, "not the JSON"),
        ("", 400, "empty"),
        (r#"{"events":[]}"#, 400, "empty"),
        (r#"{"events":[{"data":1}]}"#, 400, "type"),
        (r#"{"events":[{"type":"a","colour":"red"}]}"#, 400, "colour"),
        (
            r#"{"events":[{"type":"a","data":1,"data_base64":"AA=="}]}"#,
            400,
            "more than one",
        ),
        (
            r#"{"events":[{"type":"a","data_text":"x","data_base64":"AA=="}]}"#,
            400,
            "more than one",
        ),
        (
            r#"{"events":[{"type":"a","data_base64":"%%%"}]}"#,
            400,
            "base64",
        ),
        (r#"{"events":[{"type":"a b"}]}"#, 400, "type"),
    ] {
        let (status, _, error) = raw(body).await;
        assert_eq!(status, code, "{body}: {error}");
        assert_eq!(error["code"], "INVALID_ARGUMENT", "{body}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{body}: {error}"
        );
    }
    // Past the body limit: 413, unread.
    let huge = json!({ "events": [{ "type": "a", "data": "x".repeat(300 << 10) }] });
    let (status, error) = http.post("/v1/streams/s/events", huge).await;
    assert_eq!(status, 413, "{error}");
    // Past the batch limit but within the body limit: the log's own rule.
    let big = json!({ "events": (0..3).map(|_| json!({ "type": "a", "data": "y".repeat(30 << 10) })).collect::<Vec<_>>() });
    let (status, error) = http.post("/v1/streams/s/events", big).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("split it"),
        "{error}"
    );
    // Bad reads.
    for (query, needle) in [
        ("offset=-1", "offset"),
        ("offset=ten", "offset"),
        ("limit=5000", "limit"),
        ("wait=forever", "wait"),
        ("wait=1h", "too long"),
        ("time=yesterday", "RFC 3339"),
        ("offset=0&time=2026-01-01T00:00:00Z", "not both"),
        ("colour=red", "unknown query parameter"),
        ("type=a..b", "type"),
        ("version=bad%20label", "version"),
    ] {
        let (status, error) = http.get(&format!("/v1/streams/s/events?{query}")).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{query}: {error}"
        );
    }
    let (status, error) = http.get("/v1/streams/s/events?offset=99").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("OUT_OF_RANGE"))
    );
    let (status, error) = http.get("/v1/streams/nope/events").await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, error) = http.get("/v1/streams/bad%20name").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    let (status, error) = http.get("/v2/anything").await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, _, error) = http
        .send(http.request(reqwest::Method::PATCH, "/v1/streams/s"))
        .await;
    assert_eq!(status, 405, "{error}");
    // Nothing of it was written.
    let (_, info) = http.get("/v1/streams/s").await;
    assert_eq!(info["next_offset"], 1, "{info}");
}

#[tokio::test]
async fn an_offset_no_longer_retained_is_410_gone() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let (status, _, created) = http
        .send(
            http.request(reqwest::Method::PUT, "/v1/streams/short")
                .json(&json!({ "retention": { "max_events": 2 } })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["retention"]["max_events"], 2);
    for _ in 0..10 {
        http.append("short", typed(&["a"])).await;
    }
    let mut first = 0;
    for _ in 0..300 {
        let (_, info) = http.get("/v1/streams/short").await;
        first = info["first_offset"].as_u64().unwrap();
        if first > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first > 0, "retention never trimmed");
    let (status, error) = http.get("/v1/streams/short/events?offset=0").await;
    assert_eq!(status, 410, "{error}");
    assert_eq!(error["code"], "OUT_OF_RANGE");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("no longer retained"));
    let (status, page) = http.get("/v1/streams/short/events").await;
    assert_eq!(status, 200);
    assert_eq!(page["events"][0]["offset"], first);
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_event_is_appended() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    http.append("s", typed(&["a"])).await;
    let started = std::time::Instant::now();
    let poll = http.get("/v1/streams/s/events?offset=1&wait=60s");
    let append = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Http::new(&server).append("s", typed(&["b.late"])).await
    };
    let ((status, page), _) = tokio::join!(poll, append);
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["type"], "b.late");
    assert_eq!(page["next_offset"], 2);
    // Woken by the append, not by the 60 s.
    assert!(started.elapsed() < Duration::from_secs(50));

    // Nothing arrives: an empty page with the cursor, after the wait.
    let (status, page) = http.get("/v1/streams/s/events?offset=2&wait=300ms").await;
    assert_eq!(status, 200);
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_offset"], 2);
    // With a filter the cursor advances past what it skipped.
    http.append("s", typed(&["skipped", "skipped"])).await;
    let (_, page) = http
        .get("/v1/streams/s/events?offset=2&type=wanted&wait=300ms")
        .await;
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_offset"], 4, "{page}");
}

/// One Server-Sent Event as the test reads it.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: bool,
}

/// Reads SSE events from a response body until `stop` says so or the body
/// ends; returns them and whether the body ended.
async fn read_sse(
    response: reqwest::Response,
    mut stop: impl FnMut(&[Sse]) -> bool,
) -> (Vec<Sse>, bool) {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = Sse {
                id: None,
                event: None,
                data: None,
                comment: false,
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    event.id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event.event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    event.data = Some(v.trim().to_string());
                } else if line.starts_with(':') {
                    event.comment = true;
                }
            }
            events.push(event);
            if stop(&events) {
                return (events, false);
            }
        }
        match within(body.next()).await {
            Some(Ok(chunk)) => buffer.push_str(std::str::from_utf8(&chunk).expect("text")),
            Some(Err(_)) | None => return (events, true),
        }
    }
}

fn data_events(events: &[Sse]) -> Vec<&Sse> {
    events.iter().filter(|e| e.data.is_some()).collect()
}

fn sse_request(http: &Http, query: &str, last_event_id: Option<&str>) -> reqwest::RequestBuilder {
    let builder = http
        .request(
            reqwest::Method::GET,
            &format!("/v1/streams/s/events{query}"),
        )
        .header("accept", "text/event-stream");
    match last_event_id {
        Some(id) => builder.header("last-event-id", id),
        None => builder,
    }
}

#[tokio::test]
async fn server_sent_events_resume_from_last_event_id_across_a_restart() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    http.append("s", typed(&["a.one", "a.two", "a.three"]))
        .await;

    let response = sse_request(&http, "", None).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, _) = read_sse(response, |e| data_events(e).len() == 2).await;
    // A reconnect hint comes first.
    assert!(events[0].comment);
    let data = data_events(&events);
    assert_eq!(data[0].event.as_deref(), Some("a.one"));
    assert_eq!(data[0].id.as_deref(), Some("1"));
    let first: Value = serde_json::from_str(data[0].data.as_deref().unwrap()).unwrap();
    assert_eq!(first["offset"], 0);
    assert_eq!(first["data"], json!({ "n": 0 }));
    let last_id = data[1].id.clone().unwrap();
    assert_eq!(last_id, "2");

    // The server restarts on the same port; events arrive meanwhile.
    let server = server.restart_on_same_port().await;
    let http = Http::new(&server);
    http.append("s", typed(&["a.four"])).await;
    let response = sse_request(&http, "", Some(&last_id)).send().await.unwrap();
    let (events, _) = read_sse(response, |e| data_events(e).len() == 2).await;
    let offsets: Vec<u64> = data_events(&events)
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e.data.as_deref().unwrap()).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // Exactly the ones after the last id: no gap, no duplicate.
    assert_eq!(offsets, vec![2, 3]);
}

#[tokio::test]
async fn a_response_cut_mid_stream_resumes_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let writer = Http::new(&server);
    let producing = tokio::spawn(async move {
        for i in 0..40 {
            writer
                .append(
                    "s",
                    json!([{ "type": "n.x", "data": i }, { "type": "n.x", "data": i }]),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Like a proxy that drops the connection: the client reads a few
    // events at a time, drops the response, and reconnects from the last
    // id it saw.
    let mut seen: Vec<u64> = Vec::new();
    let mut last_id: Option<String> = None;
    while seen.len() < 80 {
        let response = sse_request(&http, "", last_id.as_deref())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let want = seen.len() + 7;
        let (events, _) = read_sse(response, |e| {
            seen.len() + data_events(e).len() >= want.min(80)
        })
        .await;
        for e in data_events(&events) {
            let event: Value = serde_json::from_str(e.data.as_deref().unwrap()).unwrap();
            seen.push(event["offset"].as_u64().unwrap());
            last_id = e.id.clone();
        }
    }
    producing.await.unwrap();
    assert_eq!(seen, (0..80).collect::<Vec<u64>>());
}

#[tokio::test]
async fn server_sent_events_carry_heartbeats_and_end_after_their_time() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.sse_max_duration = Duration::from_secs(1);
    })
    .await;
    let http = Http::new(&server);
    http.append("s", typed(&["a", "b.skip", "b.skip"])).await;
    let started = std::time::Instant::now();
    let response = sse_request(&http, "?type=a", None).send().await.unwrap();
    let (events, ended) = read_sse(response, |_| false).await;
    assert!(ended, "the response ends by itself");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let data = data_events(&events);
    assert_eq!(data.len(), 1, "{events:?}");
    // The one delivered event carries the cursor past the two skipped.
    assert_eq!(data[0].id.as_deref(), Some("3"));
    let heartbeats: Vec<&Sse> = events
        .iter()
        .filter(|e| e.comment && e.data.is_none() && e.id.is_some())
        .collect();
    assert!(heartbeats.len() >= 2, "{events:?}");
    assert!(heartbeats.iter().all(|h| h.id.as_deref() == Some("3")));
}

#[tokio::test]
async fn durable_consumers_read_commit_and_resume_over_http() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    http.append("s", typed(&["a", "b", "c", "d"])).await;
    // A page as a consumer creates it at the start given.
    let (status, page) = http
        .get("/v1/streams/s/events?consumer=billing&limit=2")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["next_offset"], 2);
    // Nothing is committed until the consumer says so.
    let (_, info) = http.get("/v1/streams/s/consumers/billing").await;
    assert_eq!(info["next_offset"], 0, "{info}");
    let (status, info) = http
        .post(
            "/v1/streams/s/consumers/billing/commit",
            json!({ "next_offset": 2 }),
        )
        .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["next_offset"], 2);
    assert_eq!(info["lag"], 2);
    // The next page starts at the committed cursor, whatever offset says.
    let (_, page) = http
        .get("/v1/streams/s/events?consumer=billing&offset=0")
        .await;
    assert_eq!(page["events"][0]["offset"], 2);

    // SSE as the consumer: Last-Event-ID commits what the browser had.
    let response = sse_request(&http, "?consumer=billing", Some("3"))
        .send()
        .await
        .unwrap();
    let (events, _) = read_sse(response, |e| !data_events(e).is_empty()).await;
    let event: Value =
        serde_json::from_str(data_events(&events)[0].data.as_deref().unwrap()).unwrap();
    assert_eq!(event["offset"], 3);
    let (_, info) = http.get("/v1/streams/s/consumers/billing").await;
    assert_eq!(info["next_offset"], 3);

    let (status, list) = http.get("/v1/streams/s/consumers").await;
    assert_eq!(
        (status, &list["consumers"][0]["name"]),
        (200, &json!("billing")),
        "{list}"
    );
    let (status, _, _) = http
        .send(http.request(reqwest::Method::DELETE, "/v1/streams/s/consumers/billing"))
        .await;
    assert_eq!(status, 204);
    let (status, error) = http.get("/v1/streams/s/consumers/billing").await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, error) = http
        .post(
            "/v1/streams/s/consumers/billing/commit",
            json!({ "next": 1 }),
        )
        .await;
    assert_eq!(status, 400, "{error}");

    // By time, clearing a saved filter; neither or both is refused.
    let (status, _) = http
        .get("/v1/streams/s/events?consumer=typed&type=a&limit=1")
        .await;
    assert_eq!(status, 200);
    let (_, info) = http.get("/v1/streams/s/consumers/typed").await;
    assert!(info["filter"].is_object(), "{info}");
    let (status, info) = http
        .post(
            "/v1/streams/s/consumers/typed/commit",
            json!({ "time": "2100-01-01T00:00:00Z", "clear_filter": true }),
        )
        .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        info["next_offset"], 4,
        "a time past every event is the head"
    );
    assert!(info["filter"].is_null(), "{info}");
    let (status, info) = http
        .post(
            "/v1/streams/s/consumers/typed/commit",
            json!({ "time": "1970-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!((status, &info["next_offset"]), (200, &json!(0)), "{info}");
    for bad in [
        json!({}),
        json!({ "next_offset": 1, "time": "2100-01-01T00:00:00Z" }),
        json!({ "time": "last tuesday" }),
    ] {
        let (status, error) = http
            .post("/v1/streams/s/consumers/typed/commit", bad.clone())
            .await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("INVALID_ARGUMENT")),
            "{bad}: {error}"
        );
    }
    let (_, info) = http.get("/v1/streams/s/consumers/typed").await;
    assert_eq!(info["next_offset"], 0, "refused commits changed nothing");
}

#[tokio::test]
async fn streams_are_created_described_listed_and_deleted() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let put = |path: &'static str, body: Option<Value>| {
        let builder = http.request(reqwest::Method::PUT, path);
        http.send(match body {
            Some(body) => builder.json(&body),
            None => builder,
        })
    };
    let (status, _, created) = put("/v1/streams/a", None).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "a");
    assert_eq!(created["retention"], Value::Null);
    let (status, _, again) = put("/v1/streams/a", None).await;
    assert_eq!(status, 200, "{again}");
    let (status, _, updated) = put(
        "/v1/streams/a",
        Some(json!({ "retention": { "max_age": "7d", "max_bytes": 2000000 } })),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["retention"]["max_age"], "7days");
    assert_eq!(updated["retention"]["max_bytes"], 2000000);
    let (status, _, error) = put(
        "/v1/streams/b",
        Some(json!({ "retention": { "max_age": "soon" } })),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    put("/v1/streams/b", None).await;
    put("/v1/streams/c", None).await;

    let (_, list) = http.get("/v1/streams?page_size=2").await;
    let names: Vec<&str> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(list["next_page_token"], "b");
    let (_, rest) = http.get("/v1/streams?page_size=2&page_token=b").await;
    assert_eq!(rest["streams"][0]["name"], "c");
    assert_eq!(rest["next_page_token"], "");

    let (status, _, _) = http
        .send(http.request(reqwest::Method::DELETE, "/v1/streams/b"))
        .await;
    assert_eq!(status, 204);
    let (status, _) = http.get("/v1/streams/b").await;
    assert_eq!(status, 404);
    let (status, status_body) = http.get("/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(status_body["streams"].as_array().unwrap().len(), 2);
    assert_eq!(status_body["write_refusal"], "");
    // An open server: the default tenant, every scope, no key.
    assert_eq!(status_body["tenant"], "default");
    assert_eq!(
        status_body["scopes"],
        serde_json::json!(["publish", "subscribe", "admin"])
    );
    assert!(status_body["api_key_id"].is_null());
}

#[tokio::test]
async fn keys_scopes_and_tenants_hold_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let keys = offline_keys(
        dir.path(),
        &[
            ("acme", &[Scope::Publish, Scope::Subscribe]),
            ("acme", &[Scope::Subscribe]),
            ("globex", &[Scope::Admin, Scope::Publish, Scope::Subscribe]),
        ],
    );
    let config = pullstream::config::ServerConfig::for_tests(dir.path());
    let server = TestServer::start_in(dir, config).await;
    let anonymous = Http::new(&server);
    let (status, headers, error) = anonymous
        .send(anonymous.request(reqwest::Method::GET, "/v1/streams"))
        .await;
    assert_eq!(status, 401, "{error}");
    assert_eq!(error["code"], "UNAUTHENTICATED");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _) = Http::keyed(&server, "ps_nope_nope").get("/v1/status").await;
    assert_eq!(status, 401);
    // Health needs no key.
    let (status, health) = anonymous.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("SERVING")));

    let acme = Http::keyed(&server, &keys[0]);
    let reader = Http::keyed(&server, &keys[1]);
    let globex = Http::keyed(&server, &keys[2]);
    acme.append("orders", typed(&["a"])).await;
    // Status says whose streams these are and what the key may do.
    let (_, mine) = reader.get("/v1/status").await;
    assert_eq!(mine["tenant"], "acme");
    assert_eq!(mine["scopes"], serde_json::json!(["subscribe"]));
    assert_eq!(
        mine["api_key_id"].as_str().unwrap(),
        keys[1].split('_').nth(1).unwrap()
    );
    let (status, error) = reader
        .post(
            "/v1/streams/orders/events",
            json!({ "events": [{ "type": "a" }] }),
        )
        .await;
    assert_eq!(status, 403, "{error}");
    assert_eq!(error["code"], "PERMISSION_DENIED");
    let (status, page) = reader.get("/v1/streams/orders/events").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["stream"], "orders");
    // Another tenant sees none of it, and its own stream of that name is
    // another stream.
    let (status, error) = globex.get("/v1/streams/orders").await;
    assert_eq!(status, 404);
    // Errors name the caller's own streams, never the stored `tenant/name`.
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("stream \"orders\" not found"), "{message}");
    assert!(!message.contains("globex/"), "{message}");
    let (status, error) = acme
        .post(
            "/v1/streams/orders/events",
            json!({ "events": [{ "type": "a" }], "expected_next_offset": 9 }),
        )
        .await;
    assert_eq!(status, 412);
    assert!(
        !error["message"].as_str().unwrap().contains("acme/"),
        "{error}"
    );
    let (_, list) = globex.get("/v1/streams").await;
    assert_eq!(list["streams"], json!([]));
    globex.append("orders", typed(&["g.one", "g.two"])).await;
    let (_, info) = acme.get("/v1/streams/orders").await;
    assert_eq!(info["next_offset"], 1);
    // A key in the query, for EventSource (which cannot send headers).
    let url = format!("/v1/streams/orders/events?access_token={}", keys[1]);
    let (status, page) = anonymous.get(&url).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn cors_is_off_by_default_and_allows_only_the_configured_origin() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let preflight = |http: &Http, origin: &str| {
        http.request(reqwest::Method::OPTIONS, "/v1/streams/s/events")
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,last-event-id",
            )
            .send()
    };
    let response = http
        .request(reqwest::Method::GET, "/healthz")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let response = preflight(&http, "https://app.example.com").await.unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let server = TestServer::start_with(|c| {
        c.http_cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let http = Http::new(&server);
    let response = preflight(&http, "https://app.example.com").await.unwrap();
    assert!(response.status().is_success());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed = response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(allowed.contains("last-event-id"), "{allowed}");
    let response = preflight(&http, "https://evil.example.com").await.unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    http.append("s", typed(&["a"])).await;
    let response = http
        .request(reqwest::Method::GET, "/v1/streams/s/events")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(exposed.contains("pullstream-next-offset"), "{exposed}");
}

/// A gRPC-Web call as a browser client makes it: HTTP/1.1, the message in
/// a 5-byte frame, the status in a trailer frame of the body.
async fn grpc_web(
    http: &Http,
    method: &str,
    message: &[u8],
    origin: Option<&str>,
) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    let mut builder = http
        .request(
            reqwest::Method::POST,
            &format!("/pullstream.v1.EventLog/{method}"),
        )
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body);
    if let Some(origin) = origin {
        builder = builder.header("origin", origin);
    }
    let response = builder.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn grpc_web_clients_call_the_same_port() {
    use prost::Message;
    let server = TestServer::start_with(|c| {
        c.http_cors_origins = vec!["*".into()];
    })
    .await;
    let http = Http::new(&server);
    http.append("s", typed(&["a", "b"])).await;
    let request = pullstream::proto::GetStreamRequest { stream: "s".into() };
    let (headers, body) = grpc_web(
        &http,
        "GetStream",
        &request.encode_to_vec(),
        Some("https://x.example"),
    )
    .await;
    assert_eq!(headers["content-type"], "application/grpc-web+proto");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(body[0], 0, "a data frame first");
    let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let info = pullstream::proto::GetStreamResponse::decode(&body[5..5 + length]).unwrap();
    assert_eq!(info.stream.unwrap().next_offset, 2);
    let trailers = String::from_utf8_lossy(&body[5 + length + 5..]).to_string();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // Errors come back as gRPC statuses in the trailers.
    let request = pullstream::proto::GetStreamRequest {
        stream: "nope".into(),
    };
    let (headers, body) = grpc_web(&http, "GetStream", &request.encode_to_vec(), None).await;
    // A trailers-only answer: the status in the headers (or, from other
    // servers, in a trailer frame).
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(
        headers.get("grpc-status").is_some_and(|s| s == "5") || text.contains("grpc-status:5"),
        "{headers:?} {text}"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_it_lists() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let (status, document) = http.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 9, "{paths:?}");
    http.append("s", typed(&["a"])).await;
    http.post(
        "/v1/streams/s/consumers/c/commit",
        json!({ "next_offset": 0 }),
    )
    .await;
    Http::new(&server)
        .get("/v1/streams/s/events?consumer=c")
        .await;
    for (path, operations) in paths {
        let concrete = path.replace("{stream}", "s").replace("{consumer}", "c");
        for (method, operation) in operations.as_object().unwrap() {
            if !["get", "put", "post", "delete"].contains(&method.as_str()) {
                continue;
            }
            assert!(
                operation["summary"].is_string(),
                "{method} {path} has no summary"
            );
            assert!(
                operation["responses"].is_object(),
                "{method} {path} has no responses"
            );
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            // Every documented route exists with that method (whatever the
            // call's outcome: bodies here are empty).
            let response = http
                .request(method.clone(), &concrete)
                .header("content-type", "application/json")
                .body(if method == reqwest::Method::GET {
                    ""
                } else {
                    "{}"
                })
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert!(
                status != 405 && !text.contains("no such route"),
                "{method} {path}: {status} {text}"
            );
        }
    }
}

/// A TCP proxy in front of the server that cuts every connection after
/// `cut_after` bytes of response, the way a proxy with a response-size or
/// idle limit does; returns its address.
async fn cutting_proxy(upstream: std::net::SocketAddr, cut_after: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut sent = 0;
                let mut buffer = vec![0u8; 4096];
                while sent < cut_after {
                    let n = match server_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut_after - sent),
                    };
                    if client_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                // Cut: mid-event, quite likely.
                up.abort();
            });
        }
    });
    address
}

#[tokio::test]
async fn a_proxy_cutting_the_connection_mid_event_loses_and_repeats_nothing() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    let events: Vec<Value> = (0..60)
        .map(|i| json!({ "type": "n.x", "data": { "i": i, "pad": "p".repeat(i * 7) } }))
        .collect();
    http.append("s", Value::Array(events)).await;
    let proxy = cutting_proxy(server.addr, 1500).await;
    let through = Http {
        base: format!("http://{proxy}"),
        client: reqwest::Client::new(),
        key: None,
    };
    let mut seen: Vec<u64> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut cuts = 0;
    while seen.len() < 60 {
        let response = sse_request(&through, "", last_id.as_deref())
            .send()
            .await
            .unwrap();
        let (events, ended) = read_sse(response, |e| data_events(e).len() + seen.len() >= 60).await;
        // A cut leaves an incomplete event in the buffer: never surfaced.
        for e in data_events(&events) {
            let event: Value = serde_json::from_str(e.data.as_deref().unwrap()).unwrap();
            seen.push(event["offset"].as_u64().unwrap());
            last_id = e.id.clone();
        }
        cuts += usize::from(ended);
        assert!(cuts < 200, "no progress through the proxy");
    }
    assert_eq!(seen, (0..60).collect::<Vec<u64>>());
    assert!(cuts >= 3, "the proxy cut the stream ({cuts} times)");
}

#[tokio::test]
async fn limits_and_shutdown_answer_with_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = offline_keys(dir.path(), &[("acme", &[Scope::Publish, Scope::Subscribe])]);
    let mut config = pullstream::config::ServerConfig::for_tests(dir.path());
    config.max_subscriptions_per_key = 1;
    let server = TestServer::start_in(dir, config).await;
    let http = Http::keyed(&server, &keys[0]);
    http.append("s", typed(&["a"])).await;
    // One subscription per key: a second read while SSE is open is 429.
    let open = sse_request(&http, "", None).send().await.unwrap();
    assert_eq!(open.status(), 200);
    let (status, error) = http.get("/v1/streams/s/events").await;
    assert_eq!(status, 429, "{error}");
    assert_eq!(error["code"], "RESOURCE_EXHAUSTED");
    // Shutting down ends the open SSE response with an UNAVAILABLE error
    // event (the browser reconnects elsewhere or later).
    let reading = tokio::spawn(read_sse(open, |e| {
        e.iter().any(|e| e.event.as_deref() == Some("error"))
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop().await;
    let (events, _) = within(reading).await.unwrap();
    let error = events
        .iter()
        .find(|e| e.event.as_deref() == Some("error"))
        .expect("an error event");
    let error: Value = serde_json::from_str(error.data.as_deref().unwrap()).unwrap();
    assert_eq!(error["code"], "UNAVAILABLE", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_storage_is_data_loss_over_http_never_a_skip() {
    if sled_only("it damages the sled data dir's files") {
        return;
    }
    let server = TestServer::start().await;
    let http = Http::new(&server);
    for _ in 0..3 {
        http.append("s", typed(&["a", "b", "c", "d", "e"])).await;
    }
    let (dir, config) = server.stop().await;
    {
        let store = crate::durability::open_store(&config.data_dir);
        store.damage_chunk_for_tests("s", 5, false).unwrap();
    }
    let server = TestServer::start_in(dir, config).await;
    let http = Http::new(&server);
    let (status, page) = http.get("/v1/streams/s/events?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["events"].as_array().unwrap().len(),
        5,
        "what precedes the damage"
    );
    assert_eq!(page["next_offset"], 5);
    let (status, error) = http.get("/v1/streams/s/events?offset=5").await;
    assert_eq!(status, 500, "{error}");
    assert_eq!(error["code"], "DATA_LOSS");
    assert!(
        error["message"].as_str().unwrap().contains("from offset 5"),
        "{error}"
    );
    // SSE delivers up to the damage, then says so.
    let response = sse_request(&http, "", None).send().await.unwrap();
    let (events, _) = read_sse(response, |e| {
        e.iter().any(|e| e.event.as_deref() == Some("error"))
    })
    .await;
    assert_eq!(
        data_events(&events)
            .iter()
            .filter(|e| e.event.as_deref() != Some("error"))
            .count(),
        5
    );
    let error = events
        .iter()
        .find(|e| e.event.as_deref() == Some("error"))
        .unwrap();
    assert!(error.data.as_deref().unwrap().contains("DATA_LOSS"));
}

#[tokio::test]
async fn payload_versions_are_appended_and_pinned_over_http() {
    let server = TestServer::start().await;
    let http = Http::new(&server);
    http.append(
        "s",
        json!([{ "type": "invoice.paid", "data": { "amount": 10 },
                 "versions": { "2024-06-01": { "data": { "amount_cents": 1000 } },
                               "2025-01-01": { "data_base64": "AAE=", "content_type": "application/octet-stream" } } }]),
    )
    .await;
    let (_, page) = http.get("/v1/streams/s/events").await;
    assert_eq!(page["events"][0]["data"], json!({ "amount": 10 }));
    assert!(page["events"][0].get("version").is_none());
    let (_, page) = http.get("/v1/streams/s/events?version=2024-12-31").await;
    assert_eq!(page["events"][0]["data"], json!({ "amount_cents": 1000 }));
    assert_eq!(page["events"][0]["version"], "2024-06-01");
    let (_, page) = http.get("/v1/streams/s/events?version=2025-06-01").await;
    assert_eq!(page["events"][0]["data_base64"], "AAE=");
    assert_eq!(
        page["events"][0]["content_type"],
        "application/octet-stream"
    );
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_and_writes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server =
        TestServer::start_with(|c| c.request_body_timeout = Duration::from_millis(300)).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"POST /v1/streams/s/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"events\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let n = within(socket.read(&mut buffer)).await.unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("DEADLINE_EXCEEDED"), "{answer}");
    assert!(answer.contains("--request-body-timeout"), "{answer}");
    let (status, _) = Http::new(&server).get("/v1/streams/s").await;
    assert_eq!(status, 404, "nothing was written");
}
