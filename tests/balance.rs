//! A set of primaries on real controllers: two GDPR regions share EU tasks
//! by their agents' free capacity, affinity keeps a conversation in one
//! region and moves only a dead region's conversations, and the entry
//! region's log keeps the affinity key's digest, not its value.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use federation_api as api;
use federation_sandbox::{SandboxBuilder, string_attrs};
use support::*;

const EU_SET: &str = include_str!("../policies/eu-set.yaml");
const REGIONS: [&str; 3] = ["europe_west", "europe_central", "north_america"];

fn submit(attrs: &[(&str, &str)]) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(attrs),
        payload: b"x".to_vec(),
        ..Default::default()
    }
}

/// Waits until every controller sees `region` advertise `slots` slots.
async fn wait_for_slots(sandbox: &federation_sandbox::Sandbox, region: &str, slots: u32) {
    for viewer in REGIONS {
        if viewer == region {
            continue;
        }
        sandbox
            .wait_for_row(viewer, region, "advertised slots", PATIENCE, |r| {
                r.capacity.is_some_and(|c| c.total_slots == slots)
            })
            .await
            .unwrap_or_else(|e| panic!("{viewer} never saw {region} with {slots} slots: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_with_more_free_capacity_gets_the_larger_share() {
    let mut sandbox = formed(SandboxBuilder::new(federation_exe(), EU_SET).agents(0, 1)).await;
    // Skewed capacity: west 1 slot, central 6; tasks hold their slot.
    sandbox
        .start_agent_with("europe_west", "sleep 3", 1)
        .expect("west agent");
    sandbox
        .start_agent_with("europe_central", "sleep 3", 6)
        .expect("central agent");
    wait_for_slots(&sandbox, "europe_west", 1).await;
    wait_for_slots(&sandbox, "europe_central", 6).await;

    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    let total = 300;
    for i in 0..total {
        let entry = REGIONS[i % REGIONS.len()];
        let mut client = sandbox.client(entry).await.expect("client");
        let resp = client
            .submit_task(submit(&[("customer_region", "DE")]))
            .await
            .unwrap_or_else(|s| panic!("task {i} via {entry}: {s}"))
            .into_inner();
        let d = resp.decision.expect("decision");
        assert_eq!(d.balance_mode, "least_loaded", "{d:?}");
        assert!(!d.balance.is_empty(), "the decision says why");
        // The loads seen are on the wire for the set's available members.
        assert!(
            d.candidates
                .iter()
                .filter(|c| c.accepted)
                .all(|c| c.load.is_some()),
            "{d:?}"
        );
        *placed.entry(resp.region).or_default() += 1;
    }
    eprintln!("300 EU tasks, west 1 slot, central 6 slots: {placed:?}");
    let west = placed.get("europe_west").copied().unwrap_or(0);
    let central = placed.get("europe_central").copied().unwrap_or(0);
    assert_eq!(west + central, total, "only the set's members: {placed:?}");
    assert!(central > west, "the larger free capacity wins: {placed:?}");
    // Expected share ~86% or more (weights 6 vs at most 1); the bound
    // leaves room for the draw and stale loads.
    assert!(
        central * 100 >= total * 65,
        "central got {central} of {total}: {placed:?}"
    );
    // Without load-aware placement every task would go to west (priority
    // 1): the share itself shows the loads were read.
    assert!(west > 0, "west is not starved either: {placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_keeps_a_conversation_in_one_region_and_moves_only_the_dead_regions() {
    let mut sandbox = formed(SandboxBuilder::new(federation_exe(), EU_SET).agents(1, 4)).await;
    let conversations: Vec<String> = (0..16).map(|i| format!("conv-7f3a-{i:02}")).collect();
    let mut home: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..4 {
        for (i, conv) in conversations.iter().enumerate() {
            let entry = REGIONS[(i + round) % REGIONS.len()];
            let mut client = sandbox.client(entry).await.expect("client");
            let resp = client
                .submit_task(submit(&[
                    ("customer_region", "FR"),
                    ("conversation_id", conv),
                ]))
                .await
                .unwrap_or_else(|s| panic!("{conv} via {entry}: {s}"))
                .into_inner();
            let d = resp.decision.expect("decision");
            assert_eq!(d.balance_mode, "affinity");
            assert_eq!(d.affinity_digest.len(), 32);
            assert!(!d.reason.contains(conv.as_str()), "{}", d.reason);
            home.entry(conv.clone()).or_default().insert(resp.region);
        }
    }
    for (conv, regions) in &home {
        assert_eq!(regions.len(), 1, "{conv} went to {regions:?}");
    }
    let before: BTreeMap<&String, String> = home
        .iter()
        .map(|(c, r)| (c, r.iter().next().cloned().unwrap_or_default()))
        .collect();
    let in_west = before.values().filter(|r| *r == "europe_west").count();
    assert!(
        in_west > 0 && in_west < conversations.len(),
        "rendezvous spreads 16 conversations over both members: {before:?}"
    );

    // The entry region north_america never holds these tasks: its log keeps
    // the key's keyed digest, never the conversation id.
    let na_log = std::fs::read_to_string(
        sandbox
            .data_dir("north_america")
            .expect("dir")
            .join("decisions.jsonl"),
    )
    .expect("north_america's log");
    assert!(
        !na_log.contains("conv-7f3a"),
        "raw affinity value in north_america's log"
    );
    assert!(
        na_log.contains("\"attributes_withheld\":{\"conversation_id\":\""),
        "the digest is recorded"
    );

    // West dies: its conversations move to central, central's stay put.
    sandbox.kill_controller("europe_west").expect("kill west");
    for viewer in ["europe_central", "north_america"] {
        sandbox
            .wait_for_row(viewer, "europe_west", "dead", PATIENCE, |r| {
                r.state == "dead"
            })
            .await
            .expect("west seen dead");
    }
    for (i, conv) in conversations.iter().enumerate() {
        for entry in ["europe_central", "north_america"] {
            let mut client = sandbox.client(entry).await.expect("client");
            let resp = client
                .submit_task(submit(&[
                    ("customer_region", "FR"),
                    ("conversation_id", conv),
                ]))
                .await
                .unwrap_or_else(|s| panic!("{conv} ({i}) via {entry} after west died: {s}"))
                .into_inner();
            assert_eq!(
                resp.region, "europe_central",
                "{conv}: only central is left"
            );
            if before[conv] == "europe_central" {
                assert_eq!(
                    resp.region, before[conv],
                    "{conv} moved though its region lives"
                );
            }
        }
    }
}
