//! `RegionAgentApi`: agents of this region register, heartbeat, lease tasks,
//! renew leases and report results; an adapter over [`Leasing`], adding
//! the caller's identity and the trace spans.

use std::sync::Arc;

use federation_api as api;
use tonic::{Request, Response, Status};

use crate::leasing::Leasing;

/// The agent service.
#[derive(Debug)]
pub struct AgentService {
    leasing: Arc<Leasing>,
}

impl AgentService {
    /// A service over `leasing`.
    pub fn new(leasing: Arc<Leasing>) -> Self {
        Self { leasing }
    }
}

/// The authenticated identity of the caller, as agent records keep it
/// (empty without TLS or token).
fn owner<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<crate::auth::Caller>()
        .map(|c| c.0.to_string())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl api::region_agent_api_server::RegionAgentApi for AgentService {
    async fn register(
        &self,
        request: Request<api::RegisterRequest>,
    ) -> Result<Response<api::RegisterResponse>, Status> {
        let owner = owner(&request);
        Ok(Response::new(
            self.leasing.register(owner, request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<api::HeartbeatRequest>,
    ) -> Result<Response<api::HeartbeatResponse>, Status> {
        let owner = owner(&request);
        Ok(Response::new(
            self.leasing.heartbeat(&owner, request.into_inner())?,
        ))
    }

    async fn lease_tasks(
        &self,
        request: Request<api::LeaseTasksRequest>,
    ) -> Result<Response<api::LeaseTasksResponse>, Status> {
        let owner = owner(&request);
        Ok(Response::new(
            self.leasing.lease(&owner, request.into_inner()).await?,
        ))
    }

    async fn renew_lease(
        &self,
        request: Request<api::RenewLeaseRequest>,
    ) -> Result<Response<api::RenewLeaseResponse>, Status> {
        let owner = owner(&request);
        Ok(Response::new(
            self.leasing.renew(&owner, request.into_inner()).await?,
        ))
    }

    async fn complete_task(
        &self,
        request: Request<api::CompleteTaskRequest>,
    ) -> Result<Response<api::CompleteTaskResponse>, Status> {
        use tracing::Instrument as _;
        // A child of the agent's report span (it sends its traceparent).
        let span = if federation_trace::exporting() {
            let span = tracing::info_span!(
                target: federation_trace::TARGET,
                "complete_task",
                otel.kind = "server",
                otel.status_description = tracing::field::Empty,
                region = %self.leasing.region(),
                task_id = %request.get_ref().task_id,
            );
            let parent = federation_trace::from_metadata(request.metadata());
            federation_trace::set_parent(&span, parent.as_ref());
            span
        } else {
            tracing::Span::none()
        };
        let owner = owner(&request);
        let completed = self
            .leasing
            .complete(&owner, request.into_inner())
            .instrument(span.clone())
            .await;
        if let Err(e) = &completed {
            federation_trace::fail(&span, &e.to_string());
        }
        Ok(Response::new(completed?))
    }
}
