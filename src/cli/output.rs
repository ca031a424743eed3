//! How the client commands print results: one rule, in one place.
//!
//! - `--json` (every command that prints results): JSON, compact, one
//!   document per line: an object for one result, an array for a list,
//!   one line per item for a stream of them (`tail`, `publish`). Pipe it
//!   to `jq` for colour and indentation.
//! - Without it, lists print as tables, and single results print as
//!   aligned `field  value` lines with units (`10 GiB`, `7days`,
//!   `… (3m 5s ago)`) on a terminal, and as JSON when stdout is not a
//!   terminal, so scripts that pipe a command get JSON either way.
//!
//! The JSON is the one the HTTP API writes (`proto::json`), so `curl` and
//! the CLI agree field for field.

use std::io::IsTerminal;

use serde_json::Value;

/// The `--json` flag, flattened into each command's arguments.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Print JSON (one compact document per line) instead of text
    #[arg(long, global = true)]
    pub json: bool,
}

impl OutputArgs {
    /// Whether single results print as JSON: asked for, or not a terminal.
    pub fn json_for_objects(&self) -> bool {
        self.json || !std::io::stdout().is_terminal()
    }

    /// Prints one result: JSON (see the module docs) or its fields as text.
    pub fn object(&self, value: &Value) {
        if self.json_for_objects() {
            println!("{value}");
        } else {
            print!("{}", human(value));
        }
    }

    /// Prints a list: a JSON array with `--json`, else the table `table`
    /// prints.
    pub fn list(&self, values: impl IntoIterator<Item = Value>, table: impl FnOnce()) {
        if self.json {
            println!("{}", Value::Array(values.into_iter().collect()));
        } else {
            table();
        }
    }
}

/// An object's fields as aligned `field  value` lines; nested objects
/// indented under their field, lists of scalars joined with commas.
pub fn human(value: &Value) -> String {
    let mut out = String::new();
    write_fields(&mut out, value, 0, std::time::SystemTime::now());
    out
}

/// The fields that say what a result is, shown first in this order.
const FIRST: [&str; 7] = ["name", "id", "stream", "offset", "type", "key", "tenant"];

fn write_fields(out: &mut String, value: &Value, indent: usize, now: std::time::SystemTime) {
    let Value::Object(fields) = value else {
        out.push_str(&format!("{:indent$}{}\n", "", scalar("", value, now)));
        return;
    };
    let width = fields.keys().map(|k| k.len()).max().unwrap_or(0);
    // What the result is comes first; then the fields in name order.
    let mut ordered: Vec<_> = fields.iter().collect();
    ordered.sort_by_key(|(key, _)| {
        (
            FIRST.iter().position(|f| f == key).unwrap_or(FIRST.len()),
            key.as_str(),
        )
    });
    for (key, value) in ordered {
        let label = key.replace('_', " ");
        match value {
            Value::Null => continue,
            Value::Object(inner) if inner.is_empty() => continue,
            Value::Object(_) => {
                out.push_str(&format!("{:indent$}{label}\n", ""));
                write_fields(out, value, indent + 2, now);
            }
            Value::Array(items) if items.iter().any(|i| i.is_object()) => {
                out.push_str(&format!("{:indent$}{label}\n", ""));
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    write_fields(out, item, indent + 2, now);
                }
            }
            _ => out.push_str(&format!(
                "{:indent$}{label:<width$}  {}\n",
                "",
                scalar(key, value, now)
            )),
        }
    }
}

/// One value in words, with the unit its field name implies.
fn scalar(key: &str, value: &Value, now: std::time::SystemTime) -> String {
    match value {
        Value::String(text) if key.ends_with("time") => match humantime::parse_rfc3339(text) {
            Ok(time) => {
                let age = super::json::ago_text(Some(&prost_types::Timestamp::from(time)), now);
                format!("{text} ({age})")
            }
            Err(_) => text.clone(),
        },
        Value::String(text) if text.is_empty() => "-".to_string(),
        Value::String(text) => text.clone(),
        Value::Number(n) if key.ends_with("bytes") => match n.as_u64() {
            Some(bytes) => bytes_text(bytes),
            None => n.to_string(),
        },
        Value::Number(n) if key.ends_with("seconds") => match n.as_f64() {
            Some(s) if s >= 0.0 => {
                humantime::format_duration(std::time::Duration::from_secs_f64(s)).to_string()
            }
            _ => n.to_string(),
        },
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::Array(items) if items.is_empty() => "-".to_string(),
        Value::Array(items) => items
            .iter()
            .map(|i| scalar(key, i, now))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// A byte count in binary units: `512 B`, `3.1 KiB`, `10 GiB`.
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() < 0.05 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(bytes_text(0), "0 B");
        assert_eq!(bytes_text(1023), "1023 B");
        assert_eq!(bytes_text(3200), "3.1 KiB");
        assert_eq!(bytes_text(10 << 30), "10 GiB");
    }

    #[test]
    fn an_object_reads_as_aligned_fields_with_units() {
        let text = human(&json!({
            "name": "orders",
            "approximate_bytes": 10u64 << 30,
            "created_time": "2000-01-01T00:00:00Z",
            "retention": { "max_age": "7days" },
            "key": "",
            "active": true,
            "missing": null,
        }));
        assert!(text.contains("name               orders\n"), "{text}");
        assert!(text.contains("approximate bytes  10 GiB\n"), "{text}");
        assert!(text.contains("2000-01-01T00:00:00Z ("), "{text}");
        assert!(text.contains(" ago)"), "{text}");
        assert!(text.contains("retention\n  max age  7days\n"), "{text}");
        assert!(text.contains("key                -\n"), "{text}");
        assert!(text.contains("active             yes\n"), "{text}");
        assert!(!text.contains("missing"), "{text}");
        assert!(text.starts_with("name "), "what it is comes first: {text}");
    }
}
