//! This region's own tasks as clients and peers ask for them: one task with
//! the decision that placed it, a page of tasks, a task's changes until it
//! ends (the watch), a cancel.

use std::pin::Pin;

use federation_api as api;
use futures::Stream;

use crate::audit::DecisionLog;
use crate::error::{Error, Result};
use crate::tasks::TaskStore;

/// A task's events: the current state first, then each change.
pub type Events = Pin<Box<dyn Stream<Item = Result<api::TaskEvent>> + Send>>;

/// Records one ListTasks call reads at most, whatever it keeps.
const LIST_MAX_SCAN: usize = 10_000;

/// Reading and cancelling the tasks this region holds.
#[derive(Debug, Clone)]
pub struct LocalTasks {
    store: TaskStore,
    log: DecisionLog,
}

impl LocalTasks {
    /// Over `store`, with decisions from `log`.
    pub fn new(store: TaskStore, log: DecisionLog) -> Self {
        Self { store, log }
    }

    /// A task this region holds.
    pub fn get(&self, task_id: &str) -> Result<api::Task> {
        self.store
            .get(task_id)
            .map_err(Error::from)?
            .ok_or_else(|| Error::task_not_found(task_id))
    }

    /// A task with the decision that placed it (from this region's decision
    /// log, see [`crate::task_decision`]).
    pub async fn get_with_decision(&self, task_id: &str) -> Result<api::GetTaskResponse> {
        let task = self.get(task_id)?;
        let decision = crate::task_decision::of_local_task(&self.log, &task).await;
        Ok(api::GetTaskResponse {
            task: Some(task),
            decision,
        })
    }

    /// One page of this controller's own tasks (see `ListTasks` in the proto).
    pub fn list(&self, req: &api::ListTasksRequest) -> Result<api::ListTasksResponse> {
        let page_size = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(Error::invalid("page_size", "at most 1000")),
        };
        if req.max_age_ms < 0 {
            return Err(Error::invalid("max_age_ms", "negative"));
        }
        if req.min_age_ms < 0 {
            return Err(Error::invalid("min_age_ms", "negative"));
        }
        let mut states = Vec::with_capacity(req.states.len());
        for s in &req.states {
            match api::TaskState::try_from(*s) {
                Ok(api::TaskState::Unspecified) | Err(_) => {
                    return Err(Error::invalid("states", format!("unknown task state {s}")));
                }
                Ok(state) => states.push(state as i32),
            }
        }
        if req.page_token.len() > 256 {
            return Err(Error::invalid(
                "page_token",
                "not a token this controller gave",
            ));
        }
        let now = crate::clock::now_unix_ms();
        let keep = |t: &api::Task| {
            (states.is_empty() || states.contains(&t.state))
                && (req.rule == 0 || t.rule_index + 1 == req.rule)
                && (req.max_age_ms == 0 || now.saturating_sub(t.created_unix_ms) <= req.max_age_ms)
                && (req.min_age_ms == 0 || now.saturating_sub(t.created_unix_ms) >= req.min_age_ms)
        };
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let (mut tasks, next) = self
            .store
            .scan(after, page_size, LIST_MAX_SCAN, keep)
            .map_err(Error::from)?;
        for t in &mut tasks {
            t.payload.clear();
        }
        Ok(api::ListTasksResponse {
            tasks,
            next_page_token: next.unwrap_or_default(),
        })
    }

    /// Watches a task this region holds: the current state first, then
    /// every change, ending after a terminal state; a missed change (the
    /// subscriber lagged) is made up from the store.
    pub fn watch(&self, task_id: &str) -> Result<Events> {
        // Subscribe before reading, so no change between the two is missed.
        let mut changes = self.store.subscribe();
        let current = self.get(task_id)?;
        let id = task_id.to_string();
        let tasks = self.clone();
        let stream = async_stream::stream! {
            let mut version = current.version;
            let done = crate::tasks::is_terminal(current.state());
            yield Ok(api::TaskEvent { task: Some(current) });
            if done {
                return;
            }
            loop {
                match changes.recv().await {
                    Ok(task) if task.task_id == id && task.version > version => {
                        version = task.version;
                        let done = crate::tasks::is_terminal(task.state());
                        yield Ok(api::TaskEvent { task: Some(task) });
                        if done {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed changes: resynchronise from the store.
                        if let Ok(task) = tasks.get(&id) {
                            if task.version > version {
                                version = task.version;
                                let done = crate::tasks::is_terminal(task.state());
                                yield Ok(api::TaskEvent { task: Some(task) });
                                if done {
                                    return;
                                }
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        yield Err(Error::ShuttingDown);
                        return;
                    }
                }
            }
        };
        Ok(Box::pin(stream))
    }

    /// Cancels a task this region holds.
    pub async fn cancel(&self, task_id: &str, reason: &str) -> Result<api::CancelTaskResponse> {
        let reason = if reason.is_empty() {
            "cancelled by client"
        } else {
            reason
        };
        let done = self
            .store
            .cancel(task_id, reason)
            .await
            .map_err(Error::from)?;
        Ok(api::CancelTaskResponse {
            task: Some(done.task),
            cancelled: done.cancelled,
        })
    }
}
