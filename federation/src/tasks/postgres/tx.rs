//! The PostgreSQL store's operations inside one transaction: each request
//! applied to its locked rows, with the task's state change from
//! [`super::super::transitions`].

use federation_api::{Takeover, Task, TaskState};
use prost::Message;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{Shared, key_of, state_code};
use crate::pg::Pg;
use crate::tasks::fence::LeaseFence;
use crate::tasks::requests::{self, Operations, Outcomes};
use crate::tasks::shared::Change;
use crate::tasks::store::MAX_EXPIRE_BATCH;
use crate::tasks::store::decode;
use crate::tasks::transitions;
use crate::tasks::{AgentRecord, CancelOutcome, InsertOutcome, StoreError, is_terminal};

/// Mutations of one batch, inside its transaction.
pub(super) struct Tx<'a> {
    /// The connection, inside the batch's transaction (opened and ended
    /// by the writer).
    pub(super) txn: &'a deadpool_postgres::ClientWrapper,
    pub(super) pg: &'a Pg,
    pub(super) region: &'a str,
    pub(super) shared: &'a Shared,
}

impl Tx<'_> {
    pub(super) fn db(&self, e: &tokio_postgres::Error) -> StoreError {
        StoreError::from(self.pg.db(e))
    }

    /// `sql` prepared on this connection once (deadpool's cache): later
    /// uses neither wait for a parse round trip nor make PostgreSQL parse
    /// it again. For statements awaited in turn: one prepared on the way
    /// holds back what is sent after it (the writer's pipelined ones are
    /// prepared before BEGIN, `writer::prepare`).
    async fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        self.txn.prepare_cached(sql).await.map_err(|e| self.db(&e))
    }

    /// [`tokio_postgres::Client::query`] on the prepared `sql`.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let st = self.statement(sql).await?;
        self.txn.query(&st, params).await.map_err(|e| self.db(&e))
    }

    /// [`tokio_postgres::Client::query_opt`] on the prepared `sql`.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let st = self.statement(sql).await?;
        self.txn
            .query_opt(&st, params)
            .await
            .map_err(|e| self.db(&e))
    }

    /// [`tokio_postgres::Client::execute`] on the prepared `sql`.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let st = self.statement(sql).await?;
        self.txn.execute(&st, params).await.map_err(|e| self.db(&e))
    }

    /// Refuses the transaction unless this store holds the region's
    /// leadership with `token` now; the row stays locked (shared) until the
    /// commit, so no other replica takes the leadership meanwhile.
    pub(super) async fn fenced(&self, token: i64) -> Result<(), StoreError> {
        let row = self
            .query_opt(
                "SELECT 1 FROM region_leaders WHERE region = $1 AND instance = $2 \
                 AND token = $3 AND expires_at > now() FOR SHARE",
                &[&self.region, &self.shared.instance, &token],
            )
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(StoreError::NotLeader(format!(
                "region {}: fencing token {token} is not the current leader's",
                self.region
            ))),
        }
    }

    /// Reads a task and locks its row for this transaction.
    pub(super) async fn read(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .query_opt(
                "SELECT body FROM tasks WHERE region = $1 AND task_id = $2 FOR UPDATE",
                &[&self.region, &id],
            )
            .await?;
        row.map(|r| decode(id, r.get::<_, &[u8]>(0))).transpose()
    }

    pub(super) async fn must_read(&self, id: &str) -> Result<Task, StoreError> {
        self.read(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// Rewrites a stored task's row.
    /// Applies `change` to each of `due` (tasks read leased, locked),
    /// writes it back and records the change.
    async fn change_leased(
        &self,
        due: Vec<Task>,
        changes: &mut Vec<Change>,
        change: impl Fn(&mut Task),
    ) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::with_capacity(due.len());
        for mut task in due {
            change(&mut task);
            self.write(&task).await?;
            changes.push(Change::of(Some(TaskState::Leased), &task));
            out.push(task);
        }
        Ok(out)
    }

    pub(super) async fn write(&self, t: &Task) -> Result<(), StoreError> {
        self.execute(
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
        .await?;
        Ok(())
    }

    /// Inserts a new row; false when the id or the key is taken.
    pub(super) async fn create(&self, t: &Task) -> Result<bool, StoreError> {
        let n = self
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
            .await?;
        Ok(n == 1)
    }

    /// The tasks of a query returning `task_id, body` (locked rows),
    /// undecodable ones reported and skipped.
    pub(super) async fn tasks(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Task>, StoreError> {
        let rows = self.query(sql, params).await?;
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

    pub(super) async fn by_key(&self, key: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .query_opt(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND idempotency_key = $2",
                &[&self.region, &key],
            )
            .await?;
        row.map(|r| decode(r.get::<_, &str>(0), r.get::<_, &[u8]>(1)))
            .transpose()
    }

    pub(super) async fn insert(
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
                return transitions::known_key(&task, stored);
            }
        }
        transitions::admit(&mut task, now);
        if self.create(&task).await? {
            changes.push(Change {
                before: None,
                after: TaskState::Queued,
                task: Some(task.clone()),
            });
            return Ok(InsertOutcome::Created(task));
        }
        // The id is stored (a retried forward), or another replica
        // committed the key meanwhile.
        if let Some(stored) = self.read(&task.task_id).await? {
            return Ok(InsertOutcome::Deduplicated(stored));
        }
        match self.by_key(&task.idempotency_key).await? {
            Some(stored) => transitions::known_key(&task, stored),
            None => Err(StoreError::Db(format!(
                "task {}: the insert conflicted with a row that is not there",
                task.task_id
            ))),
        }
    }

    /// The task, if `agent` holds its lease; else the right refusal.
    pub(super) async fn held(&self, agent: &str, id: &str) -> Result<Task, StoreError> {
        let task = self.must_read(id).await?;
        transitions::check_holder(&task, agent)?;
        Ok(task)
    }

    pub(super) async fn requeue(
        &self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        transitions::requeue(&mut task, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }
}

/// Through a shared reference: a batch's staged inserts use the transaction
/// too.
impl Operations for &Tx<'_> {
    async fn insert(
        &mut self,
        task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError> {
        Tx::insert(self, task, now, changes).await
    }

    async fn insert_all(
        &mut self,
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

    async fn lease(
        &mut self,
        agent: &str,
        max: usize,
        held_back: Option<&LeaseFence>,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        // The fence's test in SQL: owned by its region (the id's suffix) and
        // created before its boundary; none without a fence.
        let (suffix, before) = match held_back {
            Some(f) => (format!(".{}", f.owner()), f.before_ms()),
            None => (String::new(), i64::MIN),
        };
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let queued = self
            .tasks(
                "SELECT task_id, body FROM tasks WHERE region = $1 AND state = 1 \
                 AND NOT (created_ms < $2 AND right(task_id, length($3)) = $3 \
                          AND length(task_id) = 36 + length($3)) \
                 ORDER BY priority DESC, created_ms, task_id LIMIT $4 FOR UPDATE SKIP LOCKED",
                &[&self.region, &before, &suffix, &limit],
            )
            .await?;
        let mut out = Vec::with_capacity(queued.len());
        for mut task in queued {
            if task.state() != TaskState::Queued {
                tracing::warn!(task_id = %task.task_id, "a queued row holds a task in another state; skipped");
                continue;
            }
            transitions::lease(&mut task, agent, deadline, now);
            self.write(&task).await?;
            changes.push(Change::of(Some(TaskState::Queued), &task));
            out.push(task);
        }
        Ok(out)
    }

    async fn renew(
        &mut self,
        agent: &str,
        id: &str,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id).await?;
        transitions::renew(&mut task, deadline, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &mut self,
        agent: &str,
        id: &str,
        success: bool,
        result: Vec<u8>,
        error: String,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        let mut task = self.held(agent, id).await?;
        transitions::complete(&mut task, success, result, error, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(TaskState::Leased), &task));
        Ok(task)
    }

    async fn cancel(
        &mut self,
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
        transitions::cancel(&mut task, reason, now);
        self.write(&task).await?;
        changes.push(Change::of(Some(before), &task));
        Ok(CancelOutcome {
            task,
            cancelled: true,
        })
    }

    async fn fence(&mut self, token: i64) -> Result<(), StoreError> {
        self.fenced(token).await
    }

    async fn expire(
        &mut self,
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
        self.change_leased(due, changes, |t| {
            transitions::expire(t, max_attempts, now);
        })
        .await
    }

    async fn requeue_agent(
        &mut self,
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

    async fn put_agent(&mut self, record: &AgentRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| StoreError::Invalid(format!("agent record: {e}")))?;
        self.execute(
            "INSERT INTO agents (region, agent_id, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (region, agent_id) DO UPDATE SET record = EXCLUDED.record",
            &[&self.region, &record.id, &bytes],
        )
        .await?;
        Ok(())
    }

    async fn forget_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let requeued = self.requeue_agent(agent, now, changes).await?;
        self.execute(
            "DELETE FROM agents WHERE region = $1 AND agent_id = $2",
            &[&self.region, &agent],
        )
        .await?;
        Ok(requeued)
    }

    async fn extend_leases(
        &mut self,
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
        self.change_leased(due, changes, |t| transitions::renew(t, deadline, now))
            .await
    }

    async fn mark_taken_over(
        &mut self,
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
            transitions::take_over(&mut task, takeover, now);
            self.write(&task).await?;
            changes.push(Change::of(Some(before), &task));
            out.push(task);
        }
        Ok(out)
    }

    async fn restore(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, StoreError> {
        transitions::restore(&mut task, now)?;
        // A key another task holds stays with it (as in the embedded
        // store, whose index keeps the first); this one is stored keyless
        // in the index but keeps the key in its record.
        let key_taken = match key_of(&task) {
            Some(k) => self.by_key(k).await?.is_some(),
            None => false,
        };
        let created = if key_taken {
            let n = self
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
                .await?;
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
            task: Some(task),
        });
        Ok(true)
    }
}
