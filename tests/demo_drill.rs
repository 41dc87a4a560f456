//! `federation demo --drill`: after the walkthrough the demo runs a failover
//! drill of europe (stopping and restarting its controller) and prints where
//! its report is; the report says the drill passed.

mod support;

use std::process::{Command, Stdio};

use federation_sandbox::ChildGuard;
use support::*;

#[test]
fn the_demo_runs_a_drill_and_prints_its_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("demo.out");
    let out = std::fs::File::create(&out_path).expect("out");
    let mut cmd = Command::new(federation_exe());
    cmd.args(["demo", "--drill"])
        .env("TMPDIR", dir.path())
        .stdout(out)
        .stderr(Stdio::null());
    let mut demo = ChildGuard::spawn_group("demo --drill", &mut cmd).expect("demo starts");
    let status = demo.wait_timeout(PATIENCE * 4).expect("the demo finishes");
    let text = std::fs::read_to_string(&out_path).expect("output");
    assert!(status.success(), "{text}");
    assert!(
        text.contains("passed: drill of europe behaved as the policy says"),
        "{text}"
    );
    let report = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("drill report: "))
        .unwrap_or_else(|| panic!("no report path in {text}"));
    let page = std::fs::read_to_string(report).expect("report written");
    assert!(
        page.contains("PASSED") && page.contains("stopped europe"),
        "{page}"
    );
    assert!(
        report.starts_with(dir.path().to_str().expect("utf-8")),
        "{report}"
    );
}
