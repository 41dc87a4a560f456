//! `FederationClient`: submit, get, watch, cancel, explain. Calls about a task
//! owned by another region are relayed to that region's controller.

use std::pin::Pin;
use std::sync::Arc;

use federation_api as api;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::local_tasks::LocalTasks;
use crate::relay::{self, Relay};
use crate::routing::{self, Router};
use crate::transport;

/// A stream of task events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<api::TaskEvent, Status>> + Send>>;

/// A local watch as the wire's stream.
pub(super) fn events(events: crate::local_tasks::Events) -> EventStream {
    Box::pin(events.map(|e| e.map_err(Status::from)))
}

/// The client service: routing for submits and explains, this region's
/// tasks, relaying for tasks held elsewhere.
#[derive(Debug)]
pub struct ClientService {
    router: Arc<Router>,
    tasks: Arc<LocalTasks>,
    relay: Arc<Relay>,
}

impl ClientService {
    /// A service over these components.
    pub fn new(router: Arc<Router>, tasks: Arc<LocalTasks>, relay: Arc<Relay>) -> Self {
        Self {
            router,
            tasks,
            relay,
        }
    }
}

#[tonic::async_trait]
impl api::federation_client_server::FederationClient for ClientService {
    #[tracing::instrument(level = "debug", skip_all, fields(region = %self.router.region()))]
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
            region = %self.router.region(),
        );
        federation_trace::set_parent(&span, parent.as_ref());
        // An exported span keeps what the records keep (a rejection's
        // message may list the attributes).
        let attributes =
            federation_trace::exporting().then(|| request.get_ref().attributes.clone());
        let submitted = routing::submit(&self.router, request.into_inner(), parent.as_ref())
            .instrument(span.clone())
            .await;
        if let (Err(e), Some(attributes)) = (&submitted, &attributes) {
            federation_trace::fail(&span, &routing::scrubbed_error(&self.router, attributes, e));
        }
        Ok(Response::new(submitted?))
    }

    async fn get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        let Some(first) = relay::first_hop(&self.relay, &req.task_id)? else {
            return Ok(Response::new(
                self.tasks.get_with_decision(&req.task_id).await?,
            ));
        };
        let deadline = self.relay.forward_timeout();
        let answer = relay::relay(&self.relay, &req.task_id, first, |mut c, _| {
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
        let Some(first) = relay::first_hop(&self.relay, &req.task_id)? else {
            return Ok(Response::new(events(self.tasks.watch(&req.task_id)?)));
        };
        let stream = relay::relay(&self.relay, &req.task_id, first, |mut c, _| {
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
        let first = relay::first_hop(&self.relay, &req.task_id)?;
        if req.reason.len() > 1024 {
            return Err(Error::limit("reason", "longer than 1024 bytes").into());
        }
        let Some(first) = first else {
            return Ok(Response::new(
                self.tasks.cancel(&req.task_id, &req.reason).await?,
            ));
        };
        let deadline = self.relay.forward_timeout();
        let answer = relay::relay(&self.relay, &req.task_id, first, |mut c, _| {
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
        Ok(Response::new(self.tasks.list(request.get_ref())?))
    }

    async fn explain_route(
        &self,
        request: Request<api::ExplainRouteRequest>,
    ) -> Result<Response<api::ExplainRouteResponse>, Status> {
        Ok(Response::new(routing::explain(
            &self.router,
            request.get_ref(),
        )?))
    }
}
