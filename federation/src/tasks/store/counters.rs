//! The embedded store's counts by state, kept in its `counts` table and
//! moved in each batch's own transaction, so an open reads five numbers
//! instead of decoding every record. The table also names the commit it was
//! last moved in: counts behind the store's `commit` mark were left behind
//! by a version that did not keep them, and are rebuilt. Beside them, the
//! newest creation time of a task created in the store (`newest_created_ms`,
//! the start-up fence's boundary when the clock is behind it).

use redb::{ReadableDatabase, TableDefinition};

use super::DbResult;
use crate::tasks::shared::Change;
use crate::tasks::{Counts, StoreError};

/// State name (and `commit`) → count.
pub(super) const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
const COMMIT: &str = "commit";
const NEWEST_CREATED: &str = "newest_created_ms";

/// What the table holds.
pub(super) struct Kept {
    pub(super) counts: Counts,
    /// The commit they were last moved in.
    pub(super) commit: u64,
    /// The newest `created_unix_ms` of a task created in the store (none:
    /// written by a version that did not keep it).
    pub(super) newest_created: Option<i64>,
}

/// The counts and the commit they were moved in, when the table has them.
pub(super) fn read(db: &redb::Database) -> Result<Option<Kept>, StoreError> {
    let txn = db.begin_read().db()?;
    let table = match txn.open_table(COUNTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let get =
        |k: &str| -> Result<Option<u64>, StoreError> { Ok(table.get(k).db()?.map(|v| v.value())) };
    let Some(commit) = get(COMMIT)? else {
        return Ok(None);
    };
    let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let counts = Counts {
        queued: narrow(get("queued")?.unwrap_or(0)),
        leased: narrow(get("leased")?.unwrap_or(0)),
        succeeded: get("succeeded")?.unwrap_or(0),
        failed: get("failed")?.unwrap_or(0),
        cancelled: get("cancelled")?.unwrap_or(0),
    };
    let newest_created = get(NEWEST_CREATED)?.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    Ok(Some(Kept {
        counts,
        commit,
        newest_created,
    }))
}

/// Writes `counts` as of `commit`, and `newest_created`, in `txn`.
pub(super) fn write(
    txn: &super::logged::Txn,
    counts: Counts,
    commit: u64,
    newest_created: i64,
) -> Result<(), StoreError> {
    let mut table = txn.open(COUNTS)?;
    for (k, v) in [
        ("queued", u64::from(counts.queued)),
        ("leased", u64::from(counts.leased)),
        ("succeeded", counts.succeeded),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
        (COMMIT, commit),
        (NEWEST_CREATED, u64::try_from(newest_created).unwrap_or(0)),
    ] {
        table.insert(k, v).db()?;
    }
    Ok(())
}

/// `counts` moved by a batch's changes (what [`crate::tasks::shared::Shared`]
/// applies in memory once the batch commits).
pub(super) fn after(mut counts: Counts, changes: &[Change]) -> Counts {
    for c in changes {
        if let Some(b) = c.before {
            counts.add(b, -1);
        }
        counts.add(c.after, 1);
    }
    counts
}
