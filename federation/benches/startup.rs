//! Start-up with many queued tasks (issue 16, point 4): how long a
//! controller holding `STARTUP_BENCH_TASKS` (default 1,000,000) queued tasks
//! takes from its start to its first successful submit, and its memory
//! before and after a restart.
//!
//! 1. The store alone, in this process: the tasks are written with
//!    `insert_batch` (256-byte payloads, an idempotency key each); then the
//!    open the previous version did (redb's integrity check over the whole
//!    file, then one decoding scan of every record) is timed beside
//!    `TaskStore::open` (persisted counts and keys, the check in the
//!    background), its first insert, and the background check.
//! 2. A real `federation serve` (`target/release/federation`, one region,
//!    no agents) over that store: time from spawn to the first successful
//!    `SubmitTask`, resident memory (VmRSS) once its background check has
//!    finished, then SIGTERM, restart, and the same again; then a start
//!    after SIGKILL (redb repairs the file at open after a crash).
//!
//! Run: `cargo build --release -p federation --bin federation && cargo bench
//! -p federation --bench startup` (`STARTUP_BENCH_EXE=PATH` runs another
//! build of the controller over the same store). The store takes about 1 KB per task on
//! disk (under the system's temporary directory, removed at the end).

use std::path::Path;
use std::time::{Duration, Instant};

use federation::tasks::{TaskStore, Verification};
use federation_api as api;
use federation_sandbox::{SandboxBuilder, string_attrs};
use prost::Message;
use redb::{ReadableDatabase, ReadableTable};

const ONE_REGION: &str = r#"
federation:
  name: "Start-up bench"
  regions:
    - name: "europe"
      endpoint: "https://eu.example.com"
      compliance: ["GDPR"]
  routing_rules:
    - name: "everyone"
      default: true
      primary_region: "europe"
"#;

fn rss_mb(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn task(i: usize) -> api::Task {
    api::Task {
        // A UUIDv7-like, time-ordered id owned by europe, as submits make.
        task_id: format!("{:08x}-0000-7000-8000-{:012x}", i >> 16, i),
        payload: vec![1; 256],
        owner_region: "europe".into(),
        idempotency_key: format!("key-{i}"),
        attributes: string_attrs(&[("customer_region", "DE")]),
        ..api::Task::default()
    }
}

async fn fill(dir: &Path, n: usize) {
    let started = Instant::now();
    let store = TaskStore::open(dir).expect("open the store");
    for b in 0..n.div_ceil(10_000) {
        let batch = (b * 10_000..((b + 1) * 10_000).min(n)).map(task).collect();
        store
            .insert_batch(batch, None)
            .await
            .outcomes
            .expect("batch");
    }
    println!(
        "stored {n} queued tasks in {:.1} s; this process resident {:.0} MB with the store open",
        started.elapsed().as_secs_f64(),
        rss_mb("self")
    );
}

fn wait_checked(store: &TaskStore) -> Verification {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match store.verification() {
            Some(Verification::Running) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Some(v) => return v,
            None => unreachable!("an embedded store"),
        }
    }
}

/// Part 1: the store in this process.
async fn store_alone(dir: &Path, n: usize) {
    let file = dir.join(federation::tasks::FILE);
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "file {:.0} MB ({:.0} B per task)",
        size as f64 / 1e6,
        size as f64 / n as f64
    );
    // What the previous version's open did.
    let before = rss_mb("self");
    let started = Instant::now();
    {
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(true);
        let db = builder.create(&file).expect("open with the check");
        let checked = started.elapsed();
        let txn = db.begin_read().expect("read");
        let table = txn
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("tasks"))
            .expect("tasks");
        let mut decoded = 0usize;
        for entry in table.iter().expect("iter") {
            let (_, v) = entry.expect("entry");
            decoded += usize::from(api::Task::decode(v.value()).is_ok());
        }
        println!(
            "previous open: integrity check {:.2} s + decoding scan of {decoded} records {:.2} s = {:.2} s; resident {before:.0} -> {:.0} MB",
            checked.as_secs_f64(),
            (started.elapsed() - checked).as_secs_f64(),
            started.elapsed().as_secs_f64(),
            rss_mb("self")
        );
    }
    let before = rss_mb("self");
    let started = Instant::now();
    let store = TaskStore::open(dir).expect("open");
    let opened = started.elapsed();
    let mut first = task(n + 1);
    first.task_id = "ffffffff-0000-7000-8000-000000000001".into();
    first.idempotency_key = "first".into();
    store.insert(first).await.expect("first insert");
    println!(
        "TaskStore::open of {} queued tasks: {:.3} s, first insert after {:.3} s; resident {before:.0} -> {:.0} MB",
        store.counts().queued,
        opened.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        rss_mb("self")
    );
    let v = wait_checked(&store);
    println!(
        "background check: {v:?} after {:.2} s; resident {:.0} MB",
        started.elapsed().as_secs_f64(),
        rss_mb("self")
    );
}

/// Spawns the controller and submits until one succeeds; returns the time
/// from spawn to that success.
async fn start_and_submit(sandbox: &mut federation_sandbox::Sandbox, round: usize) -> Duration {
    let started = Instant::now();
    sandbox.start_controller("europe").expect("start");
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no successful submit in 600 s"
        );
        if let Ok(mut client) = sandbox.client("europe").await {
            let req = api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", "DE")]),
                payload: vec![2; 256],
                idempotency_key: format!("bench-first-{round}"),
                ..Default::default()
            };
            if client.submit_task(req).await.is_ok() {
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The message and `*_ms` fields of a log line (text or JSON).
fn phases(line: &str) -> String {
    let fields: Vec<String> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
        .filter(|w| w.contains("_ms"))
        .map(|w| w.replace('"', ""))
        .collect();
    let message = ["task store and decision log opened", "controller opened"]
        .into_iter()
        .find(|m| line.contains(m))
        .unwrap_or("");
    format!("{message}: {}", fields.join(" "))
}

fn wait_log(sandbox: &federation_sandbox::Sandbox, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while sandbox
        .controller_log_text("europe")
        .matches(needle)
        .count()
        < count
    {
        assert!(Instant::now() < deadline, "no `{needle}` in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn serve(n: usize) {
    // `STARTUP_BENCH_EXE` runs another build (an older one, say).
    let exe = std::env::var_os("STARTUP_BENCH_EXE").map_or_else(
        || {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/release/federation")
        },
        std::path::PathBuf::from,
    );
    if !exe.exists() {
        println!(
            "serve: skipped ({} not built; run `cargo build --release -p federation --bin federation` first)",
            exe.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        fill(dir.path(), n).await;
        store_alone(dir.path(), n).await;
        return;
    }
    // The default queue limit (100,000) would refuse every submit as full.
    let mut sandbox = SandboxBuilder::new(&exe, ONE_REGION)
        .env("FEDERATION__NODE__LIMITS__MAX_QUEUE_DEPTH", "100000000")
        .agents(0, 1)
        .start()
        .expect("sandbox");
    let dir = sandbox.data_dir("europe").expect("data dir");
    {
        // Its first start made the data directory; fill it while stopped.
        let c = sandbox.controller("europe").expect("controller");
        c.signal("TERM").expect("term");
        c.wait_timeout(Duration::from_secs(30)).expect("stops");
    }
    fill(&dir, n).await;
    store_alone(&dir, n).await;
    let mut rss = Vec::new();
    for round in 0..2 {
        let took = start_and_submit(&mut sandbox, round).await;
        let pid = sandbox
            .controller("europe")
            .expect("controller")
            .pid()
            .expect("pid")
            .to_string();
        let at_first = rss_mb(&pid);
        // The controller's own timing of its start-up phases (this start's:
        // the last such lines of the log).
        let text = sandbox.controller_log_text("europe");
        for needle in ["task store and decision log opened", "controller opened"] {
            if let Some(line) = text.lines().rev().find(|l| l.contains(needle)) {
                println!("  start {}: {}", round + 1, phases(line));
            }
        }
        wait_log(&sandbox, "task store checked", round + 1);
        // Let the start-up work settle (the replication and status loops).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let settled = rss_mb(&pid);
        println!(
            "serve, start {}: first successful submit {:.3} s after spawn; resident {at_first:.0} MB then, {settled:.0} MB after the background check",
            round + 1,
            took.as_secs_f64()
        );
        rss.push(settled);
        let c = sandbox.controller("europe").expect("controller");
        c.signal("TERM").expect("term");
        c.wait_timeout(Duration::from_secs(60)).expect("stops");
    }
    println!(
        "memory after the restart / before it: {:.2}x (target within 10%)",
        rss[1] / rss[0]
    );
    // After a crash redb repairs the file at open (a walk of every page),
    // so this start is not O(1); printed for what it is.
    let took = start_and_submit(&mut sandbox, 2).await;
    sandbox.kill_controller("europe").expect("SIGKILL");
    let took_after_kill = start_and_submit(&mut sandbox, 3).await;
    println!(
        "serve after SIGKILL (redb's repair at open): first successful submit {:.3} s after spawn (clean start before it: {:.3} s)",
        took_after_kill.as_secs_f64(),
        took.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("STARTUP_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    serve(n).await;
}
