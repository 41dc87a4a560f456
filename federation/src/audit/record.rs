//! The record model: what a caller hands the log ([`DecisionEntry`],
//! [`DecisionRef`]), a record rendered and waiting to be chained
//! ([`PendingRecord`]), and a line read back ([`Record`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(doc)]
use super::{DecisionLog, kind};
use super::{Prepared, minimise};
use crate::policy::{Attributes, Decision, RegionView};

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
pub struct PendingRecord(pub(super) Box<Prepared>);

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
