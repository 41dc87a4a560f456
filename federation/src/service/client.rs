//! `FederationClient`: submit, get, watch, cancel, explain. Calls about a task
//! owned by another region are relayed to that region's controller.

use std::pin::Pin;
use std::sync::Arc;

use federation_api as api;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::controller::Node;
use crate::error::{Error, Result};
use crate::{routing, transport, wire};

/// A stream of task events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<api::TaskEvent, Status>> + Send>>;

/// The client service.
#[derive(Debug)]
pub struct ClientService {
    node: Arc<Node>,
}

impl ClientService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn is_terminal(state: i32) -> bool {
    matches!(
        api::TaskState::try_from(state),
        Ok(api::TaskState::Succeeded | api::TaskState::Failed | api::TaskState::Cancelled)
    )
}

/// Reads a task this region owns.
pub fn local_get(node: &Node, task_id: &str) -> Result<api::Task> {
    node.store
        .get(task_id)
        .map_err(Error::from)?
        .ok_or_else(|| Error::task_not_found(task_id))
}

/// Watches a task this region owns: the current state first, then every
/// change, ending after a terminal state.
pub fn local_watch(node: &Arc<Node>, task_id: &str) -> Result<EventStream> {
    // Subscribe before reading, so no change between the two is missed.
    let mut changes = node.store.subscribe();
    let current = local_get(node, task_id)?;
    let id = task_id.to_string();
    let node = node.clone();
    let stream = async_stream::stream! {
        let mut version = current.version;
        let done = is_terminal(current.state);
        yield Ok(api::TaskEvent { task: Some(current) });
        if done {
            return;
        }
        loop {
            match changes.recv().await {
                Ok(task) if task.task_id == id && task.version > version => {
                    version = task.version;
                    let done = is_terminal(task.state);
                    yield Ok(api::TaskEvent { task: Some(task) });
                    if done {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed changes: resynchronise from the store.
                    if let Ok(task) = local_get(&node, &id) {
                        if task.version > version {
                            version = task.version;
                            let done = is_terminal(task.state);
                            yield Ok(api::TaskEvent { task: Some(task) });
                            if done {
                                return;
                            }
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    yield Err(Status::unavailable("controller is shutting down"));
                    return;
                }
            }
        }
    };
    Ok(Box::pin(stream))
}

/// Cancels a task this region owns.
pub async fn local_cancel(
    node: &Node,
    task_id: &str,
    reason: &str,
) -> Result<api::CancelTaskResponse> {
    let reason = if reason.is_empty() {
        "cancelled by client"
    } else {
        reason
    };
    let (task, cancelled) = node
        .store
        .cancel(task_id, reason)
        .await
        .map_err(Error::from)?;
    Ok(api::CancelTaskResponse {
        task: Some(task),
        cancelled,
    })
}

/// The region holding the live copy of the task: its owner, or the backup
/// that took it over (see `replication::takeover::locate`).
async fn owner(node: &Node, task_id: &str) -> Result<String> {
    wire::check_task_id(task_id)?;
    let owner = wire::owner_of(task_id).unwrap_or_default().to_string();
    if owner != node.region && node.policy().region(&owner).is_none() {
        return Err(Error::task_not_found(task_id));
    }
    Ok(crate::replication::takeover::locate(node, task_id)
        .await?
        .unwrap_or_else(|| node.region.clone()))
}

fn relay_error(region: &str, status: Status) -> Status {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            status
        }
        code => Status::new(code, format!("relayed to {region}: {}", status.message())),
    }
}

#[tonic::async_trait]
impl api::federation_client_server::FederationClient for ClientService {
    #[tracing::instrument(level = "debug", skip_all, fields(region = %self.node.region))]
    async fn submit_task(
        &self,
        request: Request<api::SubmitTaskRequest>,
    ) -> Result<Response<api::SubmitTaskResponse>, Status> {
        use tracing::Instrument as _;
        // The client's trace continues here (or one starts).
        let parent = federation_trace::from_metadata(request.metadata());
        let span = tracing::info_span!(
            target: federation_trace::TARGET,
            "submit_task",
            otel.kind = "server",
            otel.status_description = tracing::field::Empty,
            region = %self.node.region,
        );
        federation_trace::set_parent(&span, parent.as_ref());
        let submitted = routing::submit(&self.node, request.into_inner(), parent.as_ref())
            .instrument(span.clone())
            .await;
        if let Err(e) = &submitted {
            federation_trace::fail(&span, e);
        }
        Ok(Response::new(submitted?))
    }

    async fn get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        let owner = owner(&self.node, &req.task_id).await?;
        if owner == self.node.region {
            return Ok(Response::new(api::GetTaskResponse {
                task: Some(local_get(&self.node, &req.task_id)?),
            }));
        }
        let mut client = self.node.peer(&owner)?;
        let deadline = self.node.timers.forward_timeout;
        match tokio::time::timeout(
            deadline,
            client.relay_get_task(transport::with_deadline(req, deadline)),
        )
        .await
        {
            Ok(r) => r.map_err(|s| relay_error(&owner, s)),
            Err(_) => Err(Error::Peer {
                region: owner,
                why: "relay timed out".into(),
            }
            .into()),
        }
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        request: Request<api::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let req = request.into_inner();
        let owner = owner(&self.node, &req.task_id).await?;
        if owner == self.node.region {
            return Ok(Response::new(local_watch(&self.node, &req.task_id)?));
        }
        let mut client = self.node.peer(&owner)?;
        let deadline = self.node.timers.forward_timeout;
        let upstream = match tokio::time::timeout(deadline, client.relay_watch_task(req)).await {
            Ok(r) => r.map_err(|s| relay_error(&owner, s))?.into_inner(),
            Err(_) => {
                return Err(Error::Peer {
                    region: owner,
                    why: "relay timed out".into(),
                }
                .into());
            }
        };
        Ok(Response::new(Box::pin(upstream)))
    }

    async fn cancel_task(
        &self,
        request: Request<api::CancelTaskRequest>,
    ) -> Result<Response<api::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        let owner = owner(&self.node, &req.task_id).await?;
        if req.reason.len() > 1024 {
            return Err(Error::limit("reason", "longer than 1024 bytes").into());
        }
        if owner == self.node.region {
            return Ok(Response::new(
                local_cancel(&self.node, &req.task_id, &req.reason).await?,
            ));
        }
        let mut client = self.node.peer(&owner)?;
        let deadline = self.node.timers.forward_timeout;
        match tokio::time::timeout(
            deadline,
            client.relay_cancel_task(transport::with_deadline(req, deadline)),
        )
        .await
        {
            Ok(r) => r.map_err(|s| relay_error(&owner, s)),
            Err(_) => Err(Error::Peer {
                region: owner,
                why: "relay timed out".into(),
            }
            .into()),
        }
    }

    async fn explain_route(
        &self,
        request: Request<api::ExplainRouteRequest>,
    ) -> Result<Response<api::ExplainRouteResponse>, Status> {
        Ok(Response::new(routing::explain(
            &self.node,
            request.get_ref(),
        )?))
    }
}
