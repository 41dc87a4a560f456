//! The region's PostgreSQL database crashes and comes back: while it is
//! down, a submit whose rule allows only that region answers UNAVAILABLE
//! naming the store (the task is not placed elsewhere) and the controller's
//! health is NOT_SERVING; once it is back the controller reconnects by
//! itself, serves again, and every task acknowledged before the crash is
//! there.
//!
//! Its own test binary: it stops this binary's one PostgreSQL server.

mod support;

use std::process::{Command, Stdio};

use federation_api as api;
use federation_sandbox::pg::PgServer;
use federation_sandbox::{SandboxBuilder, string_attrs};
use support::*;

/// `federation health --addr ADDR`: the status it prints.
fn health(addr: std::net::SocketAddr) -> String {
    let out = Command::new(federation_exe())
        .args(["health", "--addr", &addr.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("federation health runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn eu_submit(key: &str) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", "DE")]),
        idempotency_key: key.to_string(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_is_unavailable_not_elsewhere_and_the_region_reconnects_by_itself() {
    let mut pg = PgServer::start().expect("the test PostgreSQL server (is PostgreSQL installed?)");
    let url = pg.create_database("restart").expect("database");
    // EU tasks require GDPR: europe is the only region that may hold them.
    let sandbox = formed(
        SandboxBuilder::new(federation_exe(), seed_requires_gdpr())
            .agents(0, 1)
            .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
            .region_env("europe", "FEDERATION__NODE__STORE__URL", &url),
    )
    .await;
    let health_addr = sandbox.health_addr("europe").expect("health addr");
    eventually("europe serving", PATIENCE, || {
        let s = health(health_addr);
        async move { (s == "SERVING").then_some(()) }
    })
    .await;
    let mut client = sandbox.client("europe").await.expect("client");
    let mut acked = Vec::new();
    for i in 0..30 {
        let r = client
            .submit_task(eu_submit(&format!("before-{i}")))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(r.region, "europe");
        acked.push(r.task_id);
    }

    pg.crash().expect("the database stops");
    let status = client
        .submit_task(eu_submit("during"))
        .await
        .expect_err("nowhere else may hold it");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("task store unavailable"),
        "names the store: {}",
        status.message()
    );
    eventually(
        "europe not serving while its store is down",
        PATIENCE,
        || {
            let s = health(health_addr);
            async move { (s == "NOT_SERVING").then_some(()) }
        },
    )
    .await;
    // Nothing was placed in another region.
    for other in ["north_america", "asia_pacific"] {
        let mut c = sandbox.client(other).await.expect("client");
        let tasks = c
            .list_tasks(api::ListTasksRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(tasks.tasks.is_empty(), "{other} holds {:?}", tasks.tasks);
    }

    pg.start_again().expect("the database comes back");
    let after = eventually("europe accepts again", PATIENCE, || {
        let mut c = client.clone();
        async move {
            c.submit_task(eu_submit("after"))
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_eq!(after.region, "europe");
    acked.push(after.task_id);
    eventually("europe serving again", PATIENCE, || {
        let s = health(health_addr);
        async move { (s == "SERVING").then_some(()) }
    })
    .await;
    for id in &acked {
        let t = client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{id}: {s:?}"))
            .into_inner()
            .task;
        assert!(t.is_some(), "{id} lost");
    }
    let log = sandbox.controller_log_text("europe");
    assert!(
        log.contains("health: not serving, the task store does not answer")
            && log.contains("health: serving, the task store answers again"),
        "{log}"
    );
}
