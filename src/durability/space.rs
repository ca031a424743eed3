//! Free space under the data dir.
//!
//! A full disk is an expected state, not a crash: appends and stream
//! creation are refused with RESOURCE_EXHAUSTED once the free space under
//! the data dir falls below a floor, before any write can fail half way,
//! and accepted again as soon as space returns. Deletions, trims and
//! consumer commits are not held to the floor, so an operator can always
//! free space; the floor is their reserve.

use std::path::Path;

/// The default floor: 1 GiB or 5% of the volume, whichever is smaller.
pub fn default_floor(path: &Path) -> u64 {
    match volume(path) {
        Some((_, total)) => (1u64 << 30).min(total / 20),
        None => 1 << 30,
    }
}

/// Bytes available to this process under `path` (as `df` shows them).
pub fn free_bytes(path: &Path) -> Option<u64> {
    volume(path).map(|(free, _)| free)
}

/// `(available, total)` bytes of the volume holding `path`.
fn volume(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let unit = stat.f_frsize as u64;
    Some((
        (stat.f_bavail as u64).saturating_mul(unit),
        (stat.f_blocks as u64).saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_volume_has_free_space_and_a_floor_within_it() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let floor = default_floor(dir.path());
        assert!(floor > 0 && floor <= 1 << 30);
        assert_eq!(free_bytes(Path::new("/no/such/dir")), None);
    }
}
