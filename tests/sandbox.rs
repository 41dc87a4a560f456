//! The sandbox itself: it forms a federation, reports status per region, and
//! kills every process it started when dropped.

mod support;

use std::time::Duration;

use federation_api as api;
use support::*;

fn alive(pid: u32) -> bool {
    // /proc/<pid>/stat exists and is not a zombie.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split(' ').nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_forms_a_federation_and_cleans_up() {
    let mut sandbox = formed(seed_sandbox().agents(1, 1)).await;
    let mut admin = sandbox.admin("north_america").await.expect("admin");
    let status = admin
        .federation_status(api::FederationStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.federation, "Global Enterprise Federation");
    assert_eq!(status.self_region, "north_america");
    assert_eq!(status.regions.len(), 3);
    let eu = status
        .regions
        .iter()
        .find(|r| r.region == "europe")
        .expect("europe row");
    assert_eq!(eu.state, "alive");
    assert_eq!(
        eu.compliance_tags,
        vec!["GDPR".to_string(), "SOX".to_string()]
    );
    assert_eq!(eu.policy_hash, status.policy_hash, "same file, same hash");
    assert!(!eu.policy_mismatch);
    // Capacity is advertised once the agent has registered.
    sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "advertising its agent's slot",
            PATIENCE,
            |r| r.capacity.is_some_and(|c| c.total_slots == 1),
        )
        .await
        .expect("capacity advertised");

    let pid = sandbox
        .controller("asia_pacific")
        .expect("running")
        .pid()
        .expect("pid");
    assert!(alive(pid));
    let dir = sandbox.dir().to_path_buf();
    drop(sandbox);
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !alive(pid)
    });
    assert!(
        gone,
        "controller {pid} still running after the sandbox was dropped"
    );
    assert!(!dir.exists(), "sandbox folder removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_controller_gracefully() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let c = sandbox.controller("europe").expect("running");
    c.signal("TERM").expect("sigterm");
    let status = c
        .wait_timeout(PATIENCE)
        .expect("exits within the grace period");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_helpers_wait_for_what_the_peers_see() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let err = sandbox
        .kill_and_wait_dead("mars", "europe", PATIENCE)
        .await
        .expect_err("no such region");
    assert!(format!("{err:#}").contains("no region `mars`"), "{err:#}");

    sandbox
        .kill_and_wait_dead("europe", "north_america", PATIENCE)
        .await
        .expect("europe seen dead");
    assert!(sandbox.controller("europe").is_err(), "europe was killed");
    let row = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("row");
    assert_eq!(row.state, "dead");

    sandbox
        .restart_and_wait_alive("europe", "north_america", PATIENCE)
        .await
        .expect("europe seen alive");
    let row = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("row");
    assert_eq!(row.state, "alive");
    sandbox
        .wait_formed(PATIENCE)
        .await
        .expect("formed again, europe seeing the others too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_formed_names_a_controller_that_exits_instead_of_waiting() {
    // No snapshot key ring at that path: every controller exits at start-up.
    let err = seed_sandbox()
        .agents(0, 1)
        .env("FEDERATION__NODE__KEYS__FILE", "/nonexistent/snapshot.keys")
        .start_formed(PATIENCE)
        .await
        .expect_err("cannot form");
    let text = format!("{err:#}");
    assert!(
        text.contains("controller exited") && text.contains("before the federation formed"),
        "{text}"
    );
}
