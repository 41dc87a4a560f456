//! The audit trail respects residency (issue 15, point 1): a DE `pii` task
//! entered through north_america (and asia_pacific) and held in europe leaves its personal
//! attribute's value only in europe. Every file under the other regions'
//! data directories, every line their controllers logged (at debug level)
//! and their status pages and metrics are searched for the value; europe's
//! own record must still hold it, and the entry's record must still let an
//! auditor holding the key match it (`federation audit digest`). A task no
//! rule matches (held nowhere) leaves its e-mail in no record, log line or
//! status page either.

mod support;

use std::path::Path;
use std::process::Command;

use federation_api as api;
use federation_sandbox::{Sandbox, SandboxBuilder, string_attrs};
use support::*;

/// A value no log line, path or id could contain by chance.
const EMAIL: &str = "jane.doe+residency-7f3a@example.eu";

const GDPR_VARIANT: &str = include_str!("../policies/seed-data-class-gdpr.yaml");

fn pii_task() -> api::SubmitTaskRequest {
    api::SubmitTaskRequest {
        attributes: string_attrs(&[
            ("customer_region", "DE"),
            ("data_class", "pii"),
            ("email", EMAIL),
        ]),
        payload: b"hello".to_vec(),
        ..Default::default()
    }
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8], out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_containing(&path, needle, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                out.push(path.display().to_string());
            }
        }
    }
}

/// Where, outside europe, the value shows up.
fn leaks(sandbox: &Sandbox) -> Vec<String> {
    let mut found = Vec::new();
    for region in ["north_america", "asia_pacific"] {
        let dir = sandbox.data_dir(region).expect("data dir");
        files_containing(&dir, EMAIL.as_bytes(), &mut found);
        for line in sandbox.controller_log_text(region).lines() {
            if line.contains(EMAIL) {
                found.push(format!("{region}'s log: {line}"));
            }
        }
        let admin = sandbox.admin_http_addr(region).expect("admin addr");
        for path in ["/", "/metrics"] {
            if http_get(admin, path).contains(EMAIL) {
                found.push(format!("{region}'s admin page {path}"));
            }
        }
    }
    found
}

fn federation(args: &[&str]) -> (bool, String) {
    let out = Command::new(federation_exe())
        .args(args)
        .output()
        .expect("federation runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn check(policy: &str, refused_at_entry: bool) {
    let mut sandbox = formed(
        SandboxBuilder::new(federation_exe(), policy)
            .agents(1, 1)
            .env("RUST_LOG", "info,federation=debug"),
    )
    .await;
    let mut client = sandbox.client("north_america").await.expect("client");
    let resp = client
        .submit_task(pii_task())
        .await
        .expect("DE pii task accepted")
        .into_inner();
    assert_eq!(resp.region, "europe");
    let task = sandbox
        .wait_terminal("north_america", &resp.task_id, PATIENCE)
        .await
        .expect("terminal");
    assert_eq!(task.state(), api::TaskState::Succeeded, "{task:?}");
    // Entered through asia_pacific too.
    let via_ap = sandbox
        .client("asia_pacific")
        .await
        .expect("client")
        .submit_task(pii_task())
        .await
        .expect("accepted via asia_pacific")
        .into_inner();
    assert_eq!(via_ap.region, "europe");

    if refused_at_entry {
        // europe down: the entry refuses the task (no GDPR elsewhere) and
        // records the refusal — without the value.
        sandbox.kill_controller("europe").expect("kill europe");
        let err = eventually("europe declared dead", PATIENCE, || {
            let mut client = client.clone();
            async move {
                match client.submit_task(pii_task()).await {
                    Err(s) if s.message().contains("dead") => Some(s),
                    _ => None,
                }
            }
        })
        .await;
        assert!(err.message().contains("lacks GDPR"), "{}", err.message());
    }

    // A task no rule matches is held nowhere: the entry's record, log line
    // and status page (which shows the rejection's reason) keep its routing
    // attribute, not its e-mail.
    let mut na = sandbox.client("north_america").await.expect("client");
    let err = na
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "JP"), ("email", EMAIL)]),
            payload: b"hello".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("JP matches no rule");
    assert!(err.message().contains("no routing rule"), "{err:?}");
    let page = http_get(
        sandbox.admin_http_addr("north_america").expect("admin"),
        "/",
    );
    assert!(
        page.contains("no routing rule") && page.contains("withheld"),
        "the page shows the rejection, the e-mail withheld: {page}"
    );

    // Let replication (change batches every heartbeat) reach the backups.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let found = leaks(&sandbox);
    assert!(
        found.is_empty(),
        "{EMAIL} found outside europe:\n{}",
        found.join("\n")
    );

    // The owner keeps everything.
    let europe = sandbox.data_dir("europe").expect("europe dir");
    let mut held = Vec::new();
    files_containing(&europe, EMAIL.as_bytes(), &mut held);
    assert!(
        held.iter().any(|p| p.ends_with("decisions.jsonl")),
        "europe's own record holds the value: {held:?}"
    );

    // The entry's record names the attribute and lets an auditor with the
    // key match a candidate value, and only the right one.
    let na = sandbox.data_dir("north_america").expect("na dir");
    let na = na.display().to_string();
    let keys = sandbox.keys_path().display().to_string();
    let (ok, out) = federation(&[
        "audit",
        "digest",
        "--keys",
        &keys,
        "--log",
        &na,
        "--attribute",
        "email",
        "--value",
        EMAIL,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&resp.task_id), "{out}");
    let (ok, out) = federation(&[
        "audit",
        "digest",
        "--keys",
        &keys,
        "--log",
        &na,
        "--attribute",
        "email",
        "--value",
        "someone.else@example.eu",
    ]);
    assert!(!ok, "another value matches no record: {out}");

    // Both logs still verify.
    for dir in [na.as_str(), &europe.display().to_string()] {
        let (ok, out) = federation(&["audit", "verify", dir]);
        assert!(ok, "{dir}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_entry_keeps_no_personal_value_of_an_eu_task() {
    check(SEED, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdpr_variant_entry_and_refusing_region_keep_no_personal_value() {
    check(GDPR_VARIANT, true).await;
}
