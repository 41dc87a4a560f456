//! [`PgStore`]: the task store in a region's PostgreSQL database
//! (`node.store.backend: postgres`), with the same behaviour contract as the
//! embedded store (the store's contract tests run against both).
//!
//! Every mutation goes through one writer per controller, as in the
//! embedded store: it takes the waiting requests, applies them in one
//! transaction in arrival order and commits once (synchronous commit), then
//! answers each caller. With `node.store.writer_transactions` above 1
//! (default 1), batches of new submits overlap (none two with one task id
//! or idempotency key); any other batch runs alone, after every batch
//! before it. The decision records that inserts carry are
//! appended to the region's chain in that same transaction by the store's
//! journal ([`super::Journal::append`]): a task and the record naming it
//! are committed together or not at all. A batch of new submits costs one
//! round trip: BEGIN, one statement that creates the tasks and appends
//! their records only if it created them all, the notification and COMMIT,
//! sent together. Any other batch (or one that met a stored task, run
//! again) costs two: BEGIN with the multi-row INSERT pipelined behind it
//! (and the look-up of the ids and keys it collided with, if any); the
//! records (sealed by the database after the chain head it locks), the
//! notification and COMMIT. Each statement is prepared once
//! per connection (before the batch's BEGIN), then one message. The writer is in `writer`, a
//! batch's inserts in `staging`, the operations inside the transaction in
//! `tx`, and the watches across replicas in `listen`. Rows a mutation changes are locked
//! (`FOR UPDATE`; leasing and expiry skip rows another transaction holds),
//! and idempotency keys are unique per region in the database (a partial
//! unique index), not in memory. Reads go to the database through the pool.
//!
//! **Watches across replicas.** Each commit also sends `NOTIFY
//! federation_tasks` with the ids it changed (delivered by the server at
//! commit); every store keeps one connection that LISTENs, reads the tasks
//! another replica changed and publishes them on [`PgStore::subscribe`] (and
//! wakes [`PgStore::wait_for_queued`]). Notifications queued together are
//! read with one query; the counts move by the `d=` word each commit sends
//! (counted afresh after a reconnection, every 10 s while others change
//! tasks, and for a notification without it, from an older replica). The
//! delay is one notification plus one read, after the other replica's
//! commit; a listener whose connection
//! breaks reconnects every second, and changes notified meanwhile are not
//! replayed (a watch then sees the task's next change).
//!
//! Table layout (schema in [`crate::pg`]): `tasks` (one row per task: the
//! prost-encoded task in `body`, with its state, priority, creation time,
//! lease deadline, agent and idempotency key as columns for the indexes),
//! `agents`, `store_meta`.

mod deadline;
mod listen;
mod staging;
mod tx;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::time::Duration;
use tokio_postgres::types::ToSql;

use federation_api::{Task, TaskState};
use tokio::sync::{mpsc, oneshot};

use super::requests::{Requests, ttl_ms};
use super::store::decode;
use super::witness::Mark;
use super::{AgentRecord, Clock, Counts, StoreError};
use crate::pg::{Pg, PgError};

/// Another replica of the region as it last told the database
/// ([`PgStore::siblings`]), or what this one tells.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sibling {
    /// Its `node.replica`.
    pub replica: String,
    /// The endpoint it advertises to peers.
    pub endpoint: String,
    /// True while it drains.
    pub draining: bool,
}

/// [`store_meta`](crate::pg) key of the decision log's head.
const META_LOG_HEAD: &str = "log_head";

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unreachable { .. } | PgError::Tls { .. } => {
                StoreError::Unavailable(e.to_string())
            }
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
    core: super::shared::Shared,
    /// Tasks created: counted in the database at open, then by this store.
    created: AtomicU64,
    /// This store's name in notifications (its own are not read back).
    instance: String,
}

impl std::ops::Deref for Shared {
    type Target = super::shared::Shared;

    fn deref(&self) -> &Self::Target {
        &self.core
    }
}

/// The channel of change notifications.
const CHANNEL: &str = "federation_tasks";
/// The most bytes of task ids one notification carries (the server's
/// limit is 8000).
const NOTIFY_BYTES: usize = 7000;

/// A task's row values besides its body.
fn state_code(t: &Task) -> i16 {
    i16::try_from(t.state).unwrap_or(0)
}

fn key_of(t: &Task) -> Option<&str> {
    (!t.idempotency_key.is_empty()).then_some(t.idempotency_key.as_str())
}

impl PgStore {
    /// A weak handle on the store's state (see [`super::TaskStore::released`]).
    pub(super) fn weak(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let inner: Arc<dyn std::any::Any + Send + Sync> = self.inner.clone();
        Arc::downgrade(&inner)
    }

    /// Opens `region`'s task store in `pg` (schema already migrated by
    /// [`Pg::connect`]) and counts its tasks.
    /// Its writer keeps at most `writer_transactions` transactions in
    /// flight (`node.store.writer_transactions`).
    pub fn open(
        pg: &Pg,
        region: &str,
        clock: Arc<dyn Clock>,
        writer_transactions: usize,
    ) -> Result<Self, StoreError> {
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
        let shared = Arc::new(Shared {
            core: super::shared::Shared::new(counts, clock),
            created: AtomicU64::new(created),
            instance: uuid::Uuid::new_v4().simple().to_string(),
        });
        let (stop, stopped) = oneshot::channel();
        pg.handle().spawn(listen::listen(
            pg.config().clone(),
            pg.tls(),
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
                .spawn(move || writer::writer_loop(&pg, &region, &shared, rx, writer_transactions))
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

    /// What the callers and the writer share ([`super::TaskStore`]'s
    /// counts, change feed, commits, undecodable records and journal).
    pub(super) fn shared(&self) -> &super::shared::Shared {
        &self.inner.shared
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

    /// Runs the read `sql` with this region as `$1` and `more` as `$2`…,
    /// waiting from a plain thread (the synchronous reads: get, scans,
    /// agents, the log head).
    fn query_blocking(
        &self,
        sql: &'static str,
        more: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        Ok(self.inner.pg.block(async move {
            let client = pg.client().await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&region];
            params.extend(more.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
            client.query(sql, &params).await.map_err(|e| pg.db(&e))
        })?)
    }

    /// The head last recorded by [`PgStore::record_log_head`].
    pub fn log_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        let text = self
            .query_blocking(
                "SELECT value FROM store_meta WHERE region = $1 AND key = $2",
                vec![Box::new(META_LOG_HEAD)],
            )?
            .first()
            .map(|r| r.get::<_, String>(0));
        let Some(text) = text else { return Ok(None) };
        text.split_once(' ')
            .and_then(|(seq, hash)| Some((seq.parse::<u64>().ok()?, hash.to_string())))
            .map(Some)
            .ok_or_else(|| StoreError::Db(format!("recorded log head is malformed: `{text}`")))
    }

    /// Reads a task.
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        let bytes = self
            .query_blocking(
                "SELECT body FROM tasks WHERE region = $1 AND task_id = $2",
                vec![Box::new(task_id.to_string())],
            )?
            .first()
            .map(|r| r.get::<_, Vec<u8>>(0));
        let task = bytes.map(|b| decode(task_id, &b)).transpose();
        if let Err(e) = &task {
            self.inner.shared.undecodable(e);
        }
        task
    }

    /// Commits since open, and tasks created (counted from the database at
    /// open, then by this controller).
    pub fn mark(&self) -> Mark {
        Mark {
            commit: self.inner.shared.commits(),
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
        self.refresh_replica_as(replica, stale, None).await
    }

    /// [`PgStore::refresh_replica`], also telling the region's other
    /// replicas what `seen` says of this one (its endpoint, whether it
    /// drains; see [`PgStore::siblings`]). `None` keeps what was told.
    pub async fn refresh_replica_as(
        &self,
        replica: &str,
        stale: Duration,
        seen: Option<&Sibling>,
    ) -> Result<bool, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let replica = replica.to_string();
        let instance = self.inner.shared.instance.clone();
        let ms = ttl_ms(stale) as f64;
        let told = seen.map(|s| (s.endpoint.clone(), s.draining));
        Ok(self
            .inner
            .pg
            .run(async move {
                let client = pg.client().await?;
                let row = match told {
                    None => client
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
                        .await,
                    Some((endpoint, draining)) => client
                        .query_opt(
                            "INSERT INTO replicas AS r (region, replica, instance, seen_at, endpoint, draining) \
                             VALUES ($1, $2, $3, now(), $5, $6) \
                             ON CONFLICT (region, replica) DO UPDATE SET instance = EXCLUDED.instance, \
                               seen_at = now(), endpoint = EXCLUDED.endpoint, draining = EXCLUDED.draining \
                             WHERE r.instance = EXCLUDED.instance \
                                OR r.seen_at < now() - $4 * interval '1 millisecond' \
                             RETURNING 1",
                            &[&region, &replica, &instance, &ms, &endpoint, &draining],
                        )
                        .await,
                }
                .map_err(|e| pg.db(&e))?;
                Ok(row.is_some())
            })
            .await?)
    }

    /// The region's other replicas that refreshed their names within
    /// `fresh` (alive, as far as the database knows), by name.
    pub async fn siblings(&self, fresh: Duration) -> Result<Vec<Sibling>, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let instance = self.inner.shared.instance.clone();
        let ms = ttl_ms(fresh) as f64;
        Ok(self
            .inner
            .pg
            .run(async move {
                let client = pg.client().await?;
                let rows = client
                    .query(
                        "SELECT replica, endpoint, draining FROM replicas \
                         WHERE region = $1 AND instance <> $2 \
                           AND seen_at >= now() - $3 * interval '1 millisecond' \
                         ORDER BY replica",
                        &[&region, &instance, &ms],
                    )
                    .await
                    .map_err(|e| pg.db(&e))?;
                Ok(rows
                    .iter()
                    .map(|r| Sibling {
                        replica: r.get(0),
                        endpoint: r.get(1),
                        draining: r.get(2),
                    })
                    .collect())
            })
            .await?)
    }

    /// Gives up the region's leadership when this store holds it: its row
    /// expires now, so another replica takes it (with the next token) at its
    /// next renewal instead of after the lease's TTL. True when it held it.
    pub async fn resign(&self) -> Result<bool, StoreError> {
        let pg = self.inner.pg.clone();
        let region = self.inner.region.clone();
        let instance = self.inner.shared.instance.clone();
        Ok(self
            .inner
            .pg
            .run(async move {
                let client = pg.client().await?;
                let n = client
                    .execute(
                        "UPDATE region_leaders SET expires_at = '-infinity' \
                         WHERE region = $1 AND instance = $2 AND expires_at >= now()",
                        &[&region, &instance],
                    )
                    .await
                    .map_err(|e| pg.db(&e))?;
                Ok(n > 0)
            })
            .await?)
    }

    /// Every registered agent of the region, by id.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = id_and_bytes(self.query_blocking(
            "SELECT agent_id, record FROM agents WHERE region = $1 ORDER BY agent_id",
            vec![],
        )?);
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

    /// See [`super::TaskStore::newest_created_ms`]: over the region's
    /// pending tasks not taken over (ids that end in the region's name).
    pub fn newest_created_ms(&self) -> Result<i64, StoreError> {
        let rows = self.query_blocking(
            "SELECT coalesce(max(created_ms), 0) FROM tasks WHERE region = $1 \
             AND state IN (1, 2) AND right(task_id, length($1) + 1) = '.' || $1",
            vec![],
        )?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)))
    }

    /// Every QUEUED task in lease order, then every LEASED task by deadline.
    pub fn pending(&self) -> Result<Vec<Task>, StoreError> {
        let mut rows = id_and_bytes(self.query_blocking(
            "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 1 \
             ORDER BY priority DESC, created_ms, task_id",
            vec![],
        )?);
        rows.extend(id_and_bytes(self.query_blocking(
            "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 2 \
             ORDER BY lease_deadline_ms, task_id",
            vec![],
        )?));
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
        let after = after.unwrap_or("").to_string();
        // One row past the budget tells whether records remain.
        let fetch = i64::try_from(max_scan.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = id_and_bytes(self.query_blocking(
            "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id > $2 \
             ORDER BY task_id LIMIT $3",
            vec![Box::new(after), Box::new(fetch)],
        )?);
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

/// Rows of (id, bytes): a task's id and body, or an agent's id and record.
fn id_and_bytes(rows: Vec<tokio_postgres::Row>) -> Vec<(String, Vec<u8>)> {
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
        .collect()
}
