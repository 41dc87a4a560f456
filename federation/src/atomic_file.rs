//! Replacing a small file durably: write a temporary sibling, fsync it,
//! rename it over the file, fsync the directory. A crash leaves the old
//! file or the new one, never a mix. Owns nothing but the mechanism.

use std::io::Write as _;
use std::path::Path;

/// Replaces `path` with `bytes` durably (see the module doc). The temporary
/// file is `<path>.tmp`; the directory is created if needed.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // `f.json` has the parent `` (the current directory).
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("f.json");
        super::write(&path, b"one").expect("write");
        super::write(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }
}
