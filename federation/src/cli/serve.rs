//! `federation serve`: runs one region's controller until SIGTERM/SIGINT;
//! SIGHUP (or, with `node.timers.policy_poll`, a change of the file's
//! content) reloads the policy from the federation file. Under systemd
//! (`Type=notify`) it reports READY=1 when the health status turns SERVING
//! and STOPPING=1 when shutdown begins.
//!
//! Start-up order: umask 0077 (everything created is owner-only),
//! configuration read (exit 64 when unusable), logging and span export
//! (`node.tracing`), settings, bind, open the state (exit 65 when the task
//! store is damaged or lost acknowledged work), serve. Settings come from
//! [`Settings::resolve`]; the library ([`crate::runtime`]) takes the bound
//! listeners, a shutdown future and the reload hook; only this binary
//! touches signals and addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::LogFormat;
use crate::config;
use crate::settings::{Addresses, Overrides, Settings};

/// Exit status for an unusable configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// The task store is damaged or lost acknowledged work (EX_DATAERR).
pub const EXIT_STORE: u8 = 65;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The federation file (YAML, TOML or JSON).
    #[arg(long)]
    pub config: PathBuf,
    /// Optional node file layered over it (`node:` section).
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// The region to serve (overrides node.region).
    #[arg(long)]
    pub region: Option<String>,
    /// Address to listen on (overrides node.listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address for /metrics and the status page (overrides node.admin_listen).
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Plaintext gRPC health-only address for probes that cannot speak TLS
    /// (overrides node.health_listen).
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Data directory (overrides node.data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Peer endpoint override, REGION=URL (repeatable; overrides node.peers).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Serve plaintext gRPC without authentication (development only; logs
    /// a warning). Without it, `node.tls` (ca, cert, key) is required.
    #[arg(long)]
    pub insecure: bool,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    let (region, url) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected REGION=URL"))?;
    Ok((region.to_string(), url.to_string()))
}

/// Installs the tracing subscriber (RUST_LOG filters; default info) without
/// span export.
pub fn init_tracing(log: LogFormat) {
    let _ = init_tracing_with(log, None);
}

/// Installs the tracing subscriber, exporting spans to `otlp` when given
/// (call inside the runtime's context then: the exporter's channel lives on
/// it).
pub fn init_tracing_with(
    log: LogFormat,
    otlp: Option<&federation_trace::Otlp>,
) -> Result<Option<federation_trace::Exporter>, federation_trace::TraceError> {
    // Colours only for a terminal: log files and journald get plain text.
    let format = match log {
        LogFormat::Json => federation_trace::LogFormat::Json,
        LogFormat::Text => federation_trace::LogFormat::Text {
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        },
    };
    federation_trace::init(format, otlp)
}

/// The span exporter `node.tracing` asks for (none when unset).
pub fn otlp_of(loaded: &config::Loaded, region: Option<&str>) -> Option<federation_trace::Otlp> {
    let endpoint = loaded.file.node.tracing.otlp_endpoint.clone()?;
    Some(federation_trace::Otlp {
        endpoint,
        service: "federation".to_string(),
        attributes: region
            .map(|r| vec![("federation.region".to_string(), r.to_string())])
            .unwrap_or_default(),
    })
}

/// Reads the configuration files and environment that `serve` uses.
pub fn load(args: &ServeArgs) -> anyhow::Result<config::Loaded> {
    Ok(config::load(&config::Sources {
        federation_file: args.config.clone(),
        node_file: args.node_config.clone(),
        env: None,
    })?)
}

impl ServeArgs {
    /// What these flags override of the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            node_config: self.node_config.clone(),
            region: self.region.clone(),
            listen: self.listen,
            admin_listen: self.admin_listen,
            health_listen: self.health_listen,
            data_dir: self.data_dir.clone(),
            peers: self.peers.clone(),
            insecure: self.insecure,
        }
    }
}

/// Runs the controller until SIGTERM/SIGINT.
///
/// The configuration is read before the subscriber is installed, because
/// `node.tracing` decides whether spans are exported; reading it logs
/// nothing, and its errors (like every later one) are printed on stderr.
pub fn run(args: ServeArgs, log: LogFormat) -> ExitCode {
    crate::private_files::restrict_umask();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return super::fail(&anyhow::Error::new(e).context("starting the runtime"), 1),
    };
    let loaded = match load(&args) {
        Ok(l) => l,
        Err(e) => {
            init_tracing(log);
            return super::fail(&e, EXIT_CONFIG);
        }
    };
    let region = args.region.clone().or(loaded.file.node.region.clone());
    let otlp = otlp_of(&loaded, region.as_deref());
    let exporter = {
        let _context = runtime.enter();
        match init_tracing_with(log, otlp.as_ref()) {
            Ok(e) => e,
            Err(e) => {
                init_tracing(log);
                let e = anyhow::Error::new(e).context("node.tracing.otlp_endpoint");
                return super::fail(&e, EXIT_CONFIG);
            }
        }
    };
    if let Some(o) = &otlp {
        tracing::info!(endpoint = %o.endpoint, "exporting trace spans over otlp");
    }
    let code = match Settings::resolve(&args.overrides(), loaded) {
        Ok((settings, addresses)) => match runtime.block_on(serve(settings, addresses)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // The database's URL, server, credentials or schema version
                // are configuration.
                let config = e.chain().any(|c| {
                    c.downcast_ref::<crate::pg::PgError>()
                        .is_some_and(crate::pg::PgError::is_config)
                        || matches!(
                            c.downcast_ref::<crate::tasks::StoreError>(),
                            Some(crate::tasks::StoreError::ReplicaInUse(_))
                        )
                });
                if config {
                    return super::fail(&e, EXIT_CONFIG);
                }
                let store = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<crate::tasks::StoreError>(),
                        Some(
                            crate::tasks::StoreError::Damaged { .. }
                                | crate::tasks::StoreError::Lost { .. }
                        )
                    )
                });
                super::fail(&e, if store { EXIT_STORE } else { 1 })
            }
        },
        Err(e) => super::fail(&e, EXIT_CONFIG),
    };
    // Outside the workers, while the runtime that carries its channel runs.
    if let Some(e) = exporter {
        e.shutdown();
    }
    code
}

/// Binds an optional extra listener (`what`: admin, health).
async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(a) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(a)
        .await
        .with_context(|| format!("binding {what} address {a}"))?;
    Ok(Some(listener))
}

/// Binds the addresses, then runs the controller until SIGTERM/SIGINT,
/// SIGHUP reloading the policy; systemd hears READY=1 once it serves and
/// STOPPING=1 when shutdown begins.
async fn serve(settings: Settings, addresses: Addresses) -> anyhow::Result<()> {
    let listen = addresses.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let admin = bind_optional(addresses.admin, "admin").await?;
    let health = bind_optional(addresses.health, "health").await?;
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            if reload_tx.send(()).await.is_err() {
                return;
            }
        }
    });
    let shutdown = async move {
        shutdown_signal().await;
        super::sd_notify::notify_logged("STOPPING=1");
    };
    let hooks = crate::runtime::Hooks {
        reloads: Some(reloads),
        on_serving: Some(Box::new(|| {
            super::sd_notify::notify_logged("READY=1\nSTATUS=serving")
        })),
    };
    let listeners = crate::runtime::Listeners {
        grpc: listener,
        admin,
        health,
    };
    crate::runtime::run_with(settings, listeners, shutdown, hooks).await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
