//! `federation demo`: a local federation of the user's example, end to end.

use std::process::ExitCode;

use super::LogFormat;

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub fn run(args: DemoArgs, log: LogFormat) -> ExitCode {
    let _ = (args, log);
    super::fail(&anyhow::anyhow!("demo is not built yet"), 2)
}
