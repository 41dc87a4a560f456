//! One write transaction of the embedded store with its row changes
//! recorded (table, redb's key and value bytes, set or remove) for the
//! write-ahead log (`wal`, which frames and replays them): reads through
//! the tables, writes only through [`Logged`]. Knows no file.

use std::cell::RefCell;

use redb::{Key, StorageError, TableDefinition, Value, WriteTransaction};

use super::DbResult;
use crate::tasks::StoreError;

/// A write transaction whose row changes are recorded for the log.
pub(super) struct Txn {
    pub(super) txn: WriteTransaction,
    log: RefCell<Vec<u8>>,
}

impl Txn {
    /// A transaction whose changes are recorded (committed through
    /// [`State::commit`]), or, for the durable writes of open, discarded.
    pub(super) fn new(txn: WriteTransaction) -> Self {
        Self {
            txn,
            log: RefCell::new(Vec::new()),
        }
    }

    /// Opens `def` in this transaction; its writes are recorded.
    pub(super) fn open<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Logged<'_, K, V>, StoreError> {
        use redb::TableHandle;
        Ok(Logged {
            table: self.txn.open_table(def).db()?,
            name: def.name().to_string(),
            log: &self.log,
        })
    }

    /// Commits with fsync (open's own writes; nothing goes to the log).
    pub(super) fn commit_durable(self) -> Result<(), StoreError> {
        self.txn.commit().db()
    }

    /// The transaction and its recorded changes (the log's entries).
    pub(super) fn into_parts(self) -> (WriteTransaction, Vec<u8>) {
        (self.txn, self.log.into_inner())
    }
}

/// A table opened in a [`Txn`]: reads through `Deref`, writes recorded.
pub(super) struct Logged<'t, K: Key + 'static, V: Value + 'static> {
    table: redb::Table<'t, K, V>,
    name: String,
    log: &'t RefCell<Vec<u8>>,
}

impl<'t, K: Key + 'static, V: Value + 'static> std::ops::Deref for Logged<'t, K, V> {
    type Target = redb::Table<'t, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> Logged<'t, K, V> {
    /// `table`, its writes recorded in `log` under `name`.
    #[cfg(test)]
    pub(super) fn new(table: redb::Table<'t, K, V>, name: &str, log: &'t RefCell<Vec<u8>>) -> Self {
        Self {
            table,
            name: name.to_string(),
            log,
        }
    }

    fn record(&self, kind: u8, key: &[u8], value: Option<&[u8]>) {
        let mut log = self.log.borrow_mut();
        log.push(self.name.len() as u8);
        log.extend_from_slice(self.name.as_bytes());
        log.push(kind);
        log.extend_from_slice(&(key.len() as u32).to_le_bytes());
        log.extend_from_slice(key);
        if let Some(v) = value {
            log.extend_from_slice(&(v.len() as u32).to_le_bytes());
            log.extend_from_slice(v);
        }
    }

    /// [`redb::Table::insert`], recorded.
    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<Option<redb::AccessGuard<'_, V>>, StorageError> {
        self.record(
            0,
            K::as_bytes(key.borrow()).as_ref(),
            Some(V::as_bytes(value.borrow()).as_ref()),
        );
        self.table.insert(key, value)
    }

    /// [`redb::Table::remove`], recorded.
    pub(super) fn remove<'k>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
    ) -> Result<Option<redb::AccessGuard<'_, V>>, StorageError> {
        self.record(1, K::as_bytes(key.borrow()).as_ref(), None);
        self.table.remove(key)
    }
}
