//! What the callers and the writer of either backend share, the same in
//! both: the counts by state, the change feed and the wake-up of long polls
//! for a queued task, the clock, the commits and their timings, the
//! undecodable records found, and the journal and change sink bound to the
//! store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use federation_api::{Task, TaskState};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{Notify, broadcast};

use super::journal::Journal;
use super::{Clock, Counts, StoreError};

/// Capacity of the change feed; a slow subscriber sees `Lagged`.
const EVENT_CAPACITY: usize = 4096;
/// How many undecodable task ids the status lists.
const MAX_LISTED_UNDECODABLE: usize = 100;

/// Hears every committed change (and every change another replica made,
/// as the store learns it) synchronously, on the thread that commits,
/// before the commit's callers are answered: for work that must see every
/// change without a task woken per change (the replication outbox). Keep
/// it short: a lock and a push. Bound once ([`super::TaskStore::bind_changes`]).
pub trait ChangeSink: Send + Sync {
    /// `task` as it is after the change.
    fn changed(&self, task: &Task);

    /// Whether the tasks other replicas of the region create are read from
    /// the database to be handed to [`ChangeSink::changed`] (their other
    /// changes always are). No for a sink that would drop them anyway:
    /// replication on a replica that does not lead (taking the lead, it
    /// sends full snapshots read from the store).
    fn wants_new_tasks(&self) -> bool {
        true
    }
}

/// A task's change within a batch: its state before (None when new) and
/// after, and the task for subscribers (the embedded store leaves it out of
/// inserts when nobody is subscribed: no watch can follow a task that did
/// not exist yet).
pub(super) struct Change {
    pub(super) before: Option<TaskState>,
    pub(super) after: TaskState,
    pub(super) task: Option<Task>,
}

impl Change {
    pub(super) fn of(before: Option<TaskState>, task: &Task) -> Self {
        Self {
            before,
            after: task.state(),
            task: Some(task.clone()),
        }
    }
}

pub(super) struct Shared {
    counts: Mutex<Counts>,
    events: broadcast::Sender<Task>,
    queued: Notify,
    pub(super) clock: Arc<dyn Clock>,
    commits: AtomicU64,
    /// Seconds per commit (with its fsync), for metrics.
    commit_seconds: Histogram,
    /// Task records found undecodable by any scan: id → why.
    undecodable: Mutex<BTreeMap<String, String>>,
    /// Where inserts append the records they carry, bound once.
    journal: OnceLock<Arc<dyn Journal>>,
    /// Who hears every change synchronously, bound once.
    sink: OnceLock<Arc<dyn ChangeSink>>,
}

impl Shared {
    pub(super) fn new(counts: Counts, clock: Arc<dyn Clock>) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            counts: Mutex::new(counts),
            events,
            queued: Notify::new(),
            clock,
            commits: AtomicU64::new(0),
            // 100 µs to ~13 s; exposed by the metrics module.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            undecodable: Mutex::new(BTreeMap::new()),
            journal: OnceLock::new(),
            sink: OnceLock::new(),
        }
    }

    /// Task counts by state.
    pub(super) fn counts(&self) -> Counts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the counts (recounted from the database).
    pub(super) fn set_counts(&self, counts: Counts) {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    /// Moves the counts by what another replica's commit changed.
    pub(super) fn move_counts(&self, by: impl IntoIterator<Item = (TaskState, i64)>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (state, d) in by {
            if d != 0 {
                counts.add(state, d);
            }
        }
    }

    /// Reports an undecodable record (once per id): it is skipped by every
    /// scan, listed in the status and counted in the metrics.
    pub(super) fn undecodable(&self, err: &StoreError) {
        let StoreError::Corrupt { task_id, reason } = err else {
            return;
        };
        let mut known = self.undecodable.lock().unwrap_or_else(|e| e.into_inner());
        if !known.contains_key(task_id) {
            tracing::error!(task_id = %task_id, reason = %reason, "skipping an undecodable task record");
            known.insert(task_id.clone(), reason.clone());
        }
    }

    /// Undecodable records found so far: how many, and the first ids with
    /// the decoder's complaint.
    pub(super) fn undecodable_listed(&self) -> (usize, Vec<(String, String)>) {
        let known = self.undecodable.lock().unwrap_or_else(|e| e.into_inner());
        let listed = known
            .iter()
            .take(MAX_LISTED_UNDECODABLE)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (known.len(), listed)
    }

    /// Someone is subscribed to the change feed, or a sink is bound.
    pub(super) fn watched(&self) -> bool {
        self.events.receiver_count() > 0 || self.sink.get().is_some()
    }

    /// Hands `task` to the sink and the subscribers.
    fn send(&self, task: Task) {
        if let Some(sink) = self.sink.get() {
            sink.changed(&task);
        }
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(task);
        }
    }

    /// Binds the change sink, once.
    pub(super) fn bind_sink(&self, sink: Arc<dyn ChangeSink>) -> Result<(), StoreError> {
        self.sink.set(sink).map_err(|_| {
            StoreError::Invalid("the task store is bound to a change sink already".into())
        })
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Task> {
        self.events.subscribe()
    }

    /// Whether tasks another replica created are to be read and published:
    /// while someone is subscribed to the change feed, or the sink wants
    /// them (a long poll is woken by [`Shared::created_elsewhere`] either
    /// way).
    pub(super) fn wants_new_tasks(&self) -> bool {
        self.events.receiver_count() > 0 || self.sink.get().is_some_and(|s| s.wants_new_tasks())
    }

    /// Another replica created tasks this store does not read: long polls
    /// wake (a new task is QUEUED).
    pub(super) fn created_elsewhere(&self) {
        self.queued.notify_waiters();
    }

    /// Publishes a task changed elsewhere (another replica), waking long
    /// polls when it is queued.
    pub(super) fn publish(&self, task: Task) {
        let queued = task.state() == TaskState::Queued;
        self.send(task);
        if queued {
            self.queued.notify_waiters();
        }
    }

    /// True at once when a task is QUEUED, else waits until one becomes
    /// QUEUED (true) or `timeout` passes (false).
    pub(super) async fn wait_for_queued(&self, timeout: Duration) -> bool {
        let notified = self.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.counts().queued > 0 {
            return true;
        }
        tokio::time::timeout(timeout, notified).await.is_ok()
    }

    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub(super) fn commit_seconds(&self) -> Histogram {
        self.commit_seconds.clone()
    }

    /// Times one commit.
    pub(super) fn observe_commit(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// After a commit: one commit more, the counts moved by `changes`, each
    /// changed task published, and long polls woken when one is queued.
    pub(super) fn committed(&self, changes: Vec<Change>) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut any_queued = false;
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            for c in &changes {
                if let Some(b) = c.before {
                    counts.add(b, -1);
                }
                counts.add(c.after, 1);
                any_queued |= c.after == TaskState::Queued;
            }
        }
        for task in changes.into_iter().filter_map(|c| c.task) {
            self.send(task);
        }
        if any_queued {
            self.queued.notify_waiters();
        }
    }

    /// Binds the journal, once.
    pub(super) fn bind_journal(&self, journal: Arc<dyn Journal>) -> Result<(), StoreError> {
        self.journal
            .set(journal)
            .map_err(|_| StoreError::Invalid("the task store is bound to a journal already".into()))
    }

    pub(super) fn journal(&self) -> Option<&dyn Journal> {
        self.journal.get().map(|j| &**j)
    }
}
