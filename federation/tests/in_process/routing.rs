//! Routing through real controllers: placement by rule from any entry,
//! falling through to the backup (a dead primary, a failed forward),
//! refusals with their reasons, and the owner's re-check of a forward.

use federation_api as api;
use tonic::Code;

use crate::federation::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_the_rule_from_any_entry() {
    let fed = Builder::new(SEED_POLICY).start_formed().await;
    for entry in fed.names() {
        let mut client = fed.client(&entry).await;
        for (customer, owner, rule) in [("US", "north_america", 0), ("DE", "europe", 1)] {
            let resp = client
                .submit_task(submit(customer))
                .await
                .unwrap_or_else(|s| panic!("{customer} via {entry}: {s}"))
                .into_inner();
            assert_eq!(resp.region, owner, "{customer} via {entry}");
            assert!(resp.task_id.ends_with(&format!(".{owner}")), "{resp:?}");
            let d = resp.decision.expect("decision");
            assert_eq!((d.outcome.as_str(), d.rule_index), ("routed", rule));
            // Stored at the owner, queued.
            let t = fed.get(owner, &resp.task_id).await.expect("at the owner");
            assert_eq!(t.owner_region, owner);
            assert_eq!(t.state(), api::TaskState::Queued);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_falls_through_to_the_backup_flagging_the_dropped_tag() {
    let mut fed = Builder::new(SEED_POLICY).start_formed().await;
    fed.kill_and_wait_dead("europe", "asia_pacific").await;
    let resp = fed
        .client("asia_pacific")
        .await
        .submit_task(submit("DE"))
        .await
        .expect("fails over")
        .into_inner();
    assert_eq!(resp.region, "north_america");
    let d = resp.decision.expect("decision");
    assert_eq!(d.outcome, "failover");
    let eu = d
        .candidates
        .iter()
        .find(|c| c.region == "europe")
        .expect("europe candidate");
    assert_eq!(eu.reason, "dead");
    assert!(d.warnings.iter().any(|w| w.contains("GDPR")), "{d:?}");
    let t = fed
        .get("north_america", &resp.task_id)
        .await
        .expect("stored at the backup");
    assert_eq!(t.owner_region, "north_america");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forward_falls_through_before_the_primary_is_declared_dead() {
    // Liveness never changes here (phi and dead_after out of reach): the
    // only thing that can send DE elsewhere is the forward failing.
    let mut fed = Builder::new(SEED_POLICY)
        .timers(|t| {
            t.phi_suspect = 1e12;
            t.phi_dead = 1e12;
            t.dead_after = std::time::Duration::from_secs(3600);
        })
        .start_formed()
        .await;
    fed.kill("europe");
    let resp = fed
        .client("asia_pacific")
        .await
        .submit_task(submit("DE"))
        .await
        .expect("falls through")
        .into_inner();
    assert_eq!(resp.region, "north_america");
    let d = resp.decision.expect("decision");
    assert_eq!(d.outcome, "failover");
    let eu = d
        .candidates
        .iter()
        .find(|c| c.region == "europe")
        .expect("europe candidate");
    assert_eq!(eu.reason, "forward_failed", "{eu:?}");
    let states = fed.states("asia_pacific").await.expect("status");
    assert_eq!(states["europe"], "alive", "the detector never fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_rule_and_each_candidates_reason() {
    let mut fed = Builder::new(SEED_REQUIRES_GDPR).start_formed().await;
    let mut client = fed.client("asia_pacific").await;
    // No rule matches: fail closed.
    let err = client
        .submit_task(submit("JP"))
        .await
        .expect_err("JP matches no rule");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("no routing rule matches"),
        "{}",
        err.message()
    );
    // The EU rule requires GDPR and europe is dead: north_america (no GDPR)
    // is refused, not used.
    fed.kill_and_wait_dead("europe", "asia_pacific").await;
    let err = client.submit_task(submit("UK")).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let msg = err.message();
    assert!(msg.contains("europe") && msg.contains("dead"), "{msg}");
    assert!(
        msg.contains("north_america") && msg.contains("GDPR"),
        "{msg}"
    );
    // Nothing was stored anywhere for it.
    let listed = fed
        .client("north_america")
        .await
        .list_tasks(api::ListTasksRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.tasks.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_rechecks_a_forward_with_its_own_policy() {
    // A peer forwarding a DE task to asia_pacific (no rule allows it there)
    // is refused, and nothing is stored.
    let mut fed = Builder::new(SEED_POLICY)
        .region_policy("north_america", SEED_REQUIRES_GDPR)
        .start_formed()
        .await;
    let err = fed
        .peer("asia_pacific")
        .await
        .forward_task(api::ForwardTaskRequest {
            task_id: federation::wire::new_task_id("asia_pacific"),
            submit: Some(submit("DE")),
            entry_region: "north_america".into(),
            decision: None,
            relayed_by: String::new(),
        })
        .await
        .expect_err("residency violation refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("residency"), "{}", err.message());

    // The entry's policy (as written) fails DE over to north_america; the
    // owner's own (the EU rule requires GDPR) refuses it, so the entry
    // rejects rather than placing it anywhere.
    fed.kill_and_wait_dead("europe", "asia_pacific").await;
    fed.wait_state("north_america", "europe", "dead").await;
    let err = fed
        .client("asia_pacific")
        .await
        .submit_task(submit("DE"))
        .await
        .expect_err("the owner refuses");
    let msg = err.message();
    assert!(msg.contains("north_america"), "{:?} {msg}", err.code());
    assert!(
        msg.contains("north_america lacks required tag(s) GDPR"),
        "the owner's own reason: {msg}"
    );
    for region in ["north_america", "asia_pacific"] {
        let listed = fed
            .client(region)
            .await
            .list_tasks(api::ListTasksRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(listed.tasks.is_empty(), "{region}: {listed:?}");
    }
}
