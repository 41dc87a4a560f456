//! The live embedded database's file backend: redb's own, which keeps the
//! old bytes of every block it overwrites while a background check
//! (`verify`) runs, so the check sees the file as of its snapshot although
//! the engine reuses freed pages (its own bookkeeping's at once).

use std::collections::HashMap;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{BackendError, StorageBackend};

/// The unit kept.
pub(super) const BLOCK: u64 = 4096;
/// The most old bytes kept for a running check; past it the check gives up
/// (reported as `Verification::Incomplete`) rather than grow memory.
pub(super) const PRESERVE_LIMIT: usize = 64 << 20;

/// The old contents of the blocks the live database overwrote since the
/// check's snapshot (only blocks inside the snapshot's length).
#[derive(Debug, Default)]
pub(super) struct Preserved {
    pub(super) blocks: HashMap<u64, Box<[u8]>>,
    pub(super) bytes: usize,
    pub(super) snapshot_len: u64,
    pub(super) overflowed: bool,
}

/// Shared by the live backend and the check: `None` when no check runs.
pub(super) type Snapshot = Arc<Mutex<Option<Preserved>>>;

/// The live database's file: redb's own file backend, which keeps the old
/// bytes of each block before its first overwrite while a check runs.
#[derive(Debug)]
pub(super) struct Preserving {
    inner: redb::backends::FileBackend,
    /// A second handle on the file, to read what is about to be overwritten.
    file: std::fs::File,
    snapshot: Snapshot,
}

impl Preserving {
    /// The backend over `path` (created if missing) and its snapshot slot.
    pub(super) fn open(path: &Path) -> std::io::Result<(Self, SnapshotSlot)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let reader = file.try_clone()?;
        let inner = redb::backends::FileBackend::new(file)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let snapshot = Snapshot::default();
        Ok((
            Self {
                inner,
                file: reader,
                snapshot: Arc::clone(&snapshot),
            },
            SnapshotSlot(snapshot),
        ))
    }

    /// Keeps the old bytes of the blocks `[offset, end)` not kept yet.
    fn preserve(&self, offset: u64, end: u64) -> std::io::Result<()> {
        let mut slot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = slot.as_mut() else {
            return Ok(());
        };
        if p.overflowed {
            return Ok(());
        }
        let end = end.min(p.snapshot_len);
        if offset >= end {
            return Ok(());
        }
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            if p.blocks.contains_key(&b) {
                continue;
            }
            if p.bytes >= PRESERVE_LIMIT {
                p.overflowed = true;
                p.blocks.clear();
                return Ok(());
            }
            let mut old = vec![0u8; BLOCK as usize].into_boxed_slice();
            read_at_or_zero(&self.file, b * BLOCK, &mut old)?;
            p.bytes += old.len();
            p.blocks.insert(b, old);
        }
        Ok(())
    }
}

/// The handle the store keeps to start a check's snapshot.
#[derive(Debug, Clone)]
pub(super) struct SnapshotSlot(pub(super) Snapshot);

impl StorageBackend for Preserving {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        // A shrink drops blocks a check may still read.
        let current = self.inner.len()?;
        if len < current {
            self.preserve(len, current)?;
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if !data.is_empty() {
            self.preserve(offset, offset + data.len() as u64)?;
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// Reads `out.len()` bytes at `offset`; past the end of the file, zeros.
pub(super) fn read_at_or_zero(
    file: &std::fs::File,
    offset: u64,
    out: &mut [u8],
) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match file.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => {
                out[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
