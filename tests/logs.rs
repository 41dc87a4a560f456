//! `--log-format json`: every line is a JSON object whose fields are values
//! (no Rust debug text), routing events carry the `task_id`, `region` and
//! `rule` fields of their span, stdout stays empty (only logs, on stderr),
//! and a SIGTERM is announced once.

mod support;

use std::process::Command;

use federation_api as api;
use federation_sandbox::{ChildGuard, free_port, string_attrs};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_routing_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy");
    let log = dir.path().join("europe.log");
    let stdout = dir.path().join("europe.stdout");
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
        .args(["--admin-listen", &free_port().expect("port").to_string()])
        .env("RUST_LOG", "info,federation=debug")
        .env("FEDERATION_KEYS", TEST_KEYS)
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut controller = ChildGuard::spawn("europe", &mut cmd).expect("starts");
    let mut client = eventually("europe listens", PATIENCE, || async move {
        federation_sandbox::connect(addr)
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
    assert_eq!(
        std::fs::read_to_string(&stdout).expect("stdout"),
        "",
        "nothing but logs, and those on stderr"
    );
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "controller serving")
        .unwrap_or_else(|| panic!("no `controller serving` event in:\n{text}"));
    assert_eq!(serving["fields"]["addr"], addr.to_string(), "{serving}");
    let listening = lines
        .iter()
        .find(|l| l["fields"]["message"] == "listening")
        .unwrap_or_else(|| panic!("no `listening` event in:\n{text}"));
    assert_eq!(listening["fields"]["addr"], addr.to_string(), "{listening}");
    for l in &lines {
        for (k, v) in l["fields"].as_object().into_iter().flatten() {
            let v = v.as_str().unwrap_or_default();
            assert!(
                !(v.starts_with("Some(")
                    || v.starts_with('{')
                    || v.starts_with('[')
                    || v.contains("\"")),
                "field `{k}` holds Rust debug text: {l}"
            );
        }
    }
    let shutdown: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("shutting down"))
        })
        .collect();
    assert_eq!(shutdown.len(), 1, "one shutdown line: {shutdown:?}");
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI colours when stderr is not a terminal"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("--insecure"))),
        "plaintext mode is announced with a warning:\n{text}"
    );
}
