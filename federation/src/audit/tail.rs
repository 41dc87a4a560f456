//! Reading part of the decision log without reading (or parsing) the whole
//! log: the newest records that match ([`recent`], read backwards from the
//! end of the active file in blocks of [`BLOCK`] bytes, then into the closed
//! segments), the same with the lines read checked (`list_visit`, for
//! `ListDecisions`), and the record of one task near a time
//! ([`first_of_task`], found by bisecting the segments, then the active
//! file, on `unix_ms`). For the status page (every few seconds),
//! `ListDecisions` and `GetTask`, whose cost must not grow with the log.
//!
//! A torn last line (no newline) is skipped as [`super::show`] skips it; a
//! line that does not parse is skipped here (display only: `audit verify`
//! is what judges the chain).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{AuditError, Filter, Record, log_path, segments};

/// Bytes read per step backwards.
const BLOCK: u64 = 64 * 1024;

/// Newest first: calls `visit` with each complete line from the end of the
/// log at `path` until it returns `false`, the file's start, or `max_bytes`
/// read. A missing file has no lines.
pub(super) fn each_line_backwards(
    path: &Path,
    max_bytes: u64,
    mut visit: impl FnMut(&[u8]) -> bool,
) -> Result<(), AuditError> {
    let path = log_path(path);
    let Some(read) = file_lines_backwards(&path, max_bytes, &mut visit)? else {
        return Ok(());
    };
    // The active file is read whole: go on into the closed segments,
    // newest first, within what is left of `max_bytes`.
    let mut budget = max_bytes.saturating_sub(read);
    for c in segments::closed(&path)?.iter().rev() {
        if budget == 0 {
            break;
        }
        let bytes = segments::read_closed(c)?;
        let whole = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let take = usize::try_from(budget)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let start = bytes.len() - take;
        budget -= take as u64;
        let mut rest = &whole[start.min(whole.len())..];
        loop {
            let (line, before) = match rest.iter().rposition(|&b| b == b'\n') {
                Some(nl) => (&rest[nl + 1..], Some(&rest[..nl])),
                // The segment's first line, when read from its start.
                None if start == 0 => (rest, None),
                None => break,
            };
            if !line.is_empty() && !visit(line) {
                return Ok(());
            }
            match before {
                Some(b) => rest = b,
                None => break,
            }
        }
    }
    Ok(())
}

/// [`each_line_backwards`] in one file; `None` when `visit` had enough (or
/// `max_bytes` ran out first), else how many bytes it read (the whole file).
fn file_lines_backwards(
    path: &Path,
    max_bytes: u64,
    visit: &mut impl FnMut(&[u8]) -> bool,
) -> Result<Option<u64>, AuditError> {
    let path = path.to_path_buf();
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(0)),
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
                return Ok(None);
            }
            rest = &rest[..nl];
        }
        carry = rest.to_vec();
        end = start;
    }
    // The file's first line (no newline before it), when fully read.
    if floor == 0 && !torn && !carry.is_empty() && !visit(&carry) {
        return Ok(None);
    }
    Ok((floor == 0).then_some(len))
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
    let mut oldest: Option<u64> = None;
    each_line_backwards(path, max_bytes, |line| {
        if let Ok(r) = serde_json::from_slice::<Record>(line) {
            // Seen twice across a rotation (see `list_visit`): once is enough.
            if oldest.is_some_and(|o| r.seq >= o) {
                return true;
            }
            oldest = Some(r.seq);
            if filter.matches(&r) {
                out.push(r);
            }
        }
        out.len() < limit
    })?;
    out.reverse();
    Ok(out)
}

/// What [`super::DecisionLog::list`] found at the end of the log.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    /// The newest records that matched (at most the limit), oldest first.
    pub records: Vec<Record>,
    /// Records read from the end (newest first) until the limit was met.
    pub read: u64,
    /// Seq and hash of the newest record (0 and 64 zeros when empty).
    pub head: (u64, String),
    /// The first record (newest first) whose hash or link to the record
    /// after it does not verify, as `seq N: why`.
    pub broken: Option<String>,
}

/// Checks lines given newest first, as [`each_line_backwards`] gives them:
/// each line's hash and its link to the line after it; collects what
/// `filter` accepts up to `limit`. Returns `false` when done.
pub(super) fn list_visit(
    out: &mut Listed,
    newer: &mut Option<(u64, String)>,
    filter: &Filter,
    limit: usize,
    line: &[u8],
) -> bool {
    if let Some((seq, _)) = newer.as_ref() {
        // A line at or after one already read: a rotation between reading
        // the active file and listing the segments showed it twice.
        if super::seq_of(line).is_some_and(|s| s >= *seq) {
            return true;
        }
    }
    out.read += 1;
    let record = match super::check_line(line) {
        Ok(r) => r,
        Err((seq, reason)) => {
            let seq = seq.map_or_else(|| "?".to_string(), |s| s.to_string());
            out.broken = Some(format!("seq {seq}: {reason}"));
            return false;
        }
    };
    match newer.as_ref() {
        None => out.head = (record.seq, record.hash.clone()),
        Some((seq, prev)) if *seq == record.seq + 1 && *prev == record.hash => {}
        Some((seq, _)) => {
            out.broken = Some(format!(
                "seq {seq}: does not follow seq {} (a record was inserted, deleted or replaced)",
                record.seq
            ));
            return false;
        }
    }
    *newer = Some((record.seq, record.prev_hash.clone()));
    if filter.matches(&record) {
        out.records.push(record);
    }
    out.records.len() < limit
}

/// The first record of `task_id` that `keep` accepts among the records
/// appended from `from_unix_ms` to `to_unix_ms` (for a task's decision: from
/// a little before its creation, since the record is appended when the task
/// is stored). The log is in append order, so the window's start is found by
/// bisecting the file on `unix_ms`, and it is read forwards until the record
/// or the window's end: a few seeks plus the records appended between
/// `from_unix_ms` and the record, whatever the log's size. A record outside
/// the window (a clock stepped further) is not found.
pub fn first_of_task(
    path: &Path,
    task_id: &str,
    from_unix_ms: i64,
    to_unix_ms: i64,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Option<Record>, AuditError> {
    let path = log_path(path);
    let closed = segments::closed(&path)?;
    // The active file holds the window when its first record is not after
    // the window's start (or there are no closed segments).
    let active_first = first_time_of_file(&path)?;
    if closed.is_empty() || active_first.is_some_and(|ms| ms <= from_unix_ms) {
        return first_in_file(&path, task_id, from_unix_ms, to_unix_ms, &mut keep);
    }
    // Bisect the closed segments on their first record's time: start in the
    // last one that begins before the window, then read forwards.
    let (mut lo, mut hi) = (0usize, closed.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let bytes = segments::read_closed(&closed[mid])?;
        let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        match unix_ms_of(&String::from_utf8_lossy(first)) {
            Some(ms) if ms < from_unix_ms => lo = mid,
            _ => hi = mid,
        }
    }
    let needle = format!("\"task_id\":\"{task_id}\"");
    for c in &closed[lo..] {
        let bytes = segments::read_closed(c)?;
        for line in bytes.split(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(line);
            match unix_ms_of(&text) {
                Some(ms) if ms > to_unix_ms => return Ok(None),
                Some(ms) if ms < from_unix_ms => continue,
                _ => {}
            }
            if text.contains(&needle) {
                if let Ok(r) = serde_json::from_str::<Record>(&text) {
                    if r.entry.task_id.as_deref() == Some(task_id) && keep(&r) {
                        return Ok(Some(r));
                    }
                }
            }
        }
    }
    first_in_file(&path, task_id, from_unix_ms, to_unix_ms, &mut keep)
}

/// The `unix_ms` of a file's first line (`None` when it is empty or absent).
fn first_time_of_file(path: &Path) -> Result<Option<i64>, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuditError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut line = Vec::new();
    std::io::BufRead::read_until(&mut std::io::BufReader::new(file), b'\n', &mut line).map_err(
        |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        },
    )?;
    Ok(unix_ms_of(&String::from_utf8_lossy(&line)))
}

/// [`first_of_task`] in the active file, bisecting it on time.
fn first_in_file(
    path: &Path,
    task_id: &str,
    from_unix_ms: i64,
    to_unix_ms: i64,
    keep: &mut impl FnMut(&Record) -> bool,
) -> Result<Option<Record>, AuditError> {
    let path = path.to_path_buf();
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    let (from, to) = (from_unix_ms, to_unix_ms);
    // Bisect: `lo` stays at or before the first line appended at `from` or
    // later (a line start, or the start of a line's tail that is skipped).
    let (mut lo, mut hi) = (0u64, len);
    while hi - lo > BLOCK {
        let mid = lo + (hi - lo) / 2;
        match first_line_time(&mut file, mid, hi).map_err(io)? {
            Some(ms) if ms < from => lo = mid,
            _ => hi = mid,
        }
    }
    // Read forwards from `lo` to the window's end.
    file.seek(SeekFrom::Start(lo)).map_err(io)?;
    let mut reader = std::io::BufReader::new(file);
    let needle = format!("\"task_id\":\"{task_id}\"");
    let mut line = Vec::new();
    let mut first = lo > 0;
    loop {
        line.clear();
        let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut line).map_err(io)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the end, or a torn last line
        }
        if std::mem::take(&mut first) {
            continue; // the tail of a line that began before `lo`
        }
        let text = String::from_utf8_lossy(&line);
        if unix_ms_of(&text).is_some_and(|ms| ms > to) {
            break;
        }
        if text.contains(&needle) {
            if let Ok(r) = serde_json::from_str::<Record>(&text) {
                if r.entry.task_id.as_deref() == Some(task_id) && keep(&r) {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

/// The `unix_ms` of the first line that starts after `at` (and before
/// `end`); `None` when there is none.
fn first_line_time(file: &mut File, at: u64, end: u64) -> std::io::Result<Option<i64>> {
    file.seek(SeekFrom::Start(at))?;
    let mut reader = std::io::BufReader::new(file.take(end.saturating_sub(at)));
    let mut skipped = Vec::new();
    if std::io::BufRead::read_until(&mut reader, b'\n', &mut skipped)? == 0 {
        return Ok(None);
    }
    let mut line = Vec::new();
    std::io::BufRead::read_until(&mut reader, b'\n', &mut line)?;
    Ok(unix_ms_of(&String::from_utf8_lossy(&line)))
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
    use crate::audit::{DecisionLog, Entry, kind};

    #[tokio::test]
    async fn newest_records_and_a_tasks_record_from_the_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = DecisionLog::open(dir.path(), "europe").expect("open");
        for i in 0..300 {
            // Long notes, so that records cross block boundaries.
            let entry = Entry::new(kind::ROUTE)
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

        let window = |r: &Record| (r.unix_ms - 5_000, r.unix_ms + 60_000);
        let (from, to) = window(&all[12]);
        let found = first_of_task(dir.path(), "t12", from, to, |_| true).expect("read");
        assert_eq!(found.as_ref(), Some(&all[12]));
        let (from, to) = window(&all[1]);
        assert_eq!(
            first_of_task(dir.path(), "t1", from, to, |_| true)
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

    /// A log of `n` records one second apart (synthetic lines: the reader
    /// does not check hashes), each about 1.5 KiB.
    fn spread_log(dir: &Path, n: i64) {
        let mut text = String::new();
        for i in 0..n {
            let r = Record {
                seq: i as u64 + 1,
                time: String::new(),
                unix_ms: 1_000_000 + i * 1000,
                region: "europe".into(),
                entry: Entry::new(kind::ROUTE)
                    .task(format!("t{i}"))
                    .note("y".repeat(1500)),
                prev_hash: String::new(),
                hash: String::new(),
            };
            text.push_str(&serde_json::to_string(&r).expect("json"));
            text.push('\n');
        }
        std::fs::write(dir.join(crate::audit::FILE_NAME), text).expect("write");
    }

    #[test]
    fn a_tasks_record_is_found_by_time_without_reading_the_log() {
        let dir = tempfile::tempdir().expect("tmp");
        spread_log(dir.path(), 5000); // ~7.5 MiB, ~115 blocks
        for i in [0, 1, 777, 2500, 4999] {
            let at = 1_000_000 + i * 1000;
            let found = first_of_task(dir.path(), &format!("t{i}"), at - 2_000, at + 2_000, |_| {
                true
            })
            .expect("read")
            .unwrap_or_else(|| panic!("t{i} found"));
            assert_eq!(found.unix_ms, at);
        }
        // Outside the window: not found (and not searched for).
        assert_eq!(
            first_of_task(dir.path(), "t777", 3_000_000, 3_100_000, |_| true).expect("read"),
            None
        );
        // `keep` chooses among the task's records.
        assert_eq!(
            first_of_task(dir.path(), "t10", 1_005_000, 1_015_000, |_| false).expect("read"),
            None
        );
        assert_eq!(
            first_of_task(&dir.path().join("none"), "t1", 0, 1, |_| true).expect("missing"),
            None
        );
    }
}
