//! Decision records staged in the embedded task store's own transaction
//! (one fdatasync per submit): the row a sealed record is kept as in
//! `tasks.redb` until the log's file holds it durably, and the replay at
//! open that puts back into the file what a crash left only in the rows.

use std::io::Write;

use super::writer::lock;
use super::{AuditError, DecisionLog, Prepared, Tip, check_line, tail};

/// A record sealed for the task store's transaction: its place in the
/// chain (`seq`) and the row the store keeps until the log's file holds
/// the record durably ([`DecisionLog::durable_seq`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The record's seq.
    pub seq: u64,
    /// The row: everything needed to write the line again, or to seal the
    /// record again after other records a crash lost.
    pub row: Vec<u8>,
}

/// Called by [`DecisionLog::replay_staged`] before it appends records it
/// sealed again: the seqs of the rows to drop and the rows to keep instead.
pub type Rewrite<'a> = dyn FnMut(&[u64], &[Staged]) -> Result<(), String> + 'a;

/// What [`DecisionLog::replay_staged`] found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Rows whose records the file already held.
    pub present: usize,
    /// Rows whose records were appended to the file.
    pub appended: usize,
    /// Of those, the records sealed again at another seq (the records
    /// before them in the chain, never acknowledged, were lost).
    pub resealed: usize,
}

const VERSION: u8 = 1;
const HASH_LEN: usize = 64;
/// Where the hash sits in a row: after the version, seq, unix_ms and prev_hash.
const HASH_AT: usize = 1 + 8 + 8 + HASH_LEN;

/// A row decoded.
struct Row {
    seq: u64,
    unix_ms: i64,
    prev_hash: String,
    hash: String,
    time: String,
    rule_index: Option<u32>,
    task_id: Option<String>,
    head: Vec<u8>,
}

/// The row of `record` sealed at `seq` after `prev_hash`, at `time`; the
/// hash is filled in by [`set_hash`] once the record is sealed.
pub(super) fn row_of(
    record: &Prepared,
    seq: u64,
    time: &str,
    unix_ms: i64,
    prev_hash: &str,
) -> Vec<u8> {
    let (head, rule_index, task_id) = record.parts();
    let task = task_id.unwrap_or("").as_bytes();
    let mut row = Vec::with_capacity(HASH_AT + HASH_LEN + 40 + task.len() + head.len());
    row.push(VERSION);
    row.extend_from_slice(&seq.to_le_bytes());
    row.extend_from_slice(&unix_ms.to_le_bytes());
    push_hash(&mut row, prev_hash);
    row.extend_from_slice(&[b'0'; HASH_LEN]);
    let time = time.as_bytes();
    row.push(u8::try_from(time.len()).unwrap_or(u8::MAX));
    row.extend_from_slice(&time[..time.len().min(usize::from(u8::MAX))]);
    match rule_index {
        Some(i) => {
            row.push(1);
            row.extend_from_slice(&i.to_le_bytes());
        }
        None => row.extend_from_slice(&[0, 0, 0, 0, 0]),
    }
    match task_id {
        Some(_) => {
            let len = u16::try_from(task.len()).unwrap_or(u16::MAX);
            row.push(1);
            row.extend_from_slice(&len.to_le_bytes());
            row.extend_from_slice(&task[..usize::from(len)]);
        }
        None => row.extend_from_slice(&[0, 0, 0]),
    }
    row.extend_from_slice(head);
    row
}

fn push_hash(row: &mut Vec<u8>, hash: &str) {
    let mut h = [b'0'; HASH_LEN];
    let b = hash.as_bytes();
    h[..b.len().min(HASH_LEN)].copy_from_slice(&b[..b.len().min(HASH_LEN)]);
    row.extend_from_slice(&h);
}

/// Fills in the hash of a row made by [`row_of`].
pub(super) fn set_hash(row: &mut [u8], hash: &str) {
    let b = hash.as_bytes();
    let n = b.len().min(HASH_LEN);
    if let Some(slot) = row.get_mut(HASH_AT..HASH_AT + n) {
        slot.copy_from_slice(&b[..n]);
    }
}

fn decode(bytes: &[u8]) -> Result<Row, String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let part = bytes
            .get(at..at + n)
            .ok_or_else(|| format!("the row ends at byte {} (needs {})", bytes.len(), at + n))?;
        at += n;
        Ok(part)
    };
    let version = take(1)?[0];
    if version != VERSION {
        return Err(format!("unknown row version {version}"));
    }
    let u64_of = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        a
    };
    let seq = u64::from_le_bytes(u64_of(take(8)?));
    let unix_ms = i64::from_le_bytes(u64_of(take(8)?));
    let text = |b: &[u8], what: &str| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|e| format!("{what} is not UTF-8: {e}"))
    };
    let prev_hash = text(take(HASH_LEN)?, "prev_hash")?;
    let hash = text(take(HASH_LEN)?, "hash")?;
    let time_len = usize::from(take(1)?[0]);
    let time = text(take(time_len)?, "time")?;
    let flag = take(1)?[0];
    let mut r = [0u8; 4];
    r.copy_from_slice(take(4)?);
    let rule_index = (flag == 1).then_some(u32::from_le_bytes(r));
    let flag = take(1)?[0];
    let mut l = [0u8; 2];
    l.copy_from_slice(take(2)?);
    let task_bytes = take(usize::from(u16::from_le_bytes(l)))?;
    let task_id = if flag == 1 {
        Some(text(task_bytes, "task_id")?)
    } else {
        None
    };
    let head = bytes[at..].to_vec();
    Ok(Row {
        seq,
        unix_ms,
        prev_hash,
        hash,
        time,
        rule_index,
        task_id,
        head,
    })
}

/// How far back the file is read to check that the rows it should hold
/// are the records it holds.
const CHECK_BYTES: u64 = 64 * 1024 * 1024;

impl DecisionLog {
    /// Puts back into the file the records staged in the task store that a
    /// crash left only there, at open, before anything else is appended.
    /// A row whose seq the file already holds must be that record (its
    /// hash is compared when the line is within the last 64 MiB); a
    /// mismatch refuses, naming both. The missing ones are appended in seq
    /// order after the file's last record, sealed again when the records
    /// before them were lost (never acknowledged: an acknowledged record is
    /// either in the file or in a row); `rewrite(old seqs, new rows)` is
    /// called first then, so the store's rows always say what the file will
    /// hold (a second crash replays the same). Written and fdatasync'd
    /// before this returns. Blocking.
    pub fn replay_staged(
        &self,
        rows: Vec<Staged>,
        rewrite: &mut Rewrite<'_>,
    ) -> Result<Replayed, AuditError> {
        let mut done = Replayed::default();
        if rows.is_empty() {
            return Ok(done);
        }
        if self.in_database() {
            return Err(AuditError::Write(
                "records staged for a file log cannot be replayed into a log in the database"
                    .into(),
            ));
        }
        let mut decoded = Vec::with_capacity(rows.len());
        for s in &rows {
            let row = decode(&s.row).map_err(|why| {
                AuditError::Write(format!(
                    "the task store's staged decision record {} is unreadable: {why}",
                    s.seq
                ))
            })?;
            decoded.push(row);
        }
        decoded.sort_by_key(|r| r.seq);
        let mut assigned = lock(self.assigned());
        let durable = self.last();
        if assigned.seq != durable.0 {
            return Err(AuditError::Write(
                "staged records must be replayed before anything is appended".into(),
            ));
        }
        let (present, missing): (Vec<Row>, Vec<Row>) =
            decoded.into_iter().partition(|r| r.seq <= durable.0);
        done.present = present.len();
        if let Some(first) = present.first().map(|r| r.seq) {
            let want: std::collections::HashMap<u64, &Row> =
                present.iter().map(|r| (r.seq, r)).collect();
            let mut mismatch = None;
            tail::each_line_backwards(self.path(), CHECK_BYTES, |line| {
                let Ok(rec) = check_line(line) else {
                    return true;
                };
                if let Some(r) = want.get(&rec.seq) {
                    if r.hash != rec.hash {
                        mismatch = Some((rec.seq, r.task_id.clone(), rec.hash.clone()));
                        return false;
                    }
                }
                rec.seq > first
            })?;
            if let Some((seq, task, found)) = mismatch {
                return Err(AuditError::Write(format!(
                    "{}: record {seq} is {found}, but the task store holds another record \
                     staged at seq {seq} (task {}); refusing to continue the chain (check the \
                     log with `federation audit verify`)",
                    self.path().display(),
                    task.as_deref().unwrap_or("-"),
                )));
            }
        }
        if missing.is_empty() {
            return Ok(done);
        }
        let mut tip = Tip {
            seq: durable.0,
            hash: durable.1,
        };
        let mut buf = Vec::new();
        let mut new_rows = Vec::with_capacity(missing.len());
        let old: Vec<u64> = missing.iter().map(|r| r.seq).collect();
        for r in missing {
            let seq = tip.seq + 1;
            let again = seq != r.seq || tip.hash != r.prev_hash;
            let record = Prepared::from_raw(r.head, r.rule_index, r.task_id);
            let mut row = row_of(&record, seq, &r.time, r.unix_ms, &tip.hash);
            let hash =
                record.seal_into(&mut buf, seq, &r.time, r.unix_ms, self.region(), &tip.hash);
            set_hash(&mut row, &hash);
            if again {
                done.resealed += 1;
            }
            new_rows.push(Staged { seq, row });
            tip = Tip { seq, hash };
        }
        done.appended = new_rows.len();
        if done.resealed > 0 {
            rewrite(&old, &new_rows).map_err(|why| {
                AuditError::Write(format!(
                    "rewriting the task store's staged records before replaying them: {why}"
                ))
            })?;
        }
        let path = self.path().to_path_buf();
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        // The writer's handle appends too (O_APPEND): nothing is queued
        // while `assigned` is held and equals the durable tip.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io)?;
        file.write_all(&buf).map_err(io)?;
        file.sync_data().map_err(io)?;
        self.advance(tip.seq, &tip.hash);
        *assigned = tip;
        tracing::warn!(
            path = %path.display(),
            appended = done.appended,
            resealed = done.resealed,
            "decision log: appended the records a crash left only in the task store"
        );
        Ok(done)
    }
}
