//! The decision records staged in the store's own transaction (table
//! `pending_records`, seq → row): written by the batch whose inserts carry
//! them, so one commit (one fsync) makes a task and its record durable;
//! dropped once the log's file holds them; replayed into it at open.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::logged::Txn;
use super::{DbResult, RedbStore, guarded};
use crate::tasks::StoreError;
use crate::tasks::journal::{Journal, Record, Staged};

/// Staged decision records by seq: the rows the journal returned.
pub(super) const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending_records");

/// Seals `records` into the journal's chain (queued for its file) and
/// keeps their rows in `txn`. `Err(Ok(why))`: the journal refused (nothing
/// staged); `Err(Err(e))`: the rows could not be written (the batch fails).
pub(super) fn stage(
    txn: &Txn,
    journal: &dyn Journal,
    records: Vec<Record>,
) -> Result<(), Result<String, StoreError>> {
    let staged = journal.stage(records).map_err(Ok)?;
    let mut table = txn.open(PENDING).map_err(Err)?;
    for s in &staged {
        table.insert(s.seq, s.row.as_slice()).db().map_err(Err)?;
    }
    Ok(())
}

/// Drops the rows at or below `durable` (the log's file holds them).
pub(super) fn drop_durable(txn: &Txn, durable: u64) -> Result<(), StoreError> {
    let mut table = txn.open(PENDING)?;
    loop {
        let first = table.first().db()?.map(|(k, _)| k.value());
        match first {
            Some(seq) if seq <= durable => {
                table.remove(seq).db()?;
            }
            _ => return Ok(()),
        }
    }
}

impl RedbStore {
    /// At open, before the store takes requests with records: hands the
    /// rows a crash left to `journal` to put back into its file, then drops
    /// those the file now holds. Blocking.
    pub(in crate::tasks) fn replay_pending(&self, journal: &dyn Journal) -> Result<(), StoreError> {
        let db = &self.inner.db;
        let rows = {
            let txn = db.begin_read().db()?;
            match txn.open_table(PENDING) {
                Ok(table) => {
                    let mut rows = Vec::new();
                    for entry in table.iter().db()? {
                        let (k, v) = entry.db()?;
                        rows.push(Staged {
                            seq: k.value(),
                            row: v.value().to_vec(),
                        });
                    }
                    rows
                }
                Err(TableError::TableDoesNotExist(_)) => Vec::new(),
                Err(e) => return Err(StoreError::Db(e.to_string())),
            }
        };
        if rows.is_empty() {
            return Ok(());
        }
        let count = rows.len();
        let mut rewrite = |old: &[u64], new: &[Staged]| -> Result<(), String> {
            let write = || -> Result<(), StoreError> {
                let mut wal = self.inner.wal.lock();
                let txn = wal.begin(db)?;
                {
                    let mut table = txn.open(PENDING)?;
                    for seq in old {
                        table.remove(*seq).db()?;
                    }
                    for s in new {
                        table.insert(s.seq, s.row.as_slice()).db()?;
                    }
                }
                wal.commit(txn)
            };
            guarded(&self.inner.path, write).map_err(|e| e.to_string())
        };
        journal.replay(rows, &mut rewrite).map_err(|why| {
            StoreError::Db(format!(
                "{}: replaying {count} staged decision record(s) into the decision log: {why}",
                self.inner.path.display()
            ))
        })?;
        guarded(&self.inner.path, || {
            let mut wal = self.inner.wal.lock();
            let txn = wal.begin(db)?;
            drop_durable(&txn, journal.durable_seq())?;
            wal.commit(txn)
        })
    }
}
