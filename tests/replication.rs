//! Snapshot replication and takeover, end to end on real controller and
//! agent processes: what each peer actually receives (residency), a dead
//! primary's tasks run once by its backup, failback hold-down, the change
//! stream between snapshots (no finished work run again, and the loss bound
//! when a primary is destroyed with its disk, with the seed's 300 s
//! `sync_interval`), and the snapshot metrics on the admin port.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use federation::replication::envelope::{NonceSource, Pipeline, SealParams};
use federation::replication::{BodyFormat, Key, KeyRing, SnapshotBody, receiver, seal_snapshot};
use federation_api as api;
use federation_sandbox::{Sandbox, SandboxBuilder, string_attrs};
use support::*;

const SYNC: &str = "300ms";

fn builder(policy: &str) -> SandboxBuilder {
    SandboxBuilder::new(federation_exe(), policy.to_string())
        .agents(0, 1)
        .env(
            "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
            SYNC,
        )
        .env("FEDERATION__NODE__TIMERS__TAKEOVER_GRACE", "1s")
}

fn submit(customer: &str, priority: i32) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", customer), ("data_class", "pii")]),
        payload: b"work".to_vec(),
        priority,
        ..Default::default()
    }
}

async fn submit_many(sb: &Sandbox, entry: &str, customer: &str, n: usize) -> Vec<String> {
    let mut client = sb.client(entry).await.expect("client");
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = client
            .submit_task(submit(customer, 0))
            .await
            .expect("accepted")
            .into_inner();
        ids.push(r.task_id);
    }
    ids
}

/// The stored snapshot `holder` has of `source`: (sequence, pending task ids).
fn stored(sb: &Sandbox, holder: &str, source: &str) -> Option<(u64, BTreeSet<String>)> {
    let ring = KeyRing::load_file(&sb.keys_path()).expect("sandbox ring");
    let path = receiver::snapshot_path(&sb.data_dir(holder).expect("dir"), source);
    if !path.exists() {
        return None;
    }
    let (h, body) = receiver::open_file(&path, &ring).ok()?;
    Some((
        h.sequence,
        body.tasks.into_iter().map(|t| t.task_id).collect(),
    ))
}

async fn wait_holds(sb: &Sandbox, holder: &str, source: &str, ids: &[String]) {
    eventually(
        &format!("{holder} holding {source}'s tasks"),
        PATIENCE,
        || async {
            let (_, held) = stored(sb, holder, source)?;
            ids.iter().all(|i| held.contains(i)).then_some(())
        },
    )
    .await;
}

fn ran(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn exec_into(file: &Path) -> String {
    format!(
        "printf '%s\\n' \"$FEDERATION_TASK_ID\" >> '{}'",
        file.display()
    )
}

/// Starts a sandbox of `policy`, queues US tasks in north_america and DE
/// tasks in europe (no agents: they stay pending), and returns what
/// north_america ends up holding of europe's after two more sync rounds.
async fn eu_tasks_reaching_north_america(policy: &str) -> (usize, usize) {
    let sb = formed(builder(policy)).await;
    let us = submit_many(&sb, "north_america", "US", 3).await;
    let de = submit_many(&sb, "europe", "DE", 3).await;
    // north_america's US tasks reach their backup, europe.
    wait_holds(&sb, "europe", "north_america", &us).await;
    // Two more rounds from europe to north_america after the DE tasks were
    // acknowledged: anything allowed would be there by then.
    let before = stored(&sb, "north_america", "europe").map_or(0, |s| s.0);
    let (_, held) = eventually("two more snapshots from europe", PATIENCE, || async {
        stored(&sb, "north_america", "europe").filter(|(seq, _)| *seq >= before + 2)
    })
    .await;
    // asia_pacific backs nobody up: it holds nothing.
    let ap = sb.data_dir("asia_pacific").expect("dir").join("snapshots");
    let ap_files = std::fs::read_dir(&ap).map(|d| d.count()).unwrap_or(0);
    assert_eq!(ap_files, 0, "asia_pacific received snapshots");
    // The change stream too: north_america's copy (snapshot plus batches)
    // holds exactly what its snapshots may, and europe never sent it a task
    // it may not hold (a refused one would count as `residency`).
    let ring = KeyRing::load_file(&sb.keys_path()).expect("ring");
    let copy = receiver::Receiver::open_read_only(
        "north_america",
        &sb.data_dir("north_america").expect("dir"),
        Some(ring),
        federation::replication::Limits::default(),
    );
    let in_copy: BTreeSet<String> = copy
        .pending_of("europe")
        .map(|(_, t)| t.into_iter().map(|t| t.task_id).collect())
        .unwrap_or_default();
    let reached_copy = de.iter().filter(|i| in_copy.contains(*i)).count();
    let na_metrics = scrape(&sb, "north_america").await;
    assert_eq!(
        sample(
            &na_metrics,
            "federation_snapshots_rejected_total{reason=\"residency\"}"
        ),
        Some(0.0),
        "europe sent north_america a task it may not hold"
    );
    let reached = de.iter().filter(|i| held.contains(*i)).count();
    assert_eq!(reached_copy, reached, "the copy and the snapshot disagree");
    eprintln!(
        "policy variant: {reached} of {} DE tasks reached north_america",
        de.len()
    );
    (reached, de.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_only_where_residency_allows() {
    // As written: the EU rule's backup is north_america, no tag required.
    let (reached, total) = eu_tasks_reaching_north_america(SEED).await;
    assert_eq!(reached, total, "as written, north_america backs europe up");
    // The EU rule requires GDPR: north_america lacks it and gets none.
    let (reached, _) = eu_tasks_reaching_north_america(&seed_requires_gdpr()).await;
    assert_eq!(reached, 0, "GDPR data reached a region without GDPR");
    // A data-class requirement (pii of EU customers needs GDPR) does the same.
    let data_class = include_str!("../policies/seed-data-class-gdpr.yaml");
    let (reached, _) = eu_tasks_reaching_north_america(data_class).await;
    assert_eq!(reached, 0, "EU pii reached a region without GDPR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_over_a_dead_primary_which_does_not_run_them_again() {
    let mut sb = formed(
        builder(SEED)
            .env("FEDERATION__NODE__TIMERS__FAILBACK_HOLD_DOWN", "3s")
            .env("FEDERATION__NODE__TIMERS__STARTUP_FENCE", "60s"),
    )
    .await;
    let eu_file = sb.dir().join("ran-europe");
    let na_file = sb.dir().join("ran-north_america");
    sb.start_agent_with("europe", &exec_into(&eu_file), 2)
        .expect("europe agent");

    // north_america has no agent: its US tasks stay queued.
    let ids = submit_many(&sb, "north_america", "US", 5).await;
    wait_holds(&sb, "europe", "north_america", &ids).await;
    sb.kill_controller("north_america").expect("kill");

    // After the grace, europe runs them.
    eventually("europe running the taken-over tasks", PATIENCE, || async {
        let done = ran(&eu_file);
        ids.iter().all(|i| done.contains(i)).then_some(())
    })
    .await;
    // Reading one through a third region finds it at europe, marked.
    let t = sb
        .wait_terminal("asia_pacific", &ids[0], PATIENCE)
        .await
        .expect("readable");
    assert_eq!(t.state(), api::TaskState::Succeeded);
    let to = t.taken_over.expect("marked taken over");
    assert_eq!(
        (to.from_region.as_str(), to.to_region.as_str()),
        ("north_america", "europe")
    );

    // north_america returns with an agent of its own.
    sb.start_controller("north_america").expect("restart");
    sb.start_agent_with("north_america", &exec_into(&na_file), 2)
        .expect("na agent");
    sb.wait_for_states("europe", &[("north_america", "alive")], PATIENCE)
        .await
        .expect("back");
    // Failback hold-down: new US tasks still go to europe for a while.
    let mut eu = sb.client("europe").await.expect("client");
    let first = eu
        .submit_task(submit("US", 0))
        .await
        .expect("placed")
        .into_inner();
    let d = first.decision.expect("decision");
    let na = d
        .candidates
        .iter()
        .find(|c| c.region == "north_america")
        .expect("primary");
    assert_eq!(
        (first.region.as_str(), na.reason.as_str()),
        ("europe", "hold_down"),
        "{d:?}"
    );
    eventually("hold-down over", PATIENCE, || {
        let mut c = eu.clone();
        async move {
            let d = c
                .explain_route(api::ExplainRouteRequest {
                    attributes: submit("US", 0).attributes,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .decision?;
            (d.region == "north_america").then_some(())
        }
    })
    .await;
    // north_america has heard europe (its notices, and the fence lifted).
    // A low-priority task queued now is leased after any old task that was
    // still runnable there: once it ran, none of the old ones did.
    sb.wait_for_states("north_america", &[("europe", "alive")], PATIENCE)
        .await
        .expect("heard europe");
    let mut na_client = sb.client("north_america").await.expect("client");
    let probe = na_client
        .submit_task(submit("US", -1))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(probe.region, "north_america");
    eventually(
        "the probe task running in north_america",
        PATIENCE,
        || async { ran(&na_file).contains(&probe.task_id).then_some(()) },
    )
    .await;
    let na_ran = ran(&na_file);
    let eu_ran = ran(&eu_file);
    let twice: Vec<&String> = ids.iter().filter(|i| na_ran.contains(*i)).collect();
    eprintln!(
        "executions: europe ran {} of the {} taken-over tasks, north_america ran {} of them again",
        ids.iter().filter(|i| eu_ran.contains(*i)).count(),
        ids.len(),
        twice.len()
    );
    assert!(
        twice.is_empty(),
        "ran again by the returning primary: {twice:?}"
    );
    // Each ran exactly once at europe.
    for id in &ids {
        assert_eq!(eu_ran.iter().filter(|r| *r == id).count(), 1, "{id}");
    }
    // The returning primary now reports them through europe.
    let t = sb
        .wait_terminal("north_america", &ids[1], PATIENCE)
        .await
        .expect("readable");
    assert_eq!(t.state(), api::TaskState::Succeeded);
    // The takeover is in europe's decision log.
    let log = std::fs::read_to_string(sb.data_dir("europe").expect("dir").join("decisions.jsonl"))
        .expect("log");
    let takeovers = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"takeover\""))
        .count();
    assert_eq!(takeovers, ids.len(), "one takeover record per task");
}

/// `/metrics` of `region`.
async fn scrape(sb: &Sandbox, region: &str) -> String {
    let admin = sb.admin_http_addr(region).expect("admin addr");
    tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .expect("join")
}

/// The value of the sample `series` (name and labels, as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_metrics_show_pushes_ages_and_rejections_by_reason() {
    let sb = formed(builder(SEED)).await;
    let ids = submit_many(&sb, "north_america", "US", 3).await;
    wait_holds(&sb, "europe", "north_america", &ids).await;

    // Two pushes europe must refuse, sent over north_america's own peer
    // identity: one sealed under other key bytes with the ring's key id, and
    // one missing its last chunk.
    let ring = KeyRing::load_file(&sb.keys_path()).expect("sandbox ring");
    let key = ring.current().expect("current key");
    let wrong = Key::new(key.id(), rand::random());
    let body = SnapshotBody {
        source_region: "north_america".into(),
        epoch: 1,
        sequence: u64::MAX,
        ..Default::default()
    };
    let params = SealParams {
        source: "north_america".into(),
        epoch: 1,
        sequence: u64::MAX,
        rule_indexes: vec![0],
        policy_hash: String::new(),
        compression: Some(3),
        chunk_size: 16,
    };
    let seal = |key: &Key| {
        seal_snapshot(
            &body,
            BodyFormat::Prost,
            &params,
            key,
            &NonceSource::new(),
            Pipeline::Off,
        )
        .expect("seal")
    };
    let wrong_key = seal(&wrong);
    let mut truncated = seal(key);
    assert!(truncated.len() > 1, "several chunks");
    truncated.pop();
    let channel = sb
        .peer_channel("europe", "north_america")
        .await
        .expect("peer channel");
    let mut peer = api::federation_peer_client::FederationPeerClient::new(channel);
    for (chunks, why) in [
        (wrong_key, "authentication failed"),
        (truncated, "truncated"),
    ] {
        let resp = peer
            .push_snapshot(tokio_stream::iter(chunks))
            .await
            .expect("answered")
            .into_inner();
        assert!(!resp.accepted && resp.reason.contains(why), "{resp:?}");
    }

    // europe: the rejections by reason (every reason exposed), the snapshots
    // it accepted, and the age of the one it holds from north_america.
    let eu = scrape(&sb, "europe").await;
    for reason in receiver::REJECTION_REASONS {
        let series = format!("federation_snapshots_rejected_total{{reason=\"{reason}\"}}");
        let n = sample(&eu, &series).unwrap_or_else(|| panic!("no `{series}` in:\n{eu}"));
        if matches!(reason, "auth" | "truncated") {
            assert_eq!(n, 1.0, "{series}");
        }
    }
    assert!(
        sample(&eu, "federation_snapshots_accepted_total").is_some_and(|n| n >= 1.0),
        "{eu}"
    );
    let age = sample(
        &eu,
        "federation_snapshot_age_seconds{region=\"north_america\"}",
    );
    assert!(age.is_some_and(|a| a >= 0.0 && a.is_finite()), "{eu}");

    // north_america: what its pushes to europe weighed, once one has been
    // answered (the answer may trail the stored file).
    let na = eventually("north_america's push metrics", PATIENCE, || async {
        let na = scrape(&sb, "north_america").await;
        sample(&na, "federation_snapshots_sent_total")
            .is_some_and(|n| n >= 1.0)
            .then_some(na)
    })
    .await;
    for series in [
        "federation_snapshot_bytes{region=\"europe\"}",
        "federation_snapshot_compression_ratio{region=\"europe\"}",
    ] {
        assert!(
            sample(&na, series).is_some_and(|v| v > 0.0),
            "no positive `{series}` in:\n{na}"
        );
    }
}

/// The stream between snapshots, measured with the seed's own
/// `sync_interval` (300 s): north_america is restarted once so that europe
/// holds a snapshot (taken at that start) listing tasks as queued; they
/// then run and finish at north_america, more tasks are accepted, and
/// north_america is destroyed with its disk. Only the change stream can
/// tell europe that the first tasks finished and that the later ones exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_bounds_rerun_and_loss_to_two_heartbeats() {
    const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);
    let mut sb = formed(
        SandboxBuilder::new(federation_exe(), SEED)
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__HEARTBEAT_INTERVAL", "250ms")
            .env("FEDERATION__NODE__TIMERS__TAKEOVER_GRACE", "5s"),
    )
    .await;
    let na_file = sb.dir().join("ran-north_america");
    let eu_file = sb.dir().join("ran-europe");

    // Queued at north_america (no agent yet), then north_america restarts:
    // its start-up snapshot reaches europe with these tasks queued.
    let finished = submit_many(&sb, "north_america", "US", 8).await;
    sb.kill_controller("north_america").expect("kill");
    sb.start_controller("north_america").expect("restart");
    wait_holds(&sb, "europe", "north_america", &finished).await;
    let (snapshot_sequence, _) = stored(&sb, "europe", "north_america").expect("snapshot");

    // They run and finish at north_america.
    sb.start_agent_with("north_america", &exec_into(&na_file), 4)
        .expect("na agent");
    for id in &finished {
        let t = sb
            .wait_terminal("north_america", id, PATIENCE)
            .await
            .expect("finishes");
        assert_eq!(t.state(), api::TaskState::Succeeded);
    }
    let finished_at = std::time::Instant::now();
    sb.kill_agent("north_america", 0).expect("agent stops");
    // Accepted well before the end, and in the last moments.
    let early = submit_many(&sb, "north_america", "US", 5).await;
    let early_at = std::time::Instant::now();
    tokio::time::sleep(HEARTBEAT * 4).await;
    let late = submit_many(&sb, "north_america", "US", 5).await;
    let killed_at = std::time::Instant::now();
    sb.kill_controller("north_america").expect("kill");
    std::fs::remove_dir_all(sb.data_dir("north_america").expect("dir"))
        .expect("destroy the primary's disk");

    // What europe holds of north_america now (snapshot plus changes).
    let ring = KeyRing::load_file(&sb.keys_path()).expect("ring");
    let eu_dir = sb.data_dir("europe").expect("dir");
    let copy = receiver::Receiver::open_read_only(
        "europe",
        &eu_dir,
        Some(ring),
        federation::replication::Limits::default(),
    );
    let (_, held) = copy.pending_of("north_america").expect("a copy");
    let held: BTreeSet<String> = held.into_iter().map(|t| t.task_id).collect();
    sb.start_agent_with("europe", &exec_into(&eu_file), 4)
        .expect("europe agent");
    eventually(
        "europe running every task of its copy",
        PATIENCE,
        || async {
            let done = ran(&eu_file);
            held.iter().all(|i| done.contains(i)).then_some(())
        },
    )
    .await;
    let eu_ran = ran(&eu_file);
    let rerun: Vec<&String> = finished.iter().filter(|i| eu_ran.contains(*i)).collect();
    let lost_early: Vec<&String> = early.iter().filter(|i| !eu_ran.contains(*i)).collect();
    let lost_late = late.iter().filter(|i| !eu_ran.contains(*i)).count();
    let (sequence_now, _) = stored(&sb, "europe", "north_america").expect("snapshot");
    eprintln!(
        "change stream (heartbeat {HEARTBEAT:?}, sync_interval 300 s): {} tasks finished {:?} before the kill, {} of them run again by europe; \
         {} accepted {:?} before the kill, {} lost; {} accepted in the last {:?}, {} lost; europe's snapshot of north_america: sequence {snapshot_sequence} then {sequence_now}",
        finished.len(),
        killed_at - finished_at,
        rerun.len(),
        early.len(),
        killed_at - early_at,
        lost_early.len(),
        late.len(),
        killed_at.saturating_duration_since(early_at + HEARTBEAT * 4),
        lost_late,
    );
    assert_eq!(
        sequence_now, snapshot_sequence,
        "no snapshot since the restart"
    );
    assert!(rerun.is_empty(), "finished work run again: {rerun:?}");
    assert!(
        lost_early.is_empty(),
        "acknowledged tasks lost: {lost_early:?}"
    );
    assert!(lost_late <= late.len());
    // asia_pacific backs nobody up: it received neither snapshots nor changes.
    let ap = sb.data_dir("asia_pacific").expect("dir").join("snapshots");
    assert_eq!(std::fs::read_dir(&ap).map(|d| d.count()).unwrap_or(0), 0);
}

/// What `holder`'s copy of `source` knows of idempotency key `key`.
fn copy_knows(sb: &Sandbox, holder: &str, source: &str, key: &str) -> Option<String> {
    let ring = KeyRing::load_file(&sb.keys_path()).expect("ring");
    let rx = receiver::Receiver::open_read_only(
        holder,
        &sb.data_dir(holder).expect("dir"),
        Some(ring),
        federation::replication::Limits::default(),
    );
    rx.with_copy(source, |c| c.key(key).map(|k| k.task_id))
        .flatten()
}

fn keyed(customer: &str, key: &str, payload: &[u8]) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        idempotency_key: key.into(),
        payload: payload.to_vec(),
        ..submit(customer, 0)
    }
}

/// Stops europe and waits until north_america has declared it dead, so that
/// nothing north_america accepts next reaches europe.
async fn cut_off_europe(sb: &mut Sandbox) {
    sb.controller("europe")
        .expect("running")
        .signal("STOP")
        .expect("stop");
    sb.wait_for_states("north_america", &[("europe", "dead")], PATIENCE)
        .await
        .expect("europe dead to north_america");
}

/// A client of `region` once its controller answers (after a restart).
/// north_america accepts a task under `key` while europe cannot hear of it
/// (stopped), then dies; returns once europe, resumed, has seen it dead.
async fn primary_accepts_unheard_then_dies(sb: &mut Sandbox, key: &str) -> api::SubmitTaskResponse {
    cut_off_europe(sb).await;
    let mut na = answering(sb, "north_america").await;
    let accepted = na
        .submit_task(keyed("US", key, b"work"))
        .await
        .expect("accepted")
        .into_inner();
    sb.kill_controller("north_america").expect("kill");
    sb.controller("europe")
        .expect("running")
        .signal("CONT")
        .expect("cont");
    sb.wait_for_states("europe", &[("north_america", "dead")], PATIENCE)
        .await
        .expect("dead");
    accepted
}

async fn answering(
    sb: &Sandbox,
    region: &str,
) -> api::federation_client_client::FederationClientClient<tonic::transport::Channel> {
    eventually(&format!("{region} answering"), PATIENCE, || async {
        let mut c = sb.client(region).await.ok()?;
        c.explain_route(api::ExplainRouteRequest {
            attributes: submit("US", 0).attributes,
            ..Default::default()
        })
        .await
        .ok()?;
        Some(c)
    })
    .await
}

fn decisions(sb: &Sandbox, region: &str) -> Vec<String> {
    std::fs::read_to_string(sb.data_dir(region).expect("dir").join("decisions.jsonl"))
        .expect("log")
        .lines()
        .map(str::to_string)
        .collect()
}

/// One idempotency key, one task, across the primary's death and return:
/// the backup answers a retry with the original task from its replicated
/// copy, refuses the key for other content (as the primary does), and
/// resolves the pairs it could not prevent once the primary is back: the
/// later one cancelled when neither started, recorded and counted when both
/// ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_one_task_across_failover() {
    let mut sb = formed(
        SandboxBuilder::new(federation_exe(), SEED)
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__TAKEOVER_GRACE", "120s")
            .env("FEDERATION__NODE__TIMERS__STARTUP_FENCE", "5s"),
    )
    .await;
    let mut na = sb.client("north_america").await.expect("client");

    // K1 at the primary; reusing it for other content is refused there.
    let t1 = na
        .submit_task(keyed("US", "K1", b"work"))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(t1.region, "north_america");
    for (req, differs) in [
        (keyed("US", "K1", b"other"), "payload"),
        (keyed("CA", "K1", b"work"), "attributes"),
    ] {
        let err = na.submit_task(req).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{}", err.message());
        assert!(
            err.message().contains("`K1`") && err.message().contains(differs),
            "{}",
            err.message()
        );
    }
    eventually("europe's copy knowing K1", PATIENCE, || async {
        copy_knows(&sb, "europe", "north_america", "K1").filter(|id| *id == t1.task_id)
    })
    .await;

    // The primary dies; the retry through the backup is the original task.
    sb.kill_and_wait_dead("north_america", "europe", PATIENCE)
        .await
        .expect("dead");
    let mut eu = sb.client("europe").await.expect("client");
    let retry = eu
        .submit_task(keyed("US", "K1", b"work"))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(
        (
            retry.task_id.as_str(),
            retry.deduplicated,
            retry.region.as_str(),
            retry.state()
        ),
        (
            t1.task_id.as_str(),
            true,
            "north_america",
            api::TaskState::Queued
        ),
        "{retry:?}"
    );
    for (req, differs) in [
        (keyed("US", "K1", b"other"), "payload"),
        (keyed("CA", "K1", b"other"), "attributes and payload"),
    ] {
        let err = eu.submit_task(req).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{}", err.message());
        let msg = err.message();
        assert!(
            msg.contains("`K1`") && msg.contains(differs) && msg.contains(&t1.task_id),
            "{msg}"
        );
    }

    // K2 accepted by the primary while europe could not hear of it, then the
    // primary dies: europe creates a second task, and its record says why.
    sb.restart_and_wait_alive("north_america", "europe", PATIENCE)
        .await
        .expect("back");
    let first = primary_accepts_unheard_then_dies(&mut sb, "K2").await;
    let second = eu
        .submit_task(keyed("US", "K2", b"work"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(
        (second.region.as_str(), second.deduplicated),
        ("europe", false)
    );
    assert_ne!(second.task_id, first.task_id);
    let record = decisions(&sb, "europe")
        .into_iter()
        .find(|l| l.contains(&second.task_id) && l.contains("\"kind\":\"route\""))
        .expect("route record");
    assert!(record.contains("could not be known"), "{record}");
    // The primary returns (no agent anywhere: neither task started): the
    // later one, europe's, is cancelled with a reason naming the other.
    sb.start_controller("north_america").expect("restart");
    let cancelled = sb
        .wait_terminal("europe", &second.task_id, PATIENCE)
        .await
        .expect("resolved");
    assert_eq!(cancelled.state(), api::TaskState::Cancelled);
    assert!(
        cancelled.error.contains("duplicate") && cancelled.error.contains(&first.task_id),
        "{}",
        cancelled.error
    );
    let mut na = answering(&sb, "north_america").await;
    let kept = na
        .get_task(api::GetTaskRequest {
            task_id: first.task_id.clone(),
        })
        .await
        .expect("read")
        .into_inner()
        .task
        .expect("task");
    assert_eq!(kept.state(), api::TaskState::Queued, "{kept:?}");

    // K3: the same, but europe's task runs, and the primary's runs too
    // before europe can hear of it (europe stopped while north_america
    // returns: its start-up fence waits `startup_fence`, then leases): the
    // pair is recorded and counted.
    let theirs = primary_accepts_unheard_then_dies(&mut sb, "K3").await;
    sb.start_agent("europe").expect("europe agent");
    let ours = eu
        .submit_task(keyed("US", "K3", b"work"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(ours.region, "europe");
    let done = sb
        .wait_terminal("europe", &ours.task_id, PATIENCE)
        .await
        .expect("runs");
    assert_eq!(done.state(), api::TaskState::Succeeded);
    sb.controller("europe")
        .expect("running")
        .signal("STOP")
        .expect("stop");
    sb.start_controller("north_america").expect("restart");
    let na_agent = sb.start_agent("north_america").expect("na agent");
    answering(&sb, "north_america").await;
    let ran = sb
        .wait_terminal("north_america", &theirs.task_id, PATIENCE)
        .await
        .expect("runs");
    assert_eq!(ran.state(), api::TaskState::Succeeded);
    sb.controller("europe")
        .expect("running")
        .signal("CONT")
        .expect("cont");
    let metrics = eventually("the pair counted at europe", PATIENCE, || async {
        let m = scrape(&sb, "europe").await;
        sample(&m, "federation_duplicate_tasks_total")
            .is_some_and(|n| n >= 1.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        sample(&metrics, "federation_duplicate_tasks_total"),
        Some(1.0)
    );

    // K4: europe's task ran while north_america was dead, and north_america
    // returns with an agent, europe reachable: its start-up fence waits for
    // europe's answer to its first snapshot, and europe cancels the
    // primary's copy before answering. Exactly one runs.
    sb.kill_agent("north_america", na_agent)
        .expect("agent stops");
    let theirs4 = primary_accepts_unheard_then_dies(&mut sb, "K4").await;
    let ours4 = eu
        .submit_task(keyed("US", "K4", b"work"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(ours4.region, "europe");
    let done = sb
        .wait_terminal("europe", &ours4.task_id, PATIENCE)
        .await
        .expect("runs");
    assert_eq!(done.state(), api::TaskState::Succeeded);
    sb.start_controller("north_america").expect("restart");
    sb.start_agent("north_america").expect("na agent");
    answering(&sb, "north_america").await;
    let fenced = sb
        .wait_terminal("north_america", &theirs4.task_id, PATIENCE)
        .await
        .expect("resolved");
    assert_eq!(
        (fenced.state(), fenced.attempts),
        (api::TaskState::Cancelled, 0),
        "{fenced:?}"
    );
    assert!(
        fenced.error.contains("duplicate") && fenced.error.contains(&ours4.task_id),
        "{}",
        fenced.error
    );
    let metrics = scrape(&sb, "europe").await;
    let both = sample(&metrics, "federation_duplicate_tasks_total");
    let cancelled = sample(&metrics, "federation_duplicate_tasks_cancelled_total");
    eprintln!("duplicate pairs at europe: {both:?} both ran, {cancelled:?} resolved by a cancel");
    assert_eq!((both, cancelled), (Some(1.0), Some(2.0)));
    let log = decisions(&sb, "europe");
    let ran_record = log
        .iter()
        .find(|l| l.contains("\"kind\":\"duplicate\"") && l.contains("duplicate_ran"))
        .expect("a duplicate_ran record");
    assert!(
        ran_record.contains("`K3`")
            && ran_record.contains(&ours.task_id)
            && ran_record.contains(&theirs.task_id),
        "{ran_record}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("duplicate_cancelled") && l.contains("`K2`")),
        "no duplicate_cancelled record for K2"
    );
}
