//! `pullstream keys`: create, list and revoke API keys, either offline on a
//! data dir (`--data-dir`, with the server stopped: this is how the first
//! admin key is made) or over gRPC with an admin key of the tenant.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::output::OutputArgs;
use super::{connect_keys, status_error, ClientArgs};
use crate::api::keys_proto::{key_to_proto, scope_of_proto, scope_to_proto};
use crate::auth::{KeyInfo, KeyRing, NewKey, Scope};
use crate::config::HumanDuration;
use crate::proto as pb;
use crate::storage::{Store, StoreOptions};

/// Arguments of `pullstream keys`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    pullstream keys create --data-dir ./pullstream-data --scope admin --scope publish --scope subscribe\n  \
    pullstream keys create --data-dir ./pullstream-data --tenant acme --scope publish\n  \
    pullstream keys create --api-key $ADMIN_KEY --scope publish --streams 'orders.>' --expires 90d\n  \
    pullstream keys list --data-dir ./pullstream-data\n  \
    pullstream keys revoke 3f9a0c1b2d4e5f60 --api-key $ADMIN_KEY\n\n\
    With --data-dir the command works on the data dir directly and the server must be\n\
    stopped; otherwise it asks the server, with an admin key of the tenant.")]
pub struct KeysArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Work offline on this data dir (the server must be stopped)
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Create a key and print it once (it is stored only as a digest)
    Create {
        /// The tenant (offline only; over gRPC, the admin key's tenant) [default: default]
        #[arg(long)]
        tenant: Option<String>,
        /// What the key may do (repeatable): publish, subscribe, admin
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// Limit the key to streams matching this pattern (repeatable), e.g. 'orders.>'
        #[arg(long = "streams", value_name = "PATTERN")]
        streams: Vec<String>,
        /// Expire the key after this long, e.g. 90d
        #[arg(long)]
        expires: Option<HumanDuration>,
    },
    /// List keys, never their secrets (a table; --json for a JSON array)
    List,
    /// Revoke a key by id: calls with it fail, its subscriptions end
    Revoke {
        /// The key's id (the part after `ps_`)
        id: String,
    },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
}

/// Runs `pullstream keys`.
pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    match &args.data_dir {
        Some(dir) => offline(dir, args.command, args.output),
        None => online(&args.client, args.command, args.output).await,
    }
}

fn offline(dir: &std::path::Path, command: KeysCommand, output: OutputArgs) -> anyhow::Result<()> {
    // A new (missing or empty) dir is fine: the first key can be made
    // before the server's first start. Anything else must be a data dir.
    let fresh = std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
    if !fresh && !dir.join("sled").exists() {
        anyhow::bail!(
            "{} is not a Pullstream data dir (no sled/ inside): pass the server's --data-dir",
            dir.display()
        );
    }
    let store = Store::open(&StoreOptions {
        path: dir.to_path_buf(),
        cache_bytes: 16 << 20,
        background_flush: crate::storage::BackgroundFlush::Off,
        write_ahead_log: true,
        checkpoint_bytes: crate::durability::wal::DEFAULT_CHECKPOINT_BYTES,
        faults: None,
    })
    .with_context(|| {
        format!(
            "opening {} (stop the server first, or leave out --data-dir to ask it over gRPC)",
            dir.display()
        )
    })?;
    let ring = KeyRing::load(Arc::new(store))?;
    match command {
        KeysCommand::Create {
            tenant,
            scopes,
            streams,
            expires,
        } => {
            let (info, secret) = ring.create(NewKey {
                tenant: tenant.unwrap_or_default(),
                scopes,
                streams,
                ttl: expires.map(|d| d.0),
            })?;
            print_created(output, &key_to_proto(info), &secret);
        }
        KeysCommand::List => {
            let keys: Vec<_> = ring.list(None).into_iter().map(key_to_proto).collect();
            print_keys(output, &keys);
        }
        KeysCommand::Revoke { id } => {
            let info: KeyInfo = ring.revoke(&id, None)?;
            output.object(&key_json(&key_to_proto(info)));
        }
    }
    Ok(())
}

async fn online(
    client: &ClientArgs,
    command: KeysCommand,
    output: OutputArgs,
) -> anyhow::Result<()> {
    let mut keys = connect_keys(client).await?;
    match command {
        KeysCommand::Create {
            tenant,
            scopes,
            streams,
            expires,
        } => {
            if tenant.is_some() {
                anyhow::bail!("--tenant works only offline (--data-dir); over gRPC a key is created for the admin key's tenant");
            }
            let response = keys
                .create_api_key(pb::CreateApiKeyRequest {
                    scopes: scopes
                        .into_iter()
                        .map(|s| scope_to_proto(s) as i32)
                        .collect(),
                    streams,
                    ttl_seconds: expires.map_or(0, |d| d.0.as_secs().max(1)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_created(output, &response.key.unwrap_or_default(), &response.secret);
        }
        KeysCommand::List => {
            let response = keys
                .list_api_keys(pb::ListApiKeysRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_keys(output, &response.keys);
        }
        KeysCommand::Revoke { id } => {
            let response = keys
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            output.object(&key_json(&response.key.unwrap_or_default()));
        }
    }
    Ok(())
}

fn key_json(key: &pb::ApiKeyInfo) -> serde_json::Value {
    let scopes: Vec<&str> = key
        .scopes
        .iter()
        .map(|&s| scope_of_proto(s).map_or("unknown", Scope::name))
        .collect();
    serde_json::json!({
        "id": key.id,
        "tenant": key.tenant,
        "scopes": scopes,
        "streams": key.streams,
        "created_time": super::json::time_text(key.created_time.as_ref()),
        "expire_time": super::json::time_text(key.expire_time.as_ref()),
        "revoke_time": super::json::time_text(key.revoke_time.as_ref()),
    })
}

/// Keys as a table, or a JSON array with `--json`.
fn print_keys(output: OutputArgs, keys: &[pb::ApiKeyInfo]) {
    output.list(keys.iter().map(key_json), || {
        if keys.is_empty() {
            eprintln!("no keys yet: the server is open to anyone on loopback; `pullstream keys create --data-dir DIR --scope admin --scope publish --scope subscribe` makes the first");
            return;
        }
        let now = std::time::SystemTime::now();
        println!(
            "{:<16}  {:<12}  {:<26}  {:<16}  {:<16}  {:<16}  STREAMS",
            "ID", "TENANT", "SCOPES", "CREATED", "EXPIRES", "REVOKED"
        );
        for key in keys {
            let scopes = key_json(key)["scopes"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            // Creation and revocation are in the past.
            let when = |t: Option<&prost_types::Timestamp>| match t {
                None => "-".to_string(),
                Some(_) => super::json::ago_text(t, now),
            };
            println!(
                "{:<16}  {:<12}  {:<26}  {:<16}  {:<16}  {:<16}  {}",
                key.id,
                key.tenant,
                scopes,
                when(key.created_time.as_ref()),
                expires_text(key.expire_time.as_ref(), now),
                when(key.revoke_time.as_ref()),
                if key.streams.is_empty() {
                    "all".to_string()
                } else {
                    key.streams.join(",")
                }
            );
        }
    });
}

/// When a key expires, in words: `in 89days 23h`, `expired 2h ago`, `never`.
fn expires_text(time: Option<&prost_types::Timestamp>, now: std::time::SystemTime) -> String {
    let Some(t) = time else {
        return "never".to_string();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.seconds.max(0) as u64);
    match at.duration_since(now) {
        Ok(left) => format!("in {}", super::json::age_text(left)),
        Err(_) => format!("expired {}", super::json::ago_text(time, now)),
    }
}

fn print_created(output: OutputArgs, key: &pb::ApiKeyInfo, secret: &str) {
    let mut out = key_json(key);
    out["key"] = serde_json::json!(secret);
    output.object(&out);
    eprintln!("This is the only time the key is shown: store it now (e.g. PULLSTREAM_API_KEY).");
}
