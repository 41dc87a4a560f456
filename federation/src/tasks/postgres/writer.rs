//! The PostgreSQL store's writer: each batch one transaction (the inserts
//! staged and created together, the other requests in order), its decision
//! records appended in it by the journal, the other replicas notified at
//! its commit, then every caller answered; with
//! `node.store.writer_transactions` above 1, batches of new submits overlap
//! ([`Lanes`]) and anything else runs alone; a batch is bounded by
//! `node.store.timeout` (`deadline`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use federation_api::{Task, TaskState};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;

use super::deadline::{Relay, relayed};
use super::staging::{Begun, Staging};
use super::tx::Tx;
use super::{CHANNEL, NOTIFY_BYTES, Shared, listen};
use crate::pg::Pg;
use crate::tasks::journal::{Head, Journal, Record};
use crate::tasks::requests::{self, Applied, Op, Settled};
use crate::tasks::shared::Change;
use crate::tasks::{InsertOutcome, MAX_BATCH, RecordState, RecordedInsert, StoreError};

/// Gathers batches and runs them, each bounded by `node.store.timeout`,
/// at most `transactions` at once (`node.store.writer_transactions`, never
/// more than the pool's size less one: reads keep a connection). Batches
/// of new submits overlap, each on its own pooled connection, so one
/// batch's round trips and commit flush no longer hold up the next; they
/// queue only on the chain head's lock (from the append to the commit's
/// flush).
///
/// A batch of inserts only runs beside the batches in flight when none of
/// them carries one of its task ids or idempotency keys ([`Lanes`]); any
/// other batch (a lease, a cancel, a flush, …) waits until every batch
/// before it has ended and runs alone. So requests keep their arrival
/// order wherever it can matter: an operation on a task starts after the
/// task's insert ended, and two inserts of one key never race each other
/// from this controller (the second finds the first's task).
pub(super) fn writer_loop(
    pg: &Pg,
    region: &str,
    shared: &Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Op>,
    transactions: usize,
) {
    let mut requests = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    let lanes = Lanes::new(transactions.min(pg.pool().status().max_size.saturating_sub(1)));
    loop {
        // A batch is gathered once a lane is free, not before: one gathered
        // while every lane was busy would wait with what it took, leaving
        // whatever came meanwhile for the batch after it (at 64 submits in
        // flight on one lane, each submit waited for two commits).
        let reserved = pg.handle().block_on(lanes.reserve());
        let Some(batch) = requests.next_batch() else {
            break;
        };
        let names = inserted_names(&batch);
        let lane = pg.handle().block_on(lanes.take(reserved, names));
        let Some(batch) = requests::only_flushes(batch) else {
            // Answered once every batch before them ended (they waited for
            // every lane above).
            continue;
        };
        let (batch, relays): (Vec<Op>, Vec<Relay>) = batch.into_iter().map(relayed).unzip();
        let pg2 = pg.clone();
        let region = region.to_string();
        let shared = Arc::clone(shared);
        pg.handle().spawn(async move {
            // Bounded by node.store.timeout: past it the transaction and
            // its connection are dropped, and every caller hears that the
            // store is unavailable (nothing of the batch was acknowledged).
            let done = pg2
                .bounded(async {
                    run_batch(&pg2, &region, &shared, shared.journal(), batch).await;
                    Ok(())
                })
                .await;
            let err = match done {
                Ok(()) => {
                    StoreError::Db("internal: a request of the batch was not answered".into())
                }
                Err(e) => StoreError::from(e),
            };
            for r in relays {
                r.finish(&err);
            }
            drop(lane);
        });
    }
    // Every batch in flight ends before the writer does.
    let reserved = pg.handle().block_on(lanes.reserve());
    pg.handle().block_on(lanes.take(reserved, None));
}

/// The writer's transactions in flight: a permit each (all of them for a
/// batch that runs alone), and the task ids and idempotency keys of the
/// inserts they carry.
struct Lanes {
    free: Arc<tokio::sync::Semaphore>,
    count: u32,
    busy: Arc<Mutex<HashMap<String, usize>>>,
}

/// A batch's hold on [`Lanes`] while it runs: its permits and names are
/// given back when it is dropped.
struct Lane {
    _permits: Option<tokio::sync::OwnedSemaphorePermit>,
    names: Vec<String>,
    busy: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for n in &self.names {
            if let Some(c) = busy.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    busy.remove(n);
                }
            }
        }
    }
}

impl Lanes {
    fn new(count: usize) -> Self {
        let count = count.max(1);
        Self {
            free: Arc::new(tokio::sync::Semaphore::new(count)),
            count: u32::try_from(count).unwrap_or(1),
            busy: Arc::default(),
        }
    }

    /// Waits until a lane is free and holds it for the next batch
    /// ([`Lanes::take`]). `None` only if the semaphore were closed (it
    /// never is; a closed one only means no wait).
    async fn reserve(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.free).acquire_owned().await.ok()
    }

    /// Waits until a batch may start, holding the lane `reserved`: with
    /// `names` (a batch of inserts only, their ids and keys) beside the
    /// batches in flight unless one of them carries one of the names;
    /// otherwise (`None`, or a name in flight) alone, once every batch in
    /// flight has ended.
    async fn take(
        &self,
        reserved: Option<tokio::sync::OwnedSemaphorePermit>,
        names: Option<Vec<String>>,
    ) -> Lane {
        let beside = names.as_ref().is_some_and(|names| {
            let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            !names.iter().any(|n| busy.contains_key(n))
        });
        let mut permits = reserved;
        if !beside && self.count > 1 {
            // Alone: every other lane too (the semaphore is never closed).
            if let Ok(rest) = Arc::clone(&self.free)
                .acquire_many_owned(self.count - 1)
                .await
            {
                match permits.as_mut() {
                    Some(p) => p.merge(rest),
                    None => permits = Some(rest),
                }
            }
        }
        let names = names.unwrap_or_default();
        {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            for n in &names {
                *busy.entry(n.clone()).or_insert(0) += 1;
            }
        }
        Lane {
            _permits: permits,
            names,
            busy: Arc::clone(&self.busy),
        }
    }
}

/// The task ids and idempotency keys of a batch of inserts only (`None`
/// for a batch with any other request).
fn inserted_names(batch: &[Op]) -> Option<Vec<String>> {
    let mut names = Vec::with_capacity(batch.len() * 2);
    for op in batch {
        let Op::Insert { task, .. } = op else {
            return None;
        };
        names.push(format!("i {}", task.task_id));
        if !task.idempotency_key.is_empty() {
            names.push(format!("k {}", task.idempotency_key));
        }
    }
    Some(names)
}

/// A request of a batch on its way through [`run_batch`].
pub(super) enum Slot {
    /// An insert, staged or answered in [`Slot::Done`] later.
    Insert {
        record: Option<Record>,
        reply: oneshot::Sender<RecordedInsert>,
    },
    Done(Applied),
}

/// Applies a batch in one transaction with its records appended in it,
/// commits, and answers every request (or fails them all).
///
/// Round trips: a batch of new submits, each with its record, is one
/// ([`in_one_round_trip`]: BEGIN, the INSERT with the records' append in
/// one statement that appends only if it created every task, the
/// notification and COMMIT, all sent before the first answer). Any other
/// batch, and one whose INSERT met a stored task: BEGIN with the multi-row
/// INSERT behind it (which creates rows only inside that transaction, so a
/// BEGIN that failed commits nothing; any other statement waits for
/// BEGIN's answer), and, only when it collided with stored ids or keys,
/// their look-up; then the records (sealed by the database after the head
/// it locks), the notification and COMMIT. Each
/// statement is prepared once per connection ([`prepare`], before BEGIN)
/// and then one message, and the pipelined ones are sent before the first
/// of them is answered.
pub(super) async fn run_batch(
    pg: &Pg,
    region: &str,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) {
    let client = match pg.client().await {
        Ok(c) => c,
        Err(e) => return requests::fail(Vec::new(), batch, StoreError::from(e)),
    };
    let Some(batch) = in_one_round_trip(pg, &client, region, shared, journal, batch).await else {
        return;
    };
    let mut committed = false;
    run_in_transaction(pg, &client, region, shared, journal, batch, &mut committed).await;
    if !committed {
        // Whatever state the transaction is in, it ends here (the
        // connection goes back to the pool outside any transaction).
        let _ = client.batch_execute("ROLLBACK").await;
    }
}

/// A batch of new submits, each with its record, in one round trip: BEGIN,
/// then one statement that creates every task and appends their records
/// only if it created them all (`Tx::create_with_records`), the
/// notification and COMMIT, all sent before the first answer. Returns the
/// batch untouched when it is not such a batch, or when one of its tasks
/// was stored already (the statement refused, nothing kept): the general
/// path then answers it (a retried submit, a known key).
async fn in_one_round_trip(
    pg: &Pg,
    client: &deadpool_postgres::ClientWrapper,
    region: &str,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    mut batch: Vec<Op>,
) -> Option<Vec<Op>> {
    let Some(journal) = journal else {
        return Some(batch);
    };
    let eligible = batch.iter().all(|op| {
        matches!(
            op,
            Op::Insert {
                record: Some(_),
                ..
            }
        )
    });
    if !eligible || batch.is_empty() {
        return Some(batch);
    }
    let t = Tx {
        txn: client,
        pg,
        region,
        shared,
    };
    let now = shared.clock.now_ms();
    let mut staged: Vec<(usize, Task)> = Vec::with_capacity(batch.len());
    for (i, op) in batch.iter().enumerate() {
        if let Op::Insert { task, .. } = op {
            if !matches!(
                t.stage((**task).clone(), now, &mut staged, i),
                Staging::Staged
            ) {
                return Some(batch);
            }
        }
    }
    if let Err(e) = prepare(client, Some(journal)).await {
        requests::fail(Vec::new(), batch, StoreError::from(pg.db(&e)));
        return None;
    }
    // The records, taken out of the requests (put back if the general path
    // runs the batch) and named after the tasks as created.
    let mut records: Vec<Record> = Vec::with_capacity(batch.len());
    for (op, (_, task)) in batch.iter_mut().zip(&staged) {
        if let Op::Insert { record, .. } = op {
            if let Some(r) = record.as_mut() {
                r.set_task_id(&task.task_id);
            }
            records.extend(record.take());
        }
    }
    let changes: Vec<Change> = staged
        .iter()
        .map(|(_, task)| Change {
            before: None,
            after: TaskState::Queued,
            task: Some(task.clone()),
        })
        .collect();
    let mut begun = Begun::send(&t).await;
    let appended = t.create_with_records(journal, &staged, &records);
    let notified = notify(client, region, &shared.instance, &changes);
    let started = std::time::Instant::now();
    let mut ended = false;
    let committed = commit_behind(client, Some(Box::pin(appended)), notified, &mut ended).await;
    let begun = begun.wait(&t).await;
    shared.observe_commit(started.elapsed());
    let head = match (committed, begun) {
        (Ok(head), Ok(())) => head,
        (committed, begun) => {
            // Whatever state the transaction is in, it ends here.
            let _ = client.batch_execute("ROLLBACK").await;
            let refused = committed
                .as_ref()
                .err()
                .and_then(|e| e.code())
                .map(|c| c.code())
                == Some(crate::audit::postgres::NOT_ALL_CREATED);
            let mut records = records.into_iter();
            for op in batch.iter_mut() {
                if let Op::Insert { record, .. } = op {
                    *record = records.next();
                }
            }
            if refused {
                return Some(batch);
            }
            let err = match (committed, begun) {
                (Err(e), _) => StoreError::from(pg.db(&e)),
                (_, Err(e)) => e,
                (Ok(_), Ok(())) => StoreError::Db("internal: the batch failed".into()),
            };
            tracing::error!(error = %err, "task store commit failed");
            requests::fail(Vec::new(), batch, err);
            return None;
        }
    };
    let mut records = records.into_iter();
    let applied: Vec<Applied> = batch
        .into_iter()
        .zip(staged)
        .filter_map(|(op, (_, task))| match op {
            Op::Insert { reply, .. } => Some(Applied::Insert {
                result: Box::new(Ok(InsertOutcome::Created(task))),
                record: records.next(),
                reply,
            }),
            _ => None,
        })
        .collect();
    let (answers, _) = requests::answers(applied, true);
    settle_committed(shared, Some(journal), head, changes, answers);
    None
}

#[allow(clippy::too_many_arguments)]
async fn run_in_transaction(
    pg: &Pg,
    client: &deadpool_postgres::ClientWrapper,
    region: &str,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
    ended: &mut bool,
) {
    let now = shared.clock.now_ms();
    let mut changes = Vec::new();
    let t = Tx {
        txn: client,
        pg,
        region,
        shared,
    };
    // The journal's statement whether or not this batch carries records
    // (free once cached).
    if let Err(e) = prepare(client, journal).await {
        return requests::fail(Vec::new(), batch, StoreError::from(pg.db(&e)));
    }
    // Sent now, answered later: a batch of new submits sends its INSERT
    // right behind it.
    let mut begun = Begun::send(&t).await;
    // Inserts are staged and created together (one multi-row INSERT) before
    // any other request runs and at the end: a batch of submits costs a
    // fixed number of round trips, not two per task.
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
                    match t.stage(*task, now, &mut staged, i) {
                        Staging::Answered(done) => inserts[i] = Some(*done),
                        Staging::Staged => {}
                        Staging::Clash(task) => {
                            begun.wait(&t).await?;
                            t.create_staged(&mut begun, &mut staged, &mut inserts, &mut changes)
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
                    let created = async {
                        begun.wait(&t).await?;
                        t.create_staged(&mut begun, &mut staged, &mut inserts, &mut changes)
                            .await
                    };
                    if let Err(e) = created.await {
                        op.refuse(&e);
                        return Err(e);
                    }
                    let done = requests::apply(&mut &t, op, now, &mut changes).await;
                    let fatal = done.fatal().cloned();
                    slots.push(Slot::Done(done));
                    if let Some(e) = fatal {
                        return Err(e);
                    }
                }
            }
        }
        // Pipelined behind BEGIN when it is the batch's first statement.
        t.create_staged(&mut begun, &mut staged, &mut inserts, &mut changes)
            .await?;
        begun.wait(&t).await
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
    // The chain's head is locked only here, by a batch that carries
    // records, and held just to the commit's flush.
    let append = match journal {
        Some(j) if !records.is_empty() => Some(j.append(client, records)),
        _ => None,
    };
    // Other replicas hear of the changes when this commits.
    let notified = notify(client, region, &shared.instance, &changes);
    let started = std::time::Instant::now();
    let appended = commit_behind(client, append, notified, ended).await;
    shared.observe_commit(started.elapsed());
    let head = match appended {
        Ok(head) => head,
        Err(e) => {
            let err = StoreError::from(pg.db(&e));
            tracing::error!(error = %err, "task store commit failed");
            return requests::fail(answers, Vec::new(), err);
        }
    };
    settle_committed(shared, journal, head, changes, answers);
}

/// After a batch committed: the counts and the journal's head move, the
/// changes are heard, and every request is answered.
fn settle_committed(
    shared: &Shared,
    journal: Option<&dyn Journal>,
    head: Option<Head>,
    changes: Vec<Change>,
    answers: Vec<requests::Answer>,
) {
    let created = changes.iter().filter(|c| c.before.is_none()).count() as u64;
    shared.created.fetch_add(created, Ordering::Relaxed);
    let records = match (journal, head) {
        (Some(j), Some(head)) => {
            j.committed(head);
            RecordState::Written
        }
        _ => RecordState::NotWritten,
    };
    shared.committed(changes);
    let settled = Settled {
        committed: Ok(()),
        records,
    };
    for a in answers {
        a.settle(&settled);
    }
}

/// Sends the append (if any) and the notification, then COMMIT behind
/// them without waiting for their answers, and awaits all three: one
/// round trip. COMMIT is sent only once both statements have left (each
/// is sent at its first poll; one refused before leaving fails the batch
/// with nothing committed). A statement the server refuses aborts the
/// transaction, so the COMMIT behind it rolls back; either way `ended` is
/// set once COMMIT was sent. Returns the journal's new head.
async fn commit_behind<'a>(
    client: &deadpool_postgres::ClientWrapper,
    append: Option<futures::future::BoxFuture<'a, Result<Option<Head>, tokio_postgres::Error>>>,
    notified: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
    ended: &mut bool,
) -> Result<Option<Head>, tokio_postgres::Error> {
    use std::task::Poll;
    let mut append = append;
    let mut notified = std::pin::pin!(notified);
    let appended = match append.as_mut() {
        Some(a) => match futures::poll!(a.as_mut()) {
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Ready(Ok(h)) => Some(Ok(h)),
            Poll::Pending => None,
        },
        None => Some(Ok(None)),
    };
    let notice = match futures::poll!(notified.as_mut()) {
        Poll::Ready(Err(e)) => return Err(e),
        Poll::Ready(Ok(())) => Some(Ok(())),
        Poll::Pending => None,
    };
    *ended = true;
    let (appended, notice, committed) = futures::join!(
        async {
            match (appended, append) {
                (Some(r), _) => r,
                (None, Some(a)) => a.await,
                (None, None) => Ok(None),
            }
        },
        async {
            match notice {
                Some(r) => r,
                None => notified.await,
            }
        },
        client.batch_execute("COMMIT")
    );
    let head = appended?;
    notice?;
    committed?;
    Ok(head)
}

/// The notifications of a batch, one per payload.
const NOTIFY_SQL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";
const NOTIFY_TYPES: &[Type] = &[Type::TEXT, Type::TEXT_ARRAY];

/// Prepares every statement a batch pipelines (its inserts', the
/// notification's, the journal's), once per connection: PostgreSQL parses
/// and plans each once, and each is then sent at its first poll, in the
/// order the writer polls them. Were one prepared on the way, its round
/// trip would let the statements pipelined behind it go first: a COMMIT
/// ahead of the records it must carry.
async fn prepare(
    client: &deadpool_postgres::ClientWrapper,
    journal: Option<&dyn Journal>,
) -> Result<(), tokio_postgres::Error> {
    let journal = async {
        match journal {
            Some(j) => {
                j.prepare(client).await?;
                super::staging::prepare_with_records(client, j).await
            }
            None => Ok(()),
        }
    };
    futures::try_join!(
        super::staging::prepare(client),
        client.prepare_typed_cached(NOTIFY_SQL, NOTIFY_TYPES),
        journal,
    )
    .map(|_| ())
}

/// Queues the notifications of a batch's changes (sent at commit):
/// `<instance> <region> d=<queued>,<leased>,<succeeded>,<failed>,<cancelled> n=<new> <id> <id> …`,
/// split to stay under the limit; the counts' change (`d=`) rides in the
/// first payload (the others carry `d=0,0,0,0,0`), and each payload's `n=` says how many of its ids
/// (the first ones) are tasks the batch created, which a replica that does
/// not lead skips. The statement is sent at the first poll (none for no
/// changes).
pub(super) async fn notify(
    txn: &deadpool_postgres::ClientWrapper,
    region: &str,
    instance: &str,
    changes: &[Change],
) -> Result<(), tokio_postgres::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let payloads = payloads(instance, region, changes);
    // Prepared before the batch began ([`prepare`]): sent at the first
    // poll, ahead of the COMMIT pipelined behind it.
    let notifying = txn.prepare_typed_cached(NOTIFY_SQL, NOTIFY_TYPES).await?;
    txn.execute(&notifying, &[&CHANNEL, &payloads])
        .await
        .map(|_| ())
}

/// The payloads of [`notify`] for `changes` (at least one), each under
/// [`NOTIFY_BYTES`] unless one id alone is longer.
fn payloads(instance: &str, region: &str, changes: &[Change]) -> Vec<String> {
    let head = format!("{instance} {region}");
    // Created tasks first: a payload's `n=` counts them from its first id.
    let ids: Vec<(bool, &str)> = changes
        .iter()
        .filter(|c| c.before.is_none())
        .chain(changes.iter().filter(|c| c.before.is_some()))
        .filter_map(|c| {
            c.task
                .as_ref()
                .map(|t| (c.before.is_none(), t.task_id.as_str()))
        })
        .collect();
    // The batch's count change in the first payload, none in the others
    // (a payload without `d=` would make the listener count again).
    let mut delta = listen::delta_word(changes);
    let mut payloads = Vec::new();
    let mut start = 0;
    while start < ids.len() || payloads.is_empty() {
        // ` n=<count>` is at most 22 bytes.
        let mut len = head.len() + delta.len() + 24;
        let mut end = start;
        while end < ids.len() && (end == start || len + ids[end].1.len() < NOTIFY_BYTES) {
            len += ids[end].1.len() + 1;
            end += 1;
        }
        let new = ids[start..end].iter().filter(|(n, _)| *n).count();
        let mut payload = format!("{head} {delta} n={new}");
        for (_, id) in &ids[start..end] {
            payload.push(' ');
            payload.push_str(id);
        }
        payloads.push(payload);
        delta = listen::NO_DELTA.to_string();
        start = end;
    }
    payloads
}

#[cfg(test)]
mod tests {
    use super::Lanes;
    use std::task::Poll;

    mod notifications {
        use super::super::listen::Heard;
        use super::super::{NOTIFY_BYTES, payloads};
        use crate::tasks::shared::Change;
        use federation_api::{Task, TaskState};

        fn change(id: &str, before: Option<TaskState>, after: TaskState) -> Change {
            Change {
                before,
                after,
                task: Some(Task {
                    task_id: id.to_string(),
                    ..Default::default()
                }),
            }
        }

        fn heard(payloads: &[String], wanted: bool) -> Vec<Heard> {
            payloads
                .iter()
                .map(|p| Heard::of(p, "other", "europe", wanted).expect("another replica's"))
                .collect()
        }

        #[test]
        fn a_replica_that_does_not_lead_skips_the_tasks_a_commit_created() {
            let changes = [
                change("0001.europe", Some(TaskState::Queued), TaskState::Leased),
                change("0002.europe", None, TaskState::Queued),
                change("0003.europe", None, TaskState::Queued),
                change("0004.europe", Some(TaskState::Leased), TaskState::Succeeded),
            ];
            let sent = payloads("inst-a", "europe", &changes);
            assert_eq!(
                sent,
                ["inst-a europe d=1,0,1,0,0 n=2 0002.europe 0003.europe 0001.europe 0004.europe"]
            );
            let sent: Vec<String> = sent
                .iter()
                .map(|p| p.replacen("inst-a", "other-a", 1))
                .collect();
            let all = heard(&sent, true);
            assert_eq!(
                all[0].ids,
                ["0002.europe", "0003.europe", "0001.europe", "0004.europe"]
            );
            assert!(!all[0].created);
            let changed = heard(&sent, false);
            assert_eq!(changed[0].ids, ["0001.europe", "0004.europe"]);
            assert!(changed[0].created, "long polls are to be woken");
            assert_eq!(
                (changed[0].delta, changed[0].moved),
                ([1, 0, 1, 0, 0], true)
            );
            // Its own notification, and another region's, are not read.
            assert_eq!(Heard::of(&sent[0], "other-a", "europe", true), None);
            assert_eq!(Heard::of(&sent[0], "x", "asia_pacific", true), None);
        }

        #[test]
        fn a_large_commit_is_split_and_every_payload_counts_its_own_new_tasks() {
            let mut changes: Vec<Change> = (0..900)
                .map(|i| change(&format!("{i:024}.europe"), None, TaskState::Queued))
                .collect();
            changes.extend((0..300).map(|i| {
                change(
                    &format!("u{i:023}.europe"),
                    Some(TaskState::Leased),
                    TaskState::Failed,
                )
            }));
            let sent = payloads("inst-a", "europe", &changes);
            assert!(sent.len() > 2, "{} payloads", sent.len());
            assert!(sent.iter().all(|p| p.len() <= NOTIFY_BYTES));
            let sent: Vec<String> = sent
                .iter()
                .map(|p| p.replacen("inst-a", "other-a", 1))
                .collect();
            // Every payload moves the counts (the first by the commit's
            // change, the others by nothing): none makes the listener count
            // again.
            let all = heard(&sent, true);
            assert!(all.iter().all(|h| h.moved));
            assert_eq!(all[0].delta, [900, -300, 0, 300, 0]);
            assert!(all[1..].iter().all(|h| h.delta == [0; 5]));
            let ids: Vec<String> = all.into_iter().flat_map(|h| h.ids).collect();
            assert_eq!(ids.len(), 1200);
            let changed: Vec<String> = heard(&sent, false)
                .into_iter()
                .flat_map(|h| h.ids)
                .collect();
            assert_eq!(changed.len(), 300);
            assert!(changed.iter().all(|id| id.starts_with('u')));
        }

        #[test]
        fn an_older_replicas_notification_is_read_whole() {
            // No `n=`: every id is read, also by a replica that does not lead.
            let old = "old-a europe d=1,0,0,0,0 0002.europe";
            let h = Heard::of(old, "me", "europe", false).expect("read");
            assert_eq!(h.ids, ["0002.europe"]);
            assert!(!h.created);
            let old_rest = "old-a europe 0003.europe";
            let h = Heard::of(old_rest, "me", "europe", false).expect("read");
            assert_eq!((h.ids.len(), h.moved), (1, false));
        }
    }

    fn names(of: &[&str]) -> Option<Vec<String>> {
        Some(of.iter().map(|s| s.to_string()).collect())
    }

    /// As the writer takes a lane: reserved first, then taken for `names`.
    async fn take(lanes: &Lanes, names: Option<Vec<String>>) -> super::Lane {
        let reserved = lanes.reserve().await;
        lanes.take(reserved, names).await
    }

    #[tokio::test]
    async fn the_next_batch_is_gathered_only_once_a_lane_is_free() {
        let lanes = Lanes::new(1);
        let a = take(&lanes, names(&["i a"])).await;
        // The one lane is busy: the writer does not gather yet (what comes
        // meanwhile joins the batch gathered when `a` ends).
        let mut reserving = std::pin::pin!(lanes.reserve());
        assert!(futures::poll!(reserving.as_mut()).is_pending());
        drop(a);
        let reserved = match futures::poll!(reserving.as_mut()) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("no lane reserved with none in flight"),
        };
        // The reserved lane is the batch's: it starts at once.
        let b = std::pin::pin!(lanes.take(reserved, names(&["i b"])));
        assert!(matches!(futures::poll!(b), Poll::Ready(_)));
    }

    #[tokio::test]
    async fn inserts_of_other_tasks_run_beside_each_other_up_to_the_lanes() {
        let lanes = Lanes::new(2);
        let a = take(&lanes, names(&["i a", "k 1"])).await;
        let b = take(&lanes, names(&["i b", "k 2"])).await;
        // Both lanes taken: a third batch waits for one of them.
        let mut c = std::pin::pin!(take(&lanes, names(&["i c"])));
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(a);
        assert!(matches!(futures::poll!(c.as_mut()), Poll::Ready(_)));
        drop(b);
    }

    #[tokio::test]
    async fn an_insert_naming_a_task_or_key_in_flight_waits_for_every_batch() {
        let lanes = Lanes::new(3);
        let a = take(&lanes, names(&["i a", "k same"])).await;
        let b = take(&lanes, names(&["i b"])).await;
        // The key is in flight in `a`: this batch runs alone, after both.
        let mut c = std::pin::pin!(take(&lanes, names(&["i c", "k same"])));
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(b);
        let c = match futures::poll!(c.as_mut()) {
            Poll::Ready(lane) => lane,
            Poll::Pending => panic!("the batch still waits with nothing in flight"),
        };
        // It holds every lane: nothing starts beside it.
        let mut d = std::pin::pin!(take(&lanes, names(&["i d"])));
        assert!(futures::poll!(d.as_mut()).is_pending());
        drop(c);
        assert!(matches!(futures::poll!(d.as_mut()), Poll::Ready(_)));
    }

    #[tokio::test]
    async fn any_other_batch_runs_alone_after_every_batch_before_it() {
        let lanes = Lanes::new(3);
        let a = take(&lanes, names(&["i a"])).await;
        // A cancel, a lease, a flush: `None`.
        let mut other = std::pin::pin!(take(&lanes, None));
        assert!(futures::poll!(other.as_mut()).is_pending());
        drop(a);
        let other = match futures::poll!(other.as_mut()) {
            Poll::Ready(lane) => lane,
            Poll::Pending => panic!("the batch still waits with nothing in flight"),
        };
        let mut next = std::pin::pin!(take(&lanes, names(&["i b"])));
        assert!(futures::poll!(next.as_mut()).is_pending());
        drop(other);
        assert!(matches!(futures::poll!(next.as_mut()), Poll::Ready(_)));
    }

    #[tokio::test]
    async fn a_name_is_free_again_once_its_batch_ended() {
        let lanes = Lanes::new(2);
        let a = take(&lanes, names(&["k same"])).await;
        drop(a);
        let _b = take(&lanes, names(&["k same"])).await;
        // Taken beside `_b`'s other lane, not alone: a free name again.
        let c = std::pin::pin!(take(&lanes, names(&["i other"])));
        assert!(matches!(futures::poll!(c), Poll::Ready(_)));
    }
}
