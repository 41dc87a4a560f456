//! What a decision record (and the log line, and the status page that read
//! it) keeps of a task's attributes. The record written where the task is
//! held keeps everything. Every other one — an entry region that forwarded
//! the task, a region that refused it, a rejection — keeps the attribute
//! names, the values the policy lets every region keep
//! ([`crate::policy::record_values`]), and for every other attribute a keyed
//! digest ([`super::key`]) under `attributes_withheld`; its free text
//! (reason, candidates' details, warnings, evaluation errors, note) is
//! scrubbed of the withheld values, and the unkeyed affinity digest is
//! dropped when the affinity attribute is withheld.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::key::AuditKey;
use crate::policy::{AttrValue, Attributes, Decision, Policy};

/// The shortest string value scrubbed from free text (shorter ones would
/// mangle unrelated words; their digest is still recorded).
const MIN_SCRUBBED: usize = 3;

/// The keyed digest of a task's whole input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputDigest {
    /// The audit key's id.
    pub key: String,
    /// Hex HMAC-SHA256 of every attribute ([`AuditKey::input_digest`]).
    pub input: String,
}

/// Replaces withheld values in free text: what [`Kept::scrub`] does,
/// without the decision (for log lines and span statuses of errors).
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// `(value as written in text, replacement)`, longest first.
    hidden: Vec<(String, String)>,
}

impl Scrubber {
    /// The scrubber of a record of a decision that matched `rule_index`
    /// for `attrs` (nothing to hide when `held_here`).
    pub fn new(
        policy: &Policy,
        held_here: bool,
        attrs: &Attributes,
        rule_index: Option<usize>,
    ) -> Self {
        let mut hidden = Vec::new();
        if !held_here {
            for (name, value) in attrs {
                if !policy.record_values.keeps(name, rule_index) {
                    push_needles(value, &format!("<withheld:{name}>"), &mut hidden);
                }
            }
        }
        // Longest first, so a value containing another is replaced whole.
        hidden.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { hidden }
    }

    /// `text` with every withheld value replaced by `<withheld:NAME>`.
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if !self.hidden.iter().any(|(v, _)| text.contains(v.as_str())) {
            return Cow::Borrowed(text);
        }
        let mut out = text.to_string();
        for (value, replacement) in &self.hidden {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), replacement);
            }
        }
        Cow::Owned(out)
    }
}

/// A record's view of one task's attributes and decision.
#[derive(Debug, Clone)]
pub struct Kept<'a> {
    /// The values the record keeps.
    pub attributes: Cow<'a, Attributes>,
    /// The attributes whose values it does not keep, each with its keyed
    /// digest (`None` without an audit key). Empty where the task is held.
    pub withheld: BTreeMap<String, Option<String>>,
    /// The decision, scrubbed of withheld values.
    pub decision: Cow<'a, Decision>,
    /// The note, scrubbed.
    pub note: Option<Cow<'a, str>>,
    /// The input's digest (with an audit key).
    pub digest: Option<InputDigest>,
    /// What [`Kept::scrub`] replaces.
    scrubber: Scrubber,
}

impl<'a> Kept<'a> {
    /// What a record of `decision` for `attrs` keeps: everything when
    /// `held_here` (this region stores the task), else the minimum above.
    pub fn new(
        policy: &Policy,
        key: Option<&AuditKey>,
        held_here: bool,
        attrs: &'a Attributes,
        decision: &'a Decision,
        note: Option<&'a str>,
    ) -> Self {
        let digest = key.map(|k| InputDigest {
            key: k.id().to_string(),
            input: k.input_digest(attrs),
        });
        let keeps = |name: &str| held_here || policy.record_values.keeps(name, decision.rule_index);
        if attrs.keys().all(|k| keeps(k)) {
            return Self {
                attributes: Cow::Borrowed(attrs),
                withheld: BTreeMap::new(),
                decision: Cow::Borrowed(decision),
                note: note.map(Cow::Borrowed),
                digest,
                scrubber: Scrubber::default(),
            };
        }
        let mut kept = Attributes::new();
        let mut withheld = BTreeMap::new();
        for (name, value) in attrs {
            if keeps(name) {
                kept.insert(name.clone(), value.clone());
                continue;
            }
            withheld.insert(name.clone(), key.map(|k| k.attribute_digest(name, value)));
        }
        let mut this = Self {
            attributes: Cow::Owned(kept),
            withheld,
            decision: Cow::Borrowed(decision),
            note: None,
            digest,
            scrubber: Scrubber::new(policy, held_here, attrs, decision.rule_index),
        };
        let mut d = decision.clone();
        // A rejection without a rule lists the attributes (truncated, which
        // could cut a value in two): written again from what is kept.
        let shown = crate::text::truncate(&crate::policy::format_attributes(attrs), 200);
        if d.rule_index.is_none() && d.reason.contains(shown.as_str()) {
            let mut listed: Vec<String> = this
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            listed.extend(this.withheld.keys().map(|k| format!("{k}=<withheld>")));
            d.reason = d.reason.replace(shown.as_str(), &listed.join(", "));
        }
        d.reason = this.scrub(&d.reason).into_owned();
        for c in &mut d.candidates {
            c.detail = this.scrub(&c.detail).into_owned();
        }
        for w in d.warnings.iter_mut().chain(d.evaluation_errors.iter_mut()) {
            *w = this.scrub(w).into_owned();
        }
        if let Some(note) = &mut d.balance {
            let mut b = note.explain();
            if b.affinity
                .as_ref()
                .is_some_and(|a| this.withheld.contains_key(a))
            {
                b.affinity_digest = None;
            }
            b.why = this.scrub(&b.why).into_owned();
            *note = b.into();
        }
        this.decision = Cow::Owned(d);
        this.note = note.map(|n| Cow::Owned(this.scrub(n).into_owned()));
        this
    }

    /// True when some value is withheld.
    pub fn is_minimised(&self) -> bool {
        !self.withheld.is_empty()
    }

    /// `text` with every withheld value replaced by `<withheld:NAME>`: for
    /// free text that may quote the task (an error from a peer, a reason).
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        self.scrubber.scrub(text)
    }
}

fn push_needles(value: &AttrValue, replacement: &str, out: &mut Vec<(String, String)>) {
    match value {
        AttrValue::Str(s) if s.chars().count() >= MIN_SCRUBBED => {
            out.push((s.clone(), replacement.to_string()));
        }
        AttrValue::List(items) => {
            for item in items {
                push_needles(item, replacement, out);
            }
        }
        // Numbers and booleans are not searched for in text (they would
        // replace unrelated digits); only their digests are recorded.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{StaticView, decide};

    fn policy(text: &str) -> Policy {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, text).expect("write");
        Policy::load_file(&path).expect("loads")
    }

    const SEED: &str = federation_sandbox::SEED_POLICY;

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), AttrValue::Str(v.to_string())))
            .collect()
    }

    #[test]
    fn holder_keeps_everything_others_keep_names_rule_values_and_digests() {
        let p = policy(SEED);
        let key = AuditKey::new("a1", &[5u8; 32]);
        let a = attrs(&[("customer_region", "DE"), ("email", "jane@example.eu")]);
        let d = decide(&p, &a, &StaticView::default().bind(&p));
        let held = Kept::new(&p, Some(&key), true, &a, &d, Some("note jane@example.eu"));
        assert!(!held.is_minimised());
        assert_eq!(held.attributes.as_ref(), &a);
        assert_eq!(held.note.as_deref(), Some("note jane@example.eu"));
        let elsewhere = Kept::new(&p, Some(&key), false, &a, &d, Some("x jane@example.eu y"));
        assert!(elsewhere.is_minimised());
        assert_eq!(
            elsewhere.attributes.get("customer_region"),
            Some(&AttrValue::Str("DE".into()))
        );
        assert!(!elsewhere.attributes.contains_key("email"));
        assert_eq!(
            elsewhere.withheld.get("email"),
            Some(&Some(key.attribute_digest("email", &a["email"])))
        );
        assert_eq!(elsewhere.note.as_deref(), Some("x <withheld:email> y"));
        // Both records carry the same input digest: same input, provably.
        assert_eq!(held.digest, elsewhere.digest);
        assert_eq!(
            elsewhere.digest.as_ref().map(|d| d.input.clone()),
            Some(key.input_digest(&a))
        );
        // Without a key: names only.
        let nokey = Kept::new(&p, None, false, &a, &d, None);
        assert_eq!(nokey.withheld.get("email"), Some(&None));
        assert!(nokey.digest.is_none());
    }

    #[test]
    fn a_rejection_without_rule_does_not_list_withheld_values() {
        let p = policy(SEED);
        let a = attrs(&[("customer_region", "JP"), ("email", "jane@example.jp")]);
        let d = decide(&p, &a, &StaticView::default().bind(&p));
        assert!(d.reason.contains("jane@example.jp"), "{}", d.reason);
        let k = Kept::new(&p, None, false, &a, &d, None);
        assert!(
            !k.decision.reason.contains("jane@"),
            "{}",
            k.decision.reason
        );
        assert!(
            k.decision.reason.contains("customer_region='JP'"),
            "{}",
            k.decision.reason
        );
        assert!(
            k.decision.reason.contains("email=<withheld>"),
            "{}",
            k.decision.reason
        );
        // A long value cut by the reason's truncation leaves no prefix either.
        let long = "x".repeat(150) + "secret-tail-value-abcdef";
        let a = attrs(&[("customer_region", "JP"), ("email", &long)]);
        let d = decide(&p, &a, &StaticView::default().bind(&p));
        let k = Kept::new(&p, None, false, &a, &d, None);
        assert!(
            !k.decision.reason.contains("xxxxxxxx"),
            "{}",
            k.decision.reason
        );
    }

    #[test]
    fn record_values_list_replaces_the_default() {
        let text = SEED.replace(
            "  data_synchronization:",
            "  audit:\n    record_values: [tier]\n  data_synchronization:",
        );
        let p = policy(&text);
        let a = attrs(&[("customer_region", "DE"), ("tier", "gold")]);
        let d = decide(&p, &a, &StaticView::default().bind(&p));
        let k = Kept::new(&p, None, false, &a, &d, None);
        assert!(k.attributes.contains_key("tier"));
        assert!(k.withheld.contains_key("customer_region"));
    }
}
