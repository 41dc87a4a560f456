//! A region whose task store is a real PostgreSQL database
//! (`node.store.backend: postgres`): it serves submits from every entry
//! region end to end, a SIGKILL of its controller loses no acknowledged
//! task, its agents run tasks through it, the decision log in the database
//! verifies and exports as today's JSON lines, and a bad store
//! configuration stops `serve` with exit 64 naming what is wrong.
//!
//! One PostgreSQL server per test binary (`federation_sandbox::pg::shared`),
//! a database per test.

mod support;

use std::process::{Command, Stdio};

use federation_api as api;
use federation_sandbox::pg as pg_sandbox;
use federation_sandbox::string_attrs;
use support::*;

fn server() -> &'static pg_sandbox::PgServer {
    pg_sandbox::shared().expect("the test PostgreSQL server (is PostgreSQL installed?)")
}

/// The user's federation with europe's store in the database at `url`.
fn europe_on_postgres(url: &str) -> federation_sandbox::SandboxBuilder {
    seed_sandbox()
        .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
        .region_env("europe", "FEDERATION__NODE__STORE__URL", url)
        .region_env("europe", "FEDERATION__NODE__STORE__POOL_SIZE", "4")
        .region_env("europe", "FEDERATION__NODE__REPLICA", "europe-1")
}

/// Runs `federation audit ARGS`; returns exit code, stdout, stderr.
fn audit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(federation_exe())
        .arg("audit")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("federation audit runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_on_postgres_serves_every_entry_and_keeps_every_acknowledged_task_across_a_sigkill()
 {
    let url = server().create_database("region").expect("database");
    let mut sandbox = formed(europe_on_postgres(&url).agents(0, 1)).await;
    assert!(
        sandbox
            .controller_log_text("europe")
            .contains("task store in postgresql"),
        "europe runs on the database: {}",
        sandbox.controller_log_text("europe")
    );
    // An EU task from each entry region is placed in europe, in the
    // database.
    let mut routed = Vec::new();
    for entry in ["europe", "north_america", "asia_pacific"] {
        let mut c = sandbox.client(entry).await.expect("client");
        let r = c
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", "DE")]),
                payload: format!("from {entry}").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("submit via {entry}: {s:?}"))
            .into_inner();
        assert_eq!(r.region, "europe", "via {entry}: {r:?}");
        routed.push(r.task_id);
    }
    // Concurrent submits (with idempotency keys), SIGKILL in mid-stream.
    let acked = acked_across_a_kill(&mut sandbox, "europe", 200, routed.clone()).await;
    sandbox.start_controller("europe").expect("restart");
    let mut client = eventually("europe restarts", PATIENCE, || {
        let s = &sandbox;
        async move { s.client("europe").await.ok() }
    })
    .await;
    let mut missing = Vec::new();
    for id in &acked {
        match client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
        {
            Ok(r) if r.get_ref().task.is_some() => {}
            Ok(_) => missing.push(format!("{id}: no task")),
            Err(s) => missing.push(format!("{id}: {:?}", s.code())),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // A key acknowledged before the kill still deduplicates after it.
    let again = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "DE")]),
            idempotency_key: "w0-0".into(),
            ..Default::default()
        })
        .await
        .expect("a known key")
        .into_inner();
    assert!(acked.contains(&again.task_id), "{again:?}");
    // An agent runs a task through the database-backed controller.
    sandbox.start_agent("europe").expect("agent");
    let done = sandbox
        .wait_terminal("europe", &routed[1], PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sandbox.controller_log_text("europe")));
    assert_eq!(done.state(), api::TaskState::Succeeded, "{done:?}");
    assert_eq!(done.result, b"from north_america");

    // The decision log in the database: one intact chain, exported as the
    // JSON lines of a file-backed controller, naming the tasks.
    let (code, out, err) = audit(&["verify", &url, "--region", "europe"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ok: ") && out.contains("chain intact"),
        "{out}"
    );
    assert!(out.contains("ok: the chain head in"), "{out}");
    let file = sandbox.dir().join("exported.jsonl");
    let (code, out, err) = audit(&["export", &url, "--output", &file.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    let report = federation::audit::verify(&file).expect("read the export");
    assert!(report.is_intact(), "{report:?}");
    let records = federation::audit::show(&file, &Default::default()).expect("show");
    assert_eq!(records.len() as u64, report.records);
    for id in &routed {
        assert!(
            records
                .iter()
                .any(|r| r.entry.task_id.as_deref() == Some(id.as_str()) && r.region == "europe"),
            "no record of {id} in the exported log"
        );
    }
    let (code, out, err) = audit(&["show", &url, "--task", &routed[0], "--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&routed[0]), "{out}");
    // The running controller reads the same log from the database:
    // ListDecisions, and the status view's own decisions (before, both read
    // a file a database-backed region does not have).
    let mut admin = sandbox.admin("europe").await.expect("admin");
    let listed = admin
        .list_decisions(api::ListDecisionsRequest {
            task_id: routed[0].clone(),
            ..Default::default()
        })
        .await
        .expect("list decisions")
        .into_inner();
    assert!(listed.chain_intact, "{listed:?}");
    assert!(
        listed.records.iter().any(|r| r.contains(&routed[0])),
        "{listed:?}"
    );
    // `federation get` shows the decision that placed each task, read from
    // the database (by the index on decisions' task ids): the submit's own
    // (`route`) and the one a peer forwarded (`forwarded_in`).
    for id in &routed {
        let got = client
            .get_task(api::GetTaskRequest {
                task_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{id}: {s:?}"))
            .into_inner();
        let d = got
            .decision
            .unwrap_or_else(|| panic!("{id}: no decision shown"));
        assert!(
            d.matched && d.region == "europe" && !d.rule.is_empty() && !d.policy_hash.is_empty(),
            "{id}: {d:?}"
        );
    }
    let admin_http = sandbox.admin_http_addr("europe").expect("admin http");
    let json = tokio::task::spawn_blocking(move || http_get(admin_http, "/view.json"))
        .await
        .expect("join");
    let view: serde_json::Value = serde_json::from_str(&json).expect("view json");
    let here = view["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .find(|s| s["region"] == "europe")
        .cloned()
        .expect("europe's own source");
    assert_eq!(here["note"], "here", "{here}");
    assert!(
        view["decisions"]
            .as_array()
            .expect("decisions")
            .iter()
            .any(|d| d["logged_by"] == "europe"),
        "{json}"
    );
    // Tampering is evident: a superuser who switches the append-only
    // trigger off and edits a record breaks the chain `audit verify` checks.
    let db = url.rsplit('/').next().expect("db name");
    server()
        .execute(
            db,
            "ALTER TABLE decisions DISABLE TRIGGER decisions_no_update_or_delete; \
             UPDATE decisions SET line = replace(line, '\"kind\":\"', '\"kind\":\"x') WHERE seq = 1; \
             ALTER TABLE decisions ENABLE TRIGGER decisions_no_update_or_delete",
        )
        .expect("tamper as superuser");
    let (code, out, err) = audit(&["verify", &url, "--region", "europe"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("broken at line 1 (seq 1)") && out.contains("hash mismatch"),
        "{out}{err}"
    );
    // europe's one replica leads its region (lease expiry runs there).
    assert!(
        sandbox
            .controller_log_text("europe")
            .contains("this replica leads its region"),
        "{}",
        sandbox.controller_log_text("europe")
    );
    // A second controller of europe under the same replica name is refused.
    let second = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = serve_with(
        second.path(),
        &[
            ("FEDERATION__NODE__STORE__URL", url.as_str()),
            ("FEDERATION__NODE__REPLICA", "europe-1"),
        ],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "node.replica `europe-1` is in use by another running controller of region europe"
        ),
        "{stderr}"
    );
    // The file-backed regions still keep their files.
    let na = sandbox.data_dir("north_america").expect("dir");
    assert!(na.join("tasks.redb").exists() && na.join("decisions.jsonl").exists());
    assert!(
        !sandbox
            .data_dir("europe")
            .expect("dir")
            .join("tasks.redb")
            .exists(),
        "europe keeps no task file"
    );
}

/// Runs `federation serve` for europe on the postgres backend with `env`;
/// returns its exit code and stderr (bounded: it must exit by itself).
fn serve_with(dir: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let config = dir.join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy");
    let listen = federation_sandbox::free_port().expect("port");
    let mut cmd = Command::new(federation_exe());
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--region", "europe", "--insecure"])
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("europe"))
        .env("FEDERATION__NODE__STORE__BACKEND", "postgres")
        .env("FEDERATION_KEYS", TEST_KEYS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child =
        federation_sandbox::ChildGuard::spawn("europe controller", &mut cmd).expect("spawn");
    let mut stderr = child.stderr().expect("stderr");
    let status = child.wait_timeout(PATIENCE);
    let mut text = String::new();
    if status.is_some() {
        use std::io::Read as _;
        let _ = stderr.read_to_string(&mut text);
    }
    (status.and_then(|s| s.code()), text)
}

/// What is wrong, the variables that make it so, what stderr must say.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn a_bad_store_configuration_exits_64_naming_what_is_wrong() {
    let pg = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let newer = pg.create_database("newer").expect("database");
    // A database a newer build migrated.
    let db = newer.rsplit('/').next().expect("name").to_string();
    pg.execute(
        &db,
        "CREATE TABLE federation_schema (version integer PRIMARY KEY, applied_unix_ms bigint NOT NULL); \
         INSERT INTO federation_schema VALUES (999, 0)",
    )
    .expect("a newer schema");
    let wrong_password = format!(
        "postgres://{}:wrong@127.0.0.1:{}/postgres",
        pg_sandbox::USER,
        pg.port()
    );
    let missing = pg.url("no_such_database");
    let unreachable = "postgres://federation:x@127.0.0.1:1/federation".to_string();
    // The test server offers no TLS: a URL requiring it is refused at start.
    let tls = format!("{}?sslmode=require", pg.url("postgres"));
    let cases: Vec<Case<'_>> = vec![
        ("no url", vec![], "node.store.url"),
        (
            "wrong password",
            vec![("FEDERATION__NODE__STORE__URL", wrong_password.as_str())],
            "authentication failed for user `federation`",
        ),
        (
            "missing database",
            vec![("FEDERATION__NODE__STORE__URL", missing.as_str())],
            "database `no_such_database` does not exist",
        ),
        (
            "unreachable",
            vec![("FEDERATION__NODE__STORE__URL", unreachable.as_str())],
            "127.0.0.1:1/federation: cannot connect",
        ),
        (
            "tls required",
            vec![("FEDERATION__NODE__STORE__URL", tls.as_str())],
            "TLS (sslmode=require): the server does not offer TLS",
        ),
        (
            "newer schema",
            vec![("FEDERATION__NODE__STORE__URL", newer.as_str())],
            "schema is at version 999, newer than this build knows",
        ),
        (
            "unknown backend",
            vec![("FEDERATION__NODE__STORE__BACKEND", "sqlite")],
            "node.store.backend",
        ),
    ];
    for (what, env, says) in cases {
        let (code, stderr) = serve_with(dir.path(), &env);
        eprintln!("{what}: exit {code:?}: {}", stderr.trim());
        assert_eq!(code, Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(says),
            "{what}: wanted `{says}` in: {stderr}"
        );
        assert!(
            !stderr.contains("federation-test") && !stderr.contains(":wrong@"),
            "{what}: the password is never printed: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_expires_the_lease_of_a_killed_agent() {
    // Lease expiry is the region leader's work, fenced in the database: a
    // task whose agent died is leased again and completes.
    let url = server().create_database("expiry").expect("database");
    let mut sandbox = formed(
        europe_on_postgres(&url)
            .agents(0, 1)
            .env("FEDERATION__NODE__TIMERS__LEASE_TTL", "1500ms"),
    )
    .await;
    let (id, t) = killed_agents_task_runs_again(&mut sandbox, "europe").await;
    assert_eq!(t.state(), api::TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempts, 2, "the expired lease was taken back: {t:?}");
    let log = sandbox.controller_log_text("europe");
    assert!(
        log.contains("lease expired") && log.contains(&id),
        "expired by the leader's reaper: {log}"
    );
}

#[test]
fn store_migrate_creates_the_schema_with_the_owners_url_and_exits_64_on_a_bad_one() {
    let url = server().create_database("migrate_cli").expect("database");
    let run = |url: &str| {
        let out = Command::new(federation_exe())
            .args(["store", "migrate", url])
            .stdin(Stdio::null())
            .output()
            .expect("federation store migrate runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&url);
    assert_eq!(code, Some(0), "{out}{err}");
    let want = format!(
        "the schema is at version {}",
        federation::pg::known_version()
    );
    assert!(out.contains(&want), "{out}");
    // Again: already current, nothing to do.
    let (code, out, _) = run(&url);
    assert_eq!(code, Some(0));
    assert!(out.contains(&want), "{out}");
    let wrong = format!(
        "postgres://{}:wrong@127.0.0.1:{}/postgres",
        pg_sandbox::USER,
        server().port()
    );
    let (code, _, err) = run(&wrong);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
}
