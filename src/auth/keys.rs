//! The key ring: API keys in memory, backed by the engine (created,
//! listed, revoked, expired), authentication of a call's key in constant
//! time, and the per-key limits on concurrent subscriptions.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::{validate_tenant, Principal, Scope, DEFAULT_TENANT};
use crate::engine::Engine;
use crate::error::Error;
use crate::log::TypePattern;

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

/// The keys, in memory, backed by the store.
pub struct KeyRing {
    pub(super) engine: Arc<dyn Engine>,
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

    /// Takes in the keys other servers sharing the engine created or
    /// revoked (cluster mode; the server calls it every second). Only
    /// ever adds keys and revocations, so a listing that lags a change
    /// made here cannot undo it. Returns whether anything changed.
    pub fn reload(&self) -> Result<bool, Error> {
        let mut found = Vec::new();
        for (id, value) in self.engine.api_keys()? {
            // A record this server cannot read is skipped here (it was
            // refused, by name, when the server started).
            if let Ok(key) = serde_json::from_slice::<StoredKey>(&value) {
                found.push((id, key));
            }
        }
        let mut changed = false;
        let mut keys = self.keys.write().expect("keys lock");
        for (id, key) in found {
            match keys.get_mut(&id) {
                None => {
                    keys.insert(id, key.compile());
                    changed = true;
                }
                Some(known)
                    if known.revoked_unix_nanos.is_none() && key.revoked_unix_nanos.is_some() =>
                {
                    known.revoked_unix_nanos = key.revoked_unix_nanos;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        drop(keys);
        if changed {
            self.revision.send_modify(|r| *r += 1);
        }
        Ok(changed)
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
