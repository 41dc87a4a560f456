//! Routing at run time: turns a `SubmitTask` into a durable task in a region
//! the residency rules allow. Evaluate the policy against the live view, walk
//! the candidates (primary, then backups) in order, store locally or forward
//! with a deadline, and fall through to the next candidate when a forward
//! fails. Never routes outside the matched rule's candidates; every decision
//! is written to the decision log before the client hears the outcome.
//!
//! A controller that receives a forwarded task re-checks residency with its
//! own policy and its own tags before storing it ([`accept_forward`]).

use std::sync::Arc;

use federation_api as api;

use crate::audit::DecisionEntry;
use crate::controller::{Node, now_ms};
use crate::error::{Error, Result};
use crate::policy::{Attributes, Decision, Outcome, Refusal, Rejection};
use crate::tasks::InsertOutcome;
use crate::transport;
use crate::wire;

/// Checks the parts of a submit request that do not need the policy.
pub fn validate_submit(node: &Node, req: &api::SubmitTaskRequest) -> Result<Attributes> {
    if req.payload.len() > node.limits.max_payload_bytes {
        return Err(Error::limit(
            "payload",
            format!(
                "{} bytes exceeds the limit of {} bytes",
                req.payload.len(),
                node.limits.max_payload_bytes
            ),
        ));
    }
    if !req.idempotency_key.is_empty() {
        wire::check_idempotency_key(&req.idempotency_key)?;
    }
    wire::attributes_from_wire(&req.attributes, &node.limits)
}

/// Routes and stores a client's task.
pub async fn submit(
    node: &Arc<Node>,
    req: api::SubmitTaskRequest,
) -> Result<api::SubmitTaskResponse> {
    let attrs = validate_submit(node, &req)?;
    let policy = node.policy();
    let mut decision = policy.decide(&attrs, &node.view(&policy));

    let mut placed: Option<(String, bool)> = None;
    // The decision record of the attempt that placed the task, when it was
    // appended concurrently with the placement (see below).
    let mut logged_with: Option<String> = None;
    let mut superseded: Vec<String> = Vec::new();
    while let Some(region) = decision.outcome.region().map(str::to_string) {
        let task_id = wire::new_task_id(&region);
        let place = async {
            if region == node.region {
                store_local(node, &task_id, &req, &decision).await
            } else {
                forward(node, &region, &task_id, &req, &decision).await
            }
        };
        // Without an idempotency key the task id is known before placement,
        // so the decision record is appended *while* the task is committed:
        // the client waits for one group commit instead of two in series.
        // Both complete before the client hears back. If the placement fails,
        // the final record names the superseded one.
        let attempt = if req.idempotency_key.is_empty() {
            let (attempt, ()) = tokio::join!(
                place,
                record(
                    node,
                    crate::audit::kind::ROUTE,
                    Some(&task_id),
                    &attrs,
                    &decision,
                    None
                )
            );
            match &attempt {
                Ok(_) => logged_with = Some(task_id.clone()),
                Err(_) => superseded.push(task_id.clone()),
            }
            attempt
        } else {
            place.await
        };
        match attempt {
            Ok((id, dedup)) => {
                placed = Some((id, dedup));
                break;
            }
            // Storage trouble in our own region is not a reason to send the
            // data elsewhere silently: it is recorded as a refusal and the
            // walk continues, exactly like a failed forward.
            Err(e) => {
                tracing::warn!(%region, error = %e, "placing task failed; trying next candidate");
                decision.refuse(&region, Refusal::ForwardFailed, e.to_string());
                decision.refresh_warnings(&policy);
            }
        }
    }

    let task_id = placed.as_ref().map(|(id, _)| id.clone());
    if logged_with.is_none() {
        let note = (!superseded.is_empty()).then(|| {
            format!(
                "supersedes the record(s) of unplaced task id(s) {}",
                superseded.join(", ")
            )
        });
        record(
            node,
            crate::audit::kind::ROUTE,
            task_id.as_deref(),
            &attrs,
            &decision,
            note,
        )
        .await;
    }
    log_decision(&decision, task_id.as_deref());
    node.metrics.decision(
        decision.rule_index,
        decision.outcome.kind(),
        decision.outcome.region(),
    );

    match placed {
        Some((task_id, deduplicated)) => Ok(api::SubmitTaskResponse {
            region: decision.outcome.region().unwrap_or_default().to_string(),
            task_id,
            decision: Some(wire::decision_to_wire(&decision)),
            deduplicated,
        }),
        None => Err(rejection_error(&decision)),
    }
}

/// The error a rejected decision maps to.
pub fn rejection_error(decision: &Decision) -> Error {
    match &decision.outcome {
        Outcome::Rejected {
            rejection: Rejection::Unavailable,
        } => Error::Unavailable(decision.reason.clone()),
        _ => Error::NotRoutable(decision.reason.clone()),
    }
}

fn log_decision(decision: &Decision, task_id: Option<&str>) {
    let rule = decision.rule.as_deref().unwrap_or("none");
    let span = tracing::info_span!(
        "route",
        task_id = task_id.unwrap_or(""),
        rule,
        region = decision.outcome.region().unwrap_or("")
    );
    let _guard = span.enter();
    match &decision.outcome {
        Outcome::Rejected { .. } => tracing::info!(reason = %decision.reason, "task rejected"),
        Outcome::Failover { .. } => {
            tracing::warn!(reason = %decision.reason, warnings = ?decision.warnings, "task failed over")
        }
        Outcome::Routed { .. } => tracing::debug!("task routed"),
    }
}

async fn store_local(
    node: &Node,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
) -> Result<(String, bool)> {
    if node.draining() {
        return Err(Error::Unavailable(format!("{} is draining", node.region)));
    }
    let now = now_ms();
    let task = api::Task {
        task_id: task_id.to_string(),
        attributes: req.attributes.clone(),
        payload: req.payload.clone(),
        idempotency_key: req.idempotency_key.clone(),
        priority: req.priority,
        state: api::TaskState::Queued as i32,
        owner_region: node.region.clone(),
        rule_index: decision.rule_index.unwrap_or_default() as u32,
        created_unix_ms: now,
        updated_unix_ms: now,
        ..Default::default()
    };
    match node.store.insert(task).await.map_err(Error::from)? {
        InsertOutcome::Created(t) => Ok((t.task_id, false)),
        InsertOutcome::Deduplicated(t) => Ok((t.task_id, true)),
    }
}

async fn forward(
    node: &Node,
    region: &str,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
) -> Result<(String, bool)> {
    let mut client = node.peer(region)?;
    let message = api::ForwardTaskRequest {
        task_id: task_id.to_string(),
        submit: Some(req.clone()),
        entry_region: node.region.clone(),
        decision: Some(wire::decision_to_wire(decision)),
    };
    let deadline = node.timers.forward_timeout;
    let started = std::time::Instant::now();
    let call = client.forward_task(transport::with_deadline(message, deadline));
    let result = tokio::time::timeout(deadline, call).await;
    node.metrics
        .forward(region, started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            Ok((resp.task_id, resp.deduplicated))
        }
        Ok(Err(status)) => Err(Error::Peer {
            region: region.to_string(),
            why: format!("{:?}: {}", status.code(), status.message()),
        }),
        Err(_) => Err(Error::Peer {
            region: region.to_string(),
            why: format!("forward timed out after {deadline:?}"),
        }),
    }
}

/// Stores a task another controller routed here, after re-checking that this
/// region may hold it under our own policy and tags.
pub async fn accept_forward(
    node: &Arc<Node>,
    req: api::ForwardTaskRequest,
) -> Result<api::ForwardTaskResponse> {
    wire::check_task_id(&req.task_id)?;
    if wire::owner_of(&req.task_id) != Some(node.region.as_str()) {
        return Err(Error::invalid(
            "task_id",
            format!("`{}` is not owned by region {}", req.task_id, node.region),
        ));
    }
    let submit = req
        .submit
        .ok_or_else(|| Error::invalid("submit", "missing"))?;
    let attrs = validate_submit(node, &submit)?;
    let policy = node.policy();
    let matched = policy.match_rule(&attrs);
    let Some(index) = matched.rule else {
        return Err(Error::NotRoutable(format!(
            "{} refuses the task: no rule of its policy matches {}",
            node.region,
            crate::policy::format_attributes(&attrs)
        )));
    };
    let rule = &policy.rules[index];
    if !rule.candidates().any(|r| *r == node.region) {
        return Err(Error::Precondition(format!(
            "residency: {} is not a candidate of {} here",
            node.region,
            rule.label()
        )));
    }
    let mut required = rule.requires.clone();
    required.extend(policy.data_class_requirements(&attrs));
    let own = node.self_view(&policy).tags;
    let missing: Vec<_> = required.difference(&own).cloned().collect();
    if !missing.is_empty() {
        return Err(Error::Precondition(format!(
            "residency: {} lacks required tag(s) {} for {}",
            node.region,
            missing.join(", "),
            rule.label()
        )));
    }
    // Our own decision, for our log: the entry region's view may differ.
    let mut decision = policy.decide(&attrs, &node.view(&policy));
    let entry = req.entry_region.clone();
    decision.reason = format!("accepted forward from {entry}: {}", decision.reason);
    let note = format!("entry region {entry}");
    let log = |id: String, note: String| {
        let decision = decision.clone();
        let attrs = attrs.clone();
        async move {
            record(
                node,
                crate::audit::kind::FORWARDED_IN,
                Some(&id),
                &attrs,
                &decision,
                Some(note),
            )
            .await;
        }
    };
    // As in `submit`: without an idempotency key the id is final, so the
    // record is appended concurrently with the commit; a failed commit gets
    // a correcting record.
    let (task_id, deduplicated) = if submit.idempotency_key.is_empty() {
        let (stored, ()) = tokio::join!(
            store_local(node, &req.task_id, &submit, &decision),
            log(req.task_id.clone(), note)
        );
        if let Err(e) = &stored {
            log(
                req.task_id.clone(),
                format!("not stored, supersedes the record above: {e}"),
            )
            .await;
        }
        stored?
    } else {
        let stored = store_local(node, &req.task_id, &submit, &decision).await?;
        log(stored.0.clone(), note).await;
        stored
    };
    Ok(api::ForwardTaskResponse {
        task_id,
        deduplicated,
    })
}

/// The decision for `attrs` now, with optional what-if regions, not submitted.
pub fn explain(node: &Node, req: &api::ExplainRouteRequest) -> Result<api::ExplainRouteResponse> {
    let attrs = wire::attributes_from_wire(&req.attributes, &node.limits)?;
    let policy = node.policy();
    for r in req.assume_down.iter().chain(req.assume_full.iter()) {
        if policy.region(r).is_none() {
            return Err(Error::invalid(
                "assume_down/assume_full",
                format!("unknown region `{r}`"),
            ));
        }
    }
    let live = node.view(&policy);
    let view = WhatIf {
        live,
        down: &req.assume_down,
        full: &req.assume_full,
    };
    let decision = policy.decide(&attrs, &view);
    Ok(api::ExplainRouteResponse {
        decision: Some(wire::decision_to_wire(&decision)),
    })
}

struct WhatIf<'a> {
    live: crate::membership::LiveView<'a>,
    down: &'a [String],
    full: &'a [String],
}

impl crate::policy::FederationView for WhatIf<'_> {
    fn region(&self, name: &str) -> Option<crate::policy::RegionView> {
        let mut v = self.live.region(name)?;
        if self.down.iter().any(|r| r == name) {
            v.health = crate::policy::Health::Dead;
        }
        if self.full.iter().any(|r| r == name) {
            v.full = true;
        }
        Some(v)
    }
}

/// Appends a decision to the log. A log failure is reported loudly but does
/// not undo a stored task (the task is durable; the log error is an alert).
pub async fn record(
    node: &Node,
    kind: &str,
    task_id: Option<&str>,
    attrs: &Attributes,
    decision: &Decision,
    note: Option<String>,
) {
    let mut entry = DecisionEntry::from_decision(kind, attrs, decision);
    entry.task_id = task_id.map(str::to_string);
    entry.note = note;
    if kind == crate::audit::kind::ROUTE {
        entry.entry_region = Some(node.region.clone());
    }
    if let Err(e) = node.log.append(entry).await {
        tracing::error!(error = %e, "appending to the decision log failed");
    }
}
