//! `region-agent --log-format json`: every stderr line is a JSON object whose
//! fields are plain values, without terminal colours, and stdout stays empty.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn json_logs_are_objects_with_plain_values() {
    // Nothing listens on port 1 of loopback: the agent keeps retrying and
    // logging, which is what we read; it is killed at the end.
    let mut child = Command::new(env!("CARGO_BIN_EXE_region-agent"))
        .args([
            "--log-format",
            "json",
            "--controller",
            "127.0.0.1:1",
            "--insecure",
            "--exec",
            "cat",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while lines.len() < 3 && Instant::now() < until {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("reaped");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert!(lines.len() >= 3, "too few log lines: {lines:?}");
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "colour codes: {l}");
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for (k, f) in v["fields"].as_object().expect("fields") {
            if let Some(s) = f.as_str() {
                assert!(!s.starts_with("Some("), "field {k} is debug text: {l}");
            }
        }
    }
    let retry = lines
        .iter()
        .find(|l| l.contains("retrying registration"))
        .expect("a retry line");
    let v: serde_json::Value = serde_json::from_str(retry).expect("json");
    assert_eq!(v["fields"]["controller"], "127.0.0.1:1", "{retry}");
}
