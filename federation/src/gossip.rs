//! Gossip between controllers, both ways of the `Advertise` exchange: every
//! heartbeat this controller sends each peer its own advertisement, a digest
//! of what it holds and the advertisements that peer's last digest lacked
//! ([`Gossip::advertise_loop`]); a peer's call is answered the same way
//! ([`Gossip::answer`]). What arrives either way is taken in once
//! ([`Gossip::merge`]): the peer table sees every advertisement, the
//! origin's log head is witnessed, takeover notices are applied.
//!
//! Also keeps the log's anchors on disk once per heartbeat (our head in the
//! task store, the heads witnessed of peers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use federation_api as api;

use crate::audit::DecisionLog;
use crate::audit::anchor::Witnesses;
use crate::cluster::{Cluster, Sequence};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::replication::Replicator;
use crate::tasks::TaskStore;
use crate::{transport, wire};

/// The gossip of one controller.
#[derive(Debug)]
pub struct Gossip {
    cluster: Arc<Cluster>,
    peers: Arc<Peers>,
    witnesses: Arc<Witnesses>,
    metrics: Arc<Metrics>,
    replicator: Arc<Replicator>,
    store: TaskStore,
    log: DecisionLog,
    max_known: usize,
    heartbeat: Duration,
    forward_timeout: Duration,
    /// The last log head seq each named replica of a region advertised
    /// itself: a replica behind another one of its region (one chain in
    /// their database) is lagging, not truncated, unless it goes back
    /// from what it advertised itself.
    replica_heads: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// The advertisements in flight, ended with the loop.
    detached: crate::detached::Detached,
}

/// What [`Gossip::new`] is built from.
#[derive(Debug)]
pub struct GossipParts {
    /// This region and its peer table.
    pub cluster: Arc<Cluster>,
    /// Calling peers.
    pub peers: Arc<Peers>,
    /// Heads witnessed of peers' logs.
    pub witnesses: Arc<Witnesses>,
    /// Metrics (gossip bytes, log-head anomalies).
    pub metrics: Arc<Metrics>,
    /// Applies takeover notices.
    pub replicator: Arc<Replicator>,
    /// Records our log head.
    pub store: TaskStore,
    /// Our decision log.
    pub log: DecisionLog,
    /// `limits.max_known_advertisements`.
    pub max_known: usize,
    /// `timers.heartbeat_interval`.
    pub heartbeat: Duration,
    /// `timers.forward_timeout`.
    pub forward_timeout: Duration,
}

impl Gossip {
    /// Gossip over its parts.
    pub fn new(p: GossipParts) -> Self {
        Self {
            cluster: p.cluster,
            peers: p.peers,
            witnesses: p.witnesses,
            metrics: p.metrics,
            replicator: p.replicator,
            store: p.store,
            log: p.log,
            max_known: p.max_known,
            heartbeat: p.heartbeat,
            forward_timeout: p.forward_timeout,
            replica_heads: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            detached: crate::detached::Detached::new(),
        }
    }

    /// True when `origin`, a named replica, advertises a head before the
    /// one witnessed of its region but not before its own last one: it
    /// lags behind another replica on the region's one chain (a prefix of
    /// it), which is neither witnessed nor an anomaly. Records its head.
    fn lagging_replica(&self, origin: &api::RegionAdvertisement, seq: u64) -> bool {
        if origin.replica.is_empty() {
            return false;
        }
        let mut heads = self
            .replica_heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (origin.region.clone(), origin.replica.clone());
        let own = heads.get(&key).copied();
        if own.is_none_or(|o| seq >= o) {
            heads.insert(key, seq);
        }
        let witnessed = self.witnesses.of(&origin.region).map(|w| w.seq);
        witnessed.is_some_and(|w| seq < w) && own.is_none_or(|o| seq >= o)
    }

    fn own(&self, sequence: Sequence) -> api::RegionAdvertisement {
        let notices = self.replicator.replication.takeover.notices();
        self.cluster.advertisement(sequence, notices)
    }

    /// Takes in what a peer sent, both ways of the Advertise exchange: its own
    /// advertisement `origin` (already checked to come from that region) and the
    /// advertisements it relays (`known`). Membership sees all of them; the
    /// origin's decision-log head is witnessed (relayed heads are not: a relay
    /// cannot vouch for another region's log); takeover notices are applied.
    pub async fn merge(
        &self,
        origin: &api::RegionAdvertisement,
        known: &[api::RegionAdvertisement],
        now: Instant,
    ) {
        let membership = self.cluster.membership();
        membership.observe(origin, now);
        membership.heard_directly_from(&origin.region, &origin.replica, now);
        if let Some(head) = origin
            .log_head
            .as_ref()
            .filter(|h| !self.lagging_replica(origin, h.seq))
        {
            let head = crate::audit::anchor::LogHead {
                seq: head.seq,
                hash: head.hash.clone(),
            };
            let seen = self.witnesses.observe(
                &origin.region,
                origin.epoch,
                &head,
                crate::clock::now_unix_ms(),
            );
            if matches!(
                seen,
                crate::audit::anchor::Observation::Regressed { .. }
                    | crate::audit::anchor::Observation::Forked { .. }
            ) {
                self.metrics.log_head_anomaly(&origin.region);
            }
        }
        crate::replication::takeover::on_advertisement(&self.replicator, origin).await;
        for ad in known {
            membership.observe(ad, now);
            if !ad.takeovers.is_empty() {
                crate::replication::takeover::on_advertisement(&self.replicator, ad).await;
            }
        }
    }

    /// Answers a peer's `Advertise` (its origin's region already matched
    /// to the caller's certificate): validated, merged, and our side of the
    /// exchange returned.
    pub async fn answer(&self, req: api::AdvertiseRequest) -> Result<api::AdvertiseResponse> {
        let now = Instant::now();
        let origin = req
            .origin
            .ok_or_else(|| Error::invalid("origin", "missing"))?;
        if self.cluster.policy().region(&origin.region).is_none() {
            return Err(Error::invalid(
                "origin.region",
                format!(
                    "`{}` is not a region of this federation",
                    wire::truncate(&origin.region, 64)
                ),
            ));
        }
        let max_known = self.max_known;
        if req.known.len() > max_known {
            return Err(Error::limit(
                "known",
                format!("more than max_known_advertisements ({max_known}) advertisements"),
            ));
        }
        if req
            .digest
            .as_ref()
            .is_some_and(|d| d.stale.len() > max_known)
        {
            return Err(Error::limit(
                "digest.stale",
                format!("more than max_known_advertisements ({max_known}) entries"),
            ));
        }
        self.merge(&origin, &req.known, now).await;
        let membership = self.cluster.membership();
        membership.note_digest(&origin.region, req.digest.as_ref());
        // Relayed: what the caller's digest says it lacks; everything to an
        // older peer that sent no digest.
        let response = api::AdvertiseResponse {
            origin: Some(self.own(Sequence::Current)),
            known: membership.relays_for(&origin.region, req.digest.as_ref()),
            digest: Some(membership.digest(Instant::now())),
        };
        self.metrics
            .gossip_sent(prost::Message::encoded_len(&response));
        Ok(response)
    }

    /// Every heartbeat: advertise to every peer (each call bounded by a
    /// deadline, so a hung peer delays nobody) and recompute peer health;
    /// keeps the log's anchors on disk. At stop, waits for the calls in
    /// flight (each within its deadline).
    pub async fn advertise_loop(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let interval = self.heartbeat.max(Duration::from_millis(10));
        let deadline = interval
            .min(self.forward_timeout)
            .max(Duration::from_millis(50));
        let mut ticker = crate::ticker::Ticker::new(interval, stop);
        let mut recorded = self.store.log_head().ok().flatten();
        while ticker.tick().await {
            let membership = self.cluster.membership();
            membership.tick(Instant::now());
            self.persist_anchors(&mut recorded).await;
            let origin = self.own(Sequence::Next);
            let digest = membership.digest(Instant::now());
            for region in self.cluster.peer_regions() {
                let gossip = self.clone();
                // Relayed: what the peer's last digest said it lacks (all we
                // hold when it sent none).
                let request = api::AdvertiseRequest {
                    origin: Some(origin.clone()),
                    known: membership.relays_to(&region),
                    digest: Some(digest.clone()),
                };
                self.detached
                    .spawn(async move { gossip.advertise_to(region, request, deadline).await });
            }
        }
        // Each call is bounded by `deadline`: waited for, so none outlives
        // the run holding the store.
        self.detached.end(deadline).await;
    }

    async fn advertise_to(
        &self,
        region: String,
        request: api::AdvertiseRequest,
        deadline: Duration,
    ) {
        // One replica of the region is enough (each replica advertises to
        // us itself): the first that answers.
        let Ok(clients) = self.peers.clients(&region) else {
            return;
        };
        for (endpoint, client) in clients {
            if self
                .advertise_at(&region, client, request.clone(), deadline)
                .await
            {
                self.peers.reached(&endpoint);
                return;
            }
            self.peers.unreachable(&endpoint);
        }
    }

    /// One Advertise exchange with one replica of `region`; false when it
    /// got no answer.
    async fn advertise_at(
        &self,
        region: &str,
        mut client: crate::peers::PeerClient,
        request: api::AdvertiseRequest,
        deadline: Duration,
    ) -> bool {
        self.metrics
            .gossip_sent(prost::Message::encoded_len(&request));
        let call = client.advertise(transport::with_deadline(request, deadline));
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                let Some(origin) = &resp.origin else {
                    return true;
                };
                if origin.region != region {
                    tracing::warn!(%region, claimed = %origin.region, "peer answered as another region; ignored");
                    return true;
                }
                let max_known = self.max_known;
                let digest = resp.digest.as_ref().filter(|d| d.stale.len() <= max_known);
                if digest.is_none() && resp.digest.is_some() {
                    tracing::warn!(%region, max_known, "peer's gossip digest too long; sending it everything");
                }
                self.cluster.membership().note_digest(region, digest);
                self.merge(origin, &resp.known, Instant::now()).await;
                true
            }
            Ok(Err(status)) => {
                tracing::debug!(%region, code = ?status.code(), "advertise failed");
                !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                )
            }
            Err(_) => {
                tracing::debug!(%region, "advertise timed out");
                false
            }
        }
    }

    /// Keeps the log's anchors on disk, once per heartbeat and only when they
    /// changed: our own head in the task store, and the heads witnessed of peers.
    pub async fn persist_anchors(&self, recorded: &mut Option<(u64, String)>) {
        let head = self.log.last();
        let store = (recorded.as_ref() != Some(&head)).then(|| self.store.clone());
        if store.is_none() && !self.witnesses.needs_flush() {
            // Nothing changed since the last heartbeat: no trip to the pool.
            return;
        }
        let witnesses = self.witnesses.clone();
        let head2 = head.clone();
        let done = tokio::task::spawn_blocking(move || {
            let own = store.map(|s| s.record_log_head(head2.0, &head2.1));
            let flushed = witnesses.flush();
            (own, flushed)
        })
        .await;
        match done {
            Ok((own, witnesses)) => {
                match own {
                    Some(Ok(())) => *recorded = Some(head),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "recording the decision log head in the task store failed")
                    }
                    None => {}
                }
                if let Err(e) = witnesses {
                    tracing::error!(error = %e, "writing witnessed log heads failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "persisting log anchors panicked"),
        }
    }
}
