//! This region's place in the federation: the peer table, the registered
//! agents, what this controller advertises of itself (epoch, sequence,
//! capacity, draining, its log head) and the live routing view built from
//! them; within the region, whether this replica leads and what it knows of
//! its sibling replicas (read from the region's database), and whether this
//! replica drains (with several replicas a drain is this replica's only: the
//! region drains when every live replica does).
//!
//! Sends nothing (gossip is [`crate::gossip`]); the takeover notices an
//! advertisement carries are passed in by its caller.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use federation_api as api;

use crate::agents::AgentRegistry;
use crate::audit::DecisionLog;
use crate::live_policy::LivePolicy;
use crate::membership::{LiveView, Membership};
use crate::policy::{Health, Policy, RegionView};
use crate::tasks::TaskStore;

/// Which sequence number an advertisement carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// The next one: new information (the advertiser, each heartbeat).
    Next,
    /// The one last sent: answers to peers and the status carry no news.
    Current,
}

/// This region's own state and its view of the others.
#[derive(Debug)]
pub struct Cluster {
    region: String,
    epoch: u64,
    policy: LivePolicy,
    membership: Membership,
    agents: AgentRegistry,
    store: TaskStore,
    log: DecisionLog,
    queue_limit: u32,
    advertise_endpoint: String,
    replica: String,
    sequence: AtomicU64,
    draining: AtomicBool,
    /// The leadership token while this controller leads its region (the
    /// database backend elects one and checks the token in every leader's
    /// transaction; the embedded store's controller always leads), -1
    /// while another replica does. Not the start-up lease fence
    /// (`replication::takeover`), which holds back tasks after a restart.
    leader: AtomicI64,
    /// The region's other replicas alive in the database, as last read
    /// (empty with the embedded store).
    siblings: std::sync::RwLock<Vec<crate::tasks::Sibling>>,
    /// Whose turn among the serving siblings the next passed task is.
    sibling_turn: AtomicUsize,
    /// Woken when the drain starts or stops (long polls end early).
    drain_changed: tokio::sync::Notify,
}

/// What [`Cluster::new`] is built from.
#[derive(Debug)]
pub struct ClusterParts {
    /// This controller's region.
    pub region: String,
    /// This run's epoch.
    pub epoch: u64,
    /// The policy in force.
    pub policy: LivePolicy,
    /// The peer table.
    pub membership: Membership,
    /// Registered agents.
    pub agents: AgentRegistry,
    /// The task store (its counts are the advertised queue).
    pub store: TaskStore,
    /// The decision log (its head is advertised).
    pub log: DecisionLog,
    /// `limits.max_queue_depth`.
    pub queue_limit: u32,
    /// The endpoint peers should use to reach us.
    pub advertise_endpoint: String,
    /// This controller's name within its region, as advertised: `node.replica`
    /// with the store in the region's database, `""` with the embedded store
    /// (its region's one controller).
    pub replica: String,
}

impl Cluster {
    /// Checks that a calling peer's certificate names `claimed`, the region
    /// a message says it comes from (`field`), and records the tags the
    /// certificate attests in the peer table. Plaintext (no caller) checks
    /// nothing.
    pub fn check_peer_claim(
        &self,
        caller: Option<&crate::auth::Caller>,
        field: &str,
        claimed: &str,
    ) -> Result<(), crate::error::Error> {
        let Some(crate::auth::Caller(id)) = caller else {
            return Ok(());
        };
        let region = id.region.as_deref().unwrap_or("");
        if region != claimed {
            tracing::warn!(certificate = %id, claimed = %crate::wire::truncate(claimed, 64), %field, "peer claims another region than its certificate; refused");
            return Err(crate::error::Error::Denied(format!(
                "{field} `{}` does not match the caller's certificate ({id})",
                crate::wire::truncate(claimed, 64)
            )));
        }
        self.membership().attest(region, &id.tags);
        Ok(())
    }

    /// A cluster view from its parts; this replica leads from the start
    /// unless its store is the region's database (then `leader_loop` elects).
    pub fn new(parts: ClusterParts) -> Self {
        let leads = !parts.store.is_postgres();
        Self {
            region: parts.region,
            epoch: parts.epoch,
            policy: parts.policy,
            membership: parts.membership,
            agents: parts.agents,
            store: parts.store,
            log: parts.log,
            queue_limit: parts.queue_limit,
            advertise_endpoint: parts.advertise_endpoint,
            replica: parts.replica,
            sequence: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            leader: AtomicI64::new(if leads { 0 } else { -1 }),
            siblings: std::sync::RwLock::new(Vec::new()),
            sibling_turn: AtomicUsize::new(0),
            drain_changed: tokio::sync::Notify::new(),
        }
    }

    /// This controller's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Chosen anew at each start, strictly increasing across restarts.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The peer table.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Registered agents.
    pub fn agents(&self) -> &AgentRegistry {
        &self.agents
    }

    /// The policy in force.
    pub fn policy(&self) -> std::sync::Arc<Policy> {
        self.policy.get()
    }

    /// Replaces the policy (already validated): the peer table follows its
    /// regions first.
    pub fn set_policy(&self, policy: Policy) {
        self.membership.sync_regions(&policy);
        self.policy.replace(policy);
    }

    /// This controller's name within its region as advertised (`""`: the
    /// embedded store's one controller).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The leadership token while this controller leads its region.
    pub fn leader_token(&self) -> Option<i64> {
        let t = self.leader.load(Ordering::SeqCst);
        (t >= 0).then_some(t)
    }

    /// Records the outcome of a leadership renewal.
    pub fn set_leader_token(&self, token: Option<i64>) {
        self.leader.store(token.unwrap_or(-1), Ordering::SeqCst);
    }

    /// True while this controller drains (this replica only when the store
    /// is the region's database; see [`Cluster::region_draining`]).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// True when the drain is this replica's only: the store is the
    /// region's database, whose other replicas keep serving the region.
    pub fn drains_per_replica(&self) -> bool {
        self.store.is_postgres()
    }

    /// True when this region takes no new work in this controller's own
    /// view: it drains, and no other replica of it serves (with the
    /// embedded store, the one controller's drain is the region's).
    pub fn region_draining(&self) -> bool {
        if !self.draining() {
            return false;
        }
        if !self.drains_per_replica() {
            return true;
        }
        !self
            .siblings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(serves)
    }

    /// Records the region's other replicas as the database lists them now.
    pub fn set_siblings(&self, siblings: Vec<crate::tasks::Sibling>) {
        *self
            .siblings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = siblings;
    }

    /// The region's other replicas alive in the database, as last read.
    pub fn siblings(&self) -> Vec<crate::tasks::Sibling> {
        self.siblings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A replica of this region, other than this one, alive and not
    /// draining, that advertises an endpoint: where a draining replica
    /// passes new work, each call the next of them in turn (so a drained
    /// replica's traffic spreads over its siblings). None with the embedded
    /// store.
    pub fn serving_sibling(&self) -> Option<crate::tasks::Sibling> {
        if !self.drains_per_replica() {
            return None;
        }
        let turn = self.sibling_turn.fetch_add(1, Ordering::Relaxed);
        in_turn(
            &self
                .siblings
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            turn,
        )
    }

    /// What this replica tells its siblings of itself.
    pub fn as_sibling(&self) -> crate::tasks::Sibling {
        crate::tasks::Sibling {
            replica: self.replica.clone(),
            endpoint: self.advertise_endpoint.clone(),
            draining: self.draining(),
        }
    }

    /// Starts or stops draining; wakes [`Cluster::drain_changed`]'s waiters.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::SeqCst);
        self.drain_changed.notify_waiters();
    }

    /// Resolves at the next start or stop of a drain.
    pub async fn drain_changed(&self) {
        self.drain_changed.notified().await;
    }

    /// The capacity this region advertises.
    pub fn capacity(&self) -> api::Capacity {
        let (total, free) = self.agents.capacity();
        let counts = self.store.counts();
        api::Capacity {
            total_slots: total,
            free_slots: free,
            queue_depth: counts.queued,
            queue_limit: self.queue_limit,
        }
    }

    /// How this region sees itself for routing.
    pub fn self_view(&self, policy: &Policy) -> RegionView {
        let capacity = self.capacity();
        RegionView {
            health: Health::Alive,
            // With several replicas the region serves while one does.
            draining: self.region_draining(),
            full: crate::membership::is_full(&capacity),
            load: Some(crate::membership::load_of(&capacity)),
            held_down: false,
            tags: policy
                .region(&self.region)
                .map(|r| r.shared_tags.clone())
                .unwrap_or_default(),
        }
    }

    /// The live routing view.
    pub fn view<'a>(&'a self, policy: &'a Policy) -> LiveView<'a> {
        LiveView {
            membership: &self.membership,
            policy,
            self_region: &self.region,
            self_view: self.self_view(policy),
            now: Instant::now(),
        }
    }

    /// Our advertisement, carrying `takeovers` (see [`Sequence`]).
    pub fn advertisement(
        &self,
        sequence: Sequence,
        takeovers: Vec<api::TakeoverNotice>,
    ) -> api::RegionAdvertisement {
        let sequence = match sequence {
            Sequence::Next => self.sequence.fetch_add(1, Ordering::SeqCst) + 1,
            Sequence::Current => self.sequence.load(Ordering::SeqCst),
        };
        let policy = self.policy();
        api::RegionAdvertisement {
            region: self.region.clone(),
            compliance_tags: policy
                .region(&self.region)
                .map(|r| r.tags.iter().cloned().collect())
                .unwrap_or_default(),
            capacity: Some(self.capacity()),
            policy_hash: policy.hash.clone(),
            epoch: self.epoch,
            sequence,
            endpoint: self.advertise_endpoint.clone(),
            draining: self.draining(),
            sent_unix_ms: crate::clock::now_unix_ms(),
            takeovers,
            log_head: Some({
                let (seq, hash) = self.log.last();
                api::LogHead { seq, hash }
            }),
            replica: self.replica.clone(),
            siblings_serve: self.draining() && !self.region_draining(),
            snapshot_formats: crate::replication::BodyFormat::READ.to_vec(),
        }
    }

    /// Peers to advertise to: every configured region but ourselves.
    pub fn peer_regions(&self) -> Vec<String> {
        self.policy()
            .regions
            .iter()
            .map(|r| r.name.clone())
            .filter(|r| *r != self.region)
            .collect()
    }

    /// Health of every region as membership sees it now.
    pub fn health_now(&self) -> std::collections::BTreeMap<String, Health> {
        self.membership
            .status(Instant::now())
            .into_iter()
            .map(|s| (s.region, s.health))
            .collect()
    }
}

/// Whether a sibling takes passed work: alive (listed), not draining, and
/// reachable at an endpoint it advertises.
fn serves(s: &crate::tasks::Sibling) -> bool {
    !s.draining && !s.endpoint.is_empty()
}

/// The `turn`-th serving sibling, round the list.
fn in_turn(siblings: &[crate::tasks::Sibling], turn: usize) -> Option<crate::tasks::Sibling> {
    let serving: Vec<&crate::tasks::Sibling> = siblings.iter().filter(|s| serves(s)).collect();
    if serving.is_empty() {
        return None;
    }
    Some(serving[turn % serving.len()].clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Sibling;

    fn sibling(name: &str, endpoint: &str, draining: bool) -> Sibling {
        Sibling {
            replica: name.into(),
            endpoint: endpoint.into(),
            draining,
        }
    }

    #[test]
    fn passed_work_takes_the_serving_siblings_in_turn() {
        let list = [
            sibling("europe-1", "a:1", false),
            sibling("europe-2", "b:1", true),
            sibling("europe-3", "", false),
            sibling("europe-4", "d:1", false),
        ];
        let picked: Vec<String> = (0..4)
            .map(|t| in_turn(&list, t).expect("one serves").replica)
            .collect();
        assert_eq!(picked, ["europe-1", "europe-4", "europe-1", "europe-4"]);
        assert_eq!(in_turn(&list[1..3], 0), None, "draining or unreachable");
        assert_eq!(in_turn(&[], 7), None);
    }
}
