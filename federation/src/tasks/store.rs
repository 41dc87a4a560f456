//! [`RedbStore`]: the embedded store's facade (open, the read paths) over
//! the redb file; its writer's requests go through [`Requests`]. See the
//! parent module for the guarantees. Opening soundly is in `open`, the
//! idempotency index in `idempotency`, the writer thread in `writer`, and
//! the operations inside a write transaction in `tables`.

mod idempotency;
mod open;
mod pending;
mod tables;
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

use open::{Rebuilt, check_witness, log_head_in, rebuild, write_mark};
use writer::writer_loop;

use super::requests::Requests;
use super::witness::{self, Mark};
use super::{AgentRecord, Clock, StoreError, SystemClock};

/// The most requests one write transaction applies (one fsync).
pub const MAX_BATCH: usize = 1024;
/// The most expired leases one `expire_leases` call handles.
pub(super) const MAX_EXPIRE_BATCH: usize = 10_000;
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
            .field("counts", &self.inner.shared.counts())
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

/// State shared by the callers and the writer thread: what both backends
/// share, and the embedded store's marks.
struct Shared {
    core: super::shared::Shared,
    /// The store's marks as of the last commit (written in `marks` too).
    mark: Mutex<Mark>,
    /// Keeps `tasks.hwm` up to date; dropped (final write) with the store.
    witness: witness::Writer,
}

impl std::ops::Deref for Shared {
    type Target = super::shared::Shared;

    fn deref(&self) -> &Self::Target {
        &self.core
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
        let shared = Arc::new(Shared {
            core: super::shared::Shared::new(counts, options.clock),
            mark: Mutex::new(mark),
            witness,
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

    /// What the callers and the writer share ([`super::TaskStore`]'s
    /// counts, change feed, commits, undecodable records and journal).
    pub(super) fn shared(&self) -> &super::shared::Shared {
        &self.inner.shared
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
        // The log's file holds every staged record up to its head.
        pending::drop_durable(&txn, seq)?;
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
