//! Scenario steps that tests would otherwise repeat: start a sandbox and wait
//! until the federation has formed, kill a region and wait until a peer has
//! declared it dead, restart it and wait until it is alive again. Each wait
//! is bounded by the patience given and fails with what was last seen and
//! the controllers' last log lines; a controller that exits while the
//! federation forms fails at once with its exit status.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::federation::{Sandbox, SandboxBuilder};

impl SandboxBuilder {
    /// Starts every region's controller and agents ([`SandboxBuilder::start`])
    /// and waits (at most `patience`) until every controller sees every
    /// other region alive. On an error the sandbox is dropped, so its
    /// processes are gone.
    pub async fn start_formed(self, patience: Duration) -> anyhow::Result<Sandbox> {
        let mut sandbox = self.start()?;
        sandbox.wait_formed(patience).await?;
        Ok(sandbox)
    }
}

impl Sandbox {
    /// Waits (at most `patience`) until every running controller, each
    /// replica of a region included, sees every other region alive; fails
    /// at once if a controller has exited.
    pub async fn wait_formed(&mut self, patience: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + patience;
        let names = self.region_names();
        for viewer in &names {
            let expect: Vec<(&str, &str)> = names
                .iter()
                .filter(|n| *n != viewer)
                .map(|n| (n.as_str(), "alive"))
                .collect();
            for index in 0..self.replica_count(viewer) {
                loop {
                    self.check_running(&names)?;
                    let left = until.saturating_duration_since(Instant::now());
                    let step = left.min(Duration::from_millis(500));
                    match self
                        .wait_for_replica_states(viewer, index, &expect, step)
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if Instant::now() >= until => {
                            return Err(e.context(format!(
                                "the federation did not form within {patience:?}"
                            )));
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails naming the first of `names` whose controller has exited.
    fn check_running(&mut self, names: &[String]) -> anyhow::Result<()> {
        for name in names {
            let status = match self.controller(name) {
                Ok(c) => c.exited(),
                Err(_) => continue, // not started, or killed on purpose
            };
            if let Some(status) = status {
                bail!(
                    "{name}'s controller exited ({status}) before the federation formed{}",
                    self.log_tails([name.as_str()].into_iter())
                );
            }
        }
        Ok(())
    }

    /// SIGKILLs `region`'s controller and waits (at most `patience`) until
    /// `seen_by`'s controller declares it dead.
    pub async fn kill_and_wait_dead(
        &mut self,
        region: &str,
        seen_by: &str,
        patience: Duration,
    ) -> anyhow::Result<()> {
        self.region_names()
            .iter()
            .any(|n| n == region)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("no region `{region}` in the sandbox"))?;
        self.kill_controller(region)?;
        self.wait_for_states(seen_by, &[(region, "dead")], patience)
            .await
    }

    /// Starts `region`'s controller again (same port and data) and waits (at
    /// most `patience`) until `seen_by`'s controller sees it alive.
    pub async fn restart_and_wait_alive(
        &mut self,
        region: &str,
        seen_by: &str,
        patience: Duration,
    ) -> anyhow::Result<()> {
        self.start_controller(region)?;
        self.wait_for_states(seen_by, &[(region, "alive")], patience)
            .await
    }
}
