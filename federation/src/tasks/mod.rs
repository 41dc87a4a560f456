//! The durable task store of one region: every task this region owns, its
//! lifecycle (queued → leased → succeeded / failed / cancelled) and its leases.
//!
//! What it owns: the file `<data_dir>/tasks.redb` (an embedded transactional
//! [redb] database) and its write-ahead log `tasks.wal`, the task records in it (`federation_api::Task`, encoded
//! with prost), the indexes over them, and the in-memory counters and change
//! feed derived from them. What it must not touch: routing, residency, peers,
//! the network, snapshots. The controller decides *where* a task goes; this
//! module only makes sure that a task it acknowledged is never lost.
//!
//! # Guarantees
//!
//! * **Durable before acknowledged.** Every mutating call returns only after
//!   the write transaction holding it is durable: its row changes are one
//!   frame of the write-ahead log `<data_dir>/tasks.wal` (one write, one
//!   `fdatasync`), and only then is the transaction committed to redb,
//!   without fsync (visible to readers at once). A checkpoint (a durable
//!   redb commit naming the last frame it holds) runs between batches, by
//!   size and age of the frames since the last one; open applies the frames
//!   after it. A torn frame at the log's end (a crash mid-write) ends the
//!   log; a damaged frame followed by valid ones is refused
//!   ([`StoreError::Damaged`] naming the file and the byte). A task whose
//!   `insert` returned survives `SIGKILL` and power loss (see the crash
//!   tests, also with a checkpoint after every batch).
//! * **Group commit.** All mutations go through one writer thread. It takes
//!   every request waiting in its queue (up to [`MAX_BATCH`]), applies them in
//!   one write transaction in arrival order, commits once, then answers each
//!   caller. Under load many callers share one fsync, and the writer lingers
//!   up to half a millisecond for requests still arriving
//!   ([`crate::group_commit`]); at one request in flight the cost is one
//!   fsync per request and no wait.
//! * **Decision records in the same batch.** [`TaskStore::insert_recorded`]
//!   carries the routing decision's log record with the insert: the writer
//!   renames it to the task the insert produced (the stored one when the key
//!   was known), hands the batch's records to the store's journal in one
//!   append while the transaction commits, and answers once both are
//!   durable. One wait, one wake-up per caller. The journal (the decision
//!   log, behind the small trait [`Journal`]) is bound to the store once,
//!   right after open ([`TaskStore::bind_journal`]); the store never builds
//!   records, it only names the task in them.
//! * **Idempotency.** A non-empty `idempotency_key` that is already known, or a
//!   `task_id` that is already stored (a retried `ForwardTask`), returns
//!   [`InsertOutcome::Deduplicated`] with the stored task and stores nothing;
//!   a known key with other attributes or another payload is refused
//!   ([`StoreError::KeyReused`], naming what differs).
//! * **At-least-once execution with leases.** An agent leases queued tasks for
//!   a TTL and must renew before the deadline. A lease past its deadline is
//!   taken back by [`TaskStore::expire_leases`] (the task is queued again, its
//!   `attempts` kept) until `attempts` reaches the limit, when the task fails
//!   with `lease expired N times (agent lost)`. An agent that was slow but not
//!   dead may therefore run a task twice; commands must be idempotent or
//!   tolerate it. Only the current lease holder may renew or complete.
//!   Cancelling a leased task makes the holder's next renew or complete fail
//!   with [`StoreError::Terminal`], which tells the agent to stop.
//! * **Leases survive a restart.** Leases are keyed by agent id, and the
//!   agents' registrations ([`AgentRecord`]) are stored with them: forgetting
//!   an agent ([`TaskStore::forget_agent`]) removes its record and queues its
//!   leased tasks again in one transaction, so a lease is never held by an
//!   agent the store does not know. After a restart the controller calls
//!   [`TaskStore::extend_leases`]: the time it was down does not count
//!   against a lease.
//! * **Every mutation** bumps `version` and sets `updated_unix_ms`, and is
//!   published on [`TaskStore::subscribe`] after its commit.
//! * **A damaged store never panics and never loses silently.** The open
//!   reads no record: redb's open (which verifies every checksum and repairs
//!   the file after a crash) and a few persisted values, inside a panic
//!   guard; a table that does not read back is [`StoreError::Damaged`]
//!   naming the file. The rest of the file is checked in the background
//!   right after open, without holding up start or writes: redb's integrity
//!   check (every page checksum of the committed trees) and a decode of every
//!   record, on a private view of the file as of the commit it opened at
//!   ([`RedbStore::verification`]: damage is logged at error level with what
//!   to do; undecodable records are listed). Every read and every batch runs
//!   inside a panic guard too, and every record is decoded and checked when
//!   it is read. The store's marks ([`witness::Mark`]: commits, tasks
//!   created) are kept in `marks` in the same transaction as the work, and
//!   copied after each commit to the witness file `tasks.hwm` ([`witness`]);
//!   a store below its witness lost acknowledged work and is refused with
//!   [`StoreError::Lost`] (unless [`StoreOptions::accept_loss`]). A record
//!   that does not decode is [`StoreError::Corrupt`] when asked for by id,
//!   and skipped and reported ([`TaskStore::undecodable`]) by every scan:
//!   the background check, leasing, expiry, snapshots. [`check`] verifies a
//!   stopped store offline, on a copy.
//!
//! # Layout
//!
//! | table              | key                              | value                  |
//! |--------------------|----------------------------------|------------------------|
//! | `tasks`            | task id                          | prost-encoded `Task`   |
//! | `queue`            | (−priority, created ms, task id) | `()` — QUEUED tasks    |
//! | `leases`           | (lease deadline ms, task id)     | agent id — LEASED tasks|
//! | `idempotency_keys` | idempotency key                  | task id                |
//! | `counts`           | state name, `commit`, `newest_created_ms` | u64 — tasks by state, the commit they were moved in, the newest creation time of a task created here |
//! | `agents`           | agent id                         | JSON [`AgentRecord`]   |
//! | `marks`            | `commit`, `created`              | u64 — the store's marks|
//!
//! Every index and the counts move in the same transaction as the records,
//! so an open reads them instead of the records (start-up and memory do not
//! grow with the number of tasks). A store written by an earlier version
//! (no `counts`, or counts naming an older commit than `marks`, or the
//! `idempotency` table of older versions still there) has its counts and
//! keys rebuilt from the records once, at its first open, which the log
//! says.
//!
//! Leasing walks `queue` from its start (highest priority, then oldest), so it
//! costs O(k log n) for k tasks; expiring walks `leases` up to now.
//!
//! [redb]: https://docs.rs/redb

mod check;
#[cfg(test)]
mod contract;
mod fence;
pub mod journal;
mod model;
pub mod postgres;
mod requests;
mod shared;
mod store;
#[cfg(test)]
mod tests;
mod transitions;
#[cfg(test)]
mod wal_tests;
pub mod witness;

use federation_api::Task;
use std::sync::Arc;

pub use check::{CheckReport, check, refuse_in_use};
pub use fence::LeaseFence;
pub use journal::Journal;
pub use model::{
    AgentRecord, BatchInsert, CancelOutcome, Clock, Counts, InsertOutcome, MAX_LEASE_BATCH,
    ManualClock, RecordState, RecordedInsert, StoreError, SystemClock, is_terminal, now_unix_ms,
    state_name, what_differs,
};
pub use postgres::{PgStore, Sibling};
pub use shared::ChangeSink;
pub use store::{
    Checkpoints, FILE, MAX_BATCH, RedbStore, StoreOptions, Verification, WAL_FILE, read_log_head,
    replay_wal,
};

/// Whether every clone of a store is gone ([`TaskStore::released`]).
pub struct Released(std::sync::Weak<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Released")
            .field("holders", &self.0.strong_count())
            .finish()
    }
}

impl Released {
    /// How many clones of the store are left.
    pub fn holders(&self) -> usize {
        self.0.strong_count()
    }

    /// Waits until no clone is left, at most `bound` (checked every 10 ms);
    /// whether none is.
    pub async fn wait(&self, bound: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + bound;
        while self.holders() > 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }
}

/// The task store seam: the embedded redb file ([`RedbStore`], the default)
/// or the region's PostgreSQL database ([`PgStore`], `node.store.backend:
/// postgres`), with one behaviour contract (the guarantees above; the
/// contract tests run against both). Cheap to clone.
#[derive(Debug, Clone)]
pub enum TaskStore {
    /// `<data_dir>/tasks.redb`.
    Redb(RedbStore),
    /// The region's rows in its PostgreSQL database.
    Postgres(PgStore),
}

/// Calls the same method on whichever backend `$store` is.
macro_rules! each {
    ($store:expr, $s:ident => $e:expr) => {
        match $store {
            TaskStore::Redb($s) => $e,
            TaskStore::Postgres($s) => $e,
        }
    };
}

impl TaskStore {
    /// Opens (creating if needed) the embedded store `<dir>/tasks.redb`
    /// ([`RedbStore::open`]).
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        RedbStore::open(dir).map(TaskStore::Redb)
    }

    /// [`TaskStore::open`] with options ([`RedbStore::open_with`]).
    pub fn open_with(dir: &std::path::Path, options: StoreOptions) -> Result<Self, StoreError> {
        RedbStore::open_with(dir, options).map(TaskStore::Redb)
    }

    /// Opens `region`'s store in the database `pg` ([`PgStore::open`]).
    pub fn open_postgres(
        pg: &crate::pg::Pg,
        region: &str,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        PgStore::open(pg, region, options.clock, options.writer_transactions)
            .map(TaskStore::Postgres)
    }

    /// The database file (for the PostgreSQL backend, a
    /// `postgres://host:port/db#tasks` name for messages).
    pub fn path(&self) -> &std::path::Path {
        each!(self, s => s.path())
    }

    /// A handle that tells when every clone of this store is gone, and so
    /// its resources with them (the embedded store's file, which another
    /// open needs; the database's pool).
    pub fn released(&self) -> Released {
        Released(match self {
            TaskStore::Redb(s) => s.weak(),
            TaskStore::Postgres(s) => s.weak(),
        })
    }

    /// True for the PostgreSQL backend.
    pub fn is_postgres(&self) -> bool {
        matches!(self, TaskStore::Postgres(_))
    }

    /// Binds the store to its journal (the region's decision log), once,
    /// right after open: [`TaskStore::insert_recorded`] and
    /// [`TaskStore::insert_batch`] append the records they carry there. A
    /// second binding is refused; a store never bound answers a carried
    /// record as failed ([`RecordState::Failed`]).
    pub fn bind_journal(&self, journal: Arc<dyn Journal>) -> Result<(), StoreError> {
        // The embedded store first puts back into the log what a crash left
        // only in its staged rows (blocking; before any append).
        if let TaskStore::Redb(s) = self {
            s.replay_pending(&*journal)?;
        }
        self.shared().bind_journal(journal)
    }

    /// Binds the store's change sink, once: it hears every change
    /// synchronously after its commit ([`ChangeSink`]), as subscribers to
    /// [`TaskStore::subscribe`] do later. A second binding is refused.
    pub fn bind_changes(&self, sink: Arc<dyn ChangeSink>) -> Result<(), StoreError> {
        self.shared().bind_sink(sink)
    }

    /// What the callers and the writer of whichever backend this is share.
    fn shared(&self) -> &shared::Shared {
        each!(self, s => s.shared())
    }

    /// The writer channel of whichever backend this is: every mutation.
    fn requests(&self) -> &requests::Requests {
        each!(self, s => s.requests())
    }

    /// Stores a new task, durably before it returns. If
    /// `task.idempotency_key` is non-empty and a task with that key exists,
    /// or a task with the same `task_id` exists, returns
    /// [`InsertOutcome::Deduplicated`] with it and stores nothing (a known
    /// key with other attributes or payload is [`StoreError::KeyReused`]).
    /// Sets state QUEUED, version 1, clears any lease, and sets
    /// `created_unix_ms` / `updated_unix_ms` when zero. `attempts`,
    /// `taken_over` and the rest are kept as given.
    pub async fn insert(&self, task: Task) -> Result<InsertOutcome, StoreError> {
        self.requests().insert(task).await
    }

    /// [`TaskStore::insert`] that also appends `record` to the store's
    /// journal ([`TaskStore::bind_journal`]), durable when the call returns:
    /// in the same batch as the insert (redb; the log's file is synced
    /// while the transaction commits) or in the same transaction
    /// (PostgreSQL). The record is renamed to the task the insert produced
    /// (the stored one when deduplicated); nothing is appended when the
    /// insert is refused; when the commit fails after the record was
    /// appended, [`RecordedInsert::record`] says so (the caller then appends
    /// a correcting record).
    pub async fn insert_recorded(&self, task: Task, record: journal::Record) -> RecordedInsert {
        self.requests().insert_recorded(task, Some(record)).await
    }

    /// Inserts `tasks` in one transaction (one commit, one fsync, the
    /// store's marks advanced once), each as [`TaskStore::insert`] would:
    /// deduplicated or refused on its own (`outcomes[i]` for `tasks[i]`). A
    /// storage error fails the whole batch and stores none of it. With
    /// `records` (`records[i]` for `tasks[i]`), the record of every task the
    /// batch created, named after it, is appended to the journal with the
    /// batch, as [`TaskStore::insert_recorded`] does; none for a task
    /// deduplicated or refused.
    pub async fn insert_batch(
        &self,
        tasks: Vec<Task>,
        records: Option<Vec<journal::Record>>,
    ) -> BatchInsert {
        self.requests().insert_batch(tasks, records, None).await
    }

    /// [`TaskStore::insert_batch`] as the region's leader holding `token`
    /// ([`TaskStore::lead`]): the database refuses the whole batch
    /// ([`StoreError::NotLeader`]) in its own transaction when another
    /// replica has taken the leadership since (takeover is the leader's).
    /// The embedded store has one controller, always the leader.
    pub async fn insert_batch_as_leader(
        &self,
        tasks: Vec<Task>,
        records: Option<Vec<journal::Record>>,
        token: i64,
    ) -> BatchInsert {
        let fence = self.is_postgres().then_some(token);
        self.requests().insert_batch(tasks, records, fence).await
    }

    /// Records the decision log's head in the store (its anchor). Blocking.
    pub fn record_log_head(&self, seq: u64, hash: &str) -> Result<(), StoreError> {
        each!(self, s => s.record_log_head(seq, hash))
    }

    /// The decision log's head last recorded.
    pub fn log_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        each!(self, s => s.log_head())
    }

    /// Reads a task. An undecodable record is [`StoreError::Corrupt`].
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        each!(self, s => s.get(task_id))
    }

    /// Undecodable task records found so far: how many, and the first ids.
    pub fn undecodable(&self) -> (usize, Vec<(String, String)>) {
        self.shared().undecodable_listed()
    }

    /// What the embedded store's background check of its whole file has
    /// found so far ([`RedbStore::verification`]); `None` for PostgreSQL,
    /// which checks its own pages.
    pub fn verification(&self) -> Option<Verification> {
        match self {
            TaskStore::Redb(s) => Some(s.verification()),
            TaskStore::Postgres(_) => None,
        }
    }

    /// The store's marks (commits, tasks created).
    pub fn mark(&self) -> witness::Mark {
        each!(self, s => s.mark())
    }

    /// Stores a task as it was elsewhere (rebuilding from a snapshot); an
    /// id already stored is left alone (false).
    pub async fn restore(&self, task: Task) -> Result<bool, StoreError> {
        self.requests().restore(task).await
    }

    /// Leases up to `max` (at most [`MAX_LEASE_BATCH`]) QUEUED tasks, highest
    /// priority first, then oldest, to `agent_id` with deadline now + `ttl`.
    pub async fn lease(
        &self,
        agent_id: &str,
        max: usize,
        ttl: std::time::Duration,
    ) -> Result<Vec<Task>, StoreError> {
        self.lease_except(agent_id, max, ttl, None).await
    }

    /// [`TaskStore::lease`], passing over the QUEUED tasks `held_back`
    /// holds back (the start-up fence), decided from the queue's own order
    /// and keys: no record is read for it.
    pub async fn lease_except(
        &self,
        agent_id: &str,
        max: usize,
        ttl: std::time::Duration,
        held_back: Option<Arc<LeaseFence>>,
    ) -> Result<Vec<Task>, StoreError> {
        self.requests().lease(agent_id, max, ttl, held_back).await
    }

    /// The newest `created_unix_ms` of a pending task created in this store
    /// (0 when none): persisted, so O(1), in the embedded store (where it
    /// covers every task it created, taken over ones aside); one indexed
    /// query in the database. The start-up fence's boundary when this
    /// clock is behind it.
    pub fn newest_created_ms(&self) -> Result<i64, StoreError> {
        match self {
            TaskStore::Redb(s) => Ok(s.newest_created_ms()),
            TaskStore::Postgres(s) => s.newest_created_ms(),
        }
    }

    /// Extends the lease of `task_id` to now + `ttl`. Only the holder may.
    pub async fn renew(
        &self,
        agent_id: &str,
        task_id: &str,
        ttl: std::time::Duration,
    ) -> Result<Task, StoreError> {
        self.requests().renew(agent_id, task_id, ttl).await
    }

    /// Finishes a leased task: SUCCEEDED or FAILED. Only the holder may.
    pub async fn complete(
        &self,
        agent_id: &str,
        task_id: &str,
        success: bool,
        result: Vec<u8>,
        error: String,
    ) -> Result<Task, StoreError> {
        self.requests()
            .complete(agent_id, task_id, success, result, error)
            .await
    }

    /// Cancels a task that has not finished (the reason, or "cancelled",
    /// goes to its `error`); an already terminal task is answered as it is,
    /// not an error.
    pub async fn cancel(&self, task_id: &str, reason: &str) -> Result<CancelOutcome, StoreError> {
        self.requests().cancel(task_id, reason).await
    }

    /// Takes back leases past their deadline (queued again, or FAILED at
    /// `max_attempts`). Returns the changed tasks.
    pub async fn expire_leases(&self, max_attempts: u32) -> Result<Vec<Task>, StoreError> {
        self.requests().expire(max_attempts, None).await
    }

    /// [`TaskStore::expire_leases`] as the region's leader holding
    /// `token` ([`TaskStore::lead`]): the database refuses it
    /// ([`StoreError::NotLeader`]) in the same transaction when another
    /// replica has taken the leadership since. The embedded store has one
    /// controller, always the leader.
    pub async fn expire_leases_as_leader(
        &self,
        max_attempts: u32,
        token: i64,
    ) -> Result<Vec<Task>, StoreError> {
        let fence = self.is_postgres().then_some(token);
        self.requests().expire(max_attempts, fence).await
    }

    /// Takes or keeps the region's leadership for `ttl` (renewing it when
    /// held): the fencing token while this controller leads, `None` while
    /// another one does. The embedded store's controller always leads
    /// (token 0).
    pub async fn lead(
        &self,
        replica: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<i64>, StoreError> {
        match self {
            TaskStore::Redb(_) => Ok(Some(0)),
            TaskStore::Postgres(s) => s.lead(replica, ttl).await,
        }
    }

    /// Queues again every task LEASED by `agent_id`.
    pub async fn requeue_agent(&self, agent_id: &str) -> Result<Vec<Task>, StoreError> {
        self.requests().requeue_agent(agent_id).await
    }

    /// Records (or updates) a registered agent, durably.
    pub async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        self.requests().put_agent(record).await
    }

    /// Forgets an agent and queues again every task it holds.
    pub async fn forget_agent(&self, agent_id: &str) -> Result<Vec<Task>, StoreError> {
        self.requests().forget_agent(agent_id).await
    }

    /// Every registered agent, by id.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        each!(self, s => s.agents())
    }

    /// Gives every lease at least `ttl` from now (after a restart).
    pub async fn extend_leases(&self, ttl: std::time::Duration) -> Result<usize, StoreError> {
        self.requests().extend_leases(ttl).await
    }

    /// Fencing for a returning primary: cancels the listed pending tasks as
    /// taken over.
    pub async fn mark_taken_over(
        &self,
        task_ids: Vec<String>,
        takeover: federation_api::Takeover,
    ) -> Result<Vec<Task>, StoreError> {
        self.requests().mark_taken_over(task_ids, takeover).await
    }

    /// Task counts by state (in memory).
    pub fn counts(&self) -> Counts {
        self.shared().counts()
    }

    /// Write transactions committed since open.
    pub fn commits(&self) -> u64 {
        self.shared().commits()
    }

    /// Seconds per commit, for metrics.
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.shared().commit_seconds()
    }

    /// Every QUEUED task in lease order, then every LEASED task by deadline.
    pub fn pending(&self) -> Result<Vec<Task>, StoreError> {
        each!(self, s => s.pending())
    }

    /// Reads tasks in id order after `after`, keeping those `keep` accepts,
    /// until `limit` are kept or `max_scan` read; returns them and where to
    /// resume when records remain.
    pub fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
        max_scan: usize,
        keep: impl FnMut(&Task) -> bool,
    ) -> Result<(Vec<Task>, Option<String>), StoreError> {
        each!(self, s => s.scan(after, limit, max_scan, keep))
    }

    /// Every state change, after its commit.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Task> {
        self.shared().subscribe()
    }

    /// Long-poll helper: true at once when a task is QUEUED, else waits.
    pub async fn wait_for_queued(&self, timeout: std::time::Duration) -> bool {
        self.shared().wait_for_queued(timeout).await
    }

    /// Returns when every request sent before it is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.requests().flush().await
    }

    /// Checks that the store can be reached: always for the embedded file;
    /// a round trip within `patience` for the database.
    pub async fn ping(&self, patience: std::time::Duration) -> Result<(), StoreError> {
        match self {
            TaskStore::Redb(_) => Ok(()),
            TaskStore::Postgres(s) => s.ping(patience).await,
        }
    }
}
