//! Conversions between the gRPC messages (`federation_api`) and the domain
//! types (`policy`). Validation of untrusted request fields lives here too, so
//! every handler checks input the same way and names the offending field.

use federation_api as api;

use crate::config::Limits;
use crate::error::Error;
use crate::policy::{AttrValue, Attributes, Candidate, Decision, Outcome, Role};

/// Nesting depth allowed for list attributes.
const MAX_LIST_DEPTH: usize = 4;

/// Converts and validates request attributes against the limits.
pub fn attributes_from_wire(
    attrs: &std::collections::HashMap<String, api::AttributeValue>,
    limits: &Limits,
) -> Result<Attributes, Error> {
    if attrs.is_empty() {
        return Err(Error::invalid(
            "attributes",
            "at least one attribute is required (routing rules read them)",
        ));
    }
    if attrs.len() > limits.max_attributes {
        return Err(Error::limit(
            "attributes",
            format!(
                "{} attributes, more than the limit of {}",
                attrs.len(),
                limits.max_attributes
            ),
        ));
    }
    let mut out = Attributes::new();
    for (key, value) in attrs {
        if key.is_empty() || key.len() > limits.max_attribute_len {
            return Err(Error::invalid(
                "attributes",
                format!(
                    "attribute name must be 1 to {} bytes",
                    limits.max_attribute_len
                ),
            ));
        }
        if !is_identifier(key) {
            return Err(Error::invalid(
                &format!("attributes[{key}]"),
                "attribute names must be identifiers ([A-Za-z_][A-Za-z0-9_]*) so rules can name them",
            ));
        }
        let v = value_from_wire(value, limits, 0)
            .map_err(|why| Error::invalid(&format!("attributes[{key}]"), why))?;
        out.insert(key.clone(), v);
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn value_from_wire(
    v: &api::AttributeValue,
    limits: &Limits,
    depth: usize,
) -> Result<AttrValue, String> {
    use api::attribute_value::Kind;
    match &v.kind {
        None => Err("value is empty (set one of string/int/double/bool/list)".into()),
        Some(Kind::StringValue(s)) if s.len() > limits.max_attribute_len => Err(format!(
            "string of {} bytes exceeds the limit of {}",
            s.len(),
            limits.max_attribute_len
        )),
        Some(Kind::StringValue(s)) => Ok(AttrValue::Str(s.clone())),
        Some(Kind::IntValue(i)) => Ok(AttrValue::Int(*i)),
        Some(Kind::DoubleValue(d)) if d.is_finite() => Ok(AttrValue::Double(*d)),
        Some(Kind::DoubleValue(_)) => Err("double must be finite".into()),
        Some(Kind::BoolValue(b)) => Ok(AttrValue::Bool(*b)),
        Some(Kind::ListValue(list)) => {
            if depth >= MAX_LIST_DEPTH {
                return Err(format!("lists nest deeper than {MAX_LIST_DEPTH}"));
            }
            if list.values.len() > limits.max_attributes {
                return Err(format!(
                    "list of {} items exceeds the limit of {}",
                    list.values.len(),
                    limits.max_attributes
                ));
            }
            list.values
                .iter()
                .map(|x| value_from_wire(x, limits, depth + 1))
                .collect::<Result<Vec<_>, _>>()
                .map(AttrValue::List)
        }
    }
}

/// Converts a domain attribute to the wire.
pub fn value_to_wire(v: &AttrValue) -> api::AttributeValue {
    use api::attribute_value::Kind;
    let kind = match v {
        AttrValue::Str(s) => Kind::StringValue(s.clone()),
        AttrValue::Int(i) => Kind::IntValue(*i),
        AttrValue::Double(d) => Kind::DoubleValue(*d),
        AttrValue::Bool(b) => Kind::BoolValue(*b),
        AttrValue::List(items) => Kind::ListValue(api::AttributeList {
            values: items.iter().map(value_to_wire).collect(),
        }),
    };
    api::AttributeValue { kind: Some(kind) }
}

/// Converts domain attributes to the wire map.
pub fn attributes_to_wire(
    attrs: &Attributes,
) -> std::collections::HashMap<String, api::AttributeValue> {
    attrs
        .iter()
        .map(|(k, v)| (k.clone(), value_to_wire(v)))
        .collect()
}

/// Converts a task's stored wire attributes back to domain attributes
/// (already validated when the task was accepted; invalid values are dropped).
pub fn attributes_lossy(
    attrs: &std::collections::HashMap<String, api::AttributeValue>,
) -> Attributes {
    let limits = Limits {
        max_attributes: usize::MAX,
        max_attribute_len: usize::MAX,
        ..Limits::default()
    };
    attrs
        .iter()
        .filter_map(|(k, v)| value_from_wire(v, &limits, 0).ok().map(|v| (k.clone(), v)))
        .collect()
}

/// Converts a decision to the wire.
pub fn decision_to_wire(d: &Decision) -> api::RouteDecision {
    let balance = d.balance.as_ref().map(crate::policy::BalanceNote::explain);
    api::RouteDecision {
        matched: d.rule_index.is_some(),
        rule_index: d.rule_index.map(|i| i as u32).unwrap_or_default(),
        rule: d.rule.clone().unwrap_or_default(),
        required_tags: d.required_tags.iter().cloned().collect(),
        candidates: d
            .candidates
            .iter()
            .map(|c| candidate_to_wire(c, balance.as_ref()))
            .collect(),
        region: d.outcome.region().unwrap_or_default().to_string(),
        outcome: d.outcome.kind().to_string(),
        reason: d.reason.clone(),
        policy_hash: d.policy_hash.clone(),
        warnings: d.warnings.clone(),
        balance_mode: balance
            .as_ref()
            .map(|b| b.mode.to_string())
            .unwrap_or_default(),
        affinity_digest: balance
            .as_ref()
            .and_then(|b| b.affinity_digest.clone())
            .unwrap_or_default(),
        balance: balance.map(|b| b.why).unwrap_or_default(),
    }
}

/// The load a set member was seen with, and its share of the draw.
fn load_to_wire(
    region: &str,
    balance: Option<&crate::policy::BalanceExplanation>,
) -> (Option<api::Capacity>, u32) {
    let Some(seen) = balance.and_then(|b| b.loads.iter().find(|l| &*l.region == region)) else {
        return (None, 0);
    };
    let load = seen.advertised.then_some(api::Capacity {
        total_slots: seen.total_slots,
        free_slots: seen.free_slots,
        queue_depth: seen.queue_depth,
        queue_limit: 0,
    });
    (load, seen.share_ppm)
}

/// [`decision_to_wire`] that moves the strings instead of copying them.
pub fn decision_into_wire(d: Decision) -> api::RouteDecision {
    let region = d.outcome.region().unwrap_or_default().to_string();
    let balance = d.balance.as_ref().map(crate::policy::BalanceNote::explain);
    api::RouteDecision {
        matched: d.rule_index.is_some(),
        rule_index: d.rule_index.map(|i| i as u32).unwrap_or_default(),
        outcome: d.outcome.kind().to_string(),
        rule: d.rule.unwrap_or_default(),
        required_tags: d.required_tags.into_iter().collect(),
        candidates: d
            .candidates
            .into_iter()
            .map(|c| {
                let (load, share_ppm) = load_to_wire(&c.region, balance.as_ref());
                api::CandidateVerdict {
                    role: role_name(c.role).to_string(),
                    accepted: c.accepted(),
                    reason: c.refusal.map(|r| r.as_str()).unwrap_or("ok").to_string(),
                    region: c.region.to_string(),
                    detail: c.detail,
                    load,
                    share_ppm,
                }
            })
            .collect(),
        region,
        reason: d.reason,
        policy_hash: d.policy_hash,
        warnings: d.warnings,
        balance_mode: balance
            .as_ref()
            .map(|b| b.mode.to_string())
            .unwrap_or_default(),
        affinity_digest: balance
            .as_ref()
            .and_then(|b| b.affinity_digest.clone())
            .unwrap_or_default(),
        balance: balance.map(|b| b.why).unwrap_or_default(),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    }
}

fn candidate_to_wire(
    c: &Candidate,
    balance: Option<&crate::policy::BalanceExplanation>,
) -> api::CandidateVerdict {
    let (load, share_ppm) = load_to_wire(&c.region, balance);
    api::CandidateVerdict {
        region: c.region.to_string(),
        role: role_name(c.role).to_string(),
        accepted: c.accepted(),
        reason: c.refusal.map(|r| r.as_str()).unwrap_or("ok").to_string(),
        detail: c.detail.clone(),
        load,
        share_ppm,
    }
}

/// The region part of a task id (`<uuid>.<region>`), if well-formed.
pub fn owner_of(task_id: &str) -> Option<&str> {
    let (uuid, region) = task_id.split_once('.')?;
    (uuid.len() == 36 && !region.is_empty()).then_some(region)
}

/// A new task id owned by `region`: time-ordered UUIDv7 plus the owner.
pub fn new_task_id(region: &str) -> String {
    format!("{}.{region}", uuid::Uuid::now_v7())
}

/// Validates a task id from a request.
pub fn check_task_id(task_id: &str) -> Result<(), Error> {
    if task_id.is_empty() {
        return Err(Error::invalid("task_id", "is empty"));
    }
    if task_id.len() > 200 || owner_of(task_id).is_none() {
        return Err(Error::invalid(
            "task_id",
            format!(
                "`{}` is not a task id (<uuid>.<region>)",
                truncate(task_id, 80)
            ),
        ));
    }
    Ok(())
}

/// Validates an idempotency key: empty, or 1 to 128 printable ASCII characters.
pub fn check_idempotency_key(key: &str) -> Result<(), Error> {
    if key.len() > 128 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::invalid(
            "idempotency_key",
            "must be 1 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

pub use crate::text::truncate;

/// True when the outcome placed the task.
pub fn placed(outcome: &Outcome) -> bool {
    outcome.region().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn s(v: &str) -> api::AttributeValue {
        value_to_wire(&AttrValue::Str(v.into()))
    }

    #[test]
    fn attributes_round_trip_and_validate() {
        let limits = Limits::default();
        let mut m = HashMap::new();
        m.insert("customer_region".to_string(), s("DE"));
        m.insert(
            "tags".to_string(),
            value_to_wire(&AttrValue::List(vec![
                AttrValue::Int(1),
                AttrValue::Bool(true),
            ])),
        );
        let attrs = attributes_from_wire(&m, &limits).expect("valid");
        assert_eq!(attributes_to_wire(&attrs), m);

        assert!(attributes_from_wire(&HashMap::new(), &limits).is_err());
        let mut bad = HashMap::new();
        bad.insert("bad key".to_string(), s("x"));
        let err = attributes_from_wire(&bad, &limits).expect_err("bad name");
        assert!(err.to_string().contains("attributes[bad key]"), "{err}");
        let mut big = HashMap::new();
        big.insert(
            "k".to_string(),
            s(&"x".repeat(limits.max_attribute_len + 1)),
        );
        assert!(attributes_from_wire(&big, &limits).is_err());
        let mut empty = HashMap::new();
        empty.insert("k".to_string(), api::AttributeValue { kind: None });
        assert!(attributes_from_wire(&empty, &limits).is_err());
    }

    #[test]
    fn decision_into_wire_matches_decision_to_wire() {
        use crate::policy::{Outcome, Refusal};
        let d = Decision {
            outcome: Outcome::Failover { region: "b".into() },
            rule_index: Some(1),
            rule: Some("rule 2".into()),
            required_tags: ["GDPR".to_string()].into(),
            candidates: vec![
                Candidate {
                    region: "a".into(),
                    role: Role::Primary,
                    refusal: Some(Refusal::Dead),
                    detail: "dead".into(),
                },
                Candidate {
                    region: "b".into(),
                    role: Role::Backup,
                    refusal: None,
                    detail: String::new(),
                },
            ],
            reason: "why".into(),
            policy_hash: "h".into(),
            warnings: vec!["w".into()],
            evaluation_errors: vec![],
            balance: None,
        };
        assert_eq!(decision_into_wire(d.clone()), decision_to_wire(&d));
        let mut set = d.clone();
        set.balance = Some(
            crate::policy::BalanceExplanation {
                mode: "least_loaded",
                affinity: None,
                affinity_digest: Some("ab".into()),
                draw_ppm: Some(5),
                loads: vec![crate::policy::LoadSeen {
                    region: "a".into(),
                    advertised: true,
                    total_slots: 4,
                    free_slots: 1,
                    queue_depth: 2,
                    share_ppm: 10,
                }],
                why: "drew".into(),
            }
            .into(),
        );
        let wire = decision_to_wire(&set);
        assert_eq!(decision_into_wire(set), wire);
        assert_eq!(wire.candidates[0].load.map(|l| l.free_slots), Some(1));
        assert_eq!(wire.candidates[0].share_ppm, 10);
        assert_eq!(wire.affinity_digest, "ab");
    }

    #[test]
    fn task_ids_carry_their_owner() {
        let id = new_task_id("europe");
        assert_eq!(owner_of(&id), Some("europe"));
        assert!(check_task_id(&id).is_ok());
        assert!(check_task_id("nope").is_err());
        assert!(check_task_id("").is_err());
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(check_idempotency_key("order-42").is_ok());
        assert!(check_idempotency_key("has space").is_err());
        assert!(check_idempotency_key(&"k".repeat(129)).is_err());
    }
}
