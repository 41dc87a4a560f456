//! The client CLI (`federation submit|get|status`) against a live federation.

mod support;

use support::*;

/// Runs the CLI with `env` (the sandbox's credentials, see `Sandbox::cli_env`).
/// Runs the `federation` CLI; returns its exit code, stdout and stderr.
async fn run(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(federation_exe())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
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
    let env: &[(String, String)] = &sandbox.cli_env("operator").expect("credentials");
    sandbox
        .wait_all_alive(PATIENCE)
        .await
        .expect("federation forms");
    let na = sandbox.addr("north_america").expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let payload = dir.path().join("payload");
    std::fs::write(&payload, "order 42").expect("payload");

    let (code, out, err) = run(
        env,
        &[
            "submit",
            "--controller",
            &na,
            "--attr",
            "customer_region=DE",
            "--payload-file",
            &payload.display().to_string(),
            "--wait",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["region"], "europe");
    assert_eq!(v["decision"]["outcome"], "routed");
    assert_eq!(v["task"]["state"], "succeeded");
    assert_eq!(v["task"]["result"], "order 42");
    let id = v["task_id"].as_str().expect("id").to_string();

    let (code, out, _) = run(env, &["get", "--controller", &na, &id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("succeeded") && out.contains("europe"), "{out}");

    let (code, out, err) = run(
        env,
        &[
            "submit",
            "--controller",
            &na,
            "--attr",
            "customer_region=JP",
        ],
    )
    .await;
    assert_eq!(code, 1, "rejected tasks exit 1: {out}{err}");
    assert!(
        err.contains("FailedPrecondition") && err.contains("no routing rule"),
        "{err}"
    );

    // An auditor reads north_america's decision log over gRPC: the DE task
    // it forwarded and the JP task it refused, with an intact chain.
    let auditor: &[(String, String)] = &sandbox.cli_env("auditor").expect("credentials");
    let (code, out, err) = run(
        auditor,
        &["decisions", "--controller", &na, "--format", "json"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("chain intact"), "{err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    assert!(
        records.iter().any(|r| r["task_id"] == id.as_str()),
        "the DE task's decision is listed: {out}"
    );
    let (code, out, err) = run(
        auditor,
        &["decisions", "--controller", &na, "--outcome", "rejected"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("customer_region=JP") && out.contains("rejected"),
        "{out}"
    );
    assert!(!out.contains("customer_region=DE"), "filtered: {out}");
    // A client may not read the log.
    let client_env: &[(String, String)] = &sandbox.cli_env("client").expect("credentials");
    let (code, _, err) = run(client_env, &["decisions", "--controller", &na]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("PermissionDenied"), "{err}");

    let (code, out, _) = run(env, &["status", "--controller", &na]).await;
    assert_eq!(code, 0);
    for needle in ["north_america", "europe", "asia_pacific", "alive", "GDPR"] {
        assert!(out.contains(needle), "missing {needle}: {out}");
    }

    let (code, _, err) = run(
        env,
        &["status", "--controller", "127.0.0.1:1", "--timeout", "1s"],
    )
    .await;
    assert_eq!(code, 2, "unreachable controller exits 2: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_new_work_elsewhere_and_reload_refuses_a_bad_policy() {
    let mut sandbox = seed_sandbox().agents(0, 1).start().expect("sandbox starts");
    let env: &[(String, String)] = &sandbox.cli_env("operator").expect("credentials");
    sandbox
        .wait_all_alive(PATIENCE)
        .await
        .expect("federation forms");
    let eu = sandbox.addr("europe").expect("addr").to_string();
    let na = sandbox.addr("north_america").expect("addr").to_string();
    // A task that runs for a while holds a lease in europe.
    sandbox
        .start_agent_with("europe", "sleep 2; cat", 1)
        .expect("agent");
    let mut client = sandbox.client("north_america").await.expect("client");
    let req = || federation_api::SubmitTaskRequest {
        attributes: federation::sandbox::string_attrs(&[("customer_region", "DE")]),
        ..Default::default()
    };
    let first = client
        .submit_task(req())
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(first.region, "europe");
    let id = first.task_id.clone();
    eventually("the task is leased", PATIENCE, || {
        let mut c = client.clone();
        let id = id.clone();
        async move {
            let t = c
                .get_task(federation_api::GetTaskRequest { task_id: id })
                .await
                .ok()?
                .into_inner()
                .task?;
            (t.state() == federation_api::TaskState::Leased).then_some(())
        }
    })
    .await;

    // drain --wait returns once the leased task has finished.
    let (code, out, err) = run(
        env,
        &[
            "drain",
            "--controller",
            &eu,
            "--wait",
            "--wait-timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("draining") && out.lines().last().is_some_and(|l| l.contains("empty")),
        "{out}"
    );
    let t = sandbox
        .wait_terminal("north_america", &first.task_id, PATIENCE)
        .await
        .expect("finished");
    assert_eq!(t.state(), federation_api::TaskState::Succeeded);

    // New EU work goes to the backup while europe drains.
    sandbox
        .wait_for_row("north_america", "europe", "draining", PATIENCE, |r| {
            r.draining
        })
        .await
        .expect("drain advertised");
    let second = client
        .submit_task(req())
        .await
        .expect("fails over")
        .into_inner();
    assert_eq!(second.region, "north_america");
    let d = second.decision.expect("decision");
    assert!(
        d.candidates
            .iter()
            .any(|c| c.region == "europe" && c.reason == "draining"),
        "{d:?}"
    );

    let (code, out, _) = run(env, &["undrain", "--controller", &eu]).await;
    assert_eq!(code, 0);
    assert!(out.contains("taking new tasks"), "{out}");

    // A broken policy is refused and the old one keeps routing.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        SEED.replace("primary_region: \"europe\"", "primary_region: \"eu\""),
    )
    .expect("write");
    let (code, _, err) = run(
        env,
        &[
            "reload",
            "--controller",
            &na,
            "--file",
            &bad.display().to_string(),
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refused") && err.contains("unknown region `eu`"),
        "{err}"
    );
    // A valid reload returns the audit's findings and is applied.
    let good = dir.path().join("requires.yaml");
    std::fs::write(&good, seed_requires_gdpr()).expect("write");
    let (code, out, err) = run(
        env,
        &[
            "reload",
            "--controller",
            &na,
            "--file",
            &good.display().to_string(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("applied") && out.contains("finding: error: [failover-lacks-required-tag]"),
        "{out}"
    );
    // Both reloads are in the decision log.
    let log = sandbox
        .data_dir("north_america")
        .expect("dir")
        .join("decisions.jsonl");
    let notes: Vec<String> = federation::audit::show(&log, &Default::default())
        .expect("show")
        .into_iter()
        .filter(|r| r.entry.kind == federation::audit::kind::POLICY_RELOAD)
        .filter_map(|r| r.entry.note)
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].starts_with("refused") && notes[1].starts_with("applied"),
        "{notes:?}"
    );
    sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "taking tasks again",
            PATIENCE,
            |r| !r.draining,
        )
        .await
        .expect("undrain advertised");
    let third = client
        .submit_task(req())
        .await
        .expect("old policy still routes")
        .into_inner();
    assert_eq!(third.region, "europe");
}
