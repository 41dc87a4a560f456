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

/// Runs the CLI in the background with stdout and stderr piped, for
/// commands that must be read while they run (`submit --wait`, `get --watch`).
fn spawn(env: &[(String, String)], args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(federation_exe())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawns")
}

/// Waits (bounded) for a background CLI and returns code, stdout, stderr.
async fn finish(child: tokio::process::Child) -> (i32, String, String) {
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the command ends in time")
        .expect("waits");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `env` plus `FEDERATION_ADDR=addr`.
fn with_addr(env: &[(String, String)], addr: &str) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.push(("FEDERATION_ADDR".into(), addr.to_string()));
    env
}

/// Each line's start column of every header word of `table` is where that
/// column's cells start too: the table stays aligned whatever the content.
fn assert_aligned(table: &str, header: &str, columns: &[&str]) {
    let mut lines = table.lines().skip_while(|l| !l.starts_with(header));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no header {header}: {table}"));
    let starts: Vec<usize> = columns
        .iter()
        .map(|c| {
            head.find(c)
                .unwrap_or_else(|| panic!("no column {c}: {table}"))
        })
        .collect();
    for line in lines.take_while(|l| !l.is_empty() && !l.starts_with('!') && !l.starts_with('(')) {
        for (c, &at) in columns.iter().zip(&starts) {
            assert!(
                at == 0 || line.as_bytes().get(at - 1) == Some(&b' '),
                "column {c} is not aligned in {line:?}:\n{table}"
            );
            assert!(
                line.as_bytes().get(at).is_some_and(|b| *b != b' '),
                "column {c} is empty or shifted in {line:?}:\n{table}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_against_one_federation() {
    let mut sandbox = formed(seed_sandbox().agents(1, 1)).await;
    let env: &[(String, String)] = &sandbox.cli_env("operator").expect("credentials");
    let na = sandbox.addr("north_america").expect("addr").to_string();
    let eu = sandbox.addr("europe").expect("addr").to_string();
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
    assert_eq!(v["decision"]["outcome"]["kind"], "routed");
    assert_eq!(v["task"]["state"], "succeeded");
    assert_eq!(v["task"]["result"], "order 42");
    let id = v["task_id"].as_str().expect("id").to_string();

    // One JSON shape for a decision: submit's is `policy explain`'s.
    let (code, explained, err) = run(
        &[],
        &[
            "policy",
            "explain",
            &sandbox.config_path().display().to_string(),
            "--attr",
            "customer_region=DE",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let explained: serde_json::Value = serde_json::from_str(&explained).expect("json");
    let keys = |v: &serde_json::Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(keys(&v["decision"]), keys(&explained), "{v} vs {explained}");
    assert_eq!(
        keys(&v["decision"]["candidates"][0]),
        keys(&explained["candidates"][0])
    );
    assert_eq!(v["decision"]["outcome"], explained["outcome"]);

    // FEDERATION_ADDR stands for --controller, with or without a scheme.
    for addr in [na.clone(), format!("https://{na}")] {
        let (code, out, err) = run(&with_addr(env, &addr), &["get", &id]).await;
        assert_eq!(code, 0, "{addr}: {out}{err}");
        assert!(out.contains("succeeded") && out.contains("europe"), "{out}");
        // The decision that placed it, from the owner's log (relayed).
        assert!(
            out.contains("decision  routed to europe")
                && out.contains("accepted forward from north_america"),
            "{out}"
        );
    }
    let (code, out, err) = run(&with_addr(env, &na), &["get", &id, "--format", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let got: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(got["task_id"], id.as_str(), "{got}");
    assert_eq!(keys(&got["decision"]), keys(&explained), "{got}");
    assert_eq!(got["decision"]["outcome"], explained["outcome"], "{got}");
    assert_eq!(
        got["decision"]["rule_index"], explained["rule_index"],
        "{got}"
    );
    let (code, _, err) = run(env, &["get", &id]).await;
    assert_eq!(code, 2, "no address at all is a usage error: {err}");
    assert!(
        err.contains("--controller") && err.contains("FEDERATION_ADDR"),
        "{err}"
    );

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
    let routed = records
        .iter()
        .find(|r| r["task_id"] == id.as_str() && r["decision"].is_object())
        .unwrap_or_else(|| panic!("the DE task's decision is listed: {out}"));
    assert_eq!(keys(&routed["decision"]), keys(&explained), "{routed}");
    // The default is a table.
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
    assert_aligned(
        &out,
        "TIME",
        &[
            "SEQ",
            "KIND",
            "TASK",
            "ATTRIBUTES",
            "RULE",
            "REGION",
            "OUTCOME",
        ],
    );
    // A client may not read the log.
    let client_env: &[(String, String)] = &sandbox.cli_env("client").expect("credentials");
    let (code, _, err) = run(client_env, &["decisions", "--controller", &na]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("PermissionDenied"), "{err}");

    // Europe's agent goes away: new EU tasks stay queued.
    sandbox.kill_agent("europe", 0).expect("kill agent");
    let eu_env = with_addr(env, &eu);
    // `submit --wait` prints the task id at once (the task cannot run yet),
    // then a waiting line on standard error.
    let mut waiting = spawn(
        &eu_env,
        &["submit", "--attr", "customer_region=DE", "--wait"],
    );
    let mut stdout = tokio::io::BufReader::new(waiting.stdout.take().expect("stdout"));
    let mut first = String::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first),
    )
    .await
    .expect("the id comes before the task finishes")
    .expect("reads");
    let queued_id = first
        .strip_prefix("task")
        .map(str::trim)
        .unwrap_or_else(|| panic!("first line names the task: {first:?}"))
        .to_string();
    let watcher = spawn(&eu_env, &["get", "--watch", &queued_id]);

    // cancel: a queued task is cancelled (exit 0), then cannot be (exit 1).
    let (code, out, err) = run(
        &eu_env,
        &["submit", "--attr", "customer_region=DE", "--format", "json"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let doomed = serde_json::from_str::<serde_json::Value>(&out).expect("json")["task_id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, out, err) = run(&eu_env, &["cancel", &doomed, "--reason", "test"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, err) = run(&eu_env, &["cancel", &doomed, "--format", "json"]).await;
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["cancelled"], false);
    assert_eq!(v["task"]["state"], "cancelled");

    // tasks: europe's own tasks, filtered by state, rule and age, paged.
    let ids_of = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("a JSON task per line")
                    ["task_id"]
                    .as_str()
                    .expect("id")
                    .to_string()
            })
            .collect()
    };
    let (code, out, err) = run(&eu_env, &["tasks", "--format", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        ids_of(&out),
        [id.clone(), queued_id.clone(), doomed.clone()]
    );
    let (code, out, _) = run(&eu_env, &["tasks", "--state", "queued", "--format", "json"]).await;
    assert_eq!(code, 0);
    assert_eq!(ids_of(&out), std::slice::from_ref(&queued_id));
    let (code, out, _) = run(
        &eu_env,
        &[
            "tasks",
            "--state",
            "cancelled,succeeded",
            "--rule",
            "2",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(ids_of(&out), [id.clone(), doomed.clone()]);
    let (_, out, _) = run(&eu_env, &["tasks", "--rule", "1", "--format", "json"]).await;
    assert!(out.is_empty(), "no US task in europe: {out}");
    let (_, out, _) = run(
        &eu_env,
        &["tasks", "--older-than", "1h", "--format", "json"],
    )
    .await;
    assert!(out.is_empty(), "nothing is an hour old: {out}");
    let (_, out, _) = run(
        &eu_env,
        &["tasks", "--newer-than", "1h", "--format", "json"],
    )
    .await;
    assert_eq!(ids_of(&out).len(), 3, "{out}");
    let (code, out, err) = run(
        &eu_env,
        &[
            "tasks",
            "--page-size",
            "1",
            "--limit",
            "2",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(ids_of(&out), [id.clone(), queued_id.clone()]);
    let token = err
        .split("--page-token ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("a next page is offered: {err}"))
        .to_string();
    let (_, out, _) = run(
        &eu_env,
        &["tasks", "--page-token", &token, "--format", "json"],
    )
    .await;
    assert_eq!(ids_of(&out), std::slice::from_ref(&doomed));
    // The RPC refuses what it cannot honour, naming the field.
    let mut eu_client = sandbox.client("europe").await.expect("client");
    for (req, field) in [
        (
            federation_api::ListTasksRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            federation_api::ListTasksRequest {
                states: vec![42],
                ..Default::default()
            },
            "states",
        ),
    ] {
        let e = eu_client.list_tasks(req).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
    let (code, out, _) = run(&eu_env, &["tasks"]).await;
    assert_eq!(code, 0);
    assert_aligned(
        &out,
        "TASK",
        &[
            "STATE", "RULE", "ATTEMPTS", "CREATED", "AGE", "UPDATED", "AGENT",
        ],
    );
    assert!(out.contains("cancelled") && out.contains("queued"), "{out}");

    // An agent configured from the environment alone, with a bare
    // host:port address (the agent used to demand a scheme), runs the
    // queued task: `submit --wait` and `get --watch` see it finish.
    let tls = sandbox.tls().expect("tls");
    let (cert, key) = tls.layout.agent("europe");
    let mut agent_cmd = std::process::Command::new(federation_exe());
    agent_cmd
        .env("FEDERATION_ADDR", &eu)
        .env("FEDERATION_CA", tls.layout.ca())
        .env("FEDERATION_CERT", &cert)
        .env("FEDERATION_KEY", &key)
        .args(["agent", "--region", "europe", "--name", "europe-agent"])
        .args(["--exec", "echo from-env-agent"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _agent = federation_sandbox::ChildGuard::spawn("env agent", &mut agent_cmd).expect("agent");
    let mut rest = String::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut rest),
    )
    .await
    .expect("submit --wait ends")
    .expect("reads");
    let (code, _, err) = finish(waiting).await;
    assert_eq!(code, 0, "{first}{rest}{err}");
    assert!(
        rest.contains("succeeded") && rest.contains("from-env-agent"),
        "{rest}"
    );
    assert!(
        err.contains(&format!("waiting for {queued_id}: queued")),
        "a waiting line: {err}"
    );
    let (code, out, err) = finish(watcher).await;
    assert_eq!(code, 0, "{out}{err}");
    let states: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("result"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(states.first(), Some(&"queued"), "{out}");
    assert_eq!(states.last(), Some(&"succeeded"), "{out}");
    assert!(out.contains("from-env-agent"), "{out}");

    // A closed pipe: the task is created, the command ends quietly.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let piped = tokio::process::Command::new(federation_exe())
        .envs(eu_env.iter().map(|(k, v)| (k, v)))
        .args(["submit", "--attr", "customer_region=DE"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("runs");
    let err = String::from_utf8_lossy(&piped.stderr);
    assert_eq!(piped.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    let (_, out, _) = run(&eu_env, &["tasks", "--format", "json"]).await;
    assert_eq!(
        ids_of(&out).len(),
        4,
        "the piped submit created its task: {out}"
    );

    // Errors that say what happened.
    let (code, _, err) = run(env, &["status", "--controller", &na, "--insecure"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("speaks TLS") && err.contains("drop --insecure"),
        "{err}"
    );
    let free = federation_sandbox::free_port().expect("port").to_string();
    let (code, _, err) = run(env, &["status", "--controller", &free, "--timeout", "5s"]).await;
    assert_eq!(code, 2, "unreachable controller exits 2: {err}");
    assert!(
        err.contains(&format!("nothing listening at {free}")),
        "{err}"
    );
    assert_eq!(err.matches("refused").count(), 1, "said once: {err}");
    let other = dir.path().join("other-ca");
    let (code, _, err) = run(
        &[],
        &[
            "certs",
            "init",
            "--out",
            &other.display().to_string(),
            "--regions",
            "europe",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let other_ca = other.join("ca.pem").display().to_string();
    let own_ca = tls.layout.ca().display().to_string();
    let (other_cert, other_key) = (other.join("operator.pem"), other.join("operator.key"));
    let creds = |ca: &str, cert: &std::path::Path, key: &std::path::Path| {
        vec![
            ("FEDERATION_CA".to_string(), ca.to_string()),
            ("FEDERATION_CERT".to_string(), cert.display().to_string()),
            ("FEDERATION_KEY".to_string(), key.display().to_string()),
            ("FEDERATION_ADDR".to_string(), na.clone()),
        ]
    };
    let (op_cert, op_key) = tls.layout.pair("operator");
    let (code, _, err) = run(&creds(&other_ca, &op_cert, &op_key), &["status"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("TLS") && err.contains("not signed by this CA") && err.contains(&other_ca),
        "a server certificate of another CA: {err}"
    );
    let (code, _, err) = run(&creds(&own_ca, &other_cert, &other_key), &["status"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refused our client certificate")
            && err.contains(&other_cert.display().to_string()),
        "a client certificate of another CA: {err}"
    );

    // status: an aligned table with times, not raw milliseconds; a dead
    // region's capacity is marked as history.
    sandbox.kill_controller("asia_pacific").expect("kill");
    sandbox
        .wait_for_row("north_america", "asia_pacific", "dead", PATIENCE, |r| {
            r.state == "dead"
        })
        .await
        .expect("declared dead");
    let (code, out, err) = run(env, &["status", "--controller", &na]).await;
    assert_eq!(code, 0, "{err}");
    for needle in [
        "north_america",
        "europe",
        "asia_pacific",
        "alive",
        "GDPR",
        "self",
    ] {
        assert!(out.contains(needle), "missing {needle}: {out}");
    }
    assert_aligned(
        &out,
        "REGION",
        &[
            "STATE",
            "SINCE",
            "DRAIN",
            "HOLD-DOWN",
            "TAGS",
            "SLOTS",
            "QUEUE",
            "EPOCH",
            "POLICY",
            "AD AGE",
        ],
    );
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row: {out}"))
            .to_string()
    };
    assert!(row("europe").contains("Z "), "epoch as a UTC time: {out}");
    assert!(
        row("asia_pacific").contains("dead") && row("asia_pacific").contains("("),
        "{out}"
    );
    assert!(out.contains("not current"), "{out}");
    let (code, out, _) = run(env, &["status", "--controller", &na, "--format", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let ap = v["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["region"] == "asia_pacific"))
        .expect("asia_pacific row")
        .clone();
    assert_eq!(ap["capacity_is_current"], false, "{ap}");
    assert!(ap["state_age_ms"].as_i64().is_some_and(|a| a >= 0), "{ap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_new_work_elsewhere_and_reload_refuses_a_bad_policy() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1)).await;
    let env: &[(String, String)] = &sandbox.cli_env("operator").expect("credentials");
    let eu = sandbox.addr("europe").expect("addr").to_string();
    let na = sandbox.addr("north_america").expect("addr").to_string();
    // A task that runs for a while holds a lease in europe.
    sandbox
        .start_agent_with("europe", "sleep 2; cat", 1)
        .expect("agent");
    let mut client = sandbox.client("north_america").await.expect("client");
    let req = || federation_api::SubmitTaskRequest {
        attributes: federation_sandbox::string_attrs(&[("customer_region", "DE")]),
        ..Default::default()
    };
    let first = client
        .submit_task(req())
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(first.region, "europe");
    let id = first.task_id.clone();
    wait_leased(&client, "the task is leased", &id).await;

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
    assert_eq!(out.lines().count(), 1, "one final line: {out}");
    assert!(out.contains("draining") && out.contains("empty"), "{out}");
    // Not a new line every half second: one per change of the counts.
    let progress: Vec<&str> = err.lines().collect();
    assert!(progress.iter().all(|l| l.contains("waiting")), "{err}");
    let mut distinct = progress
        .iter()
        .map(|l| l.split(", waiting").next().unwrap_or(l))
        .collect::<Vec<_>>();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        progress.len(),
        "a line per change only: {err}"
    );
    let (code, out, err) = run(env, &["drain", "--controller", &eu, "--format", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["draining"], true);
    assert_eq!(v["empty"], true);
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

    let (code, out, _) = run(env, &["status", "--controller", &na]).await;
    assert_eq!(code, 0);
    let europe = out
        .lines()
        .find(|l| l.starts_with("europe"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        europe.contains(" alive ") && europe.contains(" yes "),
        "{out}"
    );
    let (code, out, _) = run(env, &["undrain", "--controller", &eu]).await;
    assert_eq!(code, 0);
    assert!(out.contains("taking new tasks"), "{out}");
    let (code, out, _) = run(env, &["undrain", "--controller", &eu, "--format", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["draining"], false);

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
    assert!(
        err.contains(&format!("{}:", bad.display())),
        "the error names the file sent: {err}"
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
    let (code, out, err) = run(
        env,
        &[
            "reload",
            "--controller",
            &na,
            "--file",
            &good.display().to_string(),
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["applied"], true);
    assert!(
        v["findings"].as_array().is_some_and(|f| !f.is_empty()),
        "{v}"
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
    assert_eq!(notes.len(), 3, "{notes:?}");
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
