//! Who may do what: API keys, tenants and scopes.
//!
//! Webhooks leave security to every receiver. A pull API lets the provider
//! enforce it in one place, here. Every call carries `authorization:
//! Bearer <key>`; the key names a tenant (whose streams are a namespace of
//! their own), scopes (`publish`, `subscribe`, `admin`) and optionally the
//! stream-name patterns it is limited to.
//!
//! A key reads `ps_<id>_<secret>` (16 and 64 hex digits): the id tells keys
//! apart in logs and listings, the secret (32 random bytes) is shown once, at creation, and
//! stored only as its SHA-256 digest (a random 256-bit secret needs no slow
//! password hash), compared in constant time. With no key at all the server
//! is open: every call acts as the default tenant with every scope (the
//! server refuses to run open on a non-loopback address unless told
//! `--insecure`). Once any key exists, every call needs one.
//!
//! Streams of the default tenant keep their plain names in storage (so data
//! written before keys existed stays where it is); another tenant's streams
//! are stored as `tenant/name`, and `/` cannot appear in a stream name, so
//! tenants can neither collide nor name each other's streams.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::Error;
use crate::log::{validate_stream_name, TypePattern};

pub use crate::names::{stored_stream_name, DEFAULT_TENANT};
/// The longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Append, create streams, describe streams.
    Publish,
    /// Read, subscribe, commit consumer cursors, describe streams.
    Subscribe,
    /// Delete streams and consumers, manage the tenant's keys.
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;

    /// A scope from its name (`publish`, `subscribe`, `admin`).
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.name() == s)
            .ok_or_else(|| format!("unknown scope {s:?}: use publish, subscribe or admin"))
    }
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Publish, Scope::Subscribe, Scope::Admin];

    /// The scope's name, as the CLI and the docs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Subscribe => "subscribe",
            Scope::Admin => "admin",
        }
    }
}

/// A key as stored: everything but the secret, which is kept only as its
/// digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    id: String,
    tenant: String,
    scopes: Vec<Scope>,
    streams: Vec<String>,
    created_unix_nanos: i64,
    expires_unix_nanos: Option<i64>,
    revoked_unix_nanos: Option<i64>,
    /// Hex SHA-256 of the secret part of the key.
    secret_sha256: String,
    /// `streams`, parsed once when the key is loaded or created, so a
    /// call's key check is a map lookup and its stream check a match.
    #[serde(skip)]
    compiled: Arc<[TypePattern]>,
}

impl StoredKey {
    fn compile(mut self) -> StoredKey {
        self.compiled = self
            .streams
            .iter()
            .filter_map(|p| TypePattern::parse(p).ok())
            .collect();
        self
    }
}

/// A key as listed: no secret, no digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's id (the part after `ps_`).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Stream-name patterns it is limited to; empty for all the tenant's.
    pub streams: Vec<String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// Expiry, if any.
    pub expires_unix_nanos: Option<i64>,
    /// Revocation time, if revoked.
    pub revoked_unix_nanos: Option<i64>,
}

impl From<&StoredKey> for KeyInfo {
    fn from(k: &StoredKey) -> KeyInfo {
        KeyInfo {
            id: k.id.clone(),
            tenant: k.tenant.clone(),
            scopes: k.scopes.clone(),
            streams: k.streams.clone(),
            created_unix_nanos: k.created_unix_nanos,
            expires_unix_nanos: k.expires_unix_nanos,
            revoked_unix_nanos: k.revoked_unix_nanos,
        }
    }
}

/// What a new key should allow.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The tenant; empty means the default tenant.
    pub tenant: String,
    /// At least one scope.
    pub scopes: Vec<Scope>,
    /// Stream-name patterns (the type-filter grammar); empty for all.
    pub streams: Vec<String>,
    /// How long the key is valid; `None` for no expiry.
    pub ttl: Option<Duration>,
}

/// The most stream patterns one key may have (each is at most 200 bytes,
/// the filter grammar's limit).
pub const MAX_KEY_PATTERNS: usize = 100;

/// The identity and rights a call runs with.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id; `None` in open mode.
    pub key_id: Option<String>,
    /// The tenant whose streams the call sees.
    pub tenant: String,
    scopes: Vec<Scope>,
    streams: Arc<[TypePattern]>,
    /// When the key expires, if it does.
    pub expires_unix_nanos: Option<i64>,
}

impl Principal {
    /// Open mode: the default tenant, every scope.
    pub fn open() -> Principal {
        Principal {
            key_id: None,
            tenant: DEFAULT_TENANT.to_string(),
            scopes: vec![Scope::Publish, Scope::Subscribe, Scope::Admin],
            streams: Arc::from([]),
            expires_unix_nanos: None,
        }
    }

    /// Fails with PERMISSION_DENIED unless the key has one of `scopes`.
    pub fn require(&self, scopes: &[Scope]) -> Result<(), Error> {
        if scopes.iter().any(|s| self.scopes.contains(s)) {
            return Ok(());
        }
        let wanted: Vec<&str> = scopes.iter().map(|s| s.name()).collect();
        Err(Error::PermissionDenied(format!(
            "API key {} lacks the {} scope this call needs",
            self.key_id.as_deref().unwrap_or("-"),
            wanted.join(" or ")
        )))
    }

    /// The stored name of the caller's stream `name`: checks the name and
    /// the key's stream patterns (PERMISSION_DENIED outside them).
    pub fn stream(&self, name: &str) -> Result<String, Error> {
        validate_stream_name(name)?;
        if !self.may_use(name) {
            return Err(Error::PermissionDenied(format!(
                "API key {} may not use stream {}: it is limited to {:?}",
                self.key_id.as_deref().unwrap_or("-"),
                crate::error::shown(name),
                self.streams
                    .iter()
                    .map(TypePattern::source)
                    .collect::<Vec<_>>()
            )));
        }
        Ok(stored_stream_name(&self.tenant, name))
    }

    /// The minting rule: a key may create only keys with a subset of its
    /// scopes, stream patterns within its own, and an expiry no later than
    /// its own. PERMISSION_DENIED naming the rule otherwise.
    pub fn may_mint(
        &self,
        scopes: &[Scope],
        streams: &[String],
        ttl: Option<Duration>,
        now: i64,
    ) -> Result<(), Error> {
        let id = self.key_id.as_deref().unwrap_or("-");
        let denied = |why: String| {
            Err(Error::PermissionDenied(format!(
                "API key {id} may not create this key: {why} (a key can only create keys with a subset of its scopes, stream patterns within its own, and an expiry no later than its own)"
            )))
        };
        if let Some(extra) = scopes.iter().find(|s| !self.scopes.contains(s)) {
            return denied(format!("it lacks the {} scope itself", extra.name()));
        }
        if !self.covers(streams) {
            return denied(format!(
                "the stream patterns {streams:?} are not all within its own {:?}",
                self.patterns()
            ));
        }
        if let Some(expires) = self.expires_unix_nanos {
            let asked = ttl
                .map(|ttl| now.saturating_add(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX)));
            if asked.is_none_or(|asked| asked > expires) {
                let left = Duration::from_nanos(expires.saturating_sub(now).max(0) as u64);
                return denied(format!(
                    "it expires in {}, so the new key must expire no later (give a TTL of at most that)",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ));
            }
        }
        Ok(())
    }

    /// Whether a key limited to `streams` (all streams when empty) lies
    /// within this key's patterns, so this key may list and revoke it.
    pub fn covers(&self, streams: &[String]) -> bool {
        if self.streams.is_empty() {
            return true;
        }
        !streams.is_empty()
            && streams.iter().all(|s| {
                TypePattern::parse(s)
                    .is_ok_and(|theirs| self.streams.iter().any(|mine| mine.covers(&theirs)))
            })
    }

    fn patterns(&self) -> Vec<&str> {
        self.streams.iter().map(TypePattern::source).collect()
    }

    /// Whether the key's stream patterns allow `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.streams.is_empty() || self.streams.iter().any(|p| p.matches(name.as_bytes()))
    }

    /// The caller's name for a stored stream name, when the stream belongs
    /// to the caller's tenant.
    pub fn own_name<'a>(&self, stored: &'a str) -> Option<&'a str> {
        match stored.split_once('/') {
            None if self.tenant == DEFAULT_TENANT => Some(stored),
            Some((tenant, name)) if tenant == self.tenant => Some(name),
            _ => None,
        }
    }
}

/// Checks a tenant name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_tenant(tenant: &str) -> Result<(), Error> {
    match crate::names::name_problem(tenant, MAX_TENANT_LEN) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidArgument(format!(
            "invalid tenant {}: {reason} (use 1 to {MAX_TENANT_LEN} characters of A-Z a-z 0-9 . _ -)",
            crate::error::shown(tenant)
        ))),
    }
}

/// The keys, in memory, backed by the store.
pub struct KeyRing {
    engine: Arc<dyn Engine>,
    /// Read by every call; never held across a disk sync.
    keys: RwLock<BTreeMap<String, StoredKey>>,
    /// Serializes revocations (each waits for a disk sync) without
    /// holding `keys`.
    revoking: Mutex<()>,
    /// Bumped on every change, so open subscriptions re-check their key.
    revision: watch::Sender<u64>,
    limits: Limits,
    /// The wall clock: creation, revocation and expiry times.
    clock: crate::clock::Clock,
}

/// Per-key limits that keep one misbehaving client from hurting others.
/// They apply to keys only (open mode has none).
#[derive(Default)]
struct Limits {
    /// Most subscriptions open at once per key (0: no limit).
    max_subscriptions: usize,
    /// Open subscriptions per key id.
    subscriptions: Arc<Mutex<HashMap<String, usize>>>,
    /// Calls per second per key (a token bucket, `governor`'s GCRA).
    rate: Option<governor::DefaultKeyedRateLimiter<String>>,
}

/// Holds one of a key's subscription slots; gives it back when dropped.
pub struct SubscriptionSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key_id: Option<String>,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        if let Some(id) = &self.key_id {
            let mut counts = self.counts.lock().expect("subscription counts lock");
            if let Some(n) = counts.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(id);
                }
            }
        }
    }
}

impl KeyRing {
    /// Loads the stored keys.
    pub fn load(engine: Arc<dyn Engine>) -> Result<KeyRing, Error> {
        let mut keys = BTreeMap::new();
        for (id, value) in engine.api_keys()? {
            let key: StoredKey = serde_json::from_slice(&value).map_err(|e| {
                Error::Storage(crate::engine::StorageError::Corrupt {
                    what: format!("API key record {id}"),
                    source: crate::engine::CodecError::Inconsistent(e.to_string()),
                })
            })?;
            keys.insert(id, key.compile());
        }
        Ok(KeyRing {
            engine,
            keys: RwLock::new(keys),
            revoking: Mutex::new(()),
            revision: watch::channel(0).0,
            limits: Limits::default(),
            clock: crate::clock::Clock::default(),
        })
    }

    /// Reads time from `clock` (the server's; tests move it forward).
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> KeyRing {
        self.clock = clock;
        self
    }

    /// The time now by the ring's clock, in nanoseconds since the epoch.
    pub fn now(&self) -> i64 {
        self.clock.now_unix_nanos()
    }

    /// Sets the per-key limits: subscriptions open at once (0: none) and
    /// calls per second (0: none; bursts up to one second's worth).
    pub fn with_limits(mut self, max_subscriptions: usize, calls_per_second: u32) -> KeyRing {
        self.limits.max_subscriptions = max_subscriptions;
        self.limits.rate = NonZeroU32::new(calls_per_second)
            .map(|rate| governor::RateLimiter::keyed(governor::Quota::per_second(rate)));
        self
    }

    /// Counts a call against the key's rate limit: RESOURCE_EXHAUSTED when
    /// it is spent.
    pub fn admit(&self, principal: &Principal) -> Result<(), Error> {
        if let (Some(id), Some(rate)) = (&principal.key_id, &self.limits.rate) {
            if rate.check_key(id).is_err() {
                return Err(Error::ResourceExhausted(format!(
                    "API key {id} is over its request rate limit: slow down and retry"
                )));
            }
        }
        Ok(())
    }

    /// Takes one of the key's subscription slots: RESOURCE_EXHAUSTED when
    /// it already has the most allowed open.
    pub fn subscription_slot(&self, principal: &Principal) -> Result<SubscriptionSlot, Error> {
        let counts = self.limits.subscriptions.clone();
        let Some(id) = &principal.key_id else {
            return Ok(SubscriptionSlot {
                counts,
                key_id: None,
            });
        };
        let mut guard = counts.lock().expect("subscription counts lock");
        let open = guard.entry(id.clone()).or_insert(0);
        if self.limits.max_subscriptions > 0 && *open >= self.limits.max_subscriptions {
            return Err(Error::ResourceExhausted(format!(
                "API key {id} already has {} subscriptions open, the most allowed: close one first",
                self.limits.max_subscriptions
            )));
        }
        *open += 1;
        drop(guard);
        Ok(SubscriptionSlot {
            counts,
            key_id: Some(id.clone()),
        })
    }

    /// Whether no key exists (the server is open).
    pub fn is_open(&self) -> bool {
        self.keys.read().expect("keys lock").is_empty()
    }

    /// Creates a key; returns its description and the full key string,
    /// which is never stored or shown again.
    pub fn create(&self, new: NewKey) -> Result<(KeyInfo, String), Error> {
        let tenant = if new.tenant.is_empty() {
            DEFAULT_TENANT.to_string()
        } else {
            new.tenant
        };
        validate_tenant(&tenant)?;
        if new.scopes.is_empty() {
            return Err(Error::InvalidArgument(
                "a key needs at least one scope: publish, subscribe or admin".into(),
            ));
        }
        if new.streams.len() > MAX_KEY_PATTERNS {
            return Err(Error::InvalidArgument(format!(
                "a key may have at most {MAX_KEY_PATTERNS} stream patterns ({} given)",
                new.streams.len()
            )));
        }
        for pattern in &new.streams {
            TypePattern::parse(pattern)?;
        }
        let mut scopes = new.scopes;
        scopes.sort();
        scopes.dedup();
        let id = hex(&random_bytes::<8>()?);
        let secret = hex(&random_bytes::<32>()?);
        let created = self.now();
        let expires = new
            .ttl
            .map(|ttl| created.saturating_add(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX)));
        let stored = StoredKey {
            id: id.clone(),
            tenant,
            scopes,
            streams: new.streams,
            created_unix_nanos: created,
            expires_unix_nanos: expires,
            revoked_unix_nanos: None,
            secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
            compiled: Arc::from([]),
        }
        .compile();
        self.save(&stored)?;
        let info = KeyInfo::from(&stored);
        self.keys
            .write()
            .expect("keys lock")
            .insert(id.clone(), stored);
        self.revision.send_modify(|r| *r += 1);
        Ok((info, format!("ps_{id}_{secret}")))
    }

    /// The keys of `tenant` (every key when `None`), by id.
    pub fn list(&self, tenant: Option<&str>) -> Vec<KeyInfo> {
        self.keys
            .read()
            .expect("keys lock")
            .values()
            .filter(|k| tenant.is_none_or(|t| k.tenant == t))
            .map(KeyInfo::from)
            .collect()
    }

    /// Revokes a key of `tenant` (any tenant when `None`). Subscriptions
    /// opened with it end within moments.
    pub fn revoke(&self, id: &str, tenant: Option<&str>) -> Result<KeyInfo, Error> {
        self.revoke_if(id, tenant, |_| true)
    }

    /// Revokes a key like [`KeyRing::revoke`] if `allowed` says the caller
    /// may manage it (PERMISSION_DENIED otherwise).
    pub fn revoke_if(
        &self,
        id: &str,
        tenant: Option<&str>,
        allowed: impl FnOnce(&KeyInfo) -> bool,
    ) -> Result<KeyInfo, Error> {
        let _revoking = self.revoking.lock().expect("revoking lock");
        let not_found = || Error::KeyNotFound(id.to_string());
        let mut revoked = match self.keys.read().expect("keys lock").get(id) {
            Some(key) if tenant.is_none_or(|t| key.tenant == t) => key.clone(),
            _ => return Err(not_found()),
        };
        if !allowed(&KeyInfo::from(&revoked)) {
            return Err(Error::PermissionDenied(format!(
                "API key {id} has stream patterns {:?} outside the caller's: a stream-limited admin key can only revoke keys within its own patterns",
                revoked.streams
            )));
        }
        if revoked.revoked_unix_nanos.is_none() {
            revoked.revoked_unix_nanos = Some(self.now());
            // Durable before anyone sees it, without blocking callers.
            self.save(&revoked)?;
        }
        let info = KeyInfo::from(&revoked);
        self.keys
            .write()
            .expect("keys lock")
            .insert(id.to_string(), revoked);
        self.revision.send_modify(|r| *r += 1);
        Ok(info)
    }

    fn save(&self, key: &StoredKey) -> Result<(), Error> {
        let record = serde_json::to_vec(key).expect("a key record serializes");
        self.engine.put_api_key(&key.id, record)?;
        Ok(())
    }

    /// Who is calling, from the `authorization` metadata value (if any).
    /// UNAUTHENTICATED for a missing, malformed, unknown, expired or
    /// revoked key. Messages never contain the secret.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Error> {
        let keys = self.keys.read().expect("keys lock");
        if keys.is_empty() {
            return Ok(Principal::open());
        }
        let unauthenticated = |m: String| Err(Error::Unauthenticated(m));
        let Some(value) = authorization else {
            return unauthenticated(
                "this server requires an API key: send `authorization: Bearer <key>` \
                 (CLI: --api-key or PULLSTREAM_API_KEY)"
                    .into(),
            );
        };
        let Some((id, secret)) = value
            .strip_prefix("Bearer ")
            .and_then(|k| k.trim().strip_prefix("ps_"))
            .and_then(|k| k.split_once('_'))
        else {
            return unauthenticated(
                "malformed authorization: expected `Bearer ps_<id>_<secret>`".into(),
            );
        };
        let Some(key) = keys.get(id) else {
            return unauthenticated("unknown API key".into());
        };
        let digest = hex(&Sha256::digest(secret.as_bytes()));
        if !bool::from(digest.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
            return unauthenticated("unknown API key".into());
        }
        if key.revoked_unix_nanos.is_some() {
            return unauthenticated(format!("API key {id} was revoked"));
        }
        if key.expires_unix_nanos.is_some_and(|e| e <= self.now()) {
            return unauthenticated(format!("API key {id} has expired"));
        }
        Ok(Principal {
            key_id: Some(key.id.clone()),
            tenant: key.tenant.clone(),
            scopes: key.scopes.clone(),
            streams: key.compiled.clone(),
            expires_unix_nanos: key.expires_unix_nanos,
        })
    }

    /// Whether a key is still usable (not revoked, not expired).
    pub fn is_valid(&self, id: &str) -> bool {
        self.keys
            .read()
            .expect("keys lock")
            .get(id)
            .is_some_and(|k| {
                k.revoked_unix_nanos.is_none()
                    && k.expires_unix_nanos.is_none_or(|e| e > self.now())
            })
    }

    /// Changes whenever a key is created or revoked.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

/// Resolves once the principal's key is revoked or expires (never in open
/// mode), with the error to end a subscription with.
pub async fn key_lost(ring: &KeyRing, principal: &Principal) -> Error {
    let Some(id) = &principal.key_id else {
        return std::future::pending().await;
    };
    let lost = || Error::Unauthenticated(format!("API key {id} was revoked or has expired"));
    // Subscribe to changes before checking, so a revocation between the
    // check and the wait is not missed (callers build this future anew on
    // every turn of their loop).
    let mut changes = ring.changes();
    if !ring.is_valid(id) {
        return lost();
    }
    let expiry = principal.expires_unix_nanos.map(|e| {
        let left = e.saturating_sub(ring.now()).max(0) as u64;
        tokio::time::Instant::now() + Duration::from_nanos(left)
    });
    loop {
        let expired = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            _ = expired => {}
        }
        if !ring.is_valid(id) {
            return lost();
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::StorageFailed(format!("no randomness from the OS: {e}")))?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Store, StoreOptions};

    fn ring(dir: &std::path::Path) -> KeyRing {
        let store = Store::open(&StoreOptions {
            path: dir.to_path_buf(),
            cache_bytes: 8 << 20,
            background_flush_ms: None,
            write_ahead_log: true,
            checkpoint_bytes: 64 << 20,
            faults: None,
        })
        .unwrap();
        KeyRing::load(Arc::new(store)).unwrap()
    }

    fn new_key(tenant: &str, scopes: &[Scope], streams: &[&str]) -> NewKey {
        NewKey {
            tenant: tenant.into(),
            scopes: scopes.to_vec(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            ttl: None,
        }
    }

    #[test]
    fn keys_authenticate_and_are_stored_without_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let ring = ring(dir.path());
        assert!(ring.is_open());
        assert_eq!(ring.authenticate(None).unwrap().tenant, DEFAULT_TENANT);

        let (info, key) = ring
            .create(new_key("acme", &[Scope::Publish], &["orders.>"]))
            .unwrap();
        assert!(key.starts_with(&format!("ps_{}_", info.id)));
        let principal = ring.authenticate(Some(&format!("Bearer {key}"))).unwrap();
        assert_eq!(principal.tenant, "acme");
        assert!(principal.require(&[Scope::Publish]).is_ok());
        assert!(matches!(
            principal.require(&[Scope::Admin]),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(principal.stream("orders.eu").unwrap(), "acme/orders.eu");
        assert!(matches!(
            principal.stream("billing"),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(principal.own_name("acme/x"), Some("x"));
        assert_eq!(principal.own_name("x"), None);
        assert_eq!(principal.own_name("other/x"), None);

        for bad in [None, Some("Bearer nope"), Some("Basic abc")] {
            assert!(
                matches!(ring.authenticate(bad), Err(Error::Unauthenticated(_))),
                "{bad:?}"
            );
        }
        let wrong = format!("Bearer ps_{}_{}", info.id, "a".repeat(64));
        assert!(matches!(
            ring.authenticate(Some(&wrong)),
            Err(Error::Unauthenticated(_))
        ));

        // Reloaded from storage, the key still works; no secret is stored.
        drop(ring);
        let ring = self::ring(dir.path());
        assert!(ring.authenticate(Some(&format!("Bearer {key}"))).is_ok());
        let secret = key.splitn(3, '_').nth(2).unwrap();
        assert_eq!(secret.len(), 64);
        let stored = ring.engine.api_keys().unwrap();
        assert!(!String::from_utf8_lossy(&stored[0].1).contains(secret));
    }

    #[test]
    fn revoked_and_expired_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ring = ring(dir.path());
        let (info, key) = ring.create(new_key("", &[Scope::Subscribe], &[])).unwrap();
        let header = format!("Bearer {key}");
        assert!(ring.is_valid(&info.id));
        assert!(matches!(
            ring.revoke(&info.id, Some("other")),
            Err(Error::KeyNotFound(_))
        ));
        ring.revoke(&info.id, None).unwrap();
        assert!(!ring.is_valid(&info.id));
        assert!(matches!(
            ring.authenticate(Some(&header)),
            Err(Error::Unauthenticated(_))
        ));

        let mut short = new_key("t", &[Scope::Subscribe], &[]);
        short.ttl = Some(Duration::from_nanos(1));
        let (_, key) = ring.create(short).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(
            ring.authenticate(Some(&format!("Bearer {key}"))),
            Err(Error::Unauthenticated(m)) if m.contains("expired")
        ));
        assert!(ring
            .create(new_key("bad/tenant", &[Scope::Admin], &[]))
            .is_err());
        assert!(ring.create(new_key("t", &[], &[])).is_err());
        assert!(ring
            .create(new_key("t", &[Scope::Admin], &["a..b"]))
            .is_err());
    }
}
