//! The gRPC services: thin handlers that validate input, call into
//! [`crate::routing`], [`crate::tasks`] and [`crate::membership`], and turn
//! [`crate::error::Error`] into a status. No business logic lives here.
//! Each service is wrapped in [`crate::auth::Authed`] (who may call what).

mod admin;
mod agent;
mod client;
mod peer;

pub use admin::{reload, status};

use std::sync::Arc;

use federation_api as api;
use tonic::transport::server::Router;

use crate::controller::Node;

/// The tonic router with every service of a controller.
pub fn router(node: Arc<Node>) -> Router {
    let max = node.limits.max_message_bytes;
    let auth = node.auth.clone();
    let streams = node.limits.max_concurrent_streams.max(1);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(streams))
        .concurrency_limit_per_connection(streams as usize)
        .add_service(crate::auth::Authed::new(
            api::federation_client_server::FederationClientServer::new(client::ClientService::new(
                node.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::federation_peer_server::FederationPeerServer::new(peer::PeerService::new(
                node.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::region_agent_api_server::RegionAgentApiServer::new(agent::AgentService::new(
                node.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::federation_admin_server::FederationAdminServer::new(admin::AdminService::new(
                node,
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
}
