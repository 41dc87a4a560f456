//! The journal an insert's decision record goes to: a trait the store is
//! bound to once, right after open ([`super::TaskStore::bind_journal`]), and its one
//! implementation, the region's decision log ([`crate::audit::DecisionLog`]).
//! The store names the task in each record; it never builds one.

use futures::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};

/// A decision record as the store carries it: rendered by the caller, named
/// after the task the insert produced, appended by the journal.
pub type Record = crate::audit::Prepared;

/// A journal's head after an append in the database: seq and hash.
pub type Head = (u64, String);

/// A record sealed into the journal's chain, kept in the embedded store's
/// transaction until the journal's file holds it.
pub type Staged = crate::audit::Staged;

/// Where the store's inserts append their records: staged in the same
/// transaction (the embedded store: sealed into the chain, the rows
/// committed with the tasks, the log's file written and synced after,
/// off the submit's path) or appended in the same transaction (the
/// PostgreSQL store).
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// Seals `records` into the chain and queues them for the journal's
    /// file without waiting; the embedded store's writer keeps the rows in
    /// its transaction, so one commit makes the tasks and their records
    /// durable together.
    fn stage(&self, records: Vec<Record>) -> Result<Vec<Staged>, String>;

    /// The seq of the last record durable in the journal's own file: rows
    /// at or below it may be dropped.
    fn durable_seq(&self) -> u64;

    /// At open, before anything is appended: puts into the journal's file
    /// the staged records a crash left only in the rows (`rewrite(old seqs,
    /// new rows)` is called first when records had to be sealed again).
    fn replay(
        &self,
        rows: Vec<Staged>,
        rewrite: &mut crate::audit::Rewrite<'_>,
    ) -> Result<(), String>;

    /// Prepares the statement of [`Journal::append`] on `txn`'s
    /// connection (cached: a round trip the first time only), so that it
    /// is sent at its first poll. The PostgreSQL store's writer calls it
    /// before BEGIN.
    fn prepare<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
    ) -> BoxFuture<'a, Result<(), tokio_postgres::Error>>;

    /// Appends `records` to the chain inside the transaction open on `txn`
    /// (the database locks the head until the transaction ends and seals
    /// them after it; durable when it commits) in one statement, sent at
    /// the first poll so the writer pipelines its COMMIT behind it. Returns
    /// the new head (`None`, nothing sent, for no records).
    fn append<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>>;

    /// Prepares [`Journal::append_checked`]'s statement for `insert` on
    /// `txn`'s connection (cached: a round trip the first time only).
    fn prepare_checked<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        insert: &'static str,
        insert_types: &'static [Type],
    ) -> BoxFuture<'a, Result<(), tokio_postgres::Error>>;

    /// [`Journal::append`] in one statement with `insert` (an `INSERT …
    /// RETURNING` of the tasks the records name, `$1` the region, its
    /// parameters `insert_params`): the records are appended only if it
    /// created `expected` rows, else the statement fails (SQLSTATE
    /// [`crate::audit::postgres::NOT_ALL_CREATED`]) and aborts the
    /// transaction. Sent at the first poll.
    fn append_checked<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        records: &'a [Record],
        insert: &'static str,
        insert_types: &'static [Type],
        insert_params: &'a [&'a (dyn ToSql + Sync)],
        expected: i64,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>>;

    /// The transaction that appended up to `head` committed.
    fn committed(&self, head: Head);
}

impl Journal for crate::audit::DecisionLog {
    fn stage(&self, records: Vec<Record>) -> Result<Vec<Staged>, String> {
        crate::audit::DecisionLog::stage(self, records).map_err(|e| e.to_string())
    }

    fn durable_seq(&self) -> u64 {
        self.last().0
    }

    fn replay(
        &self,
        rows: Vec<Staged>,
        rewrite: &mut crate::audit::Rewrite<'_>,
    ) -> Result<(), String> {
        self.replay_staged(rows, rewrite)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn prepare<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
    ) -> BoxFuture<'a, Result<(), tokio_postgres::Error>> {
        Box::pin(crate::audit::postgres::prepare(txn))
    }

    fn append<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>> {
        Box::pin(crate::audit::postgres::append(txn, self.region(), records))
    }

    fn prepare_checked<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        insert: &'static str,
        insert_types: &'static [Type],
    ) -> BoxFuture<'a, Result<(), tokio_postgres::Error>> {
        Box::pin(crate::audit::postgres::prepare_checked(
            txn,
            insert,
            insert_types,
        ))
    }

    fn append_checked<'a>(
        &'a self,
        txn: &'a deadpool_postgres::ClientWrapper,
        records: &'a [Record],
        insert: &'static str,
        insert_types: &'static [Type],
        insert_params: &'a [&'a (dyn ToSql + Sync)],
        expected: i64,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>> {
        Box::pin(crate::audit::postgres::append_checked(
            txn,
            self.region(),
            records,
            insert,
            insert_types,
            insert_params,
            expected,
        ))
    }

    fn committed(&self, head: Head) {
        self.advance(head.0, &head.1);
    }
}
