//! `FederationPeer`: what controllers call on one another — advertisements
//! (gossip both ways), forwarded tasks, relayed get/watch/cancel (of tasks we
//! own or hold after a takeover), and snapshot pushes (verified and stored by
//! `replication::receiver`).
//!
//! With TLS, the caller's certificate must name the region a message claims
//! to come from (Advertise `origin`, ForwardTask `entry_region`, a snapshot's
//! source); the auth layer has already checked it is a peer.

use std::sync::Arc;
use std::time::Instant;

use federation_api as api;
use tonic::{Request, Response, Status, Streaming};

use super::client::{EventStream, local_cancel, local_get_with_decision, local_watch};
use crate::auth::Caller;
use crate::controller::Node;
use crate::error::Error;
use crate::replication::inbound::{self, Pushed};
use crate::replication::{Rejection, receiver::Accepted};
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

    /// Checks that the calling peer's certificate names `claimed`
    /// (`field` for the message); records the tags it attests. Plaintext
    /// mode has no caller and checks nothing.
    fn check_caller<T>(
        &self,
        request: &Request<T>,
        field: &str,
        claimed: &str,
    ) -> Result<(), Status> {
        self.check_caller_identity(request.extensions().get::<Caller>(), field, claimed)
    }

    fn check_caller_identity(
        &self,
        caller: Option<&Caller>,
        field: &str,
        claimed: &str,
    ) -> Result<(), Status> {
        let Some(Caller(id)) = caller else {
            return Ok(());
        };
        let region = id.region.as_deref().unwrap_or("");
        if region != claimed {
            tracing::warn!(certificate = %id, claimed = %wire::truncate(claimed, 64), %field, "peer claims another region than its certificate; refused");
            return Err(Error::Denied(format!(
                "{field} `{}` does not match the caller's certificate ({id})",
                wire::truncate(claimed, 64)
            ))
            .into());
        }
        self.node.membership.attest(region, &id.tags);
        Ok(())
    }

    fn owned(&self, task_id: &str) -> Result<(), Status> {
        wire::check_task_id(task_id)?;
        let held = matches!(self.node.store.get(task_id), Ok(Some(_)));
        if !held && wire::owner_of(task_id) != Some(self.node.region.as_str()) {
            return Err(Error::task_not_found(task_id).into());
        }
        if !held {
            // Ours, not here: a backup's notice may say who holds it now.
            if let Some(by) = self.node.replication.takeover.taken_over_by(task_id) {
                let mut status = Status::from(Error::task_not_found(task_id));
                if let Ok(v) = by.parse() {
                    status.metadata_mut().insert(super::relay::TAKEN_OVER_BY, v);
                }
                return Err(status);
            }
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
        let claimed = request
            .get_ref()
            .origin
            .as_ref()
            .map(|o| o.region.clone())
            .ok_or_else(|| Status::from(Error::invalid("origin", "missing")))?;
        self.check_caller(&request, "origin.region", &claimed)?;
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
        let max_known = self.node.limits.max_known_advertisements;
        if req.known.len() > max_known {
            return Err(Error::limit(
                "known",
                format!("more than max_known_advertisements ({max_known}) advertisements"),
            )
            .into());
        }
        if req
            .digest
            .as_ref()
            .is_some_and(|d| d.stale.len() > max_known)
        {
            return Err(Error::limit(
                "digest.stale",
                format!("more than max_known_advertisements ({max_known}) entries"),
            )
            .into());
        }
        crate::controller::merge_gossip(&self.node, &origin, &req.known, now).await;
        let membership = &self.node.membership;
        membership.note_digest(&origin.region, req.digest.as_ref());
        // Relayed: what the caller's digest says it lacks; everything to an
        // older peer that sent no digest.
        let response = api::AdvertiseResponse {
            origin: Some(self.node.current_advertisement()),
            known: membership.relays_for(&origin.region, req.digest.as_ref()),
            digest: Some(membership.digest(Instant::now())),
        };
        self.node
            .metrics
            .gossip_sent(prost::Message::encoded_len(&response));
        Ok(Response::new(response))
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
        use tracing::Instrument as _;
        // A child of the entry's forward span.
        let parent = federation_trace::from_metadata(request.metadata());
        let span = tracing::info_span!(
            target: federation_trace::TARGET,
            "forward_task",
            otel.kind = "server",
            otel.status_description = tracing::field::Empty,
            region = %self.node.region,
            entry_region = %entry,
        );
        federation_trace::set_parent(&span, parent.as_ref());
        // Refused, the task is not held here: the exported span keeps what
        // the records keep.
        let attributes = federation_trace::exporting()
            .then(|| {
                request
                    .get_ref()
                    .submit
                    .as_ref()
                    .map(|s| s.attributes.clone())
            })
            .flatten();
        let accepted = routing::accept_forward(&self.node, request.into_inner(), parent.as_ref())
            .instrument(span.clone())
            .await;
        if let (Err(e), Some(attributes)) = (&accepted, &attributes) {
            federation_trace::fail(&span, &routing::scrubbed_error(&self.node, attributes, e));
        }
        Ok(Response::new(accepted?))
    }

    async fn relay_get_task(
        &self,
        request: Request<api::GetTaskRequest>,
    ) -> Result<Response<api::GetTaskResponse>, Status> {
        let req = request.into_inner();
        self.owned(&req.task_id)?;
        Ok(Response::new(
            local_get_with_decision(&self.node, &req.task_id).await?,
        ))
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
            crate::status_view::remote::answer(&self.node, &req).await?,
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
        inbound::receive(&self.node, request.into_inner(), what, |source| {
            self.check_caller_identity(caller.as_ref(), "snapshot source_region", source)
        })
        .await
    }
}
