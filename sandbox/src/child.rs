//! A child process that is killed (SIGKILL) and reaped when its guard is
//! dropped: every process a sandbox or a test starts is held by one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A child process killed (SIGKILL) and reaped when dropped; with
/// [`ChildGuard::spawn_group`], its whole process group.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<std::process::Child>,
    group: bool,
    /// What it is, for messages.
    pub name: String,
}

impl ChildGuard {
    /// Spawns `cmd`.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child: Some(child),
            group: false,
            name: name.to_string(),
        })
    }

    /// Spawns `cmd` as the leader of a new process group; dropping the guard
    /// kills the whole group, so the processes it started die with it even
    /// when it cannot clean up itself (SIGKILL).
    pub fn spawn_group(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        let mut guard = Self::spawn(name, cmd)?;
        guard.group = true;
        Ok(guard)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) with `kill(1)`.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("process not running")?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }

    /// Waits (bounded) for the process to exit by itself; returns its status.
    pub fn wait_timeout(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + patience;
        while Instant::now() < until {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process has exited, without waiting: its status once it
    /// has (the guard then holds no process).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Takes the child's piped stdout (when spawned with `Stdio::piped()`).
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Takes the child's piped stderr (when spawned with `Stdio::piped()`).
    pub fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// Kills and reaps the child now (and its process group, if it leads one).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(format!("-{}", c.id()))
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
