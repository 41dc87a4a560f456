//! A batch's inserts at a fixed number of round trips: the new tasks
//! created in one multi-row `INSERT … ON CONFLICT DO NOTHING`, the stored
//! tasks the ones it did not create collide with read in one query after
//! it (only when there are such), an id or key met twice in the batch one
//! by one. The INSERT may go out right behind the batch's `BEGIN`, before
//! its answer ([`Begun`]): it creates rows only inside the transaction that
//! `BEGIN` opened, so a `BEGIN` that failed leaves nothing committed.

use std::collections::{HashMap, HashSet};

use federation_api::{Task, TaskState};
use prost::Message;
use tokio_postgres::types::{ToSql, Type};

use super::tx::Tx;
use super::{key_of, state_code};
use crate::tasks::journal::{Head, Journal, Record};
use crate::tasks::shared::Change;
use crate::tasks::store::decode;
use crate::tasks::{InsertOutcome, StoreError, transitions};

/// A writer batch's `BEGIN`: it also marks the transaction (a setting that
/// ends with it), which the batch's INSERT requires.
pub(super) const BEGIN_SQL: &str = "BEGIN; SET LOCAL federation.batch = 'on'";

/// The batch's multi-row INSERT (the ids created come back). It creates
/// nothing outside a transaction [`BEGIN_SQL`] began: pipelined behind a
/// `BEGIN` that failed it would otherwise run, and commit, on its own.
const INSERT_SQL: &str = "INSERT INTO tasks (region, task_id, state, priority, created_ms, \
     lease_deadline_ms, agent_id, idempotency_key, body) \
     SELECT $1, i, s, p, c, 0, '', k, b \
     FROM unnest($2::text[], $3::smallint[], $4::integer[], $5::bigint[], \
                 $6::text[], $7::bytea[]) AS u(i, s, p, c, k, b) \
     WHERE current_setting('federation.batch', true) = 'on' \
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

/// The look-up of the stored tasks an INSERT did not create collided
/// with: one index scan on each unique index (a task named by both comes
/// twice). Not one `WHERE … OR …`: on a table not yet analyzed (a new
/// region's, or one that grew since autovacuum last analyzed it) the
/// planner guessed each `= ANY` to match a tenth of the table and scanned
/// all of it, 1.2 ms per batch at 40,000 tasks (`pg_stat_statements` in
/// the PostgreSQL bench); a unique index's `= ANY` is planned as one row
/// per element whatever the statistics say.
const LOOK_UP_SQL: &str = "SELECT task_id, body FROM tasks WHERE region = $1 AND task_id = ANY($2) \
     UNION ALL SELECT task_id, body FROM tasks WHERE region = $1 AND idempotency_key = ANY($3)";
const LOOK_UP_TYPES: &[Type] = &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY];

/// Prepares the statements of a batch's inserts on `txn`'s connection
/// (deadpool's cache: a round trip on the connection's first batch,
/// nothing after), so PostgreSQL parses and plans them once per connection
/// and each is sent at its first poll: a statement prepared on the way
/// would wait for its own round trip while the ones pipelined behind it
/// went ahead. Called before BEGIN.
pub(super) async fn prepare(
    txn: &deadpool_postgres::ClientWrapper,
) -> Result<(), tokio_postgres::Error> {
    futures::try_join!(
        txn.prepare_typed_cached(INSERT_SQL, INSERT_TYPES),
        txn.prepare_typed_cached(LOOK_UP_SQL, LOOK_UP_TYPES),
    )
    .map(|_| ())
}

/// A batch's `BEGIN` ([`BEGIN_SQL`]), sent at once and answered when first
/// needed: the batch's INSERT goes out behind it without waiting (one round
/// trip for both), and every other statement waits for its answer
/// ([`Begun::wait`]) before it is sent.
pub(super) struct Begun<'a> {
    pending: Option<futures::future::BoxFuture<'a, Result<(), tokio_postgres::Error>>>,
    answer: Option<Result<(), StoreError>>,
}

impl<'a> Begun<'a> {
    /// Sends `BEGIN` on `txn` (at this first poll) without waiting for it.
    pub(super) async fn send(tx: &Tx<'a>) -> Begun<'a> {
        let mut pending: futures::future::BoxFuture<'a, _> =
            Box::pin(tx.txn.batch_execute(BEGIN_SQL));
        let answer = match futures::poll!(pending.as_mut()) {
            std::task::Poll::Ready(r) => Some(r.map_err(|e| tx.db(&e))),
            std::task::Poll::Pending => None,
        };
        let pending = answer.is_none().then_some(pending);
        Begun { pending, answer }
    }

    /// `BEGIN`'s answer: `Ok` once the transaction is open.
    pub(super) async fn wait(&mut self, tx: &Tx<'_>) -> Result<(), StoreError> {
        if let Some(pending) = self.pending.take() {
            self.answer = Some(pending.await.map_err(|e| tx.db(&e)));
        }
        self.answer.clone().unwrap_or(Ok(()))
    }
}

/// The staged tasks as the INSERT's columns.
struct Columns<'t> {
    ids: Vec<&'t str>,
    states: Vec<i16>,
    priorities: Vec<i32>,
    created: Vec<i64>,
    keys: Vec<Option<&'t str>>,
    bodies: Vec<Vec<u8>>,
}

impl<'t> Columns<'t> {
    fn of(tasks: &'t [(usize, Task)]) -> Self {
        Columns {
            ids: tasks.iter().map(|(_, t)| t.task_id.as_str()).collect(),
            states: tasks.iter().map(|(_, t)| state_code(t)).collect(),
            priorities: tasks.iter().map(|(_, t)| t.priority).collect(),
            created: tasks.iter().map(|(_, t)| t.created_unix_ms).collect(),
            keys: tasks.iter().map(|(_, t)| key_of(t)).collect(),
            bodies: tasks.iter().map(|(_, t)| t.encode_to_vec()).collect(),
        }
    }

    /// [`INSERT_SQL`]'s parameters.
    fn params<'a>(&'a self, region: &'a &'a str) -> [&'a (dyn ToSql + Sync); 7] {
        [
            region,
            &self.ids,
            &self.states,
            &self.priorities,
            &self.created,
            &self.keys,
            &self.bodies,
        ]
    }
}

/// Prepares the statement of [`Tx::create_with_records`] (the batch's
/// INSERT and its records' append in one), once per connection.
pub(super) async fn prepare_with_records(
    txn: &deadpool_postgres::ClientWrapper,
    journal: &dyn Journal,
) -> Result<(), tokio_postgres::Error> {
    journal.prepare_checked(txn, INSERT_SQL, INSERT_TYPES).await
}

/// What became of an insert offered to [`Tx::stage`].
pub(super) enum Staging {
    /// Answered at once (a refused request).
    Answered(Box<Result<InsertOutcome, StoreError>>),
    /// Staged: answered when the staged tasks are created.
    Staged,
    /// Its id or key is staged already: it takes the one-by-one path after
    /// the staged ones are created.
    Clash(Box<Task>),
}

/// Tasks already stored that a batch's inserts collided with, by id and by
/// key.
#[derive(Default)]
struct Known {
    by_id: HashMap<String, Task>,
    by_key: HashMap<String, Task>,
}

impl Tx<'_> {
    /// Creates the staged tasks in one statement and answers them: created,
    /// or (its id or key stored already: a retried submit, or a row another
    /// transaction committed meanwhile) answered from the stored task, read
    /// for all of them in one more query. What is stored is not read before
    /// the INSERT: a batch of new submits (the common case) pays no look-up.
    /// The INSERT may be the first statement after `begun`, sent before its
    /// answer; nothing else is sent before `begun` is answered.
    pub(super) async fn create_staged(
        &self,
        begun: &mut Begun<'_>,
        staged: &mut Vec<(usize, Task)>,
        results: &mut [Option<Result<InsertOutcome, StoreError>>],
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        let tasks = std::mem::take(staged);
        let columns = Columns::of(&tasks);
        // Prepared before the batch began ([`prepare`]): taken from the
        // connection's cache without waiting, so the INSERT is sent at the
        // first poll.
        let inserting = self
            .txn
            .prepare_typed_cached(INSERT_SQL, INSERT_TYPES)
            .await
            .map_err(|e| self.db(&e))?;
        let rows = self
            .txn
            .query(&inserting, &columns.params(&self.region))
            .await
            .map_err(|e| self.db(&e))?;
        drop(columns);
        // Answered before the INSERT: a failed BEGIN left it creating
        // nothing, and the batch fails here.
        begun.wait(self).await?;
        let inserted: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let (new, collided): (Vec<_>, Vec<_>) = tasks
            .into_iter()
            .partition(|(_, t)| inserted.contains(&t.task_id));
        for (at, task) in new {
            changes.push(Change {
                before: None,
                after: TaskState::Queued,
                task: Some(task.clone()),
            });
            results[at] = Some(Ok(InsertOutcome::Created(task)));
        }
        if collided.is_empty() {
            return Ok(());
        }
        let known = self.look_up(collided.iter().map(|(_, t)| t)).await?;
        for (at, task) in collided {
            // As one insert on its own answers: a stored key first (the same
            // request, or a conflict), then a stored id (a retried forward).
            let stored_key = (!task.idempotency_key.is_empty())
                .then(|| known.by_key.get(&task.idempotency_key))
                .flatten();
            let outcome = if let Some(stored) = stored_key {
                transitions::known_key(&task, stored.clone())
            } else if let Some(stored) = known.by_id.get(&task.task_id) {
                Ok(InsertOutcome::Deduplicated(stored.clone()))
            } else {
                // Neither read back (undecodable, or gone meanwhile): the
                // one-by-one path says which.
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

    /// Creates every one of `tasks` and appends `records` (theirs, named
    /// after them) in one statement, sent at the first poll: when the
    /// INSERT did not create them all (one is stored already), the
    /// statement fails with [`crate::audit::postgres::NOT_ALL_CREATED`] and
    /// the transaction is aborted with nothing of it kept. Returns the
    /// chain's new head.
    pub(super) async fn create_with_records(
        &self,
        journal: &dyn Journal,
        tasks: &[(usize, Task)],
        records: &[Record],
    ) -> Result<Option<Head>, tokio_postgres::Error> {
        let columns = Columns::of(tasks);
        let params = columns.params(&self.region);
        let expected = i64::try_from(tasks.len()).unwrap_or(i64::MAX);
        journal
            .append_checked(
                self.txn,
                records,
                INSERT_SQL,
                INSERT_TYPES,
                &params,
                expected,
            )
            .await
    }

    /// Reads, in one query, the stored tasks whose id or idempotency key one
    /// of `tasks` names.
    async fn look_up(&self, tasks: impl Iterator<Item = &Task>) -> Result<Known, StoreError> {
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        for t in tasks {
            ids.push(t.task_id.as_str());
            if !t.idempotency_key.is_empty() {
                keys.push(t.idempotency_key.as_str());
            }
        }
        // Prepared before the batch began ([`prepare`]).
        let looking = self
            .txn
            .prepare_typed_cached(LOOK_UP_SQL, LOOK_UP_TYPES)
            .await
            .map_err(|e| self.db(&e))?;
        let rows = self
            .txn
            .query(&looking, &[&self.region, &ids, &keys])
            .await
            .map_err(|e| self.db(&e))?;
        let mut known = Known::default();
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

    /// Stages an insert (answered when the staged tasks are created), or
    /// refuses it at once. An id or key already staged in this batch creates
    /// the staged ones first, then takes the one-by-one path.
    pub(super) fn stage(
        &self,
        mut task: Task,
        now: i64,
        staged: &mut Vec<(usize, Task)>,
        at: usize,
    ) -> Staging {
        if task.task_id.is_empty() {
            return Staging::Answered(Box::new(Err(StoreError::Invalid(
                "task id is empty".into(),
            ))));
        }
        let clash = staged.iter().any(|(_, s)| {
            s.task_id == task.task_id
                || (!task.idempotency_key.is_empty() && s.idempotency_key == task.idempotency_key)
        });
        if clash {
            return Staging::Clash(Box::new(task));
        }
        transitions::admit(&mut task, now);
        staged.push((at, task));
        Staging::Staged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::contract::{Fixture, Kind};

    /// The batch's INSERT goes out behind its `BEGIN` before the answer; a
    /// `BEGIN` that failed must not leave it committing rows on its own:
    /// outside the writer's transaction it creates nothing.
    #[test]
    fn the_batch_insert_creates_rows_only_inside_the_writers_transaction() {
        let fx = Fixture::new(Kind::Postgres);
        drop(fx.open()); // the schema
        let pg = fx.pg();
        let pg2 = pg.clone();
        let counts = pg
            .block(async move {
                let db = |e: tokio_postgres::Error| pg2.db(&e);
                let c = pg2.client().await?;
                let inserting = c
                    .prepare_typed_cached(INSERT_SQL, INSERT_TYPES)
                    .await
                    .map_err(db)?;
                let insert = |id: &'static str| {
                    let c = &c;
                    let inserting = inserting.clone();
                    async move {
                        let key: Option<&str> = None;
                        c.query(
                            &inserting,
                            &[
                                &"europe",
                                &vec![id],
                                &vec![1i16],
                                &vec![0i32],
                                &vec![1i64],
                                &vec![key],
                                &vec![Vec::<u8>::new()],
                            ],
                        )
                        .await
                        .map(|rows| rows.len())
                    }
                };
                // On its own (as after a failed BEGIN): its own transaction.
                let alone = insert("alone").await.map_err(db)?;
                // Inside a transaction that is not the writer's.
                c.batch_execute("BEGIN").await.map_err(db)?;
                let other = insert("other").await.map_err(db)?;
                c.batch_execute("COMMIT").await.map_err(db)?;
                // Inside the writer's.
                c.batch_execute(BEGIN_SQL).await.map_err(db)?;
                let inside = insert("inside").await.map_err(db)?;
                c.batch_execute("COMMIT").await.map_err(db)?;
                // The mark ended with that transaction.
                let after = insert("after").await.map_err(db)?;
                let stored: i64 = c
                    .query_one("SELECT count(*) FROM tasks", &[])
                    .await
                    .map_err(db)?
                    .get(0);
                Ok((alone, other, inside, after, stored))
            })
            .expect("the statements run");
        assert_eq!(counts, (0, 0, 1, 0, 1));
    }

    /// The batch's INSERT and its records' append in one statement: the
    /// records go in only when every task was created; a stored one (or
    /// no writer's transaction) refuses the whole statement with
    /// `NOT_ALL_CREATED`, and nothing of it is kept.
    #[test]
    fn the_insert_with_its_records_appends_only_when_it_created_every_task() {
        use crate::audit::{Entry, Prepared, kind};
        let fx = Fixture::new(Kind::Postgres);
        drop(fx.open()); // the schema
        let pg = fx.pg();
        let pg2 = pg.clone();
        let seen = pg
            .block(async move {
                let db = |e: tokio_postgres::Error| pg2.db(&e);
                let c = pg2.client().await?;
                let attempt = |ids: &'static [&'static str]| {
                    let c = &c;
                    async move {
                        let tasks: Vec<(usize, Task)> = ids
                            .iter()
                            .enumerate()
                            .map(|(i, id)| (i, federation_sandbox::fixtures::queued_task(id)))
                            .collect();
                        let records: Vec<Prepared> = ids
                            .iter()
                            .map(|id| Prepared::entry(&Entry::new(kind::ROUTE).task(*id)))
                            .collect();
                        let columns = Columns::of(&tasks);
                        let region = "europe";
                        let params = columns.params(&region);
                        crate::audit::postgres::append_checked(
                            c,
                            region,
                            &records,
                            INSERT_SQL,
                            INSERT_TYPES,
                            &params,
                            ids.len() as i64,
                        )
                        .await
                        .map_err(|e| e.code().map(|c| c.code().to_string()))
                    }
                };
                c.batch_execute(BEGIN_SQL).await.map_err(db)?;
                let first = attempt(&["a"]).await;
                c.batch_execute("COMMIT").await.map_err(db)?;
                c.batch_execute(BEGIN_SQL).await.map_err(db)?;
                let stored = attempt(&["b", "a"]).await;
                c.batch_execute("ROLLBACK").await.map_err(db)?;
                // Outside the writer's transaction it creates nothing, so
                // it appends nothing either.
                let alone = attempt(&["c"]).await;
                let count = |table: &'static str| {
                    let c = &c;
                    async move {
                        c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                            .await
                            .map(|r| r.get::<_, i64>(0))
                    }
                };
                let tasks = count("tasks").await.map_err(db)?;
                let decisions = count("decisions").await.map_err(db)?;
                Ok((
                    first.map(|h| h.map(|h| h.0)),
                    stored,
                    alone,
                    tasks,
                    decisions,
                ))
            })
            .expect("the statements run");
        let refused = Err(Some(crate::audit::postgres::NOT_ALL_CREATED.to_string()));
        assert_eq!(seen, (Ok(Some(1)), refused.clone(), refused, 1, 1));
    }
}
