//! `federation submit|get|status`: a gRPC client for humans and scripts.

use std::process::ExitCode;

/// Arguments of `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {}
/// Arguments of `get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {}
/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

/// `submit`.
pub fn submit(args: SubmitArgs) -> ExitCode {
    let _ = args;
    super::fail(&anyhow::anyhow!("submit is not built yet"), 2)
}
/// `get`.
pub fn get(args: GetArgs) -> ExitCode {
    let _ = args;
    super::fail(&anyhow::anyhow!("get is not built yet"), 2)
}
/// `status`.
pub fn status(args: StatusArgs) -> ExitCode {
    let _ = args;
    super::fail(&anyhow::anyhow!("status is not built yet"), 2)
}
