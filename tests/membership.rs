//! Membership over real processes: gossip carries liveness across a broken
//! link, a policy-hash mismatch is flagged, and a full region is skipped.

mod support;

use federation_api as api;
use federation_sandbox::string_attrs;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_keeps_a_region_alive_across_a_broken_link_and_flags_policy_mismatch() {
    // north_america and europe cannot reach each other; asia_pacific relays.
    // Every region sees every other alive through gossip.
    let sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .block_link("north_america", "europe"),
    )
    .await;
    let eu = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("europe row");
    assert_eq!(eu.state, "alive");
    assert!(eu.epoch > 0 && eu.sequence > 0, "{eu:?}");

    // A different policy on asia_pacific: the others flag the mismatch.
    let variant = seed_requires_gdpr();
    let mut ap_admin = sandbox.admin("asia_pacific").await.expect("admin");
    let r = ap_admin
        .reload_policy(api::ReloadPolicyRequest {
            policy_source: variant,
            format: "yaml".into(),
            ..Default::default()
        })
        .await
        .expect("reload")
        .into_inner();
    assert!(r.applied, "{}", r.error);
    sandbox
        .wait_for_row(
            "north_america",
            "asia_pacific",
            "flagged for its policy hash",
            PATIENCE,
            |r| r.policy_mismatch,
        )
        .await
        .expect("mismatch flagged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_region_is_skipped_for_its_backup() {
    // No agents and a queue limit of 2: europe fills up after two EU tasks.
    let sandbox = formed(
        seed_sandbox()
            .agents(0, 1)
            .env("FEDERATION__NODE__LIMITS__MAX_QUEUE_DEPTH", "2"),
    )
    .await;
    let mut na = sandbox.client("north_america").await.expect("client");
    let de = || api::SubmitTaskRequest {
        attributes: string_attrs(&[("customer_region", "DE")]),
        ..Default::default()
    };
    for _ in 0..2 {
        let r = na.submit_task(de()).await.expect("accepted").into_inner();
        assert_eq!(r.region, "europe");
    }
    sandbox
        .wait_for_row("north_america", "europe", "full", PATIENCE, |r| {
            r.capacity.is_some_and(|c| c.queue_depth >= c.queue_limit)
        })
        .await
        .expect("europe seen full");
    let r = na.submit_task(de()).await.expect("fails over").into_inner();
    assert_eq!(r.region, "north_america");
    let d = r.decision.expect("decision");
    assert_eq!(d.outcome, "failover");
    let eu = d
        .candidates
        .iter()
        .find(|c| c.region == "europe")
        .expect("europe");
    assert_eq!(eu.reason, "full");
}
