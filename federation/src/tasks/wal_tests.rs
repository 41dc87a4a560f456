//! Tests of the embedded store's write-ahead log on real files: what a
//! crash leaves (the files copied while the store runs, the database file
//! holding only its last checkpoint), a torn frame at the log's end, a
//! damaged frame in its middle, and a SIGKILL of a child process while a
//! checkpoint follows every batch.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;
use federation_sandbox::fixtures::queued_task as task;

/// Checkpoints that never come due: all work stays in the log.
fn never() -> Checkpoints {
    Checkpoints {
        bytes: u64::MAX,
        interval: Duration::from_secs(3600),
    }
}

fn open_with(dir: &Path, checkpoints: Checkpoints) -> Result<TaskStore, StoreError> {
    TaskStore::open_with(
        dir,
        StoreOptions {
            checkpoints,
            ..StoreOptions::default()
        },
    )
}

/// What a crash leaves of `dir` while its store runs: its files, copied.
/// redb's commits without fsync stay in its memory, so the copy of
/// `tasks.redb` is its last checkpoint.
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    for name in [FILE, WAL_FILE, witness::FILE] {
        let from = dir.join(name);
        if from.exists() {
            std::fs::copy(&from, out.path().join(name)).expect("copy");
        }
    }
    out
}

/// A store with `n` tasks inserted one by one (one frame each), none
/// checkpointed; the crash images after `n - 1` and after `n` inserts.
async fn logged(n: usize) -> (tempfile::TempDir, tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), never()).expect("open");
    let mut ids = Vec::new();
    let mut before = None;
    for i in 0..n {
        if i + 1 == n {
            // The witness of the image before the last frame: it never
            // saw the commit whose frame is torn below.
            before = Some(crash_image(dir.path()));
        }
        let id = format!("t{i}");
        store.insert(task(&id)).await.expect("insert");
        ids.push(id);
    }
    let after = crash_image(dir.path());
    drop(store);
    (before.expect("n > 0"), after, ids)
}

fn present(store: &TaskStore, ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter(|id| matches!(store.get(id), Ok(Some(_))))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_crash_image_comes_back_whole_from_the_log() {
    let (_, image, ids) = logged(20).await;
    let spans = store::frame_spans(&std::fs::read(image.path().join(WAL_FILE)).expect("read"));
    assert_eq!(spans.len(), 20, "one frame per acknowledged insert");
    let store = TaskStore::open(image.path()).expect("reopens from the log");
    assert_eq!(present(&store, &ids), ids);
    assert_eq!(store.counts().queued, 20);
    assert_eq!(store.mark().created, 20);
}

#[tokio::test]
async fn a_torn_frame_at_the_end_is_the_end_of_the_log() {
    // Cut mid-frame (the file ends inside it), and garbage over the last
    // frame's second half (the file keeps its length): each opens, with
    // every task acknowledged before the torn frame.
    for garbage in [false, true] {
        let (before, image, ids) = logged(12).await;
        let wal = image.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&wal).expect("read");
        let spans = store::frame_spans(&bytes);
        assert_eq!(spans.len(), 12);
        let (start, end) = spans[11];
        let mid = start + (end - start) / 2;
        if garbage {
            bytes[mid..end].fill(0xA5);
        } else {
            bytes.truncate(mid);
        }
        std::fs::write(&wal, &bytes).expect("tear");
        std::fs::copy(
            before.path().join(witness::FILE),
            image.path().join(witness::FILE),
        )
        .expect("the witness of before the torn frame");
        let store = TaskStore::open(image.path())
            .unwrap_or_else(|e| panic!("opens after a torn tail (garbage: {garbage}): {e}"));
        assert_eq!(present(&store, &ids), ids[..11], "garbage: {garbage}");
        assert_eq!(store.counts().queued, 11);
        // It goes on from there, and the next open agrees.
        store.insert(task("next")).await.expect("insert after");
        drop(store);
        let store = TaskStore::open(image.path()).expect("reopen");
        assert_eq!(present(&store, &ids).len(), 11);
        assert!(matches!(store.get("next"), Ok(Some(_))));
    }
}

#[tokio::test]
async fn a_damaged_frame_in_the_middle_is_refused_naming_the_file_and_offset() {
    let (_, image, _) = logged(10).await;
    let wal = image.path().join(WAL_FILE);
    let mut bytes = std::fs::read(&wal).expect("read");
    let spans = store::frame_spans(&bytes);
    let (start, end) = spans[3];
    bytes[(start + end) / 2] ^= 0x40;
    std::fs::write(&wal, &bytes).expect("damage");
    let err = TaskStore::open(image.path()).expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    assert!(text.contains(&wal.display().to_string()), "{text}");
    assert!(text.contains(&format!("byte {start}")), "{text}");
    assert!(text.contains("damaged in the middle"), "{text}");
    // The offline check says the same, and does not change the log.
    let report = check::check(image.path()).expect("check runs");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("damaged in the middle")),
        "{report:?}"
    );
    assert_eq!(std::fs::read(&wal).expect("read"), bytes);
}

#[tokio::test]
async fn a_clean_close_checkpoints_and_empties_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_with(dir.path(), never()).expect("open");
        for i in 0..5 {
            store.insert(task(&format!("t{i}"))).await.expect("insert");
        }
        assert!(
            std::fs::metadata(dir.path().join(WAL_FILE))
                .expect("wal")
                .len()
                > 0
        );
    }
    assert_eq!(
        std::fs::metadata(dir.path().join(WAL_FILE))
            .expect("wal")
            .len(),
        0
    );
    // The database file alone holds everything now.
    let db = redb::Database::create(dir.path().join(FILE)).expect("db");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
    let tasks: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
    let table = txn.open_table(tasks).expect("tasks");
    assert_eq!(redb::ReadableTableMetadata::len(&table).expect("len"), 5);
}

#[tokio::test]
async fn checkpoints_by_size_keep_the_log_small_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(
        dir.path(),
        Checkpoints {
            bytes: 4096,
            interval: Duration::from_secs(3600),
        },
    )
    .expect("open");
    let mut ids = Vec::new();
    for i in 0..200 {
        let id = format!("t{i}");
        let mut t = task(&id);
        t.payload = vec![3; 200];
        store.insert(t).await.expect("insert");
        ids.push(id);
    }
    let image = crash_image(dir.path());
    let spans = store::frame_spans(&std::fs::read(image.path().join(WAL_FILE)).expect("read"));
    // Frames since the last checkpoint only (it wrote from the start again).
    assert!(spans.len() < 50, "{} frames kept", spans.len());
    drop(store);
    let store = TaskStore::open(image.path()).expect("reopen the crash image");
    assert_eq!(present(&store, &ids), ids);
}

const CHILD_ENV: &str = "FEDERATION_WAL_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "tasks::wal_tests::checkpointing_child";
/// The prefix of the child's task ids (each round its own).
const ROUND_ENV: &str = "FEDERATION_WAL_CRASH_CHILD_ROUND";

/// Not a test on its own: when the parent sets [`CHILD_ENV`], it inserts
/// from 16 tasks at once with a checkpoint after every batch, printing
/// `ACK <id>` per acknowledged insert, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpointing_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let every_batch = Checkpoints {
        bytes: 1,
        interval: Duration::ZERO,
    };
    let round = std::env::var(ROUND_ENV).unwrap_or_default();
    let store = open_with(Path::new(&dir), every_batch).expect("child open");
    let mut handles = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        let round = round.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..100_000 {
                let id = format!("r{round}-w{w}-{i}");
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
fn acknowledged_inserts_survive_sigkill_while_checkpoints_run() {
    // Every batch is followed by a checkpoint (a durable commit of the
    // database, then the log written from its start again), so the kill
    // lands in or between checkpoints; three kills, each on the store the
    // previous one left.
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut acked = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(&exe)
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let start = acked.len();
        for line in lines.by_ref() {
            let line = line.expect("read child");
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(id.to_string());
                if acked.len() - start >= 400 {
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL child");
        for line in lines {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(id.to_string());
            }
        }
        let status = child.wait().expect("wait child");
        assert!(!status.success(), "the child was killed, not finished");
        assert!(acked.len() - start >= 400, "round {round}: too few acks");
        // Every round's acknowledged tasks, in the store the kill left.
        let store = TaskStore::open(dir.path()).expect("reopen after SIGKILL");
        let missing: Vec<_> = acked
            .iter()
            .filter(|id| !matches!(store.get(id), Ok(Some(_))))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged tasks lost: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)]
        );
        drop(store);
    }
}
