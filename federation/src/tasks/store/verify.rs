//! The embedded store's check of the whole file, in the background after
//! open: redb's own integrity check (every page checksum of the committed
//! trees) and a decode of every record, run on a private view of the file
//! as it was at open, so start-up never waits for it and the live file is
//! never touched by it. The live database writes through
//! `preserving::Preserving`, which keeps the old bytes of every block it overwrites while a check
//! runs (the engine reuses freed pages, its own bookkeeping's at once); the
//! view reads those, then the file, and keeps the check's own writes in
//! memory. Damage is logged at error level with what to do, listed
//! ([`RedbStore::verification`]) and, for a record, reported like any
//! undecodable record.
//!
//! [`RedbStore::verification`]: super::RedbStore::verification

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, StorageBackend};

use super::open::DAMAGED_HINT;
use super::preserving::{
    BLOCK, PRESERVE_LIMIT, Preserved, Snapshot, SnapshotSlot, read_at_or_zero,
};
use super::{DbResult, MARKS, Shared, TASKS, decode};
use crate::tasks::StoreError;

/// The redb cache of the check's private view: small, so that checking a
/// large file does not grow the controller's memory.
const CACHE_BYTES: usize = 8 << 20;
/// Records decoded between two looks at the stop flag.
const STOP_EVERY: usize = 1024;
/// What the background check of the file has found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Still checking.
    Running,
    /// Every page checksum holds and every record decodes (undecodable
    /// records, if any, are listed by `TaskStore::undecodable`).
    Sound {
        /// Task records decoded.
        records: u64,
        /// Records that did not decode.
        undecodable: u64,
    },
    /// The file is damaged: what was found (the controller keeps serving
    /// what it can read; see `federation store check`).
    Damaged(String),
    /// The store closed before the check finished.
    Stopped,
    /// Not finished: the live database overwrote more of the file while it
    /// ran than the check keeps (see `federation store check`).
    Incomplete,
}

/// The running check; [`Verifier::stop`] ends it (the store's drop).
pub(super) struct Verifier {
    stop: Arc<AtomicBool>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Verifier {
    /// Pins the commit the store opened at and starts checking it. The
    /// pin is taken with the writer held off (an empty write transaction),
    /// so the header read with it names that commit.
    pub(super) fn start(
        db: &Arc<Database>,
        slot: &SnapshotSlot,
        path: &Path,
        shared: &Arc<Shared>,
    ) -> Result<Self, StoreError> {
        let snapshot = super::guarded(path, || {
            let hold = db.begin_write().db()?;
            let pin = db.begin_read().db()?;
            let commit = pin
                .open_table(MARKS)
                .db()?
                .get("commit")
                .db()?
                .map(|v| v.value());
            let file = std::fs::File::open(path)
                .map_err(|e| StoreError::Db(format!("opening {}: {e}", path.display())))?;
            let len = file
                .metadata()
                .map_err(|e| StoreError::Db(format!("reading {}: {e}", path.display())))?
                .len();
            // From here on, what the live database overwrites is kept.
            *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Preserved {
                snapshot_len: len,
                ..Preserved::default()
            });
            hold.abort().db()?;
            Ok((pin, commit, file, len))
        })?;
        let (pin, commit, file, len) = snapshot;
        let stop = Arc::new(AtomicBool::new(false));
        let overlay = Overlay {
            file,
            len: Mutex::new(len),
            blocks: Mutex::new(BTreeMap::new()),
            preserved: Arc::clone(&slot.0),
            stop: Arc::clone(&stop),
        };
        let slot = slot.clone();
        let shared = Arc::clone(shared);
        let path = path.to_path_buf();
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("task-store-verify".into())
            .spawn(move || {
                let mut found = run(overlay, commit, &path, &shared, &flag);
                let kept = slot.0.lock().unwrap_or_else(|e| e.into_inner()).take();
                if kept.is_some_and(|p| p.overflowed) && matches!(found, Verification::Sound { .. })
                {
                    found = Verification::Incomplete;
                }
                drop(pin);
                report(&path, &found);
                *shared
                    .verification
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = found;
            })
            .map_err(|e| StoreError::Db(format!("starting the verify thread: {e}")))?;
        Ok(Self {
            stop,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Stops the check (its next read fails) and waits for it.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("task store verify thread panicked");
            }
        }
    }
}

fn report(path: &Path, found: &Verification) {
    match found {
        Verification::Sound {
            records,
            undecodable,
        } => {
            tracing::info!(path = %path.display(), records, undecodable, "task store checked: every page checksum holds");
        }
        Verification::Damaged(what) => {
            tracing::error!(path = %path.display(), what = %what, hint = DAMAGED_HINT, "task store damaged");
        }
        Verification::Incomplete => {
            tracing::warn!(path = %path.display(), limit_bytes = PRESERVE_LIMIT, "task store check incomplete: the store changed too much while it ran; run `federation store check DATA_DIR` when the controller is stopped");
        }
        Verification::Running | Verification::Stopped => {}
    }
}

/// Checks the overlay: redb's repair of the private view verifies every
/// checksum (the header it holds says the file is open, so the engine
/// treats it as after a crash); then the commit must be the pinned one
/// (an engine that fell back to the previous commit found the newest
/// damaged) and every record must decode.
fn run(
    overlay: Overlay,
    commit: Option<u64>,
    path: &Path,
    shared: &Shared,
    stop: &AtomicBool,
) -> Verification {
    let started = std::time::Instant::now();
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check(overlay, commit, shared, stop)
    }));
    if stop.load(Ordering::Relaxed) {
        return Verification::Stopped;
    }
    let found = match checked {
        Ok(Ok(found)) => found,
        Ok(Err(what)) => Verification::Damaged(what),
        Err(_) => Verification::Damaged("the storage engine panicked reading it".into()),
    };
    tracing::debug!(path = %path.display(), took_ms = started.elapsed().as_millis() as u64, "task store check finished");
    found
}

fn check(
    overlay: Overlay,
    commit: Option<u64>,
    shared: &Shared,
    stop: &AtomicBool,
) -> Result<Verification, String> {
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create_with_backend(overlay)
        .map_err(|e| format!("{e}"))?;
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let seen = txn
        .open_table(MARKS)
        .map_err(|e| e.to_string())?
        .get("commit")
        .map_err(|e| e.to_string())?
        .map(|v| v.value());
    if seen != commit {
        return Err(format!(
            "its newest commit fails its checksums (the engine fell back to commit {seen:?}, the store is at {commit:?})"
        ));
    }
    let tasks = txn.open_table(TASKS).map_err(|e| e.to_string())?;
    let (mut records, mut undecodable) = (0u64, 0u64);
    for (i, entry) in tasks.iter().map_err(|e| e.to_string())?.enumerate() {
        if i % STOP_EVERY == 0 && stop.load(Ordering::Relaxed) {
            return Ok(Verification::Stopped);
        }
        let (k, v) = entry.map_err(|e| e.to_string())?;
        records += 1;
        if let Err(e) = decode(k.value(), v.value()) {
            undecodable += 1;
            shared.undecodable(&e);
        }
    }
    Ok(Verification::Sound {
        records,
        undecodable,
    })
}

/// The file as it was at open, read-only: reads come from the file, except
/// the blocks this view has written (and the header, as read at open);
/// writes (the engine's repair) stay here. A read after a stop fails, which
/// ends the check.
#[derive(Debug)]
struct Overlay {
    file: std::fs::File,
    len: Mutex<u64>,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// What the live database overwrote since the snapshot.
    preserved: Snapshot,
    stop: Arc<AtomicBool>,
}

impl Overlay {
    /// The file as it was at the snapshot: read it, then put back what the
    /// live database overwrote since (kept before each overwrite, so a read
    /// that saw new bytes finds the old ones kept).
    fn read_base(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        read_at_or_zero(&self.file, offset, out)?;
        if out.is_empty() {
            return Ok(());
        }
        let end = offset + out.len() as u64;
        let slot = self.preserved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = slot.as_ref() else {
            return Err(std::io::Error::other("the check's snapshot is gone"));
        };
        if p.overflowed {
            return Err(std::io::Error::other("the check's snapshot overflowed"));
        }
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            if let Some(data) = p.blocks.get(&b) {
                patch(out, offset, b, data);
            }
        }
        Ok(())
    }
}

/// Copies the part of block `b` (`data`) that overlaps `out` (at `offset`).
fn patch(out: &mut [u8], offset: u64, b: u64, data: &[u8]) {
    let end = offset + out.len() as u64;
    let start = (b * BLOCK).max(offset);
    let stop = ((b + 1) * BLOCK).min(end);
    out[(start - offset) as usize..(stop - offset) as usize]
        .copy_from_slice(&data[(start - b * BLOCK) as usize..(stop - b * BLOCK) as usize]);
}

impl StorageBackend for Overlay {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(*self.len.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the store closed"));
        }
        if out.is_empty() {
            return Ok(());
        }
        self.read_base(offset, out)?;
        let end = offset + out.len() as u64;
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for (&b, data) in blocks.range(offset / BLOCK..=(end - 1) / BLOCK) {
            patch(out, offset, b, data);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        *self.len.lock().unwrap_or_else(|e| e.into_inner()) = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            let mut block = match self
                .blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&b)
            {
                Some(block) => block,
                None => {
                    let mut fresh = vec![0u8; BLOCK as usize].into_boxed_slice();
                    self.read_base(b * BLOCK, &mut fresh)?;
                    fresh
                }
            };
            let start = (b * BLOCK).max(offset);
            let stop = ((b + 1) * BLOCK).min(end);
            block[(start - b * BLOCK) as usize..(stop - b * BLOCK) as usize]
                .copy_from_slice(&data[(start - offset) as usize..(stop - offset) as usize]);
            self.blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(b, block);
        }
        Ok(())
    }
}
