//! The gRPC services: thin adapters that turn a request into a call on the
//! component that owns it ([`crate::routing::Router`],
//! [`crate::local_tasks::LocalTasks`], [`crate::gossip::Gossip`],
//! [`crate::federation_status::FederationStatus`],
//! [`crate::reload::Reloader`], [`crate::leasing::Leasing`],
//! [`crate::relay::Relay`]) and its [`crate::error::Error`] into a
//! status. No business logic lives here. Each service is wrapped in
//! [`crate::auth::Authed`] (who may call what).

mod admin;
mod agent;
mod client;
mod peer;

use federation_api as api;
use tonic::transport::server::Router;

use crate::controller::Node;

/// The gRPC service names this controller serves (for health reporting).
pub const SERVICE_NAMES: [&str; 4] = [
    "federation.v1.FederationClient",
    "federation.v1.FederationPeer",
    "federation.v1.RegionAgentApi",
    "federation.v1.FederationAdmin",
];

/// The router [`router`] builds: every service behind the gRPC metrics layer.
pub type Services = Router<
    tower::layer::util::Stack<crate::metrics::grpc::GrpcMetricsLayer, tower::layer::util::Identity>,
>;

/// The tonic router with every service of a controller, plus the standard
/// `grpc.health.v1` service (fed by `health`) and gRPC server reflection, so
/// off-the-shelf tools (grpcurl, grpc_health_probe, Kubernetes gRPC probes)
/// work against a controller.
pub fn router(
    node: &Node,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Services {
    let max = node.limits().max_message_bytes;
    // Both reflection versions: grpcurl speaks v1, many clients (grpcio's
    // Python helpers among them) still speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| tracing::error!(error = %e, "gRPC reflection v1 unavailable"))
        .ok();
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| tracing::error!(error = %e, "gRPC reflection v1alpha unavailable"))
        .ok();
    let auth = node.auth().clone();
    let streams = node.limits().max_concurrent_streams.max(1);
    // Health and reflection carry no data and need no role: probes and
    // off-the-shelf tools call them without credentials.
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(streams))
        .concurrency_limit_per_connection(streams as usize)
        .layer(node.metrics().grpc_layer())
        .add_service(health)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(crate::auth::Authed::new(
            api::federation_client_server::FederationClientServer::new(client::ClientService::new(
                node.router().clone(),
                node.tasks().clone(),
                node.relay().clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::federation_peer_server::FederationPeerServer::new(peer::PeerService::new(
                node.cluster().clone(),
                node.gossip().clone(),
                node.router().clone(),
                node.tasks().clone(),
                node.replicator().clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::region_agent_api_server::RegionAgentApiServer::new(agent::AgentService::new(
                node.leasing().clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
        .add_service(crate::auth::Authed::new(
            api::federation_admin_server::FederationAdminServer::new(admin::AdminService::new(
                node.status().clone(),
                node.reloader().clone(),
                node.drainer().clone(),
                node.log().clone(),
                max,
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            auth.clone(),
            max,
        ))
}
