//! Tests that need a real process: kill -9, a second server on a locked
//! data dir, startup errors, and the CLI as a user runs it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pullstream");

/// Starts `pullstream serve` on an ephemeral port and returns it with the
/// address it logged.
pub fn spawn_server(dir: &std::path::Path, extra: &[&str]) -> (Child, String) {
    spawn_server_logging(dir, "127.0.0.1:0", extra, "serving gRPC")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    // Small checkpoints, so the run rotates, checkpoints and deletes log
    // files many times before the crash.
    let (mut child, url) = spawn_server(
        dir.path(),
        &["--durability", "fsync", "--checkpoint-bytes", "16384"],
    );
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..8 {
        let url = url.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = format!(r#"{{"p":{p},"i":{i}}}"#);
                let request = pullstream::proto::AppendRequest {
                    stream: "s".into(),
                    events: vec![event("t", &data), event("t", &data)],
                    ..Default::default()
                };
                match client.append(request).await {
                    Ok(ack) => acked
                        .lock()
                        .unwrap()
                        .push((ack.into_inner().first_offset, data)),
                    Err(_) => return, // the server died mid-call: not acknowledged
                }
                i += 1;
            }
        }));
    }
    // A consumer commits its cursor over and over, alongside the appends:
    // an acknowledged commit must survive the crash too.
    let committed = Arc::new(AtomicU64::new(0));
    let committer = {
        let (url, stop, committed) = (url.clone(), stop.clone(), committed.clone());
        tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut cursor = 0;
            while !stop.load(Ordering::Relaxed) {
                let request = pullstream::proto::CommitCursorRequest {
                    stream: "s".into(),
                    consumer: "c".into(),
                    next_offset: cursor,
                    ..Default::default()
                };
                match client.commit_cursor(request).await {
                    Ok(_) => {
                        committed.store(cursor, Ordering::Relaxed);
                        cursor += 1;
                    }
                    // Past the head: wait for the producers.
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                    // The server died mid-call: not acknowledged.
                    Err(_) => return,
                }
            }
        })
    };
    // Let appends and commits flow, then kill the server without warning.
    // Both must have made progress first: on a loaded machine the
    // committer can start late, and a run that killed the server before
    // any commit was acknowledged would check nothing about commits.
    within(async {
        while acked.lock().unwrap().len() < 1500 || committed.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Several checkpoints ran (the log rotated) and deleted the files they covered.
    // Log files are named by their first record's sequence number.
    let log_files: Vec<u64> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("wal-")?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        *log_files.iter().min().unwrap() > 1,
        "checkpoints deleted the files they covered: {log_files:?}"
    );
    assert!(
        dir.path().join("wal/checkpoint").exists(),
        "checkpoints wrote their marker"
    );
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        within(p).await.unwrap();
    }
    within(committer).await.unwrap();
    let committed = committed.load(Ordering::Relaxed);
    assert!(committed > 0, "some commits were acknowledged");

    let config = pullstream::config::ServerConfig::for_tests(dir.path());
    let server = TestServer::start_in(dir, config).await;
    let mut client = server.client().await;
    let events = read_all(&mut client, "s").await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.offset, i as u64, "offsets stay dense after a crash");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for (first, data) in acked.iter() {
        for offset in [*first, first + 1] {
            let stored = events
                .get(offset as usize)
                .expect("acknowledged event survived");
            assert_eq!(std::str::from_utf8(&stored.data).unwrap(), data);
        }
    }
    let consumer = client
        .get_consumer(pullstream::proto::GetConsumerRequest {
            stream: "s".into(),
            consumer: "c".into(),
        })
        .await
        .expect("the committed consumer survived")
        .into_inner()
        .consumer
        .unwrap();
    assert!(
        consumer.next_offset >= committed,
        "acknowledged commit {committed} survived (found {})",
        consumer.next_offset
    );
    // New appends continue after the surviving head.
    let ack = append(&mut client, "s", vec![event("t", "after")]).await;
    assert_eq!(ack.first_offset, events.len() as u64);
}

#[test]
fn a_locked_data_dir_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _) = spawn_server(dir.path(), &[]);
    let second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

#[test]
fn unusable_data_dir_and_bad_settings_exit_nonzero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));

    // A corrupt store: garbage where sled's data file should be.
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir_all(corrupt.join("sled")).unwrap();
    std::fs::write(corrupt.join("sled/conf"), b"segment_size: banana\n").unwrap();
    std::fs::write(corrupt.join("sled/db"), vec![0xAB; 4096]).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&corrupt)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open data dir"));

    let out = Command::new(BIN)
        .args(["serve", "--max-event-bytes", "0", "--data-dir"])
        .arg(dir.path().join("unused"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-event-bytes"));

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "durabilty = \"fsync\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("durabilty"));
}

#[test]
fn the_cli_publishes_tails_and_lists_as_the_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str], stdin: Option<&str>| run_cli(&url, args, stdin);
    let out = cli(
        &[
            "publish",
            "orders",
            "--type",
            "order.created",
            "--key",
            "ord_1",
            "--data",
            r#"{"total":42}"#,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (ack["first_offset"].as_u64(), ack["count"].as_u64()),
        (Some(0), Some(1))
    );

    let ndjson = "{\"type\":\"order.paid\",\"key\":\"ord_1\",\"data\":{\"total\":42}}\n{\"type\":\"blob\",\"data_base64\":\"AAE=\"}\n";
    let out = cli(&["publish", "orders"], Some(ndjson));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (ack["first_offset"].as_u64(), ack["count"].as_u64()),
        (Some(1), Some(2))
    );

    let out = cli(
        &["publish", "orders", "--type", "x", "--data", "not json"],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    let out = cli(&["tail", "orders", "--limit", "3"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["data"]["total"], 42);
    assert_eq!(lines[1]["type"], "order.paid");
    assert_eq!(lines[2]["data_base64"], "AAE=");
    assert_eq!(lines[2]["offset"], 2);

    let out = cli(&["tail", "orders", "--from", "1", "--limit", "1"], None);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["offset"], 1);

    let out = cli(&["streams", "list"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("orders") && table.contains("STREAM"),
        "{table}"
    );

    let out = cli(&["tail", "missing"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn tail_resumes_from_its_cursor_across_a_server_restart() {
    tail_across_a_restart(&[]);
}

/// As a durable consumer committing after each batch: its commits reconnect
/// too, and the cursor saved on the server ends after the last event.
#[test]
fn tail_commits_as_a_consumer_across_a_server_restart() {
    let dir = tail_across_a_restart(&["--consumer", "c", "--commit"]);
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let out = Command::new(BIN)
        .args(["consumers", "info", "s", "c", "--server", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["next_offset"], 10, "{info}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Tails 10 events with `extra` arguments, restarting the server after the
/// fifth: every event once, in order. Returns the data dir.
fn tail_across_a_restart(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        // Find a free port and reuse it for both server runs.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let start = |dir: &std::path::Path| {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &listen, "--data-dir"])
            .arg(dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        while !lines.next().unwrap().unwrap().contains("address=") {}
        std::thread::spawn(move || for _ in lines {});
        child
    };
    let publish = |n: u32| {
        let events: String = (0..n)
            .map(|i| format!("{{\"type\":\"t\",\"data\":{i}}}\n"))
            .collect();
        let mut child = Command::new(BIN)
            .args(["publish", "s", "--server", &url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(events.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    };
    let mut server = start(dir.path());
    publish(5);
    let mut tail = Command::new(BIN)
        .args(["tail", "s", "--limit", "10", "--server", &url])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = tail.stderr.take().unwrap();
    let said = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut offsets = Vec::new();
    for _ in 0..5 {
        let line: serde_json::Value = serde_json::from_str(&out.next().unwrap().unwrap()).unwrap();
        offsets.push(line["offset"].as_u64().unwrap());
    }
    // Graceful stop: the subscription ends with UNAVAILABLE, tail reconnects.
    sigterm(&server);
    server.wait().unwrap();
    let mut server = start(dir.path());
    publish(5);
    for line in out.by_ref() {
        let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        offsets.push(line["offset"].as_u64().unwrap());
    }
    assert!(tail.wait().unwrap().success());
    assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    // It said what it did, and where it resumed.
    let said = said.join().unwrap();
    let resumed = match extra.contains(&"--consumer") {
        true => "resuming from the consumer's cursor",
        false => "resuming from offset 5",
    };
    assert!(
        said.contains("connection lost") && said.contains(resumed) && said.contains("reconnected"),
        "{said}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
    dir
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs `pullstream bench ARGS --json FILE` (`args` split at spaces) on its
/// own embedded server (whatever `PULLSTREAM_SERVER` says) with `env`
/// added, asserts that it succeeded, and returns its JSON summary, stdout
/// and stderr.
fn bench(args: &str, env: &[(&str, &std::path::Path)]) -> (serde_json::Value, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let mut command = Command::new(BIN);
    command
        .arg("bench")
        .args(args.split_whitespace())
        .arg("--json")
        .arg(&json_path)
        .env_remove("PULLSTREAM_SERVER");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    (summary, stdout, stderr)
}

#[test]
fn bench_runs_every_workload_and_reports_json() {
    let (summary, stdout, _) = bench(
        "--duration 300ms --batch 10 --producers 2 --events 3000 --subscribers 2 --rate 300 --idle-subscriptions 150",
        &[],
    );
    let results = summary["results"].as_array().unwrap();
    let workloads: Vec<&str> = results
        .iter()
        .map(|r| r["figures"]["workload"].as_str().unwrap())
        .collect();
    assert_eq!(
        workloads,
        [
            "append",
            "catchup",
            "tail",
            "fanout",
            "filtered",
            "committing"
        ]
    );
    for result in results {
        assert!(
            result["failures"].as_array().unwrap().is_empty(),
            "{result}"
        );
    }
    // The figures are measured, not made up: counts match what was asked.
    assert!(results[0]["figures"]["events"].as_u64().unwrap() > 0);
    assert_eq!(results[1]["figures"]["events"], 3000);
    assert!(results[1]["figures"]["data_dir_bytes"].as_u64().unwrap() > 3000 * 256);
    assert!(
        results[2]["figures"]["end_to_end_latency"]["samples"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        results[3]["figures"]["server_rss_after_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(results[4]["figures"]["delivered"], 30, "1% of 3,000 events");
    assert_eq!(results[5]["figures"]["events"], 3000);
    assert!(results[5]["figures"]["commits"].as_u64().unwrap() > 0);
    assert!(stdout.contains("events/s"));
}

#[test]
fn bench_appends_through_pipelines() {
    let (summary, stdout, _) = bench(
        "--workload append --pipeline --in-flight 1 --in-flight 4 --duration 300ms --batch 10 --producers 2",
        &[],
    );
    let results = summary["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, in_flight) in results.iter().zip([1, 4]) {
        assert!(
            result["failures"].as_array().unwrap().is_empty(),
            "{result}"
        );
        let figures = &result["figures"];
        assert_eq!(figures["pipeline_in_flight"], in_flight);
        let events = figures["events"].as_u64().unwrap();
        assert!(events > 0 && events % 10 == 0, "{figures}");
        assert!(figures["ack_latency"]["samples"].as_u64().unwrap() * 10 == events);
    }
    assert!(stdout.contains("pipeline in-flight=4"), "{stdout}");
}

/// `bench --events N` appends N events in all (unary and pipelined), and
/// says which server it measures and why.
#[test]
fn bench_append_honours_events_and_names_its_server() {
    let (summary, _, stderr) = bench(
        "--workload append --events 2000 --batch 100 --producers 3",
        &[],
    );
    assert!(stderr.contains("fresh embedded server"), "{stderr}");
    for result in summary["results"].as_array().unwrap() {
        assert!(
            result["failures"].as_array().unwrap().is_empty(),
            "{result}"
        );
        assert_eq!(result["figures"]["events"], 2000, "{result}");
    }
    let (summary, _, _) = bench(
        "--workload append --events 500 --batch 50 --producers 1 --pipeline",
        &[],
    );
    assert_eq!(summary["results"][0]["figures"]["events"], 500);
    // A server from the environment is named as such.
    let out = Command::new(BIN)
        .args(["bench", "--workload", "floor", "--duration", "10ms"])
        .env("PULLSTREAM_SERVER", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from PULLSTREAM_SERVER: unset it"),
        "{out:?}"
    );
}

/// `bench --workload floor` times health checks, the disk's own sync
/// (beside the data dir of its `fsync` server) and single-event Appends,
/// taking turns; every acknowledged append is in its stream (the workload
/// checks; a failure fails the run), and the file it timed syncs on is
/// gone afterwards.
#[test]
fn bench_measures_the_call_floor_and_the_disk_sync_against_append() {
    let dir = tempfile::tempdir().unwrap();
    let temp = dir.path().join("tmp");
    std::fs::create_dir(&temp).unwrap();
    // The embedded server's data dir, and so the sync file, go in TMPDIR.
    let (summary, stdout, _) = bench(
        "--workload floor --duration 300ms --durability fsync",
        &[("TMPDIR", &temp)],
    );
    let results = summary["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert!(results[0]["failures"].as_array().unwrap().is_empty());
    let figures = &results[0]["figures"];
    assert_eq!(figures["workload"], "floor");
    for latency in [
        "health_check_latency",
        "disk_sync_latency",
        "append_latency",
    ] {
        assert!(
            figures[latency]["samples"].as_u64().unwrap() > 0,
            "{figures}"
        );
    }
    assert_eq!(figures["disk_sync_dir"], temp.display().to_string());
    let p50 = |l: &str| (figures[l]["p50_ms"].as_f64().unwrap() * 1000.0).round() as i64;
    let above = figures["append_p50_above_floor_us"].as_i64().unwrap();
    assert!(
        (above - (p50("append_latency") - p50("health_check_latency"))).abs() <= 1,
        "{figures}"
    );
    let above_sync = figures["append_p50_above_disk_sync_us"].as_i64().unwrap();
    assert!(
        (above_sync - (p50("append_latency") - p50("disk_sync_latency"))).abs() <= 1,
        "{figures}"
    );
    assert!(stdout.contains("above the disk's sync"), "{stdout}");
    // The table's four lines of figures start in one column, after the
    // workload's name.
    let table: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let column = |line: &str, figure: &str| line.find(figure).unwrap_or(usize::MAX);
    // (rfind: the name says "health check" too.)
    let start = table[0].rfind("health check").unwrap();
    assert!(
        table[0].starts_with("floor: ") && table.len() == 4,
        "{stdout}"
    );
    for (line, figure) in table[1..]
        .iter()
        .zip(["disk sync", "append p", "append p50 is"])
    {
        assert_eq!(column(line, figure), start, "{stdout}");
    }
    assert_eq!(
        std::fs::read_dir(&temp).unwrap().count(),
        0,
        "the sync file and the data dir are removed"
    );

    // In `buffered` mode there is no sync to compare with.
    let (summary, _, _) = bench(
        "--workload floor --duration 100ms --durability buffered",
        &[],
    );
    let figures = &summary["results"][0]["figures"];
    assert!(figures["disk_sync_latency"].is_null(), "{figures}");
    assert!(
        figures["append_p50_above_disk_sync_us"].is_null(),
        "{figures}"
    );
    assert!(figures["append_latency"]["samples"].as_u64().unwrap() > 0);
}

/// `bench --workload http`: HTTP appends of 100 and 1 and a catch-up by
/// SSE and by pages, every offset checked by the workload itself.
#[test]
fn bench_measures_the_http_api() {
    let (summary, _, _) = bench(
        "--workload http --duration 300ms --events 3000 --durability buffered",
        &[],
    );
    let result = &summary["results"][0];
    assert!(
        result["failures"].as_array().unwrap().is_empty(),
        "{result}"
    );
    let figures = &result["figures"];
    assert_eq!(figures["workload"], "http");
    assert_eq!(figures["append"][0]["batch"], 100);
    assert_eq!(figures["append"][1]["batch"], 1);
    for rate in ["sse_events_per_second", "pages_events_per_second"] {
        assert!(figures[rate].as_f64().unwrap() > 0.0, "{figures}");
    }
    assert!(
        figures["append"][0]["ack_latency"]["samples"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// `publish` from stdin sends every batch through one pipeline: acks in
/// order, each batch expecting the end of the one before; a failing batch
/// is named and stops the rest.
#[test]
fn publish_from_stdin_pipelines_its_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let lines: String = (0..250)
        .map(|i| format!("{{\"type\":\"t\",\"data\":{i}}}\n"))
        .collect();
    let args = ["publish", "s", "--batch", "100", "--in-flight", "2"];
    let out = run_cli(
        &url,
        &[&args[..], &["--expected-next-offset", "0"]].concat(),
        Some(&lines),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks = json_lines(&out);
    let firsts: Vec<u64> = acks
        .iter()
        .map(|a| a["first_offset"].as_u64().unwrap())
        .collect();
    assert_eq!(firsts, [0, 100, 200]);
    assert_eq!(acks[2]["count"], 50);
    let out = run_cli(
        &url,
        &[&args[..], &["--expected-next-offset", "5"]].concat(),
        Some(&lines),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION: batch 1:"), "{stderr}");
    let out = run_cli(&url, &["tail", "s", "--from", "249", "--limit", "1"], None);
    assert_eq!(
        json_lines(&out)[0]["offset"],
        249,
        "nothing more was written"
    );
    let out = run_cli(&url, &["streams", "info", "s"], None);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["next_offset"], 250);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Runs a client command against `url` with `stdin`, returning its output.
pub fn run_cli(url: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("PULLSTREAM_SERVER", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_cli_drives_durable_consumers_filters_times_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str], stdin: Option<&str>| run_cli(&url, args, stdin);

    let ndjson = concat!(
        "{\"type\":\"order.created\",\"key\":\"o1\",\"data\":{\"n\":0}}\n",
        "{\"type\":\"noise\",\"data\":{}}\n",
        "{\"type\":\"order.paid\",\"key\":\"o1\",\"data\":{\"total\":42},",
        "\"versions\":{\"2024-06-01\":{\"data\":{\"amount\":{\"value\":42}}}}}\n",
    );
    json_lines(&cli(&["publish", "orders"], Some(ndjson)));
    let acks = json_lines(&cli(
        &[
            "publish",
            "orders",
            "--type",
            "order.shipped",
            "--version-data",
            "2024-06-01={\"shipped\":true}",
        ],
        None,
    ));
    let shipped_time = acks[0]["time"].as_str().unwrap().to_string();

    // A consumer with a filter, committing as it prints, stopped by --limit.
    let tail_as_billing = |limit: &str| {
        json_lines(&cli(
            &[
                "tail",
                "orders",
                "--consumer",
                "billing",
                "--commit",
                "--type",
                "order.>",
                "--limit",
                limit,
            ],
            None,
        ))
    };
    let first = tail_as_billing("2");
    let offsets: Vec<u64> = first
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![0, 2], "the filter skipped offset 1");
    let next = tail_as_billing("1");
    assert_eq!(next[0]["offset"], 3, "resumed after the committed cursor");

    let out = cli(&["consumers", "list", "orders"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("billing") && table.contains("LAG"),
        "{table}"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&cli(&["consumers", "info", "orders", "billing"], None).stdout)
            .unwrap();
    assert_eq!(
        (info["next_offset"].as_u64(), info["lag"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(info["filter"]["types"][0], "order.>");

    // Rewind, then delete.
    let rewound: serde_json::Value = serde_json::from_slice(
        &cli(&["consumers", "commit", "orders", "billing", "1"], None).stdout,
    )
    .unwrap();
    assert_eq!(rewound["lag"], 3);
    assert!(cli(&["consumers", "delete", "orders", "billing"], None)
        .status
        .success());
    let out = cli(&["consumers", "info", "orders", "billing"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // From a time, with a pinned version.
    let lines = json_lines(&cli(
        &[
            "tail",
            "orders",
            "--from",
            &shipped_time,
            "--payload-version",
            "2024-06-01",
            "--limit",
            "1",
        ],
        None,
    ));
    assert_eq!(lines[0]["offset"], 3);
    assert_eq!(lines[0]["version"], "2024-06-01");
    assert_eq!(lines[0]["data"]["shipped"], true);
    let lines = json_lines(&cli(
        &[
            "tail",
            "orders",
            "--from",
            "2",
            "--payload-version",
            "2024-06-01",
            "--limit",
            "1",
        ],
        None,
    ));
    assert_eq!(lines[0]["data"]["amount"]["value"], 42);

    // Bad input gets a message that says what to do.
    let out = cli(&["tail", "orders", "--from", "yesterday"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));
    let out = cli(&["tail", "orders", "--type", "a..b", "--limit", "1"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed"));
    let out = cli(&["tail", "orders", "--commit"], None);
    assert!(!out.status.success(), "--commit needs --consumer");

    server.kill().unwrap();
    server.wait().unwrap();
}

/// `tail` stops at the head when asked, starts relative to the head or the
/// clock, never changes a consumer without `--commit`, never ignores
/// `--from` for an existing consumer, and reports a server it cannot
/// reach once, not at every retry.
#[test]
fn tail_stops_at_the_head_starts_relative_and_leaves_consumers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str]| run_cli(&url, args, None);
    let offsets = |out: &std::process::Output| -> Vec<u64> {
        json_lines(out)
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect()
    };
    let events: String = (0..5)
        .map(|i| format!("{{\"type\":\"order.created\",\"data\":{i}}}\n"))
        .collect();
    json_lines(&run_cli(&url, &["publish", "orders"], Some(&events)));

    // At the head: everything, or fewer than --limit, and exit 0.
    assert_eq!(
        offsets(&cli(&["tail", "orders", "--no-follow"])),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        offsets(&cli(&[
            "tail",
            "orders",
            "--no-follow",
            "--count",
            "10",
            "--type",
            "nope"
        ])),
        Vec::<u64>::new()
    );
    assert_eq!(
        offsets(&cli(&["tail", "orders", "--from", "-2", "--no-follow"])),
        vec![3, 4]
    );
    assert_eq!(
        offsets(&cli(&["tail", "orders", "--from", "-50", "--limit", "1"])),
        vec![0]
    );
    assert_eq!(
        offsets(&cli(&["tail", "orders", "--since", "1h", "--limit", "5"])).len(),
        5
    );
    let out = cli(&["tail", "orders", "--since", "soon"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));

    // Without --commit, a missing consumer is not created...
    let out = cli(&["tail", "orders", "--consumer", "billing", "--no-follow"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --commit to create it"));
    assert!(!cli(&["consumers", "info", "orders", "billing"])
        .status
        .success());
    // ...and an existing one is read from its cursor, with its filter,
    // and left as it was.
    let made = cli(&[
        "tail",
        "orders",
        "--consumer",
        "billing",
        "--commit",
        "--from",
        "1",
        "--limit",
        "2",
        "--type",
        "order.>",
    ]);
    assert_eq!(offsets(&made), vec![1, 2]);
    let info = |cli: &dyn Fn(&[&str]) -> std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&cli(&["consumers", "info", "orders", "billing"]).stdout).unwrap()
    };
    let before = info(&cli);
    let peek = cli(&[
        "tail",
        "orders",
        "--consumer",
        "billing",
        "--no-follow",
        "--type",
        "other",
    ]);
    assert_eq!(
        offsets(&peek),
        Vec::<u64>::new(),
        "the given filter applies to the read"
    );
    let peek = cli(&["tail", "orders", "--consumer", "billing", "--no-follow"]);
    assert_eq!(
        offsets(&peek),
        vec![3, 4],
        "from the cursor, with the saved filter"
    );
    assert!(String::from_utf8_lossy(&peek.stderr).contains("without committing"));
    let after = info(&cli);
    assert_eq!(
        (
            &before["next_offset"],
            &before["filter"],
            &before["last_commit_time"]
        ),
        (
            &after["next_offset"],
            &after["filter"],
            &after["last_commit_time"]
        ),
        "a read without --commit changed the consumer"
    );
    assert_eq!(after["filter"]["types"][0], "order.>");
    // --from for an existing consumer is refused, saying how to move it.
    let out = cli(&[
        "tail",
        "orders",
        "--consumer",
        "billing",
        "--commit",
        "--from",
        "0",
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("already exists, at offset 3") && said.contains("consumers commit"),
        "{said}"
    );

    // `tail --version` is the program's version, not a payload version.
    let out = cli(&["tail", "--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    server.kill().unwrap();
    server.wait().unwrap();

    // A server that is not there is reported once, with the cause, while
    // tail keeps retrying (several attempts in three seconds).
    let mut tail = Command::new(BIN)
        .args(["tail", "orders"])
        .env("PULLSTREAM_SERVER", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    tail.kill().unwrap();
    let said = std::io::read_to_string(tail.stderr.take().unwrap()).unwrap();
    tail.wait().unwrap();
    assert_eq!(said.matches("cannot reach the server").count(), 1, "{said}");
    assert!(
        said.contains("Connection refused") && said.contains("retrying"),
        "{said}"
    );
}

#[test]
fn open_mode_is_refused_on_a_non_loopback_address_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve without API keys") && stderr.contains("--insecure"),
        "{stderr}"
    );

    // --insecure starts, with a loud warning.
    let (mut server, _) = spawn_server_logging(
        dir.path(),
        "0.0.0.0:0",
        &["--insecure"],
        "WITHOUT AUTHENTICATION",
    );
    server.kill().unwrap();
    server.wait().unwrap();

    // With a key, a non-loopback address is fine and the key is needed.
    let created = Command::new(BIN)
        .args([
            "keys",
            "create",
            "--scope",
            "admin",
            "--scope",
            "publish",
            "--scope",
            "subscribe",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let (mut server, url) = spawn_server_logging(dir.path(), "0.0.0.0:0", &[], "serving gRPC");
    let url = url.replace("0.0.0.0", "127.0.0.1");
    let out = run_cli(&url, &["publish", "s", "--type", "t"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"));
    let with_key = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-key", key.as_str()]);
        run_cli(&url, &all, None)
    };
    assert!(json_lines(&with_key(&["publish", "s", "--type", "t"])).len() == 1);
    // A table by default, a JSON array with --json.
    let table = with_key(&["keys", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(created["id"].as_str().unwrap()), "{table}");
    assert!(table.contains("admin"), "{table}");
    let listed = json_lines(&with_key(&["keys", "list", "--json"]));
    let listed = listed[0].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], created["id"]);
    assert!(
        listed[0].get("key").is_none(),
        "a listing never shows the secret"
    );
    let minted = json_lines(&with_key(&["keys", "create", "--scope", "subscribe"]));
    let id = minted[0]["id"].as_str().unwrap().to_string();
    let reader = minted[0]["key"].as_str().unwrap().to_string();
    let out = run_cli(
        &url,
        &["tail", "s", "--limit", "1", "--api-key", &reader],
        None,
    );
    assert_eq!(json_lines(&out)[0]["type"], "t");
    json_lines(&with_key(&["keys", "revoke", &id]));
    let out = run_cli(
        &url,
        &["tail", "s", "--limit", "1", "--api-key", &reader],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));

    // Offline key commands need the server stopped, and say so.
    let out = Command::new(BIN)
        .args(["keys", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop the server"));
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Starts `pullstream serve` on `listen` and waits for a log line
/// containing `wait_for`; returns it with the address it logged.
fn spawn_server_logging(
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
    wait_for: &str,
) -> (Child, String) {
    let (child, url, _) = spawn_server_capturing(dir, listen, extra, wait_for);
    (child, url)
}

/// [`spawn_server_logging`], also keeping every later log line.
fn spawn_server_capturing(
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
    wait_for: &str,
) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut address = None;
    let mut seen = false;
    while address.is_none() || !seen {
        let line = lines
            .next()
            .expect("the server logged what was expected before exiting")
            .unwrap();
        seen |= line.contains(wait_for);
        if let Some(rest) = line.split("address=").nth(1) {
            address = Some(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    let logged = Arc::new(Mutex::new(Vec::new()));
    let sink = logged.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (child, format!("http://{}", address.unwrap()), logged)
}

#[test]
fn the_cli_sets_retention_and_shows_server_status() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str]| run_cli(&url, args, None);
    let ok = |args: &[&str]| -> serde_json::Value {
        let out = cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let created = ok(&["streams", "create", "orders", "--max-events", "1_000"]);
    assert_eq!(
        created["retention"],
        serde_json::json!({"max_events": 1000})
    );
    let updated = ok(&["streams", "update", "orders", "--max-age", "7d"]);
    assert_eq!(
        updated["retention"],
        serde_json::json!({"max_age": "7days", "max_events": 1000}),
        "limits not given stay"
    );
    let updated = ok(&["streams", "update", "orders", "--max-events", "none"]);
    assert_eq!(
        updated["retention"],
        serde_json::json!({"max_age": "7days"})
    );

    // Bad input: a message that says what to do, and no change.
    let nothing = cli(&["streams", "update", "orders"]);
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("nothing to change"));
    let small = cli(&["streams", "update", "orders", "--max-bytes", "10KiB"]);
    assert!(!small.status.success());
    assert!(String::from_utf8_lossy(&small.stderr).contains("INVALID_ARGUMENT"));
    let unparsable = cli(&["streams", "update", "orders", "--max-age", "soon"]);
    assert_eq!(
        unparsable.status.code(),
        Some(64),
        "a usage error (EX_USAGE)"
    );
    assert!(String::from_utf8_lossy(&unparsable.stderr).contains("7d"));
    let info = ok(&["streams", "info", "orders"]);
    assert_eq!(info["retention"], serde_json::json!({"max_age": "7days"}));

    for n in 0..3 {
        let out = cli(&[
            "publish",
            "orders",
            "--type",
            "order.created",
            "--data",
            &format!("{{\"n\":{n}}}"),
        ]);
        assert!(out.status.success());
    }
    ok(&["consumers", "commit", "orders", "billing", "1"]);

    let table = cli(&["status"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("pullstream {}", env!("CARGO_PKG_VERSION"))),
        "{table}"
    );
    assert!(table.contains("EVENTS/S"), "{table}");
    let orders = table
        .lines()
        .find(|l| l.starts_with("orders "))
        .expect("a row for orders");
    assert!(orders.contains("max age 7days"), "{orders}");
    let billing = table
        .lines()
        .find(|l| l.contains("billing"))
        .expect("a row for billing");
    let columns: Vec<_> = billing.split_whitespace().collect();
    // Lag in events and in time (seconds here), then when it last
    // committed, as an age.
    assert_eq!(&columns[..4], ["orders", "billing", "1", "2"], "{billing}");
    assert!(columns[4].ends_with('s'), "{billing}");
    assert_eq!(columns[5], "no", "{billing}");
    assert!(billing.trim_end().ends_with("ago"), "{billing}");
    // Whose streams these are.
    assert!(
        table.contains("tenant default, open server (no API keys): every scope"),
        "{table}"
    );

    let status = ok(&["status", "--json"]);
    assert_eq!(status["server_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["tenant"], "default");
    assert_eq!(status["streams"][0]["stream"]["name"], "orders");
    assert_eq!(status["streams"][0]["stream"]["next_offset"], 3);
    assert_eq!(status["streams"][0]["consumers"][0]["lag"], 2);
    assert!(status["streams"][0]["consumers"][0]["lag_seconds"].is_f64());
    assert!(status["uptime_seconds"].is_u64());

    sigterm(&server);
    assert!(server.wait().unwrap().success());
}

#[test]
fn the_cli_reads_as_a_group_member_and_describes_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str], stdin: Option<&str>| run_cli(&url, args, stdin);
    let ndjson: String = (0..6)
        .map(|i| {
            format!(
                "{{\"type\":\"order.updated\",\"key\":\"o{}\",\"data\":{{\"n\":{i}}}}}\n",
                i % 3
            )
        })
        .collect();
    json_lines(&cli(&["publish", "orders"], Some(&ndjson)));

    let tail = |member: &str, limit: &str| {
        let out = cli(
            &[
                "tail", "orders", "--group", "pickers", "--member", member, "--commit", "--limit",
                limit,
            ],
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (json_lines(&out), stderr)
    };
    let (events, stderr) = tail("w1", "6");
    let offsets: Vec<_> = events
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        [0, 1, 2, 3, 4, 5],
        "a group of one gets everything in order"
    );
    assert!(stderr.contains("256 of 256 slots"), "{stderr}");

    let info = cli(&["groups", "info", "orders", "pickers", "--json"], None);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["low_watermark"], 6,
        "the member committed what it printed"
    );
    assert_eq!(
        info["members"].as_array().unwrap().len(),
        0,
        "nobody is connected now"
    );
    let table = cli(&["groups", "info", "orders", "pickers"], None);
    assert!(String::from_utf8_lossy(&table.stdout).contains("no member connected"));

    // Another member resumes at the committed offsets.
    json_lines(&cli(
        &[
            "publish",
            "orders",
            "--type",
            "order.updated",
            "--key",
            "o1",
        ],
        None,
    ));
    let (events, _) = tail("w2", "1");
    assert_eq!(events[0]["offset"], 6);

    let missing = cli(&["groups", "info", "orders", "nope"], None);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
    let lonely = cli(&["tail", "orders", "--commit"], None);
    assert!(!lonely.status.success());
    assert!(String::from_utf8_lossy(&lonely.stderr)
        .contains("--consumer NAME or --group NAME --member ID"));
    let half = cli(&["tail", "orders", "--group", "g"], None);
    assert_eq!(
        half.status.code(),
        Some(64),
        "a usage error: --group requires --member"
    );

    sigterm(&server);
    assert!(server.wait().unwrap().success());
}

/// Usage errors exit 64 like bad settings; a busy port fails before the
/// data dir is created; `--listen` takes a host name.
#[test]
fn serve_usage_errors_busy_ports_and_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    for (args, env) in [
        (vec!["--heartbeat-interval", "bogus"], None),
        (vec!["--durability", "sometimes"], None),
        (vec![], Some(("PULLSTREAM_HEARTBEAT_INTERVAL", "bogus"))),
        (vec!["--listen", "no-such-host.invalid:1"], None),
    ] {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&args);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {out:?}");
        assert!(!data_dir.exists(), "{args:?}: nothing created");
    }
    // A client URL with a scheme other than http(s) says how to write it.
    let out = Command::new(BIN)
        .args(["streams", "list", "--server", "grpc://127.0.0.1:50051"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("e.g. http://127.0.0.1:50051"),
        "{out:?}"
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &busy.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    assert!(!data_dir.exists(), "a busy port creates no data dir");
    let free = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut server = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &format!("localhost:{free}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut connected = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", free)).is_ok() {
            connected = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.kill().unwrap();
    let _ = server.wait();
    assert!(connected, "localhost:{free} listens on loopback");
}

/// The README's first key: made offline without `--tenant`, it sees the
/// streams written before keys existed, and `status` says whose they are.
#[test]
fn the_first_key_sees_the_data_written_before_keys_existed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    json_lines(&run_cli(
        &url,
        &["publish", "orders", "--type", "order.created"],
        None,
    ));
    sigterm(&server);
    assert!(server.wait().unwrap().success());

    let created = Command::new(BIN)
        .args(["keys", "create", "--data-dir"])
        .arg(dir.path())
        .args([
            "--scope",
            "admin",
            "--scope",
            "publish",
            "--scope",
            "subscribe",
        ])
        .output()
        .unwrap();
    let created = json_lines(&created).remove(0);
    assert_eq!(created["tenant"], "default");
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();

    let (mut server, url) = spawn_server(dir.path(), &[]);
    let with_key = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-key", key]);
        run_cli(&url, &all, None)
    };
    let status = with_key(&["status", "--json"]);
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["tenant"], "default");
    assert_eq!(status["api_key_id"], id);
    assert_eq!(status["streams"][0]["stream"]["name"], "orders");
    let table = with_key(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!(
            "tenant default, key {id} with scopes publish, subscribe, admin"
        )),
        "{table}"
    );
    let read = json_lines(&with_key(&["tail", "orders", "--no-follow"]));
    assert_eq!(read[0]["type"], "order.created");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// `certs create` makes what mutual TLS needs, and the README's recipe
/// with it works: the server takes the files, a client with the CA and
/// its certificate gets in, one without the client certificate does not.
#[test]
fn certs_create_makes_a_ca_and_certificates_that_mutual_tls_accepts() {
    let certs = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "create", "--out"])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        assert!(listing.contains(name), "{listing}");
        assert!(certs.path().join(name).exists(), "{name}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |name: &str| {
        std::fs::metadata(certs.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("server.key"), 0o600);
    assert_eq!(mode("ca.key"), 0o600);
    // Made once: a second run refuses to overwrite unless --force.
    let again = Command::new(BIN)
        .args(["certs", "create", "--out"])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url, logged) = spawn_server_capturing(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &file("server.pem"),
            "--tls-key",
            &file("server.key"),
            "--tls-client-ca",
            &file("ca.pem"),
        ],
        "serving gRPC",
    );
    // The default names include 127.0.0.1 (an IP SAN) and localhost.
    let port = url.rsplit(':').next().unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}");
        let out = run_cli(
            &url,
            &[
                "publish",
                "orders",
                "--type",
                "t",
                "--tls-ca",
                &file("ca.pem"),
                "--tls-cert",
                &file("client.pem"),
                "--tls-key",
                &file("client.key"),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let url = format!("https://127.0.0.1:{port}");
    // A load balancer's TCP check: connects and closes without a byte.
    drop(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap());
    // Plaintext to the TLS port, a client that does not trust the
    // server's CA (curl without --cacert), and one without a client
    // certificate: refused, and each failed handshake is logged with the
    // peer and the reason (at most 10 per 10 s of each kind).
    let plain = run_cli(
        &format!("http://127.0.0.1:{port}"),
        &["streams", "list"],
        None,
    );
    assert!(!plain.status.success());
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(said.contains("use an https:// URL"), "{said}");
    let untrusting = Command::new(BIN)
        .args(["streams", "list", "--server", &url, "--tls-ca"])
        .arg(file("client.pem")) // not a CA
        .output()
        .unwrap();
    assert!(!untrusting.status.success());
    let out = run_cli(
        &url,
        &["streams", "list", "--tls-ca", &file("ca.pem")],
        None,
    );
    assert!(!out.status.success(), "no client certificate, no entry");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--tls-cert and --tls-key"), "{said}");
    let logs = || logged.lock().unwrap().join("\n");
    let expected = [
        "the client sent no certificate, and --tls-client-ca requires one",
        "the client does not speak TLS",
        "the client refused the server's certificate",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !expected.iter().all(|e| logs().contains(e)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs = logs();
    for reason in expected {
        assert!(logs.contains(reason), "{reason:?} not logged:\n{logs}");
    }
    assert!(logs.contains("peer=127.0.0.1:"), "{logs}");
    assert!(
        !logs.contains("closed the connection"),
        "a TCP check is not a warning: {logs}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn the_cli_lists_and_resets_groups_rewinds_consumers_and_gets_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str], stdin: Option<&str>| run_cli(&url, args, stdin);
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // --data from a file and from stdin.
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, r#"{"from":"file"}"#).unwrap();
    let at_file = format!("@{}", payload.display());
    ok(&cli(
        &["publish", "s", "--type", "t", "--data", &at_file],
        None,
    ));
    ok(&cli(
        &["publish", "s", "--type", "t", "--data", "-"],
        Some(r#"{"from":"stdin"}"#),
    ));
    let missing = cli(
        &["publish", "s", "--type", "t", "--data", "@/nonexistent/x"],
        None,
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"));

    // events get: one event as tail prints it; past the head says so.
    let got: serde_json::Value =
        serde_json::from_str(ok(&cli(&["events", "get", "s", "1"], None)).trim()).unwrap();
    assert_eq!(got["offset"], 1);
    assert_eq!(got["data"]["from"], "stdin");
    let past = cli(&["events", "get", "s", "2"], None);
    assert!(!past.status.success());
    assert!(
        String::from_utf8_lossy(&past.stderr).contains("no event at offset 2 yet"),
        "{}",
        String::from_utf8_lossy(&past.stderr)
    );

    // A group, listed, then reset to the start by its CLI.
    ok(&cli(
        &[
            "tail", "s", "--group", "g", "--member", "m", "--commit", "--limit", "2",
        ],
        None,
    ));
    let list = ok(&cli(&["groups", "list", "s"], None));
    assert!(list.contains("GROUP") && list.contains('g'), "{list}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cli(&["groups", "list", "s", "--json"], None))).unwrap();
    assert_eq!(listed[0]["name"], "g");
    assert_eq!(listed[0]["low_watermark"], 2);
    // The member leaves when its tail exits; the server notices in moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&cli(&["groups", "info", "s", "g", "--json"], None))).unwrap();
        if info["members"].as_array().is_some_and(|m| m.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the member never left: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let reset = cli(&["groups", "reset", "s", "g", "--to-earliest"], None);
    ok(&reset);
    assert!(String::from_utf8_lossy(&reset.stderr).contains("resume at offset 0"));
    let info: serde_json::Value =
        serde_json::from_str(&ok(&cli(&["groups", "info", "s", "g", "--json"], None))).unwrap();
    assert_eq!(info["low_watermark"], 0);
    // Without a target clap refuses (usage error).
    assert!(!cli(&["groups", "reset", "s", "g"], None).status.success());

    // consumers commit by time: an hour ago is before both events.
    let committed: serde_json::Value = serde_json::from_str(&ok(&cli(
        &["consumers", "commit", "s", "c", "--time", "1h"],
        None,
    )))
    .unwrap();
    assert_eq!(committed["next_offset"], 0);
    let committed: serde_json::Value =
        serde_json::from_str(&ok(&cli(&["consumers", "commit", "s", "c", "2"], None))).unwrap();
    assert_eq!(committed["next_offset"], 2);
    let bad_time = cli(
        &["consumers", "commit", "s", "c", "--time", "yesterday-ish"],
        None,
    );
    assert!(!bad_time.status.success());

    // Completions for each shell.
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&cli(&["completions", shell], None));
        assert!(
            script.contains("pullstream") && script.contains("groups"),
            "{shell}"
        );
    }

    // streams delete without a terminal does not ask.
    ok(&cli(&["streams", "delete", "s", "--yes"], None));
    assert!(!cli(&["events", "get", "s", "0"], None).status.success());

    sigterm(&server);
    server.wait().unwrap();
}

#[test]
fn publish_cuts_stdin_under_the_server_limits_and_names_the_line_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(
        dir.path(),
        &[
            "--max-batch-events",
            "10",
            "--max-batch-bytes",
            "4096",
            "--max-event-bytes",
            "2048",
        ],
    );
    let cli = |args: &[&str], stdin: Option<&str>| run_cli(&url, args, stdin);
    // 25 events, every fifth 1,500 bytes: batches must be cut by count
    // (10) and by bytes (4,096), whatever --batch asks for.
    let input: String = (0..25)
        .map(|i| {
            let text = if i % 5 == 0 {
                "x".repeat(1500)
            } else {
                format!("line {i}")
            };
            format!(
                "{}\n",
                serde_json::json!({ "type": "note", "data_text": text })
            )
        })
        .collect();
    let out = cli(&["publish", "notes", "--batch", "5000"], Some(&input));
    let acks = json_lines(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("sending batches of 10"), "{said}");
    let counts: Vec<u64> = acks.iter().map(|a| a["count"].as_u64().unwrap()).collect();
    assert_eq!(counts.iter().sum::<u64>(), 25, "{counts:?}");
    assert!(counts.iter().all(|&c| c <= 10), "{counts:?}");
    // Three big events would pass 4,096 bytes: no batch holds three.
    let mut first = 0;
    for ack in &acks {
        assert_eq!(
            ack["first_offset"].as_u64().unwrap_or(0),
            first,
            "dense, in order"
        );
        let count = ack["count"].as_u64().unwrap();
        let big = (first..first + count).filter(|i| i % 5 == 0).count();
        assert!(big <= 2, "{acks:?}");
        first += count;
    }
    // Text payloads are printed as text.
    let events = json_lines(&cli(
        &[
            "tail",
            "notes",
            "--no-follow",
            "--from",
            "1",
            "--limit",
            "1",
        ],
        None,
    ));
    assert_eq!(events[0]["data_text"], "line 1");
    assert_eq!(events[0]["content_type"], "text/plain; charset=utf-8");

    // Bad lines name the line, and the field at fault; nothing is written.
    for (input, needle) in [
        (
            "{\"type\":\"t\"}\n{\"type\":\"t\",\"key\":5}\n",
            "stdin line 2: field \"key\": invalid type: integer `5`, expected a string",
        ),
        (
            "{\"type\":\"t\",\n",
            "stdin line 1: not a JSON event object",
        ),
        (
            "{\"type\":\"t\",\"colour\":1}\n",
            "stdin line 1: field \"colour\": unknown field",
        ),
        (
            "{\"type\":\"t\",\"versions\":{\"v1\":{\"data\":1,\"data_text\":\"x\"}}}\n",
            "stdin line 1: give one of \"versions.v1.data\"",
        ),
    ] {
        let out = cli(&["publish", "notes"], Some(input));
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(needle), "{input:?}: {said}");
        assert!(
            !said.contains("at line 1 column"),
            "position said once: {said}"
        );
    }
    // An event the server refuses (over --max-event-bytes) is named by
    // its stdin line, and its batch is not written.
    let big = serde_json::json!({ "type": "t", "data_text": "y".repeat(3000) });
    let input = format!("{{\"type\":\"t\"}}\n\n{big}\n");
    let out = cli(&["publish", "notes"], Some(&input));
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("stdin line 3: INVALID_ARGUMENT"), "{said}");
    assert!(said.contains("2048"), "{said}");
    let out = cli(&["streams", "info", "notes"], None);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["next_offset"], 25, "{info:?}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Runs the CLI under a pseudo-terminal (`script`, from util-linux), as a
/// person at a terminal would, with `input` typed in.
fn run_cli_on_a_terminal(url: &str, args: &[&str], input: &str) -> String {
    let command = std::iter::once(BIN.to_string())
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("PULLSTREAM_SERVER", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs the CLI on a pseudo-terminal");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

#[test]
fn on_a_terminal_results_read_as_text_and_delete_asks_first() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = spawn_server(dir.path(), &[]);
    let cli = |args: &[&str]| run_cli(&url, args, None);
    let out = cli(&[
        "streams",
        "create",
        "orders",
        "--max-age",
        "7d",
        "--max-bytes",
        "10GiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Piped: JSON, one compact line.
    let piped = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(piped.lines().count(), 1, "{piped}");
    let info: serde_json::Value = serde_json::from_str(&piped).unwrap();
    assert_eq!(info["retention"]["max_bytes"], 10u64 << 30);

    // On a terminal: fields with units and ages.
    let text = run_cli_on_a_terminal(&url, &["streams", "info", "orders"], "");
    assert!(text.contains("name "), "{text}");
    assert!(text.contains("orders"), "{text}");
    assert!(text.contains("10 GiB"), "{text}");
    assert!(text.contains("7days"), "{text}");
    assert!(
        text.contains(" ago)") || text.contains("just now)"),
        "{text}"
    );
    assert!(!text.contains('{'), "not JSON: {text}");
    // --json wins on a terminal too.
    let json = run_cli_on_a_terminal(&url, &["streams", "info", "orders", "--json"], "");
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(json["name"], "orders");
    // Lists are tables, or a JSON array with --json.
    let table = String::from_utf8_lossy(&cli(&["streams", "list"]).stdout).to_string();
    assert!(table.contains("orders"), "{table}");
    let list: serde_json::Value =
        serde_json::from_slice(&cli(&["streams", "list", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["name"], "orders");

    // Delete asks on a terminal; anything but yes keeps the stream.
    let said = run_cli_on_a_terminal(&url, &["streams", "delete", "orders"], "n\n");
    assert!(said.contains("cannot be undone"), "{said}");
    assert!(said.contains("not deleted"), "{said}");
    assert!(cli(&["streams", "info", "orders"]).status.success());
    let said = run_cli_on_a_terminal(&url, &["streams", "delete", "orders"], "y\n");
    assert!(said.contains("deleted stream orders"), "{said}");
    let gone = cli(&["streams", "info", "orders"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"));
    server.kill().unwrap();
    server.wait().unwrap();
}
