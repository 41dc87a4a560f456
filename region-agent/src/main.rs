//! `region-agent` binary.
#![forbid(unsafe_code)]

use clap::Parser;

/// Region agent: leases tasks from its region's controller and runs them.
#[derive(Debug, Parser)]
#[command(name = "region-agent", version, about)]
struct Cli {
    #[command(flatten)]
    args: region_agent::AgentArgs,
}

fn main() -> std::process::ExitCode {
    region_agent::main_with(Cli::parse().args)
}
