//! `federation audit verify|show`: the decision log for auditors.

use std::path::PathBuf;
use std::process::ExitCode;

/// Audit subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; names the first broken record.
    Verify {
        /// The controller's data directory (or the log file).
        dir: PathBuf,
    },
}

/// Runs an audit subcommand.
pub fn run(cmd: AuditCommand) -> ExitCode {
    let _ = cmd;
    super::fail(&anyhow::anyhow!("audit commands are not built yet"), 2)
}
