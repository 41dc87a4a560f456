//! `federation policy replay` on decision logs a real sandbox federation
//! wrote (issue 15, point 3): the seed's traffic, including a failover while
//! europe was down, re-decided under the seed itself (nothing changes: the
//! recorded region states are used, so the failover stays a failover),
//! under the GDPR variant (the failover becomes a rejection), under a
//! variant failing over to asia_pacific (a tag the old placement had is
//! dropped), and under a policy reading a value the entry withheld (not
//! replayable from the entry's log alone, replayable with the owner's).

mod support;

use std::process::Command;

use federation_api as api;
use federation_sandbox::string_attrs;
use serde_json::Value;
use support::*;

fn task(pairs: &[(&str, &str)]) -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(pairs),
        payload: b"hello".to_vec(),
        ..Default::default()
    }
}

/// Runs `federation policy replay … --format json`; exit code and report.
fn replay(args: &[&str], env: &[(String, String)]) -> (i32, Value) {
    let out = Command::new(federation_exe())
        .args(["policy", "replay", "--format", "json"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("federation runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

fn n(report: &Value, field: &str) -> u64 {
    report["report"][field].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_real_federations_log_under_proposed_policies() {
    let mut sandbox = formed(seed_sandbox()).await;
    let mut client = sandbox.client("north_america").await.expect("client");
    for pairs in [
        &[("customer_region", "US")][..],
        &[("customer_region", "FR")][..],
        &[
            ("customer_region", "DE"),
            ("data_class", "pii"),
            ("email", "replay.me@example.eu"),
        ][..],
    ] {
        client.submit_task(task(pairs)).await.expect("accepted");
    }
    sandbox.kill_controller("europe").expect("kill europe");
    sandbox
        .wait_for_row("north_america", "europe", "dead", PATIENCE, |r| {
            r.state == "dead"
        })
        .await
        .expect("europe seen dead");
    let failover = client
        .submit_task(task(&[("customer_region", "DE")]))
        .await
        .expect("fails over")
        .into_inner();
    assert_eq!(failover.region, "north_america");

    let dir = sandbox.dir().to_path_buf();
    let na = sandbox.data_dir("north_america").expect("dir");
    let eu = sandbox.data_dir("europe").expect("dir");
    let (na, eu) = (na.display().to_string(), eu.display().to_string());
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write policy");
        path.display().to_string()
    };
    let seed = write("seed.yaml", SEED.to_string());
    let gdpr = write("gdpr.yaml", seed_requires_gdpr());
    let to_ap = write(
        "to-ap.yaml",
        SEED.replace(
            "      primary_region: \"europe\"\n      backup_region: \"north_america\"",
            "      primary_region: \"europe\"\n      backup_region: \"asia_pacific\"",
        ),
    );
    let reads_email = write(
        "reads-email.yaml",
        SEED.replace(
            "    - condition: \"customer_region in ['UK', 'DE', 'FR']\"",
            "    - condition: \"email.endsWith('.ch')\"\n      primary_region: \"asia_pacific\"\n    - condition: \"customer_region in ['UK', 'DE', 'FR']\"",
        ),
    );

    // The same policy: nothing would change, the failover included.
    let (code, r) = replay(&["--log", &na, &seed], &[]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(n(&r, "decisions"), 4, "{r:#}");
    assert_eq!((n(&r, "replayed"), n(&r, "changed")), (4, 0), "{r:#}");

    // Requiring GDPR: the failover to north_america becomes a rejection.
    let (code, r) = replay(&["--log", &na, &gdpr], &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(n(&r, "changed"), 1, "{r:#}");
    let g = &r["report"]["groups"][0];
    assert_eq!(g["old_destination"], "north_america", "{r:#}");
    assert_eq!(g["new_destination"], "rejected", "{r:#}");
    assert_eq!(
        g["examples"][0]["task_id"],
        failover.task_id.as_str(),
        "{r:#}"
    );

    // Failing over to asia_pacific drops the tags north_america held.
    let (code, r) = replay(&["--log", &na, &to_ap], &[]);
    assert_eq!(code, 1, "{r:#}");
    let breaches = r["report"]["breaches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let dropped = breaches
        .iter()
        .find(|b| b["kind"] == "tag_dropped")
        .unwrap_or_else(|| panic!("a dropped tag: {r:#}"));
    assert_eq!(dropped["new_destination"], "asia_pacific");
    assert_eq!(dropped["tags"], serde_json::json!(["HIPAA", "SOX"]));

    // A rule reading the e-mail the entry withheld: the pii decision cannot
    // be replayed from north_america's log alone …
    let (code, r) = replay(&["--log", &na, &reads_email], &[]);
    assert_eq!(code, 1, "not replayed is not unchanged: {r:#}");
    let not = r["report"]["not_replayed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(not.len(), 1, "{r:#}");
    assert!(
        not[0]["why"].as_str().unwrap_or("").contains("email"),
        "{r:#}"
    );
    // … and can with europe's, which holds the task and its values.
    let (code, r) = replay(&["--log", &na, "--log", &eu, &reads_email], &[]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(n(&r, "joined"), 1, "{r:#}");
    assert!(
        r["report"]["not_replayed"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{r:#}"
    );

    // From the running controller, as an auditor.
    let addr = sandbox.addr("north_america").expect("addr").to_string();
    let env = sandbox.cli_env("auditor").expect("env");
    let (code, r) = replay(&["--controller", &addr, &gdpr], &env);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(n(&r, "changed"), 1, "{r:#}");

    // Bad input: exit 2.
    let out = Command::new(federation_exe())
        .args(["policy", "replay", "--log", "/nonexistent", &seed])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(federation_exe())
        .args([
            "policy",
            "replay",
            "--log",
            &na,
            "--since",
            "yesterday-ish",
            &seed,
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}
