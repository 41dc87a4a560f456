//! `federation store check|accept|recover`: a sound store passes, a damaged
//! one is reported (exit 1) and never panics, and a store is rebuilt from a
//! peer's snapshot made by the real envelope code.

use std::path::Path;
use std::process::{Command, Output};

use federation::replication::envelope::{self, NonceSource, SealParams};
use federation::replication::{Key, KeyRing, SnapshotBody, receiver};
use federation::tasks::TaskStore;
use federation_api::{Task, TaskState};
use prost::Message as _;

fn federation(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_federation"))
        .args(args)
        .arg(dir)
        .output()
        .expect("runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn task(id: &str) -> Task {
    Task {
        task_id: format!("{id}.europe"),
        payload: vec![b'p'; 200],
        owner_region: "europe".into(),
        ..Task::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// A closed store of 30 tasks in `dir`.
fn thirty_tasks(dir: &Path) {
    runtime().block_on(async {
        let store = TaskStore::open(dir).expect("open");
        for i in 0..30 {
            store
                .insert(task(&format!("t{i:02}")))
                .await
                .expect("insert");
        }
    });
}

#[test]
fn check_passes_a_sound_store_and_reports_a_damaged_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    thirty_tasks(dir.path());
    let out = federation(&["store", "check"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        text(&out)
    );

    // Damage the middle of every page after the header.
    let path = dir.path().join("tasks.redb");
    let mut bytes = std::fs::read(&path).expect("read");
    for page in (4096..bytes.len()).step_by(4096) {
        bytes[page + 2048] ^= 0xff;
    }
    std::fs::write(&path, &bytes).expect("write");
    let out = federation(&["store", "check", "--format", "json"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("damaged"), "{problems}");
    // The check worked on a copy: the original is byte for byte the same.
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
    let out = federation(&["store", "check"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DAMAGED") && stdout.contains("store recover"),
        "{}",
        text(&out)
    );

    // No store at all: the check cannot run.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = federation(&["store", "check"], empty.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no task store"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_store_rolled_back_is_reported_then_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    thirty_tasks(dir.path());
    let path = dir.path().join("tasks.redb");
    let older = std::fs::read(&path).expect("read");
    runtime().block_on(async {
        let store = TaskStore::open(dir.path()).expect("open");
        store.insert(task("late")).await.expect("insert");
    });
    // An older copy of the file comes back (a restored disk image).
    std::fs::write(&path, &older).expect("roll back");
    let out = federation(&["store", "check"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 tasks lost"),
        "{}",
        text(&out)
    );
    let out = federation(&["store", "accept"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = federation(&["store", "check"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

fn seal(body: &SnapshotBody, key: &Key) -> Vec<federation_api::SnapshotChunk> {
    let params = SealParams {
        source: body.source_region.clone(),
        epoch: body.epoch,
        sequence: body.sequence,
        rule_indexes: vec![0, 1],
        policy_hash: "h".into(),
        compression: Some(3),
        chunk_size: 1024,
    };
    envelope::seal(&body.encode_to_vec(), &params, key, &NonceSource::new()).expect("seal")
}

#[test]
fn recover_rebuilds_a_store_from_a_peer_snapshot() {
    // The region's store, as its snapshot carries it: pending tasks and
    // recent results.
    let live = tempfile::tempdir().expect("tempdir");
    let (pending, results) = runtime().block_on(async {
        let store = TaskStore::open(live.path()).expect("open");
        for i in 0..6 {
            store.insert(task(&format!("t{i}"))).await.expect("insert");
        }
        let leased = store
            .lease("agent-x", 2, std::time::Duration::from_secs(30))
            .await
            .expect("lease");
        let done = store
            .complete(
                "agent-x",
                &leased[0].task_id,
                true,
                b"ok".to_vec(),
                String::new(),
            )
            .await
            .expect("complete");
        (store.pending().expect("pending"), vec![done])
    });
    assert_eq!(pending.len(), 5);
    let key = Key::new("k1", [9u8; 32]);
    let body = SnapshotBody {
        source_region: "europe".into(),
        epoch: 3,
        sequence: 8,
        taken_unix_ms: 1_000,
        tasks: pending.clone(),
        results: results.clone(),
        ..Default::default()
    };
    let peer = tempfile::tempdir().expect("tempdir");
    let snap = peer.path().join("europe.snap");
    receiver::write_file(&snap, &seal(&body, &key)).expect("write");
    let keys = peer.path().join("keys");
    std::fs::write(&keys, KeyRing::line("k1", &[9u8; 32])).expect("keys");

    // A lost disk: an empty data directory.
    let fresh = tempfile::tempdir().expect("tempdir");
    let recover = |dir: &Path, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_federation"));
        cmd.args(["store", "recover"])
            .arg(dir)
            .arg("--snapshot")
            .arg(&snap)
            .arg("--keys")
            .arg(&keys)
            .args(extra);
        cmd.output().expect("runs")
    };
    let out = recover(fresh.path(), &["--region", "europe"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 pending and 1 finished"),
        "{}",
        text(&out)
    );
    let out = federation(&["store", "check"], fresh.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    runtime().block_on(async {
        let store = TaskStore::open(fresh.path()).expect("open rebuilt");
        for t in &pending {
            let got = store.get(&t.task_id).expect("get").expect("restored");
            assert_eq!(got.state(), TaskState::Queued, "{got:?}");
            assert_eq!(got.payload, t.payload);
        }
        let done = store
            .get(&results[0].task_id)
            .expect("get")
            .expect("restored");
        assert_eq!(
            (done.state(), done.result.as_slice()),
            (TaskState::Succeeded, &b"ok"[..])
        );
        let c = store.counts();
        assert_eq!((c.queued, c.succeeded), (5, 1));
    });

    // A store is there now: refused without --replace, and a snapshot of
    // another region is refused before anything is touched.
    let out = recover(fresh.path(), &["--region", "europe"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replace"),
        "{}",
        text(&out)
    );
    let out = recover(fresh.path(), &["--region", "asia_pacific", "--replace"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(fresh.path().join("tasks.redb").exists());
    let out = recover(fresh.path(), &["--region", "europe", "--replace"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let moved = std::fs::read_dir(fresh.path())
        .expect("list")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("tasks.redb.damaged-")
        });
    assert!(moved, "the replaced store is kept aside");
    // Never from under a running controller (it holds the file's lock).
    let rt = runtime();
    let running = rt.block_on(async { TaskStore::open(fresh.path()).expect("open") });
    let out = recover(fresh.path(), &["--region", "europe", "--replace"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        text(&out)
    );
    assert!(fresh.path().join("tasks.redb").exists());
    drop(running);
}
