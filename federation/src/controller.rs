//! The controller as a composition: [`Node`] holds one region's components
//! (the cluster view, peers, store, decision log, replication, router,
//! gossip, status, reload, ...) with accessors only, and [`open`] builds
//! them from [`Settings`], each given just the components it uses. Running
//! it (services, loops, shutdown) is [`crate::runtime`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::agents::AgentRegistry;
use crate::audit::DecisionLog;
use crate::audit::anchor::Witnesses;
use crate::cluster::{Cluster, ClusterParts};
use crate::config::{Limits, Timers};
use crate::drain::Drainer;
use crate::federation_status::FederationStatus;
use crate::gossip::{Gossip, GossipParts};
use crate::leasing::Leasing;
use crate::live_policy::LivePolicy;
use crate::local_tasks::LocalTasks;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::policy::Policy;
use crate::relay::Relay;
use crate::reload::Reloader;
use crate::replication::{Replication, Replicator};
use crate::routing::{Router, RouterParts};
use crate::tasks::TaskStore;
use crate::transport::Channels;

pub use crate::settings::{Settings, TlsSettings};

/// One region's controller: its components, each shared by the services
/// and loops that use it. No behaviour of its own.
#[derive(Debug)]
pub struct Node {
    timers: Timers,
    limits: Limits,
    replica: String,
    cluster: Arc<Cluster>,
    peers: Arc<Peers>,
    store: TaskStore,
    log: DecisionLog,
    witnesses: Arc<Witnesses>,
    metrics: Arc<Metrics>,
    replication: Arc<Replication>,
    replicator: Arc<Replicator>,
    gossip: Arc<Gossip>,
    router: Arc<Router>,
    relay: Arc<Relay>,
    tasks: Arc<LocalTasks>,
    status: Arc<FederationStatus>,
    reloader: Arc<Reloader>,
    leasing: Arc<Leasing>,
    drainer: Arc<Drainer>,
    health: tonic_health::server::HealthReporter,
    server_tls: Option<federation_tls::ServerTls>,
    auth: Arc<crate::auth::Auth>,
    discoverer: Option<crate::discovery::Discoverer>,
}

impl Node {
    /// This controller's region.
    pub fn region(&self) -> &str {
        self.cluster.region()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.cluster.policy()
    }

    /// Timers.
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Input limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// This controller's name within its region (`node.replica`).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// This region's place in the federation: policy, peer table, agents,
    /// what it advertises, the live view.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Endpoints of and channels to peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Durable tasks.
    pub fn store(&self) -> &TaskStore {
        &self.store
    }

    /// The hash-chained decision log.
    pub fn log(&self) -> &DecisionLog {
        &self.log
    }

    /// Heads of peers' decision logs heard from the peers themselves.
    pub fn witnesses(&self) -> &Arc<Witnesses> {
        &self.witnesses
    }

    /// Prometheus metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The replication state (keys, copies, takeover, duplicates).
    pub fn replication(&self) -> &Arc<Replication> {
        &self.replication
    }

    /// Replication's loops, takeover and duplicate resolution.
    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    /// Gossip both ways and the log's anchors.
    pub fn gossip(&self) -> &Arc<Gossip> {
        &self.gossip
    }

    /// Submits, forwards and explains.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Relaying calls about tasks held elsewhere.
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// This region's own tasks (get, list, watch, cancel).
    pub fn tasks(&self) -> &Arc<LocalTasks> {
        &self.tasks
    }

    /// The federation status as this controller sees it.
    pub fn status(&self) -> &Arc<FederationStatus> {
        &self.status
    }

    /// Policy reloads.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Agents' registrations and leases.
    pub fn leasing(&self) -> &Arc<Leasing> {
        &self.leasing
    }

    /// This controller's drain.
    pub fn drainer(&self) -> &Arc<Drainer> {
        &self.drainer
    }

    /// The `grpc.health.v1` statuses (NOT_SERVING until ready, see
    /// `runtime`), served on the main port and the optional plaintext
    /// health port.
    pub fn health(&self) -> &tonic_health::server::HealthReporter {
        &self.health
    }

    /// The serving side's TLS (`None` in plaintext `--insecure` mode).
    pub fn server_tls(&self) -> Option<&federation_tls::ServerTls> {
        self.server_tls.as_ref()
    }

    /// Who may call what.
    pub fn auth(&self) -> &Arc<crate::auth::Auth> {
        &self.auth
    }

    /// DNS SRV peer discovery (`node.discovery`), when configured.
    pub fn discoverer(&self) -> Option<&crate::discovery::Discoverer> {
        self.discoverer.as_ref()
    }
}

/// How long a replica's name stays claimed without a refresh (it is
/// refreshed every heartbeat).
pub(crate) fn replica_stale(timers: &Timers) -> Duration {
    timers.dead_after.max(timers.heartbeat_interval * 3)
}

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
    let epoch = (crate::clock::now_unix_ms().max(0) as u64).max(last + 1);
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
    let discoverer = match settings.discovery.clone() {
        Some(spec) => {
            let name = spec.dns_srv.clone();
            Some(
                crate::discovery::Discoverer::new(spec)
                    .with_context(|| format!("dns srv discovery of {name}"))?,
            )
        }
        None => None,
    };
    // Each start-up phase timed, for the log line at the end.
    let started = Instant::now();
    let mut at = started;
    let mut lap = move || {
        let now = Instant::now();
        let ms = now.duration_since(at).as_millis() as u64;
        at = now;
        ms
    };
    let epoch = next_epoch(&settings.data_dir)?;
    let (store, log) = open_store(&settings)?;
    let store_ms = lap();
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
    let agents_ms = lap();
    let witnesses = Witnesses::open(&settings.data_dir);
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
    let replication = Replication::open(
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
    let replication_ms = lap();
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
            Some((server, client))
        }
    };
    let tls_ms = lap();
    let health = tonic_health::server::HealthReporter::new();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let auth = Arc::new(crate::auth::Auth {
        region: settings.region.clone(),
        tokens: settings.tokens.clone(),
        insecure: tls.is_none(),
    });
    let (server_tls, client_tls) = tls.unzip();
    let metrics = Arc::new(Metrics::new());
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
    let replication = Arc::new(replication);
    let witnesses = Arc::new(witnesses);
    let policy = LivePolicy::new(settings.policy);
    let cluster = Arc::new(Cluster::new(ClusterParts {
        region: settings.region.clone(),
        epoch,
        policy,
        membership,
        agents,
        store: store.clone(),
        log: log.clone(),
        queue_limit: settings.limits.max_queue_depth,
        advertise_endpoint: settings.advertise_endpoint,
        replica: if store.is_postgres() {
            settings.replica.clone()
        } else {
            String::new()
        },
    }));
    if replication.enabled() {
        // Every change of the store reaches the outbox as it commits (no
        // task woken per change).
        store.bind_changes(Arc::new(crate::replication::ChangeRecorder {
            replication: replication.clone(),
            region: settings.region.clone(),
            cluster: Arc::downgrade(&cluster),
        }))?;
    }
    let peers = Arc::new(Peers::new(
        cluster.clone(),
        Channels::new(settings.timers.forward_timeout),
        client_tls,
        settings.peers,
        settings.limits.max_message_bytes,
    ));
    let replicator = Arc::new(Replicator {
        replication: replication.clone(),
        region: settings.region.clone(),
        epoch,
        cluster: cluster.clone(),
        peers: peers.clone(),
        store: store.clone(),
        log: log.clone(),
        metrics: metrics.clone(),
        timers: settings.timers.clone(),
        detached: crate::detached::Detached::new(),
    });
    let gossip = Arc::new(Gossip::new(GossipParts {
        cluster: cluster.clone(),
        peers: peers.clone(),
        witnesses: witnesses.clone(),
        metrics: metrics.clone(),
        replicator: replicator.clone(),
        store: store.clone(),
        log: log.clone(),
        max_known: settings.limits.max_known_advertisements,
        heartbeat: settings.timers.heartbeat_interval,
        forward_timeout: settings.timers.forward_timeout,
    }));
    let router = Arc::new(Router::new(RouterParts {
        cluster: cluster.clone(),
        peers: peers.clone(),
        store: store.clone(),
        log: log.clone(),
        audit_key,
        metrics: metrics.clone(),
        replication: replication.clone(),
        limits: settings.limits.clone(),
        forward_timeout: settings.timers.forward_timeout,
    }));
    let relay = Arc::new(Relay::new(
        cluster.clone(),
        peers.clone(),
        store.clone(),
        settings.timers.forward_timeout,
    ));
    let tasks = Arc::new(LocalTasks::new(store.clone(), log.clone()));
    let status = Arc::new(FederationStatus::new(
        cluster.clone(),
        peers.clone(),
        store.clone(),
        witnesses.clone(),
        replication.clone(),
    ));
    let reloader = Arc::new(Reloader::new(
        cluster.clone(),
        log.clone(),
        settings.config_path,
    ));
    let leasing = Arc::new(Leasing::new(
        cluster.clone(),
        store.clone(),
        replication.clone(),
        settings.timers.clone(),
        settings.limits.clone(),
    ));
    let drainer = Arc::new(Drainer::new(
        cluster.clone(),
        store.clone(),
        metrics.clone(),
        settings.timers.agent_timeout,
        replica_stale(&settings.timers),
    ));
    let rest_ms = lap();
    tracing::info!(
        total_ms = started.elapsed().as_millis() as u64,
        store_ms,
        agents_ms,
        replication_ms,
        tls_ms,
        rest_ms,
        "controller opened"
    );
    Ok(Arc::new(Node {
        timers: settings.timers,
        limits: settings.limits,
        replica: settings.replica,
        cluster,
        peers,
        store,
        log,
        witnesses,
        metrics,
        replication,
        replicator,
        gossip,
        router,
        relay,
        tasks,
        status,
        reloader,
        leasing,
        drainer,
        health,
        server_tls,
        auth,
        discoverer,
    }))
}

/// Opens the task store and the decision log `settings.store` names: the
/// files of the data directory (the log checked against the head its store
/// recorded), or the region's rows in its PostgreSQL database (connected and
/// migrated first; there the log's records are committed with their tasks,
/// so the log has no separate anchor to check).
fn open_store(settings: &Settings) -> anyhow::Result<(TaskStore, DecisionLog)> {
    match settings.store.backend {
        crate::config::StoreBackend::Redb => {
            let started = Instant::now();
            let options = crate::tasks::StoreOptions {
                checkpoints: crate::tasks::Checkpoints {
                    bytes: settings.store.checkpoint_bytes,
                    ..crate::tasks::Checkpoints::default()
                },
                ..crate::tasks::StoreOptions::default()
            };
            let store = TaskStore::open_with(&settings.data_dir, options).with_context(|| {
                format!("opening task store in {}", settings.data_dir.display())
            })?;
            let store_ms = started.elapsed().as_millis() as u64;
            let log = DecisionLog::open_with(
                &settings.data_dir,
                &settings.region,
                crate::audit::LogOptions {
                    segment_bytes: settings.store.log_segment_bytes,
                    ..crate::audit::LogOptions::default()
                },
            )
            .with_context(|| format!("opening decision log in {}", settings.data_dir.display()))?;
            let log_ms = (started.elapsed().as_millis() as u64).saturating_sub(store_ms);
            store.bind_journal(std::sync::Arc::new(log.clone()))?;
            check_own_log(&store, &log)?;
            tracing::info!(
                store_ms,
                log_ms,
                journal_ms =
                    (started.elapsed().as_millis() as u64).saturating_sub(store_ms + log_ms),
                "task store and decision log opened"
            );
            Ok((store, log))
        }
        crate::config::StoreBackend::Postgres => {
            let url = settings.store.url.as_deref().ok_or_else(|| {
                crate::pg::PgError::Url(
                    "node.store.backend is postgres, but no database is named: set node.store.url (or FEDERATION__NODE__STORE__URL)".into(),
                )
            })?;
            let name = format!("federation/{}/{}", settings.region, settings.replica);
            let pg = crate::pg::Pg::connect_with_timeout(
                url,
                settings.store.pool_size,
                &name,
                settings.store.timeout,
            )?;
            tracing::info!(target = %pg.target(), region = %settings.region, replica = %settings.replica, schema = crate::pg::known_version(), "task store in postgresql");
            let options = crate::tasks::StoreOptions {
                writer_transactions: settings.store.writer_transactions,
                ..Default::default()
            };
            let store = TaskStore::open_postgres(&pg, &settings.region, options)
                .with_context(|| format!("opening the task store in {}", pg.target()))?;
            let log = DecisionLog::open_postgres(&pg, &settings.region)
                .with_context(|| format!("opening the decision log in {}", pg.target()))?;
            store.bind_journal(std::sync::Arc::new(log.clone()))?;
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
