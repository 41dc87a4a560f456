//! Wiring: builds one region's controller (store, decision log, membership,
//! agent registry, policy) into a [`Node`], runs the background loops
//! (advertiser, lease reaper) and serves the four gRPC services on an
//! already-bound listener until the shutdown future resolves.
//!
//! Entry point: [`run`]. Binaries bind addresses and install signal handlers;
//! tests bind `127.0.0.1:0` and pass the listener in.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use federation_api as api;
use tokio::net::TcpListener;

use crate::agents::AgentRegistry;
use crate::audit::DecisionLog;
use crate::config::{Limits, Timers};
use crate::membership::{LiveView, Membership};
use crate::policy::{Health, Policy, RegionView};
use crate::tasks::TaskStore;
use crate::transport::{self, Channels};

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to start a controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The region this controller serves.
    pub region: String,
    /// The validated policy.
    pub policy: Policy,
    /// Where the store and the decision log live.
    pub data_dir: PathBuf,
    /// Peer endpoint overrides by region.
    pub peers: BTreeMap<String, String>,
    /// The endpoint peers should use to reach us (advertised).
    pub advertise_endpoint: String,
    /// Timers.
    pub timers: Timers,
    /// Input limits.
    pub limits: Limits,
    /// The federation file, re-read by a reload without content.
    pub config_path: PathBuf,
    /// The snapshot key ring; without one, replication is off.
    pub keys: Option<crate::replication::KeyRing>,
    /// Mutual TLS; `None` only with `--insecure` (plaintext).
    pub tls: Option<TlsSettings>,
    /// Bearer tokens (file `node.tls.tokens_file`).
    pub tokens: crate::auth::Tokens,
    /// Where the task store and the decision log live (`node.store`): the
    /// data directory's files, or the region's PostgreSQL database.
    pub store: crate::config::StoreSpec,
    /// This controller's name within its region (`node.replica`).
    pub replica: String,
}

/// TLS of one controller (from `node.tls`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// CA, certificate and key files.
    pub files: federation_tls::TlsFiles,
    /// The federation's trust domain ([`federation_tls::identity::slug`] of its name).
    pub federation: String,
    /// Keep only advertised tags the peer's certificate attests.
    pub attest_tags: bool,
}

/// Loaded TLS material of a running controller.
#[derive(Debug)]
pub struct NodeTls {
    /// Serving side.
    pub server: federation_tls::ServerTls,
    /// Calling peers.
    pub client: federation_tls::ClientTls,
}

/// One region's controller state, shared by every handler and loop.
#[derive(Debug)]
pub struct Node {
    /// This controller's region.
    pub region: String,
    /// Chosen anew at each start, strictly increasing across restarts.
    pub epoch: u64,
    policy: RwLock<Arc<Policy>>,
    /// The peer table.
    pub membership: Membership,
    /// Durable tasks.
    pub store: TaskStore,
    /// The hash-chained decision log.
    pub log: DecisionLog,
    /// The key of the digests records keep instead of values they may not
    /// hold (`audit::key`); `None` without a key ring.
    pub audit_key: Option<crate::audit::key::AuditKey>,
    /// Heads of peers' decision logs heard from the peers themselves.
    pub witnesses: crate::audit::anchor::Witnesses,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Registered agents.
    pub agents: AgentRegistry,
    /// Channels to peers.
    pub channels: Channels,
    /// Timers.
    pub timers: Timers,
    /// Limits.
    pub limits: Limits,
    /// The federation file.
    pub config_path: PathBuf,
    /// Snapshot replication, takeover and its counters.
    pub replication: crate::replication::Replication,
    /// The `grpc.health.v1` statuses (NOT_SERVING until ready, see
    /// `readiness_loop`), served on the main port and the optional
    /// plaintext health port.
    pub health: tonic_health::server::HealthReporter,
    /// TLS material (`None` in plaintext `--insecure` mode).
    pub tls: Option<NodeTls>,
    /// Who may call what.
    pub auth: Arc<crate::auth::Auth>,
    /// This controller's name within its region (`node.replica`).
    pub replica: String,
    /// The fencing token while this controller leads its region (the
    /// database backend elects one; the embedded store's controller always
    /// leads), -1 while another replica does.
    leader: std::sync::atomic::AtomicI64,
    sequence: AtomicU64,
    draining: AtomicBool,
    peers: BTreeMap<String, String>,
    discovered: RwLock<BTreeMap<String, String>>,
    advertise_endpoint: String,
}

/// How long a replica's name stays claimed without a refresh (it is
/// refreshed every heartbeat).
fn replica_stale(timers: &Timers) -> Duration {
    timers.dead_after.max(timers.heartbeat_interval * 3)
}

impl Node {
    /// The fencing token while this controller leads its region.
    pub fn leader_token(&self) -> Option<i64> {
        let t = self.leader.load(Ordering::SeqCst);
        (t >= 0).then_some(t)
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the policy (already validated).
    pub fn set_policy(&self, policy: Policy) {
        self.membership.sync_regions(&policy);
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }

    /// True while draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts or stops draining.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::SeqCst);
    }

    /// The capacity this region advertises.
    pub fn capacity(&self) -> api::Capacity {
        let (total, free) = self.agents.capacity();
        let counts = self.store.counts();
        api::Capacity {
            total_slots: total,
            free_slots: free,
            queue_depth: counts.queued,
            queue_limit: self.limits.max_queue_depth,
        }
    }

    /// How this region sees itself for routing.
    pub fn self_view(&self, policy: &Policy) -> RegionView {
        let capacity = self.capacity();
        RegionView {
            health: Health::Alive,
            draining: self.draining(),
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

    /// A fresh advertisement with the next sequence number: what the
    /// advertiser sends each heartbeat.
    pub fn next_advertisement(&self) -> api::RegionAdvertisement {
        self.advertisement_with(self.sequence.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Our advertisement under the sequence number last sent: what answers to
    /// peers and the status carry (they are no new information).
    pub fn current_advertisement(&self) -> api::RegionAdvertisement {
        self.advertisement_with(self.sequence.load(Ordering::SeqCst))
    }

    fn advertisement_with(&self, sequence: u64) -> api::RegionAdvertisement {
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
            sent_unix_ms: now_ms(),
            takeovers: self.replication.takeover.notices(),
            log_head: Some({
                let (seq, hash) = self.log.last();
                api::LogHead { seq, hash }
            }),
        }
    }

    /// The endpoint used to reach `region`: the node's static override, else
    /// what DNS SRV discovery found, else what the region advertises, else the
    /// federation file's endpoint.
    pub fn endpoint_of(&self, region: &str) -> Option<String> {
        if let Some(e) = self.peers.get(region) {
            return Some(e.clone());
        }
        if let Some(e) = self
            .discovered
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(region)
        {
            return Some(e.clone());
        }
        if let Some(ad) = self.membership.advertisement(region) {
            if !ad.endpoint.is_empty() {
                return Some(ad.endpoint);
            }
        }
        self.policy().region(region).map(|r| r.endpoint.clone())
    }

    /// A peer client for `region`.
    pub fn peer(
        &self,
        region: &str,
    ) -> Result<
        api::federation_peer_client::FederationPeerClient<tonic::transport::Channel>,
        crate::error::Error,
    > {
        let endpoint = self
            .endpoint_of(region)
            .ok_or_else(|| crate::error::Error::Peer {
                region: region.to_string(),
                why: "no endpoint known".into(),
            })?;
        let channel = match &self.tls {
            None => self.channels.get(&endpoint),
            Some(tls) => {
                let membership = self.membership.clone_handle();
                let on_verified: federation_tls::OnVerified =
                    Arc::new(move |id: &federation_tls::Identity| {
                        if let Some(r) = &id.region {
                            membership.attest(r, &id.tags);
                        }
                    });
                self.channels
                    .get_tls(&endpoint, region, &tls.client, on_verified)
            }
        }
        .map_err(|e| crate::error::Error::Peer {
            region: region.to_string(),
            why: e.to_string(),
        })?;
        Ok(
            api::federation_peer_client::FederationPeerClient::new(channel)
                .max_decoding_message_size(self.limits.max_message_bytes)
                .max_encoding_message_size(self.limits.max_message_bytes),
        )
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
}

/// Milliseconds since the Unix epoch (one definition, in `tasks`).
pub use crate::tasks::now_unix_ms as now_ms;

/// A new epoch, strictly greater than any earlier one in `data_dir`: the
/// wall clock in milliseconds, or the last epoch plus one if the clock went
/// back. Persisted before use.
fn next_epoch(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join("epoch");
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{}: not an epoch number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let epoch = (now_ms().max(0) as u64).max(last + 1);
    crate::atomic_file::write(&path, epoch.to_string().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(epoch)
}

/// Opens the node's state.
pub async fn open(settings: Settings) -> anyhow::Result<Arc<Node>> {
    crate::private_files::prepare_data_dir(&settings.data_dir)
        .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
    if settings.policy.region(&settings.region).is_none() {
        anyhow::bail!(
            "region `{}` is not in the federation file (regions: {})",
            settings.region,
            settings
                .policy
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let epoch = next_epoch(&settings.data_dir)?;
    let (store, log) = open_store(&settings)?;
    let store_is_postgres = store.is_postgres();
    if let TaskStore::Postgres(s) = &store {
        // Two running controllers of a region may not share a name.
        s.claim_replica(&settings.replica, replica_stale(&settings.timers))
            .await
            .map_err(anyhow::Error::new)?;
    }
    // Registrations and leases survive a restart: the agents this store
    // knows keep their ids, and the time we were down does not count
    // against their leases.
    let agents = AgentRegistry::load(
        store
            .agents()
            .with_context(|| format!("reading agents from {}", store.path().display()))?,
        Instant::now(),
    );
    let extended = store
        .extend_leases(settings.timers.lease_ttl)
        .await
        .with_context(|| format!("extending leases in {}", store.path().display()))?;
    if !agents.is_empty() || extended > 0 {
        tracing::info!(
            agents = agents.len(),
            leases_extended = extended,
            "agents and leases restored"
        );
    }
    let witnesses = crate::audit::anchor::Witnesses::open(&settings.data_dir);
    let audit_key = settings
        .keys
        .as_ref()
        .and_then(crate::audit::key::AuditKey::of_ring);
    match &audit_key {
        Some(k) => tracing::info!(key = %k.id(), "audit digests keyed"),
        None => tracing::warn!(
            "no key ring: records outside a task's region keep attribute names without digests"
        ),
    }
    let membership = Membership::new(&settings.region, &settings.policy, settings.timers.clone());
    let replication = crate::replication::Replication::open(
        &settings.region,
        &settings.data_dir,
        &settings.policy,
        settings.keys.clone(),
        &store,
        settings.timers.startup_fence,
        crate::replication::envelope::Limits {
            max_chunk_bytes: settings.limits.max_snapshot_chunk_bytes,
            max_chunks: u32::try_from(settings.limits.max_snapshot_chunks).unwrap_or(u32::MAX),
            ..Default::default()
        },
    );
    let tls = match &settings.tls {
        None => {
            tracing::warn!(region = %settings.region, "tls is off (--insecure): peers, agents and clients are not authenticated");
            None
        }
        Some(t) => {
            let server = federation_tls::ServerTls::load(&t.files, &t.federation)
                .context("loading node.tls")?;
            let own = server.identity.region.clone().unwrap_or_default();
            if server.identity.role != federation_tls::Role::Peer || own != settings.region {
                anyhow::bail!(
                    "{}: certificate names {} but this controller serves region `{}`",
                    t.files.cert.display(),
                    server.identity,
                    settings.region
                );
            }
            let client = federation_tls::ClientTls::from_files(&t.files, &t.federation)
                .context("loading node.tls")?;
            membership.set_attestation(t.attest_tags);
            tracing::info!(region = %settings.region, attest_tags = t.attest_tags, tags = %crate::logfields::list(&server.identity.tags), "mutual tls on");
            Some(NodeTls { server, client })
        }
    };
    let health = tonic_health::server::HealthReporter::new();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let auth = Arc::new(crate::auth::Auth {
        region: settings.region.clone(),
        tokens: settings.tokens.clone(),
        insecure: tls.is_none(),
    });
    let metrics = crate::metrics::Metrics::new();
    metrics.register_replication(replication.shared_stats());
    let not_after = settings
        .tls
        .as_ref()
        .and_then(|t| federation_tls::not_after_of_file(&t.files.cert).ok());
    metrics.register_components(
        &settings.region,
        store.commit_seconds(),
        log.append_seconds(),
        not_after,
    );
    metrics.register_self_stalls(membership.self_stalls());
    Ok(Arc::new(Node {
        region: settings.region,
        epoch,
        policy: RwLock::new(Arc::new(settings.policy)),
        membership,
        store,
        log,
        audit_key,
        witnesses,
        metrics,
        agents,
        channels: Channels::new(settings.timers.forward_timeout),
        timers: settings.timers,
        limits: settings.limits,
        config_path: settings.config_path,
        replication,
        health,
        tls,
        auth,
        replica: settings.replica,
        leader: std::sync::atomic::AtomicI64::new(if store_is_postgres { -1 } else { 0 }),
        sequence: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        peers: settings.peers,
        discovered: RwLock::new(BTreeMap::new()),
        advertise_endpoint: settings.advertise_endpoint,
    }))
}

/// Runs a controller on `listener` until `shutdown` resolves, then stops
/// accepting, finishes in-flight calls (up to the shutdown grace), flushes the
/// store and the log, and returns.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = open(settings).await?;
    serve(node, listener, shutdown).await
}

/// Serves an opened node (see [`run`]).
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(region = %node.region, epoch = node.epoch, addr = %crate::logfields::list(addr), "controller serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let advertiser = tokio::spawn(advertise_loop(node.clone(), stop_rx.clone()));
    let reaper = tokio::spawn(reap_loop(node.clone(), stop_rx.clone()));
    if node.store.is_postgres() {
        tokio::spawn(leader_loop(node.clone(), stop_rx.clone()));
    }
    let replicator = tokio::spawn(crate::replication::run(node.clone(), stop_rx.clone()));

    let grace = node.timers.shutdown_grace;
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_for_server = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_for_server.send(true);
        let _ = signal_tx.send(());
    });

    let health = node.health.clone();
    let health_service = health_server(&node);
    let readiness = tokio::spawn(readiness_loop(
        node.clone(),
        health.clone(),
        stop_rx.clone(),
    ));

    let stop_signal = async move {
        let _ = signal_rx.await;
    };
    let router = crate::service::router(node.clone(), health_service);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match &node.tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls.server.incoming(listener, HANDSHAKE_TIMEOUT),
            stop_signal,
        )),
        None => Box::pin(
            router.serve_with_incoming_shutdown(transport::incoming(listener), stop_signal),
        ),
    };
    let mut stop_watch = stop_rx.clone();
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = async {
            // Once shutdown starts, in-flight calls get `grace` to finish.
            let _ = stop_watch.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace = %humantime::format_duration(grace), "in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = readiness.await;
    let _ = advertiser.await;
    let _ = reaper.await;
    let _ = replicator.await;
    node.store.flush().await.context("flushing task store")?;
    node.log.flush().await.context("flushing decision log")?;
    let mut recorded = None;
    persist_anchors(&node, &mut recorded).await;
    tracing::info!(region = %node.region, "controller stopped");
    served.context("gRPC server failed")
}

/// The `grpc.health.v1` service over this node's statuses.
pub fn health_server(
    node: &Node,
) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
    tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(node.health.clone()),
    )
}

/// Serves only `grpc.health.v1`, in plaintext, on `listener` until
/// `shutdown`: for probes that cannot speak TLS (Kubernetes gRPC probes).
/// It reveals readiness and nothing else; every other service answers
/// UNIMPLEMENTED there.
pub async fn serve_health_only(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let served = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(64))
        .add_service(health_server(&node))
        .serve_with_incoming_shutdown(transport::incoming(listener), shutdown)
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "plaintext health server failed");
    }
}

/// Every heartbeat: advertise to every peer (each call bounded by a
/// deadline, so a hung peer delays nobody) and recompute peer health.
async fn advertise_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let interval = node
        .timers
        .heartbeat_interval
        .max(Duration::from_millis(10));
    let deadline = interval
        .min(node.timers.forward_timeout)
        .max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recorded = node.store.log_head().ok().flatten();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        node.membership.tick(Instant::now());
        persist_anchors(&node, &mut recorded).await;
        let origin = node.next_advertisement();
        let digest = node.membership.digest(Instant::now());
        for region in node.peer_regions() {
            let node = node.clone();
            // Relayed: what the peer's last digest said it lacks (all we
            // hold when it sent none).
            let request = api::AdvertiseRequest {
                origin: Some(origin.clone()),
                known: node.membership.relays_to(&region),
                digest: Some(digest.clone()),
            };
            tokio::spawn(async move {
                let Ok(mut client) = node.peer(&region) else {
                    return;
                };
                node.metrics
                    .gossip_sent(prost::Message::encoded_len(&request));
                let call = client.advertise(transport::with_deadline(request, deadline));
                match tokio::time::timeout(deadline, call).await {
                    Ok(Ok(resp)) => {
                        let resp = resp.into_inner();
                        let Some(origin) = &resp.origin else { return };
                        if origin.region != region {
                            tracing::warn!(%region, claimed = %origin.region, "peer answered as another region; ignored");
                            return;
                        }
                        let max_known = node.limits.max_known_advertisements;
                        let digest = resp.digest.as_ref().filter(|d| d.stale.len() <= max_known);
                        if digest.is_none() && resp.digest.is_some() {
                            tracing::warn!(%region, max_known, "peer's gossip digest too long; sending it everything");
                        }
                        node.membership.note_digest(&region, digest);
                        merge_gossip(&node, origin, &resp.known, Instant::now()).await;
                    }
                    Ok(Err(status)) => {
                        tracing::debug!(%region, code = ?status.code(), "advertise failed");
                    }
                    Err(_) => tracing::debug!(%region, "advertise timed out"),
                }
            });
        }
    }
}

/// Takes in what a peer sent, both ways of the Advertise exchange: its own
/// advertisement `origin` (already checked to come from that region) and the
/// advertisements it relays (`known`). Membership sees all of them; the
/// origin's decision-log head is witnessed (relayed heads are not: a relay
/// cannot vouch for another region's log); takeover notices are applied.
pub async fn merge_gossip(
    node: &Node,
    origin: &api::RegionAdvertisement,
    known: &[api::RegionAdvertisement],
    now: Instant,
) {
    node.membership.observe(origin, now);
    node.membership.heard_directly(&origin.region, now);
    if let Some(head) = &origin.log_head {
        let head = crate::audit::anchor::LogHead {
            seq: head.seq,
            hash: head.hash.clone(),
        };
        let seen = node
            .witnesses
            .observe(&origin.region, origin.epoch, &head, now_ms());
        if matches!(
            seen,
            crate::audit::anchor::Observation::Regressed { .. }
                | crate::audit::anchor::Observation::Forked { .. }
        ) {
            node.metrics.log_head_anomaly(&origin.region);
        }
    }
    crate::replication::takeover::on_advertisement(node, origin).await;
    for ad in known {
        node.membership.observe(ad, now);
        if !ad.takeovers.is_empty() {
            crate::replication::takeover::on_advertisement(node, ad).await;
        }
    }
}

/// Keeps the log's anchors on disk, once per heartbeat and only when they
/// changed: our own head in the task store, and the heads witnessed of peers.
async fn persist_anchors(node: &Arc<Node>, recorded: &mut Option<(u64, String)>) {
    let head = node.log.last();
    let store = (recorded.as_ref() != Some(&head)).then(|| node.store.clone());
    if store.is_none() && !node.witnesses.needs_flush() {
        // Nothing changed since the last heartbeat: no trip to the pool.
        return;
    }
    let node2 = node.clone();
    let head2 = head.clone();
    let done = tokio::task::spawn_blocking(move || {
        let own = store.map(|s| s.record_log_head(head2.0, &head2.1));
        let witnesses = node2.witnesses.flush();
        (own, witnesses)
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

/// Opens the task store and the decision log `settings.store` names: the
/// files of the data directory (the log checked against the head its store
/// recorded), or the region's rows in its PostgreSQL database (connected and
/// migrated first; there the log's records are committed with their tasks,
/// so the log has no separate anchor to check).
fn open_store(settings: &Settings) -> anyhow::Result<(TaskStore, DecisionLog)> {
    match settings.store.backend {
        crate::config::StoreBackend::Redb => {
            let store = TaskStore::open(&settings.data_dir).with_context(|| {
                format!("opening task store in {}", settings.data_dir.display())
            })?;
            let log = DecisionLog::open_with(
                &settings.data_dir,
                &settings.region,
                crate::audit::LogOptions {
                    segment_bytes: settings.store.log_segment_bytes,
                },
            )
            .with_context(|| format!("opening decision log in {}", settings.data_dir.display()))?;
            check_own_log(&store, &log)?;
            Ok((store, log))
        }
        crate::config::StoreBackend::Postgres => {
            let url = settings.store.url.as_deref().ok_or_else(|| {
                crate::pg::PgError::Url(
                    "node.store.backend is postgres, but no database is named: set node.store.url (or FEDERATION__NODE__STORE__URL)".into(),
                )
            })?;
            let name = format!("federation/{}/{}", settings.region, settings.replica);
            let pg = crate::pg::Pg::connect(url, settings.store.pool_size, &name)?;
            tracing::info!(target = %pg.target(), region = %settings.region, replica = %settings.replica, schema = crate::pg::known_version(), "task store in postgresql");
            let store = TaskStore::open_postgres(&pg, &settings.region, Default::default())
                .with_context(|| format!("opening the task store in {}", pg.target()))?;
            let log = DecisionLog::open_postgres(&pg, &settings.region)
                .with_context(|| format!("opening the decision log in {}", pg.target()))?;
            Ok((store, log))
        }
    }
}

/// Refuses a decision log that lacks the head its task store recorded: its
/// end was cut, or it was emptied or replaced, while the controller was
/// stopped.
fn check_own_log(store: &TaskStore, log: &DecisionLog) -> anyhow::Result<()> {
    let Some((seq, hash)) = store.log_head().with_context(|| {
        format!(
            "reading the log head recorded in {}",
            store.path().display()
        )
    })?
    else {
        return Ok(());
    };
    let head = crate::audit::anchor::LogHead { seq, hash };
    let check = crate::audit::anchor::check_file(log.path(), &head)?;
    if check != crate::audit::anchor::HeadCheck::Holds {
        anyhow::bail!(
            "decision log {} {}; refusing to start. Restore the log from a backup (or a peer's \
             copy of its records), then check it with `federation audit verify {} --witness <peer>`",
            log.path().display(),
            check.describe(&head, &format!("the task store {}", store.path().display())),
            log.path().parent().unwrap_or(Path::new(".")).display(),
        );
    }
    Ok(())
}

/// Reports `grpc.health.v1` SERVING once the controller can do its job: the
/// store and the decision log are open and the policy loaded (all true once
/// `serve` runs), and it has heard from a peer or waited out start-up (one
/// `dead_after`, the time after which silence means a peer is dead anyway).
/// Reports NOT_SERVING again when shutdown begins.
async fn readiness_loop(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut serving = false;
    // A store in the database is asked every second once serving: while it
    // does not answer, the controller reports NOT_SERVING (so a load
    // balancer or Kubernetes stops sending it traffic).
    let probe_store = node.store.is_postgres();
    let mut store_down = false;
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            set_health(&health, tonic_health::ServingStatus::NotServing).await;
            return;
        }
        ticks += 1;
        if serving {
            if !probe_store || ticks % 10 != 0 {
                continue;
            }
            match node.store.ping(Duration::from_secs(2)).await {
                Err(e) if !store_down => {
                    tracing::warn!(error = %e, "health: not serving, the task store does not answer");
                    set_health(&health, tonic_health::ServingStatus::NotServing).await;
                    store_down = true;
                }
                Ok(()) if store_down => {
                    tracing::info!("health: serving, the task store answers again");
                    set_health(&health, tonic_health::ServingStatus::Serving).await;
                    store_down = false;
                }
                _ => {}
            }
            continue;
        }
        let heard = node
            .membership
            .status(Instant::now())
            .iter()
            .any(|p| p.age.is_some());
        let single = node.peer_regions().is_empty();
        if heard || single || started.elapsed() >= node.timers.dead_after {
            set_health(&health, tonic_health::ServingStatus::Serving).await;
            tracing::info!(heard_from_peers = heard, "health: serving");
            serving = true;
        }
    }
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health.set_service_status("", status).await;
    for name in crate::service::SERVICE_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Re-resolves DNS SRV peers every interval and merges them (static peers
/// keep precedence, see [`Node::endpoint_of`]). Runs until the process ends.
pub async fn discovery_loop(node: Arc<Node>, discoverer: crate::discovery::Discoverer) {
    let mut ticker = tokio::time::interval(discoverer.interval().max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let policy = node.policy();
        let own = node.region.clone();
        match discoverer
            .resolve(|r| r != own && policy.region(r).is_some())
            .await
        {
            Ok(mut found) => {
                if node.tls.is_some() {
                    // The peer channel is TLS whatever the scheme says; show it.
                    for endpoint in found.values_mut() {
                        if let Some(rest) = endpoint.strip_prefix("http://") {
                            *endpoint = format!("https://{rest}");
                        }
                    }
                }
                let mut map = node
                    .discovered
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *map != found {
                    tracing::info!(peers = %crate::logfields::list(found.iter().map(|(r, e)| format!("{r}={e}"))), "dns srv discovery updated peers");
                    *map = found;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "dns srv discovery failed; keeping the last result")
            }
        }
    }
}

/// With the store in the database: every heartbeat, keeps this replica's
/// name claimed and takes or renews the region's leadership for
/// `dead_after` (so a new leader is elected within about `dead_after` of
/// the leader's death); the region's singleton work (lease expiry) runs
/// only while it leads, fenced by its token in the database.
async fn leader_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(
        node.timers
            .heartbeat_interval
            .max(Duration::from_millis(10)),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stale = replica_stale(&node.timers);
    let TaskStore::Postgres(store) = &node.store else {
        return;
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        match store.refresh_replica(&node.replica, stale).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(replica = %node.replica, "another controller took this replica's name")
            }
            Err(e) => tracing::warn!(error = %e, "refreshing the replica's name failed"),
        }
        let was = node.leader_token();
        let now = match store.lead(&node.replica, node.timers.dead_after).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the region's leadership failed");
                None
            }
        };
        node.leader.store(now.unwrap_or(-1), Ordering::SeqCst);
        match (was, now) {
            (None, Some(token)) => {
                tracing::info!(region = %node.region, replica = %node.replica, token, "this replica leads its region")
            }
            (Some(token), None) => {
                tracing::warn!(region = %node.region, replica = %node.replica, token, "this replica no longer leads its region")
            }
            _ => {}
        }
    }
}

/// Returns expired leases to the queue and forgets silent agents.
async fn reap_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period =
        (node.timers.lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let expired = if node.store.is_postgres() {
            // Lease expiry is the leader's, fenced by its token.
            match node.leader_token() {
                Some(token) => {
                    node.store
                        .expire_leases_as_leader(node.timers.max_attempts, token)
                        .await
                }
                None => Ok(Vec::new()),
            }
        } else {
            node.store.expire_leases(node.timers.max_attempts).await
        };
        match expired {
            Ok(changed) => {
                node.metrics.lease_expired(changed.len() as u64);
                for t in changed {
                    tracing::warn!(task_id = %t.task_id, attempts = t.attempts, state = t.state().as_str_name(), "lease expired");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring leases failed"),
        }
        for agent in node.agents.reap(node.timers.agent_timeout, Instant::now()) {
            tracing::warn!(agent_id = %agent.id, name = %agent.name, "agent silent past timeout; its leases return to the queue");
            if let Err(e) = node.store.forget_agent(&agent.id).await {
                tracing::error!(error = %e, agent_id = %agent.id, "requeueing agent's tasks failed");
            }
        }
    }
}
