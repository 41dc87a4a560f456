//! Failover drills against a real federation: `federation drill` drains
//! europe through north_america's controller, probes every rule, restores
//! europe, and its report's expected and observed placements agree — under
//! the user's file (EU fails over to north_america) and under the variant
//! whose EU rule requires GDPR (EU refused). Probes are never stored.

mod support;

use std::process::Command;

use federation_api as api;
use federation_sandbox::{Sandbox, SandboxBuilder};
use serde_json::Value;
use support::{SEED, federation_exe, formed, seed_requires_gdpr};

fn drill(sandbox: &Sandbox, report: &std::path::Path) -> (i32, String) {
    let mut cmd = Command::new(federation_exe());
    cmd.arg("drill")
        .arg("--controller")
        .arg(sandbox.addr("north_america").expect("addr").to_string())
        .args(["--region", "europe", "--duration", "1s"])
        .arg("--policy")
        .arg(sandbox.config_path())
        .arg("--report")
        .arg(report);
    for (k, v) in sandbox.cli_env("operator").expect("env") {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("drill runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The probe of `phase` for the rule whose label starts with `rule`.
fn probe<'a>(report: &'a Value, phase: &str, rule: &str) -> &'a Value {
    report["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .find(|p| p["phase"] == phase && p["name"].as_str().is_some_and(|n| n.starts_with(rule)))
        .unwrap_or_else(|| panic!("no {phase} probe for {rule}: {report:#}"))
}

async fn run_drill(policy: String, eu_during: Option<&str>) {
    let sandbox = formed(SandboxBuilder::new(federation_exe(), policy).agents(1, 1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("drill.json");
    let (code, out) = drill(&sandbox, &json);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("passed: drill of europe"), "{out}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["differences"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["traffic_returned"], true);
    assert_eq!(report["entry_region"], "north_america");
    let probes = report["probes"].as_array().expect("probes");
    for p in probes {
        assert_eq!(p["agree"], true, "{p:#}");
        assert_eq!(p["expected"]["region"], p["observed"]["region"], "{p:#}");
    }
    // Where EU and US probes went, phase by phase.
    let eu = "rule 2:";
    let us = "rule 1:";
    assert_eq!(probe(&report, "before", eu)["observed"]["region"], "europe");
    assert_eq!(
        probe(&report, "during", eu)["observed"]["region"],
        eu_during.map_or(Value::Null, |r| Value::String(r.into()))
    );
    assert_eq!(probe(&report, "after", eu)["observed"]["region"], "europe");
    for phase in ["before", "during", "after"] {
        assert_eq!(
            probe(&report, phase, us)["observed"]["region"],
            "north_america"
        );
    }
    assert_eq!(
        probe(&report, "during", "no rule")["observed"]["region"],
        Value::Null
    );
    // The log range covers every placed probe's record and verifies.
    let log = &report["log"];
    assert_eq!(log["chain_intact"], true);
    let (first, last) = (
        log["first_seq"].as_u64().expect("first"),
        log["last_seq"].as_u64().expect("last"),
    );
    for p in probes.iter().filter(|p| p["task_id"] != "") {
        let seq = p["log_seq"].as_u64().expect("recorded");
        assert!(first <= seq && seq <= last, "{seq} in {first}..={last}");
    }
    // Probes were never stored: the owners do not know them and hold no task.
    for p in probes.iter().filter(|p| p["task_id"] != "") {
        let id = p["task_id"].as_str().expect("id");
        let owner = p["observed"]["region"].as_str().expect("owner");
        let mut client = sandbox.client(owner).await.expect("client");
        let got = client
            .get_task(api::GetTaskRequest {
                task_id: id.to_string(),
            })
            .await;
        assert_eq!(
            got.expect_err("a probe is not stored").code(),
            tonic::Code::NotFound,
            "{id}"
        );
    }
    for region in sandbox.region_names() {
        let mut client = sandbox.client(&region).await.expect("client");
        let tasks = client
            .list_tasks(api::ListTasksRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(tasks.tasks.is_empty(), "{region}: {:?}", tasks.tasks);
    }
    // The HTML form of the same evidence.
    let html = dir.path().join("drill.html");
    let (code, out) = drill(&sandbox, &html);
    assert_eq!(code, 0, "{out}");
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(
        page.contains("PASSED") && page.contains("drained europe"),
        "{page}"
    );
    assert!(!page.contains("DIFFER<"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_of_europe_agrees_with_the_users_policy() {
    run_drill(SEED.to_string(), Some("north_america")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_of_europe_agrees_with_the_gdpr_variant() {
    run_drill(seed_requires_gdpr(), None).await;
}

/// The sandbox's `--kill` form: europe's controller is stopped (north_america
/// sees it dead), EU fails over, and after the restart the drill waits out
/// the failback hold-down before checking that EU traffic returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_that_stops_europe_waits_out_the_hold_down() {
    // A hold-down long enough that the drill's polling (every 100 ms) sees it.
    let mut sandbox = formed(
        SandboxBuilder::new(federation_exe(), SEED)
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__FAILBACK_HOLD_DOWN", "5s"),
    )
    .await;
    let report = federation::cli::drill::sandbox_drill(
        &mut sandbox,
        "north_america",
        "europe",
        std::time::Duration::from_secs(1),
        true,
    )
    .await
    .expect("drill runs");
    assert!(report.passed, "{:#?}", report.differences);
    assert_eq!(report.disruption, "kill");
    let timeline: Vec<&str> = report.timeline.iter().map(|e| e.what.as_str()).collect();
    let at = |what: &str| {
        timeline
            .iter()
            .position(|t| t.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in {timeline:#?}"))
    };
    assert!(at("stopped europe") < at("sees europe dead"));
    assert!(at("sees europe dead") < at("restarted europe"));
    assert!(
        at("restarted europe") < at("failback hold-down"),
        "{timeline:#?}"
    );
    assert!(at("failback hold-down") < at("probes sent after the return"));
    let during = report
        .probes
        .iter()
        .find(|p| p.phase == "during" && p.name.starts_with("rule 2:"))
        .expect("EU probe");
    assert_eq!(during.observed.region.as_deref(), Some("north_america"));
    assert_eq!(during.expected.outcome, "failover");
    assert!(report.traffic_returned);
}

/// Interrupted (Ctrl-C) while europe is drained, the drill undrains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drill_undrains_the_region() {
    let sandbox = formed(SandboxBuilder::new(federation_exe(), SEED).agents(0, 1)).await;
    let mut cmd = Command::new(federation_exe());
    cmd.arg("drill")
        .arg("--controller")
        .arg(sandbox.addr("north_america").expect("addr").to_string())
        .args(["--region", "europe", "--duration", "10m"])
        .arg("--policy")
        .arg(sandbox.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in sandbox.cli_env("operator").expect("env") {
        cmd.env(k, v);
    }
    let mut child = federation_sandbox::ChildGuard::spawn("drill", &mut cmd).expect("drill");
    sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "europe draining",
            support::PATIENCE,
            |r| r.draining,
        )
        .await
        .expect("europe drained by the drill");
    child.signal("INT").expect("interrupt");
    let status = child.wait_timeout(support::PATIENCE).expect("drill exits");
    assert_eq!(status.code(), Some(2));
    sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "europe not draining",
            support::PATIENCE,
            |r| !r.draining,
        )
        .await
        .expect("europe undrained");
}
