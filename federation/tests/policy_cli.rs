//! `federation policy check|explain|diff` on the user's example and on
//! broken files: exit codes and the key lines of the output.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_federation"))
}

fn policy(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies")).join(name)
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out: Output = bin().args(args).output().expect("runs");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(name: &str) -> String {
    policy(name).display().to_string()
}

fn broken(name: &str, from: &str, to: &str) -> (tempfile::TempDir, String) {
    let text = std::fs::read_to_string(policy("seed-federation.yaml")).expect("seed");
    assert!(text.contains(from), "{from}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
    (dir, path.display().to_string())
}

#[test]
fn check_user_example() {
    let (code, out, err) = run(&["policy", "check", &p("seed-federation.yaml")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warning: [failover-drops-tag] rule 2"),
        "{out}"
    );
    assert!(out.contains("drops compliance tag(s) GDPR"), "{out}");
    assert!(out.contains("asia_pacific"), "{out}");
    assert!(out.contains("customer_region='JP'"), "{out}");
    assert!(out.contains("0 error(s)"), "{out}");
}

#[test]
fn check_user_example_json() {
    let (code, out, _) = run(&[
        "policy",
        "check",
        &p("seed-federation.yaml"),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["summary"]["errors"], 0);
    let findings = v["findings"].as_array().expect("findings");
    assert!(findings.iter().any(|f| {
        f["kind"] == "unreachable-region"
            && f["message"]
                .as_str()
                .is_some_and(|m| m.contains("asia_pacific"))
    }));
    assert!(
        findings
            .iter()
            .any(|f| f["kind"] == "unmatched-input" && f["example"]["customer_region"] == "JP")
    );
    assert!(
        findings
            .iter()
            .any(|f| f["kind"] == "failover-drops-tag" && f["severity"] == "warning")
    );
}

#[test]
fn check_requires_variant_is_an_error() {
    let (code, out, _) = run(&["policy", "check", &p("seed-requires-gdpr.yaml")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: [failover-lacks-required-tag] rule 2"),
        "{out}"
    );
}

#[test]
fn check_clean_policy_is_silent() {
    let (code, out, _) = run(&["policy", "check", &p("clean.yaml")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 error(s), 0 warning(s), 0 info"), "{out}");
}

#[test]
fn check_shadowed_policy() {
    let (code, out, _) = run(&["policy", "check", &p("shadowed.yaml")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[shadowed-rule] rule 2 (germany)"), "{out}");
    assert!(out.contains("[overlapping-rules] rule 3"), "{out}");
}

#[test]
fn explain_de_routes_to_europe() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region=DE",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("outcome: routed to europe"), "{out}");
    assert!(out.contains("rule: rule 2"), "{out}");
}

#[test]
fn explain_de_with_europe_down_fails_over_with_gdpr_warning() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region=DE",
        "--down",
        "europe",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("outcome: failover to north_america"), "{out}");
    assert!(out.contains("europe (primary): refused: dead"), "{out}");
    assert!(
        out.contains("warning: failover to north_america drops"),
        "{out}"
    );
    assert!(out.contains("GDPR"), "{out}");
}

#[test]
fn explain_json_has_outcome_first() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region=DE",
        "--down",
        "europe",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    assert!(out.trim_start().starts_with("{\n  \"outcome\""), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["outcome"]["kind"], "failover");
    assert_eq!(v["outcome"]["region"], "north_america");
}

#[test]
fn explain_requires_variant_rejects() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-requires-gdpr.yaml"),
        "--attr",
        "customer_region=DE",
        "--down",
        "europe",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("outcome: rejected"), "{out}");
    assert!(
        out.contains("north_america (backup): refused: missing_tags — lacks GDPR"),
        "{out}"
    );
}

#[test]
fn explain_unmatched_rejects() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region=JP",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no routing rule matches"), "{out}");
}

#[test]
fn explain_typed_attributes() {
    let (code, out, _) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region:=\"US\"",
        "--attr",
        "size:=3",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("routed to north_america"), "{out}");
}

#[test]
fn explain_bad_arguments_exit_2() {
    let (code, _, err) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "customer_region=DE",
        "--down",
        "mars",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--down mars: unknown region"), "{err}");
    let (code, _, err) = run(&[
        "policy",
        "explain",
        &p("seed-federation.yaml"),
        "--attr",
        "novalue",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("KEY=VALUE"), "{err}");
}

#[test]
fn diff_exit_codes() {
    let (code, out, _) = run(&[
        "policy",
        "diff",
        &p("seed-federation.yaml"),
        &p("seed-federation.yaml"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no route changes"), "{out}");
    let (code, out, _) = run(&[
        "policy",
        "diff",
        &p("seed-federation.yaml"),
        &p("seed-requires-gdpr.yaml"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("customer_region='DE'"), "{out}");
    assert!(out.contains("requires GDPR"), "{out}");
}

#[test]
fn broken_files_exit_2_with_positions() {
    let cases = [
        (
            "bad-cel.yaml",
            "customer_region in ['UK', 'DE', 'FR']",
            "customer_region in 'UK'",
            ":21:38:",
        ),
        (
            "bad-syntax.yaml",
            "customer_region == 'US' ||",
            "customer_region == = 'US' ||",
            ":18:38:",
        ),
        (
            "unknown-region.yaml",
            "primary_region: \"europe\"",
            "primary_region: \"eu\"",
            ":22:23:",
        ),
        ("wrong-type.yaml", "priority: 2", "priority: high", ":11:"),
        (
            "unknown-field.yaml",
            "priority: 2\n",
            "priority: 2\n      colour: blue\n",
            ":12:7:",
        ),
        (
            "broken.yaml",
            "  routing_rules:\n",
            "  routing_rules: [\n",
            "broken.yaml:",
        ),
    ];
    for (name, from, to, want) in cases {
        let (_dir, path) = broken(name, from, to);
        for cmd in [
            vec!["policy", "check", path.as_str()],
            vec![
                "policy",
                "explain",
                path.as_str(),
                "--attr",
                "customer_region=DE",
            ],
            vec!["policy", "diff", path.as_str(), path.as_str()],
        ] {
            let (code, out, err) = run(&cmd);
            assert_eq!(code, 2, "{name} {cmd:?}: {out}{err}");
            assert!(err.contains(name) && err.contains(want), "{name}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let (code, _, err) = run(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
}
