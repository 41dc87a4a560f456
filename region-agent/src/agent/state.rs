//! What the agent's parts share: the client, the slots, the table of running
//! tasks with their cancel senders, the counters and the last agent id; it
//! makes no controller call and runs no loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use federation_api::region_agent_api_client::RegionAgentApiClient;
use tokio::sync::{Semaphore, watch};
use tracing::warn;

use crate::exec::CancelReason;
use crate::{AgentConfig, AgentReport};

pub(super) type Client = RegionAgentApiClient<federation_tls::AuthChannel>;
pub(super) type CancelSender = Arc<watch::Sender<Option<CancelReason>>>;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) registrations: AtomicU64,
    pub(super) leased: AtomicU64,
    pub(super) succeeded: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) unreported: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(super) struct RunningTask {
    cancel: CancelSender,
    token: u64,
}

pub(super) struct Agent {
    pub(super) config: AgentConfig,
    /// The client of the controller in use, and its index in
    /// [`AgentConfig::controllers`].
    pub(super) client: Mutex<(Client, usize)>,
    /// Every controller address (the region's replicas).
    pub(super) controllers: Vec<String>,
    /// Moves made because the replica drained, since a replica last said it
    /// does not: once every address was tried, the agent stays (and waits
    /// out the drain as with one address).
    pub(super) drain_moves: AtomicU64,
    /// One permit per slot; a running task holds one.
    pub(super) slots: Arc<Semaphore>,
    pub(super) running: Mutex<HashMap<String, RunningTask>>,
    pub(super) next_token: AtomicU64,
    pub(super) counters: Counters,
    pub(super) draining: watch::Sender<bool>,
    pub(super) stopping: watch::Sender<bool>,
    /// The id of the last registration, sent again when registering anew so
    /// that the controller keeps this agent's leases under it.
    pub(super) agent_id: Mutex<String>,
}

impl Agent {
    pub(super) fn report(&self, agent_id: String) -> AgentReport {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        AgentReport {
            agent_id,
            registrations: get(&c.registrations),
            leased: get(&c.leased),
            succeeded: get(&c.succeeded),
            failed: get(&c.failed),
            lost: get(&c.lost),
            unreported: get(&c.unreported),
        }
    }

    /// The client of the controller in use.
    pub(super) fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// The address of the controller in use.
    pub(super) fn controller(&self) -> String {
        let index = self.client.lock().unwrap_or_else(PoisonError::into_inner).1;
        self.controllers
            .get(index)
            .cloned()
            .unwrap_or_else(|| self.config.controller.clone())
    }

    /// Moves to the next controller address (another replica of the
    /// region); false when there is only one. Calls made after it (renewals
    /// and completions of running tasks too) go there.
    pub(super) fn move_on(&self) -> bool {
        if self.controllers.len() < 2 {
            return false;
        }
        let mut current = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        let next = (current.1 + 1) % self.controllers.len();
        let Some(address) = self.controllers.get(next) else {
            return false;
        };
        match super::session::client_to(&self.config, address) {
            Ok(client) => {
                *current = (client, next);
                true
            }
            Err(err) => {
                warn!(controller = %address, error = %err, "cannot use this controller address");
                false
            }
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningTask>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn last_agent_id(&self) -> String {
        self.agent_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn running_count(&self) -> u32 {
        u32::try_from(self.running().len()).unwrap_or(u32::MAX)
    }

    /// Records a running task; returns the token that untracks it.
    pub(super) fn track(&self, task_id: &str, cancel: CancelSender) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .running()
            .insert(task_id.to_owned(), RunningTask { cancel, token });
        if let Some(previous) = previous {
            // Leased again while an earlier run is still going (its lease
            // expired): the earlier run's result would be refused anyway.
            warn!(
                task_id,
                "task leased again while still running here, stopping the earlier run"
            );
            cancel_with(
                &previous.cancel,
                CancelReason::LeaseLost("leased again".to_owned()),
            );
        }
        token
    }

    pub(super) fn untrack(&self, task_id: &str, token: u64) {
        let mut running = self.running();
        if running.get(task_id).is_some_and(|r| r.token == token) {
            running.remove(task_id);
        }
    }

    /// Cancels a running task; false when it is not running here.
    pub(super) fn cancel(&self, task_id: &str, reason: CancelReason) -> bool {
        match self.running().get(task_id) {
            Some(task) => {
                cancel_with(&task.cancel, reason);
                true
            }
            None => false,
        }
    }

    pub(super) fn cancel_all(&self, reason: CancelReason) -> usize {
        let running = self.running();
        for task in running.values() {
            cancel_with(&task.cancel, reason.clone());
        }
        running.len()
    }
}

/// Sets the cancel reason unless one is already set.
pub(super) fn cancel_with(cancel: &CancelSender, reason: CancelReason) {
    cancel.send_if_modified(|current| {
        if current.is_none() {
            *current = Some(reason);
            true
        } else {
            false
        }
    });
}
