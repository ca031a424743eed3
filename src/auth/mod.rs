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

mod keys;
mod principal;
#[cfg(test)]
mod tests;

pub use keys::{key_lost, KeyInfo, KeyRing, NewKey, SubscriptionSlot, MAX_KEY_PATTERNS};
pub use principal::Principal;

use serde::{Deserialize, Serialize};

use crate::error::Error;

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
