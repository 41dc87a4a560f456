//! Reading the decision log from its end: the newest records that match, or
//! the newest record of one task, without reading (or parsing) the whole
//! file. For the status page (every few seconds) and `GetTask`, whose cost
//! must not grow with the log.
//!
//! Reads blocks of [`BLOCK`] bytes backwards; a torn last line (no newline)
//! is skipped as [`super::show`] skips it; a line that does not parse is
//! skipped here (display only: `audit verify` is what judges the chain).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{AuditError, Filter, Record, log_path};

/// Bytes read per step backwards.
const BLOCK: u64 = 64 * 1024;

/// Newest first: calls `visit` with each complete line from the end of the
/// log at `path` until it returns `false`, the file's start, or `max_bytes`
/// read. A missing file has no lines.
fn each_line_backwards(
    path: &Path,
    max_bytes: u64,
    mut visit: impl FnMut(&[u8]) -> bool,
) -> Result<(), AuditError> {
    let path = log_path(path);
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    let floor = len.saturating_sub(max_bytes);
    let mut end = len;
    // Bytes after the last newline seen so far (the start of a line whose
    // beginning lies in an earlier block), in file order.
    let mut carry: Vec<u8> = Vec::new();
    // The bytes after the file's last newline are a torn line: skip them.
    let mut torn = true;
    while end > floor {
        let start = end.saturating_sub(BLOCK).max(floor);
        let mut block = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_exact(&mut block).map_err(io)?;
        block.extend_from_slice(&carry);
        let mut rest = block.as_slice();
        while let Some(nl) = rest.iter().rposition(|&b| b == b'\n') {
            let line = &rest[nl + 1..];
            if torn {
                torn = false;
            } else if !line.is_empty() && !visit(line) {
                return Ok(());
            }
            rest = &rest[..nl];
        }
        carry = rest.to_vec();
        end = start;
    }
    // The file's first line (no newline before it), when fully read.
    if floor == 0 && !torn && !carry.is_empty() {
        visit(&carry);
    }
    Ok(())
}

/// The newest `limit` records of the log at `path` that match `filter`,
/// oldest first, reading at most `max_bytes` from the end.
pub fn recent(
    path: &Path,
    filter: &Filter,
    limit: usize,
    max_bytes: u64,
) -> Result<Vec<Record>, AuditError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    each_line_backwards(path, max_bytes, |line| {
        if let Ok(r) = serde_json::from_slice::<Record>(line) {
            if filter.matches(&r) {
                out.push(r);
            }
        }
        out.len() < limit
    })?;
    out.reverse();
    Ok(out)
}

/// The newest record of `task_id` that `keep` accepts, searching back from
/// the end of the log no further than records older than `not_before_unix_ms`
/// (pass the task's creation time less a margin: its decision was appended
/// when it was stored).
pub fn last_of_task(
    path: &Path,
    task_id: &str,
    not_before_unix_ms: i64,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Option<Record>, AuditError> {
    let mut found = None;
    // The task id must appear in the line: skip parsing every other line.
    let needle = format!("\"task_id\":\"{task_id}\"");
    each_line_backwards(path, u64::MAX, |line| {
        let text = String::from_utf8_lossy(line);
        if text.contains(&needle) {
            if let Ok(r) = serde_json::from_str::<Record>(&text) {
                if r.entry.task_id.as_deref() == Some(task_id) && keep(&r) {
                    found = Some(r);
                    return false;
                }
            }
        } else if let Some(ms) = unix_ms_of(&text) {
            if ms < not_before_unix_ms {
                return false;
            }
        }
        true
    })?;
    Ok(found)
}

/// The `unix_ms` field of a line, without parsing the rest of it.
fn unix_ms_of(line: &str) -> Option<i64> {
    let at = line.find("\"unix_ms\":")? + "\"unix_ms\":".len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{DecisionEntry, DecisionLog, kind};

    #[tokio::test]
    async fn newest_records_and_a_tasks_record_from_the_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = DecisionLog::open(dir.path(), "europe").expect("open");
        for i in 0..300 {
            // Long notes, so that records cross block boundaries.
            let entry = DecisionEntry::new(kind::ROUTE)
                .task(format!("t{i}"))
                .note("x".repeat(700 + i));
            log.append(entry).await.expect("append");
        }
        let all = crate::audit::show(dir.path(), &Filter::default()).expect("show");
        let last5 = recent(dir.path(), &Filter::default(), 5, u64::MAX).expect("recent");
        assert_eq!(last5, all[295..].to_vec());
        let every = recent(dir.path(), &Filter::default(), 1000, u64::MAX).expect("recent");
        assert_eq!(every, all, "the first line is read too");
        let one = Filter {
            task_id: Some("t7".into()),
            ..Filter::default()
        };
        assert_eq!(
            recent(dir.path(), &one, 5, u64::MAX).expect("recent"),
            vec![all[7].clone()]
        );
        let bounded = recent(dir.path(), &Filter::default(), 1000, 10_000).expect("recent");
        assert!(
            !bounded.is_empty() && bounded.len() < 20,
            "{}",
            bounded.len()
        );
        assert_eq!(bounded.last(), all.last());

        let found = last_of_task(dir.path(), "t12", 0, |_| true).expect("read");
        assert_eq!(found.as_ref(), Some(&all[12]));
        // Not found past the time bound.
        let future = all[12].unix_ms + 1_000_000;
        assert_eq!(
            last_of_task(dir.path(), "t12", future, |_| true).expect("read"),
            None
        );
        assert_eq!(
            last_of_task(dir.path(), "t1", 0, |_| true)
                .expect("read")
                .map(|r| r.seq),
            Some(2),
            "t1 is not t12 nor t100"
        );
        drop(log);
        // A torn last line is skipped.
        let file = dir.path().join(crate::audit::FILE_NAME);
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.extend_from_slice(b"{\"seq\":301,\"torn");
        std::fs::write(&file, bytes).expect("write");
        let last = recent(dir.path(), &Filter::default(), 1, u64::MAX).expect("recent");
        assert_eq!(last, vec![all[299].clone()]);
        assert!(
            recent(&dir.path().join("nope"), &Filter::default(), 3, u64::MAX)
                .expect("missing file")
                .is_empty()
        );
    }
}
