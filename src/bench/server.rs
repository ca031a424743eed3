//! The benchmark's own server: this binary's `serve`, started as a child
//! process on a temp dir and an ephemeral loopback port, so that its memory
//! can be read from `/proc` apart from the load generator's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::config::Durability;

/// A `pullstream serve` child process.
pub(crate) struct EmbeddedServer {
    child: Child,
    /// The URL to connect to.
    pub(crate) url: String,
    /// The server's durability mode.
    pub(crate) durability: Durability,
    dir: TempDir,
}

impl EmbeddedServer {
    /// Starts the server and waits until it listens.
    pub(crate) async fn start(durability: Durability) -> anyhow::Result<EmbeddedServer> {
        let dir = tempfile::Builder::new()
            .prefix("pullstream-bench-")
            .tempdir()
            .context("creating a temp data dir")?;
        let exe = std::env::current_exe().context("locating the pullstream binary")?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                "1s",
            ])
            .args(["--durability", &durability.to_string(), "--data-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the embedded server")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (address, lines) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref() {
                let line = line?;
                if let Some(rest) = line.split("address=").nth(1) {
                    let address = rest.split_whitespace().next().unwrap_or("").to_string();
                    return Ok((address, lines));
                }
            }
            bail!("the embedded server exited before listening")
        })
        .await??;
        // Keep reading its log so it never blocks on a full pipe; pass on
        // warnings and errors.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("server: {line}");
                }
            }
        });
        Ok(EmbeddedServer {
            child,
            url: format!("http://{address}"),
            durability,
            dir,
        })
    }

    /// The server's resident set size, from `/proc/PID/status`.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The server's CPU time so far (user + system), from `/proc/PID/stat`.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces) and its ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // Linux reports in clock ticks of 1/100 s (USER_HZ) on every platform it runs on.
        Some(Duration::from_millis(ticks * 10))
    }

    /// The server's data dir.
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The bytes of every file in the data dir.
    pub(crate) fn data_dir_bytes(&self) -> u64 {
        crate::metrics::dir_size(self.dir.path())
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
