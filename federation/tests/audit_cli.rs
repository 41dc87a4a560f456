//! `federation audit verify|show` against logs written by `DecisionLog`.

use std::path::Path;
use std::process::{Command, Output};

use federation::audit::{DecisionLog, Entry, FILE_NAME, kind};
use serde_json::json;

fn entry(i: usize) -> Entry {
    let (rule_index, outcome, region) = match i % 3 {
        0 => (0, "routed", Some("north_america")),
        1 => (1, "failover", Some("europe_west")),
        _ => (1, "rejected", None),
    };
    Entry {
        kind: kind::ROUTE.into(),
        task_id: Some(format!("task-{i}")),
        entry_region: Some("europe".into()),
        attributes: Some(json!({"customer_region": "DE", "data_class": "pii"})),
        policy_hash: Some("feedface".into()),
        rule_index: Some(rule_index),
        outcome: Some(outcome.into()),
        chosen_region: region.map(str::to_string),
        decision: Some(json!({
            "outcome": {"kind": outcome},
            "rule_index": rule_index,
            "reason": format!("rule {} matched; {outcome}", rule_index + 1),
        })),
        note: None,
        ..Entry::default()
    }
}

fn write_log(dir: &Path, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let log = DecisionLog::open(dir, "europe").expect("open");
        for i in 0..n {
            log.append(entry(i)).await.expect("append");
        }
        log.flush().await.expect("flush");
    });
}

fn federation(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_federation"))
        .args(args)
        .output()
        .expect("run federation")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn verify_intact_log_by_dir_and_by_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 5);
    for target in [dir.path().to_path_buf(), dir.path().join(FILE_NAME)] {
        let out = federation(&["audit", "verify", arg(&target)]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = stdout(&out);
        assert!(
            text.starts_with("ok: 5 records, chain intact, last hash "),
            "{text}"
        );
    }
    let out = federation(&["audit", "verify", arg(dir.path()), "--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["records"], 5);
    assert!(report["first_broken"].is_null());
}

#[test]
fn verify_names_the_broken_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 5);
    let path = dir.path().join(FILE_NAME);
    let text = std::fs::read_to_string(&path).expect("read");
    let tampered = text.replacen(
        "\"customer_region\":\"DE\"",
        "\"customer_region\":\"US\"",
        2,
    );
    // Restore the first occurrence so that only record 2 is edited.
    let first = tampered.replacen(
        "\"customer_region\":\"US\"",
        "\"customer_region\":\"DE\"",
        1,
    );
    std::fs::write(&path, first).expect("write");
    let out = federation(&["audit", "verify", arg(dir.path())]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.starts_with("broken at line 2 (seq 2): hash mismatch"),
        "{text}"
    );
}

#[test]
fn verify_of_an_unreadable_log_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = federation(&["audit", "verify", arg(dir.path())]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the decision log"));
}

#[test]
fn show_filters_in_text_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 6);
    let d = arg(dir.path());

    // A table by default: a header, then one row per record.
    let out = federation(&["audit", "show", d]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 7, "{text}");
    let header = text.lines().next().expect("header");
    assert!(header.starts_with("TIME"), "{text}");
    // Every row's RULE and REGION cells start under their headers.
    for column in ["TASK", "RULE", "REGION", "OUTCOME"] {
        let at = header.find(column).expect("column");
        for row in text.lines().skip(1) {
            assert!(
                row.as_bytes()[at - 1] == b' ' && row.as_bytes()[at] != b' ',
                "{column} misaligned in {row:?}:\n{text}"
            );
        }
    }

    let out = federation(&["audit", "show", d, "--task", "task-4"]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    let line = text.lines().nth(1).expect("one row");
    let cells: Vec<&str> = line
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    for part in [
        "task-4",
        "customer_region=DE,data_class=pii",
        "2",
        "europe_west",
        "failover",
    ] {
        assert!(cells.contains(&part), "{part} missing from {line}");
    }
    assert!(line.contains("rule 2 matched; failover"), "{line}");

    let out = federation(&["audit", "show", d, "--rule", "2", "--outcome", "rejected"]);
    assert_eq!(stdout(&out).lines().count(), 3);

    let out = federation(&[
        "audit",
        "show",
        d,
        "--region",
        "north_america",
        "--format",
        "json",
    ]);
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r["chosen_region"] == "north_america" && r["hash"].is_string())
    );

    let out = federation(&["audit", "show", d, "--outcome", "sideways"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects unknown outcomes");
}

/// `audit digest` with the auditor's one-line key file: the digest of a
/// candidate value, typed values with `--json`, the records it matches, and
/// exit 2 for a key file that cannot be used (naming it, never the key).
#[test]
fn digest_with_the_auditors_key_file() {
    use federation::audit::key::AuditKey;
    use federation::policy::AttrValue;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("audit.key");
    let line = federation::replication::KeyRing::line("audit-1", &[6u8; 32]);
    std::fs::write(&key_file, format!("{line}:audit\n")).expect("write");
    let key = AuditKey::load_file(&key_file).expect("key");
    let out = federation(&[
        "audit",
        "digest",
        "--audit-key",
        arg(&key_file),
        "--attribute",
        "age",
        "--value",
        "42",
        "--json",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["key"], "audit-1");
    assert_eq!(
        report["digest"],
        key.attribute_digest("age", &AttrValue::Int(42)).as_str()
    );
    // The log of `entry` keeps `data_class` as a value: matched as such.
    write_log(dir.path(), 2);
    let out = federation(&[
        "audit",
        "digest",
        "--audit-key",
        arg(&key_file),
        "--attribute",
        "data_class",
        "--value",
        "pii",
        "--log",
        arg(dir.path()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("value"), "{}", stdout(&out));
    let out = federation(&[
        "audit",
        "digest",
        "--audit-key",
        arg(&key_file),
        "--attribute",
        "data_class",
        "--value",
        "public",
        "--log",
        arg(dir.path()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // A short key: exit 2, the file and line named, the key not shown.
    std::fs::write(&key_file, format!("# k\n{}\n", &line[..line.len() - 8])).expect("write");
    let out = federation(&[
        "audit",
        "digest",
        "--audit-key",
        arg(&key_file),
        "--attribute",
        "a",
        "--value",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit.key:2:"), "{err}");
    assert!(!err.contains(&line[8..20]), "{err}");
}
