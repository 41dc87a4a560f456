//! The executor for real: `sh -c` children, pipes, process groups and kills.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use federation_api::{AttributeList, AttributeValue, Task, attribute_value::Kind};
use region_agent::exec::{self, CancelReason, ExecLimits, ExecStatus};

/// Every test is bounded by this, so a hang fails instead of blocking CI.
const TEST_BOUND: Duration = Duration::from_secs(60);

fn task(payload: &[u8]) -> Task {
    Task {
        task_id: "0190-test-task".to_owned(),
        payload: payload.to_vec(),
        attempts: 2,
        ..Task::default()
    }
}

fn limits() -> ExecLimits {
    ExecLimits {
        timeout: Duration::from_secs(30),
        output_drain: Duration::from_millis(300),
        ..ExecLimits::default()
    }
}

fn string(s: &str) -> AttributeValue {
    AttributeValue {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

fn value(kind: Kind) -> AttributeValue {
    AttributeValue { kind: Some(kind) }
}

/// Never resolves: no cancellation.
async fn never() -> CancelReason {
    std::future::pending().await
}

async fn run(
    command: &str,
    task: &Task,
    limits: &ExecLimits,
    cancel: impl std::future::Future<Output = CancelReason>,
) -> exec::Execution {
    tokio::time::timeout(TEST_BOUND, exec::execute(command, task, limits, cancel))
        .await
        .expect("execution must end within the test bound")
}

/// Waits (bounded) until `path` holds a pid and returns it.
async fn read_pid(path: &Path) -> i32 {
    for _ in 0..500 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pid written to {}", path.display());
}

/// True when the process is gone or a zombie (nobody may reap orphans in a
/// container).
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

/// Waits (bounded) for the process to die; false when it is still alive.
async fn dies(pid: i32) -> bool {
    for _ in 0..250 {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn payload_reaches_stdin_and_stdout_is_the_result() {
    let payload = b"hello \x00 binary \xff payload\n".repeat(1000);
    let execution = run("cat", &task(&payload), &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(0));
    assert!(!execution.truncated);
    assert_eq!(execution.output, payload);
    let report = execution.report().expect("a finished task is reported");
    assert!(report.success);
    assert_eq!(report.error, "");
    assert_eq!(report.exit_code, 0);
}

#[tokio::test]
async fn attributes_and_task_identity_reach_the_environment() {
    let mut t = task(b"");
    t.attributes = HashMap::from([
        ("customer_region".to_owned(), string("DE")),
        ("data-class".to_owned(), string("pii with spaces")),
        ("retries".to_owned(), value(Kind::IntValue(-3))),
        ("ratio".to_owned(), value(Kind::DoubleValue(1.5))),
        ("urgent".to_owned(), value(Kind::BoolValue(true))),
        (
            "regions".to_owned(),
            value(Kind::ListValue(AttributeList {
                values: vec![string("UK"), string("DE"), value(Kind::IntValue(7))],
            })),
        ),
    ]);
    let command = r#"printf '%s|%s|%s|%s|%s|%s|%s|%s' "$FEDERATION_ATTR_CUSTOMER_REGION" "$FEDERATION_ATTR_DATA_CLASS" "$FEDERATION_ATTR_RETRIES" "$FEDERATION_ATTR_RATIO" "$FEDERATION_ATTR_URGENT" "$FEDERATION_ATTR_REGIONS" "$FEDERATION_TASK_ID" "$FEDERATION_ATTEMPT""#;
    let execution = run(command, &t, &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&execution.output),
        "DE|pii with spaces|-3|1.5|true|UK,DE,7|0190-test-task|2"
    );
}

#[tokio::test]
async fn a_valid_traceparent_reaches_the_command_and_an_invalid_one_does_not() {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let command = r#"printf '[%s]' "${TRACEPARENT-unset}""#;
    let mut t = task(b"");
    t.traceparent = tp.to_owned();
    let execution = run(command, &t, &limits(), never()).await;
    assert_eq!(
        String::from_utf8_lossy(&execution.output),
        format!("[{tp}]")
    );
    for bad in ["", "00-zz-00f067aa0ba902b7-01", "x\ny"] {
        t.traceparent = bad.to_owned();
        let execution = run(command, &t, &limits(), never()).await;
        assert_eq!(
            String::from_utf8_lossy(&execution.output),
            "[unset]",
            "{bad:?}"
        );
    }
}

#[test]
fn attribute_names_and_values() {
    assert_eq!(
        exec::attribute_env_name("customer_region").as_deref(),
        Some("FEDERATION_ATTR_CUSTOMER_REGION")
    );
    assert_eq!(
        exec::attribute_env_name("data.class-2é").as_deref(),
        Some("FEDERATION_ATTR_DATA_CLASS_2_")
    );
    assert_eq!(exec::attribute_env_name(""), None);
    let nested = value(Kind::ListValue(AttributeList {
        values: vec![
            string("a"),
            value(Kind::ListValue(AttributeList {
                values: vec![value(Kind::BoolValue(false)), string("b")],
            })),
        ],
    }));
    assert_eq!(exec::attribute_text(&nested), "a,[false,b]");
    assert_eq!(exec::attribute_text(&AttributeValue { kind: None }), "");
    // NUL cannot be in an environment; it is dropped rather than failing the
    // spawn.
    let env = exec::attribute_env(&HashMap::from([("k".to_owned(), string("a\0b"))]));
    assert_eq!(env, vec![("FEDERATION_ATTR_K".to_owned(), "ab".to_owned())]);
}

#[tokio::test]
async fn output_is_bounded_and_truncation_is_noted() {
    let limits = ExecLimits {
        max_output: 1000,
        ..limits()
    };
    let command = "head -c 300000 /dev/zero | tr '\\0' a; echo done >&2";
    let execution = run(command, &task(b""), &limits, never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(0));
    assert!(execution.truncated);
    assert_eq!(execution.output_bytes, 300_000);
    assert!(execution.output.len() <= 1000);
    let text = String::from_utf8_lossy(&execution.output);
    assert!(text.starts_with("aaaa"), "{text}");
    assert!(
        text.contains("output truncated: 300000 bytes written"),
        "{text}"
    );
    assert!(text.ends_with(" kept]\n"), "{text}");
    let kept = text.bytes().take_while(|b| *b == b'a').count();
    assert!(text.contains(&format!(", {kept} kept]")), "{text}");
    // The whole output was drained: the writer was not killed by SIGPIPE.
    assert!(execution.report().expect("reported").success);
}

#[tokio::test]
async fn non_zero_exit_fails_with_the_stderr_tail() {
    // 10 000 bytes of stderr, then a recognisable last line.
    let command =
        "head -c 10000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'disk full' >&2; exit 3";
    let execution = run(command, &task(b""), &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(3));
    assert_eq!(execution.stderr_tail.len(), 4096);
    let report = execution.report().expect("reported");
    assert!(!report.success);
    assert_eq!(report.exit_code, 3);
    assert!(
        report.error.starts_with("exit status 3: "),
        "{}",
        report.error
    );
    assert!(report.error.ends_with("disk full"), "{}", report.error);
}

#[tokio::test]
async fn a_missing_command_fails_cleanly() {
    let execution = run("/nonexistent/command-xyz", &task(b""), &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(127));
    let report = execution.report().expect("reported");
    assert!(
        report.error.starts_with("exit status 127"),
        "{}",
        report.error
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    // The shell starts a grandchild that ignores stdin and sleeps, and keeps
    // stdout open; a large payload is never read.
    let command = format!("sleep 300 & echo $! > '{}'; wait", pid_file.display());
    let limits = ExecLimits {
        timeout: Duration::from_millis(500),
        ..limits()
    };
    let payload = vec![b'p'; 1 << 20];
    let execution = run(&command, &task(&payload), &limits, never()).await;
    assert_eq!(
        execution.status,
        ExecStatus::TimedOut(Duration::from_millis(500))
    );
    let report = execution.report().expect("a timeout is reported");
    assert!(!report.success);
    assert_eq!(report.exit_code, -1);
    assert!(
        report.error.starts_with("timed out after 500ms"),
        "{}",
        report.error
    );
    let grandchild = read_pid(&pid_file).await;
    assert!(dies(grandchild).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn lease_loss_kills_the_task_and_drops_the_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let command = format!(
        "echo partial; sleep 300 & echo $! > '{}'; wait",
        pid_file.display()
    );
    let cancel = {
        let pid_file = pid_file.clone();
        async move {
            read_pid(&pid_file).await;
            CancelReason::LeaseLost("FailedPrecondition: leased elsewhere".to_owned())
        }
    };
    let execution = run(&command, &task(b""), &limits(), cancel).await;
    assert_eq!(
        execution.status,
        ExecStatus::Cancelled(CancelReason::LeaseLost(
            "FailedPrecondition: leased elsewhere".to_owned()
        ))
    );
    assert!(
        execution.report().is_none(),
        "a cancelled task is not reported"
    );
    let grandchild = read_pid(&pid_file).await;
    assert!(dies(grandchild).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn background_leftovers_holding_stdout_do_not_block_the_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("pid");
    // The shell exits at once; its background child keeps stdout open.
    let command = format!("sleep 300 & echo $! > '{}'; echo done", pid_file.display());
    let execution = run(&command, &task(b""), &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Exited(0));
    assert_eq!(execution.output, b"done\n");
    let leftover = read_pid(&pid_file).await;
    assert!(dies(leftover).await, "leftover {leftover} survived");
}

#[tokio::test]
async fn a_command_killed_by_a_signal_fails() {
    let execution = run("kill -TERM $$", &task(b""), &limits(), never()).await;
    assert_eq!(execution.status, ExecStatus::Signaled(15));
    let report = execution.report().expect("reported");
    assert!(
        report.error.starts_with("killed by signal 15"),
        "{}",
        report.error
    );
    assert_eq!(report.exit_code, -1);
}
