//! The writer channel both backends share: every mutation is one [`Op`]
//! carrying its own typed reply channel, so the async facade
//! ([`Requests`]) is one line an operation, and the writer answers each
//! caller with the type it waits for once its batch has committed
//! ([`Applied`], [`Answer`]). Each request is dispatched once ([`apply`])
//! to the backend's [`Operations`] inside its batch's transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use federation_api::{Takeover, Task};
use tokio::sync::{mpsc, oneshot};

use super::journal::Record;
use super::shared::Change;
use super::{
    AgentRecord, BatchInsert, CancelOutcome, InsertOutcome, MAX_LEASE_BATCH, RecordState,
    RecordedInsert, StoreError,
};

/// Where one request's answer goes.
pub(super) type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// The outcome of each task of an [`Op::InsertBatch`], in order.
pub(super) type Outcomes = Vec<Result<InsertOutcome, StoreError>>;

/// One mutation for the writer, with its reply channel.
pub(super) enum Op {
    Insert {
        task: Box<Task>,
        /// Its decision record, appended with the batch.
        record: Option<Record>,
        reply: oneshot::Sender<RecordedInsert>,
    },
    /// Inserts in one transaction; the records (one per task, for those
    /// created) go to the journal with the batch.
    InsertBatch {
        tasks: Vec<Task>,
        records: Option<Vec<Record>>,
        reply: oneshot::Sender<BatchInsert>,
    },
    Lease {
        agent: String,
        max: usize,
        ttl_ms: i64,
        skip: Option<Arc<HashSet<String>>>,
        reply: Reply<Vec<Task>>,
    },
    Renew {
        agent: String,
        id: String,
        ttl_ms: i64,
        reply: Reply<Task>,
    },
    Complete {
        agent: String,
        id: String,
        success: bool,
        result: Vec<u8>,
        error: String,
        reply: Reply<Task>,
    },
    Cancel {
        id: String,
        reason: String,
        reply: Reply<CancelOutcome>,
    },
    Expire {
        max_attempts: u32,
        /// The leader's fencing token (database backend; none: unfenced).
        fence: Option<i64>,
        reply: Reply<Vec<Task>>,
    },
    RequeueAgent {
        agent: String,
        reply: Reply<Vec<Task>>,
    },
    PutAgent {
        record: Box<AgentRecord>,
        reply: Reply<()>,
    },
    ForgetAgent {
        agent: String,
        reply: Reply<Vec<Task>>,
    },
    ExtendLeases {
        ttl_ms: i64,
        reply: Reply<Vec<Task>>,
    },
    MarkTakenOver {
        ids: Vec<String>,
        takeover: Takeover,
        reply: Reply<Vec<Task>>,
    },
    Restore {
        task: Box<Task>,
        reply: Reply<bool>,
    },
    Flush {
        reply: Reply<()>,
    },
}

impl Op {
    /// Answers a request that was never applied (its batch failed first).
    pub(super) fn refuse(self, err: &StoreError) {
        match self {
            Op::Insert { reply, .. } => {
                let _ = reply.send(RecordedInsert::failed(err.clone()));
            }
            Op::InsertBatch { reply, .. } => {
                let _ = reply.send(BatchInsert::failed(err.clone()));
            }
            Op::Lease { reply, .. }
            | Op::Expire { reply, .. }
            | Op::RequeueAgent { reply, .. }
            | Op::ForgetAgent { reply, .. }
            | Op::ExtendLeases { reply, .. }
            | Op::MarkTakenOver { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Op::Renew { reply, .. } | Op::Complete { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Op::Cancel { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Op::Restore { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Op::PutAgent { reply, .. } | Op::Flush { reply } => {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Answers a batch of flushes only (nothing to commit) and returns `None`;
/// any other batch is given back.
pub(super) fn only_flushes(batch: Vec<Op>) -> Option<Vec<Op>> {
    if !batch.iter().all(|op| matches!(op, Op::Flush { .. })) {
        return Some(batch);
    }
    for op in batch {
        if let Op::Flush { reply } = op {
            let _ = reply.send(Ok(()));
        }
    }
    None
}

/// The sending half of a store's writer channel: the async facade of
/// either backend, one line an operation. Closing it lets the writer finish
/// what it holds and exit.
pub(super) struct Requests(Option<mpsc::UnboundedSender<Op>>);

pub(super) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4)
}

impl Requests {
    pub(super) fn new(tx: mpsc::UnboundedSender<Op>) -> Self {
        Self(Some(tx))
    }

    /// Closes the channel (the writer drains and exits).
    pub(super) fn close(&mut self) {
        self.0.take();
    }

    /// Sends the op `make` builds around a reply channel and waits for the
    /// answer; `None` when the writer is gone.
    async fn send<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Op) -> Option<R> {
        let (reply, rx) = oneshot::channel();
        self.0.as_ref()?.send(make(reply)).ok()?;
        rx.await.ok()
    }

    async fn call<R>(&self, make: impl FnOnce(Reply<R>) -> Op) -> Result<R, StoreError> {
        self.send(make).await.unwrap_or(Err(StoreError::Closed))
    }

    pub(super) async fn insert(&self, task: Task) -> Result<InsertOutcome, StoreError> {
        self.insert_recorded(task, None).await.outcome
    }

    pub(super) async fn insert_recorded(
        &self,
        task: Task,
        record: Option<Record>,
    ) -> RecordedInsert {
        let task = Box::new(task);
        let sent = self.send(|reply| Op::Insert {
            task,
            record,
            reply,
        });
        sent.await
            .unwrap_or_else(|| RecordedInsert::failed(StoreError::Closed))
    }

    pub(super) async fn insert_batch(
        &self,
        tasks: Vec<Task>,
        records: Option<Vec<Record>>,
    ) -> BatchInsert {
        let sent = self.send(|reply| Op::InsertBatch {
            tasks,
            records,
            reply,
        });
        sent.await
            .unwrap_or_else(|| BatchInsert::failed(StoreError::Closed))
    }

    pub(super) async fn restore(&self, task: Task) -> Result<bool, StoreError> {
        let task = Box::new(task);
        self.call(|reply| Op::Restore { task, reply }).await
    }

    pub(super) async fn lease(
        &self,
        agent_id: &str,
        max: usize,
        ttl: Duration,
        skip: Option<Arc<HashSet<String>>>,
    ) -> Result<Vec<Task>, StoreError> {
        if agent_id.is_empty() {
            return Err(StoreError::Invalid("agent id is empty".into()));
        }
        if max == 0 {
            return Ok(Vec::new());
        }
        let (agent, max, ttl_ms) = (agent_id.to_string(), max.min(MAX_LEASE_BATCH), ttl_ms(ttl));
        self.call(|reply| Op::Lease {
            agent,
            max,
            ttl_ms,
            skip,
            reply,
        })
        .await
    }

    pub(super) async fn renew(
        &self,
        agent_id: &str,
        task_id: &str,
        ttl: Duration,
    ) -> Result<Task, StoreError> {
        let (agent, id, ttl_ms) = (agent_id.to_string(), task_id.to_string(), ttl_ms(ttl));
        self.call(|reply| Op::Renew {
            agent,
            id,
            ttl_ms,
            reply,
        })
        .await
    }

    pub(super) async fn complete(
        &self,
        agent_id: &str,
        task_id: &str,
        success: bool,
        result: Vec<u8>,
        error: String,
    ) -> Result<Task, StoreError> {
        let (agent, id) = (agent_id.to_string(), task_id.to_string());
        self.call(|reply| Op::Complete {
            agent,
            id,
            success,
            result,
            error,
            reply,
        })
        .await
    }

    pub(super) async fn cancel(
        &self,
        task_id: &str,
        reason: &str,
    ) -> Result<CancelOutcome, StoreError> {
        let (id, reason) = (task_id.to_string(), reason.to_string());
        self.call(|reply| Op::Cancel { id, reason, reply }).await
    }

    pub(super) async fn expire(
        &self,
        max_attempts: u32,
        fence: Option<i64>,
    ) -> Result<Vec<Task>, StoreError> {
        self.call(|reply| Op::Expire {
            max_attempts,
            fence,
            reply,
        })
        .await
    }

    pub(super) async fn requeue_agent(&self, agent_id: &str) -> Result<Vec<Task>, StoreError> {
        let agent = agent_id.to_string();
        self.call(|reply| Op::RequeueAgent { agent, reply }).await
    }

    pub(super) async fn put_agent(&self, record: AgentRecord) -> Result<(), StoreError> {
        if record.id.is_empty() {
            return Err(StoreError::Invalid("agent id is empty".into()));
        }
        let record = Box::new(record);
        self.call(|reply| Op::PutAgent { record, reply }).await
    }

    pub(super) async fn forget_agent(&self, agent_id: &str) -> Result<Vec<Task>, StoreError> {
        let agent = agent_id.to_string();
        self.call(|reply| Op::ForgetAgent { agent, reply }).await
    }

    pub(super) async fn extend_leases(&self, ttl: Duration) -> Result<usize, StoreError> {
        let ttl_ms = ttl_ms(ttl);
        let extended = self.call(|reply| Op::ExtendLeases { ttl_ms, reply });
        Ok(extended.await?.len())
    }

    pub(super) async fn mark_taken_over(
        &self,
        ids: Vec<String>,
        takeover: Takeover,
    ) -> Result<Vec<Task>, StoreError> {
        self.call(|reply| Op::MarkTakenOver {
            ids,
            takeover,
            reply,
        })
        .await
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Flush { reply }).await
    }
}

// ---------------------------------------------------------------------------
// Answers: held until the batch's fate is known
// ---------------------------------------------------------------------------

/// How a batch ended: committed or not, and what became of the records it
/// handed to the journal (every record of a batch goes in one append).
pub(super) struct Settled {
    pub(super) committed: Result<(), StoreError>,
    pub(super) records: RecordState,
}

impl Settled {
    /// A batch that failed before its records were handed over.
    pub(super) fn failed(err: StoreError) -> Self {
        Self {
            committed: Err(err),
            records: RecordState::NotWritten,
        }
    }
}

/// What happened to the record a request carried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// None was given (or its insert was refused: nothing to append).
    Nothing,
    /// It is in the batch's append.
    Appended,
    /// One was given, but the store has no journal.
    Unbound,
}

impl Carried {
    fn state(self, settled: &Settled) -> RecordState {
        match self {
            Carried::Nothing => RecordState::NotWritten,
            Carried::Appended => settled.records.clone(),
            Carried::Unbound => {
                RecordState::Failed("the task store has no decision log bound to it".into())
            }
        }
    }
}

/// A request's answer, sent once its batch is settled: its own result when
/// the batch committed, the batch's error otherwise.
pub(super) struct Answer(Box<dyn FnOnce(&Settled) + Send>);

impl Answer {
    pub(super) fn new<R: Send + 'static>(reply: Reply<R>, result: Result<R, StoreError>) -> Self {
        Self(Box::new(move |s: &Settled| {
            let _ = reply.send(s.committed.clone().and(result));
        }))
    }

    pub(super) fn settle(self, settled: &Settled) {
        (self.0)(settled)
    }
}

/// An applied request: the answer to send, or an insert's outcome with its
/// records still to name and hand to the journal ([`answers`]).
pub(super) enum Applied {
    Insert {
        /// Boxed: a task is large, the other answers small.
        result: Box<Result<InsertOutcome, StoreError>>,
        record: Option<Record>,
        reply: oneshot::Sender<RecordedInsert>,
    },
    Batch {
        result: Result<Outcomes, StoreError>,
        records: Option<Vec<Record>>,
        reply: oneshot::Sender<BatchInsert>,
    },
    Other {
        /// A storage error: the batch cannot commit.
        fatal: Option<StoreError>,
        answer: Answer,
    },
}

impl Applied {
    /// The answer `result` to a request other than an insert.
    pub(super) fn answer<R: Send + 'static>(
        reply: Reply<R>,
        result: Result<R, StoreError>,
    ) -> Self {
        Applied::Other {
            fatal: fatal(&result).cloned(),
            answer: Answer::new(reply, result),
        }
    }

    /// The storage error that fails the whole batch, if this request hit one.
    pub(super) fn fatal(&self) -> Option<&StoreError> {
        match self {
            Applied::Insert { result, .. } => fatal(result),
            Applied::Batch { result, .. } => fatal(result),
            Applied::Other { fatal, .. } => fatal.as_ref(),
        }
    }
}

/// A backend's operations inside one batch's transaction, each changing
/// the tasks (recorded in `changes`) as of `now`: what [`apply`] calls for
/// every request, so that the requests are dispatched in one place.
pub(super) trait Operations {
    async fn insert(
        &mut self,
        task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError>;

    /// Inserts each task on its own; a storage error fails them all.
    async fn insert_all(
        &mut self,
        tasks: Vec<Task>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Outcomes, StoreError>;

    async fn lease(
        &mut self,
        agent: &str,
        max: usize,
        skip: Option<&HashSet<String>>,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    async fn renew(
        &mut self,
        agent: &str,
        id: &str,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Task, StoreError>;

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
    ) -> Result<Task, StoreError>;

    async fn cancel(
        &mut self,
        id: &str,
        reason: String,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<CancelOutcome, StoreError>;

    /// Takes back the leases past their deadline; `fence`, the leader's
    /// token, where the backend has leaders.
    async fn expire(
        &mut self,
        max_attempts: u32,
        fence: Option<i64>,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    async fn requeue_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    async fn put_agent(&mut self, record: &AgentRecord) -> Result<(), StoreError>;

    async fn forget_agent(
        &mut self,
        agent: &str,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    /// Moves every lease due before `deadline` to `deadline`.
    async fn extend_leases(
        &mut self,
        deadline: i64,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    async fn mark_taken_over(
        &mut self,
        ids: &[String],
        takeover: &Takeover,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Task>, StoreError>;

    /// Stores a task as it was elsewhere; false when its id is stored.
    async fn restore(
        &mut self,
        task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<bool, StoreError>;
}

/// Applies one request with `ops`: the one dispatch of every operation.
pub(super) async fn apply(
    ops: &mut impl Operations,
    op: Op,
    now: i64,
    changes: &mut Vec<Change>,
) -> Applied {
    let after = |ms: i64| now.saturating_add(ms);
    match op {
        Op::Insert {
            task,
            record,
            reply,
        } => Applied::Insert {
            result: Box::new(ops.insert(*task, now, changes).await),
            record,
            reply,
        },
        Op::InsertBatch {
            tasks,
            records,
            reply,
        } => Applied::Batch {
            result: ops.insert_all(tasks, now, changes).await,
            records,
            reply,
        },
        Op::Lease {
            agent,
            max,
            ttl_ms,
            skip,
            reply,
        } => {
            let leased = ops.lease(&agent, max, skip.as_deref(), after(ttl_ms), now, changes);
            Applied::answer(reply, leased.await)
        }
        Op::Renew {
            agent,
            id,
            ttl_ms,
            reply,
        } => {
            let renewed = ops.renew(&agent, &id, after(ttl_ms), now, changes);
            Applied::answer(reply, renewed.await)
        }
        Op::Complete {
            agent,
            id,
            success,
            result,
            error,
            reply,
        } => {
            let done = ops.complete(&agent, &id, success, result, error, now, changes);
            Applied::answer(reply, done.await)
        }
        Op::Cancel { id, reason, reply } => {
            Applied::answer(reply, ops.cancel(&id, reason, now, changes).await)
        }
        Op::Expire {
            max_attempts,
            fence,
            reply,
        } => Applied::answer(reply, ops.expire(max_attempts, fence, now, changes).await),
        Op::RequeueAgent { agent, reply } => {
            Applied::answer(reply, ops.requeue_agent(&agent, now, changes).await)
        }
        Op::PutAgent { record, reply } => Applied::answer(reply, ops.put_agent(&record).await),
        Op::ForgetAgent { agent, reply } => {
            Applied::answer(reply, ops.forget_agent(&agent, now, changes).await)
        }
        Op::ExtendLeases { ttl_ms, reply } => {
            let extended = ops.extend_leases(after(ttl_ms), now, changes);
            Applied::answer(reply, extended.await)
        }
        Op::MarkTakenOver {
            ids,
            takeover,
            reply,
        } => {
            let fenced = ops.mark_taken_over(&ids, &takeover, now, changes);
            Applied::answer(reply, fenced.await)
        }
        Op::Restore { task, reply } => {
            Applied::answer(reply, ops.restore(*task, now, changes).await)
        }
        Op::Flush { reply } => Applied::answer(reply, Ok(())),
    }
}

/// A storage error (the database failed or cannot be reached): the
/// transaction may hold part of the request, so the batch fails as a whole.
pub(super) fn fatal<R>(result: &Result<R, StoreError>) -> Option<&StoreError> {
    result
        .as_ref()
        .err()
        .filter(|e| matches!(e, StoreError::Db(_) | StoreError::Unavailable(_)))
}

/// Turns a batch's applied requests into answers, in order, and collects
/// the records to append: each insert's record named after the task it
/// produced (the stored one when deduplicated), a batch insert's records
/// of the tasks it created; none for a refused insert. Records given to a
/// store with no journal (`bound` false) are answered as not written.
pub(super) fn answers(applied: Vec<Applied>, bound: bool) -> (Vec<Answer>, Vec<Record>) {
    let mut records = Vec::new();
    let mut carry = |given: bool, named: &mut dyn Iterator<Item = Record>| -> Carried {
        if !given {
            return Carried::Nothing;
        }
        if !bound {
            return Carried::Unbound;
        }
        let before = records.len();
        records.extend(named);
        if records.len() > before {
            Carried::Appended
        } else {
            Carried::Nothing
        }
    };
    let out =
        applied
            .into_iter()
            .map(|a| match a {
                Applied::Other { answer, .. } => answer,
                Applied::Insert {
                    result,
                    record,
                    reply,
                } => {
                    let result = *result;
                    let given = record.is_some();
                    let mut named = record.into_iter().filter_map(|mut r| {
                        let o = result.as_ref().ok()?;
                        r.set_task_id(&o.task().task_id);
                        Some(r)
                    });
                    let carried = carry(given, &mut named);
                    Answer(Box::new(move |s: &Settled| {
                        let _ = reply.send(RecordedInsert {
                            outcome: s.committed.clone().and(result),
                            record: carried.state(s),
                        });
                    }))
                }
                Applied::Batch {
                    result,
                    records: given,
                    reply,
                } => {
                    let some = given.is_some();
                    let outcomes = result.as_deref().unwrap_or_default();
                    let mut named = given.into_iter().flatten().zip(outcomes).filter_map(
                        |(mut r, o)| match o {
                            Ok(InsertOutcome::Created(t)) => {
                                r.set_task_id(&t.task_id);
                                Some(r)
                            }
                            _ => None,
                        },
                    );
                    let carried = carry(some, &mut named);
                    drop(named);
                    Answer(Box::new(move |s: &Settled| {
                        let _ = reply.send(BatchInsert {
                            outcomes: s.committed.clone().and(result),
                            record: carried.state(s),
                        });
                    }))
                }
            })
            .collect();
    (out, records)
}

/// Settles every answer of a batch that failed with `err` before its
/// records were handed over, and refuses the requests never applied.
pub(super) fn fail(answers: Vec<Answer>, rest: impl IntoIterator<Item = Op>, err: StoreError) {
    for op in rest {
        op.refuse(&err);
    }
    let settled = Settled::failed(err);
    for a in answers {
        a.settle(&settled);
    }
}
