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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use federation_api as api;
use hashbrown::{HashTable, hash_table};
use sha2::{Digest as _, Sha256};

use super::restore::{self, Placed, Restored, Span};
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

/// Text the copy holds: in the newest snapshot's plaintext, or its own.
#[derive(Debug, Clone)]
enum Text {
    Plain(Span),
    Owned(Box<str>),
}

impl Text {
    fn bytes<'a>(&'a self, plain: &'a [u8]) -> &'a [u8] {
        match self {
            Text::Plain(s) => s.get(plain),
            Text::Owned(s) => s.as_bytes(),
        }
    }
}

/// Text of the plaintext (validated UTF-8) as the copy's own.
fn owned_text(bytes: &[u8]) -> Box<str> {
    String::from_utf8_lossy(bytes).into()
}

/// A pending task: read in place from the newest snapshot's plaintext (not
/// decoded until asked for), or owned (folded from a change batch).
#[derive(Debug, Clone)]
enum Pending {
    InPlace(Placed),
    Owned { hash: u64, task: Box<api::Task> },
}

impl Pending {
    fn hash(&self) -> u64 {
        match self {
            Pending::InPlace(p) => p.hash,
            Pending::Owned { hash, .. } => *hash,
        }
    }

    fn id<'a>(&'a self, plain: &'a [u8]) -> &'a [u8] {
        match self {
            Pending::InPlace(p) => p.id.get(plain),
            Pending::Owned { task, .. } => task.task_id.as_bytes(),
        }
    }

    fn key<'a>(&'a self, plain: &'a [u8]) -> &'a [u8] {
        match self {
            Pending::InPlace(p) => p.key.get(plain),
            Pending::Owned { task, .. } => task.idempotency_key.as_bytes(),
        }
    }

    fn version(&self) -> u64 {
        match self {
            Pending::InPlace(p) => p.version,
            Pending::Owned { task, .. } => task.version,
        }
    }

    fn state(&self) -> api::TaskState {
        match self {
            Pending::InPlace(p) => api::TaskState::try_from(p.state).unwrap_or_default(),
            Pending::Owned { task, .. } => task.state(),
        }
    }

    /// The owned task (decoded by prost from its bytes, which were
    /// validated with prost's rules when the snapshot arrived).
    fn task(&self, plain: &[u8]) -> Option<api::Task> {
        match self {
            Pending::InPlace(p) => match restore::task_at(plain, p.task) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "a task of the copy held does not decode; skipped");
                    None
                }
            },
            Pending::Owned { task, .. } => Some((**task).clone()),
        }
    }
}

#[derive(Debug, Clone)]
struct Done {
    hash: u64,
    id: Arc<str>,
    version: u64,
    state: api::TaskState,
    /// The idempotency key and what it names.
    key: Option<(String, KnownKey)>,
}

/// An idempotency key and the task it names.
#[derive(Debug, Clone)]
struct KeyEntry {
    hash: u64,
    key: Text,
    id: Text,
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
    /// The newest snapshot's plaintext, which its tasks are read from.
    plain: Vec<u8>,
    /// By task id.
    pending: HashTable<Pending>,
    /// By task id.
    done: HashTable<Done>,
    done_order: VecDeque<(u64, Arc<str>)>,
    /// By key.
    keys: HashTable<KeyEntry>,
}

impl HeldCopy {
    /// The pending (queued or leased) tasks, decoded, in task id order.
    pub fn pending_tasks(&self) -> Vec<api::Task> {
        let mut tasks: Vec<api::Task> = self
            .pending
            .iter()
            .filter_map(|p| p.task(&self.plain))
            .collect();
        tasks.sort_unstable_by(|a, b| a.task_id.cmp(&b.task_id));
        tasks
    }

    /// How many pending tasks are held.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn find_pending(&self, hash: u64, id: &[u8]) -> Option<&Pending> {
        self.pending.find(hash, |p| p.id(&self.plain) == id)
    }

    fn find_done(&self, hash: u64, id: &[u8]) -> Option<&Done> {
        self.done.find(hash, |d| d.id.as_bytes() == id)
    }

    /// What is known of the task `key` names, if anything.
    pub fn key(&self, key: &str) -> Option<KnownKey> {
        let key = key.as_bytes();
        let entry = self
            .keys
            .find(restore::hash(key), |e| e.key.bytes(&self.plain) == key)?;
        let id = entry.id.bytes(&self.plain);
        let hash = restore::hash(id);
        if let Some(p) = self.find_pending(hash, id) {
            return p.task(&self.plain).map(|t| KnownKey::of(&t));
        }
        self.find_done(hash, id)
            .and_then(|d| d.key.as_ref().map(|(_, k)| k.clone()))
    }

    /// The state of `task_id` as held, if known.
    pub fn state_of(&self, task_id: &str) -> Option<api::TaskState> {
        let id = task_id.as_bytes();
        let hash = restore::hash(id);
        if let Some(p) = self.find_pending(hash, id) {
            return Some(p.state());
        }
        self.find_done(hash, id).map(|d| d.state)
    }

    fn version_of(&self, hash: u64, id: &[u8]) -> Option<u64> {
        self.find_pending(hash, id)
            .map(Pending::version)
            .or_else(|| self.find_done(hash, id).map(|d| d.version))
    }

    /// Makes `key` name `id` (replacing what it named).
    fn set_key(&mut self, key: Text, id: Text) {
        let plain = &self.plain;
        let bytes = key.bytes(plain);
        let hash = restore::hash(bytes);
        match self
            .keys
            .entry(hash, |e| e.key.bytes(plain) == bytes, |e| e.hash)
        {
            hash_table::Entry::Occupied(mut o) => o.get_mut().id = id,
            hash_table::Entry::Vacant(v) => {
                v.insert(KeyEntry { hash, key, id });
            }
        }
    }

    /// Forgets `key` if it names `id`.
    fn unset_key(&mut self, key: &[u8], id: &[u8]) {
        let plain = &self.plain;
        if let Ok(e) = self
            .keys
            .find_entry(restore::hash(key), |e| e.key.bytes(plain) == key)
        {
            if e.get().id.bytes(plain) == id {
                e.remove();
            }
        }
    }

    fn put_pending(&mut self, p: Pending) {
        let plain = &self.plain;
        let id = p.id(plain);
        match self
            .pending
            .entry(p.hash(), |q| q.id(plain) == id, Pending::hash)
        {
            hash_table::Entry::Occupied(mut o) => *o.get_mut() = p,
            hash_table::Entry::Vacant(v) => {
                v.insert(p);
            }
        }
    }

    /// Folds one task's change in: ignored when not newer than what is held.
    /// Returns true when it changed the copy.
    pub fn apply(&mut self, task: api::Task) -> bool {
        let hash = restore::hash(task.task_id.as_bytes());
        if self
            .version_of(hash, task.task_id.as_bytes())
            .is_some_and(|v| task.version <= v)
        {
            return false;
        }
        if !task.idempotency_key.is_empty() {
            self.set_key(
                Text::Owned(task.idempotency_key.as_str().into()),
                Text::Owned(task.task_id.as_str().into()),
            );
        }
        if is_terminal(task.state()) {
            let plain = &self.plain;
            if let Ok(e) = self
                .pending
                .find_entry(hash, |p| p.id(plain) == task.task_id.as_bytes())
            {
                e.remove();
            }
            let key = (!task.idempotency_key.is_empty())
                .then(|| (task.idempotency_key.clone(), KnownKey::of(&task)));
            let done = Done {
                hash,
                id: task.task_id.as_str().into(),
                version: task.version,
                state: task.state(),
                key,
            };
            match self
                .done
                .entry(hash, |d| *d.id == *task.task_id, |d| d.hash)
            {
                hash_table::Entry::Occupied(mut o) => *o.get_mut() = done,
                hash_table::Entry::Vacant(v) => {
                    let id = done.id.clone();
                    v.insert(done);
                    self.done_order.push_back((hash, id));
                    self.trim_done();
                }
            }
        } else {
            self.put_pending(Pending::Owned {
                hash,
                task: Box::new(task),
            });
        }
        true
    }

    /// Folds a task of the newest snapshot in, as [`HeldCopy::apply`]
    /// would, keeping it in place when it is pending.
    fn apply_placed(&mut self, p: Placed) -> bool {
        let finished = is_terminal(api::TaskState::try_from(p.state).unwrap_or_default());
        if finished {
            // Rare (a snapshot's results): folded as owned.
            return match restore::task_at(&self.plain, p.task) {
                Ok(task) => self.apply(task),
                Err(e) => {
                    tracing::error!(error = %e, "a task of a snapshot does not decode; skipped");
                    false
                }
            };
        }
        if self
            .version_of(p.hash, p.id.get(&self.plain))
            .is_some_and(|v| p.version <= v)
        {
            return false;
        }
        if !p.key.is_empty() {
            self.set_key(Text::Plain(p.key), Text::Plain(p.id));
        }
        self.put_pending(Pending::InPlace(p));
        true
    }

    fn trim_done(&mut self) {
        while self.done.len() > MAX_DONE {
            let Some((hash, id)) = self.done_order.pop_front() else {
                break;
            };
            let Ok(e) = self.done.find_entry(hash, |d| d.id == id) else {
                continue;
            };
            let (Done { key, .. }, _) = e.remove();
            if let Some((key, _)) = key {
                self.unset_key(key.as_bytes(), id.as_bytes());
            }
        }
    }

    /// Replaces the pending set with the snapshot's and folds its results
    /// in; what is known of finished tasks is kept.
    pub fn fold_snapshot(&mut self, body: Restored) {
        // A key naming a pending task being replaced goes; every other one
        // stays, in text of its own (the plaintext it may point into goes).
        let (plain, pending) = (&self.plain, &self.pending);
        self.keys.retain(|e| {
            let (key, id) = (e.key.bytes(plain), e.id.bytes(plain));
            if pending
                .find(restore::hash(id), |p| p.id(plain) == id)
                .is_some_and(|p| p.key(plain) == key)
            {
                return false;
            }
            if let Text::Plain(_) = e.key {
                e.key = Text::Owned(owned_text(key));
            }
            if let Text::Plain(s) = e.id {
                e.id = Text::Owned(owned_text(s.get(plain)));
            }
            true
        });
        self.pending.clear();
        self.plain = body.plain;
        self.epoch = body.epoch;
        self.sequence = body.sequence;
        self.as_of_unix_ms = body.taken_unix_ms;
        self.batches_since_snapshot = 0;
        self.has_snapshot = true;
        self.pending.reserve(body.tasks.len(), Pending::hash);
        for p in body.results {
            self.apply_placed(p);
        }
        for p in body.tasks {
            self.apply_placed(p);
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
    use crate::replication::snapshot::SnapshotBody;
    use proptest::prelude::*;

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

    /// A snapshot body folded in place.
    fn snapshot(body: &SnapshotBody) -> Restored {
        restore::decode(prost::Message::encode_to_vec(body), None, None).expect("decodes")
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
        c.fold_snapshot(snapshot(&SnapshotBody {
            epoch: 1,
            sequence: 4,
            tasks: vec![task("c", "", Queued, 1)],
            ..Default::default()
        }));
        assert_eq!(
            c.pending_tasks()
                .iter()
                .map(|t| t.task_id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        c.fold_batch(1, 5, 40, vec![task("a", "K", Leased, 2)]);
        assert_eq!(c.pending_len(), 1, "a stale change brought a back");
        assert_eq!(c.key("K").map(|k| k.task_id), Some("a".into()));
    }

    /// The copy as it was before it read snapshots in place (every task
    /// owned, by id in a `BTreeMap`): the reference the copy must agree with.
    /// A finished task: version, state, key and what it names.
    type Finished = (u64, api::TaskState, Option<(String, KnownKey)>);

    #[derive(Default)]
    struct Reference {
        pending: std::collections::BTreeMap<String, api::Task>,
        done: HashMap<String, Finished>,
        done_order: VecDeque<String>,
        keys: HashMap<String, String>,
    }

    impl Reference {
        fn key(&self, key: &str) -> Option<KnownKey> {
            let id = self.keys.get(key)?;
            if let Some(t) = self.pending.get(id) {
                return Some(KnownKey::of(t));
            }
            self.done
                .get(id)
                .and_then(|d| d.2.as_ref().map(|(_, k)| k.clone()))
        }

        fn state_of(&self, id: &str) -> Option<api::TaskState> {
            if let Some(t) = self.pending.get(id) {
                return Some(t.state());
            }
            self.done.get(id).map(|d| d.1)
        }

        fn apply(&mut self, task: api::Task, max_done: usize) {
            let version = self
                .pending
                .get(&task.task_id)
                .map(|t| t.version)
                .or_else(|| self.done.get(&task.task_id).map(|d| d.0));
            if version.is_some_and(|v| task.version <= v) {
                return;
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
                    .insert(task.task_id.clone(), (task.version, task.state(), key))
                    .is_none();
                if fresh {
                    self.done_order.push_back(task.task_id);
                    while self.done.len() > max_done {
                        let Some(id) = self.done_order.pop_front() else {
                            break;
                        };
                        if let Some((_, _, Some((key, _)))) = self.done.remove(&id) {
                            if self.keys.get(&key).is_some_and(|v| *v == id) {
                                self.keys.remove(&key);
                            }
                        }
                    }
                }
            } else {
                self.pending.insert(task.task_id.clone(), task);
            }
        }

        fn fold_snapshot(&mut self, body: SnapshotBody, max_done: usize) {
            let old = std::mem::take(&mut self.pending);
            for (id, t) in old {
                if !t.idempotency_key.is_empty()
                    && self.keys.get(&t.idempotency_key).is_some_and(|v| *v == id)
                {
                    self.keys.remove(&t.idempotency_key);
                }
            }
            for t in body.results {
                self.apply(t, max_done);
            }
            for t in body.tasks {
                self.apply(t, max_done);
            }
        }
    }

    const IDS: usize = 6;
    const KEYS: [&str; 4] = ["", "K1", "K2", "K3"];

    fn id(i: usize) -> String {
        format!("{i:036}.north_america")
    }

    fn change() -> impl Strategy<Value = api::Task> {
        (0..IDS, 0..KEYS.len(), 0..4usize, 0..6u64, any::<bool>()).prop_map(
            |(i, k, s, version, other_payload)| {
                use api::TaskState::*;
                let mut t = task(
                    &id(i),
                    KEYS[k],
                    [Queued, Leased, Succeeded, Cancelled][s],
                    version,
                );
                if other_payload {
                    t.payload = b"other".to_vec();
                }
                t
            },
        )
    }

    /// A step: a change batch, or a snapshot (tasks, results).
    fn step() -> impl Strategy<Value = (bool, Vec<api::Task>, Vec<api::Task>)> {
        (
            any::<bool>(),
            proptest::collection::vec(change(), 0..8),
            proptest::collection::vec(change(), 0..3),
        )
    }

    proptest! {
        #[test]
        fn snapshots_read_in_place_fold_as_owned_tasks_did(
            steps in proptest::collection::vec(step(), 1..8),
        ) {
            // The finished-task bound of the reference is the copy's.
            let mut copy = HeldCopy::default();
            let mut reference = Reference::default();
            for (sequence, (is_snapshot, tasks, results)) in steps.into_iter().enumerate() {
                if is_snapshot {
                    let body = SnapshotBody {
                        sequence: sequence as u64,
                        tasks,
                        results,
                        ..Default::default()
                    };
                    copy.fold_snapshot(snapshot(&body));
                    reference.fold_snapshot(body, MAX_DONE);
                } else {
                    copy.fold_batch(1, sequence as u64, 0, tasks.clone());
                    for t in tasks {
                        reference.apply(t, MAX_DONE);
                    }
                }
                let want: Vec<api::Task> = reference.pending.values().cloned().collect();
                prop_assert_eq!(copy.pending_tasks(), want);
                prop_assert_eq!(copy.pending_len(), reference.pending.len());
                for i in 0..IDS {
                    prop_assert_eq!(copy.state_of(&id(i)), reference.state_of(&id(i)));
                }
                for k in &KEYS[1..] {
                    prop_assert_eq!(copy.key(k), reference.key(k), "key {}", k);
                }
            }
        }
    }
}
