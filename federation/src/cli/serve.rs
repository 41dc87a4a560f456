//! `federation serve`: runs one region's controller until SIGTERM/SIGINT;
//! SIGHUP (or, with `node.timers.policy_poll`, a change of the file's
//! content) reloads the policy from the federation file. Under systemd
//! (`Type=notify`) it reports READY=1 when the health status turns SERVING
//! and STOPPING=1 when shutdown begins.
//!
//! Start-up order: umask 0077 (everything created is owner-only),
//! configuration read (exit 64 when unusable), logging and span export
//! (`node.tracing`), settings, bind, open the state (exit 65 when the task
//! store is damaged or lost acknowledged work), serve. The library
//! ([`crate::controller`]) takes the bound listener and a shutdown future;
//! only this binary touches signals and addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use super::LogFormat;
use crate::config;
use crate::controller::{self, Node, Settings};
use crate::policy::Policy;

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

/// Everything `serve` needs: controller settings, the addresses to bind and
/// DNS SRV discovery.
#[derive(Debug)]
pub struct Resolved {
    /// The controller's settings.
    pub settings: Settings,
    /// The gRPC address (TLS unless `--insecure`).
    pub listen: SocketAddr,
    /// The admin HTTP address (`/metrics`, status page).
    pub admin_listen: Option<SocketAddr>,
    /// The plaintext health-only gRPC address (probes).
    pub health_listen: Option<SocketAddr>,
    /// DNS SRV discovery.
    pub discovery: Option<config::DiscoverySpec>,
    /// The approvals of the policy, when it names approvers.
    pub approval: Option<crate::approvals::Verdict>,
}

/// Reads the configuration files and environment that `serve` uses.
pub fn load(args: &ServeArgs) -> anyhow::Result<config::Loaded> {
    Ok(config::load(&config::Sources {
        federation_file: args.config.clone(),
        node_file: args.node_config.clone(),
        env: None,
    })?)
}

/// Builds controller settings from the configuration and flags.
pub fn settings(args: &ServeArgs) -> anyhow::Result<Resolved> {
    settings_from(args, load(args)?)
}

/// Builds controller settings from a loaded configuration and the flags.
pub fn settings_from(args: &ServeArgs, loaded: config::Loaded) -> anyhow::Result<Resolved> {
    let policy = Policy::from_loaded(&loaded)?;
    let approval = crate::approvals::check_loaded(None, &policy, &loaded, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let node = loaded.file.node;
    let region = args
        .region
        .clone()
        .or(node.region.clone())
        .context("no region: pass --region or set node.region")?;
    let Some(spec) = policy.region(&region) else {
        // Say where the name came from: the flag, the variable, or a file.
        let from = if args.region.is_some() {
            "--region".to_string()
        } else if std::env::var_os("FEDERATION__NODE__REGION").is_some() {
            "environment variable FEDERATION__NODE__REGION".to_string()
        } else {
            format!(
                "node.region of {}",
                args.node_config.as_ref().unwrap_or(&args.config).display()
            )
        };
        anyhow::bail!(
            "{from}: region `{region}` is not in {} (regions: {})",
            args.config.display(),
            policy
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let listen = match args.listen.or(node.listen) {
        Some(a) => a,
        None => default_listen(&spec.endpoint).with_context(|| {
            format!(
                "no listen address: set node.listen or --listen (endpoint `{}` has no port)",
                spec.endpoint
            )
        })?,
    };
    let advertise_endpoint = if listen.ip().is_unspecified() {
        spec.endpoint.clone()
    } else if args.insecure {
        format!("http://{listen}")
    } else {
        format!("https://{listen}")
    };
    let admin_listen = args.admin_listen.or(node.admin_listen);
    let health_listen = args.health_listen.or(node.health_listen);
    let mut peers = node.peers.clone();
    for (r, url) in &args.peers {
        if policy.region(r).is_none() {
            anyhow::bail!("--peer {r}=…: `{r}` is not a region of the federation");
        }
        peers.insert(r.clone(), url.clone());
    }
    let keys = crate::replication::KeyRing::load(node.keys.file.as_deref())?;
    if policy.sync.enabled && keys.is_none() {
        anyhow::bail!(
            "{}: data_synchronization is enabled but there is no key ring: set node.keys.file or {} (lines `id:base64-32-byte-key`), or set enabled: false",
            args.config.display(),
            crate::replication::keyring::KEYS_ENV
        );
    }
    let tls = if args.insecure {
        tracing::warn!(
            "--insecure: serving plaintext gRPC; anyone who can connect can act as a peer, agent, client or operator"
        );
        None
    } else {
        let t = &node.tls;
        let (Some(ca), Some(cert), Some(key)) = (t.ca.clone(), t.cert.clone(), t.key.clone())
        else {
            anyhow::bail!(
                "tls is required: set node.tls.ca, node.tls.cert and node.tls.key (or FEDERATION__NODE__TLS__CA/…), or pass --insecure for plaintext"
            );
        };
        Some(controller::TlsSettings {
            files: federation_tls::TlsFiles { ca, cert, key },
            federation: federation_tls::identity::slug(&loaded.file.federation.name),
            attest_tags: t.attest_tags,
        })
    };
    if let Some(key) = &node.tls.key {
        crate::private_files::warn_if_exposed(key, "tls private key file");
    }
    let tokens = match &node.tls.tokens_file {
        Some(path) => {
            crate::private_files::warn_if_exposed(path, "token file");
            crate::auth::Tokens::load(path)?
        }
        None => crate::auth::Tokens::default(),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(node.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("data").join(&region));
    Ok(Resolved {
        settings: Settings {
            region,
            policy,
            data_dir,
            peers,
            advertise_endpoint,
            timers: node.timers,
            limits: node.limits,
            config_path: args.config.clone(),
            keys,
            tls,
            tokens,
            store: node.store.clone(),
            replica: node.replica.clone().unwrap_or_else(default_replica),
        },
        listen,
        admin_listen,
        health_listen,
        discovery: node.discovery.clone(),
        approval,
    })
}

/// `node.replica` when unset: the host name.
fn default_replica() -> String {
    let name = rustix::system::uname();
    name.nodename().to_string_lossy().into_owned()
}

fn default_listen(endpoint: &str) -> Option<SocketAddr> {
    let rest = endpoint
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(endpoint);
    let port = rest
        .split('/')
        .next()?
        .rsplit_once(':')?
        .1
        .parse::<u16>()
        .ok()?;
    Some(SocketAddr::from(([0, 0, 0, 0], port)))
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
    let code = match settings_from(&args, loaded) {
        Ok(resolved) => match runtime.block_on(serve(resolved)) {
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

async fn serve(resolved: Resolved) -> anyhow::Result<()> {
    let Resolved {
        settings,
        listen,
        admin_listen,
        health_listen,
        discovery,
        approval,
    } = resolved;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let admin = bind_optional(admin_listen, "admin").await?;
    let health = bind_optional(health_listen, "health").await?;
    let node = controller::open(settings).await?;
    if let Some(v) = &approval {
        let hash = node.policy().hash.clone();
        tracing::info!(policy_hash = %hash, signed = %v.signed.join(","), missing = %v.missing.join(","), "policy approvals verified");
        node.log()
            .append(crate::approvals::record(&hash, v, "at start"))
            .await
            .context("recording the policy's approvals in the decision log")?;
    }
    // One listener for the signals; every server stops on the same word.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    if let Some(health) = health {
        tracing::info!(addr = %crate::logfields::list(health.local_addr().ok()), "plaintext gRPC health (probes only) serving");
        tokio::spawn(crate::runtime::serve_health_only(
            node.clone(),
            health,
            stopped(),
        ));
    }
    if let Some(spec) = discovery {
        let name = spec.dns_srv.clone();
        let discoverer = crate::discovery::Discoverer::new(spec)
            .with_context(|| format!("dns srv discovery of {name}"))?;
        tokio::spawn(crate::runtime::discovery_loop(node.clone(), discoverer));
    }
    if let Some(admin) = admin {
        tracing::info!(addr = %crate::logfields::list(admin.local_addr().ok()), "admin HTTP serving /metrics and the status page");
        let admin_node = node.clone();
        let admin_stop = stopped();
        tokio::spawn(async move {
            if let Err(e) = crate::admin_http::serve(admin_node, admin, admin_stop).await {
                tracing::error!(error = %e, "admin HTTP server failed");
            }
        });
    }
    // The bound address for scripts and harnesses (port 0 resolves here), as
    // a log line: stdout stays empty, so log collectors see only logs.
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let reload_node = node.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let r = reload_node.reloader().reload("", "", "").await;
            if r.applied {
                tracing::info!(policy_hash = %r.policy_hash, "SIGHUP: policy reloaded");
            } else {
                tracing::warn!(error = %r.error, "SIGHUP: policy reload refused; old policy kept");
            }
        }
    });
    tokio::spawn(notify_when_serving(node.clone()));
    let poll = node.timers().policy_poll;
    if !poll.is_zero() {
        tokio::spawn(poll_policy(node.clone(), poll));
    }
    let stop = stopped();
    let shutdown = async move {
        stop.await;
        super::sd_notify::notify_logged("STOPPING=1");
    };
    crate::runtime::serve(node, listener, shutdown).await
}

/// Sends systemd READY=1 the first time the health status (`grpc.health.v1`,
/// overall service) turns SERVING: what the probes and `Type=notify` wait for.
async fn notify_when_serving(node: Arc<Node>) {
    use tokio_stream::StreamExt as _;
    use tonic_health::pb::health_server::Health as _;
    let service = tonic_health::server::HealthService::from_health_reporter(node.health().clone());
    let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    let Ok(response) = service.watch(request).await else {
        return;
    };
    let mut statuses = response.into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    while let Some(Ok(update)) = statuses.next().await {
        if update.status == serving {
            super::sd_notify::notify_logged("READY=1\nSTATUS=serving");
            return;
        }
    }
}

/// Re-reads the federation file (and its approvals file) every `every` and
/// reloads the policy when their bytes changed (a mounted ConfigMap is replaced atomically, so a read
/// sees the old or the new file whole). A refused policy is logged once per
/// content; the old one keeps routing.
async fn poll_policy(node: Arc<Node>, every: std::time::Duration) {
    let path = node.reloader().config_path().to_path_buf();
    // The approvals file too: approvals added after the file changed (the
    // usual order) must trigger the reload the file change could not.
    let approvals = crate::approvals::approvals_path(&path);
    let mut seen_approvals = tokio::fs::read(&approvals).await.ok();
    let mut seen = tokio::fs::read(&path).await.ok();
    // The file may have changed between the start-up load and that read:
    // compare what it holds now with the policy in force, once.
    let on_disk = config::load(&config::Sources {
        federation_file: path.clone(),
        node_file: None,
        env: None,
    })
    .map_err(crate::policy::LoadError::from)
    .and_then(|l| Policy::from_loaded(&l));
    let mut changed = match on_disk {
        Ok(p) => p.hash != node.policy().hash,
        Err(_) => false,
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        if std::mem::take(&mut changed) {
            reload_changed(&node, &path).await;
        }
        ticker.tick().await;
        let now = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "policy poll: file unreadable; keeping the policy");
                continue;
            }
        };
        let now_approvals = tokio::fs::read(&approvals).await.ok();
        if seen.as_deref() == Some(now.as_slice()) && seen_approvals == now_approvals {
            continue;
        }
        seen = Some(now);
        seen_approvals = now_approvals;
        changed = true;
    }
}

async fn reload_changed(node: &Node, path: &std::path::Path) {
    let r = node.reloader().reload("", "", "").await;
    if r.applied {
        tracing::info!(path = %path.display(), policy_hash = %r.policy_hash, "federation file changed: policy reloaded");
    } else {
        tracing::warn!(path = %path.display(), error = %r.error, "federation file changed: reload refused; old policy kept");
    }
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
