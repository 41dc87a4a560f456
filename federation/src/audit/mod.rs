//! The decision log: a tamper-evident, hash-chained JSON-lines file,
//! `<data_dir>/decisions.jsonl`, with one record per routing decision (and
//! per policy reload, takeover, …), plus the readers auditors use
//! ([`verify`], [`show`]).
//!
//! What it owns: that file, its format and its hash chain. What it must not
//! touch: routing itself (it records [`Decision`]s made elsewhere), the task
//! store, the network.
//!
//! The format, the hash and an auditor's independent check are specified in
//! [`docs/decision-log.md`](../../../docs/decision-log.md) (the recipe there
//! is executed by this module's tests). The parts: the record model
//! ([`record`]), its canonical encoding ([`canonical`]), chain verification
//! ([`chain`]), the log's files — the active one and the closed, compressed
//! segments the chain runs on through ([`segments`]) — reading records back
//! ([`read`], [`tail`]) and the writer ([`writer`]).
//!
//! Durability: records are rendered on the caller's thread; one writer
//! thread adds the chained fields, writes every waiting record in one
//! `write` and calls `fdatasync` once (group commit, as in
//! [`crate::group_commit`]). A crash can leave only an unacknowledged,
//! partial last line; [`DecisionLog::open`] truncates it with a warning, and
//! any other damage makes `open` refuse, naming the line.

pub mod anchor;
mod canonical;
mod chain;
pub mod key;
pub mod minimise;
pub mod postgres;
mod read;
mod record;
pub mod replay;
mod segments;
mod staged;
pub mod tail;
mod writer;

/// How many of the newest rows [`DecisionLog::recent`] reads of a log in
/// the database (the file's counterpart is its byte bound).
const RECENT_ROWS: i64 = 10_000;
#[cfg(test)]
mod segment_tests;
#[cfg(test)]
mod staged_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

#[cfg(doc)]
use crate::policy::Decision;

pub use canonical::Prepared;
#[cfg(test)]
use canonical::canonical;
pub use canonical::health_name;
use canonical::{push_attr_value, push_attributes, sha256_hex};
pub use chain::{Broken, VerifyReport, verify_bytes};
use chain::{Tip, check_line, scan, scan_from, seq_of};
use read::read_file;
pub use read::{Filter, show, show_bytes};
pub use record::{Entry, Record};
pub use segments::{LogBytes, log_path, read_log, verify};
pub use staged::{Replayed, Rewrite, Staged};
use writer::{Append, lock, now_rfc3339};
pub use writer::{Batch, DecisionLog, LogOptions, Receipt};

/// The log's file name inside a data directory.
pub const FILE_NAME: &str = "decisions.jsonl";
/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The most entries one write + fdatasync carries.
const MAX_BATCH: usize = 1024;
/// The separator before the hash, which is always the last key of a line.
const HASH_SEP: &str = ",\"hash\":\"";

/// Record kinds.
pub mod kind {
    /// A routing decision made by this (entry) controller.
    pub const ROUTE: &str = "route";
    /// A task forwarded in by another controller, re-checked here.
    pub const FORWARDED_IN: &str = "forwarded_in";
    /// A policy reload (accepted or refused: see `note`).
    pub const POLICY_RELOAD: &str = "policy_reload";
    /// A policy put in force (at start or by a reload) with its approvals:
    /// `policy_hash`, and in `note` the file's SHA-256, the quorum, who
    /// signed and who did not (see `crate::approvals`).
    pub const POLICY_APPROVED: &str = "policy_approved";
    /// Tasks taken over from a dead region.
    pub const TAKEOVER: &str = "takeover";
    /// A snapshot sent to or refused for a peer.
    pub const SNAPSHOT: &str = "snapshot";
    /// Two tasks found under one idempotency key (after a failover), and
    /// what was done: one cancelled, or both ran.
    pub const DUPLICATE: &str = "duplicate";
}

/// Errors of the decision log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The hash chain is broken.
    #[error("{} is broken at line {line} (seq {}): {reason}", path.display(), seq_text(*seq))]
    Broken {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The record's seq, when it could be read.
        seq: Option<u64>,
        /// What is wrong.
        reason: String,
    },
    /// An append failed (the batch's write or fdatasync).
    #[error("appending to the decision log: {0}")]
    Write(String),
    /// An entry could not be serialized.
    #[error("serializing a decision log entry: {0}")]
    Serialize(String),
    /// The writer thread is gone.
    #[error("the decision log is closed")]
    Closed,
}

fn seq_text(seq: Option<u64>) -> String {
    seq.map_or_else(|| "?".to_string(), |s| s.to_string())
}
