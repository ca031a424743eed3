//! The identity and rights a call runs with: the key's tenant, scopes and
//! stream patterns, the checks every handler makes with them, and the
//! minting rule for keys created with a key.

use std::sync::Arc;
use std::time::Duration;

use super::{stored_stream_name, Scope, DEFAULT_TENANT};
use crate::error::Error;
use crate::log::{validate_stream_name, TypePattern};

/// The identity and rights a call runs with.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id; `None` in open mode.
    pub key_id: Option<String>,
    /// The tenant whose streams the call sees.
    pub tenant: String,
    pub(super) scopes: Vec<Scope>,
    pub(super) streams: Arc<[TypePattern]>,
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

    /// What the caller may do.
    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
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

    /// `error` as this caller should read it: its own stream names.
    pub fn own_error(&self, error: Error) -> Error {
        error.with_stream_names(&|stored| match self.own_name(&stored) {
            Some(own) => own.to_string(),
            None => stored,
        })
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
