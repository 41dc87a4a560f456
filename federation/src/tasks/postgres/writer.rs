//! The PostgreSQL store's writer thread: each batch one transaction (the
//! inserts staged and created together, the other requests in order), its
//! decision records appended in it by the journal, the other replicas
//! notified at its commit, then every caller answered; a batch is bounded
//! by `node.store.timeout` (`deadline`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use federation_api::Task;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Transaction;

use super::deadline::{Relay, relayed};
use super::staging::Staging;
use super::tx::Tx;
use super::{CHANNEL, NOTIFY_BYTES, Shared};
use crate::pg::Pg;
use crate::tasks::journal::{Journal, Record};
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
pub(super) async fn run_batch(
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
                    let done = requests::apply(&mut &t, op, now, &mut changes).await;
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
    shared.observe_commit(started.elapsed());
    if let Err(e) = committed {
        let err = StoreError::from(pg.db(&e));
        tracing::error!(error = %err, "task store commit failed");
        return requests::fail(answers, Vec::new(), err);
    }
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

/// Queues the notifications of a batch's changes (sent at commit):
/// `<instance> <region> <id> <id> …`, split to stay under the limit.
pub(super) async fn notify(
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
    for task in changes.iter().filter_map(|c| c.task.as_ref()) {
        if current.len() + task.task_id.len() + 1 > NOTIFY_BYTES && current.len() > head.len() {
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        current.push(' ');
        current.push_str(&task.task_id);
    }
    payloads.push(current);
    txn.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
        &[&CHANNEL, &payloads],
    )
    .await
    .map(|_| ())
}
