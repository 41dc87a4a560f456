//! The region agent: registers with its region's controller, heartbeats its
//! capacity, leases tasks, runs each as a child process and reports results.
//!
//! # Execution contract for task authors
//!
//! The agent runs `--exec CMD` once per leased task as `sh -c CMD`, in its own
//! process group, with the agent's working directory and environment plus:
//!
//! * **stdin**: the task's payload, byte for byte, then end of file. A command
//!   need not read it.
//! * **environment**:
//!   * `FEDERATION_TASK_ID`: the task's id.
//!   * `FEDERATION_ATTEMPT`: how many times the task has been leased so far
//!     (1 on the first run; higher means an earlier run may have happened).
//!   * `TRACEPARENT`: the W3C trace context of the task's run (the agent's
//!     `run_task` span when the agent exports spans, else the task's own
//!     context from the controller), when the task has one; the agent's own
//!     `TRACEPARENT` and `TRACESTATE` are removed. A command that traces
//!     makes its spans children of it.
//!   * `FEDERATION_ATTR_<KEY>` for each attribute: the key uppercased, every
//!     character other than an ASCII letter or digit replaced by `_`
//!     (`customer_region` → `FEDERATION_ATTR_CUSTOMER_REGION`). Strings are
//!     passed raw, integers, doubles and booleans as text (`42`, `1.5`,
//!     `true`), lists comma-joined (`UK,DE,FR`; a nested list in brackets).
//!     Two keys that map to the same name: the key that sorts last wins.
//!   * Every other `FEDERATION_*` variable of the agent's own environment is
//!     removed.
//! * **result**: exit status 0 means success; the result is what the command
//!   wrote to stdout, at most `--max-output` bytes (default 64 KiB). Longer
//!   output is read to the end and dropped, and the kept part ends with a
//!   `[region-agent: output truncated: …]` note (the whole stays within the
//!   limit).
//! * **failure**: a non-zero exit reports `exit status N: <stderr tail>` (the
//!   last 4 KiB of stderr); death by a signal reports `killed by signal N`; a
//!   command that cannot start reports why. Failures are reported once: the
//!   agent does not retry a command that failed.
//! * **timeout**: a command still running after `--task-timeout` (default 5m)
//!   has its whole process group killed (SIGKILL) and the task fails with
//!   `timed out after …`.
//! * **cancellation**: when the controller says the lease is gone (the task
//!   was cancelled, taken over by another region, or its lease expired and it
//!   was leased elsewhere) or revokes it, the process group is killed and
//!   nothing is reported.
//! * **background processes**: after the command exits, anything it left
//!   running that still holds its stdout or stderr open is killed after two
//!   seconds.
//!
//! **Execution is at-least-once.** A task is leased for a limited time (the
//! controller's lease TTL) and the agent renews the lease while the command
//! runs. If the agent dies, loses its controller for longer than the TTL, or
//! is shut down past its grace period, the lease expires and the task runs
//! again, on this agent or another. A command may therefore run more than
//! once for the same `FEDERATION_TASK_ID`, even concurrently with a run whose
//! result will be dropped: **commands must be idempotent** (key any side
//! effect by the task id).
//!
//! # Running in-process
//!
//! [`run`] runs an agent until the `shutdown` future resolves, then stops
//! leasing, lets running tasks finish within [`AgentConfig::shutdown_grace`],
//! reports them and returns an [`AgentReport`].
#![forbid(unsafe_code)]

mod agent;
pub mod exec;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

pub use exec::{CancelReason, ExecLimits, ExecStatus, Execution};

/// Command-line arguments of the agent (shared by `region-agent` and
/// `federation agent`).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The controller's gRPC address: host:port (a http:// or https://
    /// scheme is allowed; TLS follows --ca / --insecure). Several addresses,
    /// comma-separated, are the replicas of one region: the agent uses one
    /// at a time and moves to the next when its replica drains or stops
    /// answering (its id and leases go with it).
    #[arg(long, env = "FEDERATION_ADDR", value_name = "ADDR[,ADDR…]")]
    pub controller: String,
    /// The region this agent serves; the controller refuses a mismatch.
    #[arg(long)]
    pub region: Option<String>,
    /// How many tasks to run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub slots: u32,
    /// The command run for each task, through `sh -c`.
    #[arg(long = "exec", value_name = "CMD")]
    pub exec: String,
    /// The agent's name in the controller's logs (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Kill a task's command after this long (for example 30s, 5m, 1h).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub task_timeout: Duration,
    /// Most stdout bytes kept as a task's result.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_output: usize,
    /// How long one lease request waits for a task (long poll).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_wait: Duration,
    /// On SIGTERM/SIGINT, how long running tasks may take to finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// The federation CA (PEM): talk mutual TLS to the controller, whose
    /// certificate must name `--region` (any region when not given).
    #[arg(long, env = "FEDERATION_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// The agent's certificate (`spiffe://<fed>/agent/<region>/<name>`).
    #[arg(long, env = "FEDERATION_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The agent certificate's private key.
    #[arg(long, env = "FEDERATION_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// A bearer token (role agent) instead of a certificate.
    #[arg(long, env = "FEDERATION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Plaintext without authentication (development only).
    /// The CA and certificate (say from FEDERATION_CA…) are then not used.
    #[arg(long)]
    pub insecure: bool,
    /// Export the agent's spans (lease, run, report) to this OTLP/gRPC
    /// collector, `http://host:port`; off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format on stderr: text (colours only on a terminal) or JSON
    /// lines whose fields are plain values.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How the agent writes its log lines (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How the agent authenticates to its controller.
#[derive(Debug, Clone, Default)]
pub struct AgentTls {
    /// The federation CA; `None` means plaintext (`--insecure`).
    pub ca: Option<std::path::PathBuf>,
    /// Certificate and key.
    pub cert_key: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Bearer token.
    pub token: Option<String>,
}

/// Everything an agent needs to run; build one from [`AgentArgs`] or with
/// [`AgentConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The controller's gRPC address (http://host:port), or the addresses
    /// of a region's replicas, comma-separated ([`AgentConfig::controllers`]).
    pub controller: String,
    /// The region sent in Register (empty: let the controller decide).
    pub region: Option<String>,
    /// The agent's name.
    pub name: String,
    /// Tasks run at once.
    pub slots: u32,
    /// The command, run through `sh -c`.
    pub command: String,
    /// Per-task limits (timeout, output bound).
    pub limits: ExecLimits,
    /// Long-poll wait of one LeaseTasks call.
    pub lease_wait: Duration,
    /// How long running tasks may take to finish after shutdown is asked.
    pub shutdown_grace: Duration,
    /// Give up registering after this long (None: retry until shutdown).
    pub register_timeout: Option<Duration>,
    /// Cap of the retry backoff while the controller is unreachable.
    pub max_backoff: Duration,
    /// How long to keep retrying a CompleteTask while the controller is
    /// unavailable before giving up (the lease then expires and the task is
    /// re-run elsewhere).
    pub complete_retry_for: Duration,
    /// Deadline of one unary call (Register, Heartbeat, RenewLease,
    /// CompleteTask); LeaseTasks gets `lease_wait` on top.
    pub rpc_timeout: Duration,
    /// TLS and credentials (default: plaintext, no credentials).
    pub tls: AgentTls,
}

impl AgentConfig {
    /// A configuration with the command-line defaults.
    pub fn new(controller: impl Into<String>, command: impl Into<String>) -> Self {
        Self {
            controller: controller.into(),
            region: None,
            name: default_name(),
            slots: 1,
            command: command.into(),
            limits: ExecLimits::default(),
            lease_wait: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            register_timeout: None,
            max_backoff: Duration::from_secs(5),
            complete_retry_for: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(10),
            tls: AgentTls::default(),
        }
    }

    /// The controller addresses: the region's replicas, in the order tried.
    pub fn controllers(&self) -> Vec<String> {
        self.controller
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks the values that the command line does not already bound.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |what: &str| Err(AgentError::Config(what.to_owned()));
        if self.command.trim().is_empty() {
            return bad("--exec must name a command");
        }
        if self.slots == 0 {
            return bad("--slots must be at least 1");
        }
        if self.limits.timeout.is_zero() {
            return bad("--task-timeout must be positive");
        }
        if self.rpc_timeout.is_zero() || self.max_backoff.is_zero() {
            return bad("rpc_timeout and max_backoff must be positive");
        }
        let controllers = self.controllers();
        if controllers.is_empty() {
            return bad("--controller must name an address");
        }
        for controller in &controllers {
            let address = federation_tls::Address::parse(controller)
                .map_err(|e| AgentError::Config(format!("--controller {e}")))?;
            if self.tls.ca.is_none() && address.scheme() == Some("https") {
                return Err(AgentError::Config(format!(
                    "--controller {controller}: https:// asks for TLS, but no --ca was given (plaintext)"
                )));
            }
        }
        Ok(())
    }
}

impl From<AgentArgs> for AgentConfig {
    fn from(args: AgentArgs) -> Self {
        let mut config = Self::new(args.controller, args.exec);
        config.region = args.region.filter(|r| !r.is_empty());
        if let Some(name) = args.name.filter(|n| !n.is_empty()) {
            config.name = name;
        }
        config.slots = args.slots;
        config.limits.timeout = args.task_timeout;
        config.limits.max_output = args.max_output;
        config.lease_wait = args.lease_wait;
        config.shutdown_grace = args.shutdown_grace;
        // --insecure wins over credentials exported for the client
        // commands (FEDERATION_CA…): plaintext, a token only.
        config.tls = if args.insecure {
            AgentTls {
                ca: None,
                cert_key: None,
                token: args.token,
            }
        } else {
            AgentTls {
                ca: args.ca,
                cert_key: args.cert.zip(args.key),
                token: args.token,
            }
        };
        config
    }
}

/// The host name, or `agent-<pid>` when it cannot be read.
pub fn default_name() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(host) if !host.is_empty() && host != "(none)" => host.to_owned(),
        _ => format!("agent-{}", std::process::id()),
    }
}

/// What an agent did, returned by [`run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// The agent id of the last registration (empty if it never registered).
    pub agent_id: String,
    /// How many times the agent registered (more than 1 after a controller
    /// restart).
    pub registrations: u64,
    /// Tasks leased.
    pub leased: u64,
    /// Tasks reported as succeeded and accepted by the controller.
    pub succeeded: u64,
    /// Tasks reported as failed and accepted by the controller.
    pub failed: u64,
    /// Tasks whose lease was lost or revoked (killed, or result refused).
    pub lost: u64,
    /// Tasks whose outcome could not be reported (controller unreachable, or
    /// killed at the end of the shutdown grace); their leases expire and they
    /// run again elsewhere.
    pub unreported: u64,
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The controller address does not parse.
    #[error("invalid controller address {address:?}: {source}")]
    Address {
        /// The address as given.
        address: String,
        /// Why it is invalid.
        source: tonic::transport::Error,
    },
    /// The controller refused the registration (for example a region
    /// mismatch); retrying would not help.
    #[error("controller {controller} refused the registration ({code:?}): {message}")]
    Rejected {
        /// The controller's address.
        controller: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The controller's message.
        message: String,
    },
    /// The controller stayed unreachable for `register_timeout`.
    #[error("controller {controller} unreachable after {attempts} attempts: {last_error}")]
    Unreachable {
        /// The controller's address.
        controller: String,
        /// Registration attempts made.
        attempts: u64,
        /// The last error seen.
        last_error: String,
    },
    /// The controller answered with something unusable.
    #[error("controller {controller} sent an invalid response: {message}")]
    Protocol {
        /// The controller's address.
        controller: String,
        /// What was wrong.
        message: String,
    },
}

/// Runs an agent until `shutdown` resolves: registers (retrying while the
/// controller is unreachable), heartbeats, leases and runs tasks. On shutdown
/// it stops leasing, lets running tasks finish within
/// [`AgentConfig::shutdown_grace`], reports them and returns what it did.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<AgentReport, AgentError> {
    agent::run(config, shutdown).await
}

/// Runs the agent from parsed arguments until SIGTERM/SIGINT; a second signal
/// stops at once, killing running tasks.
pub fn main_with(args: AgentArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let otlp = args
        .otlp_endpoint
        .as_ref()
        .filter(|e| !e.is_empty())
        .map(|endpoint| federation_trace::Otlp {
            endpoint: endpoint.clone(),
            service: "region-agent".to_owned(),
            attributes: args
                .region
                .iter()
                .map(|r| ("federation.region".to_owned(), r.clone()))
                .chain(
                    args.name
                        .iter()
                        .map(|n| ("agent.name".to_owned(), n.clone())),
                )
                .collect(),
        });
    let exporter = {
        // The exporter's channel lives on the runtime.
        let _context = runtime.enter();
        match init_tracing(args.log_format, otlp.as_ref()) {
            Ok(exporter) => exporter,
            Err(err) => {
                eprintln!("error: --otlp-endpoint: {err}");
                return ExitCode::from(2);
            }
        }
    };
    let code = run_main(args, &runtime);
    // Outside the workers, while the runtime still carries the channel.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    code
}

fn run_main(args: AgentArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if args.ca.is_none() && !args.insecure {
        eprintln!(
            "error: tls is required: pass --ca (with --cert/--key or --token), or --insecure for plaintext"
        );
        return ExitCode::from(2);
    }
    if args.insecure {
        tracing::warn!("--insecure: talking plaintext gRPC to the controller, without credentials");
    }
    let config = AgentConfig::from(args);
    if let Err(err) = config.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    runtime.block_on(async move {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(name) => tracing::info!(signal = name, "shutdown requested"),
                Err(err) => {
                    tracing::error!(error = %err, "cannot listen for signals");
                    return false;
                }
            }
            let _ = first_tx.send(());
            match wait_for_signal().await {
                Ok(name) => {
                    tracing::warn!(signal = name, "second signal, stopping now");
                    true
                }
                Err(_) => false,
            }
        });
        let abort_signals = signals.abort_handle();
        let shutdown = async move {
            let _ = first_rx.await;
        };
        tokio::select! {
            result = run(config, shutdown) => {
                abort_signals.abort();
                match result {
                    Ok(_report) => {
                        ExitCode::SUCCESS
                    }
                    Err(err) => {
                        eprintln!("error: {err}");
                        ExitCode::from(1)
                    }
                }
            }
            _ = signals_second(signals) => ExitCode::from(130),
        }
    })
}

/// Resolves when the signal task ends after a second signal.
async fn signals_second(handle: tokio::task::JoinHandle<bool>) {
    if let Ok(true) = handle.await {
        return;
    }
    // The listener failed: only the agent's own end stops it.
    std::future::pending::<()>().await;
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Logs on stderr (`RUST_LOG`, default info) as `format`, spans to `otlp`
/// when given. Another subscriber may already be installed (tests, an
/// embedding binary); it is kept.
fn init_tracing(
    format: LogFormat,
    otlp: Option<&federation_trace::Otlp>,
) -> Result<Option<federation_trace::Exporter>, federation_trace::TraceError> {
    let format = match format {
        LogFormat::Json => federation_trace::LogFormat::Json,
        // Colours only for a terminal: log files and journald get plain text.
        LogFormat::Text => federation_trace::LogFormat::Text {
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        },
    };
    federation_trace::init(format, otlp)
}
