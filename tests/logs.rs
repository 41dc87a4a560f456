//! `--log-format json`: every line is a JSON object, and routing events carry
//! the `task_id`, `region` and `rule` fields of their span.

mod support;

use std::process::{Command, Stdio};

use federation::sandbox::{ChildGuard, free_port, string_attrs};
use federation_api as api;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_routing_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy");
    let log = dir.path().join("europe.log");
    let addr = free_port().expect("port");
    let mut cmd = Command::new(federation_exe());
    cmd.args(["--log-format", "json", "serve", "--insecure", "--config"])
        .arg(&config)
        .args([
            "--region",
            "europe",
            "--listen",
            &addr.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("europe"))
        .env("RUST_LOG", "info,federation=debug")
        .env("FEDERATION_KEYS", TEST_KEYS)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut controller = ChildGuard::spawn("europe", &mut cmd).expect("starts");
    let mut client = eventually("europe listens", PATIENCE, || async move {
        federation::sandbox::connect(addr)
            .await
            .ok()
            .map(api::federation_client_client::FederationClientClient::new)
    })
    .await;
    let placed = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "DE")]),
            ..Default::default()
        })
        .await
        .expect("routed to europe itself")
        .into_inner();
    let _ = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "JP")]),
            ..Default::default()
        })
        .await
        .expect_err("no rule");
    controller.signal("TERM").expect("term");
    controller.wait_timeout(PATIENCE).expect("exits");

    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let routed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "task routed")
        .unwrap_or_else(|| panic!("no `task routed` event in:\n{text}"));
    assert_eq!(
        routed["span"]["task_id"],
        placed.task_id.as_str(),
        "{routed}"
    );
    assert_eq!(routed["span"]["region"], "europe", "{routed}");
    assert!(
        routed["span"]["rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("rule 2")),
        "{routed}"
    );
    let rejected = lines
        .iter()
        .find(|l| l["fields"]["message"] == "task rejected")
        .unwrap_or_else(|| panic!("no `task rejected` event in:\n{text}"));
    assert_eq!(rejected["span"]["rule"], "none", "{rejected}");
}
