//! `FederationPeer`: what controllers call on one another — advertisements
//! (gossip both ways), forwarded tasks, relayed get/watch/cancel (of tasks we
//! own or hold after a takeover), and snapshot pushes (verified and stored by
//! `replication::receiver`).

use std::sync::Arc;
use std::time::Instant;

use federation_api as api;
use tonic::{Request, Response, Status, Streaming};

use super::client::{EventStream, local_cancel, local_get, local_watch};
use crate::controller::Node;
use crate::error::Error;
use crate::{routing, wire};

/// The peer service.
#[derive(Debug)]
pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn owned(&self, task_id: &str) -> Result<(), Status> {
        wire::check_task_id(task_id)?;
        let held = matches!(self.node.store.get(task_id), Ok(Some(_)));
        if !held && wire::owner_of(task_id) != Some(self.node.region.as_str()) {
            return Err(Error::task_not_found(task_id).into());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl api::federation_peer_server::FederationPeer for PeerService {
    async fn advertise(
        &self,
        request: Request<api::AdvertiseRequest>,
    ) -> Result<Response<api::AdvertiseResponse>, Status> {
        let req = request.into_inner();
        let now = Instant::now();
        let origin = req
            .origin
            .ok_or_else(|| Status::from(Error::invalid("origin", "missing")))?;
        if self.node.policy().region(&origin.region).is_none() {
            return Err(Error::invalid(
                "origin.region",
                format!(
                    "`{}` is not a region of this federation",
                    wire::truncate(&origin.region, 64)
                ),
            )
            .into());
        }
        if req.known.len() > 1024 {
            return Err(Error::limit("known", "more than 1024 advertisements").into());
        }
        self.node.membership.observe(&origin, now);
        crate::replication::takeover::on_advertisement(&self.node, &origin).await;
        for ad in &req.known {
            self.node.membership.observe(ad, now);
            if !ad.takeovers.is_empty() {
                crate::replication::takeover::on_advertisement(&self.node, ad).await;
            }
        }
        Ok(Response::new(api::AdvertiseResponse {
            origin: Some(self.node.advertisement(false)),
            known: self.node.membership.known(),
        }))
    }

    async fn forward_task(
        &self,
        request: Request<api::ForwardTaskRequest>,
    ) -> Result<Response<api::ForwardTaskResponse>, Status> {
        Ok(Response::new(
            routing::accept_forward(&self.node, request.into_inner()).await?,
        ))
    }

    async fn relay_get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        self.owned(&req.task_id)?;
        Ok(Response::new(api::GetTaskResponse {
            task: Some(local_get(&self.node, &req.task_id)?),
        }))
    }

    type RelayWatchTaskStream = EventStream;

    async fn relay_watch_task(
        &self,
        request: Request<api::WatchTaskRequest>,
    ) -> Result<Response<Self::RelayWatchTaskStream>, Status> {
        let req = request.into_inner();
        self.owned(&req.task_id)?;
        Ok(Response::new(local_watch(&self.node, &req.task_id)?))
    }

    async fn relay_cancel_task(
        &self,
        request: Request<api::CancelTaskRequest>,
    ) -> Result<Response<api::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        self.owned(&req.task_id)?;
        Ok(Response::new(
            local_cancel(&self.node, &req.task_id, &req.reason).await?,
        ))
    }

    async fn push_snapshot(
        &self,
        request: Request<Streaming<api::SnapshotChunk>>,
    ) -> Result<Response<api::PushSnapshotResponse>, Status> {
        let repl = &self.node.replication;
        if !repl.enabled() {
            return Err(Error::Precondition(format!(
                "snapshot replication is off in {} (disabled or no key ring)",
                self.node.region
            ))
            .into());
        }
        let chunks = crate::replication::receiver::collect(
            request.into_inner(),
            repl.receiver.limits(),
            repl.counters(),
        )
        .await?;
        let policy = self.node.policy();
        let outcome = repl.receiver.receive(&policy, &chunks, repl.counters());
        Ok(Response::new(match outcome {
            Ok(_) => api::PushSnapshotResponse {
                accepted: true,
                reason: String::new(),
            },
            Err(r) => api::PushSnapshotResponse {
                accepted: false,
                reason: r.to_string(),
            },
        }))
    }
}
