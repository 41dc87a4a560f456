//! The embedded store's single writer thread: group commit (every request
//! waiting, one write transaction made durable as one frame of the
//! write-ahead log: one write, one `fdatasync`), the batch's decision
//! records sealed by the journal and staged in the same transaction
//! (`pending`), then every caller answered; checkpoints between batches.

use redb::Database;
use tokio::sync::mpsc;

use super::idempotency::{IDEM_KEYS, IdemIndex};
use super::open::write_mark;
use super::pending;
use super::tables::Tables;
use super::wal::Wal;
use super::{LEASES, MAX_BATCH, QUEUE, Shared, TASKS};
use crate::tasks::RecordState;
use crate::tasks::StoreError;
use crate::tasks::journal::Journal;
use crate::tasks::requests::{self, Op, Settled};
use crate::tasks::witness::Mark;

pub(super) fn writer_loop(
    db: &Database,
    wal: &Wal,
    shared: &Shared,
    rx: mpsc::UnboundedReceiver<Op>,
) {
    let mut requests = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    // Ends when every sender is gone (the last TaskStore clone dropped).
    while let Some(batch) = requests.next_batch() {
        // A damaged file may make the engine panic: the batch's callers
        // hear `Closed` (their replies are dropped), the writer goes on.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(db, wal, shared, shared.journal(), batch);
            // After the batch's answers: its callers do not wait for it.
            let mut log = wal.lock();
            if log.due() {
                if let Err(e) = log.checkpoint(db) {
                    tracing::error!(error = %e, "task store checkpoint failed (the write-ahead log keeps the work)");
                }
            }
        }));
        if ran.is_err() {
            tracing::error!(
                hint = super::open::DAMAGED_HINT,
                "the storage engine panicked applying a batch (a damaged task store?); its requests failed"
            );
        }
    }
    let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wal.lock().close(db)));
    match closed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the task store's last checkpoint failed (the write-ahead log keeps the work)")
        }
        Err(_) => tracing::error!(
            hint = super::open::DAMAGED_HINT,
            "the storage engine panicked in the task store's last checkpoint"
        ),
    }
}

pub(super) fn run_batch(
    db: &Database,
    wal: &Wal,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) {
    let Some(batch) = requests::only_flushes(batch) else {
        return;
    };
    // A failed batch aborts its transaction, the keys it staged with it.
    let _ = apply_batch(db, wal, shared, journal, batch);
}

/// Applies a batch in one write transaction with its records staged in it
/// (sealed into the journal's chain, their rows in `pending_records`), and
/// answers every request once it is committed: the tasks and their records
/// durable with one frame of the write-ahead log, one `fdatasync` (or the
/// error that failed the batch). The journal writes its file afterwards;
/// rows it holds are dropped here.
pub(super) fn apply_batch(
    db: &Database,
    wal: &Wal,
    shared: &Shared,
    journal: Option<&dyn Journal>,
    batch: Vec<Op>,
) -> Result<(), StoreError> {
    let now = shared.clock.now_ms();
    let watched = shared.watched();
    let mut changes = Vec::new();
    let mut log = wal.lock();
    let txn = match log.begin(db) {
        Ok(txn) => txn,
        Err(e) => {
            requests::fail(Vec::new(), batch, e.clone());
            return Err(e);
        }
    };
    let mut applied = Vec::with_capacity(batch.len());
    let newest_created;
    {
        let opened = (|| -> Result<_, StoreError> {
            Ok((
                txn.open(TASKS)?,
                txn.open(QUEUE)?,
                txn.open(LEASES)?,
                txn.open(IDEM_KEYS)?,
            ))
        })();
        let (tasks, queue, leases, keys) = match opened {
            Ok(tables) => tables,
            Err(e) => {
                requests::fail(Vec::new(), batch, e.clone());
                return Err(e);
            }
        };
        let mut t = Tables {
            shared,
            txn: &txn,
            tasks,
            idem: IdemIndex { table: keys },
            queue,
            leases,
            watched,
            newest_created: shared
                .newest_created
                .load(std::sync::atomic::Ordering::Acquire),
        };
        let mut ops = batch.into_iter();
        while let Some(op) = ops.next() {
            // Nothing here waits: the operations are the file's, in memory.
            let done = futures::executor::block_on(requests::apply(&mut t, op, now, &mut changes));
            if let Some(e) = done.fatal().cloned() {
                // The transaction may hold part of this request: abort it
                // all; every caller of the batch gets the error, and no
                // record of the batch has been appended.
                applied.push(done);
                let (answers, _) = requests::answers(applied, journal.is_some());
                requests::fail(answers, ops, e.clone());
                return Err(e);
            }
            applied.push(done);
        }
        newest_created = t.newest_created;
    }
    let (answers, records) = requests::answers(applied, journal.is_some());
    // The marks move in the same transaction as the work they count.
    let created = changes.iter().filter(|c| c.before.is_none()).count() as u64;
    let before = *shared.mark.lock().unwrap_or_else(|e| e.into_inner());
    let mark = Mark {
        commit: before.commit.saturating_add(1),
        created: before.created.saturating_add(created),
    };
    // So do the counts (read at open instead of recounted).
    let counts = super::counters::after(shared.counts(), &changes);
    if let Err(e) = write_mark(&txn, mark)
        .and_then(|()| super::counters::write(&txn, counts, mark.commit, newest_created))
    {
        requests::fail(answers, Vec::new(), e.clone());
        return Err(e);
    }
    // The decision records are sealed into the chain and kept in this
    // transaction: its commit makes the tasks and their records durable
    // together. Rows the log's file holds by now are dropped.
    let mut staged = Ok(());
    let records = match journal {
        Some(j) => {
            let state = if records.is_empty() {
                RecordState::NotWritten
            } else {
                match pending::stage(&txn, j, records) {
                    Ok(()) => RecordState::Written,
                    Err(Ok(why)) => {
                        tracing::error!(error = %why, "staging decision records failed");
                        RecordState::Failed(why)
                    }
                    // Sealed and queued, but not kept: the batch fails.
                    Err(Err(e)) => {
                        staged = Err(e);
                        RecordState::Written
                    }
                }
            };
            if staged.is_ok() {
                staged = pending::drop_durable(&txn, j.durable_seq());
            }
            state
        }
        None => RecordState::NotWritten,
    };
    let commit_started = std::time::Instant::now();
    let committed = match staged {
        Ok(()) => log.commit(txn),
        Err(e) => Err(e),
    };
    drop(log);
    shared.observe_commit(commit_started.elapsed());
    if let Err(e) = &committed {
        tracing::error!(error = %e, "task store commit failed");
    } else {
        *shared.mark.lock().unwrap_or_else(|e| e.into_inner()) = mark;
        shared
            .newest_created
            .store(newest_created, std::sync::atomic::Ordering::Release);
        shared.witness.advance(mark);
        shared.committed(changes);
    }
    let settled = Settled {
        committed: committed.clone(),
        records,
    };
    for a in answers {
        a.settle(&settled);
    }
    committed
}
