//! Relayed get/watch/cancel: one call to the task's owner, counted at the
//! regions' peer servers (`federation_grpc_server_handled_total`), against
//! real controller processes on loopback.

mod support;

use federation::sandbox::{SandboxBuilder, string_attrs};
use federation_api as api;
use support::*;
use tonic::Code;

/// The seed plus a rule whose backup is asia_pacific: europe's tasks then
/// have two regions that may hold a takeover copy (north_america and
/// asia_pacific).
fn policy() -> String {
    let anchor = "      backup_region: \"north_america\"\n";
    assert!(SEED.contains(anchor), "seed layout changed");
    SEED.replacen(
        anchor,
        &format!(
            "{anchor}    - condition: \"customer_region == 'CH'\"\n      primary_region: \"europe\"\n      backup_region: \"asia_pacific\"\n"
        ),
        1,
    )
}

/// Calls of `method` of the peer service that `region` has handled, any code.
async fn peer_calls(sandbox: &federation::sandbox::Sandbox, region: &str, method: &str) -> u64 {
    let admin = sandbox.admin_http_addr(region).expect("admin address");
    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .expect("join");
    let service = "service=\"federation.v1.FederationPeer\"";
    let method = format!("method=\"{method}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("federation_grpc_server_handled_total{"))
        .filter(|l| l.contains(service) && l.contains(&method))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_get_or_cancel_is_one_relayed_call_to_the_owner() {
    let sandbox = formed(SandboxBuilder::new(federation_exe(), policy()).agents(0, 1)).await;
    let mut na = sandbox.client("north_america").await.expect("client");
    // No agents: the task stays queued in europe.
    let id = na
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "DE")]),
            payload: b"hello".to_vec(),
            ..Default::default()
        })
        .await
        .expect("accepted")
        .into_inner()
        .task_id;
    assert!(id.ends_with(".europe"), "{id}");

    let gets = peer_calls(&sandbox, "europe", "RelayGetTask").await;
    let t = na
        .get_task(api::GetTaskRequest {
            task_id: id.clone(),
        })
        .await
        .expect("get through north_america")
        .into_inner()
        .task
        .expect("task");
    assert_eq!(t.state(), api::TaskState::Queued);
    assert_eq!(t.owner_region, "europe");
    assert_eq!(
        peer_calls(&sandbox, "europe", "RelayGetTask").await - gets,
        1,
        "one relayed get per remote get"
    );

    let gets = peer_calls(&sandbox, "europe", "RelayGetTask").await;
    let cancels = peer_calls(&sandbox, "europe", "RelayCancelTask").await;
    let cancelled = na
        .cancel_task(api::CancelTaskRequest {
            task_id: id.clone(),
            reason: "customer withdrew".into(),
        })
        .await
        .expect("cancel through north_america")
        .into_inner();
    assert!(cancelled.cancelled);
    assert_eq!(
        peer_calls(&sandbox, "europe", "RelayCancelTask").await - cancels,
        1
    );
    assert_eq!(
        peer_calls(&sandbox, "europe", "RelayGetTask").await - gets,
        0,
        "a remote cancel does not look the task up first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_id_is_not_found_at_once_without_asking_the_backups() {
    let sandbox = formed(SandboxBuilder::new(federation_exe(), policy()).agents(0, 1)).await;
    let mut na = sandbox.client("north_america").await.expect("client");
    let unknown = "00000000-0000-7000-8000-000000000000.europe".to_string();
    let at_europe = peer_calls(&sandbox, "europe", "RelayGetTask").await;
    let at_ap = peer_calls(&sandbox, "asia_pacific", "RelayGetTask").await;
    let err = na
        .get_task(api::GetTaskRequest { task_id: unknown })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert_eq!(
        peer_calls(&sandbox, "asia_pacific", "RelayGetTask").await - at_ap,
        0,
        "a backup is not asked when the live owner does not know the id"
    );
    assert_eq!(
        peer_calls(&sandbox, "europe", "RelayGetTask").await - at_europe,
        1,
        "the owner is asked once"
    );
}
