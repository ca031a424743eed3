//! Stored stream names: how a tenant's stream is named in storage.
//!
//! Streams of the default tenant keep their plain names (so data written
//! before keys existed stays where it is); another tenant's are stored as
//! `tenant/name`. `/` cannot appear in a stream or tenant name, so the
//! tenant of a stored name is unambiguous. This leaf module is the one
//! place that knows the layout; the log (per-tenant caps), metrics (label
//! caps) and auth (mapping a caller's names) all ask it.

/// The tenant of open mode and of keys created without one.
pub const DEFAULT_TENANT: &str = "default";

/// The stored name of a tenant's stream.
pub fn stored_stream_name(tenant: &str, name: &str) -> String {
    if tenant == DEFAULT_TENANT {
        name.to_string()
    } else {
        format!("{tenant}/{name}")
    }
}

/// The tenant part of a stored name, `""` for the default tenant's.
pub fn tenant_of(stored: &str) -> &str {
    stored.split_once('/').map_or("", |(tenant, _)| tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_of_a_stored_name_is_the_tenant_it_was_stored_for() {
        assert_eq!(tenant_of(&stored_stream_name("acme", "orders")), "acme");
        assert_eq!(tenant_of(&stored_stream_name(DEFAULT_TENANT, "orders")), "");
    }
}
