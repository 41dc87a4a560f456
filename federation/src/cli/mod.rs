//! The `federation` command line: one subcommand per job, each in its own
//! module. Parsing lives here; each module's `run` does the work and returns
//! the process exit code.

pub mod audit;
pub mod bundle;
pub mod certs;
pub mod client;
pub mod completions;
pub mod connect;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "demo")]
pub mod demo_ha;
pub mod drill;
pub mod drill_report;
pub mod health;
pub mod output;
pub mod policy;
pub mod replay;
pub mod sd_notify;
pub mod serve;
pub mod snapshot;
pub mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Residency-aware federation controller and its tools.
#[derive(Debug, Parser)]
#[command(name = "federation", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format of the commands that log (serve, agent, demo); given
    /// before the command: `federation --log-format json serve …`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one region's controller.
    Serve(serve::ServeArgs),
    /// Start a local multi-region federation, submit tasks, show where they went and why.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Audit, explain and compare routing policies (no controller needed).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Verify and query the hash-chained decision log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Submit a task to a controller.
    Submit(client::SubmitArgs),
    /// Show a task; `--watch` streams its state changes.
    Get(client::GetArgs),
    /// Cancel a task that has not finished.
    Cancel(client::CancelArgs),
    /// List a controller's own tasks (filter by state, rule, age; paged).
    Tasks(client::TasksArgs),
    /// Show the federation as one controller sees it.
    Status(client::StatusArgs),
    /// Read a running controller's decision log (auditor or operator).
    Decisions(audit::DecisionsArgs),
    /// Stop a region taking new tasks (rolling upgrades); `--wait` until empty.
    ///
    /// With the embedded store the drain is the region's: its new work goes
    /// to the rule's next region and `--wait` lasts until none of its tasks
    /// is leased. On a replica of a region whose store is its PostgreSQL
    /// database, it is that replica's only: its submits and forwards pass to
    /// another replica of the region, it reports NOT_SERVING, its agents
    /// move to another replica, it gives up the region's leadership, and
    /// `--wait` lasts until it has nothing in flight.
    Drain(client::DrainArgs),
    /// Resume taking new tasks after a drain (a replica may lead again).
    Undrain(client::UndrainArgs),
    /// Validate and apply a policy on a running controller (the old one stays on error).
    Reload(client::ReloadArgs),
    /// Failover drill: drain a region, probe every rule and data class, restore, report.
    Drill(Box<drill::DrillArgs>),
    /// Ask a controller's plaintext health port whether it is SERVING (exit 0) or not.
    Health(health::HealthArgs),
    /// Development certificates (mutual TLS).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run a region agent (the same as the `region-agent` binary).
    Agent(region_agent::AgentArgs),
    /// Inspect stored snapshots (decrypts with a key ring).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Write man pages for every command (roff) into a folder.
    Man(completions::ManArgs),
    /// Check, accept or rebuild a stopped controller's task store.
    #[command(subcommand)]
    Store(store::StoreCommand),
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Serve(args) => serve::run(args, cli.log_format),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args, cli.log_format),
        Command::Submit(args) => client::submit(args),
        Command::Get(args) => client::get(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Tasks(args) => client::tasks(args),
        Command::Status(args) => client::status(args),
        Command::Decisions(args) => audit::decisions(args),
        Command::Drain(args) => client::drain(args),
        Command::Undrain(args) => client::undrain(args),
        Command::Reload(args) => client::reload(args),
        Command::Drill(args) => drill::run(*args),
        Command::Health(args) => health::run(args),
        Command::Agent(mut args) => {
            if cli.log_format == LogFormat::Json {
                args.log_format = region_agent::LogFormat::Json;
            }
            region_agent::main_with(args)
        }
        Command::Snapshot(cmd) => snapshot::run(cmd),
        Command::Store(cmd) => store::run(cmd),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Completions(args) => completions::completions(&args),
        Command::Man(args) => completions::man(&args),
    }
}

/// Prints an error chain the way every command does and returns `code`.
pub fn fail(err: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(code)
}
