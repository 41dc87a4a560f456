//! The journal an insert's decision record goes to: a trait the store is
//! bound to once, right after open ([`super::TaskStore::bind_journal`]), and its one
//! implementation, the region's decision log ([`crate::audit::DecisionLog`]).
//! The store names the task in each record; it never builds one.

use futures::future::BoxFuture;

/// A decision record as the store carries it: rendered by the caller, named
/// after the task the insert produced, appended by the journal.
pub type Record = crate::audit::Prepared;

/// A journal's head after an append in the database: seq and hash.
pub type Head = (u64, String);

/// Where the store's inserts append their records, in the same batch (the
/// embedded store: written and synced while the batch commits) or in the
/// same transaction (the PostgreSQL store).
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// Hands `records` over as one append (one write, one sync); the
    /// receipt tells when they are durable. The embedded store's writer
    /// calls it before its commit and waits after it.
    fn append_batch(&self, records: Vec<Record>) -> Receipt;

    /// Appends `records` inside `txn` (durable when it commits): the
    /// PostgreSQL store's writer, for the records of its batch. Returns the
    /// new head (`None` for no records).
    fn append_in<'a>(
        &'a self,
        txn: &'a tokio_postgres::Transaction<'a>,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>>;

    /// The transaction that appended up to `head` committed.
    fn committed(&self, head: Head);
}

/// An append handed to a journal: [`Receipt::wait`] blocks until it is
/// durable (from the store's writer thread, never an async worker).
pub struct Receipt(Box<dyn FnOnce() -> Result<(), String> + Send>);

impl Receipt {
    /// A receipt whose wait is `wait`.
    pub fn new(wait: impl FnOnce() -> Result<(), String> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// Blocks until the append is durable; the journal's error otherwise.
    pub fn wait(self) -> Result<(), String> {
        (self.0)()
    }
}

impl Journal for crate::audit::DecisionLog {
    fn append_batch(&self, records: Vec<Record>) -> Receipt {
        let receipt = self.append(crate::audit::Batch::from(records));
        Receipt::new(move || receipt.wait().map(|_| ()).map_err(|e| e.to_string()))
    }

    fn append_in<'a>(
        &'a self,
        txn: &'a tokio_postgres::Transaction<'a>,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>> {
        Box::pin(crate::audit::postgres::append_records(
            txn,
            self.region(),
            records,
        ))
    }

    fn committed(&self, head: Head) {
        self.advance(head.0, &head.1);
    }
}
