//! The record model: what a caller records ([`Entry`]) and a line read back
//! ([`Record`]); in between, [`Prepared`](super::Prepared) (`canonical`) is a record encoded
//! and ready to chain.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(doc)]
use super::{key, kind, minimise};
use crate::policy::{Attributes, Decision};

/// What a caller records: a record without the fields the log fills in
/// (seq, time, region, hashes). [`Prepared::entry`](super::Prepared::entry) encodes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
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

impl Entry {
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
    pub entry: Entry,
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
