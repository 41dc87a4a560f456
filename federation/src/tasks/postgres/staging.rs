//! A batch's inserts at a fixed number of round trips: the stored tasks
//! their ids and keys name read in one query, the new ones created in one
//! multi-row `INSERT`, an id or key met twice in the batch one by one.

use std::collections::{HashMap, HashSet};

use federation_api::{Task, TaskState};
use prost::Message;
use tokio_postgres::types::Type;

use super::tx::Tx;
use super::{key_of, state_code};
use crate::tasks::requests::Op;
use crate::tasks::shared::Change;
use crate::tasks::store::decode;
use crate::tasks::{InsertOutcome, StoreError, transitions};

/// The batch's multi-row INSERT (the ids created come back).
const INSERT_SQL: &str = "INSERT INTO tasks (region, task_id, state, priority, created_ms, \
     lease_deadline_ms, agent_id, idempotency_key, body) \
     SELECT $1, i, s, p, c, 0, '', k, b \
     FROM unnest($2::text[], $3::smallint[], $4::integer[], $5::bigint[], \
                 $6::text[], $7::bytea[]) AS u(i, s, p, c, k, b) \
     ON CONFLICT DO NOTHING RETURNING task_id";
const INSERT_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::INT2_ARRAY,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
];

/// The look-up of the stored tasks a batch's ids and keys name: one index
/// scan on each unique index (a task named by both comes twice). Not one
/// `WHERE … OR …`: on a table not yet analyzed (a new region's, or one
/// that grew since autovacuum last analyzed it) the planner guessed each
/// `= ANY` to match a tenth of the table and scanned all of it, 1.2 ms per
/// batch at 40,000 tasks (`pg_stat_statements` in the PostgreSQL bench); a
/// unique index's `= ANY` is planned as one row per element whatever the
/// statistics say.
const PREFETCH_SQL: &str = "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id = ANY($2) \
     UNION ALL SELECT task_id, body FROM tasks WHERE region = $1 AND idempotency_key = ANY($3)";
const PREFETCH_TYPES: &[Type] = &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY];

/// Prepares the statements of a batch's inserts on `txn`'s connection
/// (deadpool's cache: a round trip on the connection's first batch,
/// nothing after), so PostgreSQL parses and plans them once per connection
/// and each is sent at its first poll: a statement prepared on the way
/// would wait for its own round trip while the ones pipelined behind it
/// (the head's lock, COMMIT) went ahead. Called before BEGIN.
pub(super) async fn prepare(
    txn: &deadpool_postgres::ClientWrapper,
) -> Result<(), tokio_postgres::Error> {
    futures::try_join!(
        txn.prepare_typed_cached(INSERT_SQL, INSERT_TYPES),
        txn.prepare_typed_cached(PREFETCH_SQL, PREFETCH_TYPES),
    )
    .map(|_| ())
}

/// What became of an insert offered to [`Tx::stage`].
pub(super) enum Staging {
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
pub(super) struct Known {
    pub(super) by_id: HashMap<String, Task>,
    pub(super) by_key: HashMap<String, Task>,
}

impl Tx<'_> {
    /// Creates the staged tasks in one statement and answers them: created,
    /// or (a row another transaction committed meanwhile) answered one by
    /// one as an insert that found its id or key stored.
    pub(super) async fn create_staged(
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
        // One message (no separate parse): sent at the first poll, so the
        // writer may pipeline the chain head's lock behind it.
        // Prepared before the batch began ([`prepare`]): taken from the
        // connection's cache without waiting, so the INSERT is sent at the
        // first poll and the writer may pipeline the head's lock behind it.
        let inserting = self
            .txn
            .prepare_typed_cached(INSERT_SQL, INSERT_TYPES)
            .await
            .map_err(|e| self.db(&e))?;
        let rows = self
            .txn
            .query(
                &inserting,
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
                    task: Some(task.clone()),
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
    pub(super) async fn prefetch(&self, ops: &[Op]) -> Result<Known, StoreError> {
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
        // Prepared before the batch began ([`prepare`]): sent at the first
        // poll, so the writer pipelines it behind BEGIN.
        let looking = self
            .txn
            .prepare_typed_cached(PREFETCH_SQL, PREFETCH_TYPES)
            .await
            .map_err(|e| self.db(&e))?;
        let rows = self
            .txn
            .query(&looking, &[&self.region, &ids, &keys])
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
    pub(super) async fn stage(
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
                return Ok(Staging::Answered(Box::new(transitions::known_key(
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
        transitions::admit(&mut task, now);
        staged.push((at, task));
        Ok(Staging::Staged)
    }
}
