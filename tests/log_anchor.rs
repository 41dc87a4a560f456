//! The decision log cannot be cut short unseen: a controller records its
//! log's head in its task store and advertises it; peers witness it. A log
//! whose tail was deleted, that was emptied, or that was replaced by an older
//! copy is reported by `federation audit verify --witness`, refused at start
//! by its own controller, and shown in its peers' status.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use federation_api as api;
use federation_sandbox::string_attrs;
use support::*;

fn audit_verify(args: &[&str], env: &[(String, String)]) -> Output {
    std::process::Command::new(federation_exe())
        .arg("audit")
        .arg("verify")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("runs")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn submit_de(sandbox: &federation_sandbox::Sandbox, n: usize) {
    let mut client = sandbox.client("europe").await.expect("client");
    for _ in 0..n {
        client
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&[("customer_region", "DE")]),
                payload: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .expect("accepted");
    }
}

/// Waits until europe recorded its head in its store, at least as far as
/// its log file reaches now, and north_america witnessed that same head;
/// returns it.
async fn witnessed(sandbox: &federation_sandbox::Sandbox) -> api::LogHead {
    let log = sandbox
        .data_dir("europe")
        .expect("dir")
        .join("decisions.jsonl");
    let written = std::fs::read(&log)
        .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
        .unwrap_or(0);
    let until = Instant::now() + PATIENCE;
    loop {
        let own = sandbox.status_row("europe", "europe").await.ok();
        let seen = sandbox.status_row("north_america", "europe").await.ok();
        if let (Some(own), Some(seen)) = (own, seen) {
            if let (Some(a), Some(b)) = (own.log_head, seen.log_head) {
                if a.seq >= written.max(1) && a == b {
                    return a;
                }
            }
        }
        assert!(
            Instant::now() < until,
            "north_america never witnessed europe's head"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn drop_last_record(log: &Path) {
    let bytes = std::fs::read(log).expect("log");
    let end = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    std::fs::write(log, &bytes[..end]).expect("cut");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_short_emptied_or_rolled_back_is_detected() {
    let mut sandbox = formed(seed_sandbox()).await;
    let auditor = sandbox.cli_env("auditor").expect("credentials");
    let eu_dir = sandbox.data_dir("europe").expect("dir");
    let na_dir = sandbox.data_dir("north_america").expect("dir");
    let eu_log = eu_dir.join("decisions.jsonl");
    let backup = sandbox.dir().join("europe-backup");

    submit_de(&sandbox, 2).await;
    witnessed(&sandbox).await;
    // An older, self-consistent copy of europe's data (as a restore from an
    // old backup would bring back).
    sandbox.kill_controller("europe").expect("kill");
    copy_dir(&eu_dir, &backup);
    sandbox.start_controller("europe").expect("restart");
    sandbox.wait_formed(PATIENCE).await.expect("europe back");
    submit_de(&sandbox, 3).await;
    let head = witnessed(&sandbox).await;

    // Intact: the running north_america witnesses europe's head.
    let na_url = sandbox.url("north_america").expect("url");
    let ok = audit_verify(
        &[eu_dir.to_str().expect("utf-8"), "--witness", &na_url],
        &auditor,
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains(&format!("ok: witness {na_url}: the log holds seq ")),
        "{}",
        text(&ok)
    );

    // The last record deleted while europe is stopped.
    sandbox.kill_controller("europe").expect("kill");
    // north_america writes what it witnessed to disk once per heartbeat.
    let seen = sandbox
        .status_row("north_america", "europe")
        .await
        .expect("row")
        .log_head
        .expect("witnessed");
    eventually(
        "north_america's witnesses.json holds europe's head",
        PATIENCE,
        || {
            let na_dir = na_dir.clone();
            let seq = seen.seq;
            async move {
                let w = federation::audit::anchor::read_witnesses(&na_dir).ok()?;
                (w.get("europe")?.seq >= seq).then_some(())
            }
        },
    )
    .await;
    let original = std::fs::read(&eu_log).expect("log");
    drop_last_record(&eu_log);
    let cut = audit_verify(
        &[
            eu_dir.to_str().expect("utf-8"),
            "--witness",
            na_dir.to_str().expect("utf-8"),
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(cut.status.code(), Some(1), "{}", text(&cut));
    let report: serde_json::Value = serde_json::from_slice(&cut.stdout).expect("json");
    let anchors = report["anchors"].as_array().expect("anchors");
    assert_eq!(anchors.len(), 2, "{report}");
    for a in anchors {
        assert_eq!(a["result"], "shorter", "{report}");
    }
    assert!(
        anchors[1]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1 record(s) at its end are missing")),
        "{report}"
    );
    // europe itself refuses to start on it, naming the problem.
    sandbox.start_controller("europe").expect("spawn");
    let status = sandbox
        .controller("europe")
        .expect("process")
        .wait_timeout(PATIENCE)
        .expect("exits on its own");
    assert!(!status.success(), "started on a cut log");
    let log = sandbox.controller_log_text("europe");
    assert!(
        log.contains("refusing to start") && log.contains("record(s) at its end are missing"),
        "{log}"
    );
    sandbox.kill_controller("europe").expect("reap");

    // The whole log emptied: no records tell its region, so it is named.
    std::fs::write(&eu_log, b"").expect("empty");
    let emptied = audit_verify(
        &[
            eu_dir.to_str().expect("utf-8"),
            "--witness",
            na_dir.to_str().expect("utf-8"),
            "--region",
            "europe",
        ],
        &[],
    );
    assert_eq!(emptied.status.code(), Some(1), "{}", text(&emptied));
    assert!(
        String::from_utf8_lossy(&emptied.stdout).contains("CONTRADICTED: witness"),
        "{}",
        text(&emptied)
    );

    // The intact log passes again once restored.
    std::fs::write(&eu_log, &original).expect("restore");
    let restored = audit_verify(
        &[
            eu_dir.to_str().expect("utf-8"),
            "--witness",
            na_dir.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(restored.status.success(), "{}", text(&restored));

    // The whole data directory rolled back to the older copy: consistent in
    // itself, so europe starts, but north_america sees its log go back.
    std::fs::remove_dir_all(&eu_dir).expect("rm");
    copy_dir(&backup, &eu_dir);
    sandbox.start_controller("europe").expect("restart");
    let row = sandbox
        .wait_for_row(
            "north_america",
            "europe",
            "with a log that went back",
            PATIENCE,
            |r| r.log_head_problem.contains("went back"),
        )
        .await
        .expect("rollback seen");
    // The witnessed head stays the higher one, as evidence.
    assert!(
        row.log_head.as_ref().is_some_and(|h| h.seq >= head.seq),
        "{row:?}"
    );
    let metrics = http_get(
        sandbox.admin_http_addr("north_america").expect("admin"),
        "/metrics",
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("federation_log_head_anomalies_total{region=\"europe\"}")),
        "{metrics}"
    );
}
