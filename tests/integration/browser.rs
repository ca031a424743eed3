//! A real browser follows a stream with `EventSource`: headless Chromium
//! (Debian's `chromium`, which `.ci/run` installs) loads a page the test
//! serves from another origin, while the test appends. The server ends
//! each SSE response after a second, so the browser reconnects by itself
//! with `Last-Event-ID` several times; the DOM Chromium dumps (`--dump-dom`)
//! must hold every event once, in order.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// Where Chromium is, or why the test cannot run.
fn chromium() -> String {
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    panic!("this test needs Chromium: `apt-get install chromium` (CI's .ci/run installs it)");
}

const EVENTS: u64 = 40;

fn page(server: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><title>waiting</title></head>
<body><ol id="events"></ol><p id="opens">0</p>
<script>
  const list = document.getElementById("events");
  let opens = 0;
  const source = new EventSource("{server}/v1/streams/s/events");
  source.onopen = () => {{ opens += 1; document.getElementById("opens").textContent = opens; }};
  source.addEventListener("n.x", (message) => {{
    const event = JSON.parse(message.data);
    const item = document.createElement("li");
    item.textContent = event.offset + ":" + message.lastEventId;
    list.appendChild(item);
    if (event.offset === {last}) {{ document.title = "done"; source.close(); }}
  }});
</script></body></html>"#,
        last = EVENTS - 1
    )
}

#[tokio::test]
async fn a_browser_event_source_gets_every_event_once_in_order_across_reconnects() {
    let browser = chromium();
    // The page's origin, allowed by the server's CORS setting.
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", page_listener.local_addr().unwrap());
    let allowed = origin.clone();
    let server = TestServer::start_with(move |c| {
        c.http_cors_origins = vec![allowed];
        c.sse_max_duration = Duration::from_secs(1);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let html = page(&format!("http://{}", server.addr));
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(html) }),
    );
    tokio::spawn(async move { axum::serve(page_listener, app).await });

    let mut client = server.client().await;
    append(&mut client, "s", vec![event("n.x", "{}")]).await;
    let profile = tempfile::tempdir().unwrap();
    let chromium = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Virtual time stands still while the EventSource is connected and
            // runs between reconnects; the page closes it after the last
            // event, and the DOM is dumped then.
            "--virtual-time-budget=60000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{origin}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Once the page is following (a slow start under load would otherwise
    // find every event there and need no reconnect), append the rest over
    // about four seconds (four SSE responses at least).
    within(async {
        loop {
            let (_, text) =
                crate::operability::http_get(server.metrics_addr.unwrap(), "/metrics").await;
            if crate::operability::series(&text, "pullstream_active_subscriptions") >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for i in 1..EVENTS {
        append(
            &mut client,
            "s",
            vec![event("n.x", &format!("{{\"i\":{i}}}"))],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = tokio::time::timeout(Duration::from_secs(120), chromium.wait_with_output())
        .await
        .expect("chromium ends")
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout).to_string();
    let items: Vec<String> = dom
        .split("<li>")
        .skip(1)
        .map(|s| s.split("</li>").next().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..EVENTS).map(|o| format!("{o}:{}", o + 1)).collect();
    assert_eq!(
        items,
        expected,
        "every event once, in order, each with its resume id; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let opens: u32 = dom
        .split("<p id=\"opens\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|s| s.parse().ok())
        .expect("the open count");
    assert!(
        opens >= 2,
        "the browser reconnected at least once ({opens} opens)"
    );
}
