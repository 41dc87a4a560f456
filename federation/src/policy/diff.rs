//! `federation policy diff`: which inputs change route between two policies.
//!
//! A route is the matched rule's primary (or its set of primaries: a region
//! joining or leaving the set is a residency change, their balance is not),
//! its ordered backups and the tags
//! the chosen region must hold (rule plus data-class requirements), or a
//! rejection when no rule matches. Inputs are enumerated with
//! [`InputSpace`] over the union of both policies' constants, so the result
//! is exact for the fragment [`super::analysis`] describes; inputs that reach
//! a rule outside it are counted as not analysed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::analysis::{InputSpace, MAX_INPUTS, Reach, reach, required_tags, unanalysable_rules};
use super::{Attributes, Policy};

/// Where a policy sends an input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// No rule matches: rejected (fail closed).
    Rejected,
    /// A rule matches.
    Routed {
        /// The matched rule's label.
        rule: String,
        /// Its primary, or its set as `{a, b}` (names sorted).
        primary: String,
        /// The primary, or the set's members sorted by name.
        primaries: Vec<String>,
        /// Its ordered backups.
        backups: Vec<String>,
        /// Tags the chosen region must hold; `None` when a data-class
        /// requirement is outside the analysable fragment.
        required_tags: Option<BTreeSet<String>>,
    },
}

/// The parts of a route that the comparison looks at.
type RouteKey<'a> = (&'a [String], &'a [String], &'a Option<BTreeSet<String>>);

impl Route {
    /// What matters for the comparison (not the rule's label or position).
    fn key(&self) -> Option<RouteKey<'_>> {
        match self {
            Route::Rejected => None,
            Route::Routed {
                primaries,
                backups,
                required_tags,
                ..
            } => Some((primaries.as_slice(), backups.as_slice(), required_tags)),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Rejected => f.write_str("rejected (no rule matches)"),
            Route::Routed {
                rule,
                primary,
                backups,
                required_tags,
                ..
            } => {
                write!(f, "{primary}")?;
                if !backups.is_empty() {
                    write!(f, " then {}", backups.join(", "))?;
                }
                match required_tags {
                    Some(t) if !t.is_empty() => write!(
                        f,
                        ", requires {}",
                        t.iter().cloned().collect::<Vec<_>>().join(", ")
                    )?,
                    Some(_) => {}
                    None => f.write_str(", requires (not analysed)")?,
                }
                write!(f, " [{rule}]")
            }
        }
    }
}

/// One kind of change, with an example input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// An input whose route changes (attributes left out are absent).
    pub example: Attributes,
    /// Its route under the old policy.
    pub old: Route,
    /// Its route under the new policy.
    pub new: Route,
    /// How many enumerated inputs change this same way.
    pub inputs: usize,
}

/// The result of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffReport {
    /// Route changes, one per (old route, new route) pair.
    pub changes: Vec<Change>,
    /// Inputs decided.
    pub inputs_examined: usize,
    /// Inputs left out because a rule outside the fragment decides them.
    pub inputs_not_analysed: usize,
    /// True when the comparison covers every input exactly.
    pub exhaustive: bool,
    /// Other differences worth knowing (region tags, the enumeration cap).
    pub notes: Vec<String>,
}

impl DiffReport {
    /// True when some input changes route.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

fn route(policy: &Policy, at: Reach, attrs: &Attributes) -> Option<Route> {
    match at {
        Reach::NoRule => Some(Route::Rejected),
        Reach::Unknown(_) => None,
        Reach::Rule(i) => {
            let rule = &policy.rules[i];
            let mut primaries = rule.primaries.clone();
            primaries.sort();
            let primary = if rule.is_set() {
                format!("{{{}}}", primaries.join(", "))
            } else {
                primaries.join(", ")
            };
            Some(Route::Routed {
                rule: rule.label(),
                primary,
                primaries,
                backups: rule.backups.clone(),
                required_tags: required_tags(policy, rule, attrs),
            })
        }
    }
}

/// Compares the routes of `old` and `new`.
pub fn diff(old: &Policy, new: &Policy) -> DiffReport {
    let space = InputSpace::of(&[old, new]);
    let skip_old = unanalysable_rules(old);
    let skip_new = unanalysable_rules(new);
    let mut notes = Vec::new();
    if !space.enumerable() {
        notes.push(format!(
            "not analysed: the input space exceeds the cap of {MAX_INPUTS} combinations"
        ));
    }
    for (label, p, skip) in [("old", old, &skip_old), ("new", new, &skip_new)] {
        for (i, why) in skip {
            notes.push(format!(
                "not analysed ({label} policy): {}: {why}",
                p.rules[*i].label()
            ));
        }
    }
    for r in &old.regions {
        match new.region(&r.name) {
            None => notes.push(format!("region `{}` removed", r.name)),
            Some(n) if n.tags != r.tags => notes.push(format!(
                "region `{}` tags changed: [{}] -> [{}]",
                r.name,
                r.tags.iter().cloned().collect::<Vec<_>>().join(", "),
                n.tags.iter().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(_) => {}
        }
    }
    for r in &new.regions {
        if old.region(&r.name).is_none() {
            notes.push(format!("region `{}` added", r.name));
        }
    }

    let mut changes: Vec<Change> = Vec::new();
    let mut index: BTreeMap<(String, String), usize> = BTreeMap::new();
    let (mut examined, mut unknown) = (0usize, 0usize);
    for attrs in space.inputs() {
        examined += 1;
        let a = route(old, reach(old, &skip_old, &attrs), &attrs);
        let b = route(new, reach(new, &skip_new, &attrs), &attrs);
        let (Some(a), Some(b)) = (a, b) else {
            unknown += 1;
            continue;
        };
        if a.key() == b.key() {
            continue;
        }
        let k = (format!("{a}"), format!("{b}"));
        match index.get(&k) {
            Some(&i) => changes[i].inputs += 1,
            None => {
                index.insert(k, changes.len());
                changes.push(Change {
                    example: attrs,
                    old: a,
                    new: b,
                    inputs: 1,
                });
            }
        }
    }
    DiffReport {
        changes,
        inputs_examined: examined,
        inputs_not_analysed: unknown,
        exhaustive: space.enumerable() && unknown == 0,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::AttrValue;

    fn policy_file(name: &str) -> Policy {
        let path = format!("{}/../policies/{name}", env!("CARGO_MANIFEST_DIR"));
        Policy::load_file(Path::new(&path)).expect("policy loads")
    }

    #[test]
    fn same_policy_has_no_changes() {
        let p = policy_file("seed-federation.yaml");
        let d = diff(&p, &p);
        assert!(!d.changed(), "{d:#?}");
        assert!(d.exhaustive);
    }

    #[test]
    fn requires_changes_eu_routes_only() {
        let d = diff(
            &policy_file("seed-federation.yaml"),
            &policy_file("seed-requires-gdpr.yaml"),
        );
        assert_eq!(d.changes.len(), 1, "{d:#?}");
        let c = &d.changes[0];
        assert_eq!(c.inputs, 3); // UK, DE, FR
        assert_eq!(
            c.example.get("customer_region"),
            Some(&AttrValue::Str("DE".into()))
        );
    }

    #[test]
    fn default_rule_turns_rejections_into_routes() {
        let d = diff(
            &policy_file("seed-federation.yaml"),
            &policy_file("clean.yaml"),
        );
        assert!(d.changed());
        assert!(
            d.changes
                .iter()
                .any(|c| c.old == Route::Rejected && c.new != Route::Rejected)
        );
        assert!(d.notes.iter().any(|n| n.contains("asia_pacific")));
    }
}
