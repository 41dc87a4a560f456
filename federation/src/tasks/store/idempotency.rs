//! The embedded store's idempotency index: the `idempotency_keys` table
//! (key → task id), written in the insert's own transaction, so it is on
//! disk, never loaded whole, and as durable as the task it names.

use redb::{ReadableTable, TableDefinition};

use super::DbResult;
use super::logged::Logged;
use crate::tasks::StoreError;

/// Idempotency key → task id. Built once from the task records for a store
/// written by an earlier version (see `open::rebuild_indexes`).
pub(super) const IDEM_KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");

/// The index inside one write transaction: a key staged by an insert is
/// seen by the later requests of its batch, and vanishes with the batch
/// when its transaction aborts.
pub(super) struct IdemIndex<'t> {
    pub(super) table: Logged<'t, &'static str, &'static str>,
}

impl IdemIndex<'_> {
    pub(super) fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.table.get(key).db()?.map(|v| v.value().to_string()))
    }

    pub(super) fn stage(&mut self, key: &str, id: &str) -> Result<(), StoreError> {
        self.table.insert(key, id).db()?;
        Ok(())
    }
}
