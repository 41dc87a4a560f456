//! Zero-copy decoding of a snapshot body: every task's fields read in place
//! from the decompressed plaintext, validated as prost validates them.
//!
//! [`BodyView::parse`] walks the whole body once: every field of every task
//! (attributes and their nested lists included) is checked for wire type,
//! length, UTF-8 and nesting depth with the rules and the recursion limit
//! (100) of prost's generated decoder, and unknown fields are skipped as
//! prost skips them (groups included). Nothing is allocated per task: a
//! [`TaskView`] holds borrowed strings and byte slices into the plaintext,
//! so a restore costs one pass over the bytes instead of a `String` per
//! string field and a `HashMap` per task. [`TaskView::to_task`] (and
//! [`BodyView::to_body`]) turn a view into the owned prost message by
//! decoding the task's own bytes with prost, so the owned form is exactly
//! what `SnapshotBody::decode` gives.
//!
//! The encoded layout is unchanged (it is `SnapshotBody`'s): snapshots
//! written by any version are read by this decoder, and bodies it accepts
//! are the bodies prost accepts (checked by a property test and the
//! `snapshot_envelope` fuzz target).

use federation_api as api;
use prost::Message as _;
use prost::encoding::WireType;

use super::snapshot::SnapshotBody;

/// prost's recursion limit for nested messages.
const RECURSION_LIMIT: u32 = 100;

/// Why a body did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot body: {0}")]
pub struct ViewError(String);

impl From<prost::DecodeError> for ViewError {
    fn from(e: prost::DecodeError) -> Self {
        Self(e.to_string())
    }
}

fn fail<T>(why: &str) -> Result<T, ViewError> {
    Err(ViewError(why.to_string()))
}

/// A cursor over a message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn done(&self) -> bool {
        self.buf.is_empty()
    }

    /// A field key, as `prost::encoding::decode_key` reads it.
    #[inline]
    fn key(&mut self) -> Result<(u32, WireType), ViewError> {
        let key = self.raw_varint()?;
        if key > u64::from(u32::MAX) {
            return fail("invalid key value");
        }
        let wire = match key & 7 {
            0 => WireType::Varint,
            1 => WireType::SixtyFourBit,
            2 => WireType::LengthDelimited,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::ThirtyTwoBit,
            _ => return fail("invalid wire type value"),
        };
        let tag = key as u32 >> 3;
        if tag == 0 {
            return fail("invalid tag value: 0");
        }
        Ok((tag, wire))
    }

    /// A varint, as `prost::encoding::decode_varint` reads it: at most ten
    /// bytes, the tenth at most 1.
    #[inline]
    fn raw_varint(&mut self) -> Result<u64, ViewError> {
        if let Some(&b) = self.buf.first() {
            if b < 0x80 {
                self.buf = &self.buf[1..];
                return Ok(u64::from(b));
            }
        }
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(i) else {
                return fail("invalid varint");
            };
            if i == 9 && b > 1 {
                return fail("invalid varint");
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        fail("invalid varint")
    }

    #[inline]
    fn varint(&mut self, wire: WireType) -> Result<u64, ViewError> {
        expect(wire, WireType::Varint)?;
        self.raw_varint()
    }

    fn fixed64(&mut self, wire: WireType) -> Result<u64, ViewError> {
        expect(wire, WireType::SixtyFourBit)?;
        let Some((head, rest)) = self.buf.split_first_chunk::<8>() else {
            return fail("buffer underflow");
        };
        self.buf = rest;
        Ok(u64::from_le_bytes(*head))
    }

    #[inline]
    fn bytes(&mut self, wire: WireType) -> Result<&'a [u8], ViewError> {
        expect(wire, WireType::LengthDelimited)?;
        let len = self.raw_varint()?;
        if len > self.buf.len() as u64 {
            return fail("buffer underflow");
        }
        let (head, rest) = self.buf.split_at(len as usize);
        self.buf = rest;
        Ok(head)
    }

    #[inline]
    fn str(&mut self, wire: WireType) -> Result<&'a str, ViewError> {
        std::str::from_utf8(self.bytes(wire)?)
            .map_err(|_| ViewError("invalid string value: data is not UTF-8 encoded".into()))
    }

    /// A nested message's bytes, entered at `depth` (the nesting budget
    /// left where the field is read).
    #[inline]
    fn message(&mut self, wire: WireType, depth: u32) -> Result<&'a [u8], ViewError> {
        expect(wire, WireType::LengthDelimited)?;
        if depth == 0 {
            return fail("recursion limit reached");
        }
        self.bytes(wire)
    }

    /// A map field's entry, entered at `depth`, read as prost reads one:
    /// length-delimited whatever the key's wire type says (prost's map
    /// merge does not check it).
    #[inline]
    fn map_entry(&mut self, depth: u32) -> Result<&'a [u8], ViewError> {
        if depth == 0 {
            return fail("recursion limit reached");
        }
        self.bytes(WireType::LengthDelimited)
    }

    /// Skips an unknown field as `prost::encoding::skip_field` does.
    fn skip(&mut self, wire: WireType, tag: u32, depth: u32) -> Result<(), ViewError> {
        if depth == 0 {
            return fail("recursion limit reached");
        }
        match wire {
            WireType::Varint => {
                self.raw_varint()?;
            }
            WireType::ThirtyTwoBit => self.advance(4)?,
            WireType::SixtyFourBit => self.advance(8)?,
            WireType::LengthDelimited => {
                self.bytes(wire)?;
            }
            WireType::StartGroup => loop {
                let (inner, inner_wire) = self.key()?;
                if inner_wire == WireType::EndGroup {
                    if inner != tag {
                        return fail("unexpected end group tag");
                    }
                    break;
                }
                self.skip(inner_wire, inner, depth - 1)?;
            },
            WireType::EndGroup => return fail("unexpected end group tag"),
        }
        Ok(())
    }

    fn advance(&mut self, n: usize) -> Result<(), ViewError> {
        if n > self.buf.len() {
            return fail("buffer underflow");
        }
        self.buf = &self.buf[n..];
        Ok(())
    }
}

#[inline]
fn expect(got: WireType, want: WireType) -> Result<(), ViewError> {
    if got == want {
        Ok(())
    } else {
        Err(ViewError(format!(
            "invalid wire type: {got:?} (expected {want:?})"
        )))
    }
}

/// A snapshot body read in place: the head's fields, and a view of every
/// task and result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BodyView<'a> {
    /// The region whose state this is.
    pub source_region: &'a str,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub sequence: u64,
    /// The source's policy hash.
    pub policy_hash: &'a str,
    /// When it was taken, ms since the Unix epoch.
    pub taken_unix_ms: i64,
    /// Queued and leased tasks.
    pub tasks: Vec<TaskView<'a>>,
    /// Recently finished tasks.
    pub results: Vec<TaskView<'a>>,
}

/// Which list of the body a task is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// `tasks`: queued and leased.
    Tasks,
    /// `results`: recently finished.
    Results,
}

/// The body's fields other than its tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Head<'a> {
    /// The region whose state this is.
    pub source_region: &'a str,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub sequence: u64,
    /// The source's policy hash.
    pub policy_hash: &'a str,
    /// When it was taken, ms since the Unix epoch.
    pub taken_unix_ms: i64,
}

/// Walks a whole body once, validating every field of every task as
/// [`BodyView::parse`] does, and hands each task to `f` (in wire order,
/// with the number of bytes of the body after it, see [`room`]) as soon as
/// it is validated; the first error (of the body or of `f`) ends the walk.
pub fn walk<'a, E: From<ViewError>>(
    plain: &'a [u8],
    mut f: impl FnMut(List, TaskView<'a>, usize) -> Result<(), E>,
) -> Result<Head<'a>, E> {
    let mut head = Head::default();
    let depth = RECURSION_LIMIT;
    let mut r = Reader::new(plain);
    while !r.done() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => head.source_region = r.str(wire)?,
            2 => head.epoch = r.varint(wire)?,
            3 => head.sequence = r.varint(wire)?,
            4 => head.policy_hash = r.str(wire)?,
            5 => head.taken_unix_ms = r.varint(wire)? as i64,
            6 | 7 => {
                let task = TaskView::parse(r.message(wire, depth)?, depth - 1)?;
                let list = if tag == 6 { List::Tasks } else { List::Results };
                f(list, task, r.buf.len())?;
            }
            _ => r.skip(wire, tag, depth)?,
        }
    }
    Ok(head)
}

/// Room to reserve for the tasks of a body, judging by its first (`task`,
/// `rest` bytes after it): as many as the rest could hold of ones alike in
/// size. Bounded: a body of empty tasks must not reserve more than a body
/// of real ones would.
pub fn room(task: &TaskView<'_>, rest: usize) -> usize {
    (rest / (task.raw.len() + 2) + 1).min(1 << 16)
}

impl<'a> BodyView<'a> {
    /// Decodes and validates the whole body (every field of every task);
    /// an error for anything `SnapshotBody::decode` refuses.
    pub fn parse(plain: &'a [u8]) -> Result<Self, ViewError> {
        let (mut tasks, mut results) = (Vec::new(), Vec::new());
        let head = walk::<ViewError>(plain, |list, task, rest| {
            if tasks.capacity() == 0 {
                tasks.reserve(room(&task, rest));
            }
            match list {
                List::Tasks => tasks.push(task),
                List::Results => results.push(task),
            }
            Ok(())
        })?;
        Ok(BodyView {
            source_region: head.source_region,
            epoch: head.epoch,
            sequence: head.sequence,
            policy_hash: head.policy_hash,
            taken_unix_ms: head.taken_unix_ms,
            tasks,
            results,
        })
    }

    /// The owned body, each task decoded by prost from its own bytes. A
    /// large body is decoded on up to [`MAX_THREADS`] threads, in slices of
    /// the task list, and put back in order.
    pub fn to_body(&self) -> Result<SnapshotBody, ViewError> {
        Ok(SnapshotBody {
            source_region: self.source_region.to_string(),
            epoch: self.epoch,
            sequence: self.sequence,
            policy_hash: self.policy_hash.to_string(),
            taken_unix_ms: self.taken_unix_ms,
            tasks: owned(&self.tasks)?,
            results: owned(&self.results)?,
        })
    }
}

/// Most threads [`BodyView::to_body`] decodes on.
pub const MAX_THREADS: usize = 4;

/// Fewest tasks per thread worth a thread of its own.
const TASKS_PER_THREAD: usize = 2048;

fn owned_on_this_thread(list: &[TaskView<'_>]) -> Result<Vec<api::Task>, ViewError> {
    list.iter().map(TaskView::to_task).collect()
}

fn owned(list: &[TaskView<'_>]) -> Result<Vec<api::Task>, ViewError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores
        .min(MAX_THREADS)
        .min(list.len() / TASKS_PER_THREAD)
        .max(1);
    if threads == 1 {
        return owned_on_this_thread(list);
    }
    let per = list.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut parts = list.chunks(per);
        let first = parts.next().unwrap_or_default();
        let spawned: Vec<_> = parts
            .map(|part| s.spawn(move || owned_on_this_thread(part)))
            .collect();
        let mut out = owned_on_this_thread(first)?;
        out.reserve(list.len() - out.len());
        for h in spawned {
            match h.join() {
                Ok(part) => out.extend(part?),
                Err(_) => return fail("a decoding thread panicked"),
            }
        }
        Ok(out)
    })
}

/// One task read in place. Scalar fields are decoded; strings and bytes
/// borrow the plaintext. A field repeated on the wire keeps its last value,
/// as prost's does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskView<'a> {
    /// The task's encoded bytes (what [`TaskView::to_task`] decodes).
    pub raw: &'a [u8],
    /// Federation-wide unique id.
    pub task_id: &'a str,
    /// The opaque payload.
    pub payload: &'a [u8],
    /// Client-chosen idempotency key, empty when none.
    pub idempotency_key: &'a str,
    /// Scheduling priority.
    pub priority: i32,
    /// The state (`api::TaskState` as an integer).
    pub state: i32,
    /// The region whose store owns the task.
    pub owner_region: &'a str,
    /// The routing rule that matched.
    pub rule_index: u32,
    /// How many times the task has been leased.
    pub attempts: u32,
    /// The agent holding the lease, empty when not leased.
    pub agent_id: &'a str,
    /// Lease deadline, ms since the Unix epoch.
    pub lease_deadline_unix_ms: i64,
    /// Captured output.
    pub result: &'a [u8],
    /// Why the task failed or was cancelled.
    pub error: &'a str,
    /// When the task was accepted.
    pub created_unix_ms: i64,
    /// When the state last changed.
    pub updated_unix_ms: i64,
    /// The encoded `Takeover`, when the field is present (the last one; the
    /// owned form merges repeated occurrences as prost does).
    pub taken_over: Option<&'a [u8]>,
    /// Version of the record.
    pub version: u64,
    /// W3C trace context.
    pub traceparent: &'a str,
    /// How many attribute entries the wire carries.
    pub attribute_entries: u32,
    /// The part of [`TaskView::raw`] from the first attribute entry to the
    /// end of the last (other fields between them included, when the
    /// sender interleaved them); empty when there is none.
    pub attribute_span: &'a [u8],
}

impl<'a> TaskView<'a> {
    /// Decodes one task's bytes with `depth` nesting left (99 inside a body).
    fn parse(raw: &'a [u8], depth: u32) -> Result<Self, ViewError> {
        let mut t = TaskView {
            raw,
            ..Default::default()
        };
        let mut r = Reader::new(raw);
        // Offsets in `raw` of the first entry and the end of the last.
        let (mut first, mut end) = (0, 0);
        while !r.done() {
            let at = raw.len() - r.buf.len();
            let (tag, wire) = r.key()?;
            match tag {
                1 => t.task_id = r.str(wire)?,
                2 => {
                    entry(r.map_entry(depth)?, depth - 1)?;
                    if t.attribute_entries == 0 {
                        first = at;
                    }
                    t.attribute_entries += 1;
                    end = raw.len() - r.buf.len();
                }
                3 => t.payload = r.bytes(wire)?,
                4 => t.idempotency_key = r.str(wire)?,
                5 => t.priority = r.varint(wire)? as i32,
                6 => t.state = r.varint(wire)? as i32,
                7 => t.owner_region = r.str(wire)?,
                8 => t.rule_index = r.varint(wire)? as u32,
                9 => t.attempts = r.varint(wire)? as u32,
                10 => t.agent_id = r.str(wire)?,
                11 => t.lease_deadline_unix_ms = r.varint(wire)? as i64,
                12 => t.result = r.bytes(wire)?,
                13 => t.error = r.str(wire)?,
                14 => t.created_unix_ms = r.varint(wire)? as i64,
                15 => t.updated_unix_ms = r.varint(wire)? as i64,
                16 => {
                    let m = r.message(wire, depth)?;
                    takeover(m, depth - 1)?;
                    t.taken_over = Some(m);
                }
                17 => t.version = r.varint(wire)?,
                18 => t.traceparent = r.str(wire)?,
                _ => r.skip(wire, tag, depth)?,
            }
        }
        t.attribute_span = &raw[first..end];
        Ok(t)
    }

    /// The state, `Unspecified` for a value this build does not know.
    pub fn state(&self) -> api::TaskState {
        api::TaskState::try_from(self.state).unwrap_or(api::TaskState::Unspecified)
    }

    /// The attributes in wire order, each key with its encoded
    /// `AttributeValue` (a later entry for the same key replaces an earlier
    /// one in the owned map).
    pub fn attributes(&self) -> impl Iterator<Item = (&'a str, AttributeView<'a>)> + 'a {
        let mut r = Reader::new(self.attribute_span);
        std::iter::from_fn(move || {
            // Validated by `parse`: an error here cannot happen, and ends
            // the iteration if it did.
            while !r.done() {
                let (tag, wire) = r.key().ok()?;
                if tag == 2 {
                    return entry_parts(r.map_entry(RECURSION_LIMIT).ok()?).ok();
                }
                r.skip(wire, tag, RECURSION_LIMIT).ok()?;
            }
            None
        })
    }

    /// The attribute entries in wire order, each its key and its whole
    /// encoded entry (what prost decodes it from).
    pub fn attribute_entries_raw(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let mut r = Reader::new(self.attribute_span);
        std::iter::from_fn(move || {
            // Validated by `parse`, as in `attributes`.
            while !r.done() {
                let (tag, wire) = r.key().ok()?;
                if tag == 2 {
                    let raw = r.map_entry(RECURSION_LIMIT).ok()?;
                    return entry_parts(raw).ok().map(|(key, _)| (key, raw));
                }
                r.skip(wire, tag, RECURSION_LIMIT).ok()?;
            }
            None
        })
    }

    /// [`TaskView::attribute_entries_raw`] with each key as bytes (UTF-8,
    /// validated by `parse`, not checked again).
    pub fn attribute_entries_bytes(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut r = Reader::new(self.attribute_span);
        std::iter::from_fn(move || {
            // Validated by `parse`, as in `attributes`.
            while !r.done() {
                let (tag, wire) = r.key().ok()?;
                if tag == 2 {
                    let raw = r.map_entry(RECURSION_LIMIT).ok()?;
                    return Some((entry_key(raw), raw));
                }
                r.skip(wire, tag, RECURSION_LIMIT).ok()?;
            }
            None
        })
    }

    /// The owned task, decoded by prost from [`TaskView::raw`].
    pub fn to_task(&self) -> Result<api::Task, ViewError> {
        Ok(api::Task::decode(self.raw)?)
    }
}

/// One attribute value read in place.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttributeView<'a> {
    /// The encoded `AttributeValue`.
    pub raw: &'a [u8],
}

impl<'a> AttributeView<'a> {
    /// The value when it is a string (the last `oneof` member on the wire
    /// wins, as in prost).
    pub fn as_str(&self) -> Option<&'a str> {
        let mut r = Reader::new(self.raw);
        let mut last = None;
        while !r.done() {
            let (tag, wire) = r.key().ok()?;
            match tag {
                1 => last = Some(r.str(wire).ok()?),
                2 | 4 => {
                    r.varint(wire).ok()?;
                    last = None;
                }
                3 => {
                    r.fixed64(wire).ok()?;
                    last = None;
                }
                5 => {
                    r.bytes(wire).ok()?;
                    last = None;
                }
                _ => r.skip(wire, tag, RECURSION_LIMIT).ok()?,
            }
        }
        last
    }

    /// The owned value.
    pub fn to_value(&self) -> Result<api::AttributeValue, ViewError> {
        Ok(api::AttributeValue::decode(self.raw)?)
    }
}

/// Validates one map entry (`depth` left inside it).
fn entry(raw: &[u8], depth: u32) -> Result<(), ViewError> {
    let mut r = Reader::new(raw);
    while !r.done() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => {
                r.str(wire)?;
            }
            2 => attribute_value(r.message(wire, depth)?, depth - 1)?,
            _ => r.skip(wire, tag, depth)?,
        }
    }
    Ok(())
}

/// An entry's key and value (already validated).
fn entry_parts(raw: &[u8]) -> Result<(&str, AttributeView<'_>), ViewError> {
    let mut r = Reader::new(raw);
    let (mut key, mut value) = ("", AttributeView::default());
    while !r.done() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => key = r.str(wire)?,
            2 => {
                value = AttributeView {
                    raw: r.bytes(wire)?,
                }
            }
            _ => r.skip(wire, tag, RECURSION_LIMIT)?,
        }
    }
    Ok((key, value))
}

/// A validated entry's key (the last on the wire, as prost keeps it).
fn entry_key(raw: &[u8]) -> &[u8] {
    let mut r = Reader::new(raw);
    let mut key: &[u8] = &[];
    while !r.done() {
        let Ok((tag, wire)) = r.key() else { break };
        let read = match tag {
            1 => r.bytes(wire).map(|k| key = k),
            _ => r.skip(wire, tag, RECURSION_LIMIT),
        };
        if read.is_err() {
            break;
        }
    }
    key
}

/// Validates an `AttributeValue` (`depth` left inside it).
fn attribute_value(raw: &[u8], depth: u32) -> Result<(), ViewError> {
    let mut r = Reader::new(raw);
    while !r.done() {
        let (tag, wire) = r.key()?;
        match tag {
            1 => {
                r.str(wire)?;
            }
            2 | 4 => {
                r.varint(wire)?;
            }
            3 => {
                r.fixed64(wire)?;
            }
            5 => {
                let list = r.message(wire, depth)?;
                let mut l = Reader::new(list);
                let inner = depth - 1;
                while !l.done() {
                    let (tag, wire) = l.key()?;
                    match tag {
                        1 => attribute_value(l.message(wire, inner)?, inner - 1)?,
                        _ => l.skip(wire, tag, inner)?,
                    }
                }
            }
            _ => r.skip(wire, tag, depth)?,
        }
    }
    Ok(())
}

/// Validates a `Takeover` (`depth` left inside it).
fn takeover(raw: &[u8], depth: u32) -> Result<(), ViewError> {
    let mut r = Reader::new(raw);
    while !r.done() {
        let (tag, wire) = r.key()?;
        match tag {
            1 | 3 => {
                r.str(wire)?;
            }
            2 | 4 => {
                r.varint(wire)?;
            }
            _ => r.skip(wire, tag, depth)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task(i: u64) -> api::Task {
        api::Task {
            task_id: format!("{i}.north_america"),
            attributes: federation_sandbox::string_attrs(&[
                ("customer_region", "DE"),
                ("data_class", "pii"),
            ]),
            payload: format!("{{\"n\":{i}}}").into_bytes(),
            idempotency_key: if i % 2 == 0 {
                format!("k{i}")
            } else {
                String::new()
            },
            priority: -3,
            state: api::TaskState::Leased as i32,
            owner_region: "north_america".into(),
            rule_index: 7,
            attempts: 2,
            agent_id: "agent-1".into(),
            lease_deadline_unix_ms: -5,
            result: b"out".to_vec(),
            error: "e".into(),
            created_unix_ms: 1_700_000_000_000,
            updated_unix_ms: 1_700_000_000_001,
            taken_over: (i % 3 == 0).then(|| api::Takeover {
                from_region: "europe".into(),
                from_epoch: 4,
                to_region: "north_america".into(),
                at_unix_ms: 9,
            }),
            version: u64::MAX - i,
            traceparent: "00-aa-bb-01".into(),
        }
    }

    fn body(n: u64) -> SnapshotBody {
        SnapshotBody {
            source_region: "north_america".into(),
            epoch: 3,
            sequence: 11,
            policy_hash: "ab".repeat(32),
            taken_unix_ms: 1_700_000_000_002,
            tasks: (0..n).map(task).collect(),
            results: (n..n + 2).map(task).collect(),
        }
    }

    fn assert_same(v: &TaskView<'_>, t: &api::Task) {
        assert_eq!(v.task_id, t.task_id);
        assert_eq!(v.payload, t.payload.as_slice());
        assert_eq!(v.idempotency_key, t.idempotency_key);
        assert_eq!(
            (v.priority, v.state, v.rule_index, v.attempts),
            (t.priority, t.state, t.rule_index, t.attempts)
        );
        assert_eq!(v.owner_region, t.owner_region);
        assert_eq!(v.agent_id, t.agent_id);
        assert_eq!(v.lease_deadline_unix_ms, t.lease_deadline_unix_ms);
        assert_eq!(v.result, t.result.as_slice());
        assert_eq!(v.error, t.error);
        assert_eq!(
            (v.created_unix_ms, v.updated_unix_ms, v.version),
            (t.created_unix_ms, t.updated_unix_ms, t.version)
        );
        assert_eq!(v.traceparent, t.traceparent);
        assert_eq!(v.taken_over.is_some(), t.taken_over.is_some());
        let attrs: std::collections::HashMap<String, api::AttributeValue> = v
            .attributes()
            .map(|(k, a)| (k.to_string(), a.to_value().expect("value")))
            .collect();
        assert_eq!(attrs, t.attributes);
        for (k, a) in v.attributes() {
            let want = match &t.attributes[k].kind {
                Some(api::attribute_value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            };
            assert_eq!(a.as_str(), want);
        }
    }

    #[test]
    fn every_field_reads_in_place_and_the_owned_body_is_prosts() {
        let b = body(20);
        let plain = b.encode_to_vec();
        let v = BodyView::parse(&plain).expect("parse");
        assert_eq!(v.source_region, b.source_region);
        assert_eq!((v.epoch, v.sequence), (b.epoch, b.sequence));
        assert_eq!(v.policy_hash, b.policy_hash);
        assert_eq!(v.taken_unix_ms, b.taken_unix_ms);
        assert_eq!((v.tasks.len(), v.results.len()), (20, 2));
        for (view, t) in v
            .tasks
            .iter()
            .chain(&v.results)
            .zip(b.tasks.iter().chain(&b.results))
        {
            assert_same(view, t);
        }
        assert_eq!(v.to_body().expect("owned"), b);
        assert_eq!(v.tasks[0].state(), api::TaskState::Leased);
    }

    #[test]
    fn varints_and_keys_at_their_limits_are_read_as_prost_reads_them() {
        let ten = |last: u8| {
            let mut v = vec![0x10];
            v.extend([0xff; 9]);
            v.push(last);
            v
        };
        let cases: Vec<Vec<u8>> = vec![
            ten(1),
            ten(0),
            ten(2),
            vec![0x10, 0x80],
            vec![
                0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
            ],
            vec![0x00],
            vec![0x80, 0x80, 0x80, 0x80, 0x10, 0x00],
            vec![0xf8, 0xff, 0xff, 0xff, 0x0f, 0x00],
            vec![0x0e],
            vec![0x12, 0x01, 0x00],
            vec![0x32, 0x02, 0x40, 0x01],
        ];
        for c in &cases {
            let prost = SnapshotBody::decode(c.as_slice());
            let view = BodyView::parse(c);
            assert_eq!(view.is_ok(), prost.is_ok(), "{c:02x?}: {view:?}");
            if let (Ok(v), Ok(p)) = (view, prost) {
                assert_eq!(v.to_body().expect("owned"), p);
                assert_eq!(v.epoch, p.epoch);
            }
        }
        assert_eq!(BodyView::parse(&ten(1)).expect("ok").epoch, u64::MAX);
    }

    #[test]
    fn a_large_body_decoded_on_several_threads_keeps_its_order() {
        let b = body(3 * TASKS_PER_THREAD as u64);
        let plain = b.encode_to_vec();
        let v = BodyView::parse(&plain).expect("parse");
        assert_eq!(v.to_body().expect("owned"), b);
    }

    #[test]
    fn a_body_streamed_by_encode_into_reads_the_same() {
        // What a controller of any version writes: the streamed encoding of
        // `SnapshotBody` (the only layout there is), sealed and opened.
        use crate::replication::envelope::{self, Limits, NonceSource, Pipeline, SealParams};
        use crate::replication::{Key, KeyRing, seal_snapshot};
        let b = body(300);
        let key = Key::new("k", [1; 32]);
        let params = SealParams {
            source: "north_america".into(),
            epoch: 3,
            sequence: 11,
            rule_indexes: vec![7],
            policy_hash: b.policy_hash.clone(),
            compression: Some(3),
            chunk_size: 4096,
        };
        let sealed = seal_snapshot(
            &b,
            crate::replication::BodyFormat::Prost,
            &params,
            &key,
            &NonceSource::new(),
            Pipeline::On,
        )
        .expect("seal");
        let ring = KeyRing::from_keys(vec![key], None);
        let (_, plain) = envelope::open(&sealed, &ring, &Limits::default()).expect("open");
        let v = BodyView::parse(&plain).expect("parse");
        assert_eq!(v.to_body().expect("owned"), b);
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped_like_prost() {
        let mut plain = body(1).encode_to_vec();
        // Unknown varint (field 40), fixed32 (41), group 42 holding a varint.
        plain.extend_from_slice(&[0xc0, 0x02, 0x05, 0xcd, 0x02, 1, 2, 3, 4]);
        plain.extend_from_slice(&[0xd3, 0x02, 0x08, 0x01, 0xd4, 0x02]);
        SnapshotBody::decode(plain.as_slice()).expect("prost accepts");
        let v = BodyView::parse(&plain).expect("parse");
        assert_eq!(v.to_body().expect("owned"), body(1));
        // A group closed by another tag: both refuse.
        let mut bad = body(1).encode_to_vec();
        bad.extend_from_slice(&[0xd3, 0x02, 0xdc, 0x02]);
        assert!(SnapshotBody::decode(bad.as_slice()).is_err());
        assert!(BodyView::parse(&bad).is_err());
    }

    #[test]
    fn nesting_beyond_prosts_limit_is_refused_as_prost_refuses_it() {
        // An attribute holding lists nested `levels` deep.
        let nested = |levels: usize| {
            let mut v = api::AttributeValue {
                kind: Some(api::attribute_value::Kind::IntValue(1)),
            };
            for _ in 0..levels {
                v = api::AttributeValue {
                    kind: Some(api::attribute_value::Kind::ListValue(api::AttributeList {
                        values: vec![v],
                    })),
                };
            }
            let mut t = task(1);
            t.attributes.insert("deep".into(), v);
            SnapshotBody {
                tasks: vec![t],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let mut seen = (false, false);
        for levels in 40..60 {
            let plain = nested(levels);
            let prost_ok = SnapshotBody::decode(plain.as_slice()).is_ok();
            assert_eq!(BodyView::parse(&plain).is_ok(), prost_ok, "{levels} levels");
            if prost_ok {
                seen.0 = true;
            } else {
                seen.1 = true;
            }
        }
        assert_eq!(seen, (true, true), "the limit lies inside the range tried");
    }

    proptest! {
        #[test]
        fn accepts_exactly_what_prost_accepts(
            cut in 0usize..4000,
            flips in proptest::collection::vec((0usize..4000, any::<u8>()), 0..4),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut plain = body(6).encode_to_vec();
            for (at, x) in flips {
                let n = plain.len();
                plain[at % n] ^= x;
            }
            plain.truncate(cut.min(plain.len()));
            plain.extend_from_slice(&junk);
            let prost = SnapshotBody::decode(plain.as_slice());
            let view = BodyView::parse(&plain);
            prop_assert_eq!(view.is_ok(), prost.is_ok(), "{:?}", view.as_ref().err());
            if let (Ok(v), Ok(p)) = (view, prost) {
                prop_assert_eq!(v.to_body().expect("owned"), p);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree_with_prost(
            data in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let view = BodyView::parse(&data);
            prop_assert_eq!(view.is_ok(), SnapshotBody::decode(data.as_slice()).is_ok());
        }
    }
}
