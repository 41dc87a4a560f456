//! Putting back into the log's file, at open, the staged records a crash
//! left only in the task store's rows.

use super::{Replayed, Rewrite, Row, Staged, decode, row_of, set_hash};
use crate::audit::{AuditError, DecisionLog, Prepared, Tip, check_line, tail};

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
        let mut assigned = self.active().ok_or_else(|| {
            AuditError::Write("a log in the database has no staged records to replay".into())
        })?;
        let durable = self.last();
        if assigned.tip.seq != durable.0 {
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
        // Nothing is written while `assigned` is held (it equals the
        // durable tip: nothing was appended since open).
        assigned.append_synced(&buf, tip.clone()).map_err(io)?;
        self.advance(tip.seq, &tip.hash);
        tracing::warn!(
            path = %path.display(),
            appended = done.appended,
            resealed = done.resealed,
            "decision log: appended the records a crash left only in the task store"
        );
        Ok(done)
    }
}
