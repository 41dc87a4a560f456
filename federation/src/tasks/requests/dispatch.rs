//! The one dispatch of a request: [`apply`] calls the backend's
//! [`Operations`] (its transaction's) for each kind of [`Op`].

use federation_api::{Takeover, Task};

use super::answers::Applied;
use super::{Op, Outcomes};
use crate::tasks::fence::LeaseFence;
use crate::tasks::shared::Change;
use crate::tasks::{AgentRecord, CancelOutcome, InsertOutcome, StoreError};

/// A backend's operations inside one batch's transaction, each changing
/// the tasks (recorded in `changes`) as of `now`: what [`apply`] calls for
/// every request, so that the requests are dispatched in one place.
pub(in crate::tasks) trait Operations {
    async fn insert(
        &mut self,
        task: Task,
        now: i64,
        changes: &mut Vec<Change>,
    ) -> Result<InsertOutcome, StoreError>;

    /// Checks in this transaction that `token` is the region leader's
    /// fencing token (the backends with leaders; the others have one
    /// controller, always the leader).
    async fn fence(&mut self, token: i64) -> Result<(), StoreError> {
        let _ = token;
        Ok(())
    }

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
        held_back: Option<&LeaseFence>,
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
pub(in crate::tasks) async fn apply(
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
            fence,
            reply,
        } => Applied::Batch {
            result: match fence {
                Some(token) => match ops.fence(token).await {
                    Ok(()) => ops.insert_all(tasks, now, changes).await,
                    Err(e) => Err(e),
                },
                None => ops.insert_all(tasks, now, changes).await,
            },
            records,
            reply,
        },
        Op::Lease {
            agent,
            max,
            ttl_ms,
            held_back,
            reply,
        } => {
            let leased = ops.lease(
                &agent,
                max,
                held_back.as_deref(),
                after(ttl_ms),
                now,
                changes,
            );
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
