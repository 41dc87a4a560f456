//! `federation serve`: runs one region's controller.

use std::path::PathBuf;
use std::process::ExitCode;

use super::LogFormat;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The federation file.
    #[arg(long)]
    pub config: PathBuf,
    /// Optional node file layered over it.
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// The region to serve (overrides node.region).
    #[arg(long)]
    pub region: Option<String>,
}

/// Runs the controller until SIGTERM/SIGINT.
pub fn run(args: ServeArgs, log: LogFormat) -> ExitCode {
    let _ = (args, log);
    super::fail(&anyhow::anyhow!("serve is not built yet"), 2)
}
