//! Membership: what this controller knows of every region, from
//! advertisements (direct or gossiped), and how alive each one is.
//!
//! Liveness uses a phi-accrual failure detector (Hayashibara et al.; the one
//! Cassandra and Akka use) over the arrival times of *fresh* information about
//! a region — a higher (epoch, sequence) than known, however it arrived — so a
//! broken link between two regions does not hide a third that is alive. A hard
//! `dead_after` silence bound caps detection time whatever phi says.
//!
//! **A controller's own stall is not its peers' failure.** Every entry point
//! that takes the time (`tick`, `observe`, `status`, the routing view) first
//! compares it with the last instant any of them ran. A gap longer than two
//! heartbeats means this process did not run (paused, VM frozen, a long
//! scheduler stall), so it could not read the advertisements of that gap:
//! each peer's silence clock is moved on by the gap less the one heartbeat
//! expected in it ([`Membership::self_stalls`] counts these). No peer becomes
//! suspect, dead or held down for that silence; the next advertisements say
//! how the peers are. Whichever path notices the gap first (the advertiser's
//! tick, an incoming advertisement, a submit) does so for all of them.
//! Failback hold-down applies only to a region that was really unavailable:
//! declared dead while this controller ran normally, or back with a new epoch.
//!
//! This module owns the peer table and the phi computation. It does not send
//! anything (the advertiser in `controller` does) and never decides routes: it
//! only answers [`FederationView`] questions. Its clock is injected (`now`
//! parameters), so its timing logic is tested without sleeping.
//!
//! With TLS and `attest_tags` on, a region's advertised compliance tags are
//! cut down, as each advertisement arrives, to those its certificate attests
//! ([`Attestations`], fed by the TLS handshakes in both directions); dropped
//! tags are logged, and routing, status and gossip see only attested ones.
//!
//! **Gossip sends what the receiver lacks.** Each Advertise message carries
//! a digest ([`Membership::digest`]) of the regions its sender has not heard
//! from *directly* (as the origin of an Advertise exchange) for a heartbeat
//! and a half, with the (epoch, sequence) it holds of each. A peer relays
//! only advertisements it holds fresher than a listed entry
//! ([`Membership::relays_for`]); in a healthy full mesh the digest is empty
//! and so are the relays, so traffic per controller grows linearly with the
//! number of regions. A region heard only through others stays listed, so
//! its advertisements arrive every heartbeat, as before. A message without a
//! digest (an older peer, or none received yet) gets every advertisement
//! held.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation_api::{Capacity, DigestEntry, GossipDigest, RegionAdvertisement};

use crate::config::Timers;
use crate::policy::{FederationView, Health, Policy, RegionView};

/// Arrival intervals kept per region for phi.
const WINDOW: usize = 100;

/// One replica of a region as known to this controller: each replica of a
/// region (controllers sharing its database) advertises itself with its own
/// epoch and sequence. An older controller, which names no replica, is the
/// region's one replica `""`.
#[derive(Debug, Clone)]
struct Replica {
    /// Freshest advertisement known of this replica, tags attested.
    ad: Option<RegionAdvertisement>,
    /// When fresh information about this replica last arrived.
    last_fresh: Option<Instant>,
    /// When this replica itself last talked to us (the origin of an
    /// Advertise exchange, either way): a replica not heard directly for
    /// [`Membership::stale_after`] is listed in our gossip digest.
    last_direct: Option<Instant>,
    /// Intervals between fresh arrivals, seconds.
    intervals: VecDeque<f64>,
    /// The freshest advertisement as the replica sent it, before our tag
    /// attestation: what we pass on in gossip, so that every receiver
    /// judges the region's claims against its own view of the certificate
    /// (and logs what it drops) rather than against ours.
    as_sent: Option<RegionAdvertisement>,
    /// The attested tags `ad` was cut down with (None: not cut down). When
    /// the region's attestation changes later (its certificate seen after
    /// its advertisement was gossiped to us), `ad` is cut again from
    /// `as_sent`.
    attested_with: Option<BTreeSet<String>>,
}

impl Replica {
    fn new() -> Self {
        Self {
            ad: None,
            last_fresh: None,
            last_direct: None,
            intervals: VecDeque::with_capacity(WINDOW),
            as_sent: None,
            attested_with: None,
        }
    }
}

/// One region as known to this controller: its replicas, and what holds of
/// the region as a whole (alive while any replica is).
#[derive(Debug, Clone)]
struct Peer {
    /// Every replica heard of, by name (`""`: an older controller).
    replicas: BTreeMap<String, Replica>,
    /// The region's last gossip digest (what it lacks), from its request or
    /// its response, whichever came last; None: never received, or an
    /// older peer that sends none (it gets every advertisement we hold).
    digest: Option<Vec<DigestEntry>>,
    /// When the region last went from not-alive to alive.
    alive_since: Option<Instant>,
    /// The last health we computed (for transition logs and hold-down).
    last_health: Health,
    /// When `last_health` last changed (None: not since our start).
    health_since: Option<Instant>,
    /// Tags last dropped as unattested (logged when this changes).
    dropped: Vec<String>,
    /// The region's advertisement as routing and status see it: the
    /// freshest live replica's, with the capacity summed over the live
    /// replicas and draining only when all of them drain. Recomputed on
    /// every change of a replica and at every tick.
    merged: Option<RegionAdvertisement>,
}

/// Compliance tags attested by regions' certificates, learned from verified
/// TLS handshakes (shared with the TLS verifiers).
#[derive(Debug, Clone, Default)]
pub struct Attestations {
    by_region: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    enabled: Arc<AtomicBool>,
}

impl Attestations {
    /// Records what `region`'s verified certificate attests.
    pub fn attest(&self, region: &str, tags: &BTreeSet<String>) {
        let mut map = self
            .by_region
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.get(region) != Some(tags) {
            tracing::info!(%region, tags = %crate::logfields::list(tags), "certificate attests tags");
            map.insert(region.to_string(), tags.clone());
        }
    }

    /// The tags attested for `region` (empty when never verified).
    pub fn of(&self, region: &str) -> BTreeSet<String> {
        self.by_region
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(region)
            .cloned()
            .unwrap_or_default()
    }

    /// True when advertised tags must be attested.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }
}

impl Peer {
    fn new() -> Self {
        Self {
            replicas: BTreeMap::new(),
            digest: None,
            alive_since: None,
            last_health: Health::Unknown,
            health_since: None,
            dropped: Vec::new(),
            merged: None,
        }
    }

    /// When fresh information about any replica last arrived.
    fn last_fresh(&self) -> Option<Instant> {
        self.replicas.values().filter_map(|r| r.last_fresh).max()
    }
}

/// A snapshot of one region's membership row, for status.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Region name.
    pub region: String,
    /// Liveness.
    pub health: Health,
    /// Suspicion level.
    pub phi: f64,
    /// Freshest advertisement.
    pub ad: Option<RegionAdvertisement>,
    /// Time since fresh information arrived.
    pub age: Option<Duration>,
    /// Time since the health last changed (None: not since our start).
    pub health_age: Option<Duration>,
    /// How much longer the region is held down after coming back from dead
    /// (`failback_hold_down`); None when it is not held down.
    pub hold_down_left: Option<Duration>,
}

/// One replica of a region, for status and for choosing where to call.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// Its name within the region (`""`: an older controller).
    pub replica: String,
    /// The endpoint it advertises.
    pub endpoint: String,
    /// Its own liveness (the region is alive while any replica is).
    pub health: Health,
    /// Its epoch.
    pub epoch: u64,
    /// Time since fresh information about it arrived.
    pub age: Option<Duration>,
    /// True while it drains (it passes new work to its siblings).
    pub draining: bool,
}

/// The peer table.
#[derive(Debug)]
pub struct Membership {
    self_region: String,
    timers: Timers,
    table: Mutex<Table>,
    attestations: Attestations,
    stalls: Arc<AtomicU64>,
}

/// The peers and this controller's own clock, under one lock so that every
/// path sees (and credits) a stall once.
#[derive(Debug)]
struct Table {
    peers: BTreeMap<String, Peer>,
    /// The latest instant any time-taking entry point ran: a gap longer than
    /// [`Membership::stall_after`] since then is our own stall.
    last_run: Option<Instant>,
}

/// The suspicion level for a silence of `elapsed` seconds given past
/// intervals: `-log10(P(interval > elapsed))` under a normal distribution of
/// intervals (mean and deviation from the window, floors for both from the
/// heartbeat interval so a perfectly regular history does not make phi jump).
pub fn phi(intervals: &VecDeque<f64>, elapsed: f64, heartbeat: f64) -> f64 {
    let (mean, std) = if intervals.is_empty() {
        (heartbeat, heartbeat / 4.0)
    } else {
        let n = intervals.len() as f64;
        let mean = intervals.iter().sum::<f64>() / n;
        let var = intervals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    // Acceptable pause: half a heartbeat of scheduling jitter is normal on a
    // busy machine and must not raise suspicion.
    let mean = mean.max(heartbeat) + heartbeat / 2.0;
    let std = std.max(heartbeat / 4.0);
    let z = (elapsed - mean) / std;
    // Logistic approximation of the normal CDF tail (as in Akka).
    let e = (-z * (1.5976 + 0.070566 * z * z)).exp();
    let p_later = if elapsed > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    -p_later.max(f64::MIN_POSITIVE).log10()
}

impl Membership {
    /// A table for `self_region` with the configured regions, none heard from yet.
    pub fn new(self_region: &str, policy: &Policy, timers: Timers) -> Self {
        let peers = policy
            .regions
            .iter()
            .filter(|r| r.name != self_region)
            .map(|r| (r.name.clone(), Peer::new()))
            .collect();
        Self {
            self_region: self_region.to_string(),
            timers,
            table: Mutex::new(Table {
                peers,
                last_run: None,
            }),
            attestations: Attestations::default(),
            stalls: Arc::new(AtomicU64::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn heartbeat(&self) -> Duration {
        self.timers
            .heartbeat_interval
            .max(Duration::from_millis(10))
    }

    /// The gap in this controller's own activity that counts as its stall:
    /// two heartbeats (the advertiser ticks every heartbeat).
    pub fn stall_after(&self) -> Duration {
        2 * self.heartbeat()
    }

    /// How many of its own stalls this controller has detected (shared
    /// with the metrics collector).
    pub fn self_stalls(&self) -> Arc<AtomicU64> {
        self.stalls.clone()
    }

    /// Records that this controller runs at `now`; when nothing ran for
    /// longer than [`Membership::stall_after`] before, that gap was our own
    /// stall: every peer's silence clock moves on by the gap less the one
    /// heartbeat we expected to run in it, so the advertisements we could
    /// not read count against nobody. Returns the gap of a detected stall.
    fn notice_stall(&self, table: &mut Table, now: Instant) -> Option<Duration> {
        let last = table.last_run.replace(now);
        let gap = match last {
            Some(last) if now > last => now - last,
            Some(last) => {
                // Taken before a later caller's instant: keep the latest.
                table.last_run = Some(last);
                return None;
            }
            None => return None,
        };
        if gap <= self.stall_after() {
            return None;
        }
        let credit = gap - self.heartbeat();
        for replica in table
            .peers
            .values_mut()
            .flat_map(|p| p.replicas.values_mut())
        {
            if let Some(t) = replica.last_fresh.as_mut() {
                *t += credit;
            }
            if let Some(t) = replica.last_direct.as_mut() {
                *t += credit;
            }
        }
        self.stalls.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
            "own stall detected; peers' silence during it ignored"
        );
        Some(gap)
    }

    /// Adds rows for regions a reloaded policy introduced (rows for removed
    /// regions are kept until restart; routing only asks about configured ones).
    pub fn sync_regions(&self, policy: &Policy) {
        let mut table = self.lock();
        for r in &policy.regions {
            if r.name != self.self_region {
                table.peers.entry(r.name.clone()).or_insert_with(Peer::new);
            }
        }
    }

    /// Merges an advertisement, direct or gossiped. Returns true when it was
    /// fresher than what we knew of its replica. Advertisements about
    /// ourselves, about unknown regions, or older than known are ignored.
    /// A replica back with a new epoch restarted; the region restarted only
    /// when no other replica of it was alive meanwhile.
    pub fn observe(&self, ad: &RegionAdvertisement, now: Instant) -> bool {
        if ad.region == self.self_region {
            return false;
        }
        let mut table = self.lock();
        self.notice_stall(&mut table, now);
        let Some(peer) = table.peers.get_mut(&ad.region) else {
            return false;
        };
        let others_alive = peer
            .replicas
            .iter()
            .any(|(name, r)| *name != ad.replica && self.replica_health(r, now).0 == Health::Alive);
        let replica = peer
            .replicas
            .entry(ad.replica.clone())
            .or_insert_with(Replica::new);
        let fresher = match &replica.ad {
            None => true,
            Some(known) => (ad.epoch, ad.sequence) > (known.epoch, known.sequence),
        };
        if !fresher {
            // Not news, but the region's certificate may have been seen
            // since the stored copy was cut down (gossip arrived first).
            self.reattest(peer);
            return false;
        }
        if let Some(last) = replica.last_fresh {
            let interval = now.saturating_duration_since(last).as_secs_f64();
            if replica.intervals.len() == WINDOW {
                replica.intervals.pop_front();
            }
            replica.intervals.push_back(interval);
        }
        let restarted = replica.ad.as_ref().is_some_and(|k| k.epoch != ad.epoch);
        if restarted {
            // A new epoch is a new process: its history says nothing of it.
            replica.intervals.clear();
        }
        replica.as_sent = Some(ad.clone());
        replica.last_fresh = Some(now);
        if restarted && others_alive {
            tracing::info!(region = %ad.region, replica = %ad.replica, epoch = ad.epoch, "peer replica restarted with a new epoch; its region stayed alive");
        } else if restarted {
            // The region was unavailable while it restarted, however
            // briefly: its failback hold-down starts now.
            peer.alive_since = Some(now);
            tracing::info!(region = %ad.region, replica = %ad.replica, epoch = ad.epoch, "peer restarted with a new epoch");
        }
        self.cut_to_attested(peer, &ad.replica);
        self.merge_replicas(peer, now);
        true
    }

    /// Sets replica `name`'s `ad` from its `as_sent`, cut down to the tags
    /// the region's certificate attests when attestation is on; logs newly
    /// dropped tags.
    fn cut_to_attested(&self, peer: &mut Peer, name: &str) {
        let Some(replica) = peer.replicas.get_mut(name) else {
            return;
        };
        let Some(mut ad) = replica.as_sent.clone() else {
            return;
        };
        if !self.attestations.enabled() {
            replica.attested_with = None;
            replica.ad = Some(ad);
            return;
        }
        let attested = self.attestations.of(&ad.region);
        let (kept, dropped): (Vec<String>, Vec<String>) = std::mem::take(&mut ad.compliance_tags)
            .into_iter()
            .partition(|t| attested.contains(t));
        if dropped != peer.dropped {
            if !dropped.is_empty() {
                tracing::warn!(region = %ad.region, dropped = %crate::logfields::list(&dropped), attested = %crate::logfields::list(&attested), "advertised tags not attested by the region's certificate; dropped");
            }
            peer.dropped = dropped;
        }
        ad.compliance_tags = kept;
        replica.attested_with = Some(attested);
        replica.ad = Some(ad);
    }

    /// Cuts the stored advertisements again when the region's attestation
    /// changed since they were cut.
    fn reattest(&self, peer: &mut Peer) {
        if !self.attestations.enabled() {
            return;
        }
        let names: Vec<String> = peer
            .replicas
            .iter()
            .filter_map(|(name, r)| {
                let region = &r.as_sent.as_ref()?.region;
                (r.attested_with.as_ref() != Some(&self.attestations.of(region)))
                    .then(|| name.clone())
            })
            .collect();
        if names.is_empty() {
            return;
        }
        for name in &names {
            self.cut_to_attested(peer, name);
        }
        let now = peer.last_fresh().unwrap_or_else(Instant::now);
        self.merge_replicas(peer, now);
    }

    /// How long a replica may be silent before it is forgotten (replicas
    /// come and go with their names, pods of a Deployment for one): ten
    /// times `dead_after`, at least a minute.
    pub fn forget_replica_after(&self) -> Duration {
        (self.timers.dead_after * 10).max(Duration::from_secs(60))
    }

    /// Drops the replicas of `peer` silent for longer than
    /// [`Membership::forget_replica_after`], except the one heard last (a
    /// region all of whose replicas are silent stays dead, not unknown).
    fn forget_gone_replicas(&self, region: &str, peer: &mut Peer, now: Instant) {
        let horizon = self.forget_replica_after();
        let newest = peer.last_fresh();
        peer.replicas.retain(|name, r| {
            let gone = r
                .last_fresh
                .is_some_and(|t| Some(t) != newest && now.saturating_duration_since(t) > horizon);
            if gone {
                tracing::info!(%region, replica = %name, "peer replica silent for long; forgotten");
            }
            !gone
        });
    }

    /// Recomputes the region's merged advertisement from its replicas at
    /// `now`: the freshest live replica's (the freshest of any when none
    /// is live), with the slots summed over the live replicas (agents
    /// connect to one replica each), the queue the deepest any live
    /// replica reports (the queue is the region's one queue in its
    /// database), and draining only when every live replica drains and
    /// none of them says a sibling serves (`siblings_serve`).
    fn merge_replicas(&self, peer: &mut Peer, now: Instant) {
        let live: Vec<&Replica> = peer
            .replicas
            .values()
            .filter(|r| r.ad.is_some() && self.replica_health(r, now).0 != Health::Dead)
            .collect();
        let newest = |rs: &mut dyn Iterator<Item = &Replica>| {
            rs.max_by_key(|r| r.last_fresh).and_then(|r| r.ad.clone())
        };
        let Some(mut merged) =
            newest(&mut live.iter().copied()).or_else(|| newest(&mut peer.replicas.values()))
        else {
            peer.merged = None;
            return;
        };
        if live.len() > 1 {
            let mut capacity = Capacity::default();
            for c in live.iter().filter_map(|r| r.ad.as_ref()?.capacity.as_ref()) {
                capacity.total_slots = capacity.total_slots.saturating_add(c.total_slots);
                capacity.free_slots = capacity
                    .free_slots
                    .saturating_add(c.free_slots.min(c.total_slots));
                capacity.queue_depth = capacity.queue_depth.max(c.queue_depth);
                capacity.queue_limit = capacity.queue_limit.max(c.queue_limit);
            }
            merged.capacity = Some(capacity);
        }
        if !live.is_empty() {
            // A draining replica whose siblings serve (in the region's
            // database) keeps the region serving, also while those
            // siblings' own advertisements are late: it passes work on.
            merged.draining = live.iter().all(|r| {
                r.ad.as_ref()
                    .is_some_and(|a| a.draining && !a.siblings_serve)
            });
        }
        peer.merged = Some(merged);
    }

    /// The attested-tags table (shared with TLS verifiers).
    pub fn clone_handle(&self) -> Attestations {
        self.attestations.clone()
    }

    /// Turns tag attestation on or off.
    pub fn set_attestation(&self, on: bool) {
        self.attestations.enabled.store(on, Ordering::SeqCst);
    }

    /// Records the tags `region`'s verified certificate attests.
    pub fn attest(&self, region: &str, tags: &BTreeSet<String>) {
        self.attestations.attest(region, tags);
        if let Some(peer) = self.lock().peers.get_mut(region) {
            self.reattest(peer);
        }
    }

    /// Every advertisement we hold (one per replica) as its region sent
    /// it, for gossip.
    pub fn known(&self) -> Vec<RegionAdvertisement> {
        self.lock()
            .peers
            .values()
            .flat_map(|p| p.replicas.values())
            .filter_map(|r| r.as_sent.clone())
            .collect()
    }

    /// How long a region may go unheard directly before our digest lists
    /// it: a heartbeat and a half (its own advertisement is due every
    /// heartbeat; half of one is jitter).
    pub fn stale_after(&self) -> Duration {
        self.heartbeat() * 3 / 2
    }

    /// Records that `region` itself talked to us at `now` (the verified
    /// origin of an Advertise request or response).
    pub fn heard_directly(&self, region: &str, now: Instant) {
        self.heard_directly_from(region, "", now);
    }

    /// Records that `replica` of `region` itself talked to us at `now`.
    pub fn heard_directly_from(&self, region: &str, replica: &str, now: Instant) {
        if let Some(peer) = self.lock().peers.get_mut(region) {
            peer.replicas
                .entry(replica.to_string())
                .or_insert_with(Replica::new)
                .last_direct = Some(now);
        }
    }

    /// Our gossip digest at `now`: every region not heard directly within
    /// [`Membership::stale_after`] (or never), with the (epoch, sequence)
    /// we hold of it ((0, 0): nothing). Empty in a healthy full mesh.
    pub fn digest(&self, now: Instant) -> GossipDigest {
        let stale_after = self.stale_after();
        let table = self.lock();
        let mut stale = Vec::new();
        for (region, p) in &table.peers {
            if p.replicas.is_empty() {
                // Nothing known of the region: every replica of it.
                stale.push(DigestEntry {
                    region: region.clone(),
                    ..Default::default()
                });
            }
            for (name, r) in &p.replicas {
                if r.last_direct
                    .is_some_and(|t| now.saturating_duration_since(t) <= stale_after)
                {
                    continue;
                }
                let (epoch, sequence) =
                    r.as_sent.as_ref().map_or((0, 0), |a| (a.epoch, a.sequence));
                stale.push(DigestEntry {
                    region: region.clone(),
                    epoch,
                    sequence,
                    replica: name.clone(),
                });
            }
        }
        GossipDigest { stale }
    }

    /// Records `region`'s latest digest (None: it sent none).
    pub fn note_digest(&self, region: &str, digest: Option<&GossipDigest>) {
        if let Some(peer) = self.lock().peers.get_mut(region) {
            peer.digest = digest.map(|d| d.stale.clone());
        }
    }

    /// What to relay to `to` in our next request: by its last digest
    /// ([`Membership::relays_for`]).
    pub fn relays_to(&self, to: &str) -> Vec<RegionAdvertisement> {
        let table = self.lock();
        let digest = table.peers.get(to).and_then(|p| p.digest.as_deref());
        Self::relays(&table, to, digest)
    }

    /// What to relay to `to`, whose digest is `digest`: the advertisements
    /// (as their regions sent them) we hold fresher than its entries, never
    /// `to`'s own (its origin is in every exchange); without a digest (an
    /// older peer) every advertisement we hold, as [`Membership::known`].
    pub fn relays_for(&self, to: &str, digest: Option<&GossipDigest>) -> Vec<RegionAdvertisement> {
        let table = self.lock();
        Self::relays(&table, to, digest.map(|d| &d.stale[..]))
    }

    fn relays(table: &Table, to: &str, digest: Option<&[DigestEntry]>) -> Vec<RegionAdvertisement> {
        let Some(stale) = digest else {
            return table
                .peers
                .values()
                .flat_map(|p| p.replicas.values())
                .filter_map(|r| r.as_sent.clone())
                .collect();
        };
        // An entry names one replica; an older controller's (no replica)
        // is about every replica of its region.
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for e in stale.iter().filter(|e| e.region != to) {
            let Some(peer) = table.peers.get(&e.region) else {
                continue;
            };
            for (name, r) in &peer.replicas {
                if !e.replica.is_empty() && *name != e.replica {
                    continue;
                }
                let Some(ad) = r.as_sent.as_ref() else {
                    continue;
                };
                if (ad.epoch, ad.sequence) > (e.epoch, e.sequence)
                    && seen.insert((e.region.as_str(), name.as_str()))
                {
                    out.push(ad.clone());
                }
            }
        }
        out
    }

    /// The advertisement of `region` as routing sees it: its freshest live
    /// replica's, capacity summed over its live replicas.
    pub fn advertisement(&self, region: &str) -> Option<RegionAdvertisement> {
        self.lock().peers.get(region).and_then(|p| p.merged.clone())
    }

    /// The snapshot body formats every replica of `region` heard of reads
    /// (the intersection of their advertised `snapshot_formats`; empty when
    /// none was heard of, or when one of them advertised none).
    pub fn snapshot_formats(&self, region: &str) -> Vec<u32> {
        let table = self.lock();
        let Some(peer) = table.peers.get(region) else {
            return Vec::new();
        };
        let mut ads = peer.replicas.values().filter_map(|r| r.as_sent.as_ref());
        let Some(first) = ads.next() else {
            return Vec::new();
        };
        let mut formats = first.snapshot_formats.clone();
        for ad in ads {
            formats.retain(|f| ad.snapshot_formats.contains(f));
        }
        formats
    }

    /// The replicas of `region` heard of: each one's endpoint (as it
    /// advertises it), health and when fresh information about it last
    /// arrived, freshest first.
    pub fn replicas(&self, region: &str, now: Instant) -> Vec<ReplicaStatus> {
        let table = self.lock();
        let Some(peer) = table.peers.get(region) else {
            return Vec::new();
        };
        let mut out: Vec<ReplicaStatus> = peer
            .replicas
            .iter()
            .filter_map(|(name, r)| {
                let ad = r.as_sent.as_ref()?;
                Some(ReplicaStatus {
                    replica: name.clone(),
                    endpoint: ad.endpoint.clone(),
                    health: self.replica_health(r, now).0,
                    epoch: ad.epoch,
                    age: r.last_fresh.map(|t| now.saturating_duration_since(t)),
                    draining: ad.draining,
                })
            })
            .collect();
        out.sort_by_key(|r| r.age.unwrap_or(Duration::MAX));
        out
    }

    /// The region's health: the best of its replicas' (alive while any
    /// replica is), and the lowest phi among them.
    fn health_of(&self, peer: &Peer, now: Instant) -> (Health, f64) {
        let rank = |h: Health| match h {
            Health::Alive => 3,
            Health::Suspect => 2,
            Health::Dead => 1,
            Health::Unknown => 0,
        };
        peer.replicas
            .values()
            .map(|r| self.replica_health(r, now))
            .fold((Health::Unknown, f64::INFINITY), |best, h| {
                if rank(h.0) > rank(best.0) || (h.0 == best.0 && h.1 < best.1) {
                    h
                } else {
                    best
                }
            })
    }

    fn replica_health(&self, replica: &Replica, now: Instant) -> (Health, f64) {
        let Some(last) = replica.last_fresh else {
            return (Health::Unknown, f64::INFINITY);
        };
        let peer = replica;
        let elapsed = now.saturating_duration_since(last);
        let hb = self.timers.heartbeat_interval.as_secs_f64().max(0.001);
        let phi = phi(&peer.intervals, elapsed.as_secs_f64(), hb);
        let health = if elapsed >= self.timers.dead_after || phi >= self.timers.phi_dead {
            Health::Dead
        } else if phi >= self.timers.phi_suspect {
            Health::Suspect
        } else {
            Health::Alive
        };
        (health, phi)
    }

    /// Recomputes every region's health, logs transitions, and tracks when
    /// each came back (for failback hold-down). Returns the transitions.
    /// Called every heartbeat: a late call is this controller's own stall.
    pub fn tick(&self, now: Instant) -> Vec<(String, Health, Health)> {
        let mut changes = Vec::new();
        let mut table = self.lock();
        self.notice_stall(&mut table, now);
        let peers = &mut table.peers;
        let regions: Vec<String> = peers.keys().cloned().collect();
        for region in regions {
            if let Some(peer) = peers.get_mut(&region) {
                self.forget_gone_replicas(&region, peer, now);
                // A replica's silence changes what the region offers.
                self.merge_replicas(peer, now);
            }
            let Some(peer) = peers.get(&region) else {
                continue;
            };
            let (health, phi) = self.health_of(peer, now);
            let before = peer.last_health;
            if let Some(peer) = peers.get_mut(&region) {
                if health != before {
                    match health {
                        Health::Dead => {
                            tracing::warn!(%region, phi, "peer declared dead");
                        }
                        Health::Suspect => tracing::warn!(%region, phi, "peer suspected"),
                        Health::Alive => tracing::info!(%region, "peer alive"),
                        Health::Unknown => {}
                    }
                    // Hold-down starts on a return from dead, not on the
                    // first contact after our own start.
                    if health == Health::Alive && before == Health::Dead {
                        peer.alive_since = Some(now);
                    }
                    if health == Health::Dead {
                        peer.alive_since = None;
                    }
                    peer.last_health = health;
                    peer.health_since = Some(now);
                    changes.push((region.clone(), before, health));
                }
            }
        }
        changes
    }

    /// Status rows for every known region except ourselves.
    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        let mut table = self.lock();
        self.notice_stall(&mut table, now);
        table
            .peers
            .iter()
            .map(|(region, peer)| {
                let (health, phi) = self.health_of(peer, now);
                PeerStatus {
                    region: region.clone(),
                    health,
                    phi,
                    ad: peer.merged.clone(),
                    age: peer.last_fresh().map(|t| now.saturating_duration_since(t)),
                    health_age: peer.health_since.map(|t| now.saturating_duration_since(t)),
                    hold_down_left: self.hold_down_left(peer, health, now),
                }
            })
            .collect()
    }

    /// What is left of `peer`'s failback hold-down (see `peer_view`).
    fn hold_down_left(&self, peer: &Peer, health: Health, now: Instant) -> Option<Duration> {
        let hold = self.timers.failback_hold_down;
        if hold.is_zero() || health != Health::Alive {
            return None;
        }
        if peer.last_health == Health::Dead {
            return Some(hold);
        }
        let left = hold.checked_sub(now.saturating_duration_since(peer.alive_since?))?;
        (!left.is_zero()).then_some(left)
    }

    /// The routing view of peer `region` (not ourselves; see [`LiveView`]).
    fn peer_view(&self, region: &str, now: Instant) -> Option<RegionView> {
        let mut table = self.lock();
        self.notice_stall(&mut table, now);
        self.peer_view_in(&table, region, now, None)
    }

    /// [`Membership::peer_view`] under a lock already held. With `granted`
    /// (the region as the policy configures it) the tags are those the
    /// policy grants that the region also advertises, sharing the policy's
    /// set when it advertises all of them (the usual case: no allocation).
    fn peer_view_in(
        &self,
        table: &Table,
        region: &str,
        now: Instant,
        granted: Option<&crate::policy::Region>,
    ) -> Option<RegionView> {
        let peer = table.peers.get(region)?;
        let (health, _) = self.health_of(peer, now);
        let ad = peer.merged.as_ref();
        // Held down from the moment it is alive again after being dead (also
        // before the next tick records when), for `failback_hold_down`.
        let held_down = !self.timers.failback_hold_down.is_zero()
            && health == Health::Alive
            && (peer.last_health == Health::Dead
                || peer.alive_since.is_some_and(|t| {
                    now.saturating_duration_since(t) < self.timers.failback_hold_down
                }));
        Some(RegionView {
            health,
            draining: ad.is_some_and(|a| a.draining),
            full: ad.and_then(|a| a.capacity.as_ref()).is_some_and(is_full),
            load: ad.and_then(|a| a.capacity.as_ref()).map(load_of),
            held_down,
            tags: match granted {
                None => std::sync::Arc::new(
                    ad.map(|a| a.compliance_tags.iter().cloned().collect())
                        .unwrap_or_default(),
                ),
                Some(granted) => {
                    let advertised = |t: &String| ad.is_some_and(|a| a.compliance_tags.contains(t));
                    if granted.tags.iter().all(advertised) {
                        granted.shared_tags.clone()
                    } else {
                        std::sync::Arc::new(
                            granted
                                .tags
                                .iter()
                                .filter(|t| advertised(t))
                                .cloned()
                                .collect(),
                        )
                    }
                }
            },
        })
    }
}

/// The load balancing reads from an advertised capacity.
pub fn load_of(c: &Capacity) -> crate::policy::Load {
    crate::policy::Load {
        total_slots: c.total_slots,
        free_slots: c.free_slots.min(c.total_slots),
        queue_depth: c.queue_depth,
    }
}

/// A region is full when its queue is at its advertised limit.
pub fn is_full(c: &Capacity) -> bool {
    c.queue_limit > 0 && c.queue_depth >= c.queue_limit
}

/// The live federation as routing sees it: peers from [`Membership`], this
/// region from its own state. Tags are the *intersection* of what the region
/// advertises and what the policy grants it: a region can never gain a tag by
/// claiming it, and a policy tag it does not advertise is not trusted either.
#[derive(Debug)]
pub struct LiveView<'a> {
    /// The peer table.
    pub membership: &'a Membership,
    /// The policy in force.
    pub policy: &'a Policy,
    /// This controller's region.
    pub self_region: &'a str,
    /// This controller's own state.
    pub self_view: RegionView,
    /// When the view is taken.
    pub now: Instant,
}

impl FederationView for LiveView<'_> {
    fn region(&self, name: &str) -> Option<RegionView> {
        let granted = &self.policy.region(name)?.tags;
        if name == self.self_region {
            return Some(self.self_view.clone());
        }
        let mut view = self.membership.peer_view(name, self.now)?;
        view.tags = std::sync::Arc::new(
            view.tags
                .intersection(granted)
                .cloned()
                .collect::<BTreeSet<_>>(),
        );
        Some(view)
    }

    /// The same views as [`LiveView::region`], under one lock of the peer
    /// table, with the policy's regions found by position.
    fn visit_regions(
        &self,
        policy: &Policy,
        ids: &[usize],
        f: &mut dyn FnMut(Option<&RegionView>),
    ) {
        let mut table = self.membership.lock();
        self.membership.notice_stall(&mut table, self.now);
        let same = std::ptr::eq(policy, self.policy);
        for &id in ids {
            let Some(named) = policy.regions.get(id) else {
                f(None);
                continue;
            };
            // Tags are granted by the policy in force (`self.policy`).
            let granted = if same {
                Some(named)
            } else {
                self.policy.region(&named.name)
            };
            let Some(granted) = granted else {
                f(None);
                continue;
            };
            if named.name == self.self_region {
                f(Some(&self.self_view));
                continue;
            }
            let v = self
                .membership
                .peer_view_in(&table, &named.name, self.now, Some(granted));
            f(v.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::load_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-federation.yaml"
        )))
        .expect("seed policy loads")
    }

    fn ad(region: &str, epoch: u64, sequence: u64) -> RegionAdvertisement {
        RegionAdvertisement {
            region: region.into(),
            epoch,
            sequence,
            compliance_tags: vec!["GDPR".into(), "SOX".into(), "MADE_UP".into()],
            ..Default::default()
        }
    }

    #[test]
    fn phi_grows_with_silence() {
        let hist: VecDeque<f64> = std::iter::repeat_n(1.0, 20).collect();
        let low = phi(&hist, 0.5, 1.0);
        let mid = phi(&hist, 2.0, 1.0);
        let high = phi(&hist, 3.0, 1.0);
        assert!(low < 1.0, "{low}");
        assert!(mid > low && high > mid, "{low} {mid} {high}");
        assert!(high > 8.0, "{high}");
    }

    #[test]
    fn snapshot_formats_are_those_every_replica_reads() {
        use crate::replication::BodyFormat;
        let p = policy();
        let m = Membership::new("north_america", &p, Timers::default());
        assert!(m.snapshot_formats("europe").is_empty(), "never heard of");
        let replica = |name: &str, epoch: u64, formats: &[u32]| RegionAdvertisement {
            replica: name.into(),
            snapshot_formats: formats.to_vec(),
            ..ad("europe", epoch, 1)
        };
        assert!(m.observe(&replica("a", 1, &[1, 2]), Instant::now()));
        assert_eq!(m.snapshot_formats("europe"), vec![1, 2]);
        assert_eq!(
            BodyFormat::for_peer(&m.snapshot_formats("europe")),
            BodyFormat::Columnar
        );
        // A replica not yet upgraded (it advertises no formats): format 1
        // for the whole region, whichever replica a push reaches.
        assert!(m.observe(&replica("b", 2, &[]), Instant::now()));
        assert!(m.snapshot_formats("europe").is_empty());
        assert_eq!(
            BodyFormat::for_peer(&m.snapshot_formats("europe")),
            BodyFormat::Prost
        );
    }

    #[test]
    fn unattested_tags_are_dropped_here_but_passed_on_as_sent() {
        let p = policy();
        let m = Membership::new("north_america", &p, Timers::default());
        m.set_attestation(true);
        m.attest("europe", &BTreeSet::from(["SOX".to_string()]));
        assert!(m.observe(&ad("europe", 1, 1), Instant::now()));
        let ours = m.advertisement("europe").expect("held");
        assert_eq!(ours.compliance_tags, vec!["SOX".to_string()]);
        // Gossip carries the claims unchanged: each receiver applies its
        // own attestation (and logs what it drops).
        let gossip = m.known();
        let eu = gossip
            .iter()
            .find(|a| a.region == "europe")
            .expect("gossip");
        assert_eq!(eu.compliance_tags, ad("europe", 1, 1).compliance_tags);
    }

    #[test]
    fn a_certificate_seen_after_the_advertisement_restores_its_attested_tags() {
        let p = policy();
        let m = Membership::new("asia_pacific", &p, Timers::default());
        m.set_attestation(true);
        // europe's advertisement arrives by gossip before any handshake with
        // europe: nothing is attested yet, so every tag is dropped.
        assert!(m.observe(&ad("europe", 1, 1), Instant::now()));
        assert!(
            m.advertisement("europe")
                .expect("held")
                .compliance_tags
                .is_empty()
        );
        // The TLS verifier records the certificate through the shared
        // handle; the same advertisement gossiped again (not fresher) is cut
        // again with it.
        let gdpr_sox = BTreeSet::from(["GDPR".to_string(), "SOX".to_string()]);
        m.clone_handle().attest("europe", &gdpr_sox);
        assert!(!m.observe(&ad("europe", 1, 1), Instant::now()));
        assert_eq!(
            m.advertisement("europe").expect("held").compliance_tags,
            vec!["GDPR".to_string(), "SOX".to_string()]
        );
        // Through `Membership::attest` the stored copy is cut at once.
        m.attest("europe", &BTreeSet::from(["SOX".to_string()]));
        assert_eq!(
            m.advertisement("europe").expect("held").compliance_tags,
            vec!["SOX".to_string()]
        );
    }

    #[test]
    fn fresh_information_only_and_health_follows_silence() {
        let p = policy();
        let m = Membership::new("north_america", &p, Timers::default());
        let t0 = Instant::now();
        assert!(m.observe(&ad("europe", 1, 1), t0));
        assert!(!m.observe(&ad("europe", 1, 1), t0), "duplicate ignored");
        assert!(!m.observe(&ad("north_america", 1, 5), t0), "self ignored");
        assert!(!m.observe(&ad("mars", 1, 5), t0), "unknown region ignored");
        for s in 2..10 {
            assert!(m.observe(&ad("europe", 1, s), t0 + Duration::from_secs(s - 1)));
        }
        let last = t0 + Duration::from_secs(8);
        let v = m.peer_view("europe", last).expect("row");
        assert_eq!(v.health, Health::Alive);
        assert_eq!(
            m.peer_view("asia_pacific", last).expect("row").health,
            Health::Unknown
        );
        // This controller keeps running (ticking every heartbeat) while
        // europe is silent: europe is declared dead.
        let mut changes = Vec::new();
        for s in 1..=10 {
            changes.extend(m.tick(last + Duration::from_secs(s)));
        }
        let v = m
            .peer_view("europe", last + Duration::from_secs(10))
            .expect("row");
        assert_eq!(v.health, Health::Dead);
        assert!(
            changes
                .iter()
                .any(|(r, _, h)| r == "europe" && *h == Health::Dead)
        );
        assert_eq!(m.self_stalls().load(Ordering::Relaxed), 0);
    }

    /// The batch lookup `decide` uses gives exactly the by-name views:
    /// tags granted and advertised (the policy's set shared when all are),
    /// fewer when the region advertises fewer, none for a silent region,
    /// this region's own view for itself.
    #[test]
    fn live_view_by_position_matches_by_name() {
        let p = policy();
        let m = Membership::new("north_america", &p, Timers::default());
        let now = Instant::now();
        let mut europe = ad("europe", 1, 1);
        europe.compliance_tags = vec!["SOX".into(), "MADE_UP".into()];
        assert!(m.observe(&europe, now));
        let live = LiveView {
            membership: &m,
            policy: &p,
            self_region: "north_america",
            self_view: RegionView {
                health: Health::Alive,
                draining: true,
                full: false,
                held_down: false,
                tags: Arc::new(BTreeSet::from(["SELF".to_string()])),
                load: None,
            },
            now,
        };
        let ids: Vec<usize> = (0..p.regions.len()).collect();
        let mut batch = Vec::new();
        live.visit_regions(&p, &ids, &mut |v| batch.push(v.cloned()));
        let by_name: Vec<_> = p.regions.iter().map(|r| live.region(&r.name)).collect();
        assert_eq!(batch, by_name);
        let eu = p
            .regions
            .iter()
            .position(|r| r.name == "europe")
            .expect("europe");
        let granted = &p.regions[eu].tags;
        let seen = batch[eu].as_ref().expect("europe heard").tags.clone();
        assert!(
            seen.iter().all(|t| granted.contains(t) && t != "MADE_UP"),
            "{seen:?}"
        );
        // A region advertising every granted tag shares the policy's set.
        let mut all = ad("europe", 1, 2);
        all.compliance_tags = granted.iter().cloned().chain(["MADE_UP".into()]).collect();
        assert!(m.observe(&all, now));
        let mut again = Vec::new();
        live.visit_regions(&p, &[eu], &mut |v| again.push(v.cloned()));
        let tags = &again[0].as_ref().expect("europe").tags;
        assert!(Arc::ptr_eq(tags, &p.regions[eu].shared_tags));
        assert_eq!(again[0], live.region("europe"));
    }

    fn direct(m: &Membership, a: &RegionAdvertisement, now: Instant) {
        m.observe(a, now);
        m.heard_directly(&a.region, now);
    }

    #[test]
    fn a_peer_that_already_knows_everything_gets_no_relayed_copies() {
        // A healthy full mesh of three, each hearing the others directly
        // every heartbeat: every digest stays empty, and so do the relays.
        let p = policy();
        let names = ["north_america", "europe", "asia_pacific"];
        let ms: Vec<Membership> = names
            .iter()
            .map(|n| Membership::new(n, &p, Timers::default()))
            .collect();
        let t0 = Instant::now();
        for s in 1..=20u64 {
            let now = t0 + Duration::from_secs(s);
            for (i, m) in ms.iter().enumerate() {
                m.tick(now);
                for (j, from) in names.iter().enumerate() {
                    if i != j {
                        direct(m, &ad(from, 1, s), now + Duration::from_millis(10));
                    }
                }
            }
            let at = now + Duration::from_millis(20);
            for (i, m) in ms.iter().enumerate() {
                let digest = m.digest(at);
                assert!(digest.stale.is_empty(), "{}: {digest:?}", names[i]);
                for (j, other) in ms.iter().enumerate() {
                    if i != j {
                        other.note_digest(names[i], Some(&digest));
                        assert!(other.relays_to(names[i]).is_empty());
                        assert!(other.relays_for(names[i], Some(&digest)).is_empty());
                    }
                }
            }
        }
        // An older peer sends no digest: it gets everything held, as before.
        ms[0].note_digest("europe", None);
        assert_eq!(ms[0].relays_to("europe").len(), 2);
        assert_eq!(ms[0].relays_for("europe", None).len(), ms[0].known().len());
    }

    #[test]
    fn a_region_heard_only_through_gossip_is_listed_relayed_and_stays_alive() {
        // north_america – europe – asia_pacific in a line: the two ends
        // never talk, europe relays what each digest says is missing.
        let p = policy();
        let na = Membership::new("north_america", &p, Timers::default());
        let eu = Membership::new("europe", &p, Timers::default());
        let ap = Membership::new("asia_pacific", &p, Timers::default());
        let t0 = Instant::now();
        let mut relayed = 0;
        let mut changes = Vec::new();
        for s in 1..=40u64 {
            let now = t0 + Duration::from_secs(s);
            for m in [&na, &eu, &ap] {
                changes.extend(m.tick(now));
            }
            let at = now + Duration::from_millis(10);
            // Each end calls europe: its request carries its digest and
            // europe answers with what the digest lists as missing.
            for (end, name) in [(&na, "north_america"), (&ap, "asia_pacific")] {
                direct(&eu, &ad(name, 1, s), at);
                let digest = end.digest(at);
                assert!(
                    s == 1 || digest.stale.iter().all(|e| e.region != "europe"),
                    "europe is heard directly: {digest:?}"
                );
                eu.note_digest(name, Some(&digest));
                let relays = eu.relays_for(name, Some(&digest));
                assert!(relays.len() <= 1, "{relays:?}");
                direct(end, &ad("europe", 1, s), at);
                for r in &relays {
                    relayed += usize::from(end.observe(r, at));
                }
            }
            // europe calls each end: its relays follow the end's digest.
            for (end, name) in [(&na, "north_america"), (&ap, "asia_pacific")] {
                for r in eu.relays_to(name) {
                    relayed += usize::from(end.observe(&r, at + Duration::from_millis(5)));
                }
            }
            for (end, other) in [(&na, "asia_pacific"), (&ap, "north_america")] {
                let v = end.peer_view(other, at).expect("row");
                if s > 2 {
                    assert_eq!(v.health, Health::Alive, "{other} at {s}: {v:?}");
                }
            }
        }
        assert!(
            relayed >= 78,
            "fresh relayed copies (either way of the exchange): each end learns the other's new advertisement every heartbeat: {relayed}"
        );
        assert!(
            changes.iter().all(|(_, _, h)| *h == Health::Alive),
            "nobody suspected: {changes:?}"
        );
        // europe itself never needs anything relayed.
        assert!(eu.digest(t0 + Duration::from_secs(40)).stale.is_empty());
    }

    /// A controller on an injected clock: ticks every heartbeat (1 s, the
    /// default timers) and hears each advertising peer just after each tick.
    struct Sim {
        m: Membership,
        now: Instant,
        sequence: u64,
        epochs: BTreeMap<String, u64>,
        changes: Vec<(String, Health, Health)>,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                m: Membership::new("north_america", &policy(), Timers::default()),
                now: Instant::now(),
                sequence: 0,
                epochs: BTreeMap::new(),
                changes: Vec::new(),
            }
        }

        fn hear(&mut self, region: &str) {
            self.sequence += 1;
            let epoch = self.epochs.get(region).copied().unwrap_or(1);
            self.m.observe(&ad(region, epoch, self.sequence), self.now);
        }

        /// Runs normally for `secs` heartbeats, hearing from `advertising`.
        fn run(&mut self, secs: u64, advertising: &[&str]) {
            for _ in 0..secs {
                self.now += Duration::from_secs(1);
                let changes = self.m.tick(self.now);
                self.changes.extend(changes);
                self.now += Duration::from_millis(10);
                for r in advertising {
                    self.hear(r);
                }
            }
        }

        /// This process does not run for `secs` (SIGSTOP, frozen VM): no
        /// tick, no advertisement read.
        fn stall(&mut self, secs: u64) {
            self.now += Duration::from_secs(secs);
        }

        fn view(&self, region: &str) -> RegionView {
            self.m.peer_view(region, self.now).expect("row")
        }

        fn went(&self, region: &str, to: Health) -> bool {
            self.changes.iter().any(|(r, _, h)| r == region && *h == to)
        }

        fn stalls(&self) -> u64 {
            self.m.self_stalls().load(Ordering::Relaxed)
        }
    }

    const BOTH: &[&str] = &["europe", "asia_pacific"];

    /// How the controller first runs again after its stall: the advertiser's
    /// tick, an incoming advertisement, a submit's routing view, a status
    /// read. Whichever comes first, the outcome is the same.
    #[derive(Debug, Clone, Copy)]
    enum Wake {
        Tick,
        Advertisement,
        Route,
        Status,
    }

    #[test]
    fn own_stall_is_not_the_peers_failure_whichever_path_notices_it() {
        for wake in [Wake::Tick, Wake::Advertisement, Wake::Route, Wake::Status] {
            let mut sim = Sim::new();
            sim.run(10, BOTH);
            assert_eq!(sim.view("europe").health, Health::Alive, "{wake:?}");
            sim.stall(5);
            match wake {
                Wake::Tick => sim.changes.extend(sim.m.tick(sim.now)),
                Wake::Advertisement => sim.hear("asia_pacific"),
                Wake::Route => {
                    let v = sim.view("europe");
                    assert_eq!(v.health, Health::Alive, "{wake:?}: {v:?}");
                    assert!(!v.held_down, "{wake:?}: {v:?}");
                }
                Wake::Status => {
                    let rows = sim.m.status(sim.now);
                    let eu = rows.iter().find(|r| r.region == "europe").expect("row");
                    assert_eq!(eu.health, Health::Alive, "{wake:?}: {:?}", eu.phi);
                }
            }
            // europe's advertisements of the stall were never read, and the
            // advertiser's late tick (if it comes second) must not count
            // them either.
            sim.changes.extend(sim.m.tick(sim.now));
            let v = sim.view("europe");
            assert_eq!(v.health, Health::Alive, "{wake:?}: {v:?}");
            assert!(!v.held_down, "{wake:?}: {v:?}");
            assert_eq!(sim.stalls(), 1, "{wake:?}: one stall, counted once");
            // The next advertisements are heard; for the whole hold-down
            // time and beyond, europe is never suspected nor held down.
            for _ in 0..40 {
                sim.run(1, BOTH);
                let v = sim.view("europe");
                assert!(v.health == Health::Alive && !v.held_down, "{wake:?}: {v:?}");
            }
            for r in BOTH {
                assert!(
                    !sim.went(r, Health::Dead) && !sim.went(r, Health::Suspect),
                    "{wake:?}: {:?}",
                    sim.changes
                );
            }
            assert_eq!(sim.stalls(), 1, "{wake:?}");
        }
    }

    #[test]
    fn an_outage_while_running_normally_is_still_held_down() {
        let mut sim = Sim::new();
        sim.run(10, BOTH);
        // europe is silent while this controller runs normally.
        sim.run(5, &["asia_pacific"]);
        assert!(sim.went("europe", Health::Dead), "{:?}", sim.changes);
        assert_eq!(sim.stalls(), 0);
        sim.run(1, BOTH);
        assert!(sim.view("europe").held_down);
        sim.run(28, BOTH);
        assert!(sim.view("europe").held_down, "within failback_hold_down");
        sim.run(3, BOTH);
        assert!(!sim.view("europe").held_down, "hold-down over");
    }

    #[test]
    fn a_peer_back_with_a_new_epoch_is_held_down_even_if_never_declared_dead() {
        let mut sim = Sim::new();
        sim.run(10, BOTH);
        // europe restarts faster than the failure detector notices.
        sim.epochs.insert("europe".into(), 2);
        sim.run(1, BOTH);
        assert!(!sim.went("europe", Health::Dead), "{:?}", sim.changes);
        let v = sim.view("europe");
        assert!(v.health == Health::Alive && v.held_down, "{v:?}");
        sim.run(31, BOTH);
        assert!(!sim.view("europe").held_down, "hold-down over");
    }

    #[test]
    fn a_peer_that_died_during_our_stall_is_still_declared_dead() {
        let mut sim = Sim::new();
        sim.run(10, BOTH);
        // europe dies; we stall; after waking only asia_pacific advertises.
        sim.stall(5);
        sim.run(5, &["asia_pacific"]);
        assert_eq!(sim.stalls(), 1);
        assert!(sim.went("europe", Health::Dead), "{:?}", sim.changes);
        assert!(!sim.went("asia_pacific", Health::Dead), "{:?}", sim.changes);
        // It was unavailable while we ran: its return is held down.
        sim.run(1, BOTH);
        assert!(sim.view("europe").held_down);
    }

    #[test]
    fn a_controller_that_keeps_stalling_still_declares_a_silent_peer_dead() {
        let mut sim = Sim::new();
        sim.run(10, BOTH);
        // Every tick three heartbeats late, europe silent: each gap is a
        // stall, but each still counts one heartbeat of europe's silence.
        for _ in 0..10 {
            sim.stall(2);
            sim.run(1, &["asia_pacific"]);
        }
        assert!(sim.stalls() >= 10);
        assert!(sim.went("europe", Health::Dead), "{:?}", sim.changes);
        assert!(!sim.went("asia_pacific", Health::Dead), "{:?}", sim.changes);
    }

    #[test]
    fn status_rows_say_since_when_and_the_hold_down_left() {
        let p = policy();
        let timers = Timers::default();
        let hold = timers.failback_hold_down;
        let m = Membership::new("north_america", &p, timers);
        let t0 = Instant::now();
        let row = |at: Instant| {
            m.status(at)
                .into_iter()
                .find(|r| r.region == "europe")
                .expect("europe row")
        };
        for s in 0..5 {
            m.observe(&ad("europe", 1, s + 1), t0 + Duration::from_secs(s));
        }
        let alive_at = t0 + Duration::from_secs(4);
        m.tick(alive_at);
        let r = row(alive_at + Duration::from_millis(500));
        assert_eq!(r.health, Health::Alive);
        assert_eq!(r.health_age, Some(Duration::from_millis(500)));
        assert_eq!(r.hold_down_left, None, "first contact is not a return");
        // Time passes in heartbeats (a jump without ticks would be our own
        // stall); europe advertises while `seq` is given.
        let beat = Duration::from_secs(1);
        let advance = |from: Instant, to: Instant, mut seq: Option<(u64, &mut u64)>| {
            let mut at = from;
            while at < to {
                at = (at + beat).min(to);
                if let Some((epoch, n)) = seq.as_mut() {
                    **n += 1;
                    m.observe(&ad("europe", *epoch, **n), at);
                }
                m.tick(at);
            }
        };
        // Silent: dead; then back: held down for failback_hold_down.
        let dead_at = alive_at + Duration::from_secs(20);
        advance(alive_at, dead_at, None);
        assert_eq!(row(dead_at).health, Health::Dead);
        let since_dead = row(dead_at + Duration::from_secs(1)).health_age;
        assert!(
            since_dead.is_some_and(|a| a >= Duration::from_secs(1) && a < Duration::from_secs(20)),
            "{since_dead:?}"
        );
        let back = dead_at + Duration::from_secs(5);
        advance(dead_at, back - beat, None);
        let mut n = 1;
        m.observe(&ad("europe", 2, n), back);
        assert_eq!(row(back).hold_down_left, Some(hold), "before the next tick");
        m.tick(back);
        let later = back + Duration::from_secs(10);
        advance(back, later, Some((2, &mut n)));
        assert_eq!(
            row(later).hold_down_left,
            Some(hold - Duration::from_secs(10))
        );
        let over = back + hold;
        advance(later, over, Some((2, &mut n)));
        assert_eq!(row(over).hold_down_left, None);
    }

    #[test]
    fn live_view_trusts_only_granted_tags() {
        let p = policy();
        let m = Membership::new("north_america", &p, Timers::default());
        let now = Instant::now();
        m.observe(&ad("europe", 1, 1), now);
        m.observe(&ad("asia_pacific", 1, 1), now);
        let view = LiveView {
            membership: &m,
            policy: &p,
            self_region: "north_america",
            self_view: RegionView {
                health: Health::Alive,
                draining: false,
                full: false,
                held_down: false,
                tags: Default::default(),
                load: None,
            },
            now,
        };
        let eu = view.region("europe").expect("europe");
        assert_eq!(
            *eu.tags,
            ["GDPR", "SOX"]
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>()
        );
        // asia_pacific claims GDPR but the policy grants it only PDPA, which it
        // did not advertise: it is trusted with nothing.
        assert!(view.region("asia_pacific").expect("ap").tags.is_empty());
        assert!(view.region("mars").is_none());
    }

    /// Replica `replica` of `region` at (epoch, sequence), with `slots`.
    fn replica_ad(
        region: &str,
        replica: &str,
        epoch: u64,
        sequence: u64,
        slots: u32,
    ) -> RegionAdvertisement {
        RegionAdvertisement {
            replica: replica.into(),
            endpoint: format!("http://{replica}:1"),
            capacity: Some(Capacity {
                total_slots: slots,
                free_slots: slots,
                queue_depth: 3,
                queue_limit: 100,
            }),
            ..ad(region, epoch, sequence)
        }
    }

    /// Runs `m` for `secs` heartbeats from `*now`, hearing each of
    /// `replicas` of europe (name, epoch) just after each tick; returns the
    /// health transitions.
    fn run_replicas(
        m: &Membership,
        now: &mut Instant,
        seq: &mut u64,
        secs: u64,
        replicas: &[(&str, u64)],
    ) -> Vec<(String, Health, Health)> {
        let mut changes = Vec::new();
        for _ in 0..secs {
            *now += Duration::from_secs(1);
            changes.extend(m.tick(*now));
            *now += Duration::from_millis(10);
            *seq += 1;
            for (name, epoch) in replicas {
                m.observe(&replica_ad("europe", name, *epoch, *seq, 2), *now);
            }
        }
        changes
    }

    #[test]
    fn one_draining_replica_leaves_its_region_serving_and_says_it_drains() {
        let m = Membership::new("north_america", &policy(), Timers::default());
        let (mut now, mut seq) = (Instant::now(), 0);
        run_replicas(&m, &mut now, &mut seq, 5, &[("eu-1", 10), ("eu-2", 20)]);
        seq += 1;
        m.observe(
            &RegionAdvertisement {
                draining: true,
                ..replica_ad("europe", "eu-1", 10, seq, 2)
            },
            now,
        );
        // The region serves while one replica does; the draining one says
        // so (peers try it after its sibling).
        assert!(!m.peer_view("europe", now).expect("row").draining);
        let draining: Vec<(String, bool)> = m
            .replicas("europe", now)
            .into_iter()
            .map(|r| (r.replica, r.draining))
            .collect();
        assert!(draining.contains(&("eu-1".into(), true)), "{draining:?}");
        assert!(draining.contains(&("eu-2".into(), false)), "{draining:?}");
        // Both drain: the region does.
        seq += 1;
        m.observe(
            &RegionAdvertisement {
                draining: true,
                ..replica_ad("europe", "eu-2", 20, seq, 2)
            },
            now,
        );
        assert!(m.peer_view("europe", now).expect("row").draining);
    }

    /// Seen in `tests/ha.rs` on a loaded machine: the serving sibling
    /// stalled, its advertisements stopped, and the peer took the region
    /// for drained and failed EU work over to its backup region. A
    /// draining replica that says its siblings serve keeps it serving.
    #[test]
    fn a_draining_replica_whose_siblings_serve_keeps_its_region_serving_while_they_are_unheard() {
        for siblings_serve in [true, false] {
            let m = Membership::new("north_america", &policy(), Timers::default());
            let (mut now, mut seq) = (Instant::now(), 0);
            run_replicas(&m, &mut now, &mut seq, 5, &[("eu-1", 10), ("eu-2", 20)]);
            // Only the draining replica is heard from now on.
            for _ in 0..30 {
                now += Duration::from_secs(1);
                m.tick(now);
                seq += 1;
                m.observe(
                    &RegionAdvertisement {
                        draining: true,
                        siblings_serve,
                        ..replica_ad("europe", "eu-1", 10, seq, 2)
                    },
                    now,
                );
            }
            let live: Vec<String> = m
                .replicas("europe", now)
                .into_iter()
                .filter(|r| r.health != Health::Dead)
                .map(|r| r.replica)
                .collect();
            assert_eq!(live, ["eu-1"], "the silent sibling is dead by now");
            assert_eq!(
                m.peer_view("europe", now).expect("row").draining,
                !siblings_serve,
                "siblings_serve={siblings_serve}"
            );
        }
    }

    #[test]
    fn a_region_is_alive_while_any_replica_advertises_and_dead_when_all_are_silent() {
        let m = Membership::new("north_america", &policy(), Timers::default());
        let (mut now, mut seq) = (Instant::now(), 0);
        let all = [("eu-1", 10), ("eu-2", 20), ("eu-3", 5)];
        run_replicas(&m, &mut now, &mut seq, 10, &all);
        let v = m.peer_view("europe", now).expect("row");
        assert_eq!(v.health, Health::Alive);
        // Capacity: every live replica's slots (agents connect to one
        // replica each); the queue is the region's one queue.
        let load = v.load.expect("load");
        assert_eq!(
            (load.total_slots, load.free_slots, load.queue_depth),
            (6, 6, 3)
        );
        assert_eq!(m.replicas("europe", now).len(), 3);
        // Two replicas die, one after the other: the region stays alive,
        // never suspect, never held down; its capacity is the survivor's.
        let changes = run_replicas(&m, &mut now, &mut seq, 20, &[("eu-2", 20)]);
        assert!(changes.iter().all(|(r, ..)| r != "europe"), "{changes:?}");
        let v = m.peer_view("europe", now).expect("row");
        assert!(v.health == Health::Alive && !v.held_down, "{v:?}");
        assert_eq!(v.load.expect("load").total_slots, 2);
        let dead: Vec<_> = m
            .replicas("europe", now)
            .into_iter()
            .filter(|r| r.health == Health::Dead)
            .map(|r| r.replica)
            .collect();
        assert_eq!(dead, ["eu-1", "eu-3"]);
        // The freshest live replica's endpoint is listed first.
        assert_eq!(m.replicas("europe", now)[0].endpoint, "http://eu-2:1");
        // The last one goes silent: now the region dies.
        let changes = run_replicas(&m, &mut now, &mut seq, 20, &[]);
        assert!(
            changes
                .iter()
                .any(|(r, _, h)| r == "europe" && *h == Health::Dead),
            "{changes:?}"
        );
        // A replica back after the region was dead: held down.
        run_replicas(&m, &mut now, &mut seq, 1, &[("eu-1", 11)]);
        let v = m.peer_view("europe", now).expect("row");
        assert!(v.health == Health::Alive && v.held_down, "{v:?}");
        // Replicas silent for long are forgotten (names come and go), so
        // digests do not grow with them; the one serving stays.
        let long = m.forget_replica_after().as_secs() + 2;
        run_replicas(&m, &mut now, &mut seq, long, &[("eu-1", 11)]);
        let names: Vec<_> = m
            .replicas("europe", now)
            .into_iter()
            .map(|r| r.replica)
            .collect();
        assert_eq!(names, ["eu-1"]);
        // The last one silent for long too: kept, the region dead.
        run_replicas(&m, &mut now, &mut seq, long, &[]);
        assert_eq!(m.replicas("europe", now).len(), 1);
        assert_eq!(
            m.peer_view("europe", now).expect("row").health,
            Health::Dead
        );
    }

    #[test]
    fn a_replica_restart_is_not_a_region_restart_unless_it_was_the_only_one_alive() {
        let m = Membership::new("north_america", &policy(), Timers::default());
        let (mut now, mut seq) = (Instant::now(), 0);
        run_replicas(&m, &mut now, &mut seq, 10, &[("eu-1", 10), ("eu-2", 20)]);
        // eu-1 restarts (new epoch) while eu-2 serves: no hold-down.
        run_replicas(&m, &mut now, &mut seq, 2, &[("eu-1", 11), ("eu-2", 20)]);
        let v = m.peer_view("europe", now).expect("row");
        assert!(v.health == Health::Alive && !v.held_down, "{v:?}");
        // eu-2 alone, then it restarts: the region was down meanwhile.
        run_replicas(&m, &mut now, &mut seq, 20, &[("eu-2", 20)]);
        run_replicas(&m, &mut now, &mut seq, 1, &[("eu-2", 21)]);
        let v = m.peer_view("europe", now).expect("row");
        assert!(v.health == Health::Alive && v.held_down, "{v:?}");
    }

    #[test]
    fn gossip_digests_and_relays_are_per_replica_and_an_old_entry_covers_the_region() {
        let m = Membership::new("north_america", &policy(), Timers::default());
        let now = Instant::now();
        for (name, epoch) in [("eu-1", 10), ("eu-2", 20)] {
            m.observe(&replica_ad("europe", name, epoch, 5, 1), now);
        }
        m.heard_directly_from("europe", "eu-1", now);
        // Only eu-2 was not heard directly: listed by its own name.
        let digest = m.digest(now);
        let eu: Vec<_> = digest
            .stale
            .iter()
            .filter(|e| e.region == "europe")
            .map(|e| (e.replica.as_str(), e.epoch, e.sequence))
            .collect();
        assert_eq!(eu, [("eu-2", 20, 5)]);
        // A peer lacking eu-1 gets eu-1 only; an older peer's entry (no
        // replica) gets every replica fresher than it; known() has both.
        let lacks = |replica: &str| GossipDigest {
            stale: vec![DigestEntry {
                region: "europe".into(),
                replica: replica.into(),
                ..Default::default()
            }],
        };
        let got = |d: GossipDigest| {
            let mut r: Vec<String> = m
                .relays_for("asia_pacific", Some(&d))
                .into_iter()
                .map(|a| a.replica)
                .collect();
            r.sort();
            r
        };
        assert_eq!(got(lacks("eu-1")), ["eu-1"]);
        assert_eq!(got(lacks("")), ["eu-1", "eu-2"]);
        assert_eq!(m.known().len(), 2);
        // An older controller (no replica) is one replica named "".
        let m = Membership::new("north_america", &policy(), Timers::default());
        assert!(m.observe(&ad("europe", 1, 1), now));
        assert!(!m.observe(&ad("europe", 1, 1), now));
        assert_eq!(m.replicas("europe", now).len(), 1);
        assert_eq!(m.replicas("europe", now)[0].replica, "");
    }
}
