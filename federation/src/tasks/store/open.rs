//! Opening the embedded store soundly: redb's integrity check inside a
//! panic guard, the store's marks against its witness, and the in-memory
//! state rebuilt from the records (counts, the idempotency index); the
//! decision log's head it records, read also without opening it.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::idempotency::IdemIndex;
use super::{DbResult, LEGACY_IDEMPOTENCY, MARKS, META, META_LOG_HEAD, TASKS, decode};
use crate::tasks::witness::{self, Mark};
use crate::tasks::{Counts, StoreError};

/// The task store's file in its data directory.
pub const FILE: &str = "tasks.redb";

/// What to tell an operator whose store is damaged.
pub(super) const DAMAGED_HINT: &str = "run `federation store check DATA_DIR` for a report; to rebuild the store from the newest snapshot a peer holds of this region, see `federation store recover` (README, Operations: a lost or damaged disk)";

/// Runs `f` (which reads the database file at `path`), turning a panic of
/// the storage engine into [`StoreError::Damaged`].
pub(crate) fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(damaged(
                path,
                format!("the storage engine panicked reading it ({msg})"),
            ))
        }
    }
}

pub(crate) fn damaged(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        what: what.into(),
        hint: DAMAGED_HINT.into(),
    }
}

/// Opens the database with redb's integrity check (every page checksum of
/// the committed trees verified), so a file altered outside redb is an
/// error rather than trusted; maps redb's errors to ours.
pub(crate) fn open_checked(path: &Path) -> Result<Database, StoreError> {
    let mut builder = redb::Builder::new();
    builder.set_check_integrity_on_open(true);
    builder.create(path).map_err(|e| open_error(path, e))
}

pub(super) fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        D::DatabaseAlreadyOpen => StoreError::Db(format!(
            "{}: in use by another process (is a controller running on this data directory?)",
            path.display()
        )),
        D::Storage(S::Corrupted(why)) => damaged(path, format!("corrupted ({why})")),
        D::Storage(S::Io(io)) if io.kind() == std::io::ErrorKind::InvalidData => {
            damaged(path, format!("not a readable task store ({io})"))
        }
        D::UpgradeRequired(v) => damaged(
            path,
            format!("written in storage format {v}, which this version cannot read"),
        ),
        other => StoreError::Db(format!("opening {}: {other}", path.display())),
    }
}

/// Compares the store's marks with its witness file; returns the marks the
/// store continues from.
pub(super) fn check_witness(
    dir: &Path,
    path: &Path,
    stored: Option<Mark>,
    records: u64,
    accept_loss: bool,
) -> Result<Mark, StoreError> {
    // A store from before the marks were kept counts what it holds.
    let mark = stored.unwrap_or(Mark {
        commit: 0,
        created: records,
    });
    let found = match witness::read(dir) {
        Ok(found) => found,
        Err(e) if accept_loss => {
            tracing::warn!(error = %e, "the task store's witness cannot be read; accepted, a new one is written");
            None
        }
        Err(e) => {
            return Err(StoreError::Damaged {
                path: dir.join(witness::FILE).display().to_string(),
                what: format!("the store's witness cannot be read ({e})"),
                hint: "check the store with `federation store check DATA_DIR`; if it is sound, `federation store accept DATA_DIR` writes a new witness".into(),
            });
        }
    };
    let Some(loss) = witness::compare(mark, records, found) else {
        if found.is_none() {
            witness::write(dir, mark).map_err(|e| StoreError::Db(e.to_string()))?;
            tracing::info!(path = %dir.join(witness::FILE).display(), commit = mark.commit, created = mark.created, "task store witness started");
        }
        return Ok(mark);
    };
    if accept_loss {
        tracing::warn!(path = %path.display(), loss = %loss, "task store lost acknowledged work; accepted, the witness restarts from what the store holds");
        let mark = Mark {
            commit: mark.commit.max(loss.witness.commit),
            created: records,
        };
        witness::write(dir, mark).map_err(|e| StoreError::Db(e.to_string()))?;
        return Ok(mark);
    }
    Err(StoreError::Lost {
        path: path.display().to_string(),
        detail: loss.to_string(),
    })
}

pub(super) fn read_mark(db: &Database) -> Result<Option<Mark>, StoreError> {
    let txn = db.begin_read().db()?;
    let table = match txn.open_table(MARKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let commit = table.get("commit").db()?.map(|v| v.value());
    let created = table.get("created").db()?.map(|v| v.value());
    Ok(match (commit, created) {
        (Some(commit), Some(created)) => Some(Mark { commit, created }),
        _ => None,
    })
}

pub(super) fn write_mark(txn: &redb::WriteTransaction, mark: Mark) -> Result<(), StoreError> {
    let mut table = txn.open_table(MARKS).db()?;
    table.insert("commit", mark.commit).db()?;
    table.insert("created", mark.created).db()?;
    Ok(())
}

/// What [`rebuild`] finds.
pub(super) struct Rebuilt {
    pub(super) counts: Counts,
    pub(super) idem: IdemIndex,
    /// Task records, decodable or not.
    pub(super) records: u64,
    /// The marks kept in `marks`, if any.
    pub(super) stored: Option<Mark>,
    /// The records that do not decode.
    pub(super) undecodable: Vec<StoreError>,
}

/// Rebuilds the counters and the idempotency index from the `tasks` table
/// (every task carries its key), after taking over the index an earlier
/// version kept on disk, if any; counts the records and reads the marks.
pub(super) fn rebuild(db: &Database) -> Result<Rebuilt, StoreError> {
    let mut idem = IdemIndex::default();
    let legacy = {
        let txn = db.begin_read().db()?;
        match txn.open_table(LEGACY_IDEMPOTENCY) {
            Ok(table) => {
                for entry in table.iter().db()? {
                    let (k, v) = entry.db()?;
                    idem.committed.insert(k.value().into(), v.value().into());
                }
                true
            }
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(StoreError::Db(e.to_string())),
        }
    };
    let txn = db.begin_read().db()?;
    let table = txn.open_table(TASKS).db()?;
    let mut counts = Counts::default();
    // Keys are unique by construction (an insert with a known key stores
    // nothing); should two tasks ever share one, the oldest keeps it.
    let mut first: HashMap<Box<str>, (i64, Box<str>)> = HashMap::new();
    let mut records = 0u64;
    let mut undecodable = Vec::new();
    for entry in table.iter().db()? {
        let (k, v) = entry.db()?;
        records += 1;
        match decode(k.value(), v.value()) {
            Ok(t) => {
                counts.add(t.state(), 1);
                if !t.idempotency_key.is_empty()
                    && !idem.committed.contains_key(t.idempotency_key.as_str())
                {
                    let id: Box<str> = t.task_id.into();
                    let candidate = (t.created_unix_ms, id);
                    first
                        .entry(t.idempotency_key.into())
                        .and_modify(|held| {
                            if candidate < *held {
                                *held = candidate.clone();
                            }
                        })
                        .or_insert_with(|| candidate.clone());
                }
            }
            Err(e) => undecodable.push(e),
        }
    }
    drop(table);
    drop(txn);
    idem.committed
        .extend(first.into_iter().map(|(k, (_, id))| (k, id)));
    if legacy {
        let txn = db.begin_write().db()?;
        txn.delete_table(LEGACY_IDEMPOTENCY).db()?;
        txn.commit().db()?;
    }
    Ok(Rebuilt {
        counts,
        idem,
        records,
        stored: read_mark(db)?,
        undecodable,
    })
}

/// The decision log's head recorded in `db` (see [`TaskStore::log_head`]).
pub(super) fn log_head_in(db: &impl ReadableDatabase) -> Result<Option<(u64, String)>, StoreError> {
    let txn = db.begin_read().db()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let Some(v) = meta.get(META_LOG_HEAD).db()? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(v.value()).into_owned();
    let parsed = text
        .split_once(' ')
        .and_then(|(seq, hash)| Some((seq.parse::<u64>().ok()?, hash.to_string())));
    parsed
        .map(Some)
        .ok_or_else(|| StoreError::Db(format!("recorded log head is malformed: `{text}`")))
}

/// The decision log's head recorded in the store of `dir`, read without
/// opening the store for writing (for `federation audit verify`). Fails when
/// a running controller holds the store, or the file is damaged (a panic of
/// the storage engine becomes an error).
pub fn read_log_head(dir: &Path) -> Result<Option<(u64, String)>, StoreError> {
    let path = dir.join("tasks.redb");
    if !path.exists() {
        return Ok(None);
    }
    let read = std::panic::catch_unwind(|| {
        match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => log_head_in(&db),
            // Not closed cleanly (a crash, or a controller running): redb
            // must repair it before reading, which a read-only open cannot.
            // Repair a private copy instead; the original stays untouched.
            Err(first) => {
                let copy_dir = tempfile::tempdir()
                    .map_err(|e| StoreError::Db(format!("temporary directory: {e}")))?;
                let copy = copy_dir.path().join("tasks.redb");
                std::fs::copy(&path, &copy)
                    .map_err(|e| StoreError::Db(format!("copying {}: {e}", path.display())))?;
                let db = Database::create(&copy).map_err(|e| {
                    StoreError::Db(format!(
                        "opening {}: {first}; a repaired copy failed too: {e}",
                        path.display()
                    ))
                })?;
                log_head_in(&db)
            }
        }
    });
    read.unwrap_or_else(|_| {
        Err(StoreError::Db(format!(
            "{}: the storage engine failed reading it (damaged file?)",
            path.display()
        )))
    })
}
