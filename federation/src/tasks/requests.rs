//! The writer channel both backends share: every mutation is one [`Op`]
//! carrying its own typed reply channel, so the async facade
//! ([`Requests`]) is one line an operation, and the writer answers each
//! caller with the type it waits for once its batch has committed
//! ([`Applied`] and its answer, in `answers`). Each request is dispatched once
//! ([`apply`], in `dispatch`) to the backend's [`Operations`] inside its
//! batch's transaction.

mod answers;
mod dispatch;

pub(super) use answers::{Answer, Applied, Settled, answers, fail, fatal};
pub(super) use dispatch::{Operations, apply};

use std::sync::Arc;
use std::time::Duration;

use federation_api::{Takeover, Task};
use tokio::sync::{mpsc, oneshot};

use super::fence::LeaseFence;
use super::journal::Record;
use super::{
    AgentRecord, BatchInsert, CancelOutcome, InsertOutcome, MAX_LEASE_BATCH, RecordedInsert,
    StoreError,
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
        /// The leader's fencing token (database backend; none: unfenced).
        fence: Option<i64>,
        reply: oneshot::Sender<BatchInsert>,
    },
    Lease {
        agent: String,
        max: usize,
        ttl_ms: i64,
        /// The start-up fence: queued tasks it holds back are passed over.
        held_back: Option<Arc<LeaseFence>>,
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
        fence: Option<i64>,
    ) -> BatchInsert {
        let sent = self.send(|reply| Op::InsertBatch {
            tasks,
            records,
            fence,
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
        held_back: Option<Arc<LeaseFence>>,
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
            held_back,
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
