//! A controller's drain: what starting or stopping one changes, and the
//! progress a `Drain` call reports. With the embedded store (the region's
//! one controller) the drain is the region's: it takes no new task and its
//! `--wait` lasts until no task of the region is leased. With the store in
//! the region's database the drain is this replica's only: it passes new
//! work to a sibling that serves (`routing`), leases nothing (its agents are
//! told to move), reports NOT_SERVING (`runtime`'s readiness), gives the
//! region's leadership up at once and tells its siblings, and it is empty
//! once nothing is in flight on it, no agent leases through it and it does
//! not lead.
//!
//! Routes nothing and leases nothing itself: it sets the flag those read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use federation_api as api;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::tasks::TaskStore;

/// Starts and stops this controller's drain and reports its progress.
#[derive(Debug)]
pub struct Drainer {
    cluster: Arc<Cluster>,
    store: TaskStore,
    metrics: Arc<Metrics>,
    /// An agent heard within this long still leases through this replica
    /// (two of its heartbeat intervals).
    agent_window: Duration,
    /// How long a replica's name stays claimed without a refresh.
    replica_stale: Duration,
}

impl Drainer {
    /// A drainer over these components; `agent_timeout` is the agents'
    /// (they heartbeat every third of it), `replica_stale` how long a
    /// replica's name stays claimed.
    pub fn new(
        cluster: Arc<Cluster>,
        store: TaskStore,
        metrics: Arc<Metrics>,
        agent_timeout: Duration,
        replica_stale: Duration,
    ) -> Self {
        let heartbeat = (agent_timeout / 3).max(Duration::from_millis(100));
        Self {
            cluster,
            store,
            metrics,
            agent_window: heartbeat * 2,
            replica_stale,
        }
    }

    /// Starts (`on`) or stops the drain and reports where it stands. A
    /// replica of a database-backed region that starts draining gives up
    /// the region's leadership now, so another replica takes the singleton
    /// work at its next heartbeat; either change is told to the siblings
    /// now rather than at the next heartbeat.
    pub async fn set(&self, on: bool) -> api::DrainResponse {
        let was = self.cluster.draining();
        self.cluster.set_draining(on);
        if was != on {
            tracing::info!(
                draining = on,
                replica = %self.cluster.replica(),
                per_replica = self.cluster.drains_per_replica(),
                "drain state changed"
            );
        }
        if let TaskStore::Postgres(store) = &self.store {
            if on {
                resign(&self.cluster, store).await;
            }
            let me = self.cluster.as_sibling();
            if let Err(e) = store
                .refresh_replica_as(self.cluster.replica(), self.replica_stale, Some(&me))
                .await
            {
                tracing::warn!(error = %e, "telling the other replicas of the drain failed; they hear at the next heartbeat");
            }
        }
        self.report()
    }

    /// Where the drain stands now (see `DrainResponse`).
    pub fn report(&self) -> api::DrainResponse {
        let draining = self.cluster.draining();
        let counts = self.store.counts();
        let in_flight = u32::try_from(self.metrics.work_in_flight()).unwrap_or(u32::MAX);
        let agents = self
            .cluster
            .agents()
            .heard_within(self.agent_window, Instant::now());
        let per_replica = self.cluster.drains_per_replica();
        let leader = self.cluster.leader_token().is_some();
        let empty = draining
            && if per_replica {
                in_flight == 0 && agents == 0 && !leader
            } else {
                counts.leased == 0
            };
        api::DrainResponse {
            draining,
            queued: counts.queued,
            leased: counts.leased,
            empty,
            replica: self.cluster.replica().to_string(),
            in_flight,
            agents,
            leader,
            per_replica,
            siblings: if per_replica {
                self.cluster
                    .siblings()
                    .into_iter()
                    .map(|s| s.endpoint)
                    .filter(|e| !e.is_empty())
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// Gives up the region's leadership if this replica holds it (its row
/// expires now); the leader loop takes it again only after the drain.
pub async fn resign(cluster: &Cluster, store: &crate::tasks::PgStore) {
    match store.resign().await {
        Ok(held) => {
            let token = cluster.leader_token();
            cluster.set_leader_token(None);
            if held || token.is_some() {
                tracing::warn!(region = %cluster.region(), replica = %cluster.replica(), token = token.unwrap_or(-1), "this replica no longer leads its region: it drains, another replica takes the lead");
            }
        }
        Err(e) => {
            // Its row then expires at the end of its lease as if it died.
            cluster.set_leader_token(None);
            tracing::warn!(error = %e, "giving up the region's leadership failed; it passes when the lease expires");
        }
    }
}
