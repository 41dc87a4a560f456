//! Tests of the task store, including a SIGKILL crash test that re-executes
//! this test binary as a child process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use federation_api::TaskState;

use super::*;

const TTL: Duration = Duration::from_secs(30);

use federation_sandbox::fixtures::queued_task as task;

fn open_manual(dir: &std::path::Path, clock: &ManualClock) -> TaskStore {
    TaskStore::open_with(
        dir,
        StoreOptions {
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        },
    )
    .expect("open store")
}

#[tokio::test]
async fn keys_of_the_former_on_disk_index_are_kept() {
    // A store written by an earlier version kept keys in an `idempotency`
    // table: it is read at open (then dropped) and still deduplicates.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("a")).await.expect("insert");
    }
    {
        let db = redb::Database::create(dir.path().join("tasks.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let def: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("idempotency");
            let mut t = txn.open_table(def).expect("table");
            t.insert("legacy-key", "a").expect("insert");
        }
        txn.commit().expect("commit");
    }
    let store = TaskStore::open(dir.path()).expect("open");
    let mut b = task("b");
    b.idempotency_key = "legacy-key".into();
    let out = store.insert(b).await.expect("insert");
    assert!(out.is_deduplicated());
    assert_eq!(out.task().task_id, "a");
}

/// Writes `task` straight into the `tasks` table, bypassing the store (its
/// counts, keys and marks do not move).
fn plant_record(dir: &std::path::Path, task: &federation_api::Task) {
    use prost::Message;
    let db = redb::Database::create(dir.join(FILE)).expect("db");
    let txn = db.begin_write().expect("txn");
    {
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
        let mut t = txn.open_table(def).expect("table");
        t.insert(task.task_id.as_str(), task.encode_to_vec().as_slice())
            .expect("insert");
    }
    txn.commit().expect("commit");
}

#[tokio::test]
async fn open_reads_the_persisted_counts_instead_of_every_record() {
    // The counts and the keys are kept in the store, moved in each batch's
    // transaction: an open reads them, it does not decode the records. A
    // record planted behind the store's back is therefore not counted
    // (before, every open decoded every record and counted it).
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for i in 0..3 {
            let mut t = task(&format!("t{i}"));
            t.idempotency_key = format!("k{i}");
            store.insert(t).await.expect("insert");
        }
        store.cancel("t0", "no").await.expect("cancel");
    }
    let mut planted = task("planted");
    planted.state = TaskState::Succeeded as i32;
    plant_record(dir.path(), &planted);
    let store = TaskStore::open(dir.path()).expect("reopen");
    let c = store.counts();
    assert_eq!((c.queued, c.cancelled, c.succeeded), (2, 1, 0), "{c:?}");
    // The keys came back from disk: a retry is answered with the stored task.
    let mut again = task("t9");
    again.idempotency_key = "k1".into();
    let out = store.insert(again).await.expect("retry");
    assert!(out.is_deduplicated());
    assert_eq!(out.task().task_id, "t1");
    // The background check still reads every record.
    assert!(matches!(
        verified(&store),
        Verification::Sound { records: 4, .. }
    ));
}

#[tokio::test]
async fn a_store_written_by_the_previous_version_is_indexed_once_at_open() {
    // The previous version kept counts and keys in memory only: its store
    // has no `counts` and no `idempotency_keys` table. The first open
    // rebuilds both from the records; later opens read them.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for i in 0..4 {
            let mut t = task(&format!("t{i}"));
            t.idempotency_key = format!("k{i}");
            store.insert(t).await.expect("insert");
        }
        store.cancel("t3", "no").await.expect("cancel");
    }
    {
        let db = redb::Database::create(dir.path().join(FILE)).expect("db");
        let txn = db.begin_write().expect("txn");
        let counts: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("counts");
        let keys: redb::TableDefinition<&str, &str> =
            redb::TableDefinition::new("idempotency_keys");
        assert!(txn.delete_table(counts).expect("drop counts"));
        assert!(txn.delete_table(keys).expect("drop keys"));
        txn.commit().expect("commit");
    }
    for round in 0..2 {
        let store = TaskStore::open(dir.path()).expect("open");
        let c = store.counts();
        assert_eq!((c.queued, c.cancelled), (3, 1), "round {round}: {c:?}");
        let mut again = task(&format!("retry{round}"));
        again.idempotency_key = "k2".into();
        let out = store.insert(again).await.expect("retry");
        assert!(out.is_deduplicated(), "round {round}");
        assert_eq!(out.task().task_id, "t2");
    }
}

#[tokio::test]
async fn counts_left_behind_by_an_older_writer_are_rebuilt() {
    // A version that keeps the marks but not the counts moved `commit`
    // without them: counts naming an older commit are rebuilt.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("a")).await.expect("insert");
    }
    let mut planted = task("b");
    planted.state = TaskState::Failed as i32;
    plant_record(dir.path(), &planted);
    {
        let db = redb::Database::create(dir.path().join(FILE)).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let marks: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("marks");
            let mut t = txn.open_table(marks).expect("marks");
            let commit = redb::ReadableTable::get(&t, "commit")
                .expect("get")
                .expect("commit")
                .value();
            t.insert("commit", commit + 1).expect("bump");
        }
        txn.commit().expect("commit");
    }
    let store = TaskStore::open(dir.path()).expect("open");
    let c = store.counts();
    assert_eq!((c.queued, c.failed), (1, 1), "{c:?}");
}

#[tokio::test]
async fn a_flipped_payload_byte_is_reported_by_the_background_check() {
    // The open no longer reads the records; a byte changed inside a task's
    // payload (still a valid record) is found by the background check's
    // page checksums, and reported.
    let base = tempfile::tempdir().expect("tempdir");
    let bytes = thirty_tasks(base.path()).await;
    // Payloads in free pages (older copies) change nothing: each run of
    // 200 `p` is tried, and those that change a stored task must be found.
    let mut live = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..]
        .windows(200)
        .position(|w| w.iter().all(|b| *b == b'p'))
    {
        let off = at + found + 100;
        at += found + 200;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut damaged = bytes.clone();
        damaged[off] = b'q';
        std::fs::copy(
            base.path().join(witness::FILE),
            dir.path().join(witness::FILE),
        )
        .expect("witness");
        std::fs::write(dir.path().join(FILE), &damaged).expect("write");
        let store = TaskStore::open(dir.path()).expect("opens: the record is not read at open");
        let v = verified(&store);
        if all_thirty_intact(&store) {
            continue;
        }
        live += 1;
        match v {
            Verification::Damaged(what) => assert!(!what.is_empty()),
            v => panic!("byte {off}: the damage was not reported: {v:?}"),
        }
    }
    assert!(live > 0, "no stored payload was changed");
}

#[tokio::test]
async fn corrupted_record_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("good")).await.expect("insert");
    }
    {
        let db = redb::Database::create(dir.path().join("tasks.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
            let mut t = txn.open_table(def).expect("table");
            t.insert("bad", &[0xff_u8, 0xff, 0xff][..]).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let store = TaskStore::open(dir.path()).expect("open with a corrupted record");
    assert!(matches!(
        store.get("bad"),
        Err(StoreError::Corrupt { ref task_id, .. }) if task_id == "bad"
    ));
    assert!(matches!(
        store.cancel("bad", "").await,
        Err(StoreError::Corrupt { .. })
    ));
    // The rest of the batch machinery still works.
    assert!(store.get("good").expect("get").is_some());
    assert_eq!(store.counts().queued, 1);
}

#[test]
fn second_open_in_another_handle_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _a = TaskStore::open(dir.path()).expect("open");
    assert!(matches!(
        TaskStore::open(dir.path()),
        Err(StoreError::Db(_))
    ));
}

// ---------------------------------------------------------------------------
// Crash safety: SIGKILL a child mid-stream; every acknowledged id survives.
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "FEDERATION_TASKS_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "tasks::tests::crash_child";

/// Not a test on its own: when the parent test sets [`CHILD_ENV`], it inserts
/// tasks from 16 concurrent writers forever (bounded) and prints `ACK <id>`
/// after each acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = TaskStore::open(std::path::Path::new(&dir)).expect("child open");
    let mut handles = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..100_000 {
                let id = format!("w{w}-{i}");
                let mut t = task(&id);
                t.payload = vec![7; 256];
                store.insert(t).await.expect("child insert");
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {id}").expect("stdout");
                out.flush().expect("stdout");
            }
        }));
    }
    for h in handles {
        h.await.expect("join");
    }
}

#[test]
fn acknowledged_inserts_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    // Read acknowledgements until enough arrived, then kill mid-stream.
    for line in lines.by_ref() {
        let line = line.expect("read child");
        if let Some(id) = line.strip_prefix("ACK ") {
            acked.push(id.to_string());
            if acked.len() >= 500 {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL child");
    // Whatever the child printed before it died is an acknowledged insert too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(id) = line.strip_prefix("ACK ") {
            acked.push(id.to_string());
        }
    }
    let status = child.wait().expect("wait child");
    assert!(!status.success(), "the child was killed, not finished");
    assert!(
        acked.len() >= 500,
        "child acknowledged only {}",
        acked.len()
    );

    let store = TaskStore::open(dir.path()).expect("reopen after SIGKILL");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !matches!(store.get(id), Ok(Some(_))))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged tasks lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(store.counts().queued as usize >= acked.len());
}

/// Prints insert throughput at 1 and 64 requests in flight and how many
/// commits (fsyncs) they took. A report, not a test (no thresholds):
/// `cargo test -p federation --release tasks::tests::insert_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a measurement"]
async fn insert_throughput() {
    for in_flight in [1usize, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TaskStore::open(dir.path()).expect("open");
        let per_worker = 4_000 / in_flight;
        let start = std::time::Instant::now();
        let mut handles = Vec::new();
        for w in 0..in_flight {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..per_worker {
                    let mut t = task(&format!("w{w}-{i}"));
                    t.payload = vec![1; 256];
                    store.insert(t).await.expect("insert");
                }
            }));
        }
        for h in handles {
            h.await.expect("join");
        }
        let n = per_worker * in_flight;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "in flight {in_flight:>3}: {n} inserts in {secs:.3}s = {:.0}/s, {} commits ({:.1} inserts per fsync)",
            n as f64 / secs,
            store.commits(),
            n as f64 / store.commits().max(1) as f64
        );
    }
}

// ---------------------------------------------------------------------------
// A damaged store: never a panic, never a silent loss.
// ---------------------------------------------------------------------------

/// A closed store of 30 tasks (deterministic content); returns its bytes.
async fn thirty_tasks(dir: &std::path::Path) -> Vec<u8> {
    let clock = ManualClock::new(1_000);
    {
        let store = open_manual(dir, &clock);
        for i in 0..30 {
            let mut t = task(&format!("task-{i:02}"));
            t.payload = vec![b'p'; 200];
            store.insert(t).await.expect("insert");
            clock.advance(1);
        }
    }
    std::fs::read(dir.join(FILE)).expect("read store")
}

/// Waits (bounded) for the background check of the file to finish.
fn verified(store: &TaskStore) -> Verification {
    for _ in 0..3000 {
        match store.verification() {
            Some(Verification::Running) => std::thread::sleep(Duration::from_millis(10)),
            Some(v) => return v,
            None => panic!("not an embedded store"),
        }
    }
    panic!("the background check did not finish in 30 s");
}

/// The damage was reported after open: by the background check, or as an
/// undecodable record.
fn damage_reported(store: &TaskStore) -> bool {
    match verified(store) {
        Verification::Damaged(what) => {
            assert!(!what.is_empty());
            true
        }
        Verification::Sound { undecodable, .. } => undecodable > 0 || store.undecodable().0 > 0,
        v => panic!("unexpected {v:?}"),
    }
}

fn all_thirty_intact(store: &TaskStore) -> bool {
    (0..30).all(|i| {
        matches!(store.get(&format!("task-{i:02}")),
            Ok(Some(t)) if t.payload == vec![b'p'; 200])
    })
}

#[tokio::test]
async fn flipped_bytes_never_panic_and_never_lose_tasks_silently() {
    // Byte 0xff-flips at the header's fields and at the start, a few bytes
    // in, and the middle of every page: several of these made redb panic on
    // open (and others read stale data) before the store opened with redb's
    // integrity check. Every outcome must be either a `Damaged` error naming
    // the file, damage reported by the background check after open, or a
    // store that still holds all 30 tasks intact.
    let base = tempfile::tempdir().expect("tempdir");
    let bytes = thirty_tasks(base.path()).await;
    let mut offsets: Vec<usize> = vec![0, 8, 16, 64, 100, 200, 1000];
    for page in (4096..bytes.len()).step_by(4096) {
        offsets.extend([page, page + 16, page + 2048]);
    }
    let mut refused = 0;
    for off in offsets.into_iter().filter(|o| *o < bytes.len()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut damaged = bytes.clone();
        damaged[off] ^= 0xff;
        // The witness of the intact store: it was acknowledged.
        std::fs::copy(
            base.path().join(witness::FILE),
            dir.path().join(witness::FILE),
        )
        .expect("witness");
        std::fs::write(dir.path().join(FILE), &damaged).expect("write");
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| TaskStore::open(dir.path())));
        match opened {
            Err(_) => panic!("open panicked with byte {off} flipped"),
            Ok(Err(StoreError::Damaged { path, what, hint })) => {
                refused += 1;
                assert!(path.ends_with(FILE), "byte {off}: {path}");
                assert!(!what.is_empty() && hint.contains("federation store check"));
            }
            Ok(Err(StoreError::Lost { detail, .. })) => {
                refused += 1;
                assert!(detail.contains("lost"), "byte {off}: {detail}");
            }
            Ok(Err(e)) => panic!("byte {off}: unexpected error {e}"),
            Ok(Ok(store)) if damage_reported(&store) => refused += 1,
            Ok(Ok(store)) => assert!(
                all_thirty_intact(&store),
                "byte {off} flipped: the store opened, nothing was reported, but tasks were lost"
            ),
        }
    }
    assert!(refused >= 5, "only {refused} patterns were detected");
}

#[tokio::test]
async fn random_damage_never_panics_and_never_loses_tasks_silently() {
    // 200 damaged copies, from a fixed seed: 1 to 16 bytes overwritten with
    // random values at random places. Same property as above.
    use rand::{Rng, SeedableRng};
    let base = tempfile::tempdir().expect("tempdir");
    let bytes = thirty_tasks(base.path()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut refused = 0;
    for case in 0..200 {
        let mut damaged = bytes.clone();
        let n = rng.random_range(1..=16);
        let mut changed = Vec::new();
        for _ in 0..n {
            let at = rng.random_range(0..damaged.len());
            damaged[at] = rng.random();
            changed.push(at);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            base.path().join(witness::FILE),
            dir.path().join(witness::FILE),
        )
        .expect("witness");
        std::fs::write(dir.path().join(FILE), &damaged).expect("write");
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| TaskStore::open(dir.path())));
        match opened {
            Err(_) => panic!("case {case}: open panicked, bytes {changed:?} changed"),
            Ok(Err(StoreError::Damaged { .. } | StoreError::Lost { .. })) => refused += 1,
            Ok(Err(e)) => panic!("case {case}: unexpected error {e}"),
            Ok(Ok(store)) if damage_reported(&store) => refused += 1,
            Ok(Ok(store)) => assert!(
                all_thirty_intact(&store),
                "case {case}: bytes {changed:?} changed, the store opened, nothing was reported, but tasks were lost"
            ),
        }
    }
    assert!(refused > 0);
}

#[tokio::test]
async fn a_store_that_lost_acknowledged_tasks_is_refused_until_recovered_or_accepted() {
    // The store is replaced by an older copy of itself (a disk or VM
    // snapshot rolled back, a restored backup): it opens cleanly, but its
    // witness knows that ten more tasks were acknowledged.
    let dir = tempfile::tempdir().expect("tempdir");
    let older = dir.path().join("older.redb");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for i in 0..20 {
            store.insert(task(&format!("t{i}"))).await.expect("insert");
        }
    }
    std::fs::copy(dir.path().join(FILE), &older).expect("copy");
    {
        let store = TaskStore::open(dir.path()).expect("reopen");
        for i in 20..30 {
            store.insert(task(&format!("t{i}"))).await.expect("insert");
        }
    }
    std::fs::copy(&older, dir.path().join(FILE)).expect("roll back");
    let err = TaskStore::open(dir.path()).expect_err("lost work is refused");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Lost { .. }), "{text}");
    assert!(
        text.contains(FILE) && text.contains("10 tasks lost"),
        "{text}"
    );
    assert!(text.contains("federation store recover"), "{text}");
    let report = check(dir.path()).expect("check runs");
    assert!(!report.ok, "{report:?}");
    assert!(
        report.problems.iter().any(|p| p.contains("10 tasks lost")),
        "{report:?}"
    );
    // The operator accepts the loss: the store opens from then on.
    let accepted = TaskStore::open_with(
        dir.path(),
        StoreOptions {
            accept_loss: true,
            ..StoreOptions::default()
        },
    )
    .expect("accepted");
    assert_eq!(accepted.counts().queued, 20);
    drop(accepted);
    TaskStore::open(dir.path()).expect("opens after the loss was accepted");
    assert!(check(dir.path()).expect("check").ok);
}

#[tokio::test]
async fn a_damaged_witness_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("a")).await.expect("insert");
    }
    let hwm = dir.path().join(witness::FILE);
    let text = std::fs::read_to_string(&hwm).expect("witness");
    std::fs::write(
        &hwm,
        text.replace(
            "created=00000000000000000001",
            "created=00000000000000000009",
        ),
    )
    .expect("alter");
    let err = TaskStore::open(dir.path()).expect_err("refused");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains(witness::FILE), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    // `federation store accept` writes a new one.
    drop(
        TaskStore::open_with(
            dir.path(),
            StoreOptions {
                accept_loss: true,
                ..StoreOptions::default()
            },
        )
        .expect("accepted"),
    );
    TaskStore::open(dir.path()).expect("opens with the new witness");
}

#[tokio::test]
async fn the_witness_follows_commits_and_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for i in 0..5 {
            store.insert(task(&format!("t{i}"))).await.expect("insert");
        }
        store.lease("ag", 2, TTL).await.expect("lease");
        assert_eq!(store.mark().created, 5);
    }
    let w = witness::read(dir.path()).expect("read").expect("written");
    assert_eq!(w.created, 5);
    assert!(w.commit >= 6, "{w:?}");
    let store = TaskStore::open(dir.path()).expect("reopen");
    assert_eq!(store.mark(), w);
}

/// Writes an undecodable record `bad` straight into the database, queued
/// and leased so that leasing, expiry and snapshots all meet it.
fn plant_undecodable(dir: &std::path::Path) {
    let db = redb::Database::create(dir.join(FILE)).expect("db");
    let txn = db.begin_write().expect("txn");
    {
        let tasks: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
        let queue: redb::TableDefinition<(i64, i64, &str), ()> =
            redb::TableDefinition::new("queue");
        let leases: redb::TableDefinition<(i64, &str), &str> = redb::TableDefinition::new("leases");
        let mut t = txn.open_table(tasks).expect("table");
        t.insert("bad", &[0xff_u8, 0xff, 0xff][..]).expect("insert");
        t.insert("bad2", &[0x0a_u8, 0x05][..]).expect("insert");
        txn.open_table(queue)
            .expect("queue")
            .insert((i64::MIN, 0, "bad"), ())
            .expect("queue entry");
        txn.open_table(leases)
            .expect("leases")
            .insert((0, "bad2"), "ag")
            .expect("lease entry");
    }
    txn.commit().expect("commit");
}

#[tokio::test]
async fn an_undecodable_record_is_skipped_and_reported_by_every_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for id in ["a", "b"] {
            store.insert(task(id)).await.expect("insert");
        }
    }
    plant_undecodable(dir.path());
    let store = TaskStore::open(dir.path()).expect("opens with undecodable records");
    assert_eq!(
        verified(&store),
        Verification::Sound {
            records: 4,
            undecodable: 2
        }
    );
    let (n, listed) = store.undecodable();
    assert_eq!(n, 2, "found by the background check: {listed:?}");
    assert_eq!(listed[0].0, "bad");
    // Snapshots: the rest is still there.
    let pending: Vec<String> = store
        .pending()
        .expect("pending despite a bad record")
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(pending, vec!["a", "b"]);
    // Leasing walks past it (the bad one sorts first) and expiry drops it.
    let leased = store.lease("ag", 10, TTL).await.expect("lease");
    assert_eq!(leased.len(), 2);
    store
        .expire_leases(3)
        .await
        .expect("expire past a bad lease");
    assert!(matches!(store.get("bad"), Err(StoreError::Corrupt { .. })));
    assert_eq!(store.undecodable().0, 2);
    // The offline check names them.
    drop(store);
    let report = check(dir.path()).expect("check");
    assert!(!report.ok);
    let ids: Vec<&str> = report
        .undecodable
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(ids, vec!["bad", "bad2"]);
}

#[tokio::test]
async fn check_passes_a_sound_store_and_restore_rebuilds_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("a")).await.expect("insert");
    }
    let report = check(dir.path()).expect("check");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 1);
    // A store in use is not copied behind its controller's back.
    let store = TaskStore::open(dir.path()).expect("open");
    assert!(matches!(check(dir.path()), Err(StoreError::Db(e)) if e.contains("in use")));
    // Restore keeps terminal tasks terminal and re-queues pending ones.
    let mut done = task("done");
    done.set_state(TaskState::Succeeded);
    done.result = b"ok".to_vec();
    let mut running = task("running");
    running.set_state(TaskState::Leased);
    running.agent_id = "old-agent".into();
    running.lease_deadline_unix_ms = 5;
    assert!(store.restore(done).await.expect("restore"));
    assert!(store.restore(running).await.expect("restore"));
    assert!(!store.restore(task("a")).await.expect("already there"));
    let c = store.counts();
    assert_eq!((c.queued, c.succeeded), (2, 1));
    let r = store.get("running").expect("get").expect("there");
    assert_eq!((r.state(), r.agent_id.as_str()), (TaskState::Queued, ""));
    assert_eq!(store.lease("ag", 10, TTL).await.expect("lease").len(), 2);
}

#[tokio::test]
#[ignore = "writes the fuzz corpus"]
async fn write_fuzz_corpus() {
    let Ok(out) = std::env::var("STORE_CORPUS_DIR") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = thirty_tasks(dir.path()).await;
    std::fs::write(std::path::Path::new(&out).join("thirty-tasks.redb"), bytes).expect("write");
    std::fs::copy(
        dir.path().join(witness::FILE),
        std::path::Path::new(&out).join("witness.hwm"),
    )
    .expect("copy");
}

/// Prints where opening a store of queued tasks goes: redb's open without
/// and with its integrity check, one scan decoding every record (what the
/// rebuild of counts and the idempotency index does), and the whole
/// `TaskStore::open`, with the process's resident memory before and after
/// each step. A report, not a test (no thresholds); the size is
/// `FEDERATION_OPEN_TASKS` (default 20,000), built in batches of 10,000:
/// `FEDERATION_OPEN_TASKS=1000000 cargo test -p federation --release tasks::tests::open_time -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a measurement"]
async fn open_time() {
    use redb::{ReadableDatabase, ReadableTable};
    fn rss_mb() -> f64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: f64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0.0);
        pages * 4096.0 / 1e6
    }
    let n: usize = std::env::var("FEDERATION_OPEN_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    {
        let store = TaskStore::open(dir.path()).expect("open");
        for b in 0..n.div_ceil(10_000) {
            let batch = (b * 10_000..((b + 1) * 10_000).min(n))
                .map(|i| {
                    let mut t = task(&format!("{i:08}"));
                    t.idempotency_key = format!("key-{i}");
                    t.payload = vec![1; 256];
                    t
                })
                .collect();
            store
                .insert_batch(batch, None)
                .await
                .outcomes
                .expect("batch");
        }
        eprintln!(
            "{n} queued tasks stored in {:?}; resident {:.0} MB with the store open",
            started.elapsed(),
            rss_mb()
        );
    }
    let size = std::fs::metadata(dir.path().join(FILE))
        .expect("size")
        .len();
    eprintln!("file {size} bytes; resident {:.0} MB after close", rss_mb());
    for check in [false, false, true] {
        let start = std::time::Instant::now();
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(check);
        drop(builder.create(dir.path().join(FILE)).expect("open"));
        eprintln!("redb open, integrity check {check}: {:?}", start.elapsed());
    }
    {
        let start = std::time::Instant::now();
        let db = store::open_checked(&dir.path().join(FILE)).expect("open");
        eprintln!(
            "open_checked (what TaskStore::open calls): {:?}",
            start.elapsed()
        );
        let start = std::time::Instant::now();
        let txn = db.begin_read().expect("read");
        let table = txn
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("tasks"))
            .expect("tasks");
        let mut decoded = 0usize;
        for entry in table.iter().expect("iter") {
            let (k, v) = entry.expect("entry");
            decoded += usize::from(store::decode(k.value(), v.value()).is_ok());
        }
        eprintln!("one scan decoding {decoded} records: {:?}", start.elapsed());
    }
    let before = rss_mb();
    let start = std::time::Instant::now();
    let store = TaskStore::open(dir.path()).expect("open");
    eprintln!(
        "TaskStore::open (check, rebuild, witness) of {} queued tasks: {:?}; resident {before:.0} -> {:.0} MB",
        store.counts().queued,
        start.elapsed(),
        rss_mb()
    );
    let start = std::time::Instant::now();
    store.insert(task("first")).await.expect("first insert");
    eprintln!("first insert after open: {:?}", start.elapsed());
}

#[tokio::test]
async fn the_background_check_of_a_sound_store_finds_it_sound() {
    // A fresh store, and a store written to while its check runs: the check
    // reads the commit it pinned at open, never a later one.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = TaskStore::open(dir.path()).expect("open");
        assert_eq!(
            verified(&store),
            Verification::Sound {
                records: 0,
                undecodable: 0
            }
        );
        for i in 0..2000 {
            store
                .insert(task(&format!("t{i:05}")))
                .await
                .expect("insert");
        }
    }
    let store = TaskStore::open(dir.path()).expect("reopen");
    for i in 0..300 {
        let mut t = task(&format!("u{i:05}"));
        t.payload = vec![7; 300];
        store.insert(t).await.expect("insert while checking");
    }
    assert_eq!(
        verified(&store),
        Verification::Sound {
            records: 2000,
            undecodable: 0
        }
    );
}
