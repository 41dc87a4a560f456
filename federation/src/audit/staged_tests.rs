//! Tests of records staged in the task store's transaction: a crash that
//! left them only in the rows (the file cut at their first line, a torn
//! write after it), records before them lost, and a second crash during
//! the replay.

use std::path::Path;

use super::*;

fn entry(i: usize) -> Prepared {
    Prepared::entry(
        &Entry::new(kind::ROUTE)
            .task(format!("task-{i}"))
            .note(format!("record {i}")),
    )
}

/// Cuts the active file just before the line of `seq` and leaves half of
/// that line behind (a torn write).
fn cut_before(dir: &Path, seq: u64) {
    let path = dir.join(FILE_NAME);
    let bytes = std::fs::read(&path).expect("read");
    let mut at = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if seq_of(line) == Some(seq) {
            let torn = &line[..line.len() / 2];
            let mut kept = bytes[..at].to_vec();
            kept.extend_from_slice(torn);
            std::fs::write(&path, kept).expect("write");
            return;
        }
        at += line.len();
    }
    panic!("seq {seq} not in {}", path.display());
}

fn task_ids(dir: &Path) -> Vec<String> {
    show(dir, &Filter::default())
        .expect("show")
        .into_iter()
        .filter_map(|r| r.entry.task_id)
        .collect()
}

#[tokio::test]
async fn staged_records_cut_from_the_file_are_replayed_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = DecisionLog::open(dir.path(), "europe").expect("open");
    log.append(entry(0)).await.expect("append");
    let rows = log
        .stage(vec![entry(1), entry(2), entry(3)])
        .expect("stage");
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3, 4]);
    log.flush().await.expect("flush");
    let whole = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
    drop(log);
    // The disk lost the unsynced tail: the staged lines, one of them torn.
    cut_before(dir.path(), 2);
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    assert_eq!(log.last().0, 1);
    let mut rewritten = 0;
    let done = log
        .replay_staged(rows.clone(), &mut |_, _| {
            rewritten += 1;
            Ok(())
        })
        .expect("replay");
    assert_eq!(
        done,
        Replayed {
            present: 0,
            appended: 3,
            resealed: 0
        }
    );
    assert_eq!(rewritten, 0, "sealed as before: nothing to rewrite");
    assert_eq!(log.last().0, 4);
    drop(log);
    // Byte for byte what was staged.
    assert_eq!(
        std::fs::read(dir.path().join(FILE_NAME)).expect("read"),
        whole
    );
    let report = verify(dir.path()).expect("verify");
    assert!(report.is_intact(), "{report:?}");
    // A second replay of the same rows finds them present.
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    let again = log.replay_staged(rows, &mut |_, _| Ok(())).expect("replay");
    assert_eq!(again.present, 3);
    assert_eq!(again.appended, 0);
    let next = log.append(entry(4)).await.expect("append after replay");
    assert_eq!(next, 5);
    drop(log);
    assert_eq!(
        task_ids(dir.path()),
        ["task-0", "task-1", "task-2", "task-3", "task-4"]
    );
}

#[tokio::test]
async fn staged_records_after_a_lost_record_are_sealed_again_and_rewritten_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = DecisionLog::open(dir.path(), "europe").expect("open");
    log.append(entry(0)).await.expect("append");
    // Seq 2 is an append nobody heard back from (lost with the tail);
    // 3 and 4 are staged in the store.
    let lost = log.append(entry(99));
    let rows = log.stage(vec![entry(1), entry(2)]).expect("stage");
    lost.await.expect("written");
    log.flush().await.expect("flush");
    drop(log);
    cut_before(dir.path(), 2);
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    let mut rewrites = Vec::new();
    let done = log
        .replay_staged(rows, &mut |old, new| {
            rewrites.push((old.to_vec(), new.to_vec()));
            Ok(())
        })
        .expect("replay");
    assert_eq!(done.appended, 2);
    assert_eq!(done.resealed, 2);
    assert_eq!(rewrites.len(), 1);
    let (old, new) = &rewrites[0];
    assert_eq!(old, &[3, 4]);
    assert_eq!(new.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(log.last().0, 3);
    drop(log);
    let report = verify(dir.path()).expect("verify");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(task_ids(dir.path()), ["task-0", "task-1", "task-2"]);
    // A crash after the rewrite: the rewritten rows replay as present.
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    let again = log
        .replay_staged(new.clone(), &mut |_, _| Ok(()))
        .expect("replay");
    assert_eq!(again.present, 2);
}

#[tokio::test]
async fn a_row_that_is_not_the_files_record_at_its_seq_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = DecisionLog::open(dir.path(), "europe").expect("open");
    log.append(entry(0)).await.expect("append");
    log.append(entry(1)).await.expect("append");
    drop(log);
    // A row staged by another log, at seq 2.
    let other = tempfile::tempdir().expect("tempdir");
    let log = DecisionLog::open(other.path(), "europe").expect("open");
    log.append(entry(5)).await.expect("append");
    let rows = log.stage(vec![entry(6)]).expect("stage");
    drop(log);
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    let err = log
        .replay_staged(rows, &mut |_, _| Ok(()))
        .expect_err("refused");
    assert!(err.to_string().contains("record 2"), "{err}");
    // An unreadable row is refused too, never a panic.
    let bad = vec![Staged {
        seq: 3,
        row: vec![1, 2, 3],
    }];
    let err = log
        .replay_staged(bad, &mut |_, _| Ok(()))
        .expect_err("refused");
    assert!(err.to_string().contains("unreadable"), "{err}");
}

/// The seqs of the whole lines the active file holds now.
fn lines_in_file(dir: &Path) -> Vec<u64> {
    let bytes = std::fs::read(dir.join(FILE_NAME)).unwrap_or_default();
    bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .filter_map(seq_of)
        .collect()
}

#[tokio::test]
async fn staged_lines_are_in_the_file_when_staged_and_share_one_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No reminder during the test: only a caller that waits syncs.
    let options = LogOptions {
        sync_interval: std::time::Duration::from_secs(3600),
        ..LogOptions::default()
    };
    let log = DecisionLog::open_with(dir.path(), "europe", options).expect("open");
    log.append(entry(0)).await.expect("append");
    let synced = log.syncs();
    assert_eq!(synced, 1, "a caller that waits syncs at once");
    // Twenty staged batches, each one's line in the file when `stage`
    // returns: written by the stager (no thread woken, nothing to wait for).
    for i in 1..=20u64 {
        let rows = log.stage(vec![entry(i as usize)]).expect("stage");
        assert_eq!(rows[0].seq, i + 1);
        assert_eq!(lines_in_file(dir.path()), (1..=i + 1).collect::<Vec<_>>());
    }
    // Readable in the file, not synced: the store keeps their rows.
    assert_eq!(log.syncs(), synced, "staged lines wait for a shared sync");
    assert_eq!(log.last().0, 1, "durable only up to the last sync");
    // A caller that waits syncs them all with its own.
    let seq = log.append(entry(21)).await.expect("append");
    assert_eq!(seq, 22);
    assert_eq!(log.syncs(), synced + 1);
    assert_eq!(log.last().0, 22);
    drop(log);
    let report = verify(dir.path()).expect("verify");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(task_ids(dir.path()).len(), 22);
}

#[tokio::test]
async fn staged_lines_become_durable_without_a_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = DecisionLog::open(dir.path(), "europe").expect("open");
    log.stage(vec![entry(0), entry(1)]).expect("stage");
    // The reminder syncs them (bounded wait: 10 s).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.last().0 < 2 {
        assert!(
            std::time::Instant::now() < until,
            "staged lines never synced"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(log.syncs() >= 1);
    // Closing the log syncs what it wrote last.
    log.stage(vec![entry(2)]).expect("stage");
    drop(log);
    let log = DecisionLog::open(dir.path(), "europe").expect("reopen");
    assert_eq!(log.last().0, 3);
}
