//! The copy a backup holds of one source region's state, folded from the
//! newest snapshot and every change batch accepted since: the source's
//! pending tasks (what a takeover queues) and, for finished tasks, only what
//! idempotency needs (task id, state, version, and digests of attributes and
//! payload).
//!
//! Folding is by task version (every store mutation bumps it): a change
//! older than what the copy holds of that task is ignored, so a batch that
//! carries a change the snapshot already reflects changes nothing. A
//! snapshot replaces the pending set; what is known of finished tasks is
//! kept across snapshots (bounded by [`MAX_DONE`], oldest dropped first), so
//! a stale change of a task that finished before the snapshot cannot bring
//! it back as pending.
//!
//! Pure: no I/O, no keys, no policy.

use std::collections::{BTreeMap, HashMap, VecDeque};

use federation_api as api;
use sha2::{Digest as _, Sha256};

use super::snapshot::SnapshotBody;
use crate::tasks::is_terminal;

/// Most finished tasks remembered per source.
pub const MAX_DONE: usize = 100_000;

/// SHA-256 over the attributes in key order (each key and its prost-encoded
/// value, length-prefixed): equal maps give equal digests.
pub fn attributes_digest(attrs: &HashMap<String, api::AttributeValue>) -> [u8; 32] {
    let mut sorted: Vec<(&String, &api::AttributeValue)> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (k, v) in sorted {
        let value = prost::Message::encode_to_vec(v);
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(&value);
    }
    h.finalize().into()
}

/// SHA-256 of a payload.
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

/// What the copy knows of the task an idempotency key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    /// The task.
    pub task_id: String,
    /// Its state as last replicated.
    pub state: api::TaskState,
    /// Its rule.
    pub rule_index: u32,
    /// When it was accepted (the source's clock).
    pub created_unix_ms: i64,
    /// [`attributes_digest`] of its attributes.
    pub attributes_digest: [u8; 32],
    /// [`payload_digest`] of its payload.
    pub payload_digest: [u8; 32],
}

impl KnownKey {
    fn of(t: &api::Task) -> Self {
        Self {
            task_id: t.task_id.clone(),
            state: t.state(),
            rule_index: t.rule_index,
            created_unix_ms: t.created_unix_ms,
            attributes_digest: attributes_digest(&t.attributes),
            payload_digest: payload_digest(&t.payload),
        }
    }

    /// What differs between this task and a request with `attributes` and
    /// `payload` ("attributes", "payload", "attributes and payload"), or
    /// `None` when both are the same.
    pub fn differs(
        &self,
        attributes: &HashMap<String, api::AttributeValue>,
        payload: &[u8],
    ) -> Option<&'static str> {
        crate::tasks::what_differs(
            self.attributes_digest == attributes_digest(attributes),
            self.payload_digest == payload_digest(payload),
        )
    }
}

#[derive(Debug, Clone)]
struct Done {
    version: u64,
    state: api::TaskState,
    /// The idempotency key and what it names.
    key: Option<(String, KnownKey)>,
}

/// One source's state as this region holds it.
#[derive(Debug, Clone, Default)]
pub struct HeldCopy {
    /// Epoch of the newest snapshot or batch folded in.
    pub epoch: u64,
    /// Its sequence.
    pub sequence: u64,
    /// When the source took (snapshot) or sent (batch) the newest part, by
    /// its clock, ms since the Unix epoch.
    pub as_of_unix_ms: i64,
    /// Batches folded in since the last snapshot.
    pub batches_since_snapshot: u64,
    /// True once a snapshot was folded in (else only batches are known).
    pub has_snapshot: bool,
    pending: BTreeMap<String, api::Task>,
    done: HashMap<String, Done>,
    done_order: VecDeque<String>,
    keys: HashMap<String, String>,
}

impl HeldCopy {
    /// The pending (queued or leased) tasks, by id.
    pub fn pending(&self) -> impl Iterator<Item = &api::Task> {
        self.pending.values()
    }

    /// How many pending tasks are held.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// What is known of the task `key` names, if anything.
    pub fn key(&self, key: &str) -> Option<KnownKey> {
        let id = self.keys.get(key)?;
        if let Some(t) = self.pending.get(id) {
            return Some(KnownKey::of(t));
        }
        self.done
            .get(id)
            .and_then(|d| d.key.as_ref().map(|(_, k)| k.clone()))
    }

    /// The state of `task_id` as held, if known.
    pub fn state_of(&self, task_id: &str) -> Option<api::TaskState> {
        if let Some(t) = self.pending.get(task_id) {
            return Some(t.state());
        }
        self.done.get(task_id).map(|d| d.state)
    }

    fn version_of(&self, id: &str) -> Option<u64> {
        self.pending
            .get(id)
            .map(|t| t.version)
            .or_else(|| self.done.get(id).map(|d| d.version))
    }

    /// Folds one task's change in: ignored when not newer than what is held.
    /// Returns true when it changed the copy.
    pub fn apply(&mut self, task: api::Task) -> bool {
        if self
            .version_of(&task.task_id)
            .is_some_and(|v| task.version <= v)
        {
            return false;
        }
        if !task.idempotency_key.is_empty() {
            self.keys
                .insert(task.idempotency_key.clone(), task.task_id.clone());
        }
        if is_terminal(task.state()) {
            self.pending.remove(&task.task_id);
            let key = (!task.idempotency_key.is_empty())
                .then(|| (task.idempotency_key.clone(), KnownKey::of(&task)));
            let fresh = self
                .done
                .insert(
                    task.task_id.clone(),
                    Done {
                        version: task.version,
                        state: task.state(),
                        key,
                    },
                )
                .is_none();
            if fresh {
                self.done_order.push_back(task.task_id);
                self.trim_done();
            }
        } else {
            self.pending.insert(task.task_id.clone(), task);
        }
        true
    }

    fn trim_done(&mut self) {
        while self.done.len() > MAX_DONE {
            let Some(id) = self.done_order.pop_front() else {
                break;
            };
            if let Some(Done {
                key: Some((key, _)),
                ..
            }) = self.done.remove(&id)
            {
                if self.keys.get(&key).is_some_and(|v| *v == id) {
                    self.keys.remove(&key);
                }
            }
        }
    }

    /// Replaces the pending set with the snapshot's and folds its results
    /// in; what is known of finished tasks is kept.
    pub fn fold_snapshot(&mut self, body: SnapshotBody) {
        let old = std::mem::take(&mut self.pending);
        for (id, t) in old {
            if !t.idempotency_key.is_empty()
                && self.keys.get(&t.idempotency_key).is_some_and(|v| *v == id)
            {
                self.keys.remove(&t.idempotency_key);
            }
        }
        self.epoch = body.epoch;
        self.sequence = body.sequence;
        self.as_of_unix_ms = body.taken_unix_ms;
        self.batches_since_snapshot = 0;
        self.has_snapshot = true;
        for t in body.results {
            self.apply(t);
        }
        for t in body.tasks {
            self.apply(t);
        }
    }

    /// Folds a batch of changes in.
    pub fn fold_batch(
        &mut self,
        epoch: u64,
        sequence: u64,
        sent_unix_ms: i64,
        tasks: Vec<api::Task>,
    ) {
        self.epoch = epoch;
        self.sequence = sequence;
        self.as_of_unix_ms = self.as_of_unix_ms.max(sent_unix_ms);
        self.batches_since_snapshot += 1;
        for t in tasks {
            self.apply(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, key: &str, state: api::TaskState, version: u64) -> api::Task {
        let mut t = api::Task {
            task_id: id.into(),
            idempotency_key: key.into(),
            payload: b"p".to_vec(),
            attributes: federation_sandbox::string_attrs(&[("customer_region", "US")]),
            version,
            ..Default::default()
        };
        t.set_state(state);
        t
    }

    #[test]
    fn changes_fold_by_version_and_survive_a_snapshot() {
        use api::TaskState::*;
        let mut c = HeldCopy::default();
        c.fold_batch(
            1,
            1,
            10,
            vec![task("a", "K", Queued, 1), task("b", "", Queued, 1)],
        );
        assert_eq!(c.pending_len(), 2);
        // a finishes; a stale "leased" of a arrives after: ignored.
        c.fold_batch(1, 2, 20, vec![task("a", "K", Succeeded, 3)]);
        c.fold_batch(1, 3, 30, vec![task("a", "K", Leased, 2)]);
        assert_eq!(c.pending_len(), 1);
        assert_eq!(c.state_of("a"), Some(Succeeded));
        let k = c.key("K").expect("key known");
        assert_eq!((k.task_id.as_str(), k.state), ("a", Succeeded));
        assert_eq!(k.differs(&task("x", "K", Queued, 1).attributes, b"p"), None);
        assert_eq!(
            k.differs(&task("x", "K", Queued, 1).attributes, b"other"),
            Some("payload")
        );
        // A snapshot that no longer lists b (it finished before) and still
        // lists nothing of a: a stays known as finished.
        c.fold_snapshot(SnapshotBody {
            epoch: 1,
            sequence: 4,
            tasks: vec![task("c", "", Queued, 1)],
            ..Default::default()
        });
        assert_eq!(
            c.pending().map(|t| t.task_id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        c.fold_batch(1, 5, 40, vec![task("a", "K", Leased, 2)]);
        assert_eq!(c.pending_len(), 1, "a stale change brought a back");
        assert_eq!(c.key("K").map(|k| k.task_id), Some("a".into()));
    }
}
