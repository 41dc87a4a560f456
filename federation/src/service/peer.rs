//! `FederationPeer`: what controllers call on one another — advertisements
//! (gossip both ways), forwarded tasks, relayed get/watch/cancel (of tasks we
//! own or hold after a takeover: `Replicator::check_answerable`), and
//! snapshot pushes (`replication::inbound`). An adapter: each call goes to
//! one component.
//!
//! With TLS, the caller's certificate must name the region a message claims
//! to come from (Advertise `origin`, ForwardTask `entry_region`, a snapshot's
//! source; checked by `Cluster::check_peer_claim`); the auth layer has
//! already checked it is a peer.

use std::sync::Arc;

use federation_api as api;
use tonic::{Request, Response, Status, Streaming};

use super::client::{EventStream, events};
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::Error;
use crate::gossip::Gossip;
use crate::local_tasks::LocalTasks;
use crate::replication::Replicator;
use crate::replication::inbound::{self, Pushed};
use crate::replication::{Rejection, receiver::Accepted};
use crate::routing::{self, Router};

/// The peer service: gossip, forwarded tasks (routing), relayed calls
/// (this region's tasks), pushes (replication), recent decisions (the log).
#[derive(Debug)]
pub struct PeerService {
    cluster: Arc<Cluster>,
    gossip: Arc<Gossip>,
    router: Arc<Router>,
    tasks: Arc<LocalTasks>,
    replicator: Arc<Replicator>,
}

impl PeerService {
    /// A service over these components.
    pub fn new(
        cluster: Arc<Cluster>,
        gossip: Arc<Gossip>,
        router: Arc<Router>,
        tasks: Arc<LocalTasks>,
        replicator: Arc<Replicator>,
    ) -> Self {
        Self {
            cluster,
            gossip,
            router,
            tasks,
            replicator,
        }
    }

    /// Checks that the calling peer's certificate names `claimed`
    /// (`field` for the message); records the tags it attests. Plaintext
    /// mode has no caller and checks nothing.
    fn check_caller<T>(
        &self,
        request: &Request<T>,
        field: &str,
        claimed: &str,
    ) -> Result<(), Status> {
        Ok(self
            .cluster
            .check_peer_claim(request.extensions().get::<Caller>(), field, claimed)?)
    }
}

#[tonic::async_trait]
impl api::federation_peer_server::FederationPeer for PeerService {
    async fn advertise(
        &self,
        request: Request<api::AdvertiseRequest>,
    ) -> Result<Response<api::AdvertiseResponse>, Status> {
        let claimed = request
            .get_ref()
            .origin
            .as_ref()
            .map(|o| o.region.clone())
            .ok_or_else(|| Status::from(Error::invalid("origin", "missing")))?;
        self.check_caller(&request, "origin.region", &claimed)?;
        Ok(Response::new(
            self.gossip.answer(request.into_inner()).await?,
        ))
    }

    async fn forward_task(
        &self,
        request: Request<api::ForwardTaskRequest>,
    ) -> Result<Response<api::ForwardTaskResponse>, Status> {
        let entry = request.get_ref().entry_region.clone();
        if entry.is_empty() {
            return Err(Error::invalid("entry_region", "missing").into());
        }
        self.check_caller(&request, "entry_region", &entry)?;
        // From this region's own certificate only a sibling replica's relay
        // (a draining replica passing a task on) is a forward.
        let own = request
            .extensions()
            .get::<Caller>()
            .is_some_and(|c| c.0.region.as_deref() == Some(self.cluster.region()));
        if own && request.get_ref().relayed_by.is_empty() {
            return Err(Error::Denied(format!(
                "ForwardTask from this region's own certificate ({}) must be a sibling replica's relay (relayed_by)",
                self.cluster.region()
            ))
            .into());
        }
        let parent = federation_trace::from_metadata(request.metadata());
        let accepted =
            routing::accept_forward_in_span(&self.router, request.into_inner(), parent).await;
        Ok(Response::new(accepted?))
    }

    async fn relay_get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        self.replicator.check_answerable(&req.task_id)?;
        Ok(Response::new(
            self.tasks.get_with_decision(&req.task_id).await?,
        ))
    }

    type RelayWatchTaskStream = EventStream;

    async fn relay_watch_task(
        &self,
        request: Request<api::WatchTaskRequest>,
    ) -> Result<Response<Self::RelayWatchTaskStream>, Status> {
        let req = request.into_inner();
        self.replicator.check_answerable(&req.task_id)?;
        Ok(Response::new(events(self.tasks.watch(&req.task_id)?)))
    }

    async fn relay_cancel_task(
        &self,
        request: Request<api::CancelTaskRequest>,
    ) -> Result<Response<api::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        self.replicator.check_answerable(&req.task_id)?;
        Ok(Response::new(
            self.tasks.cancel(&req.task_id, &req.reason).await?,
        ))
    }

    async fn push_snapshot(
        &self,
        request: Request<Streaming<api::SnapshotChunk>>,
    ) -> Result<Response<api::PushSnapshotResponse>, Status> {
        let outcome = self.pushed(request, Pushed::Snapshot).await?;
        Ok(Response::new(inbound::snapshot_response(outcome)))
    }

    async fn push_changes(
        &self,
        request: Request<Streaming<api::SnapshotChunk>>,
    ) -> Result<Response<api::PushChangesResponse>, Status> {
        let outcome = self.pushed(request, Pushed::Changes).await?;
        Ok(Response::new(inbound::changes_response(outcome)))
    }

    async fn recent_decisions(
        &self,
        request: Request<api::ListDecisionsRequest>,
    ) -> Result<Response<api::ListDecisionsResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            crate::status_view::remote::answer(&self.replicator.log, &req).await?,
        ))
    }
}

impl PeerService {
    /// A push, received by `replication::inbound`; with TLS the caller must
    /// be the region whose state it pushes.
    async fn pushed(
        &self,
        request: Request<Streaming<api::SnapshotChunk>>,
        what: Pushed,
    ) -> Result<Result<Accepted, Rejection>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        Ok(
            inbound::receive(&self.replicator, request.into_inner(), what, |source| {
                self.cluster
                    .check_peer_claim(caller.as_ref(), "snapshot source_region", source)
            })
            .await?,
        )
    }
}
