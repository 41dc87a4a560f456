//! The federation view behind the status page: what this controller sees of
//! every region (state, tags, capacity, advertisement age, hold-down,
//! drains), the map's geometry, the policy audit's compliance findings,
//! recent decisions of every region (this log's, and peers' fetched over the
//! peer channel, [`remote`]), and per-rule counters — as one [`View`] that
//! the admin port renders as HTML (askama, auto-escaped) or JSON.
//!
//! Who sees what: the viewer's role comes from a bearer token of the token
//! file ([`Viewer::from_headers`]); every attribute value shown passes
//! through [`attribute_display`], the one place that decides.

pub mod map;
pub mod remote;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use federation_tls::Role;
use serde::Serialize;
use serde_json::Value;

use crate::audit::Record;
use crate::controller::Node;
use crate::policy::Policy;

/// How many decisions the view lists (newest first, all regions together).
pub const RECENT: usize = 40;

/// Bytes read back from the end of this controller's log for the view.
const LOG_TAIL_BYTES: u64 = 8 * 1024 * 1024;

/// Who is looking at the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    /// The role of the presented token; `None` for an anonymous viewer.
    pub role: Option<Role>,
    /// Plaintext `--insecure` mode: anonymous callers pass every gRPC check,
    /// so the page hides nothing from them either.
    pub insecure: bool,
}

impl Viewer {
    /// The viewer of a request: `Authorization: Bearer <token>`, or HTTP
    /// Basic with the token as the password (what a browser sends after
    /// `/login`), looked up in the controller's token file. A token that is
    /// not in the file counts as none.
    pub fn from_headers(auth: &crate::auth::Auth, headers: &http::HeaderMap) -> Self {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(token_of);
        Self {
            role: token.and_then(|t| auth.tokens.lookup(&t).map(|id| id.role)),
            insecure: auth.insecure,
        }
    }

    /// True when the viewer may see attribute values at all: operators and
    /// auditors (the roles that may read the decision log over gRPC).
    pub fn may_see_values(&self) -> bool {
        self.insecure || matches!(self.role, Some(Role::Operator | Role::Auditor))
    }

    /// The role's name, or `anonymous`.
    pub fn name(&self) -> &'static str {
        match self.role {
            Some(r) => r.as_str(),
            None if self.insecure => "anonymous (insecure mode)",
            None => "anonymous",
        }
    }
}

/// The token in an `Authorization` header value: `Bearer <token>`, or
/// `Basic base64(user:token)` (the user name is ignored).
fn token_of(value: &str) -> Option<String> {
    use base64::Engine as _;
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    let b64 = value.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (_, password) = text.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// One attribute as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttrShown {
    /// The attribute's name (always shown).
    pub name: String,
    /// Its value as text; `None` when this viewer may not see it.
    pub value: Option<String>,
}

/// What of a record carries attribute values, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Displayed {
    /// The attributes: names always, values when the viewer may see them.
    pub attributes: Vec<AttrShown>,
    /// The record's reason (or note), with the values taken out when the
    /// viewer may not see them (a rejection names the attributes it read).
    pub reason: String,
}

/// The attributes (and the reason, which may quote them) of `record` as
/// `viewer` may see them on the page of the controller of `here`. Every
/// attribute value the status page shows goes through this function:
/// values only for roles that may see them, and only of records logged here
/// (a peer's records arrive without values, see [`remote`]: values stay in
/// the region that logged them). A residency rule for display (which regions
/// may show which rule's values) belongs here.
pub fn attribute_display(viewer: &Viewer, record: &Record, here: &str) -> Displayed {
    let reason = record.reason().unwrap_or("").to_string();
    let Some(Value::Object(attrs)) = record.entry.attributes.as_ref() else {
        return Displayed {
            attributes: Vec::new(),
            reason,
        };
    };
    let visible = viewer.may_see_values() && record.region == here;
    Displayed {
        attributes: attrs
            .iter()
            .map(|(name, v)| AttrShown {
                name: name.clone(),
                value: (visible && !v.is_null()).then(|| value_text(v)),
            })
            .collect(),
        reason: if visible {
            reason
        } else {
            without_quoted_values(&reason, attrs)
        },
    }
}

/// `text` with every `name=value` of `attrs` (as decision messages quote
/// attributes, [`crate::policy::format_attributes`]) replaced by `name=…`.
pub fn without_quoted_values(text: &str, attrs: &serde_json::Map<String, Value>) -> String {
    let mut out = text.to_string();
    for (name, v) in attrs {
        if v.is_null() {
            continue;
        }
        let quoted = format!("{name}={}", as_policy_text(v));
        out = out.replace(&quoted, &format!("{name}=…"));
    }
    out
}

/// A JSON attribute value as [`crate::policy::AttrValue`]'s `Display`
/// writes it (`'DE'`, `3`, `1.5`, `true`, `['a', 2]`).
fn as_policy_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .map_or_else(|| n.to_string(), |d| format!("{d:?}")),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(as_policy_text)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A region as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RegionRow {
    /// The region.
    pub name: String,
    /// `self`, `alive`, `suspect`, `dead` or `unknown`.
    pub state: String,
    /// Draining (takes no new tasks).
    pub draining: bool,
    /// Trusted compliance tags, `, `-separated.
    pub tags: String,
    /// Capacity (`free/total slots, queue n`), as last advertised.
    pub capacity: String,
    /// True when the capacity is not current (the region is dead or was
    /// never heard): the page shows it as the last one seen.
    pub capacity_stale: bool,
    /// Age of the freshest advertisement (`-` when never heard).
    pub ad_age: String,
    /// Time left in failback hold-down; empty when not held down.
    pub hold_down: String,
    /// Time since the state last changed; `-` when not since our start.
    pub state_age: String,
    /// Its policy differs from ours.
    pub policy_mismatch: bool,
    /// Log-head, snapshot and store problems.
    pub problems: Vec<String>,
    /// Map position (SVG user units).
    pub x: i32,
    /// Map position.
    pub y: i32,
}

/// A compliance finding of the policy audit.
#[derive(Debug, Clone, Serialize)]
pub struct Warning {
    /// `error`, `warning` or `info`.
    pub severity: String,
    /// Stable kind (`failover-drops-tag`, …).
    pub kind: String,
    /// The rule's label, when one is concerned.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

/// A decision as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRow {
    /// Append time (RFC 3339).
    pub time: String,
    /// Milliseconds since the Unix epoch (for ordering).
    pub unix_ms: i64,
    /// The region whose log holds the record.
    pub logged_by: String,
    /// Record kind (`route`, `forwarded_in`, …).
    pub kind: String,
    /// The task, when one.
    pub task: String,
    /// `routed`, `failover`, `rejected`, or empty.
    pub outcome: String,
    /// The chosen region.
    pub region: String,
    /// 1-based rule number, or empty.
    pub rule: String,
    /// The reason (or note).
    pub reason: String,
    /// Refused candidates: `region: reason (detail)`.
    pub refusals: Vec<String>,
    /// The attributes, through [`attribute_display`].
    pub attributes: Vec<AttrShown>,
}

/// Where the decisions of one region came from.
#[derive(Debug, Clone, Serialize)]
pub struct SourceNote {
    /// The region.
    pub region: String,
    /// `here`, `fetched 1.2s ago`, or why none are shown.
    pub note: String,
    /// True when the region's decisions are missing or old.
    pub stale: bool,
}

/// Decisions this controller counted, by rule.
#[derive(Debug, Clone, Serialize)]
pub struct RuleCounter {
    /// The rule's label (`rule 2 (eu): …`), or `no rule matched`.
    pub rule: String,
    /// Routed to a primary.
    pub routed: u64,
    /// Sent to a backup.
    pub failover: u64,
    /// Rejected.
    pub rejected: u64,
}

/// Everything the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// The federation's name.
    pub federation: String,
    /// This controller's region.
    pub self_region: String,
    /// This controller's epoch.
    pub epoch: u64,
    /// The policy hash, shortened.
    pub policy_hash: String,
    /// The viewer's role name.
    pub viewer: String,
    /// True when the viewer sees attribute values (of this region's records).
    pub values_visible: bool,
    /// When the view was made (RFC 3339).
    pub generated: String,
    /// Regions in priority order.
    pub regions: Vec<RegionRow>,
    /// The map.
    pub map: map::Map,
    /// The policy audit's findings, errors first.
    pub warnings: Vec<Warning>,
    /// The policy's residency map, inline SVG (`policy::map`, escaped
    /// there); not in `/view.json`, which has the findings.
    #[serde(skip)]
    pub residency_map: String,
    /// Recent decisions of every region, newest first.
    pub decisions: Vec<DecisionRow>,
    /// Where each region's decisions came from.
    pub sources: Vec<SourceNote>,
    /// Per-rule counters of this controller.
    pub rules: Vec<RuleCounter>,
    /// Undecodable task records of this region's store.
    pub store_undecodable: Vec<String>,
}

/// What the page shows of the policy itself: the audit's findings and the
/// residency map (`policy::map`), computed once per policy.
#[derive(Debug, Default)]
pub struct PolicyAudit {
    /// The audit's errors and warnings, errors first.
    pub warnings: Vec<Warning>,
    /// The residency map as inline SVG (every policy text escaped by
    /// `policy::map::to_svg`).
    pub residency_svg: String,
}

/// The policy audit's findings and map, computed once per policy.
#[derive(Debug, Default)]
pub struct AuditCache {
    cached: Mutex<Option<(String, Arc<PolicyAudit>)>>,
}

impl AuditCache {
    /// The findings and map of `policy` (computed off the async workers the
    /// first time a policy is seen).
    pub async fn findings(&self, policy: Arc<Policy>) -> Arc<PolicyAudit> {
        if let Some((hash, w)) = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            if *hash == policy.hash {
                return w.clone();
            }
        }
        let hash = policy.hash.clone();
        let computed = tokio::task::spawn_blocking(move || policy_audit(&policy))
            .await
            .unwrap_or_else(|e| PolicyAudit {
                warnings: vec![Warning {
                    severity: "error".into(),
                    kind: "audit-failed".into(),
                    rule: String::new(),
                    message: format!("the policy audit did not finish: {e}"),
                }],
                residency_svg: String::new(),
            });
        let w = Arc::new(computed);
        *self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((hash, w.clone()));
        w
    }
}

/// The audit of `policy` (one `analysis::check`): its errors and warnings
/// (not its `info` notes), errors first, and the residency map drawn from it.
pub fn policy_audit(policy: &Policy) -> PolicyAudit {
    let report = crate::policy::analysis::check(policy);
    let warnings = report
        .findings
        .iter()
        .filter(|f| f.severity != crate::policy::analysis::Severity::Info)
        .map(|f| Warning {
            severity: f.severity.as_str().to_string(),
            kind: f.kind.to_string(),
            rule: f.rule.clone().unwrap_or_default(),
            message: f.message.clone(),
        })
        .collect();
    let residency_svg = crate::policy::map::to_svg(&crate::policy::map::build(policy, &report));
    PolicyAudit {
        warnings,
        residency_svg,
    }
}

/// Builds the view of `node` for `viewer`, with the audit's `warnings` and
/// the peers' decisions `remote` holds.
pub async fn build(
    node: &Arc<Node>,
    viewer: &Viewer,
    audit: Arc<PolicyAudit>,
    remote: &remote::RemoteDecisions,
) -> View {
    let policy = node.policy();
    let status = node.status().report();
    let log = node.log().clone();
    let local = tokio::task::spawn_blocking(move || {
        log.recent(&crate::audit::Filter::default(), RECENT, LOG_TAIL_BYTES)
    })
    .await;
    let (local, local_note) = match local {
        Ok(Ok(records)) => (records, "here".to_string()),
        Ok(Err(e)) => (Vec::new(), format!("this log could not be read: {e}")),
        Err(e) => (Vec::new(), format!("this log could not be read: {e}")),
    };
    let mut sources = vec![SourceNote {
        region: node.region().to_string(),
        stale: local_note != "here",
        note: local_note,
    }];
    let mut records: Vec<Record> = local;
    for (region, fetched) in remote.fetched(&policy, node.region()) {
        sources.push(SourceNote {
            region,
            note: fetched.note,
            stale: fetched.stale,
        });
        records.extend(fetched.records);
    }
    records.sort_by_key(|r| std::cmp::Reverse(r.unix_ms));
    records.truncate(RECENT);
    let decisions = records
        .iter()
        .map(|r| decision_row(viewer, r, node.region()))
        .collect();

    let mut regions: Vec<RegionRow> = status.regions.iter().map(region_row).collect();
    let map = map::layout(&policy, node.region(), &mut regions);
    let store_undecodable = status
        .regions
        .iter()
        .flat_map(|r| r.store_undecodable.iter().cloned())
        .collect();
    View {
        federation: status.federation.clone(),
        self_region: status.self_region.clone(),
        epoch: status.epoch,
        policy_hash: status.policy_hash.chars().take(12).collect(),
        viewer: viewer.name().to_string(),
        values_visible: viewer.may_see_values(),
        generated: crate::cli::output::unix_ms_utc(crate::clock::now_unix_ms()),
        regions,
        map,
        warnings: audit.warnings.clone(),
        residency_map: audit.residency_svg.clone(),
        decisions,
        sources,
        rules: rule_counters(&policy, &node.metrics().decision_counts()),
        store_undecodable,
    }
}

fn region_row(r: &federation_api::RegionStatus) -> RegionRow {
    use crate::cli::output::human_ms;
    let c = r.capacity.unwrap_or_default();
    let capacity_stale = matches!(r.state.as_str(), "dead" | "unknown");
    let capacity = if r.capacity.is_none() {
        "-".to_string()
    } else {
        let limit = if c.queue_limit > 0 {
            format!("/{}", c.queue_limit)
        } else {
            String::new()
        };
        format!(
            "{}/{} slots free, queue {}{limit}",
            c.free_slots, c.total_slots, c.queue_depth
        )
    };
    let mut problems = Vec::new();
    for p in [&r.log_head_problem, &r.snapshot_problem] {
        if !p.is_empty() {
            problems.push(p.clone());
        }
    }
    if r.store_undecodable_records > 0 {
        problems.push(format!(
            "{} task records do not decode (see `federation store check`)",
            r.store_undecodable_records
        ));
    }
    RegionRow {
        name: r.region.clone(),
        state: r.state.clone(),
        draining: r.draining,
        tags: r.compliance_tags.join(", "),
        capacity,
        capacity_stale,
        ad_age: if r.state == "self" {
            "-".into()
        } else {
            human_ms(r.last_advertisement_age_ms)
        },
        hold_down: if r.hold_down_remaining_ms > 0 {
            human_ms(r.hold_down_remaining_ms)
        } else {
            String::new()
        },
        state_age: human_ms(r.state_age_ms),
        policy_mismatch: r.policy_mismatch,
        problems,
        x: 0,
        y: 0,
    }
}

fn decision_row(viewer: &Viewer, r: &Record, here: &str) -> DecisionRow {
    let refusals = r
        .entry
        .decision
        .as_ref()
        .and_then(|d| d.get("candidates"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    let refusal = c.get("refusal").and_then(Value::as_str)?;
                    let region = c.get("region").and_then(Value::as_str).unwrap_or("?");
                    let detail = c.get("detail").and_then(Value::as_str).unwrap_or("");
                    Some(if detail.is_empty() {
                        format!("{region}: {refusal}")
                    } else {
                        format!("{region}: {refusal} ({detail})")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let shown = attribute_display(viewer, r, here);
    DecisionRow {
        time: r.time.clone(),
        unix_ms: r.unix_ms,
        logged_by: r.region.clone(),
        kind: r.entry.kind.clone(),
        task: r.entry.task_id.clone().unwrap_or_default(),
        outcome: r.outcome().unwrap_or("").to_string(),
        region: r.chosen_region().unwrap_or("").to_string(),
        rule: r
            .rule_index()
            .map(|i| (i + 1).to_string())
            .unwrap_or_default(),
        reason: shown.reason,
        refusals,
        attributes: shown.attributes,
    }
}

/// Counters by rule in file order, then `no rule matched`; `counts` is keyed
/// by ([`crate::metrics::rule_label`], outcome).
fn rule_counters(policy: &Policy, counts: &BTreeMap<(String, String), u64>) -> Vec<RuleCounter> {
    let of = |label: &str, outcome: &str| {
        counts
            .get(&(label.to_string(), outcome.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let mut out: Vec<RuleCounter> = policy
        .rules
        .iter()
        .map(|rule| {
            let label = crate::metrics::rule_label(policy, Some(rule.index));
            RuleCounter {
                rule: rule.label(),
                routed: of(&label, "routed"),
                failover: of(&label, "failover"),
                rejected: of(&label, "rejected"),
            }
        })
        .collect();
    out.push(RuleCounter {
        rule: "no rule matched".into(),
        routed: 0,
        failover: 0,
        rejected: of("none", "rejected"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Entry;

    fn record(region: &str, value: &str) -> Record {
        Record {
            seq: 1,
            time: "t".into(),
            unix_ms: 1,
            region: region.into(),
            entry: Entry {
                kind: "route".into(),
                attributes: Some(serde_json::json!({"customer_region": value, "n": 3})),
                note: Some(format!(
                    "no routing rule matches these attributes (customer_region='{value}', n=3): rejected"
                )),
                ..Entry::default()
            },
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn values_only_for_roles_that_may_see_them_and_only_of_local_records() {
        let r = record("europe", "DE");
        let anonymous = Viewer {
            role: None,
            insecure: false,
        };
        let shown = attribute_display(&anonymous, &r, "europe");
        assert_eq!(shown.attributes.len(), 2);
        assert!(
            shown.attributes.iter().all(|a| a.value.is_none()),
            "{shown:?}"
        );
        assert_eq!(
            shown.reason,
            "no routing rule matches these attributes (customer_region=…, n=…): rejected"
        );
        for role in [Role::Client, Role::Agent, Role::Peer] {
            let v = Viewer {
                role: Some(role),
                insecure: false,
            };
            assert!(
                attribute_display(&v, &r, "europe")
                    .attributes
                    .iter()
                    .all(|a| a.value.is_none()),
                "{role:?}"
            );
        }
        for role in [Role::Operator, Role::Auditor] {
            let v = Viewer {
                role: Some(role),
                insecure: false,
            };
            let shown = attribute_display(&v, &r, "europe");
            assert_eq!(shown.attributes[0].value.as_deref(), Some("DE"), "{role:?}");
            assert_eq!(shown.attributes[1].value.as_deref(), Some("3"));
            assert!(
                shown.reason.contains("customer_region='DE', n=3"),
                "{shown:?}"
            );
            // Another region's record: never its values.
            let elsewhere = attribute_display(&v, &r, "north_america");
            assert!(elsewhere.attributes.iter().all(|a| a.value.is_none()));
            assert!(!elsewhere.reason.contains("DE"), "{elsewhere:?}");
        }
    }

    #[test]
    fn tokens_from_bearer_and_basic_headers() {
        assert_eq!(token_of("Bearer abc "), Some("abc".into()));
        // "op:s3cret-token-123"
        assert_eq!(
            token_of("Basic b3A6czNjcmV0LXRva2VuLTEyMw=="),
            Some("s3cret-token-123".into())
        );
        assert_eq!(token_of("Basic !!"), None);
        assert_eq!(token_of("Digest x"), None);
    }
}
