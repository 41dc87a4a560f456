//! What a snapshot holds and who may hold it.
//!
//! A snapshot body is a prost message ([`SnapshotBody`]): the source's
//! pending tasks (queued and leased, with attributes and payloads), its
//! recent results, epoch, sequence and policy hash. Each recipient gets its
//! own body holding exactly the tasks it may hold: the recipient must be a
//! backup of the task's rule (or, for a rule with a set of primaries,
//! another member of the set: it could have been chosen instead), and hold every tag the rule requires plus the
//! tags the data-class requirements add for the task's attributes — the same
//! test routing applies. The sender and the receiver both apply it, each with
//! its own policy.
//!
//! Pure functions: no I/O, no keys.
//!
//! A body is written in one of two formats ([`BodyFormat`]): 1, the prost
//! encoding of [`SnapshotBody`] (fields tagged so that
//! [`SnapshotBody::encode_into`] can stream it, tasks one at a time, into
//! the envelope with the same bytes `encode` gives); 2, columns
//! (`columnar.rs`, which also holds the dispatch on a body's format:
//! `columnar::format_of`, `encode_as`, `decode_any`). A receiver tells them
//! apart by the first byte (0 only in format 2) and reads both; a sender writes format 2 only to a peer
//! whose advertisement lists it ([`BodyFormat::for_peer`]), since a
//! controller that reads only format 1 refuses a format-2 body.

use std::collections::BTreeSet;

use federation_api as api;
use prost::Message as _;

use super::envelope::{EnvelopeError, Sink};
use crate::policy::Policy;
use crate::wire;

/// The plaintext of a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotBody {
    /// The region whose state this is.
    #[prost(string, tag = "1")]
    pub source_region: String,
    /// Its epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// Sequence within the epoch.
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
    /// The source's policy hash.
    #[prost(string, tag = "4")]
    pub policy_hash: String,
    /// When it was taken, ms since the Unix epoch.
    #[prost(int64, tag = "5")]
    pub taken_unix_ms: i64,
    /// Queued and leased tasks.
    #[prost(message, repeated, tag = "6")]
    pub tasks: Vec<api::Task>,
    /// Recently finished tasks.
    #[prost(message, repeated, tag = "7")]
    pub results: Vec<api::Task>,
}

impl SnapshotBody {
    /// Serializes into `sink` exactly as [`prost::Message::encode`] would
    /// (fields in tag order), task by task, so that a large body is
    /// compressed while the rest is still being serialized.
    pub fn encode_into(&self, sink: &mut Sink) -> Result<(), EnvelopeError> {
        let head = SnapshotBody {
            source_region: self.source_region.clone(),
            epoch: self.epoch,
            sequence: self.sequence,
            policy_hash: self.policy_hash.clone(),
            taken_unix_ms: self.taken_unix_ms,
            tasks: Vec::new(),
            results: Vec::new(),
        };
        head.encode(sink.buf())
            .map_err(|e| EnvelopeError::Invalid(format!("encoding: {e}")))?;
        for (tag, list) in [(6, &self.tasks), (7, &self.results)] {
            for task in list {
                prost::encoding::message::encode(tag, task, sink.buf());
                sink.flush_if_full()?;
            }
        }
        Ok(())
    }
}

/// How a snapshot body is laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BodyFormat {
    /// Format 1: the prost message [`SnapshotBody`]; every controller reads it.
    #[default]
    Prost,
    /// Format 2: columns (`columnar.rs`).
    Columnar,
}

impl BodyFormat {
    /// The formats this controller reads, as it advertises them
    /// (`RegionAdvertisement.snapshot_formats`).
    pub const READ: [u32; 2] = [1, 2];

    /// Its number (the fourth byte of a format-2 body).
    pub fn number(self) -> u32 {
        match self {
            BodyFormat::Prost => 1,
            BodyFormat::Columnar => 2,
        }
    }

    /// The format to send a peer that advertised `formats`: format 2 when
    /// it lists 2, else format 1 (an empty list is an older controller's,
    /// which reads format 1 only).
    pub fn for_peer(formats: &[u32]) -> Self {
        if formats.contains(&2) {
            BodyFormat::Columnar
        } else {
            BodyFormat::Prost
        }
    }
}

/// The tags a task requires: its rule's `requires` plus the data-class
/// requirements that apply to its attributes. `None` when the rule index is
/// not a rule of `policy`.
pub fn required_tags(policy: &Policy, task: &api::Task) -> Option<BTreeSet<String>> {
    let rule = policy.rules.get(task.rule_index as usize)?;
    let attrs = wire::attributes_lossy(&task.attributes);
    let mut tags = rule.requires.clone();
    tags.extend(policy.data_class_requirements(&attrs));
    Some(tags)
}

/// Regions that may receive snapshots from `source`: for every rule naming
/// `source` as primary or backup, its backups and, when the rule has a set
/// of primaries, the set's other members ([`crate::policy::Rule::peers_of`];
/// never `source` itself).
pub fn recipients(policy: &Policy, source: &str) -> BTreeSet<String> {
    policy
        .rules
        .iter()
        .filter(|r| r.candidates().any(|c| c == source))
        .flat_map(|r| r.peers_of(source).cloned())
        .collect()
}

/// True when `recipient` may receive snapshots from `source` at all.
pub fn may_send(policy: &Policy, source: &str, recipient: &str) -> bool {
    recipients(policy, source).contains(recipient)
}

/// Whether `recipient` (holding `tags`) may hold `task` from `source`; the
/// reason when not.
pub fn may_hold(
    policy: &Policy,
    source: &str,
    recipient: &str,
    tags: &BTreeSet<String>,
    task: &api::Task,
) -> Result<(), String> {
    let Some(rule) = policy.rules.get(task.rule_index as usize) else {
        return Err(format!(
            "task {} names rule {}, which the policy does not have",
            task.task_id, task.rule_index
        ));
    };
    if !rule.candidates().any(|c| c == source) {
        return Err(format!(
            "task {}: {source} is not a region of {}",
            task.task_id,
            rule.label()
        ));
    }
    if recipient == source || !rule.peers_of(source).any(|b| b == recipient) {
        return Err(format!(
            "task {}: {recipient} is not a backup of {} (nor another member of its set of primaries)",
            task.task_id,
            rule.label()
        ));
    }
    let required = required_tags(policy, task).unwrap_or_default();
    let missing: Vec<&String> = required.difference(tags).collect();
    if !missing.is_empty() {
        return Err(format!(
            "task {}: {recipient} lacks {} required by {}",
            task.task_id,
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            rule.label()
        ));
    }
    Ok(())
}

/// The part of `tasks` that `recipient` may hold, and how many were withheld.
pub fn scope_for(
    policy: &Policy,
    source: &str,
    recipient: &str,
    tags: &BTreeSet<String>,
    tasks: &[api::Task],
) -> (Vec<api::Task>, usize) {
    let mut allowed = Vec::with_capacity(tasks.len());
    let mut withheld = 0;
    for t in tasks {
        if may_hold(policy, source, recipient, tags, t).is_ok() {
            allowed.push(t.clone());
        } else {
            withheld += 1;
        }
    }
    (allowed, withheld)
}

/// [`scope_for`] of tasks the caller gives up: the ones `recipient` may
/// hold are kept (not copied), the others dropped and counted.
pub fn scope_owned(
    policy: &Policy,
    source: &str,
    recipient: &str,
    tags: &BTreeSet<String>,
    mut tasks: Vec<api::Task>,
) -> (Vec<api::Task>, usize) {
    let before = tasks.len();
    tasks.retain(|t| may_hold(policy, source, recipient, tags, t).is_ok());
    let withheld = before - tasks.len();
    (tasks, withheld)
}

/// The sorted rule indexes of `tasks`.
pub fn rule_indexes(tasks: &[api::Task]) -> Vec<u32> {
    tasks
        .iter()
        .map(|t| t.rule_index)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, text).expect("write");
        Policy::load_file(&path).expect("policy")
    }

    fn seed() -> String {
        federation_sandbox::SEED_POLICY.to_string()
    }

    fn task(rule: u32, customer: &str) -> api::Task {
        api::Task {
            task_id: format!("{}.x", uuid::Uuid::now_v7()),
            rule_index: rule,
            attributes: federation_sandbox::string_attrs(&[
                ("customer_region", customer),
                ("data_class", "pii"),
            ]),
            ..Default::default()
        }
    }

    fn tags(p: &Policy, r: &str) -> BTreeSet<String> {
        p.region(r).expect("region").tags.clone()
    }

    #[test]
    fn fan_out_follows_backups_and_tags() {
        let p = policy(&seed());
        assert_eq!(
            recipients(&p, "north_america"),
            BTreeSet::from(["europe".to_string()])
        );
        assert!(recipients(&p, "asia_pacific").is_empty());
        let us = task(0, "US");
        let de = task(1, "DE");
        let eu_tags = tags(&p, "europe");
        let na_tags = tags(&p, "north_america");
        assert!(may_hold(&p, "north_america", "europe", &eu_tags, &us).is_ok());
        // As written, the EU rule lets north_america back it up.
        assert!(may_hold(&p, "europe", "north_america", &na_tags, &de).is_ok());
        assert!(may_hold(&p, "europe", "asia_pacific", &BTreeSet::new(), &de).is_err());

        let strict = policy(federation_sandbox::SEED_REQUIRES_GDPR);
        let why = may_hold(&strict, "europe", "north_america", &na_tags, &de).expect_err("gdpr");
        assert!(why.contains("GDPR"), "{why}");
        let (sent, withheld) = scope_for(
            &strict,
            "europe",
            "north_america",
            &na_tags,
            &[de.clone(), task(1, "UK")],
        );
        assert!(sent.is_empty());
        assert_eq!(withheld, 2);
        // The owned form keeps exactly what the borrowed one copies.
        let mixed = [task(0, "US"), de.clone(), task(0, "US")];
        for (p, from, to, tags, expect) in [
            (&p, "north_america", "europe", &eu_tags, (2, 1)),
            (&strict, "europe", "north_america", &na_tags, (0, 3)),
        ] {
            let copied = scope_for(p, from, to, tags, &mixed);
            let kept = scope_owned(p, from, to, tags, mixed.to_vec());
            assert_eq!(copied, kept);
            assert_eq!((kept.0.len(), kept.1), expect, "{from} -> {to}");
        }
    }

    #[test]
    fn a_set_members_tasks_may_go_to_the_other_members_and_nowhere_else() {
        let p = policy(include_str!("../../../policies/eu-set.yaml"));
        let one = |r: &str| BTreeSet::from([r.to_string()]);
        assert_eq!(recipients(&p, "europe_west"), one("europe_central"));
        assert_eq!(recipients(&p, "europe_central"), one("europe_west"));
        assert_eq!(recipients(&p, "north_america"), one("europe_west"));
        let de = task(0, "DE");
        let central = tags(&p, "europe_central");
        let west = tags(&p, "europe_west");
        assert!(may_hold(&p, "europe_west", "europe_central", &central, &de).is_ok());
        assert!(may_hold(&p, "europe_central", "europe_west", &west, &de).is_ok());
        // Not a region of the rule, and lacking GDPR besides.
        let na = tags(&p, "north_america");
        assert!(may_hold(&p, "europe_west", "north_america", &na, &de).is_err());
        // A member that lost its GDPR tag may not hold it either.
        let why = may_hold(&p, "europe_west", "europe_central", &BTreeSet::new(), &de)
            .expect_err("lacks GDPR");
        assert!(why.contains("GDPR"), "{why}");
        // A US task in its backup europe_west goes nowhere else: central is
        // no region of the US rule.
        let us = task(1, "US");
        assert!(may_hold(&p, "europe_west", "europe_central", &central, &us).is_err());
        assert!(may_hold(&p, "north_america", "europe_west", &west, &us).is_ok());
    }

    #[test]
    fn data_class_requirements_apply_per_task() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-data-class-gdpr.yaml"
        ))
        .expect("policy file");
        let p = policy(&text);
        let de = task(1, "DE");
        let need = required_tags(&p, &de).expect("rule");
        let na_tags = tags(&p, "north_america");
        if need.contains("GDPR") {
            assert!(may_hold(&p, "europe", "north_america", &na_tags, &de).is_err());
        }
    }
}
