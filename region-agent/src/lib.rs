//! The region agent: registers with its region's controller, heartbeats its
//! capacity, leases tasks, runs each as a child process and reports results.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// Command-line arguments of the agent (shared by `region-agent` and
/// `federation agent`).
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The controller's gRPC address, for example http://127.0.0.1:7000.
    #[arg(long)]
    pub controller: String,
}

/// Runs the agent from parsed arguments until SIGTERM/SIGINT.
pub fn main_with(args: AgentArgs) -> ExitCode {
    let _ = args;
    eprintln!("error: the agent is not built yet");
    ExitCode::from(2)
}
