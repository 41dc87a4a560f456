//! [`PgStore`]: the task store in a region's PostgreSQL database
//! (`node.store.backend: postgres`), with the same behaviour contract as the
//! embedded store (the store's contract tests run against both).
//!
//! Every mutation goes through one writer thread per controller, as in the
//! embedded store: it takes the waiting requests, applies them in one
//! transaction in arrival order and commits once (synchronous commit), then
//! answers each caller. The decision records that inserts carry are
//! appended to the region's chain in that same transaction
//! ([`crate::audit::postgres::append_in`]): a task and the record naming it
//! are committed together or not at all. Rows a mutation changes are locked
//! (`FOR UPDATE`; leasing and expiry skip rows another transaction holds),
//! and idempotency keys are unique per region in the database (a partial
//! unique index), not in memory. Reads go to the database through the pool.
//!
//! **Watches across replicas.** Each commit also sends `NOTIFY
//! federation_tasks` with the ids it changed (delivered by the server at
//! commit); every store keeps one connection that LISTENs, reads the tasks
//! another replica changed and publishes them on [`PgStore::subscribe`] (and
//! wakes [`PgStore::wait_for_queued`]). The delay is one notification plus
//! one read, after the other replica's commit; a listener whose connection
//! breaks reconnects every second, and changes notified meanwhile are not
//! replayed (a watch then sees the task's next change).
//!
//! Table layout (schema in [`crate::pg`]): `tasks` (one row per task: the
//! prost-encoded task in `body`, with its state, priority, creation time,
//! lease deadline, agent and idempotency key as columns for the indexes),
//! `agents`, `store_meta`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use federation_api::{Takeover, Task, TaskState};
use prost::Message;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use tokio_postgres::Transaction;

use super::journal::Journal;
use super::requests::{self, Applied, Op, Outcomes, Reply, Requests, Settled, ttl_ms};
use super::store::{
    EVENT_CAPACITY, MAX_EXPIRE_BATCH, MAX_LISTED_UNDECODABLE, clear_lease, decode, touch,
};
use super::witness::Mark;
use super::{
    AgentRecord, CancelOutcome, Clock, Counts, InsertOutcome, MAX_BATCH, RecordState, StoreError,
    is_terminal, state_name,
};
use crate::pg::{Pg, PgError};

/// [`store_meta`](crate::pg) key of the decision log's head.
const META_LOG_HEAD: &str = "log_head";

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unreachable { .. } => StoreError::Unavailable(e.to_string()),
            other => StoreError::Db(other.to_string()),
        }
    }
}

/// The task store of one region in its PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.inner.pg.target())
            .field("region", &self.inner.region)
            .finish()
    }
}

struct Inner {
    pg: Pg,
    region: String,
    path: PathBuf,
    tx: Requests,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    /// Dropped with the store: the listener stops.
    _listener: oneshot::Sender<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.tx.close();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(target = %self.pg.target(), "task store writer thread panicked");
            }
        }
    }
}

struct Shared {
    counts: Mutex<Counts>,
    events: broadcast::Sender<Task>,
    queued: Notify,
    clock: Arc<dyn Clock>,
    commits: AtomicU64,
    created: AtomicU64,
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
    undecodable: Mutex<BTreeMap<String, String>>,
    /// This store's name in notifications (its own are not read back).
    instance: String,
    /// Where inserts append the records they carry, bound once.
    journal: OnceLock<Arc<dyn Journal>>,
}

/// The channel of change notifications.
const CHANNEL: &str = "federation_tasks";
/// The most bytes of task ids one notification carries (the server's
/// limit is 8000).
const NOTIFY_BYTES: usize = 7000;

impl Shared {
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

/// A task's row values besides its body.
fn state_code(t: &Task) -> i16 {
    i16::try_from(t.state).unwrap_or(0)
}

fn key_of(t: &Task) -> Option<&str> {
    (!t.idempotency_key.is_empty()).then_some(t.idempotency_key.as_str())
}

impl PgStore {
    /// Opens `region`'s task store in `pg` (schema already migrated by
    /// [`Pg::connect`]) and counts its tasks.
    pub fn open(pg: &Pg, region: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let pg2 = pg.clone();
        let region2 = region.to_string();
        let (counts, created) = pg.block(async move {
            let client = pg2.client().await?;
            let rows = client
                .query(
                    "SELECT state, count(*) FROM tasks WHERE region = $1 GROUP BY state",
                    &[&region2],
                )
                .await
                .map_err(|e| pg2.db(&e))?;
            let mut counts = Counts::default();
            let mut created = 0u64;
            for r in rows {
                let state: i16 = r.get(0);
                let n: i64 = r.get(1);
                created += u64::try_from(n).unwrap_or(0);
                if let Ok(s) = TaskState::try_from(i32::from(state)) {
                    counts.add(s, n);
                }
            }
            Ok((counts, created))
        })?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            counts: Mutex::new(counts),
            events,
            queued: Notify::new(),
            clock,
            commits: AtomicU64::new(0),
            created: AtomicU64::new(created),
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
            ),
            undecodable: Mutex::new(BTreeMap::new()),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            journal: OnceLock::new(),
        });
        let (stop, stopped) = oneshot::channel();
        pg.handle().spawn(listen(
            pg.config().clone(),
            pg.pool(),
            pg.target().to_string(),
            region.to_string(),
            Arc::clone(&shared),
            stopped,
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = {
            let pg = pg.clone();
            let shared = Arc::clone(&shared);
            let region = region.to_string();
            std::thread::Builder::new()
                .name("task-store-writer".into())
                .spawn(move || writer_loop(&pg, &region, &shared, rx))
                .map_err(|e| StoreError::Db(format!("starting the writer thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pg: pg.clone(),
                region: region.to_string(),
                path: PathBuf::from(format!("postgres://{}#tasks", pg.target())),
                tx: Requests::new(tx),
                writer: Mutex::new(Some(writer)),
                shared,
                _listener: stop,
            }),
        })
    }

    /// `postgres://host:port/db#tasks`, for messages.
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
            .map_err(|_| super::store::bound_twice())
    }

    /// Records the decision log's head in `store_meta`.
    pub fn record_log_head(&self, seq: u64, hash: &str) -> Result<(), StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let value = format!("{seq} {hash}");
        Ok(self.inner.pg.block(async move {
            let client = pg.client().await?;
            client
                .execute(
                    "INSERT INTO store_meta (region, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (region, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&region, &META_LOG_HEAD, &value],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(())
        })?)
    }

    /// The head last recorded by [`PgStore::record_log_head`].
    pub fn log_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let text = self.inner.pg.block(async move {
            let client = pg.client().await?;
            let row = client
                .query_opt(
                    "SELECT value FROM store_meta WHERE region = $1 AND key = $2",
                    &[&region, &META_LOG_HEAD],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(row.map(|r| r.get::<_, String>(0)))
        })?;
        let Some(text) = text else { return Ok(None) };
        text.split_once(' ')
            .and_then(|(seq, hash)| Some((seq.parse::<u64>().ok()?, hash.to_string())))
            .map(Some)
            .ok_or_else(|| StoreError::Db(format!("recorded log head is malformed: `{text}`")))
    }

    /// Reads a task.
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let id = task_id.to_string();
        let bytes = self.inner.pg.block(async move {
            let client = pg.client().await?;
            let row = client
                .query_opt(
                    "SELECT body FROM tasks WHERE region = $1 AND task_id = $2",
                    &[&region, &id],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })?;
        let task = bytes.map(|b| decode(task_id, &b)).transpose();
        if let Err(e) = &task {
            self.inner.shared.undecodable(e);
        }
        task
    }

    /// Undecodable records found by scans so far.
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

    /// Commits since open, and tasks created (counted from the database at
    /// open, then by this controller).
    pub fn mark(&self) -> Mark {
        Mark {
            commit: self.inner.shared.commits.load(Ordering::Relaxed),
            created: self.inner.shared.created.load(Ordering::Relaxed),
        }
    }

    /// See [`super::TaskStore::lead`]: one statement    /// See [`super::TaskStore::lead`]: one statement on the database's
    /// clock; a new leader's token is the previous one plus one.
    pub async fn lead(&self, replica: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let replica = replica.to_string();
        let instance = self.inner.shared.instance.clone();
        let ms = ttl_ms(ttl);
        Ok(self
            .inner
            .pg
            .run(async move {
                let client = pg.client().await?;
                let row = client
                    .query_opt(
                        "INSERT INTO region_leaders AS l (region, replica, instance, token, expires_at) \
                         VALUES ($1, $2, $3, 1, now() + $4 * interval '1 millisecond') \
                         ON CONFLICT (region) DO UPDATE SET replica = EXCLUDED.replica, \
                           instance = EXCLUDED.instance, expires_at = EXCLUDED.expires_at, \
                           token = CASE WHEN l.instance = EXCLUDED.instance THEN l.token ELSE l.token + 1 END \
                         WHERE l.instance = EXCLUDED.instance OR l.expires_at < now() \
                         RETURNING token",
                        &[&region, &replica, &instance, &(ms as f64)],
                    )
                    .await
                    .map_err(|e| pg.db(&e))?;
                Ok(row.map(|r| r.get::<_, i64>(0)))
            })
            .await?)
    }

    /// Claims `replica` as this store's name in the region: refused
    /// ([`StoreError::ReplicaInUse`]) while another running controller
    /// keeps the name fresh. A name last refreshed more than `stale` ago is
    /// taken over (a replica that restarted waits at most that long).
    /// Bounded: gives up after twice `stale`.
    pub async fn claim_replica(&self, replica: &str, stale: Duration) -> Result<(), StoreError> {
        let until = std::time::Instant::now() + stale * 2;
        loop {
            if self.refresh_replica(replica, stale).await? {
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                return Err(StoreError::ReplicaInUse(format!(
                    "node.replica `{replica}` is in use by another running controller of region {} \
                     (it refreshed the name within the last {stale:?}); give each replica of a region \
                     its own name",
                    self.inner.region
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Keeps `replica` this store's name (refreshes it); false when another
    /// instance refreshed it within `stale`.
    pub async fn refresh_replica(
        &self,
        replica: &str,
        stale: Duration,
    ) -> Result<bool, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let replica = replica.to_string();
        let instance = self.inner.shared.instance.clone();
        let ms = ttl_ms(stale) as f64;
        Ok(self
            .inner
            .pg
            .run(async move {
                let client = pg.client().await?;
                let row = client
                    .query_opt(
                        "INSERT INTO replicas AS r (region, replica, instance, seen_at) \
                         VALUES ($1, $2, $3, now()) \
                         ON CONFLICT (region, replica) DO UPDATE SET instance = EXCLUDED.instance, \
                           seen_at = now() \
                         WHERE r.instance = EXCLUDED.instance \
                            OR r.seen_at < now() - $4 * interval '1 millisecond' \
                         RETURNING 1",
                        &[&region, &replica, &instance, &ms],
                    )
                    .await
                    .map_err(|e| pg.db(&e))?;
                Ok(row.is_some())
            })
            .await?)
    }

    /// Every registered agent of the region, by id.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let rows = self.inner.pg.block(async move {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT agent_id, record FROM agents WHERE region = $1 ORDER BY agent_id",
                    &[&region],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect::<Vec<_>>())
        })?;
        let mut out = Vec::new();
        for (id, bytes) in rows {
            match serde_json::from_slice::<AgentRecord>(&bytes) {
                Ok(mut record) => {
                    record.id = id;
                    out.push(record);
                }
                Err(e) => {
                    tracing::error!(agent_id = %id, error = %e, "skipping an undecodable agent record");
                }
            }
        }
        Ok(out)
    }

    /// Task counts by state: counted at open, then moved by this
    /// controller's changes.
    pub fn counts(&self) -> Counts {
        *self
            .inner
            .shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Transactions committed since open.
    pub fn commits(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Seconds per commit, for metrics.
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.shared.commit_seconds.clone()
    }

    /// Every QUEUED task in lease order, then every LEASED task by deadline.
    pub fn pending(&self) -> Result<Vec<Task>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let rows = self.inner.pg.block(async move {
            let client = pg.client().await?;
            let mut rows = client
                .query(
                    "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 1 \
                     ORDER BY priority DESC, created_ms, task_id",
                    &[&region],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            rows.extend(
                client
                    .query(
                        "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 2 \
                         ORDER BY lease_deadline_ms, task_id",
                        &[&region],
                    )
                    .await
                    .map_err(|e| pg.db(&e))?,
            );
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect::<Vec<_>>())
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, body) in rows {
            match decode(&id, &body) {
                Ok(t) => out.push(t),
                Err(e) => self.inner.shared.undecodable(&e),
            }
        }
        Ok(out)
    }

    /// See [`super::TaskStore::scan`].
    pub fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&Task) -> bool,
    ) -> Result<(Vec<Task>, Option<String>), StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let after = after.unwrap_or("").to_string();
        // One row past the budget tells whether records remain.
        let fetch = i64::try_from(max_scan.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = self.inner.pg.block(async move {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id > $2 \
                     ORDER BY task_id LIMIT $3",
                    &[&region, &after, &fetch],
                )
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect::<Vec<_>>())
        })?;
        let mut kept = Vec::new();
        let mut last = None;
        for (scanned, (id, body)) in rows.into_iter().enumerate() {
            if kept.len() >= limit || scanned >= max_scan {
                return Ok((kept, last));
            }
            match decode(&id, &body) {
                Ok(task) if keep(&task) => kept.push(task),
                Ok(_) => {}
                Err(e) => self.inner.shared.undecodable(&e),
            }
            last = Some(id);
        }
        Ok((kept, None))
    }

    /// Every state change made through this controller, after its commit.
    pub fn subscribe(&self) -> broadcast::Receiver<Task> {
        self.inner.shared.events.subscribe()
    }

    /// See [`super::TaskStore::wait_for_queued`].
    pub async fn wait_for_queued(&self, timeout: Duration) -> bool {
        let notified = self.inner.shared.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.counts().queued > 0 {
            return true;
        }
        tokio::time::timeout(timeout, notified).await.is_ok()
    }

    /// Checks that the database answers (a `SELECT 1` within `patience`).
    pub async fn ping(&self, patience: Duration) -> Result<(), StoreError> {
        let pg = self.inner.pg.clone();
        let asked = self.inner.pg.run(async move {
            let client = pg.client().await?;
            client
                .query_one("SELECT 1", &[])
                .await
                .map_err(|e| pg.db(&e))?;
            Ok(())
        });
        match tokio::time::timeout(patience, asked).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL at {}: no answer within {patience:?}",
                self.inner.pg.target()
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

fn writer_loop(pg: &Pg, region: &str, shared: &Arc<Shared>, rx: mpsc::UnboundedReceiver<Op>) {
    let mut requests = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    while let Some(batch) = requests.next_batch() {
        let Some(batch) = requests::only_flushes(batch) else {
            continue;
        };
        let pg2 = pg.clone();
        let region = region.to_string();
        let shared = Arc::clone(shared);
        pg.handle().block_on(async move {
            let journal = shared.journal.get().map(|j| &**j);
            run_batch(&pg2, &region, &shared, journal, batch).await
        });
    }
}

/// A task's change within a batch: its state before (None when new), after,
/// and the task for subscribers.
struct Change {
    before: Option<TaskState>,
    after: TaskState,
    task: Task,
}

/// Mutations of one batch, inside its transaction.
struct Tx<'a, 't> {
    txn: &'a Transaction<'t>,
    pg: &'a Pg,
    region: &'a str,
    shared: &'a Shared,
}

/// A request of a batch on its way through [`run_batch`].
enum Slot {
    /// An insert, staged or answered in [`Slot::Done`] later.
    Insert {
        record: Option<super::journal::Record>,
        reply: oneshot::Sender<super::RecordedInsert>,
    },
    Done(Applied),
}

/// Applies a batch in one transaction with its records appended in it,
/// commits, and answers every request (or fails them all).
async fn run_batch(
    pg: &Pg,
    region: &str,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) {
    let now = shared.clock.now_ms();
    let mut changes = Vec::new();
    let mut client = match pg.client().await {
        Ok(c) => c,
        Err(e) => return requests::fail(Vec::new(), batch, StoreError::from(e)),
    };
    let txn = match client.transaction().await {
        Ok(t) => t,
        Err(e) => return requests::fail(Vec::new(), batch, StoreError::from(pg.db(&e))),
    };
    let t = Tx {
        txn: &txn,
        pg,
        region,
        shared,
    };
    // Inserts are staged and created together (one multi-row INSERT) before
    // any other request runs and at the end: a batch of submits costs a
    // fixed number of round trips, not two per task.
    let known = match t.prefetch(&batch).await {
        Ok(k) => k,
        Err(e) => return requests::fail(Vec::new(), batch, e),
    };
    let mut inserts: Vec<Option<Result<InsertOutcome, StoreError>>> =
        Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter().enumerate();
    let outcome = async {
        let mut staged: Vec<(usize, Task)> = Vec::new();
        for (i, op) in ops.by_ref() {
            inserts.push(None);
            match op {
                Op::Insert {
                    task,
                    record,
                    reply,
                } => {
                    slots.push(Slot::Insert { record, reply });
                    match t.stage(*task, now, &known, &mut staged, i).await? {
                        Staging::Answered(done) => inserts[i] = Some(*done),
                        Staging::Staged => {}
                        Staging::Clash(task) => {
                            t.create_staged(&mut staged, &mut inserts, &mut changes)
                                .await?;
                            let done = t.insert(*task, now, &mut changes).await;
                            if let Some(e) = requests::fatal(&done) {
                                return Err(e.clone());
                            }
                            inserts[i] = Some(done);
                        }
                    }
                }
                op => {
                    let created = t.create_staged(&mut staged, &mut inserts, &mut changes);
                    if let Err(e) = created.await {
                        op.refuse(&e);
                        return Err(e);
                    }
                    let done = t.apply(op, now, &mut changes).await;
                    let fatal = done.fatal().cloned();
                    slots.push(Slot::Done(done));
                    if let Some(e) = fatal {
                        return Err(e);
                    }
                }
            }
        }
        t.create_staged(&mut staged, &mut inserts, &mut changes)
            .await
    }
    .await;
    let applied: Vec<Applied> = slots
        .into_iter()
        .zip(inserts)
        .map(|(slot, result)| match slot {
            Slot::Insert { record, reply } => Applied::Insert {
                result: Box::new(result.unwrap_or_else(|| {
                    Err(StoreError::Db(
                        "internal: a request of the batch was not answered".into(),
                    ))
                })),
                record,
                reply,
            },
            Slot::Done(done) => done,
        })
        .collect();
    let (answers, records) = requests::answers(applied, journal.is_some());
    if let Err(e) = outcome {
        // The transaction is unusable: every caller of the batch hears the
        // error, nothing of it is committed.
        return requests::fail(answers, ops.map(|(_, op)| op), e);
    }
    // The records go into the chain in the transaction of their tasks.
    let head = match journal {
        Some(j) if !records.is_empty() => match j.append_in(&txn, records).await {
            Ok(h) => h,
            Err(e) => return requests::fail(answers, Vec::new(), StoreError::from(pg.db(&e))),
        },
        _ => None,
    };
    // Other replicas hear of the changes when this commits.
    if let Err(e) = notify(&txn, region, &shared.instance, &changes).await {
        return requests::fail(answers, Vec::new(), StoreError::from(pg.db(&e)));
    }
    let started = std::time::Instant::now();
    let committed = txn.commit().await;
    shared
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = committed {
        let err = StoreError::from(pg.db(&e));
        tracing::error!(error = %err, "task store commit failed");
        return requests::fail(answers, Vec::new(), err);
    }
    shared.commits.fetch_add(1, Ordering::Relaxed);
    let created = changes.iter().filter(|c| c.before.is_none()).count() as u64;
    shared.created.fetch_add(created, Ordering::Relaxed);
    let records = match (journal, head) {
        (Some(j), Some(head)) => {
            j.committed(head);
            RecordState::Written
        }
        _ => RecordState::NotWritten,
    };
    let mut any_queued = false;
    {
        let mut counts = shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        for c in &changes {
            if let Some(b) = c.before {
                counts.add(b, -1);
            }
            counts.add(c.after, 1);
            any_queued |= c.after == TaskState::Queued;
        }
    }
    for c in changes {
        let _ = shared.events.send(c.task);
    }
    let settled = Settled {
        committed: Ok(()),
        records,
    };
    for a in answers {
        a.settle(&settled);
    }
    if any_queued {
        shared.queued.notify_waiters();
    }
}

/// Queues the notifications of a batch's changes (sent at commit):
/// `<instance> <region> <id> <id> …`, split to stay under the limit.
async fn notify(
    txn: &Transaction<'_>,
    region: &str,
    instance: &str,
    changes: &[Change],
) -> Result<(), tokio_postgres::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut payloads = Vec::new();
    let head = format!("{instance} {region}");
    let mut current = head.clone();
    for c in changes {
        if current.len() + c.task.task_id.len() + 1 > NOTIFY_BYTES && current.len() > head.len() {
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        current.push(' ');
        current.push_str(&c.task.task_id);
    }
    payloads.push(current);
    txn.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
        &[&CHANNEL, &payloads],
    )
    .await
    .map(|_| ())
}

/// Listens for other replicas' changes of `region` until `stop` fires:
/// reads each notified task and publishes it, and recounts the tasks.
/// Reconnects every second while the database cannot be reached.
async fn listen(
    config: tokio_postgres::Config,
    pool: deadpool_postgres::Pool,
    target: String,
    region: String,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    use futures::StreamExt as _;
    loop {
        let session = async {
            let (client, mut connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(m)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = m {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(target = %target, region = %region, "listening for other replicas' changes");
            while let Some(payload) = rx.recv().await {
                let mut words = payload.split(' ');
                let (Some(from), Some(of)) = (words.next(), words.next()) else {
                    continue;
                };
                if from == shared.instance || of != region {
                    continue;
                }
                let ids: Vec<String> = words.map(str::to_string).collect();
                if let Err(e) = publish(&pool, &region, &shared, &ids).await {
                    tracing::warn!(target = %target, error = %e, "reading tasks another replica changed failed");
                }
            }
            Err::<(), String>("the listening connection closed".into())
        };
        tokio::select! {
            _ = &mut stop => return,
            ended = session => {
                if let Err(e) = ended {
                    tracing::debug!(target = %target, error = %e, "change listener stopped; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Reads the tasks `ids` and publishes them; recounts the region's tasks.
async fn publish(
    pool: &deadpool_postgres::Pool,
    region: &str,
    shared: &Shared,
    ids: &[String],
) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id = ANY($2)",
            &[&region, &ids],
        )
        .await
        .map_err(|e| e.to_string())?;
    let counted = client
        .query(
            "SELECT state, count(*) FROM tasks WHERE region = $1 GROUP BY state",
            &[&region],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut counts = Counts::default();
    for r in counted {
        if let Ok(s) = TaskState::try_from(i32::from(r.get::<_, i16>(0))) {
            counts.add(s, r.get::<_, i64>(1));
        }
    }
    *shared.counts.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    let mut any_queued = false;
    for r in rows {
        let id: &str = r.get(0);
        match decode(id, r.get::<_, &[u8]>(1)) {
            Ok(t) => {
                any_queued |= t.state() == TaskState::Queued;
                let _ = shared.events.send(t);
            }
            Err(e) => shared.undecodable(&e),
        }
    }
    if any_queued {
        shared.queued.notify_waiters();
    }
    Ok(())
}

/// What became of an insert offered to [`Tx::stage`].
enum Staging {
    /// Answered from what is stored.
    Answered(Box<Result<InsertOutcome, StoreError>>),
    /// Staged: answered when the staged tasks are created.
    Staged,
    /// Its id or key is staged already: it takes the one-by-one path after
    /// the staged ones are created.
    Clash(Box<Task>),
}

/// Tasks already stored that a batch's inserts name, by id and by key.
#[derive(Default)]
struct Known {
    by_id: std::collections::HashMap<String, Task>,
    by_key: std::collections::HashMap<String, Task>,
}

impl Tx<'_, '_> {
    /// Creates the staged tasks in one statement and answers them: created,
    /// or (a row another transaction committed meanwhile) answered one by
    /// one as an insert that found its id or key stored.
    async fn create_staged(
        &self,
        staged: &mut Vec<(usize, Task)>,
        results: &mut [Option<Result<InsertOutcome, StoreError>>],
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        let tasks = std::mem::take(staged);
        let ids: Vec<&str> = tasks.iter().map(|(_, t)| t.task_id.as_str()).collect();
        let states: Vec<i16> = tasks.iter().map(|(_, t)| state_code(t)).collect();
        let priorities: Vec<i32> = tasks.iter().map(|(_, t)| t.priority).collect();
        let created: Vec<i64> = tasks.iter().map(|(_, t)| t.created_unix_ms).collect();
        let keys: Vec<Option<&str>> = tasks.iter().map(|(_, t)| key_of(t)).collect();
        let bodies: Vec<Vec<u8>> = tasks.iter().map(|(_, t)| t.encode_to_vec()).collect();
        let rows = self
            .txn
            .query(
                "INSERT INTO tasks (region, task_id, state, priority, created_ms, \
                 lease_deadline_ms, agent_id, idempotency_key, body) \
                 SELECT $1, i, s, p, c, 0, '', k, b \
                 FROM unnest($2::text[], $3::smallint[], $4::integer[], $5::bigint[], \
                             $6::text[], $7::bytea[]) AS u(i, s, p, c, k, b) \
                 ON CONFLICT DO NOTHING RETURNING task_id",
                &[
                    &self.region,
                    &ids,
                    &states,
                    &priorities,
                    &created,
                    &keys,
                    &bodies,
                ],
            )
            .await
            .map_err(|e| self.db(&e))?;
        let inserted: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        for (at, task) in tasks {
            let outcome = if inserted.contains(&task.task_id) {
                changes.push(Change {
                    before: None,
                    after: TaskState::Queued,
                    task: task.clone(),
                });
                Ok(InsertOutcome::Created(task))
            } else {
                let done = self.insert(task, 0, changes).await;
                if let Err(e @ (StoreError::Db(_) | StoreError::Unavailable(_))) = &done {
                    return Err(e.clone());
                }
                done
            };
            results[at] = Some(outcome);
        }
        Ok(())
    }

    /// Reads, in one query, the stored tasks whose id or idempotency key an
    /// insert of the batch names.
    async fn prefetch(&self, ops: &[Op]) -> Result<Known, StoreError> {
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        for op in ops {
            if let Op::Insert { task: t, .. } = op {
                ids.push(t.task_id.clone());
                if !t.idempotency_key.is_empty() {
                    keys.push(t.idempotency_key.clone());
                }
            }
        }
        let mut known = Known::default();
        if ids.is_empty() {
            return Ok(known);
        }
        let rows = self
            .txn
            .query(
                "SELECT task_id, body FROM tasks WHERE region = $1 \
                 AND (task_id = ANY($2) OR idempotency_key = ANY($3))",
                &[&self.region, &ids, &keys],
            )
            .await
            .map_err(|e| self.db(&e))?;
        for r in rows {
            let id: &str = r.get(0);
            // An undecodable one is left to the one-by-one path, which
            // reports it.
            if let Ok(t) = decode(id, r.get::<_, &[u8]>(1)) {
                if !t.idempotency_key.is_empty() {
                    known.by_key.insert(t.idempotency_key.clone(), t.clone());
                }
                known.by_id.insert(t.task_id.clone(), t);
            }
        }
        Ok(known)
    }

    /// Answers an insert from what is known, or stages it (`None`: the
    /// answer comes when the staged tasks are created). An id or key
    /// already staged in this batch creates the staged ones first, then
    /// takes the one-by-one path.
    async fn stage(
        &self,
        mut task: Task,
        now: i64,
        known: &Known,
        staged: &mut Vec<(usize, Task)>,
        at: usize,
    ) -> Result<Staging, StoreError> {
        if task.task_id.is_empty() {
            return Ok(Staging::Answered(Box::new(Err(StoreError::Invalid(
                "task id is empty".into(),
            )))));
        }
        if !task.idempotency_key.is_empty() {
            if let Some(stored) = known.by_key.get(&task.idempotency_key) {
                return Ok(Staging::Answered(Box::new(Self::known_key(
                    &task,
                    stored.clone(),
                ))));
            }
        }
        if let Some(stored) = known.by_id.get(&task.task_id) {
            return Ok(Staging::Answered(Box::new(Ok(
                InsertOutcome::Deduplicated(stored.clone()),
            ))));
        }
        let clash = staged.iter().any(|(_, s)| {
            s.task_id == task.task_id
                || (!task.idempotency_key.is_empty() && s.idempotency_key == task.idempotency_key)
        });
        if clash {
            return Ok(Staging::Clash(Box::new(task)));
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
        staged.push((at, task));
        Ok(Staging::Staged)
    }

    fn db(&self, e: &tokio_postgres::Error) -> StoreError {
        StoreError::from(self.pg.db(e))
    }

    /// Refuses the transaction unless this store holds the region's
    /// leadership with `token` now; the row stays locked (shared) until the
    /// commit, so no other replica takes the leadership meanwhile.
    async fn fenced(&self, token: i64) -> Result<(), StoreError> {
        let row = self
            .txn
            .query_opt(
                "SELECT 1 FROM region_leaders WHERE region = $1 AND instance = $2 \
                 AND token = $3 AND expires_at > now() FOR SHARE",
                &[&self.region, &self.shared.instance, &token],
            )
            .await
            .map_err(|e| self.db(&e))?;
        match row {
            Some(_) => Ok(()),
            None => Err(StoreError::NotLeader(format!(
                "region {}: fencing token {token} is not the current leader's",
                self.region
            ))),
        }
    }

    /// Reads a task and locks its row for this transaction.
    async fn read(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .txn
            .query_opt(
                "SELECT body FROM tasks WHERE region = $1 AND task_id = $2 FOR UPDATE",
                &[&self.region, &id],
            )
            .await
            .map_err(|e| self.db(&e))?;
        row.map(|r| decode(id, r.get::<_, &[u8]>(0))).transpose()
    }

    async fn must_read(&self, id: &str) -> Result<Task, StoreError> {
        self.read(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// Rewrites a stored task's row.
    async fn write(&self, t: &Task) -> Result<(), StoreError> {
        self.txn
            .execute(
                "UPDATE tasks SET state = $3, priority = $4, created_ms = $5, \
                 lease_deadline_ms = $6, agent_id = $7, body = $8 \
                 WHERE region = $1 AND task_id = $2",
                &[
                    &self.region,
                    &t.task_id,
                    &state_code(t),
                    &t.priority,
                    &t.created_unix_ms,
                    &t.lease_deadline_unix_ms,
                    &t.agent_id,
                    &t.encode_to_vec(),
                ],
            )
            .await
            .map_err(|e| self.db(&e))?;
        Ok(())
    }

    /// Inserts a new row; false when the id or the key is taken.
    async fn create(&self, t: &Task) -> Result<bool, StoreError> {
        let n = self
            .txn
            .execute(
                "INSERT INTO tasks (region, task_id, state, priority, created_ms, \
                 lease_deadline_ms, agent_id, idempotency_key, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[
                    &self.region,
                    &t.task_id,
                    &state_code(t),
                    &t.priority,
                    &t.created_unix_ms,
                    &t.lease_deadline_unix_ms,
                    &t.agent_id,
                    &key_of(t),
                    &t.encode_to_vec(),
                ],
            )
            .await
            .map_err(|e| self.db(&e))?;
        Ok(n == 1)
    }

    /// The tasks of a query returning `task_id, body` (locked rows),
    /// undecodable ones reported and skipped.
    async fn tasks(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Task>, StoreError> {
        let rows = self.txn.query(sql, params).await.map_err(|e| self.db(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: &str = r.get(0);
            match decode(id, r.get::<_, &[u8]>(1)) {
                Ok(t) => out.push(t),
                Err(e) => self.shared.undecodable(&e),
            }
        }
        Ok(out)
    }

    async fn by_key(&self, key: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .txn
            .query_opt(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND idempotency_key = $2",
                &[&self.region, &key],
            )
            .await
            .map_err(|e| self.db(&e))?;
        row.map(|r| decode(r.get::<_, &str>(0), r.get::<_, &[u8]>(1)))
            .transpose()
    }

    /// The answer to a request whose key names `stored`.
    fn known_key(task: &Task, stored: Task) -> Result<InsertOutcome, StoreError> {
        let differs = super::what_differs(
            stored.attributes == task.attributes,
            stored.payload == task.payload,
        );
        match differs {
            Some(differs) => Err(StoreError::KeyReused {
                key: task.idempotency_key.clone(),
                task_id: stored.task_id,
                differs,
            }),
            None => Ok(InsertOutcome::Deduplicated(stored)),
        }
    }

    async fn apply(&self, op: Op, now: i64, changes: &mut Vec<Change>) -> Applied {
        match op {
            Op::InsertBatch {
                tasks,
                records,
                reply,
            } => Applied::Batch {
                result: self.insert_all(tasks, now, changes).await,
                records,
                reply,
            },
            Op::Insert {
                task,
                record,
                reply,
            } => Applied::Insert {
                result: Box::new(self.insert(*task, now, changes).await),
                record,
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
                answer(reply, leased).await
            }
            Op::Renew {
                agent,
                id,
                ttl_ms,
                reply,
            } => {
                let deadline = now.saturating_add(ttl_ms);
                answer(reply, self.renew(&agent, &id, deadline, now, changes)).await
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
                answer(reply, done).await
            }
            Op::Cancel { id, reason, reply } => {
                answer(reply, self.cancel(&id, reason, now, changes)).await
            }
            Op::Expire {
                max_attempts,
                fence,
                reply,
            } => answer(reply, self.expire(max_attempts, fence, now, changes)).await,
            Op::RequeueAgent { agent, reply } => {
                answer(reply, self.requeue_agent(&agent, now, changes)).await
            }
            Op::PutAgent { record, reply } => answer(reply, self.put_agent(&record)).await,
            Op::ForgetAgent { agent, reply } => {
                answer(reply, self.forget_agent(&agent, now, changes)).await
            }
            Op::ExtendLeases { ttl_ms, reply } => {
                let deadline = now.saturating_add(ttl_ms);
                answer(reply, self.extend_leases(deadline, now, changes)).await
            }
            Op::MarkTakenOver {
                ids,
                takeover,
                reply,
            } => answer(reply, self.mark_taken_over(&ids, &takeover, now, changes)).await,
            Op::Restore { task, reply } => answer(reply, self.restore(*task, now, changes)).await,
            Op::Flush { reply } => Applied::answer(reply, Ok(())),
        }
    }

    /// Inserts each task on its own; a storage error fails them all.
    async fn insert_all(
        &self,
        tasks: Vec<Task>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Outcomes, StoreError> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            let done = self.insert(task, now, changes).await;
            if let Some(e) = requests::fatal(&done) {
                // The transaction is unusable: all or nothing.
                return Err(e.clone());
            }
            out.push(done);
        }
        Ok(out)
    }

    async fn renew(
        &self,
        agent: &str,
        id: &str,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id).await?;
        task.lease_deadline_unix_ms = deadline;
        touch(&mut task, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        agent: &str,
        id: &str,
        success: bool,
        result: Vec<u8>,
        error: String,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id).await?;
        task.set_state(if success {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        });
        clear_lease(&mut task);
        task.result = result;
        task.error = error;
        touch(&mut task, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    async fn cancel(
        &self,
        id: &str,
        reason: String,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<CancelOutcome, StoreError> {
        let mut task = self.must_read(id).await?;
        if is_terminal(task.state()) {
            return Ok(CancelOutcome {
                task,
                cancelled: false,
            });
        }
        let before = task.state();
        task.set_state(TaskState::Cancelled);
        clear_lease(&mut task);
        task.error = if reason.is_empty() {
            "cancelled".to_string()
        } else {
            reason
        };
        touch(&mut task, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(before), &task));
        Ok(CancelOutcome {
            task,
            cancelled: true,
        })
    }

    async fn expire(
        &self,
        max_attempts: u32,
        fence: Option<i64>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        if let Some(token) = fence {
            self.fenced(token).await?;
        }
        let limit = i64::try_from(MAX_EXPIRE_BATCH).unwrap_or(i64::MAX);
        let due = self
            .tasks(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 2 \
                 AND lease_deadline_ms < $2 ORDER BY lease_deadline_ms, task_id \
                 LIMIT $3 FOR UPDATE SKIP LOCKED",
                &[&self.region, &now, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(due.len());
        for mut task in due {
            if task.attempts >= max_attempts {
                task.set_state(TaskState::Failed);
                clear_lease(&mut task);
                task.error = format!("lease expired {} times (agent lost)", task.attempts);
                touch(&mut task, now);
                self.write(&task).await?;
                changes.push(Change::of(Some(TaskState::Leased), &task));
                out.push(task);
            } else {
                out.push(self.requeue(task, now, changes).await?);
            }
        }
        Ok(out)
    }

    async fn put_agent(&self, record: &AgentRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| StoreError::Invalid(format!("agent record: {e}")))?;
        self.txn
            .execute(
                "INSERT INTO agents (region, agent_id, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (region, agent_id) DO UPDATE SET record = EXCLUDED.record",
                &[&self.region, &record.id, &bytes],
            )
            .await
            .map_err(|e| self.db(&e))?;
        Ok(())
    }

    async fn forget_agent(
        &self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let requeued = self.requeue_agent(agent, now, changes).await?;
        self.txn
            .execute(
                "DELETE FROM agents WHERE region = $1 AND agent_id = $2",
                &[&self.region, &agent],
            )
            .await
            .map_err(|e| self.db(&e))?;
        Ok(requeued)
    }

    async fn extend_leases(
        &self,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let due = self
            .tasks(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 2 \
                 AND lease_deadline_ms < $2 ORDER BY lease_deadline_ms, task_id FOR UPDATE",
                &[&self.region, &deadline],
            )
            .await?;
        let mut out = Vec::with_capacity(due.len());
        for mut task in due {
            task.lease_deadline_unix_ms = deadline;
            touch(&mut task, now);
            self.write(&task).await?;
            changes.push(Change::of(Some(TaskState::Leased), &task));
            out.push(task);
        }
        Ok(out)
    }

    async fn mark_taken_over(
        &self,
        ids: &[String],
        takeover: &Takeover,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            let mut task = match self.read(id).await {
                Ok(Some(t)) if !is_terminal(t.state()) => t,
                Ok(_) => continue,
                Err(e @ (StoreError::Db(_) | StoreError::Unavailable(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    self.shared.undecodable(&e);
                    continue;
                }
            };
            let before = task.state();
            task.set_state(TaskState::Cancelled);
            clear_lease(&mut task);
            task.error = format!(
                "taken over by region {} (epoch {} of {})",
                takeover.to_region, takeover.from_epoch, takeover.from_region
            );
            task.taken_over = Some(takeover.clone());
            touch(&mut task, now);
            self.write(&task).await?;
            changes.push(Change::of(Some(before), &task));
            out.push(task);
        }
        Ok(out)
    }

    async fn insert(
        &self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError> {
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
        }
        if !task.idempotency_key.is_empty() {
            if let Some(stored) = self.by_key(&task.idempotency_key).await? {
                return Self::known_key(&task, stored);
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
        if self.create(&task).await? {
            changes.push(Change {
                before: None,
                after: TaskState::Queued,
                task: task.clone(),
            });
            return Ok(InsertOutcome::Created(task));
        }
        // The id is stored (a retried forward), or another replica
        // committed the key meanwhile.
        if let Some(stored) = self.read(&task.task_id).await? {
            return Ok(InsertOutcome::Deduplicated(stored));
        }
        match self.by_key(&task.idempotency_key).await? {
            Some(stored) => Self::known_key(&task, stored),
            None => Err(StoreError::Db(format!(
                "task {}: the insert conflicted with a row that is not there",
                task.task_id
            ))),
        }
    }

    async fn lease(
        &self,
        agent: &str,
        max: usize,
        skip: Option<&HashSet<String>>,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let skipped: Vec<String> = skip
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let queued = self
            .tasks(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 1 \
                 AND task_id <> ALL($2::text[]) \
                 ORDER BY priority DESC, created_ms, task_id LIMIT $3 FOR UPDATE SKIP LOCKED",
                &[&self.region, &skipped, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(queued.len());
        for mut task in queued {
            if task.state() != TaskState::Queued {
                tracing::warn!(task_id = %task.task_id, "a queued row holds a task in another state; skipped");
                continue;
            }
            task.set_state(TaskState::Leased);
            task.agent_id = agent.to_string();
            task.lease_deadline_unix_ms = deadline;
            task.attempts = task.attempts.saturating_add(1);
            touch(&mut task, now);
            self.write(&task).await?;
            changes.push(Change::of(Some(TaskState::Queued), &task));
            out.push(task);
        }
        Ok(out)
    }

    /// The task, if `agent` holds its lease; else the right refusal.
    async fn held(&self, agent: &str, id: &str) -> Result<Task, StoreError> {
        let task = self.must_read(id).await?;
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

    async fn requeue(
        &self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        task.set_state(TaskState::Queued);
        clear_lease(&mut task);
        touch(&mut task, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    async fn requeue_agent(
        &self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let leased = self
            .tasks(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 2 \
                 AND agent_id = $2 ORDER BY lease_deadline_ms, task_id FOR UPDATE",
                &[&self.region, &agent],
            )
            .await?;
        let mut out = Vec::with_capacity(leased.len());
        for task in leased {
            out.push(self.requeue(task, now, changes).await?);
        }
        Ok(out)
    }

    async fn restore(
        &self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, StoreError> {
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
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
        // A key another task holds stays with it (as in the embedded
        // store, whose index keeps the first); this one is stored keyless
        // in the index but keeps the key in its record.
        let key_taken = match key_of(&task) {
            Some(k) => self.by_key(k).await?.is_some(),
            None => false,
        };
        let created = if key_taken {
            let n = self
                .txn
                .execute(
                    "INSERT INTO tasks (region, task_id, state, priority, created_ms, \
                     lease_deadline_ms, agent_id, idempotency_key, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8) ON CONFLICT DO NOTHING",
                    &[
                        &self.region,
                        &task.task_id,
                        &state_code(&task),
                        &task.priority,
                        &task.created_unix_ms,
                        &task.lease_deadline_unix_ms,
                        &task.agent_id,
                        &task.encode_to_vec(),
                    ],
                )
                .await
                .map_err(|e| self.db(&e))?;
            n == 1
        } else {
            self.create(&task).await?
        };
        if !created {
            return Ok(false);
        }
        changes.push(Change {
            before: None,
            after: task.state(),
            task,
        });
        Ok(true)
    }
}

/// The answer to a request other than an insert, once `result` is done.
async fn answer<R: Send + 'static>(
    reply: Reply<R>,
    result: impl std::future::Future<Output = Result<R, StoreError>>,
) -> Applied {
    Applied::answer(reply, result.await)
}

impl Change {
    fn of(before: Option<TaskState>, task: &Task) -> Self {
        Self {
            before,
            after: task.state(),
            task: task.clone(),
        }
    }
}
