//! The architecture invariants of `src/lib.rs` that a machine can check,
//! checked on the source text (issue 15): only `storage` uses sled; only
//! the wire-facing modules use tonic; a gRPC status is built only by the
//! one mapping from `Error` (`impl From<Error> for Status` in `api`).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to the crate.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    walk(&root.join("src"), &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let relative = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (relative, text)
        })
        .collect()
}

/// The lines of `text` that are code (not comments), numbered from 1.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
}

#[test]
fn only_storage_uses_sled() {
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if path.starts_with("src/storage/") {
            continue;
        }
        for (n, line) in code_lines(&text) {
            if line.contains("sled::") || line.contains("use sled") {
                offenders.push(format!("{path}:{n}: {}", line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "sled outside storage:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn only_the_wire_facing_modules_use_tonic() {
    const ALLOWED: &[&str] = &[
        "src/proto/",
        "src/api/",
        "src/server/",
        "src/client.rs",
        "src/cli/",
        "src/bench/",
    ];
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if ALLOWED.iter().any(|a| path.starts_with(a)) {
            continue;
        }
        for (n, line) in code_lines(&text) {
            if line.contains("tonic::") || line.contains("use tonic") {
                offenders.push(format!("{path}:{n}: {}", line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "tonic outside the wire-facing modules:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn statuses_are_built_only_by_the_one_mapping() {
    const CONSTRUCTORS: &[&str] = &[
        "new",
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
        "with_details",
        "with_metadata",
    ];
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        // The mapping itself.
        let mapping = (path == "src/api/mod.rs").then(|| {
            let start = text
                .find("impl From<Error> for Status")
                .expect("the mapping");
            let end = start + text[start..].find("\n}\n").expect("its end");
            (
                text[..start].lines().count() + 1,
                text[..end].lines().count() + 1,
            )
        });
        for (n, line) in code_lines(&text) {
            if mapping.is_some_and(|(a, b)| (a..=b).contains(&n)) {
                continue;
            }
            for c in CONSTRUCTORS {
                if line.contains(&format!("Status::{c}(")) {
                    offenders.push(format!("{path}:{n}: {}", line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "statuses built outside `impl From<Error> for Status`:\n{}",
        offenders.join("\n")
    );
}

/// The engine seam (`src/engine/`) is the only way the stream layer, the
/// API and auth reach storage: outside `storage/` and the seam itself, the
/// sled store is named only where an engine is chosen (`Log::open`) and by
/// the offline tools that work on a sled data dir (and by the binary, which
/// installs the allocator that keeps sled's log buffers). A test of the layer may
/// name it to build a real store.
#[test]
fn storage_is_reached_only_through_the_engine_seam() {
    const ALLOWED: &[&str] = &[
        "src/storage/",
        "src/engine/",
        // Chooses and opens the engine.
        "src/log/registry.rs",
        // Offline tools on a sled data dir.
        "src/cli/verify.rs",
        "src/cli/repair.rs",
        "src/cli/keys.rs",
        // The event size limit is checked against sled's inline value size.
        "src/config.rs",
        // Installs the allocator that keeps sled's log buffers.
        "src/main.rs",
    ];
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if ALLOWED.iter().any(|a| path.starts_with(a)) {
            continue;
        }
        // Unit tests (a `#[cfg(test)]` module, or a `tests.rs` file) may
        // open a real sled store to test their layer on.
        if path.ends_with("/tests.rs") {
            continue;
        }
        let code = match text.find("#[cfg(test)]") {
            Some(tests) => &text[..tests],
            None => &text[..],
        };
        for (n, line) in code_lines(code) {
            if line.contains("storage::") {
                offenders.push(format!("{path}:{n}: {}", line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "storage named outside the engine seam:\n{}",
        offenders.join("\n")
    );
}
