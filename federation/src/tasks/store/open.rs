//! Opening the embedded store soundly and in O(1): redb's open (its repair
//! after a crash) inside a panic guard, the store's marks against its
//! witness, the persisted counts read (and, once, for a store written by an
//! earlier version, the persisted indexes rebuilt from the records, and the
//! newest creation time computed); the
//! decision log's head it records, read also without opening it.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::counters;
use super::idempotency::IDEM_KEYS;
use super::preserving::{Preserving, SnapshotSlot};
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
/// error rather than trusted; maps redb's errors to ours. The offline
/// check's open (a controller's open is [`open_lazy`]).
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
        // InvalidData: bytes that do not decode; UnexpectedEof: the file's
        // own structure points past its end (damaged or cut short).
        D::Storage(S::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            damaged(path, format!("not a readable task store ({io})"))
        }
        D::UpgradeRequired(v) => damaged(
            path,
            format!("written in storage format {v}, which this version cannot read"),
        ),
        other => StoreError::Db(format!("opening {}: {other}", path.display())),
    }
}

/// A redb error met opening the tables: one that says the file does not
/// hold what this store wrote is damage, anything else a database error.
pub(super) fn classify(path: &Path, e: redb::Error) -> StoreError {
    use redb::Error as E;
    match e {
        E::Corrupted(_)
        | E::TableTypeMismatch { .. }
        | E::TypeDefinitionChanged { .. }
        | E::TableIsMultimap(_)
        | E::TableIsNotMultimap(_) => damaged(path, format!("its tables do not read back ({e})")),
        other => StoreError::Db(other.to_string()),
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

pub(super) fn write_mark(txn: &super::logged::Txn, mark: Mark) -> Result<(), StoreError> {
    let mut table = txn.open(MARKS)?;
    table.insert("commit", mark.commit).db()?;
    table.insert("created", mark.created).db()?;
    Ok(())
}

/// Opens the database for a controller, through the backend that lets the
/// background check (`verify`) see the file as of its snapshot. No integrity
/// check here: redb still verifies every checksum and repairs the file when
/// it was not closed cleanly (a crash); a clean open reads only the header
/// and the allocator state. The check of the whole file runs after open.
pub(super) fn open_lazy(path: &Path) -> Result<(Database, SnapshotSlot), StoreError> {
    let (backend, slot) = Preserving::open(path)
        .map_err(|e| StoreError::Db(format!("opening {}: {e}", path.display())))?;
    let db = redb::Builder::new()
        .create_with_backend(backend)
        .map_err(|e| open_error(path, e))?;
    Ok((db, slot))
}

/// What an open finds: O(1) reads of the persisted counts and marks.
pub(super) struct Loaded {
    pub(super) counts: Counts,
    /// Task records, decodable or not (the table's length).
    pub(super) records: u64,
    /// The marks kept in `marks`, if any.
    pub(super) stored: Option<Mark>,
    /// Records found undecodable by a one-time rebuild of the indexes.
    pub(super) undecodable: Vec<StoreError>,
    /// The newest creation time of a task created in the store (0: none).
    pub(super) newest_created: i64,
}

/// Reads the counts and marks; when the counts are missing or behind the
/// `commit` mark (a store written by an earlier version), or an earlier
/// version's on-disk key table is there, rebuilds the persisted indexes
/// once from the records, and says so in the log.
pub(super) fn load(db: &Database, path: &Path) -> Result<Loaded, StoreError> {
    let stored = read_mark(db)?;
    let records = {
        let txn = db.begin_read().db()?;
        txn.open_table(TASKS).db()?.len().db()?
    };
    let legacy = has_legacy_keys(db)?;
    let kept = counters::read(db)?;
    // Counts of the commit the marks name, and the newest creation time
    // beside them (a version before it did not keep that).
    let current = match (kept, stored) {
        (Some(k), Some(mark)) if k.commit == mark.commit => k.newest_created.map(|n| (k.counts, n)),
        (Some(k), None) if records == 0 => Some((k.counts, k.newest_created.unwrap_or(0))),
        _ => None,
    };
    if let (Some((counts, newest_created)), false) = (current, legacy) {
        return Ok(Loaded {
            counts,
            records,
            stored,
            undecodable: Vec::new(),
            newest_created,
        });
    }
    let started = std::time::Instant::now();
    let commit = stored.map_or(0, |m| m.commit);
    let rebuilt = rebuild_indexes(db, commit)?;
    if records > 0 {
        tracing::info!(path = %path.display(), records, keys = rebuilt.keys, undecodable = rebuilt.undecodable.len(), took_ms = started.elapsed().as_millis() as u64, "task store indexes rebuilt once from the records (a store written by an earlier version)");
    }
    Ok(Loaded {
        counts: rebuilt.counts,
        records,
        stored,
        undecodable: rebuilt.undecodable,
        newest_created: rebuilt.newest_created,
    })
}

/// What [`rebuild_indexes`] found.
struct Rebuilt {
    counts: Counts,
    /// Idempotency keys indexed.
    keys: u64,
    undecodable: Vec<StoreError>,
    newest_created: i64,
}

fn has_legacy_keys(db: &Database) -> Result<bool, StoreError> {
    let txn = db.begin_read().db()?;
    match txn.open_table(LEGACY_IDEMPOTENCY) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(StoreError::Db(e.to_string())),
    }
}

/// Rebuilds the counts and the idempotency keys from the `tasks` table
/// (every task carries its key), after taking over the keys an earlier
/// version kept in its `idempotency` table, in one write transaction that
/// also drops that table. Returns the counts, how many keys are indexed,
/// the records that do not decode and the newest creation time of a task
/// created here (not taken over).
fn rebuild_indexes(db: &Database, commit: u64) -> Result<Rebuilt, StoreError> {
    let logged = super::logged::Txn::new(db.begin_write().db()?);
    let txn = &logged.txn;
    let mut counts = Counts::default();
    let mut undecodable = Vec::new();
    let mut newest_created = 0i64;
    let keys = {
        let tasks = txn.open_table(TASKS).db()?;
        let mut index = txn.open_table(IDEM_KEYS).db()?;
        index.retain(|_, _| false).db()?;
        if has_legacy_keys(db)? {
            let legacy = txn.open_table(LEGACY_IDEMPOTENCY).db()?;
            for entry in legacy.iter().db()? {
                let (k, v) = entry.db()?;
                index.insert(k.value(), v.value()).db()?;
            }
        }
        // Keys are unique by construction (an insert with a known key stores
        // nothing); should two tasks ever share one, the oldest keeps it.
        let mut first: HashMap<String, (i64, String)> = HashMap::new();
        for entry in tasks.iter().db()? {
            let (k, v) = entry.db()?;
            match decode(k.value(), v.value()) {
                Ok(t) => {
                    counts.add(t.state(), 1);
                    if t.taken_over.is_none() {
                        newest_created = newest_created.max(t.created_unix_ms);
                    }
                    if t.idempotency_key.is_empty()
                        || index.get(t.idempotency_key.as_str()).db()?.is_some()
                    {
                        continue;
                    }
                    let candidate = (t.created_unix_ms, t.task_id);
                    first
                        .entry(t.idempotency_key)
                        .and_modify(|held| {
                            if candidate < *held {
                                *held = candidate.clone();
                            }
                        })
                        .or_insert_with(|| candidate.clone());
                }
                Err(e) => undecodable.push(e),
            }
        }
        for (key, (_, id)) in &first {
            index.insert(key.as_str(), id.as_str()).db()?;
        }
        index.len().db()?
    };
    match txn.delete_table(LEGACY_IDEMPOTENCY) {
        Ok(_) => {}
        Err(e) => return Err(StoreError::Db(e.to_string())),
    }
    counters::write(&logged, counts, commit, newest_created)?;
    logged.commit_durable()?;
    Ok(Rebuilt {
        counts,
        keys,
        undecodable,
        newest_created,
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
    // Frames of the write-ahead log the file may lack: read a copy with
    // them applied.
    let logged = std::fs::metadata(dir.join(super::WAL_FILE)).is_ok_and(|m| m.len() > 0);
    let read = std::panic::catch_unwind(|| {
        let opened = if logged {
            Err(redb::DatabaseError::RepairAborted)
        } else {
            redb::ReadOnlyDatabase::open(&path)
        };
        match opened {
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
                super::replay_into(dir, &db)?;
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
