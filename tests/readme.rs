//! The README's "Run a three-region federation by hand" block, executed as
//! written (read from README.md, so the two cannot drift): certificates, a
//! key ring, three controllers on mutual TLS, an agent with the sample
//! handler, a DE task submitted through north_america and run in europe.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use federation_sandbox::{ChildGuard, free_port};
use support::*;

const README: &str = include_str!("../README.md");

/// The first ```sh block after the heading `title`.
fn block_after(title: &str) -> &'static str {
    let at = README
        .find(title)
        .unwrap_or_else(|| panic!("README has no `{title}`"));
    let start = README[at..].find("```sh\n").expect("a sh block") + at + 6;
    let end = README[start..].find("```\n").expect("its end") + start;
    &README[start..end]
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let script = block_after("## Run a three-region federation by hand");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = concat!(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "policies/seed-federation.yaml",
        "region-agent/examples/handle-task.sh",
    ] {
        let to = dir.path().join(file);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(format!("{root}/{file}"), &to).expect("copy");
    }
    let bin = federation_exe();
    let path = format!(
        "{}:{}",
        bin.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = dir.path().join("stdout");
    let err = dir.path().join("stderr");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("NA_PORT", free_port().expect("port").port().to_string())
        .env("EU_PORT", free_port().expect("port").port().to_string())
        .env("AP_PORT", free_port().expect("port").port().to_string())
        .env_remove("FEDERATION_ADDR")
        .env_remove("FEDERATION_CA")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout"))
        .stderr(std::fs::File::create(&err).expect("stderr"));
    // Its own process group: everything it started dies with the guard.
    let mut run = ChildGuard::spawn_group("readme walkthrough", &mut cmd).expect("bash runs");
    let status = run.wait_timeout(Duration::from_secs(120));
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let logs: String = ["north_america", "europe", "asia_pacific", "agent"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.path().join(format!("fed/{f}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            format!(
                "--- {f}.log (last lines, newest first)\n{}\n",
                tail.join("\n")
            )
        })
        .collect();
    let status =
        status.unwrap_or_else(|| panic!("did not finish in 120 s\n{stdout}\n{stderr}\n{logs}"));
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{logs}"
    );
    for needle in [
        "europe         alive",
        "asia_pacific   alive",
        "region    europe (routed)",
        "state     succeeded",
        "customer_region=DE",
        "ok: 2 records, chain intact",
    ] {
        assert!(
            stdout.contains(needle),
            "no `{needle}` in:\n{stdout}\n{stderr}"
        );
    }
}
