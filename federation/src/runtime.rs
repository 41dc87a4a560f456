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
use crate::transport;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a controller on `listener` until `shutdown` resolves, then stops
/// accepting, finishes in-flight calls (up to the shutdown grace), flushes the
/// store and the log, and returns.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = crate::controller::open(settings).await?;
    serve(node, listener, shutdown).await
}

/// Serves an opened node (see [`run`]).
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(region = %node.region(), epoch = node.cluster().epoch(), addr = %crate::logfields::list(addr), "controller serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let advertiser = tokio::spawn(node.gossip().clone().advertise_loop(stop_rx.clone()));
    let reaper = tokio::spawn(reap_loop(node.clone(), stop_rx.clone()));
    if node.store().is_postgres() {
        tokio::spawn(leader_loop(node.clone(), stop_rx.clone()));
    }
    let replicator = tokio::spawn(crate::replication::run(
        node.replicator().clone(),
        stop_rx.clone(),
    ));

    let grace = node.timers().shutdown_grace;
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_for_server = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
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
    let _ = advertiser.await;
    let _ = reaper.await;
    let _ = replicator.await;
    node.store().flush().await.context("flushing task store")?;
    node.log().flush().await.context("flushing decision log")?;
    let mut recorded = None;
    node.gossip().persist_anchors(&mut recorded).await;
    tracing::info!(region = %node.region(), "controller stopped");
    served.context("gRPC server failed")
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
    let probe_store = node.store().is_postgres();
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
            match node.store().ping(Duration::from_secs(2)).await {
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
/// keep precedence, see [`crate::peers::Peers::endpoint_of`]). Runs until the process ends.
pub async fn discovery_loop(node: Arc<Node>, discoverer: crate::discovery::Discoverer) {
    let mut ticker = tokio::time::interval(discoverer.interval().max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let policy = node.policy();
        let own = node.region().to_string();
        match discoverer
            .resolve(|r| r != own && policy.region(r).is_some())
            .await
        {
            Ok(mut found) => {
                if node.peers().tls() {
                    // The peer channel is TLS whatever the scheme says; show it.
                    for endpoint in found.values_mut() {
                        if let Some(rest) = endpoint.strip_prefix("http://") {
                            *endpoint = format!("https://{rest}");
                        }
                    }
                }
                let peers = crate::logfields::list(found.iter().map(|(r, e)| format!("{r}={e}")));
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
/// only while it leads, fenced by its token in the database.
async fn leader_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(
        node.timers()
            .heartbeat_interval
            .max(Duration::from_millis(10)),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stale = replica_stale(node.timers());
    let TaskStore::Postgres(store) = node.store() else {
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
        match store.refresh_replica(node.replica(), stale).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(replica = %node.replica(), "another controller took this replica's name")
            }
            Err(e) => tracing::warn!(error = %e, "refreshing the replica's name failed"),
        }
        let was = node.cluster().leader_token();
        let now = match store.lead(node.replica(), node.timers().dead_after).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the region's leadership failed");
                None
            }
        };
        node.cluster().set_leader_token(now);
        match (was, now) {
            (None, Some(token)) => {
                tracing::info!(region = %node.region(), replica = %node.replica(), token, "this replica leads its region")
            }
            (Some(token), None) => {
                tracing::warn!(region = %node.region(), replica = %node.replica(), token, "this replica no longer leads its region")
            }
            _ => {}
        }
    }
}

/// Returns expired leases to the queue and forgets silent agents.
async fn reap_loop(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period =
        (node.timers().lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
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
        let expired = if node.store().is_postgres() {
            // Lease expiry is the leader's, fenced by its token.
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
            tracing::warn!(agent_id = %agent.id, name = %agent.name, "agent silent past timeout; its leases return to the queue");
            if let Err(e) = node.store().forget_agent(&agent.id).await {
                tracing::error!(error = %e, agent_id = %agent.id, "requeueing agent's tasks failed");
            }
        }
    }
}
