//! [`RedbStore`]: the embedded store's facade (open, the read paths) over
//! the redb file; its writer's requests go through [`Requests`]. See the
//! parent module for the guarantees. Opening soundly is in `open`, the
//! persisted counts in `counters`, the idempotency index in `idempotency`,
//! the background check of the whole file in `verify` (through the file
//! backend in `preserving`), the decision records staged in the task's own
//! transaction in `pending`, the writer thread in `writer`, and the
//! operations inside a write transaction in `tables`.

mod counters;
mod idempotency;
mod logged;
mod open;
mod pending;
mod preserving;
mod tables;
mod verify;
mod wal;
mod writer;

pub use open::{FILE, read_log_head};
pub(crate) use open::{damaged, guarded, open_checked};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use federation_api::{Task, TaskState};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

pub use verify::Verification;
#[cfg(test)]
pub(crate) use wal::frame_spans;
pub(crate) use wal::replay_into;
pub use wal::replay_into as replay_wal;
pub use wal::{Checkpoints, WAL_FILE};

use open::{Loaded, check_witness, load, log_head_in, open_lazy, write_mark};
use writer::writer_loop;

use super::requests::Requests;
use super::witness::{self, Mark};
use super::{AgentRecord, Clock, StoreError, SystemClock};

/// The most requests one write transaction applies (one fsync).
pub const MAX_BATCH: usize = 1024;
/// The most expired leases one `expire_leases` call handles.
pub(super) const MAX_EXPIRE_BATCH: usize = 10_000;
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Idempotency keys of earlier versions, which kept them in this table;
/// taken over once at open into [`idempotency::IDEM_KEYS`], then dropped.
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
    /// The PostgreSQL store's writer: transactions in flight at most
    /// (`node.store.writer_transactions`; the embedded store has one).
    pub writer_transactions: usize,
    /// When the write-ahead log is checkpointed into the database file.
    pub checkpoints: Checkpoints,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            accept_loss: false,
            // As `node.store.writer_transactions`'s default.
            writer_transactions: 1,
            checkpoints: Checkpoints::default(),
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
            .field("counts", &self.inner.shared.counts())
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    db: GuardedDb,
    /// The write-ahead log: every write to `db` holds its lock.
    wal: Arc<wal::Wal>,
    tx: Requests,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    /// The background check of the whole file, stopped with the store.
    verifier: verify::Verifier,
}

/// State shared by the callers and the writer thread: what both backends
/// share, and the embedded store's marks.
struct Shared {
    core: super::shared::Shared,
    /// The store's marks as of the last commit (written in `marks` too).
    mark: Mutex<Mark>,
    /// Keeps `tasks.hwm` up to date; dropped (final write) with the store.
    witness: witness::Writer,
    /// What the background check of the file found so far.
    verification: Mutex<Verification>,
    /// The newest `created_unix_ms` of a task created in the store (not
    /// taken over), as of the last commit (written in `counts` too).
    newest_created: std::sync::atomic::AtomicI64,
}

impl std::ops::Deref for Shared {
    type Target = super::shared::Shared;

    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

/// The database handle, whose drop (redb closes the file with a commit of
/// its allocator state) runs in a panic guard: a file damaged under an open
/// store (the integrity check runs in the background) must not make
/// dropping the store a panic.
struct GuardedDb(Option<Arc<Database>>);

impl std::ops::Deref for GuardedDb {
    type Target = Arc<Database>;

    fn deref(&self) -> &Arc<Database> {
        // `None` only inside `drop`.
        self.0
            .as_ref()
            .expect("the database until the store is dropped")
    }
}

impl Drop for GuardedDb {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db))).is_err() {
                tracing::error!(
                    "closing the task store's file failed (the file is damaged); run `federation store check`"
                );
            }
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
        self.verifier.stop();
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
    /// A weak handle on the store's state (see [`super::TaskStore::released`]).
    pub(super) fn weak(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let inner: Arc<dyn std::any::Any + Send + Sync> = self.inner.clone();
        Arc::downgrade(&inner)
    }

    /// Opens (creating if needed) `<dir>/tasks.redb`, recovering it after a
    /// crash, and reads the persisted counters (no record is read: the whole
    /// file is checked in the background, see [`RedbStore::verification`]).
    /// Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// [`TaskStore::open`] with options (an injected clock).
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Db(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let opened = guarded(&path, || -> Result<_, StoreError> {
            let (db, slot) = open_lazy(&path)?;
            // The frames the file lacks first: everything after reads the
            // store as acknowledged.
            let wal = wal::Wal::open(dir, &db, options.checkpoints)?;
            // Create the tables so that readers always find them (a table
            // whose definition does not read back is damage).
            create_tables(&db).map_err(|e| open::classify(&path, e))?;
            let loaded = load(&db, &path)?;
            Ok((db, slot, wal, loaded))
        })?;
        let (db, slot, wal, loaded) = opened;
        let wal = Arc::new(wal);
        let Loaded {
            counts,
            records,
            stored,
            undecodable,
            newest_created,
        } = loaded;
        let mark = check_witness(dir, &path, stored, records, options.accept_loss)?;
        if stored != Some(mark) {
            // A store from before the marks were kept: they start here (and
            // the counts with them).
            guarded(&path, || {
                let txn = logged::Txn::new(db.begin_write().db()?);
                write_mark(&txn, mark)?;
                counters::write(&txn, counts, mark.commit, newest_created)?;
                txn.commit_durable()
            })?;
        }
        let witness = witness::Writer::start(dir, mark)
            .map_err(|e| StoreError::Db(format!("starting the witness thread: {e}")))?;
        let shared = Arc::new(Shared {
            core: super::shared::Shared::new(counts, options.clock),
            mark: Mutex::new(mark),
            witness,
            verification: Mutex::new(Verification::Running),
            newest_created: std::sync::atomic::AtomicI64::new(newest_created),
        });
        for e in &undecodable {
            shared.undecodable(e);
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        // The check pins the commit the store opened at before the writer
        // starts: a commit of the writer's is in redb's memory (its frame
        // in the log) until a checkpoint, not in the file the check reads.
        let verifier = verify::Verifier::start(&db, &slot, &path, &shared)?;
        let writer = {
            let db = Arc::clone(&db);
            let shared = Arc::clone(&shared);
            let wal = Arc::clone(&wal);
            std::thread::Builder::new()
                .name("task-store-writer".into())
                .spawn(move || writer_loop(&db, &wal, &shared, rx))
                .map_err(|e| {
                    verifier.stop();
                    StoreError::Db(format!("starting the writer thread: {e}"))
                })?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                db: GuardedDb(Some(db)),
                wal,
                tx: Requests::new(tx),
                writer: Mutex::new(Some(writer)),
                shared,
                verifier,
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

    /// What the callers and the writer share ([`super::TaskStore`]'s
    /// counts, change feed, commits, undecodable records and journal).
    pub(super) fn shared(&self) -> &super::shared::Shared {
        &self.inner.shared
    }

    /// Records the decision log's head (its last durable record) in the
    /// store, durable (a frame of the write-ahead log) before it returns,
    /// as the log's anchor outside its own file (see
    /// [`crate::audit::anchor`]). Blocking: call off the async workers.
    pub fn record_log_head(&self, seq: u64, hash: &str) -> Result<(), StoreError> {
        guarded(&self.inner.path, || {
            let mut wal = self.inner.wal.lock();
            let txn = wal.begin(&self.inner.db)?;
            {
                let mut meta = txn.open(META)?;
                meta.insert(META_LOG_HEAD, format!("{seq} {hash}").as_bytes())
                    .db()?;
            }
            // The log's file holds every staged record up to its head.
            pending::drop_durable(&txn, seq)?;
            wal.commit(txn)
        })
    }

    /// The decision log's head last recorded by [`TaskStore::record_log_head`].
    pub fn log_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        guarded(&self.inner.path, || log_head_in(&**self.inner.db))
    }

    /// What the background check of the whole file (every page checksum,
    /// every record decoded, as of the commit the store opened at) has found
    /// so far.
    pub fn verification(&self) -> Verification {
        self.inner
            .shared
            .verification
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads a task. An undecodable record is [`StoreError::Corrupt`] (and
    /// reported, see [`TaskStore::undecodable`]).
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        let task = guarded(&self.inner.path, || {
            let txn = self.inner.db.begin_read().db()?;
            let table = txn.open_table(TASKS).db()?;
            let bytes = table.get(task_id).db()?;
            bytes.map(|b| decode(task_id, b.value())).transpose()
        });
        if let Err(e) = &task {
            self.inner.shared.undecodable(e);
        }
        task
    }

    /// The newest `created_unix_ms` of a task created in this store (taken
    /// over ones aside), as of the last commit; 0 when none. Persisted with
    /// the counts, so O(1).
    pub fn newest_created_ms(&self) -> i64 {
        self.inner
            .shared
            .newest_created
            .load(std::sync::atomic::Ordering::Acquire)
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
        guarded(&self.inner.path, || self.agents_unguarded())
    }

    fn agents_unguarded(&self) -> Result<Vec<AgentRecord>, StoreError> {
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

    /// Every QUEUED task in lease order, then every LEASED task by deadline.
    pub fn pending(&self) -> Result<Vec<Task>, StoreError> {
        guarded(&self.inner.path, || self.pending_unguarded())
    }

    fn pending_unguarded(&self) -> Result<Vec<Task>, StoreError> {
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
        keep: impl FnMut(&Task) -> bool,
    ) -> Result<(Vec<Task>, Option<String>), StoreError> {
        guarded(&self.inner.path, || {
            self.scan_unguarded(after, limit, max_scan, keep)
        })
    }

    fn scan_unguarded(
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
}

fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        txn.open_table(TASKS)?;
        txn.open_table(QUEUE)?;
        txn.open_table(LEASES)?;
        txn.open_table(AGENTS)?;
        txn.open_table(MARKS)?;
        txn.open_table(META)?;
        txn.open_table(idempotency::IDEM_KEYS)?;
        txn.open_table(counters::COUNTS)?;
    }
    txn.commit()?;
    Ok(())
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
