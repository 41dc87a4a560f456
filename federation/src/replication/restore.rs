//! A snapshot's body decoded into the form the copy of its source keeps:
//! every task validated in place (format 1: [`view::walk`], prost's rules;
//! format 2: [`columnar::Body::parse`]), checked against residency
//! ([`Scope`], remembered per rule and attribute values; in format 2 per
//! rule and entry of the body's attribute-set dictionary), and kept as its
//! place in the plaintext, which the copy then owns
//! ([`super::copy::HeldCopy`]). Nothing is allocated per task.
//!
//! A body is refused as prost refuses it, and for the same reasons in the
//! same order as before: a malformed body (anywhere in it) before a body
//! whose head disagrees with the header, before a task we may not hold (the
//! first one in `tasks`, else the first in `results`).

use std::collections::BTreeSet;
use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
use std::sync::LazyLock;

use federation_api as api;
use hashbrown::HashTable;

use super::columnar;
use super::rejection::Rejection;
use super::snapshot;
use super::view::{self, List, TaskView, ViewError};
use crate::policy::Policy;
use crate::wire;

/// The hasher of every table the copy keeps (task ids, idempotency keys),
/// seeded once per process, so a hash computed while decoding is valid in
/// the copy.
pub(super) static HASHER: LazyLock<hashbrown::DefaultHashBuilder> =
    LazyLock::new(hashbrown::DefaultHashBuilder::default);

/// The hash of a task id or idempotency key.
pub(super) fn hash(bytes: &[u8]) -> u64 {
    HASHER.hash_one(bytes)
}

/// Where something is in the plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Span {
    at: u32,
    len: u32,
}

impl Span {
    /// The span of `part`, a slice of `plain` (an empty one may be any
    /// empty slice, such as a field's default).
    fn of(plain: &[u8], part: &[u8]) -> Self {
        let at = (part.as_ptr() as usize).wrapping_sub(plain.as_ptr() as usize);
        if part.is_empty() || at.saturating_add(part.len()) > plain.len() {
            return Self::default();
        }
        // `plain` is at most `u32::MAX` bytes (checked by `decode`).
        Self {
            at: at as u32,
            len: part.len() as u32,
        }
    }

    /// Its bytes in `plain` (empty if `plain` is not the plaintext it came
    /// from and is too short).
    pub(super) fn get(self, plain: &[u8]) -> &[u8] {
        let (at, len) = (self.at as usize, self.len as usize);
        plain.get(at..at + len).unwrap_or_default()
    }

    pub(super) fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// Where a task of a decoded body is in its plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum At {
    /// Format 1: the task's prost encoding.
    Bytes(Span),
    /// Format 2: a row of the tasks (or, `results`, the results) table.
    Row { results: bool, row: u32 },
}

/// The task at `at` in `plain` (a plaintext [`decode`] accepted).
pub(super) fn task_at(plain: &[u8], at: At) -> Result<api::Task, String> {
    match at {
        At::Bytes(span) => prost::Message::decode(span.get(plain)).map_err(|e| e.to_string()),
        At::Row { results, row } => {
            let body = columnar::Body::locate(plain).map_err(|e| e.to_string())?;
            let table = if results { body.results } else { body.tasks };
            if row as usize >= table.len() {
                return Err(format!("row {row} of a table of {}", table.len()));
            }
            Ok(body.task(&table, row as usize))
        }
    }
}

/// One task of a decoded body: where it is, and what the copy's lookups
/// read without decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placed {
    /// [`hash`] of the task id.
    pub hash: u64,
    /// The task.
    pub task: At,
    /// Its id.
    pub id: Span,
    /// Its idempotency key (empty when none).
    pub key: Span,
    /// Its version.
    pub version: u64,
    /// Its state (`api::TaskState` as an integer).
    pub state: i32,
}

/// A snapshot body decoded for the copy: the plaintext and each task's
/// place in it.
#[derive(Debug, Default)]
pub struct Restored {
    pub(super) plain: Vec<u8>,
    /// The region whose state this is.
    pub source_region: String,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub sequence: u64,
    /// When the source took it, ms since the Unix epoch.
    pub taken_unix_ms: i64,
    pub(super) tasks: Vec<Placed>,
    pub(super) results: Vec<Placed>,
}

impl Restored {
    /// Queued and leased tasks in it.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Recently finished tasks in it.
    pub fn results(&self) -> usize {
        self.results.len()
    }
}

/// Most attribute sets [`Scope`] remembers as allowed.
const MAX_REMEMBERED: usize = 4096;
/// Most attribute entries a remembered set has (more: checked every time).
const MAX_ENTRIES: usize = 8;

/// Residency of a received body's tasks: `snapshot::may_hold` for each,
/// remembered per (rule, attribute entries the policy's data-class
/// conditions read, byte for byte), since the verdict depends on nothing
/// else, so a body of tasks alike is checked once per kind of task.
#[derive(Debug)]
pub struct Scope<'p> {
    policy: &'p Policy,
    source: &'p str,
    region: &'p str,
    tags: BTreeSet<String>,
    /// The attributes any data-class condition reads, as bytes (compared
    /// with the keys on the wire as they are: validated once, by the walk).
    reads: Vec<Box<[u8]>>,
    allowed: HashTable<Allowed>,
}

#[derive(Debug)]
struct Allowed {
    hash: u64,
    rule: u32,
    entries: Vec<Box<[u8]>>,
}

impl<'p> Scope<'p> {
    /// The check of tasks from `source` held by `region` under `policy`.
    pub fn new(policy: &'p Policy, source: &'p str, region: &'p str) -> Self {
        Self {
            policy,
            source,
            region,
            tags: policy
                .region(region)
                .map(|r| r.tags.clone())
                .unwrap_or_default(),
            reads: policy
                .requirements
                .iter()
                .flat_map(|q| q.condition.reads())
                .collect::<BTreeSet<String>>()
                .into_iter()
                .map(|k| k.into_bytes().into_boxed_slice())
                .collect(),
            allowed: HashTable::new(),
        }
    }

    /// Whether `task` may be held here: owned by the source, and
    /// `snapshot::may_hold`.
    fn check(&mut self, task: &TaskView<'_>) -> Result<(), Rejection> {
        let source = self.source;
        if !owned_by(task.task_id, source) {
            return Err(Rejection::Residency(format!(
                "task {} is not owned by {source}",
                wire::truncate(task.task_id, 80)
            )));
        }
        // The entries the verdict depends on, in key order; `None` when
        // they cannot be remembered (too many, or a key twice).
        let mut entries: [(&[u8], &[u8]); MAX_ENTRIES] = [(&[], &[]); MAX_ENTRIES];
        let mut n = 0;
        let mut rememberable = true;
        let read = (!self.reads.is_empty()).then(|| task.attribute_entries_bytes());
        for (key, entry) in read.into_iter().flatten() {
            if !self.reads.iter().any(|r| **r == *key) {
                continue;
            }
            if n == MAX_ENTRIES {
                rememberable = false;
                break;
            }
            entries[n] = (key, entry);
            n += 1;
        }
        let entries = &mut entries[..n];
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            rememberable = false;
        }
        let hash = {
            let mut h = HASHER.build_hasher();
            h.write_u32(task.rule_index);
            for e in entries.iter() {
                e.1.hash(&mut h);
            }
            h.finish()
        };
        if rememberable
            && self
                .allowed
                .find(hash, |a| {
                    a.rule == task.rule_index
                        && a.entries.len() == entries.len()
                        && a.entries
                            .iter()
                            .zip(entries.iter())
                            .all(|(x, y)| **x == *y.1)
                })
                .is_some()
        {
            return Ok(());
        }
        let owned = task.to_task().map_err(|e| Rejection::Body(e.to_string()))?;
        snapshot::may_hold(self.policy, source, self.region, &self.tags, &owned)
            .map_err(Rejection::Residency)?;
        if rememberable && self.allowed.len() < MAX_REMEMBERED {
            self.allowed.insert_unique(
                hash,
                Allowed {
                    hash,
                    rule: task.rule_index,
                    entries: entries.iter().map(|e| Box::from(e.1)).collect(),
                },
                |a| a.hash,
            );
        }
        Ok(())
    }
}

impl Scope<'_> {
    /// `snapshot::may_hold` of a task with `id`, `rule` and `attributes`
    /// (all the verdict reads).
    fn verdict(
        &self,
        id: &[u8],
        rule: u32,
        attributes: std::collections::HashMap<String, api::AttributeValue>,
    ) -> Result<(), Rejection> {
        let task = api::Task {
            task_id: String::from_utf8_lossy(id).into_owned(),
            rule_index: rule,
            attributes,
            ..Default::default()
        };
        snapshot::may_hold(self.policy, self.source, self.region, &self.tags, &task)
            .map_err(Rejection::Residency)
    }

    fn not_owned(&self, id: &[u8]) -> Rejection {
        Rejection::Residency(format!(
            "task {} is not owned by {}",
            wire::truncate(&String::from_utf8_lossy(id), 80),
            self.source
        ))
    }
}

/// Residency verdicts of one format-2 body, per (rule, attribute set):
/// `rule_of[set]` is the rule the set was allowed under first (the common
/// case: one rule per set), `more` any other pair allowed.
struct Allowed2 {
    rule_of: Vec<u32>,
    more: hashbrown::HashSet<(u32, u32)>,
}

impl Allowed2 {
    const NONE: u32 = u32::MAX;

    fn new(sets: usize) -> Self {
        Self {
            rule_of: vec![Self::NONE; sets],
            more: hashbrown::HashSet::new(),
        }
    }

    #[inline]
    fn known(&self, rule: u32, set: u32) -> bool {
        match self.rule_of.get(set as usize) {
            Some(&r) if r == rule => true,
            Some(&r) if r == Self::NONE => false,
            _ => self.more.contains(&(rule, set)),
        }
    }

    fn remember(&mut self, rule: u32, set: u32) {
        match self.rule_of.get_mut(set as usize) {
            Some(r) if *r == Self::NONE => *r = rule,
            _ => {
                self.more.insert((rule, set));
            }
        }
    }
}

/// [`decode`] of a format-2 body: the whole body validated first
/// ([`columnar::Body::parse`]), then the header, then residency row by row
/// (the owner of every task; the policy once per distinct rule and
/// attribute set), in the order format 1 reports them.
fn decode_columnar(
    plain: Vec<u8>,
    header: Option<&api::SnapshotHeader>,
    scope: Option<&mut Scope<'_>>,
) -> Result<Restored, Rejection> {
    let body = columnar::Body::parse(&plain).map_err(|e| Rejection::Body(e.to_string()))?;
    if header.is_some_and(|h| {
        h.source_region != body.source_region
            || h.epoch != body.epoch
            || h.sequence != body.sequence
    }) {
        return Err(Rejection::Body(
            "body's source, epoch or sequence differs from the header".into(),
        ));
    }
    let mut allowed = scope.as_ref().map(|_| Allowed2::new(body.attrsets()));
    let mut place = |table: &columnar::Table<'_>, results: bool| {
        let mut out = Vec::with_capacity(table.len());
        for row in 0..table.len() {
            let id = table.id(row);
            if let (Some(scope), Some(allowed)) = (scope.as_deref(), allowed.as_mut()) {
                if !owned_by_bytes(id, scope.source) {
                    return Err(scope.not_owned(id));
                }
                let (rule, set) = (table.rule(row), table.attrset(row));
                if !allowed.known(rule, set) {
                    scope.verdict(id, rule, body.attributes(set))?;
                    allowed.remember(rule, set);
                }
            }
            out.push(Placed {
                hash: hash(id),
                task: At::Row {
                    results,
                    row: row as u32,
                },
                id: Span::of(&plain, id),
                key: Span::of(&plain, table.key(row)),
                version: table.version(row),
                state: table.state(row),
            });
        }
        Ok(out)
    };
    let tasks = place(&body.tasks, false)?;
    let results = place(&body.results, true)?;
    let (source_region, epoch, sequence, taken_unix_ms) = (
        body.source_region.to_string(),
        body.epoch,
        body.sequence,
        body.taken_unix_ms,
    );
    Ok(Restored {
        plain,
        source_region,
        epoch,
        sequence,
        taken_unix_ms,
        tasks,
        results,
    })
}

/// What `wire::owner_of(task_id) == Some(region)` says (`<uuid>.<region>`,
/// the uuid 36 bytes without a dot), by bytes.
fn owned_by(task_id: &str, region: &str) -> bool {
    owned_by_bytes(task_id.as_bytes(), region)
}

/// [`owned_by`] of an id's bytes.
fn owned_by_bytes(id: &[u8], region: &str) -> bool {
    !region.is_empty()
        && id.len() == 37 + region.len()
        && id[36] == b'.'
        && !id[..36].contains(&b'.')
        && id[37..] == *region.as_bytes()
}

/// Decodes a snapshot's plaintext for the copy: every task validated as
/// `SnapshotBody::decode` validates it; with `header`, the body's source,
/// epoch and sequence must be the header's; with `scope`, every task is
/// checked against residency.
pub fn decode(
    plain: Vec<u8>,
    header: Option<&api::SnapshotHeader>,
    mut scope: Option<&mut Scope<'_>>,
) -> Result<Restored, Rejection> {
    if u32::try_from(plain.len()).is_err() {
        return Err(Rejection::Body(format!(
            "{} bytes: a snapshot body is at most {} bytes",
            plain.len(),
            u32::MAX
        )));
    }
    if columnar::is_columnar(&plain) {
        return decode_columnar(plain, header, scope);
    }
    let (mut tasks, mut results) = (Vec::new(), Vec::new());
    // The first task (of `tasks`, of `results`) we may not hold: reported
    // only once the whole body decoded.
    let (mut refused_task, mut refused_result) = (None, None);
    let head = view::walk::<ViewError>(&plain, |list, task, rest| {
        if let Some(scope) = scope.as_deref_mut() {
            let refused = match list {
                List::Tasks => &mut refused_task,
                List::Results => &mut refused_result,
            };
            if refused.is_none() {
                if let Err(e) = scope.check(&task) {
                    *refused = Some(e);
                }
            }
        }
        let placed = Placed {
            hash: hash(task.task_id.as_bytes()),
            task: At::Bytes(Span::of(&plain, task.raw)),
            id: Span::of(&plain, task.task_id.as_bytes()),
            key: Span::of(&plain, task.idempotency_key.as_bytes()),
            version: task.version,
            state: task.state,
        };
        let out = match list {
            List::Tasks => &mut tasks,
            List::Results => &mut results,
        };
        if out.capacity() == 0 {
            out.reserve(view::room(&task, rest));
        }
        out.push(placed);
        Ok(())
    })
    .map_err(|e| Rejection::Body(e.to_string()))?;
    let (source_region, epoch, sequence, taken_unix_ms) = (
        head.source_region.to_string(),
        head.epoch,
        head.sequence,
        head.taken_unix_ms,
    );
    if header.is_some_and(|h| {
        h.source_region != source_region || h.epoch != epoch || h.sequence != sequence
    }) {
        return Err(Rejection::Body(
            "body's source, epoch or sequence differs from the header".into(),
        ));
    }
    if let Some(e) = refused_task.or(refused_result) {
        return Err(e);
    }
    Ok(Restored {
        plain,
        source_region,
        epoch,
        sequence,
        taken_unix_ms,
        tasks,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::snapshot::SnapshotBody;
    use proptest::prelude::*;
    use prost::Message as _;

    fn policy() -> Policy {
        Policy::load_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-data-class-gdpr.yaml"
        )))
        .expect("policy")
    }

    fn task(i: usize, owner: &str, rule: u32, customer: &str, class: &str) -> api::Task {
        api::Task {
            task_id: format!("{i:036}.{owner}"),
            rule_index: rule,
            attributes: federation_sandbox::string_attrs(&[
                ("customer_region", customer),
                ("data_class", class),
                ("account", &format!("a{}", i % 3)),
            ]),
            payload: vec![i as u8; i % 5],
            idempotency_key: if i % 2 == 0 {
                format!("k{i}")
            } else {
                String::new()
            },
            state: api::TaskState::Queued as i32,
            version: i as u64,
            ..Default::default()
        }
    }

    /// The receiver's residency check before tasks were read in place:
    /// every task of `tasks`, then of `results`, one by one.
    fn reference(policy: &Policy, body: &SnapshotBody) -> Result<(), Rejection> {
        let tags = policy
            .region("europe")
            .map(|r| r.tags.clone())
            .unwrap_or_default();
        for t in body.tasks.iter().chain(&body.results) {
            if wire::owner_of(&t.task_id) != Some("north_america") {
                return Err(Rejection::Residency(format!(
                    "task {} is not owned by north_america",
                    wire::truncate(&t.task_id, 80)
                )));
            }
            snapshot::may_hold(policy, "north_america", "europe", &tags, t)
                .map_err(Rejection::Residency)?;
        }
        Ok(())
    }

    fn decoded(policy: &Policy, body: &SnapshotBody) -> Result<Restored, Rejection> {
        let mut scope = Scope::new(policy, "north_america", "europe");
        decode(body.encode_to_vec(), None, Some(&mut scope))
    }

    fn decoded_columnar(policy: &Policy, body: &SnapshotBody) -> Result<Restored, Rejection> {
        let mut scope = Scope::new(policy, "north_america", "europe");
        decode(
            columnar::encode(body).expect("encode"),
            None,
            Some(&mut scope),
        )
    }

    #[test]
    fn a_format_1_and_a_format_2_snapshot_restore_identically() {
        use crate::replication::copy::HeldCopy;
        let mut tasks: Vec<api::Task> = (0..60)
            .map(|i| task(i, "north_america", 0, ["US", "CA"][i % 2], "pii"))
            .collect();
        tasks[3].state = api::TaskState::Leased as i32;
        tasks[3].agent_id = "agent-7".into();
        tasks[4].taken_over = Some(api::Takeover {
            from_region: "europe".into(),
            from_epoch: 2,
            to_region: "north_america".into(),
            at_unix_ms: 5,
        });
        let mut done = task(70, "north_america", 0, "US", "");
        done.state = api::TaskState::Succeeded as i32;
        let body = SnapshotBody {
            source_region: "north_america".into(),
            epoch: 4,
            sequence: 8,
            policy_hash: "h".into(),
            taken_unix_ms: 12,
            tasks,
            results: vec![done.clone()],
        };
        let p = policy();
        let (old, new) = (
            decoded(&p, &body).expect("format 1"),
            decoded_columnar(&p, &body).expect("format 2"),
        );
        assert_eq!(
            (
                old.source_region.as_str(),
                old.epoch,
                old.sequence,
                old.taken_unix_ms
            ),
            (
                new.source_region.as_str(),
                new.epoch,
                new.sequence,
                new.taken_unix_ms
            )
        );
        for (a, b) in [(&old.tasks, &new.tasks), (&old.results, &new.results)] {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b.iter()) {
                assert_eq!(task_at(&old.plain, x.task), task_at(&new.plain, y.task));
                assert_eq!(x.id.get(&old.plain), y.id.get(&new.plain));
                assert_eq!(x.key.get(&old.plain), y.key.get(&new.plain));
                assert_eq!((x.hash, x.version, x.state), (y.hash, y.version, y.state));
            }
        }
        let (mut a, mut b) = (HeldCopy::default(), HeldCopy::default());
        a.fold_snapshot(old);
        b.fold_snapshot(new);
        let sorted = |c: &HeldCopy| {
            let mut t = c.pending_tasks();
            t.sort_by(|x, y| x.task_id.cmp(&y.task_id));
            t
        };
        assert_eq!(sorted(&a).len(), 60);
        assert_eq!(sorted(&a), sorted(&b));
        assert_eq!(a.key("k2"), b.key("k2"));
        assert!(a.key("k2").is_some());
        assert_eq!(a.state_of(&done.task_id), b.state_of(&done.task_id));
    }

    #[test]
    fn each_task_is_placed_where_its_bytes_are() {
        let body = SnapshotBody {
            source_region: "north_america".into(),
            epoch: 2,
            sequence: 9,
            taken_unix_ms: 5,
            tasks: (0..40)
                .map(|i| task(i, "north_america", 0, "US", "pii"))
                .collect(),
            results: vec![task(99, "north_america", 0, "CA", "")],
            ..Default::default()
        };
        let r = decoded(&policy(), &body).expect("decodes");
        assert_eq!(
            (
                r.source_region.as_str(),
                r.epoch,
                r.sequence,
                r.taken_unix_ms
            ),
            ("north_america", 2, 9, 5)
        );
        assert_eq!((r.tasks(), r.results()), (40, 1));
        for (p, t) in r
            .tasks
            .iter()
            .chain(&r.results)
            .zip(body.tasks.iter().chain(&body.results))
        {
            assert_eq!(task_at(&r.plain, p.task).expect("task"), *t);
            assert_eq!(p.id.get(&r.plain), t.task_id.as_bytes());
            assert_eq!(p.key.get(&r.plain), t.idempotency_key.as_bytes());
            assert_eq!((p.version, p.state), (t.version, t.state));
            assert_eq!(p.hash, hash(t.task_id.as_bytes()));
        }
    }

    #[test]
    fn a_malformed_body_is_refused_before_a_task_we_may_not_hold() {
        let p = policy();
        // A task of asia_pacific's (not north_america's), then bytes that do
        // not decode: the body is malformed, as prost says.
        let mut plain = SnapshotBody {
            tasks: vec![task(1, "asia_pacific", 0, "US", "")],
            ..Default::default()
        }
        .encode_to_vec();
        plain.extend_from_slice(&[0x32, 0x05, 0x00]);
        let mut scope = Scope::new(&p, "north_america", "europe");
        assert!(matches!(
            decode(plain, None, Some(&mut scope)),
            Err(Rejection::Body(_))
        ));
        // A header the body disagrees with comes before residency, too.
        let body = SnapshotBody {
            source_region: "north_america".into(),
            sequence: 3,
            tasks: vec![task(1, "asia_pacific", 0, "US", "")],
            ..Default::default()
        };
        let header = api::SnapshotHeader {
            source_region: "north_america".into(),
            sequence: 4,
            ..Default::default()
        };
        let mut scope = Scope::new(&p, "north_america", "europe");
        let r = decode(body.encode_to_vec(), Some(&header), Some(&mut scope));
        assert!(
            matches!(r, Err(Rejection::Body(ref m)) if m.contains("differs from the header")),
            "{r:?}"
        );
    }

    /// What `accepts_exactly_what_prost_accepts` once found: a task's
    /// attribute entry keyed with wire type start-group instead of
    /// length-delimited. prost's map merge reads an entry as
    /// length-delimited whatever the key says, so the body decodes; ours
    /// refused it, and read the attributes back without that entry.
    #[test]
    fn a_map_entry_under_any_wire_type_is_read_as_prost_reads_it() {
        let plain = SnapshotBody {
            tasks: (0..8)
                .map(|i| task(i, "north_america", 0, "US", "pii"))
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        // The first task's first attribute entry: its key (field 2,
        // length-delimited) follows the task id.
        let id = format!("{:036}.north_america", 0);
        let at = plain
            .windows(id.len())
            .position(|w| w == id.as_bytes())
            .expect("the first task id")
            + id.len();
        assert_eq!(plain[at], 0x12, "field 2, length-delimited");
        for wire in [0u8, 1, 3, 4, 5] {
            let mut flipped = plain.clone();
            flipped[at] = 0x10 | wire;
            let prost = SnapshotBody::decode(flipped.as_slice()).expect("prost accepts it");
            let mut entries = Vec::new();
            view::walk::<ViewError>(&flipped, |_, t, _| {
                entries.push(t.attributes().count());
                Ok(())
            })
            .expect("the walk accepts it");
            let want: Vec<usize> = prost.tasks.iter().map(|t| t.attributes.len()).collect();
            assert_eq!(entries, want, "wire type {wire}: every entry read back");
            let ours = decode(flipped, None, None).expect("so do we");
            assert_eq!(ours.tasks(), prost.tasks.len());
            for (p, t) in ours.tasks.iter().zip(&prost.tasks) {
                assert_eq!(&task_at(&ours.plain, p.task).expect("task"), t);
            }
        }
    }

    proptest! {
        #[test]
        fn the_owner_by_bytes_is_what_owner_of_says(
            uuid in "[0-9a-f.-]{30,40}",
            region in "[a-z_.]{0,12}",
            source in prop_oneof![Just("north_america".to_string()), "[a-z_.]{0,12}"],
        ) {
            let id = format!("{uuid}.{region}");
            prop_assert_eq!(owned_by(&id, &source), wire::owner_of(&id) == Some(source.as_str()));
            let real = format!("{:036}.{source}", 7);
            prop_assert_eq!(owned_by(&real, &source), wire::owner_of(&real) == Some(source.as_str()));
        }
    }

    proptest! {
        #[test]
        fn residency_verdicts_are_the_per_task_checks(
            tasks in proptest::collection::vec(
                (0usize..50, 0..3usize, 0..3u32, 0..5usize, any::<bool>()),
                0..30,
            ),
            results in proptest::collection::vec(
                (0usize..50, 0..3usize, 0..3u32, 0..5usize, any::<bool>()),
                0..4,
            ),
        ) {
            let owners = ["north_america", "north_america", "asia_pacific"];
            let customers = ["US", "CA", "DE", "UK", "XX"];
            let make = |(i, o, rule, c, pii): (usize, usize, u32, usize, bool)| {
                task(i, owners[o], rule, customers[c], if pii { "pii" } else { "public" })
            };
            let body = SnapshotBody {
                tasks: tasks.into_iter().map(make).collect(),
                results: results.into_iter().map(make).collect(),
                ..Default::default()
            };
            let p = policy();
            let got = decoded(&p, &body).map(|r| (r.tasks(), r.results()));
            let want = reference(&p, &body).map(|()| (body.tasks.len(), body.results.len()));
            prop_assert_eq!(&got, &want);
            let columns = decoded_columnar(&p, &body).map(|r| (r.tasks(), r.results()));
            prop_assert_eq!(columns, want);
        }

        #[test]
        fn accepts_exactly_what_prost_accepts(
            cut in 0usize..3000,
            flips in proptest::collection::vec((0usize..3000, any::<u8>()), 0..4),
        ) {
            let mut plain = SnapshotBody {
                tasks: (0..8).map(|i| task(i, "north_america", 0, "US", "pii")).collect(),
                ..Default::default()
            }
            .encode_to_vec();
            for (at, x) in flips {
                let n = plain.len();
                plain[at % n] ^= x;
            }
            plain.truncate(cut.min(plain.len()));
            let prost = SnapshotBody::decode(plain.as_slice());
            let ours = decode(plain, None, None);
            prop_assert_eq!(ours.is_ok(), prost.is_ok(), "{:?}", ours.as_ref().err());
            if let (Ok(r), Ok(b)) = (ours, prost) {
                prop_assert_eq!(r.tasks(), b.tasks.len());
                for (p, t) in r.tasks.iter().zip(&b.tasks) {
                    prop_assert_eq!(&task_at(&r.plain, p.task).expect("task"), t);
                }
            }
        }
    }
}
