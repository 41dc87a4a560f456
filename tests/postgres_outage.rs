//! The region's PostgreSQL database fails under a controller, in the two
//! ways a database fails: it **crashes** and comes back (immediate
//! shutdown, then recovery), or it **pauses**, keeping its connections open
//! but answering nothing (SIGSTOP of the postmaster and its backends, as a
//! hung machine or a stalled volume). Either way a submit whose rule allows
//! only that region answers UNAVAILABLE naming the store (within
//! `node.store.timeout` when paused, instead of waiting for the database),
//! nothing is placed elsewhere, health turns NOT_SERVING; once the database
//! is back the controller reconnects and serves again by itself, and every
//! task acknowledged before is there.
//!
//! Each test starts a server of its own (it crashes or pauses it).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Resumes the server when dropped, so a failing test leaves no stopped
/// processes behind.
struct Paused<'a>(&'a PgServer);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outage {
    Crash,
    Pause,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_is_unavailable_not_elsewhere_and_the_region_reconnects_by_itself() {
    outage_and_recovery(Outage::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_database_is_unavailable_within_the_store_timeout_and_the_region_recovers() {
    outage_and_recovery(Outage::Pause).await;
}

async fn outage_and_recovery(outage: Outage) {
    let mut pg = PgServer::start().expect("the test PostgreSQL server (is PostgreSQL installed?)");
    let url = pg.create_database("outage").expect("database");
    // EU tasks require GDPR: europe is the only region that may hold them.
    let sandbox = formed(
        SandboxBuilder::new(federation_exe(), seed_requires_gdpr())
            .agents(0, 1)
            .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
            .region_env("europe", "FEDERATION__NODE__STORE__URL", &url)
            .region_env("europe", "FEDERATION__NODE__STORE__TIMEOUT", "2s"),
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
    for i in 0..20 {
        let r = client
            .submit_task(eu_submit(&format!("before-{i}")))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(r.region, "europe");
        acked.push(r.task_id);
    }

    let paused = match outage {
        Outage::Crash => {
            pg.crash().expect("the database stops");
            None
        }
        Outage::Pause => {
            pg.pause().expect("the database stops answering");
            Some(Paused(&pg))
        }
    };
    // Not a timing threshold: the call must come back at all (before the
    // bound it waited for the database for as long as it was stopped).
    let answered = tokio::time::timeout(
        Duration::from_secs(120),
        client.submit_task(eu_submit("during")),
    )
    .await
    .expect("a submit to a region whose database is paused answers");
    let status = answered.expect_err("nowhere else may hold it");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("task store unavailable")
            && status.message().contains("PostgreSQL at"),
        "names the store: {}",
        status.message()
    );
    eventually(
        "europe not serving while its store does not answer",
        PATIENCE,
        || {
            let s = health(health_addr);
            async move { (s == "NOT_SERVING").then_some(()) }
        },
    )
    .await;
    for other in ["north_america", "asia_pacific"] {
        let mut c = sandbox.client(other).await.expect("client");
        let tasks = c
            .list_tasks(api::ListTasksRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(tasks.tasks.is_empty(), "{other} holds {:?}", tasks.tasks);
    }

    drop(paused);
    if outage == Outage::Crash {
        pg.start_again().expect("the database comes back");
    }
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
