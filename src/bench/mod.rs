//! `pullstream bench`: a load generator in the same binary (like `nats
//! bench`), measuring the workloads our performance targets are stated in.
//!
//! It runs against `--server URL`, or (the default) against a server it
//! starts itself as a child process on a temp dir, so one command measures
//! everything and server memory can be read from `/proc` without the load
//! generator's own memory mixed in. Latencies go into HDR histograms. A
//! progress bar (rate, ETA) runs on stderr; a table goes to stdout and, with `--json
//! FILE`, a JSON summary to a file. A workload that detects a correctness
//! failure (a gap, a duplicate, a lost event) fails the whole run with a
//! non-zero exit.

mod server;
mod workloads;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{Client, ConnectOptions};
use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::config::{Durability, HumanDuration};
use server::EmbeddedServer;

/// The workloads `pullstream bench` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Producers appending as fast as acknowledgements allow
    Append,
    /// One subscriber reading stored events from offset 0
    Catchup,
    /// Subscribers following live while a producer appends at a fixed rate
    Tail,
    /// Many idle subscriptions held open: server memory per subscription
    Fanout,
    /// Catch-up through a filter selecting 1% of the events: server scan rate
    Filtered,
    /// Catch-up as a durable consumer committing after every batch, against a plain one
    Committing,
    /// Appends at a fixed rate for a long time with retention: data dir and memory over time (not in the default set)
    Soak,
    /// A key-shared consumer group of 1, 2 and 4 members with simulated work per event: scaling and server CPU per event
    Group,
    /// A no-op unary call (the health check), the disk's own sync (4 KiB write + fdatasync beside the data dir; own server in fsync mode) and a single-event Append, taking turns: what an Append costs above any call and above the disk (not in the default set)
    Floor,
    /// The HTTP JSON API: appends of 100 and 1 event, and a catch-up by Server-Sent Events and by pages (not in the default set)
    Http,
}

/// Arguments of `pullstream bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream bench                                  # every workload, embedded server, fsync\n  \
    pullstream bench --workload append --batch 100 --producers 1\n  \
    pullstream bench --workload tail --subscribers 16 --rate 5000 --duration 10s\n  \
    pullstream bench --server http://10.0.0.5:50051 --workload catchup --json out.json\n  \
    pullstream bench --server http://127.0.0.1:50051 --read-server http://127.0.0.1:50052 --workload tail   # across two gateways
      pullstream bench --workload soak --soak-duration 10m --soak-rate 20000 --retention-events 1000000")]
pub struct BenchArgs {
    /// Benchmark this server instead of starting one
    #[arg(long, env = "PULLSTREAM_SERVER")]
    server: Option<String>,
    /// With --server: subscribers and readers (tail, catchup) connect to this server instead, e.g. a second gateway of a cluster, to measure delivery across gateways
    #[arg(long, requires = "server")]
    read_server: Option<String>,
    /// With --server: the API key to send (publish and subscribe scopes; ignored for the embedded server)
    #[arg(long, env = "PULLSTREAM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Durability mode of the embedded server
    #[arg(long, default_value = "fsync")]
    durability: Durability,
    /// Workloads to run (repeatable) [default: all]
    #[arg(long = "workload", value_enum)]
    workloads: Vec<Workload>,
    /// Payload bytes per event
    #[arg(long, default_value_t = 256)]
    event_bytes: usize,
    /// append: events per Append call (repeatable)
    #[arg(long = "batch", default_values_t = [100, 1])]
    batches: Vec<usize>,
    /// append: concurrent producers (repeatable)
    #[arg(long = "producers", default_values_t = [1, 64])]
    producers: Vec<usize>,
    /// append: each producer sends through one append pipeline instead of unary Appends
    #[arg(long)]
    pipeline: bool,
    /// append --pipeline: batches each producer keeps in flight (repeatable)
    #[arg(long = "in-flight", default_values_t = [8], requires = "pipeline", value_parser = clap::value_parser!(u32).range(1..=1024))]
    in_flight: Vec<u32>,
    /// append and tail: how long each run lasts
    #[arg(long, default_value = "5s")]
    duration: HumanDuration,
    /// catchup, filtered, committing, http: events stored, then read (default
    /// 1,000,000); append: events to append in all, instead of --duration
    #[arg(long)]
    events: Option<u64>,
    /// tail: live subscribers
    #[arg(long, default_value_t = 16)]
    subscribers: usize,
    /// tail: events appended per second
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// fanout: idle subscriptions held open
    #[arg(long, default_value_t = 10_000)]
    idle_subscriptions: usize,
    /// group: members per run (repeatable)
    #[arg(long = "members", default_values_t = [1, 2, 4])]
    members: Vec<usize>,
    /// group: simulated work per event (waiting, as for a call to another service)
    #[arg(long, default_value = "50us")]
    work: HumanDuration,
    /// group: events stored, then read by the group
    #[arg(long, default_value_t = 200_000)]
    group_events: u64,
    /// soak: how long to append
    #[arg(long, default_value = "10m")]
    soak_duration: HumanDuration,
    /// soak: events appended per second
    #[arg(long, default_value_t = 20_000)]
    soak_rate: u64,
    /// soak: the stream's max_events retention
    #[arg(long, default_value_t = 1_000_000)]
    retention_events: u64,
    /// soak: how often to sample data dir size and server memory
    #[arg(long, default_value = "10s")]
    sample_every: HumanDuration,
    /// Write a JSON summary here
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One run of one workload with one set of parameters.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    Append {
        batch: usize,
        producers: usize,
        /// Batches in flight per producer through a pipeline; `None`:
        /// unary Appends.
        in_flight: Option<u32>,
    },
    Catchup,
    Tail,
    Fanout,
    Filtered,
    Committing,
    Soak,
    Group {
        members: usize,
    },
    Floor,
    Http,
}

/// One measured run.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// e.g. `append batch=100 producers=1`.
    name: String,
    /// Parameters and figures, for the JSON summary.
    figures: Value,
    /// The figures for the table: one line, or several separated by
    /// `\n` with no indentation of their own ([`print_table`] lays them
    /// out).
    summary: String,
    /// Correctness problems found; any fails the run.
    failures: Vec<String>,
}

/// The closing table: each workload's name, then its figures, every line
/// of them starting in the same column (the widest name's, at least 40).
fn print_table(outcomes: &[Outcome]) {
    let width = outcomes
        .iter()
        .map(|o| o.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(40);
    for outcome in outcomes {
        let mut label = outcome.name.as_str();
        for line in outcome.summary.lines() {
            println!("{label:<width$} {line}");
            label = "";
        }
        for failure in &outcome.failures {
            println!("{:<width$} FAILED: {failure}", "");
        }
    }
}

/// What every workload needs.
pub(crate) struct BenchContext {
    url: String,
    /// Where subscribers and readers connect (`--read-server`), if not `url`.
    read_url: Option<String>,
    /// For `--server`: the API key to send, if the server needs one.
    api_key: Option<String>,
    embedded: Option<EmbeddedServer>,
    event_bytes: usize,
}

impl BenchContext {
    /// A new connection (each producer gets its own, as separate clients would).
    async fn client(&self) -> anyhow::Result<Client> {
        self.connect(&self.url).await
    }

    /// A new connection for a subscriber or a reader: to `--read-server`
    /// when given.
    async fn reader(&self) -> anyhow::Result<Client> {
        self.connect(self.read_url.as_ref().unwrap_or(&self.url))
            .await
    }

    async fn connect(&self, url: &str) -> anyhow::Result<Client> {
        ConnectOptions {
            server: url.to_string(),
            api_key: self.api_key.clone(),
            ..Default::default()
        }
        .event_log()
        .await
    }

    /// The server's resident memory, when it is our child.
    fn server_rss(&self) -> Option<u64> {
        self.embedded.as_ref().and_then(EmbeddedServer::rss_bytes)
    }

    /// Waits until the server has been idle (under 5% of a core) for half
    /// a second, at most 30 s, so a read measured after a bulk load does
    /// not share the machine with the load's background checkpoint. An
    /// external server gets a fixed 2 s.
    async fn settle(&self) {
        let Some(server) = &self.embedded else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = server.cpu_time();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = server.cpu_time();
            match (last, now) {
                (Some(a), Some(b)) if b.saturating_sub(a) < Duration::from_millis(25) => return,
                (None, _) | (_, None) => return,
                _ => last = now,
            }
        }
    }

    /// The server's CPU time so far, when it is ours.
    fn server_cpu(&self) -> Option<Duration> {
        self.embedded.as_ref().and_then(EmbeddedServer::cpu_time)
    }

    /// Where to measure the disk's sync floor: beside the data dir of a
    /// server of ours in `fsync` mode (the same file system), else `None`.
    fn sync_floor_dir(&self) -> Option<&std::path::Path> {
        self.embedded
            .as_ref()
            .filter(|server| server.durability == Durability::Fsync)
            .and_then(|server| server.data_dir().parent())
    }

    /// The size of the server's data dir, when it is ours.
    fn data_dir_bytes(&self) -> Option<u64> {
        self.embedded.as_ref().map(EmbeddedServer::data_dir_bytes)
    }
}

/// Runs `pullstream bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.event_bytes < 16 {
        bail!("--event-bytes must be at least 16 (the tail workload stamps a send time into each event)");
    }
    let workloads = if args.workloads.is_empty() {
        vec![
            Workload::Append,
            Workload::Catchup,
            Workload::Tail,
            Workload::Fanout,
            Workload::Filtered,
            Workload::Committing,
        ]
    } else {
        args.workloads.clone()
    };
    let mut scenarios = Vec::new();
    for workload in workloads {
        match workload {
            Workload::Append => {
                let in_flight: Vec<Option<u32>> = if args.pipeline {
                    args.in_flight.iter().copied().map(Some).collect()
                } else {
                    vec![None]
                };
                for &batch in &args.batches {
                    for &producers in &args.producers {
                        for &in_flight in &in_flight {
                            scenarios.push(Scenario::Append {
                                batch,
                                producers,
                                in_flight,
                            });
                        }
                    }
                }
            }
            Workload::Catchup => scenarios.push(Scenario::Catchup),
            Workload::Tail => scenarios.push(Scenario::Tail),
            Workload::Fanout => scenarios.push(Scenario::Fanout),
            Workload::Filtered => scenarios.push(Scenario::Filtered),
            Workload::Committing => scenarios.push(Scenario::Committing),
            Workload::Soak => scenarios.push(Scenario::Soak),
            Workload::Floor => scenarios.push(Scenario::Floor),
            Workload::Http => scenarios.push(Scenario::Http),
            Workload::Group => {
                for &members in &args.members {
                    scenarios.push(Scenario::Group { members });
                }
            }
        }
    }
    match &args.server {
        Some(url) => eprintln!(
            "pullstream bench: server {url} (external{}), {}-byte events",
            if std::env::args().any(|a| a == "--server" || a.starts_with("--server=")) {
                ", from --server"
            } else {
                ", from PULLSTREAM_SERVER: unset it to benchmark a fresh embedded server"
            },
            args.event_bytes
        ),
        None => eprintln!(
            "pullstream bench: a fresh embedded server (durability {}) per run, {}-byte events",
            args.durability, args.event_bytes
        ),
    }
    let stored = args.events.unwrap_or(1_000_000);
    let mut outcomes = Vec::new();
    for scenario in scenarios {
        // Each run gets a server of its own, so runs do not see each
        // other's data or memory.
        let embedded = match &args.server {
            Some(_) => None,
            None => Some(EmbeddedServer::start(args.durability).await?),
        };
        let url = match (&args.server, &embedded) {
            (Some(url), _) => url.clone(),
            (None, Some(server)) => server.url.clone(),
            (None, None) => unreachable!("an embedded server is started when no URL is given"),
        };
        let ctx = BenchContext {
            url,
            read_url: args.read_server.clone(),
            api_key: args.api_key.clone(),
            embedded,
            event_bytes: args.event_bytes,
        };
        let outcome = match scenario {
            Scenario::Append {
                batch,
                producers,
                in_flight,
            } => {
                let until = workloads::Until::new(args.duration.0, args.events);
                workloads::append(&ctx, batch, producers, in_flight, until).await?
            }
            Scenario::Catchup => workloads::catchup(&ctx, stored).await?,
            Scenario::Tail => {
                workloads::tail(&ctx, args.subscribers, args.rate, args.duration.0).await?
            }
            Scenario::Fanout => workloads::fanout(&ctx, args.idle_subscriptions).await?,
            Scenario::Filtered => workloads::filtered_catchup(&ctx, stored).await?,
            Scenario::Committing => workloads::committing_catchup(&ctx, stored).await?,
            Scenario::Floor => workloads::floor(&ctx, args.duration.0).await?,
            Scenario::Http => workloads::http(&ctx, args.duration.0, stored).await?,
            Scenario::Group { members } => {
                workloads::group(&ctx, members, args.group_events, args.work.0).await?
            }
            Scenario::Soak => {
                workloads::soak(
                    &ctx,
                    &workloads::SoakSettings {
                        duration: args.soak_duration.0,
                        rate: args.soak_rate,
                        retention_events: args.retention_events,
                        sample_every: args.sample_every.0,
                    },
                )
                .await?
            }
        };
        for line in outcome.summary.lines() {
            eprintln!("  {}", line.trim_start());
        }
        outcomes.push(outcome);
    }

    println!();
    print_table(&outcomes);
    if let Some(path) = &args.json {
        let summary = json!({
            "server": args.server.clone().unwrap_or_else(|| "embedded".into()),
            "durability": args.server.is_none().then(|| args.durability.to_string()),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "event_bytes": args.event_bytes,
            "results": outcomes.iter().map(|o| json!({
                "name": o.name,
                "figures": o.figures,
                "failures": o.failures,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("JSON summary written to {}", path.display());
    }
    let failures: usize = outcomes.iter().map(|o| o.failures.len()).sum();
    if failures > 0 {
        bail!("{failures} correctness check(s) failed: see FAILED lines above");
    }
    Ok(())
}

/// What a run is headed for, so its progress bar can show an ETA.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// This many of `unit` (events, subscriptions).
    Count(u64, &'static str),
    /// About this long.
    Time(Duration),
    /// Unknown: a spinner with the count and rate.
    Open,
}

/// A progress bar on stderr while a workload runs (indicatif; drawn only
/// on a terminal): done so far, rate and ETA towards the run's [`Goal`].
/// Workloads count into [`Progress::counter`]; the bar reads it four
/// times a second, so counting costs one relaxed atomic add.
pub(crate) struct Progress {
    count: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub(crate) fn start(label: String, goal: Goal) -> Progress {
        let count = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let counter = count.clone();
        eprintln!("running {label}");
        let template = match goal {
            Goal::Count(_, unit) => format!(
                "  {{elapsed:>4}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}  {{msg}}  ETA {{eta}}"
            ),
            Goal::Time(_) => "  {elapsed:>4} [{bar:30}] {msg}  ETA {eta}".to_string(),
            Goal::Open => "  {elapsed:>4} {spinner} {msg}".to_string(),
        };
        let bar = match goal {
            Goal::Count(total, _) => indicatif::ProgressBar::new(total),
            Goal::Time(d) => indicatif::ProgressBar::new(d.as_millis() as u64),
            Goal::Open => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(&template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let n = counter.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
                match goal {
                    Goal::Count(..) => {
                        bar.set_position(n);
                        bar.set_message(format!("{rate:.0}/s"));
                    }
                    Goal::Time(d) => {
                        bar.set_position(started.elapsed().min(d).as_millis() as u64);
                        bar.set_message(format!("{n} events  {rate:.0}/s"));
                    }
                    Goal::Open => {
                        bar.tick();
                        bar.set_message(format!("{n} events  {rate:.0}/s"));
                    }
                }
            }
            bar.finish_and_clear();
        });
        Progress { count, stop, task }
    }

    pub(crate) fn counter(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }

    pub(crate) async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A latency histogram in microseconds (1 µs to 1 h, 3 significant digits).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// p50/p99/p999/max of a histogram, in milliseconds, as JSON and as text.
pub(crate) fn latency(h: &Histogram<u64>) -> (Value, String) {
    let ms = |us: u64| us as f64 / 1000.0;
    let value = json!({
        "samples": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    });
    let text = format!(
        "p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
    (value, text)
}

/// A byte count for people.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
