//! The routing decision of one task, for `GetTask`: the owner's decision-log
//! record that placed it (its first) (`route` when the client called the owner,
//! `forwarded_in` when another region forwarded it), found by bisecting the
//! log's files on time ([`crate::audit::tail`]) or, for a log in the
//! region's database, by the task's id (index `decisions_task`), and turned
//! back into the wire's
//! `RouteDecision` (the record's `decision` is a serialized
//! [`crate::policy::Decision`]).
//!
//! Reads records through [`crate::audit::Record`] only, so whatever a record
//! keeps (or no longer keeps) is what is shown.

use federation_api as api;
use serde_json::Value;

use crate::audit::{DecisionLog, Record, kind};

/// How long before a task's creation time its decision record may have been
/// appended (the record is appended when the task is stored, after its
/// creation time is taken: the margin covers a clock stepped back).
const BEFORE_MS: i64 = 5_000;
/// How long after (a slow commit; a clock stepped forward).
const AFTER_MS: i64 = 10 * 60 * 1000;

/// True for a record that placed a task (not a correction saying it was not
/// stored after all).
fn placed(r: &Record) -> bool {
    (r.entry.kind == kind::ROUTE || r.entry.kind == kind::FORWARDED_IN)
        && r.entry.decision.is_some()
        && !r
            .entry
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("not stored"))
}

/// The decision that placed `task_id` (created at `created_unix_ms`) as
/// `log` holds it: the task's first placing record (a retry under the same
/// idempotency key logs another, later); `None` when it holds none.
/// Blocking.
pub fn find(
    log: &DecisionLog,
    task_id: &str,
    created_unix_ms: i64,
) -> Result<Option<api::RouteDecision>, crate::audit::AuditError> {
    let found = log.first_of_task(
        task_id,
        created_unix_ms.saturating_sub(BEFORE_MS),
        created_unix_ms.saturating_add(AFTER_MS),
        placed,
    )?;
    Ok(found
        .and_then(|r| r.entry.decision)
        .map(|d| from_record(&d)))
}

/// A record's `decision` (a serialized [`crate::policy::Decision`]) as the
/// wire's `RouteDecision`; fields it lacks stay empty.
pub fn from_record(d: &Value) -> api::RouteDecision {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let strings = |v: &Value, k: &str| -> Vec<String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let outcome = d.get("outcome").cloned().unwrap_or(Value::Null);
    let rule_index = d.get("rule_index").and_then(Value::as_u64);
    let balance = d.get("balance").cloned().unwrap_or(Value::Null);
    let loads: Vec<Value> = balance
        .get("loads")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let u32_of = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    let candidates = d
        .get("candidates")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let region = s(c, "region");
                    let refusal = c.get("refusal").and_then(Value::as_str);
                    let seen = loads.iter().find(|l| s(l, "region") == region);
                    api::CandidateVerdict {
                        role: s(c, "role"),
                        accepted: refusal.is_none(),
                        reason: refusal.unwrap_or("ok").to_string(),
                        detail: s(c, "detail"),
                        load: seen
                            .filter(|l| l.get("advertised").and_then(Value::as_bool) == Some(true))
                            .map(|l| api::Capacity {
                                total_slots: u32_of(l, "total_slots"),
                                free_slots: u32_of(l, "free_slots"),
                                queue_depth: u32_of(l, "queue_depth"),
                                queue_limit: 0,
                            }),
                        share_ppm: seen.map_or(0, |l| u32_of(l, "share_ppm")),
                        region,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    api::RouteDecision {
        matched: rule_index.is_some(),
        rule_index: rule_index
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or_default(),
        rule: s(d, "rule"),
        required_tags: strings(d, "required_tags"),
        candidates,
        region: s(&outcome, "region"),
        outcome: s(&outcome, "kind"),
        reason: s(d, "reason"),
        policy_hash: s(d, "policy_hash"),
        warnings: strings(d, "warnings"),
        balance_mode: s(&balance, "mode"),
        balance: s(&balance, "why"),
        affinity_digest: s(&balance, "affinity_digest"),
    }
}

/// The decision of a task this controller owns, off the async workers (the
/// log is a file, or rows read with a blocking call); `None` when the log holds none or cannot be read (logged).
pub async fn of_local_task(log: &DecisionLog, task: &api::Task) -> Option<api::RouteDecision> {
    let log = log.clone();
    let task_id = task.task_id.clone();
    let created = task.created_unix_ms;
    let read = tokio::task::spawn_blocking(move || find(&log, &task_id, created)).await;
    match read {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!(task = %task.task_id, error = %e, "reading a task's decision failed");
            None
        }
        Err(e) => {
            tracing::warn!(task = %task.task_id, error = %e, "reading a task's decision failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AttrValue, Attributes, Policy, StaticView};

    #[test]
    fn a_logged_decision_round_trips_to_the_wire() {
        let loaded = crate::config::load_from_text(
            std::path::Path::new("seed.yaml"),
            federation_sandbox::SEED_POLICY,
        )
        .expect("seed parses");
        let policy = Policy::from_loaded(&loaded).expect("seed loads");
        let attrs: Attributes = [("customer_region".to_string(), AttrValue::Str("DE".into()))]
            .into_iter()
            .collect();
        // europe down: a failover, with a refused candidate and a warning.
        let what_if = StaticView {
            down: ["europe".to_string()].into_iter().collect(),
            ..StaticView::default()
        };
        let decision = policy.decide(&attrs, &what_if.bind(&policy));
        assert_eq!(decision.outcome.kind(), "failover");
        let entry = crate::audit::Entry::from_decision(kind::ROUTE, &attrs, &decision);
        let wire = from_record(entry.decision.as_ref().expect("decision"));
        assert_eq!(wire, crate::wire::decision_to_wire(&decision));
    }
}
