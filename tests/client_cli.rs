//! The client CLI (`federation submit|get|status`) against a live federation.

mod support;

use std::process::Command;

use support::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(federation_exe())
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_get_and_status_from_the_command_line() {
    let sandbox = seed_sandbox().agents(1, 1).start().expect("sandbox starts");
    sandbox
        .wait_all_alive(PATIENCE)
        .await
        .expect("federation forms");
    let na = sandbox.addr("north_america").expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let payload = dir.path().join("payload");
    std::fs::write(&payload, "order 42").expect("payload");

    let (code, out, err) = tokio::task::spawn_blocking({
        let na = na.clone();
        let payload = payload.display().to_string();
        move || {
            run(&[
                "submit",
                "--controller",
                &na,
                "--attr",
                "customer_region=DE",
                "--payload-file",
                &payload,
                "--wait",
                "--format",
                "json",
            ])
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["region"], "europe");
    assert_eq!(v["decision"]["outcome"], "routed");
    assert_eq!(v["task"]["state"], "succeeded");
    assert_eq!(v["task"]["result"], "order 42");
    let id = v["task_id"].as_str().expect("id").to_string();

    let (code, out, _) = tokio::task::spawn_blocking({
        let na = na.clone();
        move || run(&["get", "--controller", &na, &id])
    })
    .await
    .expect("join");
    assert_eq!(code, 0);
    assert!(out.contains("succeeded") && out.contains("europe"), "{out}");

    let (code, out, err) = tokio::task::spawn_blocking({
        let na = na.clone();
        move || {
            run(&[
                "submit",
                "--controller",
                &na,
                "--attr",
                "customer_region=JP",
            ])
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 1, "rejected tasks exit 1: {out}{err}");
    assert!(
        err.contains("FailedPrecondition") && err.contains("no routing rule"),
        "{err}"
    );

    let (code, out, _) = tokio::task::spawn_blocking(move || run(&["status", "--controller", &na]))
        .await
        .expect("join");
    assert_eq!(code, 0);
    for needle in ["north_america", "europe", "asia_pacific", "alive", "GDPR"] {
        assert!(out.contains(needle), "missing {needle}: {out}");
    }

    let (code, _, err) = tokio::task::spawn_blocking(|| {
        run(&["status", "--controller", "127.0.0.1:1", "--timeout", "1s"])
    })
    .await
    .expect("join");
    assert_eq!(code, 2, "unreachable controller exits 2: {err}");
}
