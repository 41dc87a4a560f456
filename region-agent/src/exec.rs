//! Running one task as a child process: `sh -c CMD` with the payload on
//! stdin, the attributes in the environment, stdout captured (bounded) as the
//! result and the tail of stderr kept for the error text.
//!
//! The child runs in its own process group, so a timeout or a cancellation
//! kills the whole group (the shell and anything it started), not just the
//! shell.

use std::collections::HashMap;
use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use federation_api::{AttributeValue, Task, attribute_value::Kind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

/// Prefix of the environment variables that carry a task's attributes.
pub const ATTR_ENV_PREFIX: &str = "FEDERATION_ATTR_";
/// Environment variable that carries the task id.
pub const TASK_ID_ENV: &str = "FEDERATION_TASK_ID";
/// Environment variable that carries the attempt number (1 on the first lease).
pub const ATTEMPT_ENV: &str = "FEDERATION_ATTEMPT";

/// Limits applied to one execution.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    /// The process group is killed when the command runs longer than this.
    pub timeout: Duration,
    /// Most stdout bytes kept as the result (the rest is read and dropped).
    pub max_output: usize,
    /// How many trailing stderr bytes are kept for the error text.
    pub stderr_tail: usize,
    /// After the command exits, how long to wait for its stdout/stderr to
    /// close (a background process may hold them open) before killing what is
    /// left of its process group.
    pub output_drain: Duration,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            max_output: 64 * 1024,
            stderr_tail: 4 * 1024,
            output_drain: Duration::from_secs(2),
        }
    }
}

/// Why a running task was stopped before it finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// The controller says the lease is gone (cancelled, taken over, re-leased).
    LeaseLost(String),
    /// The controller listed the task in a heartbeat's revoked ids.
    Revoked,
    /// The agent is shutting down and the grace period ran out.
    Shutdown,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseLost(why) => write!(f, "lease lost: {why}"),
            Self::Revoked => f.write_str("revoked by the controller"),
            Self::Shutdown => f.write_str("agent shutting down"),
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecStatus {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal (not by the agent).
    Signaled(i32),
    /// The agent killed the command at the timeout.
    TimedOut(Duration),
    /// The agent killed the command because the task was cancelled; nothing
    /// is reported.
    Cancelled(CancelReason),
    /// The command could not be started.
    SpawnFailed(String),
}

/// The outcome of running one task.
#[derive(Debug, Clone)]
pub struct Execution {
    /// How it ended.
    pub status: ExecStatus,
    /// The result: stdout, at most `max_output` bytes, ending with a
    /// truncation note when stdout was longer.
    pub output: Vec<u8>,
    /// How many bytes the command wrote to stdout in all.
    pub output_bytes: u64,
    /// True when stdout was longer than `max_output`.
    pub truncated: bool,
    /// The last `stderr_tail` bytes of stderr.
    pub stderr_tail: Vec<u8>,
    /// Wall-clock run time.
    pub elapsed: Duration,
}

/// What to tell the controller about an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// True when the command exited 0.
    pub success: bool,
    /// The captured output.
    pub result: Vec<u8>,
    /// Why it failed, empty on success.
    pub error: String,
    /// Exit code, -1 when killed or not started.
    pub exit_code: i32,
}

impl Execution {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == ExecStatus::Exited(0)
    }

    /// The stderr tail as text (lossy UTF-8, trimmed).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr_tail).trim().to_owned()
    }

    /// The report for the controller, or `None` when the task was cancelled
    /// (its result is dropped).
    pub fn report(&self) -> Option<Report> {
        let with_tail = |head: String| {
            let tail = self.stderr_text();
            if tail.is_empty() {
                head
            } else {
                format!("{head}: {tail}")
            }
        };
        let (error, exit_code) = match &self.status {
            ExecStatus::Cancelled(_) => return None,
            ExecStatus::Exited(0) => (String::new(), 0),
            ExecStatus::Exited(code) => (with_tail(format!("exit status {code}")), *code),
            ExecStatus::Signaled(signal) => (with_tail(format!("killed by signal {signal}")), -1),
            ExecStatus::TimedOut(after) => (
                with_tail(format!(
                    "timed out after {}",
                    humantime::format_duration(*after)
                )),
                -1,
            ),
            ExecStatus::SpawnFailed(why) => (format!("failed to start the command: {why}"), -1),
        };
        Some(Report {
            success: self.success(),
            result: self.output.clone(),
            error,
            exit_code,
        })
    }
}

/// Renders an attribute value as environment text: strings raw, numbers and
/// booleans as text, lists comma-joined (nested lists in brackets).
pub fn attribute_text(value: &AttributeValue) -> String {
    fn render(kind: Option<&Kind>, nested: bool) -> String {
        match kind {
            None => String::new(),
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::IntValue(i)) => i.to_string(),
            Some(Kind::DoubleValue(d)) => d.to_string(),
            Some(Kind::BoolValue(b)) => b.to_string(),
            Some(Kind::ListValue(list)) => {
                let inner = list
                    .values
                    .iter()
                    .map(|v| render(v.kind.as_ref(), true))
                    .collect::<Vec<_>>()
                    .join(",");
                if nested { format!("[{inner}]") } else { inner }
            }
        }
    }
    render(value.kind.as_ref(), false)
}

/// The environment variable name for an attribute key: `FEDERATION_ATTR_`
/// plus the key uppercased, every character other than an ASCII letter or
/// digit replaced by `_`. `None` for an empty key.
pub fn attribute_env_name(key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let mut name = String::with_capacity(ATTR_ENV_PREFIX.len() + key.len());
    name.push_str(ATTR_ENV_PREFIX);
    name.extend(key.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    Some(name)
}

/// The attribute environment of a task, sorted by variable name. When two
/// keys map to the same name the one whose key sorts last wins; NUL
/// characters (which no environment can hold) are dropped.
pub fn attribute_env(attributes: &HashMap<String, AttributeValue>) -> Vec<(String, String)> {
    let mut keys: Vec<&String> = attributes.keys().collect();
    keys.sort();
    let mut env: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for key in keys {
        let (Some(name), Some(value)) = (attribute_env_name(key), attributes.get(key)) else {
            continue;
        };
        let text: String = attribute_text(value)
            .chars()
            .filter(|&c| c != '\0')
            .collect();
        if env.insert(name.clone(), text).is_some() {
            tracing::warn!(attribute = %key, variable = %name, "attribute name collides with another; the later key wins");
        }
    }
    env.into_iter().collect()
}

fn task_env(task: &Task) -> Vec<(String, String)> {
    let mut env = attribute_env(&task.attributes);
    env.push((
        TASK_ID_ENV.to_owned(),
        task.task_id.chars().filter(|&c| c != '\0').collect(),
    ));
    env.push((ATTEMPT_ENV.to_owned(), task.attempts.to_string()));
    // Only a well-formed trace context; anything else is dropped.
    if let Some(tp) = federation_trace::TraceParent::parse(&task.traceparent) {
        env.push((federation_trace::ENV.to_owned(), tp.to_string()));
    }
    env
}

/// Runs `command` through `sh -c` for `task` until it exits, times out or
/// `cancel` resolves; never panics on anything the process does.
pub async fn execute(
    command: &str,
    task: &Task,
    limits: &ExecLimits,
    cancel: impl Future<Output = CancelReason>,
) -> Execution {
    let started = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // The task sees only its own FEDERATION_* variables, not the agent's.
    // Nor the agent's own trace context: a task has its own, or none.
    cmd.env_remove(federation_trace::ENV)
        .env_remove("TRACESTATE");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FEDERATION_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(task_env(task));

    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            return Execution {
                status: ExecStatus::SpawnFailed(err.to_string()),
                output: Vec::new(),
                output_bytes: 0,
                truncated: false,
                stderr_tail: Vec::new(),
                elapsed: started.elapsed(),
            };
        }
    };
    // The group id equals the leader's pid (process_group(0)).
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stdin_writer = child.stdin.take().map(|mut stdin| {
        let payload = task.payload.clone();
        tokio::spawn(async move {
            // A command that does not read its stdin closes the pipe early;
            // that is not an error.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        })
    });
    let stdout_reader = child.stdout.take().map(|out| {
        let max = limits.max_output;
        let stop = stop_rx.clone();
        tokio::spawn(async move { read_bounded(out, max, stop).await })
    });
    let stderr_reader = child.stderr.take().map(|err| {
        let tail = limits.stderr_tail;
        let stop = stop_rx.clone();
        tokio::spawn(async move { read_tail(err, tail, stop).await })
    });

    let status = tokio::select! {
        waited = child.wait() => match waited {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => ExecStatus::Exited(code),
                (None, Some(signal)) => ExecStatus::Signaled(signal),
                (None, None) => ExecStatus::Exited(-1),
            },
            Err(err) => {
                kill(group, &mut child).await;
                ExecStatus::SpawnFailed(format!("waiting for the command failed: {err}"))
            }
        },
        () = tokio::time::sleep(limits.timeout) => {
            kill(group, &mut child).await;
            ExecStatus::TimedOut(limits.timeout)
        }
        reason = cancel => {
            kill(group, &mut child).await;
            ExecStatus::Cancelled(reason)
        }
    };

    if let Some(writer) = stdin_writer {
        writer.abort();
    }
    // Wait for the pipes to close; a leftover background process that keeps
    // them open is killed with the rest of the group after `output_drain`.
    let mut out = (Vec::new(), 0u64);
    let mut err_tail = Vec::new();
    let deadline = tokio::time::Instant::now() + limits.output_drain;
    let mut stop_sent = false;
    if let Some(mut reader) = stdout_reader {
        out = match tokio::time::timeout_at(deadline, &mut reader).await {
            Ok(joined) => joined.unwrap_or_default(),
            Err(_) => {
                stop_stragglers(group, &stop_tx, &mut stop_sent);
                reader.await.unwrap_or_default()
            }
        };
    }
    if let Some(mut reader) = stderr_reader {
        err_tail = match tokio::time::timeout_at(deadline, &mut reader).await {
            Ok(joined) => joined.unwrap_or_default(),
            Err(_) => {
                stop_stragglers(group, &stop_tx, &mut stop_sent);
                reader.await.unwrap_or_default()
            }
        };
    }

    let (mut output, output_bytes) = out;
    let truncated = output_bytes > output.len() as u64;
    if truncated {
        add_truncation_note(&mut output, limits.max_output, output_bytes);
    }
    Execution {
        status,
        output,
        output_bytes,
        truncated,
        stderr_tail: err_tail,
        elapsed: started.elapsed(),
    }
}

/// Kills what is left of the group after the leader exited and stops the
/// readers.
fn stop_stragglers(
    group: Option<rustix::process::Pid>,
    stop: &watch::Sender<bool>,
    stop_sent: &mut bool,
) {
    if *stop_sent {
        return;
    }
    *stop_sent = true;
    if let Some(group) = group {
        // The group cannot have been reused while a member still holds our
        // pipes open; ESRCH just means nothing is left.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = stop.send(true);
}

/// Kills the whole process group, then the leader, and reaps the leader.
async fn kill(group: Option<rustix::process::Pid>, child: &mut tokio::process::Child) {
    if let Some(group) = group {
        // The leader is not reaped yet, so the group id is still ours.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill().await;
}

/// Replaces the end of `output` (already `max` bytes or fewer) with a note so
/// that the whole stays within `max` bytes.
fn add_truncation_note(output: &mut Vec<u8>, max: usize, total: u64) {
    let note = |kept: usize| {
        format!("\n[region-agent: output truncated: {total} bytes written, {kept} kept]\n")
    };
    // The note's length depends on the number it names; two rounds settle it
    // (the number only shrinks).
    let mut kept = max.min(output.len());
    for _ in 0..2 {
        kept = max.saturating_sub(note(kept).len()).min(output.len());
    }
    let text = note(kept);
    if kept == 0 || kept + text.len() > max {
        output.truncate(max);
        return;
    }
    output.truncate(kept);
    output.extend_from_slice(text.as_bytes());
}

/// Reads `reader` to the end, keeping the first `max` bytes; returns them and
/// the total byte count. Stops early when `stop` turns true.
async fn read_bounded<R: AsyncRead + Unpin>(
    mut reader: R,
    max: usize,
    mut stop: watch::Receiver<bool>,
) -> (Vec<u8>, u64) {
    let mut kept = Vec::with_capacity(max.min(64 * 1024));
    let mut total = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buf) => read,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                total = total.saturating_add(n as u64);
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (kept, total)
}

/// Reads `reader` to the end, keeping only the last `tail` bytes. Stops early
/// when `stop` turns true.
async fn read_tail<R: AsyncRead + Unpin>(
    mut reader: R,
    tail: usize,
    mut stop: watch::Receiver<bool>,
) -> Vec<u8> {
    let mut kept: Vec<u8> = Vec::with_capacity(tail.min(64 * 1024) * 2);
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buf) => read,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > tail.saturating_mul(2).max(buf.len()) {
                    let excess = kept.len() - tail;
                    kept.drain(..excess);
                }
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if kept.len() > tail {
        let excess = kept.len() - tail;
        kept.drain(..excess);
    }
    kept
}
