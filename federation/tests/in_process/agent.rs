//! The region agent (the `region-agent` library, as `federation agent` runs
//! it) against an in-process controller: it registers, leases a task, runs
//! its command and reports the result.

use std::time::Duration;

use federation_api as api;

use crate::federation::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_leases_runs_and_completes_a_task() {
    let fed = Builder::new(SEED_POLICY).start_formed().await;
    let mut config = region_agent::AgentConfig::new(
        format!("http://{}", fed.addr("north_america")),
        "printf 'ran for %s: ' \"$FEDERATION_ATTR_CUSTOMER_REGION\"; cat",
    );
    config.region = Some("north_america".into());
    config.name = "in-process-agent".into();
    config.lease_wait = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_secs(5);
    config.register_timeout = Some(PATIENCE);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(region_agent::run(config, async {
        let _ = stopped.await;
    }));

    // Submitted through another region; runs where it is held.
    let placed = fed
        .client("asia_pacific")
        .await
        .submit_task(submit("US"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(placed.region, "north_america");
    let done = eventually("the task finishing", || async {
        let t = fed.get("north_america", &placed.task_id).await.ok()?;
        (t.state >= api::TaskState::Succeeded as i32).then_some(t)
    })
    .await;
    assert_eq!(done.state(), api::TaskState::Succeeded, "{done:?}");
    assert_eq!(done.result, b"ran for US: work");
    assert_eq!(done.attempts, 1);

    let _ = stop.send(());
    let report = tokio::time::timeout(PATIENCE, agent)
        .await
        .expect("the agent stops")
        .expect("join")
        .expect("the agent ran");
    assert_eq!(report.registrations, 1, "{report:?}");
    assert_eq!((report.leased, report.succeeded), (1, 1), "{report:?}");
    assert!(!report.agent_id.is_empty());
}
