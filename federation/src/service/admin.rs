//! `FederationAdmin`: federation status, policy reload, drain, the
//! decision log; each an adapter over its owner ([`FederationStatus`],
//! [`Reloader`], [`Drainer`], [`crate::decision_query`]).

use std::sync::Arc;

use federation_api as api;
use tonic::{Request, Response, Status};

use crate::audit::DecisionLog;
use crate::drain::Drainer;
use crate::error::Error;
use crate::federation_status::FederationStatus;
use crate::reload::Reloader;

/// The admin service.
#[derive(Debug)]
pub struct AdminService {
    status: Arc<FederationStatus>,
    reloader: Arc<Reloader>,
    drainer: Arc<Drainer>,
    log: DecisionLog,
    max_message_bytes: usize,
}

impl AdminService {
    /// A service over these components.
    pub fn new(
        status: Arc<FederationStatus>,
        reloader: Arc<Reloader>,
        drainer: Arc<Drainer>,
        log: DecisionLog,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            status,
            reloader,
            drainer,
            log,
            max_message_bytes,
        }
    }
}

#[tonic::async_trait]
impl api::federation_admin_server::FederationAdmin for AdminService {
    async fn federation_status(
        &self,
        _request: Request<api::FederationStatusRequest>,
    ) -> Result<Response<api::FederationStatusResponse>, Status> {
        Ok(Response::new(self.status.report()))
    }

    async fn reload_policy(
        &self,
        request: Request<api::ReloadPolicyRequest>,
    ) -> Result<Response<api::ReloadPolicyResponse>, Status> {
        let req = request.into_inner();
        if req.policy_source.len() + req.approvals.len() > self.max_message_bytes {
            return Err(Error::limit("policy_source", "larger than the message limit").into());
        }
        Ok(Response::new(
            self.reloader
                .reload_with(
                    &req.policy_source,
                    &req.format,
                    &req.source_name,
                    &req.approvals,
                )
                .await,
        ))
    }

    async fn drain(
        &self,
        request: Request<api::DrainRequest>,
    ) -> Result<Response<api::DrainResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.drainer.set(req.drain).await))
    }

    async fn list_decisions(
        &self,
        request: Request<api::ListDecisionsRequest>,
    ) -> Result<Response<api::ListDecisionsResponse>, Status> {
        Ok(Response::new(
            crate::decision_query::list(&self.log, request.get_ref()).await?,
        ))
    }
}
