//! `pullstream listen STREAM --forward-to URL`: the consumer-side bridge
//! that moves an existing webhook handler to pull.
//!
//! It runs behind the consumer's firewall, dials out to the server as a
//! durable consumer, and POSTs each event, in order, to the local URL with
//! the headers of the Standard Webhooks spec (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`: HMAC-SHA256 over
//! `id.timestamp.body` with the signing secret), so handlers that verify
//! signatures keep working. It waits for a 2xx, retrying with capped
//! exponential backoff (never skipping, never reordering), and commits the
//! consumer's cursor after each delivery, so a restart resumes right after
//! the last delivered event. Delivery is at least once: an event delivered
//! just before the bridge died, and not yet committed, is delivered again
//! with the same `webhook-id`, which handlers can deduplicate on.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::committer::{CommitTo, Committer};
use super::{check_client_args, status_error, ClientArgs};
use crate::proto::{self as pb, subscribe_request::Start};

/// Arguments of `pullstream listen`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream listen orders --forward-to http://localhost:4242/webhook\n  \
    pullstream listen orders --forward-to http://localhost:4242/webhook \\\n      \
    --consumer billing-hook --type 'invoice.>' --signing-secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\n\
    Each event is POSTed as the JSON the HTTP API writes (or, with --body data, its\n\
    payload as appended) with the Standard Webhooks headers webhook-id (stream:offset),\n\
    webhook-timestamp and webhook-signature. Non-2xx answers and errors are retried\n\
    with backoff; the consumer's cursor is committed after each delivery.")]
pub struct ListenArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The stream to deliver
    stream: String,
    /// The webhook handler to POST each event to (http://)
    #[arg(long, value_name = "URL")]
    forward_to: String,
    /// The durable consumer to deliver as: its cursor on the server says what was delivered
    #[arg(long, default_value = "listen")]
    consumer: String,
    /// Where a new consumer starts: earliest, latest, an offset, or an RFC 3339 time
    #[arg(long, default_value = "earliest", value_parser = super::tail::parse_from)]
    from: Start,
    /// Only events whose type matches this pattern (repeatable)
    #[arg(long = "type", value_name = "PATTERN")]
    types: Vec<String>,
    /// Only events with this key (repeatable)
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    /// Deliver each event's payload rendering for this version label
    #[arg(long, value_name = "LABEL")]
    payload_version: Option<String>,
    /// Standard Webhooks signing secret (`whsec_` + base64); generated and printed when not given
    #[arg(long, env = "PULLSTREAM_SIGNING_SECRET", hide_env_values = true)]
    signing_secret: Option<String>,
    /// What to POST: the event as JSON (`event`), or its payload as appended, with its content type (`data`)
    #[arg(long, value_enum, default_value = "event")]
    body: Body,
    /// Give up (exit 1) after this many failed attempts at one event [default: retry forever]
    #[arg(long)]
    max_attempts: Option<u32>,
    /// How long one delivery attempt may take
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The longest wait between attempts
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// Print one JSON object per attempt instead of a line of text
    #[arg(long)]
    json: bool,
}

/// What each POST carries.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Body {
    /// The event as one JSON object (offset, type, key, time, data, ...).
    Event,
    /// The payload exactly as appended, with the event's content type.
    Data,
}

/// The first wait after a failed attempt; it doubles up to --max-backoff.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A Standard Webhooks signing key.
struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// From `whsec_<base64>` (the prefix is optional, as the spec's
    /// libraries accept).
    fn parse(secret: &str) -> anyhow::Result<Signer> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| {
                anyhow::anyhow!("--signing-secret must be whsec_ followed by base64 ({e})")
            })?;
        if key.len() < 16 {
            anyhow::bail!("--signing-secret is too short: give at least 16 bytes of key (24 base64 characters)");
        }
        Ok(Signer { key })
    }

    /// A new random key, and its `whsec_` text.
    fn generate() -> anyhow::Result<(Signer, String)> {
        let mut key = vec![0u8; 24];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let text = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(&key)
        );
        Ok((Signer { key }, text))
    }

    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Runs `pullstream listen`.
pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    check_client_args(&args.client)?;
    let target: reqwest::Url = args.forward_to.parse().map_err(|e| {
        anyhow::anyhow!(
            "--forward-to {:?} is not a URL ({e}): write it like http://localhost:4242/webhook",
            args.forward_to
        )
    })?;
    if target.scheme() != "http" {
        anyhow::bail!(
            "--forward-to must be an http:// URL (the handler next to this bridge); {} is not supported",
            target.scheme()
        );
    }
    if args.max_attempts == Some(0) {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    let signer = match &args.signing_secret {
        Some(secret) => Signer::parse(secret)?,
        None => {
            let (signer, text) = Signer::generate()?;
            eprintln!(
                "signing secret: {text}\n  (generated for this run: give it to your handler, and pass --signing-secret to keep it)"
            );
            signer
        }
    };
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
    let options = args.client.options();
    let filter = (!args.types.is_empty() || !args.keys.is_empty()).then(|| pb::EventFilter {
        types: args.types.clone(),
        keys: args.keys.clone(),
    });
    let request = pb::SubscribeRequest {
        stream: args.stream.clone(),
        start: Some(args.from),
        max_batch_events: 0,
        consumer: args.consumer.clone(),
        filter,
        version: args.payload_version.clone().unwrap_or_default(),
        group: String::new(),
        member: String::new(),
    };
    let mut subscription = options.subscribe_resuming(request).on_reconnect(|r| {
        eprintln!(
            "connection to the server lost ({}); reconnecting in {:?} and resuming at the consumer's cursor",
            r.reason, r.delay
        );
    });
    eprintln!(
        "forwarding {:?} to {target} as consumer {:?}",
        args.stream, args.consumer
    );
    let mut committer = Committer::new(
        options,
        args.stream.clone(),
        CommitTo::Consumer(args.consumer.clone()),
    );
    let human = !args.json;
    let colour = human && std::io::stdout().is_terminal();
    loop {
        let response = subscription.next().await.map_err(status_error)?;
        let last = response.events.len().checked_sub(1);
        for (i, event) in response.events.iter().enumerate() {
            deliver(&args, &http, &target, &signer, event, colour).await?;
            // After the last event of a response, its cursor (past what a
            // filter skipped); otherwise just past this event.
            let cursor = if Some(i) == last {
                response.next_offset
            } else {
                event.offset + 1
            };
            committer.commit(cursor).await?;
        }
    }
}

/// POSTs one event until a 2xx (or --max-attempts), printing each attempt.
async fn deliver(
    args: &ListenArgs,
    http: &reqwest::Client,
    target: &reqwest::Url,
    signer: &Signer,
    event: &pb::Event,
    colour: bool,
) -> anyhow::Result<()> {
    let id = format!("{}:{}", event.stream, event.offset);
    let (body, content_type) = match args.body {
        Body::Event => (
            crate::proto::json::event(event).to_string().into_bytes(),
            "application/json".to_string(),
        ),
        Body::Data => (
            event.data.to_vec(),
            if event.content_type.is_empty() {
                "application/octet-stream".to_string()
            } else {
                event.content_type.clone()
            },
        ),
    };
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let started = Instant::now();
        let sent = http
            .post(target.clone())
            .header("content-type", content_type.as_str())
            .header("webhook-id", id.as_str())
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signer.sign(&id, timestamp, &body))
            .header(
                "user-agent",
                concat!("pullstream-listen/", env!("CARGO_PKG_VERSION")),
            )
            .body(body.clone())
            .send()
            .await;
        let latency = started.elapsed();
        let outcome = match &sent {
            Ok(response) => Ok(response.status()),
            Err(e) => Err(describe(e)),
        };
        let delivered = matches!(outcome, Ok(status) if status.is_success());
        let gave_up = !delivered && args.max_attempts.is_some_and(|max| attempt >= max);
        let retry_in = (!delivered && !gave_up).then_some(backoff);
        report(args, event, attempt, &outcome, latency, retry_in, colour);
        if delivered {
            return Ok(());
        }
        if gave_up {
            let why = match outcome {
                Ok(status) => format!("the handler answered {status}"),
                Err(e) => e,
            };
            anyhow::bail!(
                "gave up on offset {} of {:?} after {attempt} attempts: {why}. Nothing after it was delivered; the consumer's cursor is at {}, so the next run starts with this event",
                event.offset,
                event.stream,
                event.offset
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(args.max_backoff);
        attempt += 1;
    }
}

/// A transport error in a few words.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "no answer in time (--timeout)".to_string()
    } else if error.is_connect() {
        "cannot connect to the handler (is it running?)".to_string()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }
}

/// One line per attempt: text, or JSON with --json.
fn report(
    args: &ListenArgs,
    event: &pb::Event,
    attempt: u32,
    outcome: &Result<reqwest::StatusCode, String>,
    latency: Duration,
    retry_in: Option<Duration>,
    colour: bool,
) {
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = json!({
            "stream": event.stream,
            "offset": event.offset,
            "type": event.r#type,
            "attempt": attempt,
            "status": outcome.as_ref().ok().map(|s| s.as_u16()),
            "error": outcome.as_ref().err(),
            "delivered": matches!(outcome, Ok(s) if s.is_success()),
            "latency_ms": (latency.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            "retry_in_ms": retry_in.map(|d| d.as_millis() as u64),
        });
        let _ = writeln!(out, "{line}");
        return;
    }
    let (paint, reset) = match (colour, outcome) {
        (false, _) => ("", ""),
        (true, Ok(s)) if s.is_success() => ("\x1b[32m", "\x1b[0m"),
        (true, _) => ("\x1b[31m", "\x1b[0m"),
    };
    let answer = match outcome {
        Ok(status) => status.to_string(),
        Err(e) => e.clone(),
    };
    let retry = match retry_in {
        Some(d) => format!(
            "; retrying in {} (attempt {})",
            humantime::format_duration(d),
            attempt + 1
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "offset {} {} -> {paint}{answer}{reset} in {:.1} ms{retry}",
        event.offset,
        event.r#type,
        latency.as_secs_f64() * 1000.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_reference_library() {
        // Computed by the `standardwebhooks` Python package (1.1.0),
        // `Webhook(secret).sign(id, timestamp, body)`.
        let signer = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"type":"contact.created","data":{"id":1}}"#;
        assert_eq!(
            signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1674087231, body),
            "v1,HTq+aYqrpPNCiihVVcnrPK94KVgwki7WTjKae8C/7ec="
        );
        assert!(Signer::parse("whsec_%%%").is_err());
        assert!(Signer::parse("whsec_AAAA").is_err(), "too short");
    }
}
