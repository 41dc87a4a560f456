//! The durable task store of one region: every task this region owns, its
//! lifecycle (queued → leased → succeeded / failed / cancelled) and its leases.
//!
//! What it owns: the file `<data_dir>/tasks.redb` (an embedded transactional
//! [redb] database), the task records in it (`federation_api::Task`, encoded
//! with prost), the indexes over them, and the in-memory counters and change
//! feed derived from them. What it must not touch: routing, residency, peers,
//! the network, snapshots. The controller decides *where* a task goes; this
//! module only makes sure that a task it acknowledged is never lost.
//!
//! # Guarantees
//!
//! * **Durable before acknowledged.** Every mutating call returns only after
//!   the write transaction holding it has been committed with redb's default
//!   durability (`Immediate`: the commit is fsync'd). A task whose `insert`
//!   returned survives `SIGKILL` and power loss (see the crash test).
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
//! * **A damaged store never panics and never loses silently.** The file is
//!   opened with redb's integrity check (every page checksum) inside a panic
//!   guard: damage is [`StoreError::Damaged`] naming the file. The store's
//!   marks ([`witness::Mark`]: commits, tasks created) are kept in `marks` in
//!   the same transaction as the work, and copied after each commit to the
//!   witness file `tasks.hwm` ([`witness`]); a store below its witness lost
//!   acknowledged work and is refused with [`StoreError::Lost`] (unless
//!   [`StoreOptions::accept_loss`]). A record that does not decode is
//!   [`StoreError::Corrupt`] when asked for by id, and skipped and reported
//!   ([`TaskStore::undecodable`]) by every scan: open, leasing, expiry,
//!   snapshots. [`check`] verifies a stopped store offline, on a copy.
//!
//! # Layout
//!
//! | table        | key                                   | value                  |
//! |--------------|---------------------------------------|------------------------|
//! | `tasks`      | task id                               | prost-encoded `Task`   |
//! | `queue`      | (−priority, created ms, task id)      | `()` — QUEUED tasks    |
//! | `leases`     | (lease deadline ms, task id)          | agent id — LEASED tasks|
//! | `agents`     | agent id                              | JSON [`AgentRecord`]   |
//! | `marks`      | `commit`, `created`                   | u64 — the store's marks|
//!
//! Idempotency keys are indexed in memory (key → task id), rebuilt at open
//! from the task records, which carry their key: it is derived data, so it is
//! never written, and an insert costs one B-tree insert fewer (random keys
//! touch a different page each). A store written by an earlier version has
//! an `idempotency` table; it is read once at open, then dropped.
//!
//! Leasing walks `queue` from its start (highest priority, then oldest), so it
//! costs O(k log n) for k tasks; expiring walks `leases` up to now.
//!
//! [redb]: https://docs.rs/redb

mod check;
#[cfg(test)]
mod contract;
pub mod journal;
pub mod postgres;
mod requests;
mod shared;
mod store;
#[cfg(test)]
mod tests;
mod transitions;
pub mod witness;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

pub use check::{CheckReport, check, refuse_in_use};
pub use journal::Journal;
pub use postgres::PgStore;
use store::decode;
pub use store::{FILE, MAX_BATCH, MAX_LEASE_BATCH, RedbStore, StoreOptions, read_log_head};

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
        PgStore::open(pg, region, options.clock).map(TaskStore::Postgres)
    }

    /// The database file (for the PostgreSQL backend, a
    /// `postgres://host:port/db#tasks` name for messages).
    pub fn path(&self) -> &std::path::Path {
        each!(self, s => s.path())
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
        self.shared().bind_journal(journal)
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
        self.requests().insert_batch(tasks, records).await
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

    /// [`TaskStore::lease`], leaving the QUEUED tasks whose ids are in `skip`.
    pub async fn lease_except(
        &self,
        agent_id: &str,
        max: usize,
        ttl: std::time::Duration,
        skip: Option<Arc<std::collections::HashSet<String>>>,
    ) -> Result<Vec<Task>, StoreError> {
        self.requests().lease(agent_id, max, ttl, skip).await
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

use federation_api::{Task, TaskState};

/// A registered agent as the store keeps it (table `agents`), so that an
/// agent's registration, and with it its leases, survive a controller
/// restart. Heartbeat times are not stored: a controller that opens the
/// store counts every known agent as just seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRecord {
    /// The id the controller gave (`agent-<uuid>`); the table's key.
    #[serde(skip)]
    pub id: String,
    /// The authenticated identity that registered it (`agent europe/worker`),
    /// empty without TLS. Only that identity may use the id.
    pub owner: String,
    /// Name for logs.
    pub name: String,
    /// Slots.
    pub slots: u32,
    /// When it first registered, milliseconds since the Unix epoch.
    pub registered_unix_ms: i64,
}

/// What [`TaskStore::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// The task was stored (durably) as given, state QUEUED, version 1.
    Created(Task),
    /// A task with the same idempotency key (or the same id) already existed;
    /// this is it, and nothing was stored.
    Deduplicated(Task),
}

impl InsertOutcome {
    /// The stored task, new or existing.
    pub fn task(&self) -> &Task {
        match self {
            InsertOutcome::Created(t) | InsertOutcome::Deduplicated(t) => t,
        }
    }

    /// The stored task, new or existing.
    pub fn into_task(self) -> Task {
        match self {
            InsertOutcome::Created(t) | InsertOutcome::Deduplicated(t) => t,
        }
    }

    /// True when nothing new was stored.
    pub fn is_deduplicated(&self) -> bool {
        matches!(self, InsertOutcome::Deduplicated(_))
    }
}

/// What became of the decision-log record given to
/// [`TaskStore::insert_recorded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Never handed to the log (the insert was refused, or its batch failed
    /// before the records were appended).
    NotWritten,
    /// Appended and synced, naming the task the insert produced.
    Written,
    /// Handed to the log, whose write failed (the log keeps its chain intact
    /// and reports the error).
    Failed(String),
}

/// The answer of [`TaskStore::insert_recorded`].
#[derive(Debug)]
pub struct RecordedInsert {
    /// What the insert did; durable when `Ok`.
    pub outcome: Result<InsertOutcome, StoreError>,
    /// What became of the record.
    pub record: RecordState,
}

impl RecordedInsert {
    /// The answer of an insert that failed before its record was handed
    /// to the journal.
    pub(crate) fn failed(err: StoreError) -> Self {
        Self {
            outcome: Err(err),
            record: RecordState::NotWritten,
        }
    }
}

/// What [`TaskStore::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelOutcome {
    /// The task as stored now.
    pub task: Task,
    /// True when this call cancelled it; false when it was already
    /// terminal (then it is unchanged).
    pub cancelled: bool,
}

/// The answer of [`TaskStore::insert_batch`].
#[derive(Debug)]
pub struct BatchInsert {
    /// Each task's outcome, in order; `Err` when the batch failed as a
    /// whole (nothing of it stored).
    pub outcomes: Result<Vec<Result<InsertOutcome, StoreError>>, StoreError>,
    /// What became of the batch's records.
    pub record: RecordState,
}

impl BatchInsert {
    /// The answer of a batch that failed before its records were handed
    /// to the journal.
    pub(crate) fn failed(err: StoreError) -> Self {
        Self {
            outcomes: Err(err),
            record: RecordState::NotWritten,
        }
    }
}

/// Errors of the task store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No task has this id.
    #[error("task {0} not found")]
    NotFound(String),
    /// The caller does not hold the task's lease (it expired and was
    /// re-leased, or was never theirs).
    #[error("task {task_id} is not leased by this agent (lease holder: {})", if holder.is_empty() { "none" } else { holder.as_str() })]
    NotLeaseHolder {
        /// The task.
        task_id: String,
        /// The current holder, empty when the task is not leased.
        holder: String,
    },
    /// The task already reached a terminal state.
    #[error("task {task_id} is already {state}")]
    Terminal {
        /// The task.
        task_id: String,
        /// Its terminal state, for example `SUCCEEDED`.
        state: String,
    },
    /// The idempotency key already names a task whose attributes or
    /// payload differ from the request's.
    #[error(
        "idempotency key `{key}` already names task {task_id}, whose {differs} differ from this request's"
    )]
    KeyReused {
        /// The key.
        key: String,
        /// The task it names.
        task_id: String,
        /// "attributes", "payload" or "attributes and payload".
        differs: &'static str,
    },
    /// The request itself is invalid (for example an empty task id).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A stored record does not decode.
    #[error("task record {task_id} is corrupted: {reason}")]
    Corrupt {
        /// The key of the record.
        task_id: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The database failed (I/O, full disk, lock held by another process…).
    #[error("task store: {0}")]
    Db(String),
    /// The database cannot be reached now (PostgreSQL backend: connection
    /// refused or lost); nothing of the request was committed.
    #[error("task store unavailable: {0}")]
    Unavailable(String),
    /// A write only the region's leader may make, from a controller that is
    /// not (or no longer) the leader: refused in the write's transaction.
    #[error("not the region's leader: {0}")]
    NotLeader(String),
    /// Another running controller of the region uses this `node.replica`.
    #[error("{0}")]
    ReplicaInUse(String),
    /// The writer thread is gone (the store is shutting down or crashed).
    #[error("task store is closed")]
    Closed,
    /// The database file (or its witness) cannot be opened as a sound store:
    /// damaged pages, not a store at all, or a panic of the storage engine.
    #[error("{path}: the task store is damaged: {what}; {hint}")]
    Damaged {
        /// The file.
        path: String,
        /// What was found.
        what: String,
        /// What to do.
        hint: String,
    },
    /// The store opens but holds less than its witness says was
    /// acknowledged: committed work was lost.
    #[error(
        "{path}: the task store lost acknowledged work: {detail}; the controller refuses to start on it. Rebuild it from a peer's snapshot (`federation store recover`), or accept the loss (`federation store accept DATA_DIR`); see README, Operations: a lost or damaged disk"
    )]
    Lost {
        /// The file.
        path: String,
        /// What is missing.
        detail: String,
    },
}

/// Task counts by state. Kept in memory, rebuilt at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for an agent.
    pub queued: u32,
    /// Leased to an agent.
    pub leased: u32,
    /// Finished successfully.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl Counts {
    fn add(&mut self, state: TaskState, delta: i64) {
        fn apply32(v: &mut u32, d: i64) {
            *v = u32::try_from((i64::from(*v) + d).max(0)).unwrap_or(u32::MAX);
        }
        fn apply64(v: &mut u64, d: i64) {
            *v = if d >= 0 {
                v.saturating_add(d.unsigned_abs())
            } else {
                v.saturating_sub(d.unsigned_abs())
            };
        }
        match state {
            TaskState::Queued => apply32(&mut self.queued, delta),
            TaskState::Leased => apply32(&mut self.leased, delta),
            TaskState::Succeeded => apply64(&mut self.succeeded, delta),
            TaskState::Failed => apply64(&mut self.failed, delta),
            TaskState::Cancelled => apply64(&mut self.cancelled, delta),
            TaskState::Unspecified => {}
        }
    }
}

/// True for SUCCEEDED, FAILED and CANCELLED.
pub fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
    )
}

/// The source of wall-clock time for lease deadlines and timestamps
/// (milliseconds since the Unix epoch). Injected so tests can move time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_unix_ms()
    }
}

/// A clock that only moves when told (for tests and simulations).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock showing `ms`.
    pub fn new(ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(ms)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub use crate::clock::now_unix_ms;

/// What differs between a stored task and a request reusing its
/// idempotency key, given whether the attributes and the payload are the
/// same: `None` when both are.
pub fn what_differs(same_attributes: bool, same_payload: bool) -> Option<&'static str> {
    match (same_attributes, same_payload) {
        (true, true) => None,
        (false, true) => Some("attributes"),
        (true, false) => Some("payload"),
        (false, false) => Some("attributes and payload"),
    }
}

/// The state's proto name without prefix, for messages: `SUCCEEDED`.
pub fn state_name(state: TaskState) -> String {
    state
        .as_str_name()
        .trim_start_matches("TASK_STATE_")
        .to_string()
}
