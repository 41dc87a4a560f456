//! `FederationClient`: submit, get, watch, cancel, explain. Calls about a task
//! owned by another region are relayed to that region's controller.

use std::pin::Pin;
use std::sync::Arc;

use federation_api as api;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::relay;
use crate::controller::Node;
use crate::error::{Error, Result};
use crate::{routing, transport};

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

/// Reads a task this region owns.
pub fn local_get(node: &Node, task_id: &str) -> Result<api::Task> {
    node.store
        .get(task_id)
        .map_err(Error::from)?
        .ok_or_else(|| Error::task_not_found(task_id))
}

/// A task this region owns with the decision that placed it (from this
/// region's decision log, see [`crate::task_decision`]).
pub async fn local_get_with_decision(node: &Node, task_id: &str) -> Result<api::GetTaskResponse> {
    let task = local_get(node, task_id)?;
    let decision = crate::task_decision::of_local_task(node.log.path(), &task).await;
    Ok(api::GetTaskResponse {
        task: Some(task),
        decision,
    })
}

/// Records one ListTasks call reads at most, whatever it keeps.
const LIST_MAX_SCAN: usize = 10_000;

/// One page of this controller's own tasks (see `ListTasks` in the proto).
pub fn list_tasks(node: &Node, req: &api::ListTasksRequest) -> Result<api::ListTasksResponse> {
    let page_size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => n as usize,
        _ => return Err(Error::invalid("page_size", "at most 1000")),
    };
    if req.max_age_ms < 0 {
        return Err(Error::invalid("max_age_ms", "negative"));
    }
    if req.min_age_ms < 0 {
        return Err(Error::invalid("min_age_ms", "negative"));
    }
    let mut states = Vec::with_capacity(req.states.len());
    for s in &req.states {
        match api::TaskState::try_from(*s) {
            Ok(api::TaskState::Unspecified) | Err(_) => {
                return Err(Error::invalid("states", format!("unknown task state {s}")));
            }
            Ok(state) => states.push(state as i32),
        }
    }
    if req.page_token.len() > 256 {
        return Err(Error::invalid(
            "page_token",
            "not a token this controller gave",
        ));
    }
    let now = crate::tasks::now_unix_ms();
    let keep = |t: &api::Task| {
        (states.is_empty() || states.contains(&t.state))
            && (req.rule == 0 || t.rule_index + 1 == req.rule)
            && (req.max_age_ms == 0 || now.saturating_sub(t.created_unix_ms) <= req.max_age_ms)
            && (req.min_age_ms == 0 || now.saturating_sub(t.created_unix_ms) >= req.min_age_ms)
    };
    let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
    let (mut tasks, next) = node
        .store
        .scan(after, page_size, LIST_MAX_SCAN, keep)
        .map_err(Error::from)?;
    for t in &mut tasks {
        t.payload.clear();
    }
    Ok(api::ListTasksResponse {
        tasks,
        next_page_token: next.unwrap_or_default(),
    })
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
        let done = crate::tasks::is_terminal(current.state());
        yield Ok(api::TaskEvent { task: Some(current) });
        if done {
            return;
        }
        loop {
            match changes.recv().await {
                Ok(task) if task.task_id == id && task.version > version => {
                    version = task.version;
                    let done = crate::tasks::is_terminal(task.state());
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
                            let done = crate::tasks::is_terminal(task.state());
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
    let done = node
        .store
        .cancel(task_id, reason)
        .await
        .map_err(Error::from)?;
    Ok(api::CancelTaskResponse {
        task: Some(done.task),
        cancelled: done.cancelled,
    })
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
        // An exported span keeps what the records keep (a rejection's
        // message may list the attributes).
        let attributes =
            federation_trace::exporting().then(|| request.get_ref().attributes.clone());
        let submitted = routing::submit(&self.node, request.into_inner(), parent.as_ref())
            .instrument(span.clone())
            .await;
        if let (Err(e), Some(attributes)) = (&submitted, &attributes) {
            federation_trace::fail(&span, &routing::scrubbed_error(&self.node, attributes, e));
        }
        Ok(Response::new(submitted?))
    }

    async fn get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        let Some(first) = relay::first_hop(&self.node, &req.task_id)? else {
            return Ok(Response::new(
                local_get_with_decision(&self.node, &req.task_id).await?,
            ));
        };
        let deadline = self.node.timers.forward_timeout;
        let answer = relay::relay(&self.node, &req.task_id, first, |mut c, _| {
            let req = req.clone();
            async move {
                let resp = c
                    .relay_get_task(transport::with_deadline(req, deadline))
                    .await?
                    .into_inner();
                let task = resp.task.clone();
                Ok((resp, task))
            }
        })
        .await?;
        Ok(Response::new(answer))
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        request: Request<api::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let req = request.into_inner();
        let Some(first) = relay::first_hop(&self.node, &req.task_id)? else {
            return Ok(Response::new(local_watch(&self.node, &req.task_id)?));
        };
        let stream = relay::relay(&self.node, &req.task_id, first, |mut c, _| {
            let req = req.clone();
            async move {
                let mut upstream = c.relay_watch_task(req).await?.into_inner();
                // The first event is the task as it is there: it says whether
                // the copy moved.
                let first = upstream.message().await?;
                let task = first.as_ref().and_then(|e| e.task.clone());
                let stream: EventStream =
                    Box::pin(futures::stream::iter(first.map(Ok)).chain(upstream));
                Ok((stream, task))
            }
        })
        .await?;
        Ok(Response::new(stream))
    }

    async fn cancel_task(
        &self,
        request: Request<api::CancelTaskRequest>,
    ) -> Result<Response<api::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        let first = relay::first_hop(&self.node, &req.task_id)?;
        if req.reason.len() > 1024 {
            return Err(Error::limit("reason", "longer than 1024 bytes").into());
        }
        let Some(first) = first else {
            return Ok(Response::new(
                local_cancel(&self.node, &req.task_id, &req.reason).await?,
            ));
        };
        let deadline = self.node.timers.forward_timeout;
        let answer = relay::relay(&self.node, &req.task_id, first, |mut c, _| {
            let req = req.clone();
            async move {
                let resp = c
                    .relay_cancel_task(transport::with_deadline(req, deadline))
                    .await?
                    .into_inner();
                let task = resp.task.clone();
                Ok((resp, task))
            }
        })
        .await?;
        Ok(Response::new(answer))
    }

    async fn list_tasks(
        &self,
        request: Request<api::ListTasksRequest>,
    ) -> Result<Response<api::ListTasksResponse>, Status> {
        Ok(Response::new(list_tasks(&self.node, request.get_ref())?))
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
