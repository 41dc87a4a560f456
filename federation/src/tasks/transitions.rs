//! The task's state machine, the same in both backends: what each
//! operation does to a task record (state, lease, attempts, error, version,
//! times) and who may do it. Pure: the backends read and write the record
//! and keep their indexes; nothing here touches storage.

use federation_api::{Takeover, Task, TaskState};

use super::{InsertOutcome, StoreError, is_terminal, state_name, what_differs};

/// Every mutation bumps the version and the update time.
pub(super) fn touch(t: &mut Task, now: i64) {
    t.version = t.version.saturating_add(1);
    t.updated_unix_ms = now;
}

pub(super) fn clear_lease(t: &mut Task) {
    t.agent_id.clear();
    t.lease_deadline_unix_ms = 0;
}

/// A new task as it is stored: QUEUED, version 1, no lease, its times set
/// when zero. `attempts`, `taken_over` and the rest are kept as given.
pub(super) fn admit(t: &mut Task, now: i64) {
    t.set_state(TaskState::Queued);
    t.version = 1;
    clear_lease(t);
    if t.created_unix_ms == 0 {
        t.created_unix_ms = now;
    }
    if t.updated_unix_ms == 0 {
        t.updated_unix_ms = now;
    }
}

/// The answer to an insert whose idempotency key names `stored`: that task,
/// or a refusal when the request's attributes or payload differ.
pub(super) fn known_key(request: &Task, stored: Task) -> Result<InsertOutcome, StoreError> {
    let differs = what_differs(
        stored.attributes == request.attributes,
        stored.payload == request.payload,
    );
    match differs {
        Some(differs) => Err(StoreError::KeyReused {
            key: request.idempotency_key.clone(),
            task_id: stored.task_id,
            differs,
        }),
        None => Ok(InsertOutcome::Deduplicated(stored)),
    }
}

/// Refuses a renew or complete of `task` by anyone but its lease holder.
pub(super) fn check_holder(task: &Task, agent: &str) -> Result<(), StoreError> {
    if is_terminal(task.state()) {
        return Err(StoreError::Terminal {
            task_id: task.task_id.clone(),
            state: state_name(task.state()),
        });
    }
    if task.state() != TaskState::Leased || task.agent_id != agent || agent.is_empty() {
        let holder = if task.state() == TaskState::Leased {
            task.agent_id.clone()
        } else {
            String::new()
        };
        return Err(StoreError::NotLeaseHolder {
            task_id: task.task_id.clone(),
            holder,
        });
    }
    Ok(())
}

/// QUEUED → LEASED to `agent` until `deadline`, one attempt more.
pub(super) fn lease(t: &mut Task, agent: &str, deadline: i64, now: i64) {
    t.set_state(TaskState::Leased);
    t.agent_id = agent.to_string();
    t.lease_deadline_unix_ms = deadline;
    t.attempts = t.attempts.saturating_add(1);
    touch(t, now);
}

/// A held lease runs until `deadline`.
pub(super) fn renew(t: &mut Task, deadline: i64, now: i64) {
    t.lease_deadline_unix_ms = deadline;
    touch(t, now);
}

/// LEASED → SUCCEEDED or FAILED with the agent's result and error.
pub(super) fn complete(t: &mut Task, success: bool, result: Vec<u8>, error: String, now: i64) {
    t.set_state(if success {
        TaskState::Succeeded
    } else {
        TaskState::Failed
    });
    clear_lease(t);
    t.result = result;
    t.error = error;
    touch(t, now);
}

/// A pending task → CANCELLED, the reason (or "cancelled") its error.
pub(super) fn cancel(t: &mut Task, reason: String, now: i64) {
    t.set_state(TaskState::Cancelled);
    clear_lease(t);
    t.error = if reason.is_empty() {
        "cancelled".to_string()
    } else {
        reason
    };
    touch(t, now);
}

/// LEASED → QUEUED, attempts kept (an expired lease, or a lost agent).
pub(super) fn requeue(t: &mut Task, now: i64) {
    t.set_state(TaskState::Queued);
    clear_lease(t);
    touch(t, now);
}

/// An expired lease: FAILED once `attempts` reached `max_attempts` (true),
/// else QUEUED again (false).
pub(super) fn expire(t: &mut Task, max_attempts: u32, now: i64) -> bool {
    if t.attempts < max_attempts {
        requeue(t, now);
        return false;
    }
    t.set_state(TaskState::Failed);
    clear_lease(t);
    t.error = format!("lease expired {} times (agent lost)", t.attempts);
    touch(t, now);
    true
}

/// A pending task → CANCELLED as taken over by another region (fencing a
/// returning primary).
pub(super) fn take_over(t: &mut Task, takeover: &Takeover, now: i64) {
    t.set_state(TaskState::Cancelled);
    clear_lease(t);
    t.error = format!(
        "taken over by region {} (epoch {} of {})",
        takeover.to_region, takeover.from_epoch, takeover.from_region
    );
    t.taken_over = Some(takeover.clone());
    touch(t, now);
}

/// A task as it is restored from elsewhere: a terminal one keeps its state
/// and result, a pending one is QUEUED with its lease cleared; its times
/// are set when zero. An empty id or an unknown state is refused.
pub(super) fn restore(t: &mut Task, now: i64) -> Result<(), StoreError> {
    if t.task_id.is_empty() {
        return Err(StoreError::Invalid("task id is empty".into()));
    }
    if TaskState::try_from(t.state).is_err() {
        return Err(StoreError::Invalid(format!(
            "task {}: unknown state {}",
            t.task_id, t.state
        )));
    }
    if !is_terminal(t.state()) {
        t.set_state(TaskState::Queued);
        clear_lease(t);
    }
    if t.updated_unix_ms == 0 {
        t.updated_unix_ms = now;
    }
    if t.created_unix_ms == 0 {
        t.created_unix_ms = now;
    }
    Ok(())
}
