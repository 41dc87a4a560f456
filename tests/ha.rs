//! A region served by three controllers ("replicas") on one PostgreSQL
//! database: europe has three, north_america and asia_pacific one each,
//! with the user's seed policy (DE/UK/FR → europe, backup north_america).
//! Under concurrent submits through north_america and asia_pacific, each
//! europe replica is SIGKILLed in turn (the leader first) and one is
//! SIGSTOPped: every acknowledged task is there afterwards, every EU task is
//! in europe (none on north_america while a europe replica was alive), the
//! region's singleton work (a snapshot push, a lease expiry) resumes on a
//! new leader, an agent's lease taken through one replica is renewed and
//! completed through another while a watch through a third sees it, and
//! PostgreSQL itself is crashed and restarted under the load. Prints the
//! leader failover time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use federation_api as api;
use federation_sandbox::pg as pg_sandbox;
use federation_sandbox::{Sandbox, string_attrs};
use support::*;

type AgentClient = api::region_agent_api_client::RegionAgentApiClient<tonic::transport::Channel>;

/// The replicas whose log says they lead now (the last of "leads" and "no
/// longer leads" is "leads"), among `alive`.
fn leaders(sandbox: &Sandbox, alive: &[usize]) -> Vec<usize> {
    alive
        .iter()
        .copied()
        .filter(|&i| {
            let log = sandbox.replica_log_text("europe", i);
            let leads = log.rfind("this replica leads its region");
            let lost = log.rfind("this replica no longer leads its region");
            leads.is_some() && leads > lost
        })
        .collect()
}

/// An agent-service stub at replica `index` of europe, as europe's agent.
async fn agent_at(sandbox: &Sandbox, index: usize) -> AgentClient {
    let addr = sandbox.replica_addr("europe", index).expect("addr");
    let tls = sandbox.client_tls(Some("agent-europe")).expect("agent tls");
    let channel = tls
        .connect(
            &format!("https://{addr}"),
            federation_tls::Expect::Region("europe".into()),
            Duration::from_secs(10),
        )
        .await
        .expect("agent channel");
    AgentClient::new(channel)
}

/// Starts replica `index` again after a SIGKILL: its name's claim in the
/// database may still look held for a moment (exit 64), so it is retried
/// until the replica serves (bounded).
async fn restart(sandbox: &mut Sandbox, index: usize) {
    for _ in 0..20 {
        sandbox.start_replica("europe", index).expect("start");
        let serving = eventually("the replica starts", PATIENCE, || {
            let s = &*sandbox;
            async move {
                if s.replica_client("europe", index).await.is_ok() {
                    return Some(true);
                }
                None
            }
        });
        let exited = async {
            for _ in 0..300 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = serving => return,
            _ = exited => {}
        }
    }
    panic!("replica {index} did not start again");
}

/// The load's outcomes as they arrive.
struct Load {
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<(String, String), String>>,
    acked: Vec<(String, String)>,
    failed: Vec<String>,
}

/// Workers submitting concurrently (each has one call in flight at most).
const WORKERS: usize = 4;

impl Load {
    /// Takes in what has arrived so far.
    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Ok(t) => self.acked.push(t),
                Err(e) => self.failed.push(e),
            }
        }
    }

    /// Waits (bounded) for the next acknowledged task placed in `region`;
    /// its index in `acked`.
    async fn wait_for_region(&mut self, region: &str) -> usize {
        let from = self.acked.len();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.acked[from..].iter().position(|(_, r)| r == region) {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "no task placed in {region} again: {:?}",
                &self.failed[self.failed.len().saturating_sub(5)..]
            );
            match tokio::time::timeout(PATIENCE, self.rx.recv()).await {
                Ok(Some(Ok(t))) => self.acked.push(t),
                Ok(Some(Err(e))) => self.failed.push(e),
                _ => panic!("submits stalled after {} acks", self.acked.len()),
            }
        }
    }

    /// Waits (bounded) for `more` acknowledged submits.
    async fn wait(&mut self, more: usize) {
        let until = self.acked.len() + more;
        let deadline = Instant::now() + PATIENCE;
        while self.acked.len() < until {
            assert!(
                Instant::now() < deadline,
                "submits stalled: {:?}",
                self.failed
            );
            match tokio::time::timeout(PATIENCE, self.rx.recv()).await {
                Ok(Some(Ok(t))) => self.acked.push(t),
                Ok(Some(Err(e))) => self.failed.push(e),
                _ => panic!(
                    "submits stalled after {} acks: {:?}",
                    self.acked.len(),
                    self.failed
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_of_three_replicas_keeps_serving_in_region_through_the_loss_of_each() {
    // A server of its own: the test restarts it.
    let mut server =
        pg_sandbox::PgServer::start().expect("a PostgreSQL server (is PostgreSQL installed?)");
    let url = server.create_database("ha").expect("database");
    let mut sandbox = formed(
        // The product's timers (the failover time is theirs), leases short
        // enough to see one expire.
        seed_sandbox()
            .default_timers()
            .env("FEDERATION__NODE__TIMERS__LEASE_TTL", "3s")
            .env("FEDERATION__NODE__TIMERS__AGENT_TIMEOUT", "3s")
            .agents(0, 1)
            .replicas("europe", 3)
            .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
            .region_env("europe", "FEDERATION__NODE__STORE__URL", &url)
            .region_env("europe", "FEDERATION__NODE__STORE__POOL_SIZE", "4")
            .region_env("europe", "FEDERATION__NODE__REPLICA", "europe-1"),
    )
    .await;
    let mut alive: Vec<usize> = vec![0, 1, 2];

    // Routing from every entry, each europe replica included: EU tasks in
    // europe, US tasks in north_america.
    let mut routed: Vec<(String, String)> = Vec::new();
    let mut entries: Vec<(
        String,
        api::federation_client_client::FederationClientClient<_>,
    )> = Vec::new();
    for i in 0..3 {
        entries.push((
            format!("europe replica {i}"),
            sandbox.replica_client("europe", i).await.expect("client"),
        ));
    }
    for r in ["north_america", "asia_pacific"] {
        entries.push((r.to_string(), sandbox.client(r).await.expect("client")));
    }
    for (entry, c) in &mut entries {
        for (country, region) in [("DE", "europe"), ("US", "north_america")] {
            let r = c
                .submit_task(api::SubmitTaskRequest {
                    attributes: string_attrs(&[("customer_region", country)]),
                    payload: b"route".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("{country} via {entry}: {s:?}"))
                .into_inner();
            assert_eq!(r.region, region, "{country} via {entry}: {r:?}");
            routed.push((r.task_id, r.region));
        }
    }

    // Concurrent load: EU submits through north_america and asia_pacific,
    // forwarded to one europe replica or another.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<(String, String), String>>();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let entry = if w % 2 == 0 {
            "north_america"
        } else {
            "asia_pacific"
        };
        let mut c = sandbox.client(entry).await.expect("client");
        let (tx, stop) = (tx.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let country = ["DE", "UK", "FR"][i % 3];
                let req = api::SubmitTaskRequest {
                    attributes: string_attrs(&[("customer_region", country)]),
                    idempotency_key: format!("w{w}-{i}"),
                    ..Default::default()
                };
                let sent = match c.submit_task(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Ok((r.task_id, r.region))
                    }
                    Err(s) => Err(format!("{entry}: {:?} {}", s.code(), s.message())),
                };
                if tx.send(sent).is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut load = Load {
        rx,
        acked: Vec::new(),
        failed: Vec::new(),
    };
    load.wait(50).await;

    // The leader, and an agent holding two leases through it.
    let leader = eventually("one europe replica leads", PATIENCE, || {
        let l = leaders(&sandbox, &alive);
        async move { (l.len() == 1).then(|| l[0]) }
    })
    .await;
    let mut agent = agent_at(&sandbox, leader).await;
    let agent_id = agent
        .register(api::RegisterRequest {
            name: "ha-agent".into(),
            region: "europe".into(),
            slots: 2,
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .agent_id;
    let leased = agent
        .lease_tasks(api::LeaseTasksRequest {
            agent_id: agent_id.clone(),
            max_tasks: 2,
            wait_ms: 5_000,
        })
        .await
        .expect("lease")
        .into_inner()
        .tasks;
    assert_eq!(leased.len(), 2, "{leased:?}");
    let (kept, dropped) = (leased[0].task_id.clone(), leased[1].task_id.clone());

    // SIGKILL the leader under load.
    let others: Vec<usize> = alive.iter().copied().filter(|&i| i != leader).collect();
    let marks: Vec<usize> = others
        .iter()
        .map(|&i| sandbox.replica_log_text("europe", i).len())
        .collect();
    sandbox
        .kill_replica("europe", leader)
        .expect("kill the leader");
    let killed_at = Instant::now();
    alive.retain(|&i| i != leader);

    // The agent's lease, taken through the dead leader, is renewed and
    // completed through another replica (registering there again under its
    // id, as the agent does after losing its controller).
    let mut other = agent_at(&sandbox, others[0]).await;
    let renew = |a: &mut AgentClient| {
        let mut a = a.clone();
        let (agent_id, kept) = (agent_id.clone(), kept.clone());
        async move {
            a.renew_lease(api::RenewLeaseRequest {
                agent_id,
                task_id: kept,
            })
            .await
        }
    };
    if renew(&mut other).await.is_err() {
        other
            .register(api::RegisterRequest {
                name: "ha-agent".into(),
                region: "europe".into(),
                slots: 2,
                agent_id: agent_id.clone(),
            })
            .await
            .expect("register again under the same id");
        renew(&mut other)
            .await
            .expect("the lease is renewed through another replica");
    }
    // A watch through the third replica, opened before the completion made
    // through `other`, sees it (LISTEN/NOTIFY across replicas).
    let mut watcher = sandbox
        .replica_client("europe", others[1])
        .await
        .expect("client");
    let mut watch = watcher
        .watch_task(api::WatchTaskRequest {
            task_id: kept.clone(),
        })
        .await
        .expect("watch through another replica")
        .into_inner();
    other
        .complete_task(api::CompleteTaskRequest {
            agent_id: agent_id.clone(),
            task_id: kept.clone(),
            success: true,
            result: b"done elsewhere".to_vec(),
            ..Default::default()
        })
        .await
        .expect("completed through another replica");
    let seen = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(event)) = watch.message().await {
            if let Some(t) = event.task {
                if t.state() == api::TaskState::Succeeded {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "a watch through replica {} saw the completion made through replica {}",
        others[1],
        others[0]
    );

    // A new leader: its first singleton action (a snapshot push to
    // north_america, its backup) is the failover time; the dropped lease
    // expires there.
    let (new_leader, first_action) = eventually("a new leader's singleton work", PATIENCE, || {
        let found = others.iter().zip(&marks).find_map(|(&i, &mark)| {
            let log = sandbox.replica_log_text("europe", i);
            let after = log.get(mark..).unwrap_or_default();
            (after.contains("this replica leads its region") && after.contains("snapshot pushed"))
                .then_some(i)
        });
        async move { found.map(|i| (i, killed_at.elapsed())) }
    })
    .await;
    eprintln!(
        "leader failover: SIGKILL of the leader to the new leader's first snapshot push: {} ms (default timers: dead_after 3s, heartbeat 1s)",
        first_action.as_millis()
    );
    let mark = marks[others
        .iter()
        .position(|&i| i == new_leader)
        .expect("one of the others")];
    eventually("the new leader expires the dropped lease", PATIENCE, || {
        let log = sandbox.replica_log_text("europe", new_leader);
        let after = log.get(mark..).unwrap_or_default().to_string();
        let id = dropped.clone();
        async move { (after.contains("lease expired") && after.contains(&id)).then_some(()) }
    })
    .await;
    load.wait(30).await;

    // SIGSTOP a replica (two are left: one stopped, one serving), then
    // SIGCONT; submits keep landing in europe.
    let stopped = alive[0];
    sandbox
        .replica("europe", stopped)
        .expect("replica")
        .signal("STOP")
        .expect("SIGSTOP");
    load.wait(30).await;
    sandbox
        .replica("europe", stopped)
        .expect("replica")
        .signal("CONT")
        .expect("SIGCONT");

    // Each other replica SIGKILLed in turn, the killed ones started again
    // first so that one is always alive.
    restart(&mut sandbox, leader).await;
    alive.push(leader);
    for victim in others {
        load.wait(20).await;
        sandbox.kill_replica("europe", victim).expect("kill");
        alive.retain(|&i| i != victim);
        load.wait(20).await;
        restart(&mut sandbox, victim).await;
        alive.push(victim);
    }
    load.wait(20).await;

    // PostgreSQL itself crashes and comes back (immediate shutdown, then
    // recovery): submits fail UNAVAILABLE meanwhile, every replica
    // reconnects by itself, and submits land in europe again.
    // While europe cannot store, the seed's EU rule allows its backup
    // (north_america), so EU tasks may go there in that window only: from
    // the crash until europe stores again (plus each worker's one call in
    // flight then).
    load.drain();
    let outage_from = load.acked.len();
    server.crash().expect("crash PostgreSQL");
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again().expect("PostgreSQL starts again");
    load.drain();
    let outage_to = load.wait_for_region("europe").await + WORKERS;
    load.wait(20).await;

    // The agent, now at one replica, holds a lease there for longer than
    // `agent_timeout` while a replica that loaded its registration at its
    // start (restarted meanwhile) never hears it: that replica does not
    // forget it (and requeue its lease), renewals keep working.
    let at = alive[0];
    let mut here = agent_at(&sandbox, at).await;
    here.register(api::RegisterRequest {
        name: "ha-agent".into(),
        region: "europe".into(),
        slots: 2,
        agent_id: agent_id.clone(),
    })
    .await
    .expect("register again under the same id");
    let held = here
        .lease_tasks(api::LeaseTasksRequest {
            agent_id: agent_id.clone(),
            max_tasks: 1,
            wait_ms: 5_000,
        })
        .await
        .expect("lease")
        .into_inner()
        .tasks;
    assert_eq!(held.len(), 1, "{held:?}");
    // The agent heartbeats its replica throughout, registering again under
    // its id when that replica says it forgot it (as the agent does).
    let beating = Arc::new(AtomicBool::new(true));
    let heartbeats = {
        let (mut here, agent_id, beating) = (here.clone(), agent_id.clone(), beating.clone());
        tokio::spawn(async move {
            for _ in 0..600 {
                if !beating.load(Ordering::SeqCst) {
                    return;
                }
                let beat = here
                    .heartbeat(api::HeartbeatRequest {
                        agent_id: agent_id.clone(),
                        ..Default::default()
                    })
                    .await;
                if matches!(&beat, Err(s) if s.code() == tonic::Code::NotFound) {
                    let _ = here
                        .register(api::RegisterRequest {
                            name: "ha-agent".into(),
                            region: "europe".into(),
                            slots: 2,
                            agent_id: agent_id.clone(),
                        })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // Another replica restarts: it loads the agent's registration, and
    // never hears the agent.
    let y = alive[1];
    sandbox.kill_replica("europe", y).expect("kill");
    restart(&mut sandbox, y).await;
    for round in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        here.renew_lease(api::RenewLeaseRequest {
            agent_id: agent_id.clone(),
            task_id: held[0].task_id.clone(),
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "round {round}: the lease was taken from a live agent: {s:?}\n{}",
                (0..3)
                    .map(|i| sandbox.replica_log_text("europe", i))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .lines()
                    .filter(|l| l.contains("agent"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    }
    beating.store(false, Ordering::SeqCst);
    let _ = tokio::time::timeout(PATIENCE, heartbeats).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = tokio::time::timeout(PATIENCE, w).await;
    }
    while let Ok(m) = load.rx.try_recv() {
        match m {
            Ok(t) => load.acked.push(t),
            Err(e) => load.failed.push(e),
        }
    }
    let Load { acked, failed, .. } = load;
    eprintln!(
        "{} submits acknowledged, {} refused: {:?}",
        acked.len(),
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // No EU task outside europe (a europe replica was alive throughout),
    // none outside its rule's candidates; every acknowledged task present.
    let misplaced: Vec<_> = acked
        .iter()
        .filter(|(id, region)| {
            (region != "europe" && region != "north_america")
                || !id.ends_with(&format!(".{region}"))
        })
        .collect();
    assert!(
        misplaced.is_empty(),
        "outside the candidates: {misplaced:?}"
    );
    let eu_on_na = acked
        .iter()
        .enumerate()
        .filter(|(i, (_, region))| {
            region == "north_america" && !(outage_from..outage_to).contains(i)
        })
        .count();
    let on_na: Vec<usize> = acked
        .iter()
        .enumerate()
        .filter(|(_, (_, region))| region == "north_america")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        eu_on_na,
        0,
        "EU tasks on north_america while europe was alive (outside the database's outage, acks {outage_from}..{outage_to}): at {:?}",
        &on_na[..on_na.len().min(40)]
    );
    let mut c = sandbox
        .replica_client("europe", alive[0])
        .await
        .expect("client");
    let mut missing = Vec::new();
    for (id, _) in acked.iter().chain(&routed) {
        match c
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
        {
            Ok(r) if r.get_ref().task.is_some() => {}
            Ok(_) => missing.push(format!("{id}: no task")),
            Err(s) => missing.push(format!("{id}: {:?}", s.code())),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let done = c
        .get_task(api::GetTaskRequest { task_id: kept })
        .await
        .expect("get")
        .into_inner()
        .task
        .expect("task");
    assert_eq!(done.state(), api::TaskState::Succeeded, "{done:?}");
    assert_eq!(done.result, b"done elsewhere");

    // north_america's replication reaches every replica of europe (its
    // backup for US tasks), so whichever replica leads when a takeover is
    // due holds a copy of its own.
    for i in 0..3 {
        let dir = sandbox
            .replica_data_dir("europe", i)
            .expect("data dir")
            .join("snapshots");
        let copies = ["north_america.snap", "north_america.changes"]
            .iter()
            .filter(|f| dir.join(f).exists())
            .count();
        assert!(
            copies > 0,
            "europe replica {i} holds no copy of north_america in {}",
            dir.display()
        );
    }
}

/// `federation health --addr ADDR`: the status it prints.
fn health(addr: std::net::SocketAddr) -> String {
    let out = std::process::Command::new(federation_exe())
        .args(["health", "--addr", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("federation health runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A submit's outcome through an entry: (task id, region) or the error.
type Outcome = (&'static str, Result<(String, String), String>);

/// Submits EU tasks through `client` until `stop`, sending each outcome.
fn submit_eu(
    mut client: api::federation_client_client::FederationClientClient<tonic::transport::Channel>,
    entry: &'static str,
    worker: usize,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..100_000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let req = api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", ["DE", "UK", "FR"][i % 3])]),
                idempotency_key: format!("{}-{worker}-{i}", entry.replace(' ', "_")),
                ..Default::default()
            };
            let sent = match client.submit_task(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Ok((r.task_id, r.region))
                }
                Err(s) => Err(format!("{entry}: {:?} {}", s.code(), s.message())),
            };
            if tx.send((entry, sent)).is_err() {
                return;
            }
            // Paced: the point is the drain, not throughput.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// `federation drain` on one replica of a region whose store is its
/// database drains that replica only: submits through it and through a peer
/// keep landing in europe (none on north_america, none refused) while its
/// sibling stores them, it reports NOT_SERVING while the sibling serves, it
/// gives up the region's leadership at once (europe's `dead_after` is a
/// minute, so a leadership that merely expired would not move within the
/// test's patience), the agent connected to it moves to the sibling and
/// keeps running tasks there, and the drain is empty for the replica while
/// the region still holds tasks; `undrain` resumes it. Last, the leader's
/// SIGTERM passes the lead on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_works_per_replica() {
    let url = pg_sandbox::shared()
        .expect("a PostgreSQL server (is PostgreSQL installed?)")
        .create_database("drain")
        .expect("database");
    let mut sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .replicas("europe", 2)
            .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
            .region_env("europe", "FEDERATION__NODE__STORE__URL", &url)
            .region_env("europe", "FEDERATION__NODE__STORE__POOL_SIZE", "4")
            .region_env("europe", "FEDERATION__NODE__REPLICA", "europe-1")
            .region_env("europe", "FEDERATION__NODE__TIMERS__DEAD_AFTER", "60s"),
    )
    .await;
    let drained = eventually("one europe replica leads", PATIENCE, || {
        let l = leaders(&sandbox, &[0, 1]);
        async move { (l.len() == 1).then(|| l[0]) }
    })
    .await;
    let sibling = 1 - drained;
    // An agent given both replicas, the leader first: it runs its tasks
    // through the leader until the drain. One slot, a second a task: the
    // region's queue outgrows it.
    sandbox
        .start_agent_at("europe", "sleep 1", 1, &[drained, sibling])
        .expect("agent");

    // EU submits through north_america (forwarded to a europe replica) and
    // through the replica to be drained itself.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_direct = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for w in 0..2 {
        let c = sandbox.client("north_america").await.expect("client");
        workers.push(submit_eu(c, "north_america", w, stop.clone(), tx.clone()));
        let c = sandbox
            .replica_client("europe", drained)
            .await
            .expect("client");
        workers.push(submit_eu(
            c,
            "the drained replica",
            w,
            stop_direct.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let mut acked: Vec<(&str, String, String)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut take = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<_>,
                    acked: &mut Vec<(&str, String, String)>| {
        while let Ok((entry, m)) = rx.try_recv() {
            match m {
                Ok((id, region)) => acked.push((entry, id, region)),
                Err(e) => failed.push(e),
            }
        }
    };
    eventually("submits flow", PATIENCE, || {
        take(&mut rx, &mut acked);
        let n = acked.len();
        async move { (n >= 20).then_some(()) }
    })
    .await;
    eventually("the agent runs a task through the leader", PATIENCE, || {
        let log = sandbox.replica_log_text("europe", drained);
        async move { log.contains("task completed").then_some(()) }
    })
    .await;

    // Drain the leader replica.
    let mark = sandbox.replica_log_text("europe", sibling).len();
    let mut admin = sandbox
        .replica_admin("europe", drained)
        .await
        .expect("admin");
    let first = admin
        .drain(api::DrainRequest { drain: true })
        .await
        .expect("drain")
        .into_inner();
    assert!(first.draining && first.per_replica, "{first:?}");
    assert_eq!(
        first.replica,
        format!("europe-{}", drained + 1),
        "{first:?}"
    );
    assert!(
        !first.leader,
        "a drained replica gives the lead up: {first:?}"
    );
    take(&mut rx, &mut acked);
    let from = acked.len();

    // The sibling leads at once (not after europe's dead_after of 60 s).
    leads_after(
        &sandbox,
        sibling,
        mark,
        "the sibling takes the region's lead",
    )
    .await;
    // Readiness: the drained replica NOT_SERVING, its sibling SERVING.
    let (drained_health, sibling_health) = (
        sandbox
            .replica_health_addr("europe", drained)
            .expect("addr"),
        sandbox
            .replica_health_addr("europe", sibling)
            .expect("addr"),
    );
    eventually("the drained replica reports NOT_SERVING", PATIENCE, || {
        let s = health(drained_health);
        async move { s.contains("NOT_SERVING").then_some(()) }
    })
    .await;
    let s = health(sibling_health);
    assert!(s.contains("SERVING") && !s.contains("NOT_SERVING"), "{s}");
    // The agent moves to the sibling (its id kept) and runs tasks there.
    eventually("the agent runs tasks through the sibling", PATIENCE, || {
        let log = sandbox.replica_log_text("europe", sibling);
        let after = log.get(mark..).unwrap_or_default().to_string();
        async move {
            (after.contains("agent registered")
                && after.contains("resumed=true")
                && after.contains("task completed"))
            .then_some(())
        }
    })
    .await;
    // Submits through the drained replica and through the peer keep being
    // acknowledged, in europe.
    let until = Instant::now() + PATIENCE;
    loop {
        take(&mut rx, &mut acked);
        let count = |entry: &str| acked[from..].iter().filter(|(e, ..)| *e == entry).count();
        let (direct, peer) = (count("the drained replica"), count("north_america"));
        if direct >= 20 && peer >= 20 {
            break;
        }
        assert!(
            Instant::now() < until,
            "submits while draining: {direct} through the drained replica, {peer} through north_america; failed: {:?}",
            &failed[failed.len().saturating_sub(5)..]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The clients of the drained replica go (as Kubernetes' readiness makes
    // them): its drain becomes empty while the region still holds tasks.
    stop_direct.store(true, Ordering::SeqCst);
    let empty = eventually("the drained replica is empty", PATIENCE, || {
        let mut admin = admin.clone();
        async move {
            let r = admin
                .drain(api::DrainRequest { drain: true })
                .await
                .expect("drain")
                .into_inner();
            r.empty.then_some(r)
        }
    })
    .await;
    assert_eq!(
        (empty.in_flight, empty.agents, empty.leader),
        (0, 0, false),
        "{empty:?}"
    );
    assert!(
        empty.queued + empty.leased > 0,
        "the region still holds tasks, served by the sibling: {empty:?}"
    );

    // Undrain: serving again.
    let resumed = admin
        .drain(api::DrainRequest { drain: false })
        .await
        .expect("undrain")
        .into_inner();
    assert!(!resumed.draining && !resumed.empty, "{resumed:?}");
    eventually("the replica serves again", PATIENCE, || {
        let s = health(drained_health);
        async move { (s.contains("SERVING") && !s.contains("NOT_SERVING")).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    take(&mut rx, &mut acked);
    assert!(failed.is_empty(), "refused submits: {failed:?}");
    let outside: Vec<_> = acked.iter().filter(|(_, _, r)| r != "europe").collect();
    assert!(
        outside.is_empty(),
        "EU tasks placed outside europe while a europe replica served: {outside:?}"
    );

    // A drill takes the whole region out: given one replica, it drains the
    // siblings that replica names too (draining one alone leaves europe
    // serving, and the drill would never see it unavailable).
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("drill.json");
    let mut cmd = std::process::Command::new(federation_exe());
    cmd.arg("drill")
        .arg("--controller")
        .arg(sandbox.addr("north_america").expect("addr").to_string())
        .args([
            "--region",
            "europe",
            "--duration",
            "1s",
            "--patience",
            "30s",
        ])
        .arg("--region-controller")
        .arg(
            sandbox
                .replica_addr("europe", drained)
                .expect("addr")
                .to_string(),
        )
        .arg("--policy")
        .arg(sandbox.config_path())
        .arg("--report")
        .arg(&report);
    for (k, v) in sandbox.cli_env("operator").expect("env") {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("drill runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    let json = std::fs::read_to_string(&report).expect("report");
    let sibling_port = sandbox
        .replica_addr("europe", sibling)
        .expect("addr")
        .port()
        .to_string();
    assert!(
        json.contains("drained europe (Drain at") && json.contains(&sibling_port),
        "the drill drains both replicas: {json}"
    );
    for i in [drained, sibling] {
        let addr = sandbox.replica_health_addr("europe", i).expect("addr");
        eventually("every replica serves after the drill", PATIENCE, || {
            let s = health(addr);
            async move { (s.contains("SERVING") && !s.contains("NOT_SERVING")).then_some(()) }
        })
        .await;
    }

    // A rolling upgrade's SIGTERM of the leader: it gives the lead up as it
    // stops, so the other replica leads at its next heartbeat (not after
    // europe's dead_after of 60 s, longer than the test waits).
    let leader = eventually("one europe replica leads", PATIENCE, || {
        let l = leaders(&sandbox, &[0, 1]);
        async move { (l.len() == 1).then(|| l[0]) }
    })
    .await;
    let other = 1 - leader;
    let mark = sandbox.replica_log_text("europe", other).len();
    sandbox
        .replica("europe", leader)
        .expect("leader")
        .signal("TERM")
        .expect("SIGTERM");
    leads_after(
        &sandbox,
        other,
        mark,
        "the other replica leads after the SIGTERM",
    )
    .await;
}

/// Waits until europe's replica `index` logs that it leads, past byte
/// `mark` of its log.
async fn leads_after(sandbox: &Sandbox, index: usize, mark: usize, what: &str) {
    eventually(what, PATIENCE, || {
        let log = sandbox.replica_log_text("europe", index);
        let after = log.get(mark..).unwrap_or_default().to_string();
        async move {
            after
                .contains("this replica leads its region")
                .then_some(())
        }
    })
    .await;
}
