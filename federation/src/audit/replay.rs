//! Replaying recorded route decisions under another policy: what a proposed
//! policy would have done to the traffic a decision log holds. Pure: it
//! reads records and a [`Policy`] and re-decides with
//! [`crate::policy::decide`].
//!
//! Each `route` record is re-decided with the attributes it keeps and the
//! federation as it saw it: `federation_view` (every region's health,
//! draining, full, hold-down, advertised load), or for records written
//! before that field, the states its candidates' verdicts show (a region
//! neither lists is assumed alive and counted). A candidate whose forward
//! failed counts as down. Tags are the new policy's (what the regions
//! would hold under it).
//!
//! Values withheld by [`super::minimise`] are taken from another record of
//! the same task that keeps them (the owner's `forwarded_in` or `route`
//! record, when its log is given too, and its input digest agrees);
//! otherwise a decision whose new rules or data-class requirements read a
//! withheld attribute cannot be replayed and is listed as such.
//!
//! Reported: how many decisions change destination or outcome, grouped by
//! rule, data class and destination, with examples; every decision that
//! would now be placed in a region lacking a tag the old decision required
//! (a `requires` broken), or lacking a tag the old placement had.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use super::{Record, kind};
use crate::policy::{
    AttrValue, Attributes, FederationView, Health, Load, Outcome, Policy, RegionView, decide,
};

/// How many examples each group keeps.
const EXAMPLES: usize = 3;

/// A record with the log it came from.
#[derive(Debug, Clone)]
pub struct Sourced {
    /// The log (a path or a controller address).
    pub source: String,
    /// The record.
    pub record: Record,
}

/// What changes, for one group of decisions.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    /// The old decision's rule label (`-` when none matched).
    pub old_rule: String,
    /// The new decision's rule label.
    pub new_rule: String,
    /// The `data_class` attribute (`-` absent, `<withheld>` not kept).
    pub data_class: String,
    /// Where it went: a region or `rejected`.
    pub old_destination: String,
    /// Where it would go.
    pub new_destination: String,
    /// How many decisions.
    pub count: u64,
    /// Some of them.
    pub examples: Vec<Example>,
}

/// One replayed decision, as an example.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Example {
    /// The log.
    pub source: String,
    /// The record's seq.
    pub seq: u64,
    /// The task.
    pub task_id: Option<String>,
    /// When it was decided.
    pub time: String,
    /// The new decision's reason.
    pub new_reason: String,
}

/// A decision the new policy would place against what the old one kept.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Breach {
    /// `requires` (a tag the old decision required) or `tag_dropped` (a tag
    /// the old placement held).
    pub kind: &'static str,
    /// The tags concerned.
    pub tags: Vec<String>,
    /// Old and new destinations.
    pub old_destination: String,
    /// Where the new policy would place it.
    pub new_destination: String,
    /// The decision.
    #[serde(flatten)]
    pub example: Example,
}

/// A decision that could not be replayed, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NotReplayed {
    /// The log.
    pub source: String,
    /// The record's seq.
    pub seq: u64,
    /// The task.
    pub task_id: Option<String>,
    /// Why not.
    pub why: String,
}

/// The result of [`replay`].
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReplayReport {
    /// The new policy's hash.
    pub policy_hash: String,
    /// Route records considered (after `since`).
    pub decisions: u64,
    /// Re-decided.
    pub replayed: u64,
    /// Re-decided to the same destination and outcome.
    pub unchanged: u64,
    /// Re-decided to another destination or outcome.
    pub changed: u64,
    /// Replayed with withheld values taken from the owner's record.
    pub joined: u64,
    /// Replayed with a region state assumed (not in the record).
    pub assumed_states: u64,
    /// Changes by rule, data class and destination.
    pub groups: Vec<Group>,
    /// New placements that break a requirement or drop a tag.
    pub breaches: Vec<Breach>,
    /// Decisions that could not be replayed.
    pub not_replayed: Vec<NotReplayed>,
}

impl ReplayReport {
    /// True when some decision would change, break a requirement or drop
    /// a tag, or could not be replayed (fail closed: a decision not
    /// replayed is not known to stay the same).
    pub fn has_changes(&self) -> bool {
        self.changed > 0 || !self.breaches.is_empty() || !self.not_replayed.is_empty()
    }
}

/// One region's state as a record shows it.
#[derive(Debug, Clone)]
struct Seen {
    health: Health,
    draining: bool,
    full: bool,
    held_down: bool,
    tags: Option<BTreeSet<String>>,
    load: Option<Load>,
}

/// The federation as the record saw it, with the new policy's tags.
struct ReplayView<'a> {
    policy: &'a Policy,
    seen: &'a BTreeMap<String, Seen>,
    assumed: std::cell::Cell<bool>,
}

impl FederationView for ReplayView<'_> {
    fn region(&self, name: &str) -> Option<RegionView> {
        let region = self.policy.region(name)?;
        let seen = self.seen.get(name);
        if seen.is_none() {
            self.assumed.set(true);
        }
        Some(RegionView {
            health: seen.map_or(Health::Alive, |s| s.health),
            draining: seen.is_some_and(|s| s.draining),
            full: seen.is_some_and(|s| s.full),
            held_down: seen.is_some_and(|s| s.held_down),
            tags: region.shared_tags.clone(),
            load: seen.and_then(|s| s.load),
        })
    }
}

/// An attribute value from its JSON form in a record.
pub fn attr_value_from_json(v: &Value) -> Option<AttrValue> {
    Some(match v {
        Value::String(s) => AttrValue::Str(s.clone()),
        Value::Bool(b) => AttrValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AttrValue::Int(i),
            None => AttrValue::Double(n.as_f64()?),
        },
        Value::Array(items) => AttrValue::List(
            items
                .iter()
                .map(attr_value_from_json)
                .collect::<Option<_>>()?,
        ),
        Value::Null | Value::Object(_) => return None,
    })
}

fn attributes_of(r: &Record) -> Option<Attributes> {
    let Value::Object(map) = r.entry.attributes.as_ref()? else {
        return None;
    };
    map.iter()
        .map(|(k, v)| attr_value_from_json(v).map(|v| (k.clone(), v)))
        .collect()
}

fn withheld_of(r: &Record) -> BTreeSet<String> {
    r.entry
        .attributes_withheld
        .as_ref()
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn input_digest_of(r: &Record) -> Option<(&str, &str)> {
    let d = r.entry.attributes_digest.as_ref()?;
    Some((d.get("key")?.as_str()?, d.get("input")?.as_str()?))
}

fn health_of(name: &str) -> Option<Health> {
    Some(match name {
        "alive" => Health::Alive,
        "suspect" => Health::Suspect,
        "dead" => Health::Dead,
        "unknown" => Health::Unknown,
        _ => return None,
    })
}

/// The region states a record shows.
fn seen_of(r: &Record) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(view)) = &r.entry.federation_view {
        for (name, v) in view {
            let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            let load = v.get("load").and_then(|l| {
                let n = |k: &str| {
                    l.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|x| u32::try_from(x).ok())
                };
                Some(Load {
                    total_slots: n("total_slots")?,
                    free_slots: n("free_slots")?,
                    queue_depth: n("queue_depth")?,
                })
            });
            out.insert(
                name.clone(),
                Seen {
                    health: v
                        .get("health")
                        .and_then(Value::as_str)
                        .and_then(health_of)
                        .unwrap_or(Health::Unknown),
                    draining: flag("draining"),
                    full: flag("full"),
                    held_down: flag("held_down"),
                    tags: v.get("tags").and_then(Value::as_array).map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    }),
                    load,
                },
            );
        }
    }
    // The candidates' verdicts: the only states older records keep, and
    // what the router learnt after deciding (a failed forward).
    let candidates = r
        .entry
        .decision
        .as_ref()
        .and_then(|d| d.get("candidates"))
        .and_then(Value::as_array);
    for c in candidates.into_iter().flatten() {
        let Some(region) = c.get("region").and_then(Value::as_str) else {
            continue;
        };
        let refusal = c.get("refusal").and_then(Value::as_str);
        let entry = out.entry(region.to_string()).or_insert(Seen {
            health: Health::Alive,
            draining: false,
            full: false,
            held_down: false,
            tags: None,
            load: None,
        });
        match refusal {
            Some("dead") | Some("forward_failed") => entry.health = Health::Dead,
            Some("unknown") => entry.health = Health::Unknown,
            Some("draining") => entry.draining = true,
            Some("full") => entry.full = true,
            Some("hold_down") => entry.held_down = true,
            _ => {}
        }
    }
    out
}

fn destination(outcome: Option<&str>, region: Option<&str>) -> String {
    match (outcome, region) {
        (Some("rejected"), _) | (_, None) => "rejected".to_string(),
        (_, Some(r)) => r.to_string(),
    }
}

fn required_tags_of(r: &Record) -> BTreeSet<String> {
    r.entry
        .decision
        .as_ref()
        .and_then(|d| d.get("required_tags"))
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The attributes the new policy's decision would read, for `attrs`: the
/// conditions of the rules up to the first that matches (all when none
/// does) and, when one matches, the data-class requirements.
fn reads_of(policy: &Policy, attrs: &Attributes) -> BTreeSet<String> {
    let mut reads = BTreeSet::new();
    let matched = policy.match_rule(attrs).rule;
    for rule in &policy.rules {
        if let Some(c) = &rule.condition {
            reads.extend(c.reads());
        }
        if Some(rule.index) == matched {
            for q in &policy.requirements {
                reads.extend(q.condition.reads());
            }
            break;
        }
    }
    reads
}

/// A record keeping every value of its task: the attributes and its input
/// digest (key id, hex).
type Full<'r> = (Attributes, Option<(&'r str, &'r str)>);

/// Re-decides every `route` record at or after `since_ms` under `policy`.
pub fn replay(records: &[Sourced], policy: &Policy, since_ms: Option<i64>) -> ReplayReport {
    // Records that keep every value, by task: where withheld values come from.
    let mut full: BTreeMap<&str, Full<'_>> = BTreeMap::new();
    for s in records {
        let r = &s.record;
        if !matches!(r.entry.kind.as_str(), kind::ROUTE | kind::FORWARDED_IN)
            || !withheld_of(r).is_empty()
        {
            continue;
        }
        if let (Some(task), Some(attrs)) = (r.entry.task_id.as_deref(), attributes_of(r)) {
            full.entry(task).or_insert((attrs, input_digest_of(r)));
        }
    }

    let mut report = ReplayReport {
        policy_hash: policy.hash.clone(),
        ..ReplayReport::default()
    };
    let mut groups: BTreeMap<(String, String, String, String, String), Group> = BTreeMap::new();
    for s in records {
        let r = &s.record;
        if r.entry.kind != kind::ROUTE || r.entry.decision.is_none() {
            continue;
        }
        if since_ms.is_some_and(|t| r.unix_ms < t) {
            continue;
        }
        report.decisions += 1;
        let not_replayed = |why: String| NotReplayed {
            source: s.source.clone(),
            seq: r.seq,
            task_id: r.entry.task_id.clone(),
            why,
        };
        let Some(mut attrs) = attributes_of(r) else {
            report.not_replayed.push(not_replayed(
                "the record keeps no readable attributes".into(),
            ));
            continue;
        };
        let mut withheld = withheld_of(r);
        if !withheld.is_empty() {
            let joined = r.entry.task_id.as_deref().and_then(|t| full.get(t));
            if let Some((all, digest)) = joined {
                let agrees = match (input_digest_of(r), digest) {
                    (Some((k1, d1)), Some((k2, d2))) if k1 == *k2 => d1 == *d2,
                    _ => true,
                };
                if agrees && withheld.iter().all(|w| all.contains_key(w)) {
                    attrs = all.clone();
                    withheld.clear();
                    report.joined += 1;
                }
            }
        }
        if !withheld.is_empty() {
            let needed: Vec<String> = reads_of(policy, &attrs)
                .intersection(&withheld)
                .cloned()
                .collect();
            if !needed.is_empty() {
                report.not_replayed.push(not_replayed(format!(
                    "the new policy reads {}, withheld in this record (give the owner region's log too)",
                    needed.join(", ")
                )));
                continue;
            }
        }
        let seen = seen_of(r);
        let view = ReplayView {
            policy,
            seen: &seen,
            assumed: std::cell::Cell::new(false),
        };
        let new = decide(policy, &attrs, &view);
        if view.assumed.get() {
            report.assumed_states += 1;
        }
        report.replayed += 1;

        let old_dest = destination(r.outcome(), r.chosen_region());
        let mut new_dest = destination(Some(new.outcome.kind()), new.outcome.region());
        // A set of primaries balances by load and draw: the old member is
        // as good an outcome as the one this replay's draw picked.
        if matches!(new.outcome, Outcome::Routed { .. })
            && new.candidates.iter().any(|c| {
                c.accepted() && c.role == crate::policy::Role::Primary && *c.region == *old_dest
            })
        {
            new_dest = old_dest.clone();
        }
        let old_outcome = r.outcome().unwrap_or("rejected");
        let example = Example {
            source: s.source.clone(),
            seq: r.seq,
            task_id: r.entry.task_id.clone(),
            time: r.time.clone(),
            new_reason: new.reason.clone(),
        };
        // What the new placement lacks.
        if let Some(region) = new.outcome.region().and_then(|n| policy.region(n)) {
            let lacking: Vec<String> = required_tags_of(r)
                .difference(&region.tags)
                .cloned()
                .collect();
            if !lacking.is_empty() {
                report.breaches.push(Breach {
                    kind: "requires",
                    tags: lacking,
                    old_destination: old_dest.clone(),
                    new_destination: new_dest.clone(),
                    example: example.clone(),
                });
            }
            let old_tags = seen
                .get(&old_dest)
                .and_then(|s| s.tags.clone())
                .or_else(|| policy.region(&old_dest).map(|r| r.tags.clone()));
            if let Some(old_tags) = old_tags.filter(|_| old_dest != region.name) {
                let dropped: Vec<String> = old_tags.difference(&region.tags).cloned().collect();
                if !dropped.is_empty() {
                    report.breaches.push(Breach {
                        kind: "tag_dropped",
                        tags: dropped,
                        old_destination: old_dest.clone(),
                        new_destination: new_dest.clone(),
                        example: example.clone(),
                    });
                }
            }
        }
        if new_dest == old_dest && new.outcome.kind() == old_outcome {
            report.unchanged += 1;
            continue;
        }
        report.changed += 1;
        let old_rule = r
            .entry
            .decision
            .as_ref()
            .and_then(|d| d.get("rule"))
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string();
        let new_rule = new.rule.clone().unwrap_or_else(|| "-".into());
        let data_class = match attrs.get("data_class") {
            Some(AttrValue::Str(s)) => s.clone(),
            Some(other) => other.to_string(),
            None if withheld.contains("data_class") => "<withheld>".into(),
            None => "-".into(),
        };
        let key = (
            old_rule.clone(),
            new_rule.clone(),
            data_class.clone(),
            old_dest.clone(),
            new_dest.clone(),
        );
        let g = groups.entry(key).or_insert_with(|| Group {
            old_rule,
            new_rule,
            data_class,
            old_destination: old_dest,
            new_destination: new_dest,
            count: 0,
            examples: Vec::new(),
        });
        g.count += 1;
        if g.examples.len() < EXAMPLES {
            g.examples.push(example);
        }
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    report.groups = groups;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::minimise::Kept;
    use crate::audit::{DecisionLog, Prepared, show};
    use crate::policy::StaticView;

    const SEED: &str = federation_sandbox::SEED_POLICY;
    const REQUIRES: &str = federation_sandbox::SEED_REQUIRES_GDPR;

    fn policy(text: &str) -> Policy {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, text).expect("write");
        Policy::load_file(&path).expect("loads")
    }

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), AttrValue::Str(v.to_string())))
            .collect()
    }

    /// Records a decision of `p` for `a` with `down` regions dead, as the
    /// router would (held or not).
    async fn record(
        log: &DecisionLog,
        p: &Policy,
        a: &Attributes,
        down: &[&str],
        held: bool,
        task: &str,
    ) {
        let sv = StaticView {
            down: down.iter().map(|s| s.to_string()).collect(),
            ..StaticView::default()
        };
        let view = sv.bind(p);
        let d = decide(p, a, &view);
        let states = p.view_states(&view);
        let kept = Kept::new(p, None, held, a, &d, None);
        log.append(Prepared::kept(
            kind::ROUTE,
            Some(task),
            Some("north_america"),
            &kept,
            Some(&states),
        ))
        .await
        .expect("append");
    }

    fn read(dir: &std::path::Path) -> Vec<Sourced> {
        show(dir, &super::super::Filter::default())
            .expect("show")
            .into_iter()
            .map(|record| Sourced {
                source: "na".into(),
                record,
            })
            .collect()
    }

    #[tokio::test]
    async fn replay_counts_changes_breaches_and_what_it_could_not_replay() {
        let seed = policy(SEED);
        let dir = tempfile::tempdir().expect("tmp");
        let log = DecisionLog::open(dir.path(), "north_america").expect("open");
        // DE with europe down: failed over to north_america under the seed.
        record(
            &log,
            &seed,
            &attrs(&[("customer_region", "DE")]),
            &["europe"],
            true,
            "t1",
        )
        .await;
        // US, everything up: unchanged by the variant.
        record(
            &log,
            &seed,
            &attrs(&[("customer_region", "US")]),
            &[],
            true,
            "t2",
        )
        .await;
        // DE with an e-mail withheld, europe up.
        record(
            &log,
            &seed,
            &attrs(&[("customer_region", "DE"), ("email", "a@b.eu")]),
            &[],
            false,
            "t3",
        )
        .await;
        let records = read(dir.path());

        // The same policy: nothing changes (the region states are the
        // recorded ones, europe still down for t1).
        let same = replay(&records, &seed, None);
        assert_eq!(
            (same.decisions, same.replayed, same.changed),
            (3, 3, 0),
            "{same:?}"
        );
        assert!(
            same.breaches.is_empty() && same.not_replayed.is_empty(),
            "{same:?}"
        );
        assert_eq!(same.assumed_states, 0);

        // Requiring GDPR: t1 would now be rejected.
        let strict = replay(&records, &policy(REQUIRES), None);
        assert_eq!(strict.changed, 1, "{strict:?}");
        let g = &strict.groups[0];
        assert_eq!(
            (
                g.old_destination.as_str(),
                g.new_destination.as_str(),
                g.count
            ),
            ("north_america", "rejected", 1)
        );
        assert_eq!(g.examples[0].task_id.as_deref(), Some("t1"));

        // Back from the strict variant to the seed: a DE task rejected with
        // europe down would now reach north_america, breaking `requires`.
        let dir2 = tempfile::tempdir().expect("tmp");
        let log2 = DecisionLog::open(dir2.path(), "north_america").expect("open");
        let strict_p = policy(REQUIRES);
        record(
            &log2,
            &strict_p,
            &attrs(&[("customer_region", "DE")]),
            &["europe"],
            false,
            "t4",
        )
        .await;
        record(
            &log2,
            &strict_p,
            &attrs(&[("customer_region", "FR")]),
            &[],
            false,
            "t5",
        )
        .await;
        let loose = replay(&read(dir2.path()), &seed, None);
        assert_eq!(loose.changed, 1, "{loose:?}");
        let b = loose
            .breaches
            .iter()
            .find(|b| b.kind == "requires")
            .expect("requires broken");
        assert_eq!(b.tags, vec!["GDPR".to_string()]);
        assert_eq!(b.example.task_id.as_deref(), Some("t4"));

        // A new rule reading the withheld attribute: t3 cannot be replayed.
        let reads_email = SEED.replace(
            "    - condition: \"customer_region in ['UK', 'DE', 'FR']\"",
            "    - condition: \"email.endsWith('.eu')\"\n      primary_region: \"europe\"\n    - condition: \"customer_region in ['UK', 'DE', 'FR']\"",
        );
        let r = replay(&records, &policy(&reads_email), None);
        assert_eq!(r.not_replayed.len(), 1, "{r:?}");
        assert_eq!(r.not_replayed[0].task_id.as_deref(), Some("t3"));
        assert!(r.not_replayed[0].why.contains("email"), "{r:?}");

        // --since drops older records.
        let later = replay(&records, &seed, Some(i64::MAX));
        assert_eq!(later.decisions, 0);
    }

    /// A record written before `federation_view` existed: the candidates'
    /// verdicts give the states (europe dead), a region they do not name is
    /// assumed alive and counted.
    #[tokio::test]
    async fn records_without_a_view_replay_from_their_verdicts() {
        let seed = policy(SEED);
        let dir = tempfile::tempdir().expect("tmp");
        let log = DecisionLog::open(dir.path(), "north_america").expect("open");
        let a = attrs(&[("customer_region", "DE")]);
        let sv = StaticView {
            down: ["europe".to_string()].into(),
            ..StaticView::default()
        };
        let d = decide(&seed, &a, &sv.bind(&seed));
        log.append(crate::audit::Entry::from_decision(kind::ROUTE, &a, &d).task("old"))
            .await
            .expect("append");
        let records = read(dir.path());
        assert!(records[0].record.entry.federation_view.is_none());
        let same = replay(&records, &seed, None);
        assert_eq!(
            (same.replayed, same.changed, same.assumed_states),
            (1, 0, 0),
            "{same:?}"
        );
        let to_ap = SEED.replace(
            "      primary_region: \"europe\"\n      backup_region: \"north_america\"",
            "      primary_region: \"europe\"\n      backup_region: \"asia_pacific\"",
        );
        let r = replay(&records, &policy(&to_ap), None);
        assert_eq!((r.changed, r.assumed_states), (1, 1), "{r:?}");
        assert_eq!(r.groups[0].new_destination, "asia_pacific");
    }
}
