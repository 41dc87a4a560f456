//! Leases to this region's agents: registration (durable before the id is
//! used, the id tied to the caller's identity), heartbeats, the long-poll
//! lease (bounded; nothing while draining; tasks from before a restart held
//! back by the start-up lease fence), renewal and completion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use federation_api as api;

use crate::cluster::Cluster;
use crate::config::{Limits, Timers};
use crate::error::{Error, Result};
use crate::replication::Replication;
use crate::tasks::TaskStore;

/// Longest long-poll an agent may ask for.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(30);
/// Most slots one agent may claim.
const MAX_SLOTS: u32 = 10_000;

/// What leasing uses: the registry and drain state (`cluster`), the
/// store's leases, the start-up fence (`replication`).
#[derive(Debug)]
pub struct Leasing {
    cluster: Arc<Cluster>,
    store: TaskStore,
    replication: Arc<Replication>,
    timers: Timers,
    limits: Limits,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Leasing {
    /// Leasing over these components.
    pub fn new(
        cluster: Arc<Cluster>,
        store: TaskStore,
        replication: Arc<Replication>,
        timers: Timers,
        limits: Limits,
    ) -> Self {
        Self {
            cluster,
            store,
            replication,
            timers,
            limits,
        }
    }

    /// This controller's region.
    pub fn region(&self) -> &str {
        self.cluster.region()
    }

    /// The agent is registered, to the identity calling. An id registered
    /// to another identity is answered like an unknown one: the caller
    /// registers again and gets an id of its own.
    fn known(&self, agent_id: &str, owner: &str) -> Result<()> {
        if self.cluster.agents().is_owned_by(agent_id, owner) {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "agent",
                id: agent_id.to_string(),
            })
        }
    }

    /// Registers an agent of `owner` (the caller's identity, empty without
    /// TLS or token), durably, resuming its id when it is the owner's.
    pub async fn register(
        &self,
        owner: String,
        req: api::RegisterRequest,
    ) -> Result<api::RegisterResponse> {
        if !req.region.is_empty() && req.region != self.cluster.region() {
            return Err(Error::Precondition(format!(
                "agent is for region `{}` but this controller serves `{}`",
                crate::wire::truncate(&req.region, 64),
                self.cluster.region()
            )));
        }
        if req.slots == 0 || req.slots > MAX_SLOTS {
            return Err(Error::invalid("slots", format!("must be 1 to {MAX_SLOTS}")));
        }
        let name = crate::wire::truncate(&req.name, 128);
        let assigned = self.cluster.agents().assign(&req.agent_id, &owner);
        if !req.agent_id.is_empty() && !assigned.resumed {
            tracing::warn!(previous = %crate::wire::truncate(&req.agent_id, 64), agent_id = %assigned.id, %owner, "agent asked to keep an id it cannot have, giving a new one");
        }
        let record = crate::tasks::AgentRecord {
            id: assigned.id.clone(),
            owner,
            name,
            slots: req.slots,
            registered_unix_ms: crate::clock::now_unix_ms(),
        };
        // Durable before the agent can lease under the id: after a restart
        // the controller still knows whose leases these are.
        self.store
            .put_agent(record.clone())
            .await
            .map_err(Error::from)?;
        self.cluster.agents().insert(&record, Instant::now());
        let agent_id = assigned.id;
        tracing::info!(%agent_id, name = %record.name, owner = %record.owner, slots = req.slots, resumed = assigned.resumed, "agent registered");
        let interval = (self.timers.agent_timeout / 3).max(Duration::from_millis(100));
        Ok(api::RegisterResponse {
            agent_id,
            heartbeat_interval_ms: ms(interval),
            lease_ttl_ms: ms(self.timers.lease_ttl),
        })
    }

    /// An agent's heartbeat (with its free slots, when it says).
    pub fn heartbeat(
        &self,
        owner: &str,
        req: api::HeartbeatRequest,
    ) -> Result<api::HeartbeatResponse> {
        self.known(&req.agent_id, owner)?;
        let free = req.capacity.map(|c| c.free_slots);
        if !self
            .cluster
            .agents()
            .heartbeat(&req.agent_id, free, Instant::now())
        {
            return Err(Error::NotFound {
                what: "agent",
                id: req.agent_id,
            });
        }
        Ok(api::HeartbeatResponse {
            draining: self.cluster.draining(),
            revoked_task_ids: Vec::new(),
        })
    }

    /// Leases up to the agent's slots, waiting up to `wait_ms` (at most
    /// 30 s) for a task to be queued.
    pub async fn lease(
        &self,
        owner: &str,
        req: api::LeaseTasksRequest,
    ) -> Result<api::LeaseTasksResponse> {
        self.known(&req.agent_id, owner)?;
        self.cluster
            .agents()
            .heartbeat(&req.agent_id, None, Instant::now());
        if self.cluster.draining() {
            return Ok(api::LeaseTasksResponse { tasks: Vec::new() });
        }
        let slots = self.cluster.agents().slots(&req.agent_id).unwrap_or(1);
        let max = req.max_tasks.clamp(1, slots) as usize;
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_LEASE_WAIT);
        let until = Instant::now() + wait;
        // Bounded: each round either leases, or waits for a queue change or
        // the deadline.
        for _ in 0..1000 {
            // The start-up fence: tasks from before a restart wait until the
            // backups could tell us which of them they took over.
            let fence = self.replication.takeover.lease_fence();
            let held_back = fence.is_some();
            let tasks = self
                .store
                .lease_except(&req.agent_id, max, self.timers.lease_ttl, fence)
                .await
                .map_err(Error::from)?;
            if !tasks.is_empty() {
                for t in &tasks {
                    tracing::info!(task_id = %t.task_id, agent_id = %req.agent_id, attempt = t.attempts, "task leased");
                    if federation_trace::exporting() {
                        // A mark in the task's trace: leased, to whom.
                        let span = tracing::info_span!(
                            target: federation_trace::TARGET,
                            "lease_task",
                            region = %self.cluster.region(),
                            task_id = %t.task_id,
                            agent_id = %req.agent_id,
                            attempt = t.attempts,
                        );
                        let parent = federation_trace::TraceParent::parse(&t.traceparent);
                        federation_trace::set_parent(&span, parent.as_ref());
                    }
                }
                return Ok(api::LeaseTasksResponse { tasks });
            }
            let now = Instant::now();
            if now >= until || self.cluster.draining() {
                break;
            }
            if held_back {
                // Queued tasks may all be held back: poll instead of spinning.
                tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
            } else {
                // A drain ends the wait: the agent hears of it at once.
                tokio::select! {
                    _ = self.store.wait_for_queued(until - now) => {}
                    () = self.cluster.drain_changed() => {}
                }
            }
        }
        Ok(api::LeaseTasksResponse { tasks: Vec::new() })
    }

    /// Renews the agent's lease of a task.
    pub async fn renew(
        &self,
        owner: &str,
        req: api::RenewLeaseRequest,
    ) -> Result<api::RenewLeaseResponse> {
        self.known(&req.agent_id, owner)?;
        crate::wire::check_task_id(&req.task_id)?;
        let task = self
            .store
            .renew(&req.agent_id, &req.task_id, self.timers.lease_ttl)
            .await
            .map_err(Error::from)?;
        Ok(api::RenewLeaseResponse {
            lease_deadline_unix_ms: task.lease_deadline_unix_ms,
        })
    }

    /// Records the outcome of a task the agent leased.
    pub async fn complete(
        &self,
        owner: &str,
        req: api::CompleteTaskRequest,
    ) -> Result<api::CompleteTaskResponse> {
        use tracing::Instrument as _;
        self.known(&req.agent_id, owner)?;
        crate::wire::check_task_id(&req.task_id)?;
        if req.result.len() > self.limits.max_result_bytes {
            return Err(Error::limit(
                "result",
                format!(
                    "{} bytes exceeds the limit of {}",
                    req.result.len(),
                    self.limits.max_result_bytes
                ),
            ));
        }
        let error = crate::wire::truncate(&req.error, 4096);
        let task = self
            .store
            .complete(&req.agent_id, &req.task_id, req.success, req.result, error)
            .instrument(tracing::info_span!(
                target: federation_trace::TARGET,
                "store.commit",
                op = "complete"
            ))
            .await
            .map_err(Error::from)?;
        tracing::info!(task_id = %task.task_id, success = req.success, "task completed");
        Ok(api::CompleteTaskResponse { task: Some(task) })
    }
}
