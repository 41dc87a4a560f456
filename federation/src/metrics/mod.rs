//! Prometheus metrics of one controller (`prometheus-client`, the official
//! Rust client), served at `/metrics` on the admin port as OpenMetrics or
//! Prometheus text ([`exposition`]), with the standard `process_*` families
//! ([`process`]) and gRPC server metrics per method and code ([`grpc`]).
//!
//! Counters and histograms are updated where things happen (routing, the
//! lease reaper, a snapshot push); gauges that mirror state (peer states,
//! advertisement age, queue depth, age of the snapshots held) are refreshed
//! from the node when scraped, so they are never stale. The replication
//! counters (snapshots sent, accepted, rejected by reason, takeovers) are
//! replication's own [`Stats`], read at scrape time by a collector: one
//! source of truth for `/metrics` and `status`. This module owns the metric
//! families only; it reads node state but changes nothing.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::replication::receiver::Stats;

pub mod exposition;
pub mod grpc;
pub mod process;

/// Labels of the build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    region: String,
}

/// Labels of a routing decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// 1-based rule number, or "none".
    pub rule: String,
    /// routed, failover or rejected.
    pub outcome: String,
}

/// Labels naming a region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    /// The region.
    pub region: String,
}

/// Labels of a peer's state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerStateLabels {
    /// The region.
    pub region: String,
    /// alive, suspect, dead or unknown.
    pub state: String,
}

/// Labels of a rejected snapshot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// Replication's [`Stats`] as counters, read when scraped.
#[derive(Debug)]
struct ReplicationCounters(Arc<Stats>);

impl Collector for ReplicationCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let counters = [
            (
                "snapshots_sent",
                "Snapshots pushed to a peer and accepted by it",
                s.sent,
            ),
            (
                "snapshot_send_failures",
                "Snapshot pushes that failed or that the peer refused",
                s.send_failed,
            ),
            (
                "snapshot_withheld_tasks",
                "Tasks left out of a peer's snapshot by residency",
                s.withheld_tasks,
            ),
            (
                "snapshots_accepted",
                "Snapshots received, verified and stored",
                s.accepted,
            ),
            (
                "change_batches_sent",
                "Change batches (between snapshots) pushed to a peer and accepted by it",
                s.changes_sent,
            ),
            (
                "change_batch_send_failures",
                "Change batch pushes that failed or that the peer refused",
                s.changes_send_failed,
            ),
            (
                "change_batches_accepted",
                "Change batches received, verified, stored and folded into our copy",
                s.changes_accepted,
            ),
            (
                "duplicate_tasks",
                "Pairs of tasks under one idempotency key that both ran (each recorded in the decision log)",
                s.duplicate_tasks,
            ),
            (
                "duplicate_tasks_cancelled",
                "Pairs of tasks under one idempotency key resolved by cancelling one",
                s.duplicates_cancelled,
            ),
            (
                "takeovers",
                "Takeovers of a dead region performed",
                s.takeovers,
            ),
            (
                "tasks_taken_over",
                "Tasks queued here by takeovers",
                s.tasks_taken_over,
            ),
            (
                "fenced_tasks",
                "Tasks of ours cancelled because a backup took them over",
                s.fenced_tasks,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "snapshots_rejected",
            "Snapshots and change batches refused, by reason (auth: wrong key or altered; unknown_key; truncated; out_of_order; replay: not newer than the last accepted; not_permitted; residency; limit; malformed; and for the stored copy, found at start or when read: stored_unreadable, stored_wrong_source: the file holds another region's snapshot, stored_missing: gone although one was accepted)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in self.0.rejections() {
            let labels = ReasonLabels {
                reason: reason.to_string(),
            };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The count of this controller's own stalls (membership's counter), read
/// when scraped.
#[derive(Debug)]
struct SelfStalls(Arc<AtomicU64>);

impl Collector for SelfStalls {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.0.load(std::sync::atomic::Ordering::Relaxed));
        counter.encode(encoder.encode_descriptor(
            "self_stalls",
            "Stalls of this controller itself (a gap of more than two heartbeats in its own activity) during which peers' silence was ignored",
            None,
            counter.metric_type(),
        )?)
    }
}

/// Every metric family of a controller.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    decisions: Family<DecisionLabels, Counter>,
    failovers: Family<RegionLabels, Counter>,
    forward_seconds: Family<RegionLabels, Histogram>,
    peer_state: Family<PeerStateLabels, Gauge>,
    advertisement_age_seconds: Family<RegionLabels, Gauge<f64, AtomicU64>>,
    queue_depth: Gauge,
    leased: Gauge,
    store_undecodable: Gauge,
    lease_expiries: Counter,
    snapshot_bytes: Family<RegionLabels, Gauge>,
    snapshot_compression_ratio: Family<RegionLabels, Gauge<f64, AtomicU64>>,
    snapshot_age_seconds: Family<RegionLabels, Gauge<f64, AtomicU64>>,
    log_head_anomalies: Family<RegionLabels, Counter>,
    gossip_sent_bytes: Counter,
    registered_agents: Gauge,
    certificate_expiry: Gauge,
    grpc: Arc<grpc::GrpcMetrics>,
    /// The decisions counters again, readable (the status page's per-rule
    /// counters): (rule label, outcome) → count.
    decision_counts: Mutex<std::collections::BTreeMap<(String, String), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The decisions label of a rule: its `name` from the file when it has one,
/// else its 1-based position; `none` when no rule matched.
pub fn rule_label(policy: &crate::policy::Policy, rule_index: Option<usize>) -> String {
    match rule_index {
        None => "none".into(),
        Some(i) => policy
            .rules
            .get(i)
            .and_then(|r| r.name.clone())
            .unwrap_or_else(|| (i + 1).to_string()),
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            decisions: Family::default(),
            decision_counts: Mutex::default(),
            failovers: Family::default(),
            forward_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0002, 2.0, 14))
            }),
            peer_state: Family::default(),
            advertisement_age_seconds: Family::default(),
            queue_depth: Gauge::default(),
            leased: Gauge::default(),
            store_undecodable: Gauge::default(),
            lease_expiries: Counter::default(),
            snapshot_bytes: Family::default(),
            snapshot_compression_ratio: Family::default(),
            snapshot_age_seconds: Family::default(),
            log_head_anomalies: Family::default(),
            gossip_sent_bytes: Counter::default(),
            registered_agents: Gauge::default(),
            certificate_expiry: Gauge::default(),
            grpc: Arc::new(grpc::GrpcMetrics::default()),
        };
        {
            let mut root = m.lock();
            root.register_collector(Box::new(process::ProcessCollector));
            let r = root.sub_registry_with_prefix("federation");
            r.register(
                "decisions",
                "Routing decisions by rule and outcome",
                m.decisions.clone(),
            );
            r.register(
                "failovers",
                "Tasks placed in a backup region, by region",
                m.failovers.clone(),
            );
            r.register(
                "forward_seconds",
                "Latency of forwarding a task to its owner region",
                m.forward_seconds.clone(),
            );
            r.register(
                "peer_state",
                "1 for each peer's current state",
                m.peer_state.clone(),
            );
            r.register(
                "advertisement_age_seconds",
                "Time since fresh information about a peer arrived",
                m.advertisement_age_seconds.clone(),
            );
            r.register(
                "queue_depth",
                "Tasks queued in this region",
                m.queue_depth.clone(),
            );
            r.register(
                "leased_tasks",
                "Tasks leased to agents in this region",
                m.leased.clone(),
            );
            r.register(
                "store_undecodable_records",
                "Task records in this region's store that do not decode (skipped by every scan; ids in the status)",
                m.store_undecodable.clone(),
            );
            r.register(
                "lease_expiries",
                "Leases that expired (agent lost)",
                m.lease_expiries.clone(),
            );
            r.register(
                "snapshot_bytes",
                "Size on the wire of the last snapshot a peer received from us, by peer",
                m.snapshot_bytes.clone(),
            );
            r.register(
                "snapshot_compression_ratio",
                "Plaintext over compressed size of the last snapshot, by peer",
                m.snapshot_compression_ratio.clone(),
            );
            r.register(
                "snapshot_age_seconds",
                "Age of the copy held of each source region: since the source took the snapshot or sealed the change batch folded in last (by its clock)",
                m.snapshot_age_seconds.clone(),
            );
            r.register(
                "log_head_anomalies",
                "Advertisements whose decision-log head went back or changed from what this controller witnessed, by region",
                m.log_head_anomalies.clone(),
            );
            r.register(
                "gossip_sent_bytes",
                "Encoded bytes of the Advertise requests and responses this controller sent",
                m.gossip_sent_bytes.clone(),
            );
            r.register(
                "registered_agents",
                "Region agents registered with this controller",
                m.registered_agents.clone(),
            );
            r.register(
                "certificate_expiry_timestamp_seconds",
                "When this controller's TLS certificate expires (notAfter, seconds since the Unix epoch; absent without TLS)",
                m.certificate_expiry.clone(),
            );
            r.register(
                "grpc_server_handled",
                "gRPC calls served, by service, method and status code",
                m.grpc.handled.clone(),
            );
            r.register(
                "grpc_server_handling_seconds",
                "Time from a gRPC request to the end of its response (streams whole), by service and method",
                m.grpc.seconds.clone(),
            );
        }
        m
    }

    /// Exposes replication's counters (read at each scrape).
    pub fn register_replication(&self, stats: Arc<Stats>) {
        self.lock()
            .sub_registry_with_prefix("federation")
            .register_collector(Box::new(ReplicationCounters(stats)));
    }

    /// Exposes what the controller's components measure themselves: the
    /// store's commit and the decision log's append latency, the build, and
    /// the certificate's expiry (`None` without TLS).
    pub fn register_components(
        &self,
        region: &str,
        store_commit: Histogram,
        log_append: Histogram,
        certificate_not_after: Option<i64>,
    ) {
        let mut root = self.lock();
        let r = root.sub_registry_with_prefix("federation");
        r.register(
            "store_commit_seconds",
            "Task store write-transaction commit time, fsync included",
            store_commit,
        );
        r.register(
            "decision_log_append_seconds",
            "Decision log batch write + fdatasync time",
            log_append,
        );
        let build = prometheus_client::metrics::info::Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            region: region.to_string(),
        });
        r.register("build", "The controller's version and region", build);
        if let Some(t) = certificate_not_after {
            self.certificate_expiry.set(t);
        }
    }

    /// The tower layer that counts and times every gRPC call.
    pub fn grpc_layer(&self) -> grpc::GrpcMetricsLayer {
        grpc::GrpcMetricsLayer(self.grpc.clone())
    }

    /// Calls of the region's work in flight on this controller now
    /// ([`grpc::is_work`]).
    pub fn work_in_flight(&self) -> u64 {
        self.grpc.work_in_flight()
    }

    /// Exposes membership's count of this controller's own stalls.
    pub fn register_self_stalls(&self, stalls: Arc<AtomicU64>) {
        self.lock()
            .sub_registry_with_prefix("federation")
            .register_collector(Box::new(SelfStalls(stalls)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a routing decision; `rule` from [`rule_label`].
    pub fn decision(&self, rule: String, outcome: &str, region: Option<&str>) {
        *self
            .decision_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((rule.clone(), outcome.to_string()))
            .or_insert(0) += 1;
        self.decisions
            .get_or_create(&DecisionLabels {
                rule,
                outcome: outcome.to_string(),
            })
            .inc();
        if outcome == "failover" {
            if let Some(region) = region {
                self.failovers
                    .get_or_create(&RegionLabels {
                        region: region.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// The decisions counted so far: (rule label, outcome) → count.
    pub fn decision_counts(&self) -> std::collections::BTreeMap<(String, String), u64> {
        self.decision_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records a forward's latency.
    pub fn forward(&self, region: &str, seconds: f64) {
        self.forward_seconds
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .observe(seconds);
    }

    /// Counts `bytes` of an encoded Advertise request or response sent.
    pub fn gossip_sent(&self, bytes: usize) {
        self.gossip_sent_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Encoded bytes of Advertise messages sent so far.
    pub fn gossip_sent_total(&self) -> u64 {
        self.gossip_sent_bytes.get()
    }

    /// Counts an advertised log head of `region` that contradicts the
    /// witnessed one.
    pub fn log_head_anomaly(&self, region: &str) {
        self.log_head_anomalies
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .inc();
    }

    /// Counts expired leases.
    pub fn lease_expired(&self, n: u64) {
        self.lease_expiries.inc_by(n);
    }

    /// Records a snapshot sent to `peer`.
    pub fn snapshot_sent(&self, peer: &str, bytes: u64, ratio: f64) {
        let labels = RegionLabels {
            region: peer.to_string(),
        };
        self.snapshot_bytes
            .get_or_create(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.snapshot_compression_ratio
            .get_or_create(&labels)
            .set(ratio);
    }

    /// Records the age of the newest snapshot held from `source`.
    pub fn snapshot_age(&self, source: &str, seconds: f64) {
        self.snapshot_age_seconds
            .get_or_create(&RegionLabels {
                region: source.to_string(),
            })
            .set(seconds);
    }

    /// Refreshes the state gauges from what the controller holds now and
    /// renders OpenMetrics text (see [`exposition::to_prometheus_text`] for
    /// the other format).
    pub fn render(&self, now: Scrape<'_>) -> String {
        let Scrape {
            agents,
            status,
            snapshots_taken,
            store,
        } = now;
        self.registered_agents
            .set(i64::try_from(agents).unwrap_or(i64::MAX));
        self.peer_state.clear();
        for row in &status.regions {
            if row.state == "self" {
                continue;
            }
            self.peer_state
                .get_or_create(&PeerStateLabels {
                    region: row.region.clone(),
                    state: row.state.clone(),
                })
                .set(1);
            if row.last_advertisement_age_ms >= 0 {
                self.advertisement_age_seconds
                    .get_or_create(&RegionLabels {
                        region: row.region.clone(),
                    })
                    .set(row.last_advertisement_age_ms as f64 / 1000.0);
            }
        }
        let now = crate::clock::now_unix_ms();
        for (source, taken) in snapshots_taken {
            // Clamped: the source's clock may run ahead of ours.
            let age = now.saturating_sub(taken).max(0) as f64 / 1000.0;
            self.snapshot_age(&source, age);
        }
        let counts = store.counts();
        self.queue_depth.set(i64::from(counts.queued));
        self.leased.set(i64::from(counts.leased));
        self.store_undecodable
            .set(i64::try_from(store.undecodable().0).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.lock()) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// What a scrape reads of the controller's state.
#[derive(Debug)]
pub struct Scrape<'a> {
    /// Registered agents.
    pub agents: usize,
    /// The federation status (peer states, advertisement ages).
    pub status: &'a federation_api::FederationStatusResponse,
    /// When the newest snapshot held of each source was taken (Unix ms).
    pub snapshots_taken: Vec<(String, i64)>,
    /// The task store (queue depth, leases, undecodable records).
    pub store: &'a crate::tasks::TaskStore,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_stalls_are_read_from_membership_when_scraped() {
        let m = Metrics::new();
        let stalls = Arc::new(AtomicU64::new(0));
        m.register_self_stalls(stalls.clone());
        stalls.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.lock()).expect("encodes");
        assert!(
            out.lines().any(|l| l == "federation_self_stalls_total 2"),
            "{out}"
        );
    }
}
