//! The canonical encoding: a record rendered straight to the sorted-key JSON
//! bytes its hash covers, and sealed into its line once chained.

use std::io::Write;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Entry, HASH_SEP, minimise};
use crate::policy::{
    AttrValue, Attributes, Decision, Health, Outcome, Refusal, RegionView, Rejection, Role,
};

// ---------------------------------------------------------------------------
// Canonical form and hashing
// ---------------------------------------------------------------------------
//
// Records are rendered straight to canonical bytes (no `serde_json::Value`
// in between on the routing path): every writer below emits an object's keys
// in sorted order by construction. `canonical` handles free-form `Value`s
// (entries built by hand, and the tests' oracle).

/// Writes `v` as canonical JSON: keys sorted, no whitespace.
pub(super) fn canonical(v: &Value, out: &mut Vec<u8>) {
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
pub(super) fn push_json_string(s: &str, out: &mut Vec<u8>) {
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
pub(super) fn push_attributes(attrs: &Attributes, out: &mut Vec<u8>) {
    let mut obj = Obj::open(out);
    for (k, v) in attrs {
        push_attr_value(v, obj.key(k));
    }
    obj.close();
}

pub(super) fn push_attr_value(v: &AttrValue, out: &mut Vec<u8>) {
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

/// A [`crate::policy::BalanceNote`] as its `Serialize` writes it (its
/// [`crate::policy::BalanceExplanation`]), in canonical form (keys sorted).
fn push_balance(b: &crate::policy::BalanceNote, out: &mut Vec<u8>) {
    let b = b.explain();
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

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A record encoded and ready to chain: the canonical JSON of every field
/// that sorts before `prev_hash` (rendered on the caller's thread), the
/// SHA-256 state over those bytes, and the two fields that sort after it.
/// The writer only adds the chained fields and finishes the hash. Handed to
/// [`super::DecisionLog::append`], or carried in the task store's batch,
/// which names the task the insert really produced ([`Prepared::set_task_id`]).
pub struct Prepared {
    head: Vec<u8>,
    hasher: Sha256,
    rule_index: Option<u32>,
    task_id: Option<String>,
}

/// A routing decision to encode, borrowed: the same bytes as
/// [`Entry::from_decision`] plus these fields, without `serde_json::Value`s.
struct Routed<'a> {
    kind: &'a str,
    task_id: Option<&'a str>,
    entry_region: Option<&'a str>,
    attributes: &'a Attributes,
    decision: &'a Decision,
    note: Option<&'a str>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("task_id", &self.task_id)
            .finish_non_exhaustive()
    }
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
    fn from_head(head: &Head<'_>, rule_index: Option<u32>, task_id: Option<String>) -> Self {
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

    /// Encodes `entry` (an entry built by hand: reloads, takeovers, …).
    pub fn entry(e: &Entry) -> Self {
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
        Self::from_head(&head, e.rule_index, e.task_id.clone())
    }

    /// Encodes the record of `decision` for `attributes` straight from the
    /// typed decision: the bytes [`Prepared::entry`] gives for
    /// [`Entry::from_decision`] with the same task, entry region and note.
    pub fn decision(
        kind: &str,
        task_id: Option<&str>,
        entry_region: Option<&str>,
        attributes: &Attributes,
        decision: &Decision,
        note: Option<&str>,
    ) -> Self {
        let r = Routed {
            kind,
            task_id,
            entry_region,
            attributes,
            decision,
            note,
        };
        Self::from_parts(&r, None, None, None)
    }

    /// Encodes the record of a decision as [`minimise::Kept`] has it (the
    /// values, digests and scrubbed text this region may keep), with the
    /// federation as the decision saw it.
    pub fn kept(
        kind: &str,
        task_id: Option<&str>,
        entry_region: Option<&str>,
        kept: &minimise::Kept<'_>,
        view: Option<&[(String, RegionView)]>,
    ) -> Self {
        let r = Routed {
            kind,
            task_id,
            entry_region,
            attributes: &kept.attributes,
            decision: &kept.decision,
            note: kept.note.as_deref(),
        };
        Self::from_parts(&r, kept.digest.as_ref(), Some(&kept.withheld), view)
    }

    /// The task the record names.
    pub fn task_id(&self) -> Option<&str> {
        self.task_id.as_deref()
    }

    /// Names another task (the `task_id` field is rendered when the record
    /// is sealed, so this costs nothing).
    pub fn set_task_id(&mut self, task_id: &str) {
        if self.task_id.as_deref() != Some(task_id) {
            self.task_id = Some(task_id.to_string());
        }
    }

    fn from_parts(
        r: &Routed<'_>,
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
        Self::from_head(&head, rule_index, r.task_id.map(str::to_string))
    }

    /// What a staged row keeps to seal the record again (`super::staged`):
    /// the head's bytes, the rule index and the task named.
    pub(super) fn parts(&self) -> (&[u8], Option<u32>, Option<&str>) {
        (&self.head, self.rule_index, self.task_id.as_deref())
    }

    /// The record [`Prepared::parts`] gave (the hash state recomputed).
    pub(super) fn from_raw(
        head: Vec<u8>,
        rule_index: Option<u32>,
        task_id: Option<String>,
    ) -> Self {
        let hasher = Sha256::new_with_prefix(&head);
        Self {
            head,
            hasher,
            rule_index,
            task_id,
        }
    }

    /// Appends the finished line (with `\n`) to `buf` and returns its hash:
    /// the body is the head plus the chained fields, in sorted key order.
    pub(super) fn seal_into(
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
        let chained = Chained {
            region,
            rule_index,
            task_id: task_id.as_deref(),
            time,
            unix_ms,
        };
        chained.push(buf, prev_hash, &seq.to_string());
        hasher.update(&buf[tail_start..]);
        hasher.update(b"}");
        let hash = hex::encode(hasher.finalize());
        // The body ends with '}'; the line puts the hash before it.
        buf.extend_from_slice(HASH_SEP.as_bytes());
        buf.extend_from_slice(hash.as_bytes());
        buf.extend_from_slice(b"\"}\n");
        hash
    }

    /// The line [`Prepared::seal_into`] makes (with its newline): for the
    /// store's tests, which compare the database's sealing with it.
    #[cfg(test)]
    pub(crate) fn sealed_line(
        self,
        seq: u64,
        time: &str,
        unix_ms: i64,
        region: &str,
        prev_hash: &str,
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        self.seal_into(&mut buf, seq, time, unix_ms, region, prev_hash);
        buf
    }

    /// The record cut where the chain goes, for a database that seals it
    /// itself (`super::postgres`): the line's body is `head`, the previous
    /// record's hash, `mid`, the seq in decimal, `tail` and `}`, the bytes
    /// [`Prepared::seal_into`] hashes.
    pub(super) fn sql_parts(&self, time: &str, unix_ms: i64, region: &str) -> SqlParts {
        let mut head = Vec::with_capacity(self.head.len() + 160);
        head.extend_from_slice(&self.head);
        let start = head.len();
        let chained = Chained {
            region,
            rule_index: self.rule_index,
            task_id: self.task_id.as_deref(),
            time,
            unix_ms,
        };
        let (prev_at, seq_at) = chained.push(&mut head, "", "");
        let tail = head.split_off(seq_at);
        let mid = head.split_off(prev_at);
        debug_assert!(prev_at > start);
        // Each cut is at an ASCII byte of valid UTF-8 (a quote, a colon):
        // each part is taken as it is, not copied again.
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        SqlParts {
            head: text(head),
            mid: text(mid),
            tail: text(tail),
            task_id: self.task_id.clone(),
        }
    }
}

/// A record as [`Prepared::sql_parts`] cuts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SqlParts {
    /// The body up to the previous hash's first digit.
    pub(super) head: String,
    /// From after the previous hash to the seq's first digit.
    pub(super) mid: String,
    /// From after the seq to the body's end, without its closing `}`.
    pub(super) tail: String,
    /// The task the record names.
    pub(super) task_id: Option<String>,
}

/// The fields a record gets when it is chained, but its place in the chain.
struct Chained<'a> {
    region: &'a str,
    rule_index: Option<u32>,
    task_id: Option<&'a str>,
    time: &'a str,
    unix_ms: i64,
}

impl Chained<'_> {
    /// Continues the object a head left open (it holds `kind`) with the
    /// chained fields in sorted key order, `prev_hash` (hex, written as
    /// is) and `seq` (decimal) included, without the closing `}`. Returns
    /// where `prev_hash`'s and `seq`'s text begin in `out`.
    fn push(&self, out: &mut Vec<u8>, prev_hash: &str, seq: &str) -> (usize, usize) {
        let mut obj = Obj { out, first: false };
        obj.key("prev_hash").push(b'"');
        let prev_at = obj.out.len();
        obj.out.extend_from_slice(prev_hash.as_bytes());
        obj.out.push(b'"');
        obj.str("region", self.region);
        if let Some(i) = self.rule_index {
            push_display(i, obj.key("rule_index"));
        }
        obj.key("seq");
        let seq_at = obj.out.len();
        obj.out.extend_from_slice(seq.as_bytes());
        if let Some(t) = self.task_id {
            obj.str("task_id", t);
        }
        obj.str("time", self.time);
        push_display(self.unix_ms, obj.key("unix_ms"));
        (prev_at, seq_at)
    }
}
