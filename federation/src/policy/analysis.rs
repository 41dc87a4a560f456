//! The static audit behind `federation policy check`: failovers that drop
//! compliance tags, regions no rule routes to, inputs no rule matches, rules
//! shadowed by earlier rules, overlapping rules that route one input
//! differently, and inputs that no candidate region may take.
//!
//! Method: every attribute the conditions mention gets a value space made of
//! the string constants compared with it, one fresh value standing for every
//! other value, and "absent". The product of these spaces is enumerated (up
//! to [`MAX_INPUTS`]) and each input is decided with the compiled conditions.
//! This is exact for conditions made of `==`, `!=`, `in` (list literal),
//! `&&`, `||` and `!` over attributes compared with string literals (the
//! *fragment*); a rule outside it is reported as "not analysed" and inputs
//! that reach it are left out rather than guessed. This module owns the
//! enumeration ([`InputSpace`]) that [`super::diff`] reuses.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::condition::{CondExpr, Const};
use super::{AttrValue, Attributes, Policy, Rule};

/// Most inputs enumerated before the analysis gives up ("not analysed").
pub const MAX_INPUTS: usize = 100_000;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The policy breaks a compliance guarantee or can never work as written.
    Error,
    /// Probably not what the author meant; an auditor should look.
    Warning,
    /// For the record (including what could not be analysed).
    Info,
}

impl Severity {
    /// `error`, `warning` or `info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One finding of the audit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// How serious.
    pub severity: Severity,
    /// A stable machine-readable kind (`failover-drops-tag`, `unreachable-region`, …).
    pub kind: &'static str,
    /// The rule concerned (its label), when there is one.
    pub rule: Option<String>,
    /// What is wrong, in one or two sentences.
    pub message: String,
    /// An input that shows the problem, when there is one. Attributes
    /// missing from the map are absent from the input.
    pub example: Option<Attributes>,
}

/// The audit's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Findings, errors first.
    pub findings: Vec<Finding>,
    /// Attributes the enumeration covered, with the values it tried
    /// (`null` stands for "absent").
    pub attributes: BTreeMap<String, Vec<Option<AttrValue>>>,
    /// How many inputs were decided.
    pub inputs_examined: usize,
    /// True when every rule is in the analysable fragment and the
    /// enumeration was complete: the findings are then exact.
    pub exhaustive: bool,
}

impl Report {
    /// True when some finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// How many findings have `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }
}

// ---------------------------------------------------------------------------
// The fragment and its constants.

/// True when `node` is in the exactly analysable fragment.
pub fn in_fragment(node: &CondExpr) -> bool {
    fn operand(n: &CondExpr) -> bool {
        matches!(n, CondExpr::Attr(_) | CondExpr::Const(Const::Str(_)))
    }
    fn str_list(n: &CondExpr) -> bool {
        match n {
            CondExpr::Const(Const::List(items)) => items.iter().all(|c| matches!(c, Const::Str(_))),
            _ => false,
        }
    }
    match node {
        CondExpr::Const(Const::Bool(_)) => true,
        CondExpr::AttrEqStr(..) | CondExpr::AttrNeStr(..) | CondExpr::AttrInStrs(..) => true,
        CondExpr::And(a, b) | CondExpr::Or(a, b) => in_fragment(a) && in_fragment(b),
        CondExpr::Not(a) => in_fragment(a),
        CondExpr::Eq(a, b) | CondExpr::Ne(a, b) => {
            operand(a)
                && operand(b)
                && !(matches!(**a, CondExpr::Attr(_)) && matches!(**b, CondExpr::Attr(_)))
        }
        CondExpr::In(a, b) => operand(a) && str_list(b),
        _ => false,
    }
}

/// Why a rule's condition is outside the fragment, or `None` when inside.
fn not_analysable(c: &super::Condition) -> Option<String> {
    match c.ir() {
        None => Some("its condition uses CEL beyond the compiled subset".into()),
        Some(n) if !in_fragment(n) => Some(
            "its condition goes beyond ==, !=, in [..], &&, || and ! over string attributes and string literals"
                .into(),
        ),
        Some(_) => None,
    }
}

/// Collects, per attribute, the string constants it is compared with.
fn collect(node: &CondExpr, out: &mut BTreeMap<String, BTreeSet<String>>) {
    let consts = |n: &CondExpr| -> Vec<String> {
        match n {
            CondExpr::Const(Const::Str(s)) => vec![s.clone()],
            CondExpr::Const(Const::List(items)) => items
                .iter()
                .filter_map(|c| match c {
                    Const::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    match node {
        CondExpr::Attr(name) => {
            out.entry(name.clone()).or_default();
        }
        CondExpr::AttrEqStr(name, c) | CondExpr::AttrNeStr(name, c) => {
            out.entry(name.clone()).or_default().insert(c.clone());
        }
        CondExpr::AttrInStrs(name, list) => {
            out.entry(name.clone())
                .or_default()
                .extend(list.iter().cloned());
        }
        CondExpr::Eq(a, b)
        | CondExpr::Ne(a, b)
        | CondExpr::In(a, b)
        | CondExpr::Cmp(_, a, b)
        | CondExpr::Str(_, a, b) => {
            for (x, y) in [(a, b), (b, a)] {
                if let CondExpr::Attr(name) = &**x {
                    out.entry(name.clone()).or_default().extend(consts(y));
                }
            }
            collect(a, out);
            collect(b, out);
        }
        CondExpr::And(a, b) | CondExpr::Or(a, b) => {
            collect(a, out);
            collect(b, out);
        }
        CondExpr::Not(a) | CondExpr::Size(a) => collect(a, out),
        CondExpr::Cond(c, a, b) => {
            collect(c, out);
            collect(a, out);
            collect(b, out);
        }
        CondExpr::List(items) => items.iter().for_each(|n| collect(n, out)),
        CondExpr::Const(_) => {}
    }
}

/// Plausible country codes to stand for "any other value", in order of preference.
const FRESH_CODES: &[&str] = &[
    "JP", "BR", "IN", "AU", "MX", "ZA", "KR", "SG", "AR", "NG", "ID", "TR", "EG", "NZ", "CL",
];

fn fresh_value(used: &BTreeSet<String>) -> String {
    let looks_like_codes = !used.is_empty()
        && used
            .iter()
            .all(|u| u.len() == 2 && u.chars().all(|c| c.is_ascii_uppercase()));
    if looks_like_codes {
        if let Some(code) = FRESH_CODES.iter().find(|c| !used.contains(**c)) {
            return (*code).to_string();
        }
    }
    let mut n = 0usize;
    loop {
        let candidate = if n == 0 {
            "other".to_string()
        } else {
            format!("other-{n}")
        };
        if !used.contains(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

// ---------------------------------------------------------------------------
// The input space.

/// The enumerated inputs: for each attribute, its constants, a fresh value
/// and absence.
#[derive(Debug, Clone)]
pub struct InputSpace {
    /// Attribute name and the values tried (`None`: absent).
    pub axes: Vec<(String, Vec<Option<AttrValue>>)>,
    /// Number of inputs in the product (saturating).
    pub size: usize,
}

impl InputSpace {
    /// The space spanned by the conditions of `policies` (rules and data-class requirements).
    pub fn of(policies: &[&Policy]) -> Self {
        let mut consts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in policies {
            for r in &p.rules {
                if let Some(n) = r.condition.as_ref().and_then(|c| c.ir()) {
                    collect(n, &mut consts);
                }
                if let Some(c) = &r.condition {
                    for name in c.program().references().variables() {
                        consts.entry(name.to_string()).or_default();
                    }
                }
            }
            for q in &p.requirements {
                if let Some(n) = q.condition.ir() {
                    collect(n, &mut consts);
                }
                for name in q.condition.program().references().variables() {
                    consts.entry(name.to_string()).or_default();
                }
            }
        }
        let axes: Vec<(String, Vec<Option<AttrValue>>)> = consts
            .into_iter()
            .map(|(name, used)| {
                let fresh = fresh_value(&used);
                let mut values: Vec<Option<AttrValue>> =
                    used.into_iter().map(|s| Some(AttrValue::Str(s))).collect();
                values.push(Some(AttrValue::Str(fresh)));
                values.push(None);
                (name, values)
            })
            .collect();
        let size = axes
            .iter()
            .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
            .unwrap_or(usize::MAX);
        Self { axes, size }
    }

    /// True when the space is small enough to enumerate.
    pub fn enumerable(&self) -> bool {
        self.size <= MAX_INPUTS
    }

    /// Every input, in a fixed order: earlier axes vary slowest, and for each
    /// axis constants come first, then the fresh value, then absence (so the
    /// first example found is the most readable one).
    pub fn inputs(&self) -> impl Iterator<Item = Attributes> + '_ {
        let total = if self.enumerable() { self.size } else { 0 };
        (0..total).map(move |mut i| {
            let mut attrs = Attributes::new();
            for (name, values) in self.axes.iter().rev() {
                let v = &values[i % values.len()];
                i /= values.len();
                if let Some(v) = v {
                    attrs.insert(name.clone(), v.clone());
                }
            }
            attrs
        })
    }

    /// The values tried per attribute, for reports.
    pub fn describe(&self) -> BTreeMap<String, Vec<Option<AttrValue>>> {
        self.axes.iter().cloned().collect()
    }
}

/// Which rule an input reaches, when that can be known exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Rule `i` matches first.
    Rule(usize),
    /// No rule matches.
    NoRule,
    /// The first rule outside the fragment that the input reaches (its
    /// index): the outcome is not analysed.
    Unknown(usize),
}

/// The rules outside the fragment, with why.
pub fn unanalysable_rules(policy: &Policy) -> BTreeMap<usize, String> {
    policy
        .rules
        .iter()
        .filter_map(|r| {
            r.condition
                .as_ref()
                .and_then(not_analysable)
                .map(|why| (r.index, why))
        })
        .collect()
}

/// First match over analysable rules.
pub fn reach(policy: &Policy, skip: &BTreeMap<usize, String>, attrs: &Attributes) -> Reach {
    for r in &policy.rules {
        if skip.contains_key(&r.index) {
            return Reach::Unknown(r.index);
        }
        match &r.condition {
            None => return Reach::Rule(r.index),
            Some(c) => {
                if c.evaluate(attrs) == Ok(true) {
                    return Reach::Rule(r.index);
                }
            }
        }
    }
    Reach::NoRule
}

/// Tags the data-class requirements add, or `None` when one of them is
/// outside the fragment (then the tags are not known exactly).
pub fn required_tags(policy: &Policy, rule: &Rule, attrs: &Attributes) -> Option<BTreeSet<String>> {
    let mut tags = rule.requires.clone();
    for q in &policy.requirements {
        if q.condition.ir().is_none_or(|n| !in_fragment(n)) {
            return None;
        }
        if q.condition.evaluate(attrs) == Ok(true) {
            tags.extend(q.requires.iter().cloned());
        }
    }
    Some(tags)
}

// ---------------------------------------------------------------------------
// The audit.

/// Audits `policy`.
pub fn check(policy: &Policy) -> Report {
    let mut findings = Vec::new();
    let space = InputSpace::of(&[policy]);
    let skip = unanalysable_rules(policy);
    for (index, why) in &skip {
        findings.push(Finding {
            severity: Severity::Info,
            kind: "not-analysed",
            rule: Some(policy.rules[*index].label()),
            message: format!(
                "not analysed: {why}; shadowing, overlap and unmatched inputs are reported only for inputs decided before this rule"
            ),
            example: None,
        });
    }
    let dc_exact = policy
        .requirements
        .iter()
        .all(|q| q.condition.ir().is_some_and(in_fragment));
    if !dc_exact {
        findings.push(Finding {
            severity: Severity::Info,
            kind: "not-analysed",
            rule: None,
            message: "not analysed: a data-class requirement's condition is outside the analysable fragment; failovers are checked against every requirement as if it applied".into(),
            example: None,
        });
    }

    let rules = &policy.rules;
    let n = rules.len();
    // Per rule: an input it matches first; an input it would match alone.
    let mut first_example: Vec<Option<Attributes>> = vec![None; n];
    let mut alone_example: Vec<Option<Attributes>> = vec![None; n];
    let mut shadowed_by: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut unknown_before: Vec<bool> = vec![false; n];
    // (earlier, later) → an input both match whose routes differ.
    let mut overlaps: BTreeMap<(usize, usize), Attributes> = BTreeMap::new();
    let mut unmatched_present: Option<Attributes> = None;
    let mut unmatched_absent: Option<Attributes> = None;
    let mut unmatched_count = 0usize;
    let mut no_compliant: BTreeMap<usize, (Attributes, BTreeSet<String>)> = BTreeMap::new();
    // (rule, requirement index) → input where the rule matches first and the requirement applies.
    let mut dc_applies: BTreeMap<(usize, usize), Attributes> = BTreeMap::new();
    let mut examined = 0usize;

    let enumerable = space.enumerable();
    if !enumerable {
        findings.push(Finding {
            severity: Severity::Info,
            kind: "not-analysed",
            rule: None,
            message: format!(
                "not analysed: the input space has {} combinations, more than the cap of {MAX_INPUTS}; only the static checks ran",
                if space.size == usize::MAX { "too many".to_string() } else { space.size.to_string() }
            ),
            example: None,
        });
    }

    for attrs in space.inputs() {
        examined += 1;
        let reached = reach(policy, &skip, &attrs);
        // Which analysable rules match on their own.
        let limit = match reached {
            Reach::Unknown(k) => k,
            _ => n,
        };
        let alone: Vec<usize> = rules[..n]
            .iter()
            .filter(|r| !skip.contains_key(&r.index))
            .filter(|r| {
                r.condition
                    .as_ref()
                    .is_none_or(|c| c.evaluate(&attrs) == Ok(true))
            })
            .map(|r| r.index)
            .collect();
        for &j in &alone {
            if alone_example[j].is_none() {
                alone_example[j] = Some(attrs.clone());
            }
            if j >= limit {
                unknown_before[j] = true;
            }
        }
        match reached {
            Reach::Rule(i) => {
                if first_example[i].is_none() {
                    first_example[i] = Some(attrs.clone());
                }
                for &j in alone.iter().filter(|&&j| j > i) {
                    shadowed_by[j].insert(i);
                    // A default rule overlaps everything by design.
                    let is_default = rules[j].condition.is_none();
                    if !is_default && route_key(policy, i, &attrs) != route_key(policy, j, &attrs) {
                        overlaps.entry((i, j)).or_insert_with(|| attrs.clone());
                    }
                }
                let rule = &rules[i];
                if let Some(tags) = required_tags(policy, rule, &attrs) {
                    let ok = rule
                        .candidates()
                        .any(|c| policy.region(c).is_some_and(|r| tags.is_subset(&r.tags)));
                    if !ok {
                        no_compliant
                            .entry(i)
                            .or_insert_with(|| (attrs.clone(), tags));
                    }
                }
                for (qi, q) in policy.requirements.iter().enumerate() {
                    // Outside the fragment: assume it may apply.
                    let applies = if q.condition.ir().is_some_and(in_fragment) {
                        q.condition.evaluate(&attrs) == Ok(true)
                    } else {
                        true
                    };
                    if applies {
                        dc_applies.entry((i, qi)).or_insert_with(|| attrs.clone());
                    }
                }
            }
            Reach::NoRule => {
                unmatched_count += 1;
                if attrs.len() == space.axes.len() {
                    if unmatched_present.is_none() {
                        unmatched_present = Some(attrs.clone());
                    }
                } else if unmatched_absent.is_none() {
                    unmatched_absent = Some(attrs.clone());
                }
            }
            Reach::Unknown(_) => {}
        }
    }

    // Sets of primaries: where their members' `priority` cannot matter or
    // cannot break a tie.
    for rule in rules.iter().filter(|r| r.is_set()) {
        let members = rule.primaries_label();
        let prio = |r: &String| policy.region(r).and_then(|x| x.priority);
        if rule.balance == super::Balance::Weighted
            && rule.primaries.iter().all(|m| rule.weights.contains_key(m))
        {
            findings.push(Finding {
                severity: Severity::Warning,
                kind: "set-priority-unused",
                rule: Some(rule.label()),
                message: format!(
                    "`balance: weighted` gives every member of {members} a weight: the regions' `priority` values cannot change which member is chosen (they only order the retries after a failed forward)"
                ),
                example: None,
            });
        } else {
            let mut seen: BTreeMap<Option<i64>, Vec<&str>> = BTreeMap::new();
            for m in &rule.primaries {
                seen.entry(prio(m)).or_default().push(m);
            }
            for (p, names) in seen.iter().filter(|(_, n)| n.len() > 1) {
                let what = match p {
                    Some(p) => format!("share priority {p}"),
                    None => "have no priority".to_string(),
                };
                findings.push(Finding {
                    severity: Severity::Info,
                    kind: "set-priority-tie",
                    rule: Some(rule.label()),
                    message: format!(
                        "members {} of {members} {what}: ties between them go by name",
                        names.join(", ")
                    ),
                    example: None,
                });
            }
        }
    }

    // Failover that drops a tag the primary (every member of a set) holds.
    for rule in rules {
        let mut held: Option<BTreeSet<String>> = None;
        for p in &rule.primaries {
            let Some(region) = policy.region(p) else {
                continue;
            };
            held = Some(match held {
                None => region.tags.clone(),
                Some(h) => h.intersection(&region.tags).cloned().collect(),
            });
        }
        let Some(held) = held else {
            continue;
        };
        let primary = rule.primaries_label();
        let primary = if rule.is_set() {
            format!("every member of {primary}")
        } else {
            primary
        };
        let example = first_example[rule.index].clone();
        for b in &rule.backups {
            let Some(backup) = policy.region(b) else {
                continue;
            };
            let dropped: BTreeSet<String> = held.difference(&backup.tags).cloned().collect();
            if dropped.is_empty() {
                continue;
            }
            let dropped_list = dropped.iter().cloned().collect::<Vec<_>>().join(", ");
            let required: Vec<&String> = rule.requires.intersection(&dropped).collect();
            if !required.is_empty() {
                findings.push(Finding {
                    severity: Severity::Error,
                    kind: "failover-lacks-required-tag",
                    rule: Some(rule.label()),
                    message: format!(
                        "the rule requires {} but its backup `{b}` lacks it: when `{}` is down every matching task is rejected, the failover can never be used",
                        join(&required),
                        primary
                    ),
                    example: example.clone(),
                });
                continue;
            }
            let mut reported = false;
            for (qi, q) in policy.requirements.iter().enumerate() {
                let tags: Vec<&String> = q.requires.intersection(&dropped).collect();
                if tags.is_empty() {
                    continue;
                }
                let applies = if enumerable {
                    dc_applies.get(&(rule.index, qi)).cloned()
                } else {
                    example.clone()
                };
                if let Some(input) = applies.or_else(|| (!enumerable).then(Attributes::new)) {
                    findings.push(Finding {
                        severity: Severity::Error,
                        kind: "failover-lacks-required-tag",
                        rule: Some(rule.label()),
                        message: format!(
                            "data-class requirement `{}` requires {} for some inputs of this rule, but backup `{b}` lacks it: those tasks are rejected when `{}` is down",
                            q.name.as_deref().unwrap_or(&q.source),
                            join(&tags),
                            primary
                        ),
                        example: (!input.is_empty()).then_some(input),
                    });
                    reported = true;
                }
            }
            if !reported {
                findings.push(Finding {
                    severity: Severity::Warning,
                    kind: "failover-drops-tag",
                    rule: Some(rule.label()),
                    message: format!(
                        "failover from `{}` to `{b}` drops compliance tag(s) {dropped_list} held by the primary: when `{}` is down, matching tasks run in a region without {dropped_list}; add `requires: [{dropped_list}]` to refuse such a failover, or choose a backup that holds {dropped_list}",
                        primary, primary
                    ),
                    example: example.clone(),
                });
            }
        }
    }

    // Rules that can never route anywhere for some input.
    for (i, (input, tags)) in &no_compliant {
        let rule = &rules[*i];
        findings.push(Finding {
            severity: Severity::Error,
            kind: "no-compliant-region",
            rule: Some(rule.label()),
            message: format!(
                "no candidate of the rule ({}) holds every required tag ({}): matching tasks are always rejected",
                rule.candidates().cloned().collect::<Vec<_>>().join(", "),
                tags.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            example: Some(input.clone()),
        });
    }

    // Shadowed rules, and rules that never match.
    if enumerable {
        for rule in rules {
            let i = rule.index;
            if skip.contains_key(&i) || first_example[i].is_some() {
                continue;
            }
            if unknown_before[i] {
                findings.push(Finding {
                    severity: Severity::Info,
                    kind: "not-analysed",
                    rule: Some(rule.label()),
                    message: "not analysed: whether this rule can match depends on an earlier rule outside the analysable fragment".into(),
                    example: alone_example[i].clone(),
                });
                continue;
            }
            match &alone_example[i] {
                None => findings.push(Finding {
                    severity: Severity::Warning,
                    kind: "never-matches",
                    rule: Some(rule.label()),
                    message: "the condition is false (or an error) for every input: the rule never matches".into(),
                    example: None,
                }),
                Some(input) => {
                    let by = shadowed_by[i]
                        .iter()
                        .map(|j| format!("rule {}", j + 1))
                        .collect::<Vec<_>>()
                        .join(", ");
                    findings.push(Finding {
                        severity: Severity::Warning,
                        kind: "shadowed-rule",
                        rule: Some(rule.label()),
                        message: format!(
                            "shadowed: every input this rule matches is matched first by {by}, so it never applies"
                        ),
                        example: Some(input.clone()),
                    });
                }
            }
        }
        for ((i, j), input) in &overlaps {
            if first_example[*j].is_none() {
                continue; // already reported as shadowed
            }
            findings.push(Finding {
                severity: Severity::Warning,
                kind: "overlapping-rules",
                rule: Some(rules[*j].label()),
                message: format!(
                    "overlaps rule {} and routes differently: for the example input rule {} wins ({}), this rule would give {}",
                    i + 1,
                    i + 1,
                    describe_route(policy, *i, input),
                    describe_route(policy, *j, input)
                ),
                example: Some(input.clone()),
            });
        }
    }

    // Regions no rule can route to.
    for region in &policy.regions {
        let routed = rules.iter().any(|r| {
            (first_example[r.index].is_some() || skip.contains_key(&r.index) || !enumerable)
                && r.candidates().any(|c| *c == region.name)
        });
        if !routed {
            let named = rules
                .iter()
                .any(|r| r.candidates().any(|c| *c == region.name));
            findings.push(Finding {
                severity: Severity::Warning,
                kind: "unreachable-region",
                rule: None,
                message: if named {
                    format!("region `{}` is named only by rules that never match: no task is ever routed there", region.name)
                } else {
                    format!("no rule routes to region `{}` (as primary or backup): no task is ever routed there", region.name)
                },
                example: None,
            });
        }
    }

    // Inputs no rule matches.
    let has_default = rules.iter().any(|r| r.condition.is_none());
    if !has_default && enumerable {
        if let Some(input) = &unmatched_present {
            findings.push(Finding {
                severity: Severity::Warning,
                kind: "unmatched-input",
                rule: None,
                message: format!(
                    "no rule matches some inputs, for example {} (no default rule): such tasks are rejected at run time (fail closed)",
                    super::format_attributes(input)
                ),
                example: Some(input.clone()),
            });
        }
        if let Some(input) = &unmatched_absent {
            let missing: Vec<&str> = space
                .axes
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| !input.contains_key(*k))
                .collect();
            findings.push(Finding {
                severity: Severity::Warning,
                kind: "unmatched-missing-attribute",
                rule: None,
                message: format!(
                    "tasks without attribute(s) {} match no rule (a condition on a missing attribute is an error, which does not match): they are rejected at run time",
                    missing.join(", ")
                ),
                example: Some(input.clone()),
            });
        }
        let _ = unmatched_count;
    }

    findings.sort_by_key(|f| f.severity);
    Report {
        findings,
        attributes: space.describe(),
        inputs_examined: examined,
        exhaustive: enumerable && skip.is_empty() && dc_exact,
    }
}

/// What decides where an input goes under rule `i`: candidates and required tags.
fn route_key(
    policy: &Policy,
    i: usize,
    attrs: &Attributes,
) -> (Vec<String>, Option<BTreeSet<String>>) {
    let rule = &policy.rules[i];
    (
        rule.candidates().cloned().collect(),
        required_tags(policy, rule, attrs),
    )
}

fn describe_route(policy: &Policy, i: usize, attrs: &Attributes) -> String {
    let rule = &policy.rules[i];
    let mut s = if rule.is_set() {
        format!(
            "primaries {} ({})",
            rule.primaries_label(),
            rule.balance.as_str()
        )
    } else {
        format!("primary {}", rule.primaries_label())
    };
    if !rule.backups.is_empty() {
        s.push_str(&format!(", backups {}", rule.backups.join(", ")));
    }
    if let Some(tags) = required_tags(policy, rule, attrs) {
        if !tags.is_empty() {
            s.push_str(&format!(
                ", requires {}",
                tags.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    s
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
