//! Tests of keys, scopes, tenants and the minting rule.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::storage::{Store, StoreOptions};

fn ring(dir: &std::path::Path) -> KeyRing {
    let store = Store::open(&StoreOptions {
        path: dir.to_path_buf(),
        cache_bytes: 8 << 20,
        background_flush: crate::storage::BackgroundFlush::Off,
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
