//! Names: the one rule every client-chosen name follows (streams,
//! consumers, groups, members, tenants), and how a tenant's stream is
//! named in storage.
//!
//! Streams of the default tenant keep their plain names (so data written
//! before keys existed stays where it is); another tenant's are stored as
//! `tenant/name`. `/` cannot appear in a stream or tenant name, so the
//! tenant of a stored name is unambiguous. This leaf module is the one
//! place that knows the layout; the log (per-tenant caps), metrics (label
//! caps) and auth (mapping a caller's names) all ask it.

/// Why `value` breaks the naming rule for names of at most `max` bytes,
/// or `None` when it keeps it. The rule: 1 to `max` characters of
/// `A-Z a-z 0-9 . _ -` (safe in URLs, file names, shells and every SDK
/// language, and unable to hold the `/` that separates tenants).
pub fn name_problem(value: &str, max: usize) -> Option<String> {
    if value.is_empty() {
        Some("it is empty".to_string())
    } else if value.len() > max {
        Some(format!("it is longer than {max} characters"))
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed".to_string())
    } else {
        None
    }
}

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
    fn one_rule_for_names() {
        assert_eq!(name_problem("orders.eu-1_x", 200), None);
        assert!(name_problem("", 200).unwrap().contains("empty"));
        assert!(name_problem("abc", 2).unwrap().contains("longer than 2"));
        for bad in ["a/b", "a b", "ü", "a\n"] {
            assert!(
                name_problem(bad, 200).unwrap().contains("only letters"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_tenant_of_a_stored_name_is_the_tenant_it_was_stored_for() {
        assert_eq!(tenant_of(&stored_stream_name("acme", "orders")), "acme");
        assert_eq!(tenant_of(&stored_stream_name(DEFAULT_TENANT, "orders")), "");
    }
}
