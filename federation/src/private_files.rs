//! Owner-only files: the data directory is 0700 and everything in it 0700
//! (folders) or 0600 (files); secrets that others can read are reported.
//!
//! The data directory holds task payloads (`tasks.redb`), request attributes
//! (`decisions.jsonl`) and other regions' snapshots, so nobody but the
//! controller's user may read it. `federation serve` sets the process umask
//! to 0077 ([`restrict_umask`]) so that everything it creates later is
//! owner-only; [`prepare_data_dir`] creates the directory 0700 and tightens
//! whatever an older version (or an operator) left looser, saying so.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;

/// The most entries [`prepare_data_dir`] walks (the data directory holds a
/// handful of files and one snapshot per peer region).
const MAX_ENTRIES: usize = 10_000;

/// Mode bits for group and others.
const GROUP_OTHER: u32 = 0o077;

/// Sets the process umask to 0077: files and folders created from now on
/// are owner-only whatever the caller's umask was. Returns the old mask.
pub fn restrict_umask() -> u32 {
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    old.as_raw_mode()
}

/// Creates `dir` (and missing parents) with mode 0700 and makes it and
/// everything under it owner-only: folders 0700, files without group and
/// other bits (0600 for a read-write file). Every mode it tightens is logged
/// with the path and the mode it had. Symbolic links are neither followed
/// nor changed.
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut pending = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(path) = pending.pop() {
        seen += 1;
        if seen > MAX_ENTRIES {
            tracing::warn!(dir = %dir.display(), limit = MAX_ENTRIES, "data directory has too many entries; the rest keep their modes");
            break;
        }
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if mode & GROUP_OTHER != 0 || mode & 0o700 != 0o700 {
                set_mode(&path, mode, 0o700)?;
            }
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        } else if mode & GROUP_OTHER != 0 {
            set_mode(&path, mode, mode & 0o700)?;
        }
    }
    Ok(())
}

/// Tightens one entry. A mode we may not change (a volume root owned by
/// another user, as a Kubernetes volume with `fsGroup` is) is reported and
/// left: what the controller creates inside is owner-only all the same.
fn set_mode(path: &Path, old: u32, new: u32) -> std::io::Result<()> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(new)) {
        Ok(()) => {
            tracing::warn!(
                path = %path.display(),
                mode = %format!("{old:04o}"),
                now = %format!("{new:04o}"),
                "data file was readable beyond its owner; made owner-only"
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                path = %path.display(),
                mode = %format!("{old:04o}"),
                error = %e,
                "data path is readable beyond its owner and its mode cannot be changed"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether a secret file with `mode`, group `file_gid`, is readable by
/// anyone but its owner and the service's own group `own_gid`. A group-readable
/// secret whose group is the process's own is what Kubernetes (`fsGroup`,
/// which adds group read to mounted secrets) and packaging groups give, and is
/// accepted; others' read bit, or read by a foreign group, is not.
pub fn readable_by_others(mode: u32, file_gid: u32, own_gid: u32) -> bool {
    mode & 0o004 != 0 || (mode & 0o040 != 0 && file_gid != own_gid)
}

/// Logs a warning naming `path` and its mode when the secret file (`what`,
/// for example "snapshot key file") is readable beyond its owner and the
/// process's own group (see [`readable_by_others`]). Returns whether it warned.
pub fn warn_if_exposed(path: &Path, what: &str) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let mode = meta.permissions().mode() & 0o7777;
    let own_gid = rustix::process::getegid().as_raw();
    if !readable_by_others(mode, meta.gid(), own_gid) {
        return false;
    }
    tracing::warn!(
        file = %path.display(),
        mode = %format!("{mode:04o}"),
        "{what} is readable by group or others; make it 0600 (or 0640 with the service's own group)"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn tightens_the_tree_and_creates_owner_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        prepare_data_dir(&dir).expect("creates");
        assert_eq!(mode(&dir), 0o700);
        let sub = dir.join("snapshots");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let file = sub.join("europe.snap");
        std::fs::write(&file, b"x").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let ro = dir.join("epoch");
        std::fs::write(&ro, b"1").expect("write");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare_data_dir(&dir).expect("tightens");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&ro), 0o400, "owner bits are kept, others' removed");
    }

    #[test]
    fn secrets_readable_only_by_owner_or_own_group_pass() {
        assert!(!readable_by_others(0o600, 5, 6));
        assert!(!readable_by_others(0o400, 5, 6));
        assert!(!readable_by_others(0o440, 6, 6), "own group (fsGroup)");
        assert!(readable_by_others(0o640, 5, 6), "foreign group");
        assert!(readable_by_others(0o644, 6, 6), "world-readable");
        assert!(readable_by_others(0o604, 6, 6));
    }
}
