//! Server-side event filters: which events a subscription or a read
//! delivers.
//!
//! A consumer of rare events should not pay for the others: the server
//! skips non-matching events without encoding or sending them, while the
//! cursor still moves past them. Type patterns follow NATS subject
//! wildcards on dot-separated segments, which also covers Stripe's
//! `enabled_events` style (`invoice.>` where Stripe writes `invoice.*`):
//!
//! - a literal segment matches itself;
//! - `*` matches exactly one segment;
//! - `>` (last segment only) matches one or more segments.
//!
//! Patterns are parsed once per subscription, so matching an event is a
//! walk over its type's bytes with no allocation.

use bytes::Bytes;

use crate::engine::EventRecord;
use crate::error::Error;

/// The most type patterns and keys in one filter.
pub const MAX_FILTER_ITEMS: usize = 100;
/// The longest type pattern or key, in bytes.
pub const MAX_FILTER_ITEM_LEN: usize = 200;

/// One segment of a type pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: any one segment.
    Any,
    /// `>`: one or more segments (always last).
    Rest,
}

/// A parsed type pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    /// The pattern as given.
    source: String,
    segments: Vec<Segment>,
    /// The common shapes, matched with one comparison: a pattern without
    /// wildcards (`Exact`), or literals followed by `>` (`Prefix`, holding
    /// the literals and the trailing dot).
    shape: Shape,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    General,
}

impl TypePattern {
    /// Whether every name `other` matches, this pattern matches too (so a
    /// key limited to this pattern may hand out keys limited to `other`).
    pub fn covers(&self, other: &TypePattern) -> bool {
        let (mine, theirs) = (&self.segments, &other.segments);
        for (i, segment) in mine.iter().enumerate() {
            let Some(their) = theirs.get(i) else {
                // `other` matches names shorter than this pattern needs.
                return false;
            };
            match (segment, their) {
                // The rest of any name `other` matches (at least one
                // segment: `their` is one).
                (Segment::Rest, _) => return true,
                (_, Segment::Rest) => return false,
                (Segment::Any, _) => {}
                (Segment::Literal(a), Segment::Literal(b)) if a == b => {}
                (Segment::Literal(_), _) => return false,
            }
        }
        mine.len() == theirs.len()
    }

    /// Parses a pattern; INVALID_ARGUMENT explaining the grammar when it is
    /// malformed.
    pub fn parse(pattern: &str) -> Result<TypePattern, Error> {
        let invalid = |why: &str| {
            Err(Error::InvalidArgument(format!(
                "type pattern {} is malformed: {why} (segments are separated by '.'; \
                 '*' matches one segment, '>' as the last segment matches the rest, \
                 e.g. \"invoice.*\", \"invoice.>\", \"*.deleted\")",
                crate::error::shown(pattern)
            )))
        };
        if pattern.is_empty() {
            return invalid("it is empty");
        }
        if pattern.len() > MAX_FILTER_ITEM_LEN {
            return invalid("it is longer than 200 bytes");
        }
        let parts: Vec<&str> = pattern.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return invalid("it has an empty segment"),
                "*" => Segment::Any,
                ">" if i + 1 == parts.len() => Segment::Rest,
                ">" => return invalid("'>' may only be the last segment"),
                literal if literal.contains(['*', '>']) => {
                    return invalid("'*' and '>' must be whole segments")
                }
                literal => Segment::Literal(literal.to_string()),
            };
            segments.push(segment);
        }
        let literals = segments
            .iter()
            .take_while(|s| matches!(s, Segment::Literal(_)))
            .count();
        let shape = if literals == segments.len() {
            Shape::Exact(pattern.as_bytes().to_vec())
        } else if literals + 1 == segments.len() && segments[literals] == Segment::Rest {
            // "a.b.>" -> "a.b."; a lone ">" -> "" (any type).
            Shape::Prefix(pattern.as_bytes()[..pattern.len() - 1].to_vec())
        } else {
            Shape::General
        };
        Ok(TypePattern {
            source: pattern.to_string(),
            segments,
            shape,
        })
    }

    /// The pattern as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether an event type matches.
    pub fn matches(&self, event_type: &[u8]) -> bool {
        match &self.shape {
            Shape::Exact(exact) => return event_type == exact.as_slice(),
            Shape::Prefix(prefix) => {
                return event_type.len() > prefix.len() && event_type.starts_with(prefix)
            }
            Shape::General => {}
        }
        // The part of the type after the segments matched so far.
        let mut rest = event_type;
        for (i, segment) in self.segments.iter().enumerate() {
            if let Segment::Rest = segment {
                // One or more segments remain.
                return !rest.is_empty();
            }
            let (part, tail) = match rest.iter().position(|&b| b == b'.') {
                Some(dot) => (&rest[..dot], Some(&rest[dot + 1..])),
                None => (rest, None),
            };
            let last = i + 1 == self.segments.len();
            let ok = match segment {
                Segment::Literal(l) => part == l.as_bytes(),
                Segment::Any => !part.is_empty(),
                Segment::Rest => unreachable!("handled above"),
            };
            if !ok {
                return false;
            }
            match tail {
                // The type has more segments than the pattern.
                Some(_) if last => return false,
                Some(tail) => rest = tail,
                None if last => return true,
                // The pattern needs more segments than the type has.
                None => return false,
            }
        }
        false
    }
}

/// Which events to deliver: by type pattern and by exact key. An empty
/// list does not restrict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    types: Vec<TypePattern>,
    keys: Vec<Bytes>,
    /// The filter as given, for saving with a durable consumer.
    source_types: Vec<String>,
}

impl EventFilter {
    /// Parses and checks a filter.
    pub fn new(types: Vec<String>, keys: Vec<String>) -> Result<EventFilter, Error> {
        if types.len() > MAX_FILTER_ITEMS || keys.len() > MAX_FILTER_ITEMS {
            return Err(Error::InvalidArgument(format!(
                "the filter has {} type patterns and {} keys; the most of each is {MAX_FILTER_ITEMS}",
                types.len(),
                keys.len()
            )));
        }
        if let Some(key) = keys
            .iter()
            .find(|k| k.is_empty() || k.len() > MAX_FILTER_ITEM_LEN)
        {
            return Err(Error::InvalidArgument(format!(
                "filter key {} must be 1 to {MAX_FILTER_ITEM_LEN} bytes",
                crate::error::shown(key)
            )));
        }
        Ok(EventFilter {
            types: types
                .iter()
                .map(|t| TypePattern::parse(t))
                .collect::<Result<_, _>>()?,
            keys: keys.into_iter().map(Bytes::from).collect(),
            source_types: types,
        })
    }

    /// Whether the filter passes every event.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty() && self.keys.is_empty()
    }

    /// Whether an event passes.
    pub fn matches(&self, record: &EventRecord) -> bool {
        self.matches_parts(&record.event_type, &record.key)
    }

    /// Whether an event with this type and key passes.
    pub fn matches_parts(&self, event_type: &[u8], key: &[u8]) -> bool {
        (self.types.is_empty() || self.types.iter().any(|p| p.matches(event_type)))
            && (self.keys.is_empty() || self.keys.iter().any(|k| k.as_ref() == key))
    }

    /// The type patterns as given.
    pub fn types(&self) -> &[String] {
        &self.source_types
    }

    /// The keys as given.
    pub fn keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pattern_covers_exactly_the_patterns_whose_names_it_matches() {
        let p = |s: &str| super::TypePattern::parse(s).unwrap();
        for (outer, inner, covers) in [
            ("orders.>", "orders.eu", true),
            ("orders.>", "orders.*", true),
            ("orders.>", "orders.eu.>", true),
            ("orders.>", "orders.>", true),
            ("orders.>", "orders", false),
            ("orders.>", ">", false),
            ("orders.>", "*.eu", false),
            ("orders.*", "orders.eu", true),
            ("orders.*", "orders.*", true),
            ("orders.*", "orders.>", false),
            ("orders.*", "orders.eu.x", false),
            ("orders", "orders", true),
            ("orders", "orders.*", false),
            ("orders", "secret", false),
            (">", "anything.at.all", true),
            ("*", "secret", true),
            ("*", "a.b", false),
        ] {
            assert_eq!(p(outer).covers(&p(inner)), covers, "{outer} covers {inner}");
        }
    }

    use super::*;

    fn matches(pattern: &str, event_type: &str) -> bool {
        TypePattern::parse(pattern)
            .unwrap()
            .matches(event_type.as_bytes())
    }

    #[test]
    fn exact_wildcard_and_prefix_patterns() {
        assert!(matches("invoice.paid", "invoice.paid"));
        assert!(!matches("invoice.paid", "invoice.paid.late"));
        assert!(!matches("invoice.paid", "invoice"));
        assert!(!matches("invoice.paid", "invoice.pai"));

        assert!(matches("invoice.*", "invoice.paid"));
        assert!(!matches("invoice.*", "invoice.payment.failed"));
        assert!(!matches("invoice.*", "invoice"));
        assert!(!matches("invoice.*", "invoices.paid"));
        assert!(matches("*.deleted", "customer.deleted"));
        assert!(!matches("*.deleted", "customer.deleted.soft"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.c"));

        assert!(matches("invoice.>", "invoice.paid"));
        assert!(matches("invoice.>", "invoice.payment.failed"));
        assert!(!matches("invoice.>", "invoice"));
        assert!(!matches("invoice.>", "invoicepaid"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches(">", "x"));
        assert!(matches("*", "x"));
        assert!(!matches("*", "x.y"));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "in*",
            "a.>.b",
            ">x",
            "a.b*",
            &"x".repeat(201),
        ] {
            assert!(
                matches!(TypePattern::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(EventFilter::new(vec!["a".into(); 101], vec![]).is_err());
        assert!(EventFilter::new(vec![], vec![String::new()]).is_err());
    }

    #[test]
    fn types_and_keys_combine() {
        let record = |t: &str, k: &str| EventRecord {
            event_type: Bytes::copy_from_slice(t.as_bytes()),
            key: Bytes::copy_from_slice(k.as_bytes()),
            ..Default::default()
        };
        let filter =
            EventFilter::new(vec!["invoice.>".into(), "customer.deleted".into()], vec![]).unwrap();
        assert!(filter.matches(&record("invoice.paid", "")));
        assert!(filter.matches(&record("customer.deleted", "c1")));
        assert!(!filter.matches(&record("customer.created", "c1")));

        let both =
            EventFilter::new(vec!["invoice.*".into()], vec!["c1".into(), "c2".into()]).unwrap();
        assert!(both.matches(&record("invoice.paid", "c2")));
        assert!(!both.matches(&record("invoice.paid", "c3")));
        assert!(!both.matches(&record("order.paid", "c1")));

        let keys_only = EventFilter::new(vec![], vec!["c1".into()]).unwrap();
        assert!(keys_only.matches(&record("any", "c1")));
        assert!(!keys_only.matches(&record("any", "")));
        assert!(EventFilter::default().is_empty());
        assert!(EventFilter::default().matches(&record("any", "")));
    }
}
