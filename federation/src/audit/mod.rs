//! The decision log: a tamper-evident, hash-chained JSON-lines file,
//! `<data_dir>/decisions.jsonl`, with one record per routing decision (and
//! per policy reload, takeover, …), plus the readers auditors use
//! ([`verify`], [`show`]).
//!
//! What it owns: that file, its format and its hash chain. What it must not
//! touch: routing itself (it records [`Decision`]s made elsewhere), the task
//! store, the network.
//!
//! # Record format
//!
//! Each line is one JSON object terminated by `\n`:
//!
//! ```text
//! {"attributes":{…},"decision":{…},"entry_region":"europe","kind":"route","note":…,
//!  "outcome":"routed","policy_hash":"…","prev_hash":"<64 hex>","region":"europe",
//!  "chosen_region":"europe","rule_index":1,"seq":7,"task_id":"…",
//!  "time":"2025-01-01T12:00:00.123Z","unix_ms":1735732800123,"hash":"<64 hex>"}
//! ```
//!
//! * `seq` starts at 1 and increases by exactly 1 per line (line N has seq N).
//! * `time` (RFC 3339, UTC, milliseconds) and `unix_ms` are the append time.
//! * `region` is the region of the controller that recorded the line.
//! * `kind` is one of [`kind`]'s constants; the optional fields (`task_id`,
//!   `entry_region`, `attributes`, `policy_hash`, `rule_index` (0-based, file
//!   order), `outcome` (`routed` | `failover` | `rejected`), `chosen_region`,
//!   `decision` (a serialized [`Decision`]), `note`) are absent when unset.
//! * `prev_hash` is the previous line's `hash`; the first line's is 64 zeros.
//! * **Residency of the record itself** ([`minimise`]): a route or
//!   forwarded-in record written where the task is held keeps every value in
//!   `attributes`. Any other (an entry region that forwarded the task, a
//!   region that refused it, a rejection) keeps in `attributes` only the
//!   values the policy lets every region keep (`federation.audit.record_values`,
//!   else the attributes the decision's conditions read) and names each other
//!   attribute in `attributes_withheld` with the keyed digest of its value
//!   (`null` without an audit key, see [`key`]); its reason, details, warnings
//!   and note are scrubbed of those values (`<withheld:NAME>`).
//!   `attributes_digest` (`{"input": hex, "key": id}`) is the keyed digest of
//!   all attributes, on both kinds of record: equal digests under one key
//!   are the same input. Records written before these fields existed simply
//!   lack them; the chain and this recipe are unchanged.
//! * `federation_view` (route records): every region as the decision saw it,
//!   `{"<region>": {"draining", "full", "health", "held_down", "load"?, "tags"}}`,
//!   so that `federation policy replay` re-decides with the same states.
//!
//! # The hash, precisely
//!
//! The *body* of a record is its canonical JSON without `hash`: every object's
//! keys sorted by code point (recursively), no whitespace, strings escaped as
//! `serde_json` does (`"`, `\` and control characters only; non-ASCII as
//! UTF-8). The line written is the body with its closing `}` replaced by
//! `,"hash":"<hex>"}`, where `<hex>` is the lower-case hex SHA-256 of the
//! body's UTF-8 bytes. So the hashed bytes are exactly the line up to
//! `,"hash":"` followed by `}` — an auditor never has to re-serialize JSON
//! (which is also why the hash is the last key, out of sorted order). For
//! records without floating-point attributes the body equals Python's
//! `json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`.
//!
//! An auditor's check, independent of this code:
//!
//! ```python
//! import hashlib, json, sys
//! prev, n = "0" * 64, 0
//! for n, raw in enumerate(open(sys.argv[1], "rb"), 1):
//!     line = raw.rstrip(b"\n")
//!     rec = json.loads(line)                       # bad JSON raises here
//!     body, sep, tail = line.rpartition(b',"hash":"')
//!     digest = hashlib.sha256(body + b"}").hexdigest()
//!     assert sep and tail == digest.encode() + b'"}', f"line {n}: hash mismatch"
//!     assert rec["hash"] == digest and rec["seq"] == n, f"line {n}: seq/hash"
//!     assert rec["prev_hash"] == prev, f"line {n}: chain broken"
//!     prev = digest
//! print(f"ok: {n} records, last hash {prev}")
//! ```
//!
//! The chain proves that no line was edited, deleted, inserted or reordered
//! *before* the last line an auditor trusts; anchor the last hash (printed by
//! `federation audit verify`) elsewhere to make truncation of the tail
//! evident too.
//!
//! # Durability and recovery
//!
//! Records are rendered to their canonical bytes on the caller's thread
//! (straight from the typed decision, never through `serde_json::Value`),
//! with the SHA-256 state over everything that sorts before `prev_hash`.
//! Appends go through one writer thread: it takes every waiting entry (and
//! the batches the task store hands over, see
//! [`crate::tasks::TaskStore::insert_recorded`]), adds the chained fields,
//! finishes each hash, writes them in one `write`, calls `fdatasync` once,
//! then answers each caller (group commit, gathered as in
//! [`crate::group_commit`]). A crash can leave only an
//! unacknowledged, partial last line (no trailing newline);
//! [`DecisionLog::open`] truncates it and logs a warning. Any other damage
//! makes `open` refuse, naming the line.

pub mod anchor;
pub mod key;
pub mod minimise;
pub mod postgres;
pub mod replay;
pub mod tail;

/// How many of the newest rows [`DecisionLog::recent`] reads of a log in
/// the database (the file's counterpart is its byte bound).
const RECENT_ROWS: i64 = 10_000;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::policy::{
    AttrValue, Attributes, Decision, Health, Outcome, Refusal, RegionView, Rejection, Role,
};

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

/// A record without the fields the log fills in (seq, time, region, hashes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionEntry {
    /// What happened: one of [`kind`]'s constants.
    pub kind: String,
    /// The task concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The region the client called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_region: Option<String>,
    /// The attributes the decision read (outside the region holding the
    /// task, only the values [`minimise`] keeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Value>,
    /// `{"input": hex, "key": id}`: the keyed digest of every attribute
    /// ([`key::AuditKey::input_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes_digest: Option<Value>,
    /// Attributes whose values this record does not keep, each with its
    /// keyed digest (`null` without an audit key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes_withheld: Option<Value>,
    /// Every region's state as the decision saw it: health, draining,
    /// full, hold-down, trusted tags, advertised load (for `policy replay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation_view: Option<Value>,
    /// Hash of the policy that decided (or was loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// The matched rule, 0-based in file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_index: Option<u32>,
    /// `routed`, `failover` or `rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The region the task went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_region: Option<String>,
    /// The full decision (a serialized [`Decision`]): candidates and reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Value>,
    /// Free text (for example why a reload was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl DecisionEntry {
    /// An entry of `kind` with nothing else set.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_string(),
            ..Self::default()
        }
    }

    /// An entry recording `decision` for `attributes`, with the summary fields
    /// (`policy_hash`, `rule_index`, `outcome`, `chosen_region`) filled in.
    pub fn from_decision(kind: &str, attributes: &Attributes, decision: &Decision) -> Self {
        Self {
            kind: kind.to_string(),
            attributes: serde_json::to_value(attributes).ok(),
            policy_hash: Some(decision.policy_hash.clone()),
            rule_index: decision.rule_index.and_then(|i| u32::try_from(i).ok()),
            outcome: Some(decision.outcome.kind().to_string()),
            chosen_region: decision.outcome.region().map(str::to_string),
            decision: serde_json::to_value(decision).ok(),
            ..Self::default()
        }
    }

    /// Sets the task id.
    pub fn task(mut self, task_id: impl Into<String>) -> Self {
        self.task_id = Some(task_id.into());
        self
    }

    /// Sets the entry region.
    pub fn entry_region(mut self, region: impl Into<String>) -> Self {
        self.entry_region = Some(region.into());
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// A routing decision to append, borrowed: [`DecisionLog::append_decision`]
/// renders it to its canonical line on the caller's thread, with the same
/// bytes as [`DecisionEntry::from_decision`] plus the given fields, without
/// building `serde_json::Value`s.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRef<'a> {
    /// One of [`kind`]'s constants.
    pub kind: &'a str,
    /// The task concerned.
    pub task_id: Option<&'a str>,
    /// The region the client called.
    pub entry_region: Option<&'a str>,
    /// The attributes the decision read.
    pub attributes: &'a Attributes,
    /// The decision.
    pub decision: &'a Decision,
    /// Free text.
    pub note: Option<&'a str>,
}

/// A record rendered on the caller's thread and not yet appended: handed to
/// [`DecisionLog::append_pending`], or carried into the task store's batch
/// ([`crate::tasks::TaskStore::insert_recorded`]), which names the task the
/// insert really produced before appending it with [`DecisionLog::append_batch`].
pub struct PendingRecord(Box<Prepared>);

impl std::fmt::Debug for PendingRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRecord")
            .field("task_id", &self.0.task_id)
            .finish_non_exhaustive()
    }
}

impl PendingRecord {
    /// Renders `record` (the same bytes [`DecisionLog::append_decision`]
    /// would write).
    pub fn new(record: DecisionRef<'_>) -> Self {
        Self(Box::new(Prepared::from_decision(&record)))
    }

    /// Renders the record of a decision as [`minimise::Kept`] has it (the
    /// values, digests and scrubbed text this region may keep), with the
    /// federation as the decision saw it.
    pub fn kept(
        kind: &str,
        task_id: Option<&str>,
        entry_region: Option<&str>,
        kept: &minimise::Kept<'_>,
        view: Option<&[(String, RegionView)]>,
    ) -> Self {
        let record = DecisionRef {
            kind,
            task_id,
            entry_region,
            attributes: &kept.attributes,
            decision: &kept.decision,
            note: kept.note.as_deref(),
        };
        Self(Box::new(Prepared::from_parts(
            &record,
            kept.digest.as_ref(),
            Some(&kept.withheld),
            view,
        )))
    }

    /// The task the record names.
    pub fn task_id(&self) -> Option<&str> {
        self.0.task_id.as_deref()
    }

    /// Renders `entry` (the same bytes [`DecisionLog::append`] would write),
    /// for an insert that carries it ([`crate::tasks::TaskStore::insert_batch`]).
    pub fn entry(entry: &DecisionEntry) -> Self {
        Self(Box::new(Prepared::from_entry(entry)))
    }

    /// Names another task (the `task_id` field is rendered when the record
    /// is sealed, so this costs nothing).
    pub fn set_task_id(&mut self, task_id: &str) {
        if self.0.task_id.as_deref() != Some(task_id) {
            self.0.task_id = Some(task_id.to_string());
        }
    }
}

/// A batch handed to the writer by [`DecisionLog::append_batch`]; wait for
/// it (from a thread outside the async runtime) with [`BatchReceipt::wait`].
#[derive(Debug)]
pub struct BatchReceipt(Result<oneshot::Receiver<Result<u64, AuditError>>, AuditError>);

impl BatchReceipt {
    /// Blocks until every record of the batch is written and fdatasync'd;
    /// returns the last one's seq. Must not be called on an async runtime
    /// thread (the task store's writer thread calls it).
    pub fn wait(self) -> Result<u64, AuditError> {
        self.0?.blocking_recv().map_err(|_| AuditError::Closed)?
    }
}

/// One line of the log, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Append time, RFC 3339 UTC.
    pub time: String,
    /// Append time, milliseconds since the Unix epoch.
    pub unix_ms: i64,
    /// The recording controller's region.
    pub region: String,
    /// The entry.
    #[serde(flatten)]
    pub entry: DecisionEntry,
    /// The previous record's hash.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

impl Record {
    /// The matched rule (0-based), from the summary or the decision.
    pub fn rule_index(&self) -> Option<u64> {
        self.entry.rule_index.map(u64::from).or_else(|| {
            self.entry
                .decision
                .as_ref()
                .and_then(|d| d.get("rule_index"))
                .and_then(Value::as_u64)
        })
    }

    /// `routed`, `failover` or `rejected`, from the summary or the decision.
    pub fn outcome(&self) -> Option<&str> {
        self.entry.outcome.as_deref().or_else(|| {
            self.entry
                .decision
                .as_ref()
                .and_then(|d| d.get("outcome"))
                .and_then(|o| o.get("kind"))
                .and_then(Value::as_str)
        })
    }

    /// The chosen region, from the summary or the decision.
    pub fn chosen_region(&self) -> Option<&str> {
        self.entry.chosen_region.as_deref().or_else(|| {
            self.entry
                .decision
                .as_ref()
                .and_then(|d| d.get("outcome"))
                .and_then(|o| o.get("region"))
                .and_then(Value::as_str)
        })
    }

    /// The decision's one-sentence reason, else the note.
    pub fn reason(&self) -> Option<&str> {
        self.entry
            .decision
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(Value::as_str)
            .or(self.entry.note.as_deref())
    }
}

// ---------------------------------------------------------------------------
// Canonical form and hashing
// ---------------------------------------------------------------------------
//
// Records are rendered straight to canonical bytes (no `serde_json::Value`
// in between on the routing path): every writer below emits an object's keys
// in sorted order by construction. `canonical` handles free-form `Value`s
// (entries built by hand, and the tests' oracle).

/// Writes `v` as canonical JSON: keys sorted, no whitespace.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut obj = Obj::open(out);
            for k in keys {
                if let Some(v) = map.get(k) {
                    canonical(v, obj.key(k));
                }
            }
            obj.close();
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => push_json_string(s, out),
        Value::Number(n) => push_display(n, out),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

/// For each byte: 0 when it is written as is, else the character after the
/// backslash (`u` for `\u00XX`).
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Writes `s` as a JSON string, escaped exactly as `serde_json` does: `"`,
/// `\` and control characters only (`\b \f \n \r \t`, else `\u00XX`).
fn push_json_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(b)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        if escape == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.push(b'\\');
            out.push(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn push_display(v: impl std::fmt::Display, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{v}");
}

fn push_opt_str(s: Option<&str>, out: &mut Vec<u8>) {
    match s {
        Some(s) => push_json_string(s, out),
        None => out.extend_from_slice(b"null"),
    }
}

fn push_str_array<'s>(items: impl IntoIterator<Item = &'s String>, out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_string(s, out);
    }
    out.push(b']');
}

/// An object being written: keys must be given in sorted order.
struct Obj<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Obj<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes `"key":` and returns the buffer for the value.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        push_json_string(key, self.out);
        self.out.push(b':');
        self.out
    }

    fn str(&mut self, key: &str, value: &str) {
        push_json_string(value, self.key(key));
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// Attributes as `serde_json` serializes them (`AttrValue` is untagged),
/// in canonical form. `Attributes` is a `BTreeMap`, so keys come sorted.
fn push_attributes(attrs: &Attributes, out: &mut Vec<u8>) {
    let mut obj = Obj::open(out);
    for (k, v) in attrs {
        push_attr_value(v, obj.key(k));
    }
    obj.close();
}

fn push_attr_value(v: &AttrValue, out: &mut Vec<u8>) {
    match v {
        AttrValue::Str(s) => push_json_string(s, out),
        AttrValue::Int(i) => push_display(i, out),
        AttrValue::Double(d) => match serde_json::Number::from_f64(*d) {
            Some(n) => push_display(n, out),
            None => out.extend_from_slice(b"null"),
        },
        AttrValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        AttrValue::List(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_attr_value(item, out);
            }
            out.push(b']');
        }
    }
}

/// A [`Decision`] as its `Serialize` derive writes it, in canonical form.
fn push_decision(d: &Decision, out: &mut Vec<u8>) {
    let mut obj = Obj::open(out);
    if let Some(b) = &d.balance {
        push_balance(b, obj.key("balance"));
    }
    {
        let out = obj.key("candidates");
        out.push(b'[');
        for (i, c) in d.candidates.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut cand = Obj::open(out);
            cand.str("detail", &c.detail);
            push_opt_str(c.refusal.map(Refusal::as_str), cand.key("refusal"));
            cand.str("region", &c.region);
            cand.str(
                "role",
                match c.role {
                    Role::Primary => "primary",
                    Role::Backup => "backup",
                },
            );
            cand.close();
        }
        out.push(b']');
    }
    push_str_array(&d.evaluation_errors, obj.key("evaluation_errors"));
    {
        let mut outcome = Obj::open(obj.key("outcome"));
        outcome.str("kind", d.outcome.kind());
        match &d.outcome {
            Outcome::Routed { region } | Outcome::Failover { region } => {
                outcome.str("region", region);
            }
            Outcome::Rejected { rejection } => outcome.str(
                "rejection",
                match rejection {
                    Rejection::NoRule => "no_rule",
                    Rejection::NoCompliantRegion => "no_compliant_region",
                    Rejection::Unavailable => "unavailable",
                },
            ),
        }
        outcome.close();
    }
    obj.str("policy_hash", &d.policy_hash);
    obj.str("reason", &d.reason);
    push_str_array(&d.required_tags, obj.key("required_tags"));
    push_opt_str(d.rule.as_deref(), obj.key("rule"));
    match d.rule_index {
        Some(i) => push_display(i, obj.key("rule_index")),
        None => obj.key("rule_index").extend_from_slice(b"null"),
    }
    push_str_array(&d.warnings, obj.key("warnings"));
    obj.close();
}

/// A [`crate::policy::BalanceNote`] as its `Serialize` derive writes it,
/// in canonical form (keys sorted).
fn push_balance(b: &crate::policy::BalanceNote, out: &mut Vec<u8>) {
    let mut obj = Obj::open(out);
    push_opt_str(b.affinity.as_deref(), obj.key("affinity"));
    push_opt_str(b.affinity_digest.as_deref(), obj.key("affinity_digest"));
    match b.draw_ppm {
        Some(v) => push_display(v, obj.key("draw_ppm")),
        None => obj.key("draw_ppm").extend_from_slice(b"null"),
    }
    {
        let out = obj.key("loads");
        out.push(b'[');
        for (i, l) in b.loads.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut o = Obj::open(out);
            o.key("advertised")
                .extend_from_slice(if l.advertised { b"true" } else { b"false" });
            push_display(l.free_slots, o.key("free_slots"));
            push_display(l.queue_depth, o.key("queue_depth"));
            o.str("region", &l.region);
            push_display(l.share_ppm, o.key("share_ppm"));
            push_display(l.total_slots, o.key("total_slots"));
            o.close();
        }
        out.push(b']');
    }
    obj.str("mode", b.mode);
    obj.str("why", &b.why);
    obj.close();
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An entry ready for the writer: the canonical JSON of every field that
/// sorts before `prev_hash` (rendered on the caller's thread), the SHA-256
/// state over those bytes, and the two entry fields that sort after it.
/// The writer only adds the chained fields and finishes the hash.
struct Prepared {
    head: Vec<u8>,
    hasher: Sha256,
    rule_index: Option<u32>,
    task_id: Option<String>,
}

/// The body's fields that sort before `prev_hash`, borrowed from either an
/// entry or a typed decision.
struct Head<'a> {
    attributes: Option<Fragment<'a>>,
    attributes_digest: Option<Fragment<'a>>,
    attributes_withheld: Option<Fragment<'a>>,
    chosen_region: Option<&'a str>,
    decision: Option<Fragment<'a>>,
    entry_region: Option<&'a str>,
    federation_view: Option<Fragment<'a>>,
    kind: &'a str,
    note: Option<&'a str>,
    outcome: Option<&'a str>,
    policy_hash: Option<&'a str>,
}

enum Fragment<'a> {
    Value(&'a Value),
    Attributes(&'a Attributes),
    Decision(&'a Decision),
    Digest(&'a minimise::InputDigest),
    Withheld(&'a std::collections::BTreeMap<String, Option<String>>),
    View(&'a [(String, RegionView)]),
}

impl Fragment<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Fragment::Value(v) => canonical(v, out),
            Fragment::Attributes(a) => push_attributes(a, out),
            Fragment::Decision(d) => push_decision(d, out),
            Fragment::Digest(d) => {
                let mut obj = Obj::open(out);
                obj.str("input", &d.input);
                obj.str("key", &d.key);
                obj.close();
            }
            Fragment::Withheld(w) => {
                let mut obj = Obj::open(out);
                for (name, digest) in w.iter() {
                    push_opt_str(digest.as_deref(), obj.key(name));
                }
                obj.close();
            }
            Fragment::View(regions) => push_view(regions, out),
        }
    }
}

/// The name of a [`Health`] in records.
pub fn health_name(h: Health) -> &'static str {
    match h {
        Health::Alive => "alive",
        Health::Suspect => "suspect",
        Health::Dead => "dead",
        Health::Unknown => "unknown",
    }
}

/// `{"region": {"draining":…,"full":…,"health":…,"held_down":…,"load":…,"tags":[…]}}`,
/// keys sorted (`load` only when advertised).
fn push_view(regions: &[(String, RegionView)], out: &mut Vec<u8>) {
    let mut sorted: Vec<&(String, RegionView)> = regions.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let mut obj = Obj::open(out);
    for (name, v) in sorted {
        let mut r = Obj::open(obj.key(name));
        let flag = |b: bool| -> &'static [u8] { if b { b"true" } else { b"false" } };
        r.key("draining").extend_from_slice(flag(v.draining));
        r.key("full").extend_from_slice(flag(v.full));
        r.str("health", health_name(v.health));
        r.key("held_down").extend_from_slice(flag(v.held_down));
        if let Some(l) = v.load {
            let mut o = Obj::open(r.key("load"));
            push_display(l.free_slots, o.key("free_slots"));
            push_display(l.queue_depth, o.key("queue_depth"));
            push_display(l.total_slots, o.key("total_slots"));
            o.close();
        }
        push_str_array(v.tags.iter(), r.key("tags"));
        r.close();
    }
    obj.close();
}

impl Prepared {
    fn new(head: &Head<'_>, rule_index: Option<u32>, task_id: Option<String>) -> Self {
        let mut out = Vec::with_capacity(1280);
        let mut obj = Obj::open(&mut out);
        if let Some(a) = &head.attributes {
            a.write(obj.key("attributes"));
        }
        if let Some(a) = &head.attributes_digest {
            a.write(obj.key("attributes_digest"));
        }
        if let Some(a) = &head.attributes_withheld {
            a.write(obj.key("attributes_withheld"));
        }
        if let Some(r) = head.chosen_region {
            obj.str("chosen_region", r);
        }
        if let Some(d) = &head.decision {
            d.write(obj.key("decision"));
        }
        if let Some(r) = head.entry_region {
            obj.str("entry_region", r);
        }
        if let Some(v) = &head.federation_view {
            v.write(obj.key("federation_view"));
        }
        obj.str("kind", head.kind);
        if let Some(n) = head.note {
            obj.str("note", n);
        }
        if let Some(o) = head.outcome {
            obj.str("outcome", o);
        }
        if let Some(h) = head.policy_hash {
            obj.str("policy_hash", h);
        }
        // Left open: the writer continues with `,"prev_hash":…`.
        let hasher = Sha256::new_with_prefix(&out);
        Self {
            head: out,
            hasher,
            rule_index,
            task_id,
        }
    }

    fn from_entry(e: &DecisionEntry) -> Self {
        let head = Head {
            attributes: e.attributes.as_ref().map(Fragment::Value),
            attributes_digest: e.attributes_digest.as_ref().map(Fragment::Value),
            attributes_withheld: e.attributes_withheld.as_ref().map(Fragment::Value),
            chosen_region: e.chosen_region.as_deref(),
            decision: e.decision.as_ref().map(Fragment::Value),
            entry_region: e.entry_region.as_deref(),
            federation_view: e.federation_view.as_ref().map(Fragment::Value),
            kind: &e.kind,
            note: e.note.as_deref(),
            outcome: e.outcome.as_deref(),
            policy_hash: e.policy_hash.as_deref(),
        };
        Self::new(&head, e.rule_index, e.task_id.clone())
    }

    fn from_decision(r: &DecisionRef<'_>) -> Self {
        Self::from_parts(r, None, None, None)
    }

    fn from_parts(
        r: &DecisionRef<'_>,
        digest: Option<&minimise::InputDigest>,
        withheld: Option<&std::collections::BTreeMap<String, Option<String>>>,
        view: Option<&[(String, RegionView)]>,
    ) -> Self {
        let d = r.decision;
        let head = Head {
            attributes: Some(Fragment::Attributes(r.attributes)),
            attributes_digest: digest.map(Fragment::Digest),
            attributes_withheld: withheld.filter(|w| !w.is_empty()).map(Fragment::Withheld),
            chosen_region: d.outcome.region(),
            decision: Some(Fragment::Decision(d)),
            entry_region: r.entry_region,
            federation_view: view.map(Fragment::View),
            kind: r.kind,
            note: r.note,
            outcome: Some(d.outcome.kind()),
            policy_hash: Some(&d.policy_hash),
        };
        let rule_index = d.rule_index.and_then(|i| u32::try_from(i).ok());
        Self::new(&head, rule_index, r.task_id.map(str::to_string))
    }

    /// Appends the finished line (with `\n`) to `buf` and returns its hash:
    /// the body is the head plus the chained fields, in sorted key order.
    fn seal_into(
        self,
        buf: &mut Vec<u8>,
        seq: u64,
        time: &str,
        unix_ms: i64,
        region: &str,
        prev_hash: &str,
    ) -> String {
        let Prepared {
            head,
            mut hasher,
            rule_index,
            task_id,
        } = self;
        buf.extend_from_slice(&head);
        let tail_start = buf.len();
        {
            // Continues the object `head` left open (it holds `kind`).
            let mut obj = Obj {
                out: &mut *buf,
                first: false,
            };
            obj.str("prev_hash", prev_hash);
            obj.str("region", region);
            if let Some(i) = rule_index {
                push_display(i, obj.key("rule_index"));
            }
            push_display(seq, obj.key("seq"));
            if let Some(t) = &task_id {
                obj.str("task_id", t);
            }
            obj.str("time", time);
            push_display(unix_ms, obj.key("unix_ms"));
        }
        hasher.update(&buf[tail_start..]);
        hasher.update(b"}");
        let hash = hex::encode(hasher.finalize());
        // The body ends with '}'; the line puts the hash before it.
        buf.extend_from_slice(HASH_SEP.as_bytes());
        buf.extend_from_slice(hash.as_bytes());
        buf.extend_from_slice(b"\"}\n");
        hash
    }
}

/// Checks one line on its own: JSON, layout, hash. Returns the record.
fn check_line(line: &[u8]) -> Result<Record, (Option<u64>, String)> {
    let record: Record = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            let seq = serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|v| v.get("seq").and_then(Value::as_u64));
            let reason = if line.is_empty() {
                "bad JSON: empty line".to_string()
            } else {
                format!("bad JSON: {e}")
            };
            return Err((seq, reason));
        }
    };
    let seq = Some(record.seq);
    let suffix = format!("{HASH_SEP}{}\"}}", record.hash);
    let valid_hex = record.hash.len() == 64
        && record
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid_hex || !line.ends_with(suffix.as_bytes()) {
        return Err((
            seq,
            "malformed record: \"hash\" must be the last key and 64 lower-case hex digits".into(),
        ));
    }
    let mut body = line[..line.len() - suffix.len()].to_vec();
    body.push(b'}');
    let computed = sha256_hex(&body);
    if computed != record.hash {
        return Err((
            seq,
            format!(
                "hash mismatch: the record was altered (stored {}, computed {})",
                short(&record.hash),
                short(&computed)
            ),
        ));
    }
    Ok(record)
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Where the chain stands after a record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tip {
    seq: u64,
    hash: String,
}

impl Tip {
    fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }
}

/// Checks that `record` follows `tip`.
fn check_link(tip: &Tip, record: &Record) -> Result<(), String> {
    let expected = tip.seq + 1;
    if record.seq != expected {
        let what = if record.seq > expected {
            "records are missing before it (deleted) or out of order"
        } else {
            "it repeats or goes back (inserted or reordered)"
        };
        return Err(format!(
            "seq {} where {expected} was expected: {what}",
            record.seq
        ));
    }
    if record.prev_hash != tip.hash {
        return Err(format!(
            "prev_hash {} does not match the previous record's hash {}: a record was inserted, \
             deleted or replaced",
            short(&record.prev_hash),
            short(&tip.hash)
        ));
    }
    Ok(())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// 1-based line number.
    pub line: u64,
    /// The record's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records that verified (before the first broken one).
    pub records: u64,
    /// The first broken record, if any.
    pub first_broken: Option<Broken>,
    /// The hash of the last good record (64 zeros for an empty log).
    pub last_hash: String,
    /// Line number of an incomplete last line (no newline: a write torn by a
    /// crash, never acknowledged); it is not part of the chain.
    pub torn_tail_line: Option<u64>,
}

impl VerifyReport {
    /// True when the chain is intact.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// What a scan of the file found.
struct Scan {
    report: VerifyReport,
    tip: Tip,
    /// Byte length of the complete, verified lines.
    good_len: u64,
    /// A torn last line that is nonetheless a complete, valid next record.
    tail_record_ok: bool,
}

fn scan(bytes: &[u8]) -> Scan {
    let mut tip = Tip::genesis();
    let mut offset = 0usize;
    let mut line_no = 0u64;
    let mut report = VerifyReport {
        records: 0,
        first_broken: None,
        last_hash: GENESIS_HASH.to_string(),
        torn_tail_line: None,
    };
    let mut tail_record_ok = false;
    // Each iteration consumes one line, so the loop is bounded by the file.
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        if !complete {
            report.torn_tail_line = Some(line_no);
            tail_record_ok = check_line(line)
                .ok()
                .is_some_and(|r| check_link(&tip, &r).is_ok());
            break;
        }
        let checked = check_line(line).and_then(|record| {
            check_link(&tip, &record)
                .map(|()| record.clone())
                .map_err(|reason| (Some(record.seq), reason))
        });
        match checked {
            Ok(record) => {
                tip = Tip {
                    seq: record.seq,
                    hash: record.hash,
                };
                report.records += 1;
                offset += line.len() + 1;
            }
            Err((seq, reason)) => {
                report.first_broken = Some(Broken {
                    line: line_no,
                    seq,
                    reason,
                });
                break;
            }
        }
    }
    report.last_hash = tip.hash.clone();
    Scan {
        report,
        tip,
        good_len: offset as u64,
        tail_record_ok,
    }
}

/// The log file for `path`: the path itself, or `path/decisions.jsonl` when
/// it is a directory.
pub fn log_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>, AuditError> {
    std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Verifies the chain of the log at `path` (a data directory or the file).
/// Errors only when the file cannot be read; a broken chain is reported in
/// [`VerifyReport::first_broken`].
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let path = log_path(path);
    Ok(scan(&read_all(&path)?).report)
}

/// Verifies the chain of a log held in memory (what [`verify`] does after
/// reading the file; the fuzz target drives this).
pub fn verify_bytes(bytes: &[u8]) -> VerifyReport {
    scan(bytes).report
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
    let bytes = read_all(&path)?;
    show_bytes(&path, &bytes, filter)
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

// ---------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------

/// Appends to the decision log of one controller. Cheap to clone; the file
/// closes when the last clone is dropped.
#[derive(Clone)]
pub struct DecisionLog {
    inner: Arc<LogInner>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("path", &self.inner.path)
            .field("region", &self.inner.region)
            .finish()
    }
}

struct LogInner {
    path: PathBuf,
    region: String,
    /// Kept in the region's database (`audit::postgres`), not in a file.
    in_database: bool,
    /// The database, when the log is kept there (reads go to it).
    pg: Option<crate::pg::Pg>,
    tip: Arc<Mutex<Tip>>,
    tx: Option<mpsc::UnboundedSender<Append>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Seconds per batch write + fdatasync, for metrics.
    append_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Drop for LogInner {
    fn drop(&mut self) {
        self.tx.take();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(path = %self.path.display(), "decision log writer panicked");
            }
        }
    }
}

enum Append {
    Entry(Box<Prepared>, oneshot::Sender<Result<u64, AuditError>>),
    Batch(Vec<Prepared>, oneshot::Sender<Result<u64, AuditError>>),
    Flush(oneshot::Sender<Result<u64, AuditError>>),
}

fn lock(tip: &Mutex<Tip>) -> MutexGuard<'_, Tip> {
    tip.lock().unwrap_or_else(|e| e.into_inner())
}

impl DecisionLog {
    /// Opens (creating if needed) `<dir>/decisions.jsonl` for `region`,
    /// verifying the whole chain and continuing it. A torn last line (a
    /// partial write from a crash) is truncated with a warning; any other
    /// damage refuses to open with [`AuditError::Broken`] naming the line.
    pub fn open(dir: &Path, region: &str) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let bytes = read_all(&path)?;
        let scan = scan(&bytes);
        if let Some(b) = scan.report.first_broken {
            return Err(AuditError::Broken {
                path,
                line: b.line,
                seq: b.seq,
                reason: b.reason,
            });
        }
        let mut tip = scan.tip;
        if let Some(line) = scan.report.torn_tail_line {
            if scan.tail_record_ok {
                // The record is whole; only its newline is missing.
                file.write_all(b"\n").map_err(io)?;
                let rest = &bytes[usize::try_from(scan.good_len).unwrap_or(bytes.len())..];
                if let Ok(r) = check_line(rest) {
                    tip = Tip {
                        seq: r.seq,
                        hash: r.hash,
                    };
                }
                tracing::warn!(path = %path.display(), line, "decision log: completed a record whose newline was lost in a crash");
            } else {
                file.set_len(scan.good_len).map_err(io)?;
                tracing::warn!(
                    path = %path.display(),
                    line,
                    bytes = bytes.len() as u64 - scan.good_len,
                    "decision log: truncated a torn last line (a write interrupted by a crash, never acknowledged)"
                );
            }
            file.sync_all().map_err(io)?;
        }
        let tip = Arc::new(Mutex::new(tip));
        let (tx, rx) = mpsc::unbounded_channel();
        // 100 µs to ~13 s; the metrics module exposes it (this module does
        // not know metrics).
        let append_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
        );
        let writer = {
            let tip = Arc::clone(&tip);
            let path = path.clone();
            let region = region.to_string();
            let seconds = append_seconds.clone();
            std::thread::Builder::new()
                .name("decision-log-writer".into())
                .spawn(move || writer_loop(file, &path, &region, &tip, rx, &seconds))
                .map_err(io)?
        };
        Ok(Self {
            inner: Arc::new(LogInner {
                path,
                region: region.to_string(),
                in_database: false,
                pg: None,
                tip,
                tx: Some(tx),
                writer: Mutex::new(Some(writer)),
                append_seconds,
            }),
        })
    }

    /// Opens `region`'s decision log in the database (`node.store.backend:
    /// postgres`): continues the chain from the head the database holds,
    /// after checking that the last record is that head.
    pub fn open_postgres(pg: &crate::pg::Pg, region: &str) -> Result<Self, AuditError> {
        let pg2 = pg.clone();
        let region2 = region.to_string();
        let tip = pg
            .block(async move {
                let client = pg2.client().await?;
                postgres::ensure_head(&client, &region2)
                    .await
                    .map_err(|e| pg2.db(&e))?;
                let row = client
                    .query_one(
                        "SELECT h.seq, h.hash, (SELECT d.hash FROM decisions d \
                         WHERE d.region = h.region AND d.seq = h.seq) \
                         FROM decision_heads h WHERE h.region = $1",
                        &[&region2],
                    )
                    .await
                    .map_err(|e| pg2.db(&e))?;
                Ok((
                    row.get::<_, i64>(0),
                    row.get::<_, String>(1),
                    row.get::<_, Option<String>>(2),
                ))
            })
            .map_err(|e| AuditError::Write(e.to_string()))?;
        let (seq, hash, last) = tip;
        if seq > 0 && last.as_deref() != Some(hash.as_str()) {
            return Err(AuditError::Write(format!(
                "{}: the decision log's head (seq {seq}) names a record the table does not hold; \
                 refusing to continue the chain (check it with `federation audit verify`)",
                pg.target()
            )));
        }
        let tip = Arc::new(Mutex::new(Tip {
            seq: u64::try_from(seq).unwrap_or(0),
            hash,
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let append_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
        );
        let path = PathBuf::from(format!("postgres://{}#decisions", pg.target()));
        let writer = {
            let tip = Arc::clone(&tip);
            let pg = pg.clone();
            let region = region.to_string();
            let seconds = append_seconds.clone();
            std::thread::Builder::new()
                .name("decision-log-writer".into())
                .spawn(move || postgres::writer_loop(&pg, &region, &tip, rx, &seconds))
                .map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(Self {
            inner: Arc::new(LogInner {
                path,
                region: region.to_string(),
                in_database: true,
                pg: Some(pg.clone()),
                tip,
                tx: Some(tx),
                writer: Mutex::new(Some(writer)),
                append_seconds,
            }),
        })
    }

    /// True when the log is kept in the region's database, not in a file.
    pub fn in_database(&self) -> bool {
        self.inner.in_database
    }

    /// The whole log as the JSON-lines file holds it: the file's bytes, or
    /// for a log in the database its export (`audit::postgres::export`).
    /// Blocking: call it off the async workers.
    pub fn read_all(&self) -> Result<Vec<u8>, AuditError> {
        match &self.inner.pg {
            None => read_all(&self.inner.path),
            Some(pg) => {
                let (db, region) = (pg.clone(), self.inner.region.clone());
                pg.block(async move { postgres::export(&db, &region).await })
                    .map_err(|e| self.unreadable(&e))
            }
        }
    }

    /// The newest `limit` records `filter` accepts, oldest first, reading at
    /// most the last `max_bytes` of a file (or the newest `RECENT_ROWS` rows
    /// of the database). Blocking: call it off the async workers.
    pub fn recent(
        &self,
        filter: &Filter,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, AuditError> {
        let Some(pg) = &self.inner.pg else {
            return tail::recent(&self.inner.path, filter, limit, max_bytes);
        };
        let (db, region) = (pg.clone(), self.inner.region.clone());
        let lines = pg
            .block(async move { postgres::newest(&db, &region, RECENT_ROWS).await })
            .map_err(|e| self.unreadable(&e))?;
        let mut out: Vec<Record> = lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Record>(line).ok())
            .filter(|r| filter.matches(r))
            .take(limit)
            .collect();
        out.reverse();
        Ok(out)
    }

    fn unreadable(&self, e: &crate::pg::PgError) -> AuditError {
        AuditError::Io {
            path: self.inner.path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// The region whose records this log appends.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// Moves the tip on to a head written by someone else in the database
    /// (the task store's transaction); never backwards.
    pub(crate) fn advance(&self, seq: u64, hash: &str) {
        let mut tip = lock(&self.inner.tip);
        if seq > tip.seq {
            *tip = Tip {
                seq,
                hash: hash.to_string(),
            };
        }
    }

    /// Seconds per batch write + fdatasync, for metrics.
    pub fn append_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.append_seconds.clone()
    }

    /// The log file (for a log in the database, `postgres://host:port/db#decisions`,
    /// for messages).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Seq and hash of the last record written (0 and 64 zeros when empty).
    pub fn last(&self) -> (u64, String) {
        let tip = lock(&self.inner.tip);
        (tip.seq, tip.hash.clone())
    }

    /// Queues `msg` at once; the returned future waits for its answer on
    /// `rx`.
    fn queue(
        &self,
        msg: Append,
        rx: oneshot::Receiver<Result<u64, AuditError>>,
    ) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + use<> {
        let sent = match self.inner.tx.as_ref() {
            Some(sender) => sender.send(msg).map_err(|_| AuditError::Closed),
            None => Err(AuditError::Closed),
        };
        async move {
            sent?;
            rx.await.map_err(|_| AuditError::Closed)?
        }
    }

    /// Appends one record; returns its seq once it is written and
    /// fdatasync'd. Entries appended concurrently share one write and sync.
    /// The record is rendered and queued when this is called (its place in
    /// the chain is fixed then); the future waits for the sync.
    pub fn append(
        &self,
        entry: DecisionEntry,
    ) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + use<> {
        self.append_prepared(Box::new(Prepared::from_entry(&entry)))
    }

    /// [`DecisionLog::append`] for a routing decision, rendered straight from
    /// the typed decision (the routing path's fast way to the same line).
    pub fn append_decision(
        &self,
        record: DecisionRef<'_>,
    ) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + use<> {
        self.append_prepared(Box::new(Prepared::from_decision(&record)))
    }

    /// [`DecisionLog::append`] for a record rendered earlier.
    pub fn append_pending(
        &self,
        record: PendingRecord,
    ) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + use<> {
        self.append_prepared(record.0)
    }

    fn append_prepared(
        &self,
        prepared: Box<Prepared>,
    ) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        self.queue(Append::Entry(prepared, tx), rx)
    }

    /// Queues `records` as consecutive lines of one write (and one sync);
    /// the receipt tells when they are durable. For the task store's writer
    /// thread, which appends the records of a batch while it commits it.
    pub fn append_batch(&self, records: Vec<PendingRecord>) -> BatchReceipt {
        let (tx, rx) = oneshot::channel();
        let batch = records.into_iter().map(|r| *r.0).collect();
        let sent = match self.inner.tx.as_ref() {
            Some(sender) => sender
                .send(Append::Batch(batch, tx))
                .map(|()| rx)
                .map_err(|_| AuditError::Closed),
            None => Err(AuditError::Closed),
        };
        BatchReceipt(sent)
    }

    /// True when `self` and `other` are handles to the same log.
    pub fn same_log(&self, other: &DecisionLog) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Returns when everything appended before it is on disk (every
    /// acknowledged append already is: this is the shutdown barrier).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.queue(Append::Flush(tx), rx).await.map(|_| ())
    }
}

fn now_rfc3339() -> (String, i64) {
    let now = SystemTime::now();
    let ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    // Millisecond precision, so `time` and `unix_ms` agree.
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    (humantime::format_rfc3339_millis(at).to_string(), ms)
}

fn writer_loop(
    mut file: File,
    path: &Path,
    region: &str,
    tip: &Mutex<Tip>,
    rx: mpsc::UnboundedReceiver<Append>,
    append_seconds: &prometheus_client::metrics::histogram::Histogram,
) {
    // After a failed write that could not be undone the file may hold a
    // partial line; appending after it would break the chain, so stop.
    let mut poisoned: Option<String> = None;
    // One buffer for every batch's lines.
    let mut buf: Vec<u8> = Vec::new();
    let mut appends = crate::group_commit::Gatherer::new(rx, MAX_BATCH);
    while let Some(batch) = appends.next_batch() {
        if let Some(why) = &poisoned {
            for m in batch {
                let reply = match m {
                    Append::Entry(_, r) | Append::Batch(_, r) | Append::Flush(r) => r,
                };
                let _ = reply.send(Err(AuditError::Write(why.clone())));
            }
            continue;
        }
        let mut next = lock(tip).clone();
        buf.clear();
        let mut pending = Vec::with_capacity(batch.len());
        let (time, unix_ms) = now_rfc3339();
        for m in batch {
            match m {
                Append::Flush(r) => pending.push((r, None)),
                Append::Entry(entry, r) => {
                    let seq = next.seq + 1;
                    let hash = entry.seal_into(&mut buf, seq, &time, unix_ms, region, &next.hash);
                    next = Tip { seq, hash };
                    pending.push((r, Some(seq)));
                }
                Append::Batch(entries, r) => {
                    let mut last = None;
                    for entry in entries {
                        let seq = next.seq + 1;
                        let hash =
                            entry.seal_into(&mut buf, seq, &time, unix_ms, region, &next.hash);
                        next = Tip { seq, hash };
                        last = Some(seq);
                    }
                    pending.push((r, last));
                }
            }
        }
        let written = if buf.is_empty() {
            Ok(())
        } else {
            let len_before = file.metadata().map(|m| m.len());
            let started = std::time::Instant::now();
            let res = file.write_all(&buf).and_then(|()| file.sync_data());
            append_seconds.observe(started.elapsed().as_secs_f64());
            if let Err(e) = &res {
                // Undo a partial write so the chain stays intact.
                let undone =
                    len_before.and_then(|len| file.set_len(len).and_then(|()| file.sync_data()));
                if let Err(u) = undone {
                    let why = format!(
                        "{}: write failed ({e}) and could not be undone ({u}); reopen the log",
                        path.display()
                    );
                    tracing::error!("{why}");
                    poisoned = Some(why);
                }
            }
            res
        };
        match written {
            Ok(()) => {
                *lock(tip) = next.clone();
                for (r, seq) in pending {
                    let _ = r.send(Ok(seq.unwrap_or(next.seq)));
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "decision log append failed");
                for (r, _) in pending {
                    let _ = r.send(Err(AuditError::Write(e.to_string())));
                }
            }
        }
    }
}
