//! The embedded store's operations inside one write transaction: each
//! request applied to the `tasks` records and the `queue`, `leases` and
//! `idempotency_keys` indexes, with the task's state change from [`super::super::transitions`].

use federation_api::{Takeover, Task, TaskState};
use prost::Message;
use redb::ReadableTable;

use super::idempotency::IdemIndex;
use super::logged::{Logged, Txn};
use super::{AGENTS, DbResult, MAX_EXPIRE_BATCH, Shared, decode};
use crate::tasks::fence::LeaseFence;
use crate::tasks::requests::{Operations, Outcomes};
use crate::tasks::shared::Change;
use crate::tasks::transitions;
use crate::tasks::{AgentRecord, CancelOutcome, InsertOutcome, StoreError, is_terminal};

pub(super) struct Tables<'t> {
    /// For reporting undecodable records.
    pub(super) shared: &'t Shared,
    /// For the tables only some requests touch (opened on demand).
    pub(super) txn: &'t Txn,
    pub(super) tasks: Logged<'t, &'static str, &'static [u8]>,
    pub(super) idem: IdemIndex<'t>,
    pub(super) queue: Logged<'t, (i64, i64, &'static str), ()>,
    pub(super) leases: Logged<'t, (i64, &'static str), &'static str>,
    /// Someone is subscribed to the change feed.
    pub(super) watched: bool,
    /// The newest `created_unix_ms` of a task created in this store (not
    /// taken over: another region's clock), moved by the batch's inserts.
    pub(super) newest_created: i64,
}

pub(super) fn queue_key(t: &Task) -> (i64, i64, &str) {
    (
        -i64::from(t.priority),
        t.created_unix_ms,
        t.task_id.as_str(),
    )
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

    /// Moves [`Tables::newest_created`] for a task this batch created.
    fn created(&mut self, t: &Task) {
        if t.taken_over.is_none() {
            self.newest_created = self.newest_created.max(t.created_unix_ms);
        }
    }

    /// The task, if `agent` holds its lease; else the right refusal.
    fn held(&self, agent: &str, id: &str) -> Result<Task, StoreError> {
        let task = self.must_read(id)?;
        transitions::check_holder(&task, agent)?;
        Ok(task)
    }

    /// Moves a LEASED task back to QUEUED (attempts kept).
    fn requeue(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError> {
        self.unindex(&task)?;
        transitions::requeue(&mut task, now);
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
}

impl Operations for Tables<'_> {
    async fn insert(
        &mut self,
        mut task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError> {
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
        }
        if !task.idempotency_key.is_empty() {
            if let Some(id) = self.idem.get(&task.idempotency_key)? {
                if let Some(t) = self.read(&id)? {
                    // A key reused for other content is refused, not
                    // answered with the other task.
                    return transitions::known_key(&task, t);
                }
            }
        }
        transitions::admit(&mut task, now);
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
            self.idem.stage(&task.idempotency_key, &task.task_id)?;
        }
        self.queue.insert(queue_key(&task), ()).db()?;
        self.created(&task);
        changes.push(Change {
            before: None,
            after: TaskState::Queued,
            task: self.watched.then(|| task.clone()),
        });
        Ok(InsertOutcome::Created(task))
    }

    async fn insert_all(
        &mut self,
        tasks: Vec<Task>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Outcomes, StoreError> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            match self.insert(task, now, changes).await {
                // The transaction may hold part of it: all or nothing.
                Err(e @ StoreError::Db(_)) => return Err(e),
                o => out.push(o),
            }
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
        let mut keys = Vec::with_capacity(max);
        // Bounded: at most `max` taken plus every task the fence holds back
        // passed over (decided from the entry's key: no record read).
        let budget = max.saturating_add(held_back.map_or(0, LeaseFence::held));
        for entry in self.queue.iter().db()?.take(budget) {
            let (k, _) = entry.db()?;
            let (p, c, id) = k.value();
            if held_back.is_some_and(|f| f.holds_back(id, c)) {
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
            transitions::lease(&mut task, agent, deadline, now);
            self.write(&task)?;
            self.leases.insert((deadline, id.as_str()), agent).db()?;
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
        let mut task = self.held(agent, id)?;
        self.unindex(&task)?;
        transitions::renew(&mut task, deadline, now);
        self.write(&task)?;
        self.leases.insert((deadline, id), agent).db()?;
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
        let mut task = self.held(agent, id)?;
        self.unindex(&task)?;
        transitions::complete(&mut task, success, result, error, now);
        self.write(&task)?;
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
        let mut task = self.must_read(id)?;
        if is_terminal(task.state()) {
            return Ok(CancelOutcome {
                task,
                cancelled: false,
            });
        }
        let before = task.state();
        self.unindex(&task)?;
        transitions::cancel(&mut task, reason, now);
        self.write(&task)?;
        changes.push(Change::of(Some(before), &task));
        Ok(CancelOutcome {
            task,
            cancelled: true,
        })
    }

    async fn expire(
        &mut self,
        max_attempts: u32,
        _fence: Option<i64>,
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
            self.unindex(&task)?;
            transitions::expire(&mut task, max_attempts, now);
            self.write(&task)?;
            if task.state() == TaskState::Queued {
                self.queue.insert(queue_key(&task), ()).db()?;
            }
            changes.push(Change::of(Some(TaskState::Leased), &task));
            out.push(task);
        }
        Ok(out)
    }

    async fn requeue_agent(
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

    async fn put_agent(&mut self, record: &AgentRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| StoreError::Invalid(format!("agent record: {e}")))?;
        self.txn
            .open(AGENTS)?
            .insert(record.id.as_str(), bytes.as_slice())
            .db()?;
        Ok(())
    }

    async fn forget_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError> {
        let requeued = self.requeue_agent(agent, now, changes).await?;
        self.txn.open(AGENTS)?.remove(agent).db()?;
        Ok(requeued)
    }

    async fn extend_leases(
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
            transitions::renew(&mut task, deadline, now);
            self.write(&task)?;
            self.leases
                .insert((deadline, task.task_id.as_str()), task.agent_id.as_str())
                .db()?;
            changes.push(Change::of(Some(TaskState::Leased), &task));
            out.push(task);
        }
        Ok(out)
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
            transitions::take_over(&mut task, takeover, now);
            self.write(&task)?;
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
        if task.task_id.is_empty() {
            return Err(StoreError::Invalid("task id is empty".into()));
        }
        if self.tasks.get(task.task_id.as_str()).db()?.is_some() {
            return Ok(false);
        }
        transitions::restore(&mut task, now)?;
        self.write(&task)?;
        if task.state() == TaskState::Queued {
            self.queue.insert(queue_key(&task), ()).db()?;
        }
        self.created(&task);
        if !task.idempotency_key.is_empty() && self.idem.get(&task.idempotency_key)?.is_none() {
            self.idem.stage(&task.idempotency_key, &task.task_id)?;
        }
        changes.push(Change {
            before: None,
            after: task.state(),
            task: self.watched.then_some(task),
        });
        Ok(true)
    }
}
