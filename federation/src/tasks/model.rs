//! What the store's callers and both backends share: the records it keeps
//! besides tasks (agents), what an insert or a cancel answers, the store's
//! errors, its counts, the clock it reads and small helpers on task states.
//! A leaf of `tasks`: it imports none of the backends.

/// The most tasks one `lease` call hands out.
pub const MAX_LEASE_BATCH: usize = 1000;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

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

/// Task counts by state. Kept in memory; the embedded store also keeps them
/// in its `counts` table, read at open.
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
    pub(super) fn add(&mut self, state: TaskState, delta: i64) {
        fn apply32(v: &mut u32, d: i64) {
            *v = u32::try_from(i64::from(*v).saturating_add(d).max(0)).unwrap_or(u32::MAX);
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
