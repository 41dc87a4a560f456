//! Routing at run time: turns a `SubmitTask` into a durable task in a region
//! the residency rules allow. Evaluate the policy against the live view, walk
//! the candidates (primary — for a set of primaries its available members in
//! balance order — then backups) in order, store locally or forward
//! with a deadline, and fall through to the next candidate when a forward
//! fails; when every other candidate failed, a region in failback hold-down
//! is tried as the last resort before the task is rejected
//! ([`Decision::refuse`] re-settles the outcome). Never routes outside the
//! matched rule's candidates; every decision is written to the decision log
//! before the client hears the outcome.
//!
//! A controller that receives a forwarded task re-checks residency with its
//! own policy and its own tags before storing it ([`accept_forward`]).

use std::sync::Arc;

use federation_api as api;
use federation_trace::TraceParent;
use tracing::Instrument as _;

use crate::audit::DecisionLog;
use crate::audit::Prepared;
use crate::audit::key::AuditKey;
use crate::audit::minimise::{Kept, Scrubber};
use crate::clock::now_unix_ms;
use crate::cluster::Cluster;
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::policy::{Attributes, Decision, Outcome, Refusal, Rejection};
use crate::replication::Replication;
use crate::replication::duplicates::{self, KeyCheck};
use crate::tasks::{InsertOutcome, RecordState, TaskStore};
use crate::transport;
use crate::wire;

/// The note of a drill probe's decision records (`SubmitTaskRequest.probe`).
pub const PROBE_NOTE: &str = "drill probe: routed and recorded, never stored or run";

/// What routing uses: the policy and the live view (`cluster`), the
/// store, the log, the peers to forward to, the copies a backup checks keys
/// in (`replication`), metrics.
#[derive(Debug)]
pub struct Router {
    cluster: Arc<Cluster>,
    peers: Arc<Peers>,
    store: TaskStore,
    log: DecisionLog,
    audit_key: Option<AuditKey>,
    metrics: Arc<Metrics>,
    replication: Arc<Replication>,
    limits: Limits,
    forward_timeout: std::time::Duration,
}

/// What [`Router::new`] is built from.
#[derive(Debug)]
pub struct RouterParts {
    /// The policy in force, this region and the live view.
    pub cluster: Arc<Cluster>,
    /// Forwarding to peers.
    pub peers: Arc<Peers>,
    /// Where tasks placed here are stored.
    pub store: TaskStore,
    /// Where every decision is recorded.
    pub log: DecisionLog,
    /// The key of the digests records keep instead of withheld values.
    pub audit_key: Option<AuditKey>,
    /// Decision and forward metrics.
    pub metrics: Arc<Metrics>,
    /// The copies a backup looks idempotency keys up in.
    pub replication: Arc<Replication>,
    /// Input limits.
    pub limits: Limits,
    /// Deadline of one forward.
    pub forward_timeout: std::time::Duration,
}

impl Router {
    /// A router over its parts.
    pub fn new(p: RouterParts) -> Self {
        Self {
            cluster: p.cluster,
            peers: p.peers,
            store: p.store,
            log: p.log,
            audit_key: p.audit_key,
            metrics: p.metrics,
            replication: p.replication,
            limits: p.limits,
            forward_timeout: p.forward_timeout,
        }
    }

    /// This controller's region.
    pub fn region(&self) -> &str {
        self.cluster.region()
    }
}

/// Checks the parts of a submit request that do not need the policy.
pub fn validate_submit(router: &Router, req: &api::SubmitTaskRequest) -> Result<Attributes> {
    if req.payload.len() > router.limits.max_payload_bytes {
        return Err(Error::limit(
            "payload",
            format!(
                "{} bytes exceeds the limit of {} bytes",
                req.payload.len(),
                router.limits.max_payload_bytes
            ),
        ));
    }
    if !req.idempotency_key.is_empty() {
        wire::check_idempotency_key(&req.idempotency_key)?;
    }
    wire::attributes_from_wire(&req.attributes, &router.limits)
}

/// Routes and stores a client's task. `received` is the trace context the
/// client sent, passed on unchanged when this controller does not export
/// spans (when it does, the current span's context goes on instead).
pub async fn submit(
    router: &Router,
    req: api::SubmitTaskRequest,
    received: Option<&TraceParent>,
) -> Result<api::SubmitTaskResponse> {
    let attrs = validate_submit(router, &req)?;
    let policy = router.cluster.policy();
    // A fresh draw per task balances a set of primaries (see
    // `policy::balance`); the decision records it.
    let (mut decision, view) = {
        let live = router.cluster.view(&policy);
        let decision = policy.decide_with(&attrs, &live, rand::random());
        (decision, policy.view_states(&live))
    };

    let mut placed: Option<Placed> = None;
    // A refusal that ends the walk (a key reused for other content).
    let mut refused: Option<Error> = None;
    // Whether the record appended with the placing attempt names the task.
    let mut logged = false;
    let mut superseded: Vec<String> = Vec::new();
    while let Some(region) = decision.outcome.region().map(str::to_string) {
        let task_id = wire::new_task_id(&region);
        // The decision record is rendered now and appended *while* the task
        // is committed (in the store's own batch, naming the task the store
        // produced) or forwarded: the client waits for the slower of the two,
        // not for both in series, and both are durable before it hears back.
        // When the attempt fails, or the owner answers with another task (its
        // idempotency key was known there), the final record names the
        // superseded one.
        let local = region == router.cluster.region();
        let (attempt, record) = if local {
            let render = |note: Option<&str>| {
                decision_record(
                    router,
                    crate::audit::kind::ROUTE,
                    &task_id,
                    &attrs,
                    &decision,
                    note,
                    Some(&view),
                )
            };
            let Attempt { placed, record } =
                store_local(router, &task_id, &req, &decision, render, received, false).await;
            (placed, record)
        } else {
            let pending = decision_record(
                router,
                crate::audit::kind::ROUTE,
                &task_id,
                &attrs,
                &decision,
                req.probe.then_some(PROBE_NOTE),
                Some(&view),
            );
            let logged = router.log.append(pending).instrument(tracing::info_span!(
                target: federation_trace::TARGET,
                "decision_log.append",
                kind = crate::audit::kind::ROUTE,
                task_id = %task_id,
            ));
            let span = tracing::info_span!(
                target: federation_trace::TARGET,
                "forward",
                otel.kind = "client",
                otel.status_description = tracing::field::Empty,
                peer.region = %region,
                task_id = %task_id,
            );
            let call = forward(router, &region, &task_id, &req, &decision, received);
            let policy_now = policy.clone();
            let rule_index = decision.rule_index;
            let attrs_ref = &attrs;
            // Boxed: the client call's state is large, and keeping it out of
            // this future keeps local submits' futures small.
            let forwarded = Box::pin(async move {
                let forwarded = call.instrument(span.clone()).await;
                if let Err(e) = &forwarded {
                    // The span's status is exported: it keeps what the
                    // entry's record keeps.
                    let scrubbed = Scrubber::new(&policy_now, false, attrs_ref, rule_index)
                        .scrub(&e.to_string())
                        .into_owned();
                    federation_trace::fail(&span, &scrubbed);
                }
                forwarded
            });
            let (attempt, logged) = tokio::join!(forwarded, logged);
            (attempt, record_state(logged))
        };
        let appended = record != RecordState::NotWritten;
        match attempt {
            Ok(p) => {
                if appended && (local || p.task_id == task_id) {
                    logged = true;
                } else if appended {
                    superseded.push(task_id);
                }
                placed = Some(p);
                break;
            }
            // Not a placement failure: the same answer would come from any
            // candidate, and falling through would create the second task
            // the refusal prevents.
            Err(e @ Error::AlreadyExists(_)) => {
                if appended {
                    superseded.push(task_id);
                }
                let error = Scrubber::new(&policy, false, &attrs, decision.rule_index)
                    .scrub(&e.to_string())
                    .into_owned();
                tracing::info!(%region, %error, "idempotency key reused for other content; refused");
                refused = Some(e);
                break;
            }
            // Storage trouble in our own region is not a reason to send the
            // data elsewhere silently: it is recorded as a refusal and the
            // walk continues, exactly like a failed forward.
            Err(e) => {
                if appended {
                    superseded.push(task_id);
                }
                let error = Scrubber::new(&policy, false, &attrs, decision.rule_index)
                    .scrub(&e.to_string())
                    .into_owned();
                tracing::warn!(%region, %error, "placing task failed; trying next candidate");
                decision.refuse(&region, Refusal::ForwardFailed, e.to_string());
                decision.refresh_warnings(&policy);
            }
        }
    }

    let task_id = placed.as_ref().map(|p| p.task_id.clone());
    if !logged {
        let mut note = Vec::new();
        if let Some(p) = placed.as_ref().filter(|p| p.deduplicated) {
            note.push(format!(
                "deduplicated: the idempotency key already names task {} ({})",
                p.task_id,
                crate::tasks::state_name(p.state)
            ));
        }
        if let Some(e) = &refused {
            note.push(format!("refused: {e}"));
        }
        if !superseded.is_empty() {
            note.push(format!(
                "supersedes the record(s) of unplaced task id(s) {}",
                superseded.join(", ")
            ));
        }
        if req.probe {
            note.push(PROBE_NOTE.to_string());
        }
        let note = (!note.is_empty()).then(|| note.join("; "));
        record(
            router,
            crate::audit::kind::ROUTE,
            task_id.as_deref(),
            &attrs,
            &decision,
            note.as_deref(),
            Seen {
                held_here: placed.is_some()
                    && decision.outcome.region() == Some(router.cluster.region()),
                view: Some(&view),
            },
        )
        .await;
    }
    if log_wanted(&decision) {
        // The log line keeps what the record keeps.
        let held = placed.is_some() && decision.outcome.region() == Some(router.cluster.region());
        log_decision(
            &kept(router, held, &attrs, &decision, None).decision,
            task_id.as_deref(),
        );
    }
    if !req.probe {
        router.metrics.decision(
            crate::metrics::rule_label(&policy, decision.rule_index),
            decision.outcome.kind(),
            decision.outcome.region(),
        );
    }

    match placed {
        Some(p) => Ok(api::SubmitTaskResponse {
            // A deduplicated task lives where its id says (a backup may
            // answer with the original task of its primary).
            region: if p.deduplicated {
                wire::owner_of(&p.task_id).unwrap_or_default().to_string()
            } else {
                decision.outcome.region().unwrap_or_default().to_string()
            },
            decision: Some(wire::decision_into_wire(decision)),
            deduplicated: p.deduplicated,
            state: p.state as i32,
            task_id: p.task_id,
        }),
        None => Err(refused.unwrap_or_else(|| rejection_error(&decision))),
    }
}

/// Where a task was placed: its id (the existing one when deduplicated) and
/// its state as known.
#[derive(Debug, Clone)]
struct Placed {
    task_id: String,
    deduplicated: bool,
    state: api::TaskState,
}

/// A placement tried in this region, and what became of its decision record
/// (written, failed, or not written because nothing was decided here).
struct Attempt {
    placed: Result<Placed>,
    record: RecordState,
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

/// False when [`log_decision`] would log nothing: a routed task is a debug
/// event, so its span (and the record's view of it) is skipped when debug
/// is off (the usual case), as the event would be dropped anyway.
fn log_wanted(decision: &Decision) -> bool {
    let last_resort = decision.candidates.iter().any(|c| c.last_resort());
    !matches!(decision.outcome, Outcome::Routed { .. })
        || last_resort
        || tracing::enabled!(tracing::Level::DEBUG)
}

fn log_decision(decision: &Decision, task_id: Option<&str>) {
    let last_resort = decision.candidates.iter().any(|c| c.last_resort());
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
            tracing::warn!(reason = %decision.reason, warnings = %decision.warnings.join("; "), "task failed over")
        }
        Outcome::Routed { .. } if last_resort => {
            tracing::warn!(reason = %decision.reason, "task routed to a region in failback hold-down as the last resort")
        }
        Outcome::Routed { .. } => tracing::debug!("task routed"),
    }
}

/// Stores the task here, appending the record `render` makes (renamed to
/// the task the store produced) in the same batch.
///
/// When regions come before us in the rule (a failover), the key is first
/// looked up in our copies of them ([`duplicates::check_key`]): known, it
/// names the original task (the answer, nothing stored) or, for other
/// content, a refusal; unknown, the record says it could not be known and
/// the key is remembered for duplicate detection.
///
/// The task carries the trace context of the span accepting it (or
/// `received`, when this controller does not export).
///
/// While this controller drains: with the embedded store the region takes
/// nothing (`UNAVAILABLE`, the walk moves on). With the store in the
/// region's database the drain is this replica's: the task is passed to a
/// sibling replica that serves ([`relay_to_sibling`]), and stored here when
/// that fails or when a sibling passed it here (`relayed`: the region's
/// database is one, so it stays in its region either way); only when no
/// other replica serves does the region refuse as a whole.
async fn store_local(
    router: &Router,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
    render: impl FnOnce(Option<&str>) -> Prepared,
    received: Option<&TraceParent>,
    relayed: bool,
) -> Attempt {
    if router.cluster.draining() && !relayed {
        let sibling = router.cluster.serving_sibling();
        let Some(sibling) = sibling else {
            return Attempt {
                placed: Err(Error::Unavailable(format!(
                    "{} is draining",
                    router.cluster.region()
                ))),
                record: RecordState::NotWritten,
            };
        };
        // A drill's probe is recorded here and stored nowhere (below).
        let relayed = if req.probe {
            None
        } else {
            Some(relay_to_sibling(router, &sibling, task_id, req, decision, received).await)
        };
        match relayed {
            None => {}
            Some(Ok(placed)) if placed.task_id == task_id => {
                let note = format!(
                    "replica {} drains: stored through replica {} of this region",
                    router.cluster.replica(),
                    sibling.replica
                );
                let logged = router.log.append(render(Some(&note))).await;
                return Attempt {
                    placed: Ok(placed),
                    record: record_state(logged),
                };
            }
            // Deduplicated there: the caller's record names the task.
            Some(Ok(placed)) => {
                return Attempt {
                    placed: Ok(placed),
                    record: RecordState::NotWritten,
                };
            }
            Some(Err(Forwarded::Answered(e @ Error::AlreadyExists(_)))) => {
                return Attempt {
                    placed: Err(e),
                    record: RecordState::NotWritten,
                };
            }
            Some(Err(Forwarded::Answered(e) | Forwarded::Unreached(e))) => {
                // The region's database is one: storing it here keeps it in
                // its region, where a walk to the next candidate would not.
                tracing::warn!(replica = %sibling.replica, endpoint = %sibling.endpoint, error = %e, "passing a task to a sibling replica failed; storing it here although this replica drains");
            }
        }
    }
    if req.probe {
        // A drill's probe: the placement is decided and recorded, nothing
        // is stored (so nothing can be leased, run or replicated).
        let logged = router.log.append(render(Some(PROBE_NOTE))).await;
        return Attempt {
            placed: Ok(Placed {
                task_id: task_id.to_string(),
                deduplicated: false,
                state: api::TaskState::Cancelled,
            }),
            record: record_state(logged),
        };
    }
    let policy = router.cluster.policy();
    let mut unverified = None;
    let note = match duplicates::check_key(
        &router.replication,
        router.cluster.region(),
        &policy,
        decision.rule_index,
        &req.idempotency_key,
    ) {
        KeyCheck::Known { region, known } => {
            let answer = match known.differs(&req.attributes, &req.payload) {
                Some(differs) => Err(duplicates::refusal(
                    &region,
                    &req.idempotency_key,
                    &known,
                    differs,
                )),
                None => Ok(Placed {
                    task_id: known.task_id,
                    deduplicated: true,
                    state: known.state,
                }),
            };
            return Attempt {
                placed: answer,
                record: RecordState::NotWritten,
            };
        }
        KeyCheck::Unknown { regions, note } => {
            unverified = Some(regions);
            Some(note)
        }
        KeyCheck::NotApplicable => None,
    };
    let record = render(note.as_deref());
    let now = now_unix_ms();
    let task = api::Task {
        task_id: task_id.to_string(),
        attributes: req.attributes.clone(),
        payload: req.payload.clone(),
        idempotency_key: req.idempotency_key.clone(),
        priority: req.priority,
        state: api::TaskState::Queued as i32,
        owner_region: router.cluster.region().to_string(),
        rule_index: decision.rule_index.unwrap_or_default() as u32,
        created_unix_ms: now,
        updated_unix_ms: now,
        traceparent: federation_trace::outgoing(&tracing::Span::current(), received)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    // The decision record rides in the commit's batch: its append is
    // inside the commit's span, as long as it.
    let commit = tracing::info_span!(
        target: federation_trace::TARGET,
        "store.commit",
        op = "insert",
        task_id = %task_id,
    );
    let append = tracing::info_span!(
        target: federation_trace::TARGET,
        parent: &commit,
        "decision_log.append",
        task_id = %task_id,
    );
    let stored = router
        .store
        .insert_recorded(task, record)
        .instrument(append)
        .instrument(commit)
        .await;
    if let RecordState::Failed(e) = &stored.record {
        tracing::error!(error = %e, "appending to the decision log failed");
    }
    let outcome = match stored.outcome {
        Ok(InsertOutcome::Created(t)) => {
            if let Some(regions) = unverified {
                router
                    .replication
                    .duplicates
                    .remember(&t.idempotency_key, &t.task_id, regions);
            }
            Ok(Placed {
                task_id: t.task_id,
                deduplicated: false,
                state: api::TaskState::Queued,
            })
        }
        Ok(InsertOutcome::Deduplicated(t)) => Ok(Placed {
            state: t.state(),
            task_id: t.task_id,
            deduplicated: true,
        }),
        Err(e) => Err(Error::from(e)),
    };
    Attempt {
        placed: outcome,
        record: stored.record,
    }
}

fn record_state(logged: std::result::Result<u64, crate::audit::AuditError>) -> RecordState {
    match logged {
        Ok(_) => RecordState::Written,
        Err(e) => {
            tracing::error!(error = %e, "appending to the decision log failed");
            RecordState::Failed(e.to_string())
        }
    }
}

/// Forwards to `region`, trying each of its replicas in turn
/// ([`Peers::endpoints_of`](crate::peers::Peers::endpoints_of)) while a
/// call cannot reach one (refused, reset, timed out): the task id is the
/// entry's, so a replica that stored it before its answer was lost gives
/// the same task back (the store deduplicates a retried forward by id).
/// Any other answer is the region's.
async fn forward(
    router: &Router,
    region: &str,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
    received: Option<&TraceParent>,
) -> Result<Placed> {
    let clients = router.peers.clients(region)?;
    let several = clients.len() > 1;
    let mut last = None;
    for (endpoint, client) in clients {
        match forward_at(
            router, region, client, task_id, req, decision, received, None,
        )
        .await
        {
            Ok(placed) => {
                router.peers.reached(&endpoint);
                return Ok(placed);
            }
            Err(Forwarded::Unreached(e)) => {
                router.peers.unreachable(&endpoint);
                if several {
                    tracing::warn!(%region, %endpoint, error = %e, "forward did not reach this replica; trying another of the region");
                }
                last = Some(e);
            }
            Err(Forwarded::Answered(e)) => {
                router.peers.reached(&endpoint);
                return Err(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Peer {
        region: region.to_string(),
        why: "no endpoint known".into(),
    }))
}

/// Why one replica's forward failed.
enum Forwarded {
    /// The call did not reach a replica that could answer: try another.
    Unreached(Error),
    /// The replica answered with this error: the region's answer.
    Answered(Error),
}

/// Passes a task this draining replica would store to `sibling`, a replica
/// of its own region that serves, as a forward it stores and never passes
/// on (`relayed_by`).
async fn relay_to_sibling(
    router: &Router,
    sibling: &crate::tasks::Sibling,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
    received: Option<&TraceParent>,
) -> std::result::Result<Placed, Forwarded> {
    let region = router.cluster.region();
    let client = router
        .peers
        .client_at(region, &sibling.endpoint)
        .map_err(Forwarded::Unreached)?;
    let replica = router.cluster.replica();
    forward_at(
        router,
        region,
        client,
        task_id,
        req,
        decision,
        received,
        Some(replica),
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn forward_at(
    router: &Router,
    region: &str,
    mut client: crate::peers::PeerClient,
    task_id: &str,
    req: &api::SubmitTaskRequest,
    decision: &Decision,
    received: Option<&TraceParent>,
    relayed_by: Option<&str>,
) -> std::result::Result<Placed, Forwarded> {
    let message = api::ForwardTaskRequest {
        task_id: task_id.to_string(),
        submit: Some(req.clone()),
        entry_region: router.cluster.region().to_string(),
        decision: Some(wire::decision_to_wire(decision)),
        relayed_by: relayed_by.unwrap_or_default().to_string(),
    };
    let deadline = router.forward_timeout;
    let started = std::time::Instant::now();
    let mut request = transport::with_deadline(message, deadline);
    // The owner's spans are children of this forward's.
    if let Some(tp) = federation_trace::outgoing(&tracing::Span::current(), received) {
        federation_trace::to_metadata(request.metadata_mut(), &tp);
    }
    let call = client.forward_task(request);
    let result = tokio::time::timeout(deadline, call).await;
    router
        .metrics
        .forward(region, started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            Ok(Placed {
                state: resp.state(),
                task_id: resp.task_id,
                deduplicated: resp.deduplicated,
            })
        }
        Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => Err(Forwarded::Answered(
            Error::AlreadyExists(format!("{region}: {}", status.message())),
        )),
        Ok(Err(status)) => {
            let e = Error::Peer {
                region: region.to_string(),
                why: format!("{:?}: {}", status.code(), status.message()),
            };
            Err(match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled => Forwarded::Unreached(e),
                _ => Forwarded::Answered(e),
            })
        }
        Err(_) => Err(Forwarded::Unreached(Error::Peer {
            region: region.to_string(),
            why: format!("forward timed out after {deadline:?}"),
        })),
    }
}

/// Stores a task another controller routed here, after re-checking that this
/// region may hold it under our own policy and tags.
pub async fn accept_forward(
    router: &Router,
    req: api::ForwardTaskRequest,
    received: Option<&TraceParent>,
) -> Result<api::ForwardTaskResponse> {
    wire::check_task_id(&req.task_id)?;
    if wire::owner_of(&req.task_id) != Some(router.cluster.region()) {
        return Err(Error::invalid(
            "task_id",
            format!(
                "`{}` is not owned by region {}",
                req.task_id,
                router.cluster.region()
            ),
        ));
    }
    let submit = req
        .submit
        .ok_or_else(|| Error::invalid("submit", "missing"))?;
    let attrs = validate_submit(router, &submit)?;
    let policy = router.cluster.policy();
    // Our own decision, for the checks and our log: the entry region's view
    // may differ. One evaluation of the rules serves both.
    let mut decision = policy.decide(&attrs, &router.cluster.view(&policy));
    let Some(index) = decision.rule_index else {
        return Err(Error::NotRoutable(format!(
            "{} refuses the task: no rule of its policy matches {}",
            router.cluster.region(),
            crate::policy::format_attributes(&attrs)
        )));
    };
    let rule = &policy.rules[index];
    // Any member of a set of primaries, or any backup: the entry's view of
    // the loads may differ from ours, residency does not.
    if !rule.candidates().any(|r| *r == router.cluster.region()) {
        return Err(Error::Precondition(format!(
            "residency: {} is not a candidate of {} here",
            router.cluster.region(),
            rule.label()
        )));
    }
    // `decide` requires the rule's tags plus the data-class requirements.
    let own = policy.region(router.cluster.region()).map(|r| &r.tags);
    let missing: Vec<_> = decision
        .required_tags
        .iter()
        .filter(|t| !own.is_some_and(|own| own.contains(*t)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::Precondition(format!(
            "residency: {} lacks required tag(s) {} for {}",
            router.cluster.region(),
            missing.join(", "),
            rule.label()
        )));
    }
    let entry = &req.entry_region;
    decision.reason = format!("accepted forward from {entry}: {}", decision.reason);
    let note = if req.relayed_by.is_empty() {
        format!("entry region {entry}")
    } else {
        format!(
            "entry region {entry}, passed on by its draining replica {}",
            wire::truncate(&req.relayed_by, 128)
        )
    };
    // As in `submit`: the record is appended in the store's batch, naming
    // the task the store produced (the stored one when deduplicated); a
    // commit that fails after it was appended gets a correcting record.
    let render = |extra: Option<&str>| {
        let note = match extra {
            Some(extra) => format!("{note}; {extra}"),
            None => note.clone(),
        };
        decision_record(
            router,
            crate::audit::kind::FORWARDED_IN,
            &req.task_id,
            &attrs,
            &decision,
            Some(&note),
            None,
        )
    };
    let Attempt {
        placed: stored,
        record: appended,
    } = store_local(
        router,
        &req.task_id,
        &submit,
        &decision,
        render,
        received,
        !req.relayed_by.is_empty(),
    )
    .await;
    if let (Err(e), RecordState::Written | RecordState::Failed(_)) = (&stored, appended) {
        record(
            router,
            crate::audit::kind::FORWARDED_IN,
            Some(&req.task_id),
            &attrs,
            &decision,
            Some(&format!("not stored, supersedes the record above: {e}")),
            Seen {
                held_here: false,
                view: None,
            },
        )
        .await;
    }
    let placed = stored?;
    Ok(api::ForwardTaskResponse {
        task_id: placed.task_id,
        deduplicated: placed.deduplicated,
        state: placed.state as i32,
    })
}

/// The decision for `attrs` now, with optional what-if regions, not submitted.
pub fn explain(
    router: &Router,
    req: &api::ExplainRouteRequest,
) -> Result<api::ExplainRouteResponse> {
    let attrs = wire::attributes_from_wire(&req.attributes, &router.limits)?;
    let policy = router.cluster.policy();
    for r in req.assume_down.iter().chain(req.assume_full.iter()) {
        if policy.region(r).is_none() {
            return Err(Error::invalid(
                "assume_down/assume_full",
                format!("unknown region `{r}`"),
            ));
        }
    }
    let live = router.cluster.view(&policy);
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

/// [`accept_forward`] inside the `forward_task` server span, a child of
/// the entry's forward span (`parent`); a refusal is exported with what the
/// records keep of the attributes (the task is not held here).
pub async fn accept_forward_in_span(
    router: &Router,
    req: api::ForwardTaskRequest,
    parent: Option<TraceParent>,
) -> Result<api::ForwardTaskResponse> {
    let span = tracing::info_span!(
        target: federation_trace::TARGET,
        "forward_task",
        otel.kind = "server",
        otel.status_description = tracing::field::Empty,
        region = %router.region(),
        entry_region = %req.entry_region,
    );
    federation_trace::set_parent(&span, parent.as_ref());
    let attributes = federation_trace::exporting()
        .then(|| req.submit.as_ref().map(|s| s.attributes.clone()))
        .flatten();
    let accepted = accept_forward(router, req, parent.as_ref())
        .instrument(span.clone())
        .await;
    if let (Err(e), Some(attributes)) = (&accepted, &attributes) {
        federation_trace::fail(&span, &scrubbed_error(router, attributes, e));
    }
    accepted
}

/// `error` as an exported span's status may show it for a task with
/// `attributes` that this region does not hold: with the values its
/// records would withhold replaced (see [`crate::audit::minimise`]).
pub fn scrubbed_error(
    router: &Router,
    attributes: &std::collections::HashMap<String, api::AttributeValue>,
    error: &Error,
) -> String {
    let attrs = wire::attributes_lossy(attributes);
    Scrubber::new(&router.cluster.policy(), false, &attrs, None)
        .scrub(&error.to_string())
        .into_owned()
}

/// What a record written here keeps of the task: everything when this
/// region holds it, else names, the values the policy lets every region
/// keep and keyed digests ([`crate::audit::minimise`]).
fn kept<'a>(
    router: &Router,
    held_here: bool,
    attrs: &'a Attributes,
    decision: &'a Decision,
    note: Option<&'a str>,
) -> Kept<'a> {
    Kept::new(
        &router.cluster.policy(),
        router.audit_key.as_ref(),
        held_here,
        attrs,
        decision,
        note,
    )
}

/// True when the record of `decision` (of `kind`) is written where the
/// task is held: the region it was placed in, or the owner accepting a
/// forward.
fn held_here(router: &Router, kind: &str, decision: &Decision) -> bool {
    kind == crate::audit::kind::FORWARDED_IN
        || decision.outcome.region() == Some(router.cluster.region())
}

/// Renders the record of `decision` for `task_id` (a route record names
/// this controller as the entry region).
fn decision_record(
    router: &Router,
    kind: &str,
    task_id: &str,
    attrs: &Attributes,
    decision: &Decision,
    note: Option<&str>,
    view: Option<&[(String, crate::policy::RegionView)]>,
) -> Prepared {
    let kept = kept(
        router,
        held_here(router, kind, decision),
        attrs,
        decision,
        note,
    );
    Prepared::kept(
        kind,
        Some(task_id),
        (kind == crate::audit::kind::ROUTE).then_some(router.cluster.region()),
        &kept,
        view,
    )
}

/// Where a record is written, as [`record`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'v> {
    /// This region holds the task (the record keeps every value).
    pub held_here: bool,
    /// Every region as the decision saw it.
    pub view: Option<&'v [(String, crate::policy::RegionView)]>,
}

/// Appends a decision to the log. A log failure is reported loudly but does
/// not undo a stored task (the task is durable; the log error is an alert).
/// The record is rendered and queued when this is called; the future waits
/// for its sync.
pub fn record(
    router: &Router,
    kind: &str,
    task_id: Option<&str>,
    attrs: &Attributes,
    decision: &Decision,
    note: Option<&str>,
    seen: Seen<'_>,
) -> impl std::future::Future<Output = ()> + Send + use<> {
    let Seen { held_here, view } = seen;
    let kept = kept(router, held_here, attrs, decision, note);
    let appended = router.log.append(Prepared::kept(
        kind,
        task_id,
        (kind == crate::audit::kind::ROUTE).then_some(router.cluster.region()),
        &kept,
        view,
    ));
    async move {
        if let Err(e) = appended.await {
            tracing::error!(error = %e, "appending to the decision log failed");
        }
    }
}
