//! Reading records back: where a data directory keeps its log, and the
//! records a [`Filter`] selects (across its segments, [`super::segments`]).

use std::path::Path;

use super::{AuditError, Record, log_path};

/// One file's bytes (the active file; [`super::read_log`] reads them all).
pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, AuditError> {
    std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Which records [`show`] returns; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this task.
    pub task_id: Option<String>,
    /// Only this rule, 1-based as shown to humans (`rule_index + 1`).
    pub rule: Option<u64>,
    /// Only decisions that chose this region.
    pub region: Option<String>,
    /// Only this outcome: `routed`, `failover` or `rejected`.
    pub outcome: Option<String>,
}

impl Filter {
    /// True when `r` passes every set criterion.
    pub fn matches(&self, r: &Record) -> bool {
        self.task_id
            .as_deref()
            .is_none_or(|t| r.entry.task_id.as_deref() == Some(t))
            && self
                .rule
                .is_none_or(|n| r.rule_index().map(|i| i + 1) == Some(n))
            && self
                .region
                .as_deref()
                .is_none_or(|g| r.chosen_region() == Some(g))
            && self
                .outcome
                .as_deref()
                .is_none_or(|o| r.outcome() == Some(o))
    }
}

/// The records of the log at `path` (a data directory or the file) that
/// match `filter`, in order. Does not verify hashes (use [`verify`]); a line
/// that is not a record is an error naming it. A torn last line is skipped.
pub fn show(path: &Path, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let path = log_path(path);
    let log = super::read_log(&path)?;
    show_bytes(&path, &log.bytes, filter)
}

/// [`show`] of a log held in memory (`path` names it in errors): what
/// `audit show` does with a log exported from the database.
pub fn show_bytes(path: &Path, bytes: &[u8], filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let path = path.to_path_buf();
    let mut out = Vec::new();
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..end],
        None => &bytes[..0],
    };
    if complete.is_empty() {
        return Ok(out);
    }
    for (i, line) in complete.split(|&b| b == b'\n').enumerate() {
        let record: Record = serde_json::from_slice(line).map_err(|e| AuditError::Broken {
            path: path.clone(),
            line: i as u64 + 1,
            seq: None,
            reason: format!("bad JSON: {e}"),
        })?;
        if filter.matches(&record) {
            out.push(record);
        }
    }
    Ok(out)
}
