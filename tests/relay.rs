//! Relayed get/watch/cancel: one call to the task's owner, counted at the
//! regions' peer servers (`federation_grpc_server_handled_total`), against
//! real controller processes on loopback.

mod support;

use federation::replication::{KeyRing, receiver};
use federation_api as api;
use federation_sandbox::{Sandbox, SandboxBuilder, string_attrs};
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
async fn peer_calls(sandbox: &federation_sandbox::Sandbox, region: &str, method: &str) -> u64 {
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

/// The stored snapshot `holder` has of `source`: its pending task ids.
fn stored(sb: &Sandbox, holder: &str, source: &str) -> Option<Vec<String>> {
    let ring = KeyRing::load_file(&sb.keys_path()).expect("sandbox ring");
    let path = receiver::snapshot_path(&sb.data_dir(holder).expect("dir"), source);
    if !path.exists() {
        return None;
    }
    let (_, body) = receiver::open_file(&path, &ring).ok()?;
    Some(body.tasks.into_iter().map(|t| t.task_id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_returned_owner_lost_to_a_takeover_is_one_redirect_away() {
    let mut sb = formed(
        SandboxBuilder::new(federation_exe(), SEED)
            .agents(0, 1)
            .env(
                "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__SYNC_INTERVAL",
                "300ms",
            )
            .env("FEDERATION__NODE__TIMERS__TAKEOVER_GRACE", "1s"),
    )
    .await;
    // No agents: a US task stays queued at north_america, then at europe.
    let mut na = sb.client("north_america").await.expect("client");
    let id = na
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "US")]),
            payload: b"work".to_vec(),
            ..Default::default()
        })
        .await
        .expect("accepted")
        .into_inner()
        .task_id;
    eventually("europe holding the task", PATIENCE, || async {
        stored(&sb, "europe", "north_america")?
            .contains(&id)
            .then_some(())
    })
    .await;
    sb.kill_controller("north_america").expect("kill");
    let mut ap = sb.client("asia_pacific").await.expect("client");
    // The owner dead: its backup answers, after the takeover.
    let get = |mut c: api::federation_client_client::FederationClientClient<_>, id: String| async move {
        c.get_task(api::GetTaskRequest { task_id: id })
            .await
            .ok()?
            .into_inner()
            .task
    };
    eventually("the task readable at europe", PATIENCE, || {
        let (c, id) = (ap.clone(), id.clone());
        async move { get(c, id).await.filter(|t| t.taken_over.is_some()) }
    })
    .await;
    sb.start_controller("north_america").expect("restart");
    // The returned owner applies europe's notice: its copy is cancelled.
    eventually(
        "north_america marking its copy taken over",
        PATIENCE,
        || {
            let id = id.clone();
            let sb = &sb;
            async move {
                let mut na = sb.client("north_america").await.ok()?;
                na.list_tasks(api::ListTasksRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .tasks
                    .into_iter()
                    .find(|t| t.task_id == id && t.state() == api::TaskState::Cancelled)
            }
        },
    )
    .await;
    // Through asia_pacific: one call to the owner, whose copy says where
    // the live one is, and one to europe.
    let (at_na, at_eu) = (
        peer_calls(&sb, "north_america", "RelayGetTask").await,
        peer_calls(&sb, "europe", "RelayGetTask").await,
    );
    let t = get(ap.clone(), id.clone()).await.expect("readable");
    assert_eq!(t.state(), api::TaskState::Queued, "the live copy: {t:?}");
    let to = t.taken_over.expect("marked taken over");
    assert_eq!(to.to_region, "europe");
    assert_eq!(
        peer_calls(&sb, "north_america", "RelayGetTask").await - at_na,
        1
    );
    assert_eq!(peer_calls(&sb, "europe", "RelayGetTask").await - at_eu, 1);
    // Cancel follows the same way and cancels the live copy.
    let cancelled = ap
        .cancel_task(api::CancelTaskRequest {
            task_id: id.clone(),
            reason: "no longer needed".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert!(cancelled.cancelled, "{cancelled:?}");
    let live = cancelled.task.expect("task");
    assert_eq!(
        live.taken_over.map(|t| t.to_region).as_deref(),
        Some("europe")
    );
}
