//! The columnar snapshot body (format 2): its byte layout, its encoder, and
//! a reader that validates a whole body in one pass and then reads any row
//! in place. Owns the layout only: no policy, no residency, no keys.
//!
//! Format 1 is the prost message `SnapshotBody` (`snapshot.rs`, read by
//! `view.rs`). Format 2 holds the same information as columns, so that a
//! receiver validates a body by checking lengths and indexes and running
//! one UTF-8 check per text column, with no per-field work per task, and
//! checks residency once per distinct (rule, attribute set) rather than
//! once per task.
//!
//! # Layout
//!
//! All integers are little-endian and fixed-width. A *section* is a `u32`
//! byte length followed by that many bytes. A *var column* of `n` rows is
//! two sections: `n` `u32` end offsets (non-decreasing, the last equal to
//! the heap's length), then the heap; row `i` is `heap[end(i-1)..end(i)]`.
//! A *text* var column's heap is UTF-8 and every end offset is a character
//! boundary, so every row is UTF-8.
//!
//! ```text
//! body     = MAGIC (00 'F' 'C' 02)
//!            section source_region (text)  u64 epoch  u64 sequence
//!            section policy_hash (text)    i64 taken_unix_ms
//!            dict words       (text: owner regions and agent ids)
//!            dict attrsets    (each: the prost encoding of a task's
//!                              `attributes` field, entries in key order)
//!            table tasks  table results
//! dict     = u32 count, var column of count rows
//! table    = u32 n, then its columns of n rows, in this order:
//!            var text  task_id, idempotency_key
//!            var bytes payload, result
//!            var text  error, traceparent
//!            var bytes taken_over (prost `Takeover`; empty when absent)
//!            u8  flags (bit 0: taken_over present; other bits zero)
//!            i32 priority, i32 state, u32 rule_index, u32 attempts
//!            u32 owner_region (index in words), u32 agent_id (words)
//!            u32 attributes (index in attrsets)
//!            i64 lease_deadline_unix_ms, i64 created_unix_ms,
//!            i64 updated_unix_ms, u64 version
//! ```
//!
//! Nothing may follow the results table. The first byte, 0, is one no
//! prost message starts with (field number 0 is invalid), so a receiver
//! that reads only format 1 refuses a format-2 body ("invalid tag value:
//! 0") rather than misreading it; the fourth byte is the format number.
//! Which format a sender uses for a peer is the sender's choice from the
//! peer's advertisement (`snapshot_formats`, see `snapshot::BodyFormat`).

use std::collections::HashMap;

use federation_api as api;
use prost::Message as _;
use prost::encoding::{self as pe, WireType};

use super::envelope::{EnvelopeError, Sink};
use super::snapshot::{BodyFormat, SnapshotBody};

/// The first bytes of a format-2 body.
pub const MAGIC: [u8; 4] = [0x00, b'F', b'C', 0x02];

/// Rows written between two [`Sink::flush_if_full`] calls.
const ROWS_PER_FLUSH: usize = 512;

/// True when `plain` is not a format-1 (prost) body: it starts with 0,
/// which no prost message does. Whether it is a valid format-2 body is
/// [`Body::parse`]'s to say.
pub fn is_columnar(plain: &[u8]) -> bool {
    plain.first() == Some(&0)
}

/// The format of a plaintext body.
pub fn format_of(plain: &[u8]) -> BodyFormat {
    if is_columnar(plain) {
        BodyFormat::Columnar
    } else {
        BodyFormat::Prost
    }
}

/// Serializes `body` into `sink` in `format`.
pub fn encode_as(
    body: &SnapshotBody,
    format: BodyFormat,
    sink: &mut Sink,
) -> Result<(), EnvelopeError> {
    match format {
        BodyFormat::Prost => body.encode_into(sink),
        BodyFormat::Columnar => encode_into(body, sink),
    }
}

/// Decodes a plaintext body of either format, fully validated.
pub fn decode_any(plain: &[u8]) -> Result<SnapshotBody, String> {
    match format_of(plain) {
        BodyFormat::Prost => SnapshotBody::decode(plain).map_err(|e| e.to_string()),
        BodyFormat::Columnar => Body::parse(plain)
            .map(|b| b.to_body())
            .map_err(|e| e.to_string()),
    }
}

/// Why a columnar body did not decode: what, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("columnar snapshot body: {0}")]
pub struct FormatError(String);

fn bad<T>(why: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(why.into()))
}

// ---------------------------------------------------------------- writing

/// Where the encoder writes: a [`Sink`] (flushed at row boundaries) or a
/// plain buffer.
trait Out {
    fn buf(&mut self) -> &mut Vec<u8>;
    fn boundary(&mut self) -> Result<(), EnvelopeError>;
}

impl Out for Sink {
    fn buf(&mut self) -> &mut Vec<u8> {
        Sink::buf(self)
    }
    fn boundary(&mut self) -> Result<(), EnvelopeError> {
        self.flush_if_full()
    }
}

impl Out for Vec<u8> {
    fn buf(&mut self) -> &mut Vec<u8> {
        self
    }
    fn boundary(&mut self) -> Result<(), EnvelopeError> {
        Ok(())
    }
}

fn too_big(what: &str) -> EnvelopeError {
    EnvelopeError::Invalid(format!(
        "columnar snapshot body: {what} exceeds {} bytes",
        u32::MAX
    ))
}

fn len_u32(n: usize, what: &str) -> Result<u32, EnvelopeError> {
    u32::try_from(n).map_err(|_| too_big(what))
}

fn put_section(out: &mut impl Out, bytes: &[u8], what: &str) -> Result<(), EnvelopeError> {
    let len = len_u32(bytes.len(), what)?;
    out.buf().extend_from_slice(&len.to_le_bytes());
    out.buf().extend_from_slice(bytes);
    out.boundary()
}

/// A var column of `rows` (each row's bytes from `get`).
fn put_var<'r>(
    out: &mut impl Out,
    n: usize,
    get: impl Fn(usize) -> &'r [u8],
    what: &str,
) -> Result<(), EnvelopeError> {
    out.buf()
        .extend_from_slice(&len_u32(n.saturating_mul(4), what)?.to_le_bytes());
    let mut end: u64 = 0;
    for i in 0..n {
        end += get(i).len() as u64;
        let e = u32::try_from(end).map_err(|_| too_big(what))?;
        out.buf().extend_from_slice(&e.to_le_bytes());
        if i % ROWS_PER_FLUSH == ROWS_PER_FLUSH - 1 {
            out.boundary()?;
        }
    }
    out.buf()
        .extend_from_slice(&len_u32(end as usize, what)?.to_le_bytes());
    for i in 0..n {
        out.buf().extend_from_slice(get(i));
        if i % ROWS_PER_FLUSH == ROWS_PER_FLUSH - 1 {
            out.boundary()?;
        }
    }
    out.boundary()
}

/// A fixed-width column of `n` rows of `W` bytes.
fn put_fixed<const W: usize>(
    out: &mut impl Out,
    n: usize,
    get: impl Fn(usize) -> [u8; W],
    what: &str,
) -> Result<(), EnvelopeError> {
    out.buf()
        .extend_from_slice(&len_u32(n.saturating_mul(W), what)?.to_le_bytes());
    for i in 0..n {
        out.buf().extend_from_slice(&get(i));
        if i % ROWS_PER_FLUSH == ROWS_PER_FLUSH - 1 {
            out.boundary()?;
        }
    }
    out.boundary()
}

/// A task's `attributes` as prost encodes field 2 of `Task`, entries in key
/// order (so equal maps give equal bytes).
fn encode_attributes(attrs: &HashMap<String, api::AttributeValue>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &api::AttributeValue)> = attrs.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (k, v) in entries {
        let len = pe::string::encoded_len(1, k) + pe::message::encoded_len(2, v);
        pe::encode_key(2, WireType::LengthDelimited, out);
        pe::encode_varint(len as u64, out);
        pe::string::encode(1, k, out);
        pe::message::encode(2, v, out);
    }
}

/// Dictionary indexes of one table's rows.
struct Indexed {
    owner: Vec<u32>,
    agent: Vec<u32>,
    attrs: Vec<u32>,
}

/// Distinct words and attribute sets, in order of first use.
#[derive(Default)]
struct Dicts<'b> {
    words: Vec<&'b str>,
    word_index: HashMap<&'b str, u32>,
    attrsets: Vec<Vec<u8>>,
    attrset_index: HashMap<Vec<u8>, u32>,
    scratch: Vec<u8>,
}

impl<'b> Dicts<'b> {
    fn word(&mut self, w: &'b str) -> u32 {
        if let Some(&i) = self.word_index.get(w) {
            return i;
        }
        let i = self.words.len() as u32;
        self.words.push(w);
        self.word_index.insert(w, i);
        i
    }

    fn attrset(&mut self, attrs: &HashMap<String, api::AttributeValue>) -> u32 {
        self.scratch.clear();
        encode_attributes(attrs, &mut self.scratch);
        if let Some(&i) = self.attrset_index.get(self.scratch.as_slice()) {
            return i;
        }
        let i = self.attrsets.len() as u32;
        self.attrsets.push(self.scratch.clone());
        self.attrset_index.insert(self.scratch.clone(), i);
        i
    }

    fn index(&mut self, rows: &'b [api::Task]) -> Indexed {
        let mut ix = Indexed {
            owner: Vec::with_capacity(rows.len()),
            agent: Vec::with_capacity(rows.len()),
            attrs: Vec::with_capacity(rows.len()),
        };
        for t in rows {
            ix.owner.push(self.word(&t.owner_region));
            ix.agent.push(self.word(&t.agent_id));
            ix.attrs.push(self.attrset(&t.attributes));
        }
        ix
    }
}

/// Writes `body` in format 2 into `sink`, column by column (the sink is
/// flushed every few hundred rows, so compression overlaps encoding).
pub fn encode_into(body: &SnapshotBody, sink: &mut Sink) -> Result<(), EnvelopeError> {
    write(body, sink)
}

/// `body` in format 2.
pub fn encode(body: &SnapshotBody) -> Result<Vec<u8>, EnvelopeError> {
    let mut out = Vec::new();
    write(body, &mut out)?;
    Ok(out)
}

fn write(body: &SnapshotBody, out: &mut impl Out) -> Result<(), EnvelopeError> {
    let mut dicts = Dicts::default();
    let tasks = dicts.index(&body.tasks);
    let results = dicts.index(&body.results);
    out.buf().extend_from_slice(&MAGIC);
    put_section(out, body.source_region.as_bytes(), "source_region")?;
    out.buf().extend_from_slice(&body.epoch.to_le_bytes());
    out.buf().extend_from_slice(&body.sequence.to_le_bytes());
    put_section(out, body.policy_hash.as_bytes(), "policy_hash")?;
    out.buf()
        .extend_from_slice(&body.taken_unix_ms.to_le_bytes());
    let words = &dicts.words;
    out.buf()
        .extend_from_slice(&len_u32(words.len(), "words")?.to_le_bytes());
    put_var(out, words.len(), |i| words[i].as_bytes(), "words")?;
    let sets = &dicts.attrsets;
    out.buf()
        .extend_from_slice(&len_u32(sets.len(), "attrsets")?.to_le_bytes());
    put_var(out, sets.len(), |i| sets[i].as_slice(), "attrsets")?;
    write_table(out, &body.tasks, &tasks)?;
    write_table(out, &body.results, &results)
}

fn write_table(out: &mut impl Out, rows: &[api::Task], ix: &Indexed) -> Result<(), EnvelopeError> {
    let n = rows.len();
    out.buf()
        .extend_from_slice(&len_u32(n, "table")?.to_le_bytes());
    put_var(out, n, |i| rows[i].task_id.as_bytes(), "task_id")?;
    put_var(out, n, |i| rows[i].idempotency_key.as_bytes(), "key")?;
    put_var(out, n, |i| rows[i].payload.as_slice(), "payload")?;
    put_var(out, n, |i| rows[i].result.as_slice(), "result")?;
    put_var(out, n, |i| rows[i].error.as_bytes(), "error")?;
    put_var(out, n, |i| rows[i].traceparent.as_bytes(), "traceparent")?;
    let takeovers: Vec<Vec<u8>> = rows
        .iter()
        .map(|t| {
            t.taken_over
                .as_ref()
                .map(|x| x.encode_to_vec())
                .unwrap_or_default()
        })
        .collect();
    put_var(out, n, |i| takeovers[i].as_slice(), "taken_over")?;
    put_fixed::<1>(
        out,
        n,
        |i| [u8::from(rows[i].taken_over.is_some())],
        "flags",
    )?;
    put_fixed(out, n, |i| rows[i].priority.to_le_bytes(), "priority")?;
    put_fixed(out, n, |i| rows[i].state.to_le_bytes(), "state")?;
    put_fixed(out, n, |i| rows[i].rule_index.to_le_bytes(), "rule_index")?;
    put_fixed(out, n, |i| rows[i].attempts.to_le_bytes(), "attempts")?;
    put_fixed(out, n, |i| ix.owner[i].to_le_bytes(), "owner_region")?;
    put_fixed(out, n, |i| ix.agent[i].to_le_bytes(), "agent_id")?;
    put_fixed(out, n, |i| ix.attrs[i].to_le_bytes(), "attributes")?;
    put_fixed(
        out,
        n,
        |i| rows[i].lease_deadline_unix_ms.to_le_bytes(),
        "lease_deadline",
    )?;
    put_fixed(out, n, |i| rows[i].created_unix_ms.to_le_bytes(), "created")?;
    put_fixed(out, n, |i| rows[i].updated_unix_ms.to_le_bytes(), "updated")?;
    put_fixed(out, n, |i| rows[i].version.to_le_bytes(), "version")
}

// ---------------------------------------------------------------- reading

/// A cursor over the body, naming what it reads and where in errors.
struct Cur<'a> {
    plain: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let left = self.plain.len() - self.at;
        if n > left {
            return bad(format!(
                "{what}: {n} bytes at offset {}, only {left} left",
                self.at
            ));
        }
        let part = &self.plain[self.at..self.at + n];
        self.at += n;
        Ok(part)
    }

    fn fixed<const W: usize>(&mut self, what: &str) -> Result<[u8; W], FormatError> {
        let b = self.take(W, what)?;
        let mut out = [0; W];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        self.fixed::<4>(what).map(u32::from_le_bytes)
    }

    fn section(&mut self, what: &str) -> Result<&'a [u8], FormatError> {
        let len = self.u32(what)?;
        self.take(len as usize, what)
    }

    fn text(&mut self, what: &str) -> Result<&'a str, FormatError> {
        let at = self.at;
        std::str::from_utf8(self.section(what)?)
            .map_err(|_| FormatError(format!("{what} at offset {at}: not UTF-8")))
    }

    /// A var column of `n` rows (sizes checked, contents not).
    fn var(&mut self, n: usize, what: &str) -> Result<Var<'a>, FormatError> {
        let at = self.at;
        let ends = self.section(what)?;
        if ends.len() as u64 != n as u64 * 4 {
            return bad(format!(
                "{what} at offset {at}: {} bytes of offsets for {n} rows",
                ends.len()
            ));
        }
        let heap = self.section(what)?;
        Ok(Var { ends, heap })
    }

    /// A fixed-width column of `n` rows.
    fn column<const W: usize>(
        &mut self,
        n: usize,
        what: &str,
    ) -> Result<Fixed<'a, W>, FormatError> {
        let at = self.at;
        let bytes = self.section(what)?;
        if bytes.len() as u64 != n as u64 * W as u64 {
            return bad(format!(
                "{what} at offset {at}: {} bytes for {n} rows of {W}",
                bytes.len()
            ));
        }
        Ok(Fixed(bytes))
    }
}

/// A var column read in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Var<'a> {
    ends: &'a [u8],
    heap: &'a [u8],
}

impl<'a> Var<'a> {
    fn rows(&self) -> usize {
        self.ends.len() / 4
    }

    fn end(&self, i: usize) -> usize {
        self.ends
            .get(i * 4..i * 4 + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// Row `i` (empty when out of range, or in a body not validated).
    pub fn get(&self, i: usize) -> &'a [u8] {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        self.heap.get(start..self.end(i)).unwrap_or_default()
    }

    /// Row `i` as text (validated by [`Body::parse`]; lossy otherwise).
    fn text(&self, i: usize) -> String {
        String::from_utf8_lossy(self.get(i)).into_owned()
    }

    /// Offsets non-decreasing and ending at the heap's end; with `text`,
    /// the heap UTF-8 and every offset a character boundary.
    fn validate(&self, text: bool, what: &str) -> Result<(), FormatError> {
        let mut prev = 0u32;
        for (i, e) in self.ends.chunks_exact(4).enumerate() {
            let e = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            if e < prev || e as usize > self.heap.len() {
                return bad(format!(
                    "{what}: row {i} ends at {e}, after {prev}, in a heap of {} bytes",
                    self.heap.len()
                ));
            }
            // A continuation byte (0b10xx_xxxx) is no character boundary.
            if text
                && self
                    .heap
                    .get(e as usize)
                    .is_some_and(|&b| (b as i8) < -0x40)
            {
                return bad(format!("{what}: row {i} ends inside a character"));
            }
            prev = e;
        }
        if prev as usize != self.heap.len() {
            return bad(format!(
                "{what}: rows end at {prev}, the heap has {} bytes",
                self.heap.len()
            ));
        }
        if text && std::str::from_utf8(self.heap).is_err() {
            return bad(format!("{what}: not UTF-8"));
        }
        Ok(())
    }
}

/// A fixed-width column read in place.
#[derive(Debug, Clone, Copy, Default)]
struct Fixed<'a, const W: usize>(&'a [u8]);

impl<const W: usize> Fixed<'_, W> {
    /// Row `i` (zeros when out of range).
    #[inline]
    fn get(&self, i: usize) -> [u8; W] {
        let at = i.saturating_mul(W);
        let mut out = [0; W];
        if let Some(b) = self.0.get(at..at.saturating_add(W)) {
            out.copy_from_slice(b);
        }
        out
    }
}

impl Fixed<'_, 4> {
    /// The first row (as a `u32`) at or above `limit`, if any.
    fn first_at_or_above(&self, limit: u32) -> Option<(usize, u32)> {
        self.0
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .enumerate()
            .find(|&(_, v)| v >= limit)
    }
}

/// One table (tasks or results) read in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Table<'a> {
    n: usize,
    ids: Var<'a>,
    keys: Var<'a>,
    payloads: Var<'a>,
    results: Var<'a>,
    errors: Var<'a>,
    traceparents: Var<'a>,
    takeovers: Var<'a>,
    flags: Fixed<'a, 1>,
    priority: Fixed<'a, 4>,
    state: Fixed<'a, 4>,
    rule: Fixed<'a, 4>,
    attempts: Fixed<'a, 4>,
    owner: Fixed<'a, 4>,
    agent: Fixed<'a, 4>,
    attrs: Fixed<'a, 4>,
    lease: Fixed<'a, 8>,
    created: Fixed<'a, 8>,
    updated: Fixed<'a, 8>,
    version: Fixed<'a, 8>,
}

impl<'a> Table<'a> {
    fn locate(c: &mut Cur<'a>, name: &str) -> Result<Self, FormatError> {
        let n = c.u32(name)? as usize;
        let w = |col: &str| format!("{name}.{col}");
        Ok(Table {
            n,
            ids: c.var(n, &w("task_id"))?,
            keys: c.var(n, &w("idempotency_key"))?,
            payloads: c.var(n, &w("payload"))?,
            results: c.var(n, &w("result"))?,
            errors: c.var(n, &w("error"))?,
            traceparents: c.var(n, &w("traceparent"))?,
            takeovers: c.var(n, &w("taken_over"))?,
            flags: c.column(n, &w("flags"))?,
            priority: c.column(n, &w("priority"))?,
            state: c.column(n, &w("state"))?,
            rule: c.column(n, &w("rule_index"))?,
            attempts: c.column(n, &w("attempts"))?,
            owner: c.column(n, &w("owner_region"))?,
            agent: c.column(n, &w("agent_id"))?,
            attrs: c.column(n, &w("attributes"))?,
            lease: c.column(n, &w("lease_deadline_unix_ms"))?,
            created: c.column(n, &w("created_unix_ms"))?,
            updated: c.column(n, &w("updated_unix_ms"))?,
            version: c.column(n, &w("version"))?,
        })
    }

    fn validate(&self, words: usize, attrsets: usize, name: &str) -> Result<(), FormatError> {
        let w = |col: &str| format!("{name}.{col}");
        self.ids.validate(true, &w("task_id"))?;
        self.keys.validate(true, &w("idempotency_key"))?;
        self.payloads.validate(false, &w("payload"))?;
        self.results.validate(false, &w("result"))?;
        self.errors.validate(true, &w("error"))?;
        self.traceparents.validate(true, &w("traceparent"))?;
        self.takeovers.validate(false, &w("taken_over"))?;
        for (col, c, limit) in [
            ("owner_region", &self.owner, words),
            ("agent_id", &self.agent, words),
            ("attributes", &self.attrs, attrsets),
        ] {
            let limit = u32::try_from(limit).unwrap_or(u32::MAX);
            if let Some((i, v)) = c.first_at_or_above(limit) {
                return bad(format!(
                    "{}: row {i} names entry {v} of a dictionary of {limit}",
                    w(col)
                ));
            }
        }
        // Takeovers are rare: the flags say where, and each is prost's.
        for (i, &f) in self.flags.0.iter().enumerate() {
            let raw = self.takeovers.get(i);
            match f {
                0 if raw.is_empty() => {}
                0 => {
                    return bad(format!(
                        "{}: row {i} has a takeover but no flag",
                        w("flags")
                    ));
                }
                1 => {
                    api::Takeover::decode(raw)
                        .map_err(|e| FormatError(format!("{}: row {i}: {e}", w("taken_over"))))?;
                }
                other => return bad(format!("{}: row {i} is {other:#04x}", w("flags"))),
            }
        }
        Ok(())
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Row `i`'s task id.
    #[inline]
    pub fn id(&self, i: usize) -> &'a [u8] {
        self.ids.get(i)
    }

    /// Row `i`'s idempotency key (empty when none).
    #[inline]
    pub fn key(&self, i: usize) -> &'a [u8] {
        self.keys.get(i)
    }

    /// Row `i`'s version.
    #[inline]
    pub fn version(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.version.get(i))
    }

    /// Row `i`'s state (`api::TaskState` as an integer).
    #[inline]
    pub fn state(&self, i: usize) -> i32 {
        i32::from_le_bytes(self.state.get(i))
    }

    /// Row `i`'s rule index.
    #[inline]
    pub fn rule(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.rule.get(i))
    }

    /// Row `i`'s attribute set (an index in the body's dictionary).
    #[inline]
    pub fn attrset(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.attrs.get(i))
    }
}

/// A format-2 body read in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Body<'a> {
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
    words: Var<'a>,
    attrsets: Var<'a>,
    /// Queued and leased tasks.
    pub tasks: Table<'a>,
    /// Recently finished tasks.
    pub results: Table<'a>,
}

impl<'a> Body<'a> {
    /// Reads the layout (every section's size, the head's text) without
    /// checking the rows' contents: for a body [`Body::parse`] accepted
    /// before. Rows of a body not validated read as empty or zero where
    /// they are out of range; never a panic.
    pub fn locate(plain: &'a [u8]) -> Result<Self, FormatError> {
        match plain.get(..4) {
            Some(m) if m == MAGIC.as_slice() => {}
            Some([0, b'F', b'C', v]) => {
                return bad(format!(
                    "format {v} is not one this controller reads (1 and 2)"
                ));
            }
            _ => return bad("no format-2 magic (00 46 43 02) at offset 0"),
        }
        let mut c = Cur { plain, at: 4 };
        let source_region = c.text("source_region")?;
        let epoch = u64::from_le_bytes(c.fixed("epoch")?);
        let sequence = u64::from_le_bytes(c.fixed("sequence")?);
        let policy_hash = c.text("policy_hash")?;
        let taken_unix_ms = i64::from_le_bytes(c.fixed("taken_unix_ms")?);
        let n = c.u32("words")? as usize;
        let words = c.var(n, "words")?;
        let n = c.u32("attrsets")? as usize;
        let attrsets = c.var(n, "attrsets")?;
        let tasks = Table::locate(&mut c, "tasks")?;
        let results = Table::locate(&mut c, "results")?;
        if c.at != plain.len() {
            return bad(format!(
                "{} bytes after the results table, at offset {}",
                plain.len() - c.at,
                c.at
            ));
        }
        Ok(Body {
            source_region,
            epoch,
            sequence,
            policy_hash,
            taken_unix_ms,
            words,
            attrsets,
            tasks,
            results,
        })
    }

    /// Reads and validates the whole body: sizes, offsets, UTF-8 of every
    /// text column, every dictionary index in range, every attribute set
    /// and takeover as prost decodes them.
    pub fn parse(plain: &'a [u8]) -> Result<Self, FormatError> {
        let body = Self::locate(plain)?;
        body.words.validate(true, "words")?;
        body.attrsets.validate(false, "attrsets")?;
        for i in 0..body.attrsets.rows() {
            let raw = body.attrsets.get(i);
            let t = api::Task::decode(raw)
                .map_err(|e| FormatError(format!("attrsets: entry {i}: {e}")))?;
            let only = api::Task {
                attributes: t.attributes.clone(),
                ..Default::default()
            };
            if t != only {
                return bad(format!("attrsets: entry {i} holds more than attributes"));
            }
        }
        let (w, a) = (body.words.rows(), body.attrsets.rows());
        body.tasks.validate(w, a, "tasks")?;
        body.results.validate(w, a, "results")?;
        Ok(body)
    }

    /// Entries in the attribute-set dictionary.
    pub fn attrsets(&self) -> usize {
        self.attrsets.rows()
    }

    /// Attribute set `i` of the dictionary, decoded.
    pub fn attributes(&self, i: u32) -> HashMap<String, api::AttributeValue> {
        api::Task::decode(self.attrsets.get(i as usize))
            .map(|t| t.attributes)
            .unwrap_or_default()
    }

    /// Row `i` of `table` (one of this body's) as the owned task.
    pub fn task(&self, table: &Table<'a>, i: usize) -> api::Task {
        let flag = table.flags.get(i)[0];
        api::Task {
            task_id: table.ids.text(i),
            attributes: self.attributes(table.attrset(i)),
            payload: table.payloads.get(i).to_vec(),
            idempotency_key: table.keys.text(i),
            priority: i32::from_le_bytes(table.priority.get(i)),
            state: table.state(i),
            owner_region: self
                .words
                .text(u32::from_le_bytes(table.owner.get(i)) as usize),
            rule_index: table.rule(i),
            attempts: u32::from_le_bytes(table.attempts.get(i)),
            agent_id: self
                .words
                .text(u32::from_le_bytes(table.agent.get(i)) as usize),
            lease_deadline_unix_ms: i64::from_le_bytes(table.lease.get(i)),
            result: table.results.get(i).to_vec(),
            error: table.errors.text(i),
            created_unix_ms: i64::from_le_bytes(table.created.get(i)),
            updated_unix_ms: i64::from_le_bytes(table.updated.get(i)),
            taken_over: (flag == 1)
                .then(|| api::Takeover::decode(table.takeovers.get(i)).unwrap_or_default()),
            version: table.version(i),
            traceparent: table.traceparents.text(i),
        }
    }

    /// The owned body.
    pub fn to_body(&self) -> SnapshotBody {
        let all =
            |t: &Table<'a>| -> Vec<api::Task> { (0..t.len()).map(|i| self.task(t, i)).collect() };
        SnapshotBody {
            source_region: self.source_region.to_string(),
            epoch: self.epoch,
            sequence: self.sequence,
            policy_hash: self.policy_hash.to_string(),
            taken_unix_ms: self.taken_unix_ms,
            tasks: all(&self.tasks),
            results: all(&self.results),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task(i: u64) -> api::Task {
        let mut attributes = federation_sandbox::string_attrs(&[
            ("customer_region", ["DE", "US", "ü"][i as usize % 3]),
            ("data_class", "pii"),
        ]);
        if i % 4 == 0 {
            attributes.insert(
                "n".into(),
                api::AttributeValue {
                    kind: Some(api::attribute_value::Kind::IntValue(i as i64)),
                },
            );
        }
        api::Task {
            task_id: format!("{i:036}.north_america"),
            attributes,
            payload: vec![i as u8; (i % 7) as usize],
            idempotency_key: if i % 2 == 0 {
                format!("k{i}é")
            } else {
                String::new()
            },
            priority: -3 + i as i32,
            state: (i % 5) as i32,
            owner_region: if i % 3 == 0 {
                "europe"
            } else {
                "north_america"
            }
            .into(),
            rule_index: (i % 2) as u32,
            attempts: i as u32,
            agent_id: if i % 2 == 0 {
                format!("agent-{}", i % 3)
            } else {
                String::new()
            },
            lease_deadline_unix_ms: -5 - i as i64,
            result: if i % 3 == 1 {
                b"out".to_vec()
            } else {
                Vec::new()
            },
            error: if i % 5 == 1 {
                "failed: ✗".into()
            } else {
                String::new()
            },
            created_unix_ms: 1_700_000_000_000 + i as i64,
            updated_unix_ms: 1_700_000_000_001 + i as i64,
            taken_over: (i % 3 == 0).then(|| api::Takeover {
                from_region: "europe".into(),
                from_epoch: i,
                to_region: if i % 2 == 0 {
                    String::new()
                } else {
                    "north_america".into()
                },
                at_unix_ms: 9,
            }),
            version: u64::MAX - i,
            traceparent: format!("00-{i:032x}-{i:016x}-01"),
        }
    }

    fn body(n: u64) -> SnapshotBody {
        SnapshotBody {
            source_region: "north_america".into(),
            epoch: 3,
            sequence: 11,
            policy_hash: "ab".repeat(32),
            taken_unix_ms: -2,
            tasks: (0..n).map(task).collect(),
            results: (n..n + 3).map(task).collect(),
        }
    }

    #[test]
    fn a_body_round_trips_field_for_field() {
        for n in [0, 1, 2, 50] {
            let b = body(n);
            let plain = encode(&b).expect("encode");
            assert!(is_columnar(&plain));
            let view = Body::parse(&plain).expect("parse");
            assert_eq!(view.to_body(), b, "{n} tasks");
            assert_eq!(decode_any(&plain), Ok(b.clone()));
            // Dictionaries hold each distinct value once.
            let distinct: std::collections::HashSet<Vec<u8>> = b
                .tasks
                .iter()
                .chain(&b.results)
                .map(|t| {
                    let mut out = Vec::new();
                    encode_attributes(&t.attributes, &mut out);
                    out
                })
                .collect();
            assert_eq!(view.attrsets(), distinct.len());
        }
        let empty = SnapshotBody::default();
        let plain = encode(&empty).expect("encode");
        assert_eq!(Body::parse(&plain).expect("parse").to_body(), empty);
    }

    #[test]
    fn a_format_1_reader_refuses_a_format_2_body() {
        // What a controller that reads only format 1 does with it.
        for n in [0, 1, 30] {
            let plain = encode(&body(n)).expect("encode");
            let err = SnapshotBody::decode(plain.as_slice()).expect_err("prost refuses");
            assert!(err.to_string().contains("invalid tag value: 0"), "{err}");
        }
    }

    /// `plain` with the `u32` at `at` replaced by `v`.
    fn with_u32(plain: &[u8], at: usize, v: u32) -> Vec<u8> {
        let mut p = plain.to_vec();
        p[at..at + 4].copy_from_slice(&v.to_le_bytes());
        p
    }

    /// Offset of the first occurrence of `needle` in `hay`.
    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len())
            .position(|w| w == needle)
            .expect("present")
    }

    fn refused(plain: &[u8]) -> String {
        Body::parse(plain).expect_err("refused").to_string()
    }

    #[test]
    fn damage_is_refused_naming_what_and_where() {
        let b = SnapshotBody {
            source_region: "north_america".into(),
            tasks: (0..3).map(task).collect(),
            ..Default::default()
        };
        let plain = encode(&b).expect("encode");
        // Unknown format number.
        let mut v9 = plain.clone();
        v9[3] = 9;
        assert!(refused(&v9).contains("format 9"), "{}", refused(&v9));
        // A section longer than the body.
        let huge = with_u32(&plain, 4, u32::MAX);
        assert!(
            refused(&huge).contains("source_region"),
            "{}",
            refused(&huge)
        );
        // Trailing bytes.
        let mut long = plain.clone();
        long.push(0);
        assert!(refused(&long).contains("after the results table"));
        // The task-id offsets: find the column by its heap (the ids).
        let ids = find(
            &plain,
            b"000000000000000000000000000000000000.north_america",
        );
        // ids heap is preceded by its length; the offsets by 3 ends + len.
        let ends = ids - 4 - 12;
        let decreasing = with_u32(&plain, ends + 4, 1);
        assert!(
            refused(&decreasing).contains("tasks.task_id: row 1"),
            "{}",
            refused(&decreasing)
        );
        let past = with_u32(&plain, ends + 8, 1 << 20);
        assert!(
            refused(&past).contains("tasks.task_id"),
            "{}",
            refused(&past)
        );
        // Not UTF-8 inside an id.
        let mut latin = plain.clone();
        latin[ids + 3] = 0xff;
        assert!(refused(&latin).contains("tasks.task_id: not UTF-8"));
        // An offset inside a character: the key "k0é" split after its 'k0' + first byte.
        let keys = find(&plain, "k0é".as_bytes());
        let key_ends = keys - 4 - 12;
        let split = with_u32(&plain, key_ends, 3);
        assert!(
            refused(&split).contains("tasks.idempotency_key: row 0 ends inside a character"),
            "{}",
            refused(&split)
        );
    }

    #[test]
    fn out_of_range_indexes_and_bad_flags_are_refused() {
        let b = SnapshotBody {
            tasks: (1..3).map(task).collect(),
            ..Default::default()
        };
        let plain = encode(&b).expect("encode");
        let view = Body::parse(&plain).expect("parse");
        let base = plain.as_ptr() as usize;
        let at = |s: &[u8]| s.as_ptr() as usize - base;
        let t = view.tasks;
        let owner = at(t.owner.0);
        let bad_owner = with_u32(&plain, owner, 1000);
        assert!(
            refused(&bad_owner).contains("tasks.owner_region: row 0 names entry 1000"),
            "{}",
            refused(&bad_owner)
        );
        let attrs = at(t.attrs.0);
        let bad_set = with_u32(&plain, attrs + 4, 7);
        assert!(
            refused(&bad_set).contains("tasks.attributes: row 1"),
            "{}",
            refused(&bad_set)
        );
        let flags = at(t.flags.0);
        let mut flag = plain.clone();
        flag[flags] = 2;
        assert!(
            refused(&flag).contains("tasks.flags: row 0 is 0x02"),
            "{}",
            refused(&flag)
        );
        // A takeover flag with bytes that are no `Takeover`.
        let mut b2 = b.clone();
        b2.tasks[0].taken_over = Some(api::Takeover {
            from_region: "x".into(),
            ..Default::default()
        });
        let plain2 = encode(&b2).expect("encode");
        let x = find(&plain2, &[0x0a, 0x01, b'x']);
        let mut broken = plain2.clone();
        broken[x + 1] = 0x05;
        assert!(
            refused(&broken).contains("tasks.taken_over: row 0"),
            "{}",
            refused(&broken)
        );
    }

    proptest! {
        #[test]
        fn damaged_bodies_are_refused_or_read_and_never_panic(
            n in 0u64..12,
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        ) {
            let b = body(n);
            let good = encode(&b).expect("encode");
            // A strict prefix never decodes.
            let at = cut.index(good.len() - 1) + 1;
            prop_assert!(Body::parse(&good[..at]).is_err());
            prop_assert!(crate::replication::restore::decode(good[..at].to_vec(), None, None).is_err());
            let mut plain = good.clone();
            for (i, x) in &flips {
                let i = i.index(plain.len());
                plain[i] ^= x;
            }
            match Body::parse(&plain) {
                Ok(v) => {
                    // Damage that keeps the layout valid reads as a body,
                    // which encodes and reads back the same.
                    let owned = v.to_body();
                    let again = encode(&owned).expect("encode");
                    prop_assert_eq!(Body::parse(&again).expect("parse").to_body(), owned);
                    prop_assert!(crate::replication::restore::decode(plain.clone(), None, None).is_ok());
                }
                Err(_) => prop_assert!(
                    plain[0] != 0
                        || crate::replication::restore::decode(plain.clone(), None, None).is_err()
                ),
            }
            // Rows of a damaged body read without panicking even unchecked.
            if let Ok(v) = Body::locate(&plain) {
                for t in [&v.tasks, &v.results] {
                    for i in 0..t.len() {
                        let _ = v.task(t, i);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_after_the_magic_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut plain = MAGIC.to_vec();
            plain.extend_from_slice(&data);
            if let Ok(v) = Body::parse(&plain) {
                let _ = v.to_body();
            }
            let _ = crate::replication::restore::decode(plain, None, None);
        }
    }
}
