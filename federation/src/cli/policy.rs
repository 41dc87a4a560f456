//! `federation policy check|explain|diff`: the auditor's tools.

use std::path::PathBuf;
use std::process::ExitCode;

use super::OutputFormat;

/// Policy subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Statically audit a policy: exit 0 no errors, 1 error findings, 2 unusable file.
    Check {
        /// The federation file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
}

/// Runs a policy subcommand.
pub fn run(cmd: PolicyCommand) -> ExitCode {
    let _ = cmd;
    super::fail(&anyhow::anyhow!("policy commands are not built yet"), 2)
}
