//! The composition root at run time: opens a [`Node`] ([`crate::controller::open`]),
//! builds the gRPC services over its components, spawns every loop
//! (gossip, replication, lease reaper, leadership, readiness) and serves
//! on an already-bound listener until the shutdown future resolves, then
//! shuts down in order.
//!
//! Entry point: [`run`]. Binaries bind addresses and install signal handlers;
//! tests bind `127.0.0.1:0` and pass the listener in.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::controller::{Node, Settings, replica_stale};
use crate::tasks::TaskStore;
use crate::ticker::Ticker;
use crate::transport;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound listeners a controller serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (TLS unless insecure).
    pub grpc: TcpListener,
    /// Admin HTTP (`/metrics`, the status page), when wanted.
    pub admin: Option<TcpListener>,
    /// Plaintext `grpc.health.v1` only, for probes, when wanted.
    pub health: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Self {
            grpc,
            admin: None,
            health: None,
        }
    }
}

/// What the embedding process hands the runtime besides the shutdown
/// future (`federation serve`: SIGHUP, systemd's READY=1).
#[derive(Default)]
pub struct Hooks {
    /// Each message reloads the policy from the federation file.
    pub reloads: Option<tokio::sync::mpsc::Receiver<()>>,
    /// Called once, when the health status first turns SERVING.
    pub on_serving: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("reloads", &self.reloads.is_some())
            .field("on_serving", &self.on_serving.is_some())
            .finish()
    }
}

/// Runs a controller on `listeners` until `shutdown` resolves (see
/// [`run_with`]).
pub async fn run(
    settings: Settings,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(settings, listeners.into(), shutdown, Hooks::default()).await
}

/// Opens a controller from `settings` (recording the policy's approvals
/// at start), then serves it ([`serve_with`]).
pub async fn run_with(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let approval = settings.approval.clone();
    let node = crate::controller::open(settings).await?;
    if let Some(v) = &approval {
        let hash = node.policy().hash.clone();
        tracing::info!(policy_hash = %hash, signed = %v.signed.join(","), missing = %v.missing.join(","), "policy approvals verified");
        node.log()
            .append(crate::approvals::record(&hash, v, "at start"))
            .await
            .context("recording the policy's approvals in the decision log")?;
    }
    let released = node.store().released();
    let served = serve_with(node, listeners, shutdown, hooks).await;
    // The store this run opened is closed when it returns (a new run of
    // the same data directory opens it at once), unless a holder outlives
    // the bound, which is said.
    if !released.wait(RELEASE_BOUND).await {
        tracing::warn!(
            holders = released.holders(),
            bound = %humantime::format_duration(RELEASE_BOUND),
            "the task store is still held after the run ended; it closes when its last holder ends"
        );
    }
    served
}

/// How long [`run_with`] waits, after serving ended, for the last holder of
/// the store it opened (a detached task finishing) to let go.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Serves an opened node on `listener` (see [`serve_with`]).
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(node, listener.into(), shutdown, Hooks::default()).await
}

/// Serves an opened node until `shutdown` resolves: spawns every loop
/// (gossip, replication, lease reaper, leadership, readiness, DNS SRV
/// discovery, the policy poll, the reload hook) and the optional admin HTTP
/// and health-only ports, then shuts down in order: a leading replica of a
/// database-backed region gives the lead up, every port stops accepting
/// and reports NOT_SERVING, in-flight calls get
/// `shutdown_grace`, the loops end, the store and the log are flushed and
/// the log's anchors persisted.
pub async fn serve_with(
    node: Arc<Node>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        admin,
        health: health_listener,
    } = listeners;
    let addr = listener.local_addr().ok();
    // The bound address for scripts and harnesses (port 0 resolves here), as
    // a log line once the state is open: stdout stays empty, so log
    // collectors see only logs.
    tracing::info!(addr = %crate::logfields::list(addr), "listening");
    tracing::info!(region = %node.region(), epoch = node.cluster().epoch(), addr = %crate::logfields::list(addr), "controller serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    let mut loops = vec![
        tokio::spawn(node.gossip().clone().advertise_loop(stop_rx.clone())),
        tokio::spawn(reap_loop(node.clone(), stop_rx.clone())),
        tokio::spawn(crate::replication::run(
            node.replicator().clone(),
            stop_rx.clone(),
        )),
    ];
    if node.store().is_postgres() {
        loops.push(tokio::spawn(leader_loop(node.clone(), stop_rx.clone())));
    }
    if node.discoverer().is_some() {
        loops.push(tokio::spawn(discovery_loop(node.clone(), stop_rx.clone())));
    }
    let poll = node.timers().policy_poll;
    if !poll.is_zero() {
        loops.push(tokio::spawn(
            node.reloader().clone().poll_loop(poll, stop_rx.clone()),
        ));
    }
    if let Some(reloads) = hooks.reloads {
        loops.push(tokio::spawn(reload_hook(
            node.clone(),
            reloads,
            stop_rx.clone(),
        )));
    }
    // Read-only ports: stopped with the rest, not waited for (a probe's
    // health watch may stay open).
    let mut ports = Vec::new();
    if let Some(health) = health_listener {
        tracing::info!(addr = %crate::logfields::list(health.local_addr().ok()), "plaintext gRPC health (probes only) serving");
        ports.push(tokio::spawn(serve_health_only(
            node.clone(),
            health,
            stopped(),
        )));
    }
    if let Some(admin) = admin {
        tracing::info!(addr = %crate::logfields::list(admin.local_addr().ok()), "admin HTTP serving /metrics and the status page");
        let admin_node = node.clone();
        let admin_stop = stopped();
        ports.push(tokio::spawn(async move {
            if let Err(e) = crate::admin_http::serve(admin_node, admin, admin_stop).await {
                tracing::error!(error = %e, "admin HTTP server failed");
            }
        }));
    }
    if let Some(on_serving) = hooks.on_serving {
        ports.push(tokio::spawn(when_serving(node.clone(), on_serving)));
    }

    let grace = node.timers().shutdown_grace;
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_for_server = stop_tx.clone();
    let leaving = node.clone();
    tokio::spawn(async move {
        shutdown.await;
        leave_the_lead(&leaving).await;
        let _ = stop_for_server.send(true);
        let _ = signal_tx.send(());
    });

    let health = node.health().clone();
    let health_service = health_server(&node);
    let readiness = tokio::spawn(readiness_loop(
        node.clone(),
        health.clone(),
        stop_rx.clone(),
    ));

    let stop_signal = async move {
        let _ = signal_rx.await;
    };
    let router = crate::service::router(&node, health_service);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > =
        match node.server_tls() {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                tls.incoming(listener, HANDSHAKE_TIMEOUT),
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
    for handle in loops {
        let _ = handle.await;
    }
    for port in ports {
        port.abort();
    }
    node.store().flush().await.context("flushing task store")?;
    node.log().flush().await.context("flushing decision log")?;
    let mut recorded = None;
    node.gossip().persist_anchors(&mut recorded).await;
    tracing::info!(region = %node.region(), "controller stopped");
    served.context("gRPC server failed")
}

/// The longest a stopping replica waits to drain (give the lead up and
/// tell its siblings).
const RESIGN_BOUND: Duration = Duration::from_secs(2);

/// A stopping replica of a database-backed region drains first (bounded by
/// [`RESIGN_BOUND`]): it gives the region's leadership up, so a sibling
/// leads at its next heartbeat instead of after `dead_after`, and its
/// siblings see it draining at once. If the database does not answer in
/// time, the lead passes when its lease expires.
async fn leave_the_lead(node: &Node) {
    if !node.store().is_postgres() {
        return;
    }
    if tokio::time::timeout(RESIGN_BOUND, node.drainer().set(true))
        .await
        .is_err()
    {
        tracing::warn!(
            "draining at shutdown took too long; the region's lead passes when its lease expires"
        );
    }
}

/// Reloads the policy from the federation file at each message of
/// `reloads` (SIGHUP in `federation serve`).
async fn reload_hook(
    node: Arc<Node>,
    mut reloads: tokio::sync::mpsc::Receiver<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            got = reloads.recv() => if got.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let r = node.reloader().reload("", "", "").await;
        if r.applied {
            tracing::info!(policy_hash = %r.policy_hash, "SIGHUP: policy reloaded");
        } else {
            tracing::warn!(error = %r.error, "SIGHUP: policy reload refused; old policy kept");
        }
    }
}

/// Calls `then` the first time the health status (`grpc.health.v1`,
/// overall service) turns SERVING: what probes and systemd's `Type=notify`
/// wait for.
async fn when_serving(node: Arc<Node>, then: Box<dyn FnOnce() + Send>) {
    use tokio_stream::StreamExt as _;
    use tonic_health::pb::health_server::Health as _;
    let service = tonic_health::server::HealthService::from_health_reporter(node.health().clone());
    let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    let Ok(response) = service.watch(request).await else {
        return;
    };
    let mut statuses = response.into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    while let Some(Ok(update)) = statuses.next().await {
        if update.status == serving {
            then();
            return;
        }
    }
}

/// The `grpc.health.v1` service over this node's statuses.
pub fn health_server(
    node: &Node,
) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
    tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(node.health().clone()),
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

/// Reports `grpc.health.v1` SERVING once the controller can do its job: the
/// store and the decision log are open and the policy loaded (all true once
/// `serve` runs), and it has heard from a peer or waited out start-up (one
/// `dead_after`, the time after which silence means a peer is dead anyway).
/// Reports NOT_SERVING again when shutdown begins, and while a replica of
/// a database-backed region drains.
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
    let probe_store = node.store().is_postgres();
    let mut store_down = false;
    let mut drained = false;
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
            // A replica of a database-backed region that drains reports
            // NOT_SERVING, so Kubernetes stops sending it new connections
            // (its siblings serve); the embedded store's drain does not.
            let now_drained = probe_store && node.cluster().draining();
            if now_drained != drained {
                drained = now_drained;
                if drained {
                    tracing::info!("health: not serving, this replica drains");
                    set_health(&health, tonic_health::ServingStatus::NotServing).await;
                } else if !store_down {
                    tracing::info!("health: serving, the drain ended");
                    set_health(&health, tonic_health::ServingStatus::Serving).await;
                }
            }
            if !probe_store || ticks % 10 != 0 {
                continue;
            }
            match node.store().ping(Duration::from_secs(2)).await {
                Err(e) if !store_down => {
                    tracing::warn!(error = %e, "health: not serving, the task store does not answer");
                    set_health(&health, tonic_health::ServingStatus::NotServing).await;
                    store_down = true;
                }
                Ok(()) if store_down => {
                    store_down = false;
                    if !drained {
                        tracing::info!("health: serving, the task store answers again");
                        set_health(&health, tonic_health::ServingStatus::Serving).await;
                    }
                }
                _ => {}
            }
            continue;
        }
        let heard = node
            .cluster()
            .membership()
            .status(Instant::now())
            .iter()
            .any(|p| p.age.is_some());
        let single = node.cluster().peer_regions().is_empty();
        if heard || single || started.elapsed() >= node.timers().dead_after {
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
/// keep precedence, see [`crate::peers::Peers::endpoint_of`]) until shutdown.
async fn discovery_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(discoverer) = node.discoverer() else {
        return;
    };
    let mut ticker = tokio::time::interval(discoverer.interval().max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let policy = node.policy();
        let own = node.region().to_string();
        match discoverer
            .resolve(|r| r != own && policy.region(r).is_some())
            .await
        {
            Ok(mut found) => {
                if node.peers().tls() {
                    // The peer channel is TLS whatever the scheme says; show it.
                    for endpoint in found.values_mut().flatten() {
                        if let Some(rest) = endpoint.strip_prefix("http://") {
                            *endpoint = format!("https://{rest}");
                        }
                    }
                }
                let peers = crate::logfields::list(
                    found
                        .iter()
                        .flat_map(|(r, es)| es.iter().map(move |e| format!("{r}={e}"))),
                );
                if node.peers().set_discovered(found) {
                    tracing::info!(%peers, "dns srv discovery updated peers");
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
/// only while it leads, its leadership token checked in the database.
async fn leader_loop(node: Arc<Node>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = Ticker::new(
        node.timers()
            .heartbeat_interval
            .max(Duration::from_millis(10)),
        stop,
    );
    let stale = replica_stale(node.timers());
    let TaskStore::Postgres(store) = node.store() else {
        return;
    };
    while ticker.tick().await {
        let me = node.cluster().as_sibling();
        match store
            .refresh_replica_as(node.replica(), stale, Some(&me))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(replica = %node.replica(), "another controller took this replica's name")
            }
            Err(e) => tracing::warn!(error = %e, "refreshing the replica's name failed"),
        }
        match store.siblings(node.timers().dead_after).await {
            Ok(siblings) => node.cluster().set_siblings(siblings),
            Err(e) => tracing::warn!(error = %e, "reading the region's other replicas failed"),
        }
        let was = node.cluster().leader_token();
        if node.cluster().draining() {
            // A draining replica does not lead (`drain` gave it up).
            if was.is_some() {
                crate::drain::resign(node.cluster(), store).await;
            }
            continue;
        }
        let now = match store.lead(node.replica(), node.timers().dead_after).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the region's leadership failed");
                None
            }
        };
        if now.is_some() && node.cluster().draining() {
            // The drain began while the renewal ran: give it up again.
            crate::drain::resign(node.cluster(), store).await;
            continue;
        }
        node.cluster().set_leader_token(now);
        match (was, now) {
            (None, Some(token)) => {
                tracing::info!(region = %node.region(), replica = %node.replica(), token, "this replica leads its region");
                // Its singleton work resumes here: a new push epoch and a
                // full snapshot to every peer at once.
                node.replicator().on_lead_gained().await;
            }
            (Some(token), None) => {
                tracing::warn!(region = %node.region(), replica = %node.replica(), token, "this replica no longer leads its region")
            }
            _ => {}
        }
    }
}

/// Returns expired leases to the queue and forgets silent agents.
async fn reap_loop(node: Arc<Node>, stop: tokio::sync::watch::Receiver<bool>) {
    let period =
        (node.timers().lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut ticker = Ticker::new(period, stop);
    while ticker.tick().await {
        let expired = if node.store().is_postgres() {
            // Lease expiry is the leader's, its leadership token checked.
            match node.cluster().leader_token() {
                Some(token) => {
                    node.store()
                        .expire_leases_as_leader(node.timers().max_attempts, token)
                        .await
                }
                None => Ok(Vec::new()),
            }
        } else {
            node.store().expire_leases(node.timers().max_attempts).await
        };
        match expired {
            Ok(changed) => {
                node.metrics().lease_expired(changed.len() as u64);
                for t in changed {
                    tracing::warn!(task_id = %t.task_id, attempts = t.attempts, state = t.state().as_str_name(), "lease expired");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring leases failed"),
        }
        for agent in node
            .cluster()
            .agents()
            .reap(node.timers().agent_timeout, Instant::now())
        {
            if node.store().is_postgres() {
                // Silent here is not silent in the region: the agent may
                // heartbeat another replica now (this one was down or
                // paused, or it only loaded the agent at start). Its
                // leases, if it died, expire on the leader by their TTL.
                tracing::info!(agent_id = %agent.id, name = %agent.name, "agent silent at this replica past timeout; no longer counted here");
                continue;
            }
            tracing::warn!(agent_id = %agent.id, name = %agent.name, "agent silent past timeout; its leases return to the queue");
            if let Err(e) = node.store().forget_agent(&agent.id).await {
                tracing::error!(error = %e, agent_id = %agent.id, "requeueing agent's tasks failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use federation_api as api;

    use super::*;

    use federation_sandbox::{SEED_POLICY as SEED, string_attrs as attrs};

    /// Starts an in-process controller of `region` on loopback; the sender
    /// stops it, the handle returns what `run` returned.
    async fn start(
        region: &str,
        dir: &std::path::Path,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        start_with_peers(region, dir, &[]).await
    }

    /// [`start`] with peer endpoints set (region, URL).
    async fn start_with_peers(
        region: &str,
        dir: &std::path::Path,
        peers: &[(&str, String)],
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let config = dir.join("federation.yaml");
        std::fs::write(&config, SEED).expect("policy file");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut settings =
            Settings::for_test(region, &config, &dir.join(region), addr).expect("settings");
        for (peer, url) in peers {
            settings.peers.insert(peer.to_string(), url.clone());
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run(settings, listener, async move {
            let _ = stopped.await;
        }));
        (addr, stop, running)
    }

    /// Stops a controller started by [`start`] and waits for `run` (bounded).
    async fn stop_and_join(
        stop: tokio::sync::oneshot::Sender<()>,
        running: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        stop.send(()).expect("still running");
        tokio::time::timeout(Duration::from_secs(60), running)
            .await
            .expect("stops within its grace")
            .expect("joins")
            .expect("stops cleanly");
    }

    /// Connects to the controller `running` serves on `addr`. Bounded
    /// retries: on a loaded machine (CI) a connect to the bound listener was
    /// reset now and then; if `run` gave up (its listener dropped), every
    /// retry fails and the panic says what `run` returned.
    async fn client(
        addr: std::net::SocketAddr,
        running: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> api::federation_client_client::FederationClientClient<tonic::transport::Channel> {
        let mut last = None;
        for _ in 0..20 {
            match api::federation_client_client::FederationClientClient::connect(format!(
                "http://{addr}"
            ))
            .await
            {
                Ok(c) => return c,
                Err(e) if running.is_finished() => {
                    last = Some(e);
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        panic!(
            "connecting to the bound listener: {last:?}; run returned {:?}",
            tokio::time::timeout(std::time::Duration::from_secs(10), running).await
        );
    }

    #[tokio::test]
    async fn an_in_process_controller_stores_routes_and_stops_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, stop, mut running) = start("north_america", dir.path()).await;
        let mut c = client(addr, &mut running).await;
        let placed = c
            .submit_task(api::SubmitTaskRequest {
                attributes: attrs(&[("customer_region", "US")]),
                payload: b"echo hi".to_vec(),
                ..Default::default()
            })
            .await
            .expect("a US task is placed here")
            .into_inner();
        assert_eq!(placed.region, "north_america");
        assert!(
            placed.task_id.ends_with(".north_america"),
            "{}",
            placed.task_id
        );
        let listed = c
            .list_tasks(api::ListTasksRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert_eq!(
            listed
                .tasks
                .iter()
                .map(|t| t.task_id.as_str())
                .collect::<Vec<_>>(),
            [placed.task_id.as_str()]
        );
        let mut watch = c
            .watch_task(api::WatchTaskRequest {
                task_id: placed.task_id.clone(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = watch.message().await.expect("an event").expect("first");
        assert_eq!(
            first.task.map(|t| t.task_id),
            Some(placed.task_id.clone()),
            "a watch starts with the task as it is"
        );
        drop(watch);
        let got = c
            .get_task(api::GetTaskRequest {
                task_id: placed.task_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        let task = got.task.expect("task");
        assert_eq!(task.state(), api::TaskState::Queued);
        assert!(
            got.decision.is_some(),
            "the decision that placed it is found"
        );

        // The client's connection holds the old run's services (and its
        // store) until it closes: closed before the restart opens the
        // same directory.
        drop(c);
        stop_and_join(stop, running).await;

        // Flushed and closed before `run` returned: a new run of the same
        // directory opens it at once and holds the task.
        let (addr, stop, mut running) = start("north_america", dir.path()).await;
        let mut c = client(addr, &mut running).await;
        let again = c
            .get_task(api::GetTaskRequest {
                task_id: placed.task_id.clone(),
            })
            .await
            .expect("the task survives the restart")
            .into_inner();
        assert_eq!(again.task.expect("task").task_id, placed.task_id);
        stop_and_join(stop, running).await;
    }

    /// `run` returned while a snapshot push to a peer that never answers
    /// was still in flight (detached, holding the store until its 5 s
    /// deadline), so a new run of the same directory found `tasks.redb` in
    /// use (CI saw it with the seed policy's unresolvable endpoints). The
    /// pushes in flight are ended with the run, and `run` returns once the
    /// store is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_run_returns_its_store_is_closed_even_with_pushes_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Accepts connections (the kernel does) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", silent.local_addr().expect("addr"));
        let peers = [("europe", url.clone()), ("asia_pacific", url)];
        let (addr, stop, mut running) = start_with_peers("north_america", dir.path(), &peers).await;
        // Serving: the first sync round (at start) has pushed to both.
        drop(client(addr, &mut running).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_and_join(stop, running).await;
        let reopened = crate::tasks::RedbStore::open(&dir.path().join("north_america"));
        assert!(reopened.is_ok(), "{:?}", reopened.err());
    }
}
