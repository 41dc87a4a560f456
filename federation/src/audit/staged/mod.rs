//! Decision records staged in the embedded task store's own transaction
//! (one fdatasync per submit): the row a sealed record is kept as in
//! `tasks.redb` until the log's file holds it durably; the replay at open
//! that puts back into the file what a crash left only in the rows is in
//! `replay`.

mod replay;

use super::Prepared;

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
pub(super) struct Row {
    pub(super) seq: u64,
    pub(super) unix_ms: i64,
    pub(super) prev_hash: String,
    pub(super) hash: String,
    pub(super) time: String,
    pub(super) rule_index: Option<u32>,
    pub(super) task_id: Option<String>,
    pub(super) head: Vec<u8>,
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

pub(super) fn decode(bytes: &[u8]) -> Result<Row, String> {
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
