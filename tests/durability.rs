//! No acknowledged task is lost: an agent killed mid-task (its lease expires
//! and the task runs again), and a controller killed with SIGKILL and
//! restarted (every acknowledged task is still there).

mod support;

use federation_api as api;
use federation_sandbox::string_attrs;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_task_is_released_and_completes_elsewhere() {
    // The first agent runs a command that hangs; we kill the agent while it
    // holds the lease. A second agent that completes quickly picks it up
    // after the lease TTL.
    let mut sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__LEASE_TTL", "1500ms"),
    )
    .await;
    let (_, t) = killed_agents_task_runs_again(&mut sandbox, "europe").await;
    assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
    assert_eq!(
        t.attempts, 2,
        "leased once by the killed agent, once by the new one"
    );
    assert_eq!(t.result, b"work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_and_restarted_keeps_every_acknowledged_task() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    // Submit concurrently, remember every acknowledged id, kill mid-stream.
    let acked = acked_across_a_kill(&mut sandbox, "europe", 200, Vec::new()).await;
    restarted_with_every_acknowledged_task(&mut sandbox, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_while_checkpoints_run_keeps_every_acknowledged_task() {
    // The task store checkpoints its write-ahead log after every batch
    // (`node.store.checkpoint_bytes: 1`): a durable commit of tasks.redb,
    // then the log written from its start again, so the SIGKILL under load
    // lands in or between checkpoints. At restart every acknowledged task
    // is there.
    let mut sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .env("FEDERATION__NODE__STORE__CHECKPOINT_BYTES", "1"),
    )
    .await;
    let acked = acked_across_a_kill(&mut sandbox, "europe", 300, Vec::new()).await;
    restarted_with_every_acknowledged_task(&mut sandbox, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_running_across_a_controller_restart_run_exactly_once() {
    // Each task appends its id to a file when it starts, sleeps well under
    // the lease TTL, and succeeds. The controller is SIGKILLed while the
    // agent runs four of them and restarted on the same data and port: the
    // agent keeps its leases and reports them, so no task starts twice.
    let mut sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__LEASE_TTL", "20s"),
    )
    .await;
    let runs = sandbox.dir().join("runs.txt");
    let exec = format!(
        "echo \"$FEDERATION_TASK_ID\" >> '{}'; sleep 2; cat",
        runs.display()
    );
    sandbox
        .start_agent_with("europe", &exec, 4)
        .expect("agent starts");
    let mut client = sandbox.client("europe").await.expect("client");
    let mut ids = Vec::new();
    for i in 0..8 {
        let resp = client
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", "DE")]),
                payload: format!("work {i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("accepted")
            .into_inner();
        ids.push(resp.task_id);
    }
    let started = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    eventually("four tasks are running on the agent", PATIENCE, || {
        let n = started(&runs).len();
        async move { (n >= 4).then_some(()) }
    })
    .await;
    sandbox.kill_controller("europe").expect("kill");
    sandbox.start_controller("europe").expect("restart");
    eventually("europe restarts", PATIENCE, || {
        let s = &sandbox;
        async move { s.status_row("europe", "europe").await.ok() }
    })
    .await;
    for id in &ids {
        let t = sandbox
            .wait_terminal("europe", id, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", sandbox.controller_log_text("europe")));
        assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempts, 1, "leased once: {t:?}");
    }
    let lines = started(&runs);
    for id in &ids {
        let n = lines.iter().filter(|l| *l == id).count();
        assert_eq!(n, 1, "task {id} started {n} times; runs: {lines:?}");
    }
    assert_eq!(lines.len(), ids.len(), "{lines:?}");
}

/// Submits `n` DE tasks to europe; returns their ids.
async fn submit_de(sandbox: &federation_sandbox::Sandbox, n: usize) -> Vec<String> {
    let mut client = sandbox.client("europe").await.expect("client");
    let mut ids = Vec::new();
    for i in 0..n {
        let resp = client
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", "DE")]),
                payload: format!("work {i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("accepted")
            .into_inner();
        ids.push(resp.task_id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_refuses_to_start_on_a_damaged_store() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    submit_de(&sandbox, 30).await;
    sandbox.kill_controller("europe").expect("kill");
    // Damage the middle of every page after the header.
    let path = sandbox.data_dir("europe").expect("dir").join("tasks.redb");
    let mut bytes = std::fs::read(&path).expect("read");
    for page in (4096..bytes.len()).step_by(4096) {
        bytes[page + 2048] ^= 0xff;
    }
    std::fs::write(&path, &bytes).expect("write");
    let before = sandbox.controller_log_text("europe").len();
    sandbox.start_controller("europe").expect("restart");
    let status = sandbox
        .controller("europe")
        .expect("controller")
        .wait_timeout(PATIENCE)
        .expect("exits instead of serving");
    let log = sandbox.controller_log_text("europe")[before..].to_string();
    assert_eq!(status.code(), Some(65), "{log}");
    assert!(
        log.contains(&path.display().to_string())
            && log.contains("the task store is damaged")
            && log.contains("federation store check"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_disk_is_rebuilt_from_the_snapshot_a_peer_holds() {
    // The runbook: europe's data directory is lost; north_america (the
    // backup of the EU rule) holds europe's snapshot; `federation store
    // recover` rebuilds europe's store from it, and europe runs the tasks.
    let mut sandbox = formed(seed_sandbox().agents(0, 1).env(
        "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
        "300ms",
    ))
    .await;
    let ids = submit_de(&sandbox, 12).await;
    let held = sandbox
        .data_dir("north_america")
        .expect("dir")
        .join("snapshots")
        .join("europe.snap");
    let keys = sandbox.keys_path();
    let inspect = |file: &std::path::Path| {
        std::process::Command::new(federation_exe())
            .args(["snapshot", "inspect"])
            .arg(file)
            .arg("--keys")
            .arg(&keys)
            .args(["--format", "json"])
            .output()
            .expect("runs")
    };
    eventually(
        "north_america holds all of europe's tasks",
        PATIENCE,
        || {
            let out = inspect(&held);
            let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
            let n = v.and_then(|v| v["tasks"].as_u64()).unwrap_or(0);
            let want = ids.len();
            async move { (n as usize == want).then_some(()) }
        },
    )
    .await;
    sandbox.kill_controller("europe").expect("kill");
    // The copy an operator would take from the peer.
    let copy = sandbox.dir().join("europe-from-north_america.snap");
    std::fs::copy(&held, &copy).expect("copy");
    let europe = sandbox.data_dir("europe").expect("dir");
    std::fs::remove_dir_all(&europe).expect("lose the disk");
    std::fs::create_dir_all(&europe).expect("new disk");
    let out = std::process::Command::new(federation_exe())
        .args(["store", "recover"])
        .arg(&europe)
        .args(["--region", "europe", "--snapshot"])
        .arg(&copy)
        .arg("--keys")
        .arg(&keys)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    sandbox.start_controller("europe").expect("restart");
    eventually("europe restarts", PATIENCE, || {
        let s = &sandbox;
        async move { s.status_row("europe", "europe").await.ok() }
    })
    .await;
    sandbox.start_agent("europe").expect("agent");
    for id in &ids {
        let t = sandbox
            .wait_terminal("europe", id, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", sandbox.controller_log_text("europe")));
        assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_reported_and_replication_and_leasing_go_on() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1).env(
        "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
        "300ms",
    ))
    .await;
    let ids = submit_de(&sandbox, 6).await;
    sandbox.kill_controller("europe").expect("kill");
    // One record that does not decode, queued first.
    {
        let path = sandbox.data_dir("europe").expect("dir").join("tasks.redb");
        let db = redb::Database::create(&path).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let tasks: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
            let queue: redb::TableDefinition<(i64, i64, &str), ()> =
                redb::TableDefinition::new("queue");
            txn.open_table(tasks)
                .expect("tasks")
                .insert("bad.europe", &[0xff_u8, 0xff, 0xff][..])
                .expect("insert");
            txn.open_table(queue)
                .expect("queue")
                .insert((i64::MIN, 0, "bad.europe"), ())
                .expect("queue entry");
        }
        txn.commit().expect("commit");
    }
    let held = sandbox
        .data_dir("north_america")
        .expect("dir")
        .join("snapshots")
        .join("europe.snap");
    let keys = sandbox.keys_path();
    let snapshot_sequence = || -> (u64, u64) {
        let out = std::process::Command::new(federation_exe())
            .args(["snapshot", "inspect"])
            .arg(&held)
            .arg("--keys")
            .arg(&keys)
            .args(["--format", "json"])
            .output()
            .expect("runs");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (
            v["epoch"].as_u64().unwrap_or(0),
            v["tasks"].as_u64().unwrap_or(0),
        )
    };
    let (epoch_before, _) = snapshot_sequence();
    sandbox.start_controller("europe").expect("restart");
    // Status: the own row lists it.
    let row = sandbox
        .wait_for_row("europe", "europe", "report the record", PATIENCE, |r| {
            r.store_undecodable_records == 1
        })
        .await
        .expect("status row");
    assert!(
        row.store_undecodable[0].starts_with("bad.europe: "),
        "{row:?}"
    );
    // Metrics.
    let admin = sandbox.admin_http_addr("europe").expect("admin");
    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .expect("join");
    assert!(
        metrics.contains("federation_store_undecodable_records 1"),
        "{metrics}"
    );
    let page = tokio::task::spawn_blocking(move || http_get(admin, "/"))
        .await
        .expect("join");
    assert!(
        page.contains("store-undecodable") && page.contains("bad.europe"),
        "{page}"
    );
    // Replication of the rest goes on: the restarted europe's snapshots (a
    // new epoch) reach north_america with every good task.
    eventually("a snapshot from the restarted europe", PATIENCE, || {
        let (epoch, tasks) = snapshot_sequence();
        let want = ids.len() as u64;
        async move { (epoch > epoch_before && tasks == want).then_some(()) }
    })
    .await;
    // Leasing walks past it: an agent runs every good task.
    sandbox.start_agent("europe").expect("agent");
    for id in &ids {
        let t = sandbox
            .wait_terminal("europe", id, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", sandbox.controller_log_text("europe")));
        assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
    }
    let log = sandbox.controller_log_text("europe");
    assert!(
        log.contains("skipping an undecodable task record") && log.contains("bad.europe"),
        "{log}"
    );
    assert!(
        !log.contains("reading pending tasks for a snapshot failed"),
        "{log}"
    );
}

/// Stops europe's controller with SIGTERM (a clean stop) and waits for it.
fn stop_europe(sandbox: &mut federation_sandbox::Sandbox) {
    let c = sandbox.controller("europe").expect("running");
    c.signal("TERM").expect("SIGTERM");
    let status = c.wait_timeout(PATIENCE).expect("stops");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_acknowledged_tasks_is_refused_and_the_lost_ids_listed() {
    // europe's store comes back older than what it acknowledged (a disk
    // image rolled back): the controller refuses to start, `store check`
    // lists the tasks the decision log says were stored, and after `store
    // accept` it serves again.
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let kept = submit_de(&sandbox, 5).await;
    stop_europe(&mut sandbox);
    let dir = sandbox.data_dir("europe").expect("dir");
    let older = std::fs::read(dir.join("tasks.redb")).expect("read");
    sandbox.start_controller("europe").expect("restart");
    let lost = eventually("europe takes tasks again", PATIENCE, || {
        let s = &sandbox;
        async move {
            s.status_row("europe", "europe").await.ok()?;
            Some(submit_de(s, 5).await)
        }
    })
    .await;
    stop_europe(&mut sandbox);
    std::fs::write(dir.join("tasks.redb"), &older).expect("roll back");

    let before = sandbox.controller_log_text("europe").len();
    sandbox.start_controller("europe").expect("restart");
    let status = sandbox
        .controller("europe")
        .expect("controller")
        .wait_timeout(PATIENCE)
        .expect("refuses instead of serving");
    let log = sandbox.controller_log_text("europe")[before..].to_string();
    assert_eq!(status.code(), Some(65), "{log}");
    assert!(
        log.contains("lost acknowledged work") && log.contains("5 tasks lost"),
        "{log}"
    );

    let out = std::process::Command::new(federation_exe())
        .args(["store", "check", "--format", "json"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut listed: Vec<String> = v["missing_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    let mut want = lost.clone();
    listed.sort();
    want.sort();
    assert_eq!(listed, want, "{v}");

    let out = std::process::Command::new(federation_exe())
        .args(["store", "accept"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sandbox.start_controller("europe").expect("restart");
    let mut client = eventually("europe serves again", PATIENCE, || {
        let s = &sandbox;
        async move {
            s.status_row("europe", "europe").await.ok()?;
            s.client("europe").await.ok()
        }
    })
    .await;
    for id in &kept {
        client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .expect("a task from before the rollback is there");
    }
}

/// The seqs of the decision records europe's store staged in its own
/// transaction and had not yet seen in the log's file (the controller is
/// stopped, so the file is free).
fn staged_seqs(data_dir: &std::path::Path) -> Vec<u64> {
    use redb::{ReadableDatabase, ReadableTable};
    const PENDING: redb::TableDefinition<u64, &[u8]> =
        redb::TableDefinition::new("pending_records");
    // A copy of the database with the write-ahead log's frames applied
    // (the rows since the last checkpoint are only there).
    let scratch = tempfile::tempdir().expect("tempdir");
    let copy = scratch.path().join("tasks.redb");
    std::fs::copy(data_dir.join("tasks.redb"), &copy).expect("copy tasks.redb");
    let db = redb::Database::create(&copy).expect("open the copy");
    federation::tasks::replay_wal(data_dir, &db).expect("apply tasks.wal");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(PENDING).expect("pending_records");
    table
        .iter()
        .expect("iter")
        .map(|e| e.expect("row").0.value())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_log_lost_in_a_crash_come_back_from_the_store() {
    // One fsync per submit: a task's decision record is staged in the task
    // store's transaction and the log's file is written after. SIGKILL under
    // load, then the disk loses what the log had not synced: the file is cut
    // at the first staged record and a torn half line left behind. At
    // restart every acknowledged task is there, its record too, and the
    // chain verifies.
    // The kill must land while rows are staged (the log's writer drops them
    // once the file holds them): a kill that missed is tried again, at most
    // five times, on a fresh federation.
    let mut attempt = 0;
    let (mut sandbox, acked, dir, staged) = loop {
        attempt += 1;
        let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
        let acked = acked_across_a_kill(&mut sandbox, "europe", 200, Vec::new()).await;
        let dir = sandbox.data_dir("europe").expect("dir");
        let staged = staged_seqs(&dir);
        if !staged.is_empty() || attempt == 5 {
            break (sandbox, acked, dir, staged);
        }
    };
    assert!(
        !staged.is_empty(),
        "a store under load holds staged records at the kill (in {attempt} tries)"
    );
    let first = *staged.iter().min().expect("one");
    let log = dir.join("decisions.jsonl");
    let bytes = std::fs::read(&log).expect("read log");
    let mut kept = Vec::new();
    let mut cut = false;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let seq = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["seq"].as_u64());
        if seq.is_some_and(|s| s >= first) {
            kept.extend_from_slice(&line[..line.len() / 2]);
            cut = true;
            break;
        }
        kept.extend_from_slice(line);
    }
    if !cut {
        // The log's writer had not written the first staged line at all.
        kept.extend_from_slice(b"{\"attributes\":{\"customer_re");
    }
    std::fs::write(&log, &kept).expect("cut the log");

    sandbox.start_controller("europe").expect("restart");
    let mut client = eventually("europe restarts", PATIENCE, || {
        let s = &sandbox;
        async move {
            s.status_row("europe", "europe").await.ok()?;
            s.client("europe").await.ok()
        }
    })
    .await;
    let mut missing = Vec::new();
    for id in &acked {
        if let Err(s) = client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
        {
            missing.push(format!("{id}: {:?}", s.code()));
        }
    }
    assert!(missing.is_empty(), "acknowledged tasks lost: {missing:?}");
    // Every acknowledged task's route record is in the log again.
    let text = std::fs::read_to_string(&log).expect("read log");
    let recorded: std::collections::HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["task_id"].as_str().map(str::to_string))
        .collect();
    let unrecorded: Vec<&String> = acked.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(
        unrecorded.is_empty(),
        "{} acknowledged tasks without a record (staged from seq {first}): {:?}\n{}",
        unrecorded.len(),
        &unrecorded[..unrecorded.len().min(5)],
        sandbox.controller_log_text("europe")
    );
    assert!(
        sandbox
            .controller_log_text("europe")
            .contains("appended the records a crash left only in the task store"),
        "the replay ran"
    );
    let out = std::process::Command::new(federation_exe())
        .args(["audit", "verify"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restarts europe's controller on its data and asserts that every task in
/// `acked` is there.
async fn restarted_with_every_acknowledged_task(
    sandbox: &mut federation_sandbox::Sandbox,
    acked: &[String],
) {
    sandbox.start_controller("europe").expect("restart");
    let mut client = eventually("europe restarts", PATIENCE, || {
        let s = &*sandbox;
        async move { s.client("europe").await.ok() }
    })
    .await;
    let mut missing = Vec::new();
    for id in acked {
        if let Err(s) = client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
        {
            missing.push(format!("{id}: {:?}", s.code()));
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
