//! Leasing tasks into free slots and holding each lease while its task runs
//! (execute, renew); it registers nothing and reports through `report`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use federation_api::{LeaseTasksRequest, RenewLeaseRequest, Task};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use super::backoff::{Backoff, loud};
use super::session::{MIN_TIMER, Session, SessionEnd};
use super::state::{Agent, CancelSender, bump, cancel_with};
use super::status::{lease_gone, status_text, unknown_agent};
use crate::exec::{self, CancelReason, ExecStatus};

/// An empty lease answer faster than this is followed by a pause, so a
/// controller that ignores `wait_ms` is not polled in a tight loop.
const MIN_EMPTY_POLL: Duration = Duration::from_millis(100);

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Sleeps for `delay` unless `stop` turns true first; true when stopped.
async fn sleep_unless(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

impl Agent {
    /// Leases tasks whenever a slot is free, until shutdown or until the
    /// controller forgets the agent.
    pub(super) async fn lease_loop(
        self: &Arc<Self>,
        session: &Arc<Session>,
        tasks: &mut JoinSet<()>,
        mut reregister: watch::Receiver<bool>,
    ) -> SessionEnd {
        let controller = &self.controller();
        let mut stopping = self.stopping.subscribe();
        let mut draining = self.draining.subscribe();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut failures = 0u64;
        let call_timeout = self.config.lease_wait + self.config.rpc_timeout;
        loop {
            while tasks.try_join_next().is_some() {}
            if *stopping.borrow_and_update() {
                return SessionEnd::Stopped;
            }
            if *reregister.borrow_and_update() {
                return SessionEnd::Reregister;
            }
            if *draining.borrow_and_update() {
                debug!("controller draining, not leasing");
                tokio::select! {
                    _ = stopping.changed() => {}
                    changed = reregister.changed() => if changed.is_err() {
                        return SessionEnd::Reregister;
                    },
                    _ = draining.changed() => {}
                }
                continue;
            }
            let first = tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return SessionEnd::Stopped,
                },
                _ = stopping.changed() => continue,
                changed = reregister.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Reregister;
                    }
                    continue;
                }
                _ = draining.changed() => continue,
            };
            let mut permits = vec![first];
            while let Ok(permit) = self.slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            let asked = permits.len();
            let mut request = tonic::Request::new(LeaseTasksRequest {
                agent_id: session.agent_id.clone(),
                max_tasks: u32::try_from(asked).unwrap_or(u32::MAX),
                wait_ms: millis_u32(self.config.lease_wait),
            });
            request.set_timeout(call_timeout);
            let mut client = self.client();
            let started = Instant::now();
            // Not cut short by shutdown: see `run`.
            let answer = tokio::time::timeout(call_timeout, client.lease_tasks(request)).await;
            let error = match answer {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        info!(controller = %controller, failures, "leasing works again");
                    }
                    failures = 0;
                    backoff.reset();
                    let leased = response.into_inner().tasks;
                    if leased.len() > asked {
                        warn!(
                            asked,
                            got = leased.len(),
                            "controller leased more tasks than asked, running them all"
                        );
                    }
                    let empty = leased.is_empty();
                    for task in leased {
                        bump(&self.counters.leased);
                        let permit = permits.pop();
                        tasks.spawn(self.clone().run_task(session.clone(), task, permit));
                    }
                    drop(permits);
                    if empty
                        && started.elapsed() < MIN_EMPTY_POLL
                        && sleep_unless(MIN_EMPTY_POLL, &mut stopping).await
                    {
                        return SessionEnd::Stopped;
                    }
                    continue;
                }
                Ok(Err(status)) if unknown_agent(&status) => {
                    warn!(
                        controller = %controller,
                        error = %status_text(&status),
                        "controller does not know this agent (restarted?), registering again"
                    );
                    return SessionEnd::Reregister;
                }
                Ok(Err(status)) => status_text(&status),
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(call_timeout)
                ),
            };
            drop(permits);
            failures += 1;
            let delay = backoff.next_delay();
            if loud(failures) {
                warn!(
                    controller = %controller,
                    failures,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "lease request failed"
                );
            } else {
                debug!(controller = %controller, failures, error = %error, "lease request failed");
            }
            if sleep_unless(delay, &mut stopping).await {
                return SessionEnd::Stopped;
            }
        }
    }

    /// Runs one leased task: executes it while renewing its lease, then
    /// reports the outcome.
    async fn run_task(
        self: Arc<Self>,
        session: Arc<Session>,
        mut task: Task,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let span = tracing::info_span!(
            "task",
            task_id = %task.task_id,
            attempt = task.attempts,
        );
        // The exported span of this run, a child of the span that accepted
        // the task; the command gets the run's context (or, when the agent
        // does not export, the task's own).
        let run_span = tracing::info_span!(
            target: federation_trace::TARGET,
            "run_task",
            otel.status_description = tracing::field::Empty,
            task_id = %task.task_id,
            attempt = task.attempts,
            agent = %self.config.name,
        );
        let run = run_span.clone();
        let received = federation_trace::TraceParent::parse(&task.traceparent);
        federation_trace::set_parent(&run_span, received.as_ref());
        task.traceparent = federation_trace::outgoing(&run_span, received.as_ref())
            .map(|t| t.to_string())
            .unwrap_or_default();
        async move {
            let (cancel_tx, mut cancel_rx) = watch::channel(None::<CancelReason>);
            let cancel_tx: CancelSender = Arc::new(cancel_tx);
            let token = self.track(&task.task_id, cancel_tx.clone());
            info!(
                controller = %self.controller(),
                payload_bytes = task.payload.len(),
                "task started"
            );
            let cancelled = async move {
                loop {
                    if let Some(reason) = cancel_rx.borrow_and_update().clone() {
                        return reason;
                    }
                    if cancel_rx.changed().await.is_err() {
                        // The sender lives as long as this task; never here.
                        std::future::pending::<()>().await;
                    }
                }
            };
            let execution =
                exec::execute(&self.config.command, &task, &self.config.limits, cancelled)
                    .instrument(tracing::info_span!(target: federation_trace::TARGET, "exec"));
            tokio::pin!(execution);
            let execution = tokio::select! {
                execution = &mut execution => execution,
                () = self.renew_loop(&session, &task.task_id, &cancel_tx) => execution.await,
            };
            self.untrack(&task.task_id, token);
            drop(permit);
            if execution.truncated {
                warn!(
                    output_bytes = execution.output_bytes,
                    max_output = self.config.limits.max_output,
                    "task output truncated"
                );
            }
            let elapsed_ms = execution.elapsed.as_millis() as u64;
            match execution.report() {
                None => {
                    let reason = match &execution.status {
                        ExecStatus::Cancelled(reason) => reason.clone(),
                        _ => CancelReason::Shutdown,
                    };
                    if reason == CancelReason::Shutdown {
                        bump(&self.counters.unreported);
                    } else {
                        bump(&self.counters.lost);
                    }
                    warn!(reason = %reason, elapsed_ms, "task killed, result dropped");
                }
                Some(report) => {
                    if report.success {
                        info!(elapsed_ms, "task succeeded");
                    } else {
                        info!(elapsed_ms, error = %report.error, "task failed");
                        federation_trace::fail(&run, &report.error);
                    }
                    let traced = federation_trace::TraceParent::parse(&task.traceparent);
                    self.complete(&session, &task.task_id, report, traced.as_ref())
                        .instrument(tracing::info_span!(
                            target: federation_trace::TARGET,
                            "complete_task",
                            otel.kind = "client",
                        ))
                        .await;
                }
            }
        }
        .instrument(span)
        .instrument(run_span)
        .await;
    }

    /// Renews the lease every TTL/3; returns only when the lease is gone
    /// (after asking the execution to stop).
    async fn renew_loop(&self, session: &Session, task_id: &str, cancel: &CancelSender) {
        let period = (session.lease_ttl / 3).max(MIN_TIMER);
        let call_timeout = self.config.rpc_timeout.min(period);
        let mut failures = 0u64;
        loop {
            tokio::time::sleep(period).await;
            let request = RenewLeaseRequest {
                agent_id: session.agent_id.clone(),
                task_id: task_id.to_owned(),
            };
            let mut client = self.client();
            match tokio::time::timeout(call_timeout, client.renew_lease(request)).await {
                Ok(Ok(_)) => {
                    failures = 0;
                    debug!("lease renewed");
                }
                Ok(Err(status)) if lease_gone(&status) => {
                    warn!(
                        controller = %self.controller(),
                        error = %status_text(&status),
                        "lease lost, killing the task"
                    );
                    cancel_with(cancel, CancelReason::LeaseLost(status_text(&status)));
                    return;
                }
                Ok(Err(status)) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %self.controller(), failures, error = %status_text(&status), "lease renewal failed, will retry");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if loud(failures) {
                        warn!(controller = %self.controller(), failures, "lease renewal timed out, will retry");
                    }
                }
            }
        }
    }
}
