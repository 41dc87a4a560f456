//! The PostgreSQL store's writer thread: each batch one transaction (the
//! inserts staged and created together, the other requests in order), its
//! decision records appended in it by the journal, the other replicas
//! notified at its commit, then every caller answered; a batch is bounded
//! by `node.store.timeout` (`deadline`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

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

pub(super) fn writer_loop(
    pg: &Pg,
    region: &str,
    shared: &Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Op>,
) {
    let mut requests = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    while let Some(batch) = requests.next_batch() {
        let Some(batch) = requests::only_flushes(batch) else {
            continue;
        };
        let (batch, relays): (Vec<Op>, Vec<Relay>) = batch.into_iter().map(relayed).unzip();
        let pg2 = pg.clone();
        let region = region.to_string();
        let shared = Arc::clone(shared);
        // Bounded by node.store.timeout: past it the transaction and its
        // connection are dropped, and every caller hears that the store is
        // unavailable (nothing of the batch was acknowledged).
        let done = pg.handle().block_on(pg.bounded(async move {
            run_batch(&pg2, &region, &shared, shared.journal(), batch).await;
            Ok(())
        }));
        let err = match done {
            Ok(()) => StoreError::Db("internal: a request of the batch was not answered".into()),
            Err(e) => StoreError::from(e),
        };
        for r in relays {
            r.finish(&err);
        }
    }
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
/// statement is one message (`query_typed`: no separate parse), and the
/// pipelined ones are sent before the first of them is answered.
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
    client: &tokio_postgres::Client,
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
    client: &tokio_postgres::Client,
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

/// Queues the notifications of a batch's changes (sent at commit):
/// `<instance> <region> d=<queued>,<leased>,<succeeded>,<failed>,<cancelled> <id> <id> …`,
/// split to stay under the limit; the counts' change (`d=`) rides in the
/// first payload only. The statement is sent at the first poll (none for no
/// changes).
pub(super) async fn notify(
    txn: &tokio_postgres::Client,
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
    txn.execute_typed(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
        &[(&CHANNEL, Type::TEXT), (&payloads, Type::TEXT_ARRAY)],
    )
    .await
    .map(|_| ())
}
