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

use federation_api::Task;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;

use super::deadline::{Relay, relayed};
use super::staging::Staging;
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
/// queue only on the chain head's lock (from behind the INSERT to the
/// COMMIT).
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
    while let Some(batch) = requests.next_batch() {
        let names = inserted_names(&batch);
        let lane = pg.handle().block_on(lanes.take(names));
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
    pg.handle().block_on(lanes.take(None));
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

    /// Waits until a batch may start: with `names` (a batch of inserts
    /// only, their ids and keys) beside the batches in flight unless one
    /// of them carries one of the names; otherwise (`None`, or a name in
    /// flight) alone, once every batch in flight has ended.
    async fn take(&self, names: Option<Vec<String>>) -> Lane {
        let beside = names.as_ref().is_some_and(|names| {
            let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            !names.iter().any(|n| busy.contains_key(n))
        });
        let wanted = if beside { 1 } else { self.count };
        // The semaphore is never closed; a closed one only means no wait.
        let permits = Arc::clone(&self.free).acquire_many_owned(wanted).await.ok();
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
/// Round trips of a batch of new submits: BEGIN with the look-up of the
/// batch's ids and keys; the multi-row INSERT with the chain head's lock
/// behind it; the records and the head, the notification and COMMIT. Each
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
    let mut committed = false;
    run_in_transaction(pg, &client, region, shared, journal, batch, &mut committed).await;
    if !committed {
        // Whatever state the transaction is in, it ends here (the
        // connection goes back to the pool outside any transaction).
        let _ = client.batch_execute("ROLLBACK").await;
    }
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
    // The chain's head is locked only by a batch that carries records.
    let chained = journal.filter(|_| batch.iter().any(carries_record));
    // The journal's statements whether or not this batch locks the head
    // (free once cached): the fallback below appends with them too.
    if let Err(e) = prepare(client, journal).await {
        return requests::fail(Vec::new(), batch, StoreError::from(pg.db(&e)));
    }
    // BEGIN and the look-up in one round trip (the look-up only reads; BEGIN
    // is checked before anything is written).
    let (begun, known) = futures::join!(client.batch_execute("BEGIN"), t.prefetch(&batch));
    if let Err(e) = begun {
        return requests::fail(Vec::new(), batch, StoreError::from(pg.db(&e)));
    }
    // Inserts are staged and created together (one multi-row INSERT) before
    // any other request runs and at the end: a batch of submits costs a
    // fixed number of round trips, not two per task.
    let known = match known {
        Ok(k) => k,
        Err(e) => return requests::fail(Vec::new(), batch, e),
    };
    let mut inserts: Vec<Option<Result<InsertOutcome, StoreError>>> =
        Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter().enumerate();
    let mut head = None;
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
                    let done = requests::apply(&mut &t, op, now, &mut changes).await;
                    let fatal = done.fatal().cloned();
                    slots.push(Slot::Done(done));
                    if let Some(e) = fatal {
                        return Err(e);
                    }
                }
            }
        }
        // The last INSERT with the chain head's lock pipelined behind it:
        // the lock costs no round trip of its own, and is held from here
        // to the commit.
        let (created, locked) = futures::join!(
            t.create_staged(&mut staged, &mut inserts, &mut changes),
            async {
                match chained {
                    Some(j) => j.lock_head(client).await.map(Some),
                    None => Ok(None),
                }
            }
        );
        created?;
        head = locked.map_err(|e| t.db(&e))?;
        Ok(())
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
    let append = match journal {
        Some(j) if !records.is_empty() => {
            let head = match head {
                Some(h) => h,
                // Not expected (a batch with records locked the head above).
                None => match j.lock_head(client).await {
                    Ok(h) => h,
                    Err(e) => {
                        return requests::fail(answers, Vec::new(), StoreError::from(pg.db(&e)));
                    }
                },
            };
            Some(j.append_after(client, head, records))
        }
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

/// Whether `op` carries decision records for the journal.
fn carries_record(op: &Op) -> bool {
    match op {
        Op::Insert { record, .. } => record.is_some(),
        Op::InsertBatch { records, .. } => records.as_ref().is_some_and(|r| !r.is_empty()),
        _ => false,
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
            Some(j) => j.prepare(client).await,
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
/// `<instance> <region> d=<queued>,<leased>,<succeeded>,<failed>,<cancelled> <id> <id> …`,
/// split to stay under the limit; the counts' change (`d=`) rides in the
/// first payload only. The statement is sent at the first poll (none for no
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
    let mut payloads = Vec::new();
    let head = format!("{instance} {region}");
    let mut current = format!("{head} {}", listen::delta_word(changes));
    for task in changes.iter().filter_map(|c| c.task.as_ref()) {
        if current.len() + task.task_id.len() + 1 > NOTIFY_BYTES && current.len() > head.len() {
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        current.push(' ');
        current.push_str(&task.task_id);
    }
    payloads.push(current);
    // Prepared before the batch began ([`prepare`]): sent at the first
    // poll, ahead of the COMMIT pipelined behind it.
    let notifying = txn.prepare_typed_cached(NOTIFY_SQL, NOTIFY_TYPES).await?;
    txn.execute(&notifying, &[&CHANNEL, &payloads])
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::Lanes;
    use std::task::Poll;

    fn names(of: &[&str]) -> Option<Vec<String>> {
        Some(of.iter().map(|s| s.to_string()).collect())
    }

    #[tokio::test]
    async fn inserts_of_other_tasks_run_beside_each_other_up_to_the_lanes() {
        let lanes = Lanes::new(2);
        let a = lanes.take(names(&["i a", "k 1"])).await;
        let b = lanes.take(names(&["i b", "k 2"])).await;
        // Both lanes taken: a third batch waits for one of them.
        let mut c = std::pin::pin!(lanes.take(names(&["i c"])));
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(a);
        assert!(matches!(futures::poll!(c.as_mut()), Poll::Ready(_)));
        drop(b);
    }

    #[tokio::test]
    async fn an_insert_naming_a_task_or_key_in_flight_waits_for_every_batch() {
        let lanes = Lanes::new(3);
        let a = lanes.take(names(&["i a", "k same"])).await;
        let b = lanes.take(names(&["i b"])).await;
        // The key is in flight in `a`: this batch runs alone, after both.
        let mut c = std::pin::pin!(lanes.take(names(&["i c", "k same"])));
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(c.as_mut()).is_pending());
        drop(b);
        let c = match futures::poll!(c.as_mut()) {
            Poll::Ready(lane) => lane,
            Poll::Pending => panic!("the batch still waits with nothing in flight"),
        };
        // It holds every lane: nothing starts beside it.
        let mut d = std::pin::pin!(lanes.take(names(&["i d"])));
        assert!(futures::poll!(d.as_mut()).is_pending());
        drop(c);
        assert!(matches!(futures::poll!(d.as_mut()), Poll::Ready(_)));
    }

    #[tokio::test]
    async fn any_other_batch_runs_alone_after_every_batch_before_it() {
        let lanes = Lanes::new(3);
        let a = lanes.take(names(&["i a"])).await;
        // A cancel, a lease, a flush: `None`.
        let mut other = std::pin::pin!(lanes.take(None));
        assert!(futures::poll!(other.as_mut()).is_pending());
        drop(a);
        let other = match futures::poll!(other.as_mut()) {
            Poll::Ready(lane) => lane,
            Poll::Pending => panic!("the batch still waits with nothing in flight"),
        };
        let mut next = std::pin::pin!(lanes.take(names(&["i b"])));
        assert!(futures::poll!(next.as_mut()).is_pending());
        drop(other);
        assert!(matches!(futures::poll!(next.as_mut()), Poll::Ready(_)));
    }

    #[tokio::test]
    async fn a_name_is_free_again_once_its_batch_ended() {
        let lanes = Lanes::new(2);
        let a = lanes.take(names(&["k same"])).await;
        drop(a);
        let _b = lanes.take(names(&["k same"])).await;
        // Taken beside `_b`'s other lane, not alone: a free name again.
        let c = std::pin::pin!(lanes.take(names(&["i other"])));
        assert!(matches!(futures::poll!(c), Poll::Ready(_)));
    }
}
