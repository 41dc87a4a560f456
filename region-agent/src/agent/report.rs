//! Reporting a task's outcome to the controller (`CompleteTask`), retried with
//! backoff; it leases nothing and runs nothing.

use std::time::Instant;

use federation_api::CompleteTaskRequest;
use tracing::{error, info, warn};

use super::backoff::{Backoff, loud};
use super::session::Session;
use super::state::{Agent, bump};
use super::status::{lease_gone, status_text, transient};
use crate::exec::Report;

impl Agent {
    /// Reports an outcome, retrying transient failures for
    /// `complete_retry_for`.
    /// `received` is the run's trace context, sent on when the agent does
    /// not export (else the report span's own goes, so the controller's
    /// completion span is its child).
    pub(super) async fn complete(
        &self,
        session: &Session,
        task_id: &str,
        report: Report,
        received: Option<&federation_trace::TraceParent>,
    ) {
        let traceparent = federation_trace::outgoing(&tracing::Span::current(), received);
        let controller = &self.controller();
        let request = CompleteTaskRequest {
            agent_id: session.agent_id.clone(),
            task_id: task_id.to_owned(),
            success: report.success,
            result: report.result,
            error: report.error,
            exit_code: report.exit_code,
        };
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let mut client = self.client();
            let mut call = tonic::Request::new(request.clone());
            if let Some(tp) = &traceparent {
                federation_trace::to_metadata(call.metadata_mut(), tp);
            }
            let error =
                match tokio::time::timeout(self.config.rpc_timeout, client.complete_task(call))
                    .await
                {
                    Ok(Ok(_)) => {
                        bump(if request.success {
                            &self.counters.succeeded
                        } else {
                            &self.counters.failed
                        });
                        info!(
                            controller = %controller,
                            success = request.success,
                            exit_code = request.exit_code,
                            attempts = attempt,
                            "task reported"
                        );
                        return;
                    }
                    Ok(Err(status)) if lease_gone(&status) => {
                        bump(&self.counters.lost);
                        warn!(
                            controller = %controller,
                            error = %status_text(&status),
                            "controller refused the result (lease lost), dropped"
                        );
                        return;
                    }
                    Ok(Err(status)) if !transient(&status) => {
                        bump(&self.counters.unreported);
                        error!(
                            controller = %controller,
                            error = %status_text(&status),
                            "controller rejected the result"
                        );
                        return;
                    }
                    Ok(Err(status)) => status_text(&status),
                    Err(_) => format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.rpc_timeout)
                    ),
                };
            let delay = backoff.next_delay();
            if started.elapsed() + delay > self.config.complete_retry_for {
                bump(&self.counters.unreported);
                error!(
                    controller = %controller,
                    attempts = attempt,
                    error = %error,
                    "giving up reporting the task; its lease will expire and it will run again"
                );
                return;
            }
            if loud(attempt) {
                warn!(controller = %controller, attempt, error = %error, "reporting the task failed, retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }
}
