//! Takeover and fencing through real controllers with replication on: a
//! backup takes a dead primary's queued tasks over (its copy came by the
//! change stream), they are found through any region marked as taken over,
//! the backup's agents get them, and the returning primary, once it has
//! heard the backup's notices, never leases them.

use std::collections::BTreeSet;
use std::time::Duration;

use federation::replication::{Limits, receiver::Receiver};
use federation_api as api;

use crate::federation::*;

/// Registers an agent at `region` and leases until `until` says stop
/// (bounded); returns every task id leased.
async fn lease_until(
    fed: &Federation,
    region: &str,
    mut until: impl FnMut(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let mut agent = fed.agent(region).await;
    let id = agent
        .register(api::RegisterRequest {
            name: format!("{region}-lessee"),
            region: region.into(),
            slots: 16,
            agent_id: String::new(),
        })
        .await
        .expect("register")
        .into_inner()
        .agent_id;
    let mut leased = BTreeSet::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !until(&leased) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} leasing at {region}; leased {leased:?}"
        );
        if let Ok(got) = agent
            .lease_tasks(api::LeaseTasksRequest {
                agent_id: id.clone(),
                max_tasks: 16,
                wait_ms: 100,
            })
            .await
        {
            leased.extend(got.into_inner().tasks.into_iter().map(|t| t.task_id));
        }
    }
    leased
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_over_and_the_returning_primary_is_fenced() {
    let mut fed = Builder::new(SEED_POLICY)
        .replication()
        .timers(|t| t.startup_fence = Duration::from_secs(60))
        .start_formed()
        .await;
    // Queued at north_america (no agents there).
    let mut na = fed.client("north_america").await;
    let mut ids = BTreeSet::new();
    for _ in 0..3 {
        let r = na
            .submit_task(submit("US"))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(r.region, "north_america");
        ids.insert(r.task_id);
    }
    // europe, the US rule's backup, holds a copy of them.
    eventually("europe's copy holding the tasks", || async {
        let copy = Receiver::open_read_only(
            "europe",
            &fed.data_dir("europe"),
            fed.keys().cloned(),
            Limits::default(),
        );
        let (_, pending) = copy.pending_of("north_america")?;
        let held: BTreeSet<String> = pending.into_iter().map(|t| t.task_id).collect();
        ids.is_subset(&held).then_some(())
    })
    .await;

    fed.kill_and_wait_dead("north_america", "europe").await;
    // After the grace, europe holds them, marked, and says so to anyone.
    for id in &ids {
        let t = eventually("the task taken over, read via asia_pacific", || async {
            let t = fed.get("asia_pacific", id).await.ok()?;
            t.taken_over.is_some().then_some(t)
        })
        .await;
        let to = t.taken_over.expect("marked");
        assert_eq!(
            (to.from_region.as_str(), to.to_region.as_str()),
            ("north_america", "europe"),
            "{id}"
        );
    }
    // europe's agents get exactly them.
    let at_europe = lease_until(&fed, "europe", |l| l.len() >= ids.len()).await;
    assert_eq!(at_europe, ids);

    // north_america returns; once it has heard europe, a task queued after
    // the restart at a lower priority is leased there, and none of the old.
    fed.start_region("north_america");
    fed.wait_state("north_america", "europe", "alive").await;
    let probe = fed
        .client("north_america")
        .await
        .submit_task(api::SubmitTaskRequest {
            priority: -1,
            ..submit("US")
        })
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(probe.region, "north_america");
    let at_na = lease_until(&fed, "north_america", |l| l.contains(&probe.task_id)).await;
    let again: Vec<&String> = at_na.intersection(&ids).collect();
    assert!(
        again.is_empty(),
        "leased again by the returning primary: {again:?}"
    );
    // The returning primary reports them as europe's.
    for id in &ids {
        let t = fed.get("north_america", id).await.expect("readable");
        let to = t.taken_over.expect("marked taken over");
        assert_eq!(to.to_region, "europe", "{id}");
    }
}
