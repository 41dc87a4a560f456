//! The federation's status as this controller sees it (`FederationStatus`,
//! the status page, the metrics' peer gauges): one row per region in
//! `priority` order, this region's from its own state, the others' from
//! the peer table, the witnessed log heads and the snapshot receiver.

use std::sync::Arc;
use std::time::Instant;

use federation_api as api;

use crate::audit::anchor::Witnesses;
use crate::cluster::{Cluster, Sequence};
use crate::peers::Peers;
use crate::policy::Health;
use crate::replication::Replication;
use crate::tasks::TaskStore;

/// What the status reads.
#[derive(Debug)]
pub struct FederationStatus {
    cluster: Arc<Cluster>,
    peers: Arc<Peers>,
    store: TaskStore,
    witnesses: Arc<Witnesses>,
    replication: Arc<Replication>,
}

impl FederationStatus {
    /// The status over these components.
    pub fn new(
        cluster: Arc<Cluster>,
        peers: Arc<Peers>,
        store: TaskStore,
        witnesses: Arc<Witnesses>,
        replication: Arc<Replication>,
    ) -> Self {
        Self {
            cluster,
            peers,
            store,
            witnesses,
            replication,
        }
    }

    /// The status as this controller sees it (also used by the status page),
    /// one row per region in `priority` order.
    pub fn report(&self) -> api::FederationStatusResponse {
        let policy = self.cluster.policy();
        let now = Instant::now();
        let mut rows = Vec::new();
        let own = self.cluster.advertisement(Sequence::Current, Vec::new());
        let (undecodable, undecodable_ids) = self.store.undecodable();
        // Regions in priority order (lower first, unset last), then by name.
        for region in policy.regions_by_priority() {
            if region.name == self.cluster.region() {
                rows.push(api::RegionStatus {
                    region: region.name.clone(),
                    state: "self".into(),
                    compliance_tags: own.compliance_tags.clone(),
                    capacity: own.capacity,
                    epoch: own.epoch,
                    sequence: own.sequence,
                    policy_hash: own.policy_hash.clone(),
                    policy_mismatch: false,
                    last_advertisement_age_ms: 0,
                    draining: own.draining,
                    endpoint: own.endpoint.clone(),
                    phi: 0.0,
                    state_age_ms: -1,
                    hold_down_remaining_ms: 0,
                    log_head: self
                        .store
                        .log_head()
                        .ok()
                        .flatten()
                        .map(|(seq, hash)| api::LogHead { seq, hash }),
                    log_head_problem: String::new(),
                    snapshot_problem: String::new(),
                    store_undecodable_records: undecodable as u64,
                    store_undecodable: undecodable_ids
                        .iter()
                        .map(|(id, why)| format!("{id}: {why}"))
                        .collect(),
                });
                continue;
            }
            let row = self
                .cluster
                .membership()
                .status(now)
                .into_iter()
                .find(|p| p.region == region.name);
            let Some(p) = row else { continue };
            let ad = p.ad.clone().unwrap_or_default();
            // Only tags the policy grants and the region claims are trusted.
            let tags: Vec<String> = ad
                .compliance_tags
                .iter()
                .filter(|t| region.tags.contains(*t))
                .cloned()
                .collect();
            rows.push(api::RegionStatus {
                region: region.name.clone(),
                state: health_name(p.health).into(),
                compliance_tags: tags,
                capacity: ad.capacity,
                epoch: ad.epoch,
                sequence: ad.sequence,
                policy_mismatch: p.ad.is_some() && ad.policy_hash != policy.hash,
                policy_hash: ad.policy_hash,
                last_advertisement_age_ms: p.age.map(|a| a.as_millis() as i64).unwrap_or(-1),
                draining: ad.draining,
                endpoint: self.peers.endpoint_of(&region.name).unwrap_or_default(),
                phi: if p.phi.is_finite() { p.phi } else { -1.0 },
                state_age_ms: p.health_age.map_or(-1, |a| a.as_millis() as i64),
                hold_down_remaining_ms: p.hold_down_left.map_or(0, |a| a.as_millis() as i64),
                log_head: self.witnesses.of(&region.name).map(|w| api::LogHead {
                    seq: w.seq,
                    hash: w.hash,
                }),
                log_head_problem: self.witnesses.problem(&region.name).unwrap_or_default(),
                snapshot_problem: self
                    .replication
                    .receiver
                    .problem(&region.name)
                    .unwrap_or_default(),
                ..Default::default()
            });
        }
        api::FederationStatusResponse {
            self_region: self.cluster.region().to_string(),
            federation: policy.federation.clone(),
            regions: rows,
            policy_hash: policy.hash.clone(),
            epoch: self.cluster.epoch(),
        }
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Alive => "alive",
        Health::Suspect => "suspect",
        Health::Dead => "dead",
        Health::Unknown => "unknown",
    }
}
