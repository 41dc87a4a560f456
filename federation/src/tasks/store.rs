//! [`TaskStore`]: the redb database, its single writer thread (group commit)
//! and the read paths. See the parent module for the guarantees.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use federation_api::{Takeover, Task, TaskState};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, broadcast, mpsc};

use super::journal::Journal;
use super::requests::{self, Applied, Op, Outcomes, Requests, Settled};
use super::witness::{self, Mark};
use super::{
    AgentRecord, CancelOutcome, Clock, Counts, InsertOutcome, RecordState, StoreError, SystemClock,
    is_terminal, state_name,
};

/// The most requests one write transaction applies (one fsync).
pub const MAX_BATCH: usize = 1024;
/// The most tasks one `lease` call hands out.
pub const MAX_LEASE_BATCH: usize = 1000;
/// The most expired leases one `expire_leases` call handles.
pub(super) const MAX_EXPIRE_BATCH: usize = 10_000;
/// Capacity of the change feed; a slow subscriber sees `Lagged`.
pub(super) const EVENT_CAPACITY: usize = 4096;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Idempotency keys of earlier versions, which kept them on disk; read once
/// at open into the in-memory index, then dropped.
const LEGACY_IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// QUEUED tasks by (−priority, created ms, id): iteration order is lease order.
const QUEUE: TableDefinition<(i64, i64, &str), ()> = TableDefinition::new("queue");
/// LEASED tasks by (deadline ms, id) → agent id.
const LEASES: TableDefinition<(i64, &str), &str> = TableDefinition::new("leases");
/// Small named values kept beside the tasks (the decision log's head).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// [`META`] key of the decision log's head, `<seq> <hash>`.
const META_LOG_HEAD: &str = "log_head";
/// Registered agents: id → JSON [`AgentRecord`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// The store's own marks (`commit`, `created`), compared with the witness.
const MARKS: TableDefinition<&str, u64> = TableDefinition::new("marks");
/// How many undecodable task ids the status lists.
pub(super) const MAX_LISTED_UNDECODABLE: usize = 100;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Source of wall-clock time (leases, timestamps).
    pub clock: Arc<dyn Clock>,
    /// Open a store that lost acknowledged work (its witness says more was
    /// acknowledged than it holds) instead of refusing with
    /// [`StoreError::Lost`]: the loss is logged and the witness reset to
    /// what the store holds (`federation store accept`).
    pub accept_loss: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            accept_loss: false,
        }
    }
}

/// The durable task store of one region. Cheap to clone (an `Arc` inside);
/// the database closes when the last clone is dropped.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .field("counts", &self.counts())
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    tx: Requests,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

/// State shared by the callers and the writer thread.
struct Shared {
    counts: Mutex<Counts>,
    events: broadcast::Sender<Task>,
    queued: Notify,
    clock: Arc<dyn Clock>,
    commits: AtomicU64,
    /// Seconds per write-transaction commit (with its fsync), for metrics.
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The store's marks as of the last commit (written in `marks` too).
    mark: Mutex<Mark>,
    /// Keeps `tasks.hwm` up to date; dropped (final write) with the store.
    witness: witness::Writer,
    /// Task records found undecodable by any scan: id → why.
    undecodable: Mutex<std::collections::BTreeMap<String, String>>,
    /// Where inserts append the records they carry, bound once.
    journal: OnceLock<Arc<dyn Journal>>,
}

impl Shared {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports an undecodable record (once per id): it is skipped by every
    /// scan, listed in the status and counted in the metrics.
    fn undecodable(&self, err: &StoreError) {
        let StoreError::Corrupt { task_id, reason } = err else {
            return;
        };
        let mut known = self.undecodable.lock().unwrap_or_else(|e| e.into_inner());
        if !known.contains_key(task_id) {
            tracing::error!(task_id = %task_id, reason = %reason, "skipping an undecodable task record");
            known.insert(task_id.clone(), reason.clone());
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what it holds and exit;
        // joining it releases the database file before we return.
        self.tx.close();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(path = %self.path.display(), "task store writer thread panicked");
            }
        }
    }
}

trait DbResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T, E: std::fmt::Display> DbResult<T> for Result<T, E> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db(e.to_string()))
    }
}

impl RedbStore {
    /// Opens (creating if needed) `<dir>/tasks.redb`, recovering it after a
    /// crash, and rebuilds the counters. Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// [`TaskStore::open`] with options (an injected clock).
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Db(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let opened = guarded(&path, || -> Result<_, StoreError> {
            let db = open_checked(&path)?;
            // Create the tables so that readers always find them.
            let txn = db.begin_write().db()?;
            {
                txn.open_table(TASKS).db()?;
                txn.open_table(QUEUE).db()?;
                txn.open_table(LEASES).db()?;
                txn.open_table(AGENTS).db()?;
                txn.open_table(MARKS).db()?;
            }
            txn.commit().db()?;
            let rebuilt = rebuild(&db)?;
            Ok((db, rebuilt))
        })?;
        let (db, rebuilt) = opened;
        let Rebuilt {
            counts,
            idem,
            records,
            stored,
            undecodable,
        } = rebuilt;
        let mark = check_witness(dir, &path, stored, records, options.accept_loss)?;
        if stored != Some(mark) {
            // A store from before the marks were kept: they start here.
            let txn = db.begin_write().db()?;
            write_mark(&txn, mark)?;
            txn.commit().db()?;
        }
        let witness = witness::Writer::start(dir, mark)
            .map_err(|e| StoreError::Db(format!("starting the witness thread: {e}")))?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            counts: Mutex::new(counts),
            events,
            queued: Notify::new(),
            clock: options.clock,
            commits: AtomicU64::new(0),
            // 100 µs to ~13 s; exposed by the metrics module.
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
            ),
            mark: Mutex::new(mark),
            witness,
            undecodable: Mutex::new(Default::default()),
            journal: OnceLock::new(),
        });
        for e in &undecodable {
            shared.undecodable(e);
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = {
            let db = Arc::clone(&db);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("task-store-writer".into())
                .spawn(move || writer_loop(&db, &shared, idem, rx))
                .map_err(|e| StoreError::Db(format!("starting the writer thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                db,
                tx: Requests::new(tx),
                writer: Mutex::new(Some(writer)),
                shared,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer channel: every mutation ([`super::TaskStore`]'s).
    pub(super) fn requests(&self) -> &Requests {
        &self.inner.tx
    }

    /// See [`super::TaskStore::bind_journal`].
    pub fn bind_journal(&self, journal: Arc<dyn Journal>) -> Result<(), StoreError> {
        self.inner
            .shared
            .journal
            .set(journal)
            .map_err(|_| bound_twice())
    }

    /// Records the decision log's head (its last durable record) in the
    /// store, committed with fsync, as the log's anchor outside its own file
    /// (see [`crate::audit::anchor`]). Blocking: call off the async workers.
    pub fn record_log_head(&self, seq: u64, hash: &str) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_write().db()?;
        {
            let mut meta = txn.open_table(META).db()?;
            meta.insert(META_LOG_HEAD, format!("{seq} {hash}").as_bytes())
                .db()?;
        }
        txn.commit().db()
    }

    /// The decision log's head last recorded by [`TaskStore::record_log_head`].
    pub fn log_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        log_head_in(&*self.inner.db)
    }

    /// Reads a task. An undecodable record is [`StoreError::Corrupt`] (and
    /// reported, see [`TaskStore::undecodable`]).
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        let txn = self.inner.db.begin_read().db()?;
        let table = txn.open_table(TASKS).db()?;
        let bytes = table.get(task_id).db()?;
        let task = bytes.map(|b| decode(task_id, b.value())).transpose();
        if let Err(e) = &task {
            self.inner.shared.undecodable(e);
        }
        task
    }

    /// Task records found undecodable so far (at open or by any scan since):
    /// how many, and the first ids with the decoder's complaint. They are
    /// skipped by leasing, snapshots and status; nothing else stops on them.
    pub fn undecodable(&self) -> (usize, Vec<(String, String)>) {
        let known = self
            .inner
            .shared
            .undecodable
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let listed = known
            .iter()
            .take(MAX_LISTED_UNDECODABLE)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (known.len(), listed)
    }

    /// The store's marks (commits, tasks created) as of the last commit.
    pub fn mark(&self) -> Mark {
        *self
            .inner
            .shared
            .mark
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every registered agent, by id. A record that does not decode is
    /// skipped and logged (its leases expire as usual).
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let txn = self.inner.db.begin_read().db()?;
        let table = txn.open_table(AGENTS).db()?;
        let mut out = Vec::new();
        for entry in table.iter().db()? {
            let (k, v) = entry.db()?;
            match serde_json::from_slice::<AgentRecord>(v.value()) {
                Ok(mut record) => {
                    record.id = k.value().to_string();
                    out.push(record);
                }
                Err(e) => {
                    tracing::error!(agent_id = %k.value(), error = %e, "skipping an undecodable agent record");
                }
            }
        }
        Ok(out)
    }

    /// Task counts by state (in memory; rebuilt at open).
    pub fn counts(&self) -> Counts {
        *self.inner.shared.counts()
    }

    /// Write transactions committed since open (each one fsync). With group
    /// commit this grows slower than the number of mutations under load.
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Seconds per write-transaction commit (fsync included), for metrics.
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.shared.commit_seconds.clone()
    }

    /// Every QUEUED task in lease order, then every LEASED task by deadline.
    pub fn pending(&self) -> Result<Vec<Task>, StoreError> {
        let txn = self.inner.db.begin_read().db()?;
        let tasks = txn.open_table(TASKS).db()?;
        let queue = txn.open_table(QUEUE).db()?;
        let leases = txn.open_table(LEASES).db()?;
        let mut ids = Vec::new();
        for entry in queue.iter().db()? {
            let (k, _) = entry.db()?;
            ids.push(k.value().2.to_string());
        }
        for entry in leases.iter().db()? {
            let (k, _) = entry.db()?;
            ids.push(k.value().1.to_string());
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = tasks.get(id.as_str()).db()? {
                // One bad record is reported and skipped: it never stops a
                // snapshot of the rest.
                match decode(&id, b.value()) {
                    Ok(t) => out.push(t),
                    Err(e) => self.inner.shared.undecodable(&e),
                }
            }
        }
        Ok(out)
    }

    /// Reads tasks in id order (oldest first: ids are UUIDv7) after the id
    /// `after` (exclusive), keeping those `keep` accepts, until `limit` are
    /// kept or `max_scan` records were read. Returns the kept tasks and the
    /// id to resume after when records remain (read-only; one read
    /// transaction).
    pub fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&Task) -> bool,
    ) -> Result<(Vec<Task>, Option<String>), StoreError> {
        use std::ops::Bound;
        let txn = self.inner.db.begin_read().db()?;
        let table = txn.open_table(TASKS).db()?;
        let range = match after {
            Some(id) => table.range::<&str>((Bound::Excluded(id), Bound::Unbounded)),
            None => table.range::<&str>(..),
        }
        .db()?;
        let mut kept = Vec::new();
        let mut last = None;
        for (scanned, entry) in range.enumerate() {
            if kept.len() >= limit || scanned >= max_scan {
                return Ok((kept, last));
            }
            let (k, v) = entry.db()?;
            let id = k.value().to_string();
            // An undecodable record is skipped and reported, as by every scan.
            match decode(&id, v.value()) {
                Ok(task) if keep(&task) => kept.push(task),
                Ok(_) => {}
                Err(e) => self.inner.shared.undecodable(&e),
            }
            last = Some(id);
        }
        Ok((kept, None))
    }

    /// Every state change, after its commit. A subscriber that falls more
    /// than a few thousand changes behind receives `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<Task> {
        self.inner.shared.events.subscribe()
    }

    /// Long-poll helper: returns true at once when a task is QUEUED, else
    /// waits until a task becomes QUEUED (true) or `timeout` passes (false).
    /// A true result is a hint: another agent may lease the task first.
    pub async fn wait_for_queued(&self, timeout: Duration) -> bool {
        let notified = self.inner.shared.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.counts().queued > 0 {
            return true;
        }
        tokio::time::timeout(timeout, notified).await.is_ok()
    }
}

/// The refusal of a second journal.
pub(super) fn bound_twice() -> StoreError {
    StoreError::Invalid("the task store is bound to a journal already".into())
}

pub(super) fn decode(id: &str, bytes: &[u8]) -> Result<Task, StoreError> {
    let task = Task::decode(bytes).map_err(|e| StoreError::Corrupt {
        task_id: id.to_string(),
        reason: e.to_string(),
    })?;
    if TaskState::try_from(task.state).is_err() {
        return Err(StoreError::Corrupt {
            task_id: id.to_string(),
            reason: format!("unknown state {}", task.state),
        });
    }
    Ok(task)
}

/// The task store's file in its data directory.
pub const FILE: &str = "tasks.redb";

/// What to tell an operator whose store is damaged.
const DAMAGED_HINT: &str = "run `federation store check DATA_DIR` for a report; to rebuild the store from the newest snapshot a peer holds of this region, see `federation store recover` (README, Operations: a lost or damaged disk)";

/// Runs `f` (which reads the database file at `path`), turning a panic of
/// the storage engine into [`StoreError::Damaged`].
pub(crate) fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(damaged(
                path,
                format!("the storage engine panicked reading it ({msg})"),
            ))
        }
    }
}

pub(crate) fn damaged(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        what: what.into(),
        hint: DAMAGED_HINT.into(),
    }
}

/// Opens the database with redb's integrity check (every page checksum of
/// the committed trees verified), so a file altered outside redb is an
/// error rather than trusted; maps redb's errors to ours.
pub(crate) fn open_checked(path: &Path) -> Result<Database, StoreError> {
    let mut builder = redb::Builder::new();
    builder.set_check_integrity_on_open(true);
    builder.create(path).map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        D::DatabaseAlreadyOpen => StoreError::Db(format!(
            "{}: in use by another process (is a controller running on this data directory?)",
            path.display()
        )),
        D::Storage(S::Corrupted(why)) => damaged(path, format!("corrupted ({why})")),
        D::Storage(S::Io(io)) if io.kind() == std::io::ErrorKind::InvalidData => {
            damaged(path, format!("not a readable task store ({io})"))
        }
        D::UpgradeRequired(v) => damaged(
            path,
            format!("written in storage format {v}, which this version cannot read"),
        ),
        other => StoreError::Db(format!("opening {}: {other}", path.display())),
    }
}

/// Compares the store's marks with its witness file; returns the marks the
/// store continues from.
fn check_witness(
    dir: &Path,
    path: &Path,
    stored: Option<Mark>,
    records: u64,
    accept_loss: bool,
) -> Result<Mark, StoreError> {
    // A store from before the marks were kept counts what it holds.
    let mark = stored.unwrap_or(Mark {
        commit: 0,
        created: records,
    });
    let found = match witness::read(dir) {
        Ok(found) => found,
        Err(e) if accept_loss => {
            tracing::warn!(error = %e, "the task store's witness cannot be read; accepted, a new one is written");
            None
        }
        Err(e) => {
            return Err(StoreError::Damaged {
                path: dir.join(witness::FILE).display().to_string(),
                what: format!("the store's witness cannot be read ({e})"),
                hint: "check the store with `federation store check DATA_DIR`; if it is sound, `federation store accept DATA_DIR` writes a new witness".into(),
            });
        }
    };
    let Some(loss) = witness::compare(mark, records, found) else {
        if found.is_none() {
            witness::write(dir, mark).map_err(|e| StoreError::Db(e.to_string()))?;
            tracing::info!(path = %dir.join(witness::FILE).display(), commit = mark.commit, created = mark.created, "task store witness started");
        }
        return Ok(mark);
    };
    if accept_loss {
        tracing::warn!(path = %path.display(), loss = %loss, "task store lost acknowledged work; accepted, the witness restarts from what the store holds");
        let mark = Mark {
            commit: mark.commit.max(loss.witness.commit),
            created: records,
        };
        witness::write(dir, mark).map_err(|e| StoreError::Db(e.to_string()))?;
        return Ok(mark);
    }
    Err(StoreError::Lost {
        path: path.display().to_string(),
        detail: loss.to_string(),
    })
}

fn read_mark(db: &Database) -> Result<Option<Mark>, StoreError> {
    let txn = db.begin_read().db()?;
    let table = match txn.open_table(MARKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let commit = table.get("commit").db()?.map(|v| v.value());
    let created = table.get("created").db()?.map(|v| v.value());
    Ok(match (commit, created) {
        (Some(commit), Some(created)) => Some(Mark { commit, created }),
        _ => None,
    })
}

fn write_mark(txn: &redb::WriteTransaction, mark: Mark) -> Result<(), StoreError> {
    let mut table = txn.open_table(MARKS).db()?;
    table.insert("commit", mark.commit).db()?;
    table.insert("created", mark.created).db()?;
    Ok(())
}

/// What [`rebuild`] finds.
struct Rebuilt {
    counts: Counts,
    idem: IdemIndex,
    /// Task records, decodable or not.
    records: u64,
    /// The marks kept in `marks`, if any.
    stored: Option<Mark>,
    /// The records that do not decode.
    undecodable: Vec<StoreError>,
}

/// Rebuilds the counters and the idempotency index from the `tasks` table
/// (every task carries its key), after taking over the index an earlier
/// version kept on disk, if any; counts the records and reads the marks.
fn rebuild(db: &Database) -> Result<Rebuilt, StoreError> {
    let mut idem = IdemIndex::default();
    let legacy = {
        let txn = db.begin_read().db()?;
        match txn.open_table(LEGACY_IDEMPOTENCY) {
            Ok(table) => {
                for entry in table.iter().db()? {
                    let (k, v) = entry.db()?;
                    idem.committed.insert(k.value().into(), v.value().into());
                }
                true
            }
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(StoreError::Db(e.to_string())),
        }
    };
    let txn = db.begin_read().db()?;
    let table = txn.open_table(TASKS).db()?;
    let mut counts = Counts::default();
    // Keys are unique by construction (an insert with a known key stores
    // nothing); should two tasks ever share one, the oldest keeps it.
    let mut first: HashMap<Box<str>, (i64, Box<str>)> = HashMap::new();
    let mut records = 0u64;
    let mut undecodable = Vec::new();
    for entry in table.iter().db()? {
        let (k, v) = entry.db()?;
        records += 1;
        match decode(k.value(), v.value()) {
            Ok(t) => {
                counts.add(t.state(), 1);
                if !t.idempotency_key.is_empty()
                    && !idem.committed.contains_key(t.idempotency_key.as_str())
                {
                    let id: Box<str> = t.task_id.into();
                    let candidate = (t.created_unix_ms, id);
                    first
                        .entry(t.idempotency_key.into())
                        .and_modify(|held| {
                            if candidate < *held {
                                *held = candidate.clone();
                            }
                        })
                        .or_insert_with(|| candidate.clone());
                }
            }
            Err(e) => undecodable.push(e),
        }
    }
    drop(table);
    drop(txn);
    idem.committed
        .extend(first.into_iter().map(|(k, (_, id))| (k, id)));
    if legacy {
        let txn = db.begin_write().db()?;
        txn.delete_table(LEGACY_IDEMPOTENCY).db()?;
        txn.commit().db()?;
    }
    Ok(Rebuilt {
        counts,
        idem,
        records,
        stored: read_mark(db)?,
        undecodable,
    })
}

/// Idempotency key → task id, in memory. Derived data: every task record
/// carries its key, so the index is rebuilt at open and never written. The
/// changes of a batch are staged and become visible to later batches only
/// once its transaction has committed.
#[derive(Default)]
struct IdemIndex {
    committed: HashMap<Box<str>, Box<str>>,
    staged: HashMap<Box<str>, Box<str>>,
}

impl IdemIndex {
    fn get(&self, key: &str) -> Option<&str> {
        self.staged
            .get(key)
            .or_else(|| self.committed.get(key))
            .map(|id| &**id)
    }

    fn stage(&mut self, key: &str, id: &str) {
        self.staged.insert(key.into(), id.into());
    }

    fn commit(&mut self) {
        self.committed.extend(self.staged.drain());
    }

    fn abort(&mut self) {
        self.staged.clear();
    }
}

/// The decision log's head recorded in `db` (see [`TaskStore::log_head`]).
fn log_head_in(db: &impl ReadableDatabase) -> Result<Option<(u64, String)>, StoreError> {
    let txn = db.begin_read().db()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Db(e.to_string())),
    };
    let Some(v) = meta.get(META_LOG_HEAD).db()? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(v.value()).into_owned();
    let parsed = text
        .split_once(' ')
        .and_then(|(seq, hash)| Some((seq.parse::<u64>().ok()?, hash.to_string())));
    parsed
        .map(Some)
        .ok_or_else(|| StoreError::Db(format!("recorded log head is malformed: `{text}`")))
}

/// The decision log's head recorded in the store of `dir`, read without
/// opening the store for writing (for `federation audit verify`). Fails when
/// a running controller holds the store, or the file is damaged (a panic of
/// the storage engine becomes an error).
pub fn read_log_head(dir: &Path) -> Result<Option<(u64, String)>, StoreError> {
    let path = dir.join("tasks.redb");
    if !path.exists() {
        return Ok(None);
    }
    let read = std::panic::catch_unwind(|| {
        match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => log_head_in(&db),
            // Not closed cleanly (a crash, or a controller running): redb
            // must repair it before reading, which a read-only open cannot.
            // Repair a private copy instead; the original stays untouched.
            Err(first) => {
                let copy_dir = tempfile::tempdir()
                    .map_err(|e| StoreError::Db(format!("temporary directory: {e}")))?;
                let copy = copy_dir.path().join("tasks.redb");
                std::fs::copy(&path, &copy)
                    .map_err(|e| StoreError::Db(format!("copying {}: {e}", path.display())))?;
                let db = Database::create(&copy).map_err(|e| {
                    StoreError::Db(format!(
                        "opening {}: {first}; a repaired copy failed too: {e}",
                        path.display()
                    ))
                })?;
                log_head_in(&db)
            }
        }
    });
    read.unwrap_or_else(|_| {
        Err(StoreError::Db(format!(
            "{}: the storage engine failed reading it (damaged file?)",
            path.display()
        )))
    })
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

fn writer_loop(
    db: &Database,
    shared: &Shared,
    mut idem: IdemIndex,
    rx: mpsc::UnboundedReceiver<Op>,
) {
    let mut requests = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    // Ends when every sender is gone (the last TaskStore clone dropped).
    while let Some(batch) = requests.next_batch() {
        let journal = shared.journal.get().map(|j| &**j);
        run_batch(db, shared, &mut idem, journal, batch);
    }
}

/// A task's change within a batch: its state before (None when new) and
/// after, and the task for subscribers (left out of inserts when nobody is
/// subscribed: no watch can follow a task that did not exist yet).
struct Change {
    before: Option<TaskState>,
    after: TaskState,
    task: Option<Task>,
}

impl Change {
    fn of(before: Option<TaskState>, task: &Task) -> Self {
        Self {
            before,
            after: task.state(),
            task: Some(task.clone()),
        }
    }
}

fn run_batch(
    db: &Database,
    shared: &Shared,
    idem: &mut IdemIndex,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) {
    let Some(batch) = requests::only_flushes(batch) else {
        return;
    };
    if apply_batch(db, shared, idem, journal, batch).is_err() {
        idem.abort();
    }
}

/// Applies a batch in one write transaction, hands its records to the
/// journal while the transaction commits, and answers every request once
/// both are durable (or with the error that failed the batch).
fn apply_batch(
    db: &Database,
    shared: &Shared,
    idem: &mut IdemIndex,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) -> Result<(), StoreError> {
    let now = shared.clock.now_ms();
    let watched = shared.events.receiver_count() > 0;
    let mut changes = Vec::new();
    let txn = match db.begin_write().db() {
        Ok(txn) => txn,
        Err(e) => {
            requests::fail(Vec::new(), batch, e.clone());
            return Err(e);
        }
    };
    let mut applied = Vec::with_capacity(batch.len());
    {
        let opened = (|| -> Result<_, StoreError> {
            Ok((
                txn.open_table(TASKS).db()?,
                txn.open_table(QUEUE).db()?,
                txn.open_table(LEASES).db()?,
            ))
        })();
        let (tasks, queue, leases) = match opened {
            Ok(tables) => tables,
            Err(e) => {
                requests::fail(Vec::new(), batch, e.clone());
                return Err(e);
            }
        };
        let mut t = Tables {
            shared,
            txn: &txn,
            tasks,
            idem: &mut *idem,
            queue,
            leases,
            watched,
        };
        let mut ops = batch.into_iter();
        while let Some(op) = ops.next() {
            let done = t.apply(op, now, &mut changes);
            if let Some(e) = done.fatal().cloned() {
                // The transaction may hold part of this request: abort it
                // all; every caller of the batch gets the error, and no
                // record of the batch has been appended.
                applied.push(done);
                let (answers, _) = requests::answers(applied, journal.is_some());
                requests::fail(answers, ops, e.clone());
                return Err(e);
            }
            applied.push(done);
        }
    }
    let (answers, records) = requests::answers(applied, journal.is_some());
    // The marks move in the same transaction as the work they count.
    let created = changes.iter().filter(|c| c.before.is_none()).count() as u64;
    let before = *shared.mark.lock().unwrap_or_else(|e| e.into_inner());
    let mark = Mark {
        commit: before.commit.saturating_add(1),
        created: before.created.saturating_add(created),
    };
    if let Err(e) = write_mark(&txn, mark) {
        requests::fail(answers, Vec::new(), e.clone());
        return Err(e);
    }
    // The decision records are written and synced by the journal while
    // this transaction commits; both are durable before anyone hears back.
    let receipt = match journal {
        Some(j) if !records.is_empty() => Some(j.append_batch(records)),
        _ => None,
    };
    let commit_started = std::time::Instant::now();
    let committed = txn.commit().db();
    shared
        .commit_seconds
        .observe(commit_started.elapsed().as_secs_f64());
    let records = match receipt.map(|r| r.wait()) {
        None => RecordState::NotWritten,
        Some(Ok(())) => RecordState::Written,
        Some(Err(e)) => {
            tracing::error!(error = %e, "appending decision records failed");
            RecordState::Failed(e)
        }
    };
    if let Err(e) = &committed {
        tracing::error!(error = %e, "task store commit failed");
    } else {
        shared.commits.fetch_add(1, Ordering::Relaxed);
        *shared.mark.lock().unwrap_or_else(|e| e.into_inner()) = mark;
        shared.witness.advance(mark);
        idem.commit();
    }
    let settled = Settled {
        committed: committed.clone(),
        records,
    };
    if committed.is_err() {
        for a in answers {
            a.settle(&settled);
        }
        return committed;
    }
    let mut any_queued = false;
    {
        let mut counts = shared.counts();
        for c in &changes {
            if let Some(b) = c.before {
                counts.add(b, -1);
            }
            counts.add(c.after, 1);
            any_queued |= c.after == TaskState::Queued;
        }
    }
    for task in changes.into_iter().filter_map(|c| c.task) {
        let _ = shared.events.send(task);
    }
    for a in answers {
        a.settle(&settled);
    }
    if any_queued {
        shared.queued.notify_waiters();
    }
    Ok(())
}

struct Tables<'t> {
    /// For reporting undecodable records.
    shared: &'t Shared,
    /// For the tables only some requests touch (opened on demand).
    txn: &'t redb::WriteTransaction,
    tasks: redb::Table<'t, &'static str, &'static [u8]>,
    idem: &'t mut IdemIndex,
    queue: redb::Table<'t, (i64, i64, &'static str), ()>,
    leases: redb::Table<'t, (i64, &'static str), &'static str>,
    /// Someone is subscribed to the change feed.
    watched: bool,
}

fn queue_key(t: &Task) -> (i64, i64, &str) {
    (
        -i64::from(t.priority),
        t.created_unix_ms,
        t.task_id.as_str(),
    )
}

pub(super) fn touch(t: &mut Task, now: i64) {
    t.version = t.version.saturating_add(1);
    t.updated_unix_ms = now;
}

pub(super) fn clear_lease(t: &mut Task) {
    t.agent_id.clear();
    t.lease_deadline_unix_ms = 0;
}

impl Tables<'_> {
    fn read(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let bytes = self.tasks.get(id).db()?;
        bytes.map(|b| decode(id, b.value())).transpose()
    }

    fn must_read(&self, id: &str) -> Result<Task, StoreError> {
        self.read(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    fn write(&mut self, t: &Task) -> Result<(), StoreError> {
        self.tasks
            .insert(t.task_id.as_str(), t.encode_to_vec().as_slice())
            .db()?;
        Ok(())
    }

    /// Removes the task from whichever index its state puts it in.
    fn unindex(&mut self, t: &Task) -> Result<(), StoreError> {
        match t.state() {
            TaskState::Queued => {
                self.queue.remove(queue_key(t)).db()?;
            }
            TaskState::Leased => {
                self.leases
                    .remove((t.lease_deadline_unix_ms, t.task_id.as_str()))
                    .db()?;
            }
            _ => {}
        }
        Ok(())
    }

    fn apply(&mut self, op: Op, now: i64, changes: &mut Vec<Change>) -> Applied {
        match op {
            Op::Insert {
                task,
                record,
                reply,
            } => Applied::Insert {
                result: Box::new(self.insert(*task, now, changes)),
                record,
                reply,
            },
            Op::InsertBatch {
                tasks,
                records,
                reply,
            } => Applied::Batch {
                result: self.insert_all(tasks, now, changes),
                records,
                reply,
            },
            Op::Lease {
                agent,
                max,
                ttl_ms,
                skip,
                reply,
            } => {
                let deadline = now.saturating_add(ttl_ms);
                let leased = self.lease(&agent, max, skip.as_deref(), deadline, now, changes);
                Applied::answer(reply, leased)
            }
            Op::Renew {
                agent,
                id,
                ttl_ms,
                reply,
            } => {
                let renewed = self.renew(&agent, &id, now.saturating_add(ttl_ms), now, changes);
                Applied::answer(reply, renewed)
            }
            Op::Complete {
                agent,
                id,
                success,
                result,
                error,
                reply,
            } => {
                let done = self.complete(&agent, &id, success, result, error, now, changes);
                Applied::answer(reply, done)
            }
            Op::Cancel { id, reason, reply } => {
                Applied::answer(reply, self.cancel(&id, &reason, now, changes))
            }
            Op::Expire {
                max_attempts,
                reply,
                ..
            } => Applied::answer(reply, self.expire(max_attempts, now, changes)),
            Op::RequeueAgent { agent, reply } => {
                Applied::answer(reply, self.requeue_agent(&agent, now, changes))
            }
            Op::PutAgent { record, reply } => Applied::answer(reply, self.put_agent(&record)),
            Op::ForgetAgent { agent, reply } => {
                Applied::answer(reply, self.forget_agent(&agent, now, changes))
            }
            Op::ExtendLeases { ttl_ms, reply } => {
                let deadline = now.saturating_add(ttl_ms);
                Applied::answer(reply, self.extend_leases(deadline, now, changes))
            }
            Op::MarkTakenOver {
                ids,
                takeover,
                reply,
            } => Applied::answer(reply, self.mark_taken_over(&ids, &takeover, now, changes)),
            Op::Restore { task, reply } => {
                Applied::answer(reply, self.restore(*task, now, changes))
            }
            Op::Flush { reply } => Applied::answer(reply, Ok(())),
        }
    }

    /// Inserts each task on its own; a storage error fails them all.
    fn insert_all(
        &mut self,
        tasks: Vec<Task>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Outcomes, StoreError> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            match self.insert(task, now, changes) {
                // The transaction may hold part of it: all or nothing.
                Err(e @ StoreError::Db(_)) => return Err(e),
                o => out.push(o),
            }
        }
        Ok(out)
    }

    fn forget_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let requeued = self.requeue_agent(agent, now, changes)?;
        self.txn.open_table(AGENTS).db()?.remove(agent).db()?;
        Ok(requeued)
    }

    fn insert(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError> {
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
        }
        if !task.idempotency_key.is_empty() {
            let existing = self.idem.get(&task.idempotency_key).map(str::to_string);
            if let Some(id) = existing {
                if let Some(t) = self.read(&id)? {
                    // A key reused for other content is refused, not
                    // answered with the other task.
                    let differs = super::what_differs(
                        t.attributes == task.attributes,
                        t.payload == task.payload,
                    );
                    if let Some(differs) = differs {
                        return Err(StoreError::KeyReused {
                            key: task.idempotency_key,
                            task_id: t.task_id,
                            differs,
                        });
                    }
                    return Ok(InsertOutcome::Deduplicated(t));
                }
            }
        }
        task.set_state(TaskState::Queued);
        task.version = 1;
        clear_lease(&mut task);
        if task.created_unix_ms == 0 {
            task.created_unix_ms = now;
        }
        if task.updated_unix_ms == 0 {
            task.updated_unix_ms = now;
        }
        // One lookup: the insert returns what the id held, which is put back
        // when the id was taken (a retried forward).
        let previous = self
            .tasks
            .insert(task.task_id.as_str(), task.encode_to_vec().as_slice())
            .db()?
            .map(|old| old.value().to_vec());
        if let Some(old) = previous {
            self.tasks
                .insert(task.task_id.as_str(), old.as_slice())
                .db()?;
            return Ok(InsertOutcome::Deduplicated(decode(&task.task_id, &old)?));
        }
        if !task.idempotency_key.is_empty() {
            self.idem.stage(&task.idempotency_key, &task.task_id);
        }
        self.queue.insert(queue_key(&task), ()).db()?;
        changes.push(Change {
            before: None,
            after: TaskState::Queued,
            task: self.watched.then(|| task.clone()),
        });
        Ok(InsertOutcome::Created(task))
    }

    fn lease(
        &mut self,
        agent: &str,
        max: usize,
        skip: Option<&std::collections::HashSet<String>>,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let mut keys = Vec::with_capacity(max);
        // Bounded: at most `max` taken plus every skipped id passed over.
        let budget = max.saturating_add(skip.map_or(0, |s| s.len()));
        for entry in self.queue.iter().db()?.take(budget) {
            let (k, _) = entry.db()?;
            let (p, c, id) = k.value();
            if skip.is_some_and(|s| s.contains(id)) {
                continue;
            }
            keys.push((p, c, id.to_string()));
            if keys.len() == max {
                break;
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for (p, c, id) in keys {
            self.queue.remove((p, c, id.as_str())).db()?;
            let mut task = match self.read(&id) {
                Ok(Some(t)) if t.state() == TaskState::Queued => t,
                Ok(_) => {
                    tracing::warn!(task_id = %id, "dropping a stale queue entry");
                    continue;
                }
                Err(StoreError::Db(e)) => return Err(StoreError::Db(e)),
                Err(e) => {
                    // Out of the queue, so leasing never trips on it again.
                    self.shared.undecodable(&e);
                    continue;
                }
            };
            task.set_state(TaskState::Leased);
            task.agent_id = agent.to_string();
            task.lease_deadline_unix_ms = deadline;
            task.attempts = task.attempts.saturating_add(1);
            touch(&mut task, now);
            self.write(&task)?;
            self.leases.insert((deadline, id.as_str()), agent).db()?;
            changes.push(Change::of(Some(TaskState::Queued), &task));
            out.push(task);
        }
        Ok(out)
    }

    /// The task, if `agent` holds its lease; else the right refusal.
    fn held(&self, agent: &str, id: &str) -> Result<Task, StoreError> {
        let task = self.must_read(id)?;
        if is_terminal(task.state()) {
            return Err(StoreError::Terminal {
                task_id: id.to_string(),
                state: state_name(task.state()),
            });
        }
        if task.state() != TaskState::Leased || task.agent_id != agent || agent.is_empty() {
            let holder = if task.state() == TaskState::Leased {
                task.agent_id.clone()
            } else {
                String::new()
            };
            return Err(StoreError::NotLeaseHolder {
                task_id: id.to_string(),
                holder,
            });
        }
        Ok(task)
    }

    fn renew(
        &mut self,
        agent: &str,
        id: &str,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id)?;
        self.unindex(&task)?;
        task.lease_deadline_unix_ms = deadline;
        touch(&mut task, now);
        self.write(&task)?;
        self.leases.insert((deadline, id), agent).db()?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        agent: &str,
        id: &str,
        success: bool,
        result: Vec<u8>,
        error: String,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id)?;
        self.unindex(&task)?;
        task.set_state(if success {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        });
        clear_lease(&mut task);
        task.result = result;
        task.error = error;
        touch(&mut task, now);
        self.write(&task)?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    fn cancel(
        &mut self,
        id: &str,
        reason: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<CancelOutcome, StoreError> {
        let mut task = self.must_read(id)?;
        if is_terminal(task.state()) {
            return Ok(CancelOutcome {
                task,
                cancelled: false,
            });
        }
        let before = task.state();
        self.unindex(&task)?;
        task.set_state(TaskState::Cancelled);
        clear_lease(&mut task);
        task.error = if reason.is_empty() {
            "cancelled".to_string()
        } else {
            reason.to_string()
        };
        touch(&mut task, now);
        self.write(&task)?;
        changes.push(Change::of(Some(before), &task));
        Ok(CancelOutcome {
            task,
            cancelled: true,
        })
    }

    /// Moves a LEASED task back to QUEUED (attempts kept).
    fn requeue(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        self.unindex(&task)?;
        task.set_state(TaskState::Queued);
        clear_lease(&mut task);
        touch(&mut task, now);
        self.write(&task)?;
        self.queue.insert(queue_key(&task), ()).db()?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    /// Removes the lease index entries and returns the tasks behind them that
    /// are really LEASED with that deadline (stale entries are dropped).
    fn take_leased(&mut self, keys: Vec<(i64, String)>) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for (deadline, id) in keys {
            match self.read(&id) {
                Ok(Some(t))
                    if t.state() == TaskState::Leased && t.lease_deadline_unix_ms == deadline =>
                {
                    out.push(t);
                }
                Ok(_) => {
                    tracing::warn!(task_id = %id, "dropping a stale lease entry");
                    self.leases.remove((deadline, id.as_str())).db()?;
                }
                Err(StoreError::Db(e)) => return Err(StoreError::Db(e)),
                Err(e) => {
                    self.shared.undecodable(&e);
                    self.leases.remove((deadline, id.as_str())).db()?;
                }
            }
        }
        Ok(out)
    }

    fn expire(
        &mut self,
        max_attempts: u32,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let mut keys = Vec::new();
        for entry in self.leases.iter().db()?.take(MAX_EXPIRE_BATCH) {
            let (k, _) = entry.db()?;
            let (deadline, id) = k.value();
            if deadline >= now {
                break;
            }
            keys.push((deadline, id.to_string()));
        }
        let mut out = Vec::with_capacity(keys.len());
        for mut task in self.take_leased(keys)? {
            if task.attempts >= max_attempts {
                self.unindex(&task)?;
                task.set_state(TaskState::Failed);
                clear_lease(&mut task);
                task.error = format!("lease expired {} times (agent lost)", task.attempts);
                touch(&mut task, now);
                self.write(&task)?;
                changes.push(Change::of(Some(TaskState::Leased), &task));
                out.push(task);
            } else {
                out.push(self.requeue(task, now, changes)?);
            }
        }
        Ok(out)
    }

    fn requeue_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        // The lease table holds only in-flight leases (bounded by the agents'
        // slots), so a scan is cheap.
        let mut keys = Vec::new();
        for entry in self.leases.iter().db()? {
            let (k, v) = entry.db()?;
            if v.value() == agent {
                let (deadline, id) = k.value();
                keys.push((deadline, id.to_string()));
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for task in self.take_leased(keys)? {
            out.push(self.requeue(task, now, changes)?);
        }
        Ok(out)
    }

    fn restore(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, StoreError> {
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
        }
        if self.tasks.get(task.task_id.as_str()).db()?.is_some() {
            return Ok(false);
        }
        if TaskState::try_from(task.state).is_err() {
            return Err(StoreError::Invalid(format!(
                "task {}: unknown state {}",
                task.task_id, task.state
            )));
        }
        if !is_terminal(task.state()) {
            task.set_state(TaskState::Queued);
            clear_lease(&mut task);
        }
        if task.updated_unix_ms == 0 {
            task.updated_unix_ms = now;
        }
        if task.created_unix_ms == 0 {
            task.created_unix_ms = now;
        }
        self.write(&task)?;
        if task.state() == TaskState::Queued {
            self.queue.insert(queue_key(&task), ()).db()?;
        }
        if !task.idempotency_key.is_empty() && self.idem.get(&task.idempotency_key).is_none() {
            self.idem.stage(&task.idempotency_key, &task.task_id);
        }
        changes.push(Change {
            before: None,
            after: task.state(),
            task: self.watched.then_some(task),
        });
        Ok(true)
    }

    fn put_agent(&mut self, record: &AgentRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| StoreError::Invalid(format!("agent record: {e}")))?;
        self.txn
            .open_table(AGENTS)
            .db()?
            .insert(record.id.as_str(), bytes.as_slice())
            .db()?;
        Ok(())
    }

    /// Moves every lease due before `deadline` to `deadline`.
    fn extend_leases(
        &mut self,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let mut keys = Vec::new();
        for entry in self.leases.iter().db()? {
            let (k, _) = entry.db()?;
            let (due, id) = k.value();
            if due >= deadline {
                break;
            }
            keys.push((due, id.to_string()));
        }
        let mut out = Vec::with_capacity(keys.len());
        for mut task in self.take_leased(keys)? {
            self.unindex(&task)?;
            task.lease_deadline_unix_ms = deadline;
            touch(&mut task, now);
            self.write(&task)?;
            self.leases
                .insert((deadline, task.task_id.as_str()), task.agent_id.as_str())
                .db()?;
            changes.push(Change::of(Some(TaskState::Leased), &task));
            out.push(task);
        }
        Ok(out)
    }

    fn mark_taken_over(
        &mut self,
        ids: &[String],
        takeover: &Takeover,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            let mut task = match self.read(id) {
                Ok(Some(t)) if !is_terminal(t.state()) => t,
                Ok(_) => continue,
                Err(StoreError::Db(e)) => return Err(StoreError::Db(e)),
                Err(e) => {
                    self.shared.undecodable(&e);
                    continue;
                }
            };
            let before = task.state();
            self.unindex(&task)?;
            task.set_state(TaskState::Cancelled);
            clear_lease(&mut task);
            task.error = format!(
                "taken over by region {} (epoch {} of {})",
                takeover.to_region, takeover.from_epoch, takeover.from_region
            );
            task.taken_over = Some(takeover.clone());
            touch(&mut task, now);
            self.write(&task)?;
            changes.push(Change::of(Some(before), &task));
            out.push(task);
        }
        Ok(out)
    }
}
